//! The publish endpoints: authenticate, check the content type, parse, normalize (all or
//! nothing), hand to the backplane, answer with the positions.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, HttpState, ServerErrorReason};
use crate::auth::PublishKeys;
use crate::backplane::{Accepted, BackplaneError};
use crate::event::{
    idempotency_key, normalize_collection_body, normalize_publish, EventKind, NewEvent,
    NormalizeError,
};
use crate::state::StateError;

/// `POST /v1/publish`.
pub async fn publish_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_format(&state, "json", peer, &headers, body, |state, body| {
        let config = &state.config;
        let batch = body.is_array();
        // Before normalizing: a typo'd collection's key field means nothing.
        let declared = |i: Option<usize>, event: &Value| match event["collection"].as_str() {
            Some(c) if !config.collection_exists(c) => Err(unknown_collection(c, i)),
            _ => Ok(()),
        };
        match &body {
            Value::Array(events) => {
                for (i, event) in events.iter().enumerate() {
                    declared(Some(i), event)?;
                }
            }
            event => declared(None, event)?,
        }
        let mut events = normalize_publish(
            body,
            &|c| config.key_field(c).to_string(),
            config.max_publish_events,
        )
        .map_err(invalid)?;
        apply_idempotency_header(&headers, &mut events)?;
        Ok(Normalized {
            at: batch.then(|| (0..events.len()).collect()),
            events,
            tombstones: 0,
        })
    })
    .await
}

/// What a body format's normalization made of a request.
pub(super) struct Normalized {
    /// The events, in request order.
    pub events: Vec<NewEvent>,
    /// Where each event sits in a body that is an array (`/3`), for a refusal that names one
    /// event; `None` when the body is one event.
    pub at: Option<Vec<usize>>,
    /// Debezium tombstones skipped.
    pub tombstones: usize,
}

/// What every endpoint taking a body format does: `read_body`'s checks, the format's
/// `normalize` (all or nothing), publish, the 202 (with `tombstones` when there were any),
/// counted under `format`.
pub(super) async fn serve_format(
    state: &HttpState,
    format: &'static str,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    normalize: impl FnOnce(&HttpState, Value) -> Result<Normalized, ApiError>,
) -> Response {
    let result = async {
        let body = read_body(state, peer, headers, body)?;
        let normalized = normalize(state, body)?;
        let accepted = publish_events(state, normalized.events, normalized.at.as_deref()).await?;
        let mut answer = json!({ "events": accepted });
        if normalized.tombstones > 0 {
            answer["tombstones"] = normalized.tombstones.into();
        }
        Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
    }
    .await;
    count(state, format, result)
}

/// `POST /v1/collections/{collection}/{event}`.
pub async fn collection_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((collection, event)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let kind = EventKind::parse(&event).ok_or(ApiError::NotFound)?;
        let body = read_body(&state, peer, &headers, body)?;
        let config = &state.config;
        if !config.collection_exists(&collection) {
            return Err(unknown_collection(&collection, None));
        }
        let event = normalize_collection_body(&collection, kind, body, &|c| {
            config.key_field(c).to_string()
        })
        .map_err(invalid)?;
        let mut events = vec![event];
        apply_idempotency_header(&headers, &mut events)?;
        accept(&state, events).await
    }
    .await;
    count(&state, "json", result)
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
            header: "idempotency-key".into(),
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

pub(super) fn invalid(e: NormalizeError) -> ApiError {
    ApiError::InvalidPayload {
        message: e.message,
        pointer: e.pointer,
    }
}

/// Counts the answer in `tidings_publish_requests_total{format,status}` (`format`: one of
/// `metrics::PUBLISH_FORMATS`).
fn count(state: &HttpState, format: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state
        .metrics
        .publish_requests
        .with_label_values(&[format, response.status().as_str()])
        .inc();
    response
}

/// Which credential let a publisher in: a key's name, `_loopback` (a trusted loopback
/// publisher without a key) or `_open` (no key configured, loopback not singled out).
fn authorize(
    keys: &PublishKeys,
    trust_loopback: bool,
    peer: IpAddr,
    authorization: Option<&str>,
) -> Result<Arc<str>, ApiError> {
    if !keys.required() && !trust_loopback {
        return Ok(Arc::from("_open"));
    }
    let presented = authorization.and_then(|v| {
        // The scheme is case-insensitive (RFC 9110).
        let (scheme, key) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    if let Some(name) = presented.and_then(|key| keys.accepts(key)) {
        return Ok(name);
    }
    // A wrong key from loopback is still refused: it is a misconfigured publisher.
    if presented.is_none() && trust_loopback && peer.to_canonical().is_loopback() {
        return Ok(Arc::from("_loopback"));
    }
    Err(ApiError::Unauthorized)
}

/// Readiness and the publisher key, in that order: what every endpoint that publishes checks
/// first (the publish key's use is counted).
pub(super) fn check_publisher(
    state: &HttpState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    // Publishes are still served during the shutdown delay, readiness off: that is the delay's
    // point (the application's last publishes land).
    if state.shutdown.is_cancelled() {
        return Err(ApiError::server(
            &state.metrics,
            ServerErrorReason::ShuttingDown,
            "publish after the shutdown delay",
        ));
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let key = authorize(
        &state.publish_keys,
        state.config.trust_loopback_publishers,
        peer.ip(),
        authorization,
    )?;
    state
        .metrics
        .publish_requests_by_key
        .with_label_values(&[&*key])
        .inc();
    Ok(())
}

/// [`check_publisher`], then content type, size and JSON syntax, in that order.
fn read_body(
    state: &HttpState,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    check_publisher(state, peer, headers)?;
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

/// Publishes `events` (one body event) and answers 202 with one entry per event.
async fn accept(state: &HttpState, events: Vec<NewEvent>) -> Result<Response, ApiError> {
    let accepted = publish_events(state, events, None).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "events": accepted }))).into_response())
}

/// Publishes `events` (none: nothing to do) and counts them; the 202 body's entries. `at`:
/// where each event sits in an array body, so a refusal of one points at it (else at the
/// whole body).
pub(super) async fn publish_events(
    state: &HttpState,
    events: Vec<NewEvent>,
    at: Option<&[usize]>,
) -> Result<Vec<Value>, ApiError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // Refused whole before the backplane sees anything: no offset is taken.
    if let Some(i) = events
        .iter()
        .position(|e| !state.config.collection_exists(&e.collection))
    {
        let index = at.and_then(|at| at.get(i)).copied();
        return Err(unknown_collection(&events[i].collection, index));
    }
    let summary: Vec<(Arc<str>, EventKind, usize)> = events
        .iter()
        .map(|e| (e.collection.clone(), e.kind, e.keys.len()))
        .collect();
    let published = state.backplane.publish(events).await;
    let (positions, failure) = match published {
        Ok(positions) => (positions.into_iter().map(Some).collect(), None),
        Err(BackplaneError::Partial { accepted, detail }) => (accepted, Some(detail)),
        Err(e) => return Err(refusal(state, e, at)),
    };
    let mut entries = Vec::with_capacity(summary.len());
    for ((collection, kind, items), position) in summary.into_iter().zip(positions) {
        let Some(position) = position else {
            entries.push(json!({
                "collection": &*collection,
                "event": kind.as_str(),
                "items": items,
                "accepted": false,
            }));
            continue;
        };
        entries.push(accepted_entry(state, &collection, kind, items, &position));
    }
    match failure {
        None => Ok(entries),
        Some(detail) => Err(ApiError::partial(&state.metrics, entries, detail)),
    }
}

/// The refusal of a publish to a collection the collections file forbids; `index`: where
/// the event sits in an array body.
fn unknown_collection(collection: &str, index: Option<usize>) -> ApiError {
    ApiError::UnknownCollection {
        collection: collection.to_string(),
        pointer: match index {
            Some(index) => format!("/{index}/collection"),
            None => "/collection".to_string(),
        },
    }
}

/// The answer entry of an accepted event; counts it as published (or as a duplicate).
fn accepted_entry(
    state: &HttpState,
    collection: &Arc<str>,
    kind: EventKind,
    items: usize,
    position: &Accepted,
) -> Value {
    if position.duplicate {
        state.metrics.publish_duplicates.inc();
        return json!({
            "collection": &**collection,
            "event": kind.as_str(),
            "items": items,
            "offset": position.offset,
            "epoch": &*position.epoch,
            "duplicate": true,
        });
    }
    let label = state.metrics.collections.label(collection);
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
    let mut entry = json!({
        "collection": &**collection,
        "event": kind.as_str(),
        "items": items,
        "offset": position.offset,
        "epoch": &*position.epoch,
    });
    if !position.stale.is_empty() {
        entry["stale"] = Value::Array(position.stale.clone());
    }
    entry
}

/// The answer to a publish the backplane refused as a whole; `at` as for `publish_events`.
fn refusal(state: &HttpState, error: BackplaneError, at: Option<&[usize]>) -> ApiError {
    match error {
        BackplaneError::TooLarge { index, size, limit } => {
            ApiError::EventTooLarge { index, size, limit }
        }
        BackplaneError::StateFull(full) => {
            let pointer = match (&full, at) {
                (StateError::Full { index, .. }, Some(at)) => {
                    at.get(*index).map_or(String::new(), |i| format!("/{i}"))
                }
                _ => String::new(),
            };
            ApiError::StateFull {
                message: full.to_string(),
                pointer,
            }
        }
        other => ApiError::server(
            &state.metrics,
            ServerErrorReason::Backplane,
            other.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> PublishKeys {
        let mut keys = PublishKeys::default();
        keys.add_flags(&["app=k1"]).unwrap();
        keys
    }

    fn name(r: Result<Arc<str>, ApiError>) -> Option<String> {
        r.ok().map(|n| n.to_string())
    }

    #[test]
    fn publisher_authorization() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let none = PublishKeys::default();
        // No key, no trust: open to everyone.
        assert_eq!(
            name(authorize(&none, false, lan, None)).as_deref(),
            Some("_open")
        );
        // Keys: the right key, any address; case-insensitive scheme.
        assert_eq!(
            name(authorize(&keys(), false, lan, Some("Bearer k1"))).as_deref(),
            Some("app")
        );
        assert_eq!(
            name(authorize(&keys(), false, lan, Some("bEaReR k1"))).as_deref(),
            Some("app")
        );
        assert!(authorize(&keys(), false, lan, Some("Bearer k2")).is_err());
        assert!(authorize(&keys(), false, lan, Some("k1")).is_err());
        assert!(authorize(&keys(), false, lo, None).is_err());
        // Trusted loopback: no key needed from loopback, never from elsewhere.
        for ip in [lo, lo6, mapped] {
            assert_eq!(
                name(authorize(&keys(), true, ip, None)).as_deref(),
                Some("_loopback")
            );
            assert_eq!(
                name(authorize(&none, true, ip, None)).as_deref(),
                Some("_loopback")
            );
            assert!(authorize(&keys(), true, ip, Some("Bearer wrong")).is_err());
        }
        assert!(authorize(&keys(), true, lan, None).is_err());
        assert!(authorize(&none, true, lan, None).is_err());
        assert!(authorize(&none, true, lan, Some("Bearer k1")).is_err());
        assert_eq!(
            name(authorize(&keys(), true, lan, Some("Bearer k1"))).as_deref(),
            Some("app")
        );
    }
}
