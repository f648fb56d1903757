//! Recent events per collection, kept on every node so a client that reconnects with `since`
//! gets exactly what it missed.
//!
//! Each collection has a [`CollectionLog`]: the events this node delivered, newest last,
//! bounded by count and age (per collection) and by bytes (all collections together), and
//! `covers_after`, the offset after which the log is complete.
//! The log's mutex is the serialization point between delivery and subscription: the hub
//! holds it while it records and dispatches an event, and a subscribe holds it while it reads
//! the replay and registers. So every event is either replayed to a new subscription or
//! dispatched to it live, never both and never neither.
//!
//! Engines whose log outlives a node (Redis, NATS) fill the history on start from what they
//! retain; the memory engine's history begins with its epoch.
//!
//! Each log carries the epoch its positions belong to, changed only under that log's lock.
//! A subscribe therefore reads the epoch from the log it already holds and takes no other
//! lock for it; [`History::reset`] moves to a new epoch one log at a time and never holds one
//! lock while waiting for another. The current epoch for logs created later sits in a leaf
//! mutex: nothing is locked while it is held.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;

use crate::event::Event;
use crate::protocol::WirePosition;

/// A fresh random epoch: 12 lowercase alphanumerics. Epochs are history's notion (the
/// lifetime of a log); the engines that mint their own (memory, Redis) use this one.
pub fn random_epoch() -> Arc<str> {
    Arc::from(
        Alphanumeric
            .sample_string(&mut rand::rng(), 12)
            .to_lowercase(),
    )
}

/// How much history each collection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events kept per collection (0 disables resume).
    pub max_events: usize,
    /// Events older than this are dropped.
    pub max_age: Duration,
    /// Approximate bytes the history of all collections may hold together (see
    /// [`event_bytes`]). Over it, a collection holding more than its fair share
    /// (`max_bytes / collections`) drops its oldest events when it records one, and the
    /// periodic sweep trims every such collection.
    pub max_bytes: usize,
}

/// What an event held in the history costs, approximately: the event itself and the heap
/// behind its items and keys (string bytes plus a fixed cost per JSON node).
pub fn event_bytes(event: &Event) -> usize {
    fn value(v: &Value) -> usize {
        // A `Value` is 32 bytes; strings, arrays and maps add their heap.
        const NODE: usize = std::mem::size_of::<Value>();
        match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => NODE,
            Value::String(s) => NODE + s.len(),
            Value::Array(a) => NODE + a.iter().map(value).sum::<usize>(),
            // An insertion-ordered map entry: key string, value, index slot and hash.
            Value::Object(m) => {
                NODE + m
                    .iter()
                    .map(|(k, v)| k.len() + 24 + 16 + value(v))
                    .sum::<usize>()
            }
        }
    }
    std::mem::size_of::<Event>()
        + event.items.iter().map(value).sum::<usize>()
        + event.keys.iter().map(value).sum::<usize>()
}

/// What a `since` resolves to.
#[derive(Debug)]
pub enum Replay {
    /// The missed events, oldest first (possibly none): `recovered: true`.
    Events(Vec<Arc<Event>>),
    /// The position is from another epoch or older than the history: `recovered: false`.
    Lost,
    /// The client has seen further than this node has delivered yet (it came from a node
    /// that is ahead); try again shortly.
    Ahead,
}

/// One collection's recent events.
#[derive(Debug)]
pub struct CollectionLog {
    /// The epoch positions in this log belong to.
    epoch: Arc<str>,
    /// Which [`History::reset`] set `epoch` (so a slower, older reset never undoes a newer).
    generation: u64,
    /// When recorded, the event, and its [`event_bytes`].
    events: VecDeque<(Instant, Arc<Event>, usize)>,
    /// Sum of the sizes in `events`.
    bytes: usize,
    /// Offset of the last event recorded (0: none yet).
    last: u64,
    /// Every event with an offset above this is in `events` or was never published; `None`
    /// until known (an engine whose log predates this node, before its first event).
    covers_after: Option<u64>,
}

impl CollectionLog {
    /// Offset of the last event recorded here (0: none).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The epoch this log's positions belong to.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// Moves this log to the epoch of reset `generation`: the old log's events mean nothing
    /// in the new one.
    fn enter(&mut self, epoch: &Arc<str>, generation: u64, joined_late: bool, total: &AtomicUsize) {
        if self.generation >= generation {
            return;
        }
        self.epoch = epoch.clone();
        self.generation = generation;
        self.events.clear();
        total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.last = 0;
        // Otherwise the new log starts empty: complete from its start.
        self.covers_after = (!joined_late).then_some(0);
    }

    fn record(&mut self, event: Arc<Event>, budget: &Budget<'_>, contiguous: bool, now: Instant) {
        // Unknown so far, or (with contiguous offsets) a gap — events this log never saw:
        // restored after a subscription created the log, or trimmed from an engine's stream
        // before this node read them: the log is complete only from this event on. With
        // sparse offsets (NATS: one sequence for all collections) gaps are normal.
        let before = event.offset.saturating_sub(1);
        if self.covers_after.is_none() || (contiguous && self.last != before) {
            self.covers_after = Some(self.covers_after.unwrap_or(0).max(before));
        }
        self.last = event.offset;
        let size = event_bytes(&event);
        self.events.push_back((now, event, size));
        self.bytes += size;
        budget.total.fetch_add(size, Ordering::Relaxed);
        self.trim(budget, now);
    }

    fn trim(&mut self, budget: &Budget<'_>, now: Instant) {
        let limits = budget.limits;
        let mut fair_share = None;
        while let Some((at, event, size)) = self.events.front() {
            let too_many = self.events.len() > limits.max_events;
            let too_old = now.saturating_duration_since(*at) > limits.max_age;
            let too_big = budget.total.load(Ordering::Relaxed) > limits.max_bytes
                && self.bytes > *fair_share.get_or_insert_with(|| budget.fair_share());
            if !(too_many || too_old || too_big) {
                break;
            }
            self.covers_after = Some(event.offset);
            self.bytes -= size;
            budget.total.fetch_sub(*size, Ordering::Relaxed);
            self.events.pop_front();
        }
    }

    /// The events after `offset`, if the log still holds all of them.
    pub fn after(&self, offset: u64) -> Replay {
        if offset > self.last {
            return Replay::Ahead;
        }
        match self.covers_after {
            Some(covered) if offset >= covered => {}
            // Unknown: events may have come and gone before this node saw any.
            _ => return Replay::Lost,
        }
        let start = self.events.partition_point(|(_, e, _)| e.offset <= offset);
        Replay::Events(
            self.events
                .range(start..)
                .map(|(_, e, _)| e.clone())
                .collect(),
        )
    }
}

/// The limits and the byte count shared by every log, lent to one log while it trims.
struct Budget<'a> {
    limits: &'a HistoryLimits,
    total: &'a AtomicUsize,
    /// How many collections share the bytes.
    collections: Collections<'a>,
}

enum Collections<'a> {
    /// Counted when needed (only once over the bound: counting visits every shard).
    Of(&'a DashMap<Arc<str>, Arc<Mutex<CollectionLog>>>),
    /// Counted beforehand (the sweep holds the map's shards while it trims).
    Known(usize),
}

impl Budget<'_> {
    /// Bytes one collection may keep while the history is over its byte bound.
    fn fair_share(&self) -> usize {
        let n = match self.collections {
            Collections::Of(logs) => logs.len(),
            Collections::Known(n) => n,
        };
        self.limits.max_bytes / n.max(1)
    }
}

/// The epoch new logs start in.
#[derive(Debug)]
struct EpochState {
    epoch: Arc<str>,
    /// False until the engine named its log's lifetime (the first [`History::reset`]).
    named: bool,
    /// Counts resets.
    generation: u64,
}

/// Every collection's log, and the epoch they belong to.
#[derive(Debug)]
pub struct History {
    limits: HistoryLimits,
    /// Offsets are contiguous per collection (memory, Redis): a log that has seen no event
    /// is complete (the memory engine's history starts with its epoch; Redis restores at
    /// least the last event of every collection it holds, so a collection with no restored
    /// event has none), and a gap in offsets means events this log never saw. False for
    /// sparse offsets (NATS: the stream sequence), where a log is complete only from the
    /// first event it recorded.
    contiguous: bool,
    /// A leaf: read (briefly, under a map shard) when a log is created, written by `reset`
    /// before it visits the logs; no other lock is taken while it is held.
    epoch: Mutex<EpochState>,
    /// A random epoch of this node's own, for positions handed out while the history cannot
    /// be trusted (the engine is restoring or disconnected): no log ever matches it, so a
    /// resume from such a position is answered as lost instead of replaying the wrong thing.
    provisional: Arc<str>,
    logs: DashMap<Arc<str>, Arc<Mutex<CollectionLog>>>,
    /// Sum of every log's `bytes`.
    bytes: AtomicUsize,
}

impl History {
    /// An empty history for `epoch`. An empty `epoch` means the engine has not named its
    /// log's lifetime yet (it is still connecting): until it does, positions carry a random
    /// epoch of this node's own, which no log will ever match, so they resume as lost.
    pub fn new(limits: HistoryLimits, epoch: Arc<str>, contiguous: bool) -> Self {
        let named = !epoch.is_empty();
        let epoch = if named { epoch } else { random_epoch() };
        History {
            limits,
            contiguous,
            epoch: Mutex::new(EpochState {
                epoch,
                named,
                generation: 0,
            }),
            provisional: random_epoch(),
            logs: DashMap::new(),
            bytes: AtomicUsize::new(0),
        }
    }

    fn budget(&self) -> Budget<'_> {
        Budget {
            limits: &self.limits,
            total: &self.bytes,
            collections: Collections::Of(&self.logs),
        }
    }

    /// Approximate bytes held by every collection's history (see [`event_bytes`]).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The epoch new positions belong to (a log being moved by a concurrent reset may still
    /// answer the previous one until its turn).
    pub fn epoch(&self) -> Arc<str> {
        self.epoch.lock().epoch.clone()
    }

    /// The log of `collection`, created empty if needed.
    pub fn log(&self, collection: &Arc<str>) -> Arc<Mutex<CollectionLog>> {
        if let Some(log) = self.logs.get(collection) {
            return log.value().clone();
        }
        self.logs
            .entry(collection.clone())
            .or_insert_with(|| {
                // Under the shard's write lock: a reset that changes the epoch after this
                // read visits this shard only once the log is in it.
                let (epoch, generation) = {
                    let state = self.epoch.lock();
                    (state.epoch.clone(), state.generation)
                };
                Arc::new(Mutex::new(CollectionLog {
                    epoch,
                    generation,
                    events: VecDeque::new(),
                    bytes: 0,
                    last: 0,
                    covers_after: self.contiguous.then_some(0),
                }))
            })
            .value()
            .clone()
    }

    /// Records an event in its (locked) log.
    pub fn record(&self, log: &mut CollectionLog, event: Arc<Event>) {
        if self.limits.max_events == 0 || self.limits.max_bytes == 0 {
            log.last = event.offset;
            log.covers_after = Some(event.offset);
            return;
        }
        log.record(event, &self.budget(), self.contiguous, Instant::now());
    }

    /// The (locked) log is at `offset` with nothing to replay before it: what a node that
    /// loaded a retained collection's snapshot knows (the events up to there are in the
    /// snapshot, not in the history). Resumes from `offset` on are complete.
    pub fn mark(&self, log: &mut CollectionLog, offset: u64) {
        log.events.clear();
        self.bytes.fetch_sub(log.bytes, Ordering::Relaxed);
        log.bytes = 0;
        log.last = offset;
        log.covers_after = Some(offset);
    }

    /// The position a subscription registered now starts after.
    pub fn position(&self, log: &CollectionLog) -> WirePosition {
        WirePosition {
            epoch: log.epoch.clone(),
            offset: log.last,
        }
    }

    /// Every collection that has a log, in no particular order.
    pub fn collections(&self) -> Vec<Arc<str>> {
        self.logs.iter().map(|entry| entry.key().clone()).collect()
    }

    /// Continues `collection`'s log after `offset` of the current epoch, with nothing to
    /// replay: a resume from exactly `offset` recovers (nothing was missed), an older one is
    /// lost. For the memory engine restarting from a clean shutdown's snapshot, before any
    /// event or subscription (`--state-dir`).
    pub fn continue_at(&self, collection: &Arc<str>, offset: u64) {
        let log = self.log(collection);
        let mut log = log.lock();
        log.last = offset;
        log.covers_after = Some(offset);
    }

    /// The position to hand out while the history cannot be trusted (see `provisional`).
    pub fn provisional_position(&self) -> WirePosition {
        WirePosition {
            epoch: self.provisional.clone(),
            offset: 0,
        }
    }

    /// What to replay for a client that last saw `since`.
    pub fn replay(&self, log: &CollectionLog, since: &WirePosition) -> Replay {
        if since.epoch != log.epoch {
            return Replay::Lost;
        }
        log.after(since.offset)
    }

    /// The log's lifetime changed (the engine lost its history): forget everything, so no
    /// position of the old epoch can be resumed against the new one.
    ///
    /// The epoch lock is released before any log is visited, and each log is locked alone:
    /// a subscribe holding a log never waits for the reset, nor the reset for more than that
    /// one subscribe.
    pub fn reset(&self, epoch: Arc<str>) {
        let (generation, joined_late) = {
            let mut current = self.epoch.lock();
            if current.epoch == epoch {
                return;
            }
            // The first epoch of an engine whose log predates this node: logs created before
            // it (subscriptions made while the engine connected) know nothing yet.
            let joined_late = !current.named && !self.contiguous;
            *current = EpochState {
                epoch: epoch.clone(),
                named: true,
                generation: current.generation + 1,
            };
            (current.generation, joined_late)
        };
        // Collect first so no map shard is held while a log is locked.
        let logs: Vec<_> = self.logs.iter().map(|l| l.value().clone()).collect();
        for log in logs {
            log.lock()
                .enter(&epoch, generation, joined_late, &self.bytes);
        }
    }

    /// Drops aged-out events, and logs nobody uses that never saw an event (created by
    /// subscriptions to collections nobody publishes to). Run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let budget = Budget {
            limits: &self.limits,
            total: &self.bytes,
            collections: Collections::Known(self.logs.len()),
        };
        self.logs.retain(|_, log| {
            // Under the map's shard lock nobody can take a new reference, so a count of one
            // means nobody holds this log.
            let unused = Arc::strong_count(log) == 1;
            match log.try_lock() {
                Some(mut l) => {
                    l.trim(&budget, now);
                    !(unused && l.last == 0)
                }
                None => true,
            }
        });
    }

    /// Number of logs and events held (for tests and metrics).
    pub fn size(&self) -> (usize, usize) {
        let logs: Vec<_> = self.logs.iter().map(|l| l.value().clone()).collect();
        let events = logs.iter().map(|l| l.lock().events.len()).sum();
        (self.logs.len(), events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn ev(offset: u64) -> Arc<Event> {
        Arc::new(Event {
            offset,
            ..Event::test("c", EventKind::Create, vec![], vec![])
        })
    }

    fn pos(offset: u64) -> WirePosition {
        WirePosition {
            epoch: Arc::from("e"),
            offset,
        }
    }

    fn offsets(r: Replay) -> Option<Vec<u64>> {
        match r {
            Replay::Events(e) => Some(e.iter().map(|e| e.offset).collect()),
            _ => None,
        }
    }

    fn limits(n: usize) -> HistoryLimits {
        HistoryLimits {
            max_events: n,
            max_age: Duration::from_secs(3600),
            max_bytes: usize::MAX,
        }
    }

    #[test]
    fn replays_exactly_what_follows_and_knows_what_it_lost() {
        let h = History::new(limits(3), Arc::from("e"), true);
        let log = h.log(&Arc::from("c"));
        let mut log = log.lock();
        assert_eq!(offsets(h.replay(&log, &pos(0))), Some(vec![]));
        for o in 1..=5 {
            h.record(&mut log, ev(o));
        }
        assert_eq!(offsets(h.replay(&log, &pos(2))), Some(vec![3, 4, 5]));
        assert_eq!(offsets(h.replay(&log, &pos(4))), Some(vec![5]));
        assert_eq!(offsets(h.replay(&log, &pos(5))), Some(vec![]));
        assert!(matches!(h.replay(&log, &pos(1)), Replay::Lost));
        assert!(matches!(h.replay(&log, &pos(6)), Replay::Ahead));
        let other = WirePosition {
            epoch: Arc::from("x"),
            offset: 4,
        };
        assert!(matches!(h.replay(&log, &other), Replay::Lost));
    }

    #[test]
    fn a_log_joined_late_is_complete_only_from_its_first_event() {
        let h = History::new(limits(10), Arc::from("e"), false);
        let log = h.log(&Arc::from("c"));
        let mut log = log.lock();
        assert!(matches!(h.replay(&log, &pos(0)), Replay::Lost));
        h.record(&mut log, ev(41));
        h.record(&mut log, ev(42));
        assert_eq!(offsets(h.replay(&log, &pos(40))), Some(vec![41, 42]));
        assert!(matches!(h.replay(&log, &pos(39)), Replay::Lost));
    }

    #[test]
    fn a_gap_makes_the_log_complete_only_after_it() {
        let h = History::new(limits(10), Arc::from("e"), true);
        let log = h.log(&Arc::from("c"));
        let mut log = log.lock();
        h.record(&mut log, ev(1));
        h.record(&mut log, ev(2));
        h.record(&mut log, ev(5));
        h.record(&mut log, ev(6));
        assert_eq!(offsets(h.replay(&log, &pos(4))), Some(vec![5, 6]));
        assert!(matches!(h.replay(&log, &pos(2)), Replay::Lost));
        // A log created empty, then restored from the middle of an engine's log.
        let late = h.log(&Arc::from("d"));
        let mut late = late.lock();
        h.record(&mut late, ev(40));
        assert!(matches!(h.replay(&late, &pos(0)), Replay::Lost));
        assert_eq!(offsets(h.replay(&late, &pos(39))), Some(vec![40]));
    }

    #[test]
    fn sparse_offsets_are_not_gaps() {
        let h = History::new(limits(10), Arc::from("e"), false);
        let log = h.log(&Arc::from("c"));
        let mut log = log.lock();
        for o in [41, 45, 52, 60] {
            h.record(&mut log, ev(o));
        }
        assert_eq!(offsets(h.replay(&log, &pos(45))), Some(vec![52, 60]));
        assert_eq!(
            offsets(h.replay(&log, &pos(40))),
            Some(vec![41, 45, 52, 60])
        );
        assert!(matches!(h.replay(&log, &pos(39)), Replay::Lost));
    }

    #[test]
    fn reset_forgets_the_old_epoch() {
        let h = History::new(limits(10), Arc::from("e"), true);
        let c: Arc<str> = Arc::from("c");
        {
            let log = h.log(&c);
            let mut log = log.lock();
            h.record(&mut log, ev(1));
        }
        h.reset(Arc::from("f"));
        let log = h.log(&c);
        let log = log.lock();
        assert_eq!(log.last(), 0);
        assert!(matches!(h.replay(&log, &pos(1)), Replay::Lost));
        let fresh = WirePosition {
            epoch: Arc::from("f"),
            offset: 0,
        };
        assert_eq!(offsets(h.replay(&log, &fresh)), Some(vec![]));
    }

    #[test]
    fn the_first_epoch_of_a_log_joined_late_covers_nothing_yet() {
        let h = History::new(limits(10), Arc::from(""), false);
        let provisional = h.epoch();
        assert!(!provisional.is_empty() && provisional.bytes().all(|b| b.is_ascii_alphanumeric()));
        let c: Arc<str> = Arc::from("c");
        h.log(&c);
        h.reset(Arc::from("e"));
        {
            let log = h.log(&c);
            let mut log = log.lock();
            assert!(matches!(h.replay(&log, &pos(0)), Replay::Lost));
            // Restored from the engine's log: earlier events may have been trimmed.
            h.record(&mut log, ev(41));
            assert!(matches!(h.replay(&log, &pos(10)), Replay::Lost));
            assert_eq!(offsets(h.replay(&log, &pos(40))), Some(vec![41]));
        }
        // A later epoch is a new, empty log: complete from its start.
        h.reset(Arc::from("f"));
        let log = h.log(&c);
        let log = log.lock();
        let fresh = WirePosition {
            epoch: Arc::from("f"),
            offset: 0,
        };
        assert_eq!(offsets(h.replay(&log, &fresh)), Some(vec![]));
    }

    fn sized(collection: &str, offset: u64, text_len: usize) -> Arc<Event> {
        let items = vec![serde_json::json!({ "text": "x".repeat(text_len) })];
        Arc::new(Event {
            offset,
            ..Event::test(
                collection,
                EventKind::Create,
                items,
                vec![Value::from(offset)],
            )
        })
    }

    #[test]
    fn bytes_are_counted_and_bounded_across_collections() {
        let one = event_bytes(&sized("a", 1, 1000));
        assert!(one > 1000 && one < 1450, "{one}");
        let h = History::new(
            HistoryLimits {
                max_events: 1000,
                max_age: Duration::from_secs(3600),
                max_bytes: 10 * one,
            },
            Arc::from("e"),
            true,
        );
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        {
            let log = h.log(&a);
            let mut log = log.lock();
            for o in 1..=50 {
                h.record(&mut log, sized("a", o, 1000));
            }
            // Alone, `a` may use the whole budget.
            assert_eq!(h.bytes(), 10 * one);
            assert_eq!(offsets(h.replay(&log, &pos(40))), Some((41..=50).collect()));
            assert!(matches!(h.replay(&log, &pos(39)), Replay::Lost));
        }
        // A second collection gets its share: `a` gives way as it records, and the sweep
        // trims it too.
        {
            let log = h.log(&b);
            let mut log = log.lock();
            for o in 1..=5 {
                h.record(&mut log, sized("b", o, 1000));
            }
            assert_eq!(offsets(h.replay(&log, &pos(0))), Some(vec![1, 2, 3, 4, 5]));
        }
        h.sweep();
        assert!(h.bytes() <= 10 * one, "{} > {}", h.bytes(), 10 * one);
        assert_eq!(h.size(), (2, 10));
        h.reset(Arc::from("f"));
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn resets_racing_subscribes_never_deadlock() {
        // Before the epoch lived in each log, a reset held the epoch while locking every log
        // and a subscribe held a log while reading the epoch: this hung within milliseconds.
        let h = Arc::new(History::new(limits(10), Arc::from("e0"), true));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut workers = Vec::new();
        for t in 0..4 {
            let (h, stop, done) = (h.clone(), stop.clone(), done_tx.clone());
            workers.push(std::thread::spawn(move || {
                let collection: Arc<str> = Arc::from(format!("c{}", t % 2));
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let log = h.log(&collection);
                    let log = log.lock();
                    let at = h.position(&log);
                    assert!(matches!(h.replay(&log, &at), Replay::Events(_)));
                    n += 1;
                }
                let _ = done.send(n);
            }));
        }
        let resetter = {
            let (h, done) = (h.clone(), done_tx.clone());
            std::thread::spawn(move || {
                for i in 1..=20_000u64 {
                    h.reset(Arc::from(format!("e{i}")));
                }
                let _ = done.send(0);
            })
        };
        drop(done_tx);
        // A hang detector, not a speed target.
        let bound = Duration::from_secs(60);
        done_rx.recv_timeout(bound).expect("the reset finished");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..4 {
            done_rx.recv_timeout(bound).expect("a subscriber finished");
        }
        resetter.join().expect("resetter");
        for w in workers {
            w.join().expect("worker");
        }
        assert_eq!(&*h.epoch(), "e20000");
        let log = h.log(&Arc::from("c0"));
        assert_eq!(&**log.lock().epoch(), "e20000");
    }

    #[test]
    fn sweep_drops_unused_empty_logs_and_old_events() {
        let h = History::new(
            HistoryLimits {
                max_events: 10,
                max_age: Duration::ZERO,
                max_bytes: usize::MAX,
            },
            Arc::from("e"),
            true,
        );
        h.log(&Arc::from("nobody"));
        {
            let log = h.log(&Arc::from("c"));
            let mut log = log.lock();
            h.record(&mut log, ev(1));
        }
        std::thread::sleep(Duration::from_millis(2));
        h.sweep();
        assert_eq!(h.size(), (1, 0));
        let log = h.log(&Arc::from("c"));
        assert!(matches!(log.lock().after(0), Replay::Lost));
    }
}
