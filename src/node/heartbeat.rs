//! `HeartbeatService`: the JS class over [`crate::core::heartbeat::Heartbeat`].

use std::sync::Arc;

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::config::Fields;
use super::lifetime::Liveness;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::heartbeat::{BeatOutcome, DEFAULT_INTERVAL, Heartbeat};
use crate::core::local;
use crate::core::signaldock::SignalDock;

#[napi(object, js_name = "HeartbeatStatus")]
pub struct JsHeartbeatStatus {
    pub running: bool,
    pub consecutive_failures: u32,
    pub beats: f64,
    pub last_error: Option<String>,
}

/// What `beatNow()` resolves with.
#[napi(object, js_name = "BeatNowResult")]
pub struct JsBeatOutcome {
    /// The server answered 2xx.
    pub ok: bool,
    /// Why the beat failed, without secrets.
    pub error: Option<String>,
    /// Failed beats in a row, this one included.
    pub consecutive_failures: u32,
}

impl From<BeatOutcome> for JsBeatOutcome {
    fn from(o: BeatOutcome) -> Self {
        Self {
            ok: o.ok,
            error: o.error,
            consecutive_failures: o.consecutive_failures,
        }
    }
}

pub struct HeartbeatCore {
    pub core: Heartbeat,
    live: Liveness,
}

impl HeartbeatCore {
    /// A heartbeat over `client`: inside a runtime, the runtime's one REST client (so the
    /// beat fails over with everything else).
    pub fn new(client: Arc<SignalDock>, interval: std::time::Duration) -> Result<Arc<Self>> {
        let agent_id = client.credentials().agent_id();
        if !super::config::usable_in_path(agent_id) {
            return Err(Error::new(
                Status::InvalidArg,
                format!(
                    "heartbeat: the agent id {agent_id:?} cannot be used as an id in a URL path"
                ),
            ));
        }
        Ok(Arc::new(Self {
            core: Heartbeat::new(client, interval),
            live: Liveness::default(),
        }))
    }

    /// A runtime on the local SignalDock: the beats go into `signaldock.db`, through the
    /// runtime's own connection to it.
    pub fn local(transport: local::LocalTransport, interval: std::time::Duration) -> Arc<Self> {
        Arc::new(Self {
            core: Heartbeat::new(Arc::new(transport), interval),
            live: Liveness::default(),
        })
    }

    /// Starts; while running, the service (and `wrapper`, its JS object) is a GC root and
    /// keeps the process alive, until `stop()` or the end of the environment.
    pub fn start(self: &Arc<Self>, env: &Env, wrapper: Option<&Object<'_>>) -> Result<()> {
        let weak = Arc::downgrade(self);
        self.live.start(
            env,
            wrapper,
            || self.core.start(),
            move || {
                if let Some(service) = weak.upgrade() {
                    service.core.stop();
                    service.live.abandon();
                }
            },
        )
    }

    /// Roots a wrapper handed out for this service while it runs.
    pub fn root(&self, wrapper: &Object<'_>) -> Result<()> {
        self.live.root(wrapper)
    }

    pub fn stop(&self, env: &Env) {
        self.core.stop();
        self.live.release(env);
    }
}

/// Reports presence: `POST /agents/{agentId}/heartbeat` at once, then every `intervalMs`.
#[napi(js_name = "HeartbeatService")]
pub struct HeartbeatService {
    pub(crate) inner: Arc<HeartbeatCore>,
}

#[napi]
impl HeartbeatService {
    #[napi(constructor)]
    pub fn new(env: Env, config: Unknown) -> Result<Self> {
        let fields = Fields::new(&env, "HeartbeatService", Some(config), false)?;
        let agent_id = fields.required_path_id("agentId")?;
        let api_key = fields.required_string("apiKey")?;
        let api_base_url = fields.url("apiBaseUrl", true)?.unwrap_or_default();
        let interval = fields
            .positive_ms("intervalMs")?
            .unwrap_or(DEFAULT_INTERVAL);
        let credentials = Credentials::new(agent_id, ApiKey::new(api_key));
        let client = SignalDock::new(credentials, &api_base_url, None)
            .map_err(|e| Error::new(Status::InvalidArg, e.to_string()))?;
        Ok(Self {
            inner: HeartbeatCore::new(Arc::new(client), interval)?,
        })
    }

    /// Starts beating; idempotent; resets the failure count.
    #[napi]
    pub fn start(&self, env: Env, this: This) -> Result<()> {
        self.inner.start(&env, Some(&this))
    }

    #[napi]
    pub fn stop(&self, env: Env) {
        self.inner.stop(&env);
    }

    #[napi]
    pub fn status(&self) -> JsHeartbeatStatus {
        let s = self.inner.core.status();
        JsHeartbeatStatus {
            running: s.running,
            consecutive_failures: s.consecutive_failures,
            beats: s.beats as f64,
            last_error: s.last_error,
        }
    }

    /// One beat now (the schedule is left alone); resolves with its outcome.
    #[napi]
    pub async fn beat_now(&self) -> Result<JsBeatOutcome> {
        let pending = self.inner.core.beat_now();
        pending
            .await
            .map(Into::into)
            .map_err(|e| Error::from_reason(format!("HeartbeatService.beatNow: {e}")))
    }
}
