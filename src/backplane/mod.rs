//! Ordering and distribution of events between ingest and the hub.
//!
//! A [`Backplane`] gives each event its position (per-collection offset within an epoch) and
//! hands it, in order, to the [`EventSink`] of every node. The in-process [`memory`] engine
//! is the embedded default; engines over Redis or NATS plug in behind the same trait without
//! touching ingest or the hub.

mod dedupe;
pub mod memory;

pub use dedupe::Dedupe;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::event::{Event, NewEvent};

/// Receives ordered events (the hub). Called once per event, in offset order per collection;
/// never blocks on I/O.
pub trait EventSink: Send + Sync + 'static {
    /// A new event: record it in the history and deliver it to local subscribers.
    fn deliver(&self, event: Arc<Event>);
    /// An event from before this node started, read back from the engine's log on start:
    /// record it in the history only.
    fn restore(&self, event: Arc<Event>);
    /// The log's lifetime is `epoch`. Called once on start, and again whenever the engine
    /// lost its history (so old positions cannot resume against the new log).
    fn reset(&self, epoch: Arc<str>);
}

/// Where an accepted event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Offset in the collection's log.
    pub offset: u64,
    /// The log's lifetime.
    pub epoch: Arc<str>,
    /// The idempotency key was seen within the window: this is the first publish's position
    /// and nothing new was delivered.
    pub duplicate: bool,
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
    /// Either every event is accepted or none is (see each engine for what a failure midway
    /// means; retrying with idempotency keys is always safe).
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, BackplaneError>>;

    /// Whether publishes can be accepted now (feeds `/readyz`).
    fn is_ready(&self) -> bool;

    /// The engine's name, for logs.
    fn engine(&self) -> &'static str;
}
