//! The core's error type. Messages are safe to show: they never contain an API key (errors
//! that may quote a request are scrubbed by [`super::credentials::Credentials::scrub`]
//! before they are built).

use std::fmt;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// The server answered with a non-2xx status.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// No answer within the request timeout.
    Timeout,
    /// Connecting, sending or reading failed (refused, reset, DNS…).
    Network(String),
    /// The answer was not the JSON the contract promises.
    Decode(String),
    /// The answer was larger than the client reads (a smaller page may fit).
    TooLarge { limit: usize },
    /// The transport or service is not connected (or was closed).
    NotConnected(String),
    /// A JavaScript callback threw, rejected, or returned the wrong shape.
    Js(String),
    /// Local storage (`signaldock.db`) failed; the text names the file or the table.
    Storage(String),
    /// A configuration value is unusable.
    Config(String),
    /// What was being done when `cause` happened: `"{context}: {cause}"`, with `cause` as
    /// the error's `source()`, so the chain survives up to the JS `Error`.
    Context { context: String, cause: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This error as the cause of a failed `context` (`"transport.connect() failed"`).
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            cause: Box::new(self),
        }
    }

    /// The innermost cause.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { cause, .. } => cause.root(),
            other => other,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.root() {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the server asked us to wait, for a 429 or 503 with `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.root() {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Errors worth trying on the fallback base URL: the server was not reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self.root(), Error::Network(_) | Error::Timeout)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Status {
                status, message, ..
            } if message.is_empty() => write!(f, "HTTP {status}"),
            Error::Status {
                status, message, ..
            } => write!(f, "HTTP {status}: {message}"),
            Error::Timeout => f.write_str("request timed out"),
            Error::Network(why) => write!(f, "network error: {why}"),
            Error::Decode(why) => write!(f, "invalid response: {why}"),
            Error::TooLarge { limit } => {
                write!(f, "invalid response: answer larger than {limit} bytes")
            }
            Error::NotConnected(what) => write!(f, "{what}"),
            Error::Js(why) => write!(f, "JavaScript callback failed: {why}"),
            Error::Storage(why) => f.write_str(why),
            Error::Config(why) => write!(f, "invalid configuration: {why}"),
            Error::Context { context, cause } => write!(f, "{context}: {cause}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Context { cause, .. } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_keeps_its_cause_as_text_and_as_source() {
        let err = Error::Timeout
            .context("ack")
            .context("createRuntime: transport.connect() failed");
        assert_eq!(
            err.to_string(),
            "createRuntime: transport.connect() failed: ack: request timed out"
        );
        let inner = std::error::Error::source(&err).expect("a cause");
        assert_eq!(inner.to_string(), "ack: request timed out");
        assert!(err.is_unreachable(), "looks through the context");
        let status = Error::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
            message: String::new(),
        }
        .context("peek");
        assert_eq!(
            (status.status(), status.retry_after()),
            (Some(429), Some(Duration::from_secs(2)))
        );
    }
}
