//! The one conversion of a core error into a JS `Error`: the message is the whole chain, the
//! outermost context first (`"push failed: HTTP 503: busy"`), as
//! [`crate::core::error::Error`]'s `Display` writes it. An error that may quote a server's
//! answer (which may echo the key back) goes through [`scrubbed`].

use napi::{Error, Status};

use crate::core::credentials::Credentials;
use crate::core::error::Error as CoreError;

/// `err` as the JS `Error` a rejected promise or a throw carries.
pub fn to_js(err: &CoreError) -> Error {
    Error::new(Status::GenericFailure, chain(err))
}

/// [`to_js`], with `credentials`' keys redacted from the text.
pub fn scrubbed(err: &CoreError, credentials: &Credentials) -> Error {
    Error::new(Status::GenericFailure, credentials.scrub(&chain(err)))
}

/// Every cause of `err`, outermost first, joined the way the core joins them.
fn chain(err: &CoreError) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        // A context's own text already ends with its cause's.
        if !text.ends_with(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        cause = inner.source();
    }
    text
}
