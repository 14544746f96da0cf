//! The REST glue `HttpTransport` and `SseTransport` share: the client a `connect()` makes, and
//! `push`/`ack` over SignalDock REST with errors scrubbed of the agent's keys.

use std::sync::Arc;

use napi::bindgen_prelude::*;

use super::{PushOptions, PushResult, TransportConnectConfig, to_js};
use crate::core::credentials::{ApiKey, Credentials};
use crate::core::signaldock::SignalDock;

/// The REST client for a `connect(config)`. A transport a runtime owns keeps the runtime's
/// credential store (`shared`), so a rotated key reaches it even after the caller connected
/// it again with the key it was handed; a transport of its own uses the config's key.
pub fn connect_client(
    shared: Option<&Arc<Credentials>>,
    config: &TransportConnectConfig,
) -> Result<Arc<SignalDock>> {
    let credentials = match shared {
        Some(shared) => shared.clone(),
        None => Credentials::new(&config.agent_id, ApiKey::new(config.api_key.as_str())),
    };
    SignalDock::new(
        credentials,
        &config.api_base_url,
        config.api_base_url_fallback.as_deref(),
    )
    .map(Arc::new)
    .map_err(to_js)
}

/// A failed REST call as a JS error: `"{what} failed: {err}"`, scrubbed of the agent's keys,
/// since the error may quote the server's answer and a server may echo the key back.
pub fn rest_error(client: &SignalDock, what: &str, err: crate::core::error::Error) -> Error {
    crate::node::error::scrubbed(&err.context(format!("{what} failed")), client.credentials())
}

/// `push(to, content, options)` over REST: a direct message, or into a conversation.
pub async fn push(
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

/// `ack(ids)` over REST.
pub async fn ack(client: &SignalDock, message_ids: &[String]) -> Result<()> {
    client
        .ack(message_ids)
        .await
        .map_err(|e| rest_error(client, "ack", e))
}
