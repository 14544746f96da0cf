//! What services need from the things that carry messages, as object-safe traits.
//!
//! A JavaScript transport object, a native transport and a test fake all implement these,
//! so the poller neither knows nor cares which it is talking to.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::error::Result;
use super::message::{ConduitMessage, MapError};
use super::signaldock::SignalDock;

/// One page of direct messages and the rows that could not be mapped.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<ConduitMessage>,
    /// Rows that could not be mapped. A source that can say which they were lists them in
    /// `rejected` too, so each is counted once and, when it has an id, acked.
    pub malformed: usize,
    /// Rows the source returned, mapped or not: a full page means more may be waiting.
    pub rows: usize,
    pub rejected: Vec<Rejected>,
}

/// A row that could not become a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Its id, when it has a usable one: it is acked (skipped for good) under it.
    pub id: Option<String>,
    /// What it is remembered by, so it is counted (and logged) once: its id, else a hash of
    /// the row.
    pub key: String,
    /// Why it could not be mapped.
    pub why: String,
}

impl Rejected {
    pub fn of(row: &Value, why: &MapError) -> Self {
        let id = super::message::usable_id(row);
        let key = id.clone().unwrap_or_else(|| {
            let mut hasher = DefaultHasher::new();
            row.to_string().hash(&mut hasher);
            format!("\u{1}row:{:016x}", hasher.finish())
        });
        Self {
            id,
            key,
            why: why.to_string(),
        }
    }
}

impl Page {
    /// Maps raw rows with `map`, keeping the good ones and listing the rest.
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
                    // Logged (once) by whoever counts it: a row the server offers again and
                    // again would otherwise be a warning every poll.
                    tracing::debug!(error = %why, "a message that cannot be mapped");
                    page.malformed += 1;
                    page.rejected.push(Rejected::of(row, &why));
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

/// Direct messages by `GET /messages/peek` (the inbox `X-Agent-Id` names), acked by
/// `POST /messages/ack`.
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
            let rows = self.client.peek(limit, since.as_deref()).await?;
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
