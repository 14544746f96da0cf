//! `KeyRotationService`: the JS class over [`crate::core::key_rotation::KeyRotation`].

use std::sync::Arc;

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::adapters::JsRegistry;
use super::config::Fields;
use super::js::JsThread;
use super::service::Service;
use crate::core::key_rotation::{CheckOutcome, KeyRotation, KeyRotationConfig};

#[napi(object, js_name = "KeyRotationStatus")]
pub struct JsKeyRotationStatus {
    pub running: bool,
    #[napi(ts_type = "string | null")]
    pub last_rotation_at: Either<String, Null>,
    pub checks: f64,
    pub rotations: f64,
    pub last_error: Option<String>,
}

/// What `checkNow()` resolves with.
#[napi(object, js_name = "CheckNowResult")]
pub struct JsCheckOutcome {
    /// The key was older than `maxKeyAgeMs` and `registry.rotateKey` was called.
    pub rotated: bool,
    /// The registry held a newer key (rotated elsewhere), which the runtime now uses.
    pub adopted: bool,
    /// Why the check failed, without secrets.
    pub error: Option<String>,
}

impl From<CheckOutcome> for JsCheckOutcome {
    fn from(o: CheckOutcome) -> Self {
        Self {
            rotated: o.rotated,
            adopted: o.adopted,
            error: o.error,
        }
    }
}

/// Rotates the agent's API key through the registry before it gets older than `maxKeyAgeMs`.
#[napi(js_name = "KeyRotationService")]
pub struct KeyRotationService {
    pub(crate) inner: Arc<Service<KeyRotation>>,
}

#[napi]
impl KeyRotationService {
    #[napi(constructor)]
    pub fn new(env: Env, config: Unknown) -> Result<Self> {
        let fields = Fields::new(&env, "KeyRotationService", Some(config), false)?;
        let agent_id = fields.required_agent_id("agentId")?;
        let registry = fields
            .object_with("registry", &["get", "rotateKey"])?
            .ok_or_else(|| {
                super::js::type_error(
                    &env,
                    "KeyRotationService: config.registry must be an object with get(), rotateKey()",
                )
            })?;
        let mut config = KeyRotationConfig::new(agent_id);
        if let Some(every) = fields.positive_ms("checkIntervalMs")? {
            config.check_interval = every;
        }
        if let Some(age) = fields.positive_ms("maxKeyAgeMs")? {
            config.max_key_age = age;
        }
        let registry = Arc::new(JsRegistry::new(&registry, JsThread::new(&env))?);
        Ok(Self {
            inner: Service::new(Arc::new(KeyRotation::new(registry, None, config))),
        })
    }

    /// Starts checking: the first check 5 s from now, then every `checkIntervalMs`.
    #[napi]
    pub fn start(&self, env: Env, this: This) -> Result<()> {
        self.inner.start(&env, Some(&this))
    }

    /// Stops, including a first check still pending.
    #[napi]
    pub fn stop(&self, env: Env) {
        self.inner.stop(&env);
    }

    #[napi]
    pub fn status(&self) -> JsKeyRotationStatus {
        let s = self.inner.inner().status();
        JsKeyRotationStatus {
            running: s.running,
            last_rotation_at: match s.last_rotation_at {
                Some(at) => Either::A(at),
                None => Either::B(Null),
            },
            checks: s.checks as f64,
            rotations: s.rotations as f64,
            last_error: s.last_error,
        }
    }

    /// One check now, also before the first scheduled one; resolves with what it did.
    #[napi]
    pub async fn check_now(&self) -> Result<JsCheckOutcome> {
        let pending = self.inner.inner().check_now();
        pending
            .await
            .map(Into::into)
            .map_err(|e| Error::from_reason(format!("KeyRotationService.checkNow: {e}")))
    }
}
