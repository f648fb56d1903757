//! `POST /v1/cloudevents` and the CloudEvents webhook handshake (`OPTIONS`), and
//! `POST /v1/debezium`. Through the same door as `/v1/publish` (`serve_format`: readiness,
//! publish key, content type, size, JSON syntax, then publish and counters), with the
//! format's mapping in [`crate::ingest`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::publish::{invalid, serve_format, Normalized};
use super::{ApiError, HttpState};
use crate::ingest::{cloudevents, debezium, IngestError};

/// `POST /v1/cloudevents`: binary, structured or batched content mode.
pub async fn cloudevents_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_format(
        &state,
        "cloudevents",
        peer,
        &headers,
        body,
        |state, body| {
            let config = &state.config;
            let lookup = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            // Batched mode's body is an array of events: a refusal of one points into it.
            let batch = cloudevents::Mode::of(content_type) == cloudevents::Mode::Batched;
            let request = cloudevents::Request {
                header: &lookup,
                content_type,
                body,
            };
            let events = cloudevents::normalize(
                request,
                &config.cloudevents,
                &|c| config.key_field(c).to_string(),
                config.max_publish_events,
            )
            .map_err(refused)?;
            Ok(Normalized {
                at: batch.then(|| (0..events.len()).collect()),
                events,
                tombstones: 0,
            })
        },
    )
    .await
}

/// `POST /v1/debezium`: one change event or an array, with or without the schema envelope,
/// or CloudEvents carrying them (structured: in the body; binary: `ce-*` headers, the body as
/// `data`). Tombstones are counted and skipped.
pub async fn debezium_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_format(&state, "debezium", peer, &headers, body, |state, body| {
        let config = &state.config;
        let collections = debezium::Collections {
            key_field: &|c| config.key_field(c).to_string(),
            retains: &|c| config.state.retains(c),
        };
        let binary = match headers.contains_key("ce-specversion") {
            true => {
                let listed: Vec<(&str, &[u8])> = headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes()))
                    .collect();
                debezium::binary_attributes(&listed).map_err(refused)?
            }
            false => None,
        };
        let normalized = match binary {
            Some(extensions) => {
                debezium::normalize_binary(body, extensions, &config.debezium, collections)
            }
            None => debezium::normalize(
                body,
                &config.debezium,
                collections,
                config.max_publish_events,
            ),
        }
        .map_err(refused)?;
        state
            .metrics
            .debezium_tombstones
            .inc_by(normalized.tombstones as u64);
        Ok(Normalized {
            events: normalized.events,
            at: normalized.at,
            tombstones: normalized.tombstones,
        })
    })
    .await
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
