//! The local journal: one small SQLite file per agent that makes delivery survive a stop, a
//! crash and a restart.
//!
//! What the server cannot do for us, the journal does. The server marks a pushed message
//! delivered the moment it writes it to the stream, and keeps no delivery state for group
//! conversations at all, so a message the runtime took and had not handled when it died was
//! gone. With the journal, every message the runtime takes responsibility for is written
//! here **before** the runtime considers it received, and marked handled once its handler
//! call settles. A new runtime offers what is still unhandled first, in order; a message
//! whose handler had started (marked [`State::Started`]) comes back flagged, so a handler
//! can be idempotent where it matters.
//!
//! The journal also keeps:
//! - the dedup state: the keys (`groupId ?? id`) of the messages handled most recently, so a
//!   restart does not hand over again what was handled (a peek offers an unacked message
//!   again; a fan-out copy can arrive by another path);
//! - each group conversation's read position (the poller's group track: newest second read,
//!   the floor of the first read, the listing rows already read), written in the same
//!   transaction as the mentions found by that read, so the two never disagree.
//!
//! **Off the JS thread.** The connection lives on a dedicated thread; callers send it work
//! over a channel and await the answer. The thread takes every request waiting in the
//! channel and commits them in one transaction (group commit), so a burst costs one write,
//! not one per message; a caller that finds the connection idle commits its own request on
//! its (tokio) thread instead, saving two thread hops on the realtime path. `synchronous =
//! NORMAL` in WAL mode: a commit is in the OS once `write()` returns, which is what
//! survives `kill -9` (not a power cut: that would take an `fsync` per commit, which costs
//! more than the messages it protects). Checkpoints run on the journal thread only.
//!
//! **What a message costs.** A batch (a page, a group read, one pushed message) is one
//! write to record, one small write to mark it started (the `seq`s go into one mark, see
//! [`Journal::start`]; a message recorded on its way to the handler is recorded started),
//! and its settles share one write: they wait in a buffer that every transaction drains
//! first, written at the end of the batch or [`SETTLE_DELAY`] after the first of them,
//! whichever comes first. What is marked started is written before the handler call; a
//! settle is not waited for, so a crash in the moment after a handler call settles (at most
//! [`SETTLE_DELAY`], and the commit) offers that message again, flagged.
//!
//! **One runtime per journal.** The file is opened in SQLite's exclusive locking mode, so a
//! second runtime on the same file, in this process or another, gets a clear
//! [`Error::Config`] instead of interleaving with the first. A journal being closed in this
//! process (its runtime was just stopped and its last handler call is settling) is waited
//! for, up to [`CLOSE_WAIT`]. The OS releases the lock of a killed process.
//!
//! **Bounded.** Unhandled payloads are capped at [`JournalConfig::cap_bytes`]. Past the cap
//! the journal warns loudly and [`Journal::wait_for_room`] makes writers wait until the
//! handler catches up: the backlog stays where it was (on the server, in the stream), it is
//! never dropped.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use super::clock;
use super::error::{Error, Result};
use super::message::ConduitMessage;
use super::sync::lock;

/// The directory under the CLI's state directory that holds the journals.
pub const DIR: &str = "runtime";
/// Handled keys kept for dedup across a restart: the size of the poller's dedup window.
pub const HANDLED_KEPT: usize = super::dedup::DEFAULT_CAPACITY;
/// Listing rows kept per group conversation (the poller remembers as many).
pub const GROUP_ROWS_KEPT: usize = 4000;
/// Unhandled payload bytes past which writers wait (and the journal warns).
pub const DEFAULT_CAP_BYTES: u64 = 64 * 1024 * 1024;
/// How long opening waits for a journal this process is closing.
pub const CLOSE_WAIT: Duration = Duration::from_secs(6);
/// How long opening retries a journal locked by another process (one that is exiting).
const BUSY_WAIT: Duration = Duration::from_millis(500);
/// Requests committed in one transaction at most.
const GROUP_COMMIT: usize = 512;
/// Settles between two prunings of old handled rows.
/// Pruned in few big steps on the journal thread: the fixed part of a prune (finding where
/// to cut, walking the kept rows) and the free-page churn it leaves for the next inserts
/// cost less per message that way (measured: a page of 50 recorded, started and settled
/// went from about 380 to 250 µs going from 1024 to 8192). A step holds the connection for
/// a few milliseconds, once every few thousand messages.
const PRUNE_EVERY: u64 = 4096;
/// How long settles wait for more before the journal thread writes them, when no batch end
/// and no other write comes first: the handler calls of a batch return one after another,
/// and one transaction for all of them costs what one costs for each. A crash in this
/// window offers those messages again, flagged, as a crash just before a settle always did.
pub const SETTLE_DELAY: Duration = Duration::from_millis(1);
/// WAL frames past which the journal thread copies the log into the file (SQLite's own
/// default). Only that thread does: a checkpoint (two `fsync`s) inside a write made on the
/// realtime path would hold up the message that made it.
const CHECKPOINT_FRAMES: u32 = 1000;
/// The `meta` key of the started mark: the `seq`s whose handler call may have started,
/// as a JSON array (see [`Worker::in_flight`]).
const STARTED_KEY: &str = "started";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
  seq INTEGER PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  source TEXT NOT NULL,
  payload TEXT,
  bytes INTEGER NOT NULL,
  state INTEGER NOT NULL,
  received_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
  conversation TEXT PRIMARY KEY, newest_ms INTEGER, floor_ms INTEGER);
CREATE TABLE IF NOT EXISTS group_rows (
  n INTEGER PRIMARY KEY AUTOINCREMENT, conversation TEXT NOT NULL, key TEXT NOT NULL,
  UNIQUE (conversation, key));
";

/// Where a message came from. A direct message found by a peek is acked once handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Found by a peek (or a transport's `poll()`): stays pending on the server until acked.
    Direct,
    /// Pushed by the stream: the server already marked it delivered.
    Stream,
    /// Read from a group conversation's listing.
    Group,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Direct => "direct",
            Source::Stream => "stream",
            Source::Group => "group",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "direct" => Source::Direct,
            "group" => Source::Group,
            _ => Source::Stream,
        }
    }

    /// Whether the server wants an ack once the message is handled.
    pub fn acked(self) -> bool {
        self == Source::Direct
    }
}

/// A message's progress, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Taken, not yet handed to the handler.
    Received = 0,
    /// Its handler call may have started: offered again flagged `redelivered`.
    Started = 1,
    /// Its handler call settled.
    Handled = 2,
}

impl State {
    fn of(n: i64) -> Self {
        match n {
            0 => State::Received,
            1 => State::Started,
            _ => State::Handled,
        }
    }
}

/// What [`Journal::record`] made of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now, or recorded before and not yet handled: deliver it under this `seq`.
    Pending(i64),
    /// Handled before (by this runtime or an earlier one): not to be handed over again.
    Handled,
}

/// An unhandled message read back from the journal.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub seq: i64,
    pub source: Source,
    pub state: State,
    pub message: ConduitMessage,
}

impl Entry {
    /// The message as the handler gets it: one whose handler had started is flagged
    /// `metadata.redelivered = true`.
    pub fn into_offered(self) -> ConduitMessage {
        let mut message = self.message;
        if self.state == State::Started {
            message
                .metadata
                .get_or_insert_with(Default::default)
                .insert("redelivered".to_owned(), Value::Bool(true));
        }
        message
    }
}

/// A group conversation's read position (the poller's group track).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupPosition {
    pub newest_ms: Option<i64>,
    pub floor_ms: Option<i64>,
    /// Listing rows read, oldest first.
    pub known: Vec<String>,
}

/// A group read's new position: written with the mentions that read found.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupUpdate {
    pub conversation: String,
    pub newest_ms: Option<i64>,
    pub floor_ms: Option<i64>,
    /// Listing rows read for the first time, in any order.
    pub new_rows: Vec<String>,
}

/// What a starting runtime takes over from the journal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Unhandled messages, oldest first.
    pub unhandled: Vec<Entry>,
    /// Keys handled most recently, oldest first (at most [`HANDLED_KEPT`]).
    pub handled: Vec<String>,
    pub groups: HashMap<String, GroupPosition>,
    /// The highest `seq` in the file when it was read.
    pub max_seq: i64,
}

/// What the journal has written so far, for tests and profiling: its cost is counted in
/// transactions (each one a WAL append) and rows changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Transactions committed.
    pub commits: u64,
    /// Rows inserted, updated or deleted.
    pub rows: u64,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub path: PathBuf,
    pub agent_id: String,
    pub cap_bytes: u64,
}

impl JournalConfig {
    pub fn new(path: impl Into<PathBuf>, agent_id: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            agent_id: agent_id.into(),
            cap_bytes: DEFAULT_CAP_BYTES,
        }
    }
}

/// What the caller asked for: a path, off, or the default location.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JournalSetting {
    /// Under the CLI's state directory when there is one, else no journal.
    #[default]
    Default,
    Off,
    Path(PathBuf),
}

/// Where the journal of `agent_id` goes: the path given; else
/// `<CLEO_DIR>/runtime/<agentId>.db` when `CLEO_DIR` is set (relative to `cwd`), else
/// `<cwd>/.cleo/runtime/<agentId>.db` when `<cwd>/.cleo` is a directory; else none
/// (in-memory delivery state, as without a journal).
pub fn resolve(
    setting: &JournalSetting,
    agent_id: &str,
    cleo_dir: Option<&OsStr>,
    cwd: &Path,
) -> Option<PathBuf> {
    let dir = match setting {
        JournalSetting::Off => return None,
        JournalSetting::Path(path) => return Some(cwd.join(path)),
        JournalSetting::Default => match cleo_dir.filter(|dir| !dir.is_empty()) {
            Some(dir) => cwd.join(dir),
            None => {
                let dir = cwd.join(".cleo");
                if !dir.is_dir() {
                    return None;
                }
                dir
            }
        },
    };
    Some(dir.join(DIR).join(format!("{}.db", file_stem(agent_id))))
}

/// Opens the journal `setting` asks for (see [`resolve`]; `CLEO_DIR` and the working
/// directory are read here), or `None` for none. Errors name the file.
pub async fn open_for(
    setting: &JournalSetting,
    agent_id: &str,
) -> Result<Option<(JournalConfig, Arc<Journal>)>> {
    let cwd = std::env::current_dir().unwrap_or_default();
    let cleo_dir = std::env::var_os("CLEO_DIR");
    let Some(path) = resolve(setting, agent_id, cleo_dir.as_deref(), &cwd) else {
        return Ok(None);
    };
    let config = JournalConfig::new(path, agent_id);
    match Journal::open_async(config.clone()).await {
        Ok(journal) => Ok(Some((config, journal))),
        // The default location cannot be written (a read-only `.cleo`): the runtime runs as
        // it did before journals, and says so. A journal asked for by path, or one in use,
        // is an error.
        Err(Error::Storage(why)) if *setting == JournalSetting::Default => {
            tracing::warn!(error = %why, "cannot open the default journal; delivery state stays in memory (set `journal` to a path to keep it)");
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// An agent id as one file name: characters other than ASCII letters, digits, `-` and `_`
/// are percent-encoded, so `a/b`, `..` or a name with spaces stays one file in the
/// directory.
pub fn file_stem(agent_id: &str) -> String {
    let mut stem = String::with_capacity(agent_id.len());
    for byte in agent_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            stem.push(byte as char);
        } else {
            stem.push_str(&format!("%{byte:02X}"));
        }
    }
    if stem.is_empty() {
        stem.push_str("%00");
    }
    stem
}

/// One message to record.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub source: Source,
    pub message: ConduitMessage,
}

enum Op {
    Recover(oneshot::Sender<Result<Recovered>>),
    Record {
        items: Vec<Incoming>,
        groups: Vec<GroupUpdate>,
        started: bool,
        reply: oneshot::Sender<Result<Vec<Recorded>>>,
    },
    Start {
        seqs: Vec<i64>,
        reply: oneshot::Sender<Result<()>>,
    },
    Unstart(Vec<i64>),
    Unhandled {
        after: i64,
        boot_max: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Entry>>>,
    },
    Sync(oneshot::Sender<()>),
    /// Settles wait in [`Journal::settles`]: write them, after [`SETTLE_DELAY`] unless `now`.
    /// Not counted in [`Journal::pending`]: a settle is ordered by the buffer, which every
    /// transaction drains first, not by the channel.
    Wake {
        now: bool,
    },
    Close,
}

/// What the caller and the journal thread share.
struct Backlog {
    /// Bytes of unhandled payloads.
    bytes: AtomicU64,
    cap: u64,
    /// Settles wake writers waiting for room.
    room: Notify,
    /// Over the cap and warned about: warned again only after it fell below.
    warned: AtomicBool,
}

/// A journal open on its own thread. Cheap to share (`Arc`); closes when [`Journal::close`]
/// is called or the last handle is dropped.
pub struct Journal {
    ops: Mutex<Option<std_mpsc::Sender<Op>>>,
    /// Requests sent to the thread and not yet committed.
    pending: Arc<AtomicUsize>,
    /// Settled `seq`s not yet written. Every transaction, whoever commits it, writes them
    /// first: a settle is ordered before every request made after it without a message of
    /// its own on the channel (one per handler call woke the thread for a transaction each).
    settles: Arc<Mutex<Vec<i64>>>,
    /// The connection, shared with the thread: a caller that finds it free, with nothing
    /// pending, commits its own request at once instead of waking the thread (two thread
    /// hops less on the realtime path). Order is kept: only when nothing sent before is
    /// still uncommitted.
    worker: Arc<Mutex<Worker>>,
    path: PathBuf,
    backlog: Arc<Backlog>,
    /// This process's claim on the path.
    claim: Arc<Claim>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

/// This process's hold on one journal path: open, closing, or gone.
struct Claim {
    state: Mutex<ClaimState>,
    changed: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ClaimState {
    Open,
    Closing,
    Closed,
}

type Claims = Mutex<HashMap<PathBuf, Arc<Claim>>>;

fn claims() -> &'static Claims {
    static CLAIMS: OnceLock<Claims> = OnceLock::new();
    CLAIMS.get_or_init(Claims::default)
}

impl Claim {
    fn set(&self, state: ClaimState) {
        *lock(&self.state) = state;
        self.changed.notify_all();
    }
}

/// Takes this process's claim on `path`, waiting up to [`CLOSE_WAIT`] for a journal being
/// closed. A journal open in this process and not closing is another runtime's: an error.
fn claim(path: &Path) -> Result<Arc<Claim>> {
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let current = lock(claims()).get(path).cloned();
        let Some(current) = current else {
            let mine = Arc::new(Claim {
                state: Mutex::new(ClaimState::Open),
                changed: Condvar::new(),
            });
            let mut all = lock(claims());
            if all.contains_key(path) {
                continue;
            }
            all.insert(path.to_owned(), mine.clone());
            return Ok(mine);
        };
        let mut state = lock(&current.state);
        match *state {
            ClaimState::Open => return Err(in_use(path, "another runtime in this process")),
            ClaimState::Closed => {
                drop(state);
                let mut all = lock(claims());
                if all.get(path).is_some_and(|c| Arc::ptr_eq(c, &current)) {
                    all.remove(path);
                }
            }
            ClaimState::Closing => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(in_use(
                        path,
                        "a stopped runtime in this process still closing it",
                    ));
                }
                state = current
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                drop(state);
            }
        }
    }
}

fn in_use(path: &Path, by: &str) -> Error {
    Error::Config(format!(
        "the journal {} is in use by {by}: one journal serves one running runtime (stop the other, or set `journal` to another path or to false)",
        path.display()
    ))
}

fn storage(path: &Path, what: &str, err: impl std::fmt::Display) -> Error {
    Error::Storage(format!("journal {}: {what}: {err}", path.display()))
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

impl Journal {
    /// Opens (creating when missing) the journal at `config.path` and locks it for this
    /// runtime. Blocks for up to [`CLOSE_WAIT`]: call it off the JS thread (see
    /// [`Journal::open_async`]).
    pub fn open(config: JournalConfig) -> Result<Arc<Journal>> {
        let JournalConfig {
            path,
            agent_id,
            cap_bytes,
        } = config;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| storage(&path, "cannot create its directory", e))?;
        }
        // One name per file, whichever way the caller spelled it.
        let path = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => dir
                .canonicalize()
                .map(|dir| dir.join(name))
                .unwrap_or(path.clone()),
            _ => path,
        };
        let claim = claim(&path)?;
        let opened = open_locked(&path, &agent_id);
        let (conn, bytes, frames) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                claim.set(ClaimState::Closed);
                return Err(err);
            }
        };
        let backlog = Arc::new(Backlog {
            bytes: AtomicU64::new(bytes),
            cap: cap_bytes.max(1),
            room: Notify::new(),
            warned: AtomicBool::new(false),
        });
        let (tx, rx) = std_mpsc::channel();
        let settles = Arc::new(Mutex::new(Vec::new()));
        let worker = Arc::new(Mutex::new(Worker {
            conn: Some(conn),
            path: path.clone(),
            backlog: backlog.clone(),
            settles: settles.clone(),
            settled: 0,
            in_flight: HashMap::new(),
            frames,
            stats: JournalStats::default(),
        }));
        let pending = Arc::new(AtomicUsize::new(0));
        let (thread_worker, thread_pending) = (worker.clone(), pending.clone());
        let thread_claim = claim.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("cleo-journal".to_owned())
            .spawn(move || {
                let _in_span = span.enter();
                run(&thread_worker, &thread_pending, rx);
                thread_claim.set(ClaimState::Closed);
            })
            .map_err(|e| {
                claim.set(ClaimState::Closed);
                storage(&path, "cannot start its thread", e)
            })?;
        tracing::debug!(path = %path.display(), "journal open");
        Ok(Arc::new(Journal {
            ops: Mutex::new(Some(tx)),
            pending,
            settles,
            worker,
            path,
            backlog,
            claim,
        }))
    }

    /// [`Journal::open`] on tokio's blocking pool.
    pub async fn open_async(config: JournalConfig) -> Result<Arc<Journal>> {
        let path = config.path.clone();
        tokio::task::spawn_blocking(move || Journal::open(config))
            .await
            .map_err(|e| storage(&path, "opening failed", e))?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, op: Op) -> bool {
        match lock(&self.ops).as_ref() {
            Some(tx) => {
                self.pending.fetch_add(1, Ordering::AcqRel);
                let sent = tx.send(op).is_ok();
                if !sent {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
                sent
            }
            None => false,
        }
    }

    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let op = op(tx);
        // The short way: the connection is free and nothing sent before waits for it.
        let op = self.try_inline(op).err();
        if let Some(op) = op
            && !self.send(op)
        {
            return Err(self.closed());
        }
        rx.await.map_err(|_| self.closed())?
    }

    /// Commits `op` on the caller's thread when that keeps the order; else gives it back.
    fn try_inline(&self, op: Op) -> std::result::Result<(), Op> {
        if self.pending.load(Ordering::Acquire) != 0 || lock(&self.ops).is_none() {
            return Err(op);
        }
        let Ok(mut worker) = self.worker.try_lock() else {
            return Err(op);
        };
        // Checked again under the lock: the thread takes it before it commits what was sent.
        if self.pending.load(Ordering::Acquire) != 0 || worker.conn.is_none() {
            return Err(op);
        }
        worker.commit(vec![op]);
        let due = worker.upkeep_due();
        drop(worker);
        if due {
            self.wake(true);
        }
        Ok(())
    }

    fn closed(&self) -> Error {
        Error::Storage(format!("journal {} is closed", self.path.display()))
    }

    /// What a starting runtime takes over: unhandled messages, recently handled keys, group
    /// positions.
    pub async fn recover(&self) -> Result<Recovered> {
        self.ask(Op::Recover).await
    }

    /// Records `items` (and the group positions of the read that found them) in one
    /// transaction; resolves once it is written. `started`: their handler call is about to
    /// start (the realtime path's short way), saving a second write.
    pub async fn record(
        &self,
        items: Vec<Incoming>,
        groups: Vec<GroupUpdate>,
        started: bool,
    ) -> Result<Vec<Recorded>> {
        self.ask(|reply| Op::Record {
            items,
            groups,
            started,
            reply,
        })
        .await
    }

    /// Marks messages whose handler call is about to start; resolves once written, so a
    /// crash from then on offers them again flagged. One small write whatever the batch's
    /// size: the `seq`s go into one mark, not into each message's row.
    pub async fn start(&self, seqs: Vec<i64>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.ask(|reply| Op::Start { seqs, reply }).await
    }

    /// Marks a message handled (its handler call settled). Does not wait: the write is
    /// ordered before every later request, including the next [`Journal::start`], and made
    /// at the latest [`SETTLE_DELAY`] after the first settle not yet written (at once after
    /// [`Journal::flush`]).
    pub fn settle(&self, seq: i64) {
        let first = {
            let mut settles = lock(&self.settles);
            settles.push(seq);
            settles.len() == 1
        };
        if first {
            self.wake(false);
        }
    }

    /// [`Journal::settle`] for the last message of a batch, with [`Journal::flush`] to come
    /// right after: the thread is woken once, by the flush.
    pub fn settle_before_flush(&self, seq: i64) {
        lock(&self.settles).push(seq);
    }

    /// The end of a handler call's batch: its settles are written now, by the journal
    /// thread, rather than after [`SETTLE_DELAY`].
    pub fn flush(&self) {
        if !lock(&self.settles).is_empty() {
            self.wake(true);
        }
    }

    fn wake(&self, now: bool) {
        if let Some(tx) = lock(&self.ops).as_ref() {
            let _ = tx.send(Op::Wake { now });
        }
    }

    /// Takes back [`Journal::start`] for messages the handler was never called with (the
    /// runtime stopped first): offered again unflagged. Does not wait, like `settle`.
    pub fn unstart(&self, seqs: Vec<i64>) {
        if !seqs.is_empty() {
            self.send(Op::Unstart(seqs));
        }
    }

    /// Unhandled messages with `seq > after` that the stream brought, or that were in the
    /// file when it was opened (`seq <= boot_max`), oldest first.
    pub async fn unhandled_after(
        &self,
        after: i64,
        boot_max: i64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.ask(|reply| Op::Unhandled {
            after,
            boot_max,
            limit,
            reply,
        })
        .await
    }

    /// Resolves once every request sent before has been written.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Sync(tx)) {
            let _ = rx.await;
        }
    }

    /// What has been written so far.
    pub fn stats(&self) -> JournalStats {
        lock(&self.worker).stats
    }

    /// Bytes of unhandled payloads.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog.bytes.load(Ordering::Relaxed)
    }

    /// Waits while the unhandled backlog is over the cap, warning once each time it gets
    /// there. Nothing is dropped: the writer (a stream reader, a poll) just waits, leaving
    /// the rest where it is.
    pub async fn wait_for_room(&self) {
        loop {
            let room = self.backlog.room.notified();
            let bytes = self.backlog.bytes.load(Ordering::Relaxed);
            if bytes < self.backlog.cap || !self.is_open() {
                return;
            }
            if !self.backlog.warned.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    path = %self.path.display(),
                    bytes,
                    cap = self.backlog.cap,
                    "the journal's unhandled backlog reached its cap: the handler is not keeping up; taking no more messages until it catches up (nothing is dropped)"
                );
            }
            room.await;
        }
    }

    fn is_open(&self) -> bool {
        lock(&self.ops).is_some()
    }

    /// Says this process is closing the journal: a runtime opening it now waits for
    /// [`Journal::close`] instead of failing.
    pub fn closing(&self) {
        let mut state = lock(&self.claim.state);
        if *state == ClaimState::Open {
            *state = ClaimState::Closing;
        }
    }

    /// Closes the journal once the requests already sent are written; later ones fail.
    pub fn close(&self) {
        self.closing();
        if let Some(tx) = lock(&self.ops).take() {
            let _ = tx.send(Op::Close);
        }
        self.backlog.room.notify_waiters();
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// Opens the file in exclusive locking mode and takes the lock, retrying briefly while
/// another process holds it. Returns the connection and the unhandled bytes.
fn open_locked(path: &Path, agent_id: &str) -> Result<Opened> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match try_open(path, agent_id) {
            Ok(opened) => return Ok(opened),
            Err(OpenError::Busy) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(OpenError::Busy) => return Err(in_use(path, "another process")),
            Err(OpenError::Failed(err)) => return Err(err),
        }
    }
}

enum OpenError {
    Busy,
    Failed(Error),
}

/// An open connection, the unhandled bytes, and the WAL's frame count as SQLite reports it.
type Opened = (Connection, u64, Arc<AtomicU32>);

fn try_open(path: &Path, agent_id: &str) -> std::result::Result<Opened, OpenError> {
    let sql = |what: &'static str| {
        move |err: rusqlite::Error| {
            if is_busy(&err) {
                OpenError::Busy
            } else {
                OpenError::Failed(storage(path, what, err))
            }
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(sql("cannot open it"))?;
    // Exclusive before the first access: the lock is taken by the first write below and
    // kept until the connection closes, and WAL then needs no shared memory.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(sql("cannot lock it"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sql("cannot switch it to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "the journal is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql("cannot set synchronous"))?;
    // Statement journals in memory: a statement that may need undoing inside a transaction
    // (an upsert, a `RETURNING`) saves the pages it touches first, and once that spilled to
    // a temporary file (the first prune does) every such statement wrote there: most of the
    // journal's writes, for nothing a crash needs.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(sql("cannot set temp_store"))?;
    conn.execute_batch(&format!("BEGIN EXCLUSIVE; {SCHEMA} COMMIT;"))
        .map_err(sql("cannot create its tables"))?;
    let owner: Option<String> = conn
        .query_row("SELECT v FROM meta WHERE k = 'agent_id'", [], |row| {
            row.get(0)
        })
        .optional()
        .map_err(sql("cannot read it"))?;
    match owner {
        Some(owner) if owner != agent_id => {
            return Err(OpenError::Failed(Error::Config(format!(
                "the journal {} belongs to agent {owner:?}, not {agent_id:?}",
                path.display()
            ))));
        }
        Some(_) => {}
        None => {
            conn.execute(
                "INSERT INTO meta (k, v) VALUES ('agent_id', ?1), ('version', '1')",
                params![agent_id],
            )
            .map_err(sql("cannot write it"))?;
        }
    }
    let bytes: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM messages WHERE state < 2",
            [],
            |row| row.get(0),
        )
        .map_err(sql("cannot read it"))?;
    // Told the WAL's size after each commit instead of checkpointing in it (which SQLite
    // would do in whichever commit crossed its threshold): see [`CHECKPOINT_FRAMES`].
    let frames = Arc::new(AtomicU32::new(0));
    let told = frames.clone();
    conn.wal_hook(Some(
        move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            told.store(pages.max(0) as u32, Ordering::Relaxed);
            Ok(())
        },
    ))
    .map_err(sql("cannot watch its log"))?;
    Ok((conn, bytes.max(0) as u64, frames))
}

/// Tells one request how its transaction ended (the error, when the commit failed).
type Answer = Box<dyn FnOnce(Option<&Error>)>;

/// Moves what waits in the channel into `batch`, up to [`GROUP_COMMIT`] requests.
fn take_waiting(ops: &std_mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < GROUP_COMMIT {
        match ops.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// The journal thread's loop: commits what is sent, a batch at a time, until closed.
fn run(worker: &Mutex<Worker>, pending: &AtomicUsize, ops: std_mpsc::Receiver<Op>) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        take_waiting(&ops, &mut batch);
        // Only settles to write: give the handler calls returning after them a moment to
        // join them, unless a request or the end of their batch comes first.
        if batch.iter().all(|op| matches!(op, Op::Wake { now: false })) {
            let deadline = Instant::now() + SETTLE_DELAY;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match ops.recv_timeout(left) {
                    Ok(Op::Wake { now: false }) if !left.is_zero() => {}
                    Ok(op) => {
                        batch.push(op);
                        take_waiting(&ops, &mut batch);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let counted = batch
            .iter()
            .filter(|op| !matches!(op, Op::Wake { .. }))
            .count();
        let close = batch.iter().any(|op| matches!(op, Op::Close));
        let mut worker = lock(worker);
        worker.commit(batch);
        pending.fetch_sub(counted, Ordering::AcqRel);
        if worker.upkeep_due() {
            worker.upkeep();
        }
        if close {
            // Dropping the connection releases the file's lock for the next runtime.
            worker.conn = None;
            tracing::debug!(path = %worker.path.display(), "journal closed");
            return;
        }
    }
    lock(worker).conn = None;
}

/// How a message in flight was marked started, for [`Op::Unstart`] to take it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marked {
    /// In the started mark ([`Op::Start`]).
    InMark,
    /// In its row: recorded started ([`Journal::record`] with `started`).
    InRow,
}

/// The connection and what the commits keep track of.
struct Worker {
    conn: Option<Connection>,
    path: PathBuf,
    backlog: Arc<Backlog>,
    /// Shared with [`Journal::settles`].
    settles: Arc<Mutex<Vec<i64>>>,
    /// Settles written since the last prune.
    settled: u64,
    /// Messages this runtime marked started and has neither settled nor taken back. A
    /// batch's start writes the `seq`s of those marked in the mark (one `meta` row) rather
    /// than a state into each message's row, which then settles rewrite anyway; `recover`
    /// turns the mark into row states.
    in_flight: HashMap<i64, Marked>,
    /// Frames in the WAL, as SQLite reports after each commit (see [`CHECKPOINT_FRAMES`]).
    frames: Arc<AtomicU32>,
    stats: JournalStats,
}

impl Worker {
    fn checkpoint_due(&self) -> bool {
        self.frames.load(Ordering::Relaxed) >= CHECKPOINT_FRAMES
    }

    /// Whether the journal thread has upkeep to do: a prune, a checkpoint. Writes made on
    /// a caller's thread leave it to the thread: the realtime path never waits on it.
    fn upkeep_due(&self) -> bool {
        self.settled >= PRUNE_EVERY || self.checkpoint_due()
    }

    /// The journal thread's upkeep, between two batches.
    fn upkeep(&mut self) {
        if self.settled >= PRUNE_EVERY
            && let Some(conn) = self.conn.as_mut()
        {
            let pruned = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .and_then(|tx| {
                    prune(&tx)?;
                    tx.commit()
                });
            match pruned {
                Ok(()) => {
                    self.settled = 0;
                    self.stats.commits += 1;
                }
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), error = %err, "journal prune failed")
                }
            }
        }
        if self.checkpoint_due() {
            self.checkpoint();
        }
    }

    /// Copies the WAL into the file; the next commit starts the log over.
    fn checkpoint(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => self.frames.store(0, Ordering::Relaxed),
            Err(err) => {
                tracing::warn!(path = %self.path.display(), error = %err, "journal checkpoint failed")
            }
        }
    }

    /// Runs the settles waiting and `ops` in one transaction and answers them once it is
    /// committed. Should the commit fail, every writer is told so.
    fn commit(&mut self, ops: Vec<Op>) {
        let settles = std::mem::take(&mut *lock(&self.settles));
        let idle = |op: &Op| matches!(op, Op::Wake { .. } | Op::Close);
        if settles.is_empty() && ops.iter().all(idle) {
            return;
        }
        let mut answers: Vec<Answer> = Vec::new();
        let mut freed: u64 = 0;
        let mut added: u64 = 0;
        let path = self.path.clone();
        let Some(conn) = self.conn.as_mut() else {
            // Closed: every request fails as a closed journal's does (its answer is dropped).
            return;
        };
        let in_flight = &mut self.in_flight;
        let changes_before = conn.total_changes();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !settles.is_empty() {
                // By runs of consecutive `seq`s (a batch's usually are one): two statements
                // a run, each a range of the table, not one per message.
                let mut sorted = settles.clone();
                sorted.sort_unstable();
                sorted.dedup();
                let mut sum = tx.prepare_cached(
                    "SELECT COALESCE(SUM(bytes), 0) FROM messages
                     WHERE seq BETWEEN ?1 AND ?2 AND state < 2",
                )?;
                let mut update = tx.prepare_cached(
                    "UPDATE messages SET state = 2, payload = NULL
                     WHERE seq BETWEEN ?1 AND ?2 AND state < 2",
                )?;
                let mut runs = sorted.chunk_by(|a, b| b - a == 1);
                for run in runs.by_ref() {
                    let (first, last) = (run[0], run[run.len() - 1]);
                    let bytes: i64 = sum.query_row(params![first, last], |row| row.get(0))?;
                    freed += bytes.max(0) as u64;
                    update.execute(params![first, last])?;
                }
                for seq in &settles {
                    in_flight.remove(seq);
                }
            }
            for op in ops {
                match op {
                    Op::Recover(reply) => {
                        let answer = recover(&tx, in_flight)
                            .map_err(|e| storage(&path, "cannot read it", e));
                        answers.push(Box::new(move |failed| {
                            let _ = reply.send(match failed {
                                Some(err) => Err(err.clone()),
                                None => answer,
                            });
                        }));
                    }
                    Op::Record {
                        items,
                        groups,
                        started,
                        reply,
                    } => {
                        let (recorded, bytes) = record(&tx, &items, &groups, started, in_flight)?;
                        added += bytes;
                        answers.push(Box::new(move |failed| {
                            let _ = reply.send(match failed {
                                Some(err) => Err(err.clone()),
                                None => Ok(recorded),
                            });
                        }));
                    }
                    Op::Start { seqs, reply } => {
                        for seq in seqs {
                            in_flight.entry(seq).or_insert(Marked::InMark);
                        }
                        write_mark(&tx, in_flight)?;
                        answers.push(Box::new(move |failed| {
                            let _ = reply.send(match failed {
                                Some(err) => Err(err.clone()),
                                None => Ok(()),
                            });
                        }));
                    }
                    Op::Unstart(seqs) => {
                        let mut revert = tx.prepare_cached(
                            "UPDATE messages SET state = 0 WHERE seq = ?1 AND state = 1",
                        )?;
                        let mut mark_changed = false;
                        for seq in seqs {
                            match in_flight.remove(&seq) {
                                Some(Marked::InRow) => {
                                    revert.execute(params![seq])?;
                                }
                                Some(Marked::InMark) => mark_changed = true,
                                // Started before this runtime (offered flagged): it stays so.
                                None => {}
                            }
                        }
                        if mark_changed {
                            write_mark(&tx, in_flight)?;
                        }
                    }
                    Op::Unhandled {
                        after,
                        boot_max,
                        limit,
                        reply,
                    } => {
                        let answer = unhandled(&tx, after, boot_max, limit)
                            .map_err(|e| storage(&path, "cannot read it", e));
                        answers.push(Box::new(move |failed| {
                            let _ = reply.send(match failed {
                                Some(err) => Err(err.clone()),
                                None => answer,
                            });
                        }));
                    }
                    Op::Sync(reply) => answers.push(Box::new(move |_| {
                        let _ = reply.send(());
                    })),
                    Op::Wake { .. } | Op::Close => {}
                }
            }
            tx.commit()
        })();
        if result.is_ok() {
            self.settled += settles.len() as u64;
            self.stats.commits += 1;
            self.stats.rows += conn.total_changes().saturating_sub(changes_before);
        }
        let failed = result
            .err()
            .map(|e| storage(&self.path, "cannot write it", e));
        if let Some(err) = &failed {
            tracing::error!(error = %err, "journal write failed");
        } else {
            let bytes = &self.backlog.bytes;
            let now = bytes.load(Ordering::Relaxed) + added;
            let now = now.saturating_sub(freed);
            bytes.store(now, Ordering::Relaxed);
            if now < self.backlog.cap {
                self.backlog.warned.store(false, Ordering::Relaxed);
            }
            if freed > 0 {
                self.backlog.room.notify_waiters();
            }
        }
        for answer in answers {
            answer(failed.as_ref());
        }
    }
}

/// Writes the started mark: the `seq`s [`Op::Start`] marked and nothing took back yet.
/// Settled ones may stay in it until the next start rewrites it: a handled row is never
/// offered again, mark or not.
fn write_mark(
    tx: &rusqlite::Transaction<'_>,
    in_flight: &HashMap<i64, Marked>,
) -> rusqlite::Result<()> {
    let mut seqs: Vec<i64> = in_flight
        .iter()
        .filter(|(_, how)| **how == Marked::InMark)
        .map(|(seq, _)| *seq)
        .collect();
    seqs.sort_unstable();
    let text = serde_json::to_string(&seqs).unwrap_or_else(|_| "[]".to_owned());
    tx.prepare_cached(
        "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
    )?
    .execute(params![STARTED_KEY, text])?;
    Ok(())
}

fn record(
    tx: &rusqlite::Transaction<'_>,
    items: &[Incoming],
    groups: &[GroupUpdate],
    started: bool,
    in_flight: &mut HashMap<i64, Marked>,
) -> rusqlite::Result<(Vec<Recorded>, u64)> {
    let mut recorded = Vec::with_capacity(items.len());
    let mut added = 0u64;
    let now = clock::now_ms();
    let state = if started {
        State::Started
    } else {
        State::Received
    } as i64;
    // `OR IGNORE` rather than an upsert with `RETURNING`: the same outcome without the
    // statement journal those make SQLite keep (a copy of each page touched, per row).
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO messages (key, source, payload, bytes, state, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut existing = tx.prepare_cached("SELECT seq, state FROM messages WHERE key = ?1")?;
    let mut start =
        tx.prepare_cached("UPDATE messages SET state = 1 WHERE seq = ?1 AND state = 0")?;
    for item in items {
        let payload = serde_json::to_string(&item.message).unwrap_or_default();
        let key = item.message.dedup_key();
        let bytes = payload.len() as i64;
        let inserted = insert.execute(params![
            key,
            item.source.as_str(),
            payload,
            bytes,
            state,
            now
        ])? > 0;
        let seq = inserted.then(|| tx.last_insert_rowid());
        recorded.push(match seq {
            Some(seq) => {
                added += bytes as u64;
                if started {
                    in_flight.insert(seq, Marked::InRow);
                }
                Recorded::Pending(seq)
            }
            None => {
                let (seq, was): (i64, i64) =
                    existing.query_row(params![key], |row| Ok((row.get(0)?, row.get(1)?)))?;
                match State::of(was) {
                    State::Handled => Recorded::Handled,
                    _ => {
                        if started && start.execute(params![seq])? > 0 {
                            in_flight.insert(seq, Marked::InRow);
                        }
                        Recorded::Pending(seq)
                    }
                }
            }
        });
    }
    for group in groups {
        tx.prepare_cached(
            "INSERT INTO groups (conversation, newest_ms, floor_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (conversation) DO UPDATE SET newest_ms = ?2, floor_ms = ?3",
        )?
        .execute(params![group.conversation, group.newest_ms, group.floor_ms])?;
        if group.new_rows.is_empty() {
            continue;
        }
        let mut row = tx.prepare_cached(
            "INSERT INTO group_rows (conversation, key) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        for key in &group.new_rows {
            row.execute(params![group.conversation, key])?;
        }
        tx.prepare_cached(
            "DELETE FROM group_rows WHERE conversation = ?1 AND n <= (
               SELECT n FROM group_rows WHERE conversation = ?1 ORDER BY n DESC LIMIT 1 OFFSET ?2)",
        )?
        .execute(params![group.conversation, GROUP_ROWS_KEPT as i64])?;
    }
    Ok((recorded, added))
}

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Entry>> {
    let seq: i64 = row.get(0)?;
    let source: String = row.get(1)?;
    let state: i64 = row.get(2)?;
    let payload: Option<String> = row.get(3)?;
    // A payload this build cannot read back (written by another version) is skipped
    // with a warning rather than blocking the ones behind it.
    let message = match payload
        .as_deref()
        .map(serde_json::from_str::<ConduitMessage>)
    {
        Some(Ok(message)) => message,
        Some(Err(err)) => {
            tracing::warn!(seq, error = %err, "skipping a journal entry that cannot be read");
            return Ok(None);
        }
        None => return Ok(None),
    };
    Ok(Some(Entry {
        seq,
        source: Source::parse(&source),
        state: State::of(state),
        message,
    }))
}

fn unhandled(
    tx: &rusqlite::Transaction<'_>,
    after: i64,
    boot_max: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Entry>> {
    let mut query = tx.prepare_cached(
        "SELECT seq, source, state, payload FROM messages
         WHERE state < 2 AND seq > ?1 AND (source = 'stream' OR seq <= ?2)
         ORDER BY seq LIMIT ?3",
    )?;
    let rows = query.query_map(params![after, boot_max, limit as i64], entry)?;
    rows.filter_map(|row| row.transpose()).collect()
}

fn recover(
    tx: &rusqlite::Transaction<'_>,
    in_flight: &mut HashMap<i64, Marked>,
) -> rusqlite::Result<Recovered> {
    // The started mark becomes row states: what it holds unhandled is offered flagged.
    tx.execute(
        "UPDATE messages SET state = 1 WHERE state = 0 AND seq IN (
           SELECT value FROM json_each((SELECT v FROM meta WHERE k = ?1)))",
        params![STARTED_KEY],
    )?;
    tx.execute("DELETE FROM meta WHERE k = ?1", params![STARTED_KEY])?;
    for how in in_flight.values_mut() {
        *how = Marked::InRow;
    }
    let mut recovered = Recovered::default();
    {
        let mut query = tx.prepare(
            "SELECT seq, source, state, payload FROM messages WHERE state < 2 ORDER BY seq",
        )?;
        let rows = query.query_map([], entry)?;
        for row in rows {
            if let Some(entry) = row? {
                recovered.unhandled.push(entry);
            }
        }
    }
    {
        let mut query = tx.prepare(
            "SELECT key FROM (SELECT seq, key FROM messages WHERE state = 2 ORDER BY seq DESC LIMIT ?1)
             ORDER BY seq",
        )?;
        let rows = query.query_map(params![HANDLED_KEPT as i64], |row| row.get(0))?;
        recovered.handled = rows.collect::<rusqlite::Result<_>>()?;
    }
    {
        let mut query = tx.prepare("SELECT conversation, newest_ms, floor_ms FROM groups")?;
        let rows = query.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, Option<i64>>(2)?,
            ))
        })?;
        for row in rows {
            let (conversation, newest_ms, floor_ms) = row?;
            recovered.groups.insert(
                conversation,
                GroupPosition {
                    newest_ms,
                    floor_ms,
                    known: Vec::new(),
                },
            );
        }
        let mut query = tx.prepare("SELECT conversation, key FROM group_rows ORDER BY n")?;
        let rows = query.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        for row in rows {
            let (conversation, key) = row?;
            if let Some(position) = recovered.groups.get_mut(&conversation) {
                position.known.push(key);
            }
        }
    }
    recovered.max_seq = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM messages", [], |row| {
        row.get(0)
    })?;
    Ok(recovered)
}

/// Forgets handled rows older than the newest [`HANDLED_KEPT`]: past the dedup window, a
/// restart would not remember them either.
fn prune(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM messages WHERE state = 2 AND seq <= (
           SELECT seq FROM messages WHERE state = 2 ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
        params![HANDLED_KEPT as i64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
