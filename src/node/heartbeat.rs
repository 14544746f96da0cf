//! `HeartbeatService`: the JS class over [`crate::core::heartbeat::Heartbeat`].

use std::sync::Arc;

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::config::Fields;
use super::service::Service;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::heartbeat::{BeatOutcome, DEFAULT_INTERVAL, Heartbeat};
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

/// Reports presence: `POST /agents/{agentId}/heartbeat` at once, then every `intervalMs`.
#[napi(js_name = "HeartbeatService")]
pub struct HeartbeatService {
    pub(crate) inner: Arc<Service<Heartbeat>>,
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
        // A standalone service has its own credential and client; in a runtime, the
        // runtime's one of each.
        let credentials = Credentials::new(agent_id, ApiKey::new(api_key));
        let client = SignalDock::new(credentials, &api_base_url, None)
            .map_err(|e| super::error::to_js(&e))?;
        Ok(Self {
            inner: Service::new(Arc::new(Heartbeat::new(Arc::new(client), interval))),
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
        let s = self.inner.inner().status();
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
        let pending = self.inner.inner().beat_now();
        pending
            .await
            .map(Into::into)
            .map_err(|e| Error::from_reason(format!("HeartbeatService.beatNow: {e}")))
    }
}
