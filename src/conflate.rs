//! Conflation (`--slow-consumer-policy conflate`): the part of a connection's outbox where
//! pending frames of a conflating subscription are kept one per (subscription, item key),
//! merged instead of queued, once the outbox has passed its usual bounds (the soft bound).
//!
//! This module owns the merge rules ([`merge`]) and the keyed queue ([`Slots`]); the outbox
//! decides when frames go here, the hub renders the per-key changes, the session writes them.
//!
//! - A slot keeps the queue place of the first change that made it, so a hot key cannot
//!   starve the others; it holds the latest `data`. Order per key is kept (one slot per key,
//!   and the outbox sends every earlier unkeyed frame first); order across keys is not.
//! - A delete (or leave) is never dropped, except when it cancels a create (or enter) still
//!   pending in the same slot: the client never saw the item, so it has nothing to delete.
//! - Memory follows keys, not events: a slot per pending key, plus the emptied places of
//!   cancelled or reset slots, compacted once they outnumber the live ones.
//! - A folded frame carries no `position`: it stands for several events, and no single
//!   offset says what it covers. The session sends a `checkpoint` once the slots are written.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::event::EventKind;
use crate::outbox::{Frame, Live};
use crate::protocol::event_frame;
use crate::subscription::Cause;

/// What one event says about one key, for one subscription: the frame it would get if that
/// event carried only this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The frame's `event`.
    pub kind: EventKind,
    /// `enter`/`leave` on a transition.
    pub cause: Option<Cause>,
    /// The frame's `data` (JSON): the one item (`create`/`update`) or the one key (`delete`)
    /// in the subscription's shape. Shared by every member of a uid bucket.
    pub data: Arc<str>,
}

/// One key's change, as the hub renders it once per uid bucket.
#[derive(Debug, Clone)]
pub struct KeyedChange {
    /// The item key (as a string).
    pub key: Arc<str>,
    /// What happened to it.
    pub change: Change,
}

/// Folds `next` into the `pending` change of the same (subscription, key); `None`: the two
/// cancel out (a create or enter the client never saw, then its delete or leave).
///
/// | pending | next   | result            |
/// |---------|--------|-------------------|
/// | create  | update | create (latest)   |
/// | create  | create | create (latest)   |
/// | create  | delete | nothing           |
/// | update  | update | update (latest)   |
/// | update  | create | update (latest)   |
/// | update  | delete | delete            |
/// | delete  | create | update (latest)   |
/// | delete  | update | update (latest)   |
/// | delete  | delete | delete            |
///
/// Enter folds like create and leave like delete: the cause of a `create` result is the
/// pending one's (the client still has to be told the item entered), that of a `delete` the
/// newer one's, and an `update` result after a delete has none (the client still shows the
/// item, so it is neither entering nor leaving).
pub fn merge(pending: &Change, next: Change) -> Option<Change> {
    use EventKind::{Create, Delete, Update};
    let (kind, cause) = match (pending.kind, next.kind) {
        (Create, Delete) => return None,
        (Create, _) => (Create, pending.cause),
        (Update, Delete) | (Delete, Delete) => (Delete, next.cause),
        (Update, _) => (Update, pending.cause),
        (Delete, _) => (Update, None),
    };
    Some(Change {
        kind,
        cause,
        data: next.data,
    })
}

/// What folding a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    /// The key had nothing pending: a new slot at the back of the queue.
    Queued,
    /// Merged into the key's pending slot (which keeps its place).
    Merged,
    /// Cancelled the key's pending slot: nothing is left to send for it.
    Cancelled,
}

#[derive(Debug)]
struct Slot {
    sub: u64,
    key: Arc<str>,
    uid: Option<Arc<str>>,
    change: Change,
    /// Stamps of the latest event folded in (for the latency metrics).
    live: Option<Live>,
}

#[derive(Debug)]
enum Entry {
    /// A cancelled or reset slot's place.
    Empty,
    Slot(Slot),
    /// A whole frame of one subscription (the fresh `init` of a reset).
    Frame(u64, Frame),
}

/// The keyed queue of one connection: pending changes, one slot per (subscription, key), in
/// the order their first change arrived.
#[derive(Debug, Default)]
pub struct Slots {
    queue: VecDeque<Entry>,
    /// Where each pending slot is in `queue`.
    index: HashMap<(u64, Arc<str>), usize>,
    /// Entries that are not `Empty`.
    live: usize,
}

/// Emptied places below this are never worth a compaction.
const COMPACT_MIN: usize = 64;

impl Slots {
    /// Pending slots and frames.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Folds `change` of `key` for subscription `sub` (whose frames carry `uid`).
    pub fn fold(
        &mut self,
        sub: u64,
        uid: &Option<Arc<str>>,
        key: &Arc<str>,
        change: Change,
        live: Option<Live>,
    ) -> Folded {
        if let Some(&at) = self.index.get(&(sub, key.clone())) {
            let Some(Entry::Slot(slot)) = self.queue.get_mut(at) else {
                // The index only ever points at slots; a stale entry is dropped.
                self.index.remove(&(sub, key.clone()));
                return self.fold(sub, uid, key, change, live);
            };
            return match merge(&slot.change, change) {
                Some(merged) => {
                    slot.change = merged;
                    slot.live = live.or(slot.live);
                    Folded::Merged
                }
                None => {
                    self.queue[at] = Entry::Empty;
                    self.index.remove(&(sub, key.clone()));
                    self.live -= 1;
                    self.compact_if_sparse();
                    Folded::Cancelled
                }
            };
        }
        self.index.insert((sub, key.clone()), self.queue.len());
        self.queue.push_back(Entry::Slot(Slot {
            sub,
            key: key.clone(),
            uid: uid.clone(),
            change,
            live,
        }));
        self.live += 1;
        Folded::Queued
    }

    /// Queues a whole frame of subscription `sub` behind its slots.
    pub fn push_frame(&mut self, sub: u64, frame: Frame) {
        self.queue.push_back(Entry::Frame(sub, frame));
        self.live += 1;
    }

    /// Drops everything pending for subscription `sub` (a reset replaces it with a fresh
    /// `init`); returns how many slots and frames were dropped.
    pub fn clear_sub(&mut self, sub: u64) -> usize {
        let mut dropped = 0;
        for entry in self.queue.iter_mut() {
            let mine = match entry {
                Entry::Slot(slot) => slot.sub == sub,
                Entry::Frame(owner, _) => *owner == sub,
                Entry::Empty => false,
            };
            if mine {
                *entry = Entry::Empty;
                dropped += 1;
            }
        }
        self.index.retain(|(owner, _), _| *owner != sub);
        self.live -= dropped;
        self.compact_if_sparse();
        dropped
    }

    /// Moves everything pending into `out` as frames, in queue order. Folded frames carry no
    /// `position`.
    pub fn drain(&mut self, out: &mut Vec<Frame>) {
        out.reserve(self.live);
        for entry in std::mem::take(&mut self.queue) {
            match entry {
                Entry::Empty => {}
                Entry::Frame(_, frame) => out.push(frame),
                Entry::Slot(slot) => {
                    let text = event_frame(
                        slot.change.kind.as_str(),
                        Some(&slot.change.data),
                        slot.uid.as_deref(),
                        slot.change.cause.map(Cause::as_str),
                        None,
                    );
                    out.push(Frame {
                        text: Utf8Bytes::from(text),
                        live: slot.live,
                    });
                }
            }
        }
        self.index = HashMap::new();
        self.live = 0;
    }

    /// Frees everything pending.
    pub fn clear(&mut self) {
        *self = Slots::default();
    }

    fn compact_if_sparse(&mut self) {
        let empty = self.queue.len() - self.live;
        if empty < COMPACT_MIN || empty <= self.live {
            return;
        }
        self.queue.retain(|e| !matches!(e, Entry::Empty));
        self.index.clear();
        for (at, entry) in self.queue.iter().enumerate() {
            if let Entry::Slot(slot) = entry {
                self.index.insert((slot.sub, slot.key.clone()), at);
            }
        }
    }

    /// Places in the queue, emptied ones included (for the tests of compaction).
    #[cfg(test)]
    fn places(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventKind::{Create, Delete, Update};

    fn ch(kind: EventKind, cause: Option<Cause>, data: &str) -> Change {
        Change {
            kind,
            cause,
            data: Arc::from(data),
        }
    }

    /// Every merge rule of issue 16 (and the pairs it leaves open), as a table:
    /// (pending, next, result).
    #[test]
    fn merge_rules() {
        let enter = Some(Cause::Enter);
        let leave = Some(Cause::Leave);
        type Row = (
            (EventKind, Option<Cause>),
            (EventKind, Option<Cause>),
            Option<(EventKind, Option<Cause>)>,
        );
        let table: &[Row] = &[
            // create + update → create (latest)
            ((Create, None), (Update, None), Some((Create, None))),
            // update + update → update (latest)
            ((Update, None), (Update, None), Some((Update, None))),
            // create + delete → nothing
            ((Create, None), (Delete, None), None),
            // update + delete → delete
            ((Update, None), (Delete, None), Some((Delete, None))),
            // delete + create → update (latest)
            ((Delete, None), (Create, None), Some((Update, None))),
            // enter and leave fold like create and delete
            ((Create, enter), (Update, None), Some((Create, enter))),
            ((Create, enter), (Delete, leave), None),
            ((Create, enter), (Delete, None), None),
            ((Create, None), (Delete, leave), None),
            ((Update, None), (Delete, leave), Some((Delete, leave))),
            ((Delete, leave), (Create, enter), Some((Update, None))),
            ((Delete, leave), (Create, None), Some((Update, None))),
            ((Delete, None), (Create, enter), Some((Update, None))),
            // pairs the issue leaves open
            ((Create, None), (Create, None), Some((Create, None))),
            ((Update, None), (Create, None), Some((Update, None))),
            ((Delete, None), (Update, None), Some((Update, None))),
            ((Delete, None), (Delete, None), Some((Delete, None))),
            ((Delete, None), (Delete, leave), Some((Delete, leave))),
            ((Delete, leave), (Delete, None), Some((Delete, None))),
            // an item subscription's enter comes as an update
            ((Update, enter), (Update, None), Some((Update, enter))),
            ((Update, enter), (Delete, leave), Some((Delete, leave))),
        ];
        for &((pk, pc), (nk, nc), want) in table {
            let got = merge(&ch(pk, pc, "old"), ch(nk, nc, "new"));
            let got = got.map(|c| {
                assert_eq!(
                    &*c.data, "new",
                    "{pk:?}/{pc:?} + {nk:?}/{nc:?}: latest data"
                );
                (c.kind, c.cause)
            });
            assert_eq!(got, want, "{pk:?}/{pc:?} + {nk:?}/{nc:?}");
        }
    }

    fn texts(slots: &mut Slots) -> Vec<String> {
        let mut out = Vec::new();
        slots.drain(&mut out);
        out.into_iter()
            .map(|f| f.text.as_str().to_string())
            .collect()
    }

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    #[test]
    fn a_merged_slot_keeps_the_place_of_the_first_change() {
        let mut slots = Slots::default();
        let uid = Some(key("u"));
        for (k, v) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2)] {
            let data = format!("[{{\"id\":\"{k}\",\"v\":{v}}}]");
            slots.fold(1, &uid, &key(k), ch(Update, None, &data), None);
        }
        assert_eq!(slots.len(), 3);
        assert_eq!(
            texts(&mut slots),
            [
                r#"{"type":"subscription","event":"update","data":[{"id":"a","v":3}],"uid":"u"}"#,
                r#"{"type":"subscription","event":"update","data":[{"id":"b","v":2}],"uid":"u"}"#,
                r#"{"type":"subscription","event":"update","data":[{"id":"c","v":1}],"uid":"u"}"#,
            ]
        );
        assert!(slots.is_empty());
    }

    #[test]
    fn folds_report_what_they_did_and_deletes_survive() {
        let mut slots = Slots::default();
        let k = key("k");
        assert_eq!(
            slots.fold(1, &None, &k, ch(Update, None, "[1]"), None),
            Folded::Queued
        );
        assert_eq!(
            slots.fold(1, &None, &k, ch(Delete, None, "[\"k\"]"), None),
            Folded::Merged
        );
        assert_eq!(
            slots.fold(1, &None, &key("n"), ch(Create, None, "[2]"), None),
            Folded::Queued
        );
        assert_eq!(
            slots.fold(1, &None, &key("n"), ch(Delete, None, "[\"n\"]"), None),
            Folded::Cancelled
        );
        assert_eq!(
            texts(&mut slots),
            [r#"{"type":"subscription","event":"delete","data":["k"]}"#]
        );
    }

    #[test]
    fn a_key_after_its_cancel_starts_a_new_slot_at_the_back() {
        let mut slots = Slots::default();
        slots.fold(1, &None, &key("a"), ch(Create, None, "[\"a1\"]"), None);
        slots.fold(1, &None, &key("b"), ch(Create, None, "[\"b1\"]"), None);
        slots.fold(1, &None, &key("a"), ch(Delete, None, "[\"a\"]"), None);
        slots.fold(1, &None, &key("a"), ch(Create, None, "[\"a2\"]"), None);
        let got = texts(&mut slots);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("b1") && got[1].contains("a2"), "{got:?}");
    }

    #[test]
    fn subscriptions_fold_apart_and_reset_apart() {
        let mut slots = Slots::default();
        let (one, two) = (Some(key("1")), Some(key("2")));
        slots.fold(1, &one, &key("a"), ch(Update, None, "[1]"), None);
        slots.fold(2, &two, &key("a"), ch(Update, None, "[2]"), None);
        slots.fold(1, &one, &key("a"), ch(Update, None, "[3]"), None);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.clear_sub(1), 1);
        slots.push_frame(
            1,
            Frame {
                text: Utf8Bytes::from("init"),
                live: None,
            },
        );
        slots.fold(1, &one, &key("a"), ch(Update, None, "[4]"), None);
        assert_eq!(
            texts(&mut slots),
            [
                r#"{"type":"subscription","event":"update","data":[2],"uid":"2"}"#,
                "init",
                r#"{"type":"subscription","event":"update","data":[4],"uid":"1"}"#,
            ]
        );
    }

    #[test]
    fn cancelled_places_are_compacted() {
        let mut slots = Slots::default();
        slots.fold(1, &None, &key("kept"), ch(Update, None, "[0]"), None);
        for i in 0..10_000 {
            let k = key(&format!("k{i}"));
            slots.fold(1, &None, &k, ch(Create, None, "[1]"), None);
            slots.fold(1, &None, &k, ch(Delete, None, "[1]"), None);
        }
        assert_eq!(slots.len(), 1);
        assert!(slots.places() <= COMPACT_MIN + 2, "{}", slots.places());
        // The index still finds the slot that survived the compactions.
        assert_eq!(
            slots.fold(1, &None, &key("kept"), ch(Update, None, "[2]"), None),
            Folded::Merged
        );
        assert_eq!(texts(&mut slots).len(), 1);
    }
}
