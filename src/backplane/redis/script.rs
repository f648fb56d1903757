//! The publish script: one Lua call appends a whole publish request to the shared log, so
//! every event of the request is accepted or none is, and no other node's events can
//! interleave between the offset being taken and the entry being written.
//!
//! What the script does per event, after checking that the node's epoch is still the log's:
//! a keyed event whose idempotency key is remembered answers with the remembered offset;
//! otherwise `HINCRBY` takes the collection's next offset, `XADD` appends the wire form to
//! the collection's stream with the offset as the entry id (`<offset>-0`), the key is
//! remembered for the window, and the collection's first event announces the collection on
//! the `collections` stream.

use std::sync::Arc;

use ::redis::Value;

use super::keys::Keys;
use crate::backplane::{Accepted, WireEvent};
use crate::event::NewEvent;

/// KEYS: 1 epoch, 2 offsets hash, 3 collections stream, then two per event: its log stream
/// and its idempotency key. ARGV: 1 the node's epoch, 2 the streams' MAXLEN, 3 the
/// idempotency window in ms, then three per event: collection, `1` when keyed, wire bytes.
///
/// Returns `{1, offset, duplicate, offset, duplicate, …}`, or `{0, current_epoch}` (`{0}`
/// when the epoch key is missing) without writing anything when the epoch differs.
pub const PUBLISH_LUA: &str = r#"
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if current then return {0, current} end
  return {0}
end
local out = {1}
local n = (#KEYS - 3) / 2
for i = 1, n do
  local log = KEYS[2 + 2 * i]
  local idem = KEYS[3 + 2 * i]
  local collection = ARGV[1 + 3 * i]
  local keyed = ARGV[2 + 3 * i] == '1'
  local seen = false
  if keyed then seen = redis.call('GET', idem) end
  if seen then
    out[#out + 1] = tonumber(seen)
    out[#out + 1] = 1
  else
    local offset = redis.call('HINCRBY', KEYS[2], collection, 1)
    redis.call('XADD', log, 'MAXLEN', '~', ARGV[2], string.format('%d-0', offset),
      'e', ARGV[3 + 3 * i])
    if keyed then redis.call('SET', idem, offset, 'PX', ARGV[3]) end
    if offset == 1 then redis.call('XADD', KEYS[3], '*', 'c', collection) end
    out[#out + 1] = offset
    out[#out + 1] = 0
  end
end
return out
"#;

/// Replaces the log after it went back in time (a Redis restored from an older snapshot):
/// if the epoch is still `ARGV[1]`, deletes every collection's stream, the offsets and the
/// collections stream, and sets the epoch to `ARGV[2]`. Returns 1 when it did, 0 when another
/// node already had. KEYS: 1 epoch, 2 offsets, 3 collections; ARGV 3 is the log key prefix.
pub const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local announced = redis.call('XRANGE', KEYS[3], '-', '+')
for _, entry in ipairs(announced) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'c' then redis.call('DEL', ARGV[3] .. fields[j + 1]) end
  end
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// The arguments of one publish call.
pub fn invocation<'a>(
    script: &'a ::redis::Script,
    keys: &Keys,
    epoch: &str,
    stream_len: usize,
    window_ms: u64,
    events: &[NewEvent],
) -> ::redis::ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    call.key(&keys.epoch)
        .key(&keys.offsets)
        .key(&keys.collections)
        .arg(epoch)
        .arg(stream_len)
        .arg(window_ms);
    for event in events {
        let log = keys.log(&event.collection);
        // No window, no deduplication: the key is passed (the script's arity is fixed) but
        // never read.
        let keyed = event.idempotency_key.as_ref().filter(|_| window_ms > 0);
        let idem = match keyed {
            Some(key) => keys.idem(epoch, &event.collection, key),
            None => log.clone(),
        };
        call.key(log).key(idem);
        call.arg(&*event.collection)
            .arg(if keyed.is_some() { "1" } else { "0" })
            .arg(WireEvent::encode(event));
    }
    call
}

/// What the script answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every event's position, in order.
    Accepted(Vec<Accepted>),
    /// The log's epoch is not the node's (`None`: there is no epoch; Redis lost its data).
    EpochChanged(Option<String>),
}

/// Reads the script's reply for `count` events appended under `epoch`.
pub fn parse(reply: Value, epoch: &Arc<str>, count: usize) -> Result<Outcome, String> {
    let Value::Array(items) = reply else {
        return Err(format!("unexpected reply to the publish script: {reply:?}"));
    };
    let mut items = items.into_iter();
    match items.next() {
        Some(Value::Int(1)) => {}
        Some(Value::Int(0)) => {
            let current = items.next().and_then(|v| match v {
                Value::BulkString(b) => String::from_utf8(b).ok(),
                Value::SimpleString(s) => Some(s),
                _ => None,
            });
            return Ok(Outcome::EpochChanged(current));
        }
        other => {
            return Err(format!(
                "unexpected status from the publish script: {other:?}"
            ))
        }
    }
    let rest: Vec<Value> = items.collect();
    if rest.len() != count * 2 {
        return Err(format!(
            "the publish script answered {} values for {count} events",
            rest.len()
        ));
    }
    rest.chunks(2)
        .map(|pair| match pair {
            [Value::Int(offset), Value::Int(dup)] if *offset > 0 => Ok(Accepted {
                offset: *offset as u64,
                epoch: epoch.clone(),
                duplicate: *dup == 1,
                stale: Vec::new(),
            }),
            other => Err(format!(
                "unexpected position from the publish script: {other:?}"
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Outcome::Accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_positions_and_epoch_changes() {
        let epoch: Arc<str> = Arc::from("e");
        let ok = Value::Array(vec![
            Value::Int(1),
            Value::Int(7),
            Value::Int(0),
            Value::Int(3),
            Value::Int(1),
        ]);
        let Ok(Outcome::Accepted(positions)) = parse(ok, &epoch, 2) else {
            panic!("accepted");
        };
        assert_eq!(
            positions
                .iter()
                .map(|a| (a.offset, a.duplicate))
                .collect::<Vec<_>>(),
            [(7, false), (3, true)]
        );
        let changed = Value::Array(vec![Value::Int(0), Value::BulkString(b"f".to_vec())]);
        assert_eq!(
            parse(changed, &epoch, 1),
            Ok(Outcome::EpochChanged(Some("f".into())))
        );
        let gone = Value::Array(vec![Value::Int(0)]);
        assert_eq!(parse(gone, &epoch, 1), Ok(Outcome::EpochChanged(None)));
        assert!(parse(Value::Array(vec![Value::Int(1)]), &epoch, 1).is_err());
        assert!(parse(Value::Nil, &epoch, 1).is_err());
    }
}
