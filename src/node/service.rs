//! The one shape of every exported service class (`AgentPoller`, `HeartbeatService`,
//! `KeyRotationService`): a core service plus its [`Liveness`].
//!
//! `start()` starts the core service and, when it started something, makes the service (and
//! the JS object it was started through) a GC root that keeps the process alive until
//! `stop()`, or until its environment goes away (then [`Lifecycle::teardown`] runs, without
//! calling into JavaScript). A service `createRuntime` started is held the same way from the
//! moment the runtime becomes a JS object ([`Service::hold`]).

use std::sync::Arc;

use napi::Env;
use napi::bindgen_prelude::*;

use super::lifetime::Liveness;
use crate::core::heartbeat::Heartbeat;
use crate::core::key_rotation::KeyRotation;

/// What the wrapper needs from a core service.
pub trait Lifecycle: Send + Sync + 'static {
    /// What `stop()` leaves to finish (a final ack), if anything.
    type Stopped;

    /// Starts; false when it was running already.
    fn start(&self) -> bool;

    /// Stops at once, on the JS thread (so it may call JavaScript now).
    fn stop(&self, env: &Env) -> Self::Stopped;

    /// Stops because the environment is going away: no call into JavaScript.
    fn teardown(&self);
}

/// A core service and its hold on the process and its JS wrappers.
pub struct Service<T> {
    inner: Arc<T>,
    live: Liveness,
}

impl<T: Lifecycle> Service<T> {
    pub fn new(inner: Arc<T>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            live: Liveness::default(),
        })
    }

    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }

    /// Starts the service; while it runs, it (and `wrapper`, its JS object, when given) is a
    /// GC root and keeps the process alive. Idempotent.
    pub fn start(self: &Arc<Self>, env: &Env, wrapper: Option<&Object<'_>>) -> Result<()> {
        self.live
            .start(env, wrapper, || self.inner.start(), self.teardown())
    }

    /// Holds the process for a service started elsewhere (by the runtime).
    pub fn hold(self: &Arc<Self>, env: &Env) -> Result<()> {
        self.live.hold(env, None, self.teardown())
    }

    /// Roots a wrapper handed out for this service while it runs.
    pub fn root(&self, wrapper: &Object<'_>) -> Result<()> {
        self.live.root(wrapper)
    }

    /// Stops, and lets the process exit and the wrappers be collected.
    pub fn stop(&self, env: &Env) -> T::Stopped {
        let stopped = self.inner.stop(env);
        self.live.release(env);
        stopped
    }

    /// Lets go of the process and the wrappers of a service its owner (the runtime) stops.
    pub fn release(&self, env: &Env) {
        self.live.release(env);
    }

    fn teardown(self: &Arc<Self>) -> impl FnOnce() + Send + 'static {
        let weak = Arc::downgrade(self);
        move || {
            if let Some(service) = weak.upgrade() {
                service.inner.teardown();
                service.live.abandon();
            }
        }
    }
}

impl Lifecycle for Heartbeat {
    type Stopped = ();

    fn start(&self) -> bool {
        Heartbeat::start(self)
    }

    fn stop(&self, _env: &Env) {
        Heartbeat::stop(self);
    }

    fn teardown(&self) {
        Heartbeat::stop(self);
    }
}

impl Lifecycle for KeyRotation {
    type Stopped = ();

    fn start(&self) -> bool {
        KeyRotation::start(self)
    }

    fn stop(&self, _env: &Env) {
        KeyRotation::stop(self);
    }

    fn teardown(&self) {
        KeyRotation::stop(self);
    }
}
