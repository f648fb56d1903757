//! Front-ends for the change formats applications already emit: CloudEvents 1.0 over HTTP
//! ([`cloudevents`]) and Debezium change events ([`debezium`]). Each one only maps its format's envelope to (collection, event kind,
//! data); the data then goes through [`crate::event`]'s normalization, so item keys, limits,
//! JSON Pointers and the all-or-nothing rule are those of `POST /v1/publish`.
//!
//! Like `event`, this module imports neither tokio nor axum: the HTTP edge hands it header
//! values and the parsed body, and turns an [`IngestError`] into its JSON error.

pub mod cloudevents;
pub mod debezium;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::event::NormalizeError;

/// Why a request in one of these formats is refused. Every variant names where: a header or
/// a JSON Pointer into the body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// A header is missing or wrong (CloudEvents binary mode carries attributes in headers).
    #[error("{message}")]
    Header {
        /// The header's name, lowercase.
        header: String,
        /// Why.
        message: String,
    },
    /// The body is wrong at a JSON Pointer.
    #[error(transparent)]
    Payload(#[from] NormalizeError),
}

impl IngestError {
    fn header(header: impl Into<String>, message: impl Into<String>) -> Self {
        IngestError::Header {
            header: header.into(),
            message: message.into(),
        }
    }

    fn at(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        IngestError::Payload(NormalizeError {
            pointer: pointer.into(),
            message: message.into(),
        })
    }
}

/// A request's array of events: not empty, not over `max` (`/v1/publish`'s
/// `--max-publish-events`). `noun` names its members in the message.
fn check_batch(len: usize, max: usize, noun: &str) -> Result<(), IngestError> {
    if len == 0 {
        return Err(IngestError::at("", format!("the array of {noun} is empty")));
    }
    if len > max {
        return Err(IngestError::at(
            "",
            format!("{len} {noun} in one request; the limit is {max}"),
        ));
    }
    Ok(())
}

/// Moves an error of `event`'s normalization, whose pointer is relative to the data it was
/// given, to where that data sits in the request body.
fn under(base: &str, mut e: NormalizeError) -> IngestError {
    e.pointer = format!("{base}{}", e.pointer);
    IngestError::Payload(e)
}

/// An idempotency key derived from a format's own identity of an event (CloudEvents `source`
/// and `id`; a Debezium source position): `PREFIX:` and the SHA-256 of the parts, each
/// length-prefixed so no two different part lists give the same key. Hashing keeps any
/// identity, however long or whatever its characters, inside the 256 printable characters a
/// key has.
fn derived_key(prefix: &str, parts: &[&str]) -> Arc<str> {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut key = String::with_capacity(prefix.len() + 1 + 64);
    key.push_str(prefix);
    key.push(':');
    for byte in digest {
        key.push_str(&format!("{byte:02x}"));
    }
    Arc::from(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_valid_and_unambiguous() {
        let a = derived_key("ce", &["a#b", "c"]);
        let b = derived_key("ce", &["a", "b#c"]);
        assert_ne!(a, b);
        assert_eq!(a, derived_key("ce", &["a#b", "c"]));
        assert!(a.starts_with("ce:") && a.len() == 67);
        assert!(crate::event::idempotency_key(&a).is_ok());
    }
}
