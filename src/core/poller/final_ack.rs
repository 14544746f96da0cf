//! Final acks: what a stopped poller handled but had not acked yet ([`Poller::stop`]
//! returns those ids) is acked on the way out, in one place.
//!
//! - [`send`] acks them on a native source, retried with a doubling pause within
//!   [`FINAL_ACK_BUDGET`] (the server may be failing a share of requests). What it cannot ack
//!   is offered again to the next runtime (at-least-once); nothing keeps the process alive
//!   for it.
//! - While such an ack is on its way, a poller for the same agent started in this process
//!   waits for it ([`wait_for_earlier`], at most [`FINAL_ACK_WAIT`]) before its first poll,
//!   so it is not offered what the stopped one handled. The registry of acks on their way is
//!   process-wide on purpose: two runtimes of one process share the server's queue.
//!
//! A JavaScript transport's final ack is not here: it must be called before `stop()`
//! returns, on the JS thread, so the boundary makes that one call itself.
//!
//! [`Poller::stop`]: super::Poller::stop

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use tokio::sync::watch;

use crate::core::sync::lock;
use crate::core::transport::DirectSource;

/// How long a stopped poller keeps trying to ack what it handled.
pub const FINAL_ACK_BUDGET: Duration = Duration::from_secs(5);
/// The first pause between two tries; it doubles after each failure.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// How long a starting poller waits for the final acks of pollers stopped before it.
pub const FINAL_ACK_WAIT: Duration = Duration::from_secs(6);

type InFlight = Mutex<HashMap<String, Vec<watch::Receiver<()>>>>;

/// Final acks still on their way from stopped pollers, per agent id.
fn in_flight() -> &'static InFlight {
    static IN_FLIGHT: std::sync::OnceLock<InFlight> = std::sync::OnceLock::new();
    IN_FLIGHT.get_or_init(InFlight::default)
}

/// Held while the final ack of a stopped poller is on its way; dropped when it is done or
/// given up.
pub struct FinalAckGuard(#[expect(dead_code, reason = "held for its drop")] watch::Sender<()>);

/// Registers a final ack for `agent_id`: a poller for the same agent started before the guard
/// is dropped waits for it (at most [`FINAL_ACK_WAIT`]) before its first poll.
pub fn in_flight_for(agent_id: &str) -> FinalAckGuard {
    let (done, waiting) = watch::channel(());
    let mut acks = lock(in_flight());
    // A receiver whose guard is gone is done: `has_changed` errs once the sender is dropped.
    acks.retain(|_, list| {
        list.retain(|rx| rx.has_changed().is_ok());
        !list.is_empty()
    });
    acks.entry(agent_id.to_owned()).or_default().push(waiting);
    FinalAckGuard(done)
}

/// Returns once the final acks registered for `agent_id` are done, or after
/// [`FINAL_ACK_WAIT`].
pub async fn wait_for_earlier(agent_id: &str) {
    let waiting: Vec<watch::Receiver<()>> = lock(in_flight())
        .get(agent_id)
        .map(|list| {
            list.iter()
                .filter(|rx| rx.has_changed().is_ok())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if waiting.is_empty() {
        return;
    }
    tracing::debug!(
        count = waiting.len(),
        "waiting for the final acks of a stopped poller"
    );
    let all = join_all(waiting.into_iter().map(|mut rx| async move {
        // Never sent to: returns when the guard is dropped.
        let _ = rx.changed().await;
    }));
    let _ = tokio::time::timeout(FINAL_ACK_WAIT, all).await;
}

/// The final ack of `ids` on `source`, registered for `agent_id` from this call on (so a
/// poller started before the returned future runs already waits for it). Nothing when `ids`
/// is empty.
pub fn send(
    agent_id: &str,
    source: Arc<dyn DirectSource>,
    ids: Vec<String>,
) -> Option<BoxFuture<'static, ()>> {
    if ids.is_empty() {
        return None;
    }
    let guard = in_flight_for(agent_id);
    Some(Box::pin(async move {
        retry(source.as_ref(), &ids).await;
        drop(guard);
    }))
}

/// Acks `ids`, trying again after a failure while [`FINAL_ACK_BUDGET`] lasts.
async fn retry(source: &dyn DirectSource, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + FINAL_ACK_BUDGET;
    let mut pause = FIRST_PAUSE;
    loop {
        let error = match tokio::time::timeout_at(deadline, source.ack(ids.to_vec())).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            tracing::warn!(
                error,
                count = ids.len(),
                "final ack on stop failed; those messages may be offered again"
            );
            return;
        }
        tracing::debug!(error, "final ack on stop failed; retrying");
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::{Error, Result};
    use crate::core::transport::Page;
    use std::collections::VecDeque;

    /// A source whose acks answer from a script (then succeed), recording when each came.
    #[derive(Default)]
    struct Acks {
        script: Mutex<VecDeque<Option<Result<()>>>>,
        calls: Mutex<Vec<(u64, Vec<String>)>>,
        start: Mutex<Option<tokio::time::Instant>>,
    }

    impl Acks {
        fn scripted(answers: Vec<Option<Result<()>>>) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(answers.into()),
                start: Mutex::new(Some(tokio::time::Instant::now())),
                ..Self::default()
            })
        }

        fn times(&self) -> Vec<u64> {
            lock(&self.calls).iter().map(|(at, _)| *at).collect()
        }
    }

    impl DirectSource for Acks {
        fn poll(&self, _limit: u32, _since: Option<String>) -> BoxFuture<'_, Result<Page>> {
            Box::pin(async { Ok(Page::default()) })
        }

        fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
            let start = lock(&self.start).expect("set");
            let at = (tokio::time::Instant::now() - start).as_millis() as u64;
            lock(&self.calls).push((at, ids));
            let answer = lock(&self.script).pop_front().unwrap_or(Some(Ok(())));
            Box::pin(async move {
                match answer {
                    Some(answer) => answer,
                    // Never answers: the budget's timeout ends it.
                    None => std::future::pending().await,
                }
            })
        }

        fn name(&self) -> String {
            "acks".into()
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn refused() -> Option<Result<()>> {
        Some(Err(Error::Status {
            status: 503,
            retry_after: None,
            message: String::new(),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_to_ack_sends_nothing() {
        let source = Acks::scripted(vec![]);
        assert!(send("nothing", source.clone(), vec![]).is_none());
        assert!(source.times().is_empty());
    }

    /// A case: its name, the acks' answers (None: never), the times of the tries (ms).
    type Case = (&'static str, Vec<Option<Result<()>>>, &'static [u64]);

    #[tokio::test(start_paused = true)]
    async fn retries_with_doubling_pauses_until_the_ack_goes_through() {
        let table: &[Case] = &[
            ("first try", vec![Some(Ok(()))], &[0]),
            ("two failures", vec![refused(), refused()], &[0, 100, 300]),
            (
                "a hang is cut at the budget",
                vec![None],
                &[0], // the one try times out at 5 s: no time left for another
            ),
            (
                "gives up within the budget",
                vec![refused(); 10],
                // 0, +100, +200, +400, +800, +1600: the next pause (3200) ends past 5 s.
                &[0, 100, 300, 700, 1500, 3100],
            ),
        ];
        for (case, answers, expected) in table {
            let source = Acks::scripted(answers.clone());
            let ack = send("retry-test", source.clone(), ids(&["a", "b"])).expect("ids");
            let started = tokio::time::Instant::now();
            ack.await;
            assert_eq!(source.times(), *expected, "{case}");
            assert!(
                started.elapsed() <= FINAL_ACK_BUDGET,
                "{case}: within the budget"
            );
            assert!(
                lock(&source.calls)
                    .iter()
                    .all(|(_, sent)| sent == &ids(&["a", "b"])),
                "{case}: the same ids every time"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_start_waits_for_the_ack_on_its_way_and_no_longer() {
        let source = Acks::scripted(vec![refused(), refused()]);
        let ack = send("waits-test", source.clone(), ids(&["a"])).expect("ids");
        let started = tokio::time::Instant::now();
        let waited = tokio::spawn(async move {
            wait_for_earlier("waits-test").await;
            tokio::time::Instant::now()
        });
        ack.await;
        let done = waited.await.expect("joins");
        assert_eq!(
            done - started,
            Duration::from_millis(300),
            "until the ack went"
        );

        // Another agent's ack on its way holds nobody else back.
        let _other = in_flight_for("someone-else");
        let before = tokio::time::Instant::now();
        wait_for_earlier("waits-test").await;
        assert_eq!(before.elapsed(), Duration::ZERO);

        // A guard never dropped holds a start back for FINAL_ACK_WAIT at most.
        let _stuck = in_flight_for("waits-test");
        wait_for_earlier("waits-test").await;
        assert_eq!(before.elapsed(), FINAL_ACK_WAIT);
    }
}
