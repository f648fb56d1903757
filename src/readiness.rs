//! Readiness: a latch that starts open and closes once, when shutdown begins. Both edges read
//! it (`/readyz`, publishes, upgrades refuse with 503 once it is closed); only the
//! composition root closes it. It knows nothing of the backplane: `/readyz` also asks the
//! engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Open (ready) until [`Readiness::close`]; clones share the latch.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(AtomicBool::new(true)))
    }
}

impl Readiness {
    /// An open latch.
    pub fn new() -> Self {
        Self::default()
    }

    /// True until the latch is closed.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Closes the latch for good (there is no way back to ready).
    pub fn close(&self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_once_for_every_clone() {
        let a = Readiness::new();
        let b = a.clone();
        assert!(a.is_ready() && b.is_ready());
        b.close();
        assert!(!a.is_ready());
        b.close();
        assert!(!b.is_ready());
    }
}
