//! When to reconnect: pure functions of how the last connection ended, so the schedule is
//! pinned by tables instead of by timing tests.
//!
//! Failures count up until a stream stays up for `healthy_after`; a flapping server (accepts,
//! then drops at once) thus keeps backing off instead of being hammered at the base delay.
//! A key rotation is not a failure: it reconnects at once.

use std::time::Duration;

use super::SseConfig;
use crate::core::backoff::Backoff;

/// How one connection attempt ended, as far as the schedule cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The key rotated: reconnect with the new one.
    Rotated,
    /// 401: the key was refused.
    Unauthorized,
    /// Any other non-2xx answer.
    Refused { retry_after: Option<Duration> },
    /// Could not connect, or the stream broke, ended, went idle or overflowed.
    Failed,
}

/// What to do before the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    Now,
    For(Duration),
    /// Wait this long, or less if the key rotates meanwhile.
    UntilRotation(Duration),
}

/// Consecutive failures after an attempt that ended with `end` and had been connected for
/// `connected_for` (`None`: never connected).
pub fn failures_after(
    failures: u32,
    end: End,
    connected_for: Option<Duration>,
    healthy_after: Duration,
) -> u32 {
    let failures = if connected_for.is_some_and(|up| up >= healthy_after) {
        0
    } else {
        failures
    };
    match end {
        End::Rotated => failures,
        _ => failures.saturating_add(1),
    }
}

/// The schedule in force: the configured one, with the server's `retry:` as its base when it
/// sent one, floored at `min_retry` and never above the cap.
pub fn schedule(config: &SseConfig, server_retry: Option<Duration>) -> Backoff {
    match server_retry {
        None => config.backoff,
        Some(retry) => Backoff {
            base: retry.max(config.min_retry).min(config.backoff.max),
            max: config.backoff.max,
        },
    }
}

/// The pause after `failures` consecutive failures, the last one ending with `end`.
/// `alternate_key`: the refused key has a rotation partner still in its overlap window, worth
/// one immediate try. `unit` in `[0, 1)` is the jitter.
pub fn plan(
    config: &SseConfig,
    failures: u32,
    server_retry: Option<Duration>,
    end: End,
    alternate_key: bool,
    unit: f64,
) -> Pause {
    let backoff = || {
        let delay = schedule(config, server_retry).delay(failures.saturating_sub(1), unit);
        // Jitter may halve the server's `retry:`; its floor still holds.
        match server_retry {
            Some(_) => delay.max(config.min_retry),
            None => delay,
        }
    };
    match end {
        End::Rotated => Pause::Now,
        End::Unauthorized if alternate_key => Pause::Now,
        // Retrying a refused key cannot help until someone rotates it.
        End::Unauthorized => Pause::UntilRotation(backoff().max(config.unauthorized_delay)),
        End::Refused { retry_after } => Pause::For(backoff().max(retry_after.unwrap_or_default())),
        End::Failed => Pause::For(backoff()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use url::Url;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config() -> SseConfig {
        let mut config = SseConfig::new(Url::parse("http://127.0.0.1:1/messages/stream").unwrap());
        config.backoff = Backoff {
            base: ms(1000),
            max: ms(30_000),
        };
        config.healthy_after = ms(30_000);
        config.min_retry = ms(500);
        config.unauthorized_delay = ms(30_000);
        config
    }

    #[test]
    fn failures_reset_only_after_a_healthy_stream() {
        let healthy = ms(30_000);
        for (before, end, up, want) in [
            (0, End::Failed, None, 1),
            (4, End::Failed, None, 5),
            (4, End::Failed, Some(ms(29_999)), 5), // flapping: still failing
            (4, End::Failed, Some(ms(30_000)), 1), // healthy, then dropped: a fresh first failure
            (4, End::Unauthorized, None, 5),
            (4, End::Refused { retry_after: None }, None, 5),
            (4, End::Rotated, Some(ms(1)), 4), // not a failure
            (4, End::Rotated, Some(ms(40_000)), 0),
            (u32::MAX, End::Failed, None, u32::MAX),
        ] {
            assert_eq!(
                failures_after(before, end, up, healthy),
                want,
                "{before} {end:?} {up:?}"
            );
        }
    }

    #[test]
    fn delays_follow_the_schedule() {
        let c = config();
        let failed = End::Failed;
        // (failures, server retry, end, alternate key, jitter unit, pause)
        for (failures, retry, end, alt, unit, want) in [
            (1, None, failed, false, 0.999_999, Pause::For(ms(1000))),
            (1, None, failed, false, 0.0, Pause::For(ms(500))),
            (2, None, failed, false, 0.999_999, Pause::For(ms(2000))),
            (4, None, failed, false, 0.999_999, Pause::For(ms(8000))),
            (40, None, failed, false, 0.999_999, Pause::For(ms(30_000))),
            (40, None, failed, false, 0.0, Pause::For(ms(15_000))),
            // The server's retry replaces the base...
            (
                1,
                Some(ms(3000)),
                failed,
                false,
                0.999_999,
                Pause::For(ms(3000)),
            ),
            (
                2,
                Some(ms(3000)),
                failed,
                false,
                0.999_999,
                Pause::For(ms(6000)),
            ),
            // ...never below min_retry (before or after jitter), never above the cap.
            (
                1,
                Some(ms(10)),
                failed,
                false,
                0.999_999,
                Pause::For(ms(500)),
            ),
            (1, Some(ms(600)), failed, false, 0.0, Pause::For(ms(500))),
            (
                1,
                Some(ms(600_000)),
                failed,
                false,
                0.999_999,
                Pause::For(ms(30_000)),
            ),
            // Retry-After wins when longer.
            (
                1,
                None,
                End::Refused {
                    retry_after: Some(ms(7000)),
                },
                false,
                0.0,
                Pause::For(ms(7000)),
            ),
            (
                3,
                None,
                End::Refused {
                    retry_after: Some(ms(10)),
                },
                false,
                0.999_999,
                Pause::For(ms(4000)),
            ),
            (
                3,
                None,
                End::Refused { retry_after: None },
                false,
                0.999_999,
                Pause::For(ms(4000)),
            ),
            // 401: wait for a rotation (at least unauthorized_delay), unless the other key
            // of an overlap window is there to try.
            (
                1,
                None,
                End::Unauthorized,
                false,
                0.0,
                Pause::UntilRotation(ms(30_000)),
            ),
            (1, None, End::Unauthorized, true, 0.0, Pause::Now),
            (1, None, End::Rotated, false, 0.0, Pause::Now),
        ] {
            let got = plan(&c, failures, retry, end, alt, unit);
            let near = match (got, want) {
                (Pause::For(a), Pause::For(b))
                | (Pause::UntilRotation(a), Pause::UntilRotation(b)) => a.abs_diff(b) <= ms(1),
                (a, b) => a == b,
            };
            assert!(
                near,
                "{failures} {retry:?} {end:?} {alt} {unit}: {got:?} != {want:?}"
            );
        }
    }

    #[test]
    fn a_long_unauthorized_backoff_outlasts_the_floor() {
        let mut c = config();
        c.unauthorized_delay = ms(100);
        assert_eq!(
            plan(&c, 4, None, End::Unauthorized, false, 0.0),
            Pause::UntilRotation(ms(4000))
        );
    }
}
