//! Live subscriptions, per collection, grouped so that identical subscriptions are matched
//! and encoded once.
//!
//! A [`Group`] holds every subscription with the same [`Spec`] (same events, item, filter
//! ∧ permission rule, projection, list shape and dialect). Inside a group, members are bucketed
//! by the uid string their frames carry, because the uid is part of the frame: one encoding
//! per group, one frame per uid bucket, shared by every member of the bucket.
//!
//! Locking: one `RwLock` per collection. The hub holds the read lock while it matches and
//! queues an event (queueing never waits); subscribe and unsubscribe take the write lock.
//! No lock is held across an await.
//!
//! What a spec is, and its identity, belong to [`crate::subscription`]; the broker changes
//! the registry only through `hub::Subscriptions`. Lock order: registry map shard → collection lock →
//! outbox lock (see docs/ARCHITECTURE.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;

use crate::event::{key_string, Event};
use crate::filter::{index_key, index_keys_at, Filter};
use crate::outbox::Outbox;
use crate::subscription::{Spec, SpecKey};

/// Identifies one subscription in the registry; returned by [`Registry::insert`] and needed
/// to remove it.
#[derive(Debug, Clone)]
pub struct SubHandle {
    id: u64,
    collection: Arc<str>,
    group: u64,
    bucket: Option<Arc<str>>,
}

impl SubHandle {
    /// Its id: the key of its member entry, and how its outbox knows it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The collection it is subscribed to.
    pub fn collection(&self) -> &Arc<str> {
        &self.collection
    }

    /// The uid string its frames carry.
    pub fn uid(&self) -> Option<&Arc<str>> {
        self.bucket.as_ref()
    }
}

/// One subscription of a group: where its frames go, and what it asked for beyond the
/// group's frames.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its connection's outbox.
    pub outbox: Arc<Outbox>,
    /// It asked for `checkpoint` frames ([`Spec::checkpoints`]): kept per member rather
    /// than in the group key, since it changes no frame the group encodes.
    pub checkpoints: bool,
}

/// Subscriptions of one group whose frames carry the same uid.
pub type Bucket = BTreeMap<u64, Member>;

/// Every subscription sharing one [`Spec`].
#[derive(Debug)]
pub struct Group {
    /// What the members receive.
    pub spec: Arc<Spec>,
    /// Members by the uid string their frames carry (`None`: subscribed without uid), keyed
    /// by the bucket's creation sequence so buckets are visited in subscription order: a
    /// connection whose two subscriptions share this group gets their frames in the order it
    /// subscribed. Within a bucket, members are ordered by subscription id.
    buckets: BTreeMap<u64, (Option<Arc<str>>, Bucket)>,
    /// Where each uid's bucket is in `buckets`.
    bucket_seq: HashMap<Option<Arc<str>>, u64>,
    /// The equality term this group is indexed under: (dotted field, index keys). `None` for
    /// item groups and groups without a usable `_eq`/`_in` conjunct.
    term: Option<(String, Vec<String>)>,
}

impl Group {
    /// True when the group has no member left.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Number of member subscriptions.
    pub fn len(&self) -> usize {
        self.buckets.values().map(|(_, b)| b.len()).sum()
    }

    /// The uid buckets, in creation order: the uid string their frames carry, and members.
    pub fn buckets(&self) -> impl Iterator<Item = (&Option<Arc<str>>, &Bucket)> {
        self.buckets.values().map(|(uid, members)| (uid, members))
    }

    fn add(&mut self, id: u64, uid: Option<Arc<str>>, member: Member) {
        let seq = match self.bucket_seq.get(&uid) {
            Some(seq) => *seq,
            None => {
                // Subscription ids are unique and increasing: a fine creation sequence.
                self.bucket_seq.insert(uid.clone(), id);
                self.buckets.insert(id, (uid, BTreeMap::new()));
                id
            }
        };
        if let Some((_, members)) = self.buckets.get_mut(&seq) {
            members.insert(id, member);
        }
    }

    fn remove(&mut self, id: u64, uid: &Option<Arc<str>>) {
        let Some(seq) = self.bucket_seq.get(uid).copied() else {
            return;
        };
        if let Some((_, members)) = self.buckets.get_mut(&seq) {
            members.remove(&id);
            if members.is_empty() {
                self.buckets.remove(&seq);
                self.bucket_seq.remove(uid);
            }
        }
    }
}

/// The subscriptions of one collection, with an index that narrows which groups an event
/// can reach.
///
/// A group whose predicate has a top-level `field _eq v` or `field _in [..]` conjunct is
/// filed under that field and the index key of each allowed value (the most selective such
/// conjunct: fewest values). A publish looks up, for every indexed field, the keys of each
/// item's value there; only those groups, plus the unindexed ones, are evaluated. With
/// 100,000 subscriptions filtering on distinct `tenant_id`s, an event evaluates one.
#[derive(Debug, Default)]
pub struct CollectionSubs {
    /// Groups by creation sequence (what the index files), so finding a candidate hashes a
    /// number, not a spec key.
    groups: HashMap<u64, Group>,
    /// Which group holds each spec.
    by_key: HashMap<Arc<SpecKey>, u64>,
    /// Every group without `item`, in creation order (key-only deletes reach all of them).
    general: BTreeSet<u64>,
    /// General groups without an equality term: candidates for every event.
    unindexed: BTreeSet<u64>,
    /// Indexed general groups: field → index key → groups.
    by_term: HashMap<String, HashMap<String, BTreeSet<u64>>>,
    /// `item` groups by item key, in creation order.
    by_item: HashMap<String, BTreeSet<u64>>,
}

impl CollectionSubs {
    /// The groups that may receive `event`, in creation order. A key-only delete has no item
    /// data to look up, so it reaches every general group (and the item groups of its keys).
    pub fn candidates<'a>(&'a self, event: &Event) -> Vec<&'a Group> {
        let mut seqs: Vec<u64> = if event.has_items() {
            let mut seqs: Vec<u64> = self.unindexed.iter().copied().collect();
            for (field, keys) in &self.by_term {
                // Both versions: a group the previous version matched may see it leave.
                for item in event.items.iter().chain(&event.before) {
                    for key in index_keys_at(item, field) {
                        if let Some(groups) = keys.get(&key) {
                            seqs.extend(groups.iter().copied());
                        }
                    }
                }
            }
            seqs
        } else {
            self.general.iter().copied().collect()
        };
        if !self.by_item.is_empty() {
            for key in &event.keys {
                if let Some(groups) = self.by_item.get(&key_string(key)) {
                    seqs.extend(groups.iter().copied());
                }
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        seqs.into_iter()
            .filter_map(|seq| self.groups.get(&seq))
            .collect()
    }

    /// Files a new group for `spec` under `seq` (a fresh subscription id: unique and
    /// increasing across the registry, so group order is creation order).
    fn add_group(&mut self, spec: Spec, seq: u64) -> u64 {
        let mut term = None;
        match &spec.item {
            Some(item) => {
                self.by_item.entry(item.clone()).or_default().insert(seq);
            }
            None => {
                self.general.insert(seq);
                term = spec.filter.as_ref().and_then(index_term);
                match &term {
                    Some((field, keys)) => {
                        let by_key = self.by_term.entry(field.clone()).or_default();
                        for k in keys {
                            by_key.entry(k.clone()).or_default().insert(seq);
                        }
                    }
                    None => {
                        self.unindexed.insert(seq);
                    }
                }
            }
        }
        self.by_key.insert(spec.key.clone(), seq);
        let group = Group {
            spec: Arc::new(spec),
            buckets: BTreeMap::new(),
            bucket_seq: HashMap::new(),
            term,
        };
        self.groups.insert(seq, group);
        seq
    }

    fn remove_group(&mut self, seq: u64) {
        let Some(group) = self.groups.remove(&seq) else {
            return;
        };
        self.by_key.remove(&group.spec.key);
        if let Some(item) = &group.spec.item {
            if let Some(groups) = self.by_item.get_mut(item) {
                groups.remove(&seq);
                if groups.is_empty() {
                    self.by_item.remove(item);
                }
            }
            return;
        }
        self.general.remove(&seq);
        match &group.term {
            None => {
                self.unindexed.remove(&seq);
            }
            Some((field, keys)) => {
                if let Some(by_key) = self.by_term.get_mut(field) {
                    for k in keys {
                        if let Some(groups) = by_key.get_mut(k) {
                            groups.remove(&seq);
                            if groups.is_empty() {
                                by_key.remove(k);
                            }
                        }
                    }
                    if by_key.is_empty() {
                        self.by_term.remove(field);
                    }
                }
            }
        }
    }

    /// True when no subscription is left.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn remove_member(&mut self, handle: &SubHandle) {
        let Some(group) = self.groups.get_mut(&handle.group) else {
            return;
        };
        group.remove(handle.id, &handle.bucket);
        if group.is_empty() {
            self.remove_group(handle.group);
        }
    }
}

/// The most selective equality term of a predicate (fewest allowed values), as index keys.
fn index_term(filter: &Filter) -> Option<(String, Vec<String>)> {
    filter
        .equality_terms()
        .into_iter()
        .filter_map(|(field, values)| {
            let keys: Option<Vec<String>> = values.iter().map(index_key).collect();
            keys.map(|mut keys| {
                keys.sort();
                keys.dedup();
                (field, keys)
            })
        })
        .min_by_key(|(_, keys)| keys.len())
}

/// One group as [`Registry::snapshot`] saw it.
#[derive(Debug)]
pub struct GroupSnapshot {
    /// The group's creation sequence (stable while it lives).
    pub id: u64,
    /// Member subscriptions.
    pub subscribers: usize,
    /// Distinct uid strings among them (one frame per uid per event).
    pub uids: usize,
    /// What its members receive.
    pub spec: Arc<Spec>,
}

/// One collection's groups as [`Registry::snapshot`] saw them.
#[derive(Debug)]
pub struct CollectionSnapshot {
    /// The collection.
    pub name: Arc<str>,
    /// Its groups, in creation order.
    pub groups: Vec<GroupSnapshot>,
}

/// All live subscriptions.
#[derive(Debug, Default)]
pub struct Registry {
    collections: DashMap<Arc<str>, Arc<RwLock<CollectionSubs>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The subscriptions of `collection`, if any.
    pub fn collection(&self, collection: &str) -> Option<Arc<RwLock<CollectionSubs>>> {
        self.collections.get(collection).map(|c| c.value().clone())
    }

    /// Adds a subscription whose frames carry `uid` (already stringified) to its group.
    pub fn insert(&self, spec: Spec, uid: Option<Arc<str>>, outbox: Arc<Outbox>) -> SubHandle {
        self.replace_inner(None, spec, uid, outbox)
    }

    /// Swaps a subscription for a recompiled one under one lock, so no event is missed or
    /// delivered twice in between (used when a re-auth changes permissions).
    pub fn replace(
        &self,
        old: &SubHandle,
        spec: Spec,
        uid: Option<Arc<str>>,
        outbox: Arc<Outbox>,
    ) -> SubHandle {
        if old.collection == spec.collection {
            self.replace_inner(Some(old), spec, uid, outbox)
        } else {
            self.remove(old);
            self.insert(spec, uid, outbox)
        }
    }

    fn replace_inner(
        &self,
        old: Option<&SubHandle>,
        spec: Spec,
        uid: Option<Arc<str>>,
        outbox: Arc<Outbox>,
    ) -> SubHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let collection = spec.collection.clone();
        // Hold the map entry while writing, so `remove` cannot drop this collection's
        // (momentarily empty) subscriptions between lookup and insert.
        let entry = self.collections.entry(collection.clone()).or_default();
        let mut subs = entry.value().write();
        if let Some(old) = old {
            subs.remove_member(old);
        }
        // Read before the spec is dropped for an existing group's: it is this member's own.
        let member = Member {
            outbox,
            checkpoints: spec.checkpoints,
        };
        let group = match subs.by_key.get(&spec.key) {
            Some(seq) => *seq,
            None => subs.add_group(spec, id),
        };
        if let Some(g) = subs.groups.get_mut(&group) {
            g.add(id, uid.clone(), member);
        }
        SubHandle {
            id,
            collection,
            group,
            bucket: uid,
        }
    }

    /// Removes a subscription. Removing twice is harmless.
    pub fn remove(&self, handle: &SubHandle) {
        let Some(subs) = self.collection(&handle.collection) else {
            return;
        };
        let now_empty = {
            let mut subs = subs.write();
            subs.remove_member(handle);
            subs.is_empty()
        };
        if now_empty {
            // Re-check under the map's shard lock so a concurrent insert is not lost.
            self.collections
                .remove_if(&handle.collection, |_, c| c.read().is_empty());
        }
    }

    /// Every collection with subscriptions, by name, and its groups in creation order: what
    /// the admin endpoint lists. The map's shards are released before any collection lock is
    /// taken, and each collection's read lock is held only while its groups are counted.
    pub fn snapshot(&self) -> Vec<CollectionSnapshot> {
        let mut collections: Vec<(Arc<str>, Arc<RwLock<CollectionSubs>>)> = self
            .collections
            .iter()
            .map(|c| (c.key().clone(), c.value().clone()))
            .collect();
        collections.sort_by(|a, b| a.0.cmp(&b.0));
        collections
            .into_iter()
            .map(|(name, subs)| {
                let subs = subs.read();
                let mut groups: Vec<GroupSnapshot> = subs
                    .groups
                    .iter()
                    .map(|(seq, g)| GroupSnapshot {
                        id: *seq,
                        subscribers: g.len(),
                        uids: g.buckets.len(),
                        spec: g.spec.clone(),
                    })
                    .collect();
                groups.sort_by_key(|g| g.id);
                CollectionSnapshot { name, groups }
            })
            .filter(|c| !c.groups.is_empty())
            .collect()
    }

    /// Number of groups and member subscriptions of `collection` (for tests and metrics).
    pub fn counts(&self, collection: &str) -> (usize, usize) {
        self.collection(collection).map_or((0, 0), |c| {
            let c = c.read();
            (c.groups.len(), c.groups.values().map(Group::len).sum())
        })
    }
}

#[cfg(test)]
mod tests {

    use serde_json::{json, Value};

    use super::*;
    use crate::auth::{Permissions, Principal};
    use crate::event::EventKind;
    use crate::filter::FilterLimits;
    use crate::protocol::SubscribeRequest;
    use crate::subscription::{compile, SpecContext};

    fn spec(filter: Value) -> Spec {
        spec_asking(filter, false)
    }

    /// A spec whose request sent `"checkpoints": checkpoints`.
    fn spec_asking(filter: Value, checkpoints: bool) -> Spec {
        let principal = Principal::anonymous(Permissions::all());
        let limits = FilterLimits::default();
        let req = SubscribeRequest {
            uid: None,
            collection: "c".into(),
            event: None,
            item: None,
            query: json!({ "filter": filter }).as_object().cloned(),
            nested: false,
            since: None,
            checkpoints,
            max_rate: None,
        };
        compile(
            &req,
            &SpecContext {
                principal: &principal,
                limits: &limits,
                key_field: "id",
            },
        )
        .unwrap()
    }

    fn event(items: Vec<Value>, keys: Vec<Value>) -> Event {
        let kind = match items.is_empty() {
            true => EventKind::Delete,
            false => EventKind::Create,
        };
        Event::test("c", kind, items, keys)
    }

    #[test]
    fn index_narrows_candidates_to_matching_terms() {
        let registry = Registry::new();
        let outbox = Arc::new(Outbox::new(10, 1000));
        let mut handles = Vec::new();
        for tenant in 0..1000 {
            handles.push(registry.insert(
                spec(json!({"tenant": {"_eq": tenant}})),
                None,
                outbox.clone(),
            ));
        }
        registry.insert(
            spec(json!({"tenant": {"_in": [5, "7"]}, "status": "paid"})),
            None,
            outbox.clone(),
        );
        registry.insert(spec(json!({"n": {"_gt": 3}})), None, outbox.clone());
        let subs = registry.collection("c").unwrap();
        let subs = subs.read();
        let count = |items: Vec<Value>| subs.candidates(&event(items, vec![json!(1)])).len();
        // The `_in` group is filed under its most selective term, `status`.
        assert_eq!(count(vec![json!({"id": 1, "tenant": 5})]), 2);
        assert_eq!(
            count(vec![json!({"id": 1, "tenant": 5, "status": "paid"})]),
            3
        );
        // "7", 7 and 7.0 share an index key, as `_eq` compares them.
        assert_eq!(count(vec![json!({"id": 1, "tenant": "7"})]), 2);
        assert_eq!(count(vec![json!({"id": 1, "tenant": 7.0})]), 2);
        assert_eq!(count(vec![json!({"id": 1, "tenant": "none"})]), 1);
        assert_eq!(count(vec![json!({"id": 1})]), 1);
        assert_eq!(
            count(vec![
                json!({"id": 1, "tenant": 1}),
                json!({"id": 2, "tenant": 2})
            ]),
            3
        );
        // Key-only deletes carry no data to look up: every group is a candidate.
        assert_eq!(subs.candidates(&event(vec![], vec![json!(1)])).len(), 1002);
        drop(subs);
        for h in &handles {
            registry.remove(h);
        }
        let subs = registry.collection("c").unwrap();
        let subs = subs.read();
        assert_eq!(
            subs.candidates(&event(vec![json!({"id": 1, "tenant": 3})], vec![json!(1)]))
                .len(),
            1
        );
        assert!(
            !subs.by_term.contains_key("tenant")
                && subs.by_term.get("status").is_some_and(|m| m.len() == 1),
            "emptied keys and fields are dropped"
        );
    }

    #[test]
    fn asking_for_checkpoints_shares_the_group_and_stays_per_member() {
        use crate::subscription::Delivery;
        let registry = Registry::new();
        let directus = Arc::new(Outbox::new(10, 1000));
        let js = Arc::new(Outbox::new(10, 1000));
        let conflating = |checkpoints| {
            spec_asking(json!({"n": {"_gt": 3}}), checkpoints).with_delivery(Delivery {
                conflate: true,
                every: None,
            })
        };
        let a = registry.insert(conflating(false), Some(Arc::from("u")), directus);
        let b = registry.insert(conflating(true), Some(Arc::from("u")), js.clone());
        let subs = registry.collection("c").unwrap();
        let read = subs.read();
        assert_eq!(
            read.groups.len(),
            1,
            "one group: checkpoints is not in the key"
        );
        let group = read.groups.values().next().unwrap();
        let (_, members) = group.buckets().next().unwrap();
        let flags: Vec<(u64, bool)> = members.iter().map(|(&id, m)| (id, m.checkpoints)).collect();
        assert_eq!(flags, vec![(a.id(), false), (b.id(), true)]);
        assert!(Arc::ptr_eq(&members[&b.id()].outbox, &js));
        drop(read);
        // The member that asked leaves: the other one keeps its own flag.
        registry.remove(&b);
        let read = subs.read();
        let group = read.groups.values().next().unwrap();
        let (_, members) = group.buckets().next().unwrap();
        assert_eq!(members.len(), 1);
        assert!(!members[&a.id()].checkpoints);
        // A different delivery is still a different group.
        drop(read);
        registry.insert(
            spec(json!({"n": {"_gt": 3}})),
            None,
            Arc::new(Outbox::new(10, 1000)),
        );
        assert_eq!(
            subs.read().groups.len(),
            2,
            "conflating or not splits the group"
        );
    }
}
