//! `AgentPoller`: the JS class over [`crate::core::poller::Poller`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::adapters::{HandlerRef, JsHandler, JsMessage, JsTransport};
use super::config::Fields;
use super::js::{JsThread, type_error};
use super::lifetime::Liveness;
use super::runtime_context;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::journal::{Journal, JournalConfig};
use crate::core::poller::{PollReport, Poller, PollerConfig, PollerStatus};
use crate::core::signaldock::SignalDock;
use crate::core::transport::{DirectSource, GroupFeed, PeekSource};

/// What `status()` returns.
#[napi(object, js_name = "AgentPollerStatus")]
pub struct JsPollerStatus {
    pub running: bool,
    pub seen_count: u32,
    pub delivered: f64,
    pub failed: f64,
    pub malformed: f64,
    pub polls: f64,
    pub last_poll_at: Option<String>,
    pub last_error: Option<String>,
    pub realtime: bool,
    pub pending_acks: u32,
}

impl From<PollerStatus> for JsPollerStatus {
    fn from(s: PollerStatus) -> Self {
        Self {
            running: s.running,
            seen_count: s.seen_count as u32,
            delivered: s.delivered as f64,
            failed: s.failed as f64,
            malformed: s.malformed as f64,
            polls: s.polls as f64,
            last_poll_at: s.last_poll_at,
            last_error: s.last_error,
            realtime: s.realtime,
            pending_acks: s.pending_acks as u32,
        }
    }
}

/// What `pollNow()` resolves with.
#[napi(object, js_name = "PollNowResult")]
pub struct JsPollReport {
    /// Handler calls that returned or resolved between the call and the answer (whichever
    /// path brought the message).
    pub handled: f64,
    /// Handler calls that threw or rejected in the same span.
    pub failed: f64,
    /// Tracks that failed or waited out a `Retry-After` (`direct: …`, `group <id>: …`).
    pub errors: Vec<String>,
}

impl From<PollReport> for JsPollReport {
    fn from(r: PollReport) -> Self {
        Self {
            handled: r.handled as f64,
            failed: r.failed as f64,
            errors: r.errors,
        }
    }
}

/// Where the direct track reads from, kept so `stop()` can ack what was handled.
pub enum DirectPath {
    Js(Arc<JsTransport>),
    Native(Arc<dyn DirectSource>),
}

/// The poller and what its JS class holds on to.
pub struct PollerCore {
    pub core: Poller,
    direct: DirectPath,
    js: JsThread,
    live: Liveness,
}

/// Settings for building a poller, from a JS config or from `createRuntime`.
pub struct PollerSettings {
    pub config: PollerConfig,
    pub credentials: Arc<Credentials>,
    pub api_base_url: String,
    /// The REST client for group reads and the default peek: a runtime passes its one
    /// client (with its failover); a standalone poller builds its own from `api_base_url`.
    pub rest: Option<Arc<SignalDock>>,
    pub direct: Option<DirectPath>,
    /// The journal (`createRuntime`'s `journal`), already open.
    pub journal: Option<(JournalConfig, Arc<Journal>)>,
}

impl PollerCore {
    pub fn build(env: &Env, settings: PollerSettings) -> Result<Arc<Self>> {
        let js = JsThread::new(env)?;
        let PollerSettings {
            config,
            credentials,
            api_base_url,
            rest: shared_rest,
            direct,
            journal,
        } = settings;
        let rest = || match &shared_rest {
            Some(rest) => Ok(rest.clone()),
            None => SignalDock::new(credentials.clone(), &api_base_url, None)
                .map(Arc::new)
                .map_err(|e| Error::new(Status::InvalidArg, e.to_string())),
        };
        let groups: Option<Arc<dyn GroupFeed>> = if config.group_conversation_ids.is_empty() {
            None
        } else {
            Some(rest()?)
        };
        let direct = match direct {
            Some(direct) => direct,
            None => DirectPath::Native(Arc::new(PeekSource::new(rest()?))),
        };
        let source: Arc<dyn DirectSource> = match &direct {
            DirectPath::Js(t) => t.clone(),
            DirectPath::Native(s) => s.clone(),
        };
        let mut core = Poller::new(config, source, groups).with_secrets(credentials.clone());
        if let Some((config, journal)) = journal {
            core = core.with_journal(config, Some(journal));
        }
        Ok(Arc::new(Self {
            core,
            direct,
            js,
            live: Liveness::default(),
        }))
    }

    pub fn set_handler(&self, function: HandlerRef) {
        self.core
            .set_handler(Arc::new(JsHandler::new(function, self.js.clone())));
    }

    /// Starts the loops; while they run, the poller (and `wrapper`, its JS object, when
    /// given) is a GC root and keeps the process alive, until `stop()` or the end of the
    /// environment.
    pub fn start(self: &Arc<Self>, env: &Env, wrapper: Option<&Object<'_>>) -> Result<()> {
        let weak = Arc::downgrade(self);
        self.live.start(
            env,
            wrapper,
            || self.core.start(),
            move || {
                if let Some(poller) = weak.upgrade() {
                    poller.teardown();
                }
            },
        )
    }

    /// Roots a wrapper handed out for this poller while it runs.
    pub fn root(&self, wrapper: &Object<'_>) -> Result<()> {
        self.live.root(wrapper)
    }

    /// Stops at once; what was handled but not yet acked is acked on the way out: through
    /// a JS transport right here (so no transport call happens after `stop()` returns), or
    /// natively in the returned future, which the caller runs (before closing the transport).
    pub fn stop(&self, env: &Env) -> Option<BoxFuture<'static, ()>> {
        let handled = self.core.stop();
        self.live.release(env);
        if handled.is_empty() {
            return None;
        }
        match &self.direct {
            DirectPath::Js(transport) => {
                if let Err(e) = transport.ack_now(env, handled) {
                    tracing::warn!(error = %e, "final ack on stop failed");
                }
                None
            }
            DirectPath::Native(source) => Some(self.final_ack_native(source.clone(), handled)),
        }
    }

    /// The environment that started the poller is going away: stop without calling into it.
    /// A native source still gets its final ack; a JS transport cannot be called any more
    /// (what it handled is offered again to the next runtime, at-least-once).
    fn teardown(&self) {
        let handled = self.core.stop();
        self.live.abandon();
        if let (false, DirectPath::Native(source)) = (handled.is_empty(), &self.direct) {
            let ack = self.final_ack_native(source.clone(), handled);
            runtime_context(|| tokio::spawn(ack));
        }
    }

    fn final_ack_native(
        &self,
        source: Arc<dyn DirectSource>,
        handled: Vec<String>,
    ) -> BoxFuture<'static, ()> {
        // A poller started for the same agent waits for this ack before it polls.
        let guard = crate::core::poller::final_ack_in_flight(&self.core.config().agent_id);
        Box::pin(async move {
            final_ack(source, handled).await;
            drop(guard);
        })
    }
}

/// The final ack of what a stopped poller handled: retried (the server may be failing a
/// share of requests) within [`FINAL_ACK_BUDGET`]. What it cannot ack is offered again to the
/// next runtime (at-least-once); nothing keeps the process alive for it.
async fn final_ack(source: Arc<dyn DirectSource>, ids: Vec<String>) {
    let deadline = tokio::time::Instant::now() + FINAL_ACK_BUDGET;
    let mut pause = Duration::from_millis(100);
    loop {
        let error = match tokio::time::timeout_at(deadline, source.ack(ids.clone())).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            tracing::warn!(
                error,
                count = ids.len(),
                "final ack on stop failed; those messages may be offered again"
            );
            return;
        }
        tracing::debug!(error, "final ack on stop failed; retrying");
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// How long a stopped poller keeps trying to ack what it handled.
const FINAL_ACK_BUDGET: Duration = Duration::from_secs(5);

/// Polls SignalDock for direct messages and group @mentions and hands each message, once,
/// to the handler set with `onMessage`.
#[napi(js_name = "AgentPoller")]
pub struct AgentPoller {
    pub(crate) inner: Arc<PollerCore>,
}

#[napi]
impl AgentPoller {
    #[napi(constructor)]
    pub fn new(env: Env, config: Unknown) -> Result<Self> {
        let fields = Fields::new(&env, "AgentPoller", Some(config), false)?;
        let agent_id = fields.required_agent_id("agentId")?;
        let api_key = fields.required_string("apiKey")?;
        let transport = fields.object_with("transport", &["poll"])?;
        let groups = fields
            .string_array("groupConversationIds")?
            .unwrap_or_default();
        // A base URL is needed for REST calls: always without a transport, and for groups.
        let needs_rest = transport.is_none() || !groups.is_empty();
        let api_base_url = match needs_rest {
            true => fields.url("apiBaseUrl", true)?.unwrap_or_default(),
            false => fields.required_string("apiBaseUrl")?,
        };
        let mut config = PollerConfig::new(&agent_id);
        config.group_conversation_ids = groups;
        if let Some(interval) = fields.positive_ms("pollIntervalMs")? {
            config.poll_interval = interval;
        }
        if let Some(limit) = fields.positive_count("groupPollLimit", 1000)? {
            config.group_poll_limit = limit;
        }
        let direct = match transport {
            Some(object) => Some(DirectPath::Js(Arc::new(JsTransport::new(
                &object,
                JsThread::new(&env)?,
            )?))),
            None => None,
        };
        let settings = PollerSettings {
            config,
            credentials: Credentials::new(agent_id, ApiKey::new(api_key)),
            api_base_url,
            rest: None,
            direct,
            journal: None,
        };
        Ok(Self {
            inner: PollerCore::build(&env, settings)?,
        })
    }

    /// Sets THE handler; a second call replaces the first.
    #[napi(ts_args_type = "handler: (message: ConduitMessage) => void | Promise<void>")]
    pub fn on_message(&self, env: Env, handler: Unknown) -> Result<()> {
        if handler.get_type()? != ValueType::Function {
            return Err(type_error(
                &env,
                "AgentPoller.onMessage: handler must be a function",
            ));
        }
        let function: Function<JsMessage, Unknown<'static>> =
            unsafe { Function::from_napi_value(env.raw(), handler.raw())? };
        self.inner.set_handler(Arc::new(function.create_ref()?));
        Ok(())
    }

    /// Starts polling: one cycle now, then one per interval. Idempotent.
    #[napi]
    pub fn start(&self, env: Env, this: This) -> Result<()> {
        self.inner.start(&env, Some(&this))
    }

    /// Stops polling at once. Idempotent; no handler call after it returns.
    #[napi]
    pub fn stop(&self, env: Env) {
        if let Some(final_ack) = self.inner.stop(&env) {
            let span = self.inner.core.span().clone();
            runtime_context(|| tokio::spawn(tracing::Instrument::instrument(final_ack, span)));
        }
    }

    #[napi]
    pub fn status(&self) -> JsPollerStatus {
        self.inner.core.status().into()
    }

    /// One cycle over every track now, then the next pages while pages are full; resolves
    /// once what it found has been handled and acked. No clock involved: the hook for tests.
    #[napi]
    pub async fn poll_now(&self) -> Result<JsPollReport> {
        let pending = self.inner.core.poll_now_and_wait();
        pending
            .await
            .map(Into::into)
            .map_err(|e| Error::from_reason(format!("AgentPoller.pollNow: {e}")))
    }
}
