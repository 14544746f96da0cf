//! Native daemon layer for resident CLEO agents.
//!
//! The crate is two layers with a hard line between them:
//!
//! # Layout
//!
//! - [`core`]: pure Rust, no Node-API. The services (poller, heartbeat, key rotation, SSE),
//!   the transports (HTTP, SSE, local SQLite), and the pure pieces they share (message
//!   mapping, mention matching, dedup window, backoff, credentials), and the composition root
//!   that wires them into a runtime (`core::runtime`). Every loop takes its dependencies as
//!   traits and a cancellation token, so `cargo test` drives it with fakes and tokio's
//!   paused clock.
//! - `node` (feature `node`): the `#[napi]` boundary. One file per exported class; each
//!   converts JS config into core config (with `TypeError`s naming the field), adapts JS
//!   objects (handlers, transports, registries) to core traits through threadsafe
//!   functions, and owns what keeps the Node process alive while a service runs.
//!
//! Logging goes through `tracing`; [`logging`] routes each record to a runtime's logger, the
//! process's, or stderr.

pub mod core;
pub mod logging;

#[cfg(feature = "node")]
mod node;
