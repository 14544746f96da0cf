//! What services need from the things that carry messages, as object-safe traits.
//!
//! A JavaScript transport object, a native transport and a test fake all implement these,
//! so the poller neither knows nor cares which it is talking to.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::error::Result;
use super::message::{ConduitMessage, MapError};
use super::signaldock::SignalDock;

/// One page of direct messages and how many rows could not be mapped.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<ConduitMessage>,
    pub malformed: usize,
    /// Rows the source returned, mapped or not: a full page means more may be waiting.
    pub rows: usize,
}

impl Page {
    /// Maps raw rows with `map`, keeping the good ones and counting the rest.
    pub fn from_rows(
        rows: Vec<Value>,
        map: impl Fn(&Value) -> Result<ConduitMessage, MapError>,
    ) -> Self {
        let mut page = Page {
            rows: rows.len(),
            ..Page::default()
        };
        for row in &rows {
            match map(row) {
                Ok(message) => page.messages.push(message),
                Err(why) => {
                    tracing::warn!(error = %why, "skipping a message that cannot be mapped");
                    page.malformed += 1;
                }
            }
        }
        page
    }
}

/// Where a poller's direct messages come from: `transport.poll()` / `ack()`, or the
/// SignalDock peek when no transport is given.
pub trait DirectSource: Send + Sync {
    /// Pending messages, oldest first. `since` is a high-water mark, passed only when the
    /// previous page was full of messages already seen.
    fn poll(&self, limit: u32, since: Option<String>) -> BoxFuture<'_, Result<Page>>;
    /// Marks messages handled, so they are not offered again.
    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>>;
    /// A short name for logs.
    fn name(&self) -> String;
}

/// Where a poller reads group conversations: recent rows, newest first.
pub trait GroupFeed: Send + Sync {
    fn recent(&self, conversation: &str, limit: u32) -> BoxFuture<'_, Result<Vec<Value>>>;
}

/// Direct messages by `GET /messages/peek?mentioned={agentId}`, acked by `POST /messages/ack`.
pub struct PeekSource {
    client: Arc<SignalDock>,
}

impl PeekSource {
    pub fn new(client: Arc<SignalDock>) -> Self {
        Self { client }
    }
}

impl DirectSource for PeekSource {
    fn poll(&self, limit: u32, since: Option<String>) -> BoxFuture<'_, Result<Page>> {
        Box::pin(async move {
            let agent = self.client.credentials().agent_id().to_owned();
            let rows = self
                .client
                .peek(limit, since.as_deref(), Some(&agent))
                .await?;
            Ok(Page::from_rows(rows, |row| {
                super::message::from_rest_row(row, None)
            }))
        })
    }

    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.client.ack(&ids).await })
    }

    fn name(&self) -> String {
        "signaldock-peek".into()
    }
}

impl GroupFeed for SignalDock {
    fn recent(&self, conversation: &str, limit: u32) -> BoxFuture<'_, Result<Vec<Value>>> {
        let conversation = conversation.to_owned();
        Box::pin(async move { self.conversation_messages(&conversation, limit).await })
    }
}
