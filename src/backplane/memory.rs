//! The in-process backplane: per-collection offsets under a lock, delivered synchronously to
//! the local hub. One node only; nothing to run beside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use super::{Accepted, Backplane, BackplaneError, BoxFuture, Dedupe, EventSink};
use crate::event::NewEvent;
use crate::state::State;

pub use crate::history::random_epoch;

/// An earlier process's epoch and each collection's last offset in it, to continue from.
pub type Continued<'a> = (Arc<str>, &'a [(Arc<str>, u64)]);

/// Offsets per collection and a random epoch per process lifetime (or, restarting from a
/// clean shutdown's `--state-dir` snapshot, the earlier process's epoch, continued).
pub struct MemoryBackplane {
    sink: Arc<dyn EventSink>,
    /// Changes on every start (offsets from an earlier process mean nothing now), except
    /// when a clean shutdown's snapshot says every offset of it is accounted for.
    epoch: Arc<str>,
    /// Last offset per collection. Held while the event is dispatched, so events of one
    /// collection reach the hub one at a time, in offset order.
    logs: DashMap<Arc<str>, Arc<Mutex<u64>>>,
    dedupe: Dedupe,
    /// Counts idempotency keys forgotten early (`tidings_idempotency_evictions_total`).
    evictions: prometheus::IntCounter,
    /// The retained state whose capacity a publish is checked against before it gets
    /// offsets (the hub folds the events into it).
    state: Option<Arc<State>>,
    /// Open (true) until [`MemoryBackplane::close`]: each publish holds it for reading while
    /// it appends, so closing waits for the publishes under way and refuses later ones.
    open: RwLock<bool>,
}

impl std::fmt::Debug for MemoryBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackplane")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl MemoryBackplane {
    /// A backplane delivering to `sink`, deduplicating idempotency keys over `window`;
    /// keys forgotten early (past `dedupe::MAX_KEYS`) are counted in `evictions`.
    pub fn new(
        sink: Arc<dyn EventSink>,
        window: Duration,
        evictions: prometheus::IntCounter,
    ) -> Self {
        Self::with_state(sink, window, evictions, None)
    }

    /// As [`MemoryBackplane::new`], refusing publishes that would overfill `state`.
    pub fn with_state(
        sink: Arc<dyn EventSink>,
        window: Duration,
        evictions: prometheus::IntCounter,
        state: Option<Arc<State>>,
    ) -> Self {
        Self::continuing(sink, window, evictions, state, None)
    }

    /// As [`MemoryBackplane::with_state`]; with `after`, the epoch of an earlier process
    /// continues and each listed collection's offsets resume after the given one (a restart
    /// from a clean shutdown's snapshot, `--state-dir`); without, a new random epoch.
    pub fn continuing(
        sink: Arc<dyn EventSink>,
        window: Duration,
        evictions: prometheus::IntCounter,
        state: Option<Arc<State>>,
        after: Option<Continued<'_>>,
    ) -> Self {
        let (epoch, offsets) = match after {
            Some((epoch, offsets)) => (epoch, offsets),
            None => (random_epoch(), &[][..]),
        };
        sink.reset(epoch.clone());
        let logs = DashMap::new();
        for (collection, offset) in offsets {
            logs.insert(collection.clone(), Arc::new(Mutex::new(*offset)));
        }
        MemoryBackplane {
            sink,
            epoch,
            logs,
            dedupe: Dedupe::new(window),
            evictions,
            state,
            open: RwLock::new(true),
        }
    }

    /// Refuses every later publish (503), once the publishes under way are appended: after
    /// it, nothing changes the state or the offsets (the final `--state-dir` snapshot).
    pub fn close(&self) {
        *self.open.write() = false;
    }

    /// This process's epoch.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    fn log(&self, collection: &Arc<str>) -> Arc<Mutex<u64>> {
        self.logs
            .entry(collection.clone())
            .or_default()
            .value()
            .clone()
    }

    /// Appends one event under its collection's lock (`last`, held by the caller).
    fn append(&self, last: &mut u64, mut new: NewEvent, received: Instant) -> Accepted {
        // Checked under the collection's lock, so two concurrent publishes of one key
        // cannot both pass.
        if let Some(key) = &new.idempotency_key {
            if let Some(first) = self.dedupe.get(&new.collection, key) {
                return first;
            }
        }
        *last += 1;
        let accepted = Accepted {
            offset: *last,
            epoch: self.epoch.clone(),
            duplicate: false,
            stale: Vec::new(),
        };
        if let Some(key) = new.idempotency_key.take() {
            let evicted = self.dedupe.insert(new.collection.clone(), key, &accepted);
            if evicted > 0 {
                self.evictions.inc_by(evicted as u64);
            }
        }
        self.sink
            .deliver(Arc::new(new.at(*last, self.epoch.clone(), received)));
        accepted
    }
}

impl Backplane for MemoryBackplane {
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, BackplaneError>> {
        let received = Instant::now();
        let open = self.open.read();
        if !*open {
            return Box::pin(std::future::ready(Err(BackplaneError::Unavailable(
                "the broker is shutting down".into(),
            ))));
        }
        let retains = |e: &NewEvent| {
            self.state
                .as_ref()
                .is_some_and(|s| s.retains(&e.collection))
        };
        if !events.iter().any(retains) {
            let accepted = events
                .into_iter()
                .map(|e| {
                    let log = self.log(&e.collection);
                    let mut last = log.lock();
                    self.append(&mut last, e, received)
                })
                .collect();
            return Box::pin(std::future::ready(Ok(accepted)));
        }
        // A batch touching retained state is checked whole before any offset is taken: lock
        // every collection of the batch, in name order (so two batches cannot deadlock), check
        // the capacity, append, and release the reservation once the events are folded.
        let mut names: Vec<Arc<str>> = events.iter().map(|e| e.collection.clone()).collect();
        names.sort();
        names.dedup();
        let logs: Vec<Arc<Mutex<u64>>> = names.iter().map(|c| self.log(c)).collect();
        let mut guards: Vec<_> = logs.iter().map(|l| l.lock()).collect();
        let mut admission = match self.state.as_ref().map(|s| s.admit(&events)) {
            Some(Err(e)) => return Box::pin(std::future::ready(Err(BackplaneError::StateFull(e)))),
            Some(Ok(admission)) => Some(admission),
            None => None,
        };
        let mut stale = admission
            .as_mut()
            .map(|a| std::mem::take(&mut a.stale))
            .unwrap_or_default();
        let mut accepted = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            // Every collection of the batch is in `names`.
            let at = names.binary_search(&e.collection).unwrap_or_default();
            let mut position = self.append(&mut guards[at], e, received);
            if !position.duplicate {
                if let Some(keys) = stale.get_mut(i) {
                    position.stale = std::mem::take(keys);
                }
            }
            accepted.push(position);
        }
        drop(admission);
        drop(guards);
        Box::pin(std::future::ready(Ok(accepted)))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn engine(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    struct Recorder(Mutex<Vec<(String, u64)>>);
    impl EventSink for Recorder {
        fn deliver(&self, event: Arc<Event>) {
            self.0
                .lock()
                .push((event.collection.to_string(), event.offset));
        }
        fn restore(&self, _: Arc<Event>) {}
        fn reset(&self, _: Arc<str>) {}
    }

    fn ev(c: &str) -> NewEvent {
        NewEvent {
            collection: Arc::from(c),
            kind: EventKind::Create,
            items: vec![],
            keys: vec![],
            before: Vec::new(),
            version: None,
            apply: Default::default(),
            idempotency_key: None,
        }
    }

    #[tokio::test]
    async fn offsets_are_per_collection_and_monotonic() {
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let bp = MemoryBackplane::new(
            rec.clone(),
            Duration::from_secs(60),
            prometheus::IntCounter::new("e", "e").unwrap(),
        );
        let pos = bp.publish(vec![ev("a"), ev("b"), ev("a")]).await.unwrap();
        assert_eq!(pos.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 1, 2]);
        assert_eq!(
            *rec.0.lock(),
            [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]
        );
        let other = MemoryBackplane::new(
            rec.clone(),
            Duration::ZERO,
            prometheus::IntCounter::new("e", "e").unwrap(),
        );
        assert_ne!(bp.epoch(), other.epoch());

        let keyed = |k: &str| NewEvent {
            idempotency_key: Some(Arc::from(k)),
            ..ev("a")
        };
        let first = bp.publish(vec![keyed("k1")]).await.unwrap();
        let again = bp.publish(vec![keyed("k1"), keyed("k2")]).await.unwrap();
        assert_eq!((first[0].offset, first[0].duplicate), (3, false));
        assert_eq!((again[0].offset, again[0].duplicate), (3, true));
        assert_eq!((again[1].offset, again[1].duplicate), (4, false));
        assert_eq!(rec.0.lock().len(), 5, "a duplicate delivers nothing");
    }
}
