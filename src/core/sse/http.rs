//! The HTTP side of a stream: eventsource-client's transport trait over the process-wide
//! reqwest client, with every body watched by a [`FrameGuard`].
//!
//! Why not the crate's own hyper transport (its `hyper-rustls-*` features): it builds its
//! rustls configs from the process-default crypto provider, which does not exist once two
//! providers are linked (reqwest brings aws-lc-rs, hyper-rustls ring), so it panicked on first
//! use. reqwest names its provider, and the stream then gets the REST client's TLS roots,
//! proxy settings and user agent ([`crate::core::net::client`]). Its own client, though: the REST one follows redirects, and
//! a stream must not (the key would go wherever `Location` points).
//!
//! The transport is the one place that sees the request as it leaves, so it also marks the
//! `Authorization` header sensitive: whatever prints the request later prints no key.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use launchdarkly_sdk_transport::{
    ByteStream, HttpTransport, Request, Response, ResponseFuture, TransportError,
};
use sync_wrapper::{SyncFuture, SyncStream};

use super::guard::{FieldFilter, FrameGuard};
use crate::core::signaldock::REQUEST_TIMEOUT;

/// The HTTP client of every stream in the process. No overall timeout (a stream lasts);
/// the idle watchdog bounds silence, TCP keep-alive notices a peer that vanished.
pub fn stream_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            crate::core::net::client(|builder| {
                builder
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(REQUEST_TIMEOUT)
                    .tcp_keepalive(Duration::from_secs(30))
            })
        })
        .clone()
}

/// What the guard saw on one connection, read by the loop once the connection is over.
#[derive(Debug)]
pub struct Probe {
    retry_ms: AtomicU64,
    overflowed: AtomicBool,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            retry_ms: AtomicU64::new(u64::MAX),
            overflowed: AtomicBool::new(false),
        }
    }
}

impl Probe {
    /// The last `retry:` the server sent on this connection.
    pub fn retry_ms(&self) -> Option<u64> {
        Some(self.retry_ms.load(Ordering::Relaxed)).filter(|ms| *ms != u64::MAX)
    }

    /// The connection was dropped for an event over the size limit.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// A transport for one connection attempt.
#[derive(Clone)]
pub struct Guarded {
    pub http: reqwest::Client,
    pub probe: Arc<Probe>,
    pub limit: usize,
}

impl HttpTransport for Guarded {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        let (parts, body) = request.into_parts();
        let request =
            reqwest::Request::try_from(Request::from_parts(parts, body.unwrap_or_default()));
        let (http, probe, limit) = (self.http.clone(), self.probe.clone(), self.limit);
        // reqwest's futures are Send but not Sync, which the trait asks for; they are only
        // ever polled through `Pin<&mut>`, which is what the wrappers rely on.
        Box::pin(SyncFuture::new(async move {
            let mut request = request.map_err(TransportError::new)?;
            if let Some(auth) = request.headers_mut().get_mut("authorization") {
                auth.set_sensitive(true);
            }
            let response = http.execute(request).await.map_err(|e| {
                crate::core::net::note_failure(&e);
                TransportError::new(e)
            })?;
            let mut head = Response::builder()
                .status(response.status())
                .version(response.version());
            if let Some(headers) = head.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = guard(body_of(response), probe, limit);
            head.body(body).map_err(TransportError::new)
        }))
    }
}

fn body_of(response: reqwest::Response) -> ByteStream {
    let chunks = futures_util::stream::unfold(Some(response), |response| async move {
        let mut response = response?;
        match response.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(response))),
            Ok(None) => None,
            // One error ends the body; the connection goes with the response.
            Err(e) => Some((Err(TransportError::new(e)), None)),
        }
    });
    Box::pin(SyncStream::new(chunks))
}

fn guard(body: ByteStream, probe: Arc<Probe>, limit: usize) -> ByteStream {
    let mut guard = FrameGuard::new(limit);
    let mut fields = FieldFilter::default();
    let mut kept = Vec::new();
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        let fed = guard.feed(&chunk);
        if let Some(ms) = guard.take_retry() {
            probe
                .retry_ms
                .store(ms.min(u64::MAX - 1), Ordering::Relaxed);
        }
        if let Err(overflow) = fed {
            probe.overflowed.store(true, Ordering::Relaxed);
            return Err(TransportError::new(overflow));
        }
        kept.clear();
        fields.filter(&chunk, &mut kept);
        // The usual chunk has no unknown field and no line cut at its field name: handed on
        // as it came, without a copy.
        if kept[..] == chunk[..] {
            Ok(chunk)
        } else {
            Ok(Bytes::copy_from_slice(&kept))
        }
    }))
}
