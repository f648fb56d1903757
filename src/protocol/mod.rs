//! Wire types of the WebSocket protocol (Directus realtime), and nothing else: parsing client
//! frames into [`ClientMessage`]s with the exact validation messages Directus sends, and
//! encoding server frames with Directus' key order (`type`, `event`/`status`, `data`/`error`,
//! `uid`). Free of tokio and axum. The contract itself is written in `protocol/` at the repo root.

mod client;
mod server;

pub use client::{
    parse_client, AuthRequest, ClientMessage, Credentials, ItemsAction, ItemsRequest,
    SubscribeRequest,
};
pub use server::{
    auth_ok, error_frame, event_frame, init_frame, items_frame, pong, server_ping,
    subscription_frame, unsubscribe_ack,
};

/// A place in a collection's log: the `position` of event and `init` frames and the `since`
/// of a resuming `subscribe` (a Tidings extension, see `protocol/README.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePosition {
    /// The log's lifetime; offsets of another epoch mean nothing.
    pub epoch: Arc<str>,
    /// The offset of the last event at or before this place (0: before the first).
    pub offset: u64,
}

impl WirePosition {
    /// `{"epoch":"…","offset":N}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"epoch\":{},\"offset\":{}}}",
            json_string(&self.epoch),
            self.offset
        )
    }
}

use std::sync::Arc;

use serde_json::{Number, Value};

/// A client's correlation id: a string or a number, echoed back.
///
/// `pong`, `auth` and `unsubscribe` replies echo it with its JSON type; `subscription` frames
/// always carry it as a string (`String(uid)` in Directus: 42 comes back as `"42"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    /// A string uid.
    Str(Arc<str>),
    /// A numeric uid.
    Num(Number),
}

impl Uid {
    /// Reads a uid from a JSON value, if it is a string or a number.
    pub fn from_value(v: &Value) -> Option<Uid> {
        match v {
            Value::String(s) => Some(Uid::Str(Arc::from(s.as_str()))),
            Value::Number(n) => Some(Uid::Num(n.clone())),
            _ => None,
        }
    }

    /// The uid as `subscription` frames carry it: always a string.
    pub fn as_subscription_str(&self) -> Arc<str> {
        match self {
            Uid::Str(s) => s.clone(),
            Uid::Num(n) => Arc::from(n.to_string()),
        }
    }

    /// The uid encoded as JSON with its original type.
    pub fn to_json(&self) -> String {
        match self {
            Uid::Str(s) => json_string(s),
            Uid::Num(n) => n.to_string(),
        }
    }
}

/// Encodes a string as a JSON string literal.
pub fn json_string(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// Error codes sent in `{"status":"error","error":{"code":…}}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not JSON or fails validation.
    InvalidPayload,
    /// A subscription query is invalid (bad operator, bad limit, bad filter JSON…).
    InvalidQuery,
    /// The subscriber may not read the collection, field or item.
    Forbidden,
    /// Authentication failed.
    AuthFailed,
    /// The token expired while connected.
    TokenExpired,
    /// No re-authentication within the auth timeout after expiry.
    AuthTimeout,
    /// Too many messages (rate limit).
    RequestsExceeded,
    /// A Tidings limit was reached (e.g. subscriptions per connection).
    LimitExceeded,
    /// A Directus feature Tidings does not have (`items` writes).
    Unsupported,
    /// An `items` request on a collection that cannot answer it (Directus' code for a system
    /// collection; Tidings': a collection that retains no items).
    InvalidCollection,
}

impl ErrorCode {
    /// Every code, for metrics initialization.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidPayload,
        ErrorCode::InvalidQuery,
        ErrorCode::Forbidden,
        ErrorCode::AuthFailed,
        ErrorCode::TokenExpired,
        ErrorCode::AuthTimeout,
        ErrorCode::RequestsExceeded,
        ErrorCode::LimitExceeded,
        ErrorCode::Unsupported,
        ErrorCode::InvalidCollection,
    ];

    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidPayload => "INVALID_PAYLOAD",
            ErrorCode::InvalidQuery => "INVALID_QUERY",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::AuthTimeout => "AUTH_TIMEOUT",
            ErrorCode::RequestsExceeded => "REQUESTS_EXCEEDED",
            ErrorCode::LimitExceeded => "LIMIT_EXCEEDED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::InvalidCollection => "INVALID_COLLECTION",
        }
    }
}

/// A protocol error to send back: the frame's `type`, the code, the message, the uid to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError {
    /// The `type` of the error frame (`server`, `subscribe`, `auth`, …).
    pub kind: &'static str,
    /// The error code.
    pub code: ErrorCode,
    /// The human-readable message.
    pub message: String,
    /// The uid to echo, if the error is tied to a request that had one.
    pub uid: Option<Uid>,
    /// The query parameter at fault (`filter`, `fields`, `limit`…), when one is: never sent
    /// on the socket (Directus' frames have no such field); the HTTP read names it in `where`.
    pub at: Option<&'static str>,
}

impl ProtocolError {
    /// Builds an error.
    pub fn new(
        kind: &'static str,
        code: ErrorCode,
        message: impl Into<String>,
        uid: Option<Uid>,
    ) -> Self {
        ProtocolError {
            kind,
            code,
            message: message.into(),
            uid,
            at: None,
        }
    }

    /// The same error, naming the query parameter at fault.
    pub fn at(mut self, parameter: &'static str) -> Self {
        self.at = Some(parameter);
        self
    }

    /// The same error under another frame `type` (a read answers `items`, not `subscribe`).
    pub fn of_kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// Encodes the error frame.
    pub fn to_frame(&self) -> String {
        error_frame(self.kind, self.code, &self.message, self.uid.as_ref())
    }
}

/// WebSocket close codes Tidings uses (documented in `protocol/README.md`). Auth failures and
/// heartbeat timeouts close without a code, as Directus does.
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// An inbound text frame was not valid UTF-8 (RFC 6455 §8.1).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// An inbound message exceeded the frame limit.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error ended the session.
    pub const INTERNAL: u16 = 1011;
    /// The connection's outbox overflowed: it did not read fast enough.
    pub const SLOW_CONSUMER: u16 = 4008;
}
