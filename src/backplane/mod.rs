//! Ordering and distribution of events between ingest and the hub.
//!
//! A [`Backplane`] gives each event its position (per-collection offset within an epoch) and
//! hands it, in order, to the [`EventSink`] of every node. The in-process [`memory`] engine
//! is the embedded default; engines over Redis or NATS plug in behind the same trait without
//! touching ingest or the hub.

pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::event::{Event, NewEvent};

/// Receives ordered events (the hub). Called once per event, in offset order per collection;
/// must not block on I/O.
pub trait EventSink: Send + Sync + 'static {
    /// Delivers one event to local subscribers.
    fn deliver(&self, event: &Event);
}

impl EventSink for crate::hub::Hub {
    fn deliver(&self, event: &Event) {
        self.dispatch(event)
    }
}

/// Where an accepted event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Offset in the collection's log.
    pub offset: u64,
    /// The log's lifetime.
    pub epoch: Arc<str>,
}

/// Why a publish could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    /// The engine cannot take events right now (disconnected, shutting down).
    #[error("the backplane is unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Orders and distributes events.
pub trait Backplane: Send + Sync + 'static {
    /// Appends events (already validated) in order and returns their positions, in order.
    /// Either every event is accepted or none is.
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Position>, BackplaneError>>;

    /// Whether publishes can be accepted now (feeds `/readyz`).
    fn is_ready(&self) -> bool;

    /// The engine's name, for logs.
    fn engine(&self) -> &'static str;
}
