//! Events, event kinds and item keys; normalization of publish payloads into events.
//!
//! Normalization is all-or-nothing: a request either becomes a list of [`NewEvent`]s or one
//! [`NormalizeError`] naming, as a JSON Pointer, the first place in the body that is wrong.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The three kinds of change a publisher reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Items were created.
    Create,
    /// Items were updated.
    Update,
    /// Items were deleted.
    Delete,
}

impl EventKind {
    /// Every kind, in wire order.
    pub const ALL: [EventKind; 3] = [EventKind::Create, EventKind::Update, EventKind::Delete];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// A bit for [`EventSet`].
    pub fn bit(self) -> u8 {
        match self {
            EventKind::Create => 1,
            EventKind::Update => 2,
            EventKind::Delete => 4,
        }
    }
}

/// A set of event kinds as a bitmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventSet(pub u8);

impl EventSet {
    /// All three kinds.
    pub const ALL: EventSet = EventSet(7);

    /// The set with one kind.
    pub fn only(kind: EventKind) -> Self {
        EventSet(kind.bit())
    }

    /// The set of the given kinds.
    pub fn of(kinds: &[EventKind]) -> Self {
        EventSet(kinds.iter().fold(0, |acc, k| acc | k.bit()))
    }

    /// Membership.
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// True when no kind is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// How a retained collection's fold applies an event, beyond what its kind says. Collections
/// without state deliver every event as published, whatever this says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Apply {
    /// As the kind says: `create` upserts, `update` merges, `delete` removes its keys.
    #[default]
    AsKind,
    /// An `update` that replaces each stored item whole instead of merging into it (a
    /// reconcile's: the state must end equal to the set it was given).
    Replace,
    /// A `delete` of every item the collection holds at this event's position (a Debezium
    /// truncate). It carries no keys: the fold finds them, and reads each removed item's key
    /// from its `key_field`.
    Truncate {
        /// The collection's key field.
        key_field: Arc<str>,
    },
}

impl Apply {
    /// Whether this is the default, [`Apply::AsKind`] (the wire leaves it out).
    pub fn is_as_kind(&self) -> bool {
        *self == Apply::AsKind
    }
}

/// An event as normalized from a publish request, before the backplane gives it a position.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Collection name (validated by [`valid_collection_name`]).
    pub collection: Arc<str>,
    /// Kind of change.
    pub kind: EventKind,
    /// The items (objects carrying their key field). Empty only for key-only deletes.
    pub items: Vec<Value>,
    /// The items' keys, as the publisher gave them (string or number), in item order.
    pub keys: Vec<Value>,
    /// The previous version of each item, in item order, when the publisher knows it (a
    /// Debezium update with `REPLICA IDENTITY FULL`); empty otherwise. Never partial: empty
    /// or one per item.
    pub before: Vec<Value>,
    /// Publishing again with the same key (per collection) within the deduplication window
    /// returns the first publish's position instead of a new event.
    pub idempotency_key: Option<Arc<str>>,
    /// The publisher's version of every item of the event (`version` beside `data`): on a
    /// retained collection, an item whose version is not newer than the stored one changes
    /// nothing and is delivered to nobody. `None`: unversioned.
    pub version: Option<u64>,
    /// How the fold applies it (a reconcile's replacing update, a truncate).
    pub apply: Apply,
}

impl NewEvent {
    /// A plain event: no `before`, no idempotency key, unversioned, applied as its kind.
    pub fn new(collection: Arc<str>, kind: EventKind, items: Vec<Value>, keys: Vec<Value>) -> Self {
        NewEvent {
            collection,
            kind,
            items,
            keys,
            before: Vec::new(),
            idempotency_key: None,
            version: None,
            apply: Apply::AsKind,
        }
    }

    /// The event at `offset` of `epoch`, received at `received` (the idempotency key stays
    /// with the backplane's dedupe).
    pub fn at(self, offset: u64, epoch: Arc<str>, received: Instant) -> Event {
        Event {
            collection: self.collection,
            kind: self.kind,
            items: self.items,
            keys: self.keys,
            before: self.before,
            version: self.version,
            apply: self.apply,
            offset,
            epoch,
            received,
        }
    }
}

/// An event with its position in its collection's log.
#[derive(Debug, Clone)]
pub struct Event {
    /// Collection name.
    pub collection: Arc<str>,
    /// Kind of change.
    pub kind: EventKind,
    /// Items; empty for key-only deletes.
    pub items: Vec<Value>,
    /// Keys, one per item (or the delete's keys).
    pub keys: Vec<Value>,
    /// The previous version of each item when the publisher sent it ([`NewEvent::before`]).
    pub before: Vec<Value>,
    /// The publisher's version of its items ([`NewEvent::version`]).
    pub version: Option<u64>,
    /// How the fold applies it ([`NewEvent::apply`]); the folded event keeps it.
    pub apply: Apply,
    /// Position in the collection's log (1-based, monotonic within an epoch).
    pub offset: u64,
    /// Lifetime of the log the offset belongs to.
    pub epoch: Arc<str>,
    /// When the broker accepted the event, for latency metrics.
    pub received: Instant,
}

impl Event {
    /// True when the event carries item data (not a key-only delete).
    pub fn has_items(&self) -> bool {
        !self.items.is_empty()
    }
}

#[cfg(test)]
impl Event {
    /// A test event of `collection` at offset 1 of epoch `"e"`, received now, without `before`
    /// or version, applied as its kind: one place for the unit tests, which change what they
    /// need with struct update syntax (`Event { offset: 7, ..Event::test(…) }`), so a new
    /// field is added here once.
    pub(crate) fn test(
        collection: &str,
        kind: EventKind,
        items: Vec<Value>,
        keys: Vec<Value>,
    ) -> Event {
        NewEvent::new(Arc::from(collection), kind, items, keys).at(
            1,
            Arc::from("e"),
            Instant::now(),
        )
    }
}

/// Where and why a publish payload is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct NormalizeError {
    /// JSON Pointer into the request body.
    pub pointer: String,
    /// Human-readable reason.
    pub message: String,
}

fn invalid(pointer: impl Into<String>, message: impl Into<String>) -> NormalizeError {
    NormalizeError {
        pointer: pointer.into(),
        message: message.into(),
    }
}

/// Longest collection name accepted.
pub const MAX_COLLECTION_NAME: usize = 128;

/// Collection names are 1–128 characters of `A-Z a-z 0-9 _ - .`, not starting with `.`, so
/// they are safe as metric labels, log fields and (later) backplane key suffixes.
pub fn valid_collection_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_COLLECTION_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// An item key is a string or a number.
pub fn valid_key(key: &Value) -> bool {
    matches!(key, Value::String(_) | Value::Number(_))
}

/// The key as a string, the way Directus stores item subscription keys (`String(key)`).
pub fn key_string(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Escapes one JSON Pointer reference token.
pub(crate) fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Normalizes the body of `POST /v1/publish`: one event object or an array of them.
pub fn normalize_publish(
    body: Value,
    key_field: &dyn Fn(&str) -> String,
    max_events: usize,
) -> Result<Vec<NewEvent>, NormalizeError> {
    let (events, batch) = match body {
        Value::Array(list) => (list, true),
        one @ Value::Object(_) => (vec![one], false),
        other => {
            return Err(invalid(
                "",
                format!(
                    "expected an event object or an array of events, got {}",
                    kind_of(&other)
                ),
            ))
        }
    };
    if events.is_empty() {
        return Err(invalid("", "the array of events is empty"));
    }
    if events.len() > max_events {
        return Err(invalid(
            "",
            format!(
                "{} events in one request; the limit is {max_events}",
                events.len()
            ),
        ));
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, ev)| {
            let base = if batch {
                format!("/{i}")
            } else {
                String::new()
            };
            normalize_event_object(ev, &base, key_field)
        })
        .collect()
}

fn normalize_event_object(
    ev: Value,
    base: &str,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, NormalizeError> {
    let Value::Object(mut obj) = ev else {
        return Err(invalid(
            base,
            format!("expected an event object, got {}", kind_of(&ev)),
        ));
    };
    if let Some(unknown) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "collection" | "event" | "data" | "keys" | "idempotency_key" | "version"
        )
    }) {
        return Err(invalid(
            format!("{base}/{}", token(unknown)),
            format!(
                "unknown field `{unknown}`; an event has collection, event, data, keys, idempotency_key and version"
            ),
        ));
    }
    let version = match obj.remove("version") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v <= MAX_VERSION) => n.as_u64(),
        Some(other) => {
            return Err(invalid(
                format!("{base}/version"),
                format!(
                    "expected an integer from 0 to {MAX_VERSION}, got {}",
                    match &other {
                        Value::Number(n) => n.to_string(),
                        v => kind_of(v).to_string(),
                    }
                ),
            ))
        }
    };
    let idempotency_key = match obj.remove("idempotency_key") {
        None => None,
        Some(Value::String(k)) => {
            Some(idempotency_key(&k).map_err(|m| invalid(format!("{base}/idempotency_key"), m))?)
        }
        Some(other) => {
            return Err(invalid(
                format!("{base}/idempotency_key"),
                format!("expected a string, got {}", kind_of(&other)),
            ))
        }
    };
    let collection = match obj.remove("collection") {
        Some(Value::String(c)) => c,
        Some(other) => {
            return Err(invalid(
                format!("{base}/collection"),
                format!("expected a string, got {}", kind_of(&other)),
            ))
        }
        None => {
            return Err(invalid(
                format!("{base}/collection"),
                "missing field `collection`",
            ))
        }
    };
    let kind = match obj.remove("event") {
        Some(Value::String(e)) => EventKind::parse(&e).ok_or_else(|| {
            invalid(
                format!("{base}/event"),
                format!("unknown event `{e}`; expected create, update or delete"),
            )
        })?,
        Some(other) => {
            return Err(invalid(
                format!("{base}/event"),
                format!("expected a string, got {}", kind_of(&other)),
            ))
        }
        None => return Err(invalid(format!("{base}/event"), "missing field `event`")),
    };
    let mut event = normalize_body(
        &collection,
        kind,
        obj.remove("data"),
        obj.remove("keys"),
        base,
        key_field,
    )?;
    event.idempotency_key = idempotency_key;
    event.version = version;
    Ok(event)
}

/// Largest `version` accepted (JSON's safe integers stay exact in every client).
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Checks an idempotency key: 1–256 printable ASCII characters.
pub fn idempotency_key(key: &str) -> Result<Arc<str>, String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "an idempotency key has 1 to {MAX_IDEMPOTENCY_KEY} characters"
        ));
    }
    if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("an idempotency key is printable ASCII without spaces".into());
    }
    Ok(Arc::from(key))
}

/// Normalizes the body of `POST /v1/collections/{collection}/{event}`.
///
/// create/update: the item or an array of items. delete: an array of keys, `{"keys":[…]}`,
/// or the deleted item(s) carrying their key field.
pub fn normalize_collection_body(
    collection: &str,
    kind: EventKind,
    body: Value,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, NormalizeError> {
    match (kind, body) {
        (EventKind::Delete, Value::Object(mut obj))
            if obj.contains_key("keys") && obj.len() == 1 =>
        {
            let keys = obj.remove("keys").unwrap_or(Value::Null);
            normalize_keys_at(collection, kind, keys, "/keys", None)
        }
        (EventKind::Delete, Value::Array(list)) if list.first().is_some_and(valid_key) => {
            normalize_keys_at(collection, kind, Value::Array(list), "", None)
        }
        (_, body) => normalize_data_at(collection, kind, body, "", None, key_field),
    }
}

fn normalize_body(
    collection: &str,
    kind: EventKind,
    data: Option<Value>,
    keys: Option<Value>,
    base: &str,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, NormalizeError> {
    match (kind, data, keys) {
        (EventKind::Delete, Some(_), Some(_)) => Err(invalid(
            format!("{base}/keys"),
            "a delete carries either `keys` or `data` (the deleted items), not both",
        )),
        (EventKind::Delete, None, Some(keys)) => normalize_keys_at(
            collection,
            kind,
            keys,
            &format!("{base}/keys"),
            Some(&format!("{base}/collection")),
        ),
        (EventKind::Delete, None, None) => Err(invalid(
            format!("{base}/keys"),
            "a delete needs `keys` or `data` (the deleted items with their key field)",
        )),
        (_, Some(data), None) => normalize_data_at(
            collection,
            kind,
            data,
            &format!("{base}/data"),
            Some(&format!("{base}/collection")),
            key_field,
        ),
        (_, None, _) => Err(invalid(
            format!("{base}/data"),
            format!("a {} needs `data`", kind.as_str()),
        )),
        (_, Some(_), Some(_)) => Err(invalid(
            format!("{base}/keys"),
            format!(
                "`keys` is only for delete; a {} carries its items in `data`",
                kind.as_str()
            ),
        )),
    }
}

/// `pointer` is where the name sits in the body; `None` when it came from the URL path.
fn check_collection(collection: &str, pointer: Option<&str>) -> Result<Arc<str>, NormalizeError> {
    if valid_collection_name(collection) {
        Ok(Arc::from(collection))
    } else {
        Err(invalid(
            pointer.unwrap_or_default(),
            format!(
                "invalid collection name `{collection}`: 1-{MAX_COLLECTION_NAME} characters of A-Z a-z 0-9 _ - ., not starting with ."
            ),
        ))
    }
}

fn normalize_keys_at(
    collection: &str,
    kind: EventKind,
    keys: Value,
    at: &str,
    collection_ptr: Option<&str>,
) -> Result<NewEvent, NormalizeError> {
    let collection = check_collection(collection, collection_ptr)?;
    let Value::Array(keys) = keys else {
        return Err(invalid(
            at,
            format!("expected an array of keys, got {}", kind_of(&keys)),
        ));
    };
    if keys.is_empty() {
        return Err(invalid(at, "the array of keys is empty"));
    }
    for (i, key) in keys.iter().enumerate() {
        if !valid_key(key) {
            return Err(invalid(
                format!("{at}/{i}"),
                format!("a key is a string or a number, got {}", kind_of(key)),
            ));
        }
    }
    Ok(NewEvent::new(collection, kind, Vec::new(), keys))
}

fn normalize_data_at(
    collection: &str,
    kind: EventKind,
    data: Value,
    at: &str,
    collection_ptr: Option<&str>,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, NormalizeError> {
    let collection = check_collection(collection, collection_ptr)?;
    let field = key_field(&collection);
    let (items, batch) = match data {
        Value::Array(list) => (list, true),
        one @ Value::Object(_) => (vec![one], false),
        other => {
            return Err(invalid(
                at,
                format!(
                    "expected an item object or an array of items, got {}",
                    kind_of(&other)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(invalid(at, "the array of items is empty"));
    }
    let mut keys = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let here = if batch {
            format!("{at}/{i}")
        } else {
            at.to_string()
        };
        let obj: &Map<String, Value> = item.as_object().ok_or_else(|| {
            invalid(
                &here,
                format!("expected an item object, got {}", kind_of(item)),
            )
        })?;
        match obj.get(&field) {
            Some(key) if valid_key(key) => keys.push(key.clone()),
            Some(other) => {
                return Err(invalid(
                    format!("{here}/{}", token(&field)),
                    format!(
                        "the key field `{field}` must be a string or a number, got {}",
                        kind_of(other)
                    ),
                ))
            }
            None => {
                return Err(invalid(
                    format!("{here}/{}", token(&field)),
                    format!("the item has no key field `{field}`"),
                ))
            }
        }
    }
    Ok(NewEvent::new(collection, kind, items, keys))
}

/// Names a JSON value's type the way error messages do.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(_: &str) -> String {
        "id".into()
    }

    #[test]
    fn single_and_batch_publish() {
        let evs = normalize_publish(
            json!({"collection":"orders","event":"create","data":{"id":1,"x":2}}),
            &id,
            10,
        )
        .unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].keys, vec![json!(1)]);
        let evs = normalize_publish(
            json!([
                {"collection":"orders","event":"update","data":[{"id":1},{"id":"b"}]},
                {"collection":"orders","event":"delete","keys":[3,"4"]}
            ]),
            &id,
            10,
        )
        .unwrap();
        assert_eq!(evs[0].keys, vec![json!(1), json!("b")]);
        assert_eq!(evs[1].keys, vec![json!(3), json!("4")]);
        assert!(evs[1].items.is_empty());
    }

    #[test]
    fn errors_point_at_the_problem() {
        let cases = [
            (json!(5), ""),
            (json!([]), ""),
            (
                json!([{"collection":"o","event":"create","data":{"id":1}}, {"collection":"o","event":"nope","data":{}}]),
                "/1/event",
            ),
            (
                json!({"collection":"o","event":"create","data":[{"id":1},{"x":1}]}),
                "/data/1/id",
            ),
            (
                json!({"collection":"o","event":"create","data":{"id":null}}),
                "/data/id",
            ),
            (json!({"collection":"o","event":"create"}), "/data"),
            (json!({"collection":"o","event":"delete"}), "/keys"),
            (
                json!({"collection":"o","event":"delete","keys":[1],"data":{"id":1}}),
                "/keys",
            ),
            (
                json!({"collection":"o","event":"delete","keys":[1,{}]}),
                "/keys/1",
            ),
            (
                json!({"collection":"o","event":"update","data":{"id":1},"keys":[1]}),
                "/keys",
            ),
            (
                json!({"collection":"o","event":"create","data":{"id":1},"extra":1}),
                "/extra",
            ),
            (
                json!({"collection":"bad name","event":"create","data":{"id":1}}),
                "/collection",
            ),
            (
                json!({"collection":7,"event":"create","data":{"id":1}}),
                "/collection",
            ),
            (json!({"event":"create","data":{"id":1}}), "/collection"),
            (
                json!({"collection":"o","event":"create","data":"x"}),
                "/data",
            ),
        ];
        for (body, pointer) in cases {
            let err = normalize_publish(body.clone(), &id, 10).unwrap_err();
            assert_eq!(err.pointer, pointer, "{body} -> {err:?}");
        }
        let err = normalize_publish(json!([{}, {}, {}]), &id, 2).unwrap_err();
        assert!(err.message.contains("limit"));
    }

    #[test]
    fn collection_bodies() {
        let ev = normalize_collection_body("o", EventKind::Delete, json!([1, 2]), &id).unwrap();
        assert_eq!(ev.keys, vec![json!(1), json!(2)]);
        let ev =
            normalize_collection_body("o", EventKind::Delete, json!({"keys":["a"]}), &id).unwrap();
        assert_eq!(ev.keys, vec![json!("a")]);
        let ev =
            normalize_collection_body("o", EventKind::Delete, json!({"id":5,"x":1}), &id).unwrap();
        assert_eq!(ev.items.len(), 1);
        let ev = normalize_collection_body("o", EventKind::Create, json!([{"id":1},{"id":2}]), &id)
            .unwrap();
        assert_eq!(ev.items.len(), 2);
        let order_id = |_: &str| "order_id".to_string();
        let err = normalize_collection_body("o", EventKind::Create, json!({"id":1}), &order_id)
            .unwrap_err();
        assert_eq!(err.pointer, "/order_id");
    }

    #[test]
    fn names_and_keys() {
        assert!(valid_collection_name("orders_2024.v-1"));
        assert!(!valid_collection_name(""));
        assert!(!valid_collection_name(".hidden"));
        assert!(!valid_collection_name("a/b"));
        assert!(!valid_collection_name(&"x".repeat(129)));
        assert_eq!(key_string(&json!(42)), "42");
        assert_eq!(key_string(&json!("42")), "42");
        assert_eq!(EventSet::of(&[EventKind::Create, EventKind::Delete]).0, 5);
    }
}
