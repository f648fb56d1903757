//! Retained state in Redis (`--state` with `--engine redis`): one hash of items per
//! collection and one small meta hash beside it (layout: [`super::keys`]), written by the
//! nodes from their own fold, read by a node that starts late.
//!
//! This module owns the three scripts and the reads:
//! - **flush** ([`FLUSH_LUA`]): one script writes a node's changed keys and then the flush
//!   offset, atomically, and only if the log's epoch is the node's, no base is being built,
//!   and the stored offset is not newer (an older flush never overwrites a newer one);
//! - **claim** ([`CLAIM_LUA`]): a node entering an epoch either finds a complete snapshot of
//!   that epoch (it loads it), or one being built by another node (it waits, not ready), or
//!   none (missing, of an older epoch, or a build whose lease ran out): it then becomes the
//!   builder of the epoch's base and writes it with [`BUILD_LUA`], in chunks, under a lease;
//! - **read** ([`read_snapshot`]): the flush offset, then every entry with `HSCAN` (which
//!   does not block Redis), then the caller replays the log from the offset on.

use std::sync::Arc;

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;

use super::keys::Keys;
use super::LinkError;
use crate::state::cluster::{decode_entry, Flush, Snapshot};

/// Entries per `HSCAN` page and per build chunk.
const CHUNK: usize = 1000;
/// How long a claimed base build may go without progress before another node may take it
/// over (each chunk renews it).
pub const LEASE_MS: u64 = 30_000;

/// KEYS: 1 meta, 2 items, 3 the log's epoch key. ARGV: 1 the flush's epoch, 2 its offset,
/// then pairs of item key and entry (an empty entry deletes the key).
///
/// Returns `{1}` written, `{0, why}` refused (a newer flush is stored, or a base is being
/// built), `{2}` the epoch is not the log's (nothing written).
pub const FLUSH_LUA: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return {2} end
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'b')
if not m[1] then
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
elseif m[1] ~= ARGV[1] then
  return {2}
elseif m[3] then
  return {0, 'building'}
elseif tonumber(m[2]) > tonumber(ARGV[2]) then
  return {0, m[2]}
end
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], 's', ARGV[2])
return {1}
"#;

/// KEYS: 1 meta, 2 items, 3 the log's epoch key. ARGV: 1 epoch, 2 the claimant's token,
/// 3 lease in ms.
///
/// Returns `{1, offset}` a complete snapshot of the epoch is there, `{2}` another node is
/// building it, `{3}` claimed (items and meta cleared, the claimant builds), `{4}` the epoch
/// is not the log's.
pub const CLAIM_LUA: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return {4} end
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'b', 'l')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] == ARGV[1] then
  if not m[3] then return {1, tonumber(m[2])} end
  if m[3] ~= ARGV[2] and tonumber(m[4]) > now then return {2} end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0, 'b', ARGV[2], 'l', now + tonumber(ARGV[3]))
return {3}
"#;

/// KEYS: 1 meta, 2 items. ARGV: 1 epoch, 2 builder token, 3 lease in ms, 4 the base's
/// offset on the last chunk (empty before), then pairs of item key and entry.
///
/// Returns 1 written, 0 the claim was lost (another node took the build over).
pub const BUILD_LUA: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'e', 'b')
if m[1] ~= ARGV[1] or m[2] ~= ARGV[2] then return 0 end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[1], 'b', 'l')
  redis.call('HSET', KEYS[1], 's', ARGV[4])
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'l', now + tonumber(ARGV[3]))
end
return 1
"#;

/// KEYS: 1 meta. ARGV: 1 builder token. Gives up a claim (the claimant cannot build).
pub const RELEASE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'b') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// What the store of one collection holds for a node entering an epoch.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// A complete snapshot at this flush offset: load it.
    Ready(u64),
    /// Another node is writing the epoch's base.
    Busy,
    /// This node is to write the base.
    Claimed,
    /// The log's epoch is not the one the node agreed on.
    EpochChanged,
}

/// How a flush ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Written.
    Written,
    /// Refused: a newer flush is stored, or a base is being built.
    Refused,
    /// The flush's epoch is not the log's.
    Stale,
}

fn ints(reply: &Value) -> Vec<i64> {
    match reply {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::Int(n) => *n,
                _ => -1,
            })
            .collect(),
        Value::Int(n) => vec![*n],
        _ => Vec::new(),
    }
}

/// Claims (or finds) the base of `collection` in `epoch` for the node holding `token`.
pub async fn claim(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    collection: &str,
    epoch: &str,
    token: &str,
) -> Result<Claim, LinkError> {
    let reply: Value = ::redis::Script::new(CLAIM_LUA)
        .key(keys.state_meta(collection))
        .key(keys.state(collection))
        .key(&keys.epoch)
        .arg(epoch)
        .arg(token)
        .arg(LEASE_MS)
        .invoke_async(conn)
        .await?;
    match ints(&reply).as_slice() {
        [1, offset] if *offset >= 0 => Ok(Claim::Ready(*offset as u64)),
        [2] => Ok(Claim::Busy),
        [3] => Ok(Claim::Claimed),
        [4] => Ok(Claim::EpochChanged),
        _ => Err(LinkError::Reply(format!(
            "unexpected reply to the state claim: {reply:?}"
        ))),
    }
}

/// Writes `entries` as the base of `collection` at `offset` of `epoch`, in chunks. False:
/// another node took the build over.
pub async fn build(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    collection: &str,
    (epoch, token): (&str, &str),
    offset: u64,
    entries: &[(Box<str>, String)],
) -> Result<bool, LinkError> {
    let script = ::redis::Script::new(BUILD_LUA);
    let mut chunks: Vec<&[(Box<str>, String)]> = entries.chunks(CHUNK).collect();
    if chunks.is_empty() {
        // An empty base is one final chunk with no entries.
        chunks.push(&[]);
    }
    let count = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let last = i + 1 == count;
        let mut call = script.prepare_invoke();
        call.key(keys.state_meta(collection))
            .key(keys.state(collection))
            .arg(epoch)
            .arg(token)
            .arg(LEASE_MS)
            .arg(if last {
                offset.to_string()
            } else {
                String::new()
            });
        for (key, entry) in chunk {
            call.arg(&**key).arg(entry);
        }
        let written: i64 = call.invoke_async(conn).await?;
        if written != 1 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Gives up a claim this node cannot build.
pub async fn release(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    collection: &str,
    token: &str,
) -> Result<(), LinkError> {
    let _: i64 = ::redis::Script::new(RELEASE_LUA)
        .key(keys.state_meta(collection))
        .arg(token)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// One field of an `HSCAN` page: name and value, as bytes.
type Field = (Vec<u8>, Vec<u8>);

/// Every entry of `collection` (after its flush offset `offset` was read).
pub async fn read_snapshot(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    collection: &str,
    offset: u64,
) -> Result<Snapshot, LinkError> {
    let key = keys.state(collection);
    let mut snapshot = Snapshot {
        offset,
        entries: Vec::new(),
    };
    let mut cursor = "0".to_string();
    loop {
        let (next, page): (String, Vec<Field>) = ::redis::cmd("HSCAN")
            .arg(&key)
            .arg(&cursor)
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(conn)
            .await?;
        for (field, value) in page {
            let field = String::from_utf8(field)
                .map_err(|_| LinkError::Reply(format!("a key of {key} is not UTF-8")))?;
            let entry =
                decode_entry(field, &value).map_err(|e| LinkError::Reply(format!("{key}: {e}")))?;
            snapshot.entries.push(entry);
        }
        if next == "0" {
            return Ok(snapshot);
        }
        cursor = next;
    }
}

/// Writes one flush.
pub async fn flush(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    flush: &Flush,
) -> Result<Flushed, LinkError> {
    let script = ::redis::Script::new(FLUSH_LUA);
    let mut call = script.prepare_invoke();
    call.key(keys.state_meta(&flush.collection))
        .key(keys.state(&flush.collection))
        .key(&keys.epoch)
        .arg(&*flush.epoch)
        .arg(flush.offset);
    for (key, entry) in &flush.writes {
        call.arg(&**key).arg(entry.as_deref().unwrap_or(""));
    }
    let reply: Value = call.invoke_async(conn).await?;
    match ints(&reply).first() {
        Some(1) => Ok(Flushed::Written),
        Some(0) => Ok(Flushed::Refused),
        Some(2) => Ok(Flushed::Stale),
        _ => Err(LinkError::Reply(format!(
            "unexpected reply to the state flush: {reply:?}"
        ))),
    }
}

/// A random token naming this node as a base builder.
pub fn token() -> Arc<str> {
    crate::history::random_epoch()
}
