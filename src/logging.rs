//! Log output: `tracing` to stderr, warnings only unless `CLEO_RUNTIME_LOG` says otherwise.
//!
//! `CLEO_RUNTIME_LOG` takes an `EnvFilter` directive (`debug`, `trace`,
//! `cleo_runtime::core::poller=debug`, …). API keys never reach a log line: they live in
//! [`crate::core::credentials::ApiKey`], whose `Debug` and `Display` are redacted.

use std::sync::Once;

use tracing_subscriber::EnvFilter;

/// The environment variable that sets the log filter.
pub const LOG_ENV: &str = "CLEO_RUNTIME_LOG";

/// Installs the stderr subscriber once per process; later calls do nothing.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Unset, empty or unparsable: the default (warnings), never silence.
        let filter = std::env::var(LOG_ENV)
            .ok()
            .filter(|spec| !spec.trim().is_empty())
            .and_then(|spec| EnvFilter::try_new(spec).ok())
            .unwrap_or_else(|| EnvFilter::new("warn"));
        // A host process may already have a global subscriber; then we log through it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .with_ansi(false)
            .try_init();
    });
}
