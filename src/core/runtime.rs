//! The composition root: what `createRuntime` starts, and how it stops.
//!
//! - [`Credential::fetch`] reads the agent's credential from the registry.
//! - [`Plan::resolve`] is pure: credential + settings + the local `signaldock.db` (when one
//!   exists) → which transport, which realtime path, which services, which intervals. The
//!   credential store ([`Credentials`]) is made here, once per runtime.
//! - [`Runtime::start`] opens the journal first (the plan says where, or none: a journal in
//!   use by another runtime fails the start before anything connects; the poller keeps its
//!   delivery state there), then connects the transport and starts the services around that one
//!   credential store and **one** REST client (so a rotated key and a failover reach every
//!   REST call), plus the bridges between them: stream state → poller speed, stream messages
//!   → poller, local commits → poll now, the caller's SSE transport → poller.
//! - [`Runtime::stop`] stops them in the contract's order, at once, and returns what is left
//!   to finish (the final ack, closing the local connection) as a [`Completion`].
//!
//! What the runtime needs from its caller is declared here as traits ([`CallerTransport`],
//! [`CredentialSource`], [`CallerStreamFactory`]); the Node-API boundary implements them over
//! JS objects, and tests over fakes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use url::Url;

use super::credentials::{self, ApiKey, Credentials};
use super::error::{Error, Result};
use super::heartbeat::{DEFAULT_INTERVAL, Heartbeat};
use super::journal::{self, JournalSetting};
use super::key_rotation::{KeyRotation, KeyRotationConfig, Registry};
use super::local::{self, LocalTransport};
use super::message::ConduitMessage;
use super::poller::{Poller, PollerConfig, final_ack};
use super::signaldock::{self, SignalDock};
use super::sse::{SseClient, SseConfig, SseSink, SseState};
use super::sync::lock;
use super::task::RunningTask;
use super::transport::{DirectSource, GroupFeed, PeekSource};

/// The exact message callers match on when no credential exists.
pub const NO_CREDENTIAL: &str =
    "No agent credential found. Run: cleo agent register --id <id> --api-key <key>";

/// The poll interval when neither the config nor the credential names one.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(5000);

/// Messages from the caller's SSE transport waiting for the poller. Past it a message is
/// left to polling (the server keeps it until it is acked), so a stalled handler cannot grow
/// memory.
pub const CALLER_STREAM_QUEUE: usize = 1024;

/// Why a runtime did not start. The text is safe to show (keys scrubbed) and starts with
/// `createRuntime:` except for [`NO_CREDENTIAL`].
#[derive(Debug, PartialEq)]
pub enum StartError {
    /// The caller's registry handed over something unusable as configured (a `TypeError`).
    Invalid(String),
    /// Anything else (an `Error`).
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(why) | Self::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StartError {}

fn failed(why: impl std::fmt::Display) -> StartError {
    StartError::Failed(format!("createRuntime: {why}"))
}

/// `createRuntime: {what}: {err}`, the chain kept and `credentials`' keys redacted (the
/// error may quote a server's answer or the credential).
fn failed_in(credentials: &Credentials, what: &str, err: Error) -> StartError {
    let err = err.context(format!("createRuntime: {what}"));
    StartError::Failed(credentials.scrub(&err.to_string()))
}

/// Where the runtime's credential comes from (`registry.get(agentId)` / `getActive()`).
pub trait CredentialSource: Send + Sync {
    /// The credential object, or None when the registry has none.
    fn credential(&self, agent_id: Option<&str>) -> BoxFuture<'_, Result<Option<Value>>>;
}

/// The caller's own transport (`config.transport`): connected by the runtime, read by the
/// poller. Its final ack is the boundary's to make (see [`Stopping::caller_acks`]).
pub trait CallerTransport: DirectSource {
    /// `connect(config)` with the config the contract gives it.
    fn connect(&self, config: Value) -> BoxFuture<'_, Result<()>>;
}

/// The caller's `createSseTransport`: a realtime transport the boundary makes, connects and
/// subscribes, whose messages go into the runtime's [`StreamInbox`].
pub trait CallerStreamFactory: Send + Sync {
    /// Makes the transport now (an `Err` fails the start); the returned future connects and
    /// subscribes it. That one is not waited for, as the old runtime did not: its failure is
    /// logged and polling covers delivery.
    fn open(
        &self,
        connect_config: Value,
        inbox: StreamInbox,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Result<()>>>>;
}

/// The entry of the caller's stream into the poller: bounded, and never waited on (it is fed
/// from the JS thread).
#[derive(Clone)]
pub struct StreamInbox(mpsc::Sender<ConduitMessage>);

impl StreamInbox {
    /// Queues `message` for the poller. A full queue (the handler is behind) leaves it to
    /// polling; false when the runtime is stopped or the queue was full.
    pub fn offer(&self, message: ConduitMessage) -> bool {
        match self.0.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(message)) => {
                tracing::debug!(
                    id = message.id,
                    "the stream's queue to the poller is full: left to polling"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What the caller's config asked for, read and checked by the boundary.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub agent_id: Option<String>,
    pub poll_interval: Option<Duration>,
    pub group_conversation_ids: Vec<String>,
    pub group_poll_limit: Option<u32>,
    /// `Some(ZERO)`: no heartbeat.
    pub heartbeat_interval: Option<Duration>,
    /// `Some(ZERO)`: no key rotation.
    pub max_key_age: Option<Duration>,
    pub sse_endpoint: Option<String>,
    /// `config.transport` was given.
    pub caller_transport: bool,
    /// `config.createSseTransport` was given.
    pub caller_stream: bool,
    /// `config.journal`: a path, off, or the default location.
    pub journal: JournalSetting,
}

/// The credential fields the runtime uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub agent_id: String,
    pub api_key: String,
    pub api_base_url: String,
    pub transport_config: Map<String, Value>,
}

impl Credential {
    /// `registry.get(agentId)`, or `getActive()` without an id; checked.
    pub async fn fetch(
        source: &dyn CredentialSource,
        agent_id: Option<&str>,
    ) -> std::result::Result<Self, StartError> {
        let value = source
            .credential(agent_id)
            .await
            .map_err(failed)?
            .ok_or_else(|| StartError::Failed(NO_CREDENTIAL.to_owned()))?;
        let credential = Self::from_registry(value).map_err(failed)?;
        // An id no HTTP header can carry would make every request fail later, with the id in
        // the error text; it is the registry's credential that is wrong, so it says so now.
        if !credentials::usable_agent_id(&credential.agent_id) {
            return Err(StartError::Invalid(format!(
                "createRuntime: the registry's credential.agentId must be {}",
                credentials::AGENT_ID_RULE
            )));
        }
        Ok(credential)
    }

    pub fn from_registry(value: Value) -> Result<Self> {
        let field = |name: &str| -> Result<String> {
            match value.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(Error::Js(format!(
                    "the registry's credential has no string {name}"
                ))),
            }
        };
        let transport_config = match value.get("transportConfig") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        };
        Ok(Self {
            agent_id: field("agentId")?,
            api_key: field("apiKey")?,
            api_base_url: field("apiBaseUrl")?,
            transport_config,
        })
    }

    fn poll_interval(&self) -> Option<Duration> {
        let ms = self.transport_config.get("pollIntervalMs")?.as_f64()?;
        (ms.is_finite() && ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.transport_config.get(name).and_then(Value::as_str)
    }

    /// `{ agentId, apiKey, apiBaseUrl, ...transportConfig }`, as the contract spreads it.
    fn connect_config(&self) -> Value {
        let mut config = Map::new();
        config.insert("agentId".into(), json!(self.agent_id));
        config.insert("apiKey".into(), json!(self.api_key));
        config.insert("apiBaseUrl".into(), json!(self.api_base_url));
        config.extend(self.transport_config.clone());
        Value::Object(config)
    }

    fn has_rest(&self) -> bool {
        signaldock::parse_base_url(&self.api_base_url).is_ok()
    }
}

/// The `signaldock.db` a runtime without a cloud base URL would use, when it exists.
pub fn present_local_db() -> Option<PathBuf> {
    let cwd = std::env::current_dir().unwrap_or_default();
    let path = local::default_db_path(std::env::var_os("CLEO_DIR").as_deref(), &cwd);
    path.is_file().then_some(path)
}

/// Which transport the runtime reads direct messages through (WIRE.md, "Transport
/// resolution").
#[derive(Clone, Debug, PartialEq)]
pub enum TransportChoice {
    /// `config.transport`.
    Caller,
    Http,
    /// REST plus the stream: an SSE endpoint is known (whoever's stream delivers).
    Sse,
    Local(PathBuf),
}

/// The realtime path.
#[derive(Clone, Debug, PartialEq)]
pub enum Realtime {
    None,
    /// The caller's `createSseTransport`, connected to this endpoint.
    Caller(Url),
    /// The native stream.
    Native(Url),
}

/// Everything [`Runtime::start`] does, decided before anything is connected.
#[derive(Debug)]
pub struct Plan {
    credential: Credential,
    credentials: Arc<Credentials>,
    pub transport: TransportChoice,
    pub realtime: Realtime,
    /// An http(s) base URL: a REST client exists (groups, heartbeat, the native transports).
    pub rest: bool,
    pub poller: PollerConfig,
    pub heartbeat: Option<Duration>,
    pub key_rotation: Option<KeyRotationConfig>,
    /// The endpoint as configured (relative or absolute), for the caller's stream.
    sse_endpoint: Option<String>,
    /// Where the journal goes (see [`journal::resolve`]); opened by [`Runtime::start`]
    /// before anything connects.
    pub journal: JournalSetting,
}

impl Plan {
    /// `local_db`: the default `signaldock.db` when it exists ([`present_local_db`]).
    pub fn resolve(
        credential: &Credential,
        settings: &Settings,
        local_db: Option<PathBuf>,
    ) -> std::result::Result<Self, StartError> {
        let credentials = Credentials::new(
            &credential.agent_id,
            ApiKey::new(credential.api_key.as_str()),
        );
        let rest = credential.has_rest();
        let sse_endpoint = settings
            .sse_endpoint
            .clone()
            .or_else(|| credential.text("sseEndpoint").map(str::to_owned));
        // An endpoint is usable when it is absolute, or relative to an http(s) base.
        let sse_url = match &sse_endpoint {
            Some(endpoint) => Some(
                SseConfig::endpoint_url(Some(endpoint), &credential.api_base_url)
                    .map_err(|e| failed_in(&credentials, "sseEndpoint", e))?,
            ),
            None => None,
        };
        // An SSE endpoint resolves 'sse' with or without `createSseTransport`, as in the old
        // package (whose `handle.transport` was its own SSE transport whatever the factory
        // made, and the CLI prints its name); the factory only decides whose stream delivers.
        let transport = if settings.caller_transport {
            TransportChoice::Caller
        } else if credential.api_base_url.starts_with("http") {
            match sse_url {
                Some(_) => TransportChoice::Sse,
                None => TransportChoice::Http,
            }
        } else {
            match local_db {
                Some(path) => TransportChoice::Local(path),
                None => TransportChoice::Http,
            }
        };
        let realtime = match sse_url {
            None => Realtime::None,
            Some(url) if settings.caller_stream => Realtime::Caller(url),
            Some(url) => Realtime::Native(url),
        };

        let poll_interval = settings
            .poll_interval
            .or_else(|| credential.poll_interval())
            .unwrap_or(DEFAULT_POLL_INTERVAL);
        let mut poller = PollerConfig::new(&credential.agent_id);
        poller.poll_interval = poll_interval;
        poller.group_conversation_ids = settings.group_conversation_ids.clone();
        if let Some(limit) = settings.group_poll_limit {
            poller.group_poll_limit = limit;
        }
        // The base URL is quoted, so the text is scrubbed: a registry may hold the key there.
        if !poller.group_conversation_ids.is_empty() && !rest {
            return Err(StartError::Failed(credentials.scrub(&format!(
                "createRuntime: group conversations need an http(s) apiBaseUrl, the credential has {:?}",
                credential.api_base_url
            ))));
        }
        let heartbeat = match settings.heartbeat_interval {
            Some(Duration::ZERO) => None,
            other => Some(other.unwrap_or(DEFAULT_INTERVAL)),
        };
        // A REST heartbeat puts the id in the URL path; a local one does not.
        let beats_over_rest =
            heartbeat.is_some() && !matches!(transport, TransportChoice::Local(_));
        if beats_over_rest && rest && !credentials::usable_in_path(&credential.agent_id) {
            return Err(StartError::Failed(credentials.scrub(&format!(
                "createRuntime: heartbeat: the agent id {:?} cannot be used as an id in a URL path",
                credential.agent_id
            ))));
        }
        let key_rotation = match settings.max_key_age {
            Some(Duration::ZERO) => None,
            other => {
                let mut config = KeyRotationConfig::new(&credential.agent_id);
                if let Some(age) = other {
                    config.max_key_age = age;
                }
                // The old key stays a 401 fallback for one full poll cycle after the
                // hand-over: two intervals plus a second, so the next poll falls inside it
                // whatever the phase of the rotation check against the poll schedule.
                config.overlap = poll_interval * 2 + Duration::from_secs(1);
                Some(config)
            }
        };
        Ok(Self {
            credential: credential.clone(),
            credentials,
            transport,
            realtime,
            rest,
            poller,
            heartbeat,
            key_rotation,
            sse_endpoint,
            journal: settings.journal.clone(),
        })
    }

    /// The runtime's one credential store.
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    pub fn agent_id(&self) -> &str {
        &self.credential.agent_id
    }

    fn fail(&self, what: &str, e: Error) -> StartError {
        failed_in(&self.credentials, what, e)
    }
}

/// What the runtime needs from its caller.
pub struct Deps {
    /// Receives rotated keys (key rotation).
    pub registry: Arc<dyn Registry>,
    /// `config.transport`, when [`Settings::caller_transport`].
    pub transport: Option<Arc<dyn CallerTransport>>,
    /// `config.createSseTransport`, when [`Settings::caller_stream`].
    pub stream_factory: Option<Arc<dyn CallerStreamFactory>>,
}

/// A value the runtime hands to its caller's objects and takes back at stop: a handed-out
/// transport refuses calls once the runtime emptied its slot.
pub type Slot<T> = Arc<Mutex<Option<T>>>;

/// The transport the runtime resolved itself, for the boundary to hand out.
pub enum OwnTransport {
    /// REST over the runtime's client.
    Http(Slot<Arc<SignalDock>>),
    /// REST plus the runtime's stream (idle when the caller's stream delivers).
    Sse {
        stream: Arc<SseClient>,
        rest: Arc<SignalDock>,
    },
    Local(Slot<LocalTransport>),
}

/// Where the poller reads direct messages.
#[derive(Clone)]
pub enum Direct {
    Caller(Arc<dyn CallerTransport>),
    Native(Arc<dyn DirectSource>),
}

impl Direct {
    pub fn source(&self) -> Arc<dyn DirectSource> {
        match self {
            Direct::Caller(transport) => transport.clone(),
            Direct::Native(source) => source.clone(),
        }
    }
}

/// A started runtime.
pub struct Runtime {
    credentials: Arc<Credentials>,
    rest: Option<Arc<SignalDock>>,
    poller: Arc<Poller>,
    direct: Direct,
    heartbeat: Option<Arc<Heartbeat>>,
    key_rotation: Option<Arc<KeyRotation>>,
    /// The native stream, when it is the realtime path.
    stream: Option<Arc<SseClient>>,
    own: Mutex<Option<OwnTransport>>,
    /// The slots of the handed-out transport, emptied at stop.
    http_slot: Option<Slot<Arc<SignalDock>>>,
    local_slot: Option<Slot<LocalTransport>>,
    local: Option<LocalTransport>,
    bridges: Mutex<Vec<RunningTask>>,
    stopped: Mutex<Option<Completion>>,
}

impl Runtime {
    /// Connects the transport and starts every service of `plan`.
    pub async fn start(plan: Plan, deps: Deps) -> std::result::Result<Self, StartError> {
        let credentials = plan.credentials.clone();
        let credential = &plan.credential;
        // First, so a journal in use by another runtime fails before anything connects.
        let journal = journal::open_for(&plan.journal, &credential.agent_id)
            .await
            .map_err(|e| plan.fail("journal", e))?;
        let mut rest: Option<Arc<SignalDock>> = None;
        let mut local = None;
        let direct = match &plan.transport {
            TransportChoice::Caller => {
                let transport = deps
                    .transport
                    .clone()
                    .ok_or_else(|| failed("the plan names the caller's transport; none given"))?;
                transport
                    .connect(credential.connect_config())
                    .await
                    .map_err(|e| plan.fail("transport.connect() failed", e))?;
                Direct::Caller(transport)
            }
            TransportChoice::Local(path) => {
                let connected = LocalTransport::connect(path.clone(), credential.agent_id.clone())
                    .await
                    .map_err(|e| plan.fail("local transport failed to connect", e))?;
                local = Some(connected.clone());
                Direct::Native(Arc::new(connected))
            }
            TransportChoice::Http | TransportChoice::Sse => {
                let client = Self::rest_client(&plan)
                    .await
                    .map_err(|e| plan.fail("HTTP transport failed to connect", e))?;
                rest = Some(client.clone());
                Direct::Native(Arc::new(PeekSource::new(client)))
            }
        };
        // One REST client for every REST call of the runtime (peek, ack, groups, heartbeat,
        // the SSE transport's push), so all of them share the credential and the failover.
        let rest = match rest {
            Some(rest) => Some(rest),
            None if plan.rest => Some(
                Self::rest_client(&plan)
                    .await
                    .map_err(|e| plan.fail("apiBaseUrl", e))?,
            ),
            None => None,
        };

        let groups: Option<Arc<dyn GroupFeed>> = match &rest {
            Some(rest) if !plan.poller.group_conversation_ids.is_empty() => Some(rest.clone()),
            _ => None,
        };
        let mut poller = Poller::new(plan.poller.clone(), direct.source(), groups)
            .with_secrets(credentials.clone());
        if let Some((config, journal)) = journal {
            poller = poller.with_journal(config, Some(journal));
        }
        let poller = Arc::new(poller);
        // Started now, so nothing that arrives is lost; without a handler it only waits.
        poller.start();
        let mut bridges = Vec::new();

        let mut stream = None;
        let mut idle_stream = None;
        match &plan.realtime {
            Realtime::None => {}
            Realtime::Native(url) => {
                let client = Arc::new(SseClient::new(
                    credentials.clone(),
                    SseConfig::new(url.clone()),
                ));
                client.start(Arc::new(PollerSink(poller.clone())));
                bridges.push(bridge_stream_state(client.clone(), poller.clone()));
                stream = Some(client);
            }
            Realtime::Caller(url) => {
                let factory = deps
                    .stream_factory
                    .clone()
                    .ok_or_else(|| failed("the plan names the caller's stream; none given"))?;
                let (tx, rx) = mpsc::channel(CALLER_STREAM_QUEUE);
                bridges.push(bridge_caller_stream(rx, poller.clone()));
                let connect_config = json!({
                    "agentId": credential.agent_id,
                    "apiKey": credential.api_key,
                    "apiBaseUrl": credential.api_base_url,
                    "sseEndpoint": plan.sse_endpoint,
                });
                let started = factory
                    .open(connect_config, StreamInbox(tx))
                    .await
                    .map_err(|e| StartError::Failed(credentials.scrub(&failed(e).to_string())))?;
                bridges.push(observe_stream_start(started));
                // With a factory, the runtime's own SSE transport opens no stream (its
                // status() says closed): the factory's transport is the stream, and two for
                // one agent would split the server's pushes between them.
                if plan.transport == TransportChoice::Sse {
                    idle_stream = Some(Arc::new(SseClient::new(
                        credentials.clone(),
                        SseConfig::new(url.clone()),
                    )));
                }
            }
        }

        let heartbeat = match (plan.heartbeat, &local, &rest) {
            // A local runtime beats into signaldock.db, over the transport's connection.
            (Some(interval), Some(local), _) => {
                Some(Heartbeat::new(Arc::new(local.clone()), interval))
            }
            (Some(interval), None, Some(rest)) => Some(Heartbeat::new(rest.clone(), interval)),
            _ => None,
        }
        .map(Arc::new);
        if let Some(heartbeat) = &heartbeat {
            heartbeat.start();
        }
        let key_rotation = plan.key_rotation.clone().map(|config| {
            Arc::new(KeyRotation::new(
                deps.registry.clone(),
                Some(credentials.clone()),
                config,
            ))
        });
        if let Some(rotation) = &key_rotation {
            rotation.start();
        }

        let (mut http_slot, mut local_slot) = (None, None);
        let own = match (&plan.transport, &rest, &local) {
            (TransportChoice::Http, Some(rest), _) => {
                let slot = Arc::new(Mutex::new(Some(rest.clone())));
                http_slot = Some(slot.clone());
                Some(OwnTransport::Http(slot))
            }
            (TransportChoice::Sse, Some(rest), _) => {
                let stream = stream
                    .clone()
                    .or(idle_stream)
                    .ok_or_else(|| failed("no stream for the SSE transport"))?;
                Some(OwnTransport::Sse {
                    stream,
                    rest: rest.clone(),
                })
            }
            (TransportChoice::Local(_), _, Some(local)) => {
                bridges.push(bridge_commits(local.clone(), poller.clone()));
                let slot = Arc::new(Mutex::new(Some(local.clone())));
                local_slot = Some(slot.clone());
                Some(OwnTransport::Local(slot))
            }
            _ => None,
        };

        Ok(Self {
            credentials,
            rest,
            poller,
            direct,
            heartbeat,
            key_rotation,
            stream,
            own: Mutex::new(own),
            http_slot,
            local_slot,
            local,
            bridges: Mutex::new(bridges),
            stopped: Mutex::new(None),
        })
    }

    async fn rest_client(plan: &Plan) -> Result<Arc<SignalDock>> {
        let client = SignalDock::new(
            plan.credentials.clone(),
            &plan.credential.api_base_url,
            plan.credential.text("apiBaseUrlFallback"),
        )?;
        client.choose_base().await;
        Ok(Arc::new(client))
    }

    pub fn agent_id(&self) -> &str {
        self.credentials.agent_id()
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// The one REST client, when the base URL is http(s).
    pub fn rest(&self) -> Option<&Arc<SignalDock>> {
        self.rest.as_ref()
    }

    pub fn poller(&self) -> &Arc<Poller> {
        &self.poller
    }

    /// Where the poller reads direct messages (for a final ack when the poller alone stops).
    pub fn direct(&self) -> &Direct {
        &self.direct
    }

    pub fn heartbeat(&self) -> Option<&Arc<Heartbeat>> {
        self.heartbeat.as_ref()
    }

    pub fn key_rotation(&self) -> Option<&Arc<KeyRotation>> {
        self.key_rotation.as_ref()
    }

    /// The native stream, when it is the realtime path.
    pub fn stream(&self) -> Option<&Arc<SseClient>> {
        self.stream.as_ref()
    }

    /// The transport the runtime resolved itself, once (None when the caller gave one).
    pub fn take_own_transport(&self) -> Option<OwnTransport> {
        lock(&self.own).take()
    }

    /// Stops everything at once, in order: the native stream, heartbeat, key rotation,
    /// poller, then the transport (the handed-out transport refuses calls from now on).
    /// Idempotent: a second call returns the first one's completion and no acks.
    ///
    /// `caller_stream`: what the caller's SSE transport still has to settle (its
    /// `disconnect()`), which the boundary stopped first; the completion waits for it.
    /// The caller's transport, if any, is the boundary's to ack and disconnect right after
    /// this returns, with [`Stopping::caller_acks`].
    pub fn stop(&self, caller_stream: Option<BoxFuture<'static, Result<()>>>) -> Stopping {
        let mut stopped = lock(&self.stopped);
        if let Some(done) = &*stopped {
            return Stopping {
                caller_acks: Vec::new(),
                done: done.clone(),
            };
        }
        if let Some(stream) = &self.stream {
            stream.stop();
        }
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.stop();
        }
        if let Some(rotation) = &self.key_rotation {
            rotation.stop();
        }
        let handled = self.poller.stop();
        for bridge in std::mem::take(&mut *lock(&self.bridges)) {
            bridge.stop();
        }
        // The native connection closes after the poller's last ack went out on it (the ack
        // holds its own handle).
        if let Some(slot) = &self.http_slot {
            lock(slot).take();
        }
        if let Some(slot) = &self.local_slot {
            lock(slot).take();
        }
        let (final_ack, caller_acks) = match &self.direct {
            Direct::Native(source) => (
                final_ack::send(self.agent_id(), source.clone(), handled),
                Vec::new(),
            ),
            Direct::Caller(_) => (None, handled),
        };
        let local = self.local.clone();
        let done = Completion::spawn(async move {
            if let Some(stopped) = caller_stream
                && let Err(e) = stopped.await
            {
                tracing::warn!(error = %e, "SSE connection stop failed");
            }
            if let Some(final_ack) = final_ack {
                final_ack.await;
            }
            if let Some(local) = local {
                local.disconnect().await;
            }
        });
        *stopped = Some(done.clone());
        Stopping { caller_acks, done }
    }
}

impl Drop for Runtime {
    /// A runtime dropped without `stop()` (one that never reached its caller): its
    /// services stop with their own `Drop`; the bridges hold the poller, so they must not
    /// run on.
    fn drop(&mut self) {
        for bridge in std::mem::take(&mut *lock(&self.bridges)) {
            bridge.stop();
        }
    }
}

/// What [`Runtime::stop`] leaves to do.
pub struct Stopping {
    /// Handled, not yet acked, read from the caller's transport: the boundary acks them on
    /// it before it disconnects it.
    pub caller_acks: Vec<String>,
    pub done: Completion,
}

/// The end of a runtime's stop: the final ack and the local connection's close. Runs by
/// itself (nothing has to poll it, and nothing keeps a process alive for it); awaiting it
/// returns once it is over.
#[derive(Clone)]
pub struct Completion(watch::Receiver<bool>);

impl Completion {
    fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        let (done, rx) = watch::channel(false);
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            work.await;
            let _ = done.send(true);
        }));
        Self(rx)
    }

    /// Returns once the stop is over.
    pub async fn wait(mut self) {
        // An error means the task is gone (its runtime shut down): over as well.
        let _ = self.0.wait_for(|done| *done).await;
    }
}

/// The native stream's messages go into the poller: same dedup, same handler.
struct PollerSink(Arc<Poller>);

impl SseSink for PollerSink {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0.offer(message).await;
        })
    }
}

/// Stream up: direct polling slows, after one poll now; stream down: a poll at once and
/// the normal interval.
fn bridge_stream_state(client: Arc<SseClient>, poller: Arc<Poller>) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        let mut states = client.states();
        // The connection attempt (reconnect count) whose stream was last followed by a poll.
        let mut polled_after: Option<u64> = None;
        loop {
            // Read before the state: the stream found connected is then this attempt's or a
            // later one's, and the poll below comes after it connected either way.
            let attempt = client.status().reconnects;
            let connected = *states.borrow_and_update() == SseState::Connected;
            poller.set_realtime(connected);
            // The server pushes only to a stream it knows: what it queued while none was open
            // (before the first one, or in a drop's gap after the drop's own poll) is found
            // only by a peek, which the slowed schedule would put off for 6 intervals. Keyed
            // by attempt, so a drop and reconnect seen as one change still polls.
            if connected && polled_after != Some(attempt) {
                polled_after = Some(attempt);
                poller.poll_now();
            }
            tokio::select! {
                _ = token.cancelled() => return,
                changed = states.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// Another process committed to signaldock.db: poll now, whatever the interval.
fn bridge_commits(local: LocalTransport, poller: Arc<Poller>) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        let mut commits = local.commits();
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = commits.changed() => if changed.is_err() { return },
            }
            poller.poll_now();
        }
    })
}

/// Messages from the caller's SSE transport, in order, into the poller.
fn bridge_caller_stream(
    mut messages: mpsc::Receiver<ConduitMessage>,
    poller: Arc<Poller>,
) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        loop {
            let message = tokio::select! {
                _ = token.cancelled() => return,
                m = messages.recv() => match m { Some(m) => m, None => return },
            };
            poller.offer(message).await;
        }
    })
}

/// The caller's SSE transport connecting and subscribing: a failure is logged.
fn observe_stream_start(started: BoxFuture<'static, Result<()>>) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        tokio::select! {
            _ = token.cancelled() => {}
            result = started => if let Err(e) = result {
                tracing::warn!(error = %e, "the SSE transport did not start; polling covers delivery");
            },
        }
    })
}

#[cfg(test)]
mod tests;
