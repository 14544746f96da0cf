//! Realtime for `signaldock.db`: the watcher that notices other connections' commits, and the
//! delivery loop a subscription runs on each of them.
//!
//! The watcher is a loop on the blocking pool that owns a reader connection and asks
//! `PRAGMA data_version` every [`WATCH_INTERVAL`](super::WATCH_INTERVAL); each change bumps a
//! counter on a watch channel ([`LocalTransport::commits`](super::LocalTransport::commits)).
//! [`deliver_commits`] follows that channel: on every change (and once at the start) it hands
//! what is pending to a handler and acks what the handler settled.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{DEFAULT_POLL_LIMIT, WATCH_INTERVAL, data_version};
use crate::core::delivery::{Handler, Outcome, Settled};
use crate::core::sync::lock;
use crate::core::task::RunningTask;
use crate::core::transport::DirectSource;

/// Starts the watcher: a loop on the blocking pool that owns the reader, and a task whose
/// only job is to keep the loop alive. The loop sleeps on a channel from that task, so
/// stopping the task (cancel or abort both drop the sender) wakes and ends the loop at once,
/// and an idle tick costs one thread wake-up and the pragma, with no async hand-offs.
pub(super) fn spawn_watcher(
    reader: Connection,
    seen: i64,
    commits: watch::Sender<u64>,
) -> RunningTask {
    let (alive, stopped) = mpsc::channel::<()>();
    let looking =
        tokio::task::spawn_blocking(move || look_for_commits(reader, seen, &commits, &stopped));
    RunningTask::spawn(move |token| async move {
        let _alive = alive;
        tokio::select! {
            _ = token.cancelled() => {}
            _ = looking => {}
        }
    })
}

/// Blocking, until `stopped` disconnects. The reader closes here too, off the async threads.
fn look_for_commits(
    reader: Connection,
    mut seen: i64,
    commits: &watch::Sender<u64>,
    stopped: &mpsc::Receiver<()>,
) {
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(WATCH_INTERVAL) {
        match data_version(&reader) {
            Ok(version) => {
                failing = false;
                if version != seen {
                    seen = version;
                    commits.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            Err(err) => {
                // Once per streak: a locked or vanished file would otherwise log 40 times a second.
                if !failing {
                    tracing::warn!(error = %err, "cannot watch signaldock.db for commits");
                }
                failing = true;
            }
        }
    }
}

/// A subscription's loop: at the start and after every commit, hands what is pending (a page
/// at a time, until none is left) to `handler` and acks each message once it has settled,
/// handled or failed. Ends when `token` is cancelled (after acking what was settled) or when
/// `commits` closes (the transport disconnected).
///
/// A failing poll or ack waits for the next commit rather than trying again at once: an ack
/// that keeps failing would otherwise hand the same page over and over.
pub async fn deliver_commits(
    source: &dyn DirectSource,
    mut commits: watch::Receiver<u64>,
    handler: &dyn Handler,
    token: CancellationToken,
) {
    loop {
        // Marked seen before the poll: a commit during it still wakes the wait below.
        commits.borrow_and_update();
        let more = match source.poll(DEFAULT_POLL_LIMIT, None).await {
            Ok(page) if !page.messages.is_empty() => {
                let settled_ids: Arc<Mutex<Vec<String>>> = Arc::default();
                let record = settled_ids.clone();
                let settled: Settled =
                    Arc::new(move |id: &str, _outcome: Outcome| lock(&record).push(id.to_owned()));
                handler.deliver(page.messages, settled, token.clone()).await;
                let ids = std::mem::take(&mut *lock(&settled_ids));
                match source.ack(ids).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "LocalTransport subscription ack failed");
                        false
                    }
                }
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "LocalTransport subscription poll failed");
                false
            }
        };
        if token.is_cancelled() {
            return;
        }
        if more {
            continue;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = commits.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::{Error, Result};
    use crate::core::message::ConduitMessage;
    use crate::core::transport::Page;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// An inbox: pending messages, taken off by an ack; the ack can be made to fail.
    #[derive(Default)]
    struct Inbox {
        pending: Mutex<Vec<ConduitMessage>>,
        acked: Mutex<Vec<String>>,
        polls: AtomicUsize,
        ack_fails: AtomicBool,
    }

    impl Inbox {
        fn add(&self, id: &str) {
            lock(&self.pending).push(ConduitMessage::with_id(id));
        }
    }

    impl DirectSource for Inbox {
        fn poll(&self, limit: u32, _since: Option<String>) -> BoxFuture<'_, Result<Page>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            let messages: Vec<ConduitMessage> = lock(&self.pending)
                .iter()
                .take(limit as usize)
                .cloned()
                .collect();
            Box::pin(async move {
                Ok(Page {
                    rows: messages.len(),
                    messages,
                    ..Page::default()
                })
            })
        }
        fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
            Box::pin(async move {
                if self.ack_fails.load(Ordering::SeqCst) {
                    return Err(Error::NotConnected("ack refused".into()));
                }
                lock(&self.pending).retain(|m| !ids.contains(&m.id));
                lock(&self.acked).extend(ids);
                Ok(())
            })
        }
        fn name(&self) -> String {
            "inbox".into()
        }
    }

    /// Settles every message, handled; the last one of a batch failed when its id says so.
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<String>>,
    }

    impl Handler for Recorder {
        fn deliver(
            &self,
            batch: Vec<ConduitMessage>,
            settled: Settled,
            _stop: CancellationToken,
        ) -> BoxFuture<'static, ()> {
            let ids: Vec<String> = batch.into_iter().map(|m| m.id).collect();
            lock(&self.got).extend(ids.iter().cloned());
            Box::pin(async move {
                for id in ids {
                    let outcome = match id.starts_with("bad") {
                        true => Outcome::Failed("threw".into()),
                        false => Outcome::Handled,
                    };
                    settled(&id, outcome);
                }
            })
        }
    }

    struct Running {
        inbox: Arc<Inbox>,
        handler: Arc<Recorder>,
        commits: watch::Sender<u64>,
        token: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(inbox: Arc<Inbox>) -> Running {
        let (commits, receiver) = watch::channel(0);
        let handler = Arc::new(Recorder::default());
        let token = CancellationToken::new();
        let (source, delivering, stop) = (inbox.clone(), handler.clone(), token.clone());
        let task = tokio::spawn(async move {
            deliver_commits(&*source, receiver, &*delivering, stop).await;
        });
        Running {
            inbox,
            handler,
            commits,
            token,
            task,
        }
    }

    fn got(running: &Running) -> Vec<String> {
        lock(&running.handler.got).clone()
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_what_is_pending_then_on_each_commit_and_acks_it() {
        let inbox = Arc::new(Inbox::default());
        inbox.add("a");
        inbox.add("bad-b");
        let running = start(inbox);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(got(&running), ["a", "bad-b"]);
        // A failed message is acked too: it was handed over, and is not offered again.
        assert_eq!(*lock(&running.inbox.acked), ["a", "bad-b"]);

        // A row without a commit is not looked for; the commit brings it.
        running.inbox.add("c");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(got(&running).len(), 2);
        running.commits.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(got(&running), ["a", "bad-b", "c"]);
        assert!(lock(&running.inbox.pending).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn more_than_a_page_is_delivered_in_pages_without_a_commit() {
        let inbox = Arc::new(Inbox::default());
        let total = DEFAULT_POLL_LIMIT as usize * 2 + 1;
        for i in 0..total {
            inbox.add(&format!("m{i:03}"));
        }
        let running = start(inbox);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let got = got(&running);
        assert_eq!(got.len(), total);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted, "oldest first, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_ack_waits_for_the_next_commit() {
        let inbox = Arc::new(Inbox::default());
        inbox.ack_fails.store(true, Ordering::SeqCst);
        inbox.add("a");
        let running = start(inbox);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(running.inbox.polls.load(Ordering::SeqCst), 1, "no hot loop");
        assert_eq!(got(&running), ["a"]);
        running.inbox.ack_fails.store(false, Ordering::SeqCst);
        running.commits.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        // At least once: offered again with the next commit, acked this time.
        assert_eq!(got(&running), ["a", "a"]);
        assert_eq!(*lock(&running.inbox.acked), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn ends_on_cancel_and_when_the_transport_closes() {
        let running = start(Arc::new(Inbox::default()));
        tokio::time::sleep(Duration::from_millis(1)).await;
        running.token.cancel();
        tokio::time::timeout(Duration::from_secs(1), running.task)
            .await
            .expect("cancel ends the loop")
            .unwrap();

        let running = start(Arc::new(Inbox::default()));
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(running.commits);
        tokio::time::timeout(Duration::from_secs(1), running.task)
            .await
            .expect("a closed transport ends the loop")
            .unwrap();
    }
}
