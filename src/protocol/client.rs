//! Parsing of client frames, with the validation messages Directus (zod) produces.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{ErrorCode, ProtocolError, Uid, WirePosition};
use crate::event::EventKind;

/// Credentials presented in an `auth` message.
#[derive(Debug, Clone, PartialEq)]
pub enum Credentials {
    /// `access_token` (flat, or nested under `data` by fcs_directus).
    AccessToken(String),
    /// `email`/`password` or `refresh_token`: Directus logins that need a user database.
    Unsupported,
    /// No usable credential.
    Missing,
}

/// An `auth` message.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthRequest {
    /// Correlation id.
    pub uid: Option<Uid>,
    /// What was presented.
    pub credentials: Credentials,
}

/// A validated `subscribe` message (the query is checked later, at compile time).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeRequest {
    /// Correlation id.
    pub uid: Option<Uid>,
    /// Collection name (not yet checked against permissions).
    pub collection: String,
    /// Only this kind of event.
    pub event: Option<EventKind>,
    /// Only this item (key kept as a string, as Directus does).
    pub item: Option<String>,
    /// The Directus query object.
    pub query: Option<Map<String, Value>>,
    /// True when the fields came nested under `data` (the fcs_directus dialect).
    pub nested: bool,
    /// Resume after this position (Tidings extension): replay what was missed.
    pub since: Option<WirePosition>,
    /// `"checkpoints": true` (Tidings extension): on a conflating collection, send
    /// `checkpoint` frames, the safe `since` values once folded frames were written.
    pub checkpoints: bool,
    /// `"max_rate": N` (Tidings extension): at most N frames per item key per second, the
    /// changes in between folded (a number from [`MAX_RATE_MIN`] to [`MAX_RATE_MAX`]).
    pub max_rate: Option<f64>,
}

/// The smallest `max_rate`: one frame per key every 100 s. Slower rates would keep a key's
/// changes (and its cooldown) for longer than a view of live data is worth.
pub const MAX_RATE_MIN: f64 = 0.01;

/// The largest `max_rate`: one frame per key per millisecond, the timer's resolution.
pub const MAX_RATE_MAX: f64 = 1000.0;

/// The `action` of an `items` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemsAction {
    /// `read`: answered from the retained state.
    Read,
    /// `create`, `update` or `delete`: not supported (publish through the HTTP API).
    Write,
}

/// A validated `items` request (the query is checked later, as a subscribe's is).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemsRequest {
    /// Correlation id, echoed with its JSON type.
    pub uid: Option<Uid>,
    /// Collection name (not yet checked against permissions).
    pub collection: String,
    /// What to do.
    pub action: ItemsAction,
    /// The Directus query object.
    pub query: Option<Map<String, Value>>,
    /// `id`: one item (Directus' `readOne`), its key as a string.
    pub id: Option<String>,
    /// `ids`: these items (Directus' `readMany`), keys as strings.
    pub ids: Option<Vec<String>>,
}

/// One parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `auth`.
    Auth(AuthRequest),
    /// `subscribe`.
    Subscribe(SubscribeRequest),
    /// `unsubscribe`, with or without uid.
    Unsubscribe {
        /// The subscription to drop; `None` drops all.
        uid: Option<Uid>,
    },
    /// Client `ping`.
    Ping {
        /// Echoed in the pong.
        uid: Option<Uid>,
    },
    /// Client `pong` (heartbeat answer; no reply).
    Pong,
    /// `items` (CRUD over the socket): Tidings answers `read` from the retained state.
    Items(ItemsRequest),
    /// A well-formed message of an unknown type: no reply at all, as Directus.
    Unknown,
}

/// Zod's name for a JSON value's type.
fn received(v: Option<&Value>) -> &'static str {
    match v {
        None => "undefined",
        Some(Value::Null) => "null",
        Some(Value::Bool(_)) => "boolean",
        Some(Value::Number(_)) => "number",
        Some(Value::String(_)) => "string",
        Some(Value::Array(_)) => "array",
        Some(Value::Object(_)) => "object",
    }
}

fn validation(kind: &'static str, detail: String) -> ProtocolError {
    ProtocolError::new(
        kind,
        ErrorCode::InvalidPayload,
        format!("Validation error: {detail}"),
        None,
    )
}

fn expected(what: &str, got: Option<&Value>, at: &str) -> String {
    format!(
        "Invalid input: expected {what}, received {} at \"{at}\"",
        received(got)
    )
}

fn string_or_number(got: Option<&Value>, at: &str) -> String {
    format!(
        "{} or {}",
        expected("string", got, at),
        expected("number", got, at)
    )
}

/// Parses one text frame. Errors are ready to send back.
pub fn parse_client(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|_| {
        ProtocolError::new(
            "server",
            ErrorCode::InvalidPayload,
            "Unable to parse the incoming message.",
            None,
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(validation(
            "server",
            format!(
                "Invalid input: expected object, received {}",
                received(Some(&value))
            ),
        ));
    };
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        other => return Err(validation("server", expected("string", other, "type"))),
    };
    let uid = match obj.get("uid") {
        None => None,
        Some(v) => Some(
            Uid::from_value(v)
                .ok_or_else(|| validation("server", string_or_number(Some(v), "uid")))?,
        ),
    };
    Ok(match kind {
        "auth" => ClientMessage::Auth(parse_auth(&obj, uid)),
        "subscribe" => ClientMessage::Subscribe(parse_subscribe(&obj, uid)?),
        "unsubscribe" => ClientMessage::Unsubscribe { uid },
        "ping" => ClientMessage::Ping { uid },
        "pong" => ClientMessage::Pong,
        "items" => ClientMessage::Items(parse_items(&obj, uid)?),
        _ => ClientMessage::Unknown,
    })
}

fn parse_auth(obj: &Map<String, Value>, uid: Option<Uid>) -> AuthRequest {
    // fcs_directus nests the token under `data`; accept both.
    let nested = obj.get("data").and_then(Value::as_object);
    let token = obj
        .get("access_token")
        .or_else(|| nested.and_then(|d| d.get("access_token")));
    let credentials = match token {
        Some(Value::String(t)) if !t.is_empty() => Credentials::AccessToken(t.clone()),
        Some(_) => Credentials::Missing,
        None if obj.contains_key("refresh_token") || obj.contains_key("email") => {
            Credentials::Unsupported
        }
        None => Credentials::Missing,
    };
    AuthRequest { uid, credentials }
}

fn parse_subscribe(
    obj: &Map<String, Value>,
    uid: Option<Uid>,
) -> Result<SubscribeRequest, ProtocolError> {
    // fcs_directus sends {"type":"subscribe","uid":…,"data":{"collection":…,"event":…,"query":…}}.
    let (fields, nested) = match obj.get("data") {
        Some(Value::Object(data)) if !obj.contains_key("collection") => (data, true),
        _ => (obj, false),
    };
    let collection = match fields.get("collection") {
        Some(Value::String(c)) => c.clone(),
        other => {
            return Err(validation(
                "subscribe",
                expected("string", other, "collection"),
            ))
        }
    };
    let event = match fields.get("event") {
        None => None,
        Some(v) => Some(v.as_str().and_then(EventKind::parse).ok_or_else(|| {
            validation(
                "subscribe",
                [EventKind::Create, EventKind::Update, EventKind::Delete]
                    .iter()
                    .map(|k| format!("Invalid input: expected \"{}\" at \"event\"", k.as_str()))
                    .collect::<Vec<_>>()
                    .join(" or "),
            )
        })?),
    };
    let item = match fields.get("item") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        other => return Err(validation("subscribe", string_or_number(other, "item"))),
    };
    let query = match fields.get("query") {
        None => None,
        Some(Value::Object(q)) => Some(q.clone()),
        other => return Err(validation("subscribe", expected("record", other, "query"))),
    };
    let since = match fields.get("since") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_since(v)?),
    };
    let checkpoints = match fields.get("checkpoints") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(on)) => *on,
        other => {
            return Err(validation(
                "subscribe",
                expected("boolean", other, "checkpoints"),
            ))
        }
    };
    let max_rate = match fields.get("max_rate") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(rate) if (MAX_RATE_MIN..=MAX_RATE_MAX).contains(&rate) => Some(rate),
            _ => {
                return Err(validation(
                    "subscribe",
                    format!(
                        "Invalid input: expected a number from {MAX_RATE_MIN} to {MAX_RATE_MAX} (updates per second per item) at \"max_rate\""
                    ),
                ))
            }
        },
        other => return Err(validation("subscribe", expected("number", other, "max_rate"))),
    };
    Ok(SubscribeRequest {
        uid,
        collection,
        event,
        item,
        query,
        nested,
        since,
        checkpoints,
        max_rate,
    })
}

fn items_validation(detail: String, uid: &Option<Uid>) -> ProtocolError {
    let mut error = validation("items", detail);
    error.uid = uid.clone();
    error
}

/// A key as Directus keeps it: `String(key)` of a string or a number.
fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_items(obj: &Map<String, Value>, uid: Option<Uid>) -> Result<ItemsRequest, ProtocolError> {
    let collection = match obj.get("collection") {
        Some(Value::String(c)) => c.clone(),
        other => {
            return Err(items_validation(
                expected("string", other, "collection"),
                &uid,
            ))
        }
    };
    let action = match obj.get("action").and_then(Value::as_str) {
        Some("read") => ItemsAction::Read,
        Some("create" | "update" | "delete") => ItemsAction::Write,
        _ => {
            let detail = ["create", "read", "update", "delete"]
                .iter()
                .map(|a| format!("Invalid input: expected \"{a}\" at \"action\""))
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(items_validation(detail, &uid));
        }
    };
    let query = match obj.get("query") {
        None => None,
        Some(Value::Object(q)) => Some(q.clone()),
        other => return Err(items_validation(expected("record", other, "query"), &uid)),
    };
    let id = match obj.get("id") {
        None => None,
        Some(v) => Some(
            key_text(v).ok_or_else(|| items_validation(string_or_number(Some(v), "id"), &uid))?,
        ),
    };
    let ids = match obj.get("ids") {
        None => None,
        Some(Value::Array(keys)) => Some(
            keys.iter()
                .enumerate()
                .map(|(i, k)| {
                    key_text(k).ok_or_else(|| {
                        items_validation(string_or_number(Some(k), &format!("ids.{i}")), &uid)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        other => return Err(items_validation(expected("array", other, "ids"), &uid)),
    };
    Ok(ItemsRequest {
        uid,
        collection,
        action,
        query,
        id,
        ids,
    })
}

/// `since`: `{"epoch": string, "offset": non-negative integer}`, as `position` carries it.
fn parse_since(v: &Value) -> Result<WirePosition, ProtocolError> {
    let Value::Object(obj) = v else {
        return Err(validation(
            "subscribe",
            expected("object", Some(v), "since"),
        ));
    };
    let epoch = match obj.get("epoch") {
        Some(Value::String(e)) if !e.is_empty() && e.len() <= 128 => Arc::from(e.as_str()),
        Some(Value::String(_)) => {
            return Err(validation(
                "subscribe",
                "Invalid input: expected a string of 1 to 128 characters at \"since.epoch\""
                    .to_string(),
            ))
        }
        other => {
            return Err(validation(
                "subscribe",
                expected("string", other, "since.epoch"),
            ))
        }
    };
    let Some(offset) = obj.get("offset").and_then(Value::as_u64) else {
        return Err(validation(
            "subscribe",
            expected("non-negative integer", obj.get("offset"), "since.offset"),
        ));
    };
    Ok(WirePosition { epoch, offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_client(text).unwrap_err().to_frame()
    }

    #[test]
    fn directus_validation_messages() {
        let cases = [
            (
                r#"{"type":"subscribe", "collection": "messages""#,
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Unable to parse the incoming message."}}"#,
            ),
            (
                "not json at all",
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Unable to parse the incoming message."}}"#,
            ),
            (
                r#"{"uid":"no-type"}"#,
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received undefined at \"type\""}}"#,
            ),
            (
                "[1,2,3]",
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected object, received array"}}"#,
            ),
            (
                "42",
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected object, received number"}}"#,
            ),
            (
                r#"{"type":"subscribe","collection":"messages","uid":{"nested":true}}"#,
                r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received object at \"uid\" or Invalid input: expected number, received object at \"uid\""}}"#,
            ),
            (
                r#"{"type":"subscribe","uid":"no-collection"}"#,
                r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received undefined at \"collection\""}}"#,
            ),
            (
                r#"{"type":"subscribe","collection":123,"uid":"num-collection"}"#,
                r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received number at \"collection\""}}"#,
            ),
            (
                r#"{"type":"subscribe","collection":"messages","event":"read","uid":"bad-event"}"#,
                r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected \"create\" at \"event\" or Invalid input: expected \"update\" at \"event\" or Invalid input: expected \"delete\" at \"event\""}}"#,
            ),
            (
                r#"{"type":"subscribe","collection":"messages","uid":"bad-query-type","query":"fields=id"}"#,
                r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected record, received string at \"query\""}}"#,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(err(input), want, "input {input}");
        }
    }

    #[test]
    fn max_rate() {
        let rate = |text: &str| match parse_client(text) {
            Ok(ClientMessage::Subscribe(s)) => Ok(s.max_rate),
            Ok(_) => panic!("not subscribe"),
            Err(e) => Err(e.to_frame()),
        };
        let sub = |v: &str| format!(r#"{{"type":"subscribe","collection":"p","max_rate":{v}}}"#);
        assert_eq!(rate(&sub("2")), Ok(Some(2.0)));
        assert_eq!(rate(&sub("0.5")), Ok(Some(0.5)), "fractions: one per 2 s");
        assert_eq!(rate(&sub("0.01")), Ok(Some(0.01)));
        assert_eq!(rate(&sub("1000")), Ok(Some(1000.0)));
        assert_eq!(rate(&sub("null")), Ok(None));
        assert_eq!(rate(r#"{"type":"subscribe","collection":"p"}"#), Ok(None));
        let range = r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected a number from 0.01 to 1000 (updates per second per item) at \"max_rate\""}}"#;
        for bad in ["0", "-1", "0.001", "1000.5", "1e9"] {
            assert_eq!(rate(&sub(bad)).unwrap_err(), range, "{bad}");
        }
        assert_eq!(
            rate(&sub("\"2\"")).unwrap_err(),
            r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected number, received string at \"max_rate\""}}"#
        );
    }

    #[test]
    fn nested_fcs_forms() {
        let m = parse_client(r#"{"type":"auth","data":{"access_token":"tok"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Auth(AuthRequest {
                uid: None,
                credentials: Credentials::AccessToken("tok".into())
            })
        );
        let m = parse_client(
            r#"{"type":"subscribe","uid":"sub_0","data":{"collection":"messages","event":"create","query":{"fields":["id","text"]}}}"#,
        )
        .unwrap();
        let ClientMessage::Subscribe(s) = m else {
            panic!("not subscribe")
        };
        assert!(s.nested);
        assert_eq!(s.collection, "messages");
        assert_eq!(s.event, Some(EventKind::Create));
        assert_eq!(s.uid, Some(Uid::Str("sub_0".into())));
    }

    #[test]
    fn other_types() {
        assert_eq!(
            parse_client(r#"{"type":"frobnicate","uid":"x"}"#).unwrap(),
            ClientMessage::Unknown
        );
        assert_eq!(
            parse_client(r#"{"type":"pong"}"#).unwrap(),
            ClientMessage::Pong
        );
        assert_eq!(
            parse_client(r#"{"type":"unsubscribe"}"#).unwrap(),
            ClientMessage::Unsubscribe { uid: None }
        );
        let ClientMessage::Subscribe(s) =
            parse_client(r#"{"type":"subscribe","collection":"m","item":24}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(s.item.as_deref(), Some("24"));
        let ClientMessage::Auth(a) =
            parse_client(r#"{"type":"auth","email":"a","password":"b"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.credentials, Credentials::Unsupported);
        let ClientMessage::Auth(a) = parse_client(r#"{"type":"auth","uid":"no-cred"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.credentials, Credentials::Missing);
    }
}
