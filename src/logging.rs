//! Log output: `tracing` events become [`Record`]s, written to stderr unless the host hands
//! the runtime a [`Sink`] (the Node side's is an application logger: pino, winston,
//! `console`, a function), for the whole process or for one runtime.
//!
//! # Routing
//!
//! A runtime's services run inside its [`LogScope`]: a `tracing` span created by the scope,
//! which their loops are instrumented with (see [`crate::core::task`]) and which the span
//! registry carries the scope's data on. For each event the [`Router`] layer looks for the
//! nearest scope among the event's spans, then delivers the record to the first of
//!
//! 1. the scope's own sink (`RuntimeConfig.logger`),
//! 2. the process sink (`setLogger`),
//! 3. stderr,
//!
//! so a record goes to exactly one place. A sink that reports itself closed (its JS
//! environment is gone) is forgotten and the next one takes the record.
//!
//! # What a record holds
//!
//! Level, target (the module), message, and the event's fields; inside a scope also
//! `agentId`, and every string is scrubbed of the scope's keys
//! ([`Credentials::scrub`]) on top of the rule that keys are never logged at all
//! ([`crate::core::credentials::ApiKey`] prints `[redacted]`).
//!
//! # Filter
//!
//! `CLEO_RUNTIME_LOG` takes an `EnvFilter` directive (`debug`, `trace`,
//! `cleo_runtime::core::poller=debug`, …); unset, empty or unparsable it is `warn`. It
//! applies to every destination. Scope spans are enabled whatever it says, so routing does
//! not depend on the level.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Once, OnceLock, RwLock};

use serde_json::{Map, Number, Value};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Span, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;

use crate::core::credentials::Credentials;

/// The environment variable that sets the log filter.
pub const LOG_ENV: &str = "CLEO_RUNTIME_LOG";

/// The target and name of a scope's span (so a filter can tell it from any other).
const SCOPE_TARGET: &str = "cleo_runtime::scope";
const SCOPE_NAME: &str = "runtime";

/// One log record, as a logger receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub level: Level,
    /// The Rust module that logged it, e.g. `cleo_runtime::core::sse`.
    pub target: String,
    pub message: String,
    pub fields: Map<String, Value>,
}

impl Record {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub fn level_name(&self) -> &'static str {
        match self.level {
            Level::TRACE => "trace",
            Level::DEBUG => "debug",
            Level::INFO => "info",
            Level::WARN => "warn",
            Level::ERROR => "error",
        }
    }

    /// One line as stderr shows it: time, level, target, message, `key=value` fields (in
    /// name order).
    pub fn to_line(&self) -> String {
        let mut line = String::new();
        let _ =
            SystemTime.format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut line));
        let _ = write!(line, " {:>5} {}: {}", self.level, self.target, self.message);
        for (key, value) in &self.fields {
            let _ = match value {
                // Quoted only when the value would not read as one token.
                Value::String(s)
                    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"') =>
                {
                    write!(line, " {key}={s:?}")
                }
                Value::String(s) => write!(line, " {key}={s}"),
                other => write!(line, " {key}={other}"),
            };
        }
        line.push('\n');
        line
    }
}

/// Why a sink did not take a record.
#[derive(Debug)]
pub enum Undelivered {
    /// Its queue was full: the record is dropped (the sink counts it).
    Dropped,
    /// The sink is gone for good; the record is handed back for the next destination.
    Closed(Record),
}

/// Somewhere records go. `send` must not block: it runs on the thread that logged, which is
/// usually a service loop.
pub trait Sink: Send + Sync {
    fn send(&self, record: Record) -> Result<(), Undelivered>;
}

/// Stderr, the default destination.
pub struct Stderr;

impl Sink for Stderr {
    fn send(&self, record: Record) -> Result<(), Undelivered> {
        write_stderr(&record);
        Ok(())
    }
}

/// Writes `record` to stderr as one line (one write, so lines from threads do not mix).
pub fn write_stderr(record: &Record) {
    let _ = std::io::stderr()
        .lock()
        .write_all(record.to_line().as_bytes());
}

type SinkSlot = RwLock<Option<Arc<dyn Sink>>>;

/// The process sink (`setLogger`).
static PROCESS_SINK: SinkSlot = RwLock::new(None);

/// Sends every record not claimed by a scope to `sink`; `None`: back to stderr.
pub fn set_process_sink(sink: Option<Arc<dyn Sink>>) {
    *PROCESS_SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

fn current(slot: &SinkSlot) -> Option<Arc<dyn Sink>> {
    slot.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Empties `slot` if it still holds `sink` (it may have been replaced meanwhile).
fn forget(slot: &SinkSlot, sink: &Arc<dyn Sink>) {
    let mut held = slot.write().unwrap_or_else(|e| e.into_inner());
    if held.as_ref().is_some_and(|h| Arc::ptr_eq(h, sink)) {
        *held = None;
    }
}

/// What a scope's span carries.
struct ScopeData {
    credentials: OnceLock<Arc<Credentials>>,
    sink: SinkSlot,
}

/// The records of one runtime's services: a span to run them in, the agent they act for,
/// and where their records go. Cheap to clone.
#[derive(Clone)]
pub struct LogScope {
    span: Span,
    data: Arc<ScopeData>,
}

impl LogScope {
    /// A scope whose records go to `sink`, else where the process's go.
    pub fn new(sink: Option<Arc<dyn Sink>>) -> Self {
        let data = Arc::new(ScopeData {
            credentials: OnceLock::new(),
            sink: RwLock::new(sink),
        });
        let span = tracing::error_span!(target: SCOPE_TARGET, SCOPE_NAME);
        // The data rides on the span in the registry, where the router finds it from any
        // event inside. Another subscriber (a host that installed its own) cannot carry it:
        // then records simply go where that subscriber sends them.
        span.with_subscriber(|(id, dispatch)| {
            if let Some(span) = dispatch
                .downcast_ref::<Registry>()
                .and_then(|registry| registry.span(id))
            {
                span.extensions_mut().insert(data.clone());
            }
        });
        Self { span, data }
    }

    /// The agent the scope acts for, once known: its records then carry `agentId` and are
    /// scrubbed of its keys. Later calls change nothing.
    pub fn bind(&self, credentials: &Arc<Credentials>) {
        let _ = self.data.credentials.set(credentials.clone());
    }

    /// The span its services run in.
    pub fn span(&self) -> &Span {
        &self.span
    }
}

/// The layer that turns events into records and routes them.
pub struct Router {
    process: &'static SinkSlot,
    fallback: Arc<dyn Sink>,
}

impl Router {
    fn route(&self, scope: Option<&ScopeData>, record: Record) {
        let mut record = record;
        let slots = scope.map(|s| &s.sink).into_iter().chain([self.process]);
        for slot in slots {
            let Some(sink) = current(slot) else { continue };
            match sink.send(record) {
                Ok(()) | Err(Undelivered::Dropped) => return,
                Err(Undelivered::Closed(back)) => {
                    forget(slot, &sink);
                    record = back;
                }
            }
        }
        let _ = self.fallback.send(record);
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Router {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let scope = ctx.event_scope(event).and_then(|spans| {
            spans
                .into_iter()
                .find_map(|span| span.extensions().get::<Arc<ScopeData>>().cloned())
        });
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut record = Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message: fields.message,
            fields: fields.fields,
        };
        if let Some(credentials) = scope.as_ref().and_then(|s| s.credentials.get()) {
            scrub(&mut record, credentials);
            record
                .fields
                .entry("agentId")
                .or_insert_with(|| Value::String(credentials.agent_id().to_owned()));
        }
        self.route(scope.as_deref(), record);
    }
}

fn scrub(record: &mut Record, credentials: &Credentials) {
    record.message = credentials.scrub(&record.message);
    for value in record.fields.values_mut() {
        if let Value::String(s) = value {
            *s = credentials.scrub(s);
        }
    }
}

/// An event's message and fields, as JSON values.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields and the message arrive here, their Debug being their Display.
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::Number(value.into()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::Number(value.into()));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let value =
            Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
}

/// Lets scope spans through whatever `CLEO_RUNTIME_LOG` says: routing must not depend on it.
struct ScopeSpans;

fn is_scope(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target() == SCOPE_TARGET && meta.name() == SCOPE_NAME
}

impl<S> Filter<S> for ScopeSpans {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        is_scope(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_scope(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // The scope span's own level.
        Some(LevelFilter::ERROR)
    }
}

/// The filter `CLEO_RUNTIME_LOG` asks for (`warn` unless it parses).
fn env_filter() -> EnvFilter {
    std::env::var(LOG_ENV)
        .ok()
        .filter(|spec| !spec.trim().is_empty())
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"))
}

/// A subscriber that routes through `process` and falls back to `fallback`.
fn subscriber(
    filter: EnvFilter,
    process: &'static SinkSlot,
    fallback: Arc<dyn Sink>,
) -> impl Subscriber + Send + Sync {
    let router = Router { process, fallback };
    tracing_subscriber::registry().with(router.with_filter(filter.or(ScopeSpans)))
}

/// Installs the router as the process's subscriber, once; later calls do nothing.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // A host process may already have a global subscriber; then we log through it.
        let _ = subscriber(env_filter(), &PROCESS_SINK, Arc::new(Stderr)).try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credentials::ApiKey;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Record>>);

    impl Sink for Collect {
        fn send(&self, record: Record) -> Result<(), Undelivered> {
            self.0.lock().unwrap().push(record);
            Ok(())
        }
    }

    impl Collect {
        fn messages(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.message.clone())
                .collect()
        }
    }

    /// A sink whose JS side is gone.
    struct Gone;

    impl Sink for Gone {
        fn send(&self, record: Record) -> Result<(), Undelivered> {
            Err(Undelivered::Closed(record))
        }
    }

    /// Runs `f` with a router of its own (its own process slot and fallback).
    fn with_router(
        directive: &str,
        f: impl FnOnce(&'static SinkSlot, &Arc<Collect>),
    ) -> Arc<Collect> {
        let process: &'static SinkSlot = Box::leak(Box::new(RwLock::new(None)));
        let fallback = Arc::new(Collect::default());
        let subscriber = subscriber(EnvFilter::new(directive), process, fallback.clone());
        tracing::subscriber::with_default(subscriber, || f(process, &fallback));
        fallback
    }

    #[test]
    fn fields_and_level_become_the_record() {
        let stderr = with_router("warn", |_, _| {
            tracing::info!("below the filter");
            tracing::warn!(count = 3, ok = true, ratio = 0.5, name = "a b", shown = %"x", "hello {}", "there");
        });
        let records = stderr.0.lock().unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.level_name(), "warn");
        assert_eq!(r.target, module_path!());
        assert_eq!(r.message, "hello there");
        assert_eq!(
            Value::Object(r.fields.clone()),
            serde_json::json!({ "count": 3, "ok": true, "ratio": 0.5, "name": "a b", "shown": "x" })
        );
        let line = r.to_line();
        assert!(line.contains(" WARN cleo_runtime::logging::tests: hello there count=3 name=\"a b\" ok=true ratio=0.5 shown=x\n"), "{line}");
    }

    #[test]
    fn records_go_to_the_scope_then_the_process_then_stderr() {
        let runtime_sink = Arc::new(Collect::default());
        let process_sink = Arc::new(Collect::default());
        let stderr = with_router("warn", |process, _| {
            tracing::warn!("before any logger");
            *process.write().unwrap() = Some(process_sink.clone());
            let scope = LogScope::new(Some(runtime_sink.clone()));
            let bare = LogScope::new(None);
            scope.span().in_scope(|| tracing::warn!("in the runtime"));
            bare.span()
                .in_scope(|| tracing::warn!("in a runtime without its own logger"));
            tracing::warn!("outside");
            // An event marked as a root is the process's, even inside a scope.
            scope
                .span()
                .in_scope(|| tracing::warn!(parent: None, "process-wide"));
        });
        assert_eq!(stderr.messages(), ["before any logger"]);
        assert_eq!(runtime_sink.messages(), ["in the runtime"]);
        assert_eq!(
            process_sink.messages(),
            [
                "in a runtime without its own logger",
                "outside",
                "process-wide"
            ]
        );
    }

    #[test]
    fn a_scope_follows_its_tasks_and_names_and_scrubs_its_agent() {
        let sink = Arc::new(Collect::default());
        with_router("warn", |_, _| {
            let scope = LogScope::new(Some(sink.clone()));
            let credentials = Credentials::new("alice", ApiKey::new("sk-secret-1"));
            scope.bind(&credentials);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let task = scope.span().in_scope(|| {
                    crate::core::task::RunningTask::spawn(|_token| async {
                        tokio::task::yield_now().await;
                        tracing::warn!(
                            error = "server said: bad key sk-secret-1",
                            "from a task sk-secret-1"
                        );
                    })
                });
                while !task.is_finished() {
                    tokio::task::yield_now().await;
                }
            });
        });
        let records = sink.0.lock().unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].message, "from a task [redacted]");
        assert_eq!(
            records[0].fields["error"],
            "server said: bad key [redacted]"
        );
        assert_eq!(records[0].fields["agentId"], "alice");
    }

    #[test]
    fn a_closed_sink_is_forgotten_and_the_next_takes_the_record() {
        let stderr = with_router("warn", |process, _| {
            *process.write().unwrap() = Some(Arc::new(Gone));
            let scope = LogScope::new(Some(Arc::new(Gone)));
            scope.span().in_scope(|| tracing::warn!("first"));
            assert!(process.read().unwrap().is_none());
            tracing::warn!("second");
        });
        assert_eq!(stderr.messages(), ["first", "second"]);
    }

    #[test]
    fn scopes_route_whatever_the_filter_says() {
        let sink = Arc::new(Collect::default());
        // Only one module is logged: the scope span must still exist for routing.
        with_router("cleo_runtime::logging=warn", |_, _| {
            let scope = LogScope::new(Some(sink.clone()));
            scope.span().in_scope(|| tracing::warn!("routed"));
        });
        assert_eq!(sink.messages(), ["routed"]);
    }
}
