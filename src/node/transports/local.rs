//! `LocalTransport`: the embedded local SignalDock (`signaldock.db`), shared with the cleo CLI
//! and other agents' processes. A subscription runs the core's commit delivery
//! ([`crate::core::local::watch::deliver_commits`]); this class only wraps it.

use std::sync::{Arc, Mutex};

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::{PollOptions, PushOptions, PushResult, read_connect_config, to_js};
use crate::core::local;
use crate::core::sync::lock;
use crate::core::task::RunningTask;
use crate::node::adapters::{JsHandler, JsMessage};
use crate::node::config::Fields;
use crate::node::js::{JsFn, JsThread, KeepAlive, Subscriptions};
use crate::node::lifetime::Liveness;

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
    subscriptions: Arc<Subscriptions<RunningTask>>,
    /// Held while a subscription is live: the transport is a GC root and keeps the process
    /// alive, and the subscriptions stop with the environment.
    live: Arc<Liveness>,
}

impl LocalTransport {
    /// A transport already connected (the runtime's resolution), in the runtime's slot,
    /// which the runtime empties at `stop()`. Its subscribers are called through the
    /// runtime's queue (`js`), open while it runs.
    pub fn from_slot(js: JsThread, slot: Arc<Mutex<Option<local::LocalTransport>>>) -> Self {
        let db_path = lock(&slot).as_ref().map(|core| core.path().to_path_buf());
        Self {
            db_path,
            connected: slot,
            js,
            subscriptions: Arc::default(),
            live: Arc::default(),
        }
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
            js: JsThread::new(&env),
            subscriptions: Arc::default(),
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
            Err(e) => return crate::node::js::rejected(env, e),
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
        for task in self.subscriptions.drain() {
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
        let (conversation_id, reply_to) = match options {
            Some(o) => (o.conversation_id, o.reply_to),
            None => (None, None),
        };
        let id = self
            .core()?
            .push(
                &to,
                &content,
                conversation_id.as_deref(),
                reply_to.as_deref(),
            )
            .await
            .map_err(to_js)?;
        Ok(PushResult { message_id: id })
    }

    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let messages = self
            .core()?
            .poll(
                PollOptions::limit_or(&options, local::DEFAULT_POLL_LIMIT),
                PollOptions::since(&options).as_deref(),
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
        let handler = JsFn::new(env, handler, "LocalTransport.subscribe: handler")?;
        let core = self.core()?;
        let handler = JsHandler::new(Arc::new(handler), self.js.clone());
        // Held first: the hold opens the queue the handler is called through.
        let (subscriptions, live) = (
            Arc::downgrade(&self.subscriptions),
            Arc::downgrade(&self.live),
        );
        self.live.hold(env, Some(&this), move || {
            if let Some(subscriptions) = subscriptions.upgrade() {
                for task in subscriptions.drain() {
                    task.stop();
                }
            }
            if let Some(live) = live.upgrade() {
                live.abandon();
            }
        })?;
        // Until the loop ends, also after an unsubscribe: what the handler settled is acked.
        let keep_alive = KeepAlive::new(env)?;
        let task = crate::node::runtime_context(|| {
            RunningTask::spawn(|token| async move {
                let _keep_alive = keep_alive;
                let commits = core.commits();
                local::watch::deliver_commits(&core, commits, &handler, token).await;
            })
        });
        let live = Arc::downgrade(&self.live);
        self.subscriptions.add(env, task, move |env, task, last| {
            // Cancelled, not aborted: the loop acks what the handler already settled.
            task.token().cancel();
            // The last subscription gone: the transport is an ordinary object again.
            if last && let Some(live) = live.upgrade() {
                live.release(env);
            }
        })
    }
}
