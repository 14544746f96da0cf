//! The local transport against real `signaldock.db` files in temporary directories, with a
//! Python process as the "other process" that writes the file behind our back.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::core::heartbeat::Beat;

/// A temporary project directory, removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cleo-local-{tag}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn db(&self) -> PathBuf {
        self.dir.join(".cleo").join(DB_FILE)
    }

    /// A database with the schema, and `agent` connected to it.
    async fn transport(&self, agent: &str) -> LocalTransport {
        let path = self.db();
        if !path.exists() {
            ensure_schema(&path).unwrap();
        }
        LocalTransport::connect(path, agent.into()).await.unwrap()
    }

    /// A plain connection for looking at and arranging rows, as another tool would.
    fn raw(&self) -> Connection {
        let conn = Connection::open(self.db()).unwrap();
        conn.busy_timeout(BUSY_TIMEOUT).unwrap();
        conn
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ids(messages: &[ConduitMessage]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

/// Inserts a message row directly, with its conversation, as another process would.
fn insert_row(
    conn: &Connection,
    id: &str,
    to: &str,
    created_at: i64,
    status: &str,
    metadata: Option<&str>,
) {
    conn.execute(
        "INSERT OR IGNORE INTO conversations (id, participants, created_at, updated_at) \
         VALUES ('c-raw', 'carol,zed', 0, 0)",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, status, \
         metadata, created_at) VALUES (?1, 'c-raw', 'zed', ?2, ?1, ?3, ?4, ?5)",
        params![id, to, status, metadata, created_at],
    )
    .unwrap();
}

fn wall_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn default_db_path_prefers_a_non_empty_cleo_dir() {
    let cwd = Path::new("/srv/project");
    for (cleo_dir, want) in [
        (None, "/srv/project/.cleo/signaldock.db"),
        (Some(""), "/srv/project/.cleo/signaldock.db"),
        (Some("/var/cleo"), "/var/cleo/signaldock.db"),
        (Some("state/cleo"), "/srv/project/state/cleo/signaldock.db"),
    ] {
        assert_eq!(
            default_db_path(cleo_dir.map(OsStr::new), cwd),
            PathBuf::from(want),
            "{cleo_dir:?}"
        );
    }
}

#[test]
fn ensure_schema_creates_exactly_the_documented_tables() {
    let scratch = Scratch::new("schema");
    ensure_schema(&scratch.db()).unwrap();
    let conn = scratch.raw();

    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(tables, ["conversations", "messages"]);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    // (name, type, not null, default, primary key), from PRAGMA table_info.
    type Column = (String, String, bool, Option<String>, bool);
    let columns = |table: &str| -> Vec<Column> {
        conn.prepare(&format!("PRAGMA table_info({table})"))
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get::<_, i64>(5)? > 0,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let col = |name: &str, ty: &str, not_null: bool, default: Option<&str>, pk: bool| -> Column {
        (
            name.into(),
            ty.into(),
            not_null,
            default.map(Into::into),
            pk,
        )
    };
    assert_eq!(
        columns("conversations"),
        [
            col("id", "TEXT", false, None, true),
            col("participants", "TEXT", true, None, false),
            col("visibility", "TEXT", true, Some("'private'"), false),
            col("message_count", "INTEGER", true, Some("0"), false),
            col("last_message_at", "INTEGER", false, None, false),
            col("created_at", "INTEGER", true, None, false),
            col("updated_at", "INTEGER", true, None, false),
        ]
    );
    assert_eq!(
        columns("messages"),
        [
            col("id", "TEXT", false, None, true),
            col("conversation_id", "TEXT", true, None, false),
            col("from_agent_id", "TEXT", true, None, false),
            col("to_agent_id", "TEXT", true, None, false),
            col("content", "TEXT", true, None, false),
            col("content_type", "TEXT", true, Some("'text'"), false),
            col("status", "TEXT", true, Some("'pending'"), false),
            col("attachments", "TEXT", true, Some("'[]'"), false),
            col("group_id", "TEXT", false, None, false),
            col("metadata", "TEXT", false, Some("'{}'"), false),
            col("reply_to", "TEXT", false, None, false),
            col("created_at", "INTEGER", true, None, false),
            col("delivered_at", "INTEGER", false, None, false),
            col("read_at", "INTEGER", false, None, false),
        ]
    );
    let fk: (String, String, String) = conn
        .query_row("PRAGMA foreign_key_list(messages)", [], |r| {
            Ok((r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap();
    assert_eq!(
        fk,
        (
            "conversations".into(),
            "conversation_id".into(),
            "id".into()
        )
    );
}

#[test]
fn ensure_schema_leaves_other_tables_alone_and_is_idempotent() {
    let scratch = Scratch::new("idempotent");
    std::fs::create_dir_all(scratch.db().parent().unwrap()).unwrap();
    {
        let conn = scratch.raw();
        conn.execute_batch(
            "CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT);
             INSERT INTO agents VALUES ('a1', 'Alice'), ('b1', 'Bob');",
        )
        .unwrap();
    }
    ensure_schema(&scratch.db()).unwrap();
    insert_row(&scratch.raw(), "m1", "alice", 1, "pending", None);
    ensure_schema(&scratch.db()).unwrap();

    let conn = scratch.raw();
    let agents: Vec<(String, String)> = conn
        .prepare("SELECT id, name FROM agents ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        agents,
        [("a1".into(), "Alice".into()), ("b1".into(), "Bob".into())]
    );
    let agents_sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'agents'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        agents_sql,
        "CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT)"
    );
    let kept: i64 = conn
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, 1, "a second run keeps existing rows");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 3);
}

/// The message indexes of the cleo CLI's signaldock.db, as its migration
/// (`2026-03-28-000000_initial`) writes them and SQLite keeps them in `sqlite_master`.
const REAL_INDEXES: [(&str, &str); 6] = [
    (
        "idx_messages_group_id",
        "CREATE INDEX idx_messages_group_id ON messages(group_id) WHERE group_id IS NOT NULL",
    ),
    (
        "idx_messages_reply_to",
        "CREATE INDEX idx_messages_reply_to ON messages(reply_to) WHERE reply_to IS NOT NULL",
    ),
    (
        "messages_conversation_idx",
        "CREATE INDEX messages_conversation_idx ON messages(conversation_id)",
    ),
    (
        "messages_created_at_idx",
        "CREATE INDEX messages_created_at_idx ON messages(created_at)",
    ),
    (
        "messages_from_agent_idx",
        "CREATE INDEX messages_from_agent_idx ON messages(from_agent_id)",
    ),
    (
        "messages_to_agent_idx",
        "CREATE INDEX messages_to_agent_idx ON messages(to_agent_id)",
    ),
];

/// Every index with a definition (SQLite's own primary-key indexes have none), by name.
fn named_indexes(conn: &Connection) -> Vec<(String, String, String)> {
    conn.prepare(
        "SELECT name, tbl_name, sql FROM sqlite_master \
         WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .unwrap()
    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

fn real_indexes() -> Vec<(String, String, String)> {
    REAL_INDEXES
        .iter()
        .map(|(name, sql)| (name.to_string(), "messages".to_string(), sql.to_string()))
        .collect()
}

#[test]
fn ensure_schema_creates_the_real_message_indexes() {
    let scratch = Scratch::new("indexes");
    ensure_schema(&scratch.db()).unwrap();
    assert_eq!(named_indexes(&scratch.raw()), real_indexes());

    // The planner uses them for what the runtime asks most: this agent's pending rows.
    let plan: String = scratch
        .raw()
        .query_row(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE to_agent_id = 'alice' AND status = 'pending'",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("messages_to_agent_idx"), "{plan}");
}

#[test]
fn ensure_schema_adds_the_indexes_to_tables_made_without_them_and_touches_nothing_else() {
    let scratch = Scratch::new("indexes-later");
    std::fs::create_dir_all(scratch.db().parent().unwrap()).unwrap();
    {
        // A file as an earlier ensureSchema left it (the two tables, no indexes), with rows,
        // and somebody else's table and index.
        let conn = scratch.raw();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "CREATE TABLE agents (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, status TEXT);
             CREATE INDEX agents_by_status ON agents(status);
             INSERT INTO agents VALUES ('u1', 'alice', 'offline');",
        )
        .unwrap();
        insert_row(&conn, "m1", "alice", 1, "pending", None);
    }
    let agents_index = (
        "agents_by_status".to_string(),
        "agents".to_string(),
        "CREATE INDEX agents_by_status ON agents(status)".to_string(),
    );
    assert_eq!(
        named_indexes(&scratch.raw()),
        std::slice::from_ref(&agents_index)
    );

    ensure_schema(&scratch.db()).unwrap();
    ensure_schema(&scratch.db()).unwrap();
    let mut want = real_indexes();
    want.insert(0, agents_index);
    assert_eq!(named_indexes(&scratch.raw()), want);
    let conn = scratch.raw();
    let kept: (i64, String) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM messages), (SELECT status FROM agents WHERE id = 'u1')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(kept, (1, "offline".to_string()));
}

#[tokio::test]
async fn connect_refuses_a_missing_file_or_one_without_messages() {
    let scratch = Scratch::new("connect");
    let missing = scratch.db();
    let err = LocalTransport::connect(missing.clone(), "alice".into())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::Storage(format!("signaldock.db not found at {}", missing.display()))
    );
    assert!(!missing.exists(), "connect never creates the file");

    std::fs::create_dir_all(missing.parent().unwrap()).unwrap();
    scratch
        .raw()
        .execute_batch("CREATE TABLE agents (id TEXT)")
        .unwrap();
    let err = LocalTransport::connect(missing.clone(), "alice".into())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("messages table missing in {}", missing.display())
    );

    ensure_schema(&missing).unwrap();
    let err = LocalTransport::connect(missing, " ".into())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

#[tokio::test]
async fn connect_sets_the_documented_pragmas() {
    let scratch = Scratch::new("pragmas");
    let alice = scratch.transport("alice").await;
    let (mode, timeout, fks) = alice
        .blocking(|conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let timeout: i64 = conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0))?;
            let fks: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
            Ok((mode, timeout, fks))
        })
        .await
        .unwrap();
    assert_eq!((mode.as_str(), timeout, fks), ("wal", 5000, 1));
    assert_eq!(alice.path(), scratch.db());
    assert_eq!(DirectSource::name(&alice), "local");
}

#[tokio::test]
async fn direct_messages_share_the_sorted_pair_conversation() {
    let scratch = Scratch::new("pair");
    let bob = scratch.transport("bob").await;
    let alice = scratch.transport("alice").await;
    let before = unix_now();
    let first = alice.push("bob", "hi bob", None, None).await.unwrap();
    let second = bob
        .push("alice", "hi alice", None, Some(&first))
        .await
        .unwrap();
    assert_ne!(first, second);
    assert!(Uuid::parse_str(&first).is_ok(), "{first}");

    let conn = scratch.raw();
    type Conversation = (String, String, String, i64, Option<i64>, i64, i64);
    let conversations: Vec<Conversation> = conn
        .prepare("SELECT id, participants, visibility, message_count, last_message_at, created_at, updated_at FROM conversations")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(conversations.len(), 1, "{conversations:?}");
    let (conversation, participants, visibility, count, last, created, updated) = &conversations[0];
    assert!(Uuid::parse_str(conversation).is_ok());
    assert_eq!(
        (participants.as_str(), visibility.as_str(), *count),
        ("alice,bob", "private", 2)
    );
    assert!(last.is_some_and(|t| t >= before) && *created >= before && *updated >= before);

    type Stored = (
        String,
        String,
        String,
        String,
        String,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        i64,
    );
    let row: Stored = conn
        .query_row(
            "SELECT conversation_id, from_agent_id, to_agent_id, content, content_type, status, \
             attachments, group_id, metadata, reply_to, created_at FROM messages WHERE id = ?1",
            [&second],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        row,
        (
            conversation.clone(),
            "bob".into(),
            "alice".into(),
            "hi alice".into(),
            "text".into(),
            "pending".into(),
            "[]".into(),
            None,
            "{}".into(),
            Some(first.clone()),
            row.10,
        )
    );
    assert!((before..=unix_now()).contains(&row.10));
}

#[tokio::test]
async fn explicit_conversations_are_posted_to_and_groups_marked() {
    let scratch = Scratch::new("explicit");
    let alice = scratch.transport("alice").await;
    let bob = scratch.transport("bob").await;
    scratch
        .raw()
        .execute(
            "INSERT INTO conversations (id, participants, created_at, updated_at) \
             VALUES ('team', 'alice,bob,carol', 1, 1)",
            [],
        )
        .unwrap();

    let dm = alice.push("bob", "direct", None, None).await.unwrap();
    let received = bob.poll(10, None).await.unwrap();
    let thread = received[0].thread_id.clone().unwrap();

    // A reply in the DM thread stays a direct message.
    alice
        .push("bob", "same thread", Some(&thread), Some(&dm))
        .await
        .unwrap();
    // A conversation with more members is a group.
    alice
        .push("bob", "to the team", Some("team"), None)
        .await
        .unwrap();
    // A conversation nobody created yet is created for the two, so the foreign key holds.
    alice
        .push("bob", "new thread", Some("fresh"), None)
        .await
        .unwrap();

    let got = bob.poll(10, None).await.unwrap();
    let summary: Vec<(&str, Option<&str>, Option<&str>)> = got
        .iter()
        .map(|m| {
            (
                m.content.as_str(),
                m.thread_id.as_deref(),
                m.group_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("direct", Some(thread.as_str()), None),
            ("same thread", Some(thread.as_str()), None),
            ("to the team", Some("team"), Some("team")),
            ("new thread", Some("fresh"), None),
        ]
    );
    let conn = scratch.raw();
    let counts: Vec<(String, i64)> = conn
        .prepare("SELECT id, message_count FROM conversations ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(counts.contains(&("team".into(), 1)) && counts.contains(&("fresh".into(), 1)));
    assert!(counts.contains(&(thread.clone(), 2)), "{counts:?}");
    let fresh: String = conn
        .query_row(
            "SELECT participants FROM conversations WHERE id = 'fresh'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(fresh, "alice,bob");
}

#[test]
fn a_pair_is_recognised_in_the_cli_and_the_signaldock_storage_formats() {
    for (members, same) in [
        // The cleo CLI: the two ids sorted and joined by a comma.
        (Some("alice,bob"), true),
        (Some("bob,alice"), true),
        (Some(" alice , bob "), true),
        // signaldock-storage: a JSON array (sorted, but order does not matter).
        (Some(r#"["alice","bob"]"#), true),
        (Some(r#"["bob","alice"]"#), true),
        (Some(r#" [ "alice" , "bob" ] "#), true),
        // Groups and strangers, in both formats.
        (Some("alice,bob,carol"), false),
        (Some(r#"["alice","bob","carol"]"#), false),
        (Some("alice,carol"), false),
        (Some(r#"["alice","carol"]"#), false),
        (Some(r#"["alice"]"#), false),
        (Some("alice"), false),
        (Some("[]"), false),
        (Some(""), false),
        (None, false),
        // A JSON array that is not a list of ids is not these two.
        (Some(r#"["alice",2]"#), false),
        (Some(r#"[["alice","bob"]]"#), false),
    ] {
        assert_eq!(same_members(members, "alice", "bob"), same, "{members:?}");
    }
    // Ids that carry the other format's separators: a comma inside a JSON string, a bracket
    // at the start of a comma-separated id.
    assert!(same_members(Some(r#"["a,b","c"]"#), "a,b", "c"));
    assert!(!same_members(Some(r#"["a,b","c"]"#), "a", "b"));
    assert!(same_members(Some("[x,y"), "[x", "y"));
    // JSON escapes are read as JSON.
    assert!(same_members(
        Some(r#"["al\"ice","b\u00f6b"]"#),
        "al\"ice",
        "böb"
    ));
}

#[tokio::test]
async fn direct_messages_reuse_a_conversation_signaldock_storage_made() {
    let scratch = Scratch::new("json-pair");
    let alice = scratch.transport("alice").await;
    let bob = scratch.transport("bob").await;
    scratch
        .raw()
        .execute_batch(
            r#"INSERT INTO conversations (id, participants, visibility, created_at, updated_at)
               VALUES ('sd-pair', '["alice","bob"]', 'private', 1, 1),
                      ('sd-pair-carol', '["bob","carol"]', 'private', 2, 2),
                      ('sd-group', '["alice","bob","carol"]', 'private', 3, 3);"#,
        )
        .unwrap();

    let first = alice.push("bob", "hi", None, None).await.unwrap();
    let second = bob.push("alice", "hi back", None, None).await.unwrap();
    // Into the pair's conversation by id, too: a DM, not a group message.
    let third = alice
        .push("bob", "same thread", Some("sd-pair"), None)
        .await
        .unwrap();
    // The three-member conversation stays a group.
    let fourth = alice
        .push("bob", "to the team", Some("sd-group"), None)
        .await
        .unwrap();

    let conn = scratch.raw();
    let placed = |id: &str| -> (String, Option<String>) {
        conn.query_row(
            "SELECT conversation_id, group_id FROM messages WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    for id in [&first, &second, &third] {
        assert_eq!(placed(id), ("sd-pair".into(), None), "message {id}");
    }
    assert_eq!(
        placed(&fourth),
        ("sd-group".into(), Some("sd-group".into()))
    );
    let conversations: Vec<(String, i64)> = conn
        .prepare("SELECT id, message_count FROM conversations ORDER BY created_at")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        conversations,
        [
            ("sd-pair".into(), 3),
            ("sd-pair-carol".into(), 0),
            ("sd-group".into(), 1)
        ],
        "no second conversation for the pair"
    );
}

#[tokio::test]
async fn the_oldest_of_the_pair_conversations_wins_whatever_its_format() {
    let scratch = Scratch::new("pair-oldest");
    let alice = scratch.transport("alice").await;
    scratch
        .raw()
        .execute_batch(
            r#"INSERT INTO conversations (id, participants, visibility, created_at, updated_at)
               VALUES ('cli-newer', 'alice,bob', 'private', 20, 20),
                      ('json-older', '["bob","alice"]', 'private', 10, 10);"#,
        )
        .unwrap();
    let id = alice.push("bob", "which one?", None, None).await.unwrap();
    let conversation: String = scratch
        .raw()
        .query_row(
            "SELECT conversation_id FROM messages WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(conversation, "json-older");
}

#[tokio::test]
async fn poll_is_oldest_first_pending_mine_limited_and_since() {
    let scratch = Scratch::new("poll");
    let alice = scratch.transport("alice").await;
    {
        let conn = scratch.raw();
        // Inserted out of order; m2 and m3 share a second, so rowid breaks the tie.
        insert_row(&conn, "m4", "alice", 300, "pending", Some("not json"));
        insert_row(&conn, "m2", "alice", 200, "pending", Some("{}"));
        insert_row(&conn, "m3", "alice", 200, "pending", None);
        insert_row(&conn, "m1", "alice", 100, "pending", Some(r#"{"k":1}"#));
        insert_row(&conn, "done", "alice", 150, "delivered", None);
        insert_row(&conn, "read", "alice", 160, "read", None);
        insert_row(&conn, "other", "bob", 50, "pending", None);
    }
    let all = alice.poll(DEFAULT_POLL_LIMIT, None).await.unwrap();
    assert_eq!(ids(&all), ["m1", "m2", "m3", "m4"]);
    assert_eq!(ids(&alice.poll(2, None).await.unwrap()), ["m1", "m2"]);
    assert!(alice.poll(0, None).await.unwrap().is_empty());

    for (since, want) in [
        ("150", vec!["m2", "m3", "m4"]),
        ("199.5", vec!["m2", "m3", "m4"]),
        ("200", vec!["m4"]),
        ("1970-01-01T00:02:30Z", vec!["m2", "m3", "m4"]),
        ("1970-01-01T00:03:20.000Z", vec!["m4"]),
        ("1970-01-01T00:03:19.999Z", vec!["m2", "m3", "m4"]),
        ("1970-01-01T01:03:20+01:00", vec!["m4"]),
        ("", vec!["m1", "m2", "m3", "m4"]),
        ("9999999999", vec![]),
    ] {
        let got = alice.poll(DEFAULT_POLL_LIMIT, Some(since)).await.unwrap();
        assert_eq!(ids(&got), want, "since {since:?}");
    }
    let err = alice.poll(10, Some("yesterday")).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");

    let m1 = &all[0];
    assert_eq!(
        (m1.from.as_str(), m1.content.as_str(), m1.timestamp.as_str()),
        ("zed", "m1", "1970-01-01T00:01:40.000Z")
    );
    assert_eq!(
        (m1.thread_id.as_deref(), m1.group_id.as_deref()),
        (Some("c-raw"), None)
    );
    assert_eq!(m1.metadata.as_ref().unwrap()["k"], 1);
    assert_eq!(m1.tags, None);
    assert!(
        all[1..].iter().all(|m| m.metadata.is_none()),
        "empty, NULL and non-JSON metadata are dropped"
    );
}

#[tokio::test]
async fn rows_of_the_wrong_shape_are_counted_not_fatal() {
    let scratch = Scratch::new("malformed");
    let alice = scratch.transport("alice").await;
    {
        let conn = scratch.raw();
        insert_row(&conn, "good", "alice", 10, "pending", None);
        conn.execute("PRAGMA foreign_keys = ON", []).unwrap();
        conn.execute(
            "INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, created_at) \
             VALUES ('blob', 'c-raw', 'zed', 'alice', x'00ff', 5)",
            [],
        )
        .unwrap();
    }
    let page = DirectSource::poll(&alice, 10, None).await.unwrap();
    assert_eq!((page.rows, page.malformed), (2, 1));
    assert_eq!(ids(&page.messages), ["good"]);
}

#[tokio::test]
async fn ack_marks_delivered_and_poll_stops_offering() {
    let scratch = Scratch::new("ack");
    let alice = scratch.transport("alice").await;
    let bob = scratch.transport("bob").await;
    let one = bob.push("alice", "one", None, None).await.unwrap();
    let two = bob.push("alice", "two", None, None).await.unwrap();
    let to_bob = alice.push("bob", "not alice's", None, None).await.unwrap();

    let before = unix_now();
    alice
        .ack(&[one.clone(), to_bob.clone(), "no-such-id".into()])
        .await
        .unwrap();
    alice.ack(&[]).await.unwrap();
    let conn = scratch.raw();
    let state = |id: &str| -> (String, Option<i64>) {
        conn.query_row(
            "SELECT status, delivered_at FROM messages WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (status, delivered_at) = state(&one);
    assert_eq!(status, "delivered");
    assert!(delivered_at.is_some_and(|t| (before..=unix_now()).contains(&t)));
    assert_eq!(
        state(&to_bob),
        ("pending".into(), None),
        "only rows addressed to this agent"
    );
    assert_eq!(state(&two), ("pending".into(), None));
    assert_eq!(ids(&alice.poll(10, None).await.unwrap()), [two.as_str()]);

    // Through the trait, and in more batches than one statement's parameters allow.
    let mut many: Vec<String> = (0..1200).map(|i| format!("junk-{i}")).collect();
    many.push(two.clone());
    DirectSource::ack(&alice, many).await.unwrap();
    assert!(alice.poll(10, None).await.unwrap().is_empty());
    assert_eq!(state(&two).0, "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_talk_both_ways_and_see_each_other_commit() {
    let scratch = Scratch::new("two");
    let alice = scratch.transport("alice").await;
    let bob = scratch.transport("bob").await;
    let mut bob_commits = bob.commits();

    let asked = alice.push("bob", "ping?", None, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), bob_commits.changed())
        .await
        .expect("bob's watcher saw alice's commit")
        .unwrap();
    let got = bob.poll(10, None).await.unwrap();
    assert_eq!(
        (ids(&got), got[0].from.as_str()),
        (vec![asked.as_str()], "alice")
    );
    bob.ack(std::slice::from_ref(&asked)).await.unwrap();

    let thread = got[0].thread_id.as_deref();
    let answer = bob
        .push("alice", "pong!", thread, Some(&asked))
        .await
        .unwrap();
    let got = alice.poll(10, None).await.unwrap();
    assert_eq!(ids(&got), [answer.as_str()]);
    assert_eq!(
        (got[0].from.as_str(), got[0].content.as_str()),
        ("bob", "pong!")
    );
    assert_eq!(got[0].thread_id.as_deref(), thread);
    assert!(bob.poll(10, None).await.unwrap().is_empty());
}

/// Starts `script` under `python3 -c` with `args`, its stdout piped back.
fn python(script: &str, args: &[&str]) -> std::process::Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs")
}

/// Inserts `n` pending rows from `from` to `to`, each in its own transaction, a random
/// 10–60 ms apart, and prints `<id> <unix time just after commit>` for each.
const PY_WRITER: &str = r#"
import random, sqlite3, sys, time, uuid
path, frm, to, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
db = sqlite3.connect(path, timeout=5, isolation_level=None)
db.execute("PRAGMA foreign_keys = ON")
conv = str(uuid.uuid4())
now = int(time.time())
db.execute("INSERT INTO conversations (id, participants, created_at, updated_at) VALUES (?, ?, ?, ?)",
           (conv, ",".join(sorted([frm, to])), now, now))
for i in range(n):
    time.sleep(random.uniform(0.01, 0.06))
    mid = str(uuid.uuid4())
    db.execute("INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, created_at) "
               "VALUES (?, ?, ?, ?, ?, ?)", (mid, conv, frm, to, "from python %d" % i, int(time.time())))
    print(mid, repr(time.time()), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_writing_wakes_commits_within_the_latency_goal() {
    const ROWS: usize = 40;
    let scratch = Scratch::new("process");
    let alice = scratch.transport("alice").await;
    let mut commits = alice.commits();
    let db = scratch.db();
    let writer = python(
        PY_WRITER,
        &[db.to_str().unwrap(), "py-agent", "alice", &ROWS.to_string()],
    );

    let mut seen_at: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen_at.len() < ROWS {
        let woke = tokio::time::timeout_at(deadline.into(), commits.changed()).await;
        woke.expect("every row arrived in time")
            .expect("the watcher is running");
        let got = alice.poll(DEFAULT_POLL_LIMIT, None).await.unwrap();
        let now = wall_secs();
        for m in &got {
            assert_eq!(m.from, "py-agent");
            seen_at.entry(m.id.clone()).or_insert(now);
        }
        alice
            .ack(&got.iter().map(|m| m.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let out = tokio::task::spawn_blocking(move || writer.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());

    let mut latencies: Vec<f64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (id, committed) = line.split_once(' ').unwrap();
            let committed: f64 = committed.parse().unwrap();
            (seen_at[id] - committed).max(0.0) * 1000.0
        })
        .collect();
    assert_eq!(latencies.len(), ROWS);
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "cross-process commit -> poll latency over {ROWS} rows: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5),
        at(0.99),
        latencies[ROWS - 1]
    );
    assert!(latencies[ROWS - 1] < 1000.0, "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_wait_for_each_other_instead_of_failing() {
    const PER_AGENT: usize = 25;
    const PY_ROWS: usize = 40;
    let scratch = Scratch::new("writers");
    let inbox = scratch.transport("inbox").await;
    let db = scratch.db();
    let python_writer = python(
        PY_WRITER,
        &[
            db.to_str().unwrap(),
            "py-agent",
            "inbox",
            &PY_ROWS.to_string(),
        ],
    );

    let mut writers = Vec::new();
    for agent in ["w1", "w2", "w3", "w4"] {
        let transport = scratch.transport(agent).await;
        writers.push(tokio::spawn(async move {
            for i in 0..PER_AGENT {
                transport
                    .push("inbox", &format!("{i}"), None, None)
                    .await
                    .unwrap();
            }
        }));
    }
    // A reader acking as it goes: writes of its own, interleaved with theirs.
    let reader = {
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let mut handled = 0;
            while handled < 4 * PER_AGENT + PY_ROWS {
                let got = inbox.poll(20, None).await.unwrap();
                handled += got.len();
                inbox
                    .ack(&got.into_iter().map(|m| m.id).collect::<Vec<_>>())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    let out = tokio::task::spawn_blocking(move || python_writer.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();

    let conn = scratch.raw();
    let (rows, delivered): (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(status = 'delivered') FROM messages WHERE to_agent_id = 'inbox'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, delivered), ((4 * PER_AGENT + PY_ROWS) as i64, rows));
    let counted: i64 = conn
        .query_row("SELECT sum(message_count) FROM conversations", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        counted,
        (4 * PER_AGENT) as i64,
        "python does not count; we count every push"
    );
}

#[tokio::test]
async fn after_disconnect_every_call_is_not_connected() {
    let scratch = Scratch::new("disconnect");
    let alice = scratch.transport("alice").await;
    let clone = alice.clone();
    let mut commits = alice.commits();
    alice.disconnect().await;
    alice.disconnect().await;

    let not_connected =
        Error::NotConnected("LocalTransport is not connected: call connect() first".into());
    assert_eq!(
        clone.push("bob", "x", None, None).await.unwrap_err(),
        not_connected
    );
    assert_eq!(alice.poll(10, None).await.unwrap_err(), not_connected);
    assert_eq!(alice.ack(&["m".into()]).await.unwrap_err(), not_connected);
    assert_eq!(alice.ack(&[]).await.unwrap_err(), not_connected);
    assert_eq!(
        DirectSource::poll(&alice, 10, None).await.unwrap_err(),
        not_connected
    );
    assert_eq!(
        not_connected.to_string(),
        "LocalTransport is not connected: call connect() first"
    );

    let stopped = tokio::time::timeout(Duration::from_millis(200), commits.changed()).await;
    assert!(stopped.expect("the watcher stopped promptly").is_err());
    assert!(
        alice.commits().has_changed().is_err(),
        "a receiver taken later is closed too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_lives_as_long_as_a_handle_and_no_longer() {
    let scratch = Scratch::new("drop");
    let alice = scratch.transport("alice").await;
    let other = scratch.transport("bob").await;
    let clone = alice.clone();
    let mut commits = alice.commits();
    drop(alice);

    other
        .push("alice", "still watched", None, None)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), commits.changed())
        .await
        .expect("a clone keeps the watcher running")
        .unwrap();

    let started = Instant::now();
    drop(clone);
    let stopped = tokio::time::timeout(Duration::from_millis(200), commits.changed()).await;
    assert!(stopped.expect("the watcher stopped promptly").is_err());
    println!(
        "watcher stopped {:?} after the last handle dropped",
        started.elapsed()
    );
}

/// Process CPU time (user + system) in seconds, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_sec: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0);
    ticks / per_sec
}

/// Ten idle seconds with a connected transport and a consumer parked on `commits()`.
/// Ad hoc: `cargo test --lib idle_watcher_cpu -- --ignored --nocapture` (alone, so the
/// process's CPU time is the watcher's).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
#[ignore = "takes ten seconds; run alone to measure"]
async fn idle_watcher_cpu() {
    let scratch = Scratch::new("idle");
    let alice = scratch.transport("alice").await;
    let mut commits = alice.commits();
    let consumer = tokio::spawn(async move { commits.changed().await.is_ok() });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (cpu, wall) = (process_cpu_secs(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu, wall) = (process_cpu_secs() - cpu, wall.elapsed().as_secs_f64());
    println!(
        "idle watcher: {:.0} ms CPU over {wall:.1} s ({:.2}% of one core)",
        cpu * 1000.0,
        cpu / wall * 100.0
    );
    assert!(
        !consumer.is_finished(),
        "nothing committed, so nothing woke the consumer"
    );
    alice.disconnect().await;
    assert!(!consumer.await.unwrap(), "disconnect closes the channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_is_quiet_when_idle_and_never_pins_the_wal() {
    let scratch = Scratch::new("wal");
    let alice = scratch.transport("alice").await;
    let bob = scratch.transport("bob").await;
    for i in 0..20 {
        bob.push("alice", &format!("{i}"), None, None)
            .await
            .unwrap();
    }
    // Let the watcher catch up with those pushes first.
    tokio::time::sleep(WATCH_INTERVAL * 4).await;
    let mut commits = alice.commits();
    let quiet = tokio::time::timeout(Duration::from_millis(200), commits.changed()).await;
    assert!(quiet.is_err(), "no commit, no wake-up");

    // A watcher that left a read transaction open would keep a checkpoint from finishing,
    // and the WAL would grow for as long as the agent runs.
    let (busy, _, _): (i64, i64, i64) = scratch
        .raw()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0);
    let wal = std::fs::metadata(scratch.db().with_extension("db-wal")).unwrap();
    assert_eq!(wal.len(), 0);
}

#[tokio::test]
async fn push_refuses_what_poll_would_refuse() {
    let scratch = Scratch::new("cap");
    let alice = scratch.transport("alice").await;
    let huge = "x".repeat(MAX_CONTENT_BYTES + 1);
    assert!(matches!(
        alice.push("bob", &huge, None, None).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        alice.push(" ", "hi", None, None).await,
        Err(Error::Config(_))
    ));
    let at_cap = "x".repeat(MAX_CONTENT_BYTES);
    let id = alice.push("alice", &at_cap, None, None).await.unwrap();
    let got = alice.poll(1, None).await.unwrap();
    assert_eq!(
        (got[0].id.as_str(), got[0].content.len()),
        (id.as_str(), MAX_CONTENT_BYTES)
    );
}

/// The `agents` columns a local beat touches or must leave alone, declared as the cleo CLI's
/// migration declares them (the real table has two dozen more).
const AGENTS: &str = "CREATE TABLE agents (
  id TEXT PRIMARY KEY, agent_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'online', last_seen INTEGER,
  created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);";

type AgentRow = (String, Option<i64>, i64);

/// `(status, last_seen, updated_at)` of the row whose public id is `agent`.
fn agent_row(conn: &Connection, agent: &str) -> Option<AgentRow> {
    conn.query_row(
        "SELECT status, last_seen, updated_at FROM agents WHERE agent_id = ?1",
        [agent],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .unwrap()
}

#[tokio::test]
async fn a_local_beat_marks_the_agent_online_now_and_leaves_the_key_age_alone() {
    let scratch = Scratch::new("presence");
    let alice = scratch.transport("alice").await;
    scratch
        .raw()
        .execute_batch(&format!(
            "{AGENTS}
             INSERT INTO agents VALUES ('u-alice', 'alice', 'Alice', 'offline', NULL, 100, 200);
             INSERT INTO agents VALUES ('u-bob', 'bob', 'Bob', 'offline', 7, 100, 200);
             -- A row whose own id is 'alice' but whose agent is carol: not alice's row.
             INSERT INTO agents VALUES ('alice', 'carol', 'Carol', 'busy', 7, 100, 200);"
        ))
        .unwrap();

    let before = unix_now();
    alice.record_presence().await.unwrap();
    let (status, last_seen, updated_at) = agent_row(&scratch.raw(), "alice").unwrap();
    assert_eq!(status, "online");
    assert!(
        last_seen.is_some_and(|t| (before..=unix_now()).contains(&t)),
        "{last_seen:?}"
    );
    assert_eq!(
        updated_at, 200,
        "updated_at is the registry's key-age clock"
    );

    // Through the heartbeat's seam, again.
    scratch
        .raw()
        .execute(
            "UPDATE agents SET status = 'offline', last_seen = 5 WHERE agent_id = 'alice'",
            [],
        )
        .unwrap();
    Beat::beat(&alice).await.unwrap();
    let (status, last_seen, _) = agent_row(&scratch.raw(), "alice").unwrap();
    assert_eq!(status, "online");
    assert!(last_seen.is_some_and(|t| t >= before), "{last_seen:?}");

    let conn = scratch.raw();
    assert_eq!(
        agent_row(&conn, "bob"),
        Some(("offline".into(), Some(7), 200))
    );
    assert_eq!(
        agent_row(&conn, "carol"),
        Some(("busy".into(), Some(7), 200))
    );
}

#[tokio::test]
async fn a_local_beat_without_the_table_or_the_row_fails_and_changes_nothing() {
    let scratch = Scratch::new("presence-missing");
    let alice = scratch.transport("alice").await;
    let path = scratch.db().display().to_string();

    let err = alice.record_presence().await.unwrap_err();
    assert_eq!(
        err,
        Error::Storage(format!(
            "signaldock.db has no agents table (at {path}; the cleo CLI's agent registry creates it)"
        ))
    );
    scratch
        .raw()
        .execute_batch(&format!(
            "{AGENTS} INSERT INTO agents VALUES ('u-bob', 'bob', 'Bob', 'offline', 7, 100, 200);"
        ))
        .unwrap();
    let err = alice.record_presence().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "agent \"alice\" has no row in signaldock.db (agents table at {path}; `cleo agent register` adds it)"
        )
    );
    let conn = scratch.raw();
    assert_eq!(
        agent_row(&conn, "alice"),
        None,
        "a beat never creates a row"
    );
    assert_eq!(
        agent_row(&conn, "bob"),
        Some(("offline".into(), Some(7), 200))
    );

    alice.disconnect().await;
    assert!(matches!(
        alice.record_presence().await,
        Err(Error::NotConnected(_))
    ));
}

/// Polls `check` every 20 ms until it holds, for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_service_beats_into_the_file_and_counts_a_missing_row() {
    use crate::core::heartbeat::Heartbeat;

    let scratch = Scratch::new("presence-service");
    let alice = scratch.transport("alice").await;
    scratch.raw().execute_batch(AGENTS).unwrap();
    let heartbeat = Heartbeat::new(Arc::new(alice.clone()), Duration::from_millis(50));
    assert!(heartbeat.start());

    eventually("two failed beats", || {
        heartbeat.status().consecutive_failures >= 2
    })
    .await;
    let status = heartbeat.status();
    assert!(status.running);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("agent \"alice\" has no row in signaldock.db")),
        "{status:?}"
    );

    // `cleo agent register` adds the row: the next beat records presence and the count resets.
    let before = unix_now();
    scratch
        .raw()
        .execute(
            "INSERT INTO agents VALUES ('u-alice', 'alice', 'Alice', 'offline', NULL, 100, 200)",
            [],
        )
        .unwrap();
    eventually("a beat recorded", || {
        agent_row(&scratch.raw(), "alice")
            .is_some_and(|(status, seen, _)| status == "online" && seen >= Some(before))
    })
    .await;
    eventually("the failure count reset", || {
        heartbeat.status().consecutive_failures == 0
    })
    .await;

    heartbeat.stop();
    assert!(!heartbeat.status().running);
    scratch
        .raw()
        .execute(
            "UPDATE agents SET status = 'offline' WHERE agent_id = 'alice'",
            [],
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        agent_row(&scratch.raw(), "alice").map(|r| r.0),
        Some("offline".into()),
        "no beat after stop"
    );
}
