//! The Node-API boundary: one file per exported class, thin over [`crate::core`].
//!
//! - [`js`]: every mechanic of calling JS (the job queue, keep-alive, function references,
//!   `T | Promise<T>`, subscriptions, lenient values); with [`config`], the only `unsafe`.
//! - [`lifetime`]: a started service is a GC root until `stop()`, and stops with its
//!   environment.
//! - [`config`]: reading config objects with `TypeError`s that name the field.
//! - [`adapters`]: JS handler, transport and registry objects as core traits.
//! - [`service`]: the one start/stop/GC-root shape of the exported service classes.
//! - [`poller`], [`heartbeat`], [`key_rotation`]: the exported service classes.
//! - [`runtime`]: `createRuntime`: the JS config into [`crate::core::runtime`], the started
//!   runtime wrapped as its handle.
//! - [`error`]: core errors as JS `Error`s, in one place.
//! - [`transports`]: the native HTTP, SSE and local transports as JS classes, one file each,
//!   with the REST glue the first two share.
//! - [`sse_connection`]: the `SseConnectionService` class.
//! - [`logger`]: `setLogger` and `RuntimeConfig.logger`, log records into a JS logger.

mod adapters;
mod config;
mod error;
mod heartbeat;
mod js;
mod key_rotation;
mod lifetime;
mod logger;
mod poller;
mod runtime;
mod service;
mod sse_connection;
mod transports;

use napi_derive::module_init;

#[module_init]
fn init() {
    crate::logging::init();
}

/// Runs `f` inside napi's tokio runtime, so it may spawn tasks.
pub(crate) fn runtime_context<T>(f: impl FnOnce() -> T) -> T {
    napi::bindgen_prelude::within_runtime_if_available(f)
}
