//! The local SignalDock transport: messages in `<project>/.cleo/signaldock.db`, a SQLite file
//! that the cleo CLI and other agents' processes read and write at the same time (WIRE.md,
//! "Local SignalDock").
//!
//! Every SQLite call can block: on file I/O, and for up to [`BUSY_TIMEOUT`] while another
//! process holds the write lock. So each one runs on tokio's blocking pool and the async
//! methods only hand the work over and wait; no tokio worker ever waits on the file.
//!
//! Writes start with `BEGIN IMMEDIATE`. A deferred transaction that reads and then writes
//! cannot wait for the write lock (SQLite answers `SQLITE_BUSY` at once rather than risk a
//! deadlock between two upgrading readers), so concurrent writers would fail instead of
//! queueing behind `busy_timeout`.
//!
//! Realtime across processes: nobody tells us when another process inserts a row. A watcher
//! asks `PRAGMA data_version` on a connection of its own every [`WATCH_INTERVAL`]; the value
//! changes only when some other connection has committed, and asking costs two file locks
//! and a look at the WAL index in shared memory, not a query over the tables. Each change
//! bumps [`LocalTransport::commits`]; [`watch`] holds the watcher and the delivery loop a
//! subscription runs on those changes.

pub mod watch;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::clock;
use super::error::{Error, Result};
use super::message::{ConduitMessage, MAX_CONTENT_BYTES, MapError};
use super::sync::lock;
use super::task::RunningTask;
use super::transport::{DirectSource, Page};

/// The file name inside the `.cleo` directory.
pub const DB_FILE: &str = "signaldock.db";
/// `poll()`'s page size when the caller gives none (WIRE.md).
pub const DEFAULT_POLL_LIMIT: u32 = 50;
/// How long a statement waits for another connection's lock before failing (WIRE.md).
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);
/// How often the watcher asks whether another connection committed: well inside the 200 ms
/// delivery goal, and cheap enough to leave running while idle.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(25);

const NOT_CONNECTED: &str = "LocalTransport is not connected: call connect() first";

/// The two tables the runtime owns a stake in, as WIRE.md gives them, so a file we create
/// is one the cleo CLI accepts. The rest of the real file is not ours to create.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conversations (
  id TEXT PRIMARY KEY, participants TEXT NOT NULL,
  visibility TEXT NOT NULL DEFAULT 'private', message_count INTEGER NOT NULL DEFAULT 0,
  last_message_at INTEGER, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
  id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id),
  from_agent_id TEXT NOT NULL, to_agent_id TEXT NOT NULL, content TEXT NOT NULL,
  content_type TEXT NOT NULL DEFAULT 'text', status TEXT NOT NULL DEFAULT 'pending',
  attachments TEXT NOT NULL DEFAULT '[]', group_id TEXT, metadata TEXT DEFAULT '{}',
  reply_to TEXT, created_at INTEGER NOT NULL, delivered_at INTEGER, read_at INTEGER);
";

/// The indexes the cleo CLI's migration puts on `messages` (signaldock-storage
/// `2026-03-28-000000_initial`), word for word: a file we create performs like one the CLI
/// made (the poll reads by `to_agent_id`), and when the CLI later migrates the file its own
/// `CREATE INDEX IF NOT EXISTS` finds the same index under the same name.
const MESSAGE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS messages_conversation_idx ON messages(conversation_id);
CREATE INDEX IF NOT EXISTS messages_from_agent_idx ON messages(from_agent_id);
CREATE INDEX IF NOT EXISTS messages_to_agent_idx ON messages(to_agent_id);
CREATE INDEX IF NOT EXISTS messages_created_at_idx ON messages(created_at);
CREATE INDEX IF NOT EXISTS idx_messages_group_id ON messages(group_id) WHERE group_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_messages_reply_to ON messages(reply_to) WHERE reply_to IS NOT NULL;
";

/// Where `signaldock.db` lives: in `cleo_dir` (the `CLEO_DIR` environment value) when it is
/// set and non-empty, else in `<cwd>/.cleo`.
///
/// A relative `CLEO_DIR` is taken relative to `cwd`, which is what opening the relative path
/// would do; joining it here keeps the answer right if the process later changes directory.
pub fn default_db_path(cleo_dir: Option<&OsStr>, cwd: &Path) -> PathBuf {
    let dir = match cleo_dir.filter(|dir| !dir.is_empty()) {
        Some(dir) => cwd.join(dir),
        None => cwd.join(".cleo"),
    };
    dir.join(DB_FILE)
}

/// Creates `path` (and its directory) when missing, puts it in WAL mode, and creates the
/// `conversations` and `messages` tables and the CLI's indexes on `messages` when missing.
/// Tables and indexes already there, ours or not, are left as they are.
///
/// It does not create the `agents` table, although the heartbeat writes to it: that table
/// is the cleo CLI's agent registry (two dozen columns over three migrations, rows made by
/// `cleo agent register`), and a partial copy made here would break the CLI's own migration
/// of the file (its indexes name columns the copy would lack). Without it a local beat
/// counts a failure that says so.
///
/// Blocking: from async code, call it inside `spawn_blocking`.
pub fn ensure_schema(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Storage(format!("cannot create {}: {e}", parent.display())))?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(storage)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    configure(&conn)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(storage)?;
    tx.execute_batch(SCHEMA).map_err(storage)?;
    tx.execute_batch(MESSAGE_INDEXES).map_err(storage)?;
    tx.commit().map_err(storage)
}

/// A handle on `signaldock.db` for one agent. Clones share the connection and the watcher;
/// both end at [`disconnect`](Self::disconnect) or when the last clone is dropped.
#[derive(Clone)]
pub struct LocalTransport {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    agent_id: String,
    db: Arc<Slot>,
    commits: tokio::sync::watch::Receiver<u64>,
    watcher: Mutex<Option<RunningTask>>,
}

impl Drop for Inner {
    // A RunningTask that is dropped without stop() detaches and keeps running.
    fn drop(&mut self) {
        if let Some(task) = self
            .watcher
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.stop();
        }
    }
}

impl std::fmt::Debug for LocalTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransport")
            .field("path", &self.inner.path)
            .field("agent_id", &self.inner.agent_id)
            .field("connected", &self.inner.db.is_open())
            .finish()
    }
}

impl LocalTransport {
    /// Opens `path` for `agent_id` and starts the commit watcher. The file must exist and
    /// have a `messages` table; it is never created here (see [`ensure_schema`]).
    /// Must be called inside a tokio runtime.
    pub async fn connect(path: PathBuf, agent_id: String) -> Result<Self> {
        if agent_id.trim().is_empty() {
            return Err(Error::Config("agent_id must not be empty".into()));
        }
        let opening = path.clone();
        let (writer, reader, version) = tokio::task::spawn_blocking(move || open_pair(&opening))
            .await
            .map_err(task_failed)??;
        let (sender, commits) = tokio::sync::watch::channel(0);
        let watcher = watch::spawn_watcher(reader, version, sender);
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                agent_id,
                db: Arc::new(Slot::new(writer)),
                commits,
                watcher: Mutex::new(Some(watcher)),
            }),
        })
    }

    /// Stops the watcher and closes the connection, after a call in flight finishes.
    /// Idempotent; every later call fails with [`Error::NotConnected`].
    pub async fn disconnect(&self) {
        if let Some(task) = lock(&self.inner.watcher).take() {
            task.stop();
        }
        let db = self.inner.db.clone();
        db.mark_closed();
        // Closing the last connection to a WAL file checkpoints it: file I/O, so off-thread.
        if tokio::task::spawn_blocking(move || db.close())
            .await
            .is_err()
        {
            tracing::debug!("signaldock.db closes with the runtime");
        }
    }

    /// Sends `content` (at most [`MAX_CONTENT_BYTES`]) to `to` and returns the new message's id.
    ///
    /// Without `conversation_id` the message goes into the private conversation of the two
    /// agents (created when missing). With one, it goes into that conversation (created
    /// when missing, as the two agents' conversation); when the conversation has other
    /// members than the two, it is a group message and `group_id` is set to it.
    pub async fn push(
        &self,
        to: &str,
        content: &str,
        conversation_id: Option<&str>,
        reply_to: Option<&str>,
    ) -> Result<String> {
        if to.trim().is_empty() {
            return Err(Error::Config("push: `to` must not be empty".into()));
        }
        // A poll refuses a larger row (and it would stay pending forever), so do not write one.
        if content.len() > MAX_CONTENT_BYTES {
            return Err(Error::Config(format!(
                "push: content is {} bytes, over the {MAX_CONTENT_BYTES}-byte cap",
                content.len()
            )));
        }
        let outgoing = Outgoing {
            from: self.inner.agent_id.clone(),
            to: to.to_owned(),
            content: content.to_owned(),
            conversation_id: conversation_id.filter(|c| !c.is_empty()).map(str::to_owned),
            reply_to: reply_to.filter(|r| !r.is_empty()).map(str::to_owned),
        };
        self.blocking(move |conn| insert_message(conn, &outgoing))
            .await
    }

    /// This agent's pending messages, oldest first, at most `limit`; with `since` (ISO 8601
    /// or Unix seconds), only those created after it. Rows that cannot become a message are
    /// logged and skipped (see [`poll_page`](Self::poll_page) to count them).
    pub async fn poll(&self, limit: u32, since: Option<&str>) -> Result<Vec<ConduitMessage>> {
        Ok(self.poll_page(limit, since).await?.messages)
    }

    /// [`poll`](Self::poll), with the number of rows read and of rows skipped.
    pub async fn poll_page(&self, limit: u32, since: Option<&str>) -> Result<Page> {
        let since = since.map(since_seconds).transpose()?.flatten();
        let me = self.inner.agent_id.clone();
        let rows = self
            .blocking(move |conn| select_pending(conn, &me, limit, since))
            .await?;
        let mut page = Page {
            rows: rows.len(),
            ..Page::default()
        };
        for row in rows {
            match row {
                Ok(message) => page.messages.push(message),
                Err(why) => {
                    tracing::warn!(error = %why, "skipping a signaldock.db row that cannot be mapped");
                    page.malformed += 1;
                }
            }
        }
        Ok(page)
    }

    /// Marks this agent's pending messages among `ids` delivered. Ids of messages addressed
    /// to someone else, or no longer pending, are left alone.
    pub async fn ack(&self, ids: &[String]) -> Result<()> {
        let me = self.inner.agent_id.clone();
        let ids = ids.to_vec();
        self.blocking(move |conn| mark_delivered(conn, &me, &ids))
            .await
    }

    /// Records that this agent is up, as SignalDock's heartbeat does on the server: in the
    /// agent's row of the `agents` table (which the cleo CLI's registry keeps in this file),
    /// `status = 'online'` and `last_seen` = now in Unix seconds. Fails, changing nothing,
    /// when the file has no `agents` table or the table no row for this agent.
    ///
    /// `updated_at` is left alone, although the server's beat touches it: in this file it is
    /// the registry's clock for the credential (`AgentCredential.updatedAt`), which key
    /// rotation reads as the key's age, so a beat that moved it would keep the key from ever
    /// being rotated.
    pub async fn record_presence(&self) -> Result<()> {
        let me = self.inner.agent_id.clone();
        let presence = self
            .blocking(move |conn| mark_online(conn, &me, unix_now()))
            .await?;
        match presence {
            Presence::Recorded => Ok(()),
            Presence::NoTable => Err(Error::Storage(format!(
                "signaldock.db has no agents table (at {}; the cleo CLI's agent registry creates it)",
                self.inner.path.display()
            ))),
            Presence::NoRow => Err(Error::Storage(format!(
                "agent {:?} has no row in signaldock.db (agents table at {}; `cleo agent register` adds it)",
                self.inner.agent_id,
                self.inner.path.display()
            ))),
        }
    }

    /// A value that changes when another connection (another process, or another transport
    /// in this one) has committed to the file. Take it before polling, then poll after each
    /// change: a commit between the poll and the wait still counts. This transport's own
    /// pushes count too, as the watcher has a connection of its own.
    ///
    /// After [`disconnect`](Self::disconnect), `changed()` fails: the sender is gone.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut commits = self.inner.commits.clone();
        commits.mark_unchanged();
        commits
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn agent_id(&self) -> &str {
        &self.inner.agent_id
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if !self.inner.db.is_open() {
            return Err(not_connected());
        }
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.with(work))
            .await
            .map_err(task_failed)?
    }
}

impl DirectSource for LocalTransport {
    fn poll(&self, limit: u32, since: Option<String>) -> BoxFuture<'_, Result<Page>> {
        Box::pin(async move { self.poll_page(limit, since.as_deref()).await })
    }

    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { LocalTransport::ack(self, &ids).await })
    }

    fn name(&self) -> String {
        "local".into()
    }
}

/// A connection that only blocking threads touch; `None` once closed.
struct Slot {
    conn: Mutex<Option<Connection>>,
    closed: AtomicBool,
}

impl Slot {
    fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(Some(conn)),
            closed: AtomicBool::new(false),
        }
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Refuses new work at once, while a call in flight may still hold the connection.
    fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Blocking.
    fn close(&self) {
        self.mark_closed();
        drop(lock(&self.conn).take());
    }

    /// Blocking: runs `work` on the connection.
    fn with<T>(&self, work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = lock(&self.conn);
        match conn.as_mut() {
            Some(conn) if self.is_open() => work(conn).map_err(storage),
            _ => Err(not_connected()),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = conn {
            close_off_thread(conn);
        }
    }
}

/// Closing may checkpoint the WAL (file I/O), so a connection dropped on an async thread is
/// closed on the blocking pool when there is a runtime to ask.
fn close_off_thread(conn: Connection) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(conn))),
        Err(_) => drop(conn),
    }
}

/// Blocking. The writer (checked and configured) and the watcher's reader, with the data
/// version the watcher starts from.
fn open_pair(path: &Path) -> Result<(Connection, Connection, i64)> {
    if !path.is_file() {
        return Err(Error::Storage(format!(
            "signaldock.db not found at {}",
            path.display()
        )));
    }
    let writer = open_existing(path)?;
    let has_messages: bool = writer
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages')",
            [],
            |row| row.get(0),
        )
        .map_err(storage)?;
    if !has_messages {
        return Err(Error::Storage(format!(
            "messages table missing in {}",
            path.display()
        )));
    }
    // Only now: switching to WAL rewrites the header of a file that may not be ours.
    configure(&writer)?;
    let reader = open_existing(path)?;
    let version = data_version(&reader).map_err(storage)?;
    Ok((writer, reader, version))
}

/// Blocking. Without `SQLITE_OPEN_CREATE`: a file deleted after the existence check must
/// fail, not come back as an empty database.
fn open_existing(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(storage)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    Ok(conn)
}

/// Blocking. WAL and foreign keys, as every writer of the file uses them.
fn configure(conn: &Connection) -> Result<()> {
    // Without WAL the file is still shared correctly, only less concurrently, so failing to
    // switch is not fatal: a file in rollback mode that another process holds open cannot
    // switch (that takes an exclusive lock), and some file systems cannot share a WAL index.
    match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0)) {
        Ok(mode) if mode.eq_ignore_ascii_case("wal") => {}
        Ok(mode) => tracing::warn!(%mode, "signaldock.db stays out of WAL mode"),
        Err(err) => tracing::warn!(error = %err, "signaldock.db could not switch to WAL mode"),
    }
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(storage)
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |row| row.get(0))
}

struct Outgoing {
    from: String,
    to: String,
    content: String,
    conversation_id: Option<String>,
    reply_to: Option<String>,
}

/// Blocking. The message, its conversation and the conversation's counters, in one
/// transaction.
fn insert_message(conn: &mut Connection, msg: &Outgoing) -> rusqlite::Result<String> {
    let now = unix_now();
    let id = Uuid::new_v4().to_string();
    let pair = participants(&msg.from, &msg.to);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (conversation, group) = match &msg.conversation_id {
        None => {
            let found = find_pair(&tx, &msg.from, &msg.to)?;
            match found {
                Some(found) => (found, None),
                None => {
                    let created = Uuid::new_v4().to_string();
                    create_conversation(&tx, &created, &pair, now)?;
                    (created, None)
                }
            }
        }
        Some(given) => {
            let members: Option<Option<String>> = tx
                .query_row(
                    "SELECT participants FROM conversations WHERE id = ?1",
                    [given],
                    |row| row.get(0),
                )
                .optional()?;
            match members {
                None => {
                    create_conversation(&tx, given, &pair, now)?;
                    (given.clone(), None)
                }
                Some(members) if same_members(members.as_deref(), &msg.from, &msg.to) => {
                    (given.clone(), None)
                }
                Some(_) => (given.clone(), Some(given.clone())),
            }
        }
    };
    tx.execute(
        "INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, \
         content_type, status, attachments, group_id, metadata, reply_to, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'text', 'pending', '[]', ?6, '{}', ?7, ?8)",
        params![
            id,
            conversation,
            msg.from,
            msg.to,
            msg.content,
            group,
            msg.reply_to,
            now
        ],
    )?;
    tx.execute(
        "UPDATE conversations SET message_count = message_count + 1, \
         last_message_at = ?2, updated_at = ?2 WHERE id = ?1",
        params![conversation, now],
    )?;
    tx.commit()?;
    Ok(id)
}

fn create_conversation(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    participants: &str,
    now: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO conversations (id, participants, visibility, message_count, created_at, updated_at) \
         VALUES (?1, ?2, 'private', 0, ?3, ?3)",
        params![id, participants, now],
    )
    .map(drop)
}

/// The two ids sorted as JavaScript's `Array.prototype.sort` does (by UTF-16 code units),
/// so the key matches what the cleo CLI computes even for ids outside the BMP.
fn participants(a: &str, b: &str) -> String {
    let (first, second) = if a.encode_utf16().cmp(b.encode_utf16()).is_le() {
        (a, b)
    } else {
        (b, a)
    };
    format!("{first},{second}")
}

/// Blocking. The oldest conversation whose `participants` are exactly these two agents, in
/// either format the file holds (see [`same_members`]).
///
/// `participants` has no index, so any lookup scans the table; the filter only keeps SQLite
/// from handing over rows that cannot match: a comma-separated list must contain both ids
/// as they are, while a JSON array may spell them with escapes, so every array is checked.
fn find_pair(conn: &Connection, a: &str, b: &str) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, participants FROM conversations \
         WHERE (instr(participants, ?1) > 0 AND instr(participants, ?2) > 0) \
            OR ltrim(participants) LIKE '[%' \
         ORDER BY created_at, rowid",
    )?;
    let mut rows = stmt.query(params![a, b])?;
    while let Some(row) = rows.next()? {
        let members = match row.get_ref(1)? {
            ValueRef::Text(text) => std::str::from_utf8(text).ok(),
            _ => None,
        };
        if same_members(members, a, b) {
            return row.get(0).map(Some);
        }
    }
    Ok(None)
}

/// Whether a conversation's `participants` are exactly these two agents (in any order, with
/// any spacing): the cleo CLI writes the ids joined by `,`; signaldock-storage writes a JSON
/// array of them (WIRE.md). A JSON array holding anything but strings is nobody's pair.
fn same_members(members: Option<&str>, a: &str, b: &str) -> bool {
    let Some(members) = members else {
        return false;
    };
    let pair = BTreeSet::from([a, b]);
    // Text that is not a JSON array is a list joined by commas (even one starting with `[`:
    // an agent id may).
    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(members) {
        let mut ids = BTreeSet::new();
        for item in &items {
            match item {
                Value::String(id) => ids.insert(id.as_str()),
                _ => return false,
            };
        }
        return ids == pair;
    }
    let ids: BTreeSet<&str> = members
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    ids == pair
}

/// Blocking. Pending rows for `me`, mapped one by one so one bad row costs only itself.
fn select_pending(
    conn: &mut Connection,
    me: &str,
    limit: u32,
    since: Option<f64>,
) -> rusqlite::Result<Vec<Result<ConduitMessage, MapError>>> {
    const COLUMNS: &str = "SELECT id, from_agent_id, content, conversation_id, group_id, \
                           created_at, metadata FROM messages \
                           WHERE to_agent_id = ?1 AND status = 'pending'";
    // Two statements rather than `?3 IS NULL OR …`, which would keep the planner from
    // using an index on created_at where the file has one.
    let limit = i64::from(limit);
    match since {
        None => {
            let sql = format!("{COLUMNS} ORDER BY created_at, rowid LIMIT ?2");
            let mut stmt = conn.prepare_cached(&sql)?;
            map_rows(stmt.query(params![me, limit])?)
        }
        Some(since) => {
            let sql = format!("{COLUMNS} AND created_at > ?3 ORDER BY created_at, rowid LIMIT ?2");
            let mut stmt = conn.prepare_cached(&sql)?;
            map_rows(stmt.query(params![me, limit, since])?)
        }
    }
}

fn map_rows(
    mut rows: rusqlite::Rows<'_>,
) -> rusqlite::Result<Vec<Result<ConduitMessage, MapError>>> {
    let mut mapped = Vec::new();
    while let Some(row) = rows.next()? {
        mapped.push(map_row(row));
    }
    Ok(mapped)
}

/// A `messages` row as a [`ConduitMessage`]. Other processes write this file, so the
/// declared column types are not trusted: a value of the wrong kind is a [`MapError`].
fn map_row(row: &rusqlite::Row<'_>) -> Result<ConduitMessage, MapError> {
    let column = |idx: usize| row.get_ref(idx).unwrap_or(ValueRef::Null);
    let id = match column(0) {
        ValueRef::Text(id) if !id.is_empty() && id.len() <= 512 => {
            utf8(id, "id").map_err(|_| MapError::MissingId)?
        }
        ValueRef::Integer(id) => id.to_string(),
        _ => return Err(MapError::MissingId),
    };
    let content = match column(2) {
        ValueRef::Text(text) if text.len() > MAX_CONTENT_BYTES => {
            return Err(MapError::ContentTooLarge(text.len()));
        }
        ValueRef::Null => String::new(),
        value => text_of(value, "content")?.unwrap_or_default(),
    };
    Ok(ConduitMessage {
        id,
        from: text_of(column(1), "from_agent_id")?.unwrap_or_else(|| "unknown".into()),
        content,
        tags: None,
        thread_id: text_of(column(3), "conversation_id")?,
        group_id: text_of(column(4), "group_id")?,
        timestamp: clock::format_iso_ms(created_ms(column(5))?),
        metadata: metadata_of(column(6)),
    })
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<String, MapError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| MapError::WrongType(field))
}

fn text_of(value: ValueRef<'_>, field: &'static str) -> Result<Option<String>, MapError> {
    match value {
        ValueRef::Null => Ok(None),
        ValueRef::Text(text) => utf8(text, field).map(Some),
        ValueRef::Integer(n) => Ok(Some(n.to_string())),
        _ => Err(MapError::WrongType(field)),
    }
}

/// `created_at` is Unix seconds; a writer that stored text gets the benefit of the doubt.
fn created_ms(value: ValueRef<'_>) -> Result<i64, MapError> {
    let seconds = match value {
        ValueRef::Integer(s) => return Ok(s.saturating_mul(1000)),
        ValueRef::Real(s) => s,
        ValueRef::Text(text) => {
            let text = std::str::from_utf8(text).map_err(|_| MapError::WrongType("created_at"))?;
            match since_seconds(text) {
                Ok(Some(s)) => s,
                _ => return Err(MapError::WrongType("created_at")),
            }
        }
        _ => return Err(MapError::WrongType("created_at")),
    };
    Ok((seconds * 1000.0).round() as i64)
}

/// Metadata is JSON text; only an object with keys is worth handing on.
fn metadata_of(value: ValueRef<'_>) -> Option<Map<String, Value>> {
    let ValueRef::Text(text) = value else {
        return None;
    };
    serde_json::from_slice::<Map<String, Value>>(text)
        .ok()
        .filter(|m| !m.is_empty())
}

/// A `since` mark as Unix seconds: a number of seconds, or an ISO 8601 date-time (what a
/// poller passes back from a message's `timestamp`). Blank means no mark.
fn since_seconds(since: &str) -> Result<Option<f64>> {
    let since = since.trim();
    if since.is_empty() {
        return Ok(None);
    }
    if let Ok(seconds) = since.parse::<f64>()
        && seconds.is_finite()
    {
        return Ok(Some(seconds));
    }
    match clock::parse_iso_ms(since) {
        Some(ms) => Ok(Some(ms as f64 / 1000.0)),
        None => Err(Error::Config(format!(
            "poll: `since` is neither ISO 8601 nor Unix seconds: {since:?}"
        ))),
    }
}

/// Blocking. Ids go in batches so a long list stays under SQLite's bound-parameter limit.
fn mark_delivered(conn: &mut Connection, me: &str, ids: &[String]) -> rusqlite::Result<()> {
    const BATCH: usize = 500;
    if ids.is_empty() {
        return Ok(());
    }
    let now = unix_now();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for batch in ids.chunks(BATCH) {
        let marks = vec!["?"; batch.len()].join(", ");
        let sql = format!(
            "UPDATE messages SET status = 'delivered', delivered_at = ? \
             WHERE to_agent_id = ? AND status = 'pending' AND id IN ({marks})"
        );
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&now, &me];
        values.extend(batch.iter().map(|id| id as &dyn rusqlite::ToSql));
        // Not cached: one statement per batch size would push the hot ones out of the cache.
        tx.prepare(&sql)?
            .execute(rusqlite::params_from_iter(values))?;
    }
    tx.commit()
}

/// What a presence beat found.
enum Presence {
    Recorded,
    NoTable,
    NoRow,
}

/// Blocking. One statement, so it commits on its own, like the server's update.
fn mark_online(conn: &mut Connection, me: &str, now: i64) -> rusqlite::Result<Presence> {
    // Asked first rather than read from the UPDATE's error, whose text is SQLite's to change.
    let has_agents: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'agents')",
        )?
        .query_row([], |row| row.get(0))?;
    if !has_agents {
        return Ok(Presence::NoTable);
    }
    // `agent_id` is the agent's public id, the one the credential carries (`id` is the row's
    // own UUID), as the server finds the agent it beats for.
    let changed = conn
        .prepare_cached("UPDATE agents SET status = 'online', last_seen = ?2 WHERE agent_id = ?1")?
        .execute(params![me, now])?;
    Ok(if changed == 0 {
        Presence::NoRow
    } else {
        Presence::Recorded
    })
}

fn unix_now() -> i64 {
    clock::now_ms().div_euclid(1000)
}

fn storage(err: rusqlite::Error) -> Error {
    Error::Storage(format!("signaldock.db: {err}"))
}

fn not_connected() -> Error {
    Error::NotConnected(NOT_CONNECTED.into())
}

fn task_failed(err: tokio::task::JoinError) -> Error {
    Error::Storage(format!("signaldock.db task failed: {err}"))
}

#[cfg(test)]
mod tests;
