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
//! - A subscription with a `max_rate` folds from its first change, whatever the bounds: a
//!   key's slot may not be written before its *not before* instant, one interval after the
//!   key's last frame went out (its *cooldown*, kept per (subscription, key) until it
//!   passes). A drain writes only the slots that are due; [`Slots::next_due`] tells the
//!   session when to wake for the earliest of the others (one timer per connection).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Its subscription's `max_rate` interval: a cooldown starts when the slot is written.
    every: Option<Duration>,
    /// Not written before this instant (the key's cooldown when the slot was made).
    not_before: Option<Instant>,
}

/// A `max_rate` subscription's fold: at most one frame per key every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The interval between two frames of one key (1 / `max_rate`).
    pub every: Duration,
    /// The time of the fold.
    pub now: Instant,
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
#[derive(Debug)]
pub struct Slots {
    queue: VecDeque<Entry>,
    /// Where each pending slot is in `queue`.
    index: HashMap<(u64, Arc<str>), usize>,
    /// Entries that are not `Empty`.
    live: usize,
    /// Live entries without a `not_before`: due at once.
    untimed: usize,
    /// The earliest `not_before` of the pending slots (early, never late: a cancelled or
    /// cleared slot may leave it behind, which costs one idle wake-up).
    earliest: Option<Instant>,
    /// When each (`max_rate` subscription, key) written lately may be written again.
    cooling: HashMap<(u64, Arc<str>), Instant>,
    /// Most cooldowns kept: memory stays bounded by keys even when a `max_rate` subscription
    /// keeps up with many of them; past it a key's next change is not held back.
    cooling_cap: usize,
    /// `cooling`'s size after its last pruning: it is pruned again once twice as big.
    cooling_pruned: usize,
    /// The latest cooldown's end: past it, every cooldown has ended.
    cooling_latest: Option<Instant>,
    /// Cooldowns not kept because `cooling_cap` was reached, since the last
    /// [`Slots::take_unheld`]: each is a key whose next change is not held back to its rate.
    unheld: usize,
}

impl Default for Slots {
    fn default() -> Self {
        Slots::with_cooling_cap(usize::MAX)
    }
}

/// When a drain may write a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The slots due at this instant (the session's flushes).
    By(Instant),
    /// Every slot, due or not (the close of a shutdown: nothing may stay behind its resume
    /// position), at this instant.
    All(Instant),
}

impl Due {
    fn now(self) -> Instant {
        match self {
            Due::By(now) | Due::All(now) => now,
        }
    }
}

/// Emptied places below this are never worth a compaction.
const COMPACT_MIN: usize = 64;

impl Slots {
    /// An empty queue keeping at most `cap` cooldowns of `max_rate` subscriptions.
    pub fn with_cooling_cap(cap: usize) -> Self {
        Slots {
            queue: VecDeque::new(),
            index: HashMap::new(),
            live: 0,
            untimed: 0,
            earliest: None,
            cooling: HashMap::new(),
            cooling_cap: cap,
            cooling_pruned: 0,
            cooling_latest: None,
            unheld: 0,
        }
    }

    /// How many written `max_rate` keys got no cooldown (the cap was reached) since the last
    /// call: the session counts them in `tidings_conflation_rate_unheld_total`.
    pub fn take_unheld(&mut self) -> usize {
        std::mem::take(&mut self.unheld)
    }

    /// True when some entry is due at once (a slot without `max_rate`, a reset's `init`).
    pub fn has_untimed(&self) -> bool {
        self.untimed > 0
    }

    /// When the earliest held slot falls due (`None`: none is held back).
    pub fn next_due(&self) -> Option<Instant> {
        // With nothing pending, a stale instant (a cancelled slot's) must not wake anyone.
        self.earliest.filter(|_| self.live > 0)
    }

    /// Pending slots and frames.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Folds `change` of `key` for subscription `sub` (whose frames carry `uid`); with a
    /// `rate`, a new slot is held until the key's cooldown has passed.
    pub fn fold(
        &mut self,
        sub: u64,
        uid: &Option<Arc<str>>,
        key: &Arc<str>,
        change: Change,
        live: Option<Live>,
        rate: Option<Rate>,
    ) -> Folded {
        if let Some(&at) = self.index.get(&(sub, key.clone())) {
            let Some(Entry::Slot(slot)) = self.queue.get_mut(at) else {
                // The index only ever points at slots; a stale entry is dropped.
                self.index.remove(&(sub, key.clone()));
                return self.fold(sub, uid, key, change, live, rate);
            };
            return match merge(&slot.change, change) {
                Some(merged) => {
                    slot.change = merged;
                    slot.live = live.or(slot.live);
                    Folded::Merged
                }
                None => {
                    if slot.not_before.is_none() {
                        self.untimed -= 1;
                    }
                    self.queue[at] = Entry::Empty;
                    self.index.remove(&(sub, key.clone()));
                    self.live -= 1;
                    self.compact_if_sparse();
                    Folded::Cancelled
                }
            };
        }
        let not_before = rate.and_then(|rate| {
            let until = *self.cooling.get(&(sub, key.clone()))?;
            (until > rate.now).then_some(until)
        });
        match not_before {
            Some(at) => self.earliest = Some(self.earliest.map_or(at, |e| e.min(at))),
            None => self.untimed += 1,
        }
        self.index.insert((sub, key.clone()), self.queue.len());
        self.queue.push_back(Entry::Slot(Slot {
            sub,
            key: key.clone(),
            uid: uid.clone(),
            change,
            live,
            every: rate.map(|r| r.every),
            not_before,
        }));
        self.live += 1;
        Folded::Queued
    }

    /// Queues a whole frame of subscription `sub` behind its slots.
    pub fn push_frame(&mut self, sub: u64, frame: Frame) {
        self.queue.push_back(Entry::Frame(sub, frame));
        self.live += 1;
        self.untimed += 1;
    }

    /// Drops everything pending for subscription `sub`, and its cooldowns (a reset replaces
    /// it with a fresh `init`, an unsubscribe ends it); returns how many slots and frames
    /// were dropped.
    pub fn clear_sub(&mut self, sub: u64) -> usize {
        let mut dropped = 0;
        let mut untimed = 0;
        for entry in self.queue.iter_mut() {
            let (mine, timed) = match entry {
                Entry::Slot(slot) => (slot.sub == sub, slot.not_before.is_some()),
                Entry::Frame(owner, _) => (*owner == sub, false),
                Entry::Empty => (false, false),
            };
            if mine {
                *entry = Entry::Empty;
                dropped += 1;
                untimed += usize::from(!timed);
            }
        }
        self.index.retain(|(owner, _), _| *owner != sub);
        if !self.cooling.is_empty() {
            self.cooling.retain(|(owner, _), _| *owner != sub);
        }
        self.live -= dropped;
        self.untimed -= untimed;
        if self.live == 0 {
            self.earliest = None;
        }
        self.compact_if_sparse();
        dropped
    }

    /// Moves the entries `due` into `out` as frames, in queue order; the slots held back keep
    /// their order. Folded frames carry no `position`. A `max_rate` slot written starts its
    /// key's cooldown. Returns the subscriptions that still hold slots (sorted): they are
    /// owed no checkpoint yet.
    pub fn drain(&mut self, out: &mut Vec<Frame>, due: Due) -> Vec<u64> {
        let now = due.now();
        let all = matches!(due, Due::All(_));
        self.prune_cooling(now);
        out.reserve(self.untimed);
        let mut held = VecDeque::new();
        let mut earliest: Option<Instant> = None;
        for entry in std::mem::take(&mut self.queue) {
            match entry {
                Entry::Empty => {}
                Entry::Frame(_, frame) => out.push(frame),
                Entry::Slot(slot) => match slot.not_before {
                    Some(at) if !all && at > now => {
                        earliest = Some(earliest.map_or(at, |e| e.min(at)));
                        held.push_back(Entry::Slot(slot));
                    }
                    _ => {
                        if let Some(every) = slot.every {
                            self.cool(slot.sub, &slot.key, now + every);
                        }
                        out.push(render(&slot));
                    }
                },
            }
        }
        self.live = held.len();
        self.untimed = 0;
        self.queue = held;
        self.earliest = earliest;
        self.index = HashMap::new();
        self.reindex();
        let mut subs: Vec<u64> = self.index.keys().map(|(sub, _)| *sub).collect();
        subs.sort_unstable();
        subs.dedup();
        subs
    }

    /// Forgets the cooldowns that ended by `now`: all at once when the latest has, else
    /// once they doubled since the last pruning (so a drain is not a walk over every key).
    fn prune_cooling(&mut self, now: Instant) {
        if self.cooling_latest.is_some_and(|latest| latest <= now) {
            self.cooling = HashMap::new();
            self.cooling_latest = None;
            self.cooling_pruned = 0;
        } else if self.cooling.len() > 2 * self.cooling_pruned + COMPACT_MIN {
            self.cooling.retain(|_, until| *until > now);
            self.cooling_pruned = self.cooling.len();
        }
    }

    /// Starts a cooldown, unless the cap is reached (then the key is not held back, and
    /// that is counted: a rate silently not applied would look like a broker bug).
    fn cool(&mut self, sub: u64, key: &Arc<str>, until: Instant) {
        let id = (sub, key.clone());
        if self.cooling.len() < self.cooling_cap || self.cooling.contains_key(&id) {
            self.cooling.insert(id, until);
            self.cooling_latest = Some(self.cooling_latest.map_or(until, |l| l.max(until)));
        } else {
            self.unheld += 1;
        }
    }

    /// Frees everything pending, and the cooldowns (the uncounted `unheld` stays, so no
    /// count is lost).
    pub fn clear(&mut self) {
        *self = Slots {
            unheld: self.unheld,
            ..Slots::with_cooling_cap(self.cooling_cap)
        };
    }

    fn compact_if_sparse(&mut self) {
        let empty = self.queue.len() - self.live;
        if empty < COMPACT_MIN || empty <= self.live {
            return;
        }
        self.queue.retain(|e| !matches!(e, Entry::Empty));
        self.index.clear();
        self.reindex();
    }

    /// Points the index at every slot of the queue.
    fn reindex(&mut self) {
        for (at, entry) in self.queue.iter().enumerate() {
            if let Entry::Slot(slot) = entry {
                self.index.insert((slot.sub, slot.key.clone()), at);
            }
        }
    }

    /// Cooldowns kept (for the tests of their bound).
    #[cfg(test)]
    fn cooling(&self) -> usize {
        self.cooling.len()
    }

    /// Places in the queue, emptied ones included (for the tests of compaction).
    #[cfg(test)]
    fn places(&self) -> usize {
        self.queue.len()
    }
}

/// The frame of a slot being written.
fn render(slot: &Slot) -> Frame {
    let text = event_frame(
        slot.change.kind.as_str(),
        Some(&slot.change.data),
        slot.uid.as_deref(),
        slot.change.cause.map(Cause::as_str),
        None,
    );
    Frame {
        text: Utf8Bytes::from(text),
        live: slot.live,
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
        slots.drain(&mut out, Due::All(Instant::now()));
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
            slots.fold(1, &uid, &key(k), ch(Update, None, &data), None, None);
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
            slots.fold(1, &None, &k, ch(Update, None, "[1]"), None, None),
            Folded::Queued
        );
        assert_eq!(
            slots.fold(1, &None, &k, ch(Delete, None, "[\"k\"]"), None, None),
            Folded::Merged
        );
        assert_eq!(
            slots.fold(1, &None, &key("n"), ch(Create, None, "[2]"), None, None),
            Folded::Queued
        );
        assert_eq!(
            slots.fold(1, &None, &key("n"), ch(Delete, None, "[\"n\"]"), None, None),
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
        slots.fold(
            1,
            &None,
            &key("a"),
            ch(Create, None, "[\"a1\"]"),
            None,
            None,
        );
        slots.fold(
            1,
            &None,
            &key("b"),
            ch(Create, None, "[\"b1\"]"),
            None,
            None,
        );
        slots.fold(1, &None, &key("a"), ch(Delete, None, "[\"a\"]"), None, None);
        slots.fold(
            1,
            &None,
            &key("a"),
            ch(Create, None, "[\"a2\"]"),
            None,
            None,
        );
        let got = texts(&mut slots);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("b1") && got[1].contains("a2"), "{got:?}");
    }

    #[test]
    fn subscriptions_fold_apart_and_reset_apart() {
        let mut slots = Slots::default();
        let (one, two) = (Some(key("1")), Some(key("2")));
        slots.fold(1, &one, &key("a"), ch(Update, None, "[1]"), None, None);
        slots.fold(2, &two, &key("a"), ch(Update, None, "[2]"), None, None);
        slots.fold(1, &one, &key("a"), ch(Update, None, "[3]"), None, None);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.clear_sub(1), 1);
        slots.push_frame(
            1,
            Frame {
                text: Utf8Bytes::from("init"),
                live: None,
            },
        );
        slots.fold(1, &one, &key("a"), ch(Update, None, "[4]"), None, None);
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
        slots.fold(1, &None, &key("kept"), ch(Update, None, "[0]"), None, None);
        for i in 0..10_000 {
            let k = key(&format!("k{i}"));
            slots.fold(1, &None, &k, ch(Create, None, "[1]"), None, None);
            slots.fold(1, &None, &k, ch(Delete, None, "[1]"), None, None);
        }
        assert_eq!(slots.len(), 1);
        assert!(slots.places() <= COMPACT_MIN + 2, "{}", slots.places());
        // The index still finds the slot that survived the compactions.
        assert_eq!(
            slots.fold(1, &None, &key("kept"), ch(Update, None, "[2]"), None, None),
            Folded::Merged
        );
        assert_eq!(texts(&mut slots).len(), 1);
    }

    fn rated(every_ms: u64, now: Instant) -> Option<Rate> {
        Some(Rate {
            every: Duration::from_millis(every_ms),
            now,
        })
    }

    /// An empty queue, a start instant, and the instant `n` ms after it.
    fn clock() -> (Slots, Instant, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Slots::default(), t0, move |n| t0 + Duration::from_millis(n))
    }

    fn fold_rated(slots: &mut Slots, k: &Arc<str>, c: Change, every_ms: u64, now: Instant) {
        slots.fold(1, &None, k, c, None, rated(every_ms, now));
    }

    fn drain_by(slots: &mut Slots, now: Instant) -> (Vec<String>, Vec<u64>) {
        let mut out = Vec::new();
        let held = slots.drain(&mut out, Due::By(now));
        let out = out
            .into_iter()
            .map(|f| f.text.as_str().to_string())
            .collect();
        (out, held)
    }

    #[test]
    fn a_rated_key_goes_out_at_once_then_folds_until_its_interval_has_passed() {
        let (mut slots, t0, ms) = clock();
        let (a, b) = (key("a"), key("b"));
        fold_rated(&mut slots, &a, ch(Update, None, "[1]"), 500, t0);
        assert!(slots.has_untimed(), "the first change is due at once");
        assert_eq!(slots.next_due(), None);
        let (out, held) = drain_by(&mut slots, t0);
        assert_eq!(out.len(), 1);
        assert!(held.is_empty());
        // Inside the interval: held, and folded.
        for v in 2..=200 {
            let data = format!("[{v}]");
            fold_rated(&mut slots, &a, ch(Update, None, &data), 500, ms(10));
        }
        assert!(!slots.has_untimed());
        assert_eq!(slots.next_due(), Some(ms(500)));
        // Another key is not held back by a's interval.
        fold_rated(&mut slots, &b, ch(Create, None, "[0]"), 500, ms(20));
        let (out, held) = drain_by(&mut slots, ms(20));
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("[0]"), "{out:?}");
        assert_eq!(held, [1], "a is still held");
        let (out, _) = drain_by(&mut slots, ms(499));
        assert!(out.is_empty(), "not due yet");
        let (out, held) = drain_by(&mut slots, ms(500));
        assert_eq!(
            out,
            [r#"{"type":"subscription","event":"update","data":[200]}"#],
            "one frame, the latest value"
        );
        assert!(held.is_empty());
        assert_eq!(slots.next_due(), None);
        assert!(slots.is_empty());
        // Written at 500 ms: the next change waits until 1000 ms.
        fold_rated(&mut slots, &a, ch(Update, None, "[201]"), 500, ms(600));
        assert_eq!(slots.next_due(), Some(ms(1000)));
        // Past its cooldown a key is due at once again.
        fold_rated(&mut slots, &b, ch(Update, None, "[1]"), 500, ms(600));
        assert!(slots.has_untimed(), "b's cooldown ended at 520 ms");
    }

    #[test]
    fn a_delete_inside_the_interval_is_held_not_lost() {
        let (mut slots, t0, ms) = clock();
        let k = key("k");
        fold_rated(&mut slots, &k, ch(Create, None, "[1]"), 1000, t0);
        drain_by(&mut slots, t0);
        fold_rated(&mut slots, &k, ch(Update, None, "[2]"), 1000, ms(1));
        fold_rated(&mut slots, &k, ch(Delete, None, "[\"k\"]"), 1000, ms(2));
        let (out, _) = drain_by(&mut slots, ms(3));
        assert!(out.is_empty());
        let (out, _) = drain_by(&mut slots, ms(1000));
        assert_eq!(
            out,
            [r#"{"type":"subscription","event":"delete","data":["k"]}"#]
        );
        // A create then delete inside one interval cancels out, as without a rate.
        let n = key("n");
        fold_rated(&mut slots, &n, ch(Create, None, "[3]"), 1000, ms(1001));
        drain_by(&mut slots, ms(1001));
        fold_rated(&mut slots, &n, ch(Delete, None, "[\"n\"]"), 1000, ms(1002));
        fold_rated(&mut slots, &n, ch(Create, None, "[4]"), 1000, ms(1003));
        let (out, _) = drain_by(&mut slots, ms(2001));
        assert_eq!(
            out,
            [r#"{"type":"subscription","event":"update","data":[4]}"#],
            "delete + create: update"
        );
    }

    #[test]
    fn all_writes_held_slots_and_unrated_ones_are_never_held() {
        let (mut slots, t0, _) = clock();
        fold_rated(&mut slots, &key("a"), ch(Update, None, "[1]"), 1000, t0);
        drain_by(&mut slots, t0);
        fold_rated(&mut slots, &key("a"), ch(Update, None, "[2]"), 1000, t0);
        slots.fold(2, &None, &key("a"), ch(Update, None, "[3]"), None, None);
        let (out, held) = drain_by(&mut slots, t0);
        assert_eq!(out.len(), 1, "subscription 2 has no rate: {out:?}");
        assert_eq!(held, [1]);
        let mut out = Vec::new();
        assert!(slots.drain(&mut out, Due::All(t0)).is_empty());
        assert_eq!(out.len(), 1);
    }

    /// Folds an update of `k` at `now` and drains what is due then.
    fn write_rated(slots: &mut Slots, k: &str, every_ms: u64, now: Instant) {
        fold_rated(slots, &key(k), ch(Update, None, "[1]"), every_ms, now);
        drain_by(slots, now);
    }

    #[test]
    fn cooldowns_are_bounded_pruned_and_cleared() {
        let (_, t0, ms) = clock();
        let mut slots = Slots::with_cooling_cap(2);
        for k in ["a", "b", "c"] {
            fold_rated(&mut slots, &key(k), ch(Update, None, "[1]"), 1000, t0);
        }
        drain_by(&mut slots, t0);
        assert_eq!(slots.cooling(), 2, "capped");
        assert_eq!(
            slots.take_unheld(),
            1,
            "the third key's cooldown is counted as not kept"
        );
        assert_eq!(slots.take_unheld(), 0, "taken once");
        fold_rated(&mut slots, &key("c"), ch(Update, None, "[2]"), 1000, ms(1));
        assert!(slots.has_untimed(), "past the cap a key is not held back");
        drain_by(&mut slots, ms(1));
        assert_eq!(slots.take_unheld(), 1, "and again at its next write");
        // A key that keeps its cooldown is never counted.
        write_rated(&mut slots, "a", 1000, ms(2000));
        assert_eq!(slots.take_unheld(), 0);
        assert_eq!(slots.clear_sub(1), 0);
        assert_eq!(slots.cooling(), 0, "a subscription's cooldowns go with it");
        // A clear keeps what was not taken yet.
        for k in ["a", "b", "c"] {
            fold_rated(&mut slots, &key(k), ch(Update, None, "[4]"), 1000, ms(3000));
        }
        drain_by(&mut slots, ms(3000));
        slots.clear();
        assert_eq!(slots.take_unheld(), 1);
        // Expired cooldowns are pruned once they pile up.
        let mut slots = Slots::default();
        for i in 0..1000 {
            let k = key(&format!("k{i}"));
            fold_rated(&mut slots, &k, ch(Update, None, "[1]"), 10, t0);
        }
        drain_by(&mut slots, t0);
        assert_eq!(slots.cooling(), 1000);
        write_rated(&mut slots, "late", 10, ms(20));
        assert_eq!(slots.cooling(), 1, "only the late key's is still running");
    }
}
