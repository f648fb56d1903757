//! Rendering: the messages a [`Spec`] gets for one event, in its dialect, each `data`
//! encoded once. Live dispatch and replay both call [`payloads`], so a replay cannot differ
//! from live delivery.
//!
//! **Transitions.** When the event carries each item's previous version (`Event::before`:
//! filled by the retained state's fold, or sent by the publisher) and the spec takes them (`Spec::transitions`: no
//! `event` in the request, every kind allowed, `--transitions view`), a `create`/`update` is
//! evaluated against both versions: an item that starts matching (**enter**) comes as a
//! `create` with the full item, one that stops matching (**leave**) as a `delete` with its
//! key only, both marked with their [`Cause`]; an item that matched and still matches comes
//! as published. Otherwise only the new version counts (Directus' own behaviour).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::{Dialect, Spec};
use crate::event::{key_string, Event, EventKind};
use crate::protocol::json_string;

/// Why a transition frame was sent (the `cause` field beside `position`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The item did not match before and matches now: sent as `create`.
    Enter,
    /// The item matched before and does not now: sent as `delete`, key only.
    Leave,
}

impl Cause {
    /// The wire value (also the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Enter => "enter",
            Cause::Leave => "leave",
        }
    }
}

/// One message for one spec: its event kind, its `data` (JSON), why it was sent when it is a
/// transition, and how many items it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The `event` of the frame (a transition's may differ from the published one).
    pub kind: EventKind,
    /// `data`, encoded.
    pub data: String,
    /// Set on enter/leave frames.
    pub cause: Option<Cause>,
    /// Items (or keys) in `data`.
    pub items: usize,
}

impl Payload {
    fn plain(kind: EventKind, data: String, items: usize) -> Payload {
        Payload {
            kind,
            data,
            cause: None,
            items,
        }
    }

    fn because(mut self, cause: Cause) -> Payload {
        self.cause = Some(cause);
        self
    }
}

/// The messages `spec` gets for `event`, in order. Empty when nothing matches (including an
/// event kind the spec does not receive).
pub fn payloads(spec: &Spec, event: &Event) -> Vec<Payload> {
    if !spec.events.contains(event.kind) {
        return Vec::new();
    }
    match event.kind {
        EventKind::Create | EventKind::Update
            if spec.transitions && event.before.len() == event.items.len() =>
        {
            transition_payloads(spec, event)
        }
        EventKind::Create | EventKind::Update => item_payloads(spec, event),
        EventKind::Delete => delete_payloads(spec, event),
    }
}

/// The messages `spec` gets for `event`, one key at a time: for each key, what it would get
/// if the event carried only that key (one message at most), with the key. The conflating
/// queue folds these (see [`crate::conflate`]); live delivery uses [`payloads`]. Clones each
/// item, so only the slow path calls it.
pub fn keyed_payloads(spec: &Spec, event: &Event) -> Vec<(String, Payload)> {
    let mut out = Vec::with_capacity(event.keys.len());
    let with_before = event.before.len() == event.items.len();
    for (i, key) in event.keys.iter().enumerate() {
        let one = Event {
            collection: event.collection.clone(),
            kind: event.kind,
            items: event.items.get(i).cloned().into_iter().collect(),
            keys: vec![key.clone()],
            before: match with_before {
                true => event.before.get(i).cloned().into_iter().collect(),
                false => Vec::new(),
            },
            apply: event.apply.clone(),
            version: event.version,
            offset: event.offset,
            epoch: event.epoch.clone(),
            received: event.received,
        };
        let key = key_string(key);
        out.extend(payloads(spec, &one).into_iter().map(|p| (key.clone(), p)));
    }
    out
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

fn item_payloads(spec: &Spec, event: &Event) -> Vec<Payload> {
    if let Some(item_key) = &spec.item {
        // Directus never sends creates to item subscriptions; updates carry the one item
        // as an object.
        if event.kind == EventKind::Create {
            return Vec::new();
        }
        let found = event.keys.iter().position(|k| key_string(k) == *item_key);
        return match found.and_then(|i| event.items.get(i)) {
            Some(item) if spec.matches(item) => {
                vec![Payload::plain(event.kind, encode(&project(spec, item)), 1)]
            }
            _ => Vec::new(),
        };
    }
    let matched: Vec<&Value> = event
        .items
        .iter()
        .filter(|item| spec.matches(item))
        .collect();
    render_items(spec, event.kind, matched)
}

/// The messages of a `create` or `update` of `matched` items (already matched) for a
/// collection subscription.
fn render_items(spec: &Spec, kind: EventKind, matched: Vec<&Value>) -> Vec<Payload> {
    if matched.is_empty() {
        return Vec::new();
    }
    let one = |data: String| Payload::plain(kind, data, 1);
    match (spec.dialect, kind) {
        // Nested dialect: one frame per item, `data` an object.
        (Dialect::Nested, EventKind::Update) => spec
            .list
            .apply(matched)
            .into_iter()
            .map(|item| one(encode(&project(spec, item))))
            .collect(),
        (Dialect::Nested, _) => matched
            .into_iter()
            .filter(|item| keeps_single(spec, item))
            .map(|item| one(encode(&project(spec, item))))
            .collect(),
        // Directus: one message per created item; one message with every updated item.
        (Dialect::Flat, EventKind::Create) => matched
            .into_iter()
            .filter(|item| keeps_single(spec, item))
            .map(|item| one(encode(&[project(spec, item)])))
            .collect(),
        (Dialect::Flat, _) => {
            let kept = spec.list.apply(matched);
            if kept.is_empty() {
                return Vec::new();
            }
            let projected: Vec<Cow<'_, Value>> =
                kept.into_iter().map(|item| project(spec, item)).collect();
            let items = projected.len();
            vec![Payload::plain(kind, encode(&projected), items)]
        }
    }
}

/// A `create`/`update` judged on both versions of each item (see the module doc). The item
/// a subscription already shows comes as published, then the entering items as `create`s,
/// then one `delete` of the leaving keys.
fn transition_payloads(spec: &Spec, event: &Event) -> Vec<Payload> {
    let mut same = Vec::new();
    let mut entered = Vec::new();
    let mut left = Vec::new();
    for ((item, previous), key) in event.items.iter().zip(&event.before).zip(&event.keys) {
        if spec.item.as_ref().is_some_and(|k| *k != key_string(key)) {
            continue;
        }
        let now = spec.matches(item);
        // No previous version (`null`) never matched: never guess in a subscriber's favour.
        let was = !previous.is_null() && spec.matches(previous);
        match (was, now) {
            (true, true) => same.push(item),
            // A plain create of a new key is no transition.
            (false, true) if event.kind == EventKind::Create && previous.is_null() => {
                same.push(item)
            }
            (false, true) => entered.push(item),
            (true, false) => left.push(key),
            (false, false) => {}
        }
    }
    let mut out = Vec::new();
    if let Some(item_key) = &spec.item {
        // An item subscription gets no creates (as in Directus): entering shows the item as
        // an update, leaving deletes its key.
        let show = |item: &Value| encode(&project(spec, item));
        if event.kind == EventKind::Update {
            out.extend(
                same.iter()
                    .map(|i| Payload::plain(EventKind::Update, show(i), 1)),
            );
        }
        out.extend(
            entered
                .iter()
                .map(|i| Payload::plain(EventKind::Update, show(i), 1).because(Cause::Enter)),
        );
        if !left.is_empty() {
            out.push(render_item_key(spec, item_key).because(Cause::Leave));
        }
        return out;
    }
    out.extend(render_items(spec, event.kind, same));
    out.extend(
        render_items(spec, EventKind::Create, entered)
            .into_iter()
            .map(|p| p.because(Cause::Enter)),
    );
    out.extend(
        render_keys(spec, left)
            .into_iter()
            .map(|p| p.because(Cause::Leave)),
    );
    out
}

/// Whether the list shape keeps a message of one item (e.g. `offset: 1` drops it, as in
/// Directus); the common identity shape needs no work.
fn keeps_single(spec: &Spec, item: &Value) -> bool {
    spec.list.is_identity() || !spec.list.apply(vec![item]).is_empty()
}

fn delete_payloads(spec: &Spec, event: &Event) -> Vec<Payload> {
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
    if let Some(item_key) = &spec.item {
        return match keys.iter().any(|k| key_string(k) == *item_key) {
            true => vec![render_item_key(spec, item_key)],
            false => Vec::new(),
        };
    }
    render_keys(spec, keys)
}

/// The `delete` message(s) of `keys` for a collection subscription.
fn render_keys(spec: &Spec, keys: Vec<&Value>) -> Vec<Payload> {
    if keys.is_empty() {
        return Vec::new();
    }
    match spec.dialect {
        Dialect::Flat => {
            let items = keys.len();
            vec![Payload::plain(EventKind::Delete, encode(&keys), items)]
        }
        Dialect::Nested => keys
            .into_iter()
            .map(|k| Payload::plain(EventKind::Delete, nested_key(spec, &key_string(k)), 1))
            .collect(),
    }
}

/// The `delete` message of an item subscription's own key.
fn render_item_key(spec: &Spec, item_key: &str) -> Payload {
    let data = match spec.dialect {
        Dialect::Nested => nested_key(spec, item_key),
        Dialect::Flat => json_string(item_key),
    };
    Payload::plain(EventKind::Delete, data, 1)
}

/// `{"<key field>":"<key>"}`: fcs_directus reads `message.data['id']` and hands it to a
/// callback typed `String`.
fn nested_key(spec: &Spec, key: &str) -> String {
    let mut obj = Map::new();
    obj.insert(spec.key_field.to_string(), Value::String(key.to_string()));
    encode(&obj)
}
