//! `PUT /v1/collections/{collection}/items`: a reconcile. The body is the complete current
//! set of a retained collection's items, as a JSON array or as NDJSON; the broker makes its
//! state equal to it by publishing only the differences, in one batch through the publish
//! path: deletes (held keys the set lacks), creates (keys it adds) and whole replacements
//! (`update` with [`Apply::Replace`]) of the items whose content changed, each event with its
//! own offset. Unchanged items publish nothing.
//!
//! The body is read as a stream ([`split`](super::split)): memory holds one item's text, the
//! set of keys seen, and the created and changed items, never the body. Each item is bounded
//! by `--max-publish-bytes`; the body as a whole is not (the global body limit of the router
//! applies only to extractors that buffer, and this handler takes the raw [`Body`]). The set
//! itself is bounded by the state's limits: more items than `--state-max-items`, or new and
//! changed items over `--state-max-bytes`, is a 507 as soon as it shows.
//!
//! A rejected request publishes nothing: every check, including capacity (by
//! [`crate::state::State::admit`], which counts the batch's deletes before its creates), comes
//! before the backplane takes an offset. Publishes to the collection that run concurrently
//! with a reconcile are not ordered with it: the next reconcile heals what they leave.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::publish::{check_publisher, publish_events};
use super::split::{At, Framing, SplitError, Splitter};
use super::{ApiError, HttpState};
use crate::event::{key_string, kind_of, token, valid_key, Apply, EventKind, NewEvent};
use crate::state::{Held, Limit};

/// Estimated bytes of one key in a key-only delete event (for cutting the deletes into
/// events of about `--max-publish-bytes`).
const KEY_OVERHEAD: usize = 8;

/// `PUT /v1/collections/{collection}/items`.
pub async fn reconcile_handler(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(collection): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = reconcile(&state, peer, &collection, &headers, body).await;
    let response = match result {
        Ok(answer) => (StatusCode::OK, Json(answer)).into_response(),
        Err(error) => error.into_response(),
    };
    state
        .metrics
        .observe_reconcile(response.status().as_str(), started.elapsed().as_secs_f64());
    response
}

async fn reconcile(
    state: &HttpState,
    peer: SocketAddr,
    collection: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    check_publisher(state, peer, headers)?;
    let framing = framing(headers)?;
    let config = &state.config;
    if !config.collection_exists(collection) {
        return Err(ApiError::UnknownCollection {
            collection: collection.to_string(),
            pointer: "collection".into(),
        });
    }
    let retained = state
        .state
        .as_deref()
        .filter(|s| s.retains(collection))
        .ok_or_else(|| ApiError::NotRetained {
            collection: collection.to_string(),
        })?;
    let collection: Arc<str> = Arc::from(collection);
    let mut diff = Diff {
        state: retained,
        collection: &collection,
        key_field: config.key_field(&collection),
        max_items: retained.settings().max_items(&collection),
        max_bytes: retained.settings().max_bytes,
        seen: HashSet::new(),
        creates: Vec::new(),
        updates: Vec::new(),
        unchanged: 0,
        bytes: 0,
    };
    let limit = config.max_publish_bytes;
    let mut splitter = Splitter::new(framing, limit);
    let mut emit = |at: At, text: &[u8]| diff.item(at, text);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidJson {
            message: format!("could not read the request body: {e}"),
        })?;
        splitter.push(&chunk, &mut emit)?;
    }
    splitter.finish(&mut emit)?;
    let (counts, events) = diff.into_events(limit);
    let items = &state.metrics.reconcile_items;
    let ns = [
        counts.created,
        counts.updated,
        counts.deleted,
        counts.unchanged,
    ];
    for (outcome, n) in crate::metrics::RECONCILE_OUTCOMES.into_iter().zip(ns) {
        items.with_label_values(&[outcome]).inc_by(n as u64);
    }
    let accepted = publish_events(state, events, None).await?;
    Ok(json!({
        "created": counts.created,
        "updated": counts.updated,
        "deleted": counts.deleted,
        "unchanged": counts.unchanged,
        "events": accepted,
    }))
}

/// The body's framing from its `Content-Type`.
fn framing(headers: &HeaderMap) -> Result<Framing, ApiError> {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase());
    match mime.as_deref() {
        Some("application/json") => Ok(Framing::Array),
        Some("application/x-ndjson" | "application/ndjson") => Ok(Framing::Ndjson),
        _ => Err(ApiError::UnsupportedReconcileMediaType),
    }
}

impl From<SplitError> for ApiError {
    fn from(e: SplitError) -> Self {
        match e {
            SplitError::TooLarge { at, limit } => ApiError::ItemTooLarge {
                pointer: at.pointer(""),
                limit,
            },
            SplitError::Framing { pointer, message } => ApiError::InvalidPayload {
                message: message.to_string(),
                pointer,
            },
        }
    }
}

/// What a reconcile found, for the reply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    created: usize,
    updated: usize,
    deleted: usize,
    unchanged: usize,
}

/// An item to publish: the item, its key, its compact JSON's length.
type Change = (Value, Value, usize);

/// The comparison of the set with the state, item by item.
struct Diff<'a> {
    state: &'a crate::state::State,
    collection: &'a Arc<str>,
    key_field: &'a str,
    max_items: (usize, Limit),
    max_bytes: usize,
    /// Every key of the set so far (the deletes are the held keys it lacks).
    seen: HashSet<String>,
    creates: Vec<Change>,
    updates: Vec<Change>,
    unchanged: usize,
    /// Compact bytes of the created and changed items, all of which the state will hold.
    bytes: usize,
}

impl Diff<'_> {
    fn item(&mut self, at: At, text: &[u8]) -> Result<(), ApiError> {
        let invalid = |rest: &str, message: String| ApiError::InvalidPayload {
            message,
            pointer: at.pointer(rest),
        };
        let item: Value = serde_json::from_slice(text)
            .map_err(|e| invalid("", format!("the item is not JSON: {e}")))?;
        let field = self.key_field;
        let at_key = format!("/{}", token(field));
        let key = match &item {
            Value::Object(obj) => match obj.get(field) {
                Some(key) if valid_key(key) => key.clone(),
                Some(other) => {
                    return Err(invalid(
                        &at_key,
                        format!(
                            "the key field `{field}` must be a string or a number, got {}",
                            kind_of(other)
                        ),
                    ))
                }
                None => {
                    return Err(invalid(
                        &at_key,
                        format!("the item has no key field `{field}`"),
                    ))
                }
            },
            other => {
                return Err(invalid(
                    "",
                    format!("expected an item object, got {}", kind_of(other)),
                ))
            }
        };
        let k = key_string(&key);
        if self.seen.contains(&k) {
            return Err(invalid(
                &at_key,
                format!("duplicate key {key}: the set holds each key once"),
            ));
        }
        // The state ends holding exactly the set: a set larger than the limit must create a
        // key beyond it, whatever it deletes.
        let (max_items, limit) = self.max_items;
        if self.seen.len() >= max_items {
            self.state.count_rejection(self.collection, limit);
            return Err(ApiError::StateFull {
                message: format!(
                    "the retained state of collection \"{}\" is full: the set holds more than {max_items} items, beyond {} ({max_items}); nothing was published",
                    self.collection,
                    limit.flag(),
                ),
                pointer: at.pointer(""),
            });
        }
        // Serializing a `Value` cannot fail.
        let json = serde_json::to_string(&item).unwrap_or_default();
        let held = self.state.compare(self.collection, &k, &json, &item);
        if held != Held::Same {
            self.bytes += k.len() + json.len();
            if self.bytes > self.max_bytes {
                self.state.count_rejection(self.collection, Limit::MaxBytes);
                return Err(ApiError::StateFull {
                    message: format!(
                        "the retained state of collection \"{}\" is full: the set's new and changed items alone are over {} ({}); nothing was published",
                        self.collection,
                        Limit::MaxBytes.flag(),
                        self.max_bytes,
                    ),
                    pointer: at.pointer(""),
                });
            }
        }
        let len = json.len();
        match held {
            Held::Same => self.unchanged += 1,
            Held::Missing => self.creates.push((item, key, len)),
            Held::Different => self.updates.push((item, key, len)),
        }
        self.seen.insert(k);
        Ok(())
    }

    /// The counts and the batch: deletes, creates, replacements, each cut into events of
    /// about `limit` bytes (so every event fits where one publish would).
    fn into_events(self, limit: usize) -> (Counts, Vec<NewEvent>) {
        let deletes: Vec<Change> = self
            .state
            .keys_except(self.collection, &self.seen, self.key_field)
            .into_iter()
            .map(|key| {
                let len = key_string(&key).len() + KEY_OVERHEAD;
                (Value::Null, key, len)
            })
            .collect();
        let counts = Counts {
            created: self.creates.len(),
            updated: self.updates.len(),
            deleted: deletes.len(),
            unchanged: self.unchanged,
        };
        let mut events = Vec::new();
        for (kind, apply, list) in [
            (EventKind::Delete, Apply::AsKind, deletes),
            (EventKind::Create, Apply::AsKind, self.creates),
            (EventKind::Update, Apply::Replace, self.updates),
        ] {
            let mut event = empty(self.collection, kind, apply.clone());
            let mut size = 0;
            for (item, key, len) in list {
                if size + len > limit && !event.keys.is_empty() {
                    let next = empty(self.collection, kind, apply.clone());
                    events.push(std::mem::replace(&mut event, next));
                    size = 0;
                }
                size += len;
                if kind != EventKind::Delete {
                    event.items.push(item);
                }
                event.keys.push(key);
            }
            if !event.keys.is_empty() {
                events.push(event);
            }
        }
        (counts, events)
    }
}

fn empty(collection: &Arc<str>, kind: EventKind, apply: Apply) -> NewEvent {
    NewEvent {
        apply,
        ..NewEvent::new(collection.clone(), kind, Vec::new(), Vec::new())
    }
}
