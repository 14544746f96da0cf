//! The realtime path to JavaScript: the native `SseTransport` class and
//! `SseConnectionService` (over a JS transport with `subscribe`, or the native stream).
//!
//! The native transport's stream feeds a bounded buffer that `poll()` drains together with a
//! peek (the server pushes only to a stream it knows: what it queued before is found only by
//! a peek), or, once someone subscribes, the subscribers on the JS thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::UnknownReturnValue;
use napi_derive::napi;
use serde_json::json;
use tokio::sync::Notify;

use super::adapters::{HandlerRef, JsMessage, JsTransport};
use super::config::Fields;
use super::js::{JsThread, Lenient, Pending, describe, type_error};
use super::lifetime::Liveness;
use super::runtime_context;
use super::transports::{PollOptions, PushOptions, PushResult};
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::message::{self, ConduitMessage};
use crate::core::signaldock::SignalDock;
use crate::core::sse::{SseClient, SseConfig, SseSink, SseState};
use crate::core::sync::lock;
use crate::core::transport::Page;

/// Stream messages held for `poll()` while nobody subscribes; past it the stream waits.
const BUFFER_LIMIT: usize = 10_000;
/// How long `connect()` waits for the stream before resolving anyway (polling covers).
const CONNECT_WAIT: Duration = Duration::from_secs(3);

#[napi(object, js_name = "SseTransportStatus")]
pub struct JsSseStatus {
    /// `connecting`, `connected`, `reconnecting` or `closed`.
    #[napi(ts_type = "'connecting' | 'connected' | 'reconnecting' | 'closed'")]
    pub state: String,
    pub reconnects: f64,
    pub last_event_at: Option<String>,
    pub delivered: f64,
    pub malformed: f64,
    pub last_error: Option<String>,
    pub buffered: u32,
}

/// Where a native stream's messages go: buffered for `poll()`, or to JS subscribers.
struct StreamInbox {
    buffer: Mutex<VecDeque<ConduitMessage>>,
    drained: Notify,
    subscribers: Mutex<Vec<(u64, HandlerRef)>>,
    next_id: Mutex<u64>,
    js: JsThread,
}

impl StreamInbox {
    fn subscribers(&self) -> Vec<HandlerRef> {
        lock(&self.subscribers)
            .iter()
            .map(|(_, f)| f.clone())
            .collect()
    }
}

impl SseSink for StreamInbox {
    fn deliver(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let subscribers = self.subscribers();
            if subscribers.is_empty() {
                loop {
                    let room = self.drained.notified();
                    {
                        let mut buffer = lock(&self.buffer);
                        if buffer.len() < BUFFER_LIMIT {
                            buffer.push_back(message);
                            return;
                        }
                    }
                    room.await;
                }
            }
            let _ = self
                .js
                .run(move |env| {
                    for subscriber in &subscribers {
                        call_subscriber(env, subscriber, message.clone());
                    }
                    Ok(())
                })
                .await;
        })
    }
}

/// On the JS thread: one subscriber call. What it throws or rejects with is logged, never
/// rethrown (see `js::call`), so one subscriber cannot cost another its message.
fn call_subscriber(env: &Env, subscriber: &HandlerRef, message: ConduitMessage) {
    let result = subscriber.borrow_back(env).and_then(|f| {
        let f = unsafe { Unknown::from_raw_unchecked(env.raw(), f.raw()) };
        super::js::call(env, f, JsMessage::from(message))
    });
    match result {
        Ok(returned) if returned.is_promise().unwrap_or(false) => {
            match Pending::<UnknownReturnValue>::observe(env, returned) {
                Ok(promise) => {
                    runtime_context(|| {
                        tokio::spawn(tracing::Instrument::in_current_span(async move {
                            if let Err(why) = promise.await {
                                tracing::warn!(error = %why, "SSE subscriber rejected");
                            }
                        }))
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "SSE subscriber's promise cannot be observed")
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %describe(&e), "SSE subscriber threw"),
    }
}

/// Handler calls of an `SseConnectionService` with its own handler: settled, and failed
/// (threw or rejected).
#[derive(Default)]
pub struct HandlerStats {
    delivered: AtomicU64,
    failed: AtomicU64,
}

struct Connected {
    client: Arc<SseClient>,
    rest: Arc<SignalDock>,
    inbox: Arc<StreamInbox>,
}

/// SignalDock's realtime path as a Transport: the stream (headers for auth, reconnect for
/// ever) plus REST for push, peek and ack.
#[napi(js_name = "SseTransport")]
pub struct SseTransport {
    connected: Arc<Mutex<Option<Connected>>>,
    shared_credentials: Option<Arc<Credentials>>,
    js: JsThread,
    /// Held while connected: the open stream is a GC root and keeps the process alive.
    live: Arc<Liveness>,
}

impl SseTransport {
    fn connected(&self) -> Result<(Arc<SseClient>, Arc<SignalDock>, Arc<StreamInbox>)> {
        lock(&self.connected)
            .as_ref()
            .map(|c| (c.client.clone(), c.rest.clone(), c.inbox.clone()))
            .ok_or_else(|| {
                Error::new(
                    Status::GenericFailure,
                    "SseTransport is not connected: call connect() first".to_owned(),
                )
            })
    }
}

impl SseTransport {
    /// The runtime's transport: REST plus the runtime's own stream (whose messages go to
    /// the poller, so this object's buffer stays empty and `poll()` is a peek).
    pub fn from_parts(env: &Env, client: Arc<SseClient>, rest: Arc<SignalDock>) -> Result<Self> {
        let js = JsThread::new(env)?;
        let inbox = Arc::new(StreamInbox {
            buffer: Mutex::default(),
            drained: Notify::new(),
            subscribers: Mutex::default(),
            next_id: Mutex::new(0),
            js: js.clone(),
        });
        Ok(Self {
            connected: Arc::new(Mutex::new(Some(Connected {
                client,
                rest,
                inbox,
            }))),
            shared_credentials: None,
            js,
            live: Arc::default(),
        })
    }
}

#[napi]
impl SseTransport {
    #[napi(constructor)]
    pub fn new(env: Env) -> Result<Self> {
        Ok(Self {
            connected: Arc::default(),
            shared_credentials: None,
            js: JsThread::new(&env)?,
            live: Arc::default(),
        })
    }

    #[napi(getter, ts_return_type = "'sse'")]
    pub fn name(&self) -> &'static str {
        "sse"
    }

    /// Opens the stream (`sseEndpoint`, default `{apiBaseUrl}/messages/stream`); resolves once
    /// it is connected, or after 3 s while it keeps trying in the background.
    #[napi(
        ts_args_type = "config: TransportConnectConfig",
        ts_return_type = "Promise<void>"
    )]
    pub fn connect<'env>(
        &self,
        env: &'env Env,
        config: Unknown<'env>,
        this: This<'env>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let config =
            match super::transports::read_connect_config(env, "SseTransport.connect", config, true)
            {
                Ok(config) => config,
                Err(e) => return super::js::rejected(env, e),
            };
        let credentials = match &self.shared_credentials {
            Some(shared) => shared.clone(),
            None => Credentials::new(&config.agent_id, ApiKey::new(config.api_key.as_str())),
        };
        let to_js = |e: crate::core::error::Error| Error::new(Status::InvalidArg, e.to_string());
        let url = SseConfig::endpoint_url(config.sse_endpoint.as_deref(), &config.api_base_url)
            .map_err(to_js)?;
        let rest = Arc::new(
            SignalDock::new(
                credentials.clone(),
                &config.api_base_url,
                config.api_base_url_fallback.as_deref(),
            )
            .map_err(to_js)?,
        );
        let client = Arc::new(SseClient::new(credentials, SseConfig::new(url)));
        let inbox = Arc::new(StreamInbox {
            buffer: Mutex::default(),
            drained: Notify::new(),
            subscribers: Mutex::default(),
            next_id: Mutex::new(0),
            js: self.js.clone(),
        });
        if let Some(old) = lock(&self.connected).replace(Connected {
            client: client.clone(),
            rest,
            inbox: inbox.clone(),
        }) {
            old.client.stop();
        }
        runtime_context(|| client.start(inbox));
        let (connected, live) = (Arc::downgrade(&self.connected), Arc::downgrade(&self.live));
        self.live.hold(env, Some(&this), move || {
            if let Some(connected) = connected.upgrade()
                && let Some(old) = lock(&connected).take()
            {
                old.client.stop();
            }
            if let Some(live) = live.upgrade() {
                live.abandon();
            }
        })?;
        let mut states = client.states();
        env.spawn_future(async move {
            let _ =
                tokio::time::timeout(CONNECT_WAIT, states.wait_for(|s| *s == SseState::Connected))
                    .await;
            Ok(())
        })
    }

    #[napi]
    pub fn disconnect<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        if let Some(old) = lock(&self.connected).take() {
            old.client.stop();
        }
        self.live.release(env);
        env.spawn_future(async { Ok(()) })
    }

    #[napi]
    pub async fn push(
        &self,
        to: String,
        content: String,
        options: Option<PushOptions>,
    ) -> Result<PushResult> {
        let (_, rest, _) = self.connected()?;
        super::transports::rest_push(&rest, &to, &content, options).await
    }

    /// What the stream delivered (not yet taken by a subscriber) plus what the server queued.
    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let (_, rest, inbox) = self.connected()?;
        let options = options.unwrap_or(PollOptions {
            limit: None,
            since: None,
        });
        let limit = options.limit.unwrap_or(50).clamp(1, 1000) as usize;
        let mut out: Vec<ConduitMessage> = {
            let mut buffer = lock(&inbox.buffer);
            let take = buffer.len().min(limit);
            buffer.drain(..take).collect()
        };
        inbox.drained.notify_waiters();
        // At most `limit` in all: the peek fills what the buffer left (what it cannot take
        // stays queued on the server for the next poll).
        let room = limit - out.len();
        if room > 0 {
            match rest.peek(room as u32, options.since.as_deref()).await {
                Ok(rows) => {
                    let page = Page::from_rows(rows, |row| message::from_rest_row(row, None));
                    for m in page.messages {
                        if !out.iter().any(|o| o.id == m.id) {
                            out.push(m);
                        }
                    }
                }
                // The buffered messages are out of the buffer already: failing now would
                // lose them (the server marked them delivered when it pushed them).
                Err(e) if !out.is_empty() => {
                    tracing::debug!(error = %e, "peek failed; returning the stream's messages only");
                }
                Err(e) => {
                    return Err(Error::new(
                        Status::GenericFailure,
                        format!("poll failed: {e}"),
                    ));
                }
            }
        }
        Ok(out.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        let (_, rest, _) = self.connected()?;
        super::transports::rest_ack(&rest, &message_ids).await
    }

    /// Calls `handler` for each message the stream delivers from now on (and for what was
    /// buffered); returns the function that unsubscribes.
    #[napi(
        ts_args_type = "handler: (message: ConduitMessage) => void",
        ts_return_type = "() => void"
    )]
    pub fn subscribe<'env>(
        &self,
        env: &'env Env,
        handler: Unknown<'env>,
    ) -> Result<Function<'env, (), ()>> {
        if handler.get_type()? != ValueType::Function {
            return Err(type_error(
                env,
                "SseTransport.subscribe: handler must be a function",
            ));
        }
        let (_, _, inbox) = self.connected()?;
        let function: Function<JsMessage, Unknown<'static>> =
            unsafe { Function::from_napi_value(env.raw(), handler.raw())? };
        let reference: HandlerRef = Arc::new(function.create_ref()?);
        let id = {
            let mut next = lock(&inbox.next_id);
            *next += 1;
            *next
        };
        lock(&inbox.subscribers).push((id, reference.clone()));
        // What arrived before anyone subscribed goes to the first subscriber now.
        let backlog: Vec<ConduitMessage> = lock(&inbox.buffer).drain(..).collect();
        inbox.drained.notify_waiters();
        for m in backlog {
            call_subscriber(env, &reference, m);
        }
        let weak = Arc::downgrade(&inbox);
        env.create_function_from_closure("unsubscribe", move |_ctx| {
            if let Some(inbox) = weak.upgrade() {
                lock(&inbox.subscribers).retain(|(sid, _)| *sid != id);
            }
            Ok(())
        })
    }

    #[napi]
    pub fn status(&self) -> JsSseStatus {
        match lock(&self.connected).as_ref() {
            Some(c) => sse_status(&c.client, lock(&c.inbox.buffer).len()),
            None => JsSseStatus {
                state: SseState::Closed.as_str().to_owned(),
                reconnects: 0.0,
                last_event_at: None,
                delivered: 0.0,
                malformed: 0.0,
                last_error: None,
                buffered: 0,
            },
        }
    }
}

fn sse_status(client: &SseClient, buffered: usize) -> JsSseStatus {
    let s = client.status();
    JsSseStatus {
        state: s.state.as_str().to_owned(),
        reconnects: s.reconnects as f64,
        last_event_at: s.last_event_at,
        delivered: s.delivered as f64,
        malformed: s.malformed as f64,
        last_error: s.last_error,
        buffered: buffered as u32,
    }
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
        unsubscribe: Mutex<Option<Arc<FunctionRef<(), Unknown<'static>>>>>,
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

pub struct SseConnectionCore {
    source: SseSource,
    target: Arc<SseTarget>,
    running: Mutex<bool>,
    transport_name: String,
    live: Liveness,
    stats: Arc<HandlerStats>,
}

impl SseConnectionCore {
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
                let read = unsafe { Lenient::from_napi_value(ctx.env.raw(), value.raw()) }
                    .map_err(|e| super::js::take_exception(ctx.env).unwrap_or_else(|| describe(&e)))
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
        if returned.get_type()? == ValueType::Function {
            let function: Function<(), Unknown<'static>> =
                unsafe { Function::from_napi_value(env.raw(), returned.raw())? };
            *lock(unsubscribe) = Some(Arc::new(function.create_ref()?));
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
                if let Some(unsubscribe) = lock(unsubscribe).take() {
                    let f = unsubscribe.borrow_back(env)?;
                    let f = unsafe { Unknown::from_raw_unchecked(env.raw(), f.raw()) };
                    if let Err(e) = super::js::call(env, f, ()) {
                        tracing::warn!(error = %describe(&e), "SSE unsubscribe threw");
                    }
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
            let result = handler.borrow_back(env).and_then(|h| {
                let h = unsafe { Unknown::from_raw_unchecked(env.raw(), h.raw()) };
                super::js::call(env, h, JsMessage::from(message))
            });
            let observed = match result {
                Ok(returned) if returned.is_promise().unwrap_or(false) => {
                    Pending::<UnknownReturnValue>::observe(env, returned).map(Some)
                }
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match observed {
                Ok(Some(promise)) => {
                    let stats = stats.clone();
                    runtime_context(|| {
                        tokio::spawn(tracing::Instrument::in_current_span(async move {
                            match promise.await {
                                Ok(_) => stats.delivered.fetch_add(1, Ordering::Relaxed),
                                Err(why) => {
                                    tracing::warn!(error = %why, "SSE message handler rejected");
                                    stats.failed.fetch_add(1, Ordering::Relaxed)
                                }
                            };
                        }))
                    });
                }
                Ok(None) => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "SSE message handler threw");
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Keeps a transport's realtime subscription and forwards its messages to the handler.
#[napi(js_name = "SseConnectionService")]
pub struct SseConnectionService {
    pub(crate) inner: Arc<SseConnectionCore>,
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
        let transport = Arc::new(JsTransport::new(&transport, JsThread::new(&env)?)?);
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
            inner: SseConnectionCore::new(source, SseTarget::Handler(Mutex::new(None)), name),
        })
    }

    /// Sets the handler; takes effect at once, also after `start()`.
    #[napi(ts_args_type = "handler: (message: ConduitMessage) => void")]
    pub fn on_message(&self, env: Env, handler: Unknown) -> Result<()> {
        if handler.get_type()? != ValueType::Function {
            return Err(type_error(
                &env,
                "SseConnectionService.onMessage: handler must be a function",
            ));
        }
        let function: Function<JsMessage, Unknown<'static>> =
            unsafe { Function::from_napi_value(env.raw(), handler.raw())? };
        self.inner.set_handler(Arc::new(function.create_ref()?));
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
