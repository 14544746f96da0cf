//! The native transports as JS classes implementing the contract's `Transport` interface.
//!
//! `HttpTransport` speaks SignalDock REST. Inside a runtime it shares the runtime's
//! credentials, so a rotated key reaches it on its next request.

use std::sync::{Arc, Mutex};

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio_util::sync::CancellationToken;

use super::adapters::{JsHandler, JsMessage};
use super::config::Fields;
use super::js::{JsThread, KeepAlive};
use super::lifetime::Liveness;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::delivery::{Handler, Outcome, Settled};
use crate::core::local;
use crate::core::message;
use crate::core::signaldock::SignalDock;
use crate::core::sync::lock;
use crate::core::task::RunningTask;
use crate::core::transport::{Page, PeekSource};

/// `connect()` config: the contract's `TransportConnectConfig`.
#[napi(object)]
pub struct TransportConnectConfig {
    pub agent_id: String,
    pub api_key: String,
    pub api_base_url: String,
    pub poll_interval_ms: Option<f64>,
    pub sse_endpoint: Option<String>,
    pub ws_url: Option<String>,
    pub poll_endpoint: Option<String>,
    pub api_base_url_fallback: Option<String>,
}

#[napi(object)]
pub struct PushOptions {
    pub conversation_id: Option<String>,
    pub reply_to: Option<String>,
}

#[napi(object)]
pub struct PushResult {
    pub message_id: String,
}

#[napi(object)]
pub struct PollOptions {
    pub limit: Option<u32>,
    pub since: Option<String>,
}

/// Reads a `connect()` config with `TypeError`s naming the field (a napi conversion would
/// throw a plain `Error` with napi's own wording).
///
/// `rest`: the transport talks to SignalDock over HTTP, so `apiKey` is required and
/// `apiBaseUrl` must be an http(s) URL; the local transport needs only `agentId`.
pub fn read_connect_config(
    env: &Env,
    owner: &'static str,
    value: Unknown<'_>,
    rest: bool,
) -> Result<TransportConnectConfig> {
    let fields = Fields::new(env, owner, Some(value), false)?;
    let agent_id = fields.required_agent_id("agentId")?;
    let (api_key, api_base_url) = match rest {
        true => (
            fields.required_string("apiKey")?,
            fields.url("apiBaseUrl", true)?.unwrap_or_default(),
        ),
        false => (
            fields.any_string("apiKey")?.unwrap_or_default(),
            fields.any_string("apiBaseUrl")?.unwrap_or_default(),
        ),
    };
    let poll_interval_ms = fields
        .positive_ms("pollIntervalMs")?
        .map(|d| d.as_secs_f64() * 1000.0);
    Ok(TransportConnectConfig {
        agent_id,
        api_key,
        api_base_url,
        poll_interval_ms,
        sse_endpoint: fields.url("sseEndpoint", false)?,
        ws_url: fields.string("wsUrl")?,
        poll_endpoint: fields.string("pollEndpoint")?,
        api_base_url_fallback: fields.url("apiBaseUrlFallback", false)?,
    })
}

/// The connected client, shared with the runtime that owns the transport so its `stop()`
/// can disconnect it.
pub type ClientSlot = Arc<Mutex<Option<Arc<SignalDock>>>>;

fn to_js(err: crate::core::error::Error) -> Error {
    super::error::to_js(&err)
}

/// A failed REST call as a JS error: `"{what} failed: {err}"`, scrubbed of the agent's keys,
/// since the error may quote the server's answer and a server may echo the key back.
fn rest_error(client: &SignalDock, what: &str, err: crate::core::error::Error) -> Error {
    super::error::scrubbed(&err.context(format!("{what} failed")), client.credentials())
}

/// `push(to, content, options)` over REST: a direct message, or into a conversation.
/// Shared by the HTTP and SSE transports.
pub async fn rest_push(
    client: &SignalDock,
    to: &str,
    content: &str,
    options: Option<PushOptions>,
) -> Result<PushResult> {
    let id = match options.as_ref().and_then(|o| o.conversation_id.as_deref()) {
        Some(conversation) => {
            let reply_to = options.as_ref().and_then(|o| o.reply_to.as_deref());
            client
                .send_to_conversation(conversation, content, reply_to)
                .await
        }
        None => client.send_direct(to, content).await,
    }
    .map_err(|e| rest_error(client, "push", e))?;
    Ok(PushResult { message_id: id })
}

/// `ack(ids)` over REST, shared by the HTTP and SSE transports.
pub async fn rest_ack(client: &SignalDock, message_ids: &[String]) -> Result<()> {
    client
        .ack(message_ids)
        .await
        .map_err(|e| rest_error(client, "ack", e))
}

/// SignalDock over plain HTTP: `push`, `poll` (peek), `ack`, with failover to
/// `apiBaseUrlFallback`.
#[napi(js_name = "HttpTransport")]
pub struct HttpTransport {
    client: ClientSlot,
    /// Set when a runtime owns this transport: connect() then reuses its credentials.
    shared_credentials: Option<Arc<Credentials>>,
}

impl HttpTransport {
    /// The runtime's transport over its one REST client; the runtime empties the slot at
    /// `stop()`. A `connect()` from JS then reuses the runtime's credentials.
    pub fn from_slot(client: ClientSlot, credentials: Arc<Credentials>) -> Self {
        Self {
            client,
            shared_credentials: Some(credentials),
        }
    }

    pub fn slot(&self) -> ClientSlot {
        self.client.clone()
    }

    fn client(&self) -> Result<Arc<SignalDock>> {
        lock(&self.client).clone().ok_or_else(|| {
            Error::new(
                Status::GenericFailure,
                "HttpTransport is not connected: call connect() first".to_owned(),
            )
        })
    }

    /// The direct-message source for a poller over this transport.
    pub fn peek_source(&self) -> Result<PeekSource> {
        Ok(PeekSource::new(self.client()?))
    }
}

#[napi]
impl HttpTransport {
    #[napi(constructor)]
    pub fn new() -> Self {
        Self {
            client: ClientSlot::default(),
            shared_credentials: None,
        }
    }

    #[napi(getter, ts_return_type = "'http'")]
    pub fn name(&self) -> &'static str {
        "http"
    }

    #[napi(
        ts_args_type = "config: TransportConnectConfig",
        ts_return_type = "Promise<void>"
    )]
    pub fn connect<'env>(
        &self,
        env: &'env Env,
        config: Unknown<'env>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let config = match read_connect_config(env, "HttpTransport.connect", config, true) {
            Ok(config) => config,
            Err(e) => return super::js::rejected(env, e),
        };
        let (slot, shared) = (self.client.clone(), self.shared_credentials.clone());
        env.spawn_future(async move {
            let credentials = shared.unwrap_or_else(|| {
                Credentials::new(&config.agent_id, ApiKey::new(config.api_key.as_str()))
            });
            let client = SignalDock::new(
                credentials,
                &config.api_base_url,
                config.api_base_url_fallback.as_deref(),
            )
            .map_err(to_js)?;
            client.choose_base().await;
            *lock(&slot) = Some(Arc::new(client));
            Ok(())
        })
    }

    #[napi]
    pub async fn disconnect(&self) -> Result<()> {
        lock(&self.client).take();
        Ok(())
    }

    #[napi]
    pub async fn push(
        &self,
        to: String,
        content: String,
        options: Option<PushOptions>,
    ) -> Result<PushResult> {
        let client = self.client()?;
        rest_push(&client, &to, &content, options).await
    }

    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let client = self.client()?;
        let options = options.unwrap_or(PollOptions {
            limit: None,
            since: None,
        });
        let rows = client
            .peek(
                options.limit.unwrap_or(50).clamp(1, 1000),
                options.since.as_deref(),
            )
            .await
            .map_err(|e| rest_error(&client, "poll", e))?;
        let page = Page::from_rows(rows, |row| message::from_rest_row(row, None));
        Ok(page.messages.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        let client = self.client()?;
        rest_ack(&client, &message_ids).await
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}

/// The database path a runtime uses when nothing names one.
pub fn default_local_db_path() -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    local::default_db_path(std::env::var_os("CLEO_DIR").as_deref(), &cwd)
}

/// The embedded local SignalDock (`signaldock.db`), shared with the cleo CLI and other
/// agents' processes; rows they commit reach `subscribe` handlers within milliseconds.
#[napi(js_name = "LocalTransport")]
pub struct LocalTransport {
    db_path: Option<std::path::PathBuf>,
    connected: Arc<Mutex<Option<local::LocalTransport>>>,
    js: JsThread,
    subscriptions: Arc<Mutex<Vec<(u64, RunningTask)>>>,
    next_subscription: Mutex<u64>,
    /// Held while a subscription is live: the transport is a GC root and keeps the process
    /// alive, and the subscriptions stop with the environment.
    live: Arc<Liveness>,
}

impl LocalTransport {
    /// A transport already connected (the runtime's resolution), in the runtime's slot,
    /// which the runtime empties at `stop()`.
    pub fn from_slot(env: &Env, slot: Arc<Mutex<Option<local::LocalTransport>>>) -> Result<Self> {
        let db_path = lock(&slot).as_ref().map(|core| core.path().to_path_buf());
        Ok(Self {
            db_path,
            connected: slot,
            js: JsThread::new(env)?,
            subscriptions: Arc::default(),
            next_subscription: Mutex::new(0),
            live: Arc::default(),
        })
    }

    fn core(&self) -> Result<local::LocalTransport> {
        lock(&self.connected).clone().ok_or_else(|| {
            Error::new(
                Status::GenericFailure,
                "LocalTransport is not connected: call connect() first".to_owned(),
            )
        })
    }
}

#[napi]
impl LocalTransport {
    #[napi(
        constructor,
        ts_args_type = "options?: import('./index').LocalTransportOptions"
    )]
    pub fn new(env: Env, options: Option<Unknown>) -> Result<Self> {
        let fields = Fields::new(&env, "LocalTransport", options, true)?;
        Ok(Self {
            db_path: fields.string("dbPath")?.map(Into::into),
            connected: Arc::default(),
            js: JsThread::new(&env)?,
            subscriptions: Arc::default(),
            next_subscription: Mutex::new(0),
            live: Arc::default(),
        })
    }

    #[napi(getter, ts_return_type = "'local'")]
    pub fn name(&self) -> &'static str {
        "local"
    }

    /// The file this transport uses (or will use).
    #[napi(getter)]
    pub fn db_path(&self) -> String {
        self.db_path
            .clone()
            .unwrap_or_else(default_local_db_path)
            .display()
            .to_string()
    }

    /// Creates the `conversations` and `messages` tables (exactly as WIRE.md gives them) when
    /// missing, and the file and its directory; never touches other tables.
    #[napi]
    pub async fn ensure_schema(db_path: Option<String>) -> Result<String> {
        let path = db_path
            .map(std::path::PathBuf::from)
            .unwrap_or_else(default_local_db_path);
        let shown = path.display().to_string();
        tokio::task::spawn_blocking(move || local::ensure_schema(&path))
            .await
            .map_err(|e| Error::new(Status::GenericFailure, e.to_string()))?
            .map_err(to_js)?;
        Ok(shown)
    }

    #[napi(
        ts_args_type = "config: TransportConnectConfig",
        ts_return_type = "Promise<void>"
    )]
    pub fn connect<'env>(
        &self,
        env: &'env Env,
        config: Unknown<'env>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let config = match read_connect_config(env, "LocalTransport.connect", config, false) {
            Ok(config) => config,
            Err(e) => return super::js::rejected(env, e),
        };
        let path = self.db_path.clone().unwrap_or_else(default_local_db_path);
        let connected = self.connected.clone();
        env.spawn_future(async move {
            let core = local::LocalTransport::connect(path, config.agent_id)
                .await
                .map_err(to_js)?;
            let old = lock(&connected).replace(core);
            if let Some(old) = old {
                old.disconnect().await;
            }
            Ok(())
        })
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn disconnect<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        for (_, task) in lock(&self.subscriptions).drain(..) {
            task.stop();
        }
        self.live.release(env);
        let core = lock(&self.connected).take();
        env.spawn_future(async move {
            if let Some(core) = core {
                core.disconnect().await;
            }
            Ok(())
        })
    }

    #[napi]
    pub async fn push(
        &self,
        to: String,
        content: String,
        options: Option<PushOptions>,
    ) -> Result<PushResult> {
        let options = options.unwrap_or(PushOptions {
            conversation_id: None,
            reply_to: None,
        });
        let id = self
            .core()?
            .push(
                &to,
                &content,
                options.conversation_id.as_deref(),
                options.reply_to.as_deref(),
            )
            .await
            .map_err(to_js)?;
        Ok(PushResult { message_id: id })
    }

    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let options = options.unwrap_or(PollOptions {
            limit: None,
            since: None,
        });
        let messages = self
            .core()?
            .poll(
                options
                    .limit
                    .unwrap_or(local::DEFAULT_POLL_LIMIT)
                    .clamp(1, 1000),
                options.since.as_deref(),
            )
            .await
            .map_err(to_js)?;
        Ok(messages.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        self.core()?.ack(&message_ids).await.map_err(to_js)
    }

    /// Delivers each pending message for this agent, as other processes commit them, to
    /// `handler`, and acks it once the handler has settled. Returns the unsubscribe function.
    #[napi(
        ts_args_type = "handler: (message: ConduitMessage) => void",
        ts_return_type = "() => void"
    )]
    pub fn subscribe<'env>(
        &self,
        env: &'env Env,
        handler: Unknown<'env>,
        this: This<'env>,
    ) -> Result<Function<'env, (), ()>> {
        if handler.get_type()? != ValueType::Function {
            return Err(super::js::type_error(
                env,
                "LocalTransport.subscribe: handler must be a function",
            ));
        }
        let core = self.core()?;
        let function: Function<JsMessage, Unknown<'static>> =
            unsafe { Function::from_napi_value(env.raw(), handler.raw())? };
        let handler = JsHandler::new(Arc::new(function.create_ref()?), self.js.clone());
        let keep_alive = KeepAlive::new(env)?;
        let task = super::runtime_context(|| {
            RunningTask::spawn(|token| deliver_commits(core, handler, keep_alive, token))
        });
        let id = {
            let mut next = lock(&self.next_subscription);
            *next += 1;
            *next
        };
        lock(&self.subscriptions).push((id, task));
        let (subscriptions, live) = (
            Arc::downgrade(&self.subscriptions),
            Arc::downgrade(&self.live),
        );
        self.live.hold(env, Some(&this), move || {
            if let Some(subscriptions) = subscriptions.upgrade() {
                for (_, task) in lock(&subscriptions).drain(..) {
                    task.stop();
                }
            }
            if let Some(live) = live.upgrade() {
                live.abandon();
            }
        })?;
        let (subscriptions, live) = (
            Arc::downgrade(&self.subscriptions),
            Arc::downgrade(&self.live),
        );
        env.create_function_from_closure("unsubscribe", move |ctx| {
            if let Some(subscriptions) = subscriptions.upgrade() {
                let mut subscriptions = lock(&subscriptions);
                subscriptions.retain(|(sid, task)| {
                    if *sid == id {
                        task.token().cancel();
                    }
                    *sid != id
                });
                // The last subscription gone: the transport is an ordinary object again.
                if subscriptions.is_empty()
                    && let Some(live) = live.upgrade()
                {
                    live.release(ctx.env);
                }
            }
            Ok(())
        })
    }
}

/// A subscription's loop: on every commit (and once at start), deliver what is pending and
/// ack what was handled.
async fn deliver_commits(
    core: local::LocalTransport,
    handler: JsHandler,
    _keep_alive: KeepAlive,
    token: CancellationToken,
) {
    let mut commits = core.commits();
    loop {
        commits.borrow_and_update();
        match core.poll_page(local::DEFAULT_POLL_LIMIT, None).await {
            Ok(page) if !page.messages.is_empty() => {
                let handled: Arc<Mutex<Vec<String>>> = Arc::default();
                let record = handled.clone();
                let settled: Settled =
                    Arc::new(move |id: &str, _outcome: Outcome| lock(&record).push(id.to_owned()));
                handler.deliver(page.messages, settled, token.clone()).await;
                let ids = std::mem::take(&mut *lock(&handled));
                if let Err(e) = core.ack(&ids).await {
                    tracing::warn!(error = %e, "LocalTransport subscription ack failed");
                }
                if token.is_cancelled() {
                    return;
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "LocalTransport subscription poll failed"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = commits.changed() => if changed.is_err() { return },
        }
    }
}
