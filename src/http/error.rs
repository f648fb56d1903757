//! The HTTP API's error type and its JSON rendering.

use std::borrow::Cow;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::metrics::Metrics;

/// Why a request got a 5xx: the `reason` label of `tidings_server_errors_total`. The body says
/// only what the client can do; the detail goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerErrorReason {
    /// The broker is draining.
    ShuttingDown,
    /// The backplane refused or failed the operation.
    Backplane,
    /// `--max-connections` is reached.
    ConnectionLimit,
    /// A bug or an unexpected failure.
    Internal,
}

impl ServerErrorReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerErrorReason::ShuttingDown => "shutting_down",
            ServerErrorReason::Backplane => "backplane",
            ServerErrorReason::ConnectionLimit => "connection_limit",
            ServerErrorReason::Internal => "internal",
        }
    }

    /// Every reason (`metrics::SERVER_ERROR_REASONS` pre-registers the same labels).
    pub const ALL: [ServerErrorReason; 4] = [
        ServerErrorReason::ShuttingDown,
        ServerErrorReason::Backplane,
        ServerErrorReason::ConnectionLimit,
        ServerErrorReason::Internal,
    ];

    fn advice(self) -> &'static str {
        match self {
            ServerErrorReason::ShuttingDown => "the broker is shutting down; retry on another node",
            ServerErrorReason::Backplane => "the backplane is unavailable; retry",
            ServerErrorReason::ConnectionLimit => {
                "the broker has no room for more connections; retry later"
            }
            ServerErrorReason::Internal => "internal error; retry, and report it if it persists",
        }
    }
}

/// Every way an HTTP request can fail. Internal details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("{message}")]
    InvalidJson {
        /// What the parser said.
        message: String,
    },
    /// The body is JSON but not a valid publish payload.
    #[error("{message}")]
    InvalidPayload {
        /// Why.
        message: String,
        /// JSON Pointer into the body.
        pointer: String,
    },
    /// A request header has an invalid value.
    #[error("invalid {header} header: {message}")]
    InvalidHeader {
        /// The header's name, lowercase.
        header: Cow<'static, str>,
        /// Why.
        message: String,
    },
    /// The CloudEvents webhook handshake came from an origin `--cloudevents-webhook-origins`
    /// does not list.
    #[error("events from origin `{origin}` are not accepted here")]
    OriginNotAllowed {
        /// The `WebHook-Request-Origin` asked for.
        origin: String,
    },
    /// Missing or wrong publish key.
    #[error("a valid publish key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Missing or wrong subscriber credential on a read (`GET …/items`), where the auth mode
    /// has no public permissions.
    #[error("a valid access token is required: send `Authorization: Bearer <token>` (a static token or a JWT)")]
    ReaderUnauthorized,
    /// An items read refused: the query, the permissions, the collection or the bound
    /// (the socket read's error, with its code).
    #[error("{message}")]
    Read {
        /// The protocol error code (`FORBIDDEN`, `INVALID_QUERY`, `INVALID_COLLECTION`,
        /// `LIMIT_EXCEEDED`).
        code: crate::protocol::ErrorCode,
        /// What the socket read would say.
        message: String,
        /// The query parameter at fault, when one is.
        parameter: Option<&'static str>,
    },
    /// Missing or wrong admin key (`GET /v1/admin/stats`).
    #[error("a valid admin key is required: send `Authorization: Bearer <admin key>`")]
    AdminUnauthorized,
    /// No such route.
    #[error("no such route")]
    NotFound,
    /// The route exists, the method does not.
    #[error("method not allowed here: use {allow}")]
    MethodNotAllowed {
        /// The methods the route answers, for `Allow`.
        allow: &'static str,
    },
    /// The body is over the limit.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// One event is over the backplane's message limit (NATS `max_payload`).
    #[error("event {index} is {size} bytes as sent to the backplane, over its limit of {limit} bytes; nothing was published")]
    EventTooLarge {
        /// Position of the event in the request.
        index: usize,
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The publish would create keys beyond the retained state's capacity (507).
    #[error("{message}")]
    StateFull {
        /// Names the collection and the limit.
        message: String,
        /// JSON Pointer to the event that went over (`""`: the whole body).
        pointer: String,
    },
    /// The collections file forbids undeclared collections and does not declare this one
    /// (404): nothing of the request was published.
    #[error("collection \"{collection}\" is not declared in the collections file (\"undeclared\": \"forbid\"); nothing was published")]
    UnknownCollection {
        /// The collection.
        collection: String,
        /// JSON Pointer to the event's `collection` (`/collection` for one event).
        pointer: String,
    },
    /// Not `application/json`.
    #[error("the request body must be JSON: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// A reconcile body that is neither a JSON array nor NDJSON.
    #[error("the body must be a JSON array of items (`Content-Type: application/json`) or NDJSON, one item per line (`Content-Type: application/x-ndjson`)")]
    UnsupportedReconcileMediaType,
    /// A reconcile of a collection that retains no items (422): there is no state to make
    /// equal to the set.
    #[error("collection \"{collection}\" retains no items (start Tidings with --state {collection}, or give it \"state\": true in the collections file); nothing was published")]
    NotRetained {
        /// The collection.
        collection: String,
    },
    /// One item of a reconcile is over `--max-publish-bytes` (413; the body as a whole is
    /// not bounded).
    #[error("item {pointer} is larger than --max-publish-bytes ({limit} bytes), which bounds each item of a reconcile; nothing was published")]
    ItemTooLarge {
        /// Where the item is: `/3` in an array, `line 4` in NDJSON.
        pointer: String,
        /// `--max-publish-bytes`.
        limit: usize,
    },
    /// Some events of a batch were accepted, the others not (NATS): 503 with one entry per
    /// event in `events`, accepted or `"accepted": false`. Built by [`ApiError::partial`].
    #[error(
        "the backplane is unavailable: {accepted} of {} events were accepted and will be delivered (see `events`); retry the others, from `where` on, with idempotency keys (one may have landed unacknowledged)",
        events.len()
    )]
    PartiallyAccepted {
        /// One entry per event of the request, in order.
        events: Vec<serde_json::Value>,
        /// How many were accepted.
        accepted: usize,
        /// JSON Pointer to it (`/<index>`).
        pointer: String,
    },
    /// Not ready (shutting down, backplane down, full), or a bug: a 5xx. Build it with
    /// [`ApiError::server`], which logs the detail and counts the reason.
    #[error("{}", reason.advice())]
    Server {
        /// Why (the metric label; decides the status and the advice sent).
        reason: ServerErrorReason,
        /// What went wrong inside: logged, never sent.
        detail: String,
    },
}

impl ApiError {
    /// A 5xx: logs `detail` and counts `reason` in `tidings_server_errors_total`.
    pub fn server(metrics: &Metrics, reason: ServerErrorReason, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        match reason {
            ServerErrorReason::Internal => {
                tracing::error!(%detail, "internal error serving an HTTP request")
            }
            _ => tracing::warn!(reason = reason.as_str(), %detail, "HTTP request refused (5xx)"),
        }
        metrics
            .server_errors
            .with_label_values(&[reason.as_str()])
            .inc();
        ApiError::Server { reason, detail }
    }

    /// A batch of which only some events were accepted: counted and logged as a backplane
    /// 5xx (the detail stays in the log). `events` has one entry per event; those not
    /// accepted say `"accepted": false`.
    pub fn partial(
        metrics: &Metrics,
        events: Vec<serde_json::Value>,
        detail: impl Into<String>,
    ) -> Self {
        let detail = detail.into();
        let reason = ServerErrorReason::Backplane;
        let missing = |e: &serde_json::Value| e.get("accepted") == Some(&false.into());
        let accepted = events.iter().filter(|e| !missing(e)).count();
        tracing::warn!(reason = reason.as_str(), accepted, total = events.len(), %detail, "batch partially accepted (503)");
        metrics
            .server_errors
            .with_label_values(&[reason.as_str()])
            .inc();
        let first_missing = events.iter().position(missing).unwrap_or(0);
        ApiError::PartiallyAccepted {
            events,
            accepted,
            pointer: format!("/{first_missing}"),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. } => StatusCode::BAD_REQUEST,
            ApiError::InvalidPayload { .. } | ApiError::NotRetained { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::AdminUnauthorized | ApiError::ReaderUnauthorized => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Read { code, .. } => match code {
                crate::protocol::ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                crate::protocol::ErrorCode::InvalidCollection => StatusCode::NOT_FOUND,
                crate::protocol::ErrorCode::LimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::OriginNotAllowed { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::UnknownCollection { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. }
            | ApiError::EventTooLarge { .. }
            | ApiError::ItemTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedReconcileMediaType => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::StateFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::PartiallyAccepted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Server {
                reason: ServerErrorReason::Internal,
                ..
            } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Server { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } => "INVALID_JSON",
            ApiError::InvalidPayload { .. } => "INVALID_PAYLOAD",
            ApiError::InvalidHeader { .. } => "INVALID_HEADER",
            ApiError::Unauthorized | ApiError::AdminUnauthorized | ApiError::ReaderUnauthorized => {
                "UNAUTHORIZED"
            }
            ApiError::Read { code, .. } => code.as_str(),
            ApiError::OriginNotAllowed { .. } => "FORBIDDEN",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::UnknownCollection { .. } => "UNKNOWN_COLLECTION",
            ApiError::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            ApiError::PayloadTooLarge { .. } | ApiError::ItemTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ApiError::EventTooLarge { .. } => "EVENT_TOO_LARGE",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedReconcileMediaType => {
                "UNSUPPORTED_MEDIA_TYPE"
            }
            ApiError::NotRetained { .. } => "NOT_RETAINED",
            ApiError::StateFull { .. } => "STATE_FULL",
            ApiError::PartiallyAccepted { .. } => "PARTIALLY_ACCEPTED",
            ApiError::Server {
                reason: ServerErrorReason::Internal,
                ..
            } => "INTERNAL",
            ApiError::Server { .. } => "SERVICE_UNAVAILABLE",
        }
    }

    fn pointer(&self) -> Option<&str> {
        match self {
            ApiError::InvalidPayload { pointer, .. }
            | ApiError::StateFull { pointer, .. }
            | ApiError::UnknownCollection { pointer, .. }
            | ApiError::PartiallyAccepted { pointer, .. }
            | ApiError::ItemTooLarge { pointer, .. } => Some(pointer),
            ApiError::InvalidHeader { header, .. } => Some(header),
            ApiError::UnsupportedMediaType | ApiError::UnsupportedReconcileMediaType => {
                Some("content-type")
            }
            ApiError::NotRetained { .. } => Some("collection"),
            ApiError::OriginNotAllowed { .. } => Some("webhook-request-origin"),
            ApiError::Unauthorized | ApiError::AdminUnauthorized | ApiError::ReaderUnauthorized => {
                Some("authorization")
            }
            ApiError::Read { parameter, .. } => *parameter,
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let (Some(pointer), Some(obj)) = (self.pointer(), error.as_object_mut()) {
            obj.insert("where".into(), pointer.into());
        }
        let mut body = json!({ "error": error });
        if let (ApiError::PartiallyAccepted { events, .. }, Some(obj)) =
            (&self, body.as_object_mut())
        {
            obj.insert("events".into(), events.clone().into());
        }
        let mut response = (self.status(), Json(body)).into_response();
        if let ApiError::MethodNotAllowed { allow } = self {
            response.headers_mut().insert(
                axum::http::header::ALLOW,
                axum::http::HeaderValue::from_static(allow),
            );
        }
        if matches!(self, ApiError::Unauthorized | ApiError::ReaderUnauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_batch_lists_every_event_and_points_at_the_first_missing() {
        let metrics = Metrics::new(10).expect("metrics");
        let ok = json!({"collection":"a","event":"create","items":1,"offset":7,"epoch":"e"});
        let missing = json!({"collection":"a","event":"create","items":1,"accepted":false});
        let events = vec![ok.clone(), missing.clone(), ok.clone()];
        let error = ApiError::partial(&metrics, events.clone(), "nats://10.0.0.7: err 10054");
        let message = error.to_string();
        assert!(
            message.contains("2 of 3") && message.contains("retry"),
            "{message}"
        );
        assert!(!message.contains("10.0.0.7") && !message.contains("10054"));
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.pointer(), Some("/1"));
        let counted = metrics
            .server_errors
            .with_label_values(&["backplane"])
            .get();
        assert_eq!(counted, 1);
        assert!(matches!(error, ApiError::PartiallyAccepted { events: e, .. } if e == events));
    }

    #[test]
    fn every_reason_is_pre_registered_by_metrics() {
        let labels: Vec<&str> = ServerErrorReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, crate::metrics::SERVER_ERROR_REASONS);
    }

    #[test]
    fn a_5xx_body_says_what_to_do_and_never_the_detail() {
        let metrics = Metrics::new(10).expect("metrics");
        let secret = "redis://user:hunter2@10.0.0.7:6379 refused: Connection reset by peer";
        for reason in ServerErrorReason::ALL {
            let error = ApiError::server(&metrics, reason, secret);
            let status = error.status();
            assert!(status.is_server_error(), "{reason:?}");
            let message = error.to_string();
            assert!(message.contains("retry"), "{reason:?}: {message}");
            assert!(!message.contains("hunter2") && !message.contains("10.0.0.7"));
            let response = error.into_response();
            assert_eq!(response.status(), status);
            let counted = metrics
                .server_errors
                .with_label_values(&[reason.as_str()])
                .get();
            assert_eq!(counted, 1, "{reason:?}");
        }
        let text = metrics.render().expect("render");
        assert!(
            text.contains("tidings_server_errors_total{reason=\"backplane\"} 1"),
            "{text}"
        );
    }
}
