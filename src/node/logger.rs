//! `setLogger(logger)` and `RuntimeConfig.logger`: the runtime's log records into the
//! application's logger instead of stderr (routing: [`crate::logging`]).
//!
//! A logger is one of
//!
//! - a function, called with one record `{ level, target, message, fields }`;
//! - an object with `debug`, `info`, `warn` and `error` methods (`trace` too, used when it
//!   is a function, else `debug`), called as `logger[level](message, fields)`, the order
//!   `console` and winston take; pino (recognised by its `bindings()` method) is called
//!   `logger[level](fields, message)`, its own order. `fields` carries `target` too.
//!
//! Methods are bound to their object once, when the logger is given: a threadsafe function
//! calls with `this === undefined`, and pino's and winston's methods need their `this`.
//!
//! Records cross to the JS thread through a weak threadsafe function of their own, queue
//! [`LOG_QUEUE`] deep: logging never waits for the JS thread (it runs on the service loops)
//! and never takes room from the queues that carry messages. A full queue drops the record
//! and counts it; the next record that gets through is preceded by a warning saying how many
//! were dropped. A logger that throws or rejects never crashes the process: the record it
//! threw on is written to stderr instead, and the first failure says so on stderr once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use napi::Env;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{
    ThreadsafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi_derive::napi;
use serde_json::{Map, json};
use tracing::Level;

use super::js::{Ended, JsFn, as_object, type_error};
use crate::core::sync::lock;
use crate::logging::{Record, Sink, Undelivered, write_stderr};

/// Records queued for the JS thread before new ones are dropped (and counted).
pub const LOG_QUEUE: usize = 1024;

/// How the logger wants its arguments.
enum Style {
    /// `logger(record)`.
    Record,
    /// `logger[level](message, fields)`: console, winston, bunyan.
    MessageFirst,
    /// `logger[level](fields, message)`: pino.
    FieldsFirst,
}

type Bound = JsFn;

/// The logger's functions, bound to it.
struct Target {
    style: Style,
    /// One function for a function logger; else trace, debug, info, warn, error.
    functions: Vec<Bound>,
}

impl Target {
    fn function_for(&self, level: Level) -> &Bound {
        if self.functions.len() == 1 {
            return &self.functions[0];
        }
        let index = match level {
            Level::TRACE => 0,
            Level::DEBUG => 1,
            Level::INFO => 2,
            Level::WARN => 3,
            Level::ERROR => 4,
        };
        &self.functions[index]
    }
}

#[derive(Default)]
struct Health {
    /// Records dropped since the last one delivered.
    dropped: AtomicU64,
    /// The first failure of the logger was reported.
    reported: AtomicBool,
}

type Slot = Arc<Mutex<Option<Record>>>;
type Queue = ThreadsafeFunction<Slot, (), (), Status, false, true, LOG_QUEUE>;

/// A JS logger as a [`Sink`].
pub struct JsLogger {
    queue: Queue,
    health: Arc<Health>,
}

impl Sink for JsLogger {
    fn send(&self, record: Record) -> std::result::Result<(), Undelivered> {
        // `call` consumes what it is given even when it refuses it: hand it a slot, so a
        // refused record can be taken back for the next destination.
        let slot: Slot = Arc::new(Mutex::new(Some(record)));
        match self
            .queue
            .call(slot.clone(), ThreadsafeFunctionCallMode::NonBlocking)
        {
            Status::Ok => Ok(()),
            Status::QueueFull => {
                self.health.dropped.fetch_add(1, Ordering::Relaxed);
                Err(Undelivered::Dropped)
            }
            _ => match lock(&slot).take() {
                Some(record) => Err(Undelivered::Closed(record)),
                None => Err(Undelivered::Dropped),
            },
        }
    }
}

/// Reads a logger given by JS; `None` for `null`/`undefined` (back to the default).
/// `owner` names the argument in the `TypeError`, e.g. `createRuntime: config.logger`.
pub fn read(env: &Env, value: Option<Unknown<'_>>, owner: &str) -> Result<Option<Arc<JsLogger>>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let want = "a function or an object with debug(), info(), warn() and error() methods";
    let target = match value.get_type()? {
        ValueType::Undefined | ValueType::Null => return Ok(None),
        ValueType::Function => Target {
            style: Style::Record,
            // Bound to `undefined`: called as a plain function would be.
            functions: vec![JsFn::bind(env, value, ())?],
        },
        ValueType::Object => {
            let object = as_object(env, value)?.expect("an object");
            let method = |name: &str| -> Result<Option<Unknown<'_>>> {
                let m: Unknown = object.get_named_property(name)?;
                Ok((m.get_type()? == ValueType::Function).then_some(m))
            };
            let mut functions = Vec::with_capacity(5);
            for name in ["debug", "info", "warn", "error"] {
                match method(name)? {
                    Some(m) => functions.push(JsFn::bind(env, m, object)?),
                    None => {
                        return Err(type_error(
                            env,
                            format!("{owner} must be {want} ({owner}.{name} is not a function)"),
                        ));
                    }
                }
            }
            let trace = match method("trace")? {
                Some(m) => JsFn::bind(env, m, object)?,
                None => JsFn::bind(env, method("debug")?.expect("checked above"), object)?,
            };
            functions.insert(0, trace);
            let style = if method("bindings")?.is_some() {
                Style::FieldsFirst
            } else {
                Style::MessageFirst
            };
            Target { style, functions }
        }
        other => {
            return Err(type_error(
                env,
                format!(
                    "{owner} must be {want} (got {})",
                    super::config::type_name(other)
                ),
            ));
        }
    };
    Ok(Some(Arc::new(JsLogger::new(env, target)?)))
}

impl JsLogger {
    fn new(env: &Env, target: Target) -> Result<Self> {
        let health = Arc::new(Health::default());
        let noop = env.create_function_from_closure::<(), (), _>("cleoRuntimeLog", |_| Ok(()))?;
        let state = health.clone();
        let queue = noop
            .build_threadsafe_function::<Slot>()
            .callee_handled::<false>()
            // Weak: a pending record never keeps the process alive.
            .weak::<true>()
            .max_queue_size::<LOG_QUEUE>()
            .build_callback(move |ctx: ThreadsafeCallContext<Slot>| {
                let record = lock(&ctx.value).take();
                if let Some(record) = record {
                    deliver(&ctx.env, &target, &state, record);
                }
                Ok(())
            })?;
        Ok(Self { queue, health })
    }
}

/// On the JS thread: the drop notice when records were dropped, then the record.
fn deliver(env: &Env, target: &Target, health: &Arc<Health>, record: Record) {
    let dropped = health.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let mut fields = Map::new();
        fields.insert("dropped".into(), json!(dropped));
        let notice = Record {
            level: Level::WARN,
            target: module_path!().to_owned(),
            message: format!(
                "{dropped} log records dropped: the logger did not keep up (the queue holds {LOG_QUEUE})"
            ),
            fields,
        };
        call(env, target, health, notice);
    }
    call(env, target, health, record);
}

/// Calls the logger with `record`. A throw writes the record to stderr instead; a rejection
/// is only reported (the logger had the record); either says once that the logger fails.
fn call(env: &Env, target: &Target, health: &Arc<Health>, record: Record) {
    let called = try_call(env, target, &record);
    let health = health.clone();
    super::js::observe(env, called, move |ended| match ended {
        Ended::Returned => {}
        Ended::Threw(why) => {
            failed(&health, &why);
            write_stderr(&record);
        }
        Ended::Rejected(why) => failed(&health, &why),
    });
}

fn try_call<'env>(env: &'env Env, target: &Target, record: &Record) -> Result<Unknown<'env>> {
    let function = target.function_for(record.level);
    match target.style {
        Style::Record => {
            let record = json!({
                "level": record.level_name(),
                "target": record.target,
                "message": record.message,
                "fields": record.fields,
            });
            function.call(env, env.to_js_value(&record)?)
        }
        Style::MessageFirst | Style::FieldsFirst => {
            let mut fields = Map::with_capacity(record.fields.len() + 1);
            fields.insert("target".into(), json!(record.target));
            fields.extend(record.fields.clone());
            let fields = env.to_js_value(&fields)?;
            let message = env.to_js_value(&record.message)?;
            match target.style {
                Style::FieldsFirst => function.call(env, FnArgs::from((fields, message))),
                _ => function.call(env, FnArgs::from((message, fields))),
            }
        }
    }
}

/// Says once, on stderr, that the logger failed; the process carries on.
fn failed(health: &Health, why: &str) {
    if health.reported.swap(true, Ordering::Relaxed) {
        return;
    }
    write_stderr(&Record {
        level: Level::WARN,
        target: module_path!().to_owned(),
        message: format!(
            "the application's logger threw or rejected ({why}); records it throws on are written here instead; said once per logger"
        ),
        fields: Map::new(),
    });
}

/// Sends the runtime's log records (those of runtimes without their own
/// `RuntimeConfig.logger`) to `logger`; `null` or `undefined` sends them back to stderr.
#[napi(
    ts_args_type = "logger: import('./index').Logger | import('./index').LogFunction | null | undefined",
    ts_return_type = "void"
)]
pub fn set_logger(env: Env, logger: Option<Unknown<'_>>) -> Result<()> {
    let sink = read(&env, logger, "setLogger: logger")?;
    crate::logging::set_process_sink(sink.map(|s| s as Arc<dyn Sink>));
    Ok(())
}
