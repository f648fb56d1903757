//! Fan-out of one event: candidate groups → matching items → one encoding per group → one
//! frame per uid bucket → every member's outbox.
//!
//! The hub never waits: a full outbox refuses the frame (the session then closes that
//! connection as a slow consumer) and the hub moves on. Work per event follows the number of
//! groups that receive it, not the number of subscribers: a group of 10,000 identical
//! subscriptions costs one filter evaluation, one projection and one serialization per uid
//! in use.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use serde_json::{Map, Value};

use crate::event::{key_string, Event, EventKind};
use crate::metrics::Metrics;
use crate::outbox::{Frame, PushError};
use crate::protocol::{json_string, subscription_frame};
use crate::registry::{Dialect, Group, Registry, Spec};

/// Delivers events to the subscriptions of this node.
#[derive(Debug)]
pub struct Hub {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub over `registry`.
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Hub { registry, metrics }
    }

    /// Matches, encodes and queues one event. Events of one collection must be dispatched
    /// one at a time, in offset order (the backplane guarantees it); that is what keeps
    /// per-collection order for every subscriber.
    pub fn dispatch(&self, event: &Event) {
        let started = Instant::now();
        let mut frames = 0usize;
        if let Some(subs) = self.registry.collection(&event.collection) {
            let subs = subs.read();
            for group in subs.candidates(event) {
                frames += self.deliver_group(group, event);
            }
        }
        let now = Instant::now();
        self.metrics
            .match_duration
            .observe(now.duration_since(started).as_secs_f64());
        self.metrics
            .ingest_to_outbox
            .observe(now.duration_since(event.received).as_secs_f64());
        self.metrics.fanout_size.observe(frames as f64);
    }

    /// Delivers to one group; returns the number of frames queued.
    fn deliver_group(&self, group: &Group, event: &Event) -> usize {
        let spec = &group.spec;
        if !spec.events.contains(event.kind) {
            return 0;
        }
        let payloads = payloads(spec, event);
        let mut queued = 0;
        for data in &payloads {
            for (uid, members) in group.buckets() {
                let text = subscription_frame(event.kind.as_str(), Some(data), uid.as_deref());
                let frame = Frame {
                    text: Utf8Bytes::from(text),
                    received: event.received,
                };
                for outbox in members.values() {
                    match outbox.push(frame.clone()) {
                        Ok(()) => queued += 1,
                        Err(PushError::Overflow(lost)) => {
                            self.metrics.outbox_dropped.inc_by(lost as u64)
                        }
                        Err(PushError::Closed) => self.metrics.outbox_dropped.inc(),
                    }
                }
            }
        }
        queued
    }
}

/// The `data` of every message `spec` gets for `event`, encoded as JSON, in order.
/// Empty when nothing matches.
pub fn payloads(spec: &Spec, event: &Event) -> Vec<String> {
    match event.kind {
        EventKind::Create | EventKind::Update => item_payloads(spec, event),
        EventKind::Delete => delete_payloads(spec, event),
    }
}

fn encode(v: &impl serde::Serialize) -> String {
    // Serializing a serde_json::Value (or a list of them) to a String cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

fn project(spec: &Spec, item: &Value) -> Value {
    if spec.projection.is_all() {
        item.clone()
    } else {
        spec.projection.apply(item)
    }
}

fn item_payloads(spec: &Spec, event: &Event) -> Vec<String> {
    if let Some(item_key) = &spec.item {
        // Directus never sends creates to item subscriptions; updates carry the one item
        // as an object.
        if event.kind == EventKind::Create {
            return Vec::new();
        }
        let found = event.keys.iter().position(|k| key_string(k) == *item_key);
        return match found.and_then(|i| event.items.get(i)) {
            Some(item) if spec.matches(item) => vec![encode(&project(spec, item))],
            _ => Vec::new(),
        };
    }
    let matched: Vec<&Value> = event
        .items
        .iter()
        .filter(|item| spec.matches(item))
        .collect();
    if matched.is_empty() {
        return Vec::new();
    }
    match (spec.dialect, event.kind) {
        // Nested dialect: one frame per item, `data` an object.
        (Dialect::Nested, EventKind::Update) => spec
            .list
            .apply(matched)
            .into_iter()
            .map(|item| encode(&project(spec, item)))
            .collect(),
        (Dialect::Nested, _) => matched
            .into_iter()
            .filter(|item| keeps_single(spec, item))
            .map(|item| encode(&project(spec, item)))
            .collect(),
        // Directus: one message per created item; one message with every updated item.
        (Dialect::Flat, EventKind::Create) => matched
            .into_iter()
            .filter(|item| keeps_single(spec, item))
            .map(|item| encode(&[project(spec, item)]))
            .collect(),
        (Dialect::Flat, _) => {
            let kept = spec.list.apply(matched);
            if kept.is_empty() {
                return Vec::new();
            }
            let projected: Vec<Value> = kept.into_iter().map(|item| project(spec, item)).collect();
            vec![encode(&projected)]
        }
    }
}

/// Whether the list shape keeps a message of one item (e.g. `offset: 1` drops it, as in
/// Directus); the common identity shape needs no work.
fn keeps_single(spec: &Spec, item: &Value) -> bool {
    spec.list.is_identity() || !spec.list.apply(vec![item]).is_empty()
}

fn delete_payloads(spec: &Spec, event: &Event) -> Vec<String> {
    // With the deleted items, a delete is filtered like a create; key-only deletes reach
    // only subscriptions whose rows are not restricted.
    let keys: Vec<&Value> = if event.has_items() {
        event
            .items
            .iter()
            .zip(&event.keys)
            .filter(|(item, _)| spec.matches(item))
            .map(|(_, k)| k)
            .collect()
    } else if spec.key_only_deletes {
        event.keys.iter().collect()
    } else {
        Vec::new()
    };
    if keys.is_empty() {
        return Vec::new();
    }
    if let Some(item_key) = &spec.item {
        return match keys.iter().any(|k| key_string(k) == *item_key) {
            true if spec.dialect == Dialect::Nested => vec![nested_key(spec, item_key)],
            true => vec![json_string(item_key)],
            false => Vec::new(),
        };
    }
    match spec.dialect {
        Dialect::Flat => vec![encode(&keys)],
        Dialect::Nested => keys
            .into_iter()
            .map(|k| nested_key(spec, &key_string(k)))
            .collect(),
    }
}

/// `{"<key field>":"<key>"}`: fcs_directus reads `message.data['id']` and hands it to a
/// callback typed `String`.
fn nested_key(spec: &Spec, key: &str) -> String {
    let mut obj = Map::new();
    obj.insert(spec.key_field.to_string(), Value::String(key.to_string()));
    encode(&obj)
}
