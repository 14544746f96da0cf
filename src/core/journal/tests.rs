//! The journal against real files in temporary directories.

use std::time::Duration;

use serde_json::Map;
use uuid::Uuid;

use super::*;

/// A temporary directory, removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("cleo-journal-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("runtime").join("bob.db")
    }

    fn open(&self) -> Arc<Journal> {
        Journal::open(JournalConfig::new(self.path(), "bob")).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn message(id: &str, group: Option<&str>) -> ConduitMessage {
    ConduitMessage {
        id: id.to_owned(),
        from: "alice".to_owned(),
        content: format!("content of {id}"),
        tags: None,
        thread_id: Some("conv-1".to_owned()),
        group_id: group.map(str::to_owned),
        timestamp: "2026-11-29T10:00:00.000Z".to_owned(),
        metadata: Some(Map::from_iter([("k".to_owned(), Value::from(1))])),
    }
}

fn incoming(id: &str, source: Source) -> Incoming {
    Incoming {
        source,
        message: message(id, None),
    }
}

/// Records `items` (not started, no group update) and returns their seqs, all pending.
async fn record_pending(journal: &Journal, items: Vec<Incoming>) -> Vec<i64> {
    seqs(&journal.record(items, Vec::new(), false).await.unwrap())
}

fn seqs(recorded: &[Recorded]) -> Vec<i64> {
    recorded
        .iter()
        .map(|r| match r {
            Recorded::Pending(seq) => *seq,
            Recorded::Handled => panic!("not pending: {r:?}"),
        })
        .collect()
}

#[test]
fn resolve_follows_the_cli_state_directory() {
    let scratch = Scratch::new();
    let with_cleo = scratch.dir.join("with");
    std::fs::create_dir_all(with_cleo.join(".cleo")).unwrap();
    let without = scratch.dir.join("without");
    std::fs::create_dir_all(&without).unwrap();
    let given = PathBuf::from("/srv/j.db");
    type Case<'a> = (
        &'a str,
        JournalSetting,
        Option<&'a str>,
        &'a Path,
        Option<PathBuf>,
    );
    let cases: Vec<Case> = vec![
        (
            "off wins",
            JournalSetting::Off,
            Some("/x"),
            &with_cleo,
            None,
        ),
        (
            "a path wins",
            JournalSetting::Path(given.clone()),
            Some("/x"),
            &without,
            Some(given.clone()),
        ),
        (
            "a relative path is the cwd's",
            JournalSetting::Path("j.db".into()),
            None,
            &without,
            Some(without.join("j.db")),
        ),
        (
            "CLEO_DIR",
            JournalSetting::Default,
            Some("/state"),
            &without,
            Some(PathBuf::from("/state/runtime/bob.db")),
        ),
        (
            "relative CLEO_DIR",
            JournalSetting::Default,
            Some("st"),
            &without,
            Some(without.join("st/runtime/bob.db")),
        ),
        (
            "empty CLEO_DIR, .cleo exists",
            JournalSetting::Default,
            Some(""),
            &with_cleo,
            Some(with_cleo.join(".cleo/runtime/bob.db")),
        ),
        (
            ".cleo exists",
            JournalSetting::Default,
            None,
            &with_cleo,
            Some(with_cleo.join(".cleo/runtime/bob.db")),
        ),
        (
            "no .cleo: in memory",
            JournalSetting::Default,
            None,
            &without,
            None,
        ),
    ];
    for (name, setting, cleo_dir, cwd, expected) in cases {
        let got = resolve(&setting, "bob", cleo_dir.map(OsStr::new), cwd);
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn file_stem_keeps_an_id_one_file_name() {
    let cases = [
        ("bob", "bob"),
        ("agent-7_x", "agent-7_x"),
        ("a/b", "a%2Fb"),
        ("..", "%2E%2E"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
        ("", "%00"),
    ];
    for (id, stem) in cases {
        assert_eq!(file_stem(id), stem, "{id:?}");
    }
}

#[tokio::test]
async fn unhandled_messages_come_back_in_order_with_the_started_ones_flagged() {
    let scratch = Scratch::new();
    let journal = scratch.open();
    let s = record_pending(
        &journal,
        vec![
            incoming("m1", Source::Stream),
            incoming("m2", Source::Direct),
            incoming("m3", Source::Stream),
            incoming("m4", Source::Group),
        ],
    )
    .await;
    assert!(s.windows(2).all(|w| w[0] < w[1]), "seqs ascend: {s:?}");
    journal.start(vec![s[0], s[1]]).await.unwrap();
    journal.settle(s[0]);
    journal.close();
    drop(journal);

    let journal = scratch.open();
    let recovered = journal.recover().await.unwrap();
    let got: Vec<(String, Source, State, Option<bool>)> = recovered
        .unhandled
        .iter()
        .cloned()
        .map(|e| {
            let source = e.source;
            let state = e.state;
            let m = e.into_offered();
            let flag = m
                .metadata
                .as_ref()
                .and_then(|m| m.get("redelivered"))
                .and_then(Value::as_bool);
            (m.id, source, state, flag)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("m2".into(), Source::Direct, State::Started, Some(true)),
            ("m3".into(), Source::Stream, State::Received, None),
            ("m4".into(), Source::Group, State::Received, None),
        ]
    );
    // The payload comes back whole.
    assert_eq!(recovered.unhandled[1].message, message("m3", None));
    assert_eq!(recovered.handled, vec!["m1".to_owned()]);
    assert_eq!(recovered.max_seq, s[3]);
}

#[tokio::test]
async fn recording_again_tells_handled_from_pending() {
    let scratch = Scratch::new();
    let journal = scratch.open();
    let s = record_pending(
        &journal,
        vec![
            Incoming {
                source: Source::Direct,
                message: message("copy-1", Some("g1")),
            },
            incoming("m2", Source::Stream),
        ],
    )
    .await;
    journal.settle(s[0]);
    // Another fan-out copy of g1 (another id, same groupId), m2 again, and a new one.
    let again = journal
        .record(
            vec![
                Incoming {
                    source: Source::Stream,
                    message: message("copy-2", Some("g1")),
                },
                incoming("m2", Source::Stream),
                incoming("m3", Source::Stream),
            ],
            Vec::new(),
            true,
        )
        .await
        .unwrap();
    assert_eq!(again[0], Recorded::Handled);
    assert_eq!(again[1], Recorded::Pending(s[1]));
    assert!(matches!(again[2], Recorded::Pending(seq) if seq > s[1]));
    let recovered = journal.recover().await.unwrap();
    let states: Vec<(String, State)> = recovered
        .unhandled
        .iter()
        .map(|e| (e.message.id.clone(), e.state))
        .collect();
    // `started` reached the pending one recorded before, too.
    assert_eq!(
        states,
        vec![("m2".into(), State::Started), ("m3".into(), State::Started)]
    );
    assert_eq!(recovered.handled, vec!["g1".to_owned()]);
}

#[tokio::test]
async fn group_positions_survive_and_keep_the_newest_rows() {
    let scratch = Scratch::new();
    let journal = scratch.open();
    let many: Vec<String> = (0..GROUP_ROWS_KEPT + 10).map(|i| format!("r{i}")).collect();
    journal
        .record(
            vec![incoming("mention", Source::Group)],
            vec![
                GroupUpdate {
                    conversation: "g-a".into(),
                    newest_ms: Some(2000),
                    floor_ms: Some(1000),
                    new_rows: many.clone(),
                },
                GroupUpdate {
                    conversation: "g-b".into(),
                    newest_ms: None,
                    floor_ms: None,
                    new_rows: Vec::new(),
                },
            ],
            false,
        )
        .await
        .unwrap();
    journal
        .record(
            Vec::new(),
            vec![GroupUpdate {
                conversation: "g-a".into(),
                newest_ms: Some(3000),
                floor_ms: Some(1000),
                new_rows: vec!["r20".into(), "late".into()],
            }],
            false,
        )
        .await
        .unwrap();
    journal.close();
    drop(journal);
    let recovered = scratch.open().recover().await.unwrap();
    let a = &recovered.groups["g-a"];
    assert_eq!((a.newest_ms, a.floor_ms), (Some(3000), Some(1000)));
    assert_eq!(a.known.len(), GROUP_ROWS_KEPT);
    assert_eq!(a.known.last().map(String::as_str), Some("late"));
    // Read before: kept where it was. The oldest rows go first.
    let first_kept = format!("r{}", 11);
    assert_eq!(a.known.first(), Some(&first_kept));
    assert!(!a.known.contains(&"r10".to_owned()));
    assert_eq!(recovered.groups["g-b"], GroupPosition::default());
    assert_eq!(recovered.unhandled.len(), 1);
}

#[tokio::test]
async fn unhandled_after_reads_the_stream_backlog_and_what_the_file_held() {
    let scratch = Scratch::new();
    let journal = scratch.open();
    let old = record_pending(&journal, vec![incoming("old-direct", Source::Direct)]).await;
    let boot_max = old[0];
    let new = record_pending(
        &journal,
        vec![
            incoming("new-direct", Source::Direct),
            incoming("s1", Source::Stream),
            incoming("g1", Source::Group),
            incoming("s2", Source::Stream),
        ],
    )
    .await;
    journal.settle(new[1]);
    let cases: Vec<(i64, usize, Vec<&str>)> = vec![
        (0, 10, vec!["old-direct", "s2"]),
        (boot_max, 10, vec!["s2"]),
        (0, 1, vec!["old-direct"]),
        (new[3], 10, vec![]),
    ];
    for (after, limit, expected) in cases {
        let got: Vec<String> = journal
            .unhandled_after(after, boot_max, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.message.id)
            .collect();
        assert_eq!(got, expected, "after {after}, limit {limit}");
    }
}

#[tokio::test]
async fn a_second_journal_on_one_file_is_refused_and_a_closing_one_is_waited_for() {
    let scratch = Scratch::new();
    let first = scratch.open();
    let err = Journal::open(JournalConfig::new(scratch.path(), "bob")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("in use by another runtime"), "{text}");
    assert!(text.contains("bob.db"), "{text}");
    // Closing: the next one waits for it rather than failing.
    first.closing();
    let path = scratch.path();
    let opener = std::thread::spawn(move || Journal::open(JournalConfig::new(path, "bob")));
    std::thread::sleep(Duration::from_millis(100));
    first.close();
    let second = opener
        .join()
        .unwrap()
        .expect("opened once the first closed");
    second.sync().await;
}

#[tokio::test]
async fn a_journal_locked_by_another_connection_is_refused() {
    let scratch = Scratch::new();
    // Made and locked the way another process's runtime would hold it.
    scratch.open().close();
    std::thread::sleep(Duration::from_millis(50));
    let other = Connection::open(scratch.path()).unwrap();
    other
        .pragma_update(None, "locking_mode", "EXCLUSIVE")
        .unwrap();
    other.execute_batch("BEGIN EXCLUSIVE; COMMIT;").unwrap();
    let err = Journal::open(JournalConfig::new(scratch.path(), "bob")).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(other);
    scratch.open().sync().await;
}

#[tokio::test]
async fn another_agents_journal_is_refused() {
    let scratch = Scratch::new();
    scratch.open().close();
    let err = loop {
        match Journal::open(JournalConfig::new(scratch.path(), "carol")) {
            Err(Error::Config(text)) if text.contains("in use") => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.unwrap_err(),
        }
    };
    assert!(
        err.to_string().contains("belongs to agent \"bob\""),
        "{err}"
    );
}

#[tokio::test]
async fn the_backlog_cap_makes_writers_wait_and_never_drops() {
    let scratch = Scratch::new();
    let mut config = JournalConfig::new(scratch.path(), "bob");
    config.cap_bytes = 1;
    let journal = Journal::open(config).unwrap();
    let s = record_pending(&journal, vec![incoming("m1", Source::Stream)]).await;
    assert!(journal.backlog_bytes() > 1);
    let waiting = tokio::time::timeout(Duration::from_millis(100), journal.wait_for_room()).await;
    assert!(waiting.is_err(), "over the cap: the writer waits");
    let room = {
        let journal = journal.clone();
        tokio::spawn(async move { journal.wait_for_room().await })
    };
    journal.settle(s[0]);
    tokio::time::timeout(Duration::from_secs(10), room)
        .await
        .expect("room once the handler caught up")
        .unwrap();
    assert_eq!(journal.backlog_bytes(), 0);
    // Recorded past the cap all the same: the cap holds writers back, it drops nothing.
    let more = journal
        .record(
            vec![
                incoming("m2", Source::Stream),
                incoming("m3", Source::Stream),
            ],
            Vec::new(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(seqs(&more).len(), 2);
}

#[tokio::test]
async fn handled_rows_are_pruned_to_the_dedup_window() {
    let scratch = Scratch::new();
    let journal = scratch.open();
    let total = HANDLED_KEPT + 2 * PRUNE_EVERY as usize;
    let items: Vec<Incoming> = (0..total)
        .map(|i| incoming(&format!("m{i}"), Source::Stream))
        .collect();
    let s = record_pending(&journal, items).await;
    for seq in &s {
        journal.settle(*seq);
    }
    let recovered = journal.recover().await.unwrap();
    assert_eq!(recovered.handled.len(), HANDLED_KEPT);
    assert_eq!(
        recovered.handled.last().map(String::as_str),
        Some(format!("m{}", total - 1).as_str())
    );
    assert!(recovered.unhandled.is_empty());
    assert_eq!(journal.backlog_bytes(), 0);
    // Pruned in the file, not just left out of what is read back.
    journal.close();
    drop(journal);
    let rows = {
        let conn = Connection::open(scratch.path()).unwrap();
        conn.query_row("SELECT COUNT(*) FROM messages", [], |row| {
            row.get::<_, i64>(0)
        })
        .unwrap()
    };
    assert!(
        rows as u64 <= HANDLED_KEPT as u64 + PRUNE_EVERY,
        "{rows} rows kept"
    );
}

#[tokio::test]
async fn a_page_is_recorded_started_and_settled_in_a_write_each() {
    // A page as the poller writes it: recorded, marked started, each message settled as its
    // handler returns (a synchronous handler: one burst), then the end of the batch.
    let scratch = Scratch::new();
    let journal = scratch.open();
    journal.sync().await;
    let cost = |before: JournalStats| {
        let now = journal.stats();
        (now.commits - before.commits, now.rows - before.rows)
    };
    let before = journal.stats();
    let items: Vec<Incoming> = (0..50)
        .map(|i| incoming(&format!("m{i}"), Source::Direct))
        .collect();
    let s = record_pending(&journal, items).await;
    assert_eq!(cost(before), (1, 50), "recording the page");
    let before = journal.stats();
    journal.start(s.clone()).await.unwrap();
    // One mark for the batch, not a row per message.
    assert_eq!(cost(before), (1, 1), "starting the page");
    let before = journal.stats();
    for seq in &s {
        journal.settle(*seq);
    }
    journal.flush();
    journal.sync().await;
    let (commits, rows) = cost(before);
    assert_eq!(rows, 50, "settling the page");
    // One transaction for the burst (a machine busy enough to stall this loop for longer
    // than the settle delay may split it), not one per message.
    assert!(commits <= 3, "{commits} commits to settle one page");
    let recovered = journal.recover().await.unwrap();
    assert!(recovered.unhandled.is_empty());
    assert_eq!(recovered.handled.len(), 50);
}

#[tokio::test]
async fn settles_are_written_without_being_asked_for() {
    // No batch end and no later write: a settle still reaches the file on its own, soon.
    let scratch = Scratch::new();
    let journal = scratch.open();
    let s = record_pending(&journal, vec![incoming("m1", Source::Stream)]).await;
    journal.start(s.clone()).await.unwrap();
    let before = journal.stats();
    journal.settle(s[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while journal.stats().commits == before.commits {
        assert!(Instant::now() < deadline, "the settle was never written");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    journal.close();
    drop(journal);
    let recovered = scratch.open().recover().await.unwrap();
    assert!(recovered.unhandled.is_empty());
    assert_eq!(recovered.handled, vec!["m1".to_owned()]);
}

#[tokio::test]
async fn taking_back_a_start_keeps_the_flag_of_one_started_before() {
    // m1 was in its handler when a runtime died; the next runtime offers it flagged, then
    // stops before handing it over: it was still possibly seen, and stays flagged. m2, marked
    // started by this runtime and never handed over, is offered again unflagged.
    let scratch = Scratch::new();
    let s = {
        let journal = scratch.open();
        let s = record_pending(
            &journal,
            vec![
                incoming("m1", Source::Stream),
                incoming("m2", Source::Stream),
            ],
        )
        .await;
        journal.start(vec![s[0]]).await.unwrap();
        journal.close();
        s
    };
    {
        let journal = scratch.open();
        let recovered = journal.recover().await.unwrap();
        assert_eq!(recovered.unhandled[0].state, State::Started);
        journal.start(vec![s[1]]).await.unwrap();
        journal.unstart(vec![s[0], s[1]]);
        journal.close();
    }
    let recovered = scratch.open().recover().await.unwrap();
    let states: Vec<(String, State)> = recovered
        .unhandled
        .iter()
        .map(|e| (e.message.id.clone(), e.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("m1".into(), State::Started),
            ("m2".into(), State::Received)
        ]
    );
}

#[tokio::test]
async fn the_log_is_copied_into_the_file_as_it_grows() {
    // Writes made on the caller's thread never checkpoint; the journal thread does, so the
    // log stays near CHECKPOINT_FRAMES however many writes come.
    let scratch = Scratch::new();
    let journal = scratch.open();
    for i in 0..3000 {
        journal
            .record(
                vec![incoming(&format!("m{i}"), Source::Stream)],
                Vec::new(),
                false,
            )
            .await
            .unwrap();
    }
    journal.sync().await;
    let wal = std::fs::metadata(scratch.path().with_extension("db-wal"))
        .unwrap()
        .len();
    let bound = 2 * u64::from(CHECKPOINT_FRAMES) * 4120;
    assert!(wal < bound, "the log grew to {wal} bytes");
    assert_eq!(journal.recover().await.unwrap().unhandled.len(), 3000);
}
