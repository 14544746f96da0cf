//! A running loop: its cancellation token and its task.
//!
//! Every service loop is a `select!` between its work and `token.cancelled()`. Stopping
//! cancels the token (the loop leaves at its next await point) and aborts the task, because
//! the loop may be parked on something that never finishes, such as a JavaScript promise
//! that never settles: `stop()` must not wait for it.
//!
//! A task runs in the span that was current where it was spawned (tokio does not carry
//! spans across `spawn` by itself): that is how a runtime's records reach its logger
//! ([`crate::logging::LogScope`]).
//!
//! [`NotDone`] is why an on-demand run (`poll_now_and_wait`, `beat_now`, `check_now`: the
//! clock-free hooks tests drive a service with) did not complete; [`Asker`] is how a caller
//! asks a running loop for such a run and waits for its outcome (a bounded queue).

use std::fmt;
use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug)]
pub struct RunningTask {
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl RunningTask {
    /// Spawns `body(token)` on the current tokio runtime, in the current span.
    pub fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(body(token.clone()).in_current_span());
        Self { token, handle }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Cancels and aborts; returns at once.
    pub fn stop(self) {
        self.token.cancel();
        self.handle.abort();
    }
}

/// Why a requested run of a service's loop did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotDone {
    /// The service was not started (or already stopped) when the run was asked for.
    NotRunning,
    /// The service stopped before the run completed.
    Stopped,
    /// A poll was asked for before any handler was set: nothing would be consumed.
    NoHandler,
}

impl fmt::Display for NotDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotRunning => "not running (call start() first)",
            Self::Stopped => "stopped before it completed",
            Self::NoHandler => "no handler yet (call onMessage() first)",
        })
    }
}

/// Requests that can be waiting for one loop's on-demand run, before callers wait for room.
/// Each waits on its own answer, and the loop answers everyone waiting with one run.
pub const MAX_WAITING_REQUESTS: usize = 64;

/// A caller's way to ask a running loop for one run now and get its outcome `T` back
/// (`beat_now`, `check_now`). Bounded: past [`MAX_WAITING_REQUESTS`] callers wait for room.
pub struct Asker<T> {
    requests: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<T>>,
}

/// The loop's end of an [`Asker`].
pub type Asked<T> = tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<T>>;

impl<T: Send + 'static> Asker<T> {
    pub fn new() -> (Self, Asked<T>) {
        let (requests, asked) = tokio::sync::mpsc::channel(MAX_WAITING_REQUESTS);
        (Self { requests }, asked)
    }

    /// Asks for one run; `None` (not running) is [`NotDone::NotRunning`], a loop that stops
    /// before answering is [`NotDone::Stopped`].
    pub fn ask(
        asker: Option<&Self>,
    ) -> impl std::future::Future<Output = Result<T, NotDone>> + Send + use<T> {
        let requests = asker.map(|a| a.requests.clone());
        async move {
            let requests = requests.ok_or(NotDone::NotRunning)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            requests.send(tx).await.map_err(|_| NotDone::NotRunning)?;
            // The loop drops the sender when it is stopped mid-run.
            rx.await.map_err(|_| NotDone::Stopped)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn stop_ends_a_loop_parked_forever() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = RunningTask::spawn(|_token| async move {
            let _guard = tx; // dropped when the task is dropped
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        task.stop();
        assert!(rx.await.is_err(), "the aborted task dropped its state");
    }
}
