//! Rendering: the `data` of every message a [`Spec`] gets for one event, in its dialect,
//! encoded once. Live dispatch and replay both call [`payloads`], so a replay cannot differ
//! from live delivery.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::{Dialect, Spec};
use crate::event::{key_string, Event, EventKind};
use crate::protocol::json_string;

/// The `data` of every message `spec` gets for `event`, encoded as JSON, in order.
/// Empty when nothing matches (including an event kind the spec does not receive).
pub fn payloads(spec: &Spec, event: &Event) -> Vec<String> {
    if !spec.events.contains(event.kind) {
        return Vec::new();
    }
    match event.kind {
        EventKind::Create | EventKind::Update => item_payloads(spec, event),
        EventKind::Delete => delete_payloads(spec, event),
    }
}

fn encode(v: &impl serde::Serialize) -> String {
    // Serializing a serde_json::Value (or a list of them) to a String cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

/// The item as the spec's projection shows it; borrowed when the projection keeps
/// everything, so serializing it copies nothing.
fn project<'a>(spec: &Spec, item: &'a Value) -> Cow<'a, Value> {
    if spec.projection.is_all() {
        Cow::Borrowed(item)
    } else {
        Cow::Owned(spec.projection.apply(item))
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
            let projected: Vec<Cow<'_, Value>> =
                kept.into_iter().map(|item| project(spec, item)).collect();
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
