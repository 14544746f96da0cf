//! The agent's identity and API key, shared by every service of one runtime.
//!
//! When the key rotates, every holder of the `Arc<Credentials>` sees the new key on its next
//! request. The previous key stays usable for an overlap window, only as the second try of a
//! request the server refused with 401 (the server may not have switched yet, or may have
//! already): after the window the old key is forgotten and never sent again. Subscribers
//! (the SSE stream) are told about a rotation so they can reconnect with the new key.
//!
//! Keys are wrapped in [`ApiKey`], which never prints itself: `Debug` and `Display` are
//! redacted, and [`Credentials::scrub`] removes known keys from any text that will become a
//! log line or an error message — as they are, and in the base64 forms a server may quote
//! back (of the key, and of the whole `Bearer <key>` header value).
//!
//! An agent id travels in the `X-Agent-Id` header, so it must be something a header can
//! carry: [`usable_agent_id`].

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a redacted key prints as.
pub const REDACTED: &str = "[redacted]";

/// What an agent id must be, for error messages (which never quote the id itself).
pub const AGENT_ID_RULE: &str = "a string an HTTP header can carry (no newline, carriage return, NUL or other control character)";

/// True when `id` can go in the `X-Agent-Id` header: no control character but tab (the bytes
/// an HTTP stack refuses in a header value; a newline would also split the header).
pub fn usable_agent_id(id: &str) -> bool {
    !id.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// True when `id` can be one segment of a URL path (`/agents/{id}/heartbeat`): `.` and `..`
/// would be resolved away as dot segments, and the request would reach another route.
pub fn usable_in_path(id: &str) -> bool {
    !matches!(id, "." | "..")
}

/// The texts a key can be quoted back in: the key, and the base64 (standard and URL-safe,
/// with and without padding) of the key and of `Bearer <key>`.
fn quoted_forms(key: &str) -> Vec<String> {
    let mut forms = vec![key.to_owned()];
    for text in [key.to_owned(), format!("Bearer {key}")] {
        let standard = base64(text.as_bytes(), STANDARD);
        let url_safe = base64(text.as_bytes(), URL_SAFE);
        for form in [standard, url_safe] {
            let unpadded = form.trim_end_matches('=').to_owned();
            if unpadded != form {
                forms.push(form);
            }
            forms.push(unpadded);
        }
    }
    // Longest first, so a form is never cut by a shorter one it contains.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    forms
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with `=` padding (RFC 4648), in the given alphabet. Only for recognising a key in
/// text, so no decoder and no crate for it.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An API key. Its text is reachable only through [`ApiKey::expose`], for the one place it
/// belongs: the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

struct KeyState {
    current: ApiKey,
    previous: Option<(ApiKey, Instant)>,
}

/// An agent id and its key(s). Cheap to share: services hold `Arc<Credentials>`.
pub struct Credentials {
    agent_id: String,
    keys: RwLock<KeyState>,
    rotations: watch::Sender<u64>,
    /// The key a REST call last succeeded with: tells a refused stream apart from a
    /// refused key.
    accepted: RwLock<Option<ApiKey>>,
    /// The key the stream refused (401) before any REST call had succeeded with it: the
    /// stream and REST race at start, so either may learn of the other first.
    stream_refused: RwLock<Option<ApiKey>>,
    /// Said once: the stream refuses a key REST accepts.
    warned_stream_auth: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("agent_id", &self.agent_id)
            .field("api_key", &REDACTED)
            .finish()
    }
}

impl Credentials {
    pub fn new(agent_id: impl Into<String>, api_key: ApiKey) -> Arc<Self> {
        Arc::new(Self {
            agent_id: agent_id.into(),
            keys: RwLock::new(KeyState {
                current: api_key,
                previous: None,
            }),
            rotations: watch::channel(0).0,
            accepted: RwLock::new(None),
            stream_refused: RwLock::new(None),
            warned_stream_auth: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The key to send now.
    pub fn current(&self) -> ApiKey {
        self.read().current.clone()
    }

    /// The key to retry with after `refused` got a 401, while the overlap window lasts.
    pub fn alternate(&self, refused: &ApiKey) -> Option<ApiKey> {
        let state = self.read();
        let (previous, until) = state.previous.as_ref()?;
        if Instant::now() >= *until {
            return None;
        }
        if *refused == state.current {
            Some(previous.clone())
        } else if refused == previous {
            Some(state.current.clone())
        } else {
            None
        }
    }

    /// Hands over to `new_key`; the old key remains a 401 fallback for `overlap`.
    /// Returns false (and changes nothing) when `new_key` is the key already in use.
    pub fn rotate(&self, new_key: ApiKey, overlap: Duration) -> bool {
        {
            let mut state = self.keys.write().unwrap_or_else(|e| e.into_inner());
            if state.current == new_key {
                return false;
            }
            let old = std::mem::replace(&mut state.current, new_key);
            state.previous = Some((old, Instant::now() + overlap));
        }
        self.rotations.send_modify(|generation| *generation += 1);
        true
    }

    /// A REST call succeeded with `key`.
    pub fn note_accepted(&self, key: &ApiKey) {
        let known = self.accepted.read().unwrap_or_else(|e| e.into_inner());
        if known.as_ref() == Some(key) {
            return;
        }
        drop(known);
        *self.accepted.write().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
        if self
            .stream_refused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(key)
        {
            self.warn_stream_auth();
        }
    }

    /// The SSE stream answered 401 to `key`. When REST calls succeed with the same key, the
    /// stream route refuses header auth: said once, whichever of the two is learnt first.
    pub fn note_stream_refused(&self, key: &ApiKey) {
        if self.was_accepted(key) {
            self.warn_stream_auth();
        } else {
            *self
                .stream_refused
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
        }
    }

    fn warn_stream_auth(&self) {
        use std::sync::atomic::Ordering;
        if !self.warned_stream_auth.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the SSE stream answers 401 to the key that REST calls succeed with: the \
                 stream route refuses header auth here; polling keeps delivering, and the \
                 stream keeps retrying"
            );
        }
    }

    /// Whether a REST call has succeeded with `key` (the last key one succeeded with).
    pub fn was_accepted(&self, key: &ApiKey) -> bool {
        self.accepted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(key)
    }

    /// A receiver that changes on every rotation.
    pub fn rotations(&self) -> watch::Receiver<u64> {
        self.rotations.subscribe()
    }

    /// `text` with every key this agent has used replaced by [`REDACTED`], also where it
    /// appears base64-encoded (alone or as `Bearer <key>`).
    pub fn scrub(&self, text: &str) -> String {
        let state = self.read();
        let mut out = text.to_owned();
        let keys = std::iter::once(&state.current).chain(state.previous.as_ref().map(|(k, _)| k));
        for key in keys {
            if key.expose().is_empty() {
                continue;
            }
            for form in quoted_forms(key.expose()) {
                if out.contains(&form) {
                    out = out.replace(&form, REDACTED);
                }
            }
        }
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyState> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_print() {
        let key = ApiKey::new("sk-secret");
        assert_eq!(format!("{key} {key:?}"), "[redacted] [redacted]");
        let creds = Credentials::new("alice", key);
        assert!(!format!("{creds:?}").contains("sk-secret"));
        assert_eq!(creds.scrub("bad key sk-secret!"), "bad key [redacted]!");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes(), STANDARD), want);
        }
        assert_eq!(base64(&[0xfb, 0xff], STANDARD), "+/8=");
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8=");
    }

    #[test]
    fn base64_forms_of_the_key_are_scrubbed() {
        let key = "sk-live-Q7f3KEY?>~";
        let creds = Credentials::new("alice", ApiKey::new(key));
        for text in [key.to_owned(), format!("Bearer {key}")] {
            let standard = base64(text.as_bytes(), STANDARD);
            let url_safe = base64(text.as_bytes(), URL_SAFE);
            if text == key {
                assert_ne!(standard, url_safe, "the test key exercises both alphabets");
            }
            for form in [
                standard.clone(),
                standard.trim_end_matches('=').to_owned(),
                url_safe.clone(),
                url_safe.trim_end_matches('=').to_owned(),
            ] {
                let scrubbed = creds.scrub(&format!("401: token {form} is not valid"));
                assert_eq!(scrubbed, "401: token [redacted] is not valid", "{form}");
            }
        }
        assert_eq!(creds.scrub("nothing here"), "nothing here");
    }

    #[test]
    fn agent_ids_a_header_can_carry() {
        for good in ["alice", "a b", "a\tb", "agent-ünï", "ag/ent", "."] {
            assert!(usable_agent_id(good), "{good:?}");
        }
        for bad in [
            "a\nb",
            "a\rb",
            "a\0b",
            "a\r\nX-Evil: 1",
            "a\u{7f}",
            "a\u{1b}[0m",
        ] {
            assert!(!usable_agent_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_refused_stream_and_an_accepted_key_meet_in_either_order() {
        let key = ApiKey::new("k");
        let stream_first = Credentials::new("alice", key.clone());
        stream_first.note_stream_refused(&key);
        assert!(
            !stream_first
                .warned_stream_auth
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        stream_first.note_accepted(&key);
        assert!(
            stream_first
                .warned_stream_auth
                .load(std::sync::atomic::Ordering::Relaxed)
        );

        let rest_first = Credentials::new("alice", key.clone());
        rest_first.note_accepted(&key);
        rest_first.note_stream_refused(&ApiKey::new("other"));
        assert!(
            !rest_first
                .warned_stream_auth
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        rest_first.note_stream_refused(&key);
        assert!(
            rest_first
                .warned_stream_auth
                .load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_overlaps_then_forgets_the_old_key() {
        let (old, new) = (ApiKey::new("old"), ApiKey::new("new"));
        let creds = Credentials::new("alice", old.clone());
        let mut rotations = creds.rotations();
        assert_eq!(creds.alternate(&old), None);

        assert!(creds.rotate(new.clone(), Duration::from_secs(5)));
        assert!(rotations.has_changed().unwrap());
        rotations.mark_unchanged();
        assert_eq!(creds.current(), new);
        assert_eq!(creds.alternate(&new), Some(old.clone()));
        assert_eq!(creds.alternate(&old), Some(new.clone()));
        assert_eq!(creds.scrub("old new"), "[redacted] [redacted]");

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(creds.alternate(&new), None);
        assert_eq!(creds.alternate(&old), None);

        assert!(!creds.rotate(new, Duration::from_secs(5)));
        assert!(!rotations.has_changed().unwrap());
    }
}
