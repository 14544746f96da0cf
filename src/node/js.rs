//! Calling JavaScript from tokio, safely.
//!
//! Everything the runtime does to JS values happens in a closure run on the JS thread by
//! [`JsThread`]: one weak threadsafe function per service whose callback runs the closure
//! with the `Env`. That gives the boundary four properties at once:
//!
//! - **`this` is right**: methods are fetched from their object and applied to it, so a
//!   class instance's methods work (a plain threadsafe-function call passes `undefined`).
//! - **nothing crashes Node**: a JS throw comes back as an `Err`, a promise is awaited from
//!   Rust and its rejection becomes an `Err` (never an unhandled rejection).
//! - **bounded**: the queue holds [`QUEUE_SIZE`] closures; when it is full, callers wait
//!   (backpressure) instead of memory growing.
//! - **no accidental liveness**: the threadsafe function is weak, so a pending call never
//!   keeps the process alive. What keeps it alive while a service runs is an explicit
//!   [`KeepAlive`], dropped by `stop()`.
//!
//! | Rust | JavaScript |
//! |---|---|
//! | [`Settle<T>`] | `T \| Promise<T>` returned by a JS function |
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

/// Closures queued per service before callers wait.
pub const QUEUE_SIZE: usize = 512;
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
}

impl JsThread {
    pub fn new(env: &Env) -> Result<Self> {
        let noop = env.create_function_from_closure::<(), (), _>("cleoRuntimeJob", |_| Ok(()))?;
        let queue = noop
            .build_threadsafe_function::<Job>()
            .callee_handled::<false>()
            .weak::<true>()
            .max_queue_size::<QUEUE_SIZE>()
            .build_callback(|ctx: ThreadsafeCallContext<Job>| {
                (ctx.value)(&ctx.env);
                Ok(())
            })?;
        Ok(Self {
            queue: Arc::new(queue),
        })
    }

    /// Queues `job` without waiting for room; false when the queue is full or closed.
    pub fn fire(&self, job: impl FnOnce(&Env) + Send + 'static) -> bool {
        self.queue
            .call(Box::new(job), ThreadsafeFunctionCallMode::NonBlocking)
            == Status::Ok
    }

    /// Runs `job` on the JS thread and returns its result. Waits while the queue is full.
    /// `Err` when the job throws, or when the environment is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Env) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, CoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |env: &Env| {
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

/// Holds the Node event loop open while a service runs, like an active timer. Dropping it
/// lets the process exit.
pub struct KeepAlive {
    _tsfn: ThreadsafeFunction<(), (), (), Status, false, false, 1>,
}

impl KeepAlive {
    pub fn new(env: &Env) -> Result<Self> {
        let noop =
            env.create_function_from_closure::<(), (), _>("cleoRuntimeKeepAlive", |_| Ok(()))?;
        let tsfn = noop
            .build_threadsafe_function::<()>()
            .callee_handled::<false>()
            .weak::<false>()
            .max_queue_size::<1>()
            .build_callback(|_ctx: ThreadsafeCallContext<()>| Ok(()))?;
        Ok(Self { _tsfn: tsfn })
    }
}

/// A service's hold on the Node process: taken when the service starts, released by `stop()`.
#[derive(Default)]
pub struct Liveness(Mutex<Option<KeepAlive>>);

impl Liveness {
    /// Runs `start` inside the tokio runtime; when it started something, holds the process.
    pub fn start(&self, env: &Env, start: impl FnOnce() -> bool) -> Result<()> {
        let mut held = lock(&self.0);
        if super::runtime_context(start) {
            *held = Some(KeepAlive::new(env)?);
        }
        Ok(())
    }

    /// Holds the process (for something already started).
    pub fn hold(&self, env: &Env) -> Result<()> {
        *lock(&self.0) = Some(KeepAlive::new(env)?);
        Ok(())
    }

    pub fn release(&self) {
        lock(&self.0).take();
    }
}

/// A value a JS function returned: ready now, or a promise to await from Rust.
pub enum Settle<T: FromNapiValue + Send + 'static> {
    Now(T),
    Later(Promise<T>),
}

impl<T: FromNapiValue + Send + 'static> Settle<T> {
    /// Reads a return value on the JS thread.
    pub fn read(env: &Env, value: Unknown<'_>) -> Result<Self> {
        let raw = value.raw();
        if value.is_promise()? {
            Ok(Settle::Later(unsafe {
                Promise::<T>::from_napi_value(env.raw(), raw)?
            }))
        } else {
            Ok(Settle::Now(unsafe { T::from_napi_value(env.raw(), raw)? }))
        }
    }

    /// Awaits the value off the JS thread.
    pub async fn resolve(self) -> std::result::Result<T, CoreError> {
        match self {
            Settle::Now(v) => Ok(v),
            Settle::Later(p) => p.await.map_err(|e| CoreError::Js(describe(&e))),
        }
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
                let iso: Function<(), String> = object.get_named_property("toISOString")?;
                Some(Value::String(iso.apply(object, ())?))
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
        let function: Unknown = object.get_named_property(method)?;
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
/// pending (napi's own `apply` leaves it pending, to be rethrown as uncaught later).
pub fn apply<'env, A: JsValuesTupleIntoVec>(
    env: &'env Env,
    this: &Object<'env>,
    function: Unknown<'env>,
    args: A,
) -> Result<Unknown<'env>> {
    let args = args.into_vec(env.raw())?;
    let mut returned = std::ptr::null_mut();
    let status = unsafe {
        sys::napi_call_function(
            env.raw(),
            this.raw(),
            function.raw(),
            args.len(),
            args.as_ptr(),
            &mut returned,
        )
    };
    match status {
        sys::Status::napi_ok => Ok(unsafe { Unknown::from_raw_unchecked(env.raw(), returned) }),
        sys::Status::napi_pending_exception => {
            let mut thrown = std::ptr::null_mut();
            check_status!(unsafe {
                sys::napi_get_and_clear_last_exception(env.raw(), &mut thrown)
            })?;
            Err(Error::from(unsafe {
                Unknown::from_raw_unchecked(env.raw(), thrown)
            }))
        }
        other => Err(Error::new(
            Status::from(other),
            "calling a JavaScript function failed".to_owned(),
        )),
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
