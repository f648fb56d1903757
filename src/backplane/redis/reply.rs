//! Reading stream replies (`XRANGE`, `XREVRANGE`, `XREAD`) out of raw Redis values, in both
//! RESP2 (arrays) and RESP3 (maps) shapes, without building a map per entry.

use ::redis::Value;

/// One stream entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The entry id, `<ms>-<seq>`.
    pub id: String,
    /// Field names and values, alternating.
    fields: Vec<Value>,
}

impl Entry {
    /// The value of field `name`.
    pub fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields
            .chunks(2)
            .find(|pair| pair.first().and_then(bytes) == Some(name))
            .and_then(|pair| pair.get(1))
            .and_then(bytes)
    }

    /// The first part of the id: the offset, in a collection's log.
    pub fn offset(&self) -> Option<u64> {
        self.id.split('-').next()?.parse().ok()
    }
}

/// The bytes of a string reply.
pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: Value) -> Result<String, String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).map_err(|e| e.to_string()),
        Value::SimpleString(s) => Ok(s),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

/// The entries of an `XRANGE`/`XREVRANGE` reply (or of one stream of an `XREAD` reply).
pub fn entries(reply: Value) -> Result<Vec<Entry>, String> {
    let list = match reply {
        Value::Array(list) => list,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(format!("expected a list of stream entries, got {other:?}")),
    };
    list.into_iter()
        .map(|entry| {
            let Value::Array(pair) = entry else {
                return Err(format!("expected a stream entry, got {entry:?}"));
            };
            let mut pair = pair.into_iter();
            let id = text(pair.next().unwrap_or(Value::Nil))?;
            let fields = match pair.next() {
                Some(Value::Array(fields)) => fields,
                Some(Value::Map(fields)) => fields.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                // An entry deleted from a stream still listed by a consumer group has none.
                Some(Value::Nil) | None => Vec::new(),
                Some(other) => return Err(format!("expected entry fields, got {other:?}")),
            };
            Ok(Entry { id, fields })
        })
        .collect()
}

/// The streams of an `XREAD` reply: (stream key, its entries). Nil (the block timed out) is
/// no streams.
pub fn streams(reply: Value) -> Result<Vec<(String, Vec<Entry>)>, String> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(list) => list
            .into_iter()
            .map(|stream| match stream {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    match (pair.next(), pair.next()) {
                        (Some(key), Some(entries)) => Ok((key, entries)),
                        _ => Err("a stream of an XREAD reply is not a pair".to_string()),
                    }
                }
                other => Err(format!(
                    "expected a stream of an XREAD reply, got {other:?}"
                )),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("unexpected XREAD reply: {other:?}")),
    };
    pairs
        .into_iter()
        .map(|(key, list)| Ok((text(key)?, entries(list)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::BulkString(x.as_bytes().to_vec())
    }

    fn entry(id: &str, field: &str, value: &str) -> Value {
        Value::Array(vec![s(id), Value::Array(vec![s(field), s(value)])])
    }

    #[test]
    fn reads_ranges_and_xread_replies_in_both_shapes() {
        let range = Value::Array(vec![entry("1-0", "e", "{}"), entry("2-0", "e", "[]")]);
        let got = entries(range.clone()).expect("entries");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].offset(), Some(2));
        assert_eq!(got[1].field(b"e"), Some(&b"[]"[..]));
        assert_eq!(got[1].field(b"x"), None);

        let resp2 = Value::Array(vec![Value::Array(vec![s("p:log:a"), range.clone()])]);
        let resp3 = Value::Map(vec![(s("p:log:a"), range)]);
        for reply in [resp2, resp3] {
            let got = streams(reply).expect("streams");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].0, "p:log:a");
            assert_eq!(got[0].1.len(), 2);
        }
        assert!(streams(Value::Nil).expect("nil").is_empty());
        assert!(streams(Value::Int(3)).is_err());
    }
}
