//! Key rotation: check the credential's age, rotate through the registry before it
//! expires, and hand the new key to every service of the runtime.
//!
//! The first check runs [`KeyRotationConfig::first_check`] (5 s) after start, then one every
//! `check_interval`. A check reads `registry.get(agentId)`: when `now - updatedAt` exceeds
//! `max_key_age`, it calls `registry.rotateKey(agentId)` and, inside a runtime, gives the
//! new key to the shared [`Credentials`] (the old one stays a 401 fallback for the
//! overlap). A registry key that differs from ours (rotated by another process) is adopted
//! the same way. Failures are logged and counted; the next check tries again.
//!
//! The real registry (`agent-registry-accessor.ts`) answers `rotateKey` with a *masked* key
//! (`"<first 8 chars>...rotated"`) and stores the usable one: the key handed over is the one
//! `registry.get` reads back after the rotation. A masked key is never sent.
//!
//! [`KeyRotation::check_now`] asks the loop for one check at once and resolves with what it
//! did: a test drives rotation without a clock, and checks never overlap (two concurrent
//! `rotateKey` calls would rotate twice).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::clock;
use super::credentials::{ApiKey, Credentials};
use super::error::Result;
use super::sync::lock;
use super::task::{Asked, Asker, NotDone, RunningTask};

/// What the rotation service reads from a registry's credential.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryCredential {
    pub api_key: Option<String>,
    pub updated_at: Option<String>,
}

/// The registry methods the runtime calls (`get`, `rotateKey`).
pub trait Registry: Send + Sync {
    fn get(&self, agent_id: &str) -> BoxFuture<'_, Result<Option<RegistryCredential>>>;
    /// Rotates and returns the new key, when the registry reports one.
    fn rotate_key(&self, agent_id: &str) -> BoxFuture<'_, Result<Option<String>>>;
}

#[derive(Clone, Debug)]
pub struct KeyRotationConfig {
    pub agent_id: String,
    pub check_interval: Duration,
    pub max_key_age: Duration,
    pub first_check: Duration,
    /// How long the old key stays a fallback after a hand-over.
    pub overlap: Duration,
}

impl KeyRotationConfig {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            check_interval: Duration::from_millis(3_600_000),
            max_key_age: Duration::from_millis(2_592_000_000),
            first_check: Duration::from_secs(5),
            overlap: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyRotationStatus {
    pub running: bool,
    pub last_rotation_at: Option<String>,
    pub checks: u64,
    pub rotations: u64,
    pub last_error: Option<String>,
}

/// What one check asked for with [`KeyRotation::check_now`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckOutcome {
    /// The key was older than the maximum age and `rotateKey` was called.
    pub rotated: bool,
    /// The registry held a newer key than the runtime's, which the runtime now uses.
    pub adopted: bool,
    /// Why the check failed (`registry.get` or `rotateKey` threw), without secrets.
    pub error: Option<String>,
}

struct Running {
    task: RunningTask,
    requests: Asker<CheckOutcome>,
}

#[derive(Default)]
struct State {
    last_rotation_at: Mutex<Option<String>>,
    checks: AtomicU64,
    rotations: AtomicU64,
    last_error: Mutex<Option<String>>,
}

pub struct KeyRotation {
    registry: Arc<dyn Registry>,
    credentials: Option<Arc<Credentials>>,
    config: KeyRotationConfig,
    state: Arc<State>,
    task: Mutex<Option<Running>>,
    /// The span current at creation, which the loop logs in on every start.
    span: tracing::Span,
}

impl KeyRotation {
    /// `credentials`: the runtime's shared key, to receive rotated keys (None standalone).
    pub fn new(
        registry: Arc<dyn Registry>,
        credentials: Option<Arc<Credentials>>,
        config: KeyRotationConfig,
    ) -> Self {
        Self {
            registry,
            credentials,
            config,
            state: Arc::default(),
            task: Mutex::new(None),
            span: tracing::Span::current(),
        }
    }

    pub fn start(&self) -> bool {
        let mut task = lock(&self.task);
        if task.is_some() {
            return false;
        }
        let check = Check {
            registry: self.registry.clone(),
            credentials: self.credentials.clone(),
            config: self.config.clone(),
            state: self.state.clone(),
        };
        let _in_span = self.span.enter();
        let (requests, asked) = Asker::new();
        *task = Some(Running {
            task: RunningTask::spawn(move |token| run(check, asked, token)),
            requests,
        });
        true
    }

    /// Stops, cancelling the pending first check too.
    pub fn stop(&self) {
        if let Some(running) = lock(&self.task).take() {
            running.task.stop();
        }
    }

    /// One check now (also before the first scheduled one), run by the loop; resolves with
    /// what it did. The schedule is left alone.
    pub fn check_now(
        &self,
    ) -> impl std::future::Future<Output = std::result::Result<CheckOutcome, NotDone>> + Send + 'static
    {
        Asker::ask(lock(&self.task).as_ref().map(|running| &running.requests))
    }

    pub fn status(&self) -> KeyRotationStatus {
        KeyRotationStatus {
            running: lock(&self.task).is_some(),
            last_rotation_at: lock(&self.state.last_rotation_at).clone(),
            checks: self.state.checks.load(Ordering::Relaxed),
            rotations: self.state.rotations.load(Ordering::Relaxed),
            last_error: lock(&self.state.last_error).clone(),
        }
    }
}

impl Drop for KeyRotation {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Check {
    registry: Arc<dyn Registry>,
    credentials: Option<Arc<Credentials>>,
    config: KeyRotationConfig,
    state: Arc<State>,
}

async fn run(check: Check, mut asked: Asked<CheckOutcome>, token: CancellationToken) {
    // The first tick is the first check; the interval runs from there.
    let first = Instant::now() + check.config.first_check;
    let mut ticks = tokio::time::interval_at(first, check.config.check_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticks.tick() => {}
            Some(request) = asked.recv() => waiting.push(request),
        }
        // Everyone who asked before this check starts is answered by it.
        while let Ok(request) = asked.try_recv() {
            waiting.push(request);
        }
        let result = tokio::select! {
            _ = token.cancelled() => return,
            result = check.once() => result,
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::warn!(error = %err, "key rotation check failed");
                let text = err.to_string();
                *lock(&check.state.last_error) = Some(text.clone());
                CheckOutcome {
                    error: Some(text),
                    ..CheckOutcome::default()
                }
            }
        };
        for request in waiting {
            let _ = request.send(outcome.clone());
        }
    }
}

impl Check {
    async fn once(&self) -> Result<CheckOutcome> {
        self.state.checks.fetch_add(1, Ordering::Relaxed);
        let mut outcome = CheckOutcome::default();
        let agent = &self.config.agent_id;
        let Some(credential) = self.registry.get(agent).await? else {
            return Ok(outcome);
        };
        if let (Some(shared), Some(key)) = (&self.credentials, &credential.api_key)
            && usable_key(key)
            && shared.rotate(ApiKey::new(key.as_str()), self.config.overlap)
        {
            tracing::info!("adopted the registry's newer API key");
            outcome.adopted = true;
        }
        let age_ms = credential
            .updated_at
            .as_deref()
            .and_then(clock::parse_iso_ms)
            .map(|updated| clock::now_ms() - updated);
        let too_old = age_ms.is_some_and(|age| age > self.config.max_key_age.as_millis() as i64);
        if !too_old {
            return Ok(outcome);
        }
        tracing::info!("API key older than the maximum age: rotating");
        let answered = self.registry.rotate_key(agent).await?;
        *lock(&self.state.last_rotation_at) = Some(clock::now_iso());
        self.state.rotations.fetch_add(1, Ordering::Relaxed);
        outcome.rotated = true;
        let Some(shared) = &self.credentials else {
            return Ok(outcome);
        };
        // What the registry stores is the key; what it answers may be a mask of it.
        let stored = match self.registry.get(agent).await {
            Ok(credential) => credential.and_then(|c| c.api_key),
            Err(err) => {
                tracing::warn!(error = %err, "could not read the rotated key back from the registry");
                None
            }
        };
        let current = shared.current();
        let new_key = [stored, answered]
            .into_iter()
            .flatten()
            .find(|key| usable_key(key) && key.as_str() != current.expose());
        match new_key {
            Some(key) => {
                shared.rotate(ApiKey::new(key), self.config.overlap);
            }
            None => tracing::warn!(
                "the registry rotated the key but gives no usable new one (masked or unchanged): \
                 the runtime keeps its key and adopts the registry's at the next check"
            ),
        }
        Ok(outcome)
    }
}

/// A key that can be sent: not empty, and not the mask a registry shows in place of a key
/// (`"sk-abc12...rotated"`); no real key has an ellipsis in it.
fn usable_key(key: &str) -> bool {
    !key.trim().is_empty() && !key.contains("...") && !key.contains('\u{2026}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::Error;

    struct FakeRegistry {
        credential: Mutex<Option<RegistryCredential>>,
        gets: AtomicU64,
        rotations: AtomicU64,
        fail_get: bool,
    }

    impl FakeRegistry {
        fn aged(age: Duration, key: &str) -> Arc<Self> {
            Arc::new(Self {
                credential: Mutex::new(Some(RegistryCredential {
                    api_key: Some(key.into()),
                    updated_at: Some(clock::format_iso_ms(
                        clock::now_ms() - age.as_millis() as i64,
                    )),
                })),
                gets: AtomicU64::new(0),
                rotations: AtomicU64::new(0),
                fail_get: false,
            })
        }
    }

    impl Registry for FakeRegistry {
        fn get(&self, _agent: &str) -> BoxFuture<'_, Result<Option<RegistryCredential>>> {
            self.gets.fetch_add(1, Ordering::Relaxed);
            let answer = if self.fail_get {
                Err(Error::Js("boom".into()))
            } else {
                Ok(lock(&self.credential).clone())
            };
            Box::pin(async move { answer })
        }
        /// As the real registry: stores the new key, answers with a mask of it.
        fn rotate_key(&self, _agent: &str) -> BoxFuture<'_, Result<Option<String>>> {
            let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
            let key = format!("sk-live-rotated-{n}-0123456789");
            *lock(&self.credential) = Some(RegistryCredential {
                api_key: Some(key.clone()),
                updated_at: Some(clock::now_iso()),
            });
            let masked = format!("{}...rotated", &key[..8]);
            Box::pin(async move { Ok(Some(masked)) })
        }
    }

    fn config(max_age: Duration) -> KeyRotationConfig {
        KeyRotationConfig {
            max_key_age: max_age,
            check_interval: Duration::from_secs(60),
            ..KeyRotationConfig::new("alice")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_check_after_five_seconds_then_every_interval() {
        let registry = FakeRegistry::aged(Duration::from_secs(1), "key-0");
        let service = KeyRotation::new(registry.clone(), None, config(Duration::from_secs(3600)));
        service.start();
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert_eq!(registry.gets.load(Ordering::Relaxed), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(registry.gets.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(registry.gets.load(Ordering::Relaxed), 3);
        assert_eq!(
            registry.rotations.load(Ordering::Relaxed),
            0,
            "young key kept"
        );
        assert_eq!(service.status().last_rotation_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_cancels_the_pending_first_check() {
        let registry = FakeRegistry::aged(Duration::from_secs(1), "key-0");
        let service = KeyRotation::new(registry.clone(), None, config(Duration::from_secs(3600)));
        service.start();
        tokio::time::sleep(Duration::from_secs(2)).await;
        service.stop();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(registry.gets.load(Ordering::Relaxed), 0);
        assert!(!service.status().running);
    }

    #[tokio::test(start_paused = true)]
    async fn old_key_rotates_and_reaches_the_shared_credentials() {
        let registry = FakeRegistry::aged(Duration::from_secs(7200), "key-0");
        let shared = Credentials::new("alice", ApiKey::new("key-0"));
        let service = KeyRotation::new(
            registry.clone(),
            Some(shared.clone()),
            config(Duration::from_secs(3600)),
        );
        service.start();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(registry.rotations.load(Ordering::Relaxed), 1);
        // The stored key, read back, not the masked one rotateKey answered.
        assert_eq!(shared.current().expose(), "sk-live-rotated-1-0123456789");
        let status = service.status();
        assert!(clock::parse_iso_ms(status.last_rotation_at.as_deref().unwrap()).is_some());
        // The fresh key is young: no second rotation.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(registry.rotations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn masks_are_not_keys() {
        for (key, usable) in [
            ("sk-live-abc", true),
            ("sk-live-...rotated", false),
            ("sk-live-\u{2026}rotated", false),
            ("", false),
            ("  ", false),
        ] {
            assert_eq!(usable_key(key), usable, "{key:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_that_only_masks_leaves_the_key_alone() {
        // rotateKey answers a mask and get() still has the old key (not stored yet): the
        // runtime keeps the key it has rather than send a mask.
        struct MaskOnly(Mutex<Option<RegistryCredential>>);
        impl Registry for MaskOnly {
            fn get(&self, _: &str) -> BoxFuture<'_, Result<Option<RegistryCredential>>> {
                let c = lock(&self.0).clone();
                Box::pin(async move { Ok(c) })
            }
            fn rotate_key(&self, _: &str) -> BoxFuture<'_, Result<Option<String>>> {
                Box::pin(async { Ok(Some("key-0-ab...rotated".to_owned())) })
            }
        }
        let registry = Arc::new(MaskOnly(Mutex::new(Some(RegistryCredential {
            api_key: Some("key-0-abcdef".into()),
            updated_at: Some(clock::format_iso_ms(clock::now_ms() - 7_200_000)),
        }))));
        let shared = Credentials::new("alice", ApiKey::new("key-0-abcdef"));
        let service = KeyRotation::new(
            registry,
            Some(shared.clone()),
            config(Duration::from_secs(3600)),
        );
        service.start();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(service.status().rotations, 1);
        assert_eq!(shared.current().expose(), "key-0-abcdef");
    }

    #[tokio::test(start_paused = true)]
    async fn check_now_checks_at_once_and_reports_what_it_did() {
        let registry = FakeRegistry::aged(Duration::from_secs(7200), "key-0");
        let shared = Credentials::new("alice", ApiKey::new("key-0"));
        let service = KeyRotation::new(
            registry.clone(),
            Some(shared.clone()),
            config(Duration::from_secs(3600)),
        );
        assert_eq!(service.check_now().await, Err(NotDone::NotRunning));
        service.start();
        // Before the first scheduled check (5 s): at once.
        let outcome = service.check_now().await.unwrap();
        assert_eq!(
            outcome,
            CheckOutcome {
                rotated: true,
                adopted: false,
                error: None
            }
        );
        // One read to check, one to read the rotated key back.
        assert_eq!(registry.gets.load(Ordering::Relaxed), 2);
        assert_eq!(shared.current().expose(), "sk-live-rotated-1-0123456789");
        // The fresh key is young: nothing to do, and the schedule is unchanged (5 s).
        assert_eq!(service.check_now().await.unwrap(), CheckOutcome::default());
        tokio::time::sleep(Duration::from_millis(5100)).await;
        assert_eq!(registry.gets.load(Ordering::Relaxed), 4);
        assert_eq!(service.status().rotations, 1);
        // A key rotated elsewhere is adopted.
        *lock(&registry.credential) = Some(RegistryCredential {
            api_key: Some("from-cli".into()),
            updated_at: Some(clock::now_iso()),
        });
        let outcome = service.check_now().await.unwrap();
        assert!(outcome.adopted && !outcome.rotated);
        assert_eq!(shared.current().expose(), "from-cli");
        service.stop();
        assert_eq!(service.check_now().await, Err(NotDone::NotRunning));
    }

    #[tokio::test(start_paused = true)]
    async fn check_now_reports_a_failing_registry() {
        let failing = Arc::new(FakeRegistry {
            fail_get: true,
            ..Arc::into_inner(FakeRegistry::aged(Duration::ZERO, "k")).unwrap()
        });
        let service = KeyRotation::new(failing.clone(), None, config(Duration::from_secs(3600)));
        service.start();
        let outcome = service.check_now().await.unwrap();
        assert!(!outcome.rotated && !outcome.adopted);
        assert!(outcome.error.unwrap().contains("boom"));
        assert!(service.status().last_error.unwrap().contains("boom"));
    }

    #[tokio::test(start_paused = true)]
    async fn adopts_a_key_rotated_elsewhere_and_survives_failures() {
        let registry = FakeRegistry::aged(Duration::from_secs(1), "rotated-by-cli");
        let shared = Credentials::new("alice", ApiKey::new("key-0"));
        let service = KeyRotation::new(
            registry.clone(),
            Some(shared.clone()),
            config(Duration::from_secs(3600)),
        );
        service.start();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(shared.current().expose(), "rotated-by-cli");

        let failing = Arc::new(FakeRegistry {
            fail_get: true,
            ..Arc::into_inner(FakeRegistry::aged(Duration::ZERO, "k")).unwrap()
        });
        let service = KeyRotation::new(failing.clone(), None, config(Duration::from_secs(3600)));
        service.start();
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert_eq!(
            failing.gets.load(Ordering::Relaxed),
            2,
            "kept checking after a failure"
        );
        assert!(service.status().last_error.unwrap().contains("boom"));
    }
}
