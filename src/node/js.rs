//! Calling JavaScript from tokio, safely.
//!
//! Everything the runtime does to JS values happens in a closure run on the JS thread by
//! [`JsThread`]: one weak threadsafe function per JS thread (shared by every service started
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
//!   is full, callers wait
//!   (backpressure) instead of memory growing.
//! - **no accidental liveness**: the threadsafe function is weak, so a pending call never
//!   keeps the process alive. What keeps it alive while a service runs is an explicit
//!   [`KeepAlive`], held by [`super::lifetime::Liveness`] until `stop()`.
//!
//! | Rust | JavaScript |
//! |---|---|
//! | [`Settle<T>`] | `T \| Promise<T>` returned by a JS function |
//! | [`Pending<T>`] | a JS promise awaited from Rust |
//! | [`Lenient`] | any JSON-like value; `undefined`, functions and symbols read as absent |
//! | [`PersistentObject`] | a JS object kept across calls (a transport, a registry) |

use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{
    ThreadsafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
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
type JobQueue = ThreadsafeFunction<Job, (), (), Status, false, true, QUEUE_SIZE>;

/// Runs closures on the JS thread. Cheap to clone.
#[derive(Clone)]
pub struct JsThread {
    queue: Arc<JobQueue>,
    /// The span the jobs run in.
    span: tracing::Span,
}

thread_local! {
    /// This thread's job queue and the environment it belongs to (Node runs one environment
    /// per thread; a new one on the same thread gets a new queue).
    static JOB_QUEUE: std::cell::RefCell<Option<(usize, Arc<JobQueue>)>> =
        const { std::cell::RefCell::new(None) };
}

impl JsThread {
    /// Jobs run in the span current here (a runtime's [`crate::logging::LogScope`]), so what
    /// they log reaches that runtime's logger. Must be called on the JS thread.
    pub fn new(env: &Env) -> Result<Self> {
        let key = env.raw() as usize;
        let queue = JOB_QUEUE.with(|slot| -> Result<Arc<JobQueue>> {
            let mut slot = slot.borrow_mut();
            if let Some((owner, queue)) = &*slot
                && *owner == key
            {
                return Ok(queue.clone());
            }
            let queue = Arc::new(job_queue(env)?);
            *slot = Some((key, queue.clone()));
            Ok(queue)
        })?;
        Ok(Self {
            queue,
            span: tracing::Span::current(),
        })
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

    /// Queues `job` without waiting for room; false when the queue is full or closed.
    pub fn fire(&self, job: impl FnOnce(&Env) + Send + 'static) -> bool {
        self.queue
            .call(self.in_span(job), ThreadsafeFunctionCallMode::NonBlocking)
            == Status::Ok
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
        // `call` consumes what it is given even when the queue is full, so it is given a
        // cheap handle to the job; on `QueueFull` the job is still here to queue again.
        let slot = Arc::new(Mutex::new(Some(job)));
        loop {
            let handle = slot.clone();
            let status = self.queue.call(
                Box::new(move |env: &Env| {
                    let job = lock(&handle).take();
                    if let Some(job) = job {
                        job(env);
                    }
                }),
                ThreadsafeFunctionCallMode::NonBlocking,
            );
            match status {
                Status::Ok => break,
                Status::QueueFull => pause(Duration::from_millis(1)).await,
                _ => return Err(closing()),
            }
        }
        rx.await.map_err(|_| closing())?.map_err(CoreError::Js)
    }
}

/// The weak threadsafe function that runs jobs on this JS thread.
fn job_queue(env: &Env) -> Result<JobQueue> {
    let noop = env.create_function_from_closure::<(), (), _>("cleoRuntimeJob", |_| Ok(()))?;
    noop.build_threadsafe_function::<Job>()
        .callee_handled::<false>()
        .weak::<true>()
        .max_queue_size::<QUEUE_SIZE>()
        .build_callback(move |ctx: ThreadsafeCallContext<Job>| {
            (ctx.value)(&ctx.env);
            Ok(())
        })
}

/// Holds the Node event loop open while a service runs, like an active timer. Dropping it
/// lets the process exit (once no other service of the thread holds it).
pub struct KeepAlive {
    hold: Arc<LoopHold>,
}

type HoldHandle = ThreadsafeFunction<(), (), (), Status, false, true, 1>;

/// One threadsafe function per JS thread, referenced (holding the event loop open) while any
/// [`KeepAlive`] of the thread exists: one libuv handle, not one per service (see the module
/// doc).
struct LoopHold {
    /// How many [`KeepAlive`]s exist, and the handle whose reference follows that count.
    state: Mutex<(usize, HoldHandle)>,
    /// The thread whose environment the handle belongs to, which alone may (un)reference it.
    owner: std::thread::ThreadId,
    env: usize,
    /// For a [`KeepAlive`] dropped on another thread: the unreference is made here.
    js: JsThread,
}

thread_local! {
    static LOOP_HOLD: std::cell::RefCell<Option<Arc<LoopHold>>> =
        const { std::cell::RefCell::new(None) };
}

impl KeepAlive {
    pub fn new(env: &Env) -> Result<Self> {
        let key = env.raw() as usize;
        let hold = LOOP_HOLD.with(|slot| -> Result<Arc<LoopHold>> {
            let mut slot = slot.borrow_mut();
            if let Some(hold) = &*slot
                && hold.env == key
            {
                return Ok(hold.clone());
            }
            let noop =
                env.create_function_from_closure::<(), (), _>("cleoRuntimeKeepAlive", |_| Ok(()))?;
            let handle = noop
                .build_threadsafe_function::<()>()
                .callee_handled::<false>()
                .weak::<true>()
                .max_queue_size::<1>()
                .build_callback(|_ctx: ThreadsafeCallContext<()>| Ok(()))?;
            let hold = Arc::new(LoopHold {
                state: Mutex::new((0, handle)),
                owner: std::thread::current().id(),
                env: key,
                js: JsThread::new(env)?,
            });
            *slot = Some(hold.clone());
            Ok(hold)
        })?;
        lock(&hold.state).0 += 1;
        hold.sync(env);
        Ok(Self { hold })
    }
}

impl LoopHold {
    /// References the handle while a [`KeepAlive`] exists, unreferences it once none does. On
    /// the owner thread.
    // `refer`/`unref` are deprecated in favour of cloning, which counts Rust owners; what is
    // wanted here is the libuv reference itself, and they skip a handle already torn down.
    #[allow(deprecated)]
    fn sync(&self, env: &Env) {
        let mut state = lock(&self.state);
        let (holders, handle) = &mut *state;
        // Fails only once the environment is going away, which lets the loop end anyway.
        let _ = if *holders > 0 {
            handle.refer(env)
        } else {
            handle.unref(env)
        };
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let last = {
            let mut state = lock(&self.hold.state);
            state.0 -= 1;
            state.0 == 0
        };
        if !last {
            return;
        }
        if std::thread::current().id() == self.hold.owner {
            let env = Env::from_raw(self.hold.env as sys::napi_env);
            self.hold.sync(&env);
        } else {
            let hold = self.hold.clone();
            self.hold.js.fire(move |env| hold.sync(env));
        }
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

/// A JS object kept alive across calls, released on the JS thread when dropped.
pub struct PersistentObject {
    reference: Mutex<Option<ObjectRef<false>>>,
    js: JsThread,
}

impl PersistentObject {
    pub fn new(object: &Object<'_>, js: JsThread) -> Result<Self> {
        Ok(Self {
            reference: Mutex::new(Some(object.create_ref::<false>()?)),
            js,
        })
    }

    pub fn get<'env>(&self, env: &'env Env) -> Result<Object<'env>> {
        let guard = lock(&self.reference);
        match guard.as_ref() {
            Some(reference) => reference.get_value(env),
            None => Err(Error::new(
                Status::GenericFailure,
                "object released".to_owned(),
            )),
        }
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

impl Drop for PersistentObject {
    fn drop(&mut self) {
        let reference = lock(&self.reference).take();
        if let Some(reference) = reference {
            // Releasing a reference must happen on the JS thread. If the queue is gone the
            // environment is tearing down and frees it anyway.
            self.js.fire(move |env| {
                let _ = reference.unref(env);
            });
        }
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

/// Throws a `TypeError` and returns the error that tells napi it is already thrown.
pub fn type_error(env: &Env, message: impl AsRef<str>) -> Error {
    let message = message.as_ref();
    match env.throw_type_error(message, None) {
        Ok(()) => Error::new(Status::PendingException, message.to_owned()),
        Err(e) => e,
    }
}

/// Waits `duration` unless it is zero; used to yield between retries.
pub async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}
