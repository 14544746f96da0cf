//! `SseConnectionService`: keeps a transport's realtime subscription and forwards its
//! messages — over a JS transport with `subscribe`, or the runtime's native stream (already
//! wired to the poller, so the service only reports on it and stops it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::json;

use super::adapters::{HandlerRef, JsMessage, JsTransport};
use super::config::Fields;
use super::js::{Ended, JsFn, JsThread, Lenient, describe, type_error};
use super::lifetime::Liveness;
use crate::core::message::{self, ConduitMessage};
use crate::core::sse::SseClient;
use crate::core::sync::lock;

/// Handler calls of an `SseConnectionService` with its own handler: settled, and failed
/// (threw or rejected).
#[derive(Default)]
pub struct HandlerStats {
    delivered: AtomicU64,
    failed: AtomicU64,
}

#[napi(object, js_name = "SseConnectionStatus")]
pub struct JsSseConnectionStatus {
    pub running: bool,
    pub transport_name: String,
    /// The native stream's state, when the runtime's own SSE transport is in use.
    #[napi(ts_type = "'connecting' | 'connected' | 'reconnecting' | 'closed'")]
    pub state: Option<String>,
    pub reconnects: Option<f64>,
    pub last_event_at: Option<String>,
    /// Handler calls that settled, when the service has its own handler (`onMessage`).
    pub delivered: Option<f64>,
    /// Handler calls that threw or rejected, when the service has its own handler.
    pub failed: Option<f64>,
}

/// Where an `SseConnectionService` gets its messages.
pub enum SseSource {
    /// A JS transport (with `subscribe`), connected and subscribed by `start()`.
    Js {
        transport: Arc<JsTransport>,
        connect_config: serde_json::Value,
        unsubscribe: Mutex<Option<JsFn>>,
    },
    /// The runtime's native stream, already wired to the poller.
    Native { client: Arc<SseClient> },
}

/// Where an `SseConnectionService` sends messages that arrive from a JS transport.
pub enum SseTarget {
    /// The handler set with `onMessage`.
    Handler(Mutex<Option<HandlerRef>>),
    /// The runtime's poller (dedup against polling, one handler).
    Poller(crate::core::runtime::StreamInbox),
}

pub struct SseConnection {
    source: SseSource,
    target: Arc<SseTarget>,
    running: Mutex<bool>,
    transport_name: String,
    live: Liveness,
    stats: Arc<HandlerStats>,
}

impl SseConnection {
    pub fn new(source: SseSource, target: SseTarget, transport_name: String) -> Arc<Self> {
        Arc::new(Self {
            source,
            target: Arc::new(target),
            running: Mutex::new(false),
            transport_name,
            live: Liveness::default(),
            stats: Arc::default(),
        })
    }

    /// Connects and subscribes (JS transport). The returned future does the waiting. While
    /// running, the service (and `wrapper`) is a GC root and keeps the process alive.
    pub fn start(
        self: &Arc<Self>,
        env: &Env,
        wrapper: Option<&Object<'_>>,
    ) -> Result<BoxFuture<'static, Result<()>>> {
        if std::mem::replace(&mut *lock(&self.running), true) {
            if let Some(wrapper) = wrapper {
                self.live.root(wrapper)?;
            }
            return Ok(Box::pin(async { Ok(()) }));
        }
        self.live.hold(env, wrapper, self.teardown())?;
        let this = self.clone();
        Ok(Box::pin(async move {
            let SseSource::Js {
                transport,
                connect_config,
                ..
            } = &this.source
            else {
                return Ok(());
            };
            transport
                .connect(connect_config.clone())
                .await
                .map_err(|e| {
                    Error::new(
                        Status::GenericFailure,
                        format!("SSE transport connect() failed: {e}"),
                    )
                })?;
            let subscriber = this.clone();
            transport
                .js()
                .run(move |env| subscriber.subscribe(env))
                .await
                .map_err(|e| Error::new(Status::GenericFailure, e.to_string()))
        }))
    }

    fn subscribe(self: &Arc<Self>, env: &Env) -> Result<()> {
        let SseSource::Js {
            transport,
            unsubscribe,
            ..
        } = &self.source
        else {
            return Ok(());
        };
        if !*lock(&self.running) {
            return Ok(());
        }
        let object = transport.object().get(env)?;
        let subscribe: Unknown = object.get_named_property("subscribe")?;
        if subscribe.get_type()? != ValueType::Function {
            return Ok(());
        }
        let target = self.target.clone();
        let stats = self.stats.clone();
        let forward =
            env.create_function_from_closure::<Unknown, (), _>("onSseMessage", move |ctx| {
                let value: Unknown = ctx.get(0)?;
                // A value that cannot even be read (a Proxy whose traps throw) is malformed
                // too: reported here, never thrown back at the transport that emitted it.
                let read = super::js::read::<Lenient>(ctx.env, value)
                    .map_err(|e| describe(&e))
                    .and_then(|lenient| {
                        message::from_transport_object(&lenient.0).map_err(|why| why.to_string())
                    });
                match read {
                    Ok(m) => forward_message(ctx.env, &target, &stats, m),
                    Err(why) => tracing::warn!(error = %why, "skipping a malformed SSE message"),
                }
                Ok(())
            })?;
        let returned = super::js::apply(env, &object, subscribe, forward)?;
        if let Some(function) = JsFn::if_function(env, returned)? {
            *lock(unsubscribe) = Some(function);
        }
        Ok(())
    }

    /// Unsubscribes and disconnects (JS transport), or stops the native stream. The calls
    /// happen now; the returned future waits for `disconnect()` to settle.
    pub fn stop(&self, env: &Env) -> Result<BoxFuture<'static, Result<()>>> {
        *lock(&self.running) = false;
        self.live.release(env);
        match &self.source {
            SseSource::Native { client } => {
                client.stop();
                Ok(Box::pin(async { Ok(()) }))
            }
            SseSource::Js {
                transport,
                unsubscribe,
                ..
            } => {
                let unsubscribe = lock(unsubscribe).take();
                if let Some(unsubscribe) = unsubscribe
                    && let Err(e) = unsubscribe.call(env, ())
                {
                    tracing::warn!(error = %describe(&e), "SSE unsubscribe threw");
                }
                let settle =
                    transport
                        .object()
                        .call_method::<(), Lenient>(env, "disconnect", ())?;
                Ok(Box::pin(async move {
                    settle.resolve().await.map(drop).map_err(|e| {
                        Error::new(Status::GenericFailure, format!("disconnect() failed: {e}"))
                    })
                }))
            }
        }
    }

    /// For the runtime's native stream, already started: running, and keeping Node alive.
    pub fn mark_running(self: &Arc<Self>, env: &Env) -> Result<()> {
        *lock(&self.running) = true;
        self.live.hold(env, None, self.teardown())?;
        Ok(())
    }

    /// Roots a wrapper handed out for this service while it runs.
    pub fn root(&self, wrapper: &Object<'_>) -> Result<()> {
        self.live.root(wrapper)
    }

    /// What the end of the environment does: the native stream closes; a JS transport
    /// cannot be called any more, so it is only forgotten (it dies with its environment).
    fn teardown(self: &Arc<Self>) -> impl FnOnce() + Send + 'static {
        let weak = Arc::downgrade(self);
        move || {
            if let Some(service) = weak.upgrade() {
                *lock(&service.running) = false;
                if let SseSource::Native { client } = &service.source {
                    client.stop();
                }
                service.live.abandon();
            }
        }
    }

    pub fn set_handler(&self, handler: HandlerRef) {
        if let SseTarget::Handler(slot) = &*self.target {
            *lock(slot) = Some(handler);
        }
    }

    pub fn status(&self) -> JsSseConnectionStatus {
        let native = match &self.source {
            SseSource::Native { client } => Some(client.status()),
            SseSource::Js { .. } => None,
        };
        // Only a JS transport's messages go to this service's own handler.
        let own_handler = matches!(
            (&self.source, &*self.target),
            (SseSource::Js { .. }, SseTarget::Handler(_))
        );
        JsSseConnectionStatus {
            running: *lock(&self.running),
            transport_name: self.transport_name.clone(),
            state: native.as_ref().map(|s| s.state.as_str().to_owned()),
            reconnects: native.as_ref().map(|s| s.reconnects as f64),
            last_event_at: native.and_then(|s| s.last_event_at),
            delivered: own_handler.then(|| self.stats.delivered.load(Ordering::Relaxed) as f64),
            failed: own_handler.then(|| self.stats.failed.load(Ordering::Relaxed) as f64),
        }
    }
}

/// On the JS thread: a message from a JS transport's subscription.
fn forward_message(
    env: &Env,
    target: &SseTarget,
    stats: &Arc<HandlerStats>,
    message: ConduitMessage,
) {
    match target {
        SseTarget::Poller(inbox) => {
            inbox.offer(message);
        }
        SseTarget::Handler(slot) => {
            let Some(handler) = lock(slot).clone() else {
                tracing::debug!(
                    "SSE message before any handler: dropped by the service (the poller still delivers it)"
                );
                return;
            };
            let stats = stats.clone();
            handler.call_observed(env, JsMessage::from(message), move |ended| {
                let counter = match ended {
                    Ended::Returned => &stats.delivered,
                    Ended::Threw(why) => {
                        tracing::warn!(error = %why, "SSE message handler threw");
                        &stats.failed
                    }
                    Ended::Rejected(why) => {
                        tracing::warn!(error = %why, "SSE message handler rejected");
                        &stats.failed
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
}

/// Keeps a transport's realtime subscription and forwards its messages to the handler.
#[napi(js_name = "SseConnectionService")]
pub struct SseConnectionService {
    pub(crate) inner: Arc<SseConnection>,
}

#[napi]
impl SseConnectionService {
    #[napi(constructor)]
    pub fn new(env: Env, config: Unknown) -> Result<Self> {
        let fields = Fields::new(&env, "SseConnectionService", Some(config), false)?;
        let agent_id = fields.required_agent_id("agentId")?;
        let api_key = fields.required_string("apiKey")?;
        let api_base_url = fields.required_string("apiBaseUrl")?;
        let sse_endpoint = fields.url("sseEndpoint", false)?;
        let transport = fields
            .object_with("transport", &["connect", "disconnect"])?
            .ok_or_else(|| type_error(&env, "SseConnectionService: config.transport must be an object with connect(), disconnect()"))?;
        let transport = Arc::new(JsTransport::new(&transport, JsThread::new(&env))?);
        let mut connect_config =
            json!({ "agentId": agent_id, "apiKey": api_key, "apiBaseUrl": api_base_url });
        if let Some(endpoint) = sse_endpoint {
            connect_config["sseEndpoint"] = json!(endpoint);
        }
        let name = transport.transport_name().to_owned();
        let source = SseSource::Js {
            transport,
            connect_config,
            unsubscribe: Mutex::new(None),
        };
        Ok(Self {
            inner: SseConnection::new(source, SseTarget::Handler(Mutex::new(None)), name),
        })
    }

    /// Sets the handler; takes effect at once, also after `start()`.
    #[napi(ts_args_type = "handler: (message: ConduitMessage) => void")]
    pub fn on_message(&self, env: Env, handler: Unknown) -> Result<()> {
        let handler = JsFn::new(&env, handler, "SseConnectionService.onMessage: handler")?;
        self.inner.set_handler(Arc::new(handler));
        Ok(())
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn start<'env>(&self, env: &'env Env, this: This<'env>) -> Result<PromiseRaw<'env, ()>> {
        let started = self.inner.start(env, Some(&this))?;
        env.spawn_future(started)
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn stop<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let stopped = self.inner.stop(env)?;
        env.spawn_future(stopped)
    }

    #[napi]
    pub fn status(&self) -> JsSseConnectionStatus {
        self.inner.status()
    }
}
