//! `POST /v1/cloudevents` and the CloudEvents webhook handshake (`OPTIONS`). The same door
//! as `/v1/publish` (readiness, publish key, content type, size, JSON syntax: `read_body`),
//! the format's mapping in [`crate::ingest`], then the same `accept` and counters.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::publish::{accept, count, invalid, read_body};
use super::{ApiError, HttpState};
use crate::ingest::{cloudevents, IngestError};

/// `POST /v1/cloudevents`: binary, structured or batched content mode.
pub async fn cloudevents_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = read_body(&state, peer, &headers, body)?;
        let config = &state.config;
        // Batched mode's body is an array of events: a refusal points into it.
        let batch = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/cloudevents-batch+json")
            });
        let lookup = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
        let request = cloudevents::Request {
            header: &lookup,
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            body,
        };
        let events = cloudevents::normalize(
            request,
            &config.cloudevents,
            &|c| config.key_field(c).to_string(),
            config.max_publish_events,
        )
        .map_err(refused)?;
        accept(&state, events, batch).await
    }
    .await;
    count(&state, "cloudevents", result)
}

fn refused(e: IngestError) -> ApiError {
    match e {
        IngestError::Header { header, message } => ApiError::InvalidHeader {
            header: header.into(),
            message,
        },
        IngestError::Payload(e) => invalid(e),
    }
}

/// `OPTIONS /v1/cloudevents`: the CloudEvents webhook abuse-protection handshake (Event Grid
/// and others send it before the first event). It grants nothing, so it needs no publish
/// key: every `POST` is still authenticated. No callback is ever made
/// (`WebHook-Request-Callback` is ignored: the answer is synchronous), and no rate is
/// imposed (`WebHook-Allowed-Rate: *`).
pub async fn webhook_handshake_handler(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Response {
    let origin = match headers
        .get("webhook-request-origin")
        .map(HeaderValue::to_str)
    {
        Some(Ok(origin)) if !origin.trim().is_empty() => origin.trim(),
        _ => {
            return ApiError::InvalidHeader {
                header: "webhook-request-origin".into(),
                message: "the webhook handshake names its sender in WebHook-Request-Origin".into(),
            }
            .into_response()
        }
    };
    let allowed = state
        .config
        .cloudevents_webhook_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin));
    if !allowed {
        return ApiError::OriginNotAllowed {
            origin: origin.to_string(),
        }
        .into_response();
    }
    let mut response = StatusCode::OK.into_response();
    let out = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(origin) {
        out.insert("webhook-allowed-origin", value);
    }
    out.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
    out.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    response
}
