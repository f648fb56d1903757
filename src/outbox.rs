//! The bounded queue between the hub and one connection's session.
//!
//! The hub pushes already-encoded frames and never waits; the session drains everything that
//! is queued and writes it in one flush. The queue is bounded both in frames and in bytes:
//! a push that would pass either bound marks the outbox overflowed, frees what it held, and
//! tells the session, which closes the connection as a slow consumer (close code 4008). The
//! caller counts the drop. Nothing else ever blocks on a slow reader.
//!
//! A conflating subscription (`--slow-consumer-policy conflate`) pushes through
//! [`Outbox::push_conflating`] instead: past those bounds (the soft bound) its frames are
//! split per item key and folded into the keyed queue of [`crate::conflate`], one slot per
//! (subscription, key), which the session writes after the unkeyed frames. Its hard bound is
//! `--conflation-max-keys` slots: passing it clears the subscription's slots and the hub
//! queues a fresh `init` from the retained state instead ([`Outbox::push_reset`]); the
//! [`RESETS_BEFORE_CLOSE`]th reset within [`RESET_WINDOW`] closes the connection with 4008.
//! A subscription that opted in (`"checkpoints": true`) is owed a `checkpoint` frame once its
//! folded frames are written ([`Outbox::checkpoint_collections`], [`Outbox::drain_with`]).
//!
//! A subscription with a `max_rate` folds from its first frame, whatever the bounds: each key
//! is written at most once per interval, its later changes held in its slot until then. A
//! drain writes only what is due; [`Outbox::next_due`] is when the session must wake for the
//! rest (one timer per connection). The outbox wakes the session whenever the time it must
//! next write moves earlier ([`WakeAt`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::conflate::{Due, Folded, KeyedChange, Rate, Slots};
use crate::protocol::{event_frame, WirePosition};

/// Resets of conflating subscriptions within [`RESET_WINDOW`] that close the connection as a
/// slow consumer (the last one closes it instead of resetting).
pub const RESETS_BEFORE_CLOSE: usize = 3;

/// The window [`RESETS_BEFORE_CLOSE`] is counted in.
pub const RESET_WINDOW: Duration = Duration::from_secs(60);

/// The close reason of a consumer too slow even for conflation.
pub const RESETS_REASON: &str = "slow consumer: conflation resets";

/// The close reason of an outbox that overflowed (or a write that timed out).
pub const OVERFLOW_REASON: &str = "slow consumer: outbox full";

/// One encoded text frame, shared between every connection that receives it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The JSON text; cloning it shares the bytes.
    pub text: Utf8Bytes,
    /// Timestamps of a live delivery, for the latency metrics; `None` for frames that are not
    /// live deliveries (`init`, replayed events).
    pub live: Option<Live>,
}

/// When a live event frame was made.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    /// The broker accepted the event.
    pub received: Instant,
    /// The hub queued the frame (once per group, shared by its members).
    pub queued: Instant,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// This push overflowed the outbox; the connection is now being closed. Carries the
    /// number of frames lost: the refused one and every one discarded from the queue.
    Overflow(usize),
    /// The outbox had already overflowed or was closed; the frame was dropped.
    Closed,
    /// A conflating subscription passed the hard bound: its pending slots were dropped (the
    /// count), this frame was not queued, and the caller owes it a fresh `init`
    /// ([`Outbox::push_reset`]).
    Reset(usize),
}

/// What a conflating push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued as it is (the outbox was under its bounds and folding nothing).
    Frame,
    /// Split per key into the keyed queue; this many of its changes were folded into a
    /// pending slot (merged or cancelled) rather than given one.
    Keyed {
        /// Changes merged into, or cancelled with, a pending slot.
        folded: usize,
    },
}

/// Who a conflating push is for.
#[derive(Debug, Clone, Copy)]
pub struct Conflating<'a> {
    /// The subscription (its registry id).
    pub sub: u64,
    /// The uid its frames carry.
    pub uid: &'a Option<Arc<str>>,
    /// Its collection.
    pub collection: &'a Arc<str>,
    /// It asked for `checkpoint` frames.
    pub checkpoints: bool,
    /// Its `max_rate` interval: at most one frame per key per interval, folded from the
    /// first push.
    pub every: Option<Duration>,
    /// Stamps of the event (for the latency metrics of folded frames).
    pub live: Option<Live>,
}

/// When the session must next write: the outbox wakes it when this moves earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum WakeAt {
    Now,
    At(Instant),
    Never,
}

/// A subscription owed a `checkpoint` frame.
#[derive(Debug)]
struct OwedCheckpoint {
    sub: u64,
    uid: Option<Arc<str>>,
    collection: Arc<str>,
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames (possibly none) were moved out.
    Frames {
        /// Of them, `max_rate` keys written without a cooldown (past `--conflation-max-keys`
        /// remembered ones), so their next change is not held back: the session counts them.
        rate_unheld: usize,
    },
    /// The outbox overflowed: close the connection as a slow consumer.
    Overflowed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Frame>,
    bytes: usize,
    overflowed: bool,
    closed: bool,
    /// Room granted on top of the bounds by a replay still queued (see `push_replay`);
    /// gone once the queue is drained.
    extra_messages: usize,
    extra_bytes: usize,
    /// Conflating subscriptions' pending changes, one slot per (subscription, key); written
    /// after `queue`. Not empty: the outbox is folding (past its soft bound).
    slots: Slots,
    /// When recent resets happened, oldest first (at most [`RESETS_BEFORE_CLOSE`]).
    resets: VecDeque<Instant>,
    /// Subscriptions with folded frames queued or written since their last `checkpoint`.
    owed: Vec<OwedCheckpoint>,
    /// The close reason once overflowed: [`OVERFLOW_REASON`] or [`RESETS_REASON`].
    slow_reason: Option<&'static str>,
}

impl State {
    fn wake_at(&self) -> WakeAt {
        if !self.queue.is_empty() || self.slots.has_untimed() {
            return WakeAt::Now;
        }
        self.slots.next_due().map_or(WakeAt::Never, WakeAt::At)
    }
}

/// A bounded, multi-producer, single-consumer frame queue.
#[derive(Debug)]
pub struct Outbox {
    /// Held only for a push or a drain, never across an await.
    state: Mutex<State>,
    /// Wakes the session; a permit is stored if it is not waiting, so no wake-up is lost.
    notify: Notify,
    max_messages: usize,
    max_bytes: usize,
    /// Hard bound of the keyed queue, in slots (`--conflation-max-keys`).
    max_keys: usize,
    /// Some subscription is owed a checkpoint: read without the lock on every flush.
    owes_checkpoint: AtomicBool,
    /// Some slot is held back by a `max_rate`: read without the lock on every wake-up.
    timed: AtomicBool,
}

/// Outboxes alive in this process (all brokers in it): the churn test checks that none
/// outlives its connection.
static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Drop for Outbox {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Outbox {
    /// Outboxes alive in this process.
    pub fn live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// An empty outbox with the given bounds.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Outbox::with_max_keys(max_messages, max_bytes, usize::MAX)
    }

    /// An empty outbox whose keyed queue holds at most `max_keys` slots.
    pub fn with_max_keys(max_messages: usize, max_bytes: usize, max_keys: usize) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Outbox {
            state: Mutex::new(State {
                slots: Slots::with_cooling_cap(max_keys),
                ..State::default()
            }),
            notify: Notify::new(),
            max_messages,
            max_bytes,
            max_keys,
            owes_checkpoint: AtomicBool::new(false),
            timed: AtomicBool::new(false),
        }
    }

    /// Keeps `timed` true exactly while a slot is held back. Written only when it changes:
    /// every push passes here, and a store would dirty a line the session reads.
    fn note_timed(&self, state: &State) {
        let timed = state.slots.next_due().is_some();
        if self.timed.load(Ordering::Relaxed) != timed {
            self.timed.store(timed, Ordering::Relaxed);
        }
    }

    /// Wakes the session if the time it must next write moved earlier than `before`.
    fn wake_if_earlier(&self, state: parking_lot::MutexGuard<'_, State>, before: WakeAt) {
        let after = state.wake_at();
        self.note_timed(&state);
        drop(state);
        if after < before {
            self.notify.notify_one();
        }
    }

    /// When the earliest slot held back by a `max_rate` falls due (`None`, without taking
    /// the lock, when none is): the session sleeps until then unless woken before.
    pub fn next_due(&self) -> Option<Instant> {
        if !self.timed.load(Ordering::Relaxed) {
            return None;
        }
        self.state.lock().slots.next_due()
    }

    /// Queues the frames one event brings a conflating subscription: as they are while the
    /// outbox has room for all of them and is folding nothing, else as `changes` (the same
    /// event split per key, rendered by the caller only then) folded into the keyed queue.
    /// All or nothing, so no key is both sent and folded for one event. A `max_rate`
    /// subscription always folds (its `frames` are not used). Refused with
    /// [`PushError::Reset`] when folding passes the hard bound.
    pub fn push_conflating<'c>(
        &self,
        to: Conflating<'_>,
        frames: &[Frame],
        changes: impl FnOnce() -> &'c [KeyedChange],
    ) -> Result<Pushed, PushError> {
        let len: usize = frames.iter().map(|f| f.text.len()).sum();
        let mut state = self.state.lock();
        if state.overflowed || state.closed {
            return Err(PushError::Closed);
        }
        let before = state.wake_at();
        // Slots held back by a `max_rate` are other subscriptions': they do not make this
        // one fold (its own slots are never held, so `untimed` covers them).
        if to.every.is_none()
            && !state.slots.has_untimed()
            && state.queue.len() + frames.len() <= self.max_messages + state.extra_messages
            && state.bytes + len <= self.max_bytes + state.extra_bytes
        {
            state.queue.extend(frames.iter().cloned());
            state.bytes += len;
            self.wake_if_earlier(state, before);
            return Ok(Pushed::Frame);
        }
        let mut folded = 0;
        let rate = to.every.map(|every| Rate {
            every,
            now: Instant::now(),
        });
        for keyed in changes() {
            let done = state.slots.fold(
                to.sub,
                to.uid,
                &keyed.key,
                keyed.change.clone(),
                to.live,
                rate,
            );
            if done != Folded::Queued {
                folded += 1;
            }
        }
        if state.slots.len() > self.max_keys {
            let dropped = state.slots.clear_sub(to.sub);
            self.wake_if_earlier(state, before);
            return Err(PushError::Reset(dropped));
        }
        if to.checkpoints && !state.owed.iter().any(|o| o.sub == to.sub) {
            state.owed.push(OwedCheckpoint {
                sub: to.sub,
                uid: to.uid.clone(),
                collection: to.collection.clone(),
            });
            self.owes_checkpoint.store(true, Ordering::Relaxed);
        }
        self.wake_if_earlier(state, before);
        Ok(Pushed::Keyed { folded })
    }

    /// Queues the fresh `init` of a subscription that was reset ([`PushError::Reset`]),
    /// behind everything pending, unless this reset is the [`RESETS_BEFORE_CLOSE`]th within
    /// [`RESET_WINDOW`]: then the outbox overflows and the connection is closed with
    /// [`RESETS_REASON`].
    pub fn push_reset(&self, sub: u64, init: Frame, now: Instant) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.overflowed || state.closed {
            return Err(PushError::Closed);
        }
        while state
            .resets
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= RESET_WINDOW)
        {
            state.resets.pop_front();
        }
        if state.resets.len() + 1 >= RESETS_BEFORE_CLOSE {
            state.slow_reason = Some(RESETS_REASON);
            return Err(self.overflow(state, 1));
        }
        state.resets.push_back(now);
        let before = state.wake_at();
        state.slots.clear_sub(sub);
        state.slots.push_frame(sub, init);
        self.wake_if_earlier(state, before);
        Ok(())
    }

    /// The collections of the subscriptions owed a checkpoint (empty, without taking the
    /// lock, when none is). The session reads their positions before it drains.
    pub fn checkpoint_collections(&self) -> Vec<Arc<str>> {
        if !self.owes_checkpoint.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let state = self.state.lock();
        let mut out: Vec<Arc<str>> = Vec::new();
        for owed in &state.owed {
            if !out.contains(&owed.collection) {
                out.push(owed.collection.clone());
            }
        }
        out
    }

    /// Drops what is pending for subscription `sub` in the keyed queue, and any checkpoint it
    /// is owed: it was unsubscribed (or replaced by one with its uid), and nothing of it may
    /// follow the `init` of its replacement.
    pub fn forget(&self, sub: u64) {
        let mut state = self.state.lock();
        // Also when nothing is pending: its cooldowns go too.
        state.slots.clear_sub(sub);
        state.owed.retain(|o| o.sub != sub);
        self.note_timed(&state);
    }

    /// Slow consumer close reason: why the outbox overflowed.
    pub fn slow_reason(&self) -> &'static str {
        self.state.lock().slow_reason.unwrap_or(OVERFLOW_REASON)
    }

    /// Queues a frame, or refuses it when that would pass a bound.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        let len = frame.text.len();
        let mut state = self.state.lock();
        if state.overflowed || state.closed {
            return Err(PushError::Closed);
        }
        if state.queue.len() + 1 > self.max_messages + state.extra_messages
            || state.bytes + len > self.max_bytes + state.extra_bytes
        {
            return Err(self.overflow(state, 1));
        }
        let before = state.wake_at();
        state.queue.push_back(frame);
        state.bytes += len;
        self.wake_if_earlier(state, before);
        Ok(())
    }

    /// Queues a subscription's `init` and the events it missed, all at once. The replay is
    /// bounded by the history it comes from, not by the outbox: it is granted room on top of
    /// the bounds until the session drains it, so live frames that follow it are held to the
    /// usual bounds.
    pub fn push_replay(&self, frames: Vec<Frame>) -> Result<(), PushError> {
        let len: usize = frames.iter().map(|f| f.text.len()).sum();
        let mut state = self.state.lock();
        if state.overflowed || state.closed {
            return Err(PushError::Closed);
        }
        state.extra_messages += frames.len();
        state.extra_bytes += len;
        let before = state.wake_at();
        state.queue.extend(frames);
        state.bytes += len;
        self.wake_if_earlier(state, before);
        Ok(())
    }

    fn overflow(&self, mut state: parking_lot::MutexGuard<'_, State>, refused: usize) -> PushError {
        state.overflowed = true;
        let lost = state.queue.len() + state.slots.len() + refused;
        state.queue = VecDeque::new();
        state.slots.clear();
        state.owed = Vec::new();
        state.bytes = 0;
        drop(state);
        self.timed.store(false, Ordering::Relaxed);
        self.notify.notify_one();
        PushError::Overflow(lost)
    }

    /// Moves every queued frame into `out`, held slots included.
    pub fn drain(&self, out: &mut Vec<Frame>) -> Drained {
        self.drain_with(out, &[], Due::All(Instant::now()))
    }

    /// Moves every queued frame into `out`, the unkeyed ones first, then the keyed queue's
    /// `due` slots; then a `checkpoint` for each subscription owed one whose collection is in
    /// `positions` and which holds no slot back. Those positions must have been read (under
    /// the collections' log locks) before this drain: every event up to them was queued
    /// before, so it is in `out` or was written already, and nothing folded is left pending.
    pub fn drain_with(
        &self,
        out: &mut Vec<Frame>,
        positions: &[(Arc<str>, WirePosition)],
        due: Due,
    ) -> Drained {
        let mut state = self.state.lock();
        if state.overflowed {
            return Drained::Overflowed;
        }
        // The queue's buffer goes with its frames: an idle connection holds none, and a burst
        // does not pin its peak size.
        out.extend(std::mem::take(&mut state.queue));
        state.bytes = 0;
        state.extra_messages = 0;
        state.extra_bytes = 0;
        let (held, rate_unheld) = match state.slots.is_empty() {
            true => (Vec::new(), 0),
            false => {
                let held = state.slots.drain(out, due);
                (held, state.slots.take_unheld())
            }
        };
        self.note_timed(&state);
        if !positions.is_empty() {
            state.owed.retain(|owed| {
                let Some((_, at)) = positions.iter().find(|(c, _)| *c == owed.collection) else {
                    return true;
                };
                if held.binary_search(&owed.sub).is_ok() {
                    return true;
                }
                let text = event_frame("checkpoint", None, owed.uid.as_deref(), None, Some(at));
                out.push(Frame {
                    text: Utf8Bytes::from(text),
                    live: None,
                });
                false
            });
            if state.owed.is_empty() {
                state.owed = Vec::new();
                self.owes_checkpoint.store(false, Ordering::Relaxed);
            }
        }
        Drained::Frames { rate_unheld }
    }

    /// Waits until something was pushed (or the outbox overflowed) since the last drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Refuses every later push and frees what is queued (the connection is going away).
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.queue = VecDeque::new();
        state.slots.clear();
        state.owed = Vec::new();
        state.bytes = 0;
        self.timed.store(false, Ordering::Relaxed);
    }

    /// Marks the consumer slow although the outbox did not overflow: a write to it outlasted
    /// the write timeout. Later drains answer `Overflowed`, so the session closes it.
    pub fn mark_slow(&self) {
        let mut state = self.state.lock();
        state.overflowed = true;
        state.slow_reason.get_or_insert(OVERFLOW_REASON);
        drop(state);
        self.notify.notify_one();
    }

    /// [`Outbox::mark_slow`], closing with `reason` instead of [`OVERFLOW_REASON`].
    pub fn mark_slow_because(&self, reason: &'static str) {
        let mut state = self.state.lock();
        state.overflowed = true;
        state.slow_reason.get_or_insert(reason);
        drop(state);
        self.notify.notify_one();
    }

    /// True once the outbox overflowed or [`Outbox::mark_slow`] was called: the connection is
    /// a slow consumer, whatever ends it afterwards (a client that hangs up first included).
    pub fn is_slow(&self) -> bool {
        self.state.lock().overflowed
    }

    /// Frames queued, while that is under half of both bounds: a session may wait for more
    /// before writing. `None` once half full (waiting longer would risk an overflow), after
    /// an overflow, or once closed.
    pub fn below_half(&self) -> Option<usize> {
        let state = self.state.lock();
        let messages = self.max_messages + state.extra_messages;
        let bytes = self.max_bytes + state.extra_bytes;
        let room = !state.overflowed
            && !state.closed
            && !state.slots.has_untimed()
            && state.queue.len() * 2 < messages
            && state.bytes * 2 < bytes;
        room.then_some(state.queue.len())
    }

    /// Frames currently queued (keyed slots included).
    pub fn len(&self) -> usize {
        let state = self.state.lock();
        state.queue.len() + state.slots.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Frame {
        Frame {
            text: Utf8Bytes::from(s),
            live: None,
        }
    }

    #[test]
    fn bounded_by_messages() {
        let ob = Outbox::new(2, 1000);
        assert_eq!(ob.push(frame("a")), Ok(()));
        assert_eq!(ob.push(frame("b")), Ok(()));
        assert_eq!(ob.push(frame("c")), Err(PushError::Overflow(3)));
        assert_eq!(ob.push(frame("d")), Err(PushError::Closed));
        let mut out = Vec::new();
        assert_eq!(ob.drain(&mut out), Drained::Overflowed);
        assert!(out.is_empty());
    }

    #[test]
    fn bounded_by_bytes_and_drains_in_order() {
        let ob = Outbox::new(100, 5);
        ob.push(frame("ab")).unwrap();
        ob.push(frame("cd")).unwrap();
        let mut out = Vec::new();
        assert_eq!(ob.drain(&mut out), Drained::Frames { rate_unheld: 0 });
        assert_eq!(
            out.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(),
            ["ab", "cd"]
        );
        ob.push(frame("abcde")).unwrap();
        assert_eq!(ob.push(frame("f")), Err(PushError::Overflow(2)));
    }

    #[test]
    fn below_half_until_either_bound_is_half_used() {
        let ob = Outbox::new(4, 1000);
        assert_eq!(ob.below_half(), Some(0));
        ob.push(frame("a")).unwrap();
        assert_eq!(ob.below_half(), Some(1));
        ob.push(frame("b")).unwrap();
        assert_eq!(ob.below_half(), None);
        let ob = Outbox::new(100, 10);
        ob.push(frame("abcd")).unwrap();
        assert_eq!(ob.below_half(), Some(1));
        ob.push(frame("e")).unwrap();
        assert_eq!(ob.below_half(), None);
        let ob = Outbox::new(1, 1000);
        ob.push(frame("a")).unwrap();
        let _ = ob.push(frame("b"));
        assert_eq!(ob.below_half(), None, "overflowed");
        let ob = Outbox::new(4, 1000);
        ob.close();
        assert_eq!(ob.below_half(), None, "closed");
    }

    #[test]
    fn a_replay_gets_room_until_drained() {
        let ob = Outbox::new(2, 1000);
        ob.push(frame("a")).unwrap();
        ob.push_replay(vec![frame("i"), frame("r1"), frame("r2")])
            .unwrap();
        // Live frames after the replay still have the usual two slots.
        ob.push(frame("b")).unwrap();
        assert_eq!(ob.push(frame("c")), Err(PushError::Overflow(6)));
        let ob = Outbox::new(2, 1000);
        ob.push_replay(vec![frame("i"), frame("r1"), frame("r2")])
            .unwrap();
        let mut out = Vec::new();
        ob.drain(&mut out);
        assert_eq!(out.len(), 3);
        ob.push(frame("a")).unwrap();
        ob.push(frame("b")).unwrap();
        assert_eq!(ob.push(frame("c")), Err(PushError::Overflow(3)));
    }

    #[test]
    fn a_slow_mark_sticks() {
        let ob = Outbox::new(10, 1000);
        assert!(!ob.is_slow());
        ob.mark_slow();
        assert!(ob.is_slow());
        let mut out = Vec::new();
        assert_eq!(ob.drain(&mut out), Drained::Overflowed);
        ob.close();
        assert!(ob.is_slow());
    }

    #[test]
    fn closed_refuses() {
        let ob = Outbox::new(10, 100);
        ob.push(frame("a")).unwrap();
        ob.close();
        assert!(ob.is_empty());
        assert_eq!(ob.push(frame("b")), Err(PushError::Closed));
    }

    use crate::conflate::Change;
    use crate::event::EventKind;

    fn changes(key: &str, kind: EventKind, data: &str) -> Vec<KeyedChange> {
        vec![KeyedChange {
            key: Arc::from(key),
            change: Change {
                kind,
                cause: None,
                data: Arc::from(data),
            },
        }]
    }

    fn conflating<'a>(
        sub: u64,
        uid: &'a Option<Arc<str>>,
        collection: &'a Arc<str>,
        checkpoints: bool,
        every: Option<Duration>,
    ) -> Conflating<'a> {
        Conflating {
            sub,
            uid,
            collection,
            checkpoints,
            every,
            live: None,
        }
    }

    /// Subscription 1, no uid, no checkpoints, at most one frame per key per hour.
    fn hourly(collection: &Arc<str>) -> Conflating<'_> {
        conflating(1, &None, collection, false, Some(Duration::from_secs(3600)))
    }

    fn texts(ob: &Outbox, positions: &[(Arc<str>, WirePosition)]) -> Vec<String> {
        let mut out = Vec::new();
        assert_eq!(
            ob.drain_with(&mut out, positions, Due::By(Instant::now())),
            Drained::Frames { rate_unheld: 0 }
        );
        out.into_iter()
            .map(|f| f.text.as_str().to_string())
            .collect()
    }

    #[test]
    fn conflation_starts_past_the_soft_bound_and_folds_per_key() {
        let ob = Outbox::with_max_keys(2, 1000, 10);
        let uid = Some(Arc::<str>::from("u"));
        let collection: Arc<str> = Arc::from("c");
        let to = conflating(7, &uid, &collection, true, None);
        let push = |key: &str, kind, data: &str| {
            let keyed = changes(key, kind, data);
            ob.push_conflating(to, &[frame(&format!("plain {key} {data}"))], || &keyed)
        };
        assert_eq!(push("a", EventKind::Update, "[1]"), Ok(Pushed::Frame));
        assert_eq!(push("a", EventKind::Update, "[2]"), Ok(Pushed::Frame));
        // Past the bound of two frames: keyed, not closed.
        assert_eq!(
            push("a", EventKind::Update, "[3]"),
            Ok(Pushed::Keyed { folded: 0 })
        );
        assert_eq!(
            push("b", EventKind::Create, "[10]"),
            Ok(Pushed::Keyed { folded: 0 })
        );
        assert_eq!(
            push("a", EventKind::Update, "[4]"),
            Ok(Pushed::Keyed { folded: 1 })
        );
        assert_eq!(
            push("b", EventKind::Delete, "[\"b\"]"),
            Ok(Pushed::Keyed { folded: 1 })
        );
        // Folding once started, a push under the bounds is folded too (order per key).
        assert_eq!(ob.len(), 3);
        assert_eq!(ob.below_half(), None, "a folding outbox is written at once");
        assert_eq!(ob.checkpoint_collections(), vec![collection.clone()]);
        let at = WirePosition {
            epoch: Arc::from("e"),
            offset: 9,
        };
        assert_eq!(
            texts(&ob, &[(collection.clone(), at)]),
            [
                "plain a [1]",
                "plain a [2]",
                r#"{"type":"subscription","event":"update","data":[4],"uid":"u"}"#,
                r#"{"type":"subscription","event":"checkpoint","uid":"u","position":{"epoch":"e","offset":9}}"#,
            ]
        );
        assert!(ob.checkpoint_collections().is_empty(), "paid");
        // Drained: back to plain frames.
        assert_eq!(push("a", EventKind::Update, "[5]"), Ok(Pushed::Frame));
    }

    #[test]
    fn a_checkpoint_waits_for_its_position() {
        let ob = Outbox::with_max_keys(0, 1000, 10);
        let collection: Arc<str> = Arc::from("c");
        let to = conflating(1, &None, &collection, true, None);
        let keyed = changes("a", EventKind::Update, "[1]");
        ob.push_conflating(to, &[frame("x")], || &keyed).unwrap();
        assert_eq!(
            texts(&ob, &[]).len(),
            1,
            "no position read: no checkpoint yet"
        );
        assert_eq!(ob.checkpoint_collections(), vec![collection.clone()]);
        let at = WirePosition {
            epoch: Arc::from("e"),
            offset: 3,
        };
        assert_eq!(
            texts(&ob, &[(collection, at)]),
            [r#"{"type":"subscription","event":"checkpoint","position":{"epoch":"e","offset":3}}"#]
        );
        // A subscription that did not ask is owed none.
        let other: Arc<str> = Arc::from("d");
        let quiet = conflating(2, &None, &other, false, None);
        ob.push_conflating(quiet, &[frame("x")], || &keyed).unwrap();
        assert!(ob.checkpoint_collections().is_empty());
    }

    #[test]
    fn the_hard_bound_resets_and_repeated_resets_close() {
        let ob = Outbox::with_max_keys(0, 1000, 2);
        let collection: Arc<str> = Arc::from("c");
        let to = conflating(1, &None, &collection, false, None);
        let push = |key: &str| {
            let keyed = changes(key, EventKind::Update, "[1]");
            ob.push_conflating(to, &[frame("x")], || &keyed)
        };
        push("a").unwrap();
        push("b").unwrap();
        push("a").unwrap();
        assert_eq!(push("c"), Err(PushError::Reset(3)));
        assert_eq!(ob.len(), 0, "the subscription's slots are gone");
        let now = Instant::now();
        ob.push_reset(1, frame("init 1"), now).unwrap();
        push("d").unwrap();
        assert_eq!(texts(&ob, &[]).len(), 2, "init, then d");
        // A reset past the window does not count.
        push("a").unwrap();
        push("b").unwrap();
        assert_eq!(push("c"), Err(PushError::Reset(3)));
        ob.push_reset(1, frame("init 2"), now + RESET_WINDOW * 2)
            .unwrap();
        // The pending init counts as a slot.
        push("a").unwrap();
        assert_eq!(push("b"), Err(PushError::Reset(3)));
        // The third within the window closes.
        ob.push_reset(1, frame("init 3"), now + RESET_WINDOW * 2)
            .unwrap();
        push("a").unwrap();
        assert_eq!(push("b"), Err(PushError::Reset(3)));
        assert!(matches!(
            ob.push_reset(1, frame("init 4"), now + RESET_WINDOW * 2),
            Err(PushError::Overflow(_))
        ));
        assert!(ob.is_slow());
        assert_eq!(ob.slow_reason(), RESETS_REASON);
        let mut out = Vec::new();
        assert_eq!(ob.drain(&mut out), Drained::Overflowed);
    }

    #[test]
    fn forget_drops_a_subscriptions_slots() {
        let ob = Outbox::with_max_keys(0, 1000, 10);
        let collection: Arc<str> = Arc::from("c");
        for sub in [1, 2] {
            let to = conflating(sub, &None, &collection, true, None);
            let keyed = changes("a", EventKind::Update, &format!("[{sub}]"));
            ob.push_conflating(to, &[frame("x")], || &keyed).unwrap();
        }
        ob.forget(1);
        assert_eq!(ob.len(), 1);
        let at = WirePosition {
            epoch: Arc::from("e"),
            offset: 1,
        };
        let got = texts(&ob, &[(collection, at)]);
        assert_eq!(got.len(), 2, "sub 2's update and its checkpoint: {got:?}");
        assert!(got[0].contains("[2]"));
    }

    #[test]
    fn unkeyed_frames_keep_the_usual_bounds_while_folding() {
        let ob = Outbox::with_max_keys(1, 1000, 10);
        let collection: Arc<str> = Arc::from("c");
        let to = conflating(1, &None, &collection, false, None);
        let keyed = changes("a", EventKind::Update, "[1]");
        ob.push(frame("close-policy")).unwrap();
        ob.push_conflating(to, &[frame("x")], || &keyed).unwrap();
        assert_eq!(
            ob.push(frame("close-policy 2")),
            Err(PushError::Overflow(3))
        );
    }

    #[test]
    fn a_drain_reports_rated_keys_written_past_the_cooldown_cap() {
        // At most 2 keys remembered: a third written gets no cooldown, and the drain says so.
        let ob = Outbox::with_max_keys(100, 100_000, 2);
        let collection: Arc<str> = Arc::from("c");
        let to = hourly(&collection);
        let mut out = Vec::new();
        let mut write = |keys: &[&str]| {
            for key in keys {
                let keyed = changes(key, EventKind::Update, "[1]");
                ob.push_conflating(to, &[], || &keyed).unwrap();
            }
            assert_eq!(ob.next_due(), None, "nothing held back");
            let drained = ob.drain_with(&mut out, &[], Due::By(Instant::now()));
            (drained, std::mem::take(&mut out).len())
        };
        let none = Drained::Frames { rate_unheld: 0 };
        let one = Drained::Frames { rate_unheld: 1 };
        assert_eq!(write(&["a", "b"]), (none, 2));
        assert_eq!(write(&["c"]), (one, 1));
        // "c" is not held back: its next change goes out at once, and is counted again.
        assert_eq!(write(&["c"]), (one, 1));
    }

    #[test]
    fn a_max_rate_folds_from_the_first_push_and_holds_a_key_for_its_interval() {
        let ob = Outbox::with_max_keys(100, 100_000, 10);
        let collection: Arc<str> = Arc::from("c");
        let every = Duration::from_secs(3600);
        let to = conflating(1, &None, &collection, true, Some(every));
        let push = |key: &str, kind, data: &str| {
            let keyed = changes(key, kind, data);
            ob.push_conflating(to, &[], || &keyed)
        };
        let at = WirePosition {
            epoch: Arc::from("e"),
            offset: 1,
        };
        // Far below the soft bound, yet keyed: the first change is due at once.
        assert_eq!(
            push("a", EventKind::Update, "[1]"),
            Ok(Pushed::Keyed { folded: 0 })
        );
        assert_eq!(ob.next_due(), None);
        assert_eq!(
            texts(&ob, &[(collection.clone(), at.clone())]),
            [
                r#"{"type":"subscription","event":"update","data":[1]}"#,
                r#"{"type":"subscription","event":"checkpoint","position":{"epoch":"e","offset":1}}"#,
            ]
        );
        // Inside the interval: held, folded, and the session is told when to wake.
        push("a", EventKind::Update, "[2]").unwrap();
        assert_eq!(
            push("a", EventKind::Delete, "[\"a\"]"),
            Ok(Pushed::Keyed { folded: 1 })
        );
        let due = ob.next_due().expect("a is held");
        assert!(due > Instant::now() + every / 2);
        // No checkpoint while a folded change is held.
        assert!(texts(&ob, &[(collection.clone(), at.clone())]).is_empty());
        assert_eq!(ob.checkpoint_collections(), vec![collection.clone()]);
        // Plain frames of others are not held behind it, and wake the session.
        ob.push(frame("close-policy")).unwrap();
        assert_eq!(texts(&ob, &[]), ["close-policy"]);
        // A shutdown's drain writes the held delete.
        let mut out = Vec::new();
        assert_eq!(ob.drain(&mut out), Drained::Frames { rate_unheld: 0 });
        assert_eq!(
            out.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(),
            [r#"{"type":"subscription","event":"delete","data":["a"]}"#]
        );
        assert_eq!(ob.next_due(), None);
    }

    #[test]
    fn a_max_rate_keeps_the_hard_bound() {
        let ob = Outbox::with_max_keys(100, 100_000, 2);
        let collection: Arc<str> = Arc::from("c");
        let to = conflating(1, &None, &collection, false, Some(Duration::from_secs(1)));
        for k in ["a", "b"] {
            let keyed = changes(k, EventKind::Update, "[1]");
            ob.push_conflating(to, &[], || &keyed).unwrap();
        }
        let keyed = changes("c", EventKind::Update, "[1]");
        assert_eq!(
            ob.push_conflating(to, &[], || &keyed),
            Err(PushError::Reset(3)),
            "a, b and the c that passed the bound"
        );
        assert!(ob.is_empty());
    }

    #[tokio::test]
    async fn a_key_falling_due_earlier_wakes_the_reader() {
        let ob = Arc::new(Outbox::with_max_keys(100, 100_000, 10));
        let collection: Arc<str> = Arc::from("c");
        let to = hourly(&collection);
        let keyed = changes("a", EventKind::Update, "[1]");
        ob.push_conflating(to, &[], || &keyed).unwrap();
        ob.ready().await;
        assert_eq!(texts(&ob, &[]).len(), 1);
        ob.push_conflating(to, &[], || &keyed).unwrap();
        assert!(ob.next_due().is_some());
        // The first held slot wakes the session once, to arm its timer; nothing is due.
        tokio::time::timeout(Duration::from_secs(5), ob.ready())
            .await
            .expect("woken to arm the timer");
        assert!(texts(&ob, &[]).is_empty());
        // Another change of the held key moves nothing earlier: no wake-up.
        ob.push_conflating(to, &[], || &keyed).unwrap();
        let woken = tokio::time::timeout(Duration::from_millis(20), ob.ready()).await;
        assert!(woken.is_err(), "the timer already covers it");
        // A new key is due at once: it does.
        let other = changes("b", EventKind::Update, "[1]");
        ob.push_conflating(to, &[], || &other).unwrap();
        tokio::time::timeout(Duration::from_secs(5), ob.ready())
            .await
            .expect("woken");
        assert_eq!(texts(&ob, &[]).len(), 1, "b only");
    }

    #[tokio::test]
    async fn wakes_the_reader() {
        let ob = std::sync::Arc::new(Outbox::new(10, 100));
        let ob2 = ob.clone();
        let waiter = tokio::spawn(async move {
            ob2.ready().await;
            let mut out = Vec::new();
            ob2.drain(&mut out);
            out.len()
        });
        tokio::task::yield_now().await;
        ob.push(frame("x")).unwrap();
        assert_eq!(waiter.await.unwrap(), 1);
    }
}
