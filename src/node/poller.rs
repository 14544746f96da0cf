//! `AgentPoller`: the JS class over [`crate::core::poller::Poller`].

use std::sync::Arc;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::adapters::{HandlerRef, JsHandler, JsTransport};
use super::config::Fields;
use super::js::{JsFn, JsThread};
use super::runtime_context;
use super::service::{Lifecycle, Service};
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::poller::{PollReport, Poller, PollerConfig, PollerStatus, final_ack};
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

impl DirectPath {
    fn source(&self) -> Arc<dyn DirectSource> {
        match self {
            DirectPath::Js(transport) => transport.clone(),
            DirectPath::Native(source) => source.clone(),
        }
    }
}

/// The poller and what its stop needs: where to send the final ack.
pub struct PollerPart {
    pub poller: Arc<Poller>,
    direct: DirectPath,
    js: JsThread,
}

impl PollerPart {
    /// The poller as a service; its handler is called through `env`'s JS thread.
    pub fn service(env: &Env, poller: Arc<Poller>, direct: DirectPath) -> Arc<Service<Self>> {
        Service::new(Arc::new(Self {
            poller,
            direct,
            js: JsThread::new(env),
        }))
    }

    pub fn set_handler(&self, function: HandlerRef) {
        self.poller
            .set_handler(Arc::new(JsHandler::new(function, self.js.clone())));
    }
}

impl Lifecycle for PollerPart {
    /// The final ack on a native source, under way.
    type Stopped = Option<BoxFuture<'static, ()>>;

    fn start(&self) -> bool {
        self.poller.start()
    }

    /// Stops at once; what was handled but not yet acked is acked on the way out: through
    /// a JS transport right here (so no transport call happens after `stop()` returns), or
    /// natively in the returned future.
    fn stop(&self, env: &Env) -> Self::Stopped {
        let handled = self.poller.stop();
        match &self.direct {
            DirectPath::Js(transport) => {
                if !handled.is_empty()
                    && let Err(e) = transport.ack_now(env, handled)
                {
                    tracing::warn!(error = %e, "final ack on stop failed");
                }
                None
            }
            DirectPath::Native(source) => {
                final_ack::send(&self.poller.config().agent_id, source.clone(), handled)
            }
        }
    }

    /// The environment is going away: a native source still gets its final ack; a JS
    /// transport cannot be called any more (what it handled is offered again to the next
    /// runtime, at-least-once).
    fn teardown(&self) {
        let handled = self.poller.stop();
        if let DirectPath::Native(source) = &self.direct
            && let Some(ack) =
                final_ack::send(&self.poller.config().agent_id, source.clone(), handled)
        {
            runtime_context(|| tokio::spawn(ack));
        }
    }
}

/// Polls SignalDock for direct messages and group @mentions and hands each message, once,
/// to the handler set with `onMessage`.
#[napi(js_name = "AgentPoller")]
pub struct AgentPoller {
    pub(crate) inner: Arc<Service<PollerPart>>,
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
        // A standalone poller has its own credential and client; in a runtime, the
        // runtime's one of each.
        let credentials = Credentials::new(agent_id, ApiKey::new(api_key));
        let client = match needs_rest {
            true => Some(Arc::new(
                SignalDock::new(credentials.clone(), &api_base_url, None)
                    .map_err(|e| super::error::to_js(&e))?,
            )),
            false => None,
        };
        let direct = match (transport, &client) {
            (Some(object), _) => {
                DirectPath::Js(Arc::new(JsTransport::new(&object, JsThread::new(&env))?))
            }
            (None, Some(client)) => DirectPath::Native(Arc::new(PeekSource::new(client.clone()))),
            // Without a transport `needs_rest` holds: a client was made above.
            (None, None) => return Err(Error::from_reason("AgentPoller: no transport, no REST")),
        };
        let groups: Option<Arc<dyn GroupFeed>> = match client {
            Some(client) if !config.group_conversation_ids.is_empty() => Some(client),
            _ => None,
        };
        let poller = Poller::new(config, direct.source(), groups).with_secrets(credentials);
        Ok(Self {
            inner: PollerPart::service(&env, Arc::new(poller), direct),
        })
    }

    /// Sets THE handler; a second call replaces the first.
    #[napi(ts_args_type = "handler: (message: ConduitMessage) => void | Promise<void>")]
    pub fn on_message(&self, env: Env, handler: Unknown) -> Result<()> {
        let handler = JsFn::new(&env, handler, "AgentPoller.onMessage: handler")?;
        self.inner.inner().set_handler(Arc::new(handler));
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
            let span = self.inner.inner().poller.span().clone();
            runtime_context(|| tokio::spawn(tracing::Instrument::instrument(final_ack, span)));
        }
    }

    #[napi]
    pub fn status(&self) -> JsPollerStatus {
        self.inner.inner().poller.status().into()
    }

    /// One cycle over every track now, then the next pages while pages are full; resolves
    /// once what it found has been handled and acked. No clock involved: the hook for tests.
    #[napi]
    pub async fn poll_now(&self) -> Result<JsPollReport> {
        let pending = self.inner.inner().poller.poll_now_and_wait();
        pending
            .await
            .map(Into::into)
            .map_err(|e| Error::from_reason(format!("AgentPoller.pollNow: {e}")))
    }
}
