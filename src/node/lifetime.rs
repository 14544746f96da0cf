//! How long a service lives: from `start()` to `stop()`, or to the end of the Node environment
//! that started it, whichever comes first — never shorter, never longer.
//!
//! - **A started service is a GC root**, like a timer. The JS wrapper object (an
//!   `AgentPoller`, the runtime's handle, …) owns the Rust service; when V8 collected a
//!   wrapper nobody referenced, its finalizer dropped the service, whose `Drop` stopped the
//!   loops, and the process exited 0 in the middle of its work. [`Liveness::hold`] now takes a
//!   strong napi reference to the wrapper (refcount 1, a GC root) together with the event-loop
//!   hold ([`KeepAlive`]); [`Liveness::release`], called by `stop()`, gives both back, and the
//!   wrapper and everything it holds (handler, JS transport, registry) are collectable again.
//! - **A service never outlives its environment.** A worker thread that is terminated takes
//!   its environment with it, but not the tokio tasks of the services it started: their SSE
//!   streams stayed open and their pollers kept peeking, and the server pushed messages into
//!   streams nobody read. Every held service registers a teardown with its environment (one
//!   Node-API env cleanup hook per environment); when the environment goes away the teardown
//!   stops the service's tasks without calling into JavaScript, and forgets (never releases)
//!   its napi handles, which the dying environment reclaims itself.
//!
//! The registry is per thread because Node runs one environment per thread, and everything
//! here runs on that thread: `start()`, `stop()` and the cleanup hook.

use std::cell::RefCell;
use std::sync::Mutex;

use napi::bindgen_prelude::*;
use napi::{Env, sys};

use super::js::KeepAlive;
use crate::core::sync::lock;

/// What a service does when its environment goes away: stop its tasks. It must not call into
/// JavaScript (the environment is being torn down).
pub type Teardown = Box<dyn FnOnce() + Send>;

/// A service's hold on the Node process and on its JS wrapper(s), taken when it starts and
/// given back by `stop()`.
#[derive(Default)]
pub struct Liveness {
    held: Mutex<Option<Held>>,
}

struct Held {
    _keep_alive: KeepAlive,
    /// Strong references to the JS wrappers of the running service.
    roots: Vec<ObjectRef<false>>,
    /// The service's entry in its environment's teardown list.
    entry: u64,
}

impl Liveness {
    /// Runs `start` inside the tokio runtime; when it started something, holds the process
    /// and roots `wrapper` until [`Liveness::release`]. `teardown` stops the service if its
    /// environment goes away first.
    pub fn start(
        &self,
        env: &Env,
        wrapper: Option<&Object<'_>>,
        start: impl FnOnce() -> bool,
        teardown: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        // Held across `start`, so a concurrent hold cannot interleave.
        let mut held = lock(&self.held);
        // Taken before `start`: the tasks it spawns may call JS at once, through the queue
        // this opens (see `KeepAlive`).
        let keep_alive = KeepAlive::new(env)?;
        if super::runtime_context(start) {
            *held = Some(Held::new(env, keep_alive, wrapper, Box::new(teardown))?);
        } else if let (Some(held), Some(wrapper)) = (held.as_mut(), wrapper) {
            // Already running (started through another wrapper): root this one too.
            held.roots.push(wrapper.create_ref::<false>()?);
        }
        Ok(())
    }

    /// Holds the process (for something already started), rooting `wrapper` when given.
    pub fn hold(
        &self,
        env: &Env,
        wrapper: Option<&Object<'_>>,
        teardown: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        let mut held = lock(&self.held);
        match held.as_mut() {
            Some(held) => {
                if let Some(wrapper) = wrapper {
                    held.roots.push(wrapper.create_ref::<false>()?);
                }
            }
            None => {
                let keep_alive = KeepAlive::new(env)?;
                *held = Some(Held::new(env, keep_alive, wrapper, Box::new(teardown))?);
            }
        }
        Ok(())
    }

    /// Roots one more wrapper of a running service (a wrapper handed out later); nothing when
    /// the service is not running.
    pub fn root(&self, wrapper: &Object<'_>) -> Result<()> {
        if let Some(held) = lock(&self.held).as_mut() {
            held.roots.push(wrapper.create_ref::<false>()?);
        }
        Ok(())
    }

    /// Lets the process exit and the wrappers be collected. On the JS thread (`stop()`).
    pub fn release(&self, env: &Env) {
        let Some(held) = lock(&self.held).take() else {
            return;
        };
        forget_teardown(held.entry);
        for root in held.roots {
            // Fails only when the environment is going away, which frees it anyway.
            let _ = root.unref(env);
        }
    }

    /// The environment is going away: its napi handles die with it, so they are forgotten
    /// rather than released (no call into a dying environment).
    pub fn abandon(&self) {
        if let Some(held) = lock(&self.held).take() {
            std::mem::forget(held);
        }
    }
}

impl Held {
    fn new(
        env: &Env,
        keep_alive: KeepAlive,
        wrapper: Option<&Object<'_>>,
        teardown: Teardown,
    ) -> Result<Self> {
        let roots = match wrapper {
            Some(wrapper) => vec![wrapper.create_ref::<false>()?],
            None => Vec::new(),
        };
        Ok(Self {
            _keep_alive: keep_alive,
            roots,
            entry: add_teardown(env, teardown)?,
        })
    }
}

/// This thread's environment and what to stop when it goes away.
struct EnvTeardowns {
    env: sys::napi_env,
    next: u64,
    entries: Vec<(u64, Teardown)>,
}

thread_local! {
    static TEARDOWNS: RefCell<Option<EnvTeardowns>> = const { RefCell::new(None) };
}

/// Registers `teardown` to run when `env` goes away; the returned id forgets it again.
fn add_teardown(env: &Env, teardown: Teardown) -> Result<u64> {
    TEARDOWNS.with(|slot| {
        let mut slot = slot.borrow_mut();
        let fresh = !matches!(&*slot, Some(t) if t.env == env.raw());
        if fresh {
            // One hook per environment; a new environment on this thread (after the old one's
            // hook ran and cleared the slot) gets its own.
            // The hook is never removed: it outlives every service of the environment.
            env.add_env_cleanup_hook((), |()| run_teardowns())?;
            *slot = Some(EnvTeardowns {
                env: env.raw(),
                next: 0,
                entries: Vec::new(),
            });
        }
        let teardowns = slot.as_mut().expect("set above");
        teardowns.next += 1;
        let id = teardowns.next;
        teardowns.entries.push((id, teardown));
        Ok(id)
    })
}

fn forget_teardown(id: u64) {
    // `try_with`: at thread exit the slot may already be gone, and then there is nothing to do.
    let _ = TEARDOWNS.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut()
            && let Some(teardowns) = slot.as_mut()
        {
            teardowns.entries.retain(|(entry, _)| *entry != id);
        }
    });
}

/// The env cleanup hook: the environment of this thread is going away.
fn run_teardowns() {
    let entries = TEARDOWNS
        .try_with(|slot| slot.borrow_mut().take())
        .ok()
        .flatten()
        .map(|t| t.entries)
        .unwrap_or_default();
    if !entries.is_empty() {
        tracing::debug!(
            services = entries.len(),
            "the Node environment is going away: stopping its services"
        );
    }
    for (_, teardown) in entries {
        // A panic must not cross the C boundary into Node.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(teardown)).is_err() {
            tracing::warn!("a service's teardown panicked");
        }
    }
}
