//! CloudEvents 1.0 over HTTP (the HTTP protocol binding), mapped to [`NewEvent`]s.
//!
//! The three content modes, told apart by `Content-Type` as the binding says:
//! - `application/cloudevents+json`: structured, one event as a JSON object;
//! - `application/cloudevents-batch+json`: batched, a JSON array of such objects;
//! - anything else: binary, the attributes in `ce-*` headers (percent-decoded) and the body
//!   as `data` (the edge has already refused a body that is not JSON).
//!
//! The mapping ([`Mapping`], set by the `--cloudevents-*` flags):
//! - the collection is the first of [`Mapping::collection_from`] present (default `subject`,
//!   then the `collection` extension attribute);
//! - the kind is [`Mapping::type_kinds`]' entry for the whole `type`, else its last
//!   dot-separated part: `created`/`create`, `updated`/`update`, `deleted`/`delete`;
//! - `data` is what `POST /v1/collections/{collection}/{event}` takes: an item or an array
//!   of items, and for a delete also an array of keys or `{"keys":[…]}`;
//! - `source` + `id` is the idempotency key: a redelivered event is accepted once.
//!
//! Errors name the attribute: its header in binary mode (`ce-type`), its JSON Pointer
//! otherwise (`/type`, `/3/type` in a batch). Everything about `data` points into it.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{check_batch, derived_key, under, IngestError};
use crate::event::{
    kind_of, normalize_collection_body, valid_collection_name, EventKind, NewEvent,
    MAX_COLLECTION_NAME,
};

/// The structured mode's media type.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// The batched mode's media type.
pub const BATCHED: &str = "application/cloudevents-batch+json";

/// How an event becomes a Tidings event: which attribute names the collection, which types
/// mean which kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// Attributes that may name the collection, tried in order; the first present is used.
    pub collection_from: Vec<String>,
    /// Whole `type` values with their kind, looked up before the suffix rule.
    pub type_kinds: HashMap<String, EventKind>,
}

impl Default for Mapping {
    fn default() -> Self {
        Mapping {
            collection_from: vec!["subject".into(), "collection".into()],
            type_kinds: HashMap::new(),
        }
    }
}

impl Mapping {
    /// The kind a `type` stands for, if any.
    pub fn kind(&self, ty: &str) -> Option<EventKind> {
        if let Some(kind) = self.type_kinds.get(ty) {
            return Some(*kind);
        }
        match ty.rsplit('.').next().unwrap_or(ty) {
            "created" | "create" => Some(EventKind::Create),
            "updated" | "update" => Some(EventKind::Update),
            "deleted" | "delete" => Some(EventKind::Delete),
            _ => None,
        }
    }
}

/// Checks an attribute name given on the command line: the spec's extension names are
/// lowercase letters and digits; `data`, `data_base64` and `specversion` cannot name a
/// collection.
pub fn valid_attribute_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "`{name}` is not a CloudEvents attribute name (lowercase letters and digits)"
        ));
    }
    if matches!(name, "data" | "specversion") {
        return Err(format!("`{name}` cannot name a collection"));
    }
    Ok(())
}

/// The content mode a request's `Content-Type` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-*` headers, the body is `data`.
    Binary,
    /// One event as a JSON object.
    Structured,
    /// A JSON array of events.
    Batched,
}

impl Mode {
    /// The mode of a request with this `Content-Type` (parameters ignored).
    pub fn of(content_type: Option<&str>) -> Mode {
        let mime = content_type
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        match mime.as_deref() {
            Some(STRUCTURED) => Mode::Structured,
            Some(BATCHED) => Mode::Batched,
            _ => Mode::Binary,
        }
    }
}

/// The request as the edge saw it.
pub struct Request<'a> {
    /// A header's raw value by lowercase name (binary mode reads `ce-*`).
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
    /// `Content-Type`, if any and printable.
    pub content_type: Option<&'a str>,
    /// The parsed body.
    pub body: Value,
}

/// Maps one request, in whichever mode its content type selects, to its events (all or
/// nothing).
pub fn normalize(
    request: Request<'_>,
    mapping: &Mapping,
    key_field: &dyn Fn(&str) -> String,
    max_events: usize,
) -> Result<Vec<NewEvent>, IngestError> {
    match Mode::of(request.content_type) {
        Mode::Binary => {
            let attrs = Attributes::Headers(request.header);
            Ok(vec![to_event(
                &attrs,
                Some(request.body),
                "",
                mapping,
                key_field,
            )?])
        }
        Mode::Structured => Ok(vec![structured(request.body, "", mapping, key_field)?]),
        Mode::Batched => {
            let Value::Array(list) = request.body else {
                return Err(IngestError::at(
                    "",
                    format!(
                        "a batch is a JSON array of CloudEvents, got {}",
                        kind_of(&request.body)
                    ),
                ));
            };
            check_batch(list.len(), max_events, "events")?;
            list.into_iter()
                .enumerate()
                .map(|(i, one)| structured(one, &format!("/{i}"), mapping, key_field))
                .collect()
        }
    }
}

/// One event in the JSON format (structured mode, or one member of a batch) at `base`.
pub fn structured(
    body: Value,
    base: &str,
    mapping: &Mapping,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, IngestError> {
    let Value::Object(mut obj) = body else {
        return Err(IngestError::at(
            base,
            format!("a CloudEvent is a JSON object, got {}", kind_of(&body)),
        ));
    };
    if obj.contains_key("data_base64") {
        return Err(IngestError::at(
            format!("{base}/data_base64"),
            "binary data is not accepted: send the item(s) as JSON in `data`",
        ));
    }
    let data = obj.remove("data");
    let attrs = Attributes::Object(&obj, base);
    if let Some(ct) = attrs.get("datacontenttype")? {
        if !is_json(&ct) {
            return Err(attrs.error(
                "datacontenttype",
                format!("`data` must be JSON (application/json), not `{ct}`"),
            ));
        }
    }
    to_event(&attrs, data, &format!("{base}/data"), mapping, key_field)
}

fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Where the attributes are: `ce-*` headers, or the members of a JSON object at a pointer.
enum Attributes<'a> {
    Headers(&'a dyn Fn(&str) -> Option<&'a [u8]>),
    Object(&'a Map<String, Value>, &'a str),
}

impl Attributes<'_> {
    /// An attribute's value as a string: headers percent-decoded (binding §3.1.3.2), JSON
    /// members strings.
    fn get(&self, name: &str) -> Result<Option<String>, IngestError> {
        match self {
            Attributes::Headers(header) => {
                let Some(raw) = header(&format!("ce-{name}")) else {
                    return Ok(None);
                };
                percent_encoding::percent_decode(raw)
                    .decode_utf8()
                    .map(|v| Some(v.into_owned()))
                    .map_err(|_| self.error(name, "the value is not UTF-8 once percent-decoded"))
            }
            Attributes::Object(obj, _) => match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(self.error(
                    name,
                    format!("`{name}` must be a string, got {}", kind_of(other)),
                )),
            },
        }
    }

    fn required(&self, name: &str) -> Result<String, IngestError> {
        match self.get(name)? {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(self.error(name, format!("the `{name}` attribute is empty"))),
            None => Err(self.error(name, format!("the required attribute `{name}` is missing"))),
        }
    }

    fn error(&self, name: &str, message: impl Into<String>) -> IngestError {
        match self {
            Attributes::Headers(_) => IngestError::header(format!("ce-{name}"), message),
            Attributes::Object(_, base) => IngestError::at(format!("{base}/{name}"), message),
        }
    }
}

fn to_event(
    attrs: &Attributes<'_>,
    data: Option<Value>,
    data_at: &str,
    mapping: &Mapping,
    key_field: &dyn Fn(&str) -> String,
) -> Result<NewEvent, IngestError> {
    let version = attrs.required("specversion")?;
    if version != "1.0" {
        return Err(attrs.error(
            "specversion",
            format!("unsupported specversion `{version}`: this endpoint takes CloudEvents 1.0"),
        ));
    }
    let id = attrs.required("id")?;
    let source = attrs.required("source")?;
    let ty = attrs.required("type")?;
    let mut collection = None;
    for name in &mapping.collection_from {
        if let Some(value) = attrs.get(name)? {
            collection = Some((name, value));
            break;
        }
    }
    let Some((attr, collection)) = collection else {
        let first = mapping
            .collection_from
            .first()
            .map_or("subject", String::as_str);
        return Err(attrs.error(
            first,
            format!(
                "no collection: set the `{}` attribute",
                mapping.collection_from.join("` or `")
            ),
        ));
    };
    if !valid_collection_name(&collection) {
        return Err(attrs.error(
            attr,
            format!(
                "invalid collection name `{collection}`: 1-{MAX_COLLECTION_NAME} characters of A-Z a-z 0-9 _ - ., not starting with ."
            ),
        ));
    }
    let kind = mapping.kind(&ty).ok_or_else(|| {
        attrs.error(
            "type",
            format!(
                "cannot tell the event kind from type `{ty}`: end it in .created, .updated or .deleted, or map it with --cloudevents-type-kind"
            ),
        )
    })?;
    let Some(data) = data.filter(|d| !d.is_null()) else {
        return Err(IngestError::at(
            data_at,
            format!("a {} needs `data`: the item(s)", kind.as_str()),
        ));
    };
    let mut event = normalize_collection_body(&collection, kind, data, key_field)
        .map_err(|e| under(data_at, e))?;
    event.idempotency_key = Some(derived_key("ce", &[&source, &id]));
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(_: &str) -> String {
        "id".into()
    }

    fn one(body: Value) -> Result<NewEvent, IngestError> {
        let no_headers = |_: &str| -> Option<&[u8]> { None };
        normalize(
            Request {
                header: &no_headers,
                content_type: Some(STRUCTURED),
                body,
            },
            &Mapping::default(),
            &id,
            10,
        )
        .map(|mut v| v.remove(0))
    }

    fn ce(extra: Value) -> Value {
        let mut base = json!({
            "specversion": "1.0", "id": "e1", "source": "/shop", "type": "com.shop.order.created",
            "subject": "orders", "data": {"id": 1}
        });
        if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    b.insert(k, v);
                }
            }
        }
        base
    }

    #[test]
    fn kinds_from_type_suffixes_and_the_map() {
        let mut m = Mapping::default();
        for (ty, kind) in [
            ("a.b.created", Some(EventKind::Create)),
            ("create", Some(EventKind::Create)),
            ("x.updated", Some(EventKind::Update)),
            ("x.update", Some(EventKind::Update)),
            ("x.deleted", Some(EventKind::Delete)),
            ("x.delete", Some(EventKind::Delete)),
            ("x.placed", None),
            ("x.created.v2", None),
        ] {
            assert_eq!(m.kind(ty), kind, "{ty}");
        }
        m.type_kinds.insert("x.placed".into(), EventKind::Create);
        assert_eq!(m.kind("x.placed"), Some(EventKind::Create));
    }

    #[test]
    fn structured_maps_collection_kind_data_and_key() {
        let ev = one(ce(json!({}))).unwrap();
        assert_eq!(&*ev.collection, "orders");
        assert_eq!(ev.kind, EventKind::Create);
        assert_eq!(ev.keys, vec![json!(1)]);
        let key = ev.idempotency_key.unwrap();
        assert!(key.starts_with("ce:"));
        // The collection extension when there is no subject; same source+id, same key.
        let ev = one(ce(json!({"subject": null, "collection": "users"}))).unwrap();
        assert_eq!(&*ev.collection, "users");
        assert_eq!(ev.idempotency_key.unwrap(), key);
        let ev = one(ce(json!({"type": "x.deleted", "data": [3, "4"]}))).unwrap();
        assert_eq!(ev.kind, EventKind::Delete);
        assert_eq!(ev.keys, vec![json!(3), json!("4")]);
        assert!(ev.items.is_empty());
    }

    #[test]
    fn structured_errors_point_at_the_attribute() {
        for (extra, pointer) in [
            (json!({"specversion": null}), "/specversion"),
            (json!({"specversion": "0.3"}), "/specversion"),
            (json!({"id": null}), "/id"),
            (json!({"id": ""}), "/id"),
            (json!({"id": 5}), "/id"),
            (json!({"source": null}), "/source"),
            (json!({"type": null}), "/type"),
            (json!({"type": "x.placed"}), "/type"),
            (json!({"subject": null}), "/subject"),
            (json!({"subject": "a b"}), "/subject"),
            (json!({"datacontenttype": "text/plain"}), "/datacontenttype"),
            (json!({"data_base64": "AA=="}), "/data_base64"),
            (json!({"data": null}), "/data"),
            (json!({"data": {"x": 1}}), "/data/id"),
            (json!({"data": [{"id": 1}, {"id": true}]}), "/data/1/id"),
        ] {
            let body = ce(extra.clone());
            match one(body) {
                Err(IngestError::Payload(e)) => assert_eq!(e.pointer, pointer, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn binary_reads_percent_decoded_headers() {
        let headers: HashMap<&str, &[u8]> = HashMap::from([
            ("ce-specversion", &b"1.0"[..]),
            ("ce-id", b"a%20b"),
            ("ce-source", b"/s"),
            ("ce-type", b"t.updated"),
            ("ce-collection", b"orders"),
        ]);
        let lookup = |name: &str| headers.get(name).copied();
        let request = Request {
            header: &lookup,
            content_type: Some("application/json"),
            body: json!({"id": 7}),
        };
        let evs = normalize(request, &Mapping::default(), &id, 10).unwrap();
        assert_eq!(evs[0].kind, EventKind::Update);
        assert_eq!(
            evs[0].idempotency_key,
            Some(derived_key("ce", &["/s", "a b"]))
        );
        let missing = |name: &str| (name != "ce-source").then(|| headers.get(name).copied())?;
        let request = Request {
            header: &missing,
            content_type: Some("application/json"),
            body: json!({"id": 7}),
        };
        assert_eq!(
            normalize(request, &Mapping::default(), &id, 10).unwrap_err(),
            IngestError::header("ce-source", "the required attribute `source` is missing")
        );
    }

    #[test]
    fn batches_are_all_or_nothing() {
        let no_headers = |_: &str| -> Option<&[u8]> { None };
        let batch = |body: Value, max: usize| {
            normalize(
                Request {
                    header: &no_headers,
                    content_type: Some("application/cloudevents-batch+json; charset=utf-8"),
                    body,
                },
                &Mapping::default(),
                &id,
                max,
            )
        };
        let evs = batch(json!([ce(json!({})), ce(json!({"id": "e2"}))]), 10).unwrap();
        assert_eq!(evs.len(), 2);
        assert_ne!(evs[0].idempotency_key, evs[1].idempotency_key);
        let err = batch(json!([ce(json!({})), ce(json!({"type": 1}))]), 10).unwrap_err();
        assert!(matches!(err, IngestError::Payload(e) if e.pointer == "/1/type"));
        for body in [json!([]), json!({}), json!([1, 2, 3])] {
            let err = batch(body.clone(), 2).unwrap_err();
            assert!(
                matches!(err, IngestError::Payload(ref e) if e.pointer.is_empty()),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn attribute_names() {
        assert!(valid_attribute_name("collection").is_ok());
        assert!(valid_attribute_name("tenant2").is_ok());
        for bad in ["", "Subject", "a-b", "data", "specversion"] {
            assert!(valid_attribute_name(bad).is_err(), "{bad}");
        }
    }
}
