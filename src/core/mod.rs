//! The runtime's core: services, transports and the pure logic they share. No Node-API here.
//!
//! - [`message`], [`mention`], [`dedup`], [`backoff`], [`clock`]: pure functions and small
//!   data structures, each with table-driven tests.
//! - [`credentials`]: the agent's identity and API key(s), shared by every service of a
//!   runtime so that a rotated key reaches all of them at once.
//! - [`signaldock`]: the REST client (auth headers, timeouts, 401 retry with the other key,
//!   `Retry-After`, base-URL failover, encoded path segments).
//! - [`net`]: what every HTTP client shares: TLS trust (system roots, `NODE_EXTRA_CA_CERTS`,
//!   `NODE_TLS_REJECT_UNAUTHORIZED`), proxies, and TLS failures named in the log.
//! - [`local`]: the local SignalDock transport (`signaldock.db`, shared with other
//!   processes), with a commit watcher for realtime delivery.
//! - [`rows`]: salvaging the rows of a message list whose answer is not valid JSON as a whole.
//! - [`transport`]: the traits a service needs from a message source or sink, so a JS
//!   object, a native transport and a test fake are interchangeable.
//! - One module per service: [`poller`] (with its final acks), [`heartbeat`],
//!   [`key_rotation`], [`sse`].
//! - [`journal`]: the per-agent SQLite journal that makes delivery survive a stop, a crash
//!   and a restart (unhandled messages, dedup state, group read positions).
//! - [`runtime`]: the composition root: which transport and services a credential and a
//!   config make (a pure plan), started around one credential store and one REST client,
//!   with the bridges between them, and stopped in order.
//! - [`sync`]: locking that survives a panic elsewhere.
//! - [`task`]: a running loop's cancellation token and join handle.

pub mod backoff;
pub mod clock;
pub mod credentials;
pub mod dedup;
pub mod delivery;
pub mod error;
pub mod heartbeat;
pub mod journal;
pub mod key_rotation;
pub mod local;
pub mod mention;
pub mod message;
pub mod net;
pub mod poller;
pub mod rows;
pub mod runtime;
pub mod signaldock;
pub mod sse;
pub mod sync;
pub mod task;
pub mod transport;
