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
//! log line or an error message.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a redacted key prints as.
pub const REDACTED: &str = "[redacted]";

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

    /// `text` with every key this agent has used replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let state = self.read();
        let mut out = text.to_owned();
        let keys = std::iter::once(&state.current).chain(state.previous.as_ref().map(|(k, _)| k));
        for key in keys {
            if !key.expose().is_empty() {
                out = out.replace(key.expose(), REDACTED);
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
