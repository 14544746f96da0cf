//! Presence, at once and then every interval: `POST /agents/{id}/heartbeat` to SignalDock,
//! or, for an agent on the local SignalDock, the same record written into `signaldock.db`
//! (see [`LocalTransport::record_presence`]). One service, two [`Beat`]s.
//!
//! The schedule is fixed (ticks do not drift with request time). A beat that succeeds resets
//! `consecutiveFailures`; anything else adds one. A 429 with `Retry-After` skips the beats
//! that fall inside the wait.
//!
//! [`Heartbeat::beat_now`] asks the loop for one beat at once (the schedule stays as it is)
//! and resolves with its outcome: a test drives presence without a clock, and the beat is
//! counted like any other because the loop itself sends it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::error::Result;
use super::local::LocalTransport;
use super::signaldock::SignalDock;
use super::sync::lock;
use super::task::{Asked, Asker, NotDone, RunningTask};

/// The default interval (API.md).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Sends one beat. [`SignalDock`] beats over REST, [`LocalTransport`] into `signaldock.db`;
/// tests count calls.
pub trait Beat: Send + Sync {
    fn beat(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}

impl Beat for SignalDock {
    fn beat(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(self.heartbeat())
    }
}

impl Beat for LocalTransport {
    fn beat(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(self.record_presence())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatStatus {
    pub running: bool,
    pub consecutive_failures: u32,
    pub beats: u64,
    pub last_error: Option<String>,
}

/// What one beat asked for with [`Heartbeat::beat_now`] came to.
#[derive(Clone, Debug, PartialEq)]
pub struct BeatOutcome {
    /// The server answered 2xx.
    pub ok: bool,
    /// Why it failed, without secrets.
    pub error: Option<String>,
    /// `consecutive_failures` after this beat.
    pub consecutive_failures: u32,
}

struct Running {
    task: RunningTask,
    requests: Asker<BeatOutcome>,
}

#[derive(Default)]
struct Counters {
    consecutive_failures: AtomicU32,
    beats: AtomicU64,
    last_error: Mutex<Option<String>>,
}

pub struct Heartbeat {
    beat: Arc<dyn Beat>,
    interval: Duration,
    counters: Arc<Counters>,
    task: Mutex<Option<Running>>,
    /// The span current at creation, which the loop logs in on every start.
    span: tracing::Span,
}

impl Heartbeat {
    pub fn new(beat: Arc<dyn Beat>, interval: Duration) -> Self {
        Self {
            beat,
            interval,
            counters: Arc::default(),
            task: Mutex::new(None),
            span: tracing::Span::current(),
        }
    }

    /// Starts beating (once now, then every interval); resets the failure count.
    /// Returns false when already running.
    pub fn start(&self) -> bool {
        let mut task = lock(&self.task);
        if task.is_some() {
            return false;
        }
        self.counters
            .consecutive_failures
            .store(0, Ordering::Relaxed);
        let (beat, counters, interval) = (self.beat.clone(), self.counters.clone(), self.interval);
        let _in_span = self.span.enter();
        let (requests, asked) = Asker::new();
        *task = Some(Running {
            task: RunningTask::spawn(move |token| run(beat, counters, interval, asked, token)),
            requests,
        });
        true
    }

    pub fn stop(&self) {
        if let Some(running) = lock(&self.task).take() {
            running.task.stop();
        }
    }

    /// One beat now, sent by the running loop; resolves with its outcome. The schedule is
    /// left alone, and a `Retry-After` wait does not hold an asked-for beat back.
    pub fn beat_now(
        &self,
    ) -> impl Future<Output = std::result::Result<BeatOutcome, NotDone>> + Send + 'static {
        Asker::ask(lock(&self.task).as_ref().map(|running| &running.requests))
    }

    pub fn status(&self) -> HeartbeatStatus {
        HeartbeatStatus {
            running: lock(&self.task).is_some(),
            consecutive_failures: self.counters.consecutive_failures.load(Ordering::Relaxed),
            beats: self.counters.beats.load(Ordering::Relaxed),
            last_error: lock(&self.counters.last_error).clone(),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run(
    beat: Arc<dyn Beat>,
    counters: Arc<Counters>,
    interval: Duration,
    mut asked: Asked<BeatOutcome>,
    token: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut not_before: Option<Instant> = None;
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticks.tick() => {
                if not_before.is_some_and(|t| Instant::now() < t) {
                    continue;
                }
            }
            Some(request) = asked.recv() => waiting.push(request),
        }
        // Everyone who asked before this beat starts is answered by it.
        while let Ok(request) = asked.try_recv() {
            waiting.push(request);
        }
        let result = tokio::select! {
            _ = token.cancelled() => return,
            result = beat.beat() => result,
        };
        counters.beats.fetch_add(1, Ordering::Relaxed);
        let outcome = match result {
            Ok(()) => {
                counters.consecutive_failures.store(0, Ordering::Relaxed);
                not_before = None;
                BeatOutcome {
                    ok: true,
                    error: None,
                    consecutive_failures: 0,
                }
            }
            Err(err) => {
                let failures = counters
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                tracing::warn!(error = %err, failures, "heartbeat failed");
                not_before = err.retry_after().map(|wait| Instant::now() + wait);
                let text = err.to_string();
                *lock(&counters.last_error) = Some(text.clone());
                BeatOutcome {
                    ok: false,
                    error: Some(text),
                    consecutive_failures: failures,
                }
            }
        };
        for request in waiting {
            let _ = request.send(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::Error;
    use std::sync::atomic::AtomicUsize;

    /// Answers from a script (then Ok), recording when each beat happened.
    struct Scripted {
        answers: Mutex<Vec<Result<()>>>,
        at: Mutex<Vec<Duration>>,
        start: Instant,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(answers: Vec<Result<()>>) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers.into_iter().rev().collect()),
                at: Mutex::new(Vec::new()),
                start: Instant::now(),
                calls: AtomicUsize::new(0),
            })
        }
        fn times(&self) -> Vec<u64> {
            lock(&self.at).iter().map(|d| d.as_secs()).collect()
        }
    }

    impl Beat for Scripted {
        fn beat(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            lock(&self.at).push(self.start.elapsed());
            let answer = lock(&self.answers).pop().unwrap_or(Ok(()));
            Box::pin(async move {
                // Each request takes a while: the schedule must not drift by it.
                tokio::time::sleep(Duration::from_millis(700)).await;
                answer
            })
        }
    }

    fn server_error() -> Error {
        Error::Status {
            status: 503,
            retry_after: None,
            message: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn beats_at_once_then_on_a_fixed_schedule() {
        let script = Scripted::new(vec![]);
        let hb = Heartbeat::new(script.clone(), Duration::from_secs(30));
        assert!(hb.start());
        assert!(!hb.start(), "start is idempotent");
        tokio::time::sleep(Duration::from_secs(95)).await;
        assert_eq!(script.times(), [0, 30, 60, 90]);
        hb.stop();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            script.calls.load(Ordering::Relaxed),
            4,
            "no beat after stop"
        );
        assert!(!hb.status().running);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_up_and_reset() {
        let script = Scripted::new(vec![
            Err(server_error()),
            Err(Error::Timeout),
            Ok(()),
            Err(server_error()),
        ]);
        let hb = Heartbeat::new(script.clone(), Duration::from_secs(10));
        hb.start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(hb.status().consecutive_failures, 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(hb.status().consecutive_failures, 2);
        assert_eq!(hb.status().last_error.as_deref(), Some("request timed out"));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(hb.status().consecutive_failures, 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(hb.status().consecutive_failures, 1);
        hb.stop();
        hb.start();
        assert_eq!(
            hb.status().consecutive_failures,
            0,
            "start resets the count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn beat_now_beats_at_once_and_reports_the_outcome() {
        let script = Scripted::new(vec![Ok(()), Err(server_error())]);
        let hb = Heartbeat::new(script.clone(), Duration::from_secs(30));
        assert_eq!(hb.beat_now().await, Err(NotDone::NotRunning));
        hb.start();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Asked at 5 s: sent at once (the request takes 0.7 s), failing, and counted.
        let outcome = hb.beat_now().await.unwrap();
        assert_eq!(
            outcome,
            BeatOutcome {
                ok: false,
                error: Some(server_error().to_string()),
                consecutive_failures: 1,
            }
        );
        assert_eq!(script.times(), [0, 5]);
        assert_eq!(hb.status().beats, 2);
        // Two callers at once share the next beat.
        let (a, b) = tokio::join!(hb.beat_now(), hb.beat_now());
        assert!(a.as_ref().unwrap().ok && a == b);
        assert_eq!(script.times(), [0, 5, 5]);
        // The schedule is unchanged: 30 and 60 s.
        tokio::time::sleep(Duration::from_secs(56)).await;
        assert_eq!(script.times(), [0, 5, 5, 30, 60]);
        // Stopped mid-beat: the caller hears so instead of waiting for ever.
        let pending = hb.beat_now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        hb.stop();
        assert_eq!(pending.await, Err(NotDone::Stopped));
        assert_eq!(hb.beat_now().await, Err(NotDone::NotRunning));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_skips_beats() {
        let limited = Error::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(25)),
            message: String::new(),
        };
        let script = Scripted::new(vec![Err(limited)]);
        let hb = Heartbeat::new(script.clone(), Duration::from_secs(10));
        hb.start();
        tokio::time::sleep(Duration::from_secs(41)).await;
        // 0 (429, wait 25 s), 10 and 20 skipped, 30, 40.
        assert_eq!(script.times(), [0, 30, 40]);
    }
}
