//! The agent poller: direct messages and group @mentions, delivered once each, in order.
//!
//! Two tasks run while the poller is started:
//!
//! - the **poll loop** runs one cycle at once and then one per interval: the direct-message
//!   track (`DirectSource::poll`) and every group conversation concurrently, dedups them
//!   against everything already seen, and queues batches (direct messages first);
//! - the **delivery loop** hands each batch to the handler and acks direct messages once
//!   their handler has settled, so a restart does not redeliver what was handled and more
//!   than one page of pending messages drains.
//!
//! A direct row that cannot become a message is counted once and acked (skipped for good),
//! so bad rows never block the ones behind them; a message offered again after it was
//! handled is acked again, never handed over twice.
//!
//! The queue between them is bounded: a slow handler slows polling (backpressure) instead
//! of growing memory. Messages pushed over SSE enter the same queue through
//! [`Poller::offer`], so one message means one handler call whichever path brought it.
//!
//! While the realtime path (SSE) is up, direct-message polling slows by
//! [`PollerConfig::realtime_slowdown`]; the moment it drops, a poll runs at once and the
//! normal interval returns. Group polling keeps its interval (the stream does not carry
//! group messages).
//!
//! [`Poller::poll_now_and_wait`] is the clock-free hook for tests: it asks the poll loop for
//! cycles over every track at once, and resolves when everything found has been handled and
//! acked. Each round ends with a marker queued behind its batches: everything queued before
//! the marker has settled when the delivery loop reaches it, which then answers the request
//! or, after a full page, hands it back for another round (the server may only page past
//! one second's ties once they are acked).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::clock;
use super::credentials::Credentials;
use super::dedup::{CopyTwins, Fingerprint, SeenWindow};
use super::delivery::{Handler, Outcome, Settled};
use super::error::Error;
use super::mention::mentions;
use super::message::{self, ConduitMessage};
use super::sync::lock;
use super::task::{NotDone, RunningTask};
use super::transport::{DirectSource, GroupFeed, Page};

mod journal;

use self::journal::{JournalState, Journaled, Phase};
use super::journal::{GroupUpdate, Journal, JournalConfig, Source};

/// Direct messages asked for per poll (API.md: `limit: 50`).
pub const DIRECT_PAGE: u32 = 50;
/// The most rows read from one group conversation in one cycle while catching up a burst.
pub const MAX_GROUP_FETCH: u32 = 1000;
/// Batches queued between polling and delivery before polling waits.
const DELIVERY_QUEUE: usize = 4;
/// The default [`PollerConfig::poll_grid`]. Each poller waking on its own instant cost one
/// tokio wake-up and one JS-thread wake-up per poll: 1,000 pollers at 1 s woke the JS thread
/// ~1,000 times a second. On a 10 ms grid they wake at most 100 times, each wake-up serving
/// every poller due in that step.
pub const POLL_GRID: Duration = Duration::from_millis(10);
/// Settled-but-unacked ids kept for a retry after a failed ack.
const MAX_PENDING_ACKS: usize = 10_000;
/// Listing rows remembered per group conversation. Rows sharing a second are listed in no
/// fixed order, so a row can leave the page and come back: the memory spans several pages.
const GROUP_ROWS_REMEMBERED: usize = 4 * MAX_GROUP_FETCH as usize;
/// Group-message fingerprints kept to pair a stream copy with its listing row.
const TWINS_REMEMBERED: usize = 10_000;

#[derive(Clone, Debug)]
pub struct PollerConfig {
    pub agent_id: String,
    pub poll_interval: Duration,
    pub group_conversation_ids: Vec<String>,
    pub group_poll_limit: u32,
    /// Direct-message polling runs this many times less often while SSE is connected.
    pub realtime_slowdown: u32,
    pub seen_capacity: usize,
    /// Scheduled polls start on a process-wide grid of this step (see [`on_grid`]), up to one
    /// step early, so that pollers started at nearby instants wake together; zero for none.
    /// Only used while it is at most 1 % of the interval.
    pub poll_grid: Duration,
}

impl PollerConfig {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            poll_interval: Duration::from_millis(5000),
            group_conversation_ids: Vec::new(),
            group_poll_limit: 15,
            realtime_slowdown: 6,
            seen_capacity: super::dedup::DEFAULT_CAPACITY,
            poll_grid: POLL_GRID,
        }
    }
}

/// What `status()` reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PollerStatus {
    pub running: bool,
    pub seen_count: usize,
    pub delivered: u64,
    pub failed: u64,
    pub malformed: u64,
    pub polls: u64,
    pub last_poll_at: Option<String>,
    pub last_error: Option<String>,
    pub realtime: bool,
    pub pending_acks: usize,
}

/// What a requested poll ([`Poller::poll_now_and_wait`]) came to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PollReport {
    /// Handler calls that returned or resolved between the request and its answer. Counted
    /// on the poller, whichever path brought the message, so a message a scheduled cycle
    /// queued just before the request is counted too: a test sees a stable number.
    pub handled: u64,
    /// Handler calls that threw or rejected in the same span.
    pub failed: u64,
    /// The tracks that failed or were skipped (`direct: …`, `group <id>: …`), without secrets.
    pub errors: Vec<String>,
}

/// Someone waiting for a requested poll, with the poller's counts when they asked.
struct Waiter {
    answer: oneshot::Sender<PollReport>,
    delivered: u64,
    failed: u64,
}

/// A requested poll in progress: who waits for it and which tracks failed so far.
#[derive(Default)]
struct Request {
    waiters: Vec<Waiter>,
    errors: Vec<String>,
    /// A direct page came back full this round: more may be pending behind it, which the
    /// server may only page past once what it offered is acked.
    full: bool,
    /// Handler calls settled (delivered + failed) when this round started.
    settled_at: u64,
}

impl Request {
    fn new(stats: &Stats) -> Self {
        Self {
            settled_at: settled(stats),
            ..Self::default()
        }
    }

    fn answer(self, stats: &Stats) {
        let delivered = stats.delivered.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        for waiter in self.waiters {
            let _ = waiter.answer.send(PollReport {
                handled: delivered.saturating_sub(waiter.delivered),
                failed: failed.saturating_sub(waiter.failed),
                errors: self.errors.clone(),
            });
        }
    }
}

/// Handler calls settled so far.
fn settled(stats: &Stats) -> u64 {
    stats.delivered.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
}

struct Batch {
    messages: Vec<ConduitMessage>,
    /// Direct messages are acked once handled; group and SSE messages need no ack.
    ack: bool,
    /// A marker with no messages: answered when the delivery loop reaches it.
    answer: Option<Request>,
    /// For a page of direct messages: counted in [`Shared::direct_unacked`] until handled and
    /// acked, or dropped with the queue.
    unacked: Option<Counted>,
    /// Where the messages are in the journal, with one.
    journal: Option<Journaled>,
    /// Counted in [`Shared::in_queue`] from [`enqueue`] until delivered or dropped.
    queued: Option<Counted>,
}

impl Batch {
    fn of(messages: Vec<ConduitMessage>, ack: bool) -> Self {
        Self {
            messages,
            ack,
            answer: None,
            unacked: None,
            journal: None,
            queued: None,
        }
    }

    /// A page of direct messages, acked once handled.
    fn direct(shared: &Shared, messages: Vec<ConduitMessage>) -> Self {
        Self {
            unacked: Some(Counted::count(&shared.direct_unacked)),
            ..Self::of(messages, true)
        }
    }
}

/// One place in a shared count while it lives, whichever way it ends (handled, given up, or
/// dropped with the queue on `stop()`): a counter that cannot leak. A direct page is counted
/// in [`Shared::direct_unacked`] until its ack is done; every queued batch in
/// [`Shared::in_queue`] until it has been delivered.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn count(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a page polled with `since` holds a row older than it: the source does not honour
/// `since` (peek semantics: the oldest unacked rows whatever is asked, as the real peek and
/// the cleo CLI's local transport answer). Reading ahead of the acks then only brings back the
/// page being handled.
fn ignores_since(since: &str, page: &Page) -> bool {
    let Some(since) = clock::parse_iso_ms(since) else {
        return false;
    };
    page.messages
        .iter()
        .filter_map(|m| clock::parse_iso_ms(&m.timestamp))
        .any(|at| at < since)
}

#[derive(Default)]
struct Stats {
    delivered: AtomicU64,
    failed: AtomicU64,
    malformed: AtomicU64,
    polls: AtomicU64,
    last_poll_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
}

struct Shared {
    config: PollerConfig,
    direct: Arc<dyn DirectSource>,
    groups: Option<Arc<dyn GroupFeed>>,
    handler: RwLock<Option<Arc<dyn Handler>>>,
    handler_set: Notify,
    /// Dedup keys (`groupId ?? id`) of messages whose handler call has settled.
    seen: Mutex<SeenWindow>,
    /// Dedup keys of messages taken for delivery whose handler call has not settled:
    /// duplicates of these are dropped too. Forgotten on stop, so a later start offers them
    /// again instead of losing them with the queue.
    queued: Mutex<HashSet<String>>,
    /// Pairs group-message copies that came without their `groupId` with those that did.
    twins: Mutex<CopyTwins>,
    stats: Stats,
    realtime: watch::Sender<bool>,
    kick: Notify,
    /// Set by [`Poller::poll_now`]: the next wake-up polls direct messages whatever is due.
    direct_requested: AtomicBool,
    /// A direct page came back full: more may be waiting behind it, which (timestamps being
    /// whole seconds, so `since` cannot page inside one) only acks uncover. The delivery
    /// loop polls again as soon as it has acked.
    direct_full: AtomicBool,
    /// Direct pages queued, being handled or being acked (see [`Counted`]). A poll without a
    /// `since` to look past them (or to a source that ignores `since`) would only bring them
    /// back: it waits for their ack instead.
    direct_unacked: Arc<AtomicUsize>,
    /// A direct poll was put off while a page was unacked: the delivery loop polls once the
    /// ack is in.
    direct_deferred: AtomicBool,
    /// Callers of [`Poller::poll_now_and_wait`] whose cycle has not started yet.
    poll_waiters: Mutex<Vec<Waiter>>,
    /// A requested poll whose round has been handled, back for the next round.
    resumed: Mutex<Option<Request>>,
    /// Settled direct-message ids not yet acked, including those of an ack in flight.
    pending_acks: Mutex<Vec<String>>,
    /// One ack request at a time (the delivery loop and the poll loop both flush).
    acking: tokio::sync::Mutex<()>,
    queue: Mutex<Option<mpsc::Sender<Batch>>>,
    /// Held by whoever is handing a batch to the handler: the delivery loop, or
    /// [`Poller::offer`] taking the short way when nothing else is waiting.
    delivering: Arc<tokio::sync::Mutex<()>>,
    /// Batches sent to the queue and not yet delivered (see [`Counted`]): a stop that drops
    /// the queue drops their counts with them.
    in_queue: Arc<AtomicUsize>,
    /// The delivery loop's token, for deliveries made outside it.
    delivery_token: Mutex<Option<CancellationToken>>,
    /// The agent's keys, scrubbed from every error text: a handler's error or a JS
    /// transport's can quote the key.
    secrets: Option<Arc<Credentials>>,
    /// The journal, when the poller keeps one (see [`journal`]).
    journaling: Option<JournalState>,
    /// The tokio runtime the loops run on, for work a `stop()` leaves behind.
    runtime: Mutex<Option<tokio::runtime::Handle>>,
}

struct Running {
    poll: RunningTask,
    delivery: RunningTask,
    /// The journal's backlog loop, with a journal.
    backlog: Option<RunningTask>,
}

/// A poller. Cheap to share; `start`/`stop` are idempotent.
pub struct Poller {
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
    /// The span current at creation: the loops log in it on every start (see
    /// [`crate::logging::LogScope`]), whoever calls `start`.
    span: tracing::Span,
}

impl Poller {
    /// `groups` is needed only when the config names group conversations.
    pub fn new(
        config: PollerConfig,
        direct: Arc<dyn DirectSource>,
        groups: Option<Arc<dyn GroupFeed>>,
    ) -> Self {
        let seen = SeenWindow::new(config.seen_capacity);
        Self {
            shared: Arc::new(Shared {
                config,
                direct,
                groups,
                handler: RwLock::new(None),
                handler_set: Notify::new(),
                seen: Mutex::new(seen),
                queued: Mutex::new(HashSet::new()),
                twins: Mutex::new(CopyTwins::new(TWINS_REMEMBERED)),
                stats: Stats::default(),
                realtime: watch::channel(false).0,
                kick: Notify::new(),
                direct_requested: AtomicBool::new(false),
                direct_full: AtomicBool::new(false),
                direct_unacked: Arc::new(AtomicUsize::new(0)),
                direct_deferred: AtomicBool::new(false),
                poll_waiters: Mutex::new(Vec::new()),
                resumed: Mutex::new(None),
                pending_acks: Mutex::new(Vec::new()),
                acking: tokio::sync::Mutex::new(()),
                delivering: Arc::new(tokio::sync::Mutex::new(())),
                in_queue: Arc::default(),
                delivery_token: Mutex::new(None),
                queue: Mutex::new(None),
                secrets: None,
                journaling: None,
                runtime: Mutex::new(None),
            }),
            running: Mutex::new(None),
            span: tracing::Span::current(),
        }
    }

    /// Scrubs `credentials`' keys from every error text this poller logs or reports.
    pub fn with_secrets(mut self, credentials: Arc<Credentials>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.secrets = Some(credentials);
        }
        self
    }

    /// Keeps delivery state in the journal at `config.path` (`journal`: that journal, already
    /// open; reopened from `config` on a start after a stop). See [`journal`].
    pub fn with_journal(mut self, config: JournalConfig, journal: Option<Arc<Journal>>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.journaling = Some(JournalState::new(config, journal));
        }
        self
    }

    /// The journal in use, if any.
    pub fn journal(&self) -> Option<Arc<Journal>> {
        self.shared.journal()
    }

    /// The span the poller's loops run in.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub fn config(&self) -> &PollerConfig {
        &self.shared.config
    }

    /// Sets THE handler (replacing any earlier one). A running poller polls at once.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        *self
            .shared
            .handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
        self.shared.handler_set.notify_waiters();
        self.shared.kick.notify_one();
    }

    pub fn has_handler(&self) -> bool {
        self.shared.handler().is_some()
    }

    /// Starts both loops on the current tokio runtime. Returns false when already running.
    pub fn start(&self) -> bool {
        let mut running = lock(&self.running);
        if running.is_some() {
            return false;
        }
        let _in_span = self.span.enter();
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        *lock(&self.shared.queue) = Some(tx.clone());
        let shared = self.shared.clone();
        let delivery = RunningTask::spawn(|token| delivery_loop(shared, rx, token));
        *lock(&self.shared.delivery_token) = Some(delivery.token().clone());
        *lock(&self.shared.runtime) = Some(tokio::runtime::Handle::current());
        let backlog = self.shared.journaling.as_ref().map(|_| {
            let shared = self.shared.clone();
            RunningTask::spawn(|token| journal::backlog_loop(shared, token))
        });
        let shared = self.shared.clone();
        let poll = RunningTask::spawn(|token| poll_loop(shared, tx, token));
        *running = Some(Running {
            poll,
            delivery,
            backlog,
        });
        true
    }

    /// Stops both loops at once, even mid-handler or mid-request. Returns the ids of direct
    /// messages that were handled but not yet acked, for the caller to ack on the way out.
    pub fn stop(&self) -> Vec<String> {
        let Some(running) = lock(&self.running).take() else {
            return Vec::new();
        };
        *lock(&self.shared.queue) = None;
        lock(&self.shared.delivery_token).take();
        running.poll.stop();
        running.delivery.stop();
        if let Some(backlog) = running.backlog {
            backlog.stop();
        }
        journal::close_after_stop(&self.shared, lock(&self.shared.runtime).clone());
        // Their cycle will not run: dropping them tells the callers so.
        lock(&self.shared.poll_waiters).clear();
        lock(&self.shared.resumed).take();
        // Dropped with the queue, never handled: a later start must take them again.
        lock(&self.shared.queued).clear();
        std::mem::take(&mut *lock(&self.shared.pending_acks))
    }

    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Runs a direct-message poll now (something told us new messages are waiting, such as
    /// another process committing to `signaldock.db`).
    pub fn poll_now(&self) {
        self.shared.direct_requested.store(true, Ordering::Relaxed);
        self.shared.kick.notify_one();
    }

    /// A cycle over every track now (direct messages and every group, whatever is due,
    /// except a track waiting out a `Retry-After`), the next pages at once while pages come
    /// back full and, after a full page, once what it found has been handled and acked,
    /// another round. Resolves once everything found has been handled and acked (an ack that
    /// fails is owed as usual). The schedule is left alone. Callers asking while a requested
    /// cycle waits to start share it.
    pub fn poll_now_and_wait(
        &self,
    ) -> impl std::future::Future<Output = Result<PollReport, NotDone>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let asked = {
            // Under the `running` lock, so `stop()` (which clears the waiters after taking
            // it) cannot slip in between the check and the push.
            let running = lock(&self.running);
            if running.is_none() {
                Err(NotDone::NotRunning)
            } else if self.shared.handler().is_none() {
                Err(NotDone::NoHandler)
            } else {
                let stats = &self.shared.stats;
                lock(&self.shared.poll_waiters).push(Waiter {
                    answer: tx,
                    delivered: stats.delivered.load(Ordering::Relaxed),
                    failed: stats.failed.load(Ordering::Relaxed),
                });
                self.shared.kick.notify_one();
                Ok(())
            }
        };
        async move {
            asked?;
            rx.await.map_err(|_| NotDone::Stopped)
        }
    }

    /// Tells the poller whether the realtime path is up (see the module doc).
    pub fn set_realtime(&self, connected: bool) {
        self.shared.realtime.send_if_modified(|state| {
            let changed = *state != connected;
            *state = connected;
            changed
        });
    }

    /// A message from the realtime path: delivered through the same dedup and queue.
    /// Waits while the queue is full. Returns false when the poller is not running.
    pub async fn offer(&self, message: ConduitMessage) -> bool {
        let Some(queue) = lock(&self.shared.queue).clone() else {
            return false;
        };
        // With a journal: recorded, and handed over from there (see [`journal`]).
        let message = match (&self.shared.journaling, self.shared.journal()) {
            (Some(journaling), Some(journal)) => {
                match journal::offer(&self.shared, journaling, journal, message).await {
                    Ok(taken) => return taken,
                    Err(message) => message,
                }
            }
            _ => message,
        };
        let key = message.dedup_key().to_owned();
        let messages = self.shared.fresh(vec![message]);
        if messages.is_empty() {
            return true;
        }
        let batch = Batch::of(messages, false);
        // The short way for the realtime path: with nothing queued and nobody delivering,
        // hand the message over from here, skipping a hop through the delivery task (a
        // cross-thread wake-up that would add tens of microseconds to every SSE message).
        let token = lock(&self.shared.delivery_token).clone();
        if let (Some(handler), Some(token)) = (self.shared.handler(), token)
            && let Ok(_turn) = self.shared.delivering.try_lock()
            && self.shared.in_queue.load(Ordering::Acquire) == 0
        {
            deliver_batch(&self.shared, handler, batch, token).await;
            return true;
        }
        let sent = enqueue(&self.shared, &queue, batch).await;
        if !sent {
            lock(&self.shared.queued).remove(&key);
        }
        sent
    }

    pub fn status(&self) -> PollerStatus {
        let stats = &self.shared.stats;
        let last_poll = stats.last_poll_ms.load(Ordering::Relaxed);
        PollerStatus {
            running: self.is_running(),
            seen_count: lock(&self.shared.seen).len() + lock(&self.shared.queued).len(),
            delivered: stats.delivered.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            malformed: stats.malformed.load(Ordering::Relaxed),
            polls: stats.polls.load(Ordering::Relaxed),
            last_poll_at: (last_poll > 0).then(|| clock::format_iso_ms(last_poll)),
            last_error: lock(&stats.last_error).clone(),
            realtime: *self.shared.realtime.borrow(),
            pending_acks: lock(&self.shared.pending_acks).len(),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn handler(&self) -> Option<Arc<dyn Handler>> {
        self.handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The handler, once there is one; `None` when `token` is cancelled first.
    async fn wait_for_handler(&self, token: &CancellationToken) -> Option<Arc<dyn Handler>> {
        loop {
            let registered = self.handler_set.notified();
            if let Some(handler) = self.handler() {
                return Some(handler);
            }
            tokio::select! {
                _ = token.cancelled() => return None,
                _ = registered => {}
            }
        }
    }

    fn record_error(&self, track: &str, err: &Error) {
        let text = self.scrub(format!("{track}: {err}"));
        tracing::debug!(error = %text, "poll track failed");
        *lock(&self.stats.last_error) = Some(text);
    }

    fn scrub(&self, text: String) -> String {
        match &self.secrets {
            Some(credentials) => credentials.scrub(&text),
            None => text,
        }
    }

    /// Keeps the messages neither seen nor queued before, by [`ConduitMessage::dedup_key`],
    /// marking them queued. A group message's copy that came without its `groupId` (the
    /// stream's) and one that came with it (peek, listing) are one message: the second to
    /// arrive is remembered as seen and dropped.
    fn fresh(&self, messages: Vec<ConduitMessage>) -> Vec<ConduitMessage> {
        if messages.is_empty() {
            return messages;
        }
        let mut seen = lock(&self.seen);
        let mut queued = lock(&self.queued);
        let mut twins = lock(&self.twins);
        messages
            .into_iter()
            .filter(|m| {
                let key = m.dedup_key();
                if seen.contains(key) || queued.contains(key) {
                    return false;
                }
                if let Some(fingerprint) = Fingerprint::of(m)
                    && twins.is_twin(fingerprint, m.group_id.is_some())
                {
                    seen.insert(key);
                    return false;
                }
                queued.insert(key.to_owned())
            })
            .collect()
    }

    /// Counts the page's rows that could not be mapped, each once, and owes an ack for those
    /// with an id. True when one was seen for the first time.
    fn reject(&self, page: &Page) -> bool {
        if page.malformed == 0 && page.rejected.is_empty() {
            return false;
        }
        // A source that only counts its bad rows cannot say which they were: counted each time.
        let unlisted = page.malformed.saturating_sub(page.rejected.len());
        self.stats
            .malformed
            .fetch_add(unlisted as u64, Ordering::Relaxed);
        let mut newly = false;
        let mut acks = Vec::new();
        {
            let mut seen = lock(&self.seen);
            for rejected in &page.rejected {
                if seen.insert(&rejected.key) {
                    newly = true;
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        message_id = rejected.id.as_deref().unwrap_or_default(),
                        error = %rejected.why,
                        "skipping a message that cannot be mapped"
                    );
                }
                acks.extend(rejected.id.clone());
            }
        }
        self.owe_acks(acks);
        newly
    }

    /// Owes an ack for direct messages (`(id, dedup key)`) whose message was already
    /// handled: offered again after their handler settled, or another copy of a message
    /// handled through another path.
    fn ack_again(&self, offered: &[(String, String)]) {
        if offered.is_empty() {
            return;
        }
        let again: Vec<String> = {
            let seen = lock(&self.seen);
            let queued = lock(&self.queued);
            offered
                .iter()
                .filter(|(_, key)| seen.contains(key) && !queued.contains(key))
                .map(|(id, _)| id.clone())
                .collect()
        };
        self.owe_acks(again);
    }

    fn owe_acks(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut pending = lock(&self.pending_acks);
        for id in ids {
            if pending.len() < MAX_PENDING_ACKS && !pending.contains(&id) {
                pending.push(id);
            }
        }
    }

    /// Whether the next direct poll should wait for the ack of the pages in hand: with no
    /// `since` to look past them by (or a source that ignores it), it would be a round trip
    /// that brings back only what is being handled. Marks the poll owed, for the delivery
    /// loop to make once the ack is in.
    fn defer_direct_poll(&self, tracks: &Tracks) -> bool {
        if tracks.direct_since.is_some() && !tracks.since_ignored {
            return false;
        }
        // Owed first, then counted: a page whose ack ends in between sees the debt and polls.
        self.direct_deferred.store(true, Ordering::SeqCst);
        if self.direct_unacked.load(Ordering::SeqCst) > 0 {
            return true;
        }
        self.direct_deferred.store(false, Ordering::SeqCst);
        false
    }

    /// A handler call settled: the key moves from queued to seen (in that order, so that
    /// it is never in neither).
    fn settle(&self, key: &str) {
        lock(&self.seen).insert(key);
        lock(&self.queued).remove(key);
    }
}

/// Per-track state the poll loop carries from cycle to cycle.
#[derive(Default)]
struct Tracks {
    /// The direct track must not be asked again before this (429 with `Retry-After`).
    direct_not_before: Option<Instant>,
    /// Messages asked for per direct poll: [`DIRECT_PAGE`], halved while a page is larger
    /// than the client reads (huge messages), back to full once a page is not full.
    direct_limit: u32,
    /// High-water mark for the next direct poll, when the last page was full and all seen.
    direct_since: Option<String>,
    /// The direct source answered a poll with rows older than its `since` (see
    /// [`ignores_since`]): no more reading ahead, and no poll while a page is unacked.
    since_ignored: bool,
    groups: HashMap<String, GroupTrack>,
}

struct GroupTrack {
    /// The listing rows read so far. The listing orders by whole-second timestamps with no
    /// tiebreak, so a new row can be listed after rows already read: a row is new when it
    /// is not in here, wherever it stands on the page.
    known: Arc<SeenWindow>,
    primed: bool,
    /// The oldest `createdAt` (ms) of the first page read: unread rows older than it are
    /// history from before this poller, which the first read does not replay either.
    floor_ms: Option<i64>,
    /// The newest `createdAt` (ms) read so far. A row posted after a read is stamped no
    /// older than this (the server's clock moves on), so a page has shown every new row
    /// only once its oldest row is older than this: rows of the page's oldest second may
    /// have been cut off it.
    newest_ms: Option<i64>,
    not_before: Option<Instant>,
}

impl GroupTrack {
    /// A track going on from a position stored in the journal.
    fn resumed(position: super::journal::GroupPosition) -> Self {
        let mut known = SeenWindow::new(GROUP_ROWS_REMEMBERED);
        for key in &position.known {
            known.insert(key);
        }
        Self {
            known: Arc::new(known),
            primed: true,
            floor_ms: position.floor_ms,
            newest_ms: position.newest_ms,
            not_before: None,
        }
    }
}

impl Default for GroupTrack {
    fn default() -> Self {
        Self {
            known: Arc::new(SeenWindow::new(GROUP_ROWS_REMEMBERED)),
            primed: false,
            floor_ms: None,
            newest_ms: None,
            not_before: None,
        }
    }
}

async fn poll_loop(shared: Arc<Shared>, queue: mpsc::Sender<Batch>, token: CancellationToken) {
    // Not offered again what a poller stopped just before us handled: its acks go first.
    tokio::select! {
        _ = token.cancelled() => return,
        _ = final_ack::wait_for_earlier(&shared.config.agent_id) => {}
    }
    let base = shared.config.poll_interval;
    let slow = base.saturating_mul(shared.config.realtime_slowdown.max(1));
    // Due times are compared with the ticks' scheduled instants, so both start from the
    // same instant: the first tick is then due for both tracks on a real clock too. On a
    // grid, that instant is the grid's, up to one step back: every later tick is then early
    // by as much, never late, and shared with every poller started in the same step. Skip
    // keeps a late tick's successors on that phase (Delay would move them off the grid).
    let grid = shared.config.poll_grid;
    let grid = (!grid.is_zero() && grid.saturating_mul(100) <= base).then_some(grid);
    let start = match grid {
        Some(grid) => on_grid(Instant::now(), grid),
        None => Instant::now(),
    };
    let mut ticks = tokio::time::interval_at(start, base);
    ticks.set_missed_tick_behavior(match grid {
        Some(_) => MissedTickBehavior::Skip,
        None => MissedTickBehavior::Delay,
    });
    let mut realtime = shared.realtime.subscribe();
    let mut tracks = Tracks {
        direct_limit: DIRECT_PAGE,
        ..Tracks::default()
    };
    // With a journal: what it held is handed over before the first poll, and each group
    // conversation goes on from where the last runtime read it.
    if let Some(journaling) = &shared.journaling {
        let mut phase = journaling.phase.subscribe();
        tokio::select! {
            _ = token.cancelled() => return,
            _ = phase.wait_for(|p| *p == Phase::Live) => {}
        }
        let positions = lock(&journaling.groups).take().unwrap_or_default();
        for (id, position) in positions {
            if shared.config.group_conversation_ids.contains(&id) {
                tracks.groups.insert(id, GroupTrack::resumed(position));
            }
        }
    }
    let mut direct_due = start;
    let mut groups_due = start;
    // A requested poll under way: its cycles run every track, until a page is not full.
    let mut request: Option<Request> = None;
    // A kick left from before this start (a handler set while stopped) would run a second
    // cycle right after the first; the first tick is at once anyway.
    let _ = shared.kick.notified().now_or_never();
    loop {
        let mut direct_now = false;
        // For a tick, the instant it was due rather than the moment we woke: due times then
        // land exactly on later ticks, instead of just after them (skipping one) whenever
        // this wake-up was quicker than the last.
        let now = tokio::select! {
            _ = token.cancelled() => return,
            at = ticks.tick() => at,
            _ = shared.kick.notified() => Instant::now(),
            changed = realtime.changed() => {
                if changed.is_err() {
                    return;
                }
                if *realtime.borrow_and_update() {
                    tracing::debug!("realtime path up: direct polling slows down");
                    direct_due = Instant::now() + slow;
                    continue;
                }
                tracing::info!("realtime path down: polling now and at the normal interval");
                direct_now = true;
                Instant::now()
            }
        };
        if shared.handler().is_none() {
            continue;
        }
        if let Some(resumed) = lock(&shared.resumed).take() {
            let request = request.get_or_insert_with(|| Request::new(&shared.stats));
            request.waiters.extend(resumed.waiters);
            request.errors.extend(resumed.errors);
        }
        let waiters = std::mem::take(&mut *lock(&shared.poll_waiters));
        if !waiters.is_empty() {
            request
                .get_or_insert_with(|| Request::new(&shared.stats))
                .waiters
                .extend(waiters);
        }
        // A requested poll (poll_now) runs at once but leaves the schedule alone; a scheduled
        // one, or the realtime path dropping, sets the next due time.
        let requested = shared.direct_requested.swap(false, Ordering::Relaxed) || request.is_some();
        let scheduled = direct_now || now >= direct_due;
        let mut run_direct = scheduled || requested;
        if run_direct && request.is_none() && shared.defer_direct_poll(&tracks) {
            run_direct = false;
        }
        if scheduled {
            direct_due = now
                + if *shared.realtime.borrow() {
                    slow
                } else {
                    base
                };
        }
        // Groups keep their own interval: catching up a direct backlog or the realtime path
        // dropping does not poll every conversation again.
        let groups_scheduled = now >= groups_due;
        let run_groups = groups_scheduled || request.is_some();
        if groups_scheduled {
            // Keep the phase: a late run (the loop was waiting on a full queue) does not push
            // every later one back.
            while groups_due <= now {
                groups_due += base;
            }
        }
        if !run_direct && !run_groups {
            continue;
        }
        let outcome = tokio::select! {
            _ = token.cancelled() => return,
            outcome = cycle(&shared, &queue, run_direct, run_groups, &mut tracks) => outcome,
        };
        if let Some(request) = request.as_mut() {
            request.errors.extend(outcome.errors);
            request.full |= outcome.full;
        }
        if outcome.more {
            // A full page: read the next one now rather than an interval later (a requested
            // poll reads it as part of the request, leaving the schedule alone).
            shared.kick.notify_one();
            if request.is_none() {
                direct_due = Instant::now();
            }
        } else if let Some(done) = request.take() {
            // Behind this cycle's batches: reached once they have all been handled and acked
            // (see the delivery loop for what happens then).
            let marker = Batch {
                answer: Some(done),
                ..Batch::of(Vec::new(), false)
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = enqueue(&shared, &queue, marker) => {}
            }
        }
    }
}

/// The latest instant of the process-wide grid of `step` at or before `at`. The grid counts
/// from one instant fixed for the process (a day before it was first asked for, so that every
/// instant a poller meets, on a paused test clock too, comes after it).
pub(crate) fn on_grid(at: Instant, step: Duration) -> Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = Instant::from_std(*EPOCH.get_or_init(|| {
        let now = std::time::Instant::now();
        now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
    }));
    let step_ns = step.as_nanos();
    if at <= epoch || step_ns == 0 {
        return at;
    }
    let since = (at - epoch).as_nanos();
    let back = Duration::from_nanos((since % step_ns) as u64);
    at - back
}

/// What one poll cycle came to.
#[derive(Default)]
struct CycleOutcome {
    /// A track had a full page of new messages: the next one should be read at once.
    more: bool,
    /// The tracks that failed, or were skipped while waiting out a `Retry-After`.
    errors: Vec<String>,
    /// The direct page came back full (new messages or not).
    full: bool,
}

/// One poll cycle.
async fn cycle(
    shared: &Shared,
    queue: &mpsc::Sender<Batch>,
    run_direct: bool,
    run_groups: bool,
    tracks: &mut Tracks,
) -> CycleOutcome {
    let mut outcome = CycleOutcome::default();
    let now = Instant::now();
    shared.stats.polls.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .last_poll_ms
        .store(clock::now_ms(), Ordering::Relaxed);

    let direct_allowed = run_direct && tracks.direct_not_before.is_none_or(|t| now >= t);
    if run_direct && !direct_allowed {
        outcome
            .errors
            .push("direct: waiting out the server's Retry-After".to_owned());
    }
    let since = tracks.direct_since.clone();
    let asked_since = since.clone();
    let direct_limit = tracks.direct_limit.clamp(1, DIRECT_PAGE);
    let direct = async move {
        if direct_allowed {
            // Ack what is owed first (an earlier ack may have failed), so the server does
            // not offer it again.
            flush_acks(shared).await;
            Some(shared.direct.poll(direct_limit, since).await)
        } else {
            None
        }
    };
    let limit = shared.config.group_poll_limit.max(1);
    let mut eligible: Vec<String> = Vec::new();
    if shared.groups.is_some() && run_groups {
        for id in &shared.config.group_conversation_ids {
            let waiting = tracks
                .groups
                .get(id)
                .and_then(|t| t.not_before)
                .is_some_and(|t| now < t);
            if waiting {
                outcome
                    .errors
                    .push(format!("group {id}: waiting out the server's Retry-After"));
            } else {
                eligible.push(id.clone());
            }
        }
    }
    let groups: Vec<_> = eligible
        .into_iter()
        .filter_map(|id| {
            let feed = shared.groups.clone()?;
            let track = tracks.groups.entry(id.clone()).or_default();
            let seen = track.primed.then(|| Seen {
                rows: track.known.clone(),
                newest_ms: track.newest_ms,
            });
            Some(async move {
                let rows = read_group(feed.as_ref(), &id, limit, seen.as_ref()).await;
                (id, rows)
            })
        })
        .collect();
    let (direct, groups) = tokio::join!(direct, join_all(groups));

    let mut more = false;
    if let Some(result) = direct {
        match result {
            Ok(page) => {
                let full = page.rows >= direct_limit as usize;
                if full {
                    shared.direct_full.store(true, Ordering::Relaxed);
                } else {
                    tracks.direct_limit = DIRECT_PAGE;
                }
                // Rows that cannot be mapped are counted once and acked (skipped for good),
                // so a page of them cannot block the messages behind it.
                let newly_rejected = shared.reject(&page);
                let offered: Vec<(String, String)> = page
                    .messages
                    .iter()
                    .map(|m| (m.id.clone(), m.dedup_key().to_owned()))
                    .collect();
                let last_stamp = page.messages.last().map(|m| m.timestamp.clone());
                // The newest stamp strictly older than the page's last: polling past it skips
                // the page just queued (not acked yet, so offered again) while rows sharing
                // the last stamp are read again and deduplicated, never skipped.
                let below_last = last_stamp.as_ref().and_then(|last| {
                    page.messages
                        .iter()
                        .map(|m| &m.timestamp)
                        .filter(|t| *t < last)
                        .max()
                        .cloned()
                });
                if let Some(since) = &asked_since
                    && !tracks.since_ignored
                    && ignores_since(since, &page)
                {
                    tracing::debug!(
                        "the direct source does not honour `since`: polls wait for acks"
                    );
                    tracks.since_ignored = true;
                }
                let fresh = shared.fresh(page.messages);
                // Offered again after being handled (an ack lost or refused), or a copy of a
                // message handled through another path: ack it, or it stays pending.
                shared.ack_again(&offered);
                // Acks refused: the server keeps offering what was handled.
                let acks_owed = !lock(&shared.pending_acks).is_empty();
                tracks.direct_since = match (full, fresh.is_empty()) {
                    // Full, and rows to skip were found: they are acked before the next
                    // poll, which then sees past them.
                    (true, true) if newly_rejected => {
                        more = true;
                        None
                    }
                    // `since` is not honoured: only acks move the window, and the delivery
                    // loop polls again as soon as they are in.
                    _ if tracks.since_ignored => None,
                    // Full of what was handled but cannot be acked: look past it from the
                    // page's last second on, once per distinct mark. A page all in one
                    // second cannot be looked past without skipping rows of that second out
                    // of order: it waits for the acks to go through.
                    (true, true)
                        if acks_owed
                            && below_last.is_some()
                            && below_last != tracks.direct_since =>
                    {
                        more = true;
                        below_last
                    }
                    // Fresh rows, and an older second to read on from: read ahead while they
                    // are handled (rows of the last second are read again, deduplicated).
                    (true, false) if below_last.is_some() => {
                        more = true;
                        below_last
                    }
                    // Otherwise the page is all one second, or in flight: only acks move
                    // the window, and the delivery loop polls again once they are in.
                    _ => None,
                };
                outcome.full |= full;
                if !fresh.is_empty() {
                    let batch = Batch::direct(shared, fresh);
                    let batch =
                        journal::record_batch(shared, batch, Source::Direct, Vec::new()).await;
                    if !batch.messages.is_empty() && !enqueue(shared, queue, batch).await {
                        return CycleOutcome::default();
                    }
                }
            }
            Err(err) => {
                shared.record_error("direct", &err);
                outcome.errors.push(format!("direct: {err}"));
                tracks.direct_not_before = err.retry_after().map(|wait| now + wait);
                // A page larger than the client reads: ask for fewer at once. (A single
                // message over the body cap cannot be read at all; it stays an error.)
                if matches!(err, Error::TooLarge { .. }) && direct_limit > 1 {
                    tracks.direct_limit = direct_limit / 2;
                    more = true;
                }
            }
        }
    }

    let mut group_messages = Vec::new();
    // The conversations' new read positions, for the journal (written with the mentions).
    let keep_positions = shared.journaling.is_some();
    let mut positions = Vec::new();
    for (id, result) in groups {
        let track = tracks.groups.entry(id.clone()).or_default();
        match result {
            Ok(rows) => {
                track.not_before = None;
                // Only rows never read before are new (the first read takes the whole page),
                // and only they are mapped and counted; rows older than the first page are
                // history. Rows sharing the floor's second may be new: they are taken.
                let before = (track.primed, track.newest_ms, track.floor_ms);
                if !track.primed {
                    track.floor_ms = rows.iter().filter_map(row_created_ms).min();
                }
                track.newest_ms = track
                    .newest_ms
                    .max(rows.iter().filter_map(row_created_ms).max());
                let known = Arc::make_mut(&mut track.known);
                let (primed, floor) = (track.primed, track.floor_ms);
                let mut new_rows = Vec::new();
                let new: Vec<&Value> = rows
                    .iter()
                    .filter(|row| {
                        let key = row_key(row);
                        let unread = known.insert(&key);
                        if unread && keep_positions {
                            new_rows.push(key);
                        }
                        !primed
                            || (unread
                                && floor.is_none_or(|floor| {
                                    row_created_ms(row).is_none_or(|at| at >= floor)
                                }))
                    })
                    .collect();
                track.primed = true;
                // Written when it moved: not on every read of a quiet conversation.
                let moved = before != (true, track.newest_ms, track.floor_ms);
                if keep_positions && (moved || !new_rows.is_empty()) {
                    positions.push(GroupUpdate {
                        conversation: id.clone(),
                        newest_ms: track.newest_ms,
                        floor_ms: track.floor_ms,
                        new_rows,
                    });
                }
                // Newest first on the wire; oldest first to the handler.
                for row in new.into_iter().rev() {
                    match message::from_rest_row(row, Some(&id)) {
                        Ok(m)
                            if m.from != shared.config.agent_id
                                && mentions(&m.content, &shared.config.agent_id) =>
                        {
                            group_messages.push(m);
                        }
                        Ok(_) => {}
                        Err(why) => {
                            tracing::warn!(conversation = %id, error = %why, "skipping a group row");
                            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(err) => {
                shared.record_error(&format!("group {id}"), &err);
                outcome.errors.push(format!("group {id}: {err}"));
                track.not_before = err.retry_after().map(|wait| now + wait);
            }
        }
    }
    let fresh = shared.fresh(group_messages);
    let batch =
        journal::record_batch(shared, Batch::of(fresh, false), Source::Group, positions).await;
    if !batch.messages.is_empty() && !enqueue(shared, queue, batch).await {
        return CycleOutcome::default();
    }
    outcome.more = more;
    outcome
}

/// What a group track has read before, for [`read_group`].
struct Seen {
    rows: Arc<SeenWindow>,
    newest_ms: Option<i64>,
}

impl Seen {
    /// Whether a full page can have cut off rows not read yet. Rows are listed newest first
    /// by whole-second timestamps with no tiebreak: every row newer than the page's oldest
    /// second is on it, rows of that second may not be, and new rows are no older than the
    /// newest row read before. Without readable timestamps: when no row was read before.
    fn page_may_hide_new_rows(&self, rows: &[Value]) -> bool {
        match (rows.iter().filter_map(row_created_ms).min(), self.newest_ms) {
            (Some(oldest), Some(newest)) => oldest >= newest,
            (_, None) => true,
            (None, Some(_)) => !rows.iter().any(|row| self.rows.contains(&row_key(row))),
        }
    }
}

/// Reads a group's newest rows. The first read takes one page (older rows are history);
/// after that, while a full page may hide rows not read yet (see [`Seen`]), a bigger page
/// is read, up to [`MAX_GROUP_FETCH`].
async fn read_group(
    feed: &dyn GroupFeed,
    id: &str,
    limit: u32,
    seen: Option<&Seen>,
) -> super::error::Result<Vec<Value>> {
    let mut limit = limit;
    let mut read: Option<Vec<Value>> = None;
    loop {
        let rows = match feed.recent(id, limit).await {
            Ok(rows) => rows,
            // The bigger page is more than the client reads (huge messages): go on with the
            // page already read, the most that can be read.
            Err(Error::TooLarge { .. }) if read.is_some() => {
                tracing::warn!(conversation = %id, limit, "a burst too large to read in full; some mentions may be missed");
                return Ok(read.unwrap_or_default());
            }
            Err(err) => return Err(err),
        };
        let full = rows.len() >= limit as usize;
        let complete = seen.is_none_or(|seen| !seen.page_may_hide_new_rows(&rows));
        if !full || complete {
            return Ok(rows);
        }
        if limit >= MAX_GROUP_FETCH {
            tracing::warn!(conversation = %id, limit, "more new rows than the most read at once: some mentions may be missed");
            return Ok(rows);
        }
        read = Some(rows);
        limit = (limit * 4).min(MAX_GROUP_FETCH);
    }
}

fn row_created_ms(row: &Value) -> Option<i64> {
    clock::parse_iso_ms(row.get("createdAt")?.as_str()?)
}

/// What a listing row is remembered by: its id, else (a broken row) the row itself.
fn row_key(row: &Value) -> String {
    match row.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => super::transport::Rejected::of(row, &message::MapError::MissingId).key,
    }
}

async fn delivery_loop(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Batch>,
    token: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            _ = token.cancelled() => return,
            batch = queue.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        if let Some(request) = batch.answer {
            // Everything queued before the marker has been handed over; a message the
            // realtime path is handing over the short way right now finishes first.
            let _turn = shared.delivering.lock().await;
            drop(batch.queued);
            // A full page this round, and progress since it started (something handled,
            // hence acked): poll again, for rows the server could only page past once those
            // were acked (one second's ties, read again with `since` of that second). With no
            // progress (acks failing), another round would see the same page: answer.
            let now = settled(&shared.stats);
            if request.full && now > request.settled_at {
                let mut request = request;
                request.full = false;
                request.settled_at = now;
                *lock(&shared.resumed) = Some(request);
                shared.kick.notify_one();
            } else {
                request.answer(&shared.stats);
            }
            continue;
        }
        // A message pushed before any handler exists waits here for one: never dropped.
        let Some(handler) = shared.wait_for_handler(&token).await else {
            return;
        };
        let turn = shared.delivering.clone().lock_owned().await;
        if batch.journal.is_some() {
            deliver_detached(&shared, handler, batch, token.clone(), turn).await;
        } else {
            deliver_batch(&shared, handler, batch, token.clone()).await;
            drop(turn);
        }
    }
}

/// Hands a journaled batch over in a task of its own, holding `turn` until it is done: a
/// stop aborts the caller's loop, not the handler call in flight, which is then marked
/// handled in the journal when it settles.
async fn deliver_detached(
    shared: &Arc<Shared>,
    handler: Arc<dyn Handler>,
    batch: Batch,
    token: CancellationToken,
    turn: tokio::sync::OwnedMutexGuard<()>,
) {
    let shared = shared.clone();
    let delivering = tokio::spawn(
        async move {
            let _turn = turn;
            deliver_batch(&shared, handler, batch, token).await;
        }
        .in_current_span(),
    );
    let _ = delivering.await;
}

/// Sends a batch to the delivery loop (waiting while the queue is full); false when the
/// poller stopped.
async fn enqueue(shared: &Shared, queue: &mpsc::Sender<Batch>, mut batch: Batch) -> bool {
    batch.queued = Some(Counted::count(&shared.in_queue));
    queue.send(batch).await.is_ok()
}

/// Hands one batch to the handler, counting outcomes and owing acks for direct messages.
/// The caller holds `shared.delivering`.
async fn deliver_batch(
    shared: &Arc<Shared>,
    handler: Arc<dyn Handler>,
    batch: Batch,
    token: CancellationToken,
) {
    let Batch {
        messages,
        ack,
        unacked,
        journal,
        ..
    } = batch;
    // With a journal: marked started before the first call (a crash from here on offers
    // them again, flagged), and each marked handled as it settles.
    let journaled = match journal {
        Some(Journaled {
            journal,
            seqs,
            started,
        }) => {
            if !started {
                let mut order: Vec<i64> = seqs.values().copied().collect();
                order.sort_unstable();
                if let Err(err) = journal.start(order).await {
                    tracing::error!(error = %err, "cannot mark messages started in the journal");
                }
            }
            Some(Arc::new((journal, seqs)))
        }
        None => None,
    };
    // Settled by id; remembered by dedup key where the two differ (group-message copies).
    let keys: HashMap<String, String> = messages
        .iter()
        .filter(|m| m.dedup_key() != m.id)
        .map(|m| (m.id.clone(), m.dedup_key().to_owned()))
        .collect();
    // Ids not yet settled. A handler that gives up half-way (its JS environment is going
    // away, a call could not even be made) leaves some unsettled: those were never handed
    // over, so they must neither be acked nor stay "queued" (which would hide them from the
    // next peek for good).
    let unsettled: Arc<Mutex<HashSet<String>>> =
        Arc::new(Mutex::new(messages.iter().map(|m| m.id.clone()).collect()));
    let keys = Arc::new(keys);
    let settled: Settled = {
        let shared = shared.clone();
        let unsettled = unsettled.clone();
        let keys = keys.clone();
        let journaled = journaled.clone();
        Arc::new(move |id: &str, outcome: Outcome| {
            let last = {
                let mut unsettled = lock(&unsettled);
                if !unsettled.remove(id) {
                    // Settled twice, or not of this batch: counted once.
                    return;
                }
                unsettled.is_empty()
            };
            match outcome {
                Outcome::Handled => shared.stats.delivered.fetch_add(1, Ordering::Relaxed),
                Outcome::Failed(why) => {
                    let why = shared.scrub(why);
                    tracing::warn!(message_id = id, error = %why, "message handler failed");
                    *lock(&shared.stats.last_error) = Some(format!("handler: {why}"));
                    shared.stats.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            if let Some((journal, seqs)) = journaled.as_deref()
                && let Some(seq) = seqs.get(id)
            {
                // The batch's last: its end (and the journal's flush) comes right after.
                if last {
                    journal.settle_before_flush(*seq);
                } else {
                    journal.settle(*seq);
                }
            }
            shared.settle(keys.get(id).map_or(id, String::as_str));
            if ack {
                shared.owe_acks(vec![id.to_owned()]);
            }
        })
    };
    handler.deliver(messages, settled, token.clone()).await;
    let left: Vec<String> = lock(&unsettled).drain().collect();
    // Never handed over (stopped first): not "started" for the next runtime either. The
    // batch is over: its settles are written now, not after the journal's settle delay.
    if let Some((journal, seqs)) = journaled.as_deref() {
        journal.unstart(left.iter().filter_map(|id| seqs.get(id).copied()).collect());
        journal.flush();
    }
    if !left.is_empty() && !token.is_cancelled() {
        tracing::debug!(
            count = left.len(),
            "messages not handed to the handler; they are offered again"
        );
        let mut queued = lock(&shared.queued);
        for id in &left {
            queued.remove(keys.get(id).map_or(id.as_str(), String::as_str));
        }
    }
    // After a stop, a call that was in flight settled: its ack is the final ack's business
    // (or, missed, the next runtime's), never a transport call after stop() returned.
    if ack && !token.is_cancelled() {
        // Acked: the server's window moved. Behind a full page, read the next one now; and
        // make a poll that was put off while this page was unacked (see
        // `Shared::defer_direct_poll`), counted down first so that it is not put off again.
        let acked = flush_acks(shared).await;
        drop(unacked);
        let deferred = shared.direct_deferred.swap(false, Ordering::SeqCst);
        if (acked && shared.direct_full.swap(false, Ordering::Relaxed)) || deferred {
            shared.direct_requested.store(true, Ordering::Relaxed);
            shared.kick.notify_one();
        }
    }
}

/// Acks the settled ids. They stay pending until the server has taken the ack, so `stop()`
/// in the middle of one still returns them; after a failure the next direct poll retries.
/// True when nothing is left owed.
async fn flush_acks(shared: &Shared) -> bool {
    // Nothing owed, so no ack in flight either (its ids stay owed until it is done): the
    // common case of every idle poll, without the async lock.
    if lock(&shared.pending_acks).is_empty() {
        return true;
    }
    let _one = shared.acking.lock().await;
    let ids = lock(&shared.pending_acks).clone();
    if ids.is_empty() {
        return true;
    }
    match shared.direct.ack(ids.clone()).await {
        Ok(()) => {
            let done: HashSet<String> = ids.into_iter().collect();
            lock(&shared.pending_acks).retain(|id| !done.contains(id));
            true
        }
        // The server offers them again meanwhile; dedup keeps them from the handler.
        Err(err) => {
            shared.record_error("ack", &err);
            false
        }
    }
}

pub mod final_ack;
#[cfg(test)]
mod tests;
