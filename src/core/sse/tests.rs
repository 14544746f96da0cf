//! The client against a loopback HTTP/1.1 server scripted connection by connection.
//!
//! Real sockets and real time: durations are shrunk through [`SseConfig`] and assertions use
//! lower bounds that timers guarantee (a sleep never ends early) and upper bounds with room
//! for a loaded machine.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;

/// Room on top of a computed delay for scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(250);
/// How long a test waits for something that should happen soon.
const PATIENCE: Duration = Duration::from_secs(5);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ----- the server -----

#[derive(Clone, Debug)]
enum Step {
    Send(Vec<u8>),
    Wait(Duration),
}

#[derive(Clone, Copy, Debug)]
enum Then {
    /// Close the connection after the steps.
    Close,
    /// Keep it open and quiet until the client goes.
    Silent,
}

/// What the server does on one connection.
#[derive(Clone, Debug)]
struct Script {
    /// 0: read the request and never answer.
    status: u16,
    headers: Vec<(&'static str, String)>,
    head_delay: Duration,
    steps: Vec<Step>,
    then: Then,
}

impl Script {
    /// A 200 event stream that stays open and silent.
    fn ok() -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            head_delay: Duration::ZERO,
            steps: Vec::new(),
            then: Then::Silent,
        }
    }

    fn status(status: u16) -> Self {
        Self {
            status,
            then: Then::Close,
            ..Self::ok()
        }
    }

    fn hang() -> Self {
        Self::status(0).silent()
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn head_delay(mut self, delay: Duration) -> Self {
        self.head_delay = delay;
        self
    }

    fn send(mut self, frame: impl Into<Vec<u8>>) -> Self {
        self.steps.push(Step::Send(frame.into()));
        self
    }

    fn wait(mut self, delay: Duration) -> Self {
        self.steps.push(Step::Wait(delay));
        self
    }

    fn close(mut self) -> Self {
        self.then = Then::Close;
        self
    }

    fn silent(mut self) -> Self {
        self.then = Then::Silent;
        self
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    at: Instant,
    closed: Arc<Mutex<Option<Instant>>>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn closed(&self) -> bool {
        lock(&self.closed).is_some()
    }
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Server {
    /// Serves `scripts` in order, then `fallback` for every later connection.
    async fn start(scripts: Vec<Script>, fallback: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let scripts = Arc::new(Mutex::new(VecDeque::from(scripts)));
        let accept = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let script = lock(&scripts)
                        .pop_front()
                        .unwrap_or_else(|| fallback.clone());
                    tokio::spawn(serve(socket, script, seen.clone()));
                }
            }
        });
        Self { addr, seen, accept }
    }

    fn url(&self) -> Url {
        SseConfig::default_url(&format!("http://{}/api", self.addr)).unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    fn count(&self) -> usize {
        lock(&self.seen).len()
    }

    async fn wait_for_requests(&self, n: usize) -> Vec<Seen> {
        eventually(&format!("{n} requests"), || self.count() >= n).await;
        self.seen()
    }

    /// Gaps between consecutive requests.
    fn gaps(&self) -> Vec<Duration> {
        let seen = self.seen();
        seen.windows(2).map(|w| w[1].at - w[0].at).collect()
    }
}

async fn serve(mut socket: TcpStream, script: Script, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let closed = Arc::new(Mutex::new(None));
    lock(&seen).push(Seen {
        line,
        headers,
        at: Instant::now(),
        closed: closed.clone(),
    });

    // A write error means the client went away: the script is over either way.
    let _ = respond(&mut socket, &script).await;
    match script.then {
        Then::Close => {
            let _ = socket.shutdown().await;
        }
        Then::Silent => while let Ok(1..) = socket.read(&mut buf).await {},
    }
    *lock(&closed) = Some(Instant::now());
}

async fn respond(socket: &mut TcpStream, script: &Script) -> std::io::Result<()> {
    if script.status == 0 {
        return Ok(());
    }
    tokio::time::sleep(script.head_delay).await;
    let mut head = format!(
        "HTTP/1.1 {} Scripted\r\nConnection: close\r\n",
        script.status
    );
    let has = |name: &str| {
        script
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    if script.status == 200 && !has("content-type") {
        head.push_str("Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n");
    }
    if script.status != 200 {
        head.push_str("Content-Length: 0\r\n");
    }
    for (name, value) in &script.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    for step in &script.steps {
        match step {
            Step::Send(frame) => {
                socket.write_all(frame).await?;
                socket.flush().await?;
            }
            Step::Wait(delay) => tokio::time::sleep(*delay).await,
        }
    }
    Ok(())
}

// ----- the client side -----

const KEY: &str = "sk-alice-0123456789";

fn credentials() -> Arc<Credentials> {
    Credentials::new("alice", ApiKey::new(KEY))
}

/// Fast everything, so each test states only what it is about.
fn config(url: Url) -> SseConfig {
    SseConfig {
        backoff: Backoff {
            base: ms(20),
            max: ms(200),
        },
        healthy_after: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
        min_retry: ms(1),
        unauthorized_delay: Duration::from_secs(10),
        ..SseConfig::new(url)
    }
}

struct Collect {
    tx: mpsc::UnboundedSender<ConduitMessage>,
    delay: Duration,
}

impl SseSink for Collect {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let _ = self.tx.send(message);
        })
    }
}

fn collect(delay: Duration) -> (Arc<Collect>, mpsc::UnboundedReceiver<ConduitMessage>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Collect { tx, delay }), rx)
}

/// A consumer that never finishes with a message.
#[derive(Default)]
struct Stuck {
    calls: AtomicUsize,
}

impl SseSink for Stuck {
    fn deliver(&self, _message: ConduitMessage) -> BoxFuture<'_, ()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::pending())
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<ConduitMessage>) -> ConduitMessage {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a message in time")
        .expect("the sink is alive")
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(ms(5)).await;
    }
}

async fn state(client: &SseClient, want: SseState) {
    eventually(&format!("state {want}"), || client.status().state == want).await;
}

fn snake(id: &str, from: &str, content: &str) -> String {
    let payload = json!({"message_id": id, "conversation_id": "c1", "from_agent_id": from,
        "from_agent_name": from, "to_agent_id": "alice", "content": content,
        "content_type": "text", "created_at": "2026-01-01T00:00:00.000Z", "attachments": []});
    format!("data: {payload}\n\n")
}

fn camel(id: &str, from: &str, content: &str) -> String {
    let payload = json!({"id": id, "from": from, "content": content, "threadId": "c2",
        "timestamp": "2026-01-02T00:00:00.000Z"});
    format!("data: {payload}\n\n")
}

const CONNECTED: &str = "event: connected\ndata: {\"agentId\":\"alice\"}\n\n";

fn between(what: &str, got: Duration, low: Duration, high: Duration) {
    assert!(
        got >= low && got <= high,
        "{what}: {got:?} not within {low:?}..={high:?}"
    );
}

// ----- the tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_auth_headers_and_keeps_the_key_out_of_the_url() {
    let server = Server::start(
        vec![Script::ok().send(CONNECTED).send(snake("m1", "bob", "hi"))],
        Script::ok(),
    )
    .await;
    let client = SseClient::new(credentials(), config(server.url()));
    let (sink, mut rx) = collect(Duration::ZERO);
    assert!(client.start(sink.clone()));
    assert!(!client.start(sink), "start is idempotent");

    assert_eq!(next(&mut rx).await.id, "m1");
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.line, "GET /api/messages/stream HTTP/1.1");
    assert!(!request.line.contains(KEY));
    assert_eq!(
        request.header("authorization"),
        Some(&*format!("Bearer {KEY}"))
    );
    assert_eq!(request.header("x-agent-id"), Some("alice"));
    assert_eq!(request.header("accept"), Some("text/event-stream"));
    assert_eq!(request.header("last-event-id"), None);

    eventually("m1 counted", || client.status().delivered == 1).await;
    let status = client.status();
    assert_eq!(status.state, SseState::Connected);
    assert_eq!((status.malformed, status.reconnects), (0, 0));
    assert!(clock::parse_iso_ms(status.last_event_at.as_deref().unwrap()).is_some());
    assert_eq!(status.last_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_both_shapes_and_skips_the_rest() {
    let stream = Script::ok()
        .send(CONNECTED)
        .send(": a comment\n\n")
        .send("data: {\"type\":\"heartbeat\"}\n\n")
        .send("data: {\"type\":\"ping\"}\n\n")
        .send("event: heartbeat\ndata: {}\n\n")
        .send("event: ping\ndata: 1\n\n")
        .send(snake("own-1", "alice", "my own"))
        .send(camel("own-2", "alice", "mine too"))
        .send("data: not json\n\n")
        .send("data: {\"content\":\"no id\"}\n\n")
        .send(snake("m1", "bob", "hi"))
        // A multi-line data field in pieces, the way TCP may cut it.
        .send("data: {\"id\":\"m2\",\"from\":\"carol\",\n")
        .send("data: \"content\":\"yo\",\"threadId\":\"c2\",")
        .send("\"timestamp\":\"2026-01-02T00:00:00.000Z\"}\n\n");
    let server = Server::start(vec![stream], Script::ok()).await;
    let client = SseClient::new(credentials(), config(server.url()));
    let (sink, mut rx) = collect(Duration::ZERO);
    client.start(sink);

    let a = next(&mut rx).await;
    assert_eq!(
        (
            a.id.as_str(),
            a.from.as_str(),
            a.content.as_str(),
            a.thread_id.as_deref()
        ),
        ("m1", "bob", "hi", Some("c1"))
    );
    assert_eq!(a.timestamp, "2026-01-01T00:00:00.000Z");
    let b = next(&mut rx).await;
    assert_eq!(
        (
            b.id.as_str(),
            b.from.as_str(),
            b.content.as_str(),
            b.thread_id.as_deref()
        ),
        ("m2", "carol", "yo", Some("c2"))
    );
    tokio::time::sleep(ms(100)).await;
    assert!(rx.try_recv().is_err(), "nothing else was delivered");
    let status = client.status();
    assert_eq!((status.delivered, status.malformed), (2, 2));
    assert_eq!(
        status.reconnects, 0,
        "skips and malformed data do not drop the stream"
    );
    assert_eq!(status.state, SseState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_reconnects_with_the_last_event_id() {
    let first = Script::ok()
        .send(CONNECTED)
        .send(format!("id: 7\n{}", snake("m7", "bob", "seven")))
        // Ids count on events that are skipped, too.
        .send("id: 8\ndata: {\"type\":\"heartbeat\"}\n\n")
        .close();
    let second = Script::ok().send(format!("id: 9\n{}", snake("m9", "bob", "nine")));
    let server = Server::start(vec![first, second], Script::ok()).await;
    let client = SseClient::new(credentials(), config(server.url()));
    let (sink, mut rx) = collect(Duration::ZERO);
    client.start(sink);

    assert_eq!(next(&mut rx).await.id, "m7");
    assert_eq!(next(&mut rx).await.id, "m9");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("last-event-id"), None);
    assert_eq!(seen[1].header("last-event-id"), Some("8"));
    // The id is recorded once the sink is done with the message, just after it got it.
    eventually("the id of m9", || {
        client.status().last_event_id.as_deref() == Some("9")
    })
    .await;
    let status = client.status();
    assert_eq!(status.reconnects, 1);
    assert_eq!(status.state, SseState::Connected);
    assert_eq!(
        status.last_error.as_deref(),
        Some("the server closed the stream")
    );

    // A restart resumes from the same place.
    client.stop();
    client.start(collect(Duration::ZERO).0);
    let seen = server.wait_for_requests(3).await;
    assert_eq!(seen[2].header("last-event-id"), Some("9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_grows_and_resets_only_after_a_healthy_stream() {
    let refused = || Script::status(503);
    let server = Server::start(
        vec![
            refused(),                          // failure 1: 50..100 ms
            refused(),                          // failure 2: 100..200 ms
            refused(),                          // failure 3: 200..400 ms
            Script::ok().wait(ms(400)).close(), // healthy, then dropped: failure 1 again
            refused(),                          // failure 2: 100..200 ms
            Script::ok().wait(ms(50)).close(),  // up too briefly: failure 3
        ],
        Script::ok(),
    )
    .await;
    let mut config = config(server.url());
    config.backoff = Backoff {
        base: ms(100),
        max: ms(10_000),
    };
    config.healthy_after = ms(300);
    let client = SseClient::new(credentials(), config);
    client.start(collect(Duration::ZERO).0);
    server.wait_for_requests(7).await;
    let gaps = server.gaps();

    between("after failure 1", gaps[0], ms(50), ms(100) + SLACK);
    between("after failure 2", gaps[1], ms(100), ms(200) + SLACK);
    between("after failure 3", gaps[2], ms(200), ms(400) + SLACK);
    // Without the reset this would be failure 4: at least 400 ms after the 400 ms stream.
    between(
        "after a healthy stream",
        gaps[3],
        ms(400 + 50),
        ms(400 + 100) + SLACK,
    );
    between("failing again", gaps[4], ms(100), ms(200) + SLACK);
    between(
        "after a short stream",
        gaps[5],
        ms(50 + 200),
        ms(50 + 400) + SLACK,
    );
    assert_eq!(client.status().reconnects, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_retry_replaces_the_base_above_a_floor() {
    let server = Server::start(
        vec![
            // A standalone retry frame (no data): the parser would drop it.
            Script::ok().send("retry: 400\n\n").close(),
            Script::ok().send("retry: 1\n\n").close(),
        ],
        Script::ok(),
    )
    .await;
    let mut config = config(server.url());
    config.min_retry = ms(300);
    let client = SseClient::new(credentials(), config);
    client.start(collect(Duration::ZERO).0);
    server.wait_for_requests(3).await;
    let gaps = server.gaps();

    // Base 20 ms otherwise: these only pass if `retry:` was read.
    between("retry: 400", gaps[0], ms(200), ms(400) + SLACK);
    // retry: 1 is floored at 300 ms (second failure: ceiling 600 ms).
    between("retry: 1", gaps[1], ms(300), ms(600) + SLACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_their_own_waits() {
    let server = Server::start(
        vec![
            Script::status(429).header("Retry-After", "1"),
            Script::ok()
                .header("Content-Type", "text/html")
                .send("<html>"),
            Script::status(307).header("Location", "/elsewhere"),
            Script::status(500),
        ],
        Script::ok().send(CONNECTED),
    )
    .await;
    let client = SseClient::new(credentials(), config(server.url()));
    client.start(collect(Duration::ZERO).0);
    server.wait_for_requests(5).await;
    state(&client, SseState::Connected).await;

    let gaps = server.gaps();
    between("Retry-After: 1", gaps[0], ms(1000), ms(1000) + SLACK);
    let seen = server.seen();
    assert!(
        seen.iter()
            .all(|s| s.line == "GET /api/messages/stream HTTP/1.1"),
        "the redirect was not followed: {seen:?}"
    );
    assert_eq!(seen.len(), 5);
    assert_eq!(client.status().reconnects, 4);
    assert_eq!(
        client.status().last_error.as_deref(),
        Some("HTTP 500: Internal Server Error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_are_retried_for_ever() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = Url::parse(&format!("http://127.0.0.1:{port}/{KEY}/stream")).unwrap();
    let client = SseClient::new(credentials(), config(url));
    client.start(collect(Duration::ZERO).0);
    eventually("a few attempts", || client.status().reconnects >= 3).await;
    let status = client.status();
    assert_eq!(status.state, SseState::Reconnecting);
    let error = status.last_error.unwrap();
    assert!(error.starts_with("network error"), "{error}");
    assert!(!error.contains(KEY), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_is_death_but_comments_are_life() {
    let keep_alive = (0..12).fold(Script::ok().send(CONNECTED), |s, _| {
        s.wait(ms(100)).send(": k\n")
    });
    let server = Server::start(
        vec![
            Script::hang(),               // no answer at all
            Script::ok().send(CONNECTED), // answers, then silence
            keep_alive,                   // 1.2 s of comments, then silence
        ],
        Script::ok(),
    )
    .await;
    let mut config = config(server.url());
    config.idle_timeout = ms(300);
    let client = SseClient::new(credentials(), config);
    client.start(collect(Duration::ZERO).0);

    let seen = server.wait_for_requests(3).await;
    let gaps = server.gaps();
    between(
        "waiting for an answer",
        gaps[0],
        ms(300),
        ms(300 + 20) + SLACK,
    );
    between("silent stream", gaps[1], ms(300), ms(300 + 40) + SLACK);
    eventually("the dead connections closed", || {
        seen[0].closed() && seen[1].closed()
    })
    .await;
    assert!(
        client
            .status()
            .last_error
            .unwrap()
            .starts_with("nothing from the server")
    );

    tokio::time::sleep(ms(900)).await;
    assert_eq!(server.count(), 3, "comments kept the third stream alive");
    server.wait_for_requests(4).await;
    between(
        "after the comments stopped",
        server.gaps()[2],
        ms(1200 + 300),
        ms(1200 + 300 + 40) + SLACK,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_pauses_reading_without_tripping_the_watchdog() {
    let server = Server::start(
        vec![
            Script::ok()
                .send(snake("m1", "bob", "1"))
                .send(snake("m2", "bob", "2"))
                .send(snake("m3", "bob", "3")),
        ],
        Script::ok(),
    )
    .await;
    let mut config = config(server.url());
    config.idle_timeout = ms(300);
    let client = SseClient::new(credentials(), config);
    let (sink, mut rx) = collect(ms(200));
    let started = Instant::now();
    client.start(sink);
    for id in ["m1", "m2", "m3"] {
        assert_eq!(next(&mut rx).await.id, id);
    }
    assert!(started.elapsed() >= ms(600), "each delivery was awaited");
    assert_eq!(
        server.count(),
        1,
        "900 ms of deliveries is not 300 ms of silence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_event_drops_the_connection() {
    let huge = format!("data: \"{}", "x".repeat(guard::MAX_EVENT_BYTES));
    let server = Server::start(
        vec![Script::ok().send(huge)],
        Script::ok().send(snake("m1", "bob", "after")),
    )
    .await;
    let client = SseClient::new(credentials(), config(server.url()));
    let (sink, mut rx) = collect(Duration::ZERO);
    client.start(sink);
    assert_eq!(next(&mut rx).await.id, "m1");
    let status = client.status();
    assert_eq!((status.malformed, status.reconnects), (1, 1));
    let error = status.last_error.unwrap();
    assert!(error.contains("larger than"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_parser_cannot_take_is_counted_and_survived() {
    let server = Server::start(
        vec![
            Script::ok().send(&b"data: \xff\n\n"[..]),
            // An event with nothing the parser keeps (a `retry:` that is not a number). An
            // unknown field is no longer one: those lines are filtered out (guard.rs).
            Script::ok().send("retry: x\n\n"),
            Script::status(204),
        ],
        Script::ok().send(snake("m1", "bob", "after")),
    )
    .await;
    let client = SseClient::new(credentials(), config(server.url()));
    let (sink, mut rx) = collect(Duration::ZERO);
    client.start(sink);
    assert_eq!(next(&mut rx).await.id, "m1");
    let status = client.status();
    assert_eq!((status.malformed, status.reconnects), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_waits_before_trying_the_key_again() {
    let server = Server::start(vec![Script::status(401)], Script::ok().send(CONNECTED)).await;
    let mut config = config(server.url());
    config.unauthorized_delay = ms(500);
    let client = SseClient::new(credentials(), config);
    client.start(collect(Duration::ZERO).0);
    server.wait_for_requests(2).await;
    between("after a 401", server.gaps()[0], ms(500), ms(500) + SLACK);
    state(&client, SseState::Connected).await;
    assert_eq!(
        client.status().last_error.as_deref(),
        Some("HTTP 401: Unauthorized")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_ends_the_unauthorized_wait() {
    let server = Server::start(vec![Script::status(401)], Script::ok().send(CONNECTED)).await;
    let credentials = credentials();
    let client = SseClient::new(credentials.clone(), config(server.url())); // waits 10 s
    client.start(collect(Duration::ZERO).0);
    server.wait_for_requests(1).await;
    tokio::time::sleep(ms(300)).await;
    assert_eq!(server.count(), 1, "no tight loop on 401");

    let rotated_at = Instant::now();
    credentials.rotate(ApiKey::new("sk-new"), Duration::from_secs(60));
    let seen = server.wait_for_requests(2).await;
    assert!(seen[1].at - rotated_at < SLACK, "reconnected at once");
    assert_eq!(seen[1].header("authorization"), Some("Bearer sk-new"));
    state(&client, SseState::Connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_new_key_is_retried_once_with_the_old_one() {
    let server = Server::start(
        vec![Script::status(401), Script::ok().send(CONNECTED)],
        Script::ok(),
    )
    .await;
    let credentials = credentials();
    credentials.rotate(ApiKey::new("sk-new"), Duration::from_secs(60));
    let client = SseClient::new(credentials, config(server.url()));
    client.start(collect(Duration::ZERO).0);
    let seen = server.wait_for_requests(2).await;
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk-new"));
    assert_eq!(
        seen[1].header("authorization"),
        Some(&*format!("Bearer {KEY}"))
    );
    assert!(server.gaps()[0] < SLACK, "no 401 wait before the other key");
    state(&client, SseState::Connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_while_connected_reconnects_with_the_new_key() {
    let server = Server::start(vec![], Script::ok().send(CONNECTED)).await;
    let credentials = credentials();
    let client = SseClient::new(credentials.clone(), config(server.url()));
    client.start(collect(Duration::ZERO).0);
    state(&client, SseState::Connected).await;

    let rotated_at = Instant::now();
    credentials.rotate(ApiKey::new("sk-new"), Duration::from_secs(60));
    let seen = server.wait_for_requests(2).await;
    assert!(seen[1].at - rotated_at < SLACK, "reconnected at once");
    assert_eq!(seen[1].header("authorization"), Some("Bearer sk-new"));
    eventually("the old stream closed", || seen[0].closed()).await;
    state(&client, SseState::Connected).await;
    assert_eq!(client.status().reconnects, 1);
}

/// Stops the client while `server` has it in some state, and checks nothing survives.
async fn stops_promptly(server: &Server, client: SseClient, sink: Arc<dyn SseSink>) {
    let requests = server.count();
    let stopped_at = Instant::now();
    client.stop();
    assert!(stopped_at.elapsed() < ms(50), "stop() returned at once");
    assert_eq!(client.status().state, SseState::Closed);
    assert_eq!(*client.states().borrow(), SseState::Closed);
    client.stop(); // idempotent

    eventually("the task let go of the sink", || {
        Arc::strong_count(&sink) == 1
    })
    .await;
    eventually("every connection closed", || {
        server.seen().iter().all(Seen::closed)
    })
    .await;
    tokio::time::sleep(ms(300)).await;
    assert_eq!(server.count(), requests, "no connection after stop");
    assert_eq!(client.status().state, SseState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_connecting() {
    let server = Server::start(vec![], Script::hang()).await;
    let client = SseClient::new(credentials(), config(server.url()));
    let sink: Arc<dyn SseSink> = collect(Duration::ZERO).0;
    client.start(sink.clone());
    server.wait_for_requests(1).await;
    assert_eq!(client.status().state, SseState::Connecting);
    stops_promptly(&server, client, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_connected() {
    let server = Server::start(vec![], Script::ok().send(CONNECTED)).await;
    let client = SseClient::new(credentials(), config(server.url()));
    let sink: Arc<dyn SseSink> = collect(Duration::ZERO).0;
    client.start(sink.clone());
    state(&client, SseState::Connected).await;
    stops_promptly(&server, client, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_backing_off() {
    let server = Server::start(vec![], Script::status(503)).await;
    let mut config = config(server.url());
    config.backoff.base = Duration::from_secs(10);
    config.backoff.max = Duration::from_secs(10);
    let client = SseClient::new(credentials(), config);
    let sink: Arc<dyn SseSink> = collect(Duration::ZERO).0;
    client.start(sink.clone());
    server.wait_for_requests(1).await;
    state(&client, SseState::Reconnecting).await;
    stops_promptly(&server, client, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_a_delivery_never_ends() {
    let server = Server::start(vec![], Script::ok().send(snake("m1", "bob", "hi"))).await;
    let client = SseClient::new(credentials(), config(server.url()));
    let stuck = Arc::new(Stuck::default());
    client.start(stuck.clone());
    eventually("the delivery started", || {
        stuck.calls.load(Ordering::Relaxed) == 1
    })
    .await;
    stops_promptly(&server, client, stuck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_starts_again() {
    let server = Server::start(vec![], Script::ok().send(CONNECTED)).await;
    let client = SseClient::new(credentials(), config(server.url()));
    assert_eq!(client.status().state, SseState::Closed, "not started yet");
    client.start(collect(Duration::ZERO).0);
    state(&client, SseState::Connected).await;
    client.stop();
    assert!(client.start(collect(Duration::ZERO).0));
    server.wait_for_requests(2).await;
    state(&client, SseState::Connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_published() {
    let server = Server::start(
        vec![
            Script::ok()
                .head_delay(ms(100))
                .send(CONNECTED)
                .wait(ms(100))
                .close(),
            Script::ok().head_delay(ms(100)).send(CONNECTED),
        ],
        Script::ok(),
    )
    .await;
    let mut config = config(server.url());
    config.backoff.base = ms(100);
    let client = SseClient::new(credentials(), config);
    let mut states = client.states();
    assert_eq!(*states.borrow_and_update(), SseState::Closed);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let collector = tokio::spawn({
        let seen = seen.clone();
        async move {
            while states.changed().await.is_ok() {
                let state = *states.borrow_and_update();
                let mut seen = lock(&seen);
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
            }
        }
    });
    use SseState::*;

    client.start(collect(Duration::ZERO).0);
    // A watch channel keeps the latest value only: stop once the observer has caught up.
    let want = [Connecting, Connected, Reconnecting, Connected];
    eventually("the states up to the second connection", || {
        *lock(&seen) == want
    })
    .await;
    client.stop();
    drop(client);
    collector.await.unwrap();
    let seen = lock(&seen).clone();
    assert_eq!(
        seen,
        [Connecting, Connected, Reconnecting, Connected, Closed]
    );
    let names: Vec<_> = seen.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        [
            "connecting",
            "connected",
            "reconnecting",
            "connected",
            "closed"
        ]
    );
}

#[test]
fn urls() {
    for (base, want) in [
        (
            "https://api.signaldock.io",
            "https://api.signaldock.io/messages/stream",
        ),
        (
            "https://api.signaldock.io/",
            "https://api.signaldock.io/messages/stream",
        ),
        (
            "http://127.0.0.1:4000/v1/",
            "http://127.0.0.1:4000/v1/messages/stream",
        ),
    ] {
        assert_eq!(SseConfig::default_url(base).unwrap().as_str(), want);
    }
    assert!(SseConfig::default_url("local").is_err());
    assert_eq!(
        SseConfig::endpoint_url(Some(" https://sse.example/stream "), "https://api.example")
            .unwrap()
            .as_str(),
        "https://sse.example/stream"
    );
    assert_eq!(
        SseConfig::endpoint_url(Some(""), "https://api.example")
            .unwrap()
            .as_str(),
        "https://api.example/messages/stream"
    );
    assert!(SseConfig::endpoint_url(Some("/messages/stream"), "https://api.example").is_err());

    let config = SseConfig::new(Url::parse("https://api.example/messages/stream").unwrap());
    assert_eq!(config.backoff, Backoff::SSE);
    assert_eq!(
        (
            config.healthy_after,
            config.idle_timeout,
            config.min_retry,
            config.unauthorized_delay
        ),
        (
            Duration::from_secs(30),
            Duration::from_secs(60),
            ms(500),
            Duration::from_secs(30)
        )
    );
}

/// Every log line the client writes, on the test's own thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread: the client's task runs on this thread, under the scoped subscriber.
#[tokio::test]
async fn the_key_never_reaches_a_log_line() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let capture = capture.clone();
            move || capture.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Server::start(
        vec![
            Script::status(401),
            Script::ok()
                .send(format!("data: {KEY}\n\n"))
                .send(snake("m1", "bob", "hi"))
                .close(),
            Script::status(503),
            Script::status(503),
            Script::status(503),
        ],
        Script::ok().send(CONNECTED),
    )
    .await;
    let url = server.url().join(&format!("stream?{KEY}")).unwrap();
    let credentials = credentials();
    let client = SseClient::new(credentials.clone(), config(url));
    let (sink, mut rx) = collect(Duration::ZERO);
    client.start(sink);
    server.wait_for_requests(1).await;
    credentials.rotate(ApiKey::new("sk-rotated-key"), Duration::from_secs(60));
    assert_eq!(next(&mut rx).await.id, "m1");
    server.wait_for_requests(6).await;
    state(&client, SseState::Connected).await;
    client.stop();

    let logs = String::from_utf8(lock(&capture.0).clone()).unwrap();
    assert!(logs.contains("SSE stream"), "the client logged: {logs}");
    assert!(
        logs.contains("keeps failing"),
        "repeated failures are warned about: {logs}"
    );
    assert!(
        !logs.contains(KEY) && !logs.contains("sk-rotated-key"),
        "{logs}"
    );
}
