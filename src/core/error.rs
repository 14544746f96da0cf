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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the server asked us to wait, for a 429 or 503 with `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Errors worth trying on the fallback base URL: the server was not reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Network(_) | Error::Timeout)
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
        }
    }
}

impl std::error::Error for Error {}
