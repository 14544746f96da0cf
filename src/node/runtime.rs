//! `createRuntime`: resolve the credential, connect the transport, and start the services
//! around one shared [`Credentials`], so a rotated key reaches all of them.
//!
//! The JS entry (`index.js`) awaits [`start_runtime`] and turns the [`NativeRuntime`] into the
//! contract's plain handle object. Validation happens synchronously here, so a bad config is
//! a `TypeError` (a rejection, through the async JS wrapper) before anything starts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::{Map, Value, json};

use super::adapters::{JsRegistry, JsTransport};
use super::config::Fields;
use super::heartbeat::{HeartbeatCore, HeartbeatService};
use super::js::{JsThread, KeepAlive, type_error};
use super::key_rotation::{KeyRotationCore, KeyRotationService};
use super::poller::{AgentPoller, DirectPath, PollerCore, PollerSettings};
use super::transports::HttpTransport;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::error::Error as CoreError;
use crate::core::heartbeat::DEFAULT_INTERVAL;
use crate::core::key_rotation::KeyRotationConfig;
use crate::core::poller::PollerConfig;

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
    js_transport: Option<Arc<JsTransport>>,
    http_transport: Option<HttpTransport>,
    http_slot: Option<super::transports::ClientSlot>,
}

/// A started runtime (the native half of `RuntimeHandle`).
#[napi]
pub struct NativeRuntime {
    agent_id: String,
    parts: Mutex<Parts>,
    handed: Mutex<Handed>,
    stopped: Mutex<bool>,
}

#[derive(Default)]
struct Handed {
    poller: bool,
    heartbeat: bool,
    key_rotation: bool,
}

#[napi]
impl NativeRuntime {
    #[napi(getter)]
    pub fn agent_id(&self) -> String {
        self.agent_id.clone()
    }

    #[napi]
    pub fn take_poller(&self) -> Option<AgentPoller> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let mut handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
        (!std::mem::replace(&mut handed.poller, true))
            .then(|| parts.poller.clone().map(|inner| AgentPoller { inner }))?
    }

    #[napi]
    pub fn take_heartbeat(&self) -> Option<HeartbeatService> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let mut handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
        (!std::mem::replace(&mut handed.heartbeat, true)).then(|| {
            parts
                .heartbeat
                .clone()
                .map(|inner| HeartbeatService { inner })
        })?
    }

    #[napi]
    pub fn take_key_rotation(&self) -> Option<KeyRotationService> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let mut handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
        (!std::mem::replace(&mut handed.key_rotation, true)).then(|| {
            parts
                .key_rotation
                .clone()
                .map(|inner| KeyRotationService { inner })
        })?
    }

    /// The SSE connection service (null until the realtime path is configured).
    #[napi(ts_return_type = "null")]
    pub fn take_sse_connection(&self) -> Null {
        Null
    }

    /// The transport the runtime resolved itself (null when the caller gave one).
    #[napi]
    pub fn take_transport(&self) -> Option<HttpTransport> {
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .http_transport
            .take()
    }

    /// Stops everything, in order: SSE connection, heartbeat, key rotation, poller,
    /// transport. Best-effort and idempotent; never throws.
    #[napi]
    pub fn stop(&self, env: Env) {
        if std::mem::replace(
            &mut *self.stopped.lock().unwrap_or_else(|e| e.into_inner()),
            true,
        ) {
            return;
        }
        let parts = std::mem::take(&mut *self.parts.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(heartbeat) = &parts.heartbeat {
            heartbeat.stop();
        }
        if let Some(rotation) = &parts.key_rotation {
            rotation.stop();
        }
        if let Some(poller) = &parts.poller {
            poller.stop(&env);
        }
        if let Some(transport) = &parts.js_transport
            && let Err(e) = transport.disconnect_now(&env)
        {
            tracing::warn!(error = %super::js::describe(&e), "transport.disconnect() failed during stop");
        }
        if let Some(slot) = &parts.http_slot {
            slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// Validates, then resolves to a started [`NativeRuntime`]. Called by `createRuntime`.
#[napi(ts_return_type = "Promise<NativeRuntime>")]
pub fn start_runtime<'env>(
    env: &'env Env,
    registry: Unknown<'env>,
    config: Option<Unknown<'env>>,
) -> Result<PromiseRaw<'env, NativeRuntime>> {
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
        agent_id: fields.string("agentId")?,
        poll_interval: fields.positive_ms("pollIntervalMs")?,
        group_conversation_ids: fields
            .string_array("groupConversationIds")?
            .unwrap_or_default(),
        group_poll_limit: fields.positive_count("groupPollLimit", 1000)?,
        heartbeat_interval: fields.non_negative_ms("heartbeatIntervalMs")?,
        max_key_age,
        transport,
    };
    // Validated for type now; used by the realtime path.
    fields.url("sseEndpoint", false)?;
    fields.function("createSseTransport")?;
    let registry = Arc::new(JsRegistry::new(&registry, js.clone())?);
    // The pending registry and connect calls must not let the process exit under us.
    let keep_alive = KeepAlive::new(env)?;
    env.spawn_future(async move {
        let _keep_alive = keep_alive;
        build(settings, registry, js)
            .await
            .map_err(|e| Error::new(Status::GenericFailure, e))
    })
}

async fn build(
    settings: RuntimeSettings,
    registry: Arc<JsRegistry>,
    js: JsThread,
) -> std::result::Result<NativeRuntime, String> {
    let credential = registry
        .credential(settings.agent_id.as_deref())
        .await
        .map_err(|e| format!("createRuntime: {e}"))?
        .ok_or_else(|| NO_CREDENTIAL.to_owned())?;
    let credential =
        Credential::from_registry(credential).map_err(|e| format!("createRuntime: {e}"))?;
    let credentials = Credentials::new(
        &credential.agent_id,
        ApiKey::new(credential.api_key.as_str()),
    );
    let scrub = |text: String| credentials.scrub(&text);

    // The transport: the caller's (connected here), else native HTTP.
    let mut parts = Parts::default();
    let direct = match &settings.transport {
        Some(transport) => {
            transport
                .connect(credential.connect_config())
                .await
                .map_err(|e| scrub(format!("createRuntime: transport.connect() failed: {e}")))?;
            parts.js_transport = Some(transport.clone());
            DirectPath::Js(transport.clone())
        }
        None => {
            let http = HttpTransport::with_credentials(credentials.clone());
            http.connect_native(
                &credential.agent_id,
                &credential.api_key,
                &credential.api_base_url,
                credential.fallback(),
            )
            .await
            .map_err(|e| {
                scrub(format!(
                    "createRuntime: HTTP transport failed to connect: {e}"
                ))
            })?;
            let source = http.peek_source().map_err(|e| e.reason.clone())?;
            parts.http_slot = Some(http.slot());
            parts.http_transport = Some(http);
            DirectPath::Native(Arc::new(source))
        }
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
            // The old key stays a 401 fallback for one poll cycle.
            config.overlap = poll_interval;
            Some(config)
        }
    };
    if !poller_config.group_conversation_ids.is_empty() && !credential.has_rest() {
        return Err(format!(
            "createRuntime: group conversations need an http(s) apiBaseUrl, the credential has {:?}",
            credential.api_base_url
        ));
    }

    let agent_id = credential.agent_id.clone();
    let api_base_url = credential.api_base_url.clone();
    let has_rest = credential.has_rest();
    let shared = credentials.clone();
    let started = js
        .run(move |env| {
            let poller = PollerCore::build(
                env,
                PollerSettings {
                    config: poller_config,
                    credentials: shared.clone(),
                    api_base_url: api_base_url.clone(),
                    direct: Some(direct),
                },
            )?;
            // Started now, so nothing that arrives is lost; without a handler it only waits.
            poller.start(env)?;
            let heartbeat = match (heartbeat_interval, has_rest) {
                (Some(interval), true) => {
                    let heartbeat = HeartbeatCore::new(shared.clone(), &api_base_url, interval)?;
                    heartbeat.start(env)?;
                    Some(heartbeat)
                }
                _ => None,
            };
            let key_rotation = match rotation {
                Some(config) => {
                    let rotation = KeyRotationCore::new(registry, Some(shared), config);
                    rotation.start(env)?;
                    Some(rotation)
                }
                None => None,
            };
            Ok((poller, heartbeat, key_rotation))
        })
        .await
        .map_err(|e| format!("createRuntime: {e}"))?;
    let (poller, heartbeat, key_rotation) = started;
    parts.poller = Some(poller);
    parts.heartbeat = heartbeat;
    parts.key_rotation = key_rotation;
    Ok(NativeRuntime {
        agent_id,
        parts: Mutex::new(parts),
        handed: Mutex::new(Handed::default()),
        stopped: Mutex::new(false),
    })
}
