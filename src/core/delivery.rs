//! Handing messages to the user's handler.
//!
//! The handler lives on the JavaScript thread; the core only sees this trait. A batch is
//! delivered in order: a handler that returns a promise is awaited before the next message
//! is handed over, and every message reports when it has settled (handled or failed), so
//! the poller can ack exactly what was handled even if it is stopped half-way.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::message::ConduitMessage;

/// How one handler call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Handled,
    /// The handler threw or its promise rejected; the text is the reason.
    Failed(String),
}

/// Called once per message as it settles.
pub type Settled = Arc<dyn Fn(&str, Outcome) + Send + Sync>;

pub trait Handler: Send + Sync {
    /// Delivers `batch` in order and resolves when every message has settled. After
    /// `stop` is cancelled, no further message may reach the handler.
    fn deliver(
        &self,
        batch: Vec<ConduitMessage>,
        settled: Settled,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}
