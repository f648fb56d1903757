//! The NATS JetStream backplane (`--engine nats`): several nodes share one JetStream stream,
//! which orders every event and keeps the history a node restores on start.
//!
//! This module owns the cluster's stream (its name, subjects and limits), the publish path
//! (one JetStream publish per event, answered with the stream sequence), and the one delivery
//! task per node that reads the whole stream with an ordered consumer and hands every message
//! to the [`EventSink`], in stream order.
//!
//! # Layout
//!
//! - One stream per cluster, `TIDINGS_<prefix>`, over the subjects `<prefix>.ev.>`. A
//!   collection publishes on `<prefix>.ev.<collection>`, with every `.` of the name written
//!   `~` (`~` is not allowed in collection names, so the mapping is reversible, and the name
//!   stays one subject token). The body is the shared [`WireEvent`], which names the collection
//!   too; the delivery task reads the body, not the subject.
//! - Limits: `max_messages_per_subject` = `--history-size` (a subject is a collection, so this
//!   is the per-collection history), `max_age` = the longer of `--history-age` and
//!   `--idempotency-window`, and at least a minute (JetStream requires the duplicate window
//!   to fit in `max_age`, so the stream keeps events longer rather than forgetting
//!   idempotency keys early; and it reads a `max_age` of 0 as "forever"),
//!   `duplicate_window` = `--idempotency-window`, discard old, file storage. A node restores
//!   only events younger than `--history-age`. An existing stream keeps its storage type and
//!   replica count (an operator may create it with memory storage or 3 replicas beforehand);
//!   only the limits above are brought in line, so nodes of one cluster should share them.
//!
//! # Positions
//!
//! An event's offset is its stream sequence. All collections share the sequence, so a
//! collection's offsets increase strictly but are not contiguous (the history module only
//! needs them increasing). The epoch is the stream's creation time (nanoseconds since the Unix
//! epoch, in base 36): deleting and recreating the stream changes it, so positions of the old
//! stream can never resume against the new one.
//!
//! # Publish
//!
//! The events of a request are published in order, pipelined (every message is sent, then
//! the acks are awaited in order), each with a `Nats-Msg-Id` of `<collection>/<idempotency
//! key>` when it has a key (a collection name has no `/`, so the id is unambiguous), and
//! `Nats-Expected-Stream` so a message can only land in this cluster's stream. JetStream
//! answers a duplicate within the window with the first publish's sequence and
//! `duplicate: true`. A batch is not atomic (nats-server 2.9/2.10 has no atomic batch
//! publish; 2.12's needs `allow_atomic` streams): every event's ack is awaited, and when some
//! were acknowledged and others not, the publish fails with [`BackplaneError::Partial`],
//! naming each event's position or its absence, so the HTTP answer says exactly which events
//! were accepted (and will be delivered). An event without an ack may still have landed
//! (its ack was lost): retrying it with an idempotency key answers `duplicate: true` then.
//!
//! # Delivery
//!
//! Own publishes are not delivered directly: they come back through the consumer like
//! everyone else's, so every node sees one order. On start the task reads the stream from its
//! first retained message; messages up to the last sequence at start are restored into the
//! history, later ones delivered. The ordered consumer recreates itself after gaps and
//! reconnects from the last sequence seen; the first message of every consumer incarnation is
//! checked against the stream's creation time, and the stream is checked periodically, so a
//! stream that was deleted or recreated resets the epoch instead of being read as the old one.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, Event as NatsEvent, ServerAddr};
use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use super::{Accepted, Backplane, BackplaneError, BoxFuture, EngineContext, EventSink, WireEvent};
use crate::event::NewEvent;
use crate::history::HistoryLimits;
use crate::metrics::Metrics;

/// Bound on one whole publish request (every message sent and every ack received). Acks not
/// in by then count as not acknowledged (the request may answer which events were).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time past [`PUBLISH_TIMEOUT`] before a publish is abandoned outright (a send that
/// never completes): the acks' own deadline comes first, so the answer can be exact.
const PUBLISH_GRACE: Duration = Duration::from_secs(1);
/// Bound on one JetStream API request (stream info, create, consumer create).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the delivery task checks that the stream it reads is still the cluster's stream.
/// A deleted stream is otherwise noticed only through missed consumer heartbeats (10 s).
const IDENTITY_CHECK: Duration = Duration::from_secs(5);
/// Acks awaited at once across all publishes of this node; past it publishes wait (and
/// eventually time out): the bound on the client's pending-ack queue.
const MAX_ACKS_IN_FLIGHT: usize = 10_000;
/// Shortest stream `max_age`: JetStream reads 0 as "forever", and the stream is also the
/// delivery path, so it must keep events long enough for a briefly disconnected node.
const MIN_STREAM_AGE: Duration = Duration::from_secs(60);
/// Retry delays of the delivery task after a failure (doubling up to the maximum).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Bound on closing the NATS connection on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Names derived from the key prefix.
#[derive(Debug, Clone)]
struct Names {
    /// The stream: `TIDINGS_<prefix>`.
    stream: String,
    /// `<prefix>.ev`, the root of every event subject.
    root: String,
    /// `<prefix>.ev.>`: the stream's subjects and the consumer's filter.
    filter: String,
}

impl Names {
    fn new(prefix: &str) -> Names {
        Names {
            stream: format!("TIDINGS_{prefix}"),
            root: format!("{prefix}.ev"),
            filter: format!("{prefix}.ev.>"),
        }
    }

    /// The subject of `collection`: `.` becomes `~` so the name is one token.
    fn subject(&self, collection: &str) -> String {
        format!("{}.{}", self.root, collection.replace('.', "~"))
    }
}

/// Checks `--nats-url` (one URL, or several comma-separated): the reason it is unusable.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_servers(url).map(drop)
}

/// The `Nats-Msg-Id` of an idempotency key: scoped by collection, as keys are.
fn message_id(collection: &str, key: &str) -> String {
    format!("{collection}/{key}")
}

/// The epoch of a stream created at `created_nanos`: base 36, lowercase.
fn epoch_of(created_nanos: i128) -> Arc<str> {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = created_nanos.unsigned_abs();
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    Arc::from(String::from_utf8_lossy(&out).as_ref())
}

/// Parses `--nats-url`: one URL or several, comma-separated (the servers of one cluster).
fn parse_servers(url: &str) -> Result<Vec<ServerAddr>, String> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let addr = ServerAddr::from_str(s).map_err(|e| format!("`{s}`: {e}"))?;
            match addr.scheme() {
                "nats" | "tls" => Ok(addr),
                other => Err(format!(
                    "`{s}`: the {other}:// transport is not supported; use nats:// or tls://"
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err("no server URL given".into());
    }
    Ok(servers)
}

/// The stream limits this node wants, from its history and idempotency settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_per_subject: i64,
    max_age: Duration,
    /// `None`: idempotency is off, the server's default window is left alone.
    duplicate_window: Option<Duration>,
    /// The stream's `max_bytes` (`--nats-max-bytes`); -1: no byte limit.
    max_bytes: i64,
}

impl Limits {
    fn new(history: HistoryLimits, window: Duration, max_bytes: u64) -> Limits {
        Limits {
            max_bytes: match max_bytes {
                0 => -1,
                n => i64::try_from(n).unwrap_or(i64::MAX),
            },
            // JetStream reads 0 as "unlimited"; with resume disabled one message per
            // collection is the least the stream can keep.
            max_per_subject: i64::try_from(history.max_events.max(1)).unwrap_or(i64::MAX),
            max_age: history.max_age.max(window).max(MIN_STREAM_AGE),
            duplicate_window: (!window.is_zero()).then_some(window),
        }
    }

    /// Whether `config` already has these limits.
    fn satisfied_by(&self, names: &Names, config: &stream::Config) -> bool {
        config.subjects == [names.filter.clone()]
            && config.max_messages_per_subject == self.max_per_subject
            && config.max_age == self.max_age
            && config.max_bytes == self.max_bytes
            && config.discard == DiscardPolicy::Old
            && self
                .duplicate_window
                .is_none_or(|w| config.duplicate_window == w)
    }

    /// `base` with these limits (keeping what an operator chose for the rest).
    fn apply(&self, names: &Names, mut base: stream::Config) -> stream::Config {
        base.name = names.stream.clone();
        base.subjects = vec![names.filter.clone()];
        base.max_messages_per_subject = self.max_per_subject;
        base.max_age = self.max_age;
        base.max_bytes = self.max_bytes;
        base.discard = DiscardPolicy::Old;
        if let Some(window) = self.duplicate_window {
            base.duplicate_window = window;
        }
        base
    }

    /// The configuration of a stream created by this node.
    fn new_stream(&self, names: &Names) -> stream::Config {
        self.apply(
            names,
            stream::Config {
                storage: StorageType::File,
                num_replicas: 1,
                ..Default::default()
            },
        )
    }
}

/// Why the delivery task had to start over (logged, then retried).
#[derive(Debug, thiserror::Error)]
enum SyncError {
    /// A JetStream request failed or timed out (disconnected, JetStream down).
    #[error("NATS request failed: {0}")]
    Request(String),
    /// The stream was deleted or recreated under the consumer.
    #[error("the stream was deleted or recreated")]
    StreamReplaced,
    /// The consumer's message stream failed or ended.
    #[error("consumer: {0}")]
    Consumer(String),
}

/// State shared by the publish path, the delivery task and the connection callback.
struct Shared {
    names: Names,
    limits: Limits,
    history: HistoryLimits,
    idempotency: bool,
    metrics: Arc<Metrics>,
    /// Set once the background task created the client (it connects on its own).
    nats: OnceLock<(Client, jetstream::Context)>,
    /// The epoch of the stream being read; `None` until the stream was first found.
    epoch: RwLock<Option<Arc<str>>>,
    /// The highest stream sequence known in the current epoch (from acks and delivery).
    /// Sequences of one stream only grow, so a fresh (non-duplicate) ack at or below the
    /// value read before sending comes from a recreated stream.
    high_seq: AtomicU64,
    /// Wakes the delivery task to check the stream's identity now (a publish saw a
    /// sequence that only a recreated stream can give).
    recheck: tokio::sync::Notify,
    /// The history of the current epoch has been read back.
    restored: AtomicBool,
    /// Shutdown began: refuse publishes, report not ready.
    stopped: AtomicBool,
    /// Serializes writes of the readiness gauge, so the last write reflects the last change.
    gauge: Mutex<()>,
}

impl Shared {
    fn connected(&self) -> bool {
        self.nats
            .get()
            .is_some_and(|(client, _)| client.connection_state() == State::Connected)
    }

    fn is_ready(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
            && self.restored.load(Ordering::Acquire)
            && self.connected()
    }

    /// Writes the readiness gauge; `connected` overrides the client's state when the caller
    /// knows better (a connection event arrives before the client's state changes).
    fn refresh_gauge(&self, connected: Option<bool>) {
        let _guard = self.gauge.lock();
        let ready = !self.stopped.load(Ordering::Acquire)
            && self.restored.load(Ordering::Acquire)
            && connected.unwrap_or_else(|| self.connected());
        self.metrics.backplane_ready.set(i64::from(ready));
    }

    fn set_restored(&self, restored: bool) {
        if self.restored.swap(restored, Ordering::AcqRel) != restored {
            if restored {
                tracing::info!(stream = %self.names.stream, "NATS backplane: history restored, ready");
            }
            self.refresh_gauge(None);
        }
    }
}

/// The NATS JetStream engine.
pub struct NatsBackplane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackplane")
            .field("stream", &self.shared.names.stream)
            .field("epoch", &*self.shared.epoch.read())
            .finish_non_exhaustive()
    }
}

impl NatsBackplane {
    /// Checks `url` and starts connecting in the background (never waits for the server):
    /// the engine reports ready once connected and the history is restored. Must be called
    /// within a Tokio runtime.
    pub fn new(ctx: EngineContext, url: &str) -> Result<NatsBackplane, BackplaneError> {
        Self::with_max_bytes(ctx, url, 0)
    }

    /// [`NatsBackplane::new`] with a byte limit on the stream (`--nats-max-bytes`; 0: none).
    pub fn with_max_bytes(
        ctx: EngineContext,
        url: &str,
        max_bytes: u64,
    ) -> Result<NatsBackplane, BackplaneError> {
        let servers = parse_servers(url).map_err(BackplaneError::Config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BackplaneError::Config("the NATS engine must be started within a Tokio runtime".into())
        })?;
        let names = Names::new(&ctx.key_prefix);
        let shared = Arc::new(Shared {
            limits: Limits::new(ctx.history, ctx.idempotency_window, max_bytes),
            names,
            history: ctx.history,
            idempotency: !ctx.idempotency_window.is_zero(),
            metrics: ctx.metrics.clone(),
            nats: OnceLock::new(),
            epoch: RwLock::new(None),
            high_seq: AtomicU64::new(0),
            recheck: tokio::sync::Notify::new(),
            restored: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            gauge: Mutex::new(()),
        });
        shared.refresh_gauge(Some(false));
        runtime.spawn(run(shared.clone(), servers, ctx.sink, ctx.shutdown));
        Ok(NatsBackplane { shared })
    }

    /// The epoch of the stream this node reads (`None` before it was first found).
    pub fn epoch(&self) -> Option<Arc<str>> {
        self.shared.epoch.read().clone()
    }

    async fn publish_all(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>, BackplaneError> {
        let shared = &self.shared;
        let unavailable = |m: String| BackplaneError::Unavailable(m);
        if shared.stopped.load(Ordering::Acquire) {
            return Err(unavailable("shutting down".into()));
        }
        let Some((client, js)) = shared.nats.get() else {
            return Err(unavailable("not connected to NATS yet".into()));
        };
        if client.connection_state() != State::Connected {
            return Err(unavailable("not connected to NATS".into()));
        }
        if shared.epoch.read().is_none() {
            return Err(unavailable("the NATS stream is not set up yet".into()));
        }
        // The server closes a connection that sends a message over its limit: every event is
        // checked before any is sent, so a request with one oversized event publishes nothing.
        let max_payload = client.server_info().max_payload;
        let mut messages = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let body = WireEvent::encode(event);
            let subject = shared.names.subject(&event.collection);
            let mut message = PublishMessage::build().expected_stream(&shared.names.stream);
            let mut overhead = subject.len() + shared.names.stream.len() + 64;
            if let (true, Some(key)) = (shared.idempotency, &event.idempotency_key) {
                let id = message_id(&event.collection, key);
                overhead += id.len() + 16;
                message = message.message_id(id);
            }
            if body.len() + overhead > max_payload {
                return Err(BackplaneError::TooLarge {
                    index,
                    size: body.len() + overhead,
                    limit: max_payload,
                });
            }
            messages.push((subject, message.payload(body.into())));
        }
        let high_before = shared.high_seq.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        let total = messages.len();
        let mut first_error = None;
        let mut acks = Vec::with_capacity(total);
        for (subject, message) in messages {
            match js.send_publish(subject, message).await {
                Ok(ack) => acks.push(ack),
                // Nothing after a failed send is sent, so the events after it are not in the
                // stream; the ones before it may be.
                Err(e) => {
                    first_error = Some(format!("NATS publish failed: {e}"));
                    break;
                }
            }
        }
        // Every sent event's ack, even after one failed: the answer must say which landed.
        let mut acked: Vec<Option<PublishAck>> = Vec::with_capacity(total);
        for ack in acks {
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(ack)) => acked.push(Some(ack)),
                Ok(Err(e)) => {
                    first_error
                        .get_or_insert_with(|| format!("NATS publish was not acknowledged: {e}"));
                    acked.push(None);
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| {
                        format!("NATS did not acknowledge within {PUBLISH_TIMEOUT:?}")
                    });
                    acked.push(None);
                }
            }
        }
        acked.resize(total, None);
        if let Some(detail) = &first_error {
            if acked.iter().all(Option::is_none) {
                return Err(unavailable(detail.clone()));
            }
        }
        let epoch = if acked
            .iter()
            .flatten()
            .any(|a| !a.duplicate && a.sequence <= high_before)
        {
            // The stream was recreated since this node last looked: answer with the new
            // stream's epoch, never the old one, and have the delivery task adopt it now.
            shared.recheck.notify_one();
            self.live_epoch(js).await?
        } else {
            if let Some(last) = acked.iter().flatten().map(|a| a.sequence).max() {
                shared.high_seq.fetch_max(last, Ordering::AcqRel);
            }
            shared
                .epoch
                .read()
                .clone()
                .ok_or_else(|| unavailable("the NATS stream is not set up".into()))?
        };
        let accepted = acked.into_iter().map(|ack| {
            ack.map(|ack| Accepted {
                offset: ack.sequence,
                epoch: epoch.clone(),
                duplicate: ack.duplicate,
                stale: Vec::new(),
            })
        });
        match first_error {
            None => Ok(accepted.flatten().collect()),
            Some(detail) => Err(BackplaneError::Partial {
                accepted: accepted.collect(),
                detail,
            }),
        }
    }
}

impl NatsBackplane {
    /// The epoch of the stream as it is on the server now (one stream info request).
    async fn live_epoch(&self, js: &jetstream::Context) -> Result<Arc<str>, BackplaneError> {
        let lookup = js.get_stream(&self.shared.names.stream);
        match tokio::time::timeout(REQUEST_TIMEOUT, lookup).await {
            Ok(Ok(stream)) => Ok(epoch_of(
                stream.cached_info().created.unix_timestamp_nanos(),
            )),
            Ok(Err(e)) => Err(BackplaneError::Unavailable(format!(
                "NATS stream info after a recreation: {e}"
            ))),
            Err(_) => Err(BackplaneError::Unavailable(
                "NATS stream info after a recreation timed out".into(),
            )),
        }
    }
}

impl Backplane for NatsBackplane {
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, BackplaneError>> {
        Box::pin(async move {
            tokio::time::timeout(PUBLISH_TIMEOUT + PUBLISH_GRACE, self.publish_all(events))
                .await
                .unwrap_or_else(|_| {
                    Err(BackplaneError::Unavailable(format!(
                        "NATS did not acknowledge within {PUBLISH_TIMEOUT:?}"
                    )))
                })
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    fn engine(&self) -> &'static str {
        "nats"
    }
}

/// The background task: connect, then deliver until shutdown, then close the connection.
async fn run(
    shared: Arc<Shared>,
    servers: Vec<ServerAddr>,
    sink: Arc<dyn EventSink>,
    shutdown: CancellationToken,
) {
    // Weak: the client keeps the callback, and `Shared` keeps the client.
    let weak = Arc::downgrade(&shared);
    let options = ConnectOptions::new()
        .name("tidings")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| on_connection_event(weak.clone(), event));
    // With retry_on_initial_connect this returns at once and connects in the background;
    // it fails only on settings (e.g. TLS) that can never work.
    let client = match options.connect(servers).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "NATS backplane: cannot create the NATS client");
            return;
        }
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .build(client.clone());
    let _ = shared.nats.set((client.clone(), js.clone()));

    let delivery = Delivery {
        shared: shared.clone(),
        client: client.clone(),
        js,
        sink,
        cursor: Cursor::default(),
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = delivery.run() => {}
    }
    shared.stopped.store(true, Ordering::Release);
    shared.refresh_gauge(Some(false));
    if tokio::time::timeout(DRAIN_TIMEOUT, client.drain())
        .await
        .is_err()
    {
        tracing::warn!("NATS backplane: the connection did not close in time");
    }
}

async fn on_connection_event(shared: Weak<Shared>, event: NatsEvent) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    match event {
        NatsEvent::Connected => {
            // The first connection is not a reconnect; the client counts its connects.
            let connects = shared
                .nats
                .get()
                .map_or(1, |(c, _)| c.statistics().connects.load(Ordering::Relaxed));
            if connects > 1 {
                shared.metrics.backplane_reconnects.inc();
                tracing::info!("NATS backplane: reconnected");
            } else {
                tracing::info!("NATS backplane: connected");
            }
            shared.refresh_gauge(Some(true));
        }
        NatsEvent::Disconnected => {
            tracing::warn!("NATS backplane: disconnected; publishes answer 503 until reconnected");
            shared.refresh_gauge(Some(false));
        }
        NatsEvent::Closed => shared.refresh_gauge(Some(false)),
        NatsEvent::Draining => tracing::debug!("NATS backplane: closing the connection"),
        NatsEvent::SlowConsumer(_) => {
            // The ordered consumer notices the gap and recreates itself from the last
            // sequence it delivered: nothing is lost, only re-read.
            tracing::warn!("NATS backplane: slow consumer, messages dropped by the client")
        }
        other => tracing::warn!(event = %other, "NATS backplane: connection event"),
    }
}

/// Where the delivery task is in the stream.
#[derive(Debug, Default)]
struct Cursor {
    /// Creation time of the stream being read (nanoseconds); `None` before the first sync.
    created: Option<i128>,
    epoch: Arc<str>,
    /// Last stream sequence handed to the sink (0: none).
    last_seq: u64,
    /// Messages up to this sequence predate this node: restored, not delivered.
    restore_until: u64,
}

/// The delivery task: the only caller of the sink.
struct Delivery {
    shared: Arc<Shared>,
    client: Client,
    js: jetstream::Context,
    sink: Arc<dyn EventSink>,
    cursor: Cursor,
}

impl Delivery {
    /// Reads the stream forever, starting over (with a growing delay) after every failure.
    async fn run(mut self) {
        let mut delay = RETRY_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let Err(error) = self.sync_and_consume().await;
            if started.elapsed() > RETRY_MAX {
                delay = RETRY_MIN;
            }
            if self.client.connection_state() == State::Connected {
                tracing::warn!(%error, retry_in = ?delay, "NATS backplane: delivery restarts");
            } else {
                tracing::debug!(%error, "NATS backplane: waiting for the connection");
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    async fn sync_and_consume(&mut self) -> Result<Infallible, SyncError> {
        let info = self.ensure_stream().await?;
        self.adopt(&info);
        self.consume().await
    }

    /// The cluster's stream, created or brought to this node's limits.
    async fn ensure_stream(&self) -> Result<stream::Info, SyncError> {
        let names = &self.shared.names;
        let limits = &self.shared.limits;
        let request = |e: &dyn std::fmt::Display| SyncError::Request(e.to_string());
        let info = match self.stream_info().await? {
            Some(info) => info,
            None => match self.js.create_stream(limits.new_stream(names)).await {
                Ok(stream) => {
                    tracing::info!(stream = %names.stream, "NATS backplane: created the stream");
                    stream.cached_info().clone()
                }
                // Another node may have created it first.
                Err(create) => self.stream_info().await?.ok_or_else(|| request(&create))?,
            },
        };
        if limits.satisfied_by(names, &info.config) {
            return Ok(info);
        }
        tracing::info!(stream = %names.stream, "NATS backplane: updating the stream's limits");
        self.js
            .update_stream(limits.apply(names, info.config))
            .await
            .map_err(|e| request(&e))
    }

    /// The stream's info, `None` if it does not exist.
    async fn stream_info(&self) -> Result<Option<stream::Info>, SyncError> {
        let request = self.js.get_stream(&self.shared.names.stream);
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Err(_) => Err(SyncError::Request("stream info timed out".into())),
            Ok(Ok(stream)) => Ok(Some(stream.cached_info().clone())),
            Ok(Err(e)) => match e.kind() {
                GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(SyncError::Request(e.to_string())),
            },
        }
    }

    /// Whether the stream is still the one being read: `Ok(false)` if it is gone or new.
    async fn same_stream(&self) -> Result<bool, SyncError> {
        let created = self
            .stream_info()
            .await?
            .map(|i| i.created.unix_timestamp_nanos());
        Ok(created.is_some() && created == self.cursor.created)
    }

    /// Takes `info` as the stream to read; a stream not seen before starts a new epoch.
    fn adopt(&mut self, info: &stream::Info) {
        let created = info.created.unix_timestamp_nanos();
        if self.cursor.created == Some(created) {
            return;
        }
        let first = self.cursor.created.is_none();
        let epoch = epoch_of(created);
        if !first {
            self.shared.metrics.backplane_epoch_changes.inc();
            tracing::warn!(
                stream = %self.shared.names.stream,
                old = %self.cursor.epoch,
                new = %epoch,
                "NATS backplane: the stream was recreated; history starts over in a new epoch"
            );
        }
        self.shared.set_restored(false);
        self.sink.reset(epoch.clone());
        *self.shared.epoch.write() = Some(epoch.clone());
        self.shared.high_seq.store(0, Ordering::Release);
        self.cursor = Cursor {
            created: Some(created),
            epoch,
            last_seq: 0,
            // On start, what the stream holds predates this node. A recreated stream's
            // messages are new events nobody has seen: delivered.
            restore_until: if first { info.state.last_sequence } else { 0 },
        };
        if info.state.messages == 0 || self.cursor.restore_until == 0 {
            self.shared.set_restored(true);
        }
    }

    /// Reads the stream from after the last sequence delivered; returns only on failure.
    async fn consume(&mut self) -> Result<Infallible, SyncError> {
        let deliver_policy = match self.cursor.last_seq {
            0 => DeliverPolicy::All,
            last => DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
        };
        let config = OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            filter_subject: self.shared.names.filter.clone(),
            deliver_policy,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        };
        let create = self
            .js
            .create_consumer_on_stream(config, &self.shared.names.stream);
        let consumer = tokio::time::timeout(REQUEST_TIMEOUT, create)
            .await
            .map_err(|_| SyncError::Request("consumer create timed out".into()))?
            .map_err(|e| SyncError::Request(e.to_string()))?;
        if consumer.cached_info().num_pending == 0 {
            // Everything up to the start is read (or was trimmed meanwhile).
            self.shared.set_restored(true);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| SyncError::Consumer(e.to_string()))?;
        let mut check = tokio::time::interval(IDENTITY_CHECK);
        check.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = self.shared.recheck.notified() => {
                    if let Ok(false) = self.same_stream().await {
                        return Err(SyncError::StreamReplaced);
                    }
                }
                _ = check.tick() => {
                    // Only a definite answer counts: a timeout while disconnected does not.
                    if let Ok(false) = self.same_stream().await {
                        return Err(SyncError::StreamReplaced);
                    }
                    self.shared.refresh_gauge(None);
                }
                next = messages.next() => {
                    let message = match next {
                        Some(Ok(message)) => message,
                        Some(Err(e)) => return Err(SyncError::Consumer(e.to_string())),
                        None => return Err(SyncError::Consumer("the message stream ended".into())),
                    };
                    let info = match message.info() {
                        Ok(info) => info,
                        Err(e) => {
                            tracing::warn!(error = %e, "NATS backplane: skipping a message without JetStream metadata");
                            continue;
                        }
                    };
                    let (seq, incarnation_start, pending, published) = (
                        info.stream_sequence,
                        info.consumer_sequence == 1,
                        info.pending,
                        info.published.unix_timestamp_nanos(),
                    );
                    // The consumer recreates itself after reconnects, possibly on a stream
                    // recreated meanwhile: its first message must come from our stream.
                    if incarnation_start && !self.same_stream().await? {
                        return Err(SyncError::StreamReplaced);
                    }
                    self.handle(seq, &message.payload, published);
                    if pending == 0 {
                        self.shared.set_restored(true);
                    }
                }
            }
        }
    }

    /// Hands the message at `seq` to the sink: restored if it predates this node, else
    /// delivered. Sequences already handled (a consumer restarting earlier) are skipped.
    fn handle(&mut self, seq: u64, payload: &[u8], published_nanos: i128) {
        if seq <= self.cursor.last_seq {
            return;
        }
        self.cursor.last_seq = seq;
        self.shared.high_seq.fetch_max(seq, Ordering::AcqRel);
        let wire = match WireEvent::decode(payload) {
            Ok(wire) => wire,
            Err(e) => {
                tracing::warn!(seq, error = %e, "NATS backplane: skipping a message that is not an event");
                return;
            }
        };
        let event = Arc::new(wire.into_event(seq, self.cursor.epoch.clone()));
        if seq <= self.cursor.restore_until {
            if self.young_enough(published_nanos) {
                self.sink.restore(event);
                self.shared.metrics.backplane_restored.inc();
            }
        } else {
            self.sink.deliver(event);
        }
        if seq >= self.cursor.restore_until {
            self.shared.set_restored(true);
        }
    }

    /// Whether an event stored at `published_nanos` is within `--history-age` (the stream
    /// may keep events longer, for the idempotency window).
    fn young_enough(&self, published_nanos: i128) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - published_nanos <= self.shared.history.max_age.as_nanos() as i128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_keep_collection_names_in_one_token() {
        let names = Names::new("tid_1-a");
        assert_eq!(names.stream, "TIDINGS_tid_1-a");
        assert_eq!(names.filter, "tid_1-a.ev.>");
        assert_eq!(names.subject("orders"), "tid_1-a.ev.orders");
        assert_eq!(names.subject("a.b.c"), "tid_1-a.ev.a~b~c");
        assert_eq!(message_id("a.b", "k/1"), "a.b/k/1");
    }

    #[test]
    fn epochs_are_base36_of_the_creation_time() {
        assert_eq!(&*epoch_of(0), "0");
        assert_eq!(&*epoch_of(35), "z");
        assert_eq!(&*epoch_of(36), "10");
        let e = epoch_of(1_763_726_523_123_456_789);
        assert!(e
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(e, epoch_of(1_763_726_523_123_456_790));
    }

    #[test]
    fn urls_are_checked() {
        assert!(parse_servers("nats://127.0.0.1:4222").is_ok());
        assert_eq!(
            parse_servers("nats://a:4222, tls://b:4222")
                .map(|s| s.len())
                .ok(),
            Some(2)
        );
        assert!(parse_servers("localhost").is_ok());
        assert!(parse_servers("http://127.0.0.1:4222").is_err());
        assert!(parse_servers("ws://127.0.0.1:4222").is_err());
        assert!(parse_servers("nats://[::1").is_err());
        assert!(parse_servers(" , ").is_err());
    }

    #[test]
    fn stream_limits_follow_history_and_fit_the_duplicate_window() {
        let history = |n, secs| HistoryLimits {
            max_events: n,
            max_age: Duration::from_secs(secs),
            max_bytes: usize::MAX,
        };
        let l = Limits::new(history(100, 300), Duration::from_secs(120), 0);
        assert_eq!(l.max_bytes, -1);
        assert_eq!(
            Limits::new(history(100, 300), Duration::ZERO, 1 << 20).max_bytes,
            1 << 20
        );
        assert_eq!(l.max_per_subject, 100);
        assert_eq!(l.max_age, Duration::from_secs(300));
        assert_eq!(l.duplicate_window, Some(Duration::from_secs(120)));
        // A window longer than the history: the stream keeps events for the window.
        let l = Limits::new(history(0, 90), Duration::from_secs(600), 0);
        assert_eq!(l.max_per_subject, 1);
        assert_eq!(l.max_age, Duration::from_secs(600));
        // No history, no idempotency: never 0 (JetStream's "forever").
        let l = Limits::new(history(10, 0), Duration::ZERO, 0);
        assert_eq!(l.max_age, MIN_STREAM_AGE);
        assert_eq!(l.duplicate_window, None);

        let names = Names::new("p");
        let l = Limits::new(history(100, 300), Duration::from_secs(120), 0);
        let config = l.new_stream(&names);
        assert!(l.satisfied_by(&names, &config));
        assert_eq!(config.storage, StorageType::File);
        let other = Limits::new(history(50, 300), Duration::from_secs(120), 0);
        assert!(!other.satisfied_by(&names, &config));
        let updated = other.apply(
            &names,
            stream::Config {
                num_replicas: 3,
                storage: StorageType::Memory,
                ..config
            },
        );
        assert!(other.satisfied_by(&names, &updated));
        assert_eq!(
            (updated.num_replicas, updated.storage),
            (3, StorageType::Memory)
        );
    }
}
