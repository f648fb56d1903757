//! The in-process backplane: per-collection offsets under a lock, delivered synchronously to
//! the local hub. One node only; nothing to run beside it.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;
use rand::distr::{Alphanumeric, SampleString};

use super::{Backplane, BackplaneError, BoxFuture, EventSink, Position};
use crate::event::{Event, NewEvent};

/// Offsets per collection and a random epoch per process lifetime.
pub struct MemoryBackplane {
    sink: Arc<dyn EventSink>,
    /// Changes on every start: offsets from an earlier process mean nothing now.
    epoch: Arc<str>,
    /// Last offset per collection. Held while the event is dispatched, so events of one
    /// collection reach the hub one at a time, in offset order.
    logs: DashMap<Arc<str>, Arc<Mutex<u64>>>,
}

impl std::fmt::Debug for MemoryBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackplane")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl MemoryBackplane {
    /// A backplane delivering to `sink`.
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        let epoch = Alphanumeric
            .sample_string(&mut rand::rng(), 12)
            .to_lowercase();
        MemoryBackplane {
            sink,
            epoch: Arc::from(epoch),
            logs: DashMap::new(),
        }
    }

    /// This process's epoch.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    fn append(&self, new: NewEvent, received: Instant) -> Position {
        let log = self
            .logs
            .entry(new.collection.clone())
            .or_default()
            .value()
            .clone();
        let mut last = log.lock();
        *last += 1;
        let event = Event {
            collection: new.collection,
            kind: new.kind,
            items: new.items,
            keys: new.keys,
            offset: *last,
            epoch: self.epoch.clone(),
            received,
        };
        self.sink.deliver(&event);
        Position {
            offset: event.offset,
            epoch: event.epoch,
        }
    }
}

impl Backplane for MemoryBackplane {
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Position>, BackplaneError>> {
        let received = Instant::now();
        let positions = events
            .into_iter()
            .map(|e| self.append(e, received))
            .collect();
        Box::pin(std::future::ready(Ok(positions)))
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
    use crate::event::EventKind;

    struct Recorder(Mutex<Vec<(String, u64)>>);
    impl EventSink for Recorder {
        fn deliver(&self, event: &Event) {
            self.0
                .lock()
                .push((event.collection.to_string(), event.offset));
        }
    }

    fn ev(c: &str) -> NewEvent {
        NewEvent {
            collection: Arc::from(c),
            kind: EventKind::Create,
            items: vec![],
            keys: vec![],
        }
    }

    #[tokio::test]
    async fn offsets_are_per_collection_and_monotonic() {
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let bp = MemoryBackplane::new(rec.clone());
        let pos = bp.publish(vec![ev("a"), ev("b"), ev("a")]).await.unwrap();
        assert_eq!(pos.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 1, 2]);
        assert_eq!(
            *rec.0.lock(),
            [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]
        );
        let other = MemoryBackplane::new(rec);
        assert_ne!(bp.epoch(), other.epoch());
    }
}
