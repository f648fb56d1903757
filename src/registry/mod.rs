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
//! No lock is held across an await. Lock order: registry map shard → collection lock →
//! outbox lock (see docs/ARCHITECTURE.md).

mod spec;

pub use spec::{compile, Dialect, ListShape, Spec, SpecContext};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;

use crate::event::{key_string, Event};
use crate::outbox::Outbox;

/// Identifies one subscription in the registry; returned by [`Registry::insert`] and needed
/// to remove it.
#[derive(Debug, Clone)]
pub struct SubHandle {
    id: u64,
    collection: Arc<str>,
    group_key: Arc<str>,
    bucket: Option<Arc<str>>,
}

impl SubHandle {
    /// The subscription's collection.
    pub fn collection(&self) -> &Arc<str> {
        &self.collection
    }
}

/// Subscriptions of one group whose frames carry the same uid.
pub type Bucket = BTreeMap<u64, Arc<Outbox>>;

/// Every subscription sharing one [`Spec`].
#[derive(Debug)]
pub struct Group {
    /// What the members receive.
    pub spec: Arc<Spec>,
    /// Creation order, so groups are visited in subscription order.
    seq: u64,
    /// Members by the uid string their frames carry (`None`: subscribed without uid), keyed
    /// by the bucket's creation sequence so buckets are visited in subscription order: a
    /// connection whose two subscriptions share this group gets their frames in the order it
    /// subscribed. Within a bucket, members are ordered by subscription id.
    buckets: BTreeMap<u64, (Option<Arc<str>>, Bucket)>,
    /// Where each uid's bucket is in `buckets`.
    bucket_seq: HashMap<Option<Arc<str>>, u64>,
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

    fn add(&mut self, id: u64, uid: Option<Arc<str>>, outbox: Arc<Outbox>) {
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
            members.insert(id, outbox);
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

/// The subscriptions of one collection.
#[derive(Debug, Default)]
pub struct CollectionSubs {
    /// Groups by spec key.
    groups: HashMap<Arc<str>, Group>,
    /// Keys of groups without `item`, in creation order.
    general: BTreeMap<u64, Arc<str>>,
    /// Keys of `item` groups by item key, in creation order.
    by_item: HashMap<String, BTreeMap<u64, Arc<str>>>,
    next_seq: u64,
}

impl CollectionSubs {
    /// The groups that may receive `event`: every general group, plus item groups of the
    /// event's keys, in creation order.
    pub fn candidates<'a>(&'a self, event: &Event) -> Vec<&'a Group> {
        let mut seqs: Vec<(u64, &Arc<str>)> = self.general.iter().map(|(s, k)| (*s, k)).collect();
        if !self.by_item.is_empty() {
            let before = seqs.len();
            for key in &event.keys {
                if let Some(groups) = self.by_item.get(&key_string(key)) {
                    seqs.extend(groups.iter().map(|(s, k)| (*s, k)));
                }
            }
            if seqs.len() > before {
                seqs.sort_unstable_by_key(|(s, _)| *s);
                seqs.dedup_by_key(|(s, _)| *s);
            }
        }
        seqs.into_iter()
            .filter_map(|(_, k)| self.groups.get(k))
            .collect()
    }

    /// True when no subscription is left.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn remove_member(&mut self, handle: &SubHandle) {
        let Some(group) = self.groups.get_mut(&handle.group_key) else {
            return;
        };
        group.remove(handle.id, &handle.bucket);
        if !group.is_empty() {
            return;
        }
        let seq = group.seq;
        let item = group.spec.item.clone();
        self.groups.remove(&handle.group_key);
        match item {
            Some(item) => {
                if let Some(groups) = self.by_item.get_mut(&item) {
                    groups.remove(&seq);
                    if groups.is_empty() {
                        self.by_item.remove(&item);
                    }
                }
            }
            None => {
                self.general.remove(&seq);
            }
        }
    }
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
        let group_key = spec.key.clone();
        if !subs.groups.contains_key(&group_key) {
            let seq = subs.next_seq;
            subs.next_seq += 1;
            match &spec.item {
                Some(item) => {
                    subs.by_item
                        .entry(item.clone())
                        .or_default()
                        .insert(seq, group_key.clone());
                }
                None => {
                    subs.general.insert(seq, group_key.clone());
                }
            }
            subs.groups.insert(
                group_key.clone(),
                Group {
                    spec: Arc::new(spec),
                    seq,
                    buckets: BTreeMap::new(),
                    bucket_seq: HashMap::new(),
                },
            );
        }
        if let Some(group) = subs.groups.get_mut(&group_key) {
            group.add(id, uid.clone(), outbox);
        }
        SubHandle {
            id,
            collection,
            group_key,
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

    /// Number of groups and member subscriptions of `collection` (for tests and metrics).
    pub fn counts(&self, collection: &str) -> (usize, usize) {
        self.collection(collection).map_or((0, 0), |c| {
            let c = c.read();
            (c.groups.len(), c.groups.values().map(Group::len).sum())
        })
    }
}
