//! The native SSE client: `GET /messages/stream`, the realtime path of WIRE.md.
//!
//! One task per client keeps a stream open for as long as the client is started. The
//! reconnect loop is ours, not eventsource-client's (its own is switched off): every attempt
//! builds a fresh client with the key current at that moment, so a rotation, the
//! `Last-Event-ID`, the backoff and the idle watchdog are all decided here.
//!
//! - **Auth**: `Authorization: Bearer <key>` and `X-Agent-Id` headers, never the URL (the
//!   old client's `?token=` leaked keys into access logs). Redirects are not followed: the
//!   key would go wherever `Location` points. HTTP is the process's stream client (`http`).
//!   A 2xx other than 200, or an answer that is not `text/event-stream`, is a failure.
//! - **Events**: deliveries (either payload shape) go to the [`SseSink`], awaited, so a slow
//!   consumer pauses reading; `connected`, heartbeats and this agent's own messages are
//!   skipped; malformed data is counted and skipped (`frame`). What the crate's parser
//!   cannot take (a line that is not UTF-8) is counted too, and costs the connection.
//! - **Liveness**: anything at all from the server (events, comments) pets a watchdog; after
//!   `idle_timeout` of silence, including while waiting for the answer, the connection is
//!   dropped and replaced.
//! - **Reconnects**: for ever, on the schedule of `policy`: exponential with jitter,
//!   reset only once a stream has stayed up for `healthy_after`; the server's `retry:`
//!   replaces the base. A 401 is retried once with the other key of a rotation's overlap
//!   window, then waits for a rotation (or `unauthorized_delay`). A rotation while connected
//!   reconnects at once with the new key.
//! - **Bounds**: an event (or line) over 8 MiB drops the connection, as the crate's parser
//!   would otherwise buffer it without limit (`guard`).
//!
//! [`inbox`] is where a native transport keeps the stream's messages for `poll()` or its
//! subscribers.
//!
//! State changes are published on a watch channel ([`SseClient::states`]); the runtime uses
//! them to slow polling while the stream is connected.

pub mod frame;
mod guard;
mod http;
pub mod inbox;
mod policy;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_client::{self as es, Client as _, SSE};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use self::frame::Frame;
use self::http::{Guarded, Probe};
use self::policy::{End, Pause};
use super::backoff::{self, Backoff};
use super::clock;
use super::credentials::{ApiKey, Credentials};
use super::error::{Error, Result};
use super::message::ConduitMessage;
use super::signaldock::{MAX_RETRY_AFTER, endpoint, parse_base_url};
use super::sync::lock;
use super::task::RunningTask;

/// A stream must stay up this long before the backoff starts again from its base.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// No event at all for this long means the connection is dead (WIRE.md: 60 s, twice the
/// server's heartbeat interval).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest reconnect delay a server's `retry:` can ask for.
pub const DEFAULT_MIN_RETRY: Duration = Duration::from_millis(500);
/// After a 401, how long to wait for a rotation before trying the same key again.
pub const DEFAULT_UNAUTHORIZED_DELAY: Duration = Duration::from_secs(30);

/// Consecutive failures before the loop complains at warn level, and how often after that:
/// at the backoff cap a dead server would otherwise fill the log.
const WARN_AFTER: u32 = 3;
const WARN_EVERY: u32 = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct SseConfig {
    /// The absolute stream URL (`sseEndpoint`); see [`SseConfig::default_url`].
    pub url: Url,
    pub backoff: Backoff,
    /// The backoff resets only after a stream stayed up this long.
    pub healthy_after: Duration,
    /// Silence (no event, no comment) for this long drops the connection.
    pub idle_timeout: Duration,
    /// Floor for the server's `retry:`.
    pub min_retry: Duration,
    /// After a 401, wait at least this long, unless the key rotates first.
    pub unauthorized_delay: Duration,
}

impl SseConfig {
    pub fn new(url: Url) -> Self {
        Self {
            url,
            backoff: Backoff::SSE,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            min_retry: DEFAULT_MIN_RETRY,
            unauthorized_delay: DEFAULT_UNAUTHORIZED_DELAY,
        }
    }

    /// `{apiBaseUrl}/messages/stream`.
    pub fn default_url(api_base_url: &str) -> Result<Url> {
        let base = parse_base_url(api_base_url)?;
        endpoint(&base, &["messages", "stream"], &[])
    }

    /// The stream URL for a runtime: `sse_endpoint` when one is given (it must be an
    /// absolute http(s) URL), else [`SseConfig::default_url`].
    pub fn endpoint_url(sse_endpoint: Option<&str>, api_base_url: &str) -> Result<Url> {
        match sse_endpoint.map(str::trim).filter(|e| !e.is_empty()) {
            Some(url) => parse_base_url(url),
            None => Self::default_url(api_base_url),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SseState {
    /// The first attempt since `start()`.
    Connecting,
    Connected,
    /// Between a drop and the next stream: waiting out the backoff, or connecting again.
    Reconnecting,
    /// Not started, or stopped.
    #[default]
    Closed,
}

impl SseState {
    pub fn as_str(self) -> &'static str {
        match self {
            SseState::Connecting => "connecting",
            SseState::Connected => "connected",
            SseState::Reconnecting => "reconnecting",
            SseState::Closed => "closed",
        }
    }
}

impl std::fmt::Display for SseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SseStatus {
    pub state: SseState,
    /// Connection attempts after the first since the client was created.
    pub reconnects: u64,
    /// When the server last sent anything (event or comment), ISO 8601.
    pub last_event_at: Option<String>,
    /// Messages handed to the sink.
    pub delivered: u64,
    /// Events whose data was not a message, and events over the size limit.
    pub malformed: u64,
    /// Why the last connection failed or ended; never contains a key.
    pub last_error: Option<String>,
    /// The id sent as `Last-Event-ID` on the next connection.
    pub last_event_id: Option<String>,
}

/// Where delivered messages go; awaited, so a slow consumer pauses reading (backpressure).
pub trait SseSink: Send + Sync {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()>;
}

struct Shared {
    credentials: Arc<Credentials>,
    config: SseConfig,
    state: watch::Sender<SseState>,
    reconnects: AtomicU64,
    delivered: AtomicU64,
    malformed: AtomicU64,
    last_event_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
    last_event_id: Mutex<Option<String>>,
}

/// An SSE client for one agent. `start`/`stop` are idempotent; dropping it stops it.
pub struct SseClient {
    shared: Arc<Shared>,
    task: Mutex<Option<RunningTask>>,
    /// The span current at creation, which the loop logs in on every start.
    span: tracing::Span,
}

impl SseClient {
    pub fn new(credentials: Arc<Credentials>, config: SseConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                credentials,
                config,
                state: watch::channel(SseState::Closed).0,
                reconnects: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
                last_event_ms: AtomicI64::new(0),
                last_error: Mutex::new(None),
                last_event_id: Mutex::new(None),
            }),
            task: Mutex::new(None),
            span: tracing::Span::current(),
        }
    }

    pub fn config(&self) -> &SseConfig {
        &self.shared.config
    }

    /// Starts streaming into `sink` on the current tokio runtime (panics outside one, as
    /// `tokio::spawn` does). Returns false, keeping the running sink, when already started.
    pub fn start(&self, sink: Arc<dyn SseSink>) -> bool {
        let mut task = lock(&self.task);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        self.shared.state.send_replace(SseState::Connecting);
        let shared = self.shared.clone();
        let _in_span = self.span.enter();
        *task = Some(RunningTask::spawn(move |token| run(shared, sink, token)));
        true
    }

    /// Stops at once, whatever the loop is doing (connecting, reading, delivering, waiting).
    pub fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.stop();
        }
        // After the cancel: the loop checks the token under the channel's lock, so this
        // `Closed` is the last state published.
        self.shared.state.send_if_modified(|state| {
            std::mem::replace(state, SseState::Closed) != SseState::Closed
        });
    }

    pub fn status(&self) -> SseStatus {
        let shared = &self.shared;
        let last_event = shared.last_event_ms.load(Ordering::Relaxed);
        SseStatus {
            state: *shared.state.borrow(),
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            last_event_at: (last_event > 0).then(|| clock::format_iso_ms(last_event)),
            delivered: shared.delivered.load(Ordering::Relaxed),
            malformed: shared.malformed.load(Ordering::Relaxed),
            last_error: lock(&shared.last_error).clone(),
            last_event_id: lock(&shared.last_event_id).clone(),
        }
    }

    /// The state, now and as it changes.
    pub fn states(&self) -> watch::Receiver<SseState> {
        self.shared.state.subscribe()
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn set_state(&self, token: &CancellationToken, state: SseState) {
        self.state.send_if_modified(|current| {
            if token.is_cancelled() || *current == state {
                return false;
            }
            *current = state;
            true
        });
    }

    fn record_error(&self, error: &str) -> String {
        let error = self.credentials.scrub(error);
        *lock(&self.last_error) = Some(error.clone());
        error
    }
}

/// How one connection ended.
struct Outcome {
    end: End,
    connected_for: Option<Duration>,
    error: Option<String>,
}

impl Outcome {
    fn failed(error: impl Into<String>) -> Self {
        Self {
            end: End::Failed,
            connected_for: None,
            error: Some(error.into()),
        }
    }
}

async fn run(shared: Arc<Shared>, sink: Arc<dyn SseSink>, token: CancellationToken) {
    let config = &shared.config;
    let mut rotations = shared.credentials.rotations();
    let http = http::stream_client();
    let mut failures = 0u32;
    let mut server_retry: Option<Duration> = None;
    // After a 401, the other key of a rotation's overlap window, for one immediate try.
    let mut alternate: Option<ApiKey> = None;
    let mut first = true;
    tracing::debug!(endpoint = %shared.credentials.scrub(config.url.as_str()), "SSE stream starting");
    loop {
        // Seen before the key is read: a rotation from here on ends the connection.
        rotations.mark_unchanged();
        let (key, is_alternate) = match alternate.take() {
            Some(key) => (key, true),
            None => (shared.credentials.current(), false),
        };
        if !std::mem::take(&mut first) {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let probe = Arc::new(Probe::default());
        let outcome = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            outcome = connection(&shared, &http, &key, &probe, sink.as_ref(), &mut rotations, &token) => outcome,
        };
        shared.set_state(&token, SseState::Reconnecting);

        if let Some(ms) = probe.retry_ms() {
            server_retry = Some(Duration::from_millis(ms));
        }
        let error = outcome.error.as_deref().map(|e| shared.record_error(e));
        failures = policy::failures_after(
            failures,
            outcome.end,
            outcome.connected_for,
            config.healthy_after,
        );
        alternate = match outcome.end {
            End::Unauthorized if !is_alternate => shared.credentials.alternate(&key),
            _ => None,
        };
        if outcome.end == End::Unauthorized {
            shared.credentials.note_stream_refused(&key);
        }
        let pause = policy::plan(
            config,
            failures,
            server_retry,
            outcome.end,
            alternate.is_some(),
            fastrand::f64(),
        );
        log_pause(failures, outcome.end, pause, error.as_deref());

        match pause {
            Pause::Now => {}
            Pause::For(delay) => tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            },
            Pause::UntilRotation(delay) => tokio::select! {
                biased;
                _ = token.cancelled() => return,
                Ok(()) = rotations.changed() => {}
                _ = tokio::time::sleep(delay) => {}
            },
        }
    }
}

/// One connection, from the request to whatever ends it.
async fn connection(
    shared: &Shared,
    http: &reqwest::Client,
    key: &ApiKey,
    probe: &Arc<Probe>,
    sink: &dyn SseSink,
    rotations: &mut watch::Receiver<u64>,
    token: &CancellationToken,
) -> Outcome {
    let config = &shared.config;
    let transport = Guarded {
        http: http.clone(),
        probe: probe.clone(),
        limit: guard::MAX_EVENT_BYTES,
    };
    let mut stream = match open(shared, key, transport) {
        Ok(stream) => stream,
        Err(e) => return Outcome::failed(e.to_string()),
    };

    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    let mut connected_at: Option<Instant> = None;
    let (end, error) = loop {
        let item = tokio::select! {
            biased;
            Ok(()) = rotations.changed() => break (End::Rotated, None),
            _ = &mut idle => break (End::Failed, Some(format!("nothing from the server for {:?}", config.idle_timeout))),
            item = stream.next() => item,
        };
        match item {
            None => break (End::Failed, Some("the stream closed".to_owned())),
            Some(Ok(SSE::Connected(details))) => {
                let response = details.response();
                if response.status() != 200 {
                    // Any 2xx gets here; a 204 is how a server tells browsers to stop.
                    let error = status_error(response.status(), None);
                    break (End::Refused { retry_after: None }, Some(error));
                }
                let content_type = response.get_header_value("content-type").ok().flatten();
                if !frame::is_event_stream(content_type) {
                    let content_type = content_type.unwrap_or_default();
                    break (
                        End::Failed,
                        Some(format!(
                            "the server answered {content_type:?}, not an event stream"
                        )),
                    );
                }
                connected_at = Some(Instant::now());
                shared.set_state(token, SseState::Connected);
                tracing::debug!("SSE stream connected");
            }
            Some(Ok(SSE::Comment(_))) => touch(shared),
            Some(Ok(SSE::Event(event))) => {
                touch(shared);
                handle(shared, sink, event).await;
            }
            // The parser gives up on the connection for a line that is not UTF-8, and for a
            // field it does not know sent alone (`foo\n\n`), which the SSE spec would ignore.
            Some(Err(e @ (es::Error::InvalidLine(_) | es::Error::InvalidEvent))) => {
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                break (End::Failed, Some(describe(e)));
            }
            Some(Err(_)) if probe.overflowed() => {
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                let overflow = guard::Overflow {
                    limit: guard::MAX_EVENT_BYTES,
                };
                break (End::Failed, Some(overflow.to_string()));
            }
            Some(Err(es::Error::UnexpectedResponse(response, _body))) => {
                let status = response.status();
                let retry_after = response
                    .get_header_value("retry-after")
                    .ok()
                    .flatten()
                    .and_then(|v| backoff::retry_after(v, MAX_RETRY_AFTER));
                let end = if status == 401 {
                    End::Unauthorized
                } else {
                    End::Refused { retry_after }
                };
                break (end, Some(status_error(status, retry_after)));
            }
            Some(Err(e)) => break (End::Failed, Some(describe(e))),
        }
        idle.as_mut().reset(Instant::now() + config.idle_timeout);
    };
    Outcome {
        end,
        connected_for: connected_at.map(|at| at.elapsed()),
        error,
    }
}

/// A stream for one attempt: the crate's own reconnects and redirects off.
fn open(
    shared: &Shared,
    key: &ApiKey,
    transport: Guarded,
) -> Result<es::BoxStream<es::Result<SSE>>> {
    let mut url = shared.config.url.clone();
    url.set_fragment(None);
    let unsendable =
        |_| Error::Config("the API key or agent id cannot be sent as an HTTP header".into());
    let mut builder = es::ClientBuilder::for_url(url.as_str())
        .map_err(|e| Error::Config(format!("the stream URL is unusable: {e}")))?
        .header("Authorization", &format!("Bearer {}", key.expose()))
        .map_err(unsendable)?
        .header("X-Agent-Id", shared.credentials.agent_id())
        .map_err(unsendable)?
        .header("Accept", "text/event-stream")
        .map_err(unsendable)?
        .reconnect(
            es::ReconnectOptions::reconnect(false)
                .retry_initial(false)
                .build(),
        )
        .redirect_limit(0);
    if let Some(id) = lock(&shared.last_event_id).clone() {
        builder = builder.last_event_id(id);
    }
    Ok(builder.build_with_transport(transport).stream())
}

async fn handle(shared: &Shared, sink: &dyn SseSink, event: es::Event) {
    match frame::classify(
        &event.event_type,
        &event.data,
        event.id.as_deref(),
        shared.credentials.agent_id(),
    ) {
        Frame::Deliver(message) => {
            sink.deliver(message).await;
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Frame::Malformed(why) => {
            // The server marked a pushed message delivered when it wrote it, and a peek
            // returns only pending rows: a frame that cannot be read is a message lost for
            // good. An alarm every time, with what identifies it, never routine.
            let count = shared.malformed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                event_id = event.id.as_deref().unwrap_or_default(),
                event_type = %event.event_type,
                error = %why,
                malformed = count,
                "an SSE message could not be read and is lost: the server already marked it delivered"
            );
        }
        Frame::Skip(why) => tracing::trace!(?why, "SSE event skipped"),
    }
    // Only once the event is dealt with: a restart then resumes after it, not before.
    if let Some(id) = event.id {
        *lock(&shared.last_event_id) = frame::usable_event_id(&id).then_some(id);
    }
}

fn touch(shared: &Shared) {
    shared
        .last_event_ms
        .store(clock::now_ms(), Ordering::Relaxed);
}

fn status_error(status: u16, retry_after: Option<Duration>) -> String {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or_default();
    Error::Status {
        status,
        retry_after,
        message: reason.to_owned(),
    }
    .to_string()
}

/// The crate's error, with its causes (a bare "transport error" says nothing).
fn describe(error: es::Error) -> String {
    match error {
        es::Error::Transport(e) => {
            let mut why = format!("network error: {}", e.inner());
            let mut source = std::error::Error::source(e.inner());
            while let Some(cause) = source {
                why.push_str(": ");
                why.push_str(&cause.to_string());
                source = cause.source();
            }
            why
        }
        es::Error::TimedOut => "the stream timed out".to_owned(),
        es::Error::Eof => "the server closed the stream".to_owned(),
        es::Error::UnexpectedEof => {
            "the server closed the stream in the middle of an event".to_owned()
        }
        es::Error::MaxRedirectLimitReached(_) => {
            "the server answered with a redirect, which is not followed (it would carry the key)"
                .to_owned()
        }
        other => format!("stream error: {other}"),
    }
}

fn log_pause(failures: u32, end: End, pause: Pause, error: Option<&str>) {
    let error = error.unwrap_or_default();
    let (delay_ms, on_rotation) = match pause {
        Pause::Now => (0, false),
        Pause::For(delay) => (delay.as_millis() as u64, false),
        Pause::UntilRotation(delay) => (delay.as_millis() as u64, true),
    };
    if on_rotation && failures == 1 {
        tracing::warn!(
            error,
            delay_ms,
            "SSE stream refused the key; reconnecting on the next key rotation or after the delay"
        );
    } else if failures >= WARN_AFTER && (failures - WARN_AFTER).is_multiple_of(WARN_EVERY) {
        tracing::warn!(
            error,
            failures,
            delay_ms,
            "SSE stream keeps failing; polling covers delivery meanwhile"
        );
    } else {
        tracing::debug!(error, failures, delay_ms, ?end, "SSE stream reconnecting");
    }
}
