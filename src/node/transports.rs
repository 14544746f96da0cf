//! The native transports as JS classes implementing the contract's `Transport` interface.
//!
//! `HttpTransport` speaks SignalDock REST. Inside a runtime it shares the runtime's
//! credentials, so a rotated key reaches it on its next request.

use std::sync::{Arc, Mutex};

use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::adapters::JsMessage;
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::message;
use crate::core::signaldock::SignalDock;
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

/// The connected client, shared with the runtime that owns the transport so its `stop()`
/// can disconnect it.
pub type ClientSlot = Arc<Mutex<Option<Arc<SignalDock>>>>;

fn to_js(err: crate::core::error::Error) -> Error {
    Error::new(Status::GenericFailure, err.to_string())
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
    pub fn with_credentials(credentials: Arc<Credentials>) -> Self {
        Self {
            client: ClientSlot::default(),
            shared_credentials: Some(credentials),
        }
    }

    pub fn slot(&self) -> ClientSlot {
        self.client.clone()
    }

    fn client(&self) -> Result<Arc<SignalDock>> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::new(
                    Status::GenericFailure,
                    "HttpTransport is not connected: call connect() first".to_owned(),
                )
            })
    }

    /// Connects natively (the runtime's path, no JS round trip).
    pub async fn connect_native(
        &self,
        agent_id: &str,
        api_key: &str,
        base: &str,
        fallback: Option<&str>,
    ) -> crate::core::error::Result<Arc<SignalDock>> {
        let credentials = match &self.shared_credentials {
            Some(shared) => shared.clone(),
            None => Credentials::new(agent_id, ApiKey::new(api_key)),
        };
        let client = Arc::new(SignalDock::new(credentials, base, fallback)?);
        client.choose_base().await;
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        Ok(client)
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

    #[napi(getter)]
    pub fn name(&self) -> &'static str {
        "http"
    }

    #[napi]
    pub async fn connect(&self, config: TransportConnectConfig) -> Result<()> {
        self.connect_native(
            &config.agent_id,
            &config.api_key,
            &config.api_base_url,
            config.api_base_url_fallback.as_deref(),
        )
        .await
        .map(drop)
        .map_err(to_js)
    }

    #[napi]
    pub async fn disconnect(&self) -> Result<()> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
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
        let options = options.unwrap_or(PushOptions {
            conversation_id: None,
            reply_to: None,
        });
        let id = match &options.conversation_id {
            Some(conversation) => {
                client
                    .send_to_conversation(conversation, &content, options.reply_to.as_deref())
                    .await
            }
            None => client.send_direct(&to, &content).await,
        }
        .map_err(|e| Error::new(Status::GenericFailure, format!("push failed: {e}")))?;
        Ok(PushResult { message_id: id })
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
                None,
            )
            .await
            .map_err(|e| Error::new(Status::GenericFailure, format!("poll failed: {e}")))?;
        let page = Page::from_rows(rows, |row| message::from_rest_row(row, None));
        Ok(page.messages.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        self.client()?
            .ack(&message_ids)
            .await
            .map_err(|e| Error::new(Status::GenericFailure, format!("ack failed: {e}")))
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}
