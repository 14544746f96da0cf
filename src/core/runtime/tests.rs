//! The composition root without Node: the plan as a table, and runtimes started over fake
//! caller objects (a transport, a registry, a stream factory) on tokio's paused clock.

use std::collections::VecDeque;

use super::*;
use crate::core::delivery::{Handler, Outcome, Settled};
use crate::core::key_rotation::RegistryCredential;
use crate::core::transport::Page;
use tokio_util::sync::CancellationToken;

fn credential(agent: &str, base: &str, config: Value) -> Credential {
    Credential::from_registry(json!({
        "agentId": agent, "apiKey": "sk_live_secret_key", "apiBaseUrl": base, "transportConfig": config,
    }))
    .expect("a credential")
}

/// Settings of a runtime that keeps no journal whatever `CLEO_DIR` says: the tests that
/// start one stay off the developer's state directory.
fn no_journal() -> Settings {
    Settings {
        journal: JournalSetting::Off,
        ..Settings::default()
    }
}

fn db() -> Option<PathBuf> {
    Some(PathBuf::from("/srv/project/.cleo/signaldock.db"))
}

/// Case, base URL, transportConfig, settings, local db, transport, realtime path.
type TransportCase = (
    &'static str,
    &'static str,
    Value,
    Settings,
    Option<PathBuf>,
    TransportChoice,
    Realtime,
);

/// Case, transportConfig, settings, poll interval, heartbeat, (max key age, overlap).
type ServicesCase = (
    &'static str,
    Value,
    Settings,
    Duration,
    Option<Duration>,
    Option<(Duration, Duration)>,
);

#[test]
fn the_plan_resolves_transport_and_realtime_path() {
    let http = "https://api.example";
    let sse = json!({ "sseEndpoint": "https://api.example/messages/stream" });
    let stream_url = Url::parse("https://api.example/messages/stream").unwrap();
    let local = TransportChoice::Local(db().unwrap());
    #[rustfmt::skip]
    let table: Vec<TransportCase> = vec![
        ("cloud, no endpoint", http, json!({}), Settings::default(), db(), TransportChoice::Http, Realtime::None),
        ("cloud, endpoint in the credential", http, sse.clone(), Settings::default(), None, TransportChoice::Sse, Realtime::Native(stream_url.clone())),
        ("cloud, endpoint in the config", http, json!({}), Settings { sse_endpoint: Some("https://api.example/messages/stream".into()), ..Settings::default() }, None, TransportChoice::Sse, Realtime::Native(stream_url.clone())),
        ("a factory decides whose stream delivers, not the transport", http, sse.clone(), Settings { caller_stream: true, ..Settings::default() }, None, TransportChoice::Sse, Realtime::Caller(stream_url.clone())),
        ("a factory without an endpoint has nothing to connect", http, json!({}), Settings { caller_stream: true, ..Settings::default() }, None, TransportChoice::Http, Realtime::None),
        ("local base with signaldock.db", "local", json!({}), Settings::default(), db(), local.clone(), Realtime::None),
        ("local base without signaldock.db", "local", json!({}), Settings::default(), None, TransportChoice::Http, Realtime::None),
        ("the caller's transport wins", http, sse.clone(), Settings { caller_transport: true, ..Settings::default() }, db(), TransportChoice::Caller, Realtime::Native(stream_url.clone())),
        ("the caller's transport on a local base", "local", json!({}), Settings { caller_transport: true, ..Settings::default() }, db(), TransportChoice::Caller, Realtime::None),
    ];
    for (case, base, config, settings, local_db, transport, realtime) in table {
        let plan = Plan::resolve(&credential("bob", base, config), &settings, local_db)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(plan.transport, transport, "{case}");
        assert_eq!(plan.realtime, realtime, "{case}");
        assert_eq!(plan.rest, base.starts_with("http"), "{case}");
    }
}

#[test]
fn the_plan_resolves_services_and_intervals() {
    let ms = Duration::from_millis;
    #[rustfmt::skip]
    let table: Vec<ServicesCase> = vec![
        ("defaults", json!({}), Settings::default(), ms(5000), Some(DEFAULT_INTERVAL), Some((KeyRotationConfig::new("x").max_key_age, ms(11_000)))),
        ("the credential's interval", json!({ "pollIntervalMs": 250 }), Settings::default(), ms(250), Some(DEFAULT_INTERVAL), Some((KeyRotationConfig::new("x").max_key_age, ms(1500)))),
        ("the config's interval over the credential's", json!({ "pollIntervalMs": 250 }), Settings { poll_interval: Some(ms(100)), ..Settings::default() }, ms(100), Some(DEFAULT_INTERVAL), Some((KeyRotationConfig::new("x").max_key_age, ms(1200)))),
        ("an unusable credential interval is ignored", json!({ "pollIntervalMs": -1 }), Settings::default(), ms(5000), Some(DEFAULT_INTERVAL), Some((KeyRotationConfig::new("x").max_key_age, ms(11_000)))),
        ("zero turns heartbeat and rotation off", json!({}), Settings { heartbeat_interval: Some(Duration::ZERO), max_key_age: Some(Duration::ZERO), ..Settings::default() }, ms(5000), None, None),
        ("given intervals", json!({}), Settings { heartbeat_interval: Some(ms(700)), max_key_age: Some(ms(9000)), ..Settings::default() }, ms(5000), Some(ms(700)), Some((ms(9000), ms(11_000)))),
    ];
    for (case, config, settings, poll, heartbeat, rotation) in table {
        let plan = Plan::resolve(
            &credential("bob", "https://api.example", config),
            &settings,
            None,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(plan.poller.poll_interval, poll, "{case}");
        assert_eq!(plan.poller.agent_id, "bob", "{case}");
        assert_eq!(plan.heartbeat, heartbeat, "{case}");
        let got = plan
            .key_rotation
            .as_ref()
            .map(|c| (c.max_key_age, c.overlap));
        assert_eq!(got, rotation, "{case}");
    }
    let settings = Settings {
        group_conversation_ids: vec!["g1".into()],
        group_poll_limit: Some(40),
        ..Settings::default()
    };
    let plan = Plan::resolve(
        &credential("bob", "https://api.example", json!({})),
        &settings,
        None,
    )
    .unwrap();
    assert_eq!(plan.poller.group_conversation_ids, ["g1"]);
    assert_eq!(plan.poller.group_poll_limit, 40);
}

#[test]
fn the_plan_refuses_what_cannot_work_before_anything_connects() {
    let groups = Settings {
        group_conversation_ids: vec!["g1".into()],
        ..Settings::default()
    };
    let no_beat = Settings {
        heartbeat_interval: Some(Duration::ZERO),
        ..Settings::default()
    };
    #[rustfmt::skip]
    let table: Vec<(&str, Credential, Settings, Option<&str>)> = vec![
        ("groups need REST", credential("bob", "local", json!({})), groups.clone(), Some("createRuntime: group conversations need an http(s) apiBaseUrl, the credential has \"local\"")),
        ("a key in the base URL is not quoted back", credential("bob", "ftp://sk_live_secret_key", json!({})), groups, Some("createRuntime: group conversations need an http(s) apiBaseUrl, the credential has \"ftp://[redacted]\"")),
        ("an endpoint must be an absolute URL", credential("bob", "https://api.example", json!({ "sseEndpoint": "/stream" })), Settings::default(), Some("createRuntime: sseEndpoint: ")),
        ("a REST heartbeat puts the id in the path", credential("..", "https://api.example", json!({})), Settings::default(), Some("createRuntime: heartbeat: the agent id \"..\" cannot be used")),
        ("no heartbeat, no path", credential("..", "https://api.example", json!({})), no_beat, None),
        ("a local heartbeat has no path", credential("..", "local", json!({})), Settings::default(), None),
    ];
    for (case, credential, settings, refused) in table {
        let resolved = Plan::resolve(&credential, &settings, db());
        match (resolved, refused) {
            (Ok(_), None) => {}
            (Err(StartError::Failed(why)), Some(start)) => {
                assert!(why.starts_with(start), "{case}: {why}");
                assert!(!why.contains("sk_live_secret_key"), "{case}: {why}");
            }
            (other, _) => panic!("{case}: {:?}", other.map(|p| p.transport)),
        }
    }
}

/// A registry with credentials by agent id (the first is the active one).
#[derive(Default)]
struct FakeRegistry {
    credentials: Vec<Value>,
    fails: Option<String>,
}

impl CredentialSource for FakeRegistry {
    fn credential(&self, agent_id: Option<&str>) -> BoxFuture<'_, Result<Option<Value>>> {
        let found = match agent_id {
            Some(id) => self.credentials.iter().find(|c| c["agentId"] == id),
            None => self.credentials.first(),
        };
        let answer = match &self.fails {
            Some(why) => Err(Error::Js(why.clone())),
            None => Ok(found.cloned()),
        };
        Box::pin(async move { answer })
    }
}

impl Registry for FakeRegistry {
    fn get(&self, _agent_id: &str) -> BoxFuture<'_, Result<Option<RegistryCredential>>> {
        Box::pin(async { Ok(None) })
    }

    fn rotate_key(&self, _agent_id: &str) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
}

#[tokio::test]
async fn the_credential_comes_from_the_registry_checked() {
    let bob = json!({ "agentId": "bob", "apiKey": "k", "apiBaseUrl": "local" });
    let registry = FakeRegistry {
        credentials: vec![bob.clone()],
        fails: None,
    };
    let active = Credential::fetch(&registry, None).await.unwrap();
    assert_eq!(active.agent_id, "bob");
    assert_eq!(
        Credential::fetch(&registry, Some("ghost")).await,
        Err(StartError::Failed(NO_CREDENTIAL.to_owned()))
    );
    let broken = FakeRegistry {
        credentials: vec![json!({ "agentId": "bob", "apiBaseUrl": "local" })],
        fails: None,
    };
    let Err(StartError::Failed(why)) = Credential::fetch(&broken, None).await else {
        panic!("a credential without a key");
    };
    assert!(
        why.starts_with("createRuntime: ") && why.contains("apiKey"),
        "{why}"
    );
    let failing = FakeRegistry {
        credentials: vec![],
        fails: Some("disk on fire".into()),
    };
    let Err(StartError::Failed(why)) = Credential::fetch(&failing, None).await else {
        panic!("a failing registry");
    };
    assert!(why.contains("disk on fire"), "{why}");
    let newline = FakeRegistry {
        credentials: vec![json!({ "agentId": "bo\nb", "apiKey": "k", "apiBaseUrl": "local" })],
        fails: None,
    };
    assert!(matches!(
        Credential::fetch(&newline, None).await,
        Err(StartError::Invalid(why)) if why.contains(credentials::AGENT_ID_RULE)
    ));
}

/// The caller's transport: pages from a queue; acks recorded, failing while `refuse_acks`.
#[derive(Default)]
struct FakeTransport {
    pages: Mutex<VecDeque<Vec<ConduitMessage>>>,
    connected: Mutex<Option<Value>>,
    acked: Mutex<Vec<String>>,
    refuse_acks: std::sync::atomic::AtomicBool,
}

impl DirectSource for FakeTransport {
    fn poll(&self, _limit: u32, _since: Option<String>) -> BoxFuture<'_, Result<Page>> {
        let messages = lock(&self.pages).pop_front().unwrap_or_default();
        Box::pin(async move {
            Ok(Page {
                messages,
                ..Page::default()
            })
        })
    }

    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
        let refused = self.refuse_acks.load(std::sync::atomic::Ordering::Relaxed);
        if !refused {
            lock(&self.acked).extend(ids);
        }
        Box::pin(async move {
            match refused {
                true => Err(Error::Network("refused".into())),
                false => Ok(()),
            }
        })
    }

    fn name(&self) -> String {
        "fake".into()
    }
}

impl CallerTransport for FakeTransport {
    fn connect(&self, config: Value) -> BoxFuture<'_, Result<()>> {
        *lock(&self.connected) = Some(config);
        Box::pin(async { Ok(()) })
    }
}

/// A handler that records what it was handed.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Handler for Recorder {
    fn deliver(
        &self,
        batch: Vec<ConduitMessage>,
        settled: Settled,
        _stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        for message in batch {
            lock(&self.0).push(message.id.clone());
            settled(&message.id, Outcome::Handled);
        }
        Box::pin(async {})
    }
}

fn message(id: &str) -> ConduitMessage {
    crate::core::message::from_transport_object(&json!({
        "id": id, "from": "alice", "content": format!("hello {id}"), "timestamp": "2026-01-01T00:00:00.000Z",
    }))
    .expect("a message")
}

/// A factory whose transport "connects" when told, and whose stop the runtime waits for.
#[derive(Default)]
struct FakeStreams {
    inbox: Mutex<Option<StreamInbox>>,
    config: Mutex<Option<Value>>,
}

impl CallerStreamFactory for FakeStreams {
    fn open(
        &self,
        connect_config: Value,
        inbox: StreamInbox,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Result<()>>>> {
        *lock(&self.inbox) = Some(inbox);
        *lock(&self.config) = Some(connect_config);
        Box::pin(async {
            Ok(Box::pin(async { Err(Error::Js("no server".into())) })
                as BoxFuture<'static, Result<()>>)
        })
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_runtime_over_the_callers_objects_delivers_once_and_hands_back_its_acks() {
    let credential = credential(
        "bob",
        "local",
        json!({ "pollIntervalMs": 1000, "sseEndpoint": "https://api.example/stream" }),
    );
    let settings = Settings {
        caller_transport: true,
        caller_stream: true,
        ..no_journal()
    };
    let plan = Plan::resolve(&credential, &settings, None).unwrap();
    assert!(!plan.rest, "no REST client on a local base");
    let transport = Arc::new(FakeTransport::default());
    let streams = Arc::new(FakeStreams::default());
    let runtime = Runtime::start(
        plan,
        Deps {
            registry: Arc::new(FakeRegistry::default()),
            transport: Some(transport.clone()),
            stream_factory: Some(streams.clone()),
        },
    )
    .await
    .unwrap();
    assert!(runtime.rest().is_none());
    assert!(
        runtime.take_own_transport().is_none(),
        "the caller's transport is theirs"
    );
    assert_eq!(
        lock(&transport.connected).as_ref().unwrap()["pollIntervalMs"],
        1000,
        "connect() gets the credential's transportConfig spread"
    );
    assert_eq!(
        lock(&streams.config).as_ref().unwrap()["sseEndpoint"],
        "https://api.example/stream"
    );
    assert!(
        runtime.heartbeat().is_none(),
        "no REST, no local db: no heartbeat"
    );

    let handler = Arc::new(Recorder::default());
    runtime.poller().set_handler(handler.clone());
    lock(&transport.pages).push_back(vec![message("m1"), message("m2")]);
    tokio::time::sleep(Duration::from_millis(1001)).await;
    settle().await;
    // The same messages over the stream: deduplicated against polling.
    let inbox = lock(&streams.inbox).clone().unwrap();
    assert!(inbox.offer(message("m2")));
    assert!(inbox.offer(message("m3")));
    settle().await;
    assert_eq!(*lock(&handler.0), ["m1", "m2", "m3"]);

    // m4 is polled and handled while acks fail: the runtime hands it back to ack on the
    // way out (a stream message is not the poller's to ack).
    transport
        .refuse_acks
        .store(true, std::sync::atomic::Ordering::Relaxed);
    lock(&transport.pages).push_back(vec![message("m4")]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    settle().await;
    let (stream_stopped, stream_stop) = tokio::sync::oneshot::channel::<()>();
    let stopping = runtime.stop(Some(Box::pin(async move {
        let _ = stream_stop.await;
        Ok(())
    })));
    assert_eq!(stopping.caller_acks, ["m4"]);
    let done = tokio::spawn(stopping.done.wait());
    settle().await;
    assert!(
        !inbox.offer(message("m5")),
        "stopped: nothing enters any more"
    );
    assert!(
        !done.is_finished(),
        "waits for the caller's stream to disconnect"
    );
    stream_stopped.send(()).unwrap();
    done.await.unwrap();
    assert!(
        runtime.stop(None).caller_acks.is_empty(),
        "a second stop has nothing left"
    );
    assert_eq!(*lock(&handler.0), ["m1", "m2", "m3", "m4"]);
}

#[tokio::test(start_paused = true)]
async fn the_stream_queue_is_bounded_and_leaves_the_overflow_to_polling() {
    let (tx, mut rx) = mpsc::channel(2);
    let inbox = StreamInbox(tx);
    assert!(inbox.offer(message("a")));
    assert!(inbox.offer(message("b")));
    assert!(!inbox.offer(message("c")), "full: left to polling");
    assert_eq!(rx.recv().await.unwrap().id, "a");
    assert!(inbox.offer(message("d")));
    drop(rx);
    assert!(!inbox.offer(message("e")), "closed");
}

#[tokio::test]
async fn a_local_runtime_polls_on_commits_and_takes_its_handed_out_transport_back_at_stop() {
    let dir = std::env::temp_dir().join(format!("cleo-runtime-{}", uuid::Uuid::new_v4()));
    let path = dir.join("signaldock.db");
    local::ensure_schema(&path).unwrap();
    // Polling alone would not look again for a minute.
    let plan = Plan::resolve(
        &credential("bob", "local", json!({ "pollIntervalMs": 60_000 })),
        &Settings {
            max_key_age: Some(Duration::ZERO),
            ..no_journal()
        },
        Some(path.clone()),
    )
    .unwrap();
    let runtime = Runtime::start(
        plan,
        Deps {
            registry: Arc::new(FakeRegistry::default()),
            transport: None,
            stream_factory: None,
        },
    )
    .await
    .unwrap();
    assert!(runtime.heartbeat().is_some(), "beats into signaldock.db");
    assert!(runtime.key_rotation().is_none());
    let Some(OwnTransport::Local(slot)) = runtime.take_own_transport() else {
        panic!("the local transport");
    };
    assert!(runtime.take_own_transport().is_none(), "handed out once");
    assert!(lock(&slot).is_some());

    // Another writer commits a message for bob: the commit, not the interval, polls.
    let handler = Arc::new(Recorder::default());
    runtime.poller().set_handler(handler.clone());
    // The poll the handler asks for is over before the commit.
    runtime.poller().poll_now_and_wait().await.unwrap();
    let alice = LocalTransport::connect(path.clone(), "alice".into())
        .await
        .unwrap();
    let id = alice.push("bob", "hi bob", None, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while lock(&handler.0).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("delivered on the commit, long before the next poll");
    assert_eq!(*lock(&handler.0), [id]);
    alice.disconnect().await;
    let stopping = runtime.stop(None);
    assert!(
        lock(&slot).is_none(),
        "the handed-out transport refuses calls now"
    );
    tokio::time::timeout(Duration::from_secs(30), stopping.done.wait())
        .await
        .expect("the stop completes");
    assert!(!runtime.poller().is_running());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stream endpoint on 127.0.0.1: each connection gets a 200, one message, then stays open
/// until `close` is notified.
async fn stream_server(close: Arc<tokio::sync::Notify>) -> Url {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/stream", listener.local_addr().unwrap())).unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let close = close.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let payload = json!({"id": "s1", "from": "alice", "content": "pushed",
                    "timestamp": "2026-01-02T00:00:00.000Z"});
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: {payload}\n\n"
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                close.notified().await;
            });
        }
    });
    url
}

#[tokio::test]
async fn the_native_stream_sets_the_pollers_pace_and_delivers_into_it() {
    let close = Arc::new(tokio::sync::Notify::new());
    let url = stream_server(close.clone()).await;
    let credential = credential(
        "bob",
        "local",
        json!({ "pollIntervalMs": 60_000, "sseEndpoint": url.as_str() }),
    );
    let settings = Settings {
        caller_transport: true,
        max_key_age: Some(Duration::ZERO),
        ..no_journal()
    };
    let plan = Plan::resolve(&credential, &settings, None).unwrap();
    assert_eq!(plan.realtime, Realtime::Native(url));
    let transport = Arc::new(FakeTransport::default());
    let runtime = Runtime::start(
        plan,
        Deps {
            registry: Arc::new(FakeRegistry::default()),
            transport: Some(transport.clone()),
            stream_factory: None,
        },
    )
    .await
    .unwrap();
    let handler = Arc::new(Recorder::default());
    runtime.poller().set_handler(handler.clone());
    let eventually = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(Duration::from_secs(30), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    };
    let poller = runtime.poller().clone();
    eventually(
        "the stream is up",
        Box::new(move || poller.status().realtime),
    )
    .await;
    let seen = handler.clone();
    eventually(
        "the pushed message reaches the poller's handler",
        Box::new(move || lock(&seen.0).contains(&"s1".to_owned())),
    )
    .await;
    close.notify_waiters();
    let poller = runtime.poller().clone();
    eventually(
        "the drop is seen",
        Box::new(move || !poller.status().realtime),
    )
    .await;
    runtime.stop(None).done.wait().await;
    assert_eq!(*lock(&handler.0), ["s1"], "once");
}

#[tokio::test]
async fn the_journal_opens_before_anything_connects_and_keeps_the_pollers_state() {
    let dir = std::env::temp_dir().join(format!("cleo-runtime-{}", uuid::Uuid::new_v4()));
    let path = dir.join("runtime").join("bob.db");
    let credential = credential("bob", "local", json!({ "pollIntervalMs": 20 }));
    let settings = Settings {
        caller_transport: true,
        max_key_age: Some(Duration::ZERO),
        journal: JournalSetting::Path(path.clone()),
        ..Settings::default()
    };
    let plan = |settings: &Settings| Plan::resolve(&credential, settings, None).unwrap();
    assert_eq!(plan(&settings).journal, JournalSetting::Path(path.clone()));
    assert_eq!(plan(&Settings::default()).journal, JournalSetting::Default);
    let start = |settings: &Settings, transport: Arc<FakeTransport>| {
        Runtime::start(
            plan(settings),
            Deps {
                registry: Arc::new(FakeRegistry::default()),
                transport: Some(transport),
                stream_factory: None,
            },
        )
    };
    let eventually = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(Duration::from_secs(30), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    };

    let first = Arc::new(FakeTransport::default());
    let runtime = start(&settings, first.clone()).await.unwrap();
    assert_eq!(
        runtime.poller().journal().map(|j| j.path().to_owned()),
        Some(path.clone()),
        "the poller keeps its state in the plan's journal"
    );
    // One runtime per journal: a second one fails before it connects anything.
    let second = Arc::new(FakeTransport::default());
    let Err(StartError::Failed(why)) = start(&settings, second.clone()).await else {
        panic!("a second runtime on one journal");
    };
    assert!(why.starts_with("createRuntime: journal: "), "{why}");
    assert!(lock(&second.connected).is_none(), "{why}");

    // m1 is handled while its ack fails: the server offers it again after the restart, and
    // the journal knows it was handled.
    first
        .refuse_acks
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let handler = Arc::new(Recorder::default());
    runtime.poller().set_handler(handler.clone());
    lock(&first.pages).push_back(vec![message("m1")]);
    let seen = handler.clone();
    eventually("m1 is handled", Box::new(move || lock(&seen.0).len() == 1)).await;
    runtime.stop(None).done.wait().await;
    drop(runtime);

    let again = Arc::new(FakeTransport::default());
    lock(&again.pages).push_back(vec![message("m1"), message("m2")]);
    let restarted = start(&settings, again.clone()).await.unwrap();
    let handler = Arc::new(Recorder::default());
    restarted.poller().set_handler(handler.clone());
    let seen = handler.clone();
    eventually(
        "m2 is handled",
        Box::new(move || lock(&seen.0).contains(&"m2".to_owned())),
    )
    .await;
    let acked = again.clone();
    eventually(
        "m1 is acked again, not handled again",
        Box::new(move || lock(&acked.acked).contains(&"m1".to_owned())),
    )
    .await;
    assert_eq!(*lock(&handler.0), ["m2"]);
    restarted.stop(None).done.wait().await;

    let off = Settings {
        journal: JournalSetting::Off,
        ..settings
    };
    let runtime = start(&off, Arc::new(FakeTransport::default()))
        .await
        .unwrap();
    assert!(runtime.poller().journal().is_none(), "journal: false");
    runtime.stop(None).done.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
