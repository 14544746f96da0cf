//! What every HTTP client of the process shares: TLS trust, proxies, the user agent, and a
//! TLS failure named once in the log.
//!
//! Both clients (REST in [`super::signaldock`], streams in [`super::sse::http`]) come from
//! [`client`], so they trust the same roots and take the same proxies:
//!
//! - **Roots**: the system's (rustls-platform-verifier: on Linux the distribution's bundle,
//!   `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), plus the PEM file named by
//!   `NODE_EXTRA_CA_CERTS`, the variable Node users already set for a private CA.
//! - **`NODE_TLS_REJECT_UNAUTHORIZED=0`** turns certificate verification off, as it does for
//!   Node's own TLS, with one loud warning per process (Node prints one too).
//! - **Proxies**: reqwest reads `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`
//!   (lower case too) itself; nothing here turns that off. Loopback is not bypassed
//!   implicitly: only what `NO_PROXY` lists is.
//!
//! The environment is read once, when the first client is built (Node reads
//! `NODE_EXTRA_CA_CERTS` once at startup too).
//!
//! A refused certificate used to show only as a `lastError` string deep in a `status()`:
//! [`note_failure`] names its cause (unknown issuer, expired, name mismatch, …) in one
//! warning per host and cause.

use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::{Mutex, OnceLock};

use reqwest::{Certificate, ClientBuilder};

use super::sync::lock;

/// Node's variable naming a PEM file of extra CA certificates.
pub const EXTRA_CA_ENV: &str = "NODE_EXTRA_CA_CERTS";
/// Node's variable that, when exactly `0`, turns certificate verification off.
pub const REJECT_UNAUTHORIZED_ENV: &str = "NODE_TLS_REJECT_UNAUTHORIZED";
/// Distinct (host, cause) pairs remembered for [`note_failure`]; past it, no more warnings.
const MAX_NOTED: usize = 256;

/// The TLS trust read from the environment.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// CA certificates added to the system roots.
    pub extra_roots: Vec<Certificate>,
    /// False under `NODE_TLS_REJECT_UNAUTHORIZED=0`.
    pub verify: bool,
    /// What the environment asked for that could not be honoured, as warnings to log.
    pub problems: Vec<String>,
}

impl Trust {
    /// Reads the two variables through `var`, and the CA file through `read`.
    pub fn read(
        var: impl Fn(&str) -> Option<OsString>,
        read: impl Fn(&std::path::Path) -> std::io::Result<Vec<u8>>,
    ) -> Self {
        let mut trust = Trust {
            verify: true,
            ..Trust::default()
        };
        // Node compares the string with '0' exactly; anything else keeps verification on.
        if var(REJECT_UNAUTHORIZED_ENV).is_some_and(|v| v == "0") {
            trust.verify = false;
        }
        let Some(path) = var(EXTRA_CA_ENV).filter(|p| !p.is_empty()) else {
            return trust;
        };
        let path = std::path::PathBuf::from(path);
        // As Node does: a file that cannot be used is a warning, and the system roots stay.
        let ignored = |why: String| {
            format!(
                "{EXTRA_CA_ENV}: ignoring extra CA certificates from {}: {why}",
                path.display()
            )
        };
        match read(&path) {
            Err(e) => trust.problems.push(ignored(e.to_string())),
            Ok(pem) => match Certificate::from_pem_bundle(&pem) {
                Err(e) => trust.problems.push(ignored(chain(&e))),
                Ok(certs) if certs.is_empty() => trust
                    .problems
                    .push(ignored("no PEM certificate in the file".into())),
                Ok(certs) => trust.extra_roots = certs,
            },
        }
        trust
    }

    fn from_env() -> Self {
        Self::read(|name| std::env::var_os(name), |path| std::fs::read(path))
    }
}

/// How far the trust could be honoured when building a client, decided once per process.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Level {
    /// System roots plus the extra ones (or no verification, when asked).
    Full,
    /// The extra roots were refused by the TLS stack: system roots only.
    SystemOnly,
    /// No system roots could be loaded: the extra roots alone (maybe none).
    ExtraOnly,
}

fn apply(builder: ClientBuilder, trust: &Trust, level: Level) -> ClientBuilder {
    let builder = builder.user_agent(concat!("cleo-runtime/", env!("CARGO_PKG_VERSION")));
    if !trust.verify {
        return builder.tls_danger_accept_invalid_certs(true);
    }
    match level {
        Level::Full => builder.tls_certs_merge(trust.extra_roots.iter().cloned()),
        Level::SystemOnly => builder,
        Level::ExtraOnly => builder.tls_certs_only(trust.extra_roots.iter().cloned()),
    }
}

/// The first level whose client builds, with a warning for each that did not.
fn choose_level(trust: &Trust) -> (Level, Vec<String>) {
    let mut warnings = Vec::new();
    let mut levels = vec![Level::Full];
    if !trust.extra_roots.is_empty() {
        levels.push(Level::SystemOnly);
    }
    levels.push(Level::ExtraOnly);
    for level in levels {
        match apply(reqwest::Client::builder(), trust, level).build() {
            Ok(_) => return (level, warnings),
            Err(e) => warnings.push(match level {
                Level::Full if !trust.extra_roots.is_empty() => format!(
                    "{EXTRA_CA_ENV}: the extra CA certificates could not be used: {}",
                    chain(&e)
                ),
                _ => format!(
                    "no system CA certificates could be loaded ({}): https connections will fail unless {EXTRA_CA_ENV} names a PEM file with the server's CA",
                    chain(&e)
                ),
            }),
        }
    }
    (Level::ExtraOnly, warnings)
}

struct Settings {
    trust: Trust,
    level: Level,
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let trust = Trust::from_env();
        let (level, warnings) = choose_level(&trust);
        // Process-wide facts, not any runtime's: logged outside every span (`parent: None`),
        // so they reach the process's logger, whichever runtime built the first client.
        for problem in trust.problems.iter().chain(&warnings) {
            tracing::warn!(parent: None, "{problem}");
        }
        if !trust.verify {
            tracing::warn!(
                parent: None,
                "{REJECT_UNAUTHORIZED_ENV} is '0': TLS certificates are not verified, so connections to SignalDock (REST and streams) are insecure. Node warns the same for its own TLS."
            );
        }
        if !trust.extra_roots.is_empty() && level == Level::Full {
            tracing::debug!(
                parent: None,
                count = trust.extra_roots.len(),
                "{EXTRA_CA_ENV}: extra CA certificates added to the system roots"
            );
        }
        Settings { trust, level }
    })
}

/// A client with the process's TLS trust, proxies and user agent; `configure` adds what is
/// particular to it (timeouts, redirects, keep-alive).
pub fn client(configure: impl FnOnce(ClientBuilder) -> ClientBuilder) -> reqwest::Client {
    let settings = settings();
    let builder = apply(reqwest::Client::builder(), &settings.trust, settings.level);
    configure(builder)
        .build()
        .expect("the HTTP client builds with the TLS settings it was probed with")
}

/// Why a TLS connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsCause {
    UnknownIssuer,
    Expired,
    NotYetValid,
    NameMismatch,
    Revoked,
    BadSignature,
    /// Another certificate problem, as rustls words it.
    Certificate(String),
    /// Not the certificate: the handshake itself (protocol versions, alerts, not TLS at all).
    Handshake(String),
}

impl TlsCause {
    /// Short and stable, for the log record's `cause` field.
    pub fn label(&self) -> &'static str {
        match self {
            TlsCause::UnknownIssuer => "unknown issuer",
            TlsCause::Expired => "expired",
            TlsCause::NotYetValid => "not yet valid",
            TlsCause::NameMismatch => "name mismatch",
            TlsCause::Revoked => "revoked",
            TlsCause::BadSignature => "bad signature",
            TlsCause::Certificate(_) => "certificate refused",
            TlsCause::Handshake(_) => "handshake failed",
        }
    }

    /// One sentence for a person, with what to do when there is something to do.
    pub fn explain(&self) -> String {
        match self {
            TlsCause::UnknownIssuer => format!(
                "its certificate is not signed by a trusted CA (unknown issuer); for a private CA, set {EXTRA_CA_ENV} to a PEM file with the CA's certificate"
            ),
            TlsCause::Expired => "its certificate has expired".into(),
            TlsCause::NotYetValid => {
                "its certificate is not valid yet (is this machine's clock right?)".into()
            }
            TlsCause::NameMismatch => {
                "its certificate is not valid for this host name (name mismatch)".into()
            }
            TlsCause::Revoked => "its certificate has been revoked".into(),
            TlsCause::BadSignature => "its certificate's signature does not verify".into(),
            TlsCause::Certificate(why) => format!("its certificate was refused: {why}"),
            TlsCause::Handshake(why) => format!("the TLS handshake failed: {why}"),
        }
    }
}

/// The TLS cause inside an error's chain, if TLS is what failed.
pub fn tls_cause(err: &(dyn std::error::Error + 'static)) -> Option<TlsCause> {
    let mut next = Some(err);
    while let Some(cause) = next {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(classify(tls));
        }
        // `io::Error::source` skips the error it wraps (it returns *that* error's source),
        // and the TLS stack reports through an `io::Error`, itself wrapped in another one by
        // the connector: look inside each.
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    None
}

fn classify(err: &rustls::Error) -> TlsCause {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => TlsCause::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => TlsCause::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsCause::NotYetValid,
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsCause::NameMismatch,
            C::Revoked => TlsCause::Revoked,
            C::BadSignature => TlsCause::BadSignature,
            other => TlsCause::Certificate(format!("{other:?}")),
        },
        other => TlsCause::Handshake(other.to_string()),
    }
}

/// Looks for a TLS failure in `err` and, the first time this host fails for this cause,
/// says so in a warning.
pub fn note_failure(err: &reqwest::Error) {
    let Some(cause) = tls_cause(err) else {
        return;
    };
    let host = err
        .url()
        .and_then(|url| {
            let host = url.host_str()?;
            Some(match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            })
        })
        .unwrap_or_default();
    if first_time(&host, cause.label()) {
        tracing::warn!(
            host = %host,
            cause = cause.label(),
            "TLS connection to {host} refused: {}",
            cause.explain()
        );
    }
}

fn first_time(host: &str, label: &'static str) -> bool {
    static NOTED: OnceLock<Mutex<HashSet<(String, &'static str)>>> = OnceLock::new();
    let mut noted = lock(NOTED.get_or_init(Mutex::default));
    noted.len() < MAX_NOTED && noted.insert((host.to_owned(), label))
}

/// `err` and its sources, joined by `: `.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError as C;

    #[test]
    fn causes_are_named() {
        let cases = [
            (C::UnknownIssuer, "unknown issuer"),
            (C::Expired, "expired"),
            (C::NotValidYet, "not yet valid"),
            (C::NotValidForName, "name mismatch"),
            (C::Revoked, "revoked"),
            (C::BadSignature, "bad signature"),
            (C::BadEncoding, "certificate refused"),
        ];
        for (cert, label) in cases {
            let err = rustls::Error::InvalidCertificate(cert);
            assert_eq!(tls_cause(&err).unwrap().label(), label);
        }
        let handshake = rustls::Error::NoCertificatesPresented;
        assert_eq!(tls_cause(&handshake).unwrap().label(), "handshake failed");
    }

    #[test]
    fn found_inside_an_io_error_deep_in_a_chain() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        // As the connector reports it: an `io::Error` around an `io::Error` around rustls'.
        let io = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(C::Expired),
        ));
        assert_eq!(tls_cause(&Outer(io)), Some(TlsCause::Expired));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_cause(&Outer(plain)), None);
    }

    #[test]
    fn unknown_issuer_says_what_to_do() {
        assert!(TlsCause::UnknownIssuer.explain().contains(EXTRA_CA_ENV));
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn no_file(_: &std::path::Path) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory",
        ))
    }

    #[test]
    fn reject_unauthorized_is_off_only_for_exactly_zero() {
        for (value, verify) in [
            ("0", false),
            ("1", true),
            ("false", true),
            ("", true),
            (" 0", true),
        ] {
            let trust = Trust::read(env(&[(REJECT_UNAUTHORIZED_ENV, value)]), no_file);
            assert_eq!(trust.verify, verify, "{value:?}");
        }
        assert!(Trust::read(env(&[]), no_file).verify);
    }

    #[test]
    fn an_unusable_ca_file_is_a_warning_naming_it() {
        let trust = Trust::read(env(&[(EXTRA_CA_ENV, "/nowhere/ca.pem")]), no_file);
        assert!(trust.extra_roots.is_empty());
        assert_eq!(trust.problems.len(), 1);
        assert!(
            trust.problems[0].contains("/nowhere/ca.pem"),
            "{:?}",
            trust.problems
        );
        assert!(
            trust.problems[0].contains("No such file"),
            "{:?}",
            trust.problems
        );

        let garbage = Trust::read(env(&[(EXTRA_CA_ENV, "/x.pem")]), |_| Ok(b"hello".to_vec()));
        assert!(garbage.extra_roots.is_empty());
        assert!(
            garbage.problems[0].contains("no PEM certificate"),
            "{:?}",
            garbage.problems
        );

        let unset = Trust::read(env(&[(EXTRA_CA_ENV, "")]), no_file);
        assert!(unset.problems.is_empty());
    }

    #[test]
    fn the_first_failure_per_host_and_cause_is_noted_once() {
        assert!(first_time("a.test:1", "expired"));
        assert!(!first_time("a.test:1", "expired"));
        assert!(first_time("a.test:1", "unknown issuer"));
        assert!(first_time("b.test:1", "expired"));
    }
}
