//! The publish endpoints: authenticate, check the content type, parse, normalize (all or
//! nothing), hand to the backplane, answer with the positions.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::ApiError;
use crate::app::AppState;
use crate::event::{
    idempotency_key, normalize_collection_body, normalize_publish, EventKind, NewEvent,
    NormalizeError,
};

/// `POST /v1/publish`.
pub async fn publish_handler(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = read_body(&state, &headers, body)?;
        let config = &state.config;
        let mut events = normalize_publish(
            body,
            &|c| config.key_field(c).to_string(),
            config.max_publish_events,
        )
        .map_err(invalid)?;
        apply_idempotency_header(&headers, &mut events)?;
        accept(&state, events).await
    }
    .await;
    count(&state, result)
}

/// `POST /v1/collections/{collection}/{event}`.
pub async fn collection_handler(
    State(state): State<Arc<AppState>>,
    Path((collection, event)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let kind = EventKind::parse(&event).ok_or(ApiError::NotFound)?;
        let body = read_body(&state, &headers, body)?;
        let config = &state.config;
        let event = normalize_collection_body(&collection, kind, body, &|c| {
            config.key_field(c).to_string()
        })
        .map_err(invalid)?;
        let mut events = vec![event];
        apply_idempotency_header(&headers, &mut events)?;
        accept(&state, events).await
    }
    .await;
    count(&state, result)
}

/// `Idempotency-Key: K` names the request's events: `K` for a single event, `K#0`, `K#1`…
/// for a batch. A key in the event itself wins.
fn apply_idempotency_header(headers: &HeaderMap, events: &mut [NewEvent]) -> Result<(), ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(());
    };
    let key = value
        .to_str()
        .map_err(|_| "not printable ASCII".to_string())
        .and_then(idempotency_key)
        .map_err(|message| ApiError::InvalidHeader {
            header: "idempotency-key",
            message,
        })?;
    let single = events.len() == 1;
    for (i, event) in events.iter_mut().enumerate() {
        if event.idempotency_key.is_none() {
            event.idempotency_key = Some(match single {
                true => key.clone(),
                false => Arc::from(format!("{key}#{i}")),
            });
        }
    }
    Ok(())
}

fn invalid(e: NormalizeError) -> ApiError {
    ApiError::InvalidPayload {
        message: e.message,
        pointer: e.pointer,
    }
}

fn count(state: &AppState, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state
        .metrics
        .publish_requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

/// Readiness, publisher key, content type, size and JSON syntax, in that order.
fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    if !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("the broker is shutting down".into()));
    }
    if state.publish_keys.required() {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if !presented.is_some_and(|key| state.publish_keys.accepts(key)) {
            return Err(ApiError::Unauthorized);
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.config.max_publish_bytes,
            }
        } else {
            ApiError::InvalidJson {
                message: format!("could not read the request body: {rejection}"),
            }
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson {
        message: format!("malformed JSON: {e}"),
    })
}

async fn accept(state: &AppState, events: Vec<NewEvent>) -> Result<Response, ApiError> {
    let summary: Vec<(Arc<str>, EventKind, usize)> = events
        .iter()
        .map(|e| (e.collection.clone(), e.kind, e.keys.len()))
        .collect();
    let positions = state
        .backplane
        .publish(events)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let mut accepted = Vec::with_capacity(summary.len());
    for ((collection, kind, items), position) in summary.into_iter().zip(positions) {
        if position.duplicate {
            state.metrics.publish_duplicates.inc();
            accepted.push(json!({
                "collection": &*collection,
                "event": kind.as_str(),
                "items": items,
                "offset": position.offset,
                "epoch": &*position.epoch,
                "duplicate": true,
            }));
            continue;
        }
        let label = state.metrics.collections.label(&collection);
        state
            .metrics
            .published_events
            .with_label_values(&[&*label, kind.as_str()])
            .inc();
        state
            .metrics
            .published_items
            .with_label_values(&[&*label, kind.as_str()])
            .inc_by(items as u64);
        accepted.push(json!({
            "collection": &*collection,
            "event": kind.as_str(),
            "items": items,
            "offset": position.offset,
            "epoch": &*position.epoch,
        }));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "events": accepted }))).into_response())
}
