//! Ordering and distribution of events between ingest and the hub.
//!
//! A [`Backplane`] gives each event its position (per-collection offset within an epoch) and
//! hands it, in order, to the [`EventSink`] of every node. The in-process [`memory`] engine
//! is the embedded default; [`nats`] shares one JetStream stream between nodes; engines plug
//! in behind the same trait without touching ingest or the hub.

mod dedupe;
pub mod memory;
pub mod nats;
pub mod redis;

pub use dedupe::Dedupe;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::event::{Apply, Event, EventKind, NewEvent};
use crate::history::HistoryLimits;
use crate::metrics::Metrics;

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
    /// The retained state of `collection` as the engine's store held it (`--state` on a
    /// shared engine): replaces this node's, before the log's events after
    /// `snapshot.offset` are handed over with [`EventSink::restore`].
    fn load_state(
        &self,
        collection: &Arc<str>,
        epoch: &Arc<str>,
        snapshot: crate::state::cluster::Snapshot,
    ) {
        let _ = (collection, epoch, snapshot);
    }
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
    /// Keys of the event's items that were stale on a retained collection (their `version`
    /// not newer than the stored one): they changed nothing and reached nobody.
    pub stale: Vec<serde_json::Value>,
}

/// Why a publish could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    /// The engine cannot take events right now (disconnected, shutting down).
    #[error("the backplane is unavailable: {0}")]
    Unavailable(String),
    /// An event is larger than the engine can carry (NATS `max_payload`): nothing of the
    /// request was published.
    #[error(
        "event {index} is {size} bytes on the wire, over the backplane's limit of {limit} bytes"
    )]
    TooLarge {
        /// Position of the event in the request (0-based).
        index: usize,
        /// Its size as the engine would send it.
        size: usize,
        /// The engine's limit.
        limit: usize,
    },
    /// Some events of a batch were accepted and some not (NATS, whose batches are one message
    /// per event): `accepted[i]` is event `i`'s position, or `None` when it was not
    /// acknowledged (refused, not sent, or its acknowledgement lost: it may still have landed).
    #[error("{} of {} events were accepted: {detail}", accepted.iter().flatten().count(), accepted.len())]
    Partial {
        /// One entry per event of the request, in order.
        accepted: Vec<Option<Accepted>>,
        /// The first failure (logged; never sent to the publisher).
        detail: String,
    },
    /// The engine's settings are unusable (bad URL); reported at startup.
    #[error("{0}")]
    Config(String),
    /// The publish would create keys beyond the retained state's capacity: nothing of the
    /// request was published and no offset was taken.
    #[error(transparent)]
    StateFull(crate::state::StateError),
}

/// What every engine is built with.
#[derive(Clone)]
pub struct EngineContext {
    /// Where ordered events go (the hub).
    pub sink: Arc<dyn EventSink>,
    /// Namespace of the cluster's keys, streams and subjects (`--key-prefix`).
    pub key_prefix: String,
    /// History to keep and to restore on start.
    pub history: HistoryLimits,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// Cancelled when the broker shuts down: background tasks stop.
    pub shutdown: CancellationToken,
    /// Backplane metrics (`tidings_backplane_*`).
    pub metrics: Arc<Metrics>,
    /// The retained state (`--state`), which a shared engine persists and restores.
    pub state: Option<Arc<crate::state::State>>,
}

impl std::fmt::Debug for EngineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineContext")
            .field("key_prefix", &self.key_prefix)
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
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

/// How an event travels through a shared engine (Redis stream entry, NATS message body):
/// JSON of what the publisher sent, without the position (the engine assigns that) or the
/// idempotency key (the engine deduplicates on it).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WireEvent {
    /// Collection name.
    #[serde(rename = "c")]
    pub collection: Arc<str>,
    /// Kind of change.
    #[serde(rename = "k")]
    pub kind: EventKind,
    /// Items (empty for key-only deletes).
    #[serde(rename = "i", default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<serde_json::Value>,
    /// Keys.
    #[serde(rename = "ks")]
    pub keys: Vec<serde_json::Value>,
    /// Previous versions of the items, when the publisher sent them.
    #[serde(rename = "b", default, skip_serializing_if = "Vec::is_empty")]
    pub before: Vec<serde_json::Value>,
    /// The publisher's version of the items, when it sent one.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// How a retained collection's fold applies it, when not as its kind says.
    #[serde(rename = "a", default, skip_serializing_if = "Apply::is_as_kind")]
    pub apply: Apply,
    /// Milliseconds since the Unix epoch when the publishing node accepted it (history age).
    #[serde(rename = "t")]
    pub accepted_ms: u64,
}

impl WireEvent {
    /// The wire form of `event`, accepted now.
    pub fn encode(event: &NewEvent) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Borrowed<'a> {
            c: &'a str,
            k: EventKind,
            #[serde(skip_serializing_if = "<[serde_json::Value]>::is_empty")]
            i: &'a [serde_json::Value],
            ks: &'a [serde_json::Value],
            #[serde(skip_serializing_if = "<[serde_json::Value]>::is_empty")]
            b: &'a [serde_json::Value],
            #[serde(skip_serializing_if = "Option::is_none")]
            v: Option<u64>,
            #[serde(skip_serializing_if = "Apply::is_as_kind")]
            a: &'a Apply,
            t: u64,
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Serializing JSON values and strings cannot fail.
        serde_json::to_vec(&Borrowed {
            c: &event.collection,
            k: event.kind,
            i: &event.items,
            ks: &event.keys,
            b: &event.before,
            v: event.version,
            a: &event.apply,
            t,
        })
        .unwrap_or_default()
    }

    /// Reads the wire form back.
    pub fn decode(bytes: &[u8]) -> Result<WireEvent, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The event at `offset` of `epoch`, received by this node now.
    pub fn into_event(self, offset: u64, epoch: Arc<str>) -> Event {
        Event {
            collection: self.collection,
            kind: self.kind,
            items: self.items,
            keys: self.keys,
            before: self.before,
            version: self.version,
            apply: self.apply,
            offset,
            epoch,
            received: std::time::Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_events_round_trip() {
        let new = NewEvent {
            collection: Arc::from("orders"),
            kind: EventKind::Delete,
            items: vec![],
            keys: vec![serde_json::json!(5), serde_json::json!("a")],
            before: Vec::new(),
            version: None,
            apply: Default::default(),
            idempotency_key: Some(Arc::from("k")),
        };
        let bytes = WireEvent::encode(&new);
        let event = WireEvent::decode(&bytes)
            .expect("decodes")
            .into_event(7, Arc::from("e"));
        assert_eq!(
            (
                &*event.collection,
                event.kind,
                event.keys.len(),
                event.offset
            ),
            ("orders", EventKind::Delete, 2, 7)
        );
        assert!(event.items.is_empty());
        assert!(!String::from_utf8_lossy(&bytes).contains("\"k\":\"k\""));
        assert!(!String::from_utf8_lossy(&bytes).contains("\"b\""));

        // An update carrying the previous versions keeps them.
        let update = NewEvent {
            kind: EventKind::Update,
            items: vec![serde_json::json!({"id": 5, "status": "paid"})],
            keys: vec![serde_json::json!(5)],
            before: vec![serde_json::json!({"id": 5, "status": "new"})],
            ..new
        };
        let event = WireEvent::decode(&WireEvent::encode(&update))
            .expect("decodes")
            .into_event(8, Arc::from("e"));
        assert_eq!(event.before, update.before);
        assert_eq!(event.items, update.items);
        assert_eq!(event.apply, Apply::AsKind);

        // A truncate keeps its meaning (and its key field) across the wire.
        let truncate = NewEvent {
            keys: Vec::new(),
            apply: Apply::Truncate {
                key_field: Arc::from("id"),
            },
            ..update
        };
        let event = WireEvent::decode(&WireEvent::encode(&truncate))
            .expect("decodes")
            .into_event(9, Arc::from("e"));
        assert_eq!(event.apply, truncate.apply);
    }
}
