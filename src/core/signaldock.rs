//! The SignalDock REST client: one place for auth headers, timeouts, encoded URLs, the
//! answer envelope, 401 retry with the other key, `Retry-After`, and base-URL failover.
//!
//! Every request carries `Authorization: Bearer <key>`, `X-Agent-Id` and
//! `Content-Type: application/json`. The key only ever goes in that header: never in a URL,
//! a log line or an error. Path segments (agent ids, conversation ids) are percent-encoded
//! one by one, so `a/b`, `..`, `?`, `#`, `%` and spaces stay inside their segment.
//!
//! Failover: with a fallback base URL, a request that cannot reach the active base
//! (network error or timeout) is retried once on the other, which becomes the active base
//! when it answers. [`SignalDock::choose_base`] probes `GET /health` on both at connect.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url, header};
use serde_json::{Value, json};

use super::backoff;
use super::credentials::{ApiKey, Credentials};
use super::error::{Error, Result};
use super::rows;

/// The request timeout WIRE.md gives the old client; ours too.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer body read; past it the answer is a decode error, not an allocation.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// One HTTP client (connection pool, TLS config) for the whole process: a thousand runtimes
/// share it instead of a thousand pools.
///
/// Redirects are not followed: a redirected API call would go to another host or port with
/// `X-Agent-Id` (reqwest drops `Authorization` there, so it would fail anyway, confusingly).
/// A 3xx is reported as the configuration error it is (see [`redirect_error`]).
pub fn shared_http_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            super::net::client(|builder| {
                builder
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_idle_timeout(Duration::from_secs(30))
            })
        })
        .clone()
}

/// Parses a base URL, refusing what could never work.
pub fn parse_base_url(text: &str) -> Result<Url> {
    let url = Url::parse(text.trim())
        .map_err(|e| Error::Config(format!("{text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(Error::Config(format!("{text:?} is not an http(s) URL")));
    }
    warn_if_cleartext(&url);
    Ok(url)
}

fn warn_if_cleartext(url: &Url) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => true,
    };
    if url.scheme() == "http" && !loopback && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            host = url.host_str().unwrap_or(""),
            "SignalDock base URL uses plain http to a non-loopback host: the API key travels unencrypted"
        );
    }
}

/// `base` with `segments` appended, each percent-encoded as one path segment.
///
/// A segment that is exactly `.` or `..` cannot be sent at all: URL normalisation (WHATWG,
/// which every HTTP stack follows) resolves it, even percent-encoded, and the request would
/// leave its segment. Such an id is refused rather than sent somewhere else.
pub fn endpoint(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Result<Url> {
    if let Some(bad) = segments.iter().find(|s| matches!(**s, "." | "..")) {
        return Err(Error::Config(format!(
            "{bad:?} cannot be used as an id in a URL path"
        )));
    }
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

/// A 3xx answer to an API call: a configuration error naming the status and where the server
/// wanted the request to go (its host and port only: a `Location` may carry anything else).
pub fn redirect_error(status: StatusCode, from: &Url, headers: &header::HeaderMap) -> Error {
    let target = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|location| from.join(location).ok())
        .and_then(|to| {
            let host = to.host_str()?.to_owned();
            Some(match to.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
        });
    let target = match target {
        Some(host) => format!("to {host}"),
        None => "without a usable Location".to_owned(),
    };
    Error::Config(format!(
        "the server answered {} with a redirect {target}; API requests do not follow redirects: \
         point apiBaseUrl at the server that answers",
        status.as_u16()
    ))
}

/// A SignalDock REST client for one agent.
pub struct SignalDock {
    http: reqwest::Client,
    credentials: Arc<Credentials>,
    bases: Vec<Url>,
    active: AtomicUsize,
    timeout: Duration,
    /// The server answered a peek with `since` by a 4xx: peeks go without it.
    since_refused: AtomicBool,
}

impl SignalDock {
    pub fn new(credentials: Arc<Credentials>, base: &str, fallback: Option<&str>) -> Result<Self> {
        let mut bases = vec![parse_base_url(base)?];
        if let Some(fallback) = fallback.filter(|f| !f.trim().is_empty()) {
            bases.push(parse_base_url(fallback)?);
        }
        Ok(Self {
            http: shared_http_client(),
            credentials,
            bases,
            active: AtomicUsize::new(0),
            timeout: REQUEST_TIMEOUT,
            since_refused: AtomicBool::new(false),
        })
    }

    /// Sets the per-request timeout (tests shorten it).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// The base URL requests go to now.
    pub fn active_base(&self) -> &Url {
        &self.bases[self.active.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// At connect: with a fallback, probe `/health` on both and prefer the primary when it
    /// is up, else the fallback when that is up.
    pub async fn choose_base(&self) {
        if self.bases.len() < 2 {
            return;
        }
        let (primary, fallback) =
            tokio::join!(self.healthy(&self.bases[0]), self.healthy(&self.bases[1]));
        let choice = if !primary && fallback { 1 } else { 0 };
        self.active.store(choice, Ordering::Relaxed);
        tracing::debug!(primary, fallback, base = %self.bases[choice], "chose SignalDock base URL");
    }

    async fn healthy(&self, base: &Url) -> bool {
        let Ok(url) = endpoint(base, &["health"], &[]) else {
            return false;
        };
        matches!(
            self.http.get(url).timeout(Duration::from_secs(5)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Sends one request and returns the answer's `data` (or the whole body when the server
    /// does not wrap it). Non-2xx is [`Error::Status`].
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let active = self.active.load(Ordering::Relaxed) % self.bases.len();
        match self
            .call_on(active, method.clone(), segments, query, body)
            .await
        {
            Err(err) if err.is_unreachable() && self.bases.len() > 1 => {
                let other = (active + 1) % self.bases.len();
                tracing::warn!(error = %err, base = %self.bases[other], "SignalDock unreachable, trying the fallback base URL");
                let answer = self.call_on(other, method, segments, query, body).await;
                if !matches!(&answer, Err(e) if e.is_unreachable()) {
                    self.active.store(other, Ordering::Relaxed);
                }
                answer
            }
            answer => answer,
        }
    }

    async fn call_on(
        &self,
        base: usize,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = endpoint(&self.bases[base], segments, query)?;
        let key = self.credentials.current();
        let answer = self.send(method.clone(), url.clone(), &key, body).await;
        match answer {
            Err(Error::Status { status: 401, .. }) => match self.credentials.alternate(&key) {
                Some(other) => {
                    tracing::debug!(
                        path = url.path(),
                        "401 during key overlap, retrying with the other key"
                    );
                    self.send(method, url, &other, body).await
                }
                None => answer,
            },
            _ => answer,
        }
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        key: &ApiKey,
        body: Option<&Value>,
    ) -> Result<Value> {
        let path = url.path().to_owned();
        let mut request = self
            .http
            .request(method.clone(), url)
            .timeout(self.timeout)
            .header(header::AUTHORIZATION, format!("Bearer {}", key.expose()))
            .header("X-Agent-Id", self.credentials.agent_id())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let started = tokio::time::Instant::now();
        let result = async {
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            let status = response.status();
            let retry_after_header = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| backoff::retry_after(v, MAX_RETRY_AFTER));
            if status.is_redirection() {
                let error = redirect_error(status, response.url(), response.headers());
                return Err(match error {
                    Error::Config(why) => Error::Config(self.credentials.scrub(&why)),
                    other => other,
                });
            }
            let bytes = read_capped(response).await.map_err(|e| match e {
                Error::Network(why) => Error::Network(self.credentials.scrub(&why)),
                other => other,
            })?;
            if !status.is_success() {
                return Err(Error::Status {
                    status: status.as_u16(),
                    // The real server puts the wait in the body (`retry_after_ms`) and may
                    // send no header: honour whichever is there.
                    retry_after: retry_after_header.or_else(|| retry_after_in_body(&bytes)),
                    // A server may quote the key back ("key … is expired"): never pass it on.
                    // Scrubbed before the quote is cut to length too, or a key cut in two
                    // at the cut would no longer be recognised.
                    message: self.credentials.scrub(&error_message(
                        status,
                        self.credentials
                            .scrub(&String::from_utf8_lossy(&bytes))
                            .as_bytes(),
                    )),
                });
            }
            self.credentials.note_accepted(key);
            parse_envelope(&bytes)
        }
        .await;
        tracing::trace!(%method, path, elapsed_ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "SignalDock request");
        result
    }

    fn transport_error(&self, err: &reqwest::Error) -> Error {
        super::net::note_failure(err);
        if err.is_timeout() {
            return Error::Timeout;
        }
        // reqwest's messages name the URL (never a header); scrub anyway, on principle.
        let mut why = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            why.push_str(": ");
            why.push_str(&cause.to_string());
            source = cause.source();
        }
        Error::Network(self.credentials.scrub(&why))
    }

    // ----- the calls of WIRE.md -----

    /// `GET /messages/peek`: this agent's pending messages, oldest first, non-destructive.
    ///
    /// The inbox is the one `X-Agent-Id` names. Never `mentioned=`: on the real server that
    /// is an @-mention content filter, and it hides every DM that does not @-mention us.
    /// `since` is only a hint: a server that refuses it (4xx) is asked again without it, and
    /// not asked with it again, so a track never stalls on it.
    pub async fn peek(&self, limit: u32, since: Option<&str>) -> Result<Vec<Value>> {
        let since = since.filter(|_| !self.since_refused.load(Ordering::Relaxed));
        match self.peek_once(limit, since).await {
            Err(Error::Status { status, .. }) if since.is_some() && refuses_a_hint(status) => {
                tracing::info!(
                    status,
                    "the server refuses `since` on a peek: peeking without it from now on"
                );
                self.since_refused.store(true, Ordering::Relaxed);
                self.peek_once(limit, None).await
            }
            answer => answer,
        }
    }

    async fn peek_once(&self, limit: u32, since: Option<&str>) -> Result<Vec<Value>> {
        let limit = limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(since) = since {
            query.push(("since", since));
        }
        let data = self
            .call(Method::GET, &["messages", "peek"], &query, None)
            .await?;
        messages_of(data)
    }

    /// `POST /messages/ack`.
    pub async fn ack(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let body = json!({ "messageIds": ids });
        self.call(Method::POST, &["messages", "ack"], &[], Some(&body))
            .await
            .map(drop)
    }

    /// `POST /messages`: a direct message; returns its id.
    pub async fn send_direct(&self, to: &str, content: &str) -> Result<String> {
        let body = json!({ "toAgentId": to, "content": content });
        let data = self
            .call(Method::POST, &["messages"], &[], Some(&body))
            .await?;
        message_id_of(&data)
    }

    /// `POST /conversations/{id}/messages`; returns the new message's id.
    pub async fn send_to_conversation(
        &self,
        conversation: &str,
        content: &str,
        reply_to: Option<&str>,
    ) -> Result<String> {
        let mut body = json!({ "content": content });
        if let Some(reply_to) = reply_to {
            body["replyTo"] = json!(reply_to);
        }
        let data = self
            .call(
                Method::POST,
                &["conversations", conversation, "messages"],
                &[],
                Some(&body),
            )
            .await?;
        message_id_of(&data)
    }

    /// `GET /conversations/{id}/messages?sort=desc&limit=N`: newest first.
    pub async fn conversation_messages(
        &self,
        conversation: &str,
        limit: u32,
    ) -> Result<Vec<Value>> {
        let limit = limit.to_string();
        let query = [("sort", "desc"), ("limit", limit.as_str())];
        let data = self
            .call(
                Method::GET,
                &["conversations", conversation, "messages"],
                &query,
                None,
            )
            .await?;
        messages_of(data)
    }

    /// `POST /agents/{id}/heartbeat` with `{"status":"online"}`.
    pub async fn heartbeat(&self) -> Result<()> {
        let body = json!({ "status": "online" });
        let agent = self.credentials.agent_id().to_owned();
        self.call(
            Method::POST,
            &["agents", &agent, "heartbeat"],
            &[],
            Some(&body),
        )
        .await
        .map(drop)
    }
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Error::TooLarge {
                        limit: MAX_BODY_BYTES,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err(Error::Timeout),
            Err(e) => return Err(Error::Network(e.to_string())),
        }
    }
}

/// The `data` of `{ success, data }`, or the body itself from a server that does not wrap.
///
/// An answer that is not valid JSON as a whole but carries a complete message list is read
/// row by row ([`rows::salvage_rows`]): one broken row must not hide the others.
fn parse_envelope(bytes: &[u8]) -> Result<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    let mut value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(e) => {
            return match rows::salvage_rows(bytes) {
                Some(rows) => {
                    tracing::debug!(error = %e, "answer is not valid JSON as a whole; read its rows one by one");
                    Ok(json!({ "messages": rows }))
                }
                None => Err(Error::Decode(format!("malformed JSON: {e}"))),
            };
        }
    };
    if value.get("success").is_some()
        && let Some(data) = value.get_mut("data")
    {
        return Ok(data.take());
    }
    Ok(value)
}

fn error_message(status: StatusCode, bytes: &[u8]) -> String {
    let from_body = serde_json::from_slice::<Value>(bytes).ok().and_then(|v| {
        let e = v.get("error")?;
        e.get("message")
            .or(Some(e))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let text = from_body.unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_owned());
    text.chars().take(200).collect()
}

/// A 4xx that refuses what was asked rather than who asked or how often: the request
/// may succeed without an optional parameter.
fn refuses_a_hint(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 408 | 429)
}

/// The wait of the structured error envelope (signaldock-protocol `error.rs`):
/// `{"success":false,"error":{…,"retry_after_ms":N}}`, capped like the header.
fn retry_after_in_body(bytes: &[u8]) -> Option<Duration> {
    let body: Value = serde_json::from_slice(bytes).ok()?;
    let ms = body.get("error")?.get("retry_after_ms")?;
    let ms = ms.as_u64().or_else(|| {
        ms.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

fn messages_of(data: Value) -> Result<Vec<Value>> {
    match data {
        Value::Object(mut obj) => match obj.remove("messages") {
            Some(Value::Array(rows)) => Ok(rows),
            Some(Value::Null) | None => Ok(Vec::new()),
            Some(_) => Err(Error::Decode("`messages` is not an array".into())),
        },
        Value::Array(rows) => Ok(rows),
        Value::Null => Ok(Vec::new()),
        _ => Err(Error::Decode("answer is not an object".into())),
    }
}

/// `{ message: { id } }`, or `{ id }` from older servers.
fn message_id_of(data: &Value) -> Result<String> {
    let id = data
        .get("message")
        .and_then(|m| m.get("id"))
        .or_else(|| data.get("id"));
    match id {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(Error::Decode("answer carries no message id".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_stay_inside_their_segment() {
        let base = parse_base_url("http://127.0.0.1:1/api/").unwrap();
        for (id, path) in [
            ("plain", "/api/conversations/plain/messages"),
            ("a/b", "/api/conversations/a%2Fb/messages"),
            ("a..b", "/api/conversations/a..b/messages"),
            ("...", "/api/conversations/.../messages"),
            ("q?x=1#f", "/api/conversations/q%3Fx=1%23f/messages"),
            ("100%", "/api/conversations/100%25/messages"),
            ("a b", "/api/conversations/a%20b/messages"),
            ("zoë", "/api/conversations/zo%C3%AB/messages"),
        ] {
            let url = endpoint(&base, &["conversations", id, "messages"], &[]).unwrap();
            assert_eq!(url.path(), path, "{id}");
            assert_eq!(url.query(), None);
        }
        let url = endpoint(
            &base,
            &["messages", "peek"],
            &[("since", "a&b=c"), ("limit", "50")],
        )
        .unwrap();
        assert_eq!(url.query(), Some("since=a%26b%3Dc&limit=50"));
        for dots in [".", ".."] {
            assert!(matches!(
                endpoint(&base, &["conversations", dots], &[]),
                Err(Error::Config(_))
            ));
        }
    }

    #[test]
    fn the_wait_of_a_rate_limit_comes_from_the_body_too() {
        let envelope = |extra: &str| {
            format!(
                r#"{{"success":false,"error":{{"code":"E_RATE_LIMITED","message":"slow down","category":"rate_limit","retryable":true{extra}}}}}"#
            )
        };
        for (body, want) in [
            (envelope(r#","retry_after_ms":1500"#), Some(1500)),
            (envelope(r#","retry_after_ms":60000"#), Some(60_000)),
            (envelope(r#","retry_after_ms":2.5"#), Some(2)),
            (envelope(r#","retry_after_ms":999999999"#), Some(300_000)),
            (envelope(""), None),
            (envelope(r#","retry_after_ms":"soon""#), None),
            (envelope(r#","retry_after_ms":-5"#), None),
            ("<html>".to_owned(), None),
        ] {
            assert_eq!(
                retry_after_in_body(body.as_bytes()),
                want.map(Duration::from_millis),
                "{body}"
            );
        }
        assert_eq!(
            error_message(
                StatusCode::TOO_MANY_REQUESTS,
                envelope(r#","retry_after_ms":1500"#).as_bytes()
            ),
            "slow down"
        );
    }

    #[test]
    fn which_refusals_a_peek_without_since_may_cure() {
        for status in [400, 404, 405, 409, 422] {
            assert!(refuses_a_hint(status), "{status}");
        }
        for status in [200, 401, 403, 408, 429, 500, 503] {
            assert!(!refuses_a_hint(status), "{status}");
        }
    }

    #[test]
    fn base_urls_are_checked() {
        assert!(parse_base_url("https://api.signaldock.io").is_ok());
        for bad in ["", "local", "ftp://x", "http://", "not a url"] {
            assert!(
                matches!(parse_base_url(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn envelope_and_shapes() {
        assert_eq!(
            parse_envelope(br#"{"success":true,"data":{"a":1}}"#).unwrap()["a"],
            1
        );
        assert_eq!(parse_envelope(br#"{"a":2}"#).unwrap()["a"], 2);
        assert_eq!(parse_envelope(b"  ").unwrap(), Value::Null);
        assert!(matches!(parse_envelope(b"{nope"), Err(Error::Decode(_))));
        // One row the parser refuses (a lone surrogate) does not take the others down.
        let rows = messages_of(
            parse_envelope(br#"{"success":true,"data":{"messages":[{"id":"a","content":"x\ud800"},{"id":"b"}]}}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rows[0]["content"], "x\u{FFFD}");
        assert_eq!(rows[1]["id"], "b");
        assert_eq!(messages_of(json!({"messages": [1, 2]})).unwrap().len(), 2);
        assert!(messages_of(json!({"messages": 3})).is_err());
        assert_eq!(
            message_id_of(&json!({"message": {"id": "m1"}})).unwrap(),
            "m1"
        );
        assert_eq!(message_id_of(&json!({"id": 7})).unwrap(), "7");
        assert!(message_id_of(&json!({})).is_err());
        assert_eq!(
            error_message(
                StatusCode::UNAUTHORIZED,
                br#"{"success":false,"error":{"message":"unauthorized"}}"#
            ),
            "unauthorized"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"<html>"),
            "Bad Gateway"
        );
    }
}
