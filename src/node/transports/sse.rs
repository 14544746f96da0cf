//! `SseTransport`: SignalDock's realtime path as a Transport — the native stream (headers for
//! auth, reconnects for ever) plus REST for push, peek and ack.
//!
//! The stream feeds the core's [`Inbox`]: a bounded buffer that `poll()` drains together with
//! a peek, or, once someone subscribes, the subscribers on the JS thread. Inside a runtime
//! the transport keeps the runtime's credential store, so a rotated key reaches its REST
//! calls and its stream, also after the caller connected it again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::{PollOptions, PushOptions, PushResult, read_connect_config, rest};
use crate::core::credentials::Credentials;
use crate::core::message::ConduitMessage;
use crate::core::signaldock::SignalDock;
use crate::core::sse::inbox::{self, Inbox, Subscribers};
use crate::core::sse::{SseClient, SseConfig, SseState};
use crate::core::sync::lock;
use crate::core::transport::PeekSource;
use crate::node::adapters::{HandlerRef, JsMessage};
use crate::node::js::{Ended, JsFn, JsThread, Subscriptions};
use crate::node::lifetime::Liveness;

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

/// The functions given to `subscribe`, as the inbox's [`Subscribers`].
struct JsSubscribers {
    list: Arc<Subscriptions<HandlerRef>>,
    js: JsThread,
}

impl Subscribers for JsSubscribers {
    fn any(&self) -> bool {
        !self.list.is_empty()
    }

    fn fan_out(&self, message: ConduitMessage) -> BoxFuture<'_, ()> {
        let subscribers = self.list.snapshot();
        Box::pin(async move {
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
/// rethrown, so one subscriber cannot cost another its message.
fn call_subscriber(env: &Env, subscriber: &JsFn, message: ConduitMessage) {
    subscriber.call_observed(env, JsMessage::from(message), |ended| match ended {
        Ended::Returned => {}
        Ended::Threw(why) => tracing::warn!(error = %why, "SSE subscriber threw"),
        Ended::Rejected(why) => tracing::warn!(error = %why, "SSE subscriber rejected"),
    });
}

struct Connected {
    client: Arc<SseClient>,
    rest: Arc<SignalDock>,
    inbox: Arc<Inbox>,
    subscribers: Arc<Subscriptions<HandlerRef>>,
}

impl Connected {
    fn new(client: Arc<SseClient>, rest: Arc<SignalDock>, js: &JsThread) -> Self {
        let subscribers: Arc<Subscriptions<HandlerRef>> = Arc::default();
        let fan_out = JsSubscribers {
            list: subscribers.clone(),
            js: js.clone(),
        };
        Self {
            client,
            rest,
            inbox: Arc::new(Inbox::new(Arc::new(fan_out), inbox::DEFAULT_CAPACITY)),
            subscribers,
        }
    }
}

/// SignalDock's realtime path as a Transport: the stream (headers for auth, reconnect for
/// ever) plus REST for push, peek and ack.
#[napi(js_name = "SseTransport")]
pub struct SseTransport {
    connected: Arc<Mutex<Option<Connected>>>,
    /// Set when a runtime owns this transport: `connect()` then keeps its credentials.
    shared_credentials: Option<Arc<Credentials>>,
    js: JsThread,
    /// Held while connected: the open stream is a GC root and keeps the process alive.
    live: Arc<Liveness>,
}

impl SseTransport {
    /// The runtime's transport: REST over the runtime's client, plus the runtime's own
    /// stream (whose messages go to the poller, so this object's buffer stays empty and
    /// `poll()` is a peek).
    /// Its subscribers are called through the runtime's queue (`js`).
    pub fn from_parts(js: JsThread, client: Arc<SseClient>, rest: Arc<SignalDock>) -> Self {
        let shared_credentials = Some(rest.credentials().clone());
        Self {
            connected: Arc::new(Mutex::new(Some(Connected::new(client, rest, &js)))),
            shared_credentials,
            js,
            live: Arc::default(),
        }
    }

    fn with_connected<T>(&self, pick: impl FnOnce(&Connected) -> T) -> Result<T> {
        lock(&self.connected).as_ref().map(pick).ok_or_else(|| {
            Error::new(
                Status::GenericFailure,
                "SseTransport is not connected: call connect() first".to_owned(),
            )
        })
    }

    fn rest(&self) -> Result<Arc<SignalDock>> {
        self.with_connected(|c| c.rest.clone())
    }
}

#[napi]
impl SseTransport {
    #[napi(constructor)]
    pub fn new(env: Env) -> Self {
        Self {
            connected: Arc::default(),
            shared_credentials: None,
            js: JsThread::new(&env),
            live: Arc::default(),
        }
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
        let config = match read_connect_config(env, "SseTransport.connect", config, true) {
            Ok(config) => config,
            Err(e) => return crate::node::js::rejected(env, e),
        };
        let url = SseConfig::endpoint_url(config.sse_endpoint.as_deref(), &config.api_base_url)
            .map_err(|e| Error::new(Status::InvalidArg, e.to_string()))?;
        let rest = rest::connect_client(self.shared_credentials.as_ref(), &config)?;
        let client = Arc::new(SseClient::new(
            rest.credentials().clone(),
            SseConfig::new(url),
        ));
        let connected = Connected::new(client.clone(), rest, &self.js);
        let inbox = connected.inbox.clone();
        if let Some(old) = lock(&self.connected).replace(connected) {
            old.client.stop();
        }
        crate::node::runtime_context(|| client.start(inbox));
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
        let rest = self.rest()?;
        rest::push(&rest, &to, &content, options).await
    }

    /// What the stream delivered (not yet taken by a subscriber) plus what the server queued.
    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let (rest, inbox) = self.with_connected(|c| (c.rest.clone(), c.inbox.clone()))?;
        let limit = PollOptions::limit_or(&options, 50) as usize;
        let peek = PeekSource::new(rest.clone());
        let messages = inbox
            .poll(&peek, limit, PollOptions::since(&options))
            .await
            .map_err(|e| rest::rest_error(&rest, "poll", e))?;
        Ok(messages.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        let rest = self.rest()?;
        rest::ack(&rest, &message_ids).await
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
        let handler: HandlerRef =
            Arc::new(JsFn::new(env, handler, "SseTransport.subscribe: handler")?);
        let (inbox, subscribers) =
            self.with_connected(|c| (c.inbox.clone(), c.subscribers.clone()))?;
        let unsubscribe = subscribers.add(env, handler.clone(), |_, _, _| {})?;
        // What arrived before anyone subscribed goes to the first subscriber now, ahead of
        // what the stream hands over from here on.
        for message in inbox.take_all() {
            call_subscriber(env, &handler, message);
        }
        Ok(unsubscribe)
    }

    #[napi]
    pub fn status(&self) -> JsSseStatus {
        match lock(&self.connected).as_ref() {
            Some(c) => sse_status(&c.client, c.inbox.len()),
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
