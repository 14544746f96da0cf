//! The poller's side of the journal ([`crate::core::journal`]): what it records, when, and
//! the stream backlog the journal holds.
//!
//! With a journal, the poller:
//! - on start, takes over what the journal holds: unhandled messages are handed over first,
//!   in order (one whose handler had started is flagged `metadata.redelivered`), before the
//!   first poll; the dedup window is seeded with the keys handled recently; each group
//!   conversation resumes from its stored read position;
//! - records a direct page's new messages, and a group read's mentions together with the
//!   conversation's new position, before queueing them;
//! - takes a message the stream pushed by recording it and returning: the stream reader
//!   never waits for the handler. Pushed messages wait in the journal ([`Backlog`] keeps
//!   the next few in memory and reads the rest back), so a slow handler no longer parks
//!   them in socket buffers where a crash destroys them;
//! - marks a batch started just before its handler call (durably), and each message handled
//!   as its call settles. A message from the stream backlog is handed over alone, so a crash
//!   flags exactly the one in flight; a page (direct, group) is marked as one, so a crash
//!   flags the unhandled rest of the page in flight (the handler sees a flag on messages it
//!   may not have seen: it is "possibly seen", never "not seen" when it was);
//! - on stop, lets the handler call in flight settle (up to [`CLOSE_GRACE`]) so it is
//!   marked handled, then closes the journal for the next runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Batch, Shared, deliver_batch, deliver_detached};
use crate::core::journal::{
    Entry, GroupUpdate, Incoming, Journal, JournalConfig, Recorded, Source, State,
};
use crate::core::message::ConduitMessage;
use crate::core::sync::lock;

/// Backlog entries kept in memory; the rest are read back from the journal when due.
pub(super) const IN_MEMORY: usize = 256;
/// How long a stopped poller waits for its handler call in flight before closing the
/// journal (the call is then offered again, flagged, to the next runtime).
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Where a starting poller is in taking over the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading the journal: a pushed message is recorded and left there (it comes after).
    Loading,
    /// Handing over what the journal held: pushed messages queue behind it.
    Draining,
    /// Done: polling runs, and a pushed message may take the short way.
    Live,
}

/// A batch's messages in the journal: their `seq` by message id.
pub(super) struct Journaled {
    pub journal: Arc<Journal>,
    pub seqs: HashMap<String, i64>,
    /// Already marked started (recorded so, or started before a crash).
    pub started: bool,
}

/// The journal's share of the poller's state.
pub(super) struct JournalState {
    pub config: JournalConfig,
    /// Open while the poller runs (and, after a stop, until the call in flight settles).
    pub journal: std::sync::Mutex<Option<Arc<Journal>>>,
    pub backlog: Backlog,
    pub phase: tokio::sync::watch::Sender<Phase>,
    /// Group read positions recovered at start, for the poll loop to take.
    pub groups: std::sync::Mutex<Option<HashMap<String, crate::core::journal::GroupPosition>>>,
}

impl JournalState {
    pub fn new(config: JournalConfig, journal: Option<Arc<Journal>>) -> Self {
        Self {
            config,
            journal: std::sync::Mutex::new(journal),
            backlog: Backlog::default(),
            phase: tokio::sync::watch::channel(Phase::Loading).0,
            groups: std::sync::Mutex::new(None),
        }
    }

    pub fn current(&self) -> Option<Arc<Journal>> {
        lock(&self.journal).clone()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }
}

/// The stream backlog: entries in `seq` order, the first [`IN_MEMORY`] of them in memory.
#[derive(Default)]
pub(super) struct Backlog {
    state: std::sync::Mutex<BacklogState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct BacklogState {
    memory: VecDeque<Entry>,
    /// Some entries are only in the journal: read them back when memory runs dry.
    spilled: bool,
    /// The last `seq` taken: entries up to it are not taken again.
    last_taken: i64,
    /// The journal's top `seq` when it was taken over: its direct and group entries up to
    /// it are part of the backlog too.
    boot_max: i64,
}

impl Backlog {
    fn reset(&self, boot_max: i64) {
        *lock(&self.state) = BacklogState {
            boot_max,
            ..BacklogState::default()
        };
    }

    pub(super) fn push(&self, entry: Entry) {
        {
            let mut state = lock(&self.state);
            if state.spilled || state.memory.len() >= IN_MEMORY {
                state.spilled = true;
            } else {
                state.memory.push_back(entry);
            }
        }
        self.ready.notify_one();
    }

    /// An entry recorded while the backlog could not take it in memory.
    pub fn spill(&self) {
        lock(&self.state).spilled = true;
        self.ready.notify_one();
    }

    pub fn is_empty(&self) -> bool {
        let state = lock(&self.state);
        state.memory.is_empty() && !state.spilled
    }

    /// An entry handed over the short way: never read back from the journal.
    fn taken(&self, seq: i64) {
        let mut state = lock(&self.state);
        state.last_taken = state.last_taken.max(seq);
    }

    fn last_taken(&self) -> i64 {
        lock(&self.state).last_taken
    }

    /// The next entry, reading the journal when memory ran dry; `None` when there is none.
    pub(super) async fn next(&self, journal: &Journal) -> Option<Entry> {
        loop {
            let (after, boot_max) = {
                let mut state = lock(&self.state);
                while let Some(entry) = state.memory.pop_front() {
                    if entry.seq > state.last_taken {
                        state.last_taken = entry.seq;
                        return Some(entry);
                    }
                }
                if !state.spilled {
                    return None;
                }
                // Cleared before reading: what is recorded from now on is either in the
                // answer or pushed to memory (or spills again), never in neither.
                state.spilled = false;
                (state.last_taken, state.boot_max)
            };
            let read = match journal.unhandled_after(after, boot_max, IN_MEMORY).await {
                Ok(read) => read,
                Err(err) => {
                    // Still in the file: the next runtime offers them.
                    tracing::error!(error = %err, "cannot read the journal's backlog; it is offered again on the next start");
                    return None;
                }
            };
            let mut state = lock(&self.state);
            let full = read.len() >= IN_MEMORY;
            let mut merged: BTreeMap<i64, Entry> = read.into_iter().map(|e| (e.seq, e)).collect();
            for entry in state.memory.drain(..) {
                merged.entry(entry.seq).or_insert(entry);
            }
            let last_taken = state.last_taken;
            let mut memory: VecDeque<Entry> = merged
                .into_values()
                .filter(|e| e.seq > last_taken)
                .collect();
            if memory.len() > IN_MEMORY {
                memory.truncate(IN_MEMORY);
                state.spilled = true;
            }
            state.spilled |= full;
            state.memory = memory;
        }
    }
}

impl Shared {
    pub(super) fn journal(&self) -> Option<Arc<Journal>> {
        self.journaling.as_ref().and_then(JournalState::current)
    }
}

/// Records a batch about to be queued (a direct page's new messages, a group read's
/// mentions and the conversations' new positions). Messages the journal knows as handled
/// are left out (owed an ack again when the batch is acked). Without a journal, or when
/// writing fails (logged), the batch goes on as it would without one.
pub(super) async fn record_batch(
    shared: &Shared,
    mut batch: Batch,
    source: Source,
    groups: Vec<GroupUpdate>,
) -> Batch {
    let Some(journal) = shared.journal() else {
        return batch;
    };
    if batch.messages.is_empty() && groups.is_empty() {
        return batch;
    }
    if !batch.messages.is_empty() {
        journal.wait_for_room().await;
    }
    let items: Vec<Incoming> = batch
        .messages
        .iter()
        .map(|message| Incoming {
            source,
            message: message.clone(),
        })
        .collect();
    match journal.record(items, groups, false).await {
        Ok(recorded) => {
            let messages = std::mem::take(&mut batch.messages);
            let mut seqs = HashMap::new();
            let mut kept = Vec::with_capacity(messages.len());
            let mut again = Vec::new();
            for (message, recorded) in messages.into_iter().zip(recorded) {
                match recorded {
                    Recorded::Pending(seq) => {
                        seqs.insert(message.id.clone(), seq);
                        kept.push(message);
                    }
                    Recorded::Handled => {
                        shared.settle(message.dedup_key());
                        again.push(message.id);
                    }
                }
            }
            if batch.ack {
                shared.owe_acks(again);
            }
            // The rest of the batch (its place in the count of unacked pages) goes on.
            Batch {
                messages: kept,
                journal: Some(Journaled {
                    journal,
                    seqs,
                    started: false,
                }),
                ..batch
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot record messages in the journal; delivering them without it");
            batch
        }
    }
}

/// A message the stream pushed, with a journal: recorded, then handed over the short way
/// when nothing else is waiting, else left in the backlog. Resolves once it is recorded,
/// not once it is handled. The message back when the journal failed: the caller takes the
/// way without it.
pub(super) async fn offer(
    shared: &Arc<Shared>,
    journaling: &JournalState,
    journal: Arc<Journal>,
    message: ConduitMessage,
) -> Result<bool, ConduitMessage> {
    let key = message.dedup_key().to_owned();
    let Some(message) = shared.fresh(vec![message]).pop() else {
        return Ok(true);
    };
    journal.wait_for_room().await;
    let phase = journaling.phase();
    let token = lock(&shared.delivery_token).clone();
    // The short way: live, nothing waiting, nobody delivering. The message is recorded as
    // started (one write) and handed over from a task of its own, so this returns at once.
    let short = match (shared.handler(), token) {
        (Some(handler), Some(token))
            if phase == Phase::Live
                && journaling.backlog.is_empty()
                && shared.in_queue.load(std::sync::atomic::Ordering::Acquire) == 0 =>
        {
            shared
                .delivering
                .clone()
                .try_lock_owned()
                .ok()
                .map(|turn| (handler, token, turn))
        }
        _ => None,
    };
    let items = vec![Incoming {
        source: Source::Stream,
        message: message.clone(),
    }];
    let recorded = match journal.record(items, Vec::new(), short.is_some()).await {
        Ok(recorded) => recorded,
        Err(err) => {
            tracing::error!(error = %err, "cannot record a pushed message in the journal; delivering it without it");
            lock(&shared.queued).remove(&key);
            return Err(message);
        }
    };
    match recorded.first() {
        Some(Recorded::Pending(seq)) => {
            let seq = *seq;
            match short {
                Some((handler, token, turn)) => {
                    journaling.backlog.taken(seq);
                    let batch = Batch {
                        journal: Some(Journaled {
                            journal,
                            seqs: HashMap::from([(message.id.clone(), seq)]),
                            started: true,
                        }),
                        ..Batch::of(vec![message], false)
                    };
                    let shared = shared.clone();
                    tokio::spawn(
                        async move {
                            let _turn = turn;
                            deliver_batch(&shared, handler, batch, token).await;
                        }
                        .in_current_span(),
                    );
                }
                None if phase == Phase::Loading => journaling.backlog.spill(),
                None => journaling.backlog.push(Entry {
                    seq,
                    source: Source::Stream,
                    state: State::Received,
                    message,
                }),
            }
        }
        // Handled by an earlier runtime.
        _ => shared.settle(&key),
    }
    Ok(true)
}

/// The backlog loop, run while a poller with a journal is started: takes the journal over
/// (reopening it after a stop), hands over what it held, then the stream backlog, one
/// message at a time.
pub(super) async fn backlog_loop(shared: Arc<Shared>, token: CancellationToken) {
    let Some(journaling) = shared.journaling.as_ref() else {
        return;
    };
    let journal = match journaling.current() {
        Some(journal) => journal,
        None => {
            let opened = tokio::select! {
                _ = token.cancelled() => return,
                opened = Journal::open_async(journaling.config.clone()) => opened,
            };
            match opened {
                Ok(journal) => {
                    *lock(&journaling.journal) = Some(journal.clone());
                    journal
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot reopen the journal; running without it");
                    journaling.set_phase(Phase::Live);
                    return;
                }
            }
        }
    };
    let recover_upto = match journal.recover().await {
        Ok(recovered) => {
            {
                let mut seen = lock(&shared.seen);
                for key in &recovered.handled {
                    seen.insert(key);
                }
            }
            *lock(&journaling.groups) = Some(recovered.groups);
            journaling.backlog.reset(recovered.max_seq);
            let upto = recovered.unhandled.last().map_or(0, |e| e.seq);
            if !recovered.unhandled.is_empty() {
                tracing::info!(
                    count = recovered.unhandled.len(),
                    "offering what the journal holds unhandled first"
                );
            }
            {
                let mut queued = lock(&shared.queued);
                for entry in &recovered.unhandled {
                    queued.insert(entry.message.dedup_key().to_owned());
                }
            }
            for entry in recovered.unhandled {
                journaling.backlog.push(entry);
            }
            upto
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot read the journal; starting without what it holds");
            0
        }
    };
    journaling.set_phase(Phase::Draining);
    loop {
        if journaling.phase() == Phase::Draining && journaling.backlog.last_taken() >= recover_upto
        {
            journaling.set_phase(Phase::Live);
        }
        let ready = journaling.backlog.ready.notified();
        let Some(entry) = journaling.backlog.next(&journal).await else {
            if journaling.phase() == Phase::Draining {
                journaling.set_phase(Phase::Live);
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = ready => continue,
            }
        };
        let Some(handler) = shared.wait_for_handler(&token).await else {
            return;
        };
        let turn = tokio::select! {
            _ = token.cancelled() => return,
            turn = shared.delivering.clone().lock_owned() => turn,
        };
        let started = entry.state == State::Started;
        let ack = entry.source.acked();
        let seq = entry.seq;
        let message = entry.into_offered();
        let batch = Batch {
            journal: Some(Journaled {
                journal: journal.clone(),
                seqs: HashMap::from([(message.id.clone(), seq)]),
                started,
            }),
            ..Batch::of(vec![message], ack)
        };
        // Aborted on stop: the handler call goes on in its task and is marked when it settles.
        deliver_detached(&shared, handler, batch, token.clone(), turn).await;
    }
}

/// A stopped poller's journal: closed once the handler call in flight settled (so it is
/// marked handled), or after [`CLOSE_GRACE`].
pub(super) fn close_after_stop(shared: &Shared, runtime: Option<tokio::runtime::Handle>) {
    let Some(journaling) = shared.journaling.as_ref() else {
        return;
    };
    journaling.set_phase(Phase::Loading);
    journaling.backlog.reset(0);
    let Some(journal) = lock(&journaling.journal).take() else {
        return;
    };
    journal.closing();
    let delivering = shared.delivering.clone();
    let close = async move {
        let _ = tokio::time::timeout(CLOSE_GRACE, delivering.lock()).await;
        journal.close();
    };
    match runtime {
        Some(runtime) => {
            runtime.spawn(close.in_current_span());
        }
        // No runtime to wait on: dropping the handle closes the journal now.
        None => drop(close),
    }
}
