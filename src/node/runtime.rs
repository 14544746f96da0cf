//! `createRuntime` at the boundary: read the JS config, adapt the caller's objects to the
//! core's traits, start a [`Runtime`], and wrap it as the [`NativeRuntime`] handle.
//!
//! The JS entry (`index.js`) awaits [`start_runtime`] and turns the [`NativeRuntime`] into the
//! contract's plain handle object. Validation happens synchronously here, so a bad config is
//! a `TypeError` (a rejection, through the async JS wrapper) before anything starts. What to
//! start and how the parts connect is the core's ([`crate::core::runtime`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tracing::Instrument;

use super::adapters::{JsRegistry, JsStreamFactory, JsTransport};
use super::config::Fields;
use super::heartbeat::HeartbeatService;
use super::js::{JsFn, JsThread, KeepAlive, describe, type_error};
use super::key_rotation::KeyRotationService;
use super::lifetime::Liveness;
use super::poller::{AgentPoller, DirectPath, PollerPart};
use super::service::{Lifecycle, Service};
use super::sse_connection::{SseConnection, SseConnectionService, SseSource, SseTarget};
use super::transports::{HttpTransport, LocalTransport, SseTransport};
use crate::core::error::Error as CoreError;
use crate::core::heartbeat::Heartbeat;
use crate::core::key_rotation::KeyRotation;
use crate::core::runtime::{
    Credential, Deps, Direct, OwnTransport, Plan, Runtime, Settings, StartError, present_local_db,
};
use crate::core::sync::lock;
use crate::logging::{LogScope, Sink};

/// The caller's objects, adapted.
struct Callers {
    registry: Arc<JsRegistry>,
    transport: Option<Arc<JsTransport>>,
    streams: Option<Arc<JsStreamFactory>>,
}

/// A started core runtime and the caller's objects it runs with, on its way to the JS thread.
struct Built {
    runtime: Runtime,
    callers: Callers,
    log_scope: LogScope,
    js: JsThread,
}

/// The transport the runtime resolved itself, handed to JS once as `handle.transport`.
type OwnClass = Either3<HttpTransport, SseTransport, LocalTransport>;

/// A started runtime (the native half of `RuntimeHandle`).
#[napi]
pub struct NativeRuntime {
    runtime: Arc<Runtime>,
    /// Where its services' records go (`config.logger`, else the process's logger).
    log_scope: LogScope,
    poller: Arc<Service<PollerPart>>,
    heartbeat: Option<Arc<Service<Heartbeat>>>,
    key_rotation: Option<Arc<Service<KeyRotation>>>,
    sse: Option<Arc<SseConnection>>,
    /// `config.transport`, acked and disconnected by `stop()`.
    js_transport: Option<Arc<JsTransport>>,
    own_transport: Mutex<Option<OwnClass>>,
    /// From creation to `stop()`: the runtime is a GC root (its JS object, and through it
    /// every service) and stops with its environment.
    live: Arc<Liveness>,
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
        self.runtime.agent_id().to_owned()
    }

    /// The poller, once; rooted like the runtime while it runs.
    #[napi(ts_return_type = "AgentPoller | null")]
    pub fn take_poller<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let inner = Some(self.poller.clone());
        let class = inner.clone().map(|inner| AgentPoller { inner });
        self.hand_out(env, |h| &mut h.poller, class, |o| root(&inner, o))
    }

    #[napi(ts_return_type = "HeartbeatService | null")]
    pub fn take_heartbeat<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let inner = self.heartbeat.clone();
        let class = inner.clone().map(|inner| HeartbeatService { inner });
        self.hand_out(env, |h| &mut h.heartbeat, class, |o| root(&inner, o))
    }

    #[napi(ts_return_type = "KeyRotationService | null")]
    pub fn take_key_rotation<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let inner = self.key_rotation.clone();
        let class = inner.clone().map(|inner| KeyRotationService { inner });
        self.hand_out(env, |h| &mut h.key_rotation, class, |o| root(&inner, o))
    }

    /// The SSE connection service, or null when no SSE endpoint is known.
    #[napi(ts_return_type = "SseConnectionService | null")]
    pub fn take_sse_connection<'env>(&self, env: &'env Env) -> Result<Option<Object<'env>>> {
        let inner = self.sse.clone();
        let class = inner.clone().map(|inner| SseConnectionService { inner });
        self.hand_out(
            env,
            |h| &mut h.sse,
            class,
            |o| match &inner {
                Some(service) => service.root(o),
                None => Ok(()),
            },
        )
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
    /// transport. Best-effort and idempotent; never throws. What is left (the final ack,
    /// closing a local connection) finishes in the core runtime's completion.
    #[napi]
    pub fn stop(&self, env: Env) {
        if std::mem::replace(&mut *lock(&self.stopped), true) {
            return;
        }
        let _in_scope = self.log_scope.span().enter();
        self.live.release(&env);
        // The caller's SSE transport is unsubscribed and disconnected now; the runtime's
        // completion waits for its disconnect() to settle.
        let caller_stream = self.sse.as_ref().and_then(|sse| match sse.stop(&env) {
            Ok(stopped) => {
                Some(
                    Box::pin(async move { stopped.await.map_err(|e| CoreError::Js(describe(&e))) })
                        as BoxFuture<'static, _>,
                )
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), "SSE connection stop failed");
                None
            }
        });
        // The runtime stops the services; their wrappers let go of the process.
        self.poller.release(&env);
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.release(&env);
        }
        if let Some(rotation) = &self.key_rotation {
            rotation.release(&env);
        }
        let stopping = runtime_context(|| self.runtime.stop(caller_stream));
        if let Some(transport) = &self.js_transport {
            if !stopping.caller_acks.is_empty()
                && let Err(e) = transport.ack_now(&env, stopping.caller_acks)
            {
                tracing::warn!(error = %describe(&e), "final ack on stop failed");
            }
            if let Err(e) = transport.disconnect_now(&env) {
                tracing::warn!(error = %describe(&e), "transport.disconnect() failed during stop");
            }
        }
    }
}

impl NativeRuntime {
    /// On the JS thread: the started runtime's services as the classes JS gets, each held
    /// (a GC root keeping the process alive) like a service started from JS.
    fn wrap(env: &Env, built: Built) -> Result<Self> {
        let Built {
            runtime,
            callers,
            log_scope,
            js,
        } = built;
        let span = log_scope.span().clone();
        let _in_scope = span.enter();
        let direct = match runtime.direct() {
            Direct::Caller(_) => DirectPath::Js(
                callers
                    .transport
                    .clone()
                    .ok_or_else(|| Error::from_reason("no caller transport"))?,
            ),
            Direct::Native(source) => DirectPath::Native(source.clone()),
        };
        let poller = PollerPart::service(env, runtime.poller().clone(), direct);
        poller.hold(env)?;
        let heartbeat = runtime.heartbeat().map(|h| Service::new(h.clone()));
        let key_rotation = runtime.key_rotation().map(|k| Service::new(k.clone()));
        for service in heartbeat.iter() {
            service.hold(env)?;
        }
        for service in key_rotation.iter() {
            service.hold(env)?;
        }
        let sse = match (runtime.stream(), &callers.streams) {
            (Some(client), _) => {
                let service = SseConnection::new(
                    SseSource::Native {
                        client: client.clone(),
                    },
                    SseTarget::Handler(Mutex::new(None)),
                    "sse".into(),
                );
                service.mark_running(env)?;
                Some(service)
            }
            (None, Some(streams)) => streams.take_made(),
            (None, None) => None,
        };
        let own =
            match runtime.take_own_transport() {
                None => None,
                Some(OwnTransport::Http(slot)) => Some(Either3::A(HttpTransport::from_slot(
                    slot,
                    runtime.credentials().clone(),
                ))),
                // Their subscribers are called through the runtime's queue.
                Some(OwnTransport::Sse { stream, rest }) => Some(Either3::B(
                    SseTransport::from_parts(js.clone(), stream, rest),
                )),
                Some(OwnTransport::Local(slot)) => {
                    Some(Either3::C(LocalTransport::from_slot(js.clone(), slot)))
                }
            };
        let live = Arc::<Liveness>::default();
        Ok(Self {
            runtime: Arc::new(runtime),
            log_scope,
            poller,
            heartbeat,
            key_rotation,
            sse,
            js_transport: callers.transport,
            own_transport: Mutex::new(own),
            live,
            handed: Mutex::new(Handed::default()),
            stopped: Mutex::new(false),
        })
    }

    /// `class` as a JS object, the first time `flag` is asked for; `root` keeps it alive
    /// while its service runs.
    fn hand_out<'env, C: JavaScriptClassExt + 'static>(
        &self,
        env: &'env Env,
        flag: fn(&mut Handed) -> &mut bool,
        class: Option<C>,
        root: impl FnOnce(&Object<'env>) -> Result<()>,
    ) -> Result<Option<Object<'env>>> {
        if std::mem::replace(flag(&mut lock(&self.handed)), true) {
            return Ok(None);
        }
        let Some(class) = class else {
            return Ok(None);
        };
        let object = class.into_instance(env)?.as_object(env);
        root(&object)?;
        Ok(Some(object))
    }

    /// Roots the runtime's JS object and holds the process from now until `stop()`; if the
    /// environment goes away first, the core runtime stops (without calling into JS: what the
    /// caller's transport handled is offered again, at-least-once).
    fn hold(&self, env: &Env, wrapper: &Object<'_>) -> Result<()> {
        let (runtime, live) = (Arc::downgrade(&self.runtime), Arc::downgrade(&self.live));
        self.live.hold(env, Some(wrapper), move || {
            if let Some(runtime) = runtime.upgrade() {
                runtime_context(|| drop(runtime.stop(None)));
            }
            if let Some(live) = live.upgrade() {
                live.abandon();
            }
        })
    }
}

/// Roots a handed-out wrapper of `service` while it runs.
fn root<T: Lifecycle>(service: &Option<Arc<Service<T>>>, wrapper: &Object<'_>) -> Result<()> {
    match service {
        Some(service) => service.root(wrapper),
        None => Ok(()),
    }
}

/// Validates, then resolves to a started [`NativeRuntime`]. Called by `createRuntime`.
#[napi(ts_return_type = "Promise<NativeRuntime>")]
pub fn start_runtime<'env>(
    env: &'env Env,
    registry: Unknown<'env>,
    config: Option<Unknown<'env>>,
) -> Result<PromiseRaw<'env, Object<'env>>> {
    let registry = match super::js::as_object(env, registry)? {
        Some(registry) => registry,
        None => {
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
    let js = JsThread::new(env);
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
    let mut settings = Settings {
        agent_id: fields.agent_id("agentId", false)?,
        poll_interval: fields.positive_ms("pollIntervalMs")?,
        group_conversation_ids: fields
            .string_array("groupConversationIds")?
            .unwrap_or_default(),
        group_poll_limit: fields.positive_count("groupPollLimit", 1000)?,
        heartbeat_interval: fields.non_negative_ms("heartbeatIntervalMs")?,
        max_key_age,
        sse_endpoint: fields.url("sseEndpoint", false)?,
        caller_transport: transport.is_some(),
        caller_stream: false,
        journal: fields.journal("journal")?,
    };
    let create_sse_transport = match fields.function("createSseTransport")? {
        Some(f) => Some(Arc::new(JsStreamFactory::new(
            Arc::new(JsFn::new(
                env,
                f,
                "createRuntime: config.createSseTransport",
            )?),
            js.clone(),
        ))),
        None => None,
    };
    settings.caller_stream = create_sse_transport.is_some();
    let registry = Arc::new(JsRegistry::new(&registry, js.clone())?);
    // The pending registry and connect calls must not let the process exit under us.
    let keep_alive = KeepAlive::new(env)?;
    env.spawn_future_with_callback(
        async move {
            let _keep_alive = keep_alive;
            let callers = Callers {
                registry,
                transport,
                streams: create_sse_transport,
            };
            build(settings, callers, js, log_scope).await
        }
        .instrument(span.clone()),
        // On the JS thread, as the runtime becomes a JS object: from here until `stop()` the
        // object is a GC root, so a caller that keeps no reference still has a running daemon.
        |env, built: Built| {
            let instance = NativeRuntime::wrap(env, built)?.into_instance(env)?;
            let object = instance.as_object(env);
            instance.hold(env, &object)?;
            Ok(object)
        },
    )
}

async fn build(
    settings: Settings,
    callers: Callers,
    js: JsThread,
    log_scope: LogScope,
) -> Result<Built> {
    let started = async {
        let credential =
            Credential::fetch(callers.registry.as_ref(), settings.agent_id.as_deref()).await?;
        let plan = Plan::resolve(&credential, &settings, present_local_db())?;
        log_scope.bind(plan.credentials());
        tracing::debug!(transport = ?plan.transport, "resolved the transport");
        let deps = Deps {
            registry: callers.registry.clone(),
            transport: callers.transport.clone().map(|t| t as _),
            stream_factory: callers.streams.clone().map(|f| f as _),
        };
        Runtime::start(plan, deps).await
    };
    match started.await {
        Ok(runtime) => Ok(Built {
            runtime,
            callers,
            log_scope,
            js,
        }),
        Err(StartError::Failed(why)) => Err(Error::new(Status::GenericFailure, why)),
        // A TypeError, as a config error is elsewhere: made on the JS thread, so the
        // rejection is that very object.
        Err(StartError::Invalid(why)) => Err(js
            .run(move |env| Ok(super::js::type_error_object(env, why)))
            .await
            .unwrap_or_else(|e| Error::new(Status::InvalidArg, e.to_string()))),
    }
}

use super::runtime_context;
