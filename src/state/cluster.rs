//! Retained state on a shared engine (`--engine redis|nats`): what a node writes to the
//! engine's per-key store from its own fold ("flush"), and how a node that starts late, or
//! restarts, or finds the engine's log replaced, gets the full state before it is ready.
//!
//! This module owns the engine-independent half: which keys changed since a node's last
//! successful flush, the entry format, and loading a snapshot read from an engine followed by
//! the catch-up over the engine's log. The engines own their stores and the atomic writes
//! (`backplane::redis::state`, `backplane::nats`).
//!
//! Why it is exact (docs/ARCHITECTURE.md, "Retained state on a shared engine", has the whole
//! argument):
//! - every node folds the same log in offset order, so its state at offset `S` is the same
//!   function of the log on every node, and any node's flush at `S` is correct;
//! - a flush writes the values, at `S`, of every key this node changed since its own last
//!   successful flush, then the store's flush offset `S`, and never moves `S` back; since
//!   that offset is never below this node's own last flush, the store always holds every key
//!   at some offset `T_k` at or above its flush offset;
//! - a starting node reads the flush offset `S0` first, then every entry (each with its own
//!   `s`, the flush it comes from), then replays the log from `S0 + 1`, applying to key `k`
//!   only the events after `s_k`. Entries written by flushes during the read are newer than
//!   `S0`, and the skip makes that harmless.
//!
//! The entry of one item, as stored in the engine: `{"s":S,"n":version,"v":item}` (`n`, the
//! stored version plus one, only when versioned).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use super::{parse, State, Store, Stored};

/// One item of a snapshot read from an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The item's key string.
    pub key: String,
    /// The flush offset this version is from: the log's events at or below it are in it.
    pub flushed: u64,
    /// The stored version, encoded (plus one; 0: unversioned).
    pub version: u64,
    /// The item, compact JSON.
    pub json: String,
}

/// Why an engine's entry could not be read (the snapshot is then not used).
#[derive(Debug, thiserror::Error)]
#[error("malformed state entry: {0}")]
pub struct EntryError(String);

/// The stored form of an item: `{"s":S,"n":version,"v":item}`.
pub fn encode_entry(flushed: u64, version: u64, json: &str) -> String {
    match version {
        0 => format!("{{\"s\":{flushed},\"v\":{json}}}"),
        n => format!("{{\"s\":{flushed},\"n\":{n},\"v\":{json}}}"),
    }
}

/// Reads a stored entry back.
pub fn decode_entry(key: String, text: &[u8]) -> Result<Entry, EntryError> {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        s: u64,
        #[serde(default)]
        n: u64,
        #[serde(borrow)]
        v: &'a RawValue,
    }
    let raw: Raw<'_> = serde_json::from_slice(text).map_err(|e| EntryError(e.to_string()))?;
    // Re-serialized so the store holds compact text whatever whitespace the entry had.
    let item: Value = serde_json::from_str(raw.v.get()).map_err(|e| EntryError(e.to_string()))?;
    Ok(Entry {
        key,
        flushed: raw.s,
        version: raw.n,
        json: super::compact(&item),
    })
}

/// What a node read from an engine's store for one collection.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store's flush offset, read before any entry.
    pub offset: u64,
    /// Every entry, as read (possibly from flushes after `offset`).
    pub entries: Vec<Entry>,
}

/// One flush of one collection: the values, at `offset` of `epoch`, of every key changed
/// since this node's last successful flush (`None`: the key is not held any more).
#[derive(Debug, Clone)]
pub struct Flush {
    /// The collection.
    pub collection: Arc<str>,
    /// The epoch the fold was in.
    pub epoch: Arc<str>,
    /// The offset of the last event folded.
    pub offset: u64,
    /// Key and stored entry (`None`: delete).
    pub writes: Vec<(Box<str>, Option<String>)>,
}

/// Per-collection bookkeeping of the flush and of a catch-up after a load (in [`Store`],
/// under its lock).
#[derive(Debug, Default)]
pub(super) struct Sync {
    /// Epoch and offset of the last event folded (or of the snapshot loaded): the point a
    /// flush of this store describes. `None`: never folded nor loaded.
    epoch: Option<Arc<str>>,
    folded: u64,
    /// Keys changed since the last successful flush (only while tracking).
    dirty: HashSet<Box<str>>,
    /// Events folded since the last flush was taken.
    since_flush: usize,
    /// After a load: the flush offset of each loaded entry newer than the snapshot's offset;
    /// events at or below it are already in that entry. Emptied once past `horizon`.
    catch_up: HashMap<Box<str>, u64>,
    /// The highest flush offset of any loaded entry.
    horizon: u64,
}

impl Sync {
    /// Called before folding the event at `offset` of `epoch`.
    pub(super) fn advance(&mut self, offset: u64, epoch: &Arc<str>) {
        if offset > self.horizon && !self.catch_up.is_empty() {
            self.catch_up = HashMap::new();
        }
        self.folded = offset;
        if self.epoch.as_ref() != Some(epoch) {
            self.epoch = Some(epoch.clone());
        }
        self.since_flush += 1;
    }

    /// Whether the event at `offset` is already in the loaded entry of `key`.
    pub(super) fn skips(&self, key: &str, offset: u64) -> bool {
        !self.catch_up.is_empty() && self.catch_up.get(key).is_some_and(|&s| offset <= s)
    }

    /// Records that `key` changed (or may have).
    pub(super) fn touch(&mut self, key: &str, tracking: bool) {
        if tracking && !self.dirty.contains(key) {
            self.dirty.insert(Box::from(key));
        }
    }
}

/// Flush settings of a state shared through an engine.
#[derive(Debug)]
pub(super) struct Tracking {
    /// Ask for a flush once this many events were folded into one collection since its last.
    pub(super) flush_every: usize,
    /// Woken when a collection passed `flush_every`.
    pub(super) wanted: tokio::sync::Notify,
}

impl State {
    /// Tracks changed keys for flushes to a shared engine, asking for a flush every
    /// `flush_every` events of a collection (besides the engine's own interval).
    pub fn with_tracking(mut self, flush_every: usize) -> Self {
        self.tracking = Some(Tracking {
            flush_every: flush_every.max(1),
            wanted: tokio::sync::Notify::new(),
        });
        self
    }

    /// Whether changed keys are tracked for flushes.
    pub fn tracking(&self) -> bool {
        self.tracking.is_some()
    }

    pub(super) fn after_fold(&self, store: &Store) {
        if let Some(t) = &self.tracking {
            if store.sync.since_flush == t.flush_every {
                t.wanted.notify_one();
            }
        }
    }

    /// Resolves when some collection has folded enough events to be flushed early.
    pub async fn flush_wanted(&self) {
        match &self.tracking {
            Some(t) => t.wanted.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The changes of `collection` to write, taken out of its dirty set (hand them back
    /// with [`State::flush_failed`] if the write does not succeed). `None`: nothing changed.
    pub fn take_flush(&self, collection: &Arc<str>) -> Option<Flush> {
        let store = self.stores.get(collection).map(|s| s.value().clone())?;
        let mut store = store.lock();
        let epoch = store.sync.epoch.clone()?;
        store.sync.since_flush = 0;
        if store.sync.dirty.is_empty() {
            return None;
        }
        let dirty = std::mem::take(&mut store.sync.dirty);
        let offset = store.sync.folded;
        let writes = dirty
            .into_iter()
            .map(|key| {
                let entry = store
                    .items
                    .get(&*key)
                    .map(|held| encode_entry(offset, held.version, held.json()));
                (key, entry)
            })
            .collect();
        Some(Flush {
            collection: collection.clone(),
            epoch,
            offset,
            writes,
        })
    }

    /// A flush that was not written: its keys are dirty again (with whatever changed since).
    pub fn flush_failed(&self, flush: Flush) {
        let Some(store) = self
            .stores
            .get(&flush.collection)
            .map(|s| s.value().clone())
        else {
            return;
        };
        let mut store = store.lock();
        for (key, _) in flush.writes {
            store.sync.dirty.insert(key);
        }
    }

    /// Every item of `collection` as stored entries from the flush at `offset` (a base
    /// written whole to a new epoch's store).
    pub fn image(&self, collection: &Arc<str>, offset: u64) -> Vec<(Box<str>, String)> {
        let store = self.store(collection);
        let store = store.lock();
        store
            .items
            .iter()
            .map(|held| {
                (
                    Box::from(held.key()),
                    encode_entry(offset, held.version, held.json()),
                )
            })
            .collect()
    }

    /// This node's state of `collection` became the base of `epoch` at `offset` (its image
    /// was written whole): nothing is dirty.
    pub fn rebase(&self, collection: &Arc<str>, epoch: &Arc<str>, offset: u64) {
        let store = self.store(collection);
        let mut store = store.lock();
        store.sync = Sync {
            epoch: Some(epoch.clone()),
            folded: offset,
            ..Sync::default()
        };
    }

    /// Replaces `collection`'s items by `snapshot` (of `epoch`), so that the log's events
    /// after `snapshot.offset`, folded next, bring it to the cluster's state. Returns the
    /// horizon: events at or below it are partly in the snapshot already, so they are folded
    /// (skipping what the snapshot holds) but must not be replayed to clients.
    ///
    /// Items over the capacity limits are loaded all the same (the cluster holds them; the
    /// limits refuse new keys only) and counted in `tidings_state_rejections_total`.
    pub fn load(&self, collection: &Arc<str>, epoch: &Arc<str>, snapshot: Snapshot) -> u64 {
        let store = self.store(collection);
        let mut store = store.lock();
        let was = (store.items.len(), store.bytes);
        let mut items = HashSet::with_capacity(snapshot.entries.len());
        let mut bytes = 0;
        let mut catch_up = HashMap::new();
        let mut horizon = snapshot.offset;
        for entry in snapshot.entries {
            bytes += super::item_bytes(&entry.key, &entry.json);
            if entry.flushed > snapshot.offset {
                horizon = horizon.max(entry.flushed);
                catch_up.insert(Box::from(entry.key.as_str()), entry.flushed);
            }
            items.insert(Stored::new(&entry.key, &entry.json, entry.version));
        }
        store.items = items;
        store.bytes = bytes;
        store.reindex();
        store.sync = Sync {
            epoch: Some(epoch.clone()),
            folded: snapshot.offset,
            catch_up,
            horizon,
            ..Sync::default()
        };
        let after = (store.items.len(), store.bytes);
        drop(store);
        self.account(collection, was, after);
        let (max_items, limit) = self.settings.max_items(collection);
        if after.0 > max_items {
            let label = self.metrics.collections.label(collection);
            self.metrics
                .state_rejections
                .with_label_values(&[&*label, limit.reason()])
                .inc();
            tracing::warn!(%collection, items = after.0, limit = max_items, "the cluster's retained state holds more items than its limit");
        }
        horizon
    }

    /// The stored item of `key`, for tests and diagnostics.
    pub fn item(&self, collection: &Arc<str>, key: &str) -> Option<Value> {
        let store = self.stores.get(collection).map(|s| s.value().clone())?;
        let store = store.lock();
        store.items.get(key).map(|held| parse(held.json()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};
    use crate::metrics::Metrics;
    use crate::state::StateSettings;
    use serde_json::json;

    fn state() -> State {
        State::new(
            StateSettings {
                collections: vec!["c".into()],
                max_items: 100,
                max_bytes: 1 << 20,
                max_init_items: 100,
                file: None,
                indexes: Vec::new(),
            },
            Arc::new(Metrics::new(10).unwrap()),
        )
        .with_tracking(1000)
    }

    fn ev(offset: u64, kind: EventKind, items: Vec<Value>) -> Event {
        let keys = items.iter().map(|i| i["id"].clone()).collect();
        Event {
            offset,
            ..Event::test("c", kind, items, keys)
        }
    }

    #[test]
    fn entries_round_trip() {
        let text = encode_entry(7, 0, r#"{"id":1,"a":[1, 2]}"#);
        assert_eq!(text, r#"{"s":7,"v":{"id":1,"a":[1, 2]}}"#);
        let entry = decode_entry("1".into(), text.as_bytes()).unwrap();
        assert_eq!(
            entry,
            Entry {
                key: "1".into(),
                flushed: 7,
                version: 0,
                json: r#"{"id":1,"a":[1,2]}"#.into()
            }
        );
        let versioned = decode_entry("1".into(), encode_entry(3, 5, "{}").as_bytes()).unwrap();
        assert_eq!((versioned.flushed, versioned.version), (3, 5));
        assert!(decode_entry("1".into(), b"{\"v\":1}").is_err());
    }

    #[test]
    fn flushes_carry_what_changed_and_a_failed_one_comes_back() {
        let s = state();
        let c: Arc<str> = Arc::from("c");
        s.fold(&ev(
            1,
            EventKind::Create,
            vec![json!({"id":1}), json!({"id":2})],
        ));
        let flush = s.take_flush(&c).expect("dirty");
        assert_eq!((flush.offset, flush.writes.len()), (1, 2));
        assert!(s.take_flush(&c).is_none(), "nothing changed since");
        s.flush_failed(flush);
        s.fold(&ev(2, EventKind::Delete, vec![json!({"id":1})]));
        let flush = s.take_flush(&c).expect("dirty again");
        let mut writes = flush.writes.clone();
        writes.sort();
        assert_eq!(flush.offset, 2);
        assert_eq!(
            writes,
            [
                (Box::from("1"), None),
                (Box::from("2"), Some(r#"{"s":2,"v":{"id":2}}"#.to_string()))
            ]
        );
    }

    #[test]
    fn a_load_skips_what_newer_entries_already_hold() {
        let s = state();
        let c: Arc<str> = Arc::from("c");
        // Read at flush offset 10; entry 2 came from a flush at 12 (it holds event 11).
        let snapshot = Snapshot {
            offset: 10,
            entries: vec![
                entry("1", 10, r#"{"id":1,"n":1}"#),
                entry("2", 12, r#"{"id":2,"n":2}"#),
            ],
        };
        assert_eq!(s.load(&c, &Arc::from("e"), snapshot), 12);
        // Event 11 is already in entry 2 (from the flush at 12): folded for key 1 only.
        s.fold(&ev(
            11,
            EventKind::Create,
            vec![json!({"id":1,"n":11}), json!({"id":2,"n":11})],
        ));
        assert_eq!(s.item(&c, "1"), Some(json!({"id":1,"n":11})));
        assert_eq!(s.item(&c, "2"), Some(json!({"id":2,"n":2})));
        // Past the horizon every event applies.
        s.fold(&ev(
            13,
            EventKind::Update,
            vec![json!({"id":1,"m":13}), json!({"id":2,"m":13})],
        ));
        assert_eq!(s.item(&c, "1"), Some(json!({"id":1,"n":11,"m":13})));
        assert_eq!(s.item(&c, "2"), Some(json!({"id":2,"n":2,"m":13})));
        assert_eq!(s.len(&c), 2);
    }
    fn entry(key: &str, flushed: u64, json: &str) -> Entry {
        Entry {
            key: key.into(),
            flushed,
            version: 0,
            json: json.into(),
        }
    }

    fn truncate(offset: u64) -> Event {
        Event {
            apply: crate::event::Apply::Truncate {
                key_field: "id".into(),
            },
            ..ev(offset, EventKind::Delete, Vec::new())
        }
    }

    #[test]
    fn a_flush_after_a_truncate_deletes_every_removed_key() {
        let s = state();
        let c: Arc<str> = Arc::from("c");
        s.fold(&ev(
            1,
            EventKind::Create,
            vec![json!({"id":1}), json!({"id":2})],
        ));
        s.take_flush(&c).expect("dirty");
        s.fold(&truncate(2));
        s.fold(&ev(3, EventKind::Create, vec![json!({"id":3})]));
        let flush = s.take_flush(&c).expect("the truncate changed keys");
        let mut writes = flush.writes.clone();
        writes.sort();
        assert_eq!(
            writes,
            [
                (Box::from("1"), None),
                (Box::from("2"), None),
                (Box::from("3"), Some(r#"{"s":3,"v":{"id":3}}"#.to_string()))
            ]
        );
        assert_eq!(s.len(&c), 1);
    }

    #[test]
    fn catching_up_across_a_truncate_keeps_only_what_was_written_after_it() {
        let s = state();
        let c: Arc<str> = Arc::from("c");
        // Read at offset 10: item 1 is older than the truncate at 11 (its deletion not yet
        // flushed), item 2 was created at 12 and flushed at 12.
        let snapshot = Snapshot {
            offset: 10,
            entries: vec![
                entry("1", 10, r#"{"id":1}"#),
                entry("2", 12, r#"{"id":2,"n":12}"#),
            ],
        };
        s.load(&c, &Arc::from("e"), snapshot);
        let removed = s.fold(&truncate(11)).expect("retained");
        assert_eq!(
            removed.keys,
            [json!(1)],
            "only the item from before the truncate"
        );
        s.fold(&ev(12, EventKind::Create, vec![json!({"id":2,"n":12})]));
        assert_eq!(s.item(&c, "1"), None);
        assert_eq!(s.item(&c, "2"), Some(json!({"id":2,"n":12})));
        assert_eq!(s.len(&c), 1);
        let flush = s.take_flush(&c).expect("dirty");
        assert!(flush.writes.contains(&(Box::from("1"), None)));
    }
}
