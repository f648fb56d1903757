//! Debezium change events (the JSON converter's output), mapped to [`NewEvent`]s.
//!
//! Accepted, alone or in a JSON array:
//! - the envelope with a schema, `{"schema":…,"payload":{…}}` (`schemas.enable=true`);
//! - the bare payload, `{"before":…,"after":…,"source":…,"op":…}` (`schemas.enable=false`);
//! - a CloudEvent whose `data` is either of those (Debezium Server's and the CloudEvents
//!   converter's `cloudevents` format: the `iodebezium*` extension attributes stand in for
//!   `source` and `op` when `data` lacks them), in structured mode (the body) or in binary
//!   mode (`ce-*` headers, the body as `data`: [`normalize_binary`]);
//! - a tombstone (`null`, or `{"schema":null,"payload":null}`): ignored, and counted.
//!
//! The mapping ([`Mapping`], set by the `--debezium-*` flags):
//! - the table is `source.table`, qualified by `source.schema` (PostgreSQL, SQL Server) or
//!   else `source.db` (MySQL): `public.customers`, `inventory.customers`. The allow-list
//!   ([`Mapping::tables`]) and the map to collections ([`Mapping::collections`]) take either
//!   form, the qualified one first; an unmapped table is the collection of the same name;
//! - `op`: `c` and `r` (a snapshot read) → create with `after`; `u` → update with `after`,
//!   keeping `before` on the event as the previous version when it is a full row (it has
//!   every field `after` has: `REPLICA IDENTITY FULL`, MySQL's full row image; PostgreSQL's
//!   default replica identity sends only the key, which is dropped); `d` → delete of the
//!   `before` row (so filters see it); `t` (truncate) of a collection that retains state
//!   (`--state`) is one `delete` of every item the state holds when it is applied (the fold
//!   finds them, [`Apply::Truncate`]), and of any other collection a 422 that says so, since
//!   nothing tells which items to delete; anything else is a 422;
//! - the key is the collection's key field (`--key-field`), in `after` (or `before`);
//! - with a schema, logical types are converted ([`Mapping::decimal`], [`Mapping::time`]);
//!   without one, values pass through as Debezium sent them (as do the outputs of
//!   `decimal.handling.mode=string|double` and `time.precision.mode=isostring`, which carry
//!   no logical type);
//! - the idempotency key is the change's source position: the connector's name, the table,
//!   the position (`lsn` and `sequence`; binlog `file`, `pos` and `row`; else the source
//!   timestamp), the op and the row's key. A redelivered event is accepted once.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::{check_batch, derived_key, under, IngestError};
use crate::event::{
    kind_of, normalize_collection_body, valid_collection_name, Apply, EventKind, NewEvent,
    MAX_COLLECTION_NAME,
};

/// What a base64 `org.apache.kafka.connect.data.Decimal` (or
/// `io.debezium.data.VariableScaleDecimal`) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecimalMode {
    /// The exact decimal as a string, `"1234.50"`.
    String,
    /// A JSON number (a double: exact only up to about 15 digits).
    Number,
    /// Unchanged: Debezium's base64 of the unscaled value.
    Base64,
}

/// What `io.debezium.time.*` and Kafka Connect's `Date`/`Time`/`Timestamp` become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeMode {
    /// ISO 8601: `"2016-06-10"`, `"13:55:39.738"`, `"2016-06-10T18:32:51.815Z"`.
    Iso,
    /// Unchanged: Debezium's numbers (days, or milli/micro/nanoseconds since the epoch or
    /// midnight).
    Epoch,
}

/// How a change event becomes a Tidings event.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// `table` or `schema.table` → collection.
    pub collections: HashMap<String, String>,
    /// The tables accepted (`table` or `schema.table`); `None`: every table.
    pub tables: Option<HashSet<String>>,
    /// Conversion of decimals.
    pub decimal: DecimalMode,
    /// Conversion of dates and times.
    pub time: TimeMode,
}

impl Default for Mapping {
    fn default() -> Self {
        Mapping {
            collections: HashMap::new(),
            tables: None,
            decimal: DecimalMode::String,
            time: TimeMode::Iso,
        }
    }
}

/// What one request became.
#[derive(Debug, Default)]
pub struct Normalized {
    /// The events, in request order.
    pub events: Vec<NewEvent>,
    /// Where each event sits in an array body (tombstones leave gaps); `None` for one event.
    pub at: Option<Vec<usize>>,
    /// Tombstones skipped.
    pub tombstones: usize,
}

/// What the mapping needs to know of the broker's collections.
#[derive(Clone, Copy)]
pub struct Collections<'a> {
    /// A collection's key field (`--key-field`).
    pub key_field: &'a dyn Fn(&str) -> String,
    /// Whether a collection retains its items (`--state`): only those can be truncated.
    pub retains: &'a dyn Fn(&str) -> bool,
}

impl std::fmt::Debug for Collections<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collections").finish_non_exhaustive()
    }
}

/// Maps a request body: one change event, or an array of them (all or nothing).
pub fn normalize(
    body: Value,
    mapping: &Mapping,
    collections: Collections<'_>,
    max_events: usize,
) -> Result<Normalized, IngestError> {
    let mut out = Normalized::default();
    match body {
        Value::Array(list) => {
            check_batch(list.len(), max_events, "change events")?;
            let mut at = Vec::with_capacity(list.len());
            for (i, one) in list.into_iter().enumerate() {
                match change(one, &format!("/{i}"), mapping, collections)? {
                    Some(event) => {
                        out.events.push(event);
                        at.push(i);
                    }
                    None => out.tombstones += 1,
                }
            }
            out.at = Some(at);
        }
        one => match change(one, "", mapping, collections)? {
            Some(event) => out.events.push(event),
            None => out.tombstones += 1,
        },
    }
    Ok(out)
}

/// Maps the body of a CloudEvent in binary content mode (`ce-*` headers): the body is the
/// event's `data`, one change event with or without its schema envelope, and `extensions`
/// are the `ce-iodebezium*` headers (name without the prefix, value as a string), standing
/// in for `op` and `source` where the change lacks them. An empty body (`null`) is a
/// tombstone.
pub fn normalize_binary(
    body: Value,
    extensions: Map<String, Value>,
    mapping: &Mapping,
    collections: Collections<'_>,
) -> Result<Normalized, IngestError> {
    let mut out = Normalized::default();
    match envelope(body, extensions, "", mapping, collections)? {
        Some(event) => out.events.push(event),
        None => out.tombstones += 1,
    }
    Ok(out)
}

/// The attributes of a CloudEvent sent to `/v1/debezium` in binary content mode: `None`
/// without a `ce-specversion` header (the body is then the event, or events, itself);
/// otherwise `specversion` must be `1.0`, and the `ce-iodebezium*` headers, percent-decoded,
/// are the extension attributes [`normalize_binary`] takes (`ce-iodebeziumop: r` → `op`).
pub fn binary_attributes(
    headers: &[(&str, &[u8])],
) -> Result<Option<Map<String, Value>>, IngestError> {
    let decode = |name: &str, raw: &[u8]| {
        percent_encoding::percent_decode(raw)
            .decode_utf8()
            .map(|v| v.into_owned())
            .map_err(|_| IngestError::header(name, "the value is not UTF-8 once percent-decoded"))
    };
    let Some((_, version)) = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("ce-specversion"))
    else {
        return Ok(None);
    };
    let version = decode("ce-specversion", version)?;
    if version != "1.0" {
        return Err(IngestError::header(
            "ce-specversion",
            format!("unsupported specversion `{version}`: this endpoint takes CloudEvents 1.0"),
        ));
    }
    let mut extensions = Map::new();
    for (name, raw) in headers {
        let lower = name.to_ascii_lowercase();
        if let Some(attr) = lower.strip_prefix("ce-iodebezium") {
            let value = decode(&lower, raw)?;
            extensions.insert(attr.to_string(), Value::String(value));
        }
    }
    Ok(Some(extensions))
}

/// One change event at `base`; `None` for a tombstone.
fn change(
    value: Value,
    base: &str,
    mapping: &Mapping,
    collections: Collections<'_>,
) -> Result<Option<NewEvent>, IngestError> {
    let Value::Object(mut obj) = value else {
        if value.is_null() {
            return Ok(None);
        }
        return Err(IngestError::at(
            base,
            format!(
                "expected a Debezium change event (an object), got {}",
                kind_of(&value)
            ),
        ));
    };
    // A CloudEvent: `data` holds the change, extension attributes may hold the rest.
    let mut extensions = Map::new();
    if obj.contains_key("specversion") {
        match obj.get("specversion") {
            Some(Value::String(v)) if v == "1.0" => {}
            _ => {
                return Err(IngestError::at(
                    format!("{base}/specversion"),
                    "a CloudEvent here has specversion `1.0`",
                ))
            }
        }
        let data = obj.remove("data").unwrap_or(Value::Null);
        for (name, value) in obj {
            if let Some(attr) = name.strip_prefix("iodebezium") {
                extensions.insert(attr.to_string(), value);
            }
        }
        return envelope(
            data,
            extensions,
            &format!("{base}/data"),
            mapping,
            collections,
        );
    }
    envelope(Value::Object(obj), extensions, base, mapping, collections)
}

/// A change event at `at` (with or without the schema envelope; a CloudEvent's `data`, whose
/// `iodebezium*` attributes are `extensions`); `None` for a tombstone.
fn envelope(
    value: Value,
    extensions: Map<String, Value>,
    at: &str,
    mapping: &Mapping,
    collections: Collections<'_>,
) -> Result<Option<NewEvent>, IngestError> {
    let mut at = at.to_string();
    let mut obj = match value {
        Value::Object(obj) => obj,
        Value::Null => return Ok(None),
        other => {
            return Err(IngestError::at(
                at,
                format!(
                    "expected the change event as a JSON object, got {}",
                    kind_of(&other)
                ),
            ))
        }
    };
    // The envelope with a schema.
    let mut schema = None;
    if obj.contains_key("payload") && !obj.contains_key("op") {
        schema = obj.remove("schema").filter(|s| !s.is_null());
        at = format!("{at}/payload");
        match obj.remove("payload") {
            Some(Value::Object(payload)) => obj = payload,
            Some(Value::Null) | None => return Ok(None),
            Some(other) => {
                return Err(IngestError::at(
                    at,
                    format!("expected the payload object, got {}", kind_of(&other)),
                ))
            }
        }
    }
    payload(obj, &extensions, schema.as_ref(), &at, mapping, collections).map(Some)
}

fn payload(
    mut obj: Map<String, Value>,
    extensions: &Map<String, Value>,
    schema: Option<&Value>,
    at: &str,
    mapping: &Mapping,
    collections: Collections<'_>,
) -> Result<NewEvent, IngestError> {
    let op = match obj.get("op").or_else(|| extensions.get("op")) {
        Some(Value::String(op)) => op.clone(),
        Some(other) => {
            return Err(IngestError::at(
                format!("{at}/op"),
                format!("`op` must be a string, got {}", kind_of(other)),
            ))
        }
        None => return Err(IngestError::at(format!("{at}/op"), "missing field `op`")),
    };
    let after_value = obj.remove("after");
    let before_value = obj.remove("before");
    let source = match obj.get("source") {
        Some(Value::Object(source)) => source,
        Some(other) => {
            return Err(IngestError::at(
                format!("{at}/source"),
                format!("`source` must be an object, got {}", kind_of(other)),
            ))
        }
        // A CloudEvent carries the source fields as iodebezium* attributes.
        None if !extensions.is_empty() => extensions,
        None => {
            return Err(IngestError::at(
                format!("{at}/source"),
                "missing field `source`",
            ))
        }
    };
    let table_at = format!("{at}/source/table");
    let table = match source.get("table") {
        Some(Value::String(t)) if !t.is_empty() => t.as_str(),
        Some(other) if !other.is_null() => {
            return Err(IngestError::at(
                table_at,
                format!("`table` must be a string, got {}", kind_of(other)),
            ))
        }
        _ => return Err(IngestError::at(table_at, "missing `source.table`")),
    };
    let qualifier = ["schema", "db"].iter().find_map(|f| {
        source
            .get(*f)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    });
    let qualified = qualifier.map(|q| format!("{q}.{table}"));
    if let Some(allowed) = &mapping.tables {
        let listed =
            allowed.contains(table) || qualified.as_ref().is_some_and(|q| allowed.contains(q));
        if !listed {
            return Err(IngestError::at(
                table_at,
                format!(
                    "table `{}` is not accepted: add it to --debezium-tables",
                    qualified.as_deref().unwrap_or(table)
                ),
            ));
        }
    }
    let collection = qualified
        .as_ref()
        .and_then(|q| mapping.collections.get(q))
        .or_else(|| mapping.collections.get(table))
        .map_or(table, String::as_str)
        .to_string();
    if !valid_collection_name(&collection) {
        return Err(IngestError::at(
            table_at,
            format!(
                "table `{table}` is not a valid collection name (1-{MAX_COLLECTION_NAME} characters of A-Z a-z 0-9 _ - ., not starting with .): map it with --debezium-collection"
            ),
        ));
    }
    let (kind, row_field) = match op.as_str() {
        "c" | "r" => (EventKind::Create, "after"),
        "u" => (EventKind::Update, "after"),
        "d" => (EventKind::Delete, "before"),
        "t" if (collections.retains)(&collection) => {
            // Every item the state holds when the truncate is applied: the fold finds them.
            let key_field = (collections.key_field)(&collection);
            return Ok(NewEvent {
                collection: std::sync::Arc::from(collection.as_str()),
                kind: EventKind::Delete,
                items: Vec::new(),
                keys: Vec::new(),
                before: Vec::new(),
                version: None,
                apply: Apply::Truncate {
                    key_field: std::sync::Arc::from(key_field),
                },
                idempotency_key: Some(position_key(source, &collection, &op, &[])),
            });
        }
        "t" => {
            return Err(IngestError::at(
                format!("{at}/op"),
                format!(
                    "a truncate of `{collection}` cannot be published: Tidings keeps no state of this collection (see --state), so it cannot tell which items to delete"
                ),
            ))
        }
        other => {
            return Err(IngestError::at(
                format!("{at}/op"),
                format!("unknown op `{other}`; expected c, r, u, d or t"),
            ))
        }
    };
    let fields = schema.map(|s| row_schema(s, row_field)).unwrap_or_default();
    let row_at = format!("{at}/{row_field}");
    let (row_value, before_value) = match kind {
        EventKind::Delete => (before_value, None),
        _ => (after_value, before_value),
    };
    let row = match row_value {
        Some(Value::Object(row)) => convert(row, &fields, &row_at, mapping)?,
        Some(other) if !other.is_null() => {
            return Err(IngestError::at(
                row_at,
                format!("`{row_field}` must be an object, got {}", kind_of(&other)),
            ))
        }
        _ => {
            return Err(IngestError::at(
                row_at,
                format!("a `{op}` event needs `{row_field}`: the row"),
            ))
        }
    };
    // Only a full previous row is a previous version (see the module doc).
    let before = match (kind, before_value) {
        (EventKind::Update, Some(Value::Object(before)))
            if row.keys().all(|k| before.contains_key(k)) =>
        {
            let fields = schema.map(|s| row_schema(s, "before")).unwrap_or_default();
            Some(convert(before, &fields, &format!("{at}/before"), mapping)?)
        }
        _ => None,
    };
    let mut event =
        normalize_collection_body(&collection, kind, Value::Object(row), collections.key_field)
            .map_err(|e| under(&row_at, e))?;
    if let Some(before) = before {
        event.before = vec![Value::Object(before)];
    }
    event.idempotency_key = Some(position_key(source, &collection, &op, &event.keys));
    Ok(event)
}

/// The source position of a change, as its idempotency key.
fn position_key(
    source: &Map<String, Value>,
    collection: &str,
    op: &str,
    keys: &[Value],
) -> std::sync::Arc<str> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let field = |name: &str| source.get(name).map(text).unwrap_or_default();
    let mut parts = vec![
        field("connector"),
        field("name"),
        field("db"),
        field("schema"),
        collection.to_string(),
        op.to_string(),
    ];
    let positioned = ["lsn", "file", "pos"]
        .iter()
        .any(|f| source.get(*f).is_some_and(|v| !v.is_null()));
    let position: &[&str] = if positioned {
        &[
            "lsn",
            "sequence",
            "file",
            "pos",
            "row",
            "change_lsn",
            "commit_lsn",
        ]
    } else {
        &["ts_ns", "ts_us", "ts_ms"]
    };
    parts.extend(position.iter().map(|f| field(f)));
    parts.extend(keys.iter().map(text));
    let borrowed: Vec<&str> = parts.iter().map(String::as_str).collect();
    derived_key("dbz", &borrowed)
}

/// A row's field schemas by field name, from the envelope schema's `before`/`after` struct.
fn row_schema<'a>(schema: &'a Value, row_field: &str) -> HashMap<&'a str, &'a Value> {
    schema
        .get("fields")
        .and_then(Value::as_array)
        .and_then(|fields| fields.iter().find(|f| f["field"] == row_field))
        .and_then(|row| row.get("fields"))
        .and_then(Value::as_array)
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| Some((f.get("field")?.as_str()?, f)))
                .collect()
        })
        .unwrap_or_default()
}

/// Converts the logical-typed fields of a row.
fn convert(
    mut row: Map<String, Value>,
    fields: &HashMap<&str, &Value>,
    at: &str,
    mapping: &Mapping,
) -> Result<Map<String, Value>, IngestError> {
    for (name, value) in row.iter_mut() {
        let Some(logical) = fields
            .get(name.as_str())
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        let here = || format!("{at}/{}", name.replace('~', "~0").replace('/', "~1"));
        let converted = match logical {
            "org.apache.kafka.connect.data.Decimal" | "io.debezium.data.VariableScaleDecimal"
                if mapping.decimal == DecimalMode::Base64 =>
            {
                continue
            }
            "org.apache.kafka.connect.data.Decimal" => {
                let scale = fields[name.as_str()]["parameters"]["scale"]
                    .as_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0);
                decimal(value, scale, mapping.decimal).map_err(|m| IngestError::at(here(), m))?
            }
            "io.debezium.data.VariableScaleDecimal" => {
                let scale = value["scale"].as_u64().and_then(|s| u32::try_from(s).ok());
                match (scale, value.get("value")) {
                    (Some(scale), Some(v)) => decimal(v, scale, mapping.decimal)
                        .map_err(|m| IngestError::at(here(), m))?,
                    _ => {
                        return Err(IngestError::at(
                            here(),
                            "a VariableScaleDecimal is {\"scale\":N,\"value\":BASE64}",
                        ))
                    }
                }
            }
            _ if mapping.time == TimeMode::Epoch => continue,
            other => match time(other, value) {
                Some(Ok(v)) => v,
                Some(Err(m)) => return Err(IngestError::at(here(), m)),
                None => continue,
            },
        };
        *value = converted;
    }
    Ok(row)
}

fn decimal(value: &Value, scale: u32, mode: DecimalMode) -> Result<Value, String> {
    let Some(text) = value.as_str() else {
        // Already a number or a string of digits: decimal.handling.mode double or string.
        return Ok(value.clone());
    };
    let bytes = base64(text).ok_or_else(|| format!("`{text}` is not a base64 Decimal"))?;
    let digits = unscaled_decimal(&bytes, scale);
    Ok(match mode {
        DecimalMode::Number => digits
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(digits), Value::Number),
        _ => Value::String(digits),
    })
}

/// A big-endian two's complement integer, divided by 10^scale, as decimal text.
fn unscaled_decimal(bytes: &[u8], scale: u32) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude: Vec<u8> = bytes.to_vec();
    if negative {
        // Two's complement: invert and add one.
        for b in magnitude.iter_mut() {
            *b = !*b;
        }
        for b in magnitude.iter_mut().rev() {
            let (sum, carry) = b.overflowing_add(1);
            *b = sum;
            if !carry {
                break;
            }
        }
    }
    // Base 256 to base 10 by repeated division.
    let mut digits = Vec::new();
    let mut rest = magnitude;
    while rest.iter().any(|&b| b != 0) {
        let mut remainder = 0u32;
        for b in rest.iter_mut() {
            let acc = (remainder << 8) | u32::from(*b);
            *b = (acc / 10) as u8;
            remainder = acc % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    let scale = scale as usize;
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let split = digits.len() - scale;
    let mut out = String::with_capacity(digits.len() + 2);
    if negative {
        out.push('-');
    }
    out.push_str(&String::from_utf8_lossy(&digits[..split]));
    if scale > 0 {
        out.push('.');
        out.push_str(&String::from_utf8_lossy(&digits[split..]));
    }
    out
}

/// Standard base64 with or without padding.
fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Converts a temporal logical type; `None` when `logical` is not one.
fn time(logical: &str, value: &Value) -> Option<Result<Value, String>> {
    let unit = match logical {
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => Unit::Days,
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            Unit::Since(1_000_000)
        }
        "io.debezium.time.MicroTimestamp" => Unit::Since(1_000),
        "io.debezium.time.NanoTimestamp" => Unit::Since(1),
        "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => Unit::Midnight(1_000_000),
        "io.debezium.time.MicroTime" => Unit::Midnight(1_000),
        "io.debezium.time.NanoTime" => Unit::Midnight(1),
        _ => return None,
    };
    let Some(n) = value.as_i64() else {
        // Already text (time.precision.mode=isostring, ZonedTimestamp): unchanged.
        return value
            .is_string()
            .then(|| Ok(value.clone()))
            .or(Some(Err(format!(
                "`{logical}` must be a number, got {}",
                kind_of(value)
            ))));
    };
    let out_of_range = || format!("{n} is out of range for `{logical}`");
    Some(match unit {
        Unit::Days => jiff::civil::Date::new(1970, 1, 1)
            .ok()
            .and_then(|epoch| epoch.checked_add(jiff::Span::new().try_days(n).ok()?).ok())
            .map(|d| Value::String(d.to_string()))
            .ok_or_else(out_of_range),
        Unit::Since(nanos_per) => i128::from(n)
            .checked_mul(nanos_per)
            .and_then(|ns| jiff::Timestamp::from_nanosecond(ns).ok())
            .map(|t| Value::String(t.to_string()))
            .ok_or_else(out_of_range),
        Unit::Midnight(nanos_per) => i128::from(n)
            .checked_mul(nanos_per)
            .filter(|ns| (0..86_400_000_000_000).contains(ns))
            .and_then(|ns| {
                let ns = i64::try_from(ns).ok()?;
                jiff::civil::Time::midnight()
                    .checked_add(jiff::SignedDuration::from_nanos(ns))
                    .ok()
            })
            .map(|t| Value::String(t.to_string()))
            .ok_or_else(out_of_range),
    })
}

/// How a temporal number counts: nanoseconds per unit.
enum Unit {
    Days,
    Since(i128),
    Midnight(i128),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(_: &str) -> String {
        "id".into()
    }

    fn none(_: &str) -> bool {
        false
    }

    const C: Collections<'static> = Collections {
        key_field: &id,
        retains: &none,
    };

    #[test]
    fn decimals_from_base64() {
        // 0x01E240 = 123456; 0xFE1DC0 = -123456 (two's complement).
        assert_eq!(unscaled_decimal(&[0x01, 0xE2, 0x40], 2), "1234.56");
        assert_eq!(unscaled_decimal(&[0xFE, 0x1D, 0xC0], 2), "-1234.56");
        assert_eq!(unscaled_decimal(&[0x05], 3), "0.005");
        assert_eq!(unscaled_decimal(&[0x00], 0), "0");
        assert_eq!(
            unscaled_decimal(&[0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 0),
            "2361183241434822606847"
        );
        assert_eq!(base64("AeJA"), Some(vec![0x01, 0xE2, 0x40]));
        assert_eq!(base64("BQ=="), Some(vec![0x05]));
        assert_eq!(base64("B*"), None);
        assert_eq!(
            decimal(&json!("AeJA"), 2, DecimalMode::Number),
            Ok(json!(1234.56))
        );
        assert_eq!(
            decimal(&json!(12.5), 2, DecimalMode::String),
            Ok(json!(12.5))
        );
    }

    #[test]
    fn temporal_types() {
        let t = |logical: &str, v: Value| time(logical, &v).map(|r| r.unwrap());
        assert_eq!(
            t("io.debezium.time.Date", json!(16953)),
            Some(json!("2016-06-01"))
        );
        assert_eq!(
            t("io.debezium.time.Timestamp", json!(1465491411815i64)),
            Some(json!("2016-06-09T16:56:51.815Z"))
        );
        assert_eq!(
            t(
                "io.debezium.time.MicroTimestamp",
                json!(1465491411815437i64)
            ),
            Some(json!("2016-06-09T16:56:51.815437Z"))
        );
        assert_eq!(
            t("io.debezium.time.MicroTime", json!(49_539_738_000i64)),
            Some(json!("13:45:39.738"))
        );
        assert_eq!(
            t(
                "io.debezium.time.ZonedTimestamp",
                json!("2016-06-09T16:56:51Z")
            ),
            None
        );
        assert!(time("io.debezium.time.Time", &json!(90_000_000_000i64))
            .unwrap()
            .is_err());
        assert!(time("io.debezium.time.Date", &json!(true))
            .unwrap()
            .is_err());
    }

    #[test]
    fn ops_tables_and_keys() {
        let src = json!({"connector": "postgresql", "name": "pg", "db": "postgres", "schema": "public", "table": "customers", "lsn": 10});
        let ev = |op: &str, before: Value, after: Value| json!({"op": op, "before": before, "after": after, "source": src});
        let m = Mapping::default();
        let n = |v: Value| normalize(v, &m, C, 10);
        let out = n(ev("c", Value::Null, json!({"id": 1, "a": 1}))).unwrap();
        assert_eq!(
            (&*out.events[0].collection, out.events[0].kind),
            ("customers", EventKind::Create)
        );
        let out = n(ev("u", json!({"id": 1}), json!({"id": 1, "a": 2}))).unwrap();
        assert!(
            out.events[0].before.is_empty(),
            "a key-only before is no previous version"
        );
        let out = n(ev("u", json!({"id": 1, "a": 1}), json!({"id": 1, "a": 2}))).unwrap();
        assert_eq!(out.events[0].before, vec![json!({"id": 1, "a": 1})]);
        let out = n(ev("d", json!({"id": 1, "a": 2}), Value::Null)).unwrap();
        assert_eq!(out.events[0].kind, EventKind::Delete);
        assert_eq!(out.events[0].items, vec![json!({"id": 1, "a": 2})]);
        // Redelivery: same key; another row at the same position (a snapshot): another key.
        let a = n(ev("r", Value::Null, json!({"id": 1})))
            .unwrap()
            .events
            .remove(0);
        let b = n(ev("r", Value::Null, json!({"id": 1})))
            .unwrap()
            .events
            .remove(0);
        let c = n(ev("r", Value::Null, json!({"id": 2})))
            .unwrap()
            .events
            .remove(0);
        assert_eq!(a.idempotency_key, b.idempotency_key);
        assert_ne!(a.idempotency_key, c.idempotency_key);
        // Tombstones.
        let out = n(json!([null, {"schema": null, "payload": null}])).unwrap();
        assert_eq!((out.events.len(), out.tombstones), (0, 2));

        let mapped = Mapping {
            collections: HashMap::from([("public.customers".into(), "people".into())]),
            tables: Some(HashSet::from(["public.customers".into(), "orders".into()])),
            ..Mapping::default()
        };
        let out = normalize(ev("c", Value::Null, json!({"id": 1})), &mapped, C, 10).unwrap();
        assert_eq!(&*out.events[0].collection, "people");
        let mut other = ev("c", Value::Null, json!({"id": 1}));
        other["source"]["table"] = json!("secrets");
        let err = normalize(other, &mapped, C, 10).unwrap_err();
        assert!(matches!(err, IngestError::Payload(e) if e.pointer == "/source/table"));
    }
}
