//! The native transports as JS classes implementing the contract's `Transport` interface, one
//! file each: [`http`] (`HttpTransport`), [`sse`] (`SseTransport`), [`local`]
//! (`LocalTransport`); [`rest`] is the REST glue the first two share.
//!
//! Here: what all three take and give (`connect()`'s config, `push`/`poll` options and
//! results), read with `TypeError`s that name the field.

mod http;
mod local;
mod rest;
mod sse;

use napi::Env;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::config::Fields;

pub use self::http::HttpTransport;
pub use self::local::LocalTransport;
pub use self::sse::SseTransport;

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

impl PollOptions {
    /// The page size asked for (default 50), within 1..=1000.
    fn limit_or(options: &Option<Self>, default: u32) -> u32 {
        options
            .as_ref()
            .and_then(|o| o.limit)
            .unwrap_or(default)
            .clamp(1, 1000)
    }

    fn since(options: &Option<Self>) -> Option<String> {
        options.as_ref().and_then(|o| o.since.clone())
    }
}

/// Reads a `connect()` config with `TypeError`s naming the field (a napi conversion would
/// throw a plain `Error` with napi's own wording).
///
/// `rest`: the transport talks to SignalDock over HTTP, so `apiKey` is required and
/// `apiBaseUrl` must be an http(s) URL; the local transport needs only `agentId`.
fn read_connect_config(
    env: &Env,
    owner: &'static str,
    value: Unknown<'_>,
    rest: bool,
) -> Result<TransportConnectConfig> {
    let fields = Fields::new(env, owner, Some(value), false)?;
    let agent_id = fields.required_agent_id("agentId")?;
    let (api_key, api_base_url) = match rest {
        true => (
            fields.required_string("apiKey")?,
            fields.url("apiBaseUrl", true)?.unwrap_or_default(),
        ),
        false => (
            fields.any_string("apiKey")?.unwrap_or_default(),
            fields.any_string("apiBaseUrl")?.unwrap_or_default(),
        ),
    };
    let poll_interval_ms = fields
        .positive_ms("pollIntervalMs")?
        .map(|d| d.as_secs_f64() * 1000.0);
    Ok(TransportConnectConfig {
        agent_id,
        api_key,
        api_base_url,
        poll_interval_ms,
        sse_endpoint: fields.url("sseEndpoint", false)?,
        ws_url: fields.string("wsUrl")?,
        poll_endpoint: fields.string("pollEndpoint")?,
        api_base_url_fallback: fields.url("apiBaseUrlFallback", false)?,
    })
}

/// A core error as a JS error, its text kept.
fn to_js(err: crate::core::error::Error) -> Error {
    super::error::to_js(&err)
}
