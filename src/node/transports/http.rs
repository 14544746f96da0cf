//! `HttpTransport`: SignalDock over plain HTTP (`push`, `poll` as a peek, `ack`), with failover
//! to `apiBaseUrlFallback`. Inside a runtime it keeps the runtime's credential store, so a
//! rotated key reaches it on its next request, also after the caller connected it again.

use std::sync::{Arc, Mutex};

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::{PollOptions, PushOptions, PushResult, read_connect_config, rest};
use crate::core::credentials::Credentials;
use crate::core::message;
use crate::core::signaldock::SignalDock;
use crate::core::sync::lock;
use crate::core::transport::Page;
use crate::node::adapters::JsMessage;

/// The connected client, shared with the runtime that owns the transport so its `stop()`
/// can disconnect it.
pub type ClientSlot = Arc<Mutex<Option<Arc<SignalDock>>>>;

/// SignalDock over plain HTTP: `push`, `poll` (peek), `ack`, with failover to
/// `apiBaseUrlFallback`.
#[napi(js_name = "HttpTransport")]
pub struct HttpTransport {
    client: ClientSlot,
    /// Set when a runtime owns this transport: `connect()` then keeps its credentials.
    shared_credentials: Option<Arc<Credentials>>,
}

impl HttpTransport {
    /// The runtime's transport over its one REST client, in the runtime's slot, which the
    /// runtime empties at `stop()`. A `connect()` from JS then keeps the runtime's credential
    /// store (`credentials`), so a rotated key reaches it.
    pub fn from_slot(client: ClientSlot, credentials: Arc<Credentials>) -> Self {
        Self {
            client,
            shared_credentials: Some(credentials),
        }
    }

    fn client(&self) -> Result<Arc<SignalDock>> {
        lock(&self.client).clone().ok_or_else(|| {
            Error::new(
                Status::GenericFailure,
                "HttpTransport is not connected: call connect() first".to_owned(),
            )
        })
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
        let client = read_connect_config(env, "HttpTransport.connect", config, true)
            .and_then(|config| rest::connect_client(self.shared_credentials.as_ref(), &config));
        let client = match client {
            Ok(client) => client,
            Err(e) => return crate::node::js::rejected(env, e),
        };
        let slot = self.client.clone();
        env.spawn_future(async move {
            client.choose_base().await;
            *lock(&slot) = Some(client);
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
        rest::push(&client, &to, &content, options).await
    }

    #[napi]
    pub async fn poll(&self, options: Option<PollOptions>) -> Result<Vec<JsMessage>> {
        let client = self.client()?;
        let rows = client
            .peek(
                PollOptions::limit_or(&options, 50),
                PollOptions::since(&options).as_deref(),
            )
            .await
            .map_err(|e| rest::rest_error(&client, "poll", e))?;
        let page = Page::from_rows(rows, |row| message::from_rest_row(row, None));
        Ok(page.messages.into_iter().map(JsMessage::from).collect())
    }

    #[napi]
    pub async fn ack(&self, message_ids: Vec<String>) -> Result<()> {
        let client = self.client()?;
        rest::ack(&client, &message_ids).await
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}
