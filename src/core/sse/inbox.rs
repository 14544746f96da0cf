//! Where a stream's messages wait for whoever reads the stream through a transport: in a
//! bounded buffer that `poll()` drains, or — once someone subscribes — straight to the
//! subscribers.
//!
//! The buffer holds at most its capacity; past it, [`SseSink::deliver`] waits for room, which
//! pauses reading the stream (backpressure) rather than growing memory. The server pushes
//! only to a stream it knows, so what it queued before the stream opened is found only by a
//! peek: [`Inbox::poll`] drains the buffer and fills the rest of the page from a peek.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::SseSink;
use crate::core::error::Result;
use crate::core::message::ConduitMessage;
use crate::core::sync::lock;
use crate::core::transport::DirectSource;

/// Messages held while nobody subscribes, by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// The subscribers of a stream, as the boundary keeps them (JS functions on the JS thread).
pub trait Subscribers: Send + Sync {
    /// False while nobody subscribes: messages are then buffered.
    fn any(&self) -> bool;
    /// Hands `message` to every subscriber; resolves once it has been handed over.
    fn fan_out(&self, message: ConduitMessage) -> BoxFuture<'_, ()>;
}

pub struct Inbox {
    buffer: Mutex<VecDeque<ConduitMessage>>,
    room: Notify,
    capacity: usize,
    subscribers: Arc<dyn Subscribers>,
}

impl Inbox {
    /// `capacity` is at least one.
    pub fn new(subscribers: Arc<dyn Subscribers>, capacity: usize) -> Self {
        Self {
            buffer: Mutex::new(VecDeque::new()),
            room: Notify::new(),
            capacity: capacity.max(1),
            subscribers,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.buffer).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest `limit` buffered messages, taken.
    pub fn take(&self, limit: usize) -> Vec<ConduitMessage> {
        let taken: Vec<ConduitMessage> = {
            let mut buffer = lock(&self.buffer);
            let count = buffer.len().min(limit);
            buffer.drain(..count).collect()
        };
        self.room.notify_waiters();
        taken
    }

    /// Everything buffered, for a subscriber that has just been added: call it after adding
    /// the subscriber, and no message is left behind in the buffer (a delivery decides
    /// between buffer and subscribers under the buffer's lock).
    pub fn take_all(&self) -> Vec<ConduitMessage> {
        self.take(usize::MAX)
    }

    /// What the stream delivered (oldest first, at most `limit`), then what `peek` finds in
    /// the room left, without the ids already taken. A failing peek is an error only when
    /// the buffer gave nothing: what was taken from the buffer is out of it already, and
    /// the server marked it delivered when it pushed it.
    pub async fn poll(
        &self,
        peek: &dyn DirectSource,
        limit: usize,
        since: Option<String>,
    ) -> Result<Vec<ConduitMessage>> {
        let limit = limit.max(1);
        let mut out = self.take(limit);
        let room = limit - out.len();
        if room == 0 {
            return Ok(out);
        }
        match peek.poll(room as u32, since).await {
            Ok(page) => {
                for message in page.messages {
                    if !out.iter().any(|taken| taken.id == message.id) {
                        out.push(message);
                    }
                }
                Ok(out)
            }
            Err(e) if !out.is_empty() => {
                tracing::debug!(error = %e, "peek failed; returning the stream's messages only");
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }
}

impl SseSink for Inbox {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // Created before the check, so a `take` between the check and the wait
                // still wakes it.
                let room = self.room.notified();
                {
                    let mut buffer = lock(&self.buffer);
                    if self.subscribers.any() {
                        break;
                    }
                    if buffer.len() < self.capacity {
                        buffer.push_back(message);
                        return;
                    }
                }
                room.await;
            }
            self.subscribers.fan_out(message).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::Error;
    use crate::core::transport::Page;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    fn ids(messages: &[ConduitMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.id.as_str()).collect()
    }

    #[derive(Default)]
    struct Recorder {
        on: AtomicBool,
        got: Mutex<Vec<String>>,
    }

    impl Subscribers for Recorder {
        fn any(&self) -> bool {
            self.on.load(Ordering::SeqCst)
        }
        fn fan_out(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
            lock(&self.got).push(message.id);
            Box::pin(async {})
        }
    }

    /// A peek that answers `rows` (at most `limit` of them), or fails.
    struct Peek {
        rows: Vec<ConduitMessage>,
        fail: bool,
        asked: Mutex<Vec<u32>>,
    }

    impl DirectSource for Peek {
        fn poll(&self, limit: u32, _since: Option<String>) -> BoxFuture<'_, Result<Page>> {
            lock(&self.asked).push(limit);
            Box::pin(async move {
                if self.fail {
                    return Err(Error::NotConnected("peek down".into()));
                }
                let messages: Vec<ConduitMessage> =
                    self.rows.iter().take(limit as usize).cloned().collect();
                Ok(Page {
                    rows: messages.len(),
                    messages,
                    ..Page::default()
                })
            })
        }
        fn ack(&self, _ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn name(&self) -> String {
            "peek".into()
        }
    }

    fn peek(rows: &[&str], fail: bool) -> Peek {
        Peek {
            rows: rows.iter().map(|id| ConduitMessage::with_id(id)).collect(),
            fail,
            asked: Mutex::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_buffer_waits_for_room_and_keeps_order() {
        let inbox = Arc::new(Inbox::new(Arc::new(Recorder::default()), 3));
        for id in ["a", "b", "c"] {
            inbox.deliver(ConduitMessage::with_id(id)).await;
        }
        let stream = inbox.clone();
        let waiting = tokio::spawn(async move {
            stream.deliver(ConduitMessage::with_id("d")).await;
            stream.deliver(ConduitMessage::with_id("e")).await;
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "a full buffer makes the stream wait"
        );
        assert_eq!(inbox.len(), 3, "never more than the capacity");
        assert_eq!(ids(&inbox.take(2)), ["a", "b"]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(waiting.is_finished(), "room let the stream go on");
        assert_eq!(ids(&inbox.take_all()), ["c", "d", "e"]);
    }

    #[tokio::test(start_paused = true)]
    async fn subscribers_take_over_from_the_buffer() {
        let subscribers = Arc::new(Recorder::default());
        let inbox = Inbox::new(subscribers.clone(), 10);
        inbox.deliver(ConduitMessage::with_id("a")).await;
        subscribers.on.store(true, Ordering::SeqCst);
        // The boundary hands the backlog to the new subscriber, then the stream goes to it.
        assert_eq!(ids(&inbox.take_all()), ["a"]);
        inbox.deliver(ConduitMessage::with_id("b")).await;
        assert!(inbox.is_empty());
        assert_eq!(*lock(&subscribers.got), ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_waiting_for_room_goes_to_a_new_subscriber() {
        let subscribers = Arc::new(Recorder::default());
        let inbox = Arc::new(Inbox::new(subscribers.clone(), 1));
        inbox.deliver(ConduitMessage::with_id("a")).await;
        let stream = inbox.clone();
        let waiting =
            tokio::spawn(async move { stream.deliver(ConduitMessage::with_id("b")).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        subscribers.on.store(true, Ordering::SeqCst);
        assert_eq!(ids(&inbox.take_all()), ["a"]);
        waiting.await.unwrap();
        assert!(inbox.is_empty(), "not left in a buffer nobody drains");
        assert_eq!(*lock(&subscribers.got), ["b"]);
    }

    #[tokio::test]
    async fn poll_fills_the_page_from_the_peek_without_duplicates() {
        let inbox = Inbox::new(Arc::new(Recorder::default()), 10);
        for id in ["a", "b"] {
            inbox.deliver(ConduitMessage::with_id(id)).await;
        }
        let source = peek(&["b", "q1", "q2", "q3"], false);
        let got = inbox.poll(&source, 4, None).await.unwrap();
        assert_eq!(
            ids(&got),
            ["a", "b", "q1"],
            "the peek had room for two: b and q1"
        );
        assert_eq!(*lock(&source.asked), [2]);

        // A full page from the buffer asks nothing of the server.
        for id in ["c", "d"] {
            inbox.deliver(ConduitMessage::with_id(id)).await;
        }
        let quiet = peek(&["x"], false);
        assert_eq!(ids(&inbox.poll(&quiet, 2, None).await.unwrap()), ["c", "d"]);
        assert!(lock(&quiet.asked).is_empty());
    }

    #[tokio::test]
    async fn a_failing_peek_fails_only_an_empty_poll() {
        let inbox = Inbox::new(Arc::new(Recorder::default()), 10);
        let down = peek(&[], true);
        assert!(inbox.poll(&down, 5, None).await.is_err());
        inbox.deliver(ConduitMessage::with_id("a")).await;
        let got = inbox.poll(&down, 5, None).await.unwrap();
        assert_eq!(
            ids(&got),
            ["a"],
            "what left the buffer is returned, not lost"
        );
    }
}
