//! The idempotency window of a single node: keys seen recently, with the position their
//! first publish got. Engines shared between nodes keep this state in the engine instead.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Accepted;

/// Most keys remembered at once; past it the oldest are forgotten early, so memory stays
/// bounded whatever publishers send.
pub const MAX_KEYS: usize = 1_000_000;

/// Recently seen idempotency keys (scoped per collection).
#[derive(Debug)]
pub struct Dedupe {
    window: Duration,
    inner: Mutex<Inner>,
}

/// (collection, idempotency key).
type KeyId = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<KeyId, Accepted>,
    order: VecDeque<(Instant, KeyId)>,
}

impl Dedupe {
    /// A window of `window` (zero: no deduplication).
    pub fn new(window: Duration) -> Self {
        Dedupe {
            window,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The first publish's position, if `key` was seen in `collection` within the window.
    pub fn get(&self, collection: &Arc<str>, key: &Arc<str>) -> Option<Accepted> {
        let mut inner = self.inner.lock();
        self.expire(&mut inner, Instant::now());
        inner
            .seen
            .get(&(collection.clone(), key.clone()))
            .map(|a| Accepted {
                duplicate: true,
                stale: Vec::new(),
                ..a.clone()
            })
    }

    /// Remembers the position `key` got. Returns how many keys still inside the window had
    /// to be forgotten early to stay within [`MAX_KEYS`] (the caller counts them).
    pub fn insert(&self, collection: Arc<str>, key: Arc<str>, accepted: &Accepted) -> usize {
        if self.window.is_zero() {
            return 0;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock();
        self.expire(&mut inner, now);
        let mut evicted = 0;
        while inner.order.len() >= MAX_KEYS {
            if let Some((_, old)) = inner.order.pop_front() {
                inner.seen.remove(&old);
                evicted += 1;
            }
        }
        let id = (collection, key);
        inner.seen.insert(id.clone(), accepted.clone());
        inner.order.push_back((now, id));
        evicted
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _)) = inner.order.front() {
            if now.saturating_duration_since(*at) <= self.window {
                break;
            }
            if let Some((_, id)) = inner.order.pop_front() {
                inner.seen.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window_per_collection() {
        let d = Dedupe::new(Duration::from_secs(60));
        let a = Accepted {
            offset: 3,
            epoch: Arc::from("e"),
            duplicate: false,
            stale: Vec::new(),
        };
        let (c, k): (Arc<str>, Arc<str>) = (Arc::from("c"), Arc::from("k"));
        assert!(d.get(&c, &k).is_none());
        d.insert(c.clone(), k.clone(), &a);
        let got = d.get(&c, &k).unwrap();
        assert_eq!((got.offset, got.duplicate), (3, true));
        assert!(d.get(&Arc::from("other"), &k).is_none());
        let off = Dedupe::new(Duration::ZERO);
        off.insert(c.clone(), k.clone(), &a);
        assert!(off.get(&c, &k).is_none());
    }
}
