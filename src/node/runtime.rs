//! `createRuntime`: resolve the credential, connect the transport, and start the services
//! around one shared [`Credentials`], so a rotated key reaches all of them.
//!
//! The JS entry (`index.js`) awaits [`start_runtime`] and turns the [`NativeRuntime`] into the
//! contract's plain handle object. Validation happens synchronously here, so a bad config is
//! a `TypeError` (a rejection, through the async JS wrapper) before anything starts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use super::adapters::{JsRegistry, JsTransport};
use super::config::Fields;
use super::heartbeat::{HeartbeatCore, HeartbeatService};
use super::js::{JsThread, KeepAlive, type_error};
use super::key_rotation::{KeyRotationCore, KeyRotationService};
use super::lifetime::Liveness;
use super::poller::{AgentPoller, DirectPath, PollerCore, PollerSettings};
use super::runtime_context;
use super::sse::{SseConnectionCore, SseConnectionService, SseSource, SseTarget, SseTransport};
use super::transports::{HttpTransport, LocalTransport, default_local_db_path};
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::error::Error as CoreError;
use crate::core::heartbeat::DEFAULT_INTERVAL;
use crate::core::key_rotation::KeyRotationConfig;
use crate::core::local;
use crate::core::message::ConduitMessage;
use crate::core::poller::PollerConfig;
use crate::core::signaldock::SignalDock;
use crate::core::sse::{SseClient, SseConfig, SseSink, SseState};
use crate::core::sync::lock;
use crate::core::task::RunningTask;
use crate::core::transport::PeekSource;
use crate::logging::{LogScope, Sink};

/// The exact message callers match on when no credential exists.
pub const NO_CREDENTIAL: &str =
    "No agent credential found. Run: cleo agent register --id <id> --api-key <key>";

/// What the config asked for, read and checked on the JS thread.
struct RuntimeSettings {
    agent_id: Option<String>,
    poll_interval: Option<Duration>,
    group_conversation_ids: Vec<String>,
    group_poll_limit: Option<u32>,
    heartbeat_interval: Option<Duration>,
    max_key_age: Option<Duration>,
    transport: Option<Arc<JsTransport>>,
    sse_endpoint: Option<String>,
    create_sse_transport: Option<FactoryRef>,
    journal: crate::core::journal::JournalSetting,
}

type FactoryRef = Arc<FunctionRef<(), Unknown<'static>>>;

/// Which transport the runtime uses when the caller gives none (WIRE.md, "Transport
/// resolution").
#[derive(Debug, PartialEq)]
enum Resolved {
    Http,
    Sse,
    Local(PathBuf),
}

///
/// An SSE endpoint resolves `'sse'` with or without `createSseTransport`, as in the old
/// package (whose `handle.transport` was its own SSE transport whatever the factory made,
/// and the CLI prints its name); the factory only decides whose stream delivers.
fn resolve(api_base_url: &str, sse_endpoint: Option<&str>, local_db: PathBuf) -> Resolved {
    let cloud = api_base_url.starts_with("http");
    if cloud {
        if sse_endpoint.is_some() {
            Resolved::Sse
        } else {
            Resolved::Http
        }
    } else if local_db.is_file() {
        Resolved::Local(local_db)
    } else {
        Resolved::Http
    }
}

/// The credential fields the runtime uses.
struct Credential {
    agent_id: String,
    api_key: String,
    api_base_url: String,
    transport_config: Map<String, Value>,
}

impl Credential {
    fn from_registry(value: Value) -> std::result::Result<Self, CoreError> {
        let field = |name: &str| -> std::result::Result<String, CoreError> {
            match value.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(CoreError::Js(format!(
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

    fn sse_endpoint(&self) -> Option<&str> {
        self.transport_config
            .get("sseEndpoint")
            .and_then(Value::as_str)
    }

    fn fallback(&self) -> Option<&str> {
        self.transport_config
            .get("apiBaseUrlFallback")
            .and_then(Value::as_str)
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
        crate::core::signaldock::parse_base_url(&self.api_base_url).is_ok()
    }
}

/// The services of one runtime; handed to JS once, stopped together.
#[derive(Default)]
struct Parts {
    poller: Option<Arc<PollerCore>>,
    heartbeat: Option<Arc<HeartbeatCore>>,
    key_rotation: Option<Arc<KeyRotationCore>>,
    sse: Option<Arc<SseConnectionCore>>,
    js_transport: Option<Arc<JsTransport>>,
    http_slot: Option<super::transports::ClientSlot>,
    local: Option<local::LocalTransport>,
    local_slot: Option<LocalSlot>,
    /// Tasks that connect the parts: stream state → poller speed, local commits → poll now,
    /// JS SSE messages → poller.
    bridges: Vec<RunningTask>,
}

impl Drop for Parts {
    /// Parts dropped without `stop()` (a runtime that never reached JS: its environment went
    /// away while `createRuntime` was pending): the bridges hold the poller, so they must not
    /// run on.
    fn drop(&mut self) {
        for bridge in self.bridges.drain(..) {
            bridge.stop();
        }
    }
}

/// The transport the runtime resolved itself, handed to JS once as `handle.transport`.
type OwnTransport = Either3<HttpTransport, SseTransport, LocalTransport>;

/// A started runtime (the native half of `RuntimeHandle`).
#[napi]
pub struct NativeRuntime {
    agent_id: String,
    /// Where its services' records go (`config.logger`, else the process's logger).
    log_scope: LogScope,
    parts: Arc<Mutex<Parts>>,
    /// From creation to `stop()`: the runtime is a GC root (its JS object, and through it
    /// every service) and stops with its environment.
    live: Arc<Liveness>,
    own_transport: Mutex<Option<OwnTransport>>,
    handed: Mutex<Handed>,
    stopped: Mutex<bool>,
}

#[derive(Default)]
struct Handed {
    poller: bool,
    heartbeat: bool,
    key_rotation: bool,
    sse: bool,
}

#[napi]
impl NativeRuntime {
    #[napi(getter)]
    pub fn agent_id(&self) -> String {
        self.agent_id.clone()
    }

    /// The poller, once; rooted like the runtime while it runs.
    #[napi(ts_return_type = "AgentPoller | null")]
    pub fn take_poller<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let Some(inner) = self.hand_out(|h| &mut h.poller, |p| p.poller.clone()) else {
            return Ok(None);
        };
        let object = AgentPoller {
            inner: inner.clone(),
        }
        .into_instance(env)?
        .as_object(env);
        inner.root(&object)?;
        Ok(Some(object))
    }

    #[napi(ts_return_type = "HeartbeatService | null")]
    pub fn take_heartbeat<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let Some(inner) = self.hand_out(|h| &mut h.heartbeat, |p| p.heartbeat.clone()) else {
            return Ok(None);
        };
        let object = HeartbeatService {
            inner: inner.clone(),
        }
        .into_instance(env)?
        .as_object(env);
        inner.root(&object)?;
        Ok(Some(object))
    }

    #[napi(ts_return_type = "KeyRotationService | null")]
    pub fn take_key_rotation<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let Some(inner) = self.hand_out(|h| &mut h.key_rotation, |p| p.key_rotation.clone()) else {
            return Ok(None);
        };
        let object = KeyRotationService {
            inner: inner.clone(),
        }
        .into_instance(env)?
        .as_object(env);
        inner.root(&object)?;
        Ok(Some(object))
    }

    /// The SSE connection service, or null when no SSE endpoint is known.
    #[napi(ts_return_type = "SseConnectionService | null")]
    pub fn take_sse_connection<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let Some(inner) = self.hand_out(|h| &mut h.sse, |p| p.sse.clone()) else {
            return Ok(None);
        };
        let object = SseConnectionService {
            inner: inner.clone(),
        }
        .into_instance(env)?
        .as_object(env);
        inner.root(&object)?;
        Ok(Some(object))
    }

    /// The transport the runtime resolved itself (null when the caller gave one); rooted
    /// with the runtime until `stop()`, like the services.
    #[napi(ts_return_type = "HttpTransport | SseTransport | LocalTransport | null")]
    pub fn take_transport<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let Some(transport) = lock(&self.own_transport).take() else {
            return Ok(None);
        };
        let object = match transport {
            Either3::A(http) => http.into_instance(env)?.as_object(env),
            Either3::B(sse) => sse.into_instance(env)?.as_object(env),
            Either3::C(local) => local.into_instance(env)?.as_object(env),
        };
        self.live.root(&object)?;
        Ok(Some(object))
    }

    /// Stops everything, in order: SSE connection, heartbeat, key rotation, poller,
    /// transport. Best-effort and idempotent; never throws.
    #[napi]
    pub fn stop(&self, env: Env) {
        if std::mem::replace(&mut *lock(&self.stopped), true) {
            return;
        }
        self.live.release(&env);
        let _in_scope = self.log_scope.span().enter();
        let mut parts = std::mem::take(&mut *lock(&self.parts));
        if let Some(sse) = &parts.sse {
            match sse.stop(&env) {
                Ok(stopped) => {
                    runtime_context(|| {
                        tokio::spawn(
                            async move {
                                if let Err(e) = stopped.await {
                                    tracing::warn!(error = %super::js::describe(&e), "SSE connection stop failed");
                                }
                            }
                            .in_current_span(),
                        )
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %super::js::describe(&e), "SSE connection stop failed")
                }
            }
        }
        if let Some(heartbeat) = &parts.heartbeat {
            heartbeat.stop(&env);
        }
        if let Some(rotation) = &parts.key_rotation {
            rotation.stop(&env);
        }
        let final_ack = parts.poller.as_ref().and_then(|poller| poller.stop(&env));
        if let Some(transport) = &parts.js_transport
            && let Err(e) = transport.disconnect_now(&env)
        {
            tracing::warn!(error = %super::js::describe(&e), "transport.disconnect() failed during stop");
        }
        // The handed-out transport objects refuse calls from now on; the native connection
        // closes after the poller's last ack went out on it (the ack holds its own handle).
        if let Some(slot) = &parts.http_slot {
            lock(slot).take();
        }
        if let Some(slot) = &parts.local_slot {
            lock(slot).take();
        }
        let local = parts.local.clone();
        runtime_context(|| {
            tokio::spawn(
                async move {
                    if let Some(final_ack) = final_ack {
                        final_ack.await;
                    }
                    if let Some(local) = local {
                        local.disconnect().await;
                    }
                }
                .in_current_span(),
            )
        });
        for bridge in std::mem::take(&mut parts.bridges) {
            bridge.stop();
        }
    }
}

impl NativeRuntime {
    /// The part `pick` selects, the first time it is asked for.
    fn hand_out<T>(
        &self,
        flag: impl FnOnce(&mut Handed) -> &mut bool,
        pick: impl FnOnce(&Parts) -> Option<T>,
    ) -> Option<T> {
        let parts = lock(&self.parts);
        let mut handed = lock(&self.handed);
        (!std::mem::replace(flag(&mut handed), true)).then(|| pick(&parts))?
    }

    /// Roots the runtime's JS object and holds the process from now until `stop()`; if the
    /// environment goes away first, what the services do not stop themselves stops here.
    fn hold(&self, env: &Env, wrapper: &Object<'_>) -> Result<()> {
        let (parts, live) = (Arc::downgrade(&self.parts), Arc::downgrade(&self.live));
        self.live.hold(env, Some(wrapper), move || {
            // The services (poller, heartbeat, key rotation, SSE) have their own teardowns;
            // the bridges and the native transports' connections are the runtime's.
            if let Some(parts) = parts.upgrade() {
                let parts = std::mem::take(&mut *lock(&parts));
                if let Some(slot) = &parts.http_slot {
                    lock(slot).take();
                }
                if let Some(slot) = &parts.local_slot {
                    lock(slot).take();
                }
                if let Some(local) = parts.local.clone() {
                    runtime_context(|| tokio::spawn(async move { local.disconnect().await }));
                }
                drop(parts);
            }
            if let Some(live) = live.upgrade() {
                live.abandon();
            }
        })
    }
}

/// Validates, then resolves to a started [`NativeRuntime`]. Called by `createRuntime`.
#[napi(ts_return_type = "Promise<NativeRuntime>")]
pub fn start_runtime<'env>(
    env: &'env Env,
    registry: Unknown<'env>,
    config: Option<Unknown<'env>>,
) -> Result<PromiseRaw<'env, Object<'env>>> {
    let registry = match registry.get_type()? {
        ValueType::Object => unsafe { Object::from_napi_value(env.raw(), registry.raw())? },
        _ => {
            return Err(type_error(
                env,
                "createRuntime: registry must be an object with get(), getActive(), rotateKey()",
            ));
        }
    };
    if let Some(missing) = super::config::missing_method(&registry, &["get", "getActive"])? {
        return Err(type_error(
            env,
            format!(
                "createRuntime: registry must be an object with get(), getActive(), rotateKey(); {missing}() is missing"
            ),
        ));
    }
    let fields = Fields::new(env, "createRuntime", config, true)?;
    // Everything the runtime makes from here on (its JS thread's jobs, its services' loops)
    // runs in its log scope, so its records go to `config.logger` when there is one.
    let logger = super::logger::read(env, fields.raw("logger")?, "createRuntime: config.logger")?;
    let log_scope = LogScope::new(logger.map(|l| l as Arc<dyn Sink>));
    let span = log_scope.span().clone();
    let _in_scope = span.enter();
    let js = JsThread::new(env)?;
    let transport = match fields.object_with("transport", &["connect", "poll"])? {
        Some(object) => Some(Arc::new(JsTransport::new(&object, js.clone())?)),
        None => None,
    };
    let max_key_age = fields.non_negative_ms("maxKeyAgeMs")?;
    if max_key_age != Some(Duration::ZERO)
        && super::config::missing_method(&registry, &["rotateKey"])?.is_some()
    {
        return Err(type_error(
            env,
            "createRuntime: registry must have rotateKey() unless config.maxKeyAgeMs is 0",
        ));
    }
    let settings = RuntimeSettings {
        agent_id: fields.agent_id("agentId", false)?,
        poll_interval: fields.positive_ms("pollIntervalMs")?,
        group_conversation_ids: fields
            .string_array("groupConversationIds")?
            .unwrap_or_default(),
        group_poll_limit: fields.positive_count("groupPollLimit", 1000)?,
        heartbeat_interval: fields.non_negative_ms("heartbeatIntervalMs")?,
        max_key_age,
        transport,
        sse_endpoint: fields.url("sseEndpoint", false)?,
        create_sse_transport: match fields.function("createSseTransport")? {
            Some(f) => {
                let f: Function<(), Unknown<'static>> =
                    unsafe { Function::from_napi_value(env.raw(), f.raw())? };
                Some(Arc::new(f.create_ref()?))
            }
            None => None,
        },
        journal: fields.journal("journal")?,
    };
    let registry = Arc::new(JsRegistry::new(&registry, js.clone())?);
    // The pending registry and connect calls must not let the process exit under us.
    let keep_alive = KeepAlive::new(env)?;
    env.spawn_future_with_callback(
        async move {
            let _keep_alive = keep_alive;
            build(settings, registry, js, log_scope).await
        }
        .instrument(span.clone()),
        // On the JS thread, as the runtime becomes a JS object: from here until `stop()` the
        // object is a GC root, so a caller that keeps no reference still has a running daemon.
        |env, runtime: NativeRuntime| {
            let instance = runtime.into_instance(env)?;
            let object = instance.as_object(env);
            instance.hold(env, &object)?;
            Ok(object)
        },
    )
}

async fn build(
    settings: RuntimeSettings,
    registry: Arc<JsRegistry>,
    js: JsThread,
    log_scope: LogScope,
) -> Result<NativeRuntime> {
    match build_runtime(settings, registry, js.clone(), log_scope).await {
        Ok(runtime) => Ok(runtime),
        Err(Failure::Message(why)) => Err(Error::new(Status::GenericFailure, why)),
        // A TypeError, as a config error is elsewhere: made on the JS thread, so the
        // rejection is that very object.
        Err(Failure::Type(why)) => Err(js
            .run(move |env| {
                let raw = unsafe {
                    napi::JsTypeError::from(Error::new(Status::InvalidArg, why))
                        .into_value(env.raw())
                };
                Ok(Error::from(unsafe {
                    Unknown::from_raw_unchecked(env.raw(), raw)
                }))
            })
            .await
            .unwrap_or_else(|e| Error::new(Status::InvalidArg, e.to_string()))),
    }
}

/// Why `createRuntime` rejects: a plain `Error`, or a `TypeError` (a bad credential field).
enum Failure {
    Message(String),
    Type(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Failure::Message(why)
    }
}

async fn build_runtime(
    settings: RuntimeSettings,
    registry: Arc<JsRegistry>,
    js: JsThread,
    log_scope: LogScope,
) -> std::result::Result<NativeRuntime, Failure> {
    let credential = registry
        .credential(settings.agent_id.as_deref())
        .await
        .map_err(|e| format!("createRuntime: {e}"))?
        .ok_or_else(|| NO_CREDENTIAL.to_owned())?;
    let credential =
        Credential::from_registry(credential).map_err(|e| format!("createRuntime: {e}"))?;
    // An id no HTTP header can carry would make every request fail later, with the id in
    // the error text; it is the registry's credential that is wrong, so it says so now.
    if !crate::core::credentials::usable_agent_id(&credential.agent_id) {
        return Err(Failure::Type(format!(
            "createRuntime: the registry's credential.agentId must be {}",
            crate::core::credentials::AGENT_ID_RULE
        )));
    }
    let credentials = Credentials::new(
        &credential.agent_id,
        ApiKey::new(credential.api_key.as_str()),
    );
    log_scope.bind(&credentials);
    let scrub = |text: String| credentials.scrub(&text);
    let fail = |what: &str, e: CoreError| scrub(format!("createRuntime: {what}: {e}"));
    // First, so a journal in use by another runtime fails before anything connects.
    let journal = crate::core::journal::open_for(&settings.journal, &credential.agent_id)
        .await
        .map_err(|e| fail("journal", e))?;

    let sse_endpoint = settings
        .sse_endpoint
        .clone()
        .or_else(|| credential.sse_endpoint().map(str::to_owned));
    // An endpoint is usable when it is absolute, or relative to an http(s) base.
    let sse_url = match &sse_endpoint {
        Some(endpoint) => Some(
            SseConfig::endpoint_url(Some(endpoint), &credential.api_base_url)
                .map_err(|e| fail("sseEndpoint", e))?,
        ),
        None => None,
    };

    // The transport: the caller's (connected here), else resolved natively.
    let mut parts = Parts::default();
    let mut own = OwnParts::None;
    // One REST client for every REST call of the runtime (peek, ack, groups, heartbeat,
    // the SSE transport's push), so all of them share the credential and the failover.
    let mut rest: Option<Arc<SignalDock>> = None;
    let direct = match &settings.transport {
        Some(transport) => {
            transport
                .connect(credential.connect_config())
                .await
                .map_err(|e| fail("transport.connect() failed", e))?;
            parts.js_transport = Some(transport.clone());
            DirectPath::Js(transport.clone())
        }
        None => {
            let resolved = resolve(
                &credential.api_base_url,
                sse_endpoint.as_deref(),
                default_local_db_path(),
            );
            tracing::debug!(?resolved, "resolved the transport");
            match resolved {
                Resolved::Local(path) => {
                    let local = local::LocalTransport::connect(path, credential.agent_id.clone())
                        .await
                        .map_err(|e| fail("local transport failed to connect", e))?;
                    parts.local = Some(local.clone());
                    own = OwnParts::Local(local.clone());
                    DirectPath::Native(Arc::new(local))
                }
                Resolved::Http | Resolved::Sse => {
                    let http = HttpTransport::with_credentials(credentials.clone());
                    let client = http
                        .connect_native(
                            &credential.agent_id,
                            &credential.api_key,
                            &credential.api_base_url,
                            credential.fallback(),
                        )
                        .await
                        .map_err(|e| fail("HTTP transport failed to connect", e))?;
                    parts.http_slot = Some(http.slot());
                    own = if resolved == Resolved::Sse {
                        OwnParts::Sse(client.clone())
                    } else {
                        OwnParts::Http(http)
                    };
                    rest = Some(client.clone());
                    DirectPath::Native(Arc::new(PeekSource::new(client)))
                }
            }
        }
    };

    let rest = match rest {
        Some(rest) => Some(rest),
        None if credential.has_rest() => {
            let client = SignalDock::new(
                credentials.clone(),
                &credential.api_base_url,
                credential.fallback(),
            )
            .map_err(|e| fail("apiBaseUrl", e))?;
            client.choose_base().await;
            Some(Arc::new(client))
        }
        None => None,
    };

    let poll_interval = settings
        .poll_interval
        .or_else(|| credential.poll_interval())
        .unwrap_or(Duration::from_millis(5000));
    let mut poller_config = PollerConfig::new(&credential.agent_id);
    poller_config.poll_interval = poll_interval;
    poller_config.group_conversation_ids = settings.group_conversation_ids.clone();
    if let Some(limit) = settings.group_poll_limit {
        poller_config.group_poll_limit = limit;
    }
    if !poller_config.group_conversation_ids.is_empty() && !credential.has_rest() {
        return Err(Failure::Message(format!(
            "createRuntime: group conversations need an http(s) apiBaseUrl, the credential has {:?}",
            credential.api_base_url
        )));
    }
    let heartbeat_interval = match settings.heartbeat_interval {
        Some(Duration::ZERO) => None,
        other => Some(other.unwrap_or(DEFAULT_INTERVAL)),
    };
    let rotation = match settings.max_key_age {
        Some(Duration::ZERO) => None,
        other => {
            let mut config = KeyRotationConfig::new(&credential.agent_id);
            if let Some(age) = other {
                config.max_key_age = age;
            }
            // The old key stays a 401 fallback for one full poll cycle after the hand-over:
            // two intervals plus a second, so the next poll falls inside it whatever the
            // phase of the rotation check against the poll schedule.
            config.overlap = poll_interval * 2 + Duration::from_secs(1);
            Some(config)
        }
    };
    // The realtime path: the caller's factory (a JS transport), else the native stream.
    let realtime = match (sse_url, settings.create_sse_transport.clone()) {
        (None, _) => Realtime::None,
        (Some(url), Some(factory)) => Realtime::Js(factory, url),
        (Some(url), None) => Realtime::Native(Arc::new(SseClient::new(
            credentials.clone(),
            SseConfig::new(url),
        ))),
    };
    // With a factory, the runtime's own SSE transport opens no stream (its status() says
    // closed): the factory's transport is the stream, and two for one agent would split the
    // server's pushes between them.
    let idle_stream = match (&own, &realtime) {
        (OwnParts::Sse(_), Realtime::Js(_, url)) => Some(Arc::new(SseClient::new(
            credentials.clone(),
            SseConfig::new(url.clone()),
        ))),
        _ => None,
    };

    let agent_id = credential.agent_id.clone();
    let api_base_url = credential.api_base_url.clone();
    // A local runtime beats into signaldock.db, over the transport's connection.
    let local_beat = parts.local.clone();
    let shared = credentials.clone();
    let sse_connect = json!({
        "agentId": credential.agent_id, "apiKey": credential.api_key, "apiBaseUrl": credential.api_base_url, "sseEndpoint": sse_endpoint,
    });
    let started = js
        .run(move |env| {
            let poller = PollerCore::build(
                env,
                PollerSettings { config: poller_config, credentials: shared.clone(), api_base_url: api_base_url.clone(), rest: rest.clone(), direct: Some(direct), journal },
            )?;
            // Started now, so nothing that arrives is lost; without a handler it only waits.
            poller.start(env, None)?;
            let mut bridges = Vec::new();
            let mut local_slot = None;
            let sse = match realtime {
                Realtime::None => None,
                Realtime::Native(client) => {
                    let sink: Arc<dyn SseSink> = Arc::new(PollerSink(poller.clone()));
                    runtime_context(|| client.start(sink));
                    bridges.push(runtime_context(|| bridge_realtime(client.clone(), poller.clone())));
                    let core = SseConnectionCore::new(SseSource::Native { client: client.clone() }, SseTarget::Handler(Mutex::new(None)), "sse".into());
                    core.mark_running(env)?;
                    Some((core, Some(client)))
                }
                Realtime::Js(factory, _) => {
                    let factory = factory.borrow_back(env)?;
                    let factory = unsafe { Unknown::from_raw_unchecked(env.raw(), factory.raw()) };
                    let created = super::js::call(env, factory, ())
                        .map_err(|e| Error::new(Status::GenericFailure, format!("createSseTransport() failed: {}", super::js::describe(&e))))?;
                    if created.get_type()? != ValueType::Object {
                        return Err(Error::new(Status::InvalidArg, "createSseTransport() did not return a transport object".to_owned()));
                    }
                    let object = unsafe { Object::from_napi_value(env.raw(), created.raw())? };
                    let transport = Arc::new(JsTransport::new(&object, JsThread::new(env)?)?);
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    bridges.push(runtime_context(|| bridge_js_sse(rx, poller.clone())));
                    let name = transport.transport_name().to_owned();
                    let source = SseSource::Js { transport, connect_config: sse_connect, unsubscribe: Mutex::new(None) };
                    let core = SseConnectionCore::new(source, SseTarget::Poller(tx), name);
                    // Started without awaiting, as the old runtime did: a failure is logged.
                    let started = core.start(env, None)?;
                    runtime_context(|| {
                        tokio::spawn(async move {
                            if let Err(e) = started.await {
                                tracing::warn!(error = %super::js::describe(&e), "the SSE transport did not start; polling covers delivery");
                            }
                        }.in_current_span())
                    });
                    Some((core, None))
                }
            };
            let heartbeat = match (heartbeat_interval, local_beat, &rest) {
                (Some(interval), Some(local), _) => {
                    let heartbeat = HeartbeatCore::local(local, interval);
                    heartbeat.start(env, None)?;
                    Some(heartbeat)
                }
                (Some(interval), None, Some(rest)) => {
                    let heartbeat = HeartbeatCore::new(rest.clone(), interval)?;
                    heartbeat.start(env, None)?;
                    Some(heartbeat)
                }
                _ => None,
            };
            let key_rotation = match rotation {
                Some(config) => {
                    let rotation = KeyRotationCore::new(registry, Some(shared), config);
                    rotation.start(env, None)?;
                    Some(rotation)
                }
                None => None,
            };
            let (sse, stream) = match sse {
                Some((core, stream)) => (Some(core), stream),
                None => (None, None),
            };
            let own = match own {
                OwnParts::None => None,
                OwnParts::Http(http) => Some(Either3::A(http)),
                OwnParts::Sse(rest) => {
                    let client = stream.or(idle_stream).ok_or_else(|| Error::new(Status::GenericFailure, "no stream for the SSE transport".to_owned()))?;
                    Some(Either3::B(SseTransport::from_parts(env, client, rest)?))
                }
                OwnParts::Local(local) => {
                    bridges.push(runtime_context(|| bridge_commits(local.clone(), poller.clone())));
                    let transport = LocalTransport::from_core(env, local)?;
                    local_slot = Some(transport.slot());
                    Some(Either3::C(transport))
                }
            };
            Ok(Started { poller, heartbeat, key_rotation, sse, own, bridges, local_slot })
        })
        .await
        .map_err(|e| scrub(format!("createRuntime: {e}")))?;
    parts.poller = Some(started.poller);
    parts.heartbeat = started.heartbeat;
    parts.key_rotation = started.key_rotation;
    parts.sse = started.sse;
    parts.bridges = started.bridges;
    parts.local_slot = started.local_slot;
    Ok(NativeRuntime {
        agent_id,
        log_scope,
        parts: Arc::new(Mutex::new(parts)),
        live: Arc::default(),
        own_transport: Mutex::new(started.own),
        handed: Mutex::new(Handed::default()),
        stopped: Mutex::new(false),
    })
}

/// What the JS-thread half of `build` made.
struct Started {
    poller: Arc<PollerCore>,
    heartbeat: Option<Arc<HeartbeatCore>>,
    key_rotation: Option<Arc<KeyRotationCore>>,
    sse: Option<Arc<SseConnectionCore>>,
    own: Option<OwnTransport>,
    bridges: Vec<RunningTask>,
    local_slot: Option<LocalSlot>,
}

type LocalSlot = Arc<Mutex<Option<local::LocalTransport>>>;

/// The resolved transport's pieces, before its JS object is made on the JS thread.
enum OwnParts {
    None,
    Http(HttpTransport),
    Sse(Arc<SignalDock>),
    Local(local::LocalTransport),
}

enum Realtime {
    None,
    /// The caller's `createSseTransport`, and the endpoint it is connected to.
    Js(FactoryRef, url::Url),
    Native(Arc<SseClient>),
}

/// The native stream's messages go into the poller: same dedup, same handler.
struct PollerSink(Arc<PollerCore>);

impl SseSink for PollerSink {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0.core.offer(message).await;
        })
    }
}

/// Stream up: direct polling slows, after one poll now; stream down: a poll at once and
/// the normal interval.
fn bridge_realtime(client: Arc<SseClient>, poller: Arc<PollerCore>) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        let mut states = client.states();
        // The connection attempt (reconnect count) whose stream was last followed by a poll.
        let mut polled_after: Option<u64> = None;
        loop {
            // Read before the state: the stream found connected is then this attempt's or a
            // later one's, and the poll below comes after it connected either way.
            let attempt = client.status().reconnects;
            let connected = *states.borrow_and_update() == SseState::Connected;
            poller.core.set_realtime(connected);
            // The server pushes only to a stream it knows: what it queued while none was open
            // (before the first one, or in a drop's gap after the drop's own poll) is found
            // only by a peek, which the slowed schedule would put off for 6 intervals. Keyed
            // by attempt, so a drop and reconnect seen as one change still polls.
            if connected && polled_after != Some(attempt) {
                polled_after = Some(attempt);
                poller.core.poll_now();
            }
            tokio::select! {
                _ = token.cancelled() => return,
                changed = states.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// Another process committed to signaldock.db: poll now, whatever the interval.
fn bridge_commits(local: local::LocalTransport, poller: Arc<PollerCore>) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        let mut commits = local.commits();
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = commits.changed() => if changed.is_err() { return },
            }
            poller.core.poll_now();
        }
    })
}

/// Messages from a JS SSE transport's subscription, in order, into the poller.
fn bridge_js_sse(
    mut messages: tokio::sync::mpsc::UnboundedReceiver<ConduitMessage>,
    poller: Arc<PollerCore>,
) -> RunningTask {
    RunningTask::spawn(move |token| async move {
        loop {
            let message = tokio::select! {
                _ = token.cancelled() => return,
                m = messages.recv() => match m { Some(m) => m, None => return },
            };
            poller.core.offer(message).await;
        }
    })
}
