//! Poller behaviour against fakes, on tokio's paused clock.
//!
//! The fakes: [`Direct`] is a pending-message server (oldest first, `since` honoured, acked
//! messages disappear) with an optional script of pages or errors in front of it; [`Groups`]
//! keeps rows per conversation and answers newest first, with scripted errors and a
//! per-request delay; [`Recorder`] is the handler, recording every message it is handed and
//! able to fail, be slow, or never settle. Every fake stamps what it sees with the paused
//! clock's milliseconds since the test began, so schedules are asserted exactly.

use std::collections::VecDeque;

use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::time::sleep_until;

use super::*;
use crate::core::error::Result;
use crate::core::transport::Page;

// ---------------------------------------------------------------------------------------
// Fixtures

/// 2026-01-01T00:00:00Z: message timestamps count seconds from here.
const EPOCH_MS: i64 = 1_767_225_600_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn stamp(i: u32) -> String {
    clock::format_iso_ms(EPOCH_MS + i64::from(i) * 1000)
}

/// Direct message `d{i}`, stamped `i` seconds after the epoch.
fn dm(i: u32) -> ConduitMessage {
    message_with(&format!("d{i}"), &format!("direct {i}"), i)
}

fn dms(range: std::ops::RangeInclusive<u32>) -> Vec<ConduitMessage> {
    range.map(dm).collect()
}

fn message_with(id: &str, content: &str, i: u32) -> ConduitMessage {
    ConduitMessage {
        id: id.into(),
        from: "bob".into(),
        content: content.into(),
        tags: None,
        thread_id: None,
        group_id: None,
        timestamp: stamp(i),
        metadata: None,
    }
}

/// A REST row of a group conversation.
fn row(id: &str, from: &str, content: &str, i: u32) -> Value {
    json!({ "id": id, "fromAgentId": from, "content": content, "createdAt": stamp(i) })
}

/// Rows `{prefix}{i}` from bob, each mentioning alice.
fn mention_rows(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<Value> {
    range
        .map(|i| {
            row(
                &format!("{prefix}{i}"),
                "bob",
                &format!("@alice {prefix}{i}"),
                i,
            )
        })
        .collect()
}

fn names(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn server_error(status: u16) -> Error {
    Error::Status {
        status,
        retry_after: None,
        message: String::new(),
    }
}

fn rate_limited(wait: Duration) -> Error {
    Error::Status {
        status: 429,
        retry_after: Some(wait),
        message: "slow down".into(),
    }
}

fn page(messages: Vec<ConduitMessage>) -> Page {
    Page {
        rows: messages.len(),
        messages,
        ..Page::default()
    }
}

fn since_millis(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Fake direct source

#[derive(Clone, Debug, PartialEq)]
struct PollCall {
    at: u64,
    limit: u32,
    since: Option<String>,
}

#[derive(Default)]
struct DirectState {
    /// What the server holds, oldest first; acked ids leave.
    pending: Vec<ConduitMessage>,
    /// Answers given before the server's own, one per poll.
    script: VecDeque<Result<Page>>,
    polls: Vec<PollCall>,
    /// Every ack request, when it started.
    ack_calls: Vec<(u64, Vec<String>)>,
    /// Ids acked successfully, in order.
    acked: Vec<String>,
    ack_errors: VecDeque<Error>,
    ack_always_fails: bool,
    ack_delay: Duration,
    /// Every id the source has ever handed out.
    served: HashSet<String>,
    /// Peek semantics: `since` is ignored, a poll returns the oldest unacked messages.
    ignores_since: bool,
    /// Messages handed out again while an earlier copy was not acked yet.
    repeats: usize,
    /// Ack requests under way now, and polls that started while one was.
    acks_under_way: usize,
    polls_during_ack: usize,
}

struct Direct {
    state: Mutex<DirectState>,
    t0: Instant,
}

impl Direct {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(DirectState::default()),
            t0: Instant::now(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut DirectState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    fn push(&self, messages: Vec<ConduitMessage>) {
        self.with(|s| s.pending.extend(messages));
    }

    fn polls(&self) -> Vec<PollCall> {
        self.with(|s| s.polls.clone())
    }

    fn poll_times(&self) -> Vec<u64> {
        self.with(|s| s.polls.iter().map(|p| p.at).collect())
    }

    fn acked(&self) -> Vec<String> {
        self.with(|s| s.acked.clone())
    }

    fn ack_calls(&self) -> usize {
        self.with(|s| s.ack_calls.len())
    }

    fn pending_ids(&self) -> Vec<String> {
        self.with(|s| s.pending.iter().map(|m| m.id.clone()).collect())
    }

    fn served(&self) -> usize {
        self.with(|s| s.served.len())
    }
}

impl DirectSource for Direct {
    fn poll(&self, limit: u32, since: Option<String>) -> BoxFuture<'_, Result<Page>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.polls.push(PollCall {
                at: since_millis(self.t0),
                limit,
                since: since.clone(),
            });
            if s.acks_under_way > 0 {
                s.polls_during_ack += 1;
            }
            let honoured = if s.ignores_since { None } else { since };
            let answer = s.script.pop_front().unwrap_or_else(|| {
                let newer =
                    |m: &&ConduitMessage| honoured.as_ref().is_none_or(|t| m.timestamp > *t);
                Ok(page(
                    s.pending
                        .iter()
                        .filter(newer)
                        .take(limit as usize)
                        .cloned()
                        .collect(),
                ))
            });
            if let Ok(page) = &answer {
                let ids: Vec<String> = page.messages.iter().map(|m| m.id.clone()).collect();
                let repeats = ids.iter().filter(|id| s.served.contains(*id)).count();
                s.repeats += repeats;
                s.served.extend(ids);
            }
            answer
        })
    }

    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let delay = self.with(|s| {
                s.ack_calls.push((since_millis(self.t0), ids.clone()));
                s.acks_under_way += 1;
                s.ack_delay
            });
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut s = lock(&self.state);
            s.acks_under_way -= 1;
            if let Some(err) = s.ack_errors.pop_front() {
                return Err(err);
            }
            if s.ack_always_fails {
                return Err(server_error(503));
            }
            s.pending.retain(|m| !ids.contains(&m.id));
            s.acked.extend(ids);
            Ok(())
        })
    }

    fn name(&self) -> String {
        "fake-direct".into()
    }
}

// ---------------------------------------------------------------------------------------
// Fake group feed

#[derive(Default)]
struct GroupState {
    /// Rows per conversation, oldest first (answered newest first).
    rows: HashMap<String, Vec<Value>>,
    errors: HashMap<String, VecDeque<Error>>,
    delay: Duration,
    /// (ms, conversation, limit) per request.
    requests: Vec<(u64, String, u32)>,
    in_flight: usize,
    max_in_flight: usize,
}

struct Groups {
    state: Mutex<GroupState>,
    t0: Instant,
}

impl Groups {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(GroupState::default()),
            t0: Instant::now(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut GroupState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    fn add(&self, conversation: &str, rows: Vec<Value>) {
        self.with(|s| s.rows.entry(conversation.into()).or_default().extend(rows));
    }

    fn fail(&self, conversation: &str, errors: Vec<Error>) {
        self.with(|s| {
            s.errors
                .entry(conversation.into())
                .or_default()
                .extend(errors)
        });
    }

    fn requests(&self) -> Vec<(u64, String, u32)> {
        self.with(|s| s.requests.clone())
    }

    fn request_times(&self, conversation: &str) -> Vec<u64> {
        self.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.1 == conversation)
                .map(|r| r.0)
                .collect()
        })
    }
}

impl GroupFeed for Groups {
    fn recent(&self, conversation: &str, limit: u32) -> BoxFuture<'_, Result<Vec<Value>>> {
        let conversation = conversation.to_owned();
        Box::pin(async move {
            let delay = self.with(|s| {
                s.requests
                    .push((since_millis(self.t0), conversation.clone(), limit));
                s.in_flight += 1;
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                s.delay
            });
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut s = lock(&self.state);
            s.in_flight -= 1;
            if let Some(err) = s
                .errors
                .get_mut(&conversation)
                .and_then(VecDeque::pop_front)
            {
                return Err(err);
            }
            let rows = s.rows.get(&conversation).cloned().unwrap_or_default();
            Ok(rows.into_iter().rev().take(limit as usize).collect())
        })
    }
}

// ---------------------------------------------------------------------------------------
// Fake handler

struct RecorderState {
    /// Every message handed over, with the ms it was handed over at.
    calls: Mutex<Vec<(u64, ConduitMessage)>>,
    fail: Mutex<HashSet<String>>,
    /// Ids on which the handler never settles (once each).
    hang: Mutex<HashSet<String>>,
    /// Ids on which the handler gives up on the rest of its batch, without settling this
    /// one or any after it (once each), as a JS handler does when its environment goes.
    give_up: Mutex<HashSet<String>>,
    per_message: Mutex<Duration>,
    t0: Instant,
}

#[derive(Clone)]
struct Recorder(Arc<RecorderState>);

impl Recorder {
    fn new() -> Self {
        Self(Arc::new(RecorderState {
            calls: Mutex::new(Vec::new()),
            fail: Mutex::new(HashSet::new()),
            hang: Mutex::new(HashSet::new()),
            give_up: Mutex::new(HashSet::new()),
            per_message: Mutex::new(Duration::ZERO),
            t0: Instant::now(),
        }))
    }

    fn failing(self, ids: &[&str]) -> Self {
        lock(&self.0.fail).extend(strings(ids));
        self
    }

    fn hanging_on(self, ids: &[&str]) -> Self {
        lock(&self.0.hang).extend(strings(ids));
        self
    }

    fn giving_up_on(self, ids: &[&str]) -> Self {
        lock(&self.0.give_up).extend(strings(ids));
        self
    }

    fn slow(self, per_message: Duration) -> Self {
        *lock(&self.0.per_message) = per_message;
        self
    }

    fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(self.clone())
    }

    fn ids(&self) -> Vec<String> {
        lock(&self.0.calls)
            .iter()
            .map(|(_, m)| m.id.clone())
            .collect()
    }

    fn calls(&self) -> Vec<(u64, ConduitMessage)> {
        lock(&self.0.calls).clone()
    }

    fn count(&self) -> usize {
        lock(&self.0.calls).len()
    }
}

impl Handler for Recorder {
    fn deliver(
        &self,
        batch: Vec<ConduitMessage>,
        settled: Settled,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let me = self.0.clone();
        Box::pin(async move {
            for message in batch {
                if stop.is_cancelled() {
                    return;
                }
                if lock(&me.give_up).remove(&message.id) {
                    return;
                }
                lock(&me.calls).push((since_millis(me.t0), message.clone()));
                if lock(&me.hang).remove(&message.id) {
                    std::future::pending::<()>().await;
                }
                let delay = *lock(&me.per_message);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let outcome = if lock(&me.fail).contains(&message.id) {
                    Outcome::Failed(format!("boom {}", message.id))
                } else {
                    Outcome::Handled
                };
                settled(&message.id, outcome);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Rig

struct Rig {
    poller: Poller,
    direct: Arc<Direct>,
    groups: Arc<Groups>,
    handler: Recorder,
    t0: Instant,
}

impl Rig {
    /// Agent `alice`, a 1 s interval, the given group conversations; no handler yet.
    fn new(groups: &[&str]) -> Self {
        Self::with_config(groups, |_| {})
    }

    fn with_config(groups: &[&str], tweak: impl FnOnce(&mut PollerConfig)) -> Self {
        let mut config = PollerConfig::new("alice");
        config.poll_interval = Duration::from_secs(1);
        config.group_conversation_ids = strings(groups);
        // Schedules are asserted to the millisecond from each rig's own start.
        config.poll_grid = Duration::ZERO;
        tweak(&mut config);
        let direct = Direct::new();
        let feed = Groups::new();
        let poller = Poller::new(config, direct.clone(), Some(feed.clone()));
        Self {
            poller,
            direct,
            groups: feed,
            handler: Recorder::new(),
            t0: Instant::now(),
        }
    }

    fn handle_with(&mut self, handler: Recorder) {
        self.handler = handler;
        self.poller.set_handler(self.handler.handler());
    }

    fn handle(&self) {
        self.poller.set_handler(self.handler.handler());
    }

    /// A handler that takes 10 ms a message, so acks trail polls as with a real one.
    fn handle_with_delay(&mut self) {
        self.handle_with(Recorder::new().slow(ms(10)));
    }

    /// Sleeps until `ms` after the test began.
    async fn at(&self, millis: u64) {
        sleep_until(self.t0 + ms(millis)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Handler registration and the schedule

#[tokio::test(start_paused = true)]
async fn without_a_handler_nothing_is_polled_and_a_late_handler_gets_everything() {
    let r = Rig::new(&["g"]);
    r.direct.push(dms(1..=3));
    r.groups.add("g", mention_rows("g", 1..=2));
    assert!(r.poller.start());

    r.at(3500).await;
    assert!(r.direct.polls().is_empty(), "no handler: no direct poll");
    assert!(r.groups.requests().is_empty(), "no handler: no group poll");
    let status = r.poller.status();
    assert!(status.running);
    assert_eq!(
        (status.seen_count, status.polls),
        (0, 0),
        "nothing marked seen"
    );

    r.handle();
    r.at(3510).await;
    assert_eq!(
        r.direct.poll_times(),
        [3500],
        "a prompt cycle, not at the next tick"
    );
    assert_eq!(r.groups.requests(), [(3500, "g".to_string(), 15)]);
    assert_eq!(r.handler.ids(), strings(&["d1", "d2", "d3", "g1", "g2"]));
    assert_eq!(r.direct.acked(), strings(&["d1", "d2", "d3"]));
    assert_eq!(r.poller.status().seen_count, 5);
}

#[tokio::test(start_paused = true)]
async fn start_runs_one_cycle_at_once_then_one_per_interval() {
    let r = Rig::new(&["g"]);
    r.handle(); // the usual order: onMessage, then start
    assert!(r.poller.start());
    assert!(!r.poller.start(), "a second start is a no-op");
    r.at(3500).await;
    assert!(!r.poller.start());
    assert_eq!(r.direct.poll_times(), [0, 1000, 2000, 3000]);
    assert_eq!(r.groups.request_times("g"), [0, 1000, 2000, 3000]);
    assert_eq!(r.poller.status().polls, 4);
    assert!(
        r.direct
            .polls()
            .iter()
            .all(|p| p.limit == DIRECT_PAGE && p.since.is_none())
    );
}

#[tokio::test(start_paused = true)]
async fn pollers_started_within_one_grid_step_share_their_wake_ups_and_are_never_late() {
    let grid = ms(10);
    // From a grid instant, so that both starts fall in one step.
    sleep_until(on_grid(Instant::now(), grid) + grid).await;
    let a = Rig::with_config(&["g"], |c| c.poll_grid = grid);
    a.handle();
    a.poller.start();
    tokio::time::sleep(ms(3)).await;
    let b = Rig::with_config(&["g"], |c| c.poll_grid = grid);
    b.handle();
    b.poller.start();
    a.at(3500).await;
    // Each poller's clock counts from its own start; b's runs 3 ms behind a's.
    assert_eq!(a.direct.poll_times(), [0, 1000, 2000, 3000]);
    assert_eq!(
        b.direct.poll_times(),
        [0, 997, 1997, 2997],
        "on a's instants: up to one step early, never late"
    );
    assert_eq!(b.groups.request_times("g"), [0, 997, 1997, 2997]);
}

#[tokio::test(start_paused = true)]
async fn a_grid_step_over_one_percent_of_the_interval_is_not_used() {
    let r = Rig::with_config(&[], |c| {
        c.poll_grid = ms(10);
        c.poll_interval = ms(999);
    });
    tokio::time::sleep(ms(3)).await;
    r.handle();
    r.poller.start();
    r.at(2100).await;
    assert_eq!(r.direct.poll_times(), [3, 1002, 2001]);
}

#[tokio::test(start_paused = true)]
async fn a_second_handler_replaces_the_first() {
    let mut r = Rig::new(&[]);
    let first = Recorder::new();
    r.direct.push(dms(1..=1));
    r.handle_with(first.clone());
    r.poller.start();
    r.at(500).await;
    let second = Recorder::new();
    r.handle_with(second.clone());
    r.direct.push(dms(2..=2));
    r.at(1500).await;
    assert_eq!(first.ids(), ["d1"]);
    assert_eq!(second.ids(), ["d2"]);
}

// ---------------------------------------------------------------------------------------
// Stopping

#[tokio::test(start_paused = true)]
async fn stop_returns_at_once_while_the_handler_never_settles_and_nothing_happens_after() {
    let mut r = Rig::new(&["g"]);
    r.direct.push(dms(1..=5));
    r.groups.add("g", mention_rows("g", 1..=1));
    r.handle_with(Recorder::new().hanging_on(&["d3"]));
    r.poller.start();
    r.at(100).await;
    assert_eq!(r.handler.ids(), strings(&["d1", "d2", "d3"]));
    assert_eq!(r.direct.ack_calls(), 0, "acks wait for the batch");
    assert_eq!(r.poller.status().pending_acks, 2);

    let unacked = r.poller.stop();
    assert_eq!(unacked, strings(&["d1", "d2"]), "handled but not acked");
    assert!(!r.poller.status().running);
    assert_eq!(r.poller.status().pending_acks, 0);

    r.direct.push(dms(6..=6));
    r.groups.add("g", mention_rows("g", 2..=2));
    r.at(10_000).await;
    assert_eq!(r.direct.polls().len(), 1, "no poll after stop");
    assert_eq!(r.groups.requests().len(), 1, "no group poll after stop");
    assert_eq!(r.direct.ack_calls(), 0, "no ack after stop");
    assert_eq!(
        r.handler.ids(),
        strings(&["d1", "d2", "d3"]),
        "no handler call after stop"
    );
    assert!(r.poller.stop().is_empty(), "a second stop is a no-op");
    assert!(!r.poller.offer(dm(7)).await);
}

#[tokio::test(start_paused = true)]
async fn stop_during_an_ack_still_returns_the_ids_being_acked() {
    let r = Rig::new(&[]);
    r.direct.push(dms(1..=2));
    r.direct.with(|s| s.ack_delay = ms(500));
    r.handle();
    r.poller.start();
    r.at(100).await;
    assert_eq!(r.handler.ids(), strings(&["d1", "d2"]));
    assert_eq!(r.direct.ack_calls(), 1, "the ack is on its way");
    assert_eq!(r.poller.stop(), strings(&["d1", "d2"]));
    r.at(2000).await;
    assert!(
        r.direct.acked().is_empty(),
        "the ack in flight was dropped with the task"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_a_handler_never_took_are_neither_acked_nor_lost() {
    let mut r = Rig::new(&[]);
    r.direct.push(dms(1..=4));
    r.handle_with(Recorder::new().giving_up_on(&["d2"]));
    assert!(r.poller.start());
    r.at(10).await;
    assert_eq!(
        r.handler.ids(),
        strings(&["d1"]),
        "d2..d4 were never handed over"
    );
    assert_eq!(
        r.direct.acked(),
        strings(&["d1"]),
        "only what was handled is acked"
    );
    assert_eq!(r.direct.pending_ids(), strings(&["d2", "d3", "d4"]));
    // The next poll offers them again, and this time they are handed over.
    r.at(1010).await;
    assert_eq!(r.handler.ids(), strings(&["d1", "d2", "d3", "d4"]));
    assert_eq!(r.direct.acked(), strings(&["d1", "d2", "d3", "d4"]));
    assert_eq!(r.poller.status().failed, 0);
    r.poller.stop();
}

#[tokio::test(start_paused = true)]
async fn a_restart_delivers_what_was_queued_but_not_handled() {
    let mut r = Rig::new(&["g"]);
    r.direct.push(dms(1..=3));
    r.groups.add("g", mention_rows("g", 1..=1));
    r.handle_with(Recorder::new().hanging_on(&["d2"]));
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), strings(&["d1", "d2"]));
    assert_eq!(r.poller.stop(), ["d1"]);
    // The caller acks what stop() returned, on the way out.
    r.direct.with(|s| s.pending.retain(|m| m.id != "d1"));

    r.poller.start();
    r.at(20).await;
    // d2 reached the handler but never settled: offered again. d3 and g1 never got there.
    assert_eq!(r.handler.ids(), strings(&["d1", "d2", "d2", "d3", "g1"]));
    assert_eq!(r.direct.acked(), strings(&["d2", "d3"]));
    assert!(r.direct.pending_ids().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_new_poller_waits_for_the_final_ack_of_one_stopped_before_it() {
    // Its own agent id: the registry of final acks is process-wide.
    let r = Rig::with_config(&[], |c| c.agent_id = "final-ack-test".into());
    r.direct.push(dms(1..=2));
    let guard = final_ack::in_flight_for("final-ack-test");
    r.handle();
    r.poller.start();
    r.at(300).await;
    assert!(
        r.direct.polls().is_empty(),
        "waits while the final ack is on its way"
    );
    drop(guard);
    r.at(310).await;
    assert_eq!(r.direct.poll_times(), [300]);
    assert_eq!(r.handler.ids(), ["d1", "d2"]);

    // A guard never dropped holds the next start back for final_ack::FINAL_ACK_WAIT at most.
    r.poller.stop();
    let _stuck = final_ack::in_flight_for("final-ack-test");
    r.direct.push(dms(3..=3));
    r.poller.start();
    r.at(310 + final_ack::FINAL_ACK_WAIT.as_millis() as u64 + 10)
        .await;
    assert_eq!(r.handler.ids(), ["d1", "d2", "d3"]);
}

// ---------------------------------------------------------------------------------------
// Dedup and order

#[tokio::test(start_paused = true)]
async fn one_handler_call_per_id_across_tracks_cycles_and_contents() {
    let r = Rig::new(&["g"]);
    r.direct.with(|s| {
        s.script
            .push_back(Ok(page(vec![message_with("x1", "direct x1", 1), dm(2)])));
        // The same id again, with other content, and a duplicate inside one page.
        s.script.push_back(Ok(page(vec![
            message_with("x1", "changed", 1),
            dm(3),
            dm(3),
        ])));
    });
    r.groups.add(
        "g",
        vec![
            row("d2", "bob", "@alice d2 seen in the group", 1),
            row("x1", "bob", "@alice x1 from the group", 2),
            row("g5", "bob", "@alice new", 3),
        ],
    );
    r.handle();
    r.poller.start();
    r.at(2500).await;
    assert_eq!(r.handler.ids(), strings(&["x1", "d2", "g5", "d3"]));
    let calls = r.handler.calls();
    assert_eq!(calls[0].1.content, "direct x1", "first seen wins");
    // x1, offered again after it was handled and acked, is acked again (not handled again).
    assert_eq!(r.direct.acked(), strings(&["x1", "d2", "x1", "d3"]));
    assert!(r.poller.offer(message_with("g5", "again", 9)).await);
    r.at(2600).await;
    assert_eq!(r.handler.count(), 4, "offer dedups against polling");
}

#[tokio::test(start_paused = true)]
async fn direct_messages_first_then_groups_oldest_first_in_config_order() {
    let r = Rig::new(&["a", "b"]);
    r.direct.push(dms(1..=3));
    r.groups.add("a", mention_rows("a", 1..=3));
    r.groups.add("b", mention_rows("b", 1..=2));
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(
        r.handler.ids(),
        strings(&["d1", "d2", "d3", "a1", "a2", "a3", "b1", "b2"])
    );
    let a1 = &r.handler.calls()[3].1;
    // The conversation is not the fan-out group id: a row without `groupId` has none.
    assert_eq!(a1.group_id, None);
    assert_eq!(a1.thread_id.as_deref(), Some("a"));
    assert_eq!((a1.from.as_str(), a1.timestamp.clone()), ("bob", stamp(1)));
}

// ---------------------------------------------------------------------------------------
// Acks and paging

#[tokio::test(start_paused = true)]
async fn acks_match_handled_ids_and_a_backlog_drains_at_once() {
    let mut r = Rig::new(&[]);
    r.direct.push(dms(1..=120));
    r.handle_with(Recorder::new().failing(&["d7", "d60"]));
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), names("d", 1..=120));
    assert_eq!(
        r.direct.acked(),
        names("d", 1..=120),
        "failed calls are settled: acked too"
    );
    assert!(r.direct.pending_ids().is_empty());
    assert!(
        r.direct.poll_times().iter().all(|&t| t == 0),
        "next pages fetched at once"
    );
    let status = r.poller.status();
    assert_eq!(
        (status.delivered, status.failed, status.pending_acks),
        (118, 2, 0)
    );

    r.at(1500).await;
    assert_eq!(r.handler.count(), 120);
    assert_eq!(r.direct.poll_times().last(), Some(&1000));
}

#[tokio::test(start_paused = true)]
async fn a_full_page_already_seen_moves_the_high_water_mark_and_failed_acks_are_retried() {
    let r = Rig::new(&[]);
    r.direct.push(dms(1..=60));
    r.direct.with(|s| s.ack_always_fails = true);
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), names("d", 1..=60));
    let want = |at, since: Option<String>| PollCall {
        at,
        limit: 50,
        since,
    };
    assert_eq!(
        r.direct.polls(),
        [want(0, None), want(0, Some(stamp(49)))],
        "a full page of new messages: the next poll looks past it at once (rows sharing its last stamp are read again)"
    );
    let status = r.poller.status();
    assert_eq!(status.pending_acks, 60);
    assert_eq!(status.last_error.as_deref(), Some("ack: HTTP 503"));

    // The server is fixed; nothing new arrives. The next direct cycle acks what is owed.
    r.direct.with(|s| s.ack_always_fails = false);
    r.at(1010).await;
    assert_eq!(r.direct.acked(), names("d", 1..=60));
    assert!(r.direct.pending_ids().is_empty());
    assert_eq!(r.poller.status().pending_acks, 0);
    assert_eq!(r.direct.polls().last(), Some(&want(1000, None)));
    r.at(3000).await;
    assert_eq!(r.handler.count(), 60, "each once");
}

#[tokio::test(start_paused = true)]
async fn a_source_that_ignores_since_is_not_polled_again_before_the_page_in_hand_is_acked() {
    // Peek semantics, as the real peek and the cleo CLI's local transport answer: a page
    // polled before the previous one is acked is that page again. A short interval, a slow
    // handler and a slow ack give every chance for a poll to land in between.
    let mut r = Rig::with_config(&[], |c| c.poll_interval = ms(20));
    r.direct.with(|s| {
        s.ignores_since = true;
        s.ack_delay = ms(15);
    });
    r.direct.push(dms(1..=200));
    r.handle_with(Recorder::new().slow(ms(1)));
    r.poller.start();
    while r.direct.acked().len() < 200 && r.t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(ms(5)).await;
    }
    assert_eq!(r.handler.ids(), names("d", 1..=200), "each once, in order");
    assert_eq!(r.direct.acked(), names("d", 1..=200));
    let (repeats, during_ack, with_since) = r.direct.with(|s| {
        (
            s.repeats,
            s.polls_during_ack,
            s.polls.iter().filter(|p| p.since.is_some()).count(),
        )
    });
    assert_eq!(
        with_since, 1,
        "one read-ahead shows that `since` is ignored; none after it"
    );
    assert_eq!(
        repeats, 50,
        "only that read-ahead brought back a page being handled"
    );
    assert_eq!(during_ack, 0, "no poll while an ack is under way");
    // The schedule goes on once the inbox is empty.
    let polls = r.direct.polls().len();
    r.at(r.t0.elapsed().as_millis() as u64 + 100).await;
    assert!(r.direct.polls().len() >= polls + 4);
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_poll_due_while_a_page_is_unacked_is_made_once_its_ack_is_in() {
    // `since` honoured, but a page that is not full leaves nothing to look past: a poll
    // due while it is handled would bring it back. It is made when the ack is in instead.
    let mut r = Rig::with_config(&[], |c| c.poll_interval = ms(100));
    r.direct.with(|s| s.ack_delay = ms(20));
    r.direct.push(dms(1..=30));
    r.handle_with(Recorder::new().slow(ms(10)));
    r.poller.start();
    r.at(150).await;
    r.direct.push(dms(31..=32));
    r.at(1000).await;
    assert_eq!(r.handler.ids(), names("d", 1..=32));
    let ack_times: Vec<u64> = r
        .direct
        .with(|s| s.ack_calls.iter().map(|(at, _)| *at).collect());
    assert_eq!(ack_times[0], 300, "30 messages at 10 ms each");
    let polls = r.direct.poll_times();
    assert_eq!(
        &polls[..2],
        [0, 320],
        "the polls due at 100, 200 and 300 wait for the ack (300 + 20 ms)"
    );
    assert_eq!(r.direct.with(|s| s.repeats), 0);
    assert!(
        polls.windows(2).all(|w| w[1] > w[0]),
        "one poll at a time: {polls:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Groups

#[tokio::test(start_paused = true)]
async fn group_messages_need_a_mention_of_this_agent_or_all() {
    let r = Rig::new(&["g"]);
    r.groups.add(
        "g",
        vec![
            row("m1", "bob", "hey @alice", 1),
            row("m2", "bob", "@ALICE please", 2),
            row("m3", "bob", "@all hands", 3),
            row("m4", "bob", "@alicebob nope", 4),
            row("m5", "bob", "mail bob@alice.dev", 5),
            row("m6", "alice", "@alice note to self", 6),
            row("m7", "bob", "no mention", 7),
            row("m8", "carol", "@All, standup", 8),
            row("m9", "bob", "@alice-2 not you", 9),
        ],
    );
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), strings(&["m1", "m2", "m3", "m8"]));
}

#[tokio::test(start_paused = true)]
async fn group_conversations_are_polled_concurrently() {
    let convs = ["g1", "g2", "g3", "g4", "g5"];
    let r = Rig::new(&convs);
    for (i, conv) in convs.iter().enumerate() {
        r.groups.add(
            conv,
            vec![row(&format!("{conv}-m"), "bob", "@alice", i as u32)],
        );
    }
    r.groups.with(|s| s.delay = ms(20));
    r.handle();
    r.poller.start();
    r.at(30).await;
    let times: Vec<u64> = r.handler.calls().iter().map(|(t, _)| *t).collect();
    assert_eq!(times, [20; 5], "five 20 ms requests take 20 ms, not 100");
    assert_eq!(r.groups.with(|s| s.max_in_flight), 5);
}

#[tokio::test(start_paused = true)]
async fn a_burst_bigger_than_a_page_is_read_at_once_but_history_is_not() {
    let r = Rig::new(&["g"]);
    r.groups.add("g", mention_rows("h", 1..=30));
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(
        r.groups.requests(),
        [(0, "g".to_string(), 15)],
        "first cycle: one page"
    );
    assert_eq!(r.handler.ids(), names("h", 16..=30));

    // Posted after the history: stamped later than all of it.
    r.groups.add(
        "g",
        (1..=40)
            .map(|i| row(&format!("n{i}"), "bob", &format!("@alice n{i}"), 100 + i))
            .collect(),
    );
    r.at(1010).await;
    assert_eq!(
        r.groups.requests()[1..],
        [(1000, "g".to_string(), 15), (1000, "g".to_string(), 60)]
    );
    assert_eq!(
        r.handler.ids()[15..],
        names("n", 1..=40),
        "the burst, and no older history"
    );

    r.at(2010).await;
    assert_eq!(r.groups.requests()[3..], [(2000, "g".to_string(), 15)]);
    assert_eq!(r.handler.count(), 55);
}

// ---------------------------------------------------------------------------------------
// Failures

#[tokio::test(start_paused = true)]
async fn a_failing_track_does_not_stop_the_others_and_retry_after_is_honoured() {
    let r = Rig::new(&["a", "b", "c"]);
    for conv in ["a", "b", "c"] {
        r.groups.add(conv, mention_rows(conv, 1..=1));
    }
    r.groups.fail(
        "a",
        vec![
            server_error(502),
            Error::Decode("bad json".into()),
            Error::Timeout,
        ],
    );
    r.groups.fail("b", vec![rate_limited(ms(2500))]);
    r.direct
        .with(|s| s.script.push_back(Err(server_error(500))));
    r.direct.push(dms(1..=1));
    r.handle();
    r.poller.start();

    r.at(10).await;
    assert_eq!(r.handler.ids(), ["c1"]);
    assert_eq!(
        r.poller.status().last_error.as_deref(),
        Some("group b: HTTP 429: slow down")
    );
    r.at(1010).await;
    assert_eq!(r.handler.ids(), ["c1", "d1"]);
    assert_eq!(
        r.poller.status().last_error.as_deref(),
        Some("group a: invalid response: bad json")
    );
    r.at(2010).await;
    assert_eq!(
        r.poller.status().last_error.as_deref(),
        Some("group a: request timed out")
    );
    r.at(3010).await;
    assert_eq!(r.handler.ids(), ["c1", "d1", "a1", "b1"]);

    assert_eq!(r.direct.poll_times(), [0, 1000, 2000, 3000]);
    assert_eq!(r.groups.request_times("a"), [0, 1000, 2000, 3000]);
    assert_eq!(
        r.groups.request_times("b"),
        [0, 3000],
        "skipped until Retry-After passed"
    );
    assert_eq!(r.groups.request_times("c"), [0, 1000, 2000, 3000]);
    assert_eq!(r.poller.status().polls, 4);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_direct_track_waits_while_groups_go_on() {
    let r = Rig::new(&["g"]);
    r.direct
        .with(|s| s.script.push_back(Err(rate_limited(ms(2500)))));
    r.direct.push(dms(1..=1));
    r.handle();
    r.poller.start();
    r.at(4500).await;
    assert_eq!(r.direct.poll_times(), [0, 3000, 4000]);
    assert_eq!(r.groups.request_times("g"), [0, 1000, 2000, 3000, 4000]);
    assert_eq!(r.handler.calls()[0].0, 3000);
}

#[tokio::test(start_paused = true)]
async fn malformed_rows_are_counted_once_and_skipped() {
    let r = Rig::new(&["g"]);
    let direct_rows = vec![
        json!({"id": "d1", "content": "ok", "createdAt": stamp(1)}),
        json!({"content": "no id"}),
    ];
    r.direct.with(|s| {
        s.script.push_back(Ok(Page::from_rows(direct_rows, |v| {
            message::from_rest_row(v, None)
        })))
    });
    r.groups.add(
        "g",
        vec![
            row("g1", "bob", "@alice fine", 1),
            json!({"id": "g2", "content": 5}),
            row("g3", "bob", "@alice also fine", 3),
        ],
    );
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), ["d1", "g1", "g3"]);
    assert_eq!(r.poller.status().malformed, 2);
    r.at(3010).await;
    assert_eq!(
        r.poller.status().malformed,
        2,
        "a row already read is not counted again"
    );
    assert_eq!(r.handler.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn rows_that_cannot_be_mapped_are_counted_once_acked_and_never_block_the_inbox() {
    let r = Rig::new(&[]);
    // A full page of rows that cannot be mapped (ids, wrong content types), and one without
    // any usable id, in front of a good message.
    let bad: Vec<Value> = (0..DIRECT_PAGE)
        .map(|i| json!({"id": format!("bad{i}"), "content": i, "createdAt": stamp(i)}))
        .collect();
    let page_of_bad = || Page::from_rows(bad.clone(), |v| message::from_rest_row(v, None));
    r.direct.with(|s| {
        s.script.push_back(Ok(page_of_bad()));
        s.script.push_back(Ok(Page::from_rows(
            vec![json!({"content": "no id"}), json!({"content": "no id"})],
            |v| message::from_rest_row(v, None),
        )));
    });
    r.direct.push(dms(100..=100));
    r.handle();
    r.poller.start();
    r.at(10).await;
    // The full page of bad rows made the next poll come at once, after their ack.
    assert_eq!(r.direct.poll_times()[..2], [0, 0]);
    let acked = r.direct.acked();
    assert_eq!(acked.len(), DIRECT_PAGE as usize);
    assert!(acked.iter().all(|id| id.starts_with("bad")));
    assert_eq!(r.poller.status().malformed, DIRECT_PAGE as u64 + 1);
    r.at(1010).await;
    assert_eq!(r.handler.ids(), ["d100"]);

    // Offered again (an ack the server lost): acked again, not counted again.
    r.direct.with(|s| s.script.push_back(Ok(page_of_bad())));
    r.at(3010).await;
    assert_eq!(r.poller.status().malformed, DIRECT_PAGE as u64 + 1);
    assert_eq!(r.direct.acked().len(), 2 * DIRECT_PAGE as usize + 1);
    assert_eq!(r.handler.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_page_too_large_to_read_is_asked_for_in_smaller_pages() {
    let r = Rig::new(&[]);
    let too_large = || Err(Error::TooLarge { limit: 32 });
    r.direct.with(|s| {
        s.script.push_back(too_large());
        s.script.push_back(too_large());
    });
    r.direct.push(dms(1..=3));
    r.handle();
    r.poller.start();
    r.at(10).await;
    let limits: Vec<u32> = r.direct.polls().iter().map(|p| p.limit).collect();
    assert_eq!(limits, [50, 25, 12], "halved, at once");
    assert_eq!(r.handler.ids(), ["d1", "d2", "d3"]);
    r.at(1010).await;
    assert_eq!(
        r.direct.polls()[3].limit,
        50,
        "back to full once a page was not full"
    );
}

#[tokio::test(start_paused = true)]
async fn handler_failures_are_counted_and_the_loop_goes_on() {
    let mut r = Rig::new(&["g"]);
    r.direct.push(dms(1..=3));
    r.groups.add("g", mention_rows("g", 1..=1));
    r.handle_with(Recorder::new().failing(&["d2", "g1"]));
    r.poller.start();
    r.at(10).await;
    let status = r.poller.status();
    assert_eq!((status.delivered, status.failed), (2, 2));
    assert_eq!(status.last_error.as_deref(), Some("handler: boom g1"));
    r.direct.push(dms(4..=4));
    r.at(1010).await;
    assert_eq!(r.handler.ids(), strings(&["d1", "d2", "d3", "g1", "d4"]));
    assert_eq!(r.poller.status().delivered, 3);
    assert_eq!(r.direct.acked(), names("d", 1..=4));
}

// ---------------------------------------------------------------------------------------
// Backpressure

#[tokio::test(start_paused = true)]
async fn a_slow_handler_bounds_what_is_pulled_and_everything_arrives_once() {
    let mut r = Rig::new(&["g"]);
    r.direct.push(dms(1..=3000));
    r.handle_with(Recorder::new().slow(ms(2)));
    r.poller.start();
    let mut most_outstanding = 0;
    while r.handler.count() < 3000 && r.t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(ms(7)).await;
        most_outstanding = most_outstanding.max(r.direct.served() - r.handler.count());
    }
    // The queue holds 4 batches; one more is being delivered and one is waiting to be queued.
    assert!(
        most_outstanding <= 6 * DIRECT_PAGE as usize,
        "{most_outstanding} pulled but not delivered"
    );
    assert!(most_outstanding >= DIRECT_PAGE as usize);
    assert_eq!(r.handler.ids(), names("d", 1..=3000));
    r.at(7500).await;
    assert_eq!(r.direct.acked(), names("d", 1..=3000));
    assert!(r.direct.pending_ids().is_empty());
    // Catching up the direct backlog does not re-poll the groups: they keep the interval
    // (a run may come late while the loop waits on the full queue, never early or extra).
    let group_times = r.groups.request_times("g");
    assert!((6..=8).contains(&group_times.len()), "{group_times:?}");
    for (i, pair) in group_times.windows(2).enumerate() {
        assert!(pair[0] >= i as u64 * 1000, "{group_times:?}");
        assert!(pair[1] - pair[0] >= 900, "{group_times:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The realtime path

#[tokio::test(start_paused = true)]
async fn offered_messages_share_dedup_and_wait_for_a_handler() {
    let r = Rig::new(&[]);
    assert!(
        !r.poller.offer(message_with("s0", "early", 1)).await,
        "not running"
    );
    assert_eq!(r.poller.status().seen_count, 0);

    r.poller.start();
    assert!(r.poller.offer(message_with("s1", "over sse", 1)).await);
    assert!(r.poller.offer(message_with("s1", "over sse", 1)).await);
    r.at(5000).await;
    assert_eq!(r.handler.count(), 0);
    assert!(r.direct.polls().is_empty());

    // The server still lists s1 for peek; the poll must not deliver it again.
    r.direct
        .push(vec![message_with("s1", "over sse", 1), dm(2)]);
    r.handle();
    r.at(5010).await;
    assert_eq!(r.handler.ids(), strings(&["s1", "d2"]));
    assert!(
        r.poller.offer(dm(2)).await,
        "a duplicate is accepted and dropped"
    );
    assert!(r.poller.offer(message_with("s3", "over sse", 3)).await);
    r.at(5020).await;
    assert_eq!(r.handler.ids(), strings(&["s1", "d2", "s3"]));
    assert_eq!(r.direct.acked(), ["d2"], "only polled messages are acked");

    r.poller.stop();
    assert!(!r.poller.offer(message_with("s4", "late", 4)).await);
}

#[tokio::test(start_paused = true)]
async fn realtime_slows_direct_polling_only_and_its_loss_polls_at_once() {
    let r = Rig::with_config(&["g"], |c| c.realtime_slowdown = 3);
    r.handle();
    r.poller.start();
    r.at(500).await;
    r.poller.set_realtime(true);
    assert!(r.poller.status().realtime);
    r.at(8500).await;
    r.poller.set_realtime(false);
    assert!(!r.poller.status().realtime);
    r.at(11_500).await;
    assert_eq!(r.direct.poll_times(), [0, 4000, 7000, 8500, 10_000, 11_000]);
    assert_eq!(
        r.groups.request_times("g"),
        (0..=11).map(|s| s * 1000).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn poll_now_polls_direct_messages_at_once_without_an_extra_group_poll() {
    let r = Rig::new(&["g"]);
    r.handle();
    r.poller.start();
    r.at(300).await;
    r.direct.push(dms(1..=2));
    r.poller.poll_now();
    r.at(350).await;
    assert_eq!(r.direct.poll_times(), [0, 300]);
    assert_eq!(r.handler.ids(), strings(&["d1", "d2"]));
    // Groups keep their own schedule.
    assert_eq!(r.groups.request_times("g"), [0]);
    // ... and the direct schedule is not pushed back by the extra poll.
    r.at(1500).await;
    assert_eq!(r.groups.request_times("g"), [0, 1000]);
    assert_eq!(r.direct.poll_times(), [0, 300, 1000]);
    // A stopped poller ignores the request.
    r.poller.stop();
    r.poller.poll_now();
    r.at(3000).await;
    assert_eq!(r.direct.poll_times(), [0, 300, 1000]);
}

#[tokio::test(start_paused = true)]
async fn offered_messages_keep_their_order_whichever_way_they_are_handed_over() {
    let r = Rig::new(&[]);
    r.handle();
    r.poller.start();
    r.at(10).await;
    // Idle: handed over straight from the caller, and settled before offer() returns.
    assert!(r.poller.offer(message_with("s1", "first", 1)).await);
    assert_eq!(r.handler.ids(), strings(&["s1"]));
    // While a polled batch is queued or being delivered, offers queue behind it, in order.
    r.direct.push(dms(1..=3));
    r.poller.poll_now();
    let offers = async {
        for i in 2..=5 {
            assert!(
                r.poller
                    .offer(message_with(&format!("s{i}"), "next", i))
                    .await
            );
        }
    };
    tokio::join!(offers, r.at(50));
    r.at(100).await;
    let ids = r.handler.ids();
    let sse: Vec<&String> = ids.iter().filter(|id| id.starts_with('s')).collect();
    assert_eq!(sse, ["s1", "s2", "s3", "s4", "s5"]);
    assert_eq!(ids.len(), 8);
    assert_eq!(r.poller.status().delivered, 8);
}

#[tokio::test(start_paused = true)]
async fn batches_dropped_by_a_stop_do_not_keep_a_restarted_poller_off_the_short_way() {
    let mut r = Rig::new(&[]);
    r.handle_with_delay();
    r.direct.push(dms(1..=3));
    r.poller.start();
    // The first page is being handled (10 ms a message) when stop() drops it.
    r.at(5).await;
    r.poller.stop();
    r.poller.start();
    r.at(2000).await;
    assert!(
        r.handler.ids().contains(&"d3".to_owned()),
        "the page, polled again, handled"
    );
    // Idle again: an offered message is handed over before offer() returns.
    assert!(r.poller.offer(message_with("s1", "over sse", 1)).await);
    assert!(
        r.handler.ids().contains(&"s1".to_owned()),
        "the short way, as before the stop"
    );
}

// ---------------------------------------------------------------------------------------
// The real server's awkward facts (WIRE.md): whole-second ties, fan-out copies

#[tokio::test(start_paused = true)]
async fn a_new_row_listed_after_rows_already_read_is_still_new() {
    // The listing orders by whole-second `createdAt` with no tiebreak: a mention posted in
    // the same second as rows already read can come back listed below them.
    let r = Rig::new(&["g"]);
    r.groups.add("g", mention_rows("g", 1..=3));
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.ids(), names("g", 1..=3));
    r.groups.with(|s| {
        let rows = s.rows.get_mut("g").unwrap();
        // Stored oldest first, answered newest first: index 1 lands below g3 and g2.
        rows.insert(1, row("late", "bob", "@alice late", 3));
    });
    r.at(1010).await;
    assert_eq!(
        r.handler.ids(),
        strings(&["g1", "g2", "g3", "late"]),
        "the tied row is new wherever it is listed"
    );
    r.at(2010).await;
    assert_eq!(r.handler.count(), 4, "and delivered once");
}

/// One copy of a group message as SignalDock stores it: own id, shared `groupId`.
fn copy(id: &str, group_id: &str, content: &str, i: u32) -> Value {
    json!({ "id": id, "groupId": group_id, "conversationId": "g", "fromAgentId": "bob",
        "toAgentId": "alice", "content": content, "createdAt": stamp(i) })
}

#[tokio::test(start_paused = true)]
async fn a_group_message_is_one_call_whether_peeked_listed_or_streamed() {
    let r = Rig::new(&["g"]);
    // The listing shows the smallest id of the copies; alice's own copy (c-alice) comes by
    // peek. One message, one handler call, and alice's copy is acked all the same.
    r.groups
        .add("g", vec![copy("c-aaa", "grp-1", "@alice one", 1)]);
    let peeked = message::from_rest_row(&copy("c-alice", "grp-1", "@alice one", 1), None).unwrap();
    r.direct.push(vec![peeked]);
    r.handle();
    r.poller.start();
    r.at(1010).await;
    assert_eq!(r.handler.ids(), strings(&["c-alice"]));
    assert!(r.direct.acked().contains(&"c-alice".to_string()));
    assert!(r.direct.pending_ids().is_empty());

    // The real stream frame carries no groupId: its copy pairs with the listing row by what
    // the copies share, in either order.
    let streamed = message_with("c-alice-2", "@alice two", 5);
    let streamed = ConduitMessage {
        thread_id: Some("g".into()),
        ..streamed
    };
    assert!(r.poller.offer(streamed).await);
    r.at(1100).await;
    r.groups
        .add("g", vec![copy("c-aab", "grp-2", "@alice two", 5)]);
    r.at(2010).await;
    assert_eq!(r.handler.ids(), strings(&["c-alice", "c-alice-2"]));
    r.groups
        .add("g", vec![copy("c-aac", "grp-3", "@alice three", 6)]);
    r.at(3010).await;
    let three = ConduitMessage {
        thread_id: Some("g".into()),
        ..message_with("c-alice-3", "@alice three", 6)
    };
    assert!(r.poller.offer(three).await);
    r.at(3100).await;
    assert_eq!(
        r.handler.ids(),
        strings(&["c-alice", "c-alice-2", "c-aac"]),
        "listed first, streamed second: still one call"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backlog_inside_one_second_drains_without_waiting_an_interval() {
    // Whole-second timestamps: `since` cannot page inside one second (the server keeps rows
    // created strictly after it), so only acks move the window. A full page must lead to
    // the next one as soon as its acks are in, not an interval later.
    let mut r = Rig::with_config(&[], |c| c.poll_interval = Duration::from_secs(60));
    r.direct.push(
        (0..180)
            .map(|i| message_with(&format!("s{i}"), "same second", 7))
            .collect(),
    );
    r.handle_with_delay();
    r.poller.start();
    r.at(5_000).await;
    assert_eq!(
        r.handler.count(),
        180,
        "all drained long before the 60 s interval"
    );
    assert!(r.direct.pending_ids().is_empty());
    let ids = r.handler.ids();
    assert_eq!(ids.first().map(String::as_str), Some("s0"));
    assert_eq!(ids.last().map(String::as_str), Some("s179"));
}

#[tokio::test(start_paused = true)]
async fn rows_cut_off_a_page_inside_one_second_are_read_before_newer_rows_bury_them() {
    // Page of 5. Mentions keep landing in second 20 after the first read; the listing may
    // show the rows already read first and cut the new ones off (no tiebreak). A page that
    // shows a known row proves nothing about the rows of its oldest second that it cut off.
    let r = Rig::with_config(&["g"], |c| c.group_poll_limit = 5);
    r.groups.add("g", mention_rows("h", 1..=2));
    r.groups.add(
        "g",
        (1..=3)
            .map(|i| row(&format!("t{i}"), "bob", &format!("@alice t{i}"), 20))
            .collect(),
    );
    r.handle();
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.handler.count(), 5);
    // Stored oldest first, answered newest first: t4..t10 go below t1..t3 (same second).
    r.groups.with(|s| {
        let rows = s.rows.get_mut("g").unwrap();
        for i in (4..=10).rev() {
            rows.insert(2, row(&format!("t{i}"), "bob", &format!("@alice t{i}"), 20));
        }
    });
    r.at(1010).await;
    r.groups.add("g", vec![row("n21", "bob", "@alice n21", 21)]);
    r.at(4010).await;
    let mut got = r.handler.ids();
    got.sort();
    let mut want: Vec<String> = names("h", 1..=2);
    want.extend(names("t", 1..=10));
    want.push("n21".into());
    want.sort();
    assert_eq!(got, want, "every mention once, none buried");
}

// ---------------------------------------------------------------------------------------
// poll_now_and_wait: the clock-free hook

#[tokio::test(start_paused = true)]
async fn poll_now_and_wait_needs_a_running_poller_with_a_handler() {
    let r = Rig::new(&[]);
    assert_eq!(r.poller.poll_now_and_wait().await, Err(NotDone::NotRunning));
    r.poller.start();
    assert_eq!(r.poller.poll_now_and_wait().await, Err(NotDone::NoHandler));
    r.handle();
    assert_eq!(
        r.poller.poll_now_and_wait().await,
        Ok(PollReport::default())
    );
    r.poller.stop();
    assert_eq!(r.poller.poll_now_and_wait().await, Err(NotDone::NotRunning));
}

#[tokio::test(start_paused = true)]
async fn poll_now_and_wait_resolves_once_every_page_found_is_handled_and_acked() {
    let mut r = Rig::with_config(&["g"], |c| c.poll_interval = Duration::from_secs(3600));
    r.handle_with(Recorder::new().failing(&["d7"]));
    r.poller.start();
    r.at(10).await;
    assert_eq!(r.direct.poll_times(), [0]);
    // 120 direct messages (three pages) and two mentions, an hour before the next tick.
    r.at(1000).await;
    r.direct.push(dms(1..=120));
    r.groups.add("g", mention_rows("g", 1..=2));
    let report = r.poller.poll_now_and_wait().await.unwrap();
    assert_eq!(
        report,
        PollReport {
            handled: 121,
            failed: 1,
            errors: vec![],
        }
    );
    // Everything was handled and acked by the time it resolved, with no time passing.
    assert_eq!(since_millis(r.t0), 1000);
    assert_eq!(r.handler.count(), 122);
    assert_eq!(r.direct.acked().len(), 120);
    assert!(r.direct.pending_ids().is_empty());
    // Three pages at least (and polls after acks, which find nothing), all at once.
    let polls = r.direct.poll_times();
    assert!(polls.len() >= 4, "{polls:?}");
    assert!(
        polls[0] == 0 && polls[1..].iter().all(|&t| t == 1000),
        "{polls:?}"
    );
    assert_eq!(r.groups.request_times("g")[0], 0);
    assert!(r.groups.request_times("g")[1..].iter().all(|&t| t == 1000));
    // The schedule is left alone: the next cycle is an hour after the first.
    r.at(3_599_000).await;
    assert_eq!(r.direct.poll_times().len(), polls.len());
    r.at(3_600_010).await;
    assert_eq!(r.direct.poll_times().len(), polls.len() + 1);
}

#[tokio::test(start_paused = true)]
async fn poll_now_and_wait_reports_failed_tracks_and_a_stop() {
    let mut r = Rig::with_config(&["g"], |c| c.poll_interval = Duration::from_secs(3600));
    r.handle_with(Recorder::new().hanging_on(&["d2"]));
    r.poller.start();
    r.at(10).await;
    r.direct
        .with(|s| s.script.push_back(Err(server_error(503))));
    r.groups
        .fail("g", vec![rate_limited(Duration::from_secs(60))]);
    let report = r.poller.poll_now_and_wait().await.unwrap();
    assert_eq!(report.handled, 0);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    assert!(
        report.errors[0].starts_with("direct: "),
        "{:?}",
        report.errors
    );
    assert!(
        report.errors[1].starts_with("group g: "),
        "{:?}",
        report.errors
    );
    // The group now waits out its Retry-After, and says so.
    let report = r.poller.poll_now_and_wait().await.unwrap();
    assert_eq!(
        report.errors,
        ["group g: waiting out the server's Retry-After"]
    );
    // A handler that never settles: the caller learns of the stop instead of hanging.
    r.direct.push(dms(1..=3));
    let pending = r.poller.poll_now_and_wait();
    let stop = async {
        r.at(5000).await;
        assert_eq!(r.handler.ids(), strings(&["d1", "d2"]));
        r.poller.stop();
    };
    let (result, ()) = tokio::join!(pending, stop);
    assert_eq!(result, Err(NotDone::Stopped));
}

#[tokio::test(start_paused = true)]
async fn poll_now_and_wait_drains_a_page_of_ties_it_can_only_page_past_once_acked() {
    // The real server keeps whole seconds, and `since` is strictly after: 60 messages of one
    // second cannot be paged past while the first 50 are unacked. A second round, after
    // those are handled and acked, finds the other 10.
    let mut r = Rig::with_config(&[], |c| c.poll_interval = Duration::from_secs(3600));
    r.handle_with(Recorder::new());
    r.poller.start();
    r.at(10).await;
    r.direct.push(
        (1..=60)
            .map(|i| message_with(&format!("t{i}"), "tie", 1))
            .collect(),
    );
    let report = r.poller.poll_now_and_wait().await.unwrap();
    assert_eq!(report.handled, 60);
    assert_eq!(r.handler.count(), 60);
    assert!(r.direct.pending_ids().is_empty());
}

// ---------------------------------------------------------------------------------------
// The journal (real files, real time: the journal writes on a thread of its own)

mod journaled {
    use super::*;
    use crate::core::journal::{Incoming, Recorded};

    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir =
                std::env::temp_dir().join(format!("cleo-poller-journal-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn config(&self) -> JournalConfig {
            JournalConfig::new(self.0.join("alice.db"), "alice")
        }

        fn open(&self) -> Arc<Journal> {
            // A journal a stopped poller is closing is waited for.
            Journal::open(self.config()).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn journaled_rig(
        scratch: &Scratch,
        groups: &[&str],
        limit: u32,
        feed: Option<Arc<Groups>>,
    ) -> Rig {
        let mut config = PollerConfig::new("alice");
        config.poll_interval = ms(50);
        config.group_poll_limit = limit;
        config.group_conversation_ids = strings(groups);
        let direct = Direct::new();
        let feed = feed.unwrap_or_else(Groups::new);
        let poller = Poller::new(config, direct.clone(), Some(feed.clone()))
            .with_journal(scratch.config(), Some(scratch.open()));
        Rig {
            poller,
            direct,
            groups: feed,
            handler: Recorder::new(),
            t0: Instant::now(),
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !condition() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(ms(5)).await;
        }
    }

    /// Each handler call's message id, with whether it came flagged as redelivered.
    fn calls_flagged(handler: &Recorder) -> Vec<(String, bool)> {
        handler
            .calls()
            .into_iter()
            .map(|(_, m)| (m.id.clone(), redelivered(&m)))
            .collect()
    }

    fn redelivered(m: &ConduitMessage) -> bool {
        m.metadata
            .as_ref()
            .and_then(|m| m.get("redelivered"))
            .and_then(Value::as_bool)
            == Some(true)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backlog_spills_to_the_journal_and_gives_each_entry_once_in_order() {
        use crate::core::journal::{Entry, State};
        let scratch = Scratch::new();
        let journal = scratch.open();
        let backlog = self::super::journal::Backlog::default();
        let record = |range: std::ops::Range<u32>| {
            let journal = journal.clone();
            async move {
                let items: Vec<Incoming> = range
                    .map(|i| Incoming {
                        source: Source::Stream,
                        message: message_with(&format!("s{i}"), "x", i),
                    })
                    .collect();
                let messages: Vec<ConduitMessage> =
                    items.iter().map(|i| i.message.clone()).collect();
                let recorded = journal.record(items, Vec::new(), false).await.unwrap();
                messages
                    .into_iter()
                    .zip(recorded)
                    .map(|(message, r)| match r {
                        Recorded::Pending(seq) => Entry {
                            seq,
                            source: Source::Stream,
                            state: State::Received,
                            message,
                        },
                        Recorded::Handled => unreachable!(),
                    })
                    .collect::<Vec<_>>()
            }
        };
        // Past memory at once, then more while it is being read.
        for entry in record(0..600).await {
            backlog.push(entry);
        }
        let mut got = Vec::new();
        while let Some(entry) = backlog.next(&journal).await {
            got.push(entry.message.id);
            if got.len() == 300 {
                for entry in record(600..700).await {
                    backlog.push(entry);
                }
            }
        }
        let want: Vec<String> = (0..700).map(|i| format!("s{i}")).collect();
        assert_eq!(got, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_journal_holds_comes_first_in_order_flagged_when_started() {
        let scratch = Scratch::new();
        {
            // A runtime that died: s1 handled, s2 in its handler, s3 and d4 not yet.
            let journal = scratch.open();
            let recorded = journal
                .record(
                    vec![
                        Incoming {
                            source: Source::Stream,
                            message: message_with("s1", "one", 1),
                        },
                        Incoming {
                            source: Source::Stream,
                            message: message_with("s2", "two", 2),
                        },
                        Incoming {
                            source: Source::Stream,
                            message: message_with("s3", "three", 3),
                        },
                        Incoming {
                            source: Source::Direct,
                            message: dm(4),
                        },
                    ],
                    Vec::new(),
                    false,
                )
                .await
                .unwrap();
            let seq = |i: usize| match recorded[i] {
                Recorded::Pending(seq) => seq,
                Recorded::Handled => unreachable!(),
            };
            journal.start(vec![seq(0), seq(1)]).await.unwrap();
            journal.settle(seq(0));
            journal.close();
        }
        let r = journaled_rig(&scratch, &[], 15, None);
        // The server still offers d4 (not acked) and has d5.
        r.direct.push(vec![dm(4), dm(5)]);
        r.handle();
        r.poller.start();
        until("four calls", || r.handler.count() >= 4).await;
        let calls = calls_flagged(&r.handler);
        assert_eq!(
            calls,
            vec![
                ("s2".to_owned(), true),
                ("s3".to_owned(), false),
                ("d4".to_owned(), false),
                ("d5".to_owned(), false),
            ]
        );
        until("d4 and d5 acked", || r.direct.pending_ids().is_empty()).await;
        r.poller.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_message_is_taken_without_waiting_and_a_stop_lets_the_call_in_flight_settle() {
        let scratch = Scratch::new();
        let mut r = journaled_rig(&scratch, &[], 15, None);
        r.handle_with(Recorder::new().slow(ms(150)));
        r.poller.start();
        until("the journal taken over", || {
            r.poller.shared.journaling.as_ref().unwrap().phase() == Phase::Live
        })
        .await;
        let taken = std::time::Instant::now();
        for i in 1..=5 {
            assert!(
                r.poller
                    .offer(message_with(&format!("s{i}"), "pushed", i))
                    .await
            );
        }
        // Five offers against a 150 ms handler: recorded, not waited for.
        assert!(
            taken.elapsed() < Duration::from_millis(500),
            "{:?}",
            taken.elapsed()
        );
        until("s2 called", || r.handler.count() >= 2).await;
        r.poller.stop();
        drop(r);

        // The next poller waits for the journal while s2 settles, then goes on from s3.
        let r = journaled_rig(&scratch, &[], 15, None);
        r.handle();
        r.poller.start();
        until("s3..s5", || r.handler.count() >= 3).await;
        let calls = calls_flagged(&r.handler);
        assert_eq!(
            calls,
            vec![
                ("s3".to_owned(), false),
                ("s4".to_owned(), false),
                ("s5".to_owned(), false)
            ]
        );
        r.poller.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journaled_page_still_holds_back_polls_to_a_source_that_ignores_since() {
        // The direct path's peek semantics with a journal: a page recorded in the journal is
        // unacked as much as one without, so no poll lands while it is handled or acked.
        let scratch = Scratch::new();
        let mut r = journaled_rig(&scratch, &[], 15, None);
        r.direct.with(|s| {
            s.ignores_since = true;
            s.ack_delay = ms(15);
        });
        r.direct.push(dms(1..=200));
        r.handle_with(Recorder::new().slow(ms(1)));
        r.poller.start();
        until("200 acked", || r.direct.acked().len() >= 200).await;
        assert_eq!(r.handler.ids(), names("d", 1..=200), "each once, in order");
        let (repeats, during_ack, with_since) = r.direct.with(|s| {
            (
                s.repeats,
                s.polls_during_ack,
                s.polls.iter().filter(|p| p.since.is_some()).count(),
            )
        });
        assert!(with_since <= 1, "{with_since} polls read ahead");
        assert!(repeats <= 50, "{repeats} repeats");
        assert_eq!(during_ack, 0, "no poll while an ack is under way");
        r.poller.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_conversation_goes_on_from_its_stored_position_past_a_page() {
        let scratch = Scratch::new();
        let r = journaled_rig(&scratch, &["g"], 5, None);
        r.groups.add("g", mention_rows("g", 1..=3));
        r.handle();
        r.poller.start();
        until("the first mentions", || r.handler.count() >= 3).await;
        r.poller.stop();
        let groups = r.groups.clone();
        drop(r);
        // Posted while nothing ran: more than two pages of 5.
        groups.add("g", mention_rows("g", 4..=16));

        let r = journaled_rig(&scratch, &["g"], 5, Some(groups));
        r.handle();
        r.poller.start();
        until("13 new mentions", || r.handler.count() >= 13).await;
        tokio::time::sleep(ms(200)).await;
        assert_eq!(r.handler.ids(), names("g", 4..=16));
        r.poller.stop();
    }
}
