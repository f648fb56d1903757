//! The HTTP API's error type and its JSON rendering.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
        /// The header's name.
        header: &'static str,
        /// Why.
        message: String,
    },
    /// Missing or wrong publish key.
    #[error("a valid publish key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// No such route.
    #[error("no such route")]
    NotFound,
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
    /// Not `application/json`.
    #[error("the request body must be JSON: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// Not ready (shutting down, backplane down).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. } => StatusCode::BAD_REQUEST,
            ApiError::InvalidPayload { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } | ApiError::EventTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } => "INVALID_JSON",
            ApiError::InvalidPayload { .. } => "INVALID_PAYLOAD",
            ApiError::InvalidHeader { .. } => "INVALID_HEADER",
            ApiError::Unauthorized => "UNAUTHORIZED",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ApiError::EventTooLarge { .. } => "EVENT_TOO_LARGE",
            ApiError::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ApiError::Unavailable(_) => "SERVICE_UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    fn pointer(&self) -> Option<&str> {
        match self {
            ApiError::InvalidPayload { pointer, .. } => Some(pointer),
            ApiError::InvalidHeader { header, .. } => Some(header),
            ApiError::UnsupportedMediaType => Some("content-type"),
            ApiError::Unauthorized => Some("authorization"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error serving an HTTP request");
        }
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let (Some(pointer), Some(obj)) = (self.pointer(), error.as_object_mut()) {
            obj.insert("where".into(), pointer.into());
        }
        let mut response = (self.status(), Json(json!({ "error": error }))).into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
