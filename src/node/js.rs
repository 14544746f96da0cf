//! Calling JavaScript from tokio, safely.
//!
//! Everything the runtime does to JS values happens in a closure run on the JS thread by
//! [`JsThread`]: one threadsafe function per JS thread (shared by every service started
//! there) whose callback runs the closure with the `Env`. One, not one per service: each
//! threadsafe function is a libuv async handle, and libuv looks at every such handle on each
//! wake-up of the loop, so 1,000 pollers with their own handles made every hop scan 1,000s of
//! them. That gives the boundary four properties at once:
//!
//! - **`this` is right**: methods are fetched from their object and applied to it, so a
//!   class instance's methods work (a plain threadsafe-function call passes `undefined`).
//! - **nothing crashes Node**: a JS throw comes back as an `Err`, a promise is awaited from
//!   Rust and its rejection becomes an `Err` (never an unhandled rejection). Whatever was
//!   thrown — a Symbol, `undefined`, a Proxy whose traps throw, an object whose `toString`
//!   throws — is described by [`describe_thrown`] without letting a second exception escape:
//!   napi-rs's own conversion coerces the value to a string, which throws again for a Symbol,
//!   and that exception, left pending, reached Node as uncaught (exit 1).
//! - **bounded**: the queue holds [`QUEUE_SIZE`] closures of all the thread's services; when it
//!   is full, callers wait (backpressure) instead of memory growing.
//! - **alive exactly while needed**: the queue exists while a [`KeepAlive`] does (held by
//!   [`super::lifetime::Liveness`] from a service's start to its `stop()`), and holds the
//!   process open meanwhile, like a timer; once the last service of the thread stops it is
//!   released, so nothing of the runtime stays open (test runners see no leaked handle).
//!
//! | Rust | JavaScript |
//! |---|---|
//! | [`Settle<T>`] | `T \| Promise<T>` returned by a JS function |
//! | [`Pending<T>`] | a JS promise awaited from Rust |
//! | [`Lenient`] | any JSON-like value; `undefined`, functions and symbols read as absent |
//! | [`PersistentObject`] | a JS object kept across calls (a transport, a registry) |
//! | [`JsFn`] | a JS function kept across calls (a handler, a factory, an unsubscribe) |
//! | [`Ended`] | how a call that may return `T \| Promise<T>` ended, once it settled |
//! | [`Subscriptions<T>`] | what `subscribe(handler)` handed out, each with its `() => void` |
//!
//! This is the only module (with `config.rs`) that converts raw napi values: everything
//! `unsafe` about calling JS is here, behind safe functions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{
    ThreadsafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode, UnknownReturnValue,
};
use napi::{Env, Status, sys};
use serde_json::{Map, Number, Value};

use crate::core::error::Error as CoreError;
use crate::core::sync::lock;

/// Closures queued per JS thread before callers wait.
pub const QUEUE_SIZE: usize = 4096;
/// Nesting accepted when reading a JS value as JSON.
const MAX_DEPTH: u32 = 64;
/// Properties and elements accepted when reading one JS value as JSON.
const MAX_NODES: usize = 1_000_000;

type Job = Box<dyn FnOnce(&Env) + Send>;
/// Unbounded in Node-API terms: [`ThreadQueue`]'s permits bound it.
type JobQueue = ThreadsafeFunction<Job, (), (), Status, false, false, 0>;

/// Runs closures on the JS thread. Cheap to clone.
///
/// Every `JsThread` of one JS thread (one Node environment) shares that thread's queue, which
/// exists exactly while something of the thread holds a [`KeepAlive`] (a running service, a
/// connected transport, a runtime being built): opened by the first, released with the last.
/// So a stopped service leaves no threadsafe function behind (an open one is an async
/// resource Jest's `--detectOpenHandles` reports), and no service pays for one of its own.
#[derive(Clone)]
pub struct JsThread {
    queue: Arc<ThreadQueue>,
    /// The span the jobs run in.
    span: tracing::Span,
}

/// One JS thread's job queue and how many [`KeepAlive`]s hold it open.
struct ThreadQueue {
    /// The environment it belongs to (Node runs one per thread; a new one on the same thread
    /// gets a new queue).
    env: usize,
    state: Mutex<Holders>,
    /// One permit per job that may wait in the queue: a job takes one when queued and gives
    /// it back when it has run, so callers wait for room here (backpressure), never in a
    /// retry loop against a full queue.
    room: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct Holders {
    count: usize,
    queue: Option<Arc<JobQueue>>,
}

thread_local! {
    static THREAD_QUEUE: std::cell::RefCell<Option<Arc<ThreadQueue>>> =
        const { std::cell::RefCell::new(None) };
}

impl ThreadQueue {
    /// The queue of `env`'s thread. On the JS thread.
    fn of(env: &Env) -> Arc<Self> {
        let key = env.raw() as usize;
        THREAD_QUEUE.with(|slot| {
            let mut slot = slot.borrow_mut();
            match &*slot {
                Some(queue) if queue.env == key => queue.clone(),
                _ => {
                    let queue = Arc::new(Self {
                        env: key,
                        state: Mutex::default(),
                        room: Arc::new(tokio::sync::Semaphore::new(QUEUE_SIZE)),
                    });
                    *slot = Some(queue.clone());
                    queue
                }
            }
        })
    }

    /// Queues `job`, which holds `permit` until it has run; false when nothing holds the
    /// queue open.
    fn call(&self, permit: tokio::sync::OwnedSemaphorePermit, job: Job) -> bool {
        let queue = lock(&self.state).queue.clone();
        let Some(queue) = queue else {
            return false;
        };
        let job: Job = Box::new(move |env: &Env| {
            let _room = permit;
            job(env);
        });
        queue.call(job, ThreadsafeFunctionCallMode::NonBlocking) == Status::Ok
    }
}

impl JsThread {
    /// Jobs run in the span current here (a runtime's [`crate::logging::LogScope`]), so what
    /// they log reaches that runtime's logger. On the JS thread.
    pub fn new(env: &Env) -> Self {
        Self {
            queue: ThreadQueue::of(env),
            span: tracing::Span::current(),
        }
    }

    /// `job` wrapped to run in this thread's span.
    fn in_span(&self, job: impl FnOnce(&Env) + Send + 'static) -> Job {
        let span = self.span.clone();
        Box::new(move |env: &Env| {
            let _in_span = span.enter();
            job(env);
            // Whatever a job left pending would be rethrown into Node as uncaught (exit 1)
            // when the queue's callback returns: a job's errors are its caller's, never Node's.
            if let Some(thrown) = take_exception(env) {
                tracing::debug!(thrown, "cleared an exception a JS call left pending");
            }
        })
    }

    /// Runs `job` on the JS thread and returns its result. Waits while the queue is full.
    /// `Err` when the job throws, or when the environment is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Env) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, CoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = self.in_span(move |env: &Env| {
            let _ = tx.send(job(env).map_err(|e| describe(&e)));
        });
        let permit = self.queue.room.clone().acquire_owned().await;
        if !permit.is_ok_and(|permit| self.queue.call(permit, job)) {
            return Err(closing());
        }
        rx.await.map_err(|_| closing())?.map_err(CoreError::Js)
    }
}

/// The threadsafe function that runs jobs on a JS thread. Referenced: while it exists (while
/// a [`KeepAlive`] does) it holds the event loop open, like an active timer.
fn job_queue(env: &Env) -> Result<JobQueue> {
    let noop = env.create_function_from_closure::<(), (), _>("cleoRuntimeJob", |_| Ok(()))?;
    noop.build_threadsafe_function::<Job>()
        .callee_handled::<false>()
        .weak::<false>()
        .build_callback(move |ctx: ThreadsafeCallContext<Job>| {
            (ctx.value)(&ctx.env);
            Ok(())
        })
}

/// Holds the Node event loop open while a service runs, like an active timer, and with it its
/// thread's job queue ([`JsThread`]). Dropping the last one of a thread, on any thread,
/// releases the queue: the process may exit, and nothing of the runtime stays open.
pub struct KeepAlive {
    queue: Arc<ThreadQueue>,
}

impl KeepAlive {
    pub fn new(env: &Env) -> Result<Self> {
        let queue = ThreadQueue::of(env);
        {
            let mut holders = lock(&queue.state);
            if holders.queue.is_none() {
                holders.queue = Some(Arc::new(job_queue(env)?));
            }
            holders.count += 1;
        }
        Ok(Self { queue })
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let released = {
            let mut holders = lock(&self.queue.state);
            holders.count -= 1;
            if holders.count == 0 {
                holders.queue.take()
            } else {
                None
            }
        };
        // Outside the lock: releasing a threadsafe function is allowed from any thread; jobs
        // already queued still run.
        drop(released);
    }
}

/// A value a JS function returned: ready now, or a promise to await from Rust.
pub enum Settle<T: FromNapiValue + Send + 'static> {
    Now(T),
    Later(Pending<T>),
}

impl<T: FromNapiValue + Send + 'static> Settle<T> {
    /// Reads a return value on the JS thread.
    pub fn read(env: &Env, value: Unknown<'_>) -> Result<Self> {
        if value.is_promise()? {
            if let Some(pending) = Pending::observe_shared(env, value) {
                return Ok(Settle::Later(pending));
            }
            Ok(Settle::Later(Pending::observe(env, value)?))
        } else {
            Ok(Settle::Now(read_value(env, value.raw())?))
        }
    }

    /// Awaits the value off the JS thread.
    pub async fn resolve(self) -> std::result::Result<T, CoreError> {
        match self {
            Settle::Now(v) => Ok(v),
            Settle::Later(p) => p.await.map_err(CoreError::Js),
        }
    }
}

/// A JS promise observed from Rust: resolves with the value (read as `T` on the JS thread) or
/// with the rejection described as text. The promise is always observed, so its rejection is
/// never unhandled; and unlike napi-rs's `Promise`, a rejection with a Symbol, `undefined` or
/// a Proxy still reads as something a person can act on.
pub struct Pending<T>(tokio::sync::oneshot::Receiver<std::result::Result<T, String>>);

impl<T: FromNapiValue + Send + 'static> Pending<T> {
    /// Attaches to `promise` (on the JS thread).
    pub fn observe(env: &Env, promise: Unknown<'_>) -> Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = Arc::new(Mutex::new(Some(tx)));
        let on_rejected = slot.clone();
        // Neither callback may throw: an exception from a reaction would reject the promise
        // that `then` returns, which nobody observes (an unhandled rejection).
        let fulfilled =
            env.create_function_from_closure::<Unknown, (), _>("cleoSettled", move |ctx| {
                let value: Unknown = ctx.get(0)?;
                let read = read_value::<T>(ctx.env, value.raw()).map_err(|e| describe(&e));
                if let Some(tx) = lock(&slot).take() {
                    let _ = tx.send(read);
                }
                Ok(())
            })?;
        let rejected =
            env.create_function_from_closure::<Unknown, (), _>("cleoRejected", move |ctx| {
                let reason: Unknown = ctx.get(0)?;
                let why = describe_rejection(ctx.env, reason.raw());
                if let Some(tx) = lock(&on_rejected).take() {
                    let _ = tx.send(Err(why));
                }
                Ok(())
            })?;
        let object = unsafe { Object::from_napi_value(env.raw(), promise.raw())? };
        let then = get_property(env, &object, "then")?;
        apply(env, &object, then, FnArgs::from((fulfilled, rejected)))?;
        Ok(Self(rx))
    }
}

impl<T: FromNapiValue + Send + 'static> Pending<T> {
    /// As [`Pending::observe`], through reactions made once per JS thread instead of two new
    /// native functions per promise (each a new function template in V8: the largest JS-side
    /// cost of an idle poll). None when the shared reactions cannot be used; the caller then
    /// observes the promise the per-promise way.
    fn observe_shared(env: &Env, promise: Unknown<'_>) -> Option<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reaction: Reaction = Box::new(move |env: &Env, fulfilled: bool, value| {
            let read = if fulfilled {
                read_value::<T>(env, value).map_err(|e| describe(&e))
            } else {
                Err(describe_rejection(env, value))
            };
            let _ = tx.send(read);
        });
        // The borrow ends before any JS runs: a `then` that calls back at once finds the
        // reaction in place.
        let (id, observe) = REACTIONS.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.as_ref().is_none_or(|r| r.env != env.raw() as usize) {
                *slot = Reactions::new(env);
            }
            let reactions = slot.as_mut()?;
            let mut observe = std::ptr::null_mut();
            if unsafe { sys::napi_get_reference_value(env.raw(), reactions.observe, &mut observe) }
                != sys::Status::napi_ok
                || observe.is_null()
            {
                return None;
            }
            reactions.next += 1;
            let id = reactions.next;
            reactions.waiting.insert(id, reaction);
            Some((id, observe))
        })?;
        let mut undefined = std::ptr::null_mut();
        let mut key = std::ptr::null_mut();
        let mut returned = std::ptr::null_mut();
        let called = unsafe {
            sys::napi_get_undefined(env.raw(), &mut undefined) == sys::Status::napi_ok
                && sys::napi_create_double(env.raw(), id as f64, &mut key) == sys::Status::napi_ok
                && sys::napi_call_function(
                    env.raw(),
                    undefined,
                    observe,
                    2,
                    [promise.raw(), key].as_ptr(),
                    &mut returned,
                ) == sys::Status::napi_ok
        };
        if called {
            return Some(Self(rx));
        }
        clear_exception(env);
        REACTIONS.with(|slot| {
            if let Some(reactions) = slot.borrow_mut().as_mut() {
                reactions.waiting.remove(&id);
            }
        });
        None
    }
}

/// What to do with an observed promise's outcome: fulfilled or not, and the value or reason.
type Reaction = Box<dyn FnOnce(&Env, bool, sys::napi_value)>;

/// The shared reactions of one JS thread's environment (see [`Pending::observe_shared`]).
struct Reactions {
    env: usize,
    /// `observe(promise, id)`, which attaches reactions calling the native `settle(id, ok,
    /// value)`. A reference that is never deleted: it lives as long as its environment.
    observe: sys::napi_ref,
    next: u64,
    waiting: std::collections::HashMap<u64, Reaction>,
}

thread_local! {
    static REACTIONS: std::cell::RefCell<Option<Reactions>> = const { std::cell::RefCell::new(None) };
}

/// Makes `observe` from a few lines of JS: the reactions are plain closures, so attaching them
/// costs what a `then` in JavaScript costs. Neither may throw (a throw would reject the
/// promise `then` returns, which nobody observes).
const OBSERVE_SOURCE: &str = "(function (settle) {\n\
  return function observe(promise, id) {\n\
    promise.then(function (v) { settle(id, true, v); }, function (e) { settle(id, false, e); });\n\
  };\n\
})";

impl Reactions {
    fn new(env: &Env) -> Option<Self> {
        let settle = env
            .create_function_from_closure::<(), (), _>("cleoSettle", |ctx| {
                let id = ctx.get::<f64>(0).ok();
                let fulfilled = ctx.get::<bool>(1).unwrap_or(false);
                let value = ctx.get::<Unknown>(2).ok();
                let reaction = REACTIONS.with(|slot| {
                    let mut slot = slot.borrow_mut();
                    slot.as_mut()?.waiting.remove(&(id? as u64))
                });
                if let (Some(reaction), Some(value)) = (reaction, value) {
                    reaction(ctx.env, fulfilled, value.raw());
                }
                Ok(())
            })
            .ok()?;
        let make: Unknown = env.run_script(OBSERVE_SOURCE).ok().or_else(|| {
            clear_exception(env);
            None
        })?;
        let global = env.get_global().ok()?;
        let observe = call_raw(env, global.raw(), make, settle).ok()?;
        let mut reference = std::ptr::null_mut();
        if unsafe { sys::napi_create_reference(env.raw(), observe.raw(), 1, &mut reference) }
            != sys::Status::napi_ok
        {
            return None;
        }
        Some(Self {
            env: env.raw() as usize,
            observe: reference,
            next: 0,
            waiting: std::collections::HashMap::new(),
        })
    }
}

impl<T> std::future::Future for Pending<T> {
    type Output = std::result::Result<T, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|settled| settled.unwrap_or_else(|_| Err(closing().to_string())))
    }
}

/// `T::from_napi_value`, leaving no exception pending when it fails (a getter or a Proxy trap
/// may throw while the value is read).
fn read_value<T: FromNapiValue>(env: &Env, raw: sys::napi_value) -> Result<T> {
    unsafe { T::from_napi_value(env.raw(), raw) }.map_err(|e| match take_exception(env) {
        Some(thrown) => Error::new(
            Status::InvalidArg,
            format!("reading the value threw {thrown}"),
        ),
        None => e,
    })
}

/// `value` read as `T` (a string, a number, [`Lenient`], …), leaving no exception pending
/// when reading it throws.
pub fn read<T: FromNapiValue>(env: &Env, value: Unknown<'_>) -> Result<T> {
    read_value(env, value.raw())
}

/// `value` as an object, or None when it is anything else (a function included).
pub fn as_object<'env>(env: &'env Env, value: Unknown<'env>) -> Result<Option<Object<'env>>> {
    Ok(match value.get_type()? {
        ValueType::Object => Some(unsafe { Object::from_napi_value(env.raw(), value.raw())? }),
        _ => None,
    })
}

/// `object[name]` when it is a string; None when it is absent, another type, or reading it
/// threw (nothing is left pending).
pub fn string_property(object: &Object<'_>, name: &str) -> Option<String> {
    let env = Env::from_raw(object.value().env);
    let value = get_property(&env, object, name).ok()?;
    if value.get_type().ok()? != ValueType::String {
        return None;
    }
    read(&env, value).ok()
}

/// A JS function kept across calls and threads: a handler, a factory, an unsubscribe, a
/// logger's bound method. Dropped anywhere: napi releases the reference on the JS thread.
pub struct JsFn(FunctionRef<(), Unknown<'static>>);

impl JsFn {
    /// `value`, kept; when it is not a function, the thrown `TypeError` "`{name}` must be a
    /// function" (`name` as the caller knows it: `AgentPoller.onMessage: handler`).
    pub fn new(env: &Env, value: Unknown<'_>, name: &str) -> Result<Self> {
        match Self::if_function(env, value)? {
            Some(function) => Ok(function),
            None => Err(type_error(env, format!("{name} must be a function"))),
        }
    }

    /// `value`, kept, when it is a function; None for anything else (what a JS transport's
    /// `subscribe` returned may be anything).
    pub fn if_function(env: &Env, value: Unknown<'_>) -> Result<Option<Self>> {
        if value.get_type()? != ValueType::Function {
            return Ok(None);
        }
        let function: Function<(), Unknown<'static>> =
            unsafe { Function::from_napi_value(env.raw(), value.raw())? };
        Ok(Some(Self(function.create_ref()?)))
    }

    /// `function.bind(this)`, kept: the bound function keeps its `this` however it is called
    /// later (pino's and winston's methods need theirs).
    pub fn bind<T: ToNapiValue>(env: &Env, function: Unknown<'_>, this: T) -> Result<Self> {
        let object = unsafe { Object::from_napi_value(env.raw(), function.raw())? };
        let bind = get_property(env, &object, "bind")?;
        let bound = apply(env, &object, bind, this)?;
        Self::if_function(env, bound)?.ok_or_else(|| {
            Error::new(
                Status::InvalidArg,
                "bind() did not return a function".to_owned(),
            )
        })
    }

    /// The function itself, on the JS thread: one lookup for a run of [`call`]s.
    pub fn get<'env>(&self, env: &'env Env) -> Result<Unknown<'env>> {
        let function = self.0.borrow_back(env)?;
        Ok(unsafe { Unknown::from_raw_unchecked(env.raw(), function.raw()) })
    }

    /// `function(...args)` with `this` undefined, on the JS thread (see [`call`]).
    pub fn call<'env, A: JsValuesTupleIntoVec>(
        &self,
        env: &'env Env,
        args: A,
    ) -> Result<Unknown<'env>> {
        call(env, self.get(env)?, args)
    }

    /// Calls it and observes what it returns (see [`observe`]).
    pub fn call_observed<A: JsValuesTupleIntoVec>(
        &self,
        env: &Env,
        args: A,
        then: impl FnOnce(Ended) + Send + 'static,
    ) {
        observe(env, self.call(env, args), then)
    }
}

/// How a call into JS ended, once what it returned (`T | Promise<T>`) settled.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// It returned a value, or a promise that fulfilled.
    Returned,
    /// It threw, or could not be called; the text describes what was thrown.
    Threw(String),
    /// The promise it returned rejected, or cannot be observed.
    Rejected(String),
}

/// The one way the boundary observes `T | Promise<T>` when nobody waits for the value: `then`
/// runs at once for a value or a throw; for a promise, off the JS thread (in the current
/// span) when it settles, its rejection always observed, never unhandled. On the JS thread.
pub fn observe(env: &Env, called: Result<Unknown<'_>>, then: impl FnOnce(Ended) + Send + 'static) {
    let returned = match called {
        Ok(returned) => returned,
        Err(e) => return then(Ended::Threw(describe(&e))),
    };
    if !returned.is_promise().unwrap_or(false) {
        return then(Ended::Returned);
    }
    let promise = match Pending::<UnknownReturnValue>::observe(env, returned) {
        Ok(promise) => promise,
        Err(e) => {
            return then(Ended::Rejected(format!(
                "its promise cannot be observed: {}",
                describe(&e)
            )));
        }
    };
    super::runtime_context(|| {
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            then(match promise.await {
                Ok(_) => Ended::Returned,
                Err(why) => Ended::Rejected(why),
            })
        }))
    });
}

/// What `subscribe(handler)` handed out: each entry lives until the `unsubscribe` function JS
/// got back is called, or its owner drains them all (`disconnect()`). The one registry
/// behind every `subscribe` of the boundary.
pub struct Subscriptions<T> {
    entries: Mutex<Vec<(u64, T)>>,
    next: AtomicU64,
}

impl<T> Default for Subscriptions<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl<T: Send + 'static> Subscriptions<T> {
    /// Adds `entry`; returns the `unsubscribe` function for JS. Calling it removes the entry
    /// and hands it to `removed`, with whether no entry is left; a second call does nothing.
    pub fn add<'env>(
        self: &Arc<Self>,
        env: &'env Env,
        entry: T,
        removed: impl Fn(&Env, T, bool) + 'static,
    ) -> Result<Function<'env, (), ()>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.entries).push((id, entry));
        let registry = Arc::downgrade(self);
        env.create_function_from_closure("unsubscribe", move |ctx| {
            let Some(registry) = registry.upgrade() else {
                return Ok(());
            };
            let taken = {
                let mut entries = lock(&registry.entries);
                let at = entries.iter().position(|(entry, _)| *entry == id);
                at.map(|at| (entries.remove(at).1, entries.is_empty()))
            };
            if let Some((entry, last)) = taken {
                removed(ctx.env, entry, last);
            }
            Ok(())
        })
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.entries).is_empty()
    }

    /// Removes every entry (their `unsubscribe` functions then do nothing).
    pub fn drain(&self) -> Vec<T> {
        lock(&self.entries)
            .drain(..)
            .map(|(_, entry)| entry)
            .collect()
    }
}

impl<T: Clone + Send + 'static> Subscriptions<T> {
    /// The entries now, in the order they were added.
    pub fn snapshot(&self) -> Vec<T> {
        lock(&self.entries)
            .iter()
            .map(|(_, entry)| entry.clone())
            .collect()
    }
}

/// A JS value read as JSON, leniently: `undefined` is `null` at the top and absent inside
/// objects; functions and symbols are absent; cycles and depth are cut at [`MAX_DEPTH`].
pub struct Lenient(pub Value);

impl FromNapiValue for Lenient {
    unsafe fn from_napi_value(env: sys::napi_env, value: sys::napi_value) -> Result<Self> {
        let env = Env::from_raw(env);
        let mut budget = MAX_NODES;
        let value = unsafe { Unknown::from_raw_unchecked(env.raw(), value) };
        Ok(Lenient(
            to_json(&env, value, MAX_DEPTH, &mut budget)?.unwrap_or(Value::Null),
        ))
    }
}

/// A JS value read as JSON in one step where it can be: `JSON.stringify` inside V8, then
/// `serde_json`, instead of one Node-API call per property and string (a page of 50 messages
/// is over a thousand of those, each a trip through V8's handle machinery and a copy).
/// Anything `JSON.stringify` cannot say the way [`Lenient`] reads it falls back to
/// [`Lenient`]: a value that is not an object, a throw (a BigInt, a cycle, a throwing
/// getter), or text `serde_json` does not take back (nesting past its limit). Both read
/// absent members, `undefined`, functions and symbols alike, and a Date as its ISO text.
pub struct Json(pub Value);

impl FromNapiValue for Json {
    unsafe fn from_napi_value(env: sys::napi_env, value: sys::napi_value) -> Result<Self> {
        if let Some(read) = stringified(&Env::from_raw(env), value) {
            return Ok(Json(read));
        }
        Ok(Json(unsafe { Lenient::from_napi_value(env, value) }?.0))
    }
}

/// `value` through `JSON.stringify` and back, or None (see [`Json`]); nothing left pending.
fn stringified(env: &Env, value: sys::napi_value) -> Option<Value> {
    let mut kind = sys::ValueType::napi_undefined;
    if unsafe { sys::napi_typeof(env.raw(), value, &mut kind) } != sys::Status::napi_ok
        || kind != sys::ValueType::napi_object
    {
        return None;
    }
    // An empty page, what an idle poll returns: no text to write and read back.
    let mut is_array = false;
    let mut length = 0;
    if unsafe { sys::napi_is_array(env.raw(), value, &mut is_array) } == sys::Status::napi_ok
        && is_array
        && unsafe { sys::napi_get_array_length(env.raw(), value, &mut length) }
            == sys::Status::napi_ok
        && length == 0
    {
        return Some(Value::Array(Vec::new()));
    }
    let mut global = std::ptr::null_mut();
    let mut json = std::ptr::null_mut();
    let mut stringify = std::ptr::null_mut();
    let mut text = std::ptr::null_mut();
    let called = unsafe {
        sys::napi_get_global(env.raw(), &mut global) == sys::Status::napi_ok
            && sys::napi_get_named_property(env.raw(), global, c"JSON".as_ptr(), &mut json)
                == sys::Status::napi_ok
            && sys::napi_get_named_property(env.raw(), json, c"stringify".as_ptr(), &mut stringify)
                == sys::Status::napi_ok
            && sys::napi_call_function(env.raw(), json, stringify, 1, &value, &mut text)
                == sys::Status::napi_ok
    };
    if !called {
        clear_exception(env);
        return None;
    }
    if unsafe { sys::napi_typeof(env.raw(), text, &mut kind) } != sys::Status::napi_ok
        || kind != sys::ValueType::napi_string
    {
        return None;
    }
    let text = read_value::<String>(env, text).ok()?;
    serde_json::from_str(&text).ok()
}

/// `JSON.parse(text)`: many JS objects made in one call into V8 (a batch of messages for a
/// handler), each with the shape V8 shares between objects with the same keys, instead of one
/// Node-API call per property. A throw is an `Err`, with nothing left pending.
pub fn parse_json<'env>(env: &'env Env, text: &str) -> Result<Unknown<'env>> {
    let global = env.get_global()?;
    let json: Object = global
        .get_named_property("JSON")
        .map_err(|e| cleared(env, e))?;
    let parse = get_property(env, &json, "parse")?;
    apply(env, &json, parse, text)
}

/// `JSON.parse(text)` as an array (a batch of messages), or None when it is not one.
pub fn parse_json_array<'env>(env: &'env Env, text: &str) -> Option<Array<'env>> {
    let parsed = parse_json(env, text).ok()?;
    // Reading its length fails for anything but an array.
    unsafe { Array::from_napi_value(env.raw(), parsed.raw()) }.ok()
}

fn to_json(env: &Env, value: Unknown<'_>, depth: u32, budget: &mut usize) -> Result<Option<Value>> {
    if *budget == 0 {
        return Err(Error::new(Status::InvalidArg, "value too large".to_owned()));
    }
    *budget -= 1;
    let raw = value.raw();
    Ok(match value.get_type()? {
        ValueType::Undefined | ValueType::Function | ValueType::Symbol | ValueType::External => {
            None
        }
        ValueType::Null => Some(Value::Null),
        ValueType::Boolean => Some(Value::Bool(unsafe {
            bool::from_napi_value(env.raw(), raw)?
        })),
        ValueType::Number => {
            let n = unsafe { f64::from_napi_value(env.raw(), raw)? };
            Some(if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n).map_or(Value::Null, Value::Number)
            })
        }
        ValueType::String => Some(Value::String(unsafe {
            String::from_napi_value(env.raw(), raw)?
        })),
        ValueType::BigInt => Some(Value::String(unsafe { coerce_to_string(env, raw)? })),
        ValueType::Object if depth == 0 => None,
        ValueType::Object => {
            let object = unsafe { Object::from_napi_value(env.raw(), raw)? };
            if object.is_array()? {
                let len = object.get_array_length()?;
                let mut items = Vec::with_capacity(len.min(4096) as usize);
                for i in 0..len {
                    let item: Unknown = object.get_element(i)?;
                    items.push(to_json(env, item, depth - 1, budget)?.unwrap_or(Value::Null));
                }
                Some(Value::Array(items))
            } else if value.is_date()? {
                let iso = get_property(env, &object, "toISOString")?;
                let text = apply(env, &object, iso, ())?;
                Some(Value::String(read_value::<String>(env, text.raw())?))
            } else {
                let mut map = Map::new();
                for key in Object::keys(&object)? {
                    let item: Unknown = object.get_named_property(&key)?;
                    if let Some(v) = to_json(env, item, depth - 1, budget)? {
                        map.insert(key, v);
                    }
                }
                Some(Value::Object(map))
            }
        }
        _ => None,
    })
}

unsafe fn coerce_to_string(env: &Env, raw: sys::napi_value) -> Result<String> {
    let mut out = std::ptr::null_mut();
    check_status!(unsafe { sys::napi_coerce_to_string(env.raw(), raw, &mut out) })?;
    unsafe { String::from_napi_value(env.raw(), out) }
}

/// A JS object kept alive across calls, released on its JS thread when dropped, wherever
/// the drop happens.
///
/// The reference is a napi-rs [`FunctionRef`] (a `napi_ref` works for any value; napi-rs
/// neither checks nor needs the value to be a function): dropped on its JS thread it is
/// deleted there; dropped elsewhere, napi-rs hands it to its own per-environment
/// threadsafe function, which lives as long as the environment. Releasing it through this
/// module's job queue instead lost it whenever the queue was closed: a stopped poller's
/// aborted loops are dropped on a tokio worker, sometimes after the wrapper was finalized
/// and the last service of the thread stopped, and the transport then stayed referenced
/// until the process ended.
pub struct PersistentObject {
    reference: FunctionRef<(), Unknown<'static>>,
    js: JsThread,
}

impl PersistentObject {
    pub fn new(object: &Object<'_>, js: JsThread) -> Result<Self> {
        let value: Function<(), Unknown<'static>> =
            unsafe { Function::from_napi_value(object.value().env, object.raw())? };
        Ok(Self {
            reference: value.create_ref()?,
            js,
        })
    }

    pub fn get<'env>(&self, env: &'env Env) -> Result<Object<'env>> {
        let value = self.reference.borrow_back(env)?;
        unsafe { Object::from_napi_value(env.raw(), value.raw()) }
    }

    pub fn js(&self) -> &JsThread {
        &self.js
    }

    /// Calls `object[method](...args)` with `this` bound to the object, and reads what it
    /// returns (a value or a promise). Must run on the JS thread.
    pub fn call_method<A: JsValuesTupleIntoVec, T: FromNapiValue + Send + 'static>(
        &self,
        env: &Env,
        method: &str,
        args: A,
    ) -> Result<Settle<T>> {
        let object = self.get(env)?;
        let function = get_property(env, &object, method)?;
        if function.get_type()? != ValueType::Function {
            return Err(Error::new(
                Status::InvalidArg,
                format!("{method} is not a function"),
            ));
        }
        let returned = apply(env, &object, function, args)?;
        Settle::read(env, returned)
    }
}

/// `function.apply(this, args)` that turns a JS throw into an `Err` and leaves no exception
/// pending (napi's own `apply` leaves it pending, to be rethrown as uncaught later, and its
/// conversion of the thrown value throws again for a Symbol).
pub fn apply<'env, A: JsValuesTupleIntoVec>(
    env: &'env Env,
    this: &Object<'env>,
    function: Unknown<'env>,
    args: A,
) -> Result<Unknown<'env>> {
    call_raw(env, this.raw(), function, args)
}

/// Calls `function(...args)` with `this` undefined, as a plain function call does (a handler).
pub fn call<'env, A: JsValuesTupleIntoVec>(
    env: &'env Env,
    function: Unknown<'env>,
    args: A,
) -> Result<Unknown<'env>> {
    let mut undefined = std::ptr::null_mut();
    check_status!(unsafe { sys::napi_get_undefined(env.raw(), &mut undefined) })?;
    call_raw(env, undefined, function, args)
}

fn call_raw<'env, A: JsValuesTupleIntoVec>(
    env: &'env Env,
    this: sys::napi_value,
    function: Unknown<'env>,
    args: A,
) -> Result<Unknown<'env>> {
    let args = match args.into_vec(env.raw()) {
        Ok(args) => args,
        Err(e) => return Err(cleared(env, e)),
    };
    let mut returned = std::ptr::null_mut();
    let status = unsafe {
        sys::napi_call_function(
            env.raw(),
            this,
            function.raw(),
            args.len(),
            args.as_ptr(),
            &mut returned,
        )
    };
    match status {
        sys::Status::napi_ok => Ok(unsafe { Unknown::from_raw_unchecked(env.raw(), returned) }),
        other => Err(cleared(
            env,
            Error::new(
                Status::from(other),
                "calling a JavaScript function failed".to_owned(),
            ),
        )),
    }
}

/// `object[name]`, with a throwing getter or Proxy trap as an `Err` and nothing left pending.
pub fn get_property<'env>(
    env: &'env Env,
    object: &Object<'env>,
    name: &str,
) -> Result<Unknown<'env>> {
    object
        .get_named_property::<Unknown>(name)
        .map_err(|e| cleared(env, e))
}

/// `err`, or — when an exception is pending — that exception as the error, cleared.
fn cleared(env: &Env, err: Error) -> Error {
    match take_exception(env) {
        Some(thrown) => Error::new(Status::GenericFailure, thrown),
        None => err,
    }
}

/// Takes the pending exception, if any, described as text.
pub fn take_exception(env: &Env) -> Option<String> {
    let mut pending = false;
    let status = unsafe { sys::napi_is_exception_pending(env.raw(), &mut pending) };
    if status != sys::Status::napi_ok || !pending {
        return None;
    }
    let mut thrown = std::ptr::null_mut();
    if unsafe { sys::napi_get_and_clear_last_exception(env.raw(), &mut thrown) }
        != sys::Status::napi_ok
    {
        return Some("an exception that could not be read".to_owned());
    }
    Some(describe_thrown(env, thrown))
}

/// The longest description of a thrown value kept (a handler may throw a megabyte string).
const MAX_THROWN_TEXT: usize = 2000;

/// Text for any value JS threw or rejected with, on the JS thread. Never throws and leaves no
/// exception pending: every step that runs JS (`toString`, a getter, a Proxy trap) is tried,
/// and what it throws is cleared and the next way tried.
pub fn describe_thrown(env: &Env, value: sys::napi_value) -> String {
    let text = describe_value(env, value);
    capped(env, text)
}

/// `text` cut to [`MAX_THROWN_TEXT`], with nothing left pending.
fn capped(env: &Env, mut text: String) -> String {
    clear_exception(env);
    if text.len() > MAX_THROWN_TEXT {
        let mut cut = MAX_THROWN_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Text for a rejection reason: an `Error`'s message alone (as a rejection has always read),
/// anything else as [`describe_thrown`] describes it.
fn describe_rejection(env: &Env, value: sys::napi_value) -> String {
    let mut is_error = false;
    if unsafe { sys::napi_is_error(env.raw(), value, &mut is_error) } == sys::Status::napi_ok
        && is_error
        && let Some(message) = property_text(env, value, c"message")
        && !message.is_empty()
    {
        return capped(env, message);
    }
    describe_thrown(env, value)
}

fn describe_value(env: &Env, value: sys::napi_value) -> String {
    let mut kind = sys::ValueType::napi_undefined;
    if unsafe { sys::napi_typeof(env.raw(), value, &mut kind) } != sys::Status::napi_ok {
        return "a value that cannot be read".to_owned();
    }
    match kind {
        sys::ValueType::napi_undefined => "undefined".to_owned(),
        sys::ValueType::napi_null => "null".to_owned(),
        sys::ValueType::napi_string => {
            read_value::<String>(env, value).unwrap_or_else(|_| "a string".to_owned())
        }
        sys::ValueType::napi_symbol => match property_text(env, value, c"description") {
            Some(description) => format!("Symbol({description})"),
            None => "Symbol()".to_owned(),
        },
        sys::ValueType::napi_boolean
        | sys::ValueType::napi_number
        | sys::ValueType::napi_bigint => {
            coerced_text(env, value).unwrap_or_else(|| "a primitive value".to_owned())
        }
        // An Error reads as "Error: message" through its toString; anything else as its own
        // toString, or its `message`; a revoked Proxy or an object whose every read throws
        // says so.
        _ => coerced_text(env, value)
            .or_else(|| property_text(env, value, c"message"))
            .unwrap_or_else(|| "an object that cannot be turned into text".to_owned()),
    }
}

/// `String(value)`, or None when that throws.
fn coerced_text(env: &Env, value: sys::napi_value) -> Option<String> {
    let mut text = std::ptr::null_mut();
    if unsafe { sys::napi_coerce_to_string(env.raw(), value, &mut text) } != sys::Status::napi_ok {
        clear_exception(env);
        return None;
    }
    read_value::<String>(env, text).ok()
}

/// `value[name]` when it is a string, or None (absent, another type, or it threw).
fn property_text(env: &Env, value: sys::napi_value, name: &std::ffi::CStr) -> Option<String> {
    let mut property = std::ptr::null_mut();
    if unsafe { sys::napi_get_named_property(env.raw(), value, name.as_ptr(), &mut property) }
        != sys::Status::napi_ok
    {
        clear_exception(env);
        return None;
    }
    let mut kind = sys::ValueType::napi_undefined;
    if unsafe { sys::napi_typeof(env.raw(), property, &mut kind) } != sys::Status::napi_ok
        || kind != sys::ValueType::napi_string
    {
        return None;
    }
    read_value::<String>(env, property).ok()
}

fn clear_exception(env: &Env) {
    let mut pending = false;
    if unsafe { sys::napi_is_exception_pending(env.raw(), &mut pending) } == sys::Status::napi_ok
        && pending
    {
        let mut thrown = std::ptr::null_mut();
        unsafe { sys::napi_get_and_clear_last_exception(env.raw(), &mut thrown) };
    }
}

fn closing() -> CoreError {
    CoreError::NotConnected("the JavaScript environment is shutting down".into())
}

/// Text for a napi error: the JS error's message when one was thrown.
pub fn describe(err: &Error) -> String {
    if err.reason.is_empty() {
        format!("{:?}", err.status)
    } else {
        err.reason.clone()
    }
}

/// For a method that returns a promise: `err` came from [`type_error`], so the `TypeError` is
/// pending; take it back and make it the promise's rejection (callers `.catch` it or await
/// it, and a synchronous throw from a promise-returning method would surprise them).
pub fn rejected<'env, T: ToNapiValue + Send + 'static>(
    env: &'env Env,
    err: Error,
) -> Result<PromiseRaw<'env, T>> {
    let mut pending = false;
    check_status!(unsafe { sys::napi_is_exception_pending(env.raw(), &mut pending) })?;
    let reason = if pending {
        let mut thrown = std::ptr::null_mut();
        check_status!(unsafe { sys::napi_get_and_clear_last_exception(env.raw(), &mut thrown) })?;
        Error::from(unsafe { Unknown::from_raw_unchecked(env.raw(), thrown) })
    } else {
        err
    };
    env.spawn_future(async move { Err::<T, Error>(reason) })
}

/// A `TypeError` object made now, on the JS thread, as the error a promise rejects with: the
/// rejection is that very object (`instanceof TypeError` holds).
pub fn type_error_object(env: &Env, message: String) -> Error {
    let error = napi::JsTypeError::from(Error::new(Status::InvalidArg, message));
    let made = unsafe { error.into_value(env.raw()) };
    Error::from(unsafe { Unknown::from_raw_unchecked(env.raw(), made) })
}

/// Throws a `TypeError` and returns the error that tells napi it is already thrown.
pub fn type_error(env: &Env, message: impl AsRef<str>) -> Error {
    let message = message.as_ref();
    match env.throw_type_error(message, None) {
        Ok(()) => Error::new(Status::PendingException, message.to_owned()),
        Err(e) => e,
    }
}
