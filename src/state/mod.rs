//! Retained state: the latest version of every item of the collections that keep it
//! (`--state`), per collection, by key.
//!
//! This module owns three things:
//! - **the fold** ([`State::fold`]): every event of a retained collection is applied to the
//!   store in offset order, under the hub's history log lock, and turned into the event the
//!   subscribers see: a `create`/`update` carries the full merged item, a key-only `delete`
//!   carries the stored items it removes (so filters and row rules see them);
//! - **capacity** ([`State::admit`]): a publish that would create a key beyond
//!   `--state-max-items` (per collection) or `--state-max-bytes` (all collections) is refused
//!   whole, before the engine gives it an offset;
//! - **snapshots** ([`State::snapshot`]): a collection subscription's `init`, taken under the
//!   same log lock as the fold, so the cut is exact; the same list engine ([`view`]) answers
//!   the `items` reads.
//!
//! Its submodule [`persist`] keeps the memory engine's state across restarts (`--state-dir`).
//!
//! Items are kept as compact JSON text (`Box<str>`), not as `serde_json::Value` trees: a
//! tree costs several times its text in allocations, and the fold and the snapshot parse only
//! the items they touch. Merge rules (`protocol/README.md`): `create` replaces the whole item
//! (an upsert); `update` merges top-level fields into the stored item (`null` sets null,
//! nested objects and arrays are replaced whole), and an update of a key not held is stored
//! as given; `delete` removes.
//!
//! With a shared engine (`redis`, `nats`) every node folds the same log, and [`cluster`] adds
//! what a node needs to start late: the keys changed since its last flush to the engine's
//! store, and the load of a snapshot read from it.

pub mod persist;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::Value;

use crate::collections::{CollectionsFile, Shorthand};
use crate::event::{key_string, Apply, Event, EventKind, NewEvent};
use crate::metrics::Metrics;
use crate::subscription::Spec;

mod index;
mod view;

use index::Index;

pub use view::{Purpose, View};

pub mod cluster;

/// Directus' default `limit` of an items read (`QUERY_LIMIT_DEFAULT`), which a retained
/// `init` without `limit` follows; `limit: -1` asks for every matching item.
pub const DEFAULT_INIT_LIMIT: usize = 100;

/// Fixed cost counted per item on top of its JSON and key text (its set slot):
/// what `--state-max-bytes` and `tidings_state_bytes` count, close to the real footprint.
const ITEM_OVERHEAD: usize = 32;

/// What retains state and how much (from `--state`, `--state-max-items`,
/// `--state-max-bytes`, `--max-init-items`, and the collections file, which wins per
/// collection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSettings {
    /// Collections that retain their items; `*` is every collection. Empty: none.
    pub collections: Vec<String>,
    /// Most items one collection may hold.
    pub max_items: usize,
    /// Most bytes all collections may hold together (approximate: JSON text, key, overhead).
    pub max_bytes: usize,
    /// Most items one `init` may carry.
    pub max_init_items: usize,
    /// `--collections-file`, whose per-collection `state` and `max_items` win over the flags
    /// (the composition root copies it from the configuration).
    pub file: Option<Arc<CollectionsFile>>,
    /// Secondary equality indexes (`--state-index COLLECTION.FIELD`): (collection, dotted
    /// field) pairs, kept by the fold and used by `init` and reads.
    pub indexes: Vec<(String, String)>,
}

impl StateSettings {
    /// The indexed fields of `collection`.
    pub fn indexed_fields(&self, collection: &str) -> Vec<String> {
        let declared = self
            .file
            .as_deref()
            .and_then(|f| f.collections.get(collection))
            .map(|d| d.indexes.clone())
            .unwrap_or_default();
        let mut fields: Vec<String> = self
            .indexes
            .iter()
            .filter(|(c, _)| c == collection)
            .map(|(_, f)| f.clone())
            .chain(declared)
            .collect();
        fields.sort();
        fields.dedup();
        fields
    }

    fn shorthand<'a>(&'a self, no_keys: &'a HashMap<String, String>) -> Shorthand<'a> {
        Shorthand {
            file: self.file.as_deref(),
            key_fields: no_keys,
            state: &self.collections,
            max_items: self.max_items,
            transitions: crate::config::defaults::TRANSITIONS,
            slow_consumer_policy: crate::config::defaults::SLOW_CONSUMER_POLICY,
        }
    }

    /// Whether `collection` retains its items.
    pub fn retains(&self, collection: &str) -> bool {
        self.shorthand(&HashMap::new()).retains(collection)
    }

    /// Whether any collection may retain its items.
    pub fn any(&self) -> bool {
        self.shorthand(&HashMap::new()).any_state()
    }

    /// Most items `collection` may hold, and which limit that is.
    pub fn max_items(&self, collection: &str) -> (usize, Limit) {
        let declared = self
            .file
            .as_deref()
            .and_then(|f| f.collections.get(collection))
            .and_then(|d| d.max_items);
        match declared {
            Some(n) => (n, Limit::FileMaxItems),
            None => (self.max_items, Limit::MaxItems),
        }
    }

    /// Collections named as retaining (by `--state` or the file), for metrics from the
    /// first scrape (`*` names none).
    fn named(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .collections
            .iter()
            .filter(|c| *c != "*" && self.retains(c))
            .cloned()
            .collect();
        if let Some(file) = &self.file {
            names.extend(file.collections.keys().filter(|c| self.retains(c)).cloned());
        }
        names.sort();
        names.dedup();
        names
    }
}

/// Which limit a refused publish would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--state-max-items`.
    MaxItems,
    /// The collection's `max_items` in the collections file.
    FileMaxItems,
    /// `--state-max-bytes`.
    MaxBytes,
}

impl Limit {
    /// The flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::MaxItems => "--state-max-items",
            Limit::FileMaxItems => "its max_items in --collections-file",
            Limit::MaxBytes => "--state-max-bytes",
        }
    }

    /// The `reason` label of `tidings_state_rejections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Limit::MaxItems | Limit::FileMaxItems => "max_items",
            Limit::MaxBytes => "max_bytes",
        }
    }
}

/// Errors of the state boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A publish would create new keys beyond a limit: nothing of it was published.
    #[error("the retained state of collection \"{collection}\" is full: event {index} would create {new} new item(s) beyond {} ({limit_value}); nothing was published", limit.flag())]
    Full {
        /// The collection.
        collection: Arc<str>,
        /// Position of the first event over the limit in the request (0-based).
        index: usize,
        /// New keys that event (and the ones before it in the batch) would create.
        new: usize,
        /// Which limit.
        limit: Limit,
        /// Its configured value.
        limit_value: usize,
    },
    /// A retained `init` would carry more items than `--max-init-items`.
    #[error("the initial list would hold {count} items, over --max-init-items ({limit}); narrow the filter or set a smaller limit")]
    InitTooLarge {
        /// Items the snapshot would carry.
        count: usize,
        /// `--max-init-items`.
        limit: usize,
    },
    /// An `items` read would return more items than `--max-init-items`.
    #[error("the read would return {count} items, over --max-init-items ({limit}); narrow the filter or set a smaller limit")]
    ReadTooLarge {
        /// Items the read would return.
        count: usize,
        /// `--max-init-items`.
        limit: usize,
    },
}

/// One stored item: its key and its compact JSON in one allocation (`key ++ json`), and the
/// publisher's version (plus one; 0: none). One box per item instead of two saves the key's
/// own allocation; the set finds an item by its key through `Borrow<str>`.
#[derive(Debug)]
struct Stored {
    text: Box<str>,
    key_len: u32,
    version: u64,
}

impl Stored {
    fn new(key: &str, json: &str, version: u64) -> Stored {
        let mut text = String::with_capacity(key.len() + json.len());
        text.push_str(key);
        text.push_str(json);
        Stored {
            text: text.into_boxed_str(),
            // Keys come from publish bodies (at most --max-publish-bytes).
            key_len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            version,
        }
    }

    fn key(&self) -> &str {
        self.text.get(..self.key_len as usize).unwrap_or_default()
    }

    fn json(&self) -> &str {
        self.text.get(self.key_len as usize..).unwrap_or_default()
    }
}

impl std::borrow::Borrow<str> for Stored {
    fn borrow(&self) -> &str {
        self.key()
    }
}

// Hash and equality are the key's (as `Borrow<str>` requires).
impl std::hash::Hash for Stored {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Stored {}

/// The version as stored: plus one, so 0 means "unversioned" without an `Option`'s padding.
fn encode_version(version: Option<u64>) -> u64 {
    version.map_or(0, |v| v.saturating_add(1))
}

/// Whether a write with `version` is stale against a stored `held` (encoded) version: only a
/// versioned write onto a versioned item can be, when it is not newer.
fn is_stale(held: u64, version: Option<u64>) -> bool {
    version.is_some_and(|v| held != 0 && v.saturating_add(1) <= held)
}

/// One collection's items, by key string (Directus' `String(key)`).
#[derive(Debug, Default)]
struct Store {
    items: HashSet<Stored>,
    /// Bytes counted for these items (see [`item_bytes`]).
    bytes: usize,
    /// The collection's equality indexes (`--state-index`), kept with every put and remove.
    index: Index,
    /// Where the fold is, and what changed since the last flush to a shared engine.
    sync: cluster::Sync,
}

fn item_bytes(key: &str, json: &str) -> usize {
    key.len() + json.len() + ITEM_OVERHEAD
}

fn parse(json: &str) -> Value {
    // The store holds only text it serialized itself from a `Value`.
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// A stored item reduced to its top-level `fields` (sorted): what a predicate reading only
/// those needs, for the cost of scanning past the rest rather than building it.
fn parse_fields(json: &str, fields: &[&str]) -> Value {
    let mut de = serde_json::Deserializer::from_str(json);
    serde::de::DeserializeSeed::deserialize(Fields(fields), &mut de).unwrap_or(Value::Null)
}

struct Fields<'f>(&'f [&'f str]);

impl<'de> serde::de::DeserializeSeed<'de> for Fields<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Fields<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an item")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(FieldName(name)) = map.next_key()? {
            if self.0.binary_search(&name.as_ref()).is_ok() {
                out.insert(name.into_owned(), map.next_value()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }
}

/// An object key, borrowed from the text unless it has escapes.
struct FieldName<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> serde::de::Visitor<'de> for Name {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Name)
    }
}

fn compact(value: &Value) -> String {
    // Serializing a `Value` cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

impl Store {
    /// Stores `item` under `key` with `version`.
    fn put(&mut self, key: &str, item: &Value, version: Option<u64>) {
        let json = compact(item);
        let added = item_bytes(key, &json);
        let stored = Stored::new(key, &json, encode_version(version));
        let removed = match self.items.replace(stored) {
            Some(old) => {
                if !self.index.is_empty() {
                    self.index.remove(key, &parse(old.json()));
                }
                item_bytes(key, old.json())
            }
            None => 0,
        };
        if !self.index.is_empty() {
            self.index.insert(key, item);
        }
        self.bytes = self.bytes + added - removed;
    }

    /// Removes `key`, returning the removed item.
    fn remove(&mut self, key: &str) -> Option<Value> {
        let old = self.items.take(key)?;
        self.bytes -= item_bytes(key, old.json());
        let item = parse(old.json());
        if !self.index.is_empty() {
            self.index.remove(key, &item);
        }
        Some(item)
    }

    fn get(&self, key: &str) -> Option<Value> {
        self.items.get(key).map(|held| parse(held.json()))
    }

    /// Rebuilds the equality indexes from the items (after a restore or a snapshot load put
    /// items in without [`Store::put`]).
    fn reindex(&mut self) {
        if self.index.is_empty() {
            return;
        }
        self.index.clear();
        for held in &self.items {
            self.index.insert(held.key(), &parse(held.json()));
        }
    }

    /// The encoded version of `key` (0: unversioned or not held).
    fn version(&self, key: &str) -> u64 {
        self.items.get(key).map_or(0, |held| held.version)
    }
}

/// Empties `store` (a truncate at `offset`), pushing every removed item and its key (the
/// item's `key_field`; the stored key string when the item lacks it), in key order so that
/// every node renders the same frame.
///
/// Each removed key is marked changed, so the next flush deletes it from the shared engine
/// too (else a node loading that snapshot would bring it back). A node catching up from a
/// snapshot keeps the items whose loaded entry was flushed at or after the truncate: they
/// were written again after it, and the events that did are already in them.
fn truncate(
    store: &mut Store,
    key_field: &str,
    offset: u64,
    tracking: bool,
    items: &mut Vec<Value>,
    keys: &mut Vec<Value>,
) {
    let (kept, mut held): (Vec<Stored>, Vec<Stored>) = std::mem::take(&mut store.items)
        .into_iter()
        .partition(|stored| store.sync.skips(stored.key(), offset));
    store.bytes = kept
        .iter()
        .map(|stored| item_bytes(stored.key(), stored.json()))
        .sum();
    store.items = kept.into_iter().collect();
    store.reindex();
    held.sort_unstable_by(|a, b| a.key().cmp(b.key()));
    items.reserve(held.len());
    keys.reserve(held.len());
    for stored in held {
        store.sync.touch(stored.key(), tracking);
        let item = parse(stored.json());
        let key = match item.get(key_field) {
            Some(key) if key_string(key) == stored.key() => key.clone(),
            _ => Value::String(stored.key().to_string()),
        };
        items.push(item);
        keys.push(key);
    }
}

/// The shallow merge of an update into the stored item: every top-level field of `update`
/// replaces the stored one (`null` included; nested values whole).
fn merge(stored: Value, update: &Value) -> Value {
    match (stored, update) {
        (Value::Object(mut into), Value::Object(fields)) => {
            for (k, v) in fields {
                into.insert(k.clone(), v.clone());
            }
            Value::Object(into)
        }
        (_, update) => update.clone(),
    }
}

/// Retained items of every retaining collection, with their capacity accounting.
#[derive(Debug)]
pub struct State {
    settings: StateSettings,
    stores: DashMap<Arc<str>, Arc<Mutex<Store>>>,
    /// Bytes held by all stores together.
    bytes: AtomicUsize,
    /// Bytes admitted for new keys whose events are being appended (released by
    /// [`Admission`] once they are folded), so two concurrent publishes on different
    /// collections cannot both pass the global limit.
    pending: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Set when the state is shared through an engine (changed keys are flushed to it).
    tracking: Option<cluster::Tracking>,
}

/// How a reconcile's item compares with the held one ([`State::compare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Not held: a create.
    Missing,
    /// Held as given: nothing to do.
    Same,
    /// Held with other content: a replacing update.
    Different,
}

/// What the deletes of one batch remove from a collection, as [`State::admit`] counts them.
#[derive(Debug, Default)]
struct Gone {
    /// Held keys deleted earlier in the batch.
    keys: HashSet<String>,
    /// A truncate came earlier in the batch: nothing held is left.
    all: bool,
}

/// Bytes a publish reserved against `--state-max-bytes`; released on drop (after the events
/// were folded, which counts them for real).
#[derive(Debug)]
pub struct Admission<'a> {
    pending: &'a AtomicUsize,
    bytes: usize,
    /// Per event of the batch: the keys of its items that are stale (their `version` is not
    /// newer than the one held): the fold leaves them out.
    pub stale: Vec<Vec<Value>>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.pending.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl State {
    /// State as `settings` say, reporting into `metrics`.
    pub fn new(settings: StateSettings, metrics: Arc<Metrics>) -> Self {
        // The named collections' series exist from the first scrape (`*` names none yet).
        for collection in settings.named() {
            let label = metrics.collections.label(&Arc::from(collection.as_str()));
            metrics.state_items.with_label_values(&[&*label]);
            metrics.state_bytes.with_label_values(&[&*label]);
            for cause in ["enter", "leave"] {
                metrics.transitions.with_label_values(&[&*label, cause]);
            }
            // Zero under `--slow-consumer-policy close`; there from the first scrape anyway.
            metrics.conflated.with_label_values(&[&*label]);
            for limit in [Limit::MaxItems, Limit::MaxBytes] {
                metrics
                    .state_rejections
                    .with_label_values(&[&*label, limit.reason()]);
            }
        }
        State {
            settings,
            stores: DashMap::new(),
            bytes: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            metrics,
            tracking: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &StateSettings {
        &self.settings
    }

    /// Whether `collection` retains its items.
    pub fn retains(&self, collection: &str) -> bool {
        self.settings.retains(collection)
    }

    fn store(&self, collection: &Arc<str>) -> Arc<Mutex<Store>> {
        self.stores
            .entry(collection.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Store {
                    index: Index::new(&self.settings.indexed_fields(collection)),
                    ..Store::default()
                }))
            })
            .value()
            .clone()
    }

    /// Every collection with a store.
    pub fn collections(&self) -> Vec<Arc<str>> {
        self.stores.iter().map(|s| s.key().clone()).collect()
    }

    /// A copy of every item `collection` holds (for a snapshot on disk); the caller holds
    /// the collection's history log lock, so the copy is the state at its last offset.
    fn export(&self, collection: &Arc<str>) -> Vec<Stored> {
        let store = self.stores.get(collection).map(|s| s.value().clone());
        store.map_or_else(Vec::new, |store| {
            store
                .lock()
                .items
                .iter()
                .map(|held| Stored {
                    text: held.text.clone(),
                    key_len: held.key_len,
                    version: held.version,
                })
                .collect()
        })
    }

    /// Puts items read back from a snapshot on disk into `collection`'s store, at start,
    /// before any event. The limits are not applied (they refuse new keys only); the
    /// metrics count the items.
    fn restore(&self, collection: &Arc<str>, items: Vec<Stored>) {
        let store = self.store(collection);
        let mut store = store.lock();
        let was = (store.items.len(), store.bytes);
        for item in items {
            let added = item_bytes(item.key(), item.json());
            if let Some(old) = store.items.replace(item) {
                store.bytes -= item_bytes(old.key(), old.json());
            }
            store.bytes += added;
        }
        store.reindex();
        let after = (store.items.len(), store.bytes);
        drop(store);
        self.account(collection, was, after);
    }

    /// Items `collection` holds now.
    pub fn len(&self, collection: &Arc<str>) -> usize {
        let store = self.stores.get(collection).map(|s| s.value().clone());
        store.map_or(0, |s| s.lock().items.len())
    }

    /// How `item` (whose compact text is `json`) compares with what `collection` holds under
    /// `key`, for a reconcile: the texts first (the common case, no parse), then the values
    /// (the same fields in another order are the same item).
    pub fn compare(&self, collection: &str, key: &str, json: &str, item: &Value) -> Held {
        let Some(store) = self.stores.get(collection).map(|s| s.value().clone()) else {
            return Held::Missing;
        };
        let store = store.lock();
        match store.items.get(key) {
            None => Held::Missing,
            Some(held) if held.json() == json => Held::Same,
            Some(held) if parse(held.json()) == *item => Held::Same,
            Some(_) => Held::Different,
        }
    }

    /// The keys `collection` holds that `keep` lacks (a reconcile's deletes), in key order,
    /// each as its item's `key_field` says (a number stays a number), else the key string.
    pub fn keys_except(
        &self,
        collection: &str,
        keep: &HashSet<String>,
        key_field: &str,
    ) -> Vec<Value> {
        let Some(store) = self.stores.get(collection).map(|s| s.value().clone()) else {
            return Vec::new();
        };
        let store = store.lock();
        let mut gone: Vec<&Stored> = store
            .items
            .iter()
            .filter(|held| !keep.contains(held.key()))
            .collect();
        gone.sort_unstable_by(|a, b| a.key().cmp(b.key()));
        gone.into_iter()
            .map(|held| match parse(held.json()).get(key_field) {
                Some(key) if key_string(key) == held.key() => key.clone(),
                _ => Value::String(held.key().to_string()),
            })
            .collect()
    }

    /// Counts a capacity refusal made before [`State::admit`] (a reconcile whose set alone
    /// is over a limit) in `tidings_state_rejections_total`.
    pub fn count_rejection(&self, collection: &Arc<str>, limit: Limit) {
        let label = self.metrics.collections.label(collection);
        self.metrics
            .state_rejections
            .with_label_values(&[&*label, limit.reason()])
            .inc();
    }

    /// Checks that `events` (one publish request) create no key beyond a limit, and reserves
    /// the bytes of the new keys. The caller holds the engine's lock of every collection in
    /// the batch (so no other publish changes them in between) and keeps the admission until
    /// the events are folded. Updates and deletes of held keys always pass.
    pub fn admit(&self, events: &[NewEvent]) -> Result<Admission<'_>, StateError> {
        let mut new_keys: HashMap<Arc<str>, HashSet<String>> = HashMap::new();
        // Held keys that earlier deletes of the batch remove: the fold applies the batch in
        // order, so a reconcile's deletes make room for its creates.
        let mut gone: HashMap<Arc<str>, Gone> = HashMap::new();
        let mut new_bytes = 0usize;
        let mut freed = 0usize;
        let mut over: Option<StateError> = None;
        let mut stale: Vec<Vec<Value>> = vec![Vec::new(); events.len()];
        // With versions in the batch: the (encoded) version each earlier event of the batch
        // leaves on a key, so later ones are judged as the fold will judge them.
        let versioned = events.iter().any(|e| e.version.is_some());
        let mut overlay: HashMap<(Arc<str>, String), u64> = HashMap::new();
        for (index, event) in events.iter().enumerate() {
            if !self.retains(&event.collection) {
                continue;
            }
            let store = self.store(&event.collection);
            let store = store.lock();
            let seen = new_keys.entry(event.collection.clone()).or_default();
            let gone = gone.entry(event.collection.clone()).or_default();
            if matches!(event.apply, Apply::Truncate { .. }) {
                seen.clear();
                gone.all = true;
                gone.keys.clear();
                freed += store.bytes;
            }
            for (i, key) in event.keys.iter().enumerate() {
                let k = key_string(key);
                if versioned {
                    let slot = (event.collection.clone(), k.clone());
                    let held = overlay
                        .get(&slot)
                        .copied()
                        .unwrap_or_else(|| store.version(&k));
                    if is_stale(held, event.version) {
                        stale[index].push(key.clone());
                        continue;
                    }
                    let left = match event.kind {
                        EventKind::Delete => 0,
                        _ => encode_version(event.version),
                    };
                    overlay.insert(slot, left);
                }
                let held = !gone.all && !gone.keys.contains(&k);
                let held = held.then(|| store.items.get(k.as_str())).flatten();
                if event.kind == EventKind::Delete {
                    // A key this batch created is simply not new any more (its bytes stay
                    // reserved: over-counting is the safe side).
                    if !seen.remove(&k) {
                        if let Some(held) = held {
                            freed += item_bytes(&k, held.json());
                            gone.keys.insert(k);
                        }
                    }
                    continue;
                }
                if held.is_some() || seen.contains(&k) {
                    continue;
                }
                if let Some(item) = event.items.get(i) {
                    new_bytes += item_bytes(&k, &compact(item));
                }
                seen.insert(k);
            }
            let (max_items, limit) = self.settings.max_items(&event.collection);
            let kept = match gone.all {
                true => 0,
                false => store.items.len().saturating_sub(gone.keys.len()),
            };
            if event.kind != EventKind::Delete && kept + seen.len() > max_items {
                over = Some(StateError::Full {
                    collection: event.collection.clone(),
                    index,
                    new: seen.len(),
                    limit,
                    limit_value: max_items,
                });
                break;
            }
        }
        if over.is_none() && new_bytes > 0 {
            let reserved =
                self.pending
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |pending| {
                        let total = (self.bytes.load(Ordering::SeqCst) + pending + new_bytes)
                            .saturating_sub(freed);
                        (total <= self.settings.max_bytes).then_some(pending + new_bytes)
                    });
            if reserved.is_err() {
                let (index, collection, new) = first_new(events, &new_keys);
                over = Some(StateError::Full {
                    collection,
                    index,
                    new,
                    limit: Limit::MaxBytes,
                    limit_value: self.settings.max_bytes,
                });
            }
        }
        if let Some(error) = over {
            if let StateError::Full {
                collection, limit, ..
            } = &error
            {
                self.count_rejection(collection, *limit);
            }
            return Err(error);
        }
        Ok(Admission {
            pending: &self.pending,
            bytes: new_bytes,
            stale,
        })
    }

    /// Applies `event` to its collection's store and returns the event subscribers see
    /// (`None` when the collection retains nothing: deliver it as published). Called in
    /// offset order, under the collection's history log lock.
    ///
    /// - `create`: each item replaces the stored one; the event's items are unchanged.
    /// - `update`: each item is merged into the stored one (replaces it, for
    ///   [`Apply::Replace`]); the event carries the merged items.
    /// - an item whose `version` is not newer than the stored one (both versioned) is left
    ///   out: it changes nothing and reaches nobody ([`State::admit`] reported it);
    /// - for both, `before` is the state's previous version of each item (`null` where it held
    ///   none), whatever the publisher sent: the state is what subscribers were shown.
    /// - `delete`: each key is removed; the event carries the removed items (the stored
    ///   version, else the item the publisher sent) and only the keys the store held or the
    ///   publisher described, so a key nobody was shown reaches nobody; `before` is empty.
    /// - a truncate ([`Apply::Truncate`]): every held item is removed, and the event carries
    ///   them all (in key order), so each subscriber gets the deletes of the items it matched.
    pub fn fold(&self, event: &Event) -> Option<Event> {
        if !self.retains(&event.collection) {
            return None;
        }
        let store = self.store(&event.collection);
        let mut store = store.lock();
        let was = (store.items.len(), store.bytes);
        let mut items = Vec::with_capacity(event.keys.len());
        let mut keys = Vec::with_capacity(event.keys.len());
        let mut before = Vec::new();
        let version = event.version;
        let tracking = self.tracking.is_some();
        store.sync.advance(event.offset, &event.epoch);
        match event.kind {
            EventKind::Create | EventKind::Update => {
                for (item, key) in event.items.iter().zip(&event.keys) {
                    let k = key_string(key);
                    store.sync.touch(&k, tracking);
                    // Caught up from a snapshot that already holds this event for `k`.
                    if store.sync.skips(&k, event.offset) {
                        continue;
                    }
                    if is_stale(store.version(&k), version) {
                        continue;
                    }
                    let stored = store.get(&k);
                    let new = match (&stored, event.kind, &event.apply) {
                        (_, _, Apply::Replace) => item.clone(),
                        (Some(stored), EventKind::Update, _) => merge(stored.clone(), item),
                        _ => item.clone(),
                    };
                    store.put(&k, &new, version);
                    before.push(stored.unwrap_or(Value::Null));
                    items.push(new);
                    keys.push(key.clone());
                }
            }
            EventKind::Delete => {
                if let Apply::Truncate { key_field } = &event.apply {
                    truncate(
                        &mut store,
                        key_field,
                        event.offset,
                        tracking,
                        &mut items,
                        &mut keys,
                    );
                }
                for (i, key) in event.keys.iter().enumerate() {
                    let k = key_string(key);
                    store.sync.touch(&k, tracking);
                    if store.sync.skips(&k, event.offset) {
                        continue;
                    }
                    if is_stale(store.version(&k), version) {
                        continue;
                    }
                    let removed = store.remove(&k);
                    if let Some(item) = removed.or_else(|| event.items.get(i).cloned()) {
                        items.push(item);
                        keys.push(key.clone());
                    }
                }
            }
        }
        let after = (store.items.len(), store.bytes);
        self.after_fold(&store);
        drop(store);
        self.account(&event.collection, was, after);
        Some(Event {
            collection: event.collection.clone(),
            kind: event.kind,
            items,
            keys,
            before,
            version,
            apply: event.apply.clone(),
            offset: event.offset,
            epoch: event.epoch.clone(),
            received: event.received,
        })
    }

    fn account(&self, collection: &Arc<str>, before: (usize, usize), after: (usize, usize)) {
        if after.1 >= before.1 {
            self.bytes.fetch_add(after.1 - before.1, Ordering::SeqCst);
        } else {
            self.bytes.fetch_sub(before.1 - after.1, Ordering::SeqCst);
        }
        let label = self.metrics.collections.label(collection);
        self.metrics
            .state_items
            .with_label_values(&[&*label])
            .add(after.0 as i64 - before.0 as i64);
        self.metrics
            .state_bytes
            .with_label_values(&[&*label])
            .add(after.1 as i64 - before.1 as i64);
    }

    /// The `data` of an item subscription's `init` (Directus' shape: the item object,
    /// projected), when the state holds the item and the subscription may see it; `None`
    /// otherwise (the `init` then has no `data`, and the item arrives when it is published).
    pub fn item_snapshot(&self, spec: &Spec) -> Option<String> {
        let key = spec.item.as_deref()?;
        let store = self
            .stores
            .get(&spec.collection)
            .map(|s| s.value().clone())?;
        let item = store.lock().get(key)?;
        if !spec.matches(&item) {
            return None;
        }
        let shown = match spec.projection.is_all() {
            true => item,
            false => spec.projection.apply(&item),
        };
        serde_json::to_string(&shown).ok()
    }

    /// A collection subscription's `init`: the retained items `spec` matches, cut and
    /// counted as [`State::view`] says. Called under the collection's history log lock, so it
    /// holds exactly the events up to the `init` position.
    pub fn snapshot(&self, spec: &Spec) -> Result<View, StateError> {
        self.view(spec, None, Purpose::Init)
    }
}

/// Where a byte-limit refusal points: the first event of the batch that creates a new key.
fn first_new(
    events: &[NewEvent],
    new_keys: &HashMap<Arc<str>, HashSet<String>>,
) -> (usize, Arc<str>, usize) {
    let total = new_keys.values().map(HashSet::len).sum();
    events
        .iter()
        .enumerate()
        .find(|(_, e)| {
            e.kind != EventKind::Delete
                && new_keys.get(&e.collection).is_some_and(|keys| {
                    e.keys.iter().any(|k| keys.contains(key_string(k).as_str()))
                })
        })
        .map_or((0, Arc::from(""), total), |(i, e)| {
            (i, e.collection.clone(), total)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(max_items: usize, max_bytes: usize) -> StateSettings {
        StateSettings {
            collections: vec!["orders".into()],
            max_items,
            max_bytes,
            max_init_items: 10,
            file: None,
            indexes: Vec::new(),
        }
    }

    fn state(max_items: usize, max_bytes: usize) -> State {
        State::new(
            settings(max_items, max_bytes),
            Arc::new(Metrics::new(10).unwrap()),
        )
    }

    fn event(kind: EventKind, items: Vec<Value>, keys: Vec<Value>) -> Event {
        Event::test("orders", kind, items, keys)
    }

    fn new_event(kind: EventKind, items: Vec<Value>) -> NewEvent {
        let keys = items.iter().map(|i| i["id"].clone()).collect();
        NewEvent::new(Arc::from("orders"), kind, items, keys)
    }

    #[test]
    fn indexes_come_from_the_flag_and_the_collections_file() {
        let file = CollectionsFile::parse(
            std::path::Path::new("c.json"),
            r#"{"collections":{"orders":{"state":true,"indexes":["customer.id","status"]}}}"#,
        )
        .unwrap();
        let settings = StateSettings {
            indexes: vec![
                ("orders".into(), "status".into()),
                ("other".into(), "x".into()),
            ],
            file: Some(Arc::new(file)),
            ..settings(10, 1 << 20)
        };
        assert_eq!(settings.indexed_fields("orders"), ["customer.id", "status"]);
        assert_eq!(settings.indexed_fields("other"), ["x"]);
        assert!(settings.indexed_fields("none").is_empty());
    }

    #[test]
    fn merge_rules() {
        let s = state(10, 1 << 20);
        let folded = |kind, items: Vec<Value>, keys| s.fold(&event(kind, items, keys)).unwrap();
        let created = folded(
            EventKind::Create,
            vec![json!({"id":1,"a":1,"n":{"x":1,"y":2},"l":[1,2]})],
            vec![json!(1)],
        );
        assert_eq!(
            created.items,
            [json!({"id":1,"a":1,"n":{"x":1,"y":2},"l":[1,2]})]
        );
        let updated = folded(
            EventKind::Update,
            vec![json!({"id":1,"a":null,"n":{"x":3},"l":[],"b":true})],
            vec![json!(1)],
        );
        assert_eq!(
            updated.items,
            [json!({"id":1,"a":null,"n":{"x":3},"l":[],"b":true})]
        );
        assert_eq!(
            updated.before,
            [json!({"id":1,"a":1,"n":{"x":1,"y":2},"l":[1,2]})]
        );
        assert_eq!(created.before, [Value::Null]);
        // Upsert: a create replaces the whole item.
        let recreated = folded(
            EventKind::Create,
            vec![json!({"id":1,"c":1})],
            vec![json!(1)],
        );
        assert_eq!(recreated.items, [json!({"id":1,"c":1})]);
        // An update of an unknown key is stored as given.
        let unknown = folded(
            EventKind::Update,
            vec![json!({"id":2,"d":1})],
            vec![json!(2)],
        );
        assert_eq!(unknown.items, [json!({"id":2,"d":1})]);
        // A key-only delete resolves to the stored item; an unknown key reaches nobody.
        let deleted = folded(EventKind::Delete, vec![], vec![json!(2), json!(9)]);
        assert_eq!(
            (deleted.items, deleted.keys),
            (vec![json!({"id":2,"d":1})], vec![json!(2)])
        );
        assert_eq!(s.len(&Arc::from("orders")), 1);
    }

    #[test]
    fn capacity_refuses_new_keys_only() {
        let s = state(2, 1 << 20);
        let create = |ids: &[i64]| {
            new_event(
                EventKind::Create,
                ids.iter().map(|id| json!({"id": id})).collect(),
            )
        };
        drop(s.admit(&[create(&[1, 2])]).unwrap());
        s.fold(&event(
            EventKind::Create,
            vec![json!({"id":1}), json!({"id":2})],
            vec![json!(1), json!(2)],
        ));
        let err = s.admit(&[create(&[1]), create(&[3])]).unwrap_err();
        assert!(matches!(
            err,
            StateError::Full {
                index: 1,
                new: 1,
                limit: Limit::MaxItems,
                limit_value: 2,
                ..
            }
        ));
        // Held keys: updates always pass.
        assert!(s
            .admit(&[new_event(EventKind::Update, vec![json!({"id":2,"x":1})])])
            .is_ok());
        // A delete earlier in the batch makes room for a create (a reconcile's batch), and a
        // key created then deleted in the same batch is not new.
        let keys = |ids: &[i64]| {
            let mut e = new_event(EventKind::Delete, Vec::new());
            e.keys = ids.iter().map(|id| json!(id)).collect();
            e
        };
        assert!(s.admit(&[keys(&[1]), create(&[3])]).is_ok());
        assert!(s
            .admit(&[keys(&[1]), create(&[3]), keys(&[3]), create(&[4])])
            .is_ok());
        assert!(s.admit(&[keys(&[1, 1]), create(&[3, 4])]).is_err());
        assert!(s.admit(&[keys(&[1, 2]), create(&[3, 4])]).is_ok());
        let small = state(100, 60);
        let err = small.admit(&[create(&[1, 2])]).unwrap_err();
        assert!(matches!(
            err,
            StateError::Full {
                limit: Limit::MaxBytes,
                ..
            }
        ));
    }
}
