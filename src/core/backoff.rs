//! Reconnect delays: exponential from a base, capped, with jitter, and how `Retry-After`
//! turns into a wait.

use std::time::Duration;

/// An exponential schedule: `base · 2^attempt`, capped at `max`, each delay jittered down
/// to between half and all of it so reconnecting agents do not arrive in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The SSE schedule of WIRE.md: 1 s, 2 s, 4 s … capped at 30 s.
    pub const SSE: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };

    /// The delay before retry number `attempt` (0-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt`, jittered by `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
    }

    /// The delay with jitter from a fresh random number.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }
}

/// Parses `Retry-After` (seconds; an HTTP date is treated as one second, the server's
/// clock being no better than ours), clamped to `max`.
pub fn retry_after(header: &str, max: Duration) -> Option<Duration> {
    let header = header.trim();
    if header.is_empty() {
        return None;
    }
    match header.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Some(Duration::from_secs_f64(secs.min(max.as_secs_f64())))
        }
        Ok(_) => None,
        Err(_) => Some(Duration::from_secs(1).min(max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_schedule_doubles_to_the_cap() {
        let secs: Vec<u64> = (0..8).map(|a| Backoff::SSE.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(Backoff::SSE.ceiling(1000), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let b = Backoff::SSE;
        for (attempt, unit, want_ms) in [
            (0, 0.0, 500),
            (0, 0.999_999, 1000),
            (2, 0.5, 3000),
            (10, 0.0, 15_000),
            (10, 2.0, 30_000),
        ] {
            let got = b.delay(attempt, unit).as_millis() as i64;
            assert!((got - want_ms).abs() <= 1, "{attempt} {unit}: {got}");
        }
        for attempt in 0..40 {
            let d = b.jittered(attempt);
            assert!(d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt));
        }
    }

    #[test]
    fn retry_after_table() {
        let max = Duration::from_secs(60);
        for (header, want) in [
            ("3", Some(Duration::from_secs(3))),
            (" 0 ", Some(Duration::ZERO)),
            ("1.5", Some(Duration::from_millis(1500))),
            ("999999", Some(max)),
            ("-1", None),
            ("", None),
            (
                "Wed, 21 Oct 2015 07:28:00 GMT",
                Some(Duration::from_secs(1)),
            ),
        ] {
            assert_eq!(retry_after(header, max), want, "{header:?}");
        }
    }
}
