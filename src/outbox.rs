//! The bounded queue between the hub and one connection's session.
//!
//! The hub pushes already-encoded frames and never waits; the session drains everything that
//! is queued and writes it in one flush. The queue is bounded both in frames and in bytes:
//! a push that would pass either bound marks the outbox overflowed, frees what it held, and
//! tells the session, which closes the connection as a slow consumer (close code 4008). The
//! caller counts the drop. Nothing else ever blocks on a slow reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

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
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames (possibly none) were moved out.
    Frames,
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
        LIVE.fetch_add(1, Ordering::Relaxed);
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_messages,
            max_bytes,
        }
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
        let was_empty = state.queue.is_empty();
        state.queue.push_back(frame);
        state.bytes += len;
        drop(state);
        if was_empty {
            self.notify.notify_one();
        }
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
        let was_empty = state.queue.is_empty();
        state.queue.extend(frames);
        state.bytes += len;
        drop(state);
        if was_empty {
            self.notify.notify_one();
        }
        Ok(())
    }

    fn overflow(&self, mut state: parking_lot::MutexGuard<'_, State>, refused: usize) -> PushError {
        state.overflowed = true;
        let lost = state.queue.len() + refused;
        state.queue = VecDeque::new();
        state.bytes = 0;
        drop(state);
        self.notify.notify_one();
        PushError::Overflow(lost)
    }

    /// Moves every queued frame into `out`.
    pub fn drain(&self, out: &mut Vec<Frame>) -> Drained {
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
        Drained::Frames
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
        state.bytes = 0;
    }

    /// Marks the consumer slow although the outbox did not overflow: a write to it outlasted
    /// the write timeout. Later drains answer `Overflowed`, so the session closes it.
    pub fn mark_slow(&self) {
        self.state.lock().overflowed = true;
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
            && state.queue.len() * 2 < messages
            && state.bytes * 2 < bytes;
        room.then_some(state.queue.len())
    }

    /// Frames currently queued.
    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
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
        assert_eq!(ob.drain(&mut out), Drained::Frames);
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
