//! Prometheus metrics over an owned registry, created once in [`crate::app`] and passed to
//! every component; never a global. Label sets are bounded: `collection` labels are capped
//! (see [`CollectionLabels`]), other labels take values from fixed lists, and every fixed
//! label value is created at zero on start, so `rate()` and alerts see a series from the first
//! scrape.
//!
//! A *slow consumer* is a connection whose outbox overflowed or one of whose writes outlasted
//! `--write-timeout`. It is counted as `reason="slow_consumer"` (and in
//! `tidings_slow_consumer_closes_total`) whatever ends the connection afterwards.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::auth::{AuthError, JwtError};
use crate::protocol::ErrorCode;

/// Why a connection closed (the `reason` label of `tidings_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or the socket dropped.
    Client,
    /// No message during a heartbeat period after a ping.
    HeartbeatTimeout,
    /// Authentication failed or did not happen in time.
    AuthFailed,
    /// The token expired and was not renewed in time.
    AuthTimeout,
    /// A slow consumer: the outbox overflowed or a write outlasted the write timeout
    /// (whatever ended the connection afterwards).
    SlowConsumer,
    /// The server is shutting down.
    Shutdown,
    /// An inbound frame was over the size limit.
    FrameTooBig,
    /// An inbound text frame was not UTF-8.
    InvalidPayload,
    /// A socket error.
    Error,
}

impl CloseReason {
    /// Every reason, for label initialization.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Client,
        CloseReason::HeartbeatTimeout,
        CloseReason::AuthFailed,
        CloseReason::AuthTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Shutdown,
        CloseReason::FrameTooBig,
        CloseReason::InvalidPayload,
        CloseReason::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::AuthTimeout => "auth_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
            CloseReason::FrameTooBig => "frame_too_big",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::Error => "error",
        }
    }
}

/// The `reason` labels of `tidings_server_errors_total`, pre-registered at zero; the HTTP
/// edge's `ServerErrorReason` names the same ones (a test there checks it).
pub const SERVER_ERROR_REASONS: [&str; 4] =
    ["shutting_down", "backplane", "connection_limit", "internal"];

/// Every `reason` of `tidings_auth_rejections_total`.
pub const AUTH_REJECTION_REASONS: [&str; 11] = [
    "unknown_token",
    "jwt_not_configured",
    "malformed",
    "algorithm",
    "no_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "claims",
];

fn auth_rejection_reason(error: &AuthError) -> &'static str {
    match error {
        AuthError::UnknownToken => "unknown_token",
        AuthError::JwtNotConfigured => "jwt_not_configured",
        AuthError::Jwt(e) => match e {
            JwtError::Malformed(_) => "malformed",
            JwtError::AlgorithmNotAllowed(_) => "algorithm",
            JwtError::NoKey { .. } => "no_key",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongIssuer => "issuer",
            JwtError::WrongAudience => "audience",
            JwtError::InvalidClaims(_) => "claims",
        },
    }
}

/// Every `status` of `tidings_publish_requests_total` created at zero: the answers a publish
/// gives in normal operation and under the common mistakes.
const PUBLISH_STATUSES: [&str; 10] = [
    "202", "400", "401", "404", "413", "415", "422", "500", "503", "507",
];

/// Every `format` of `tidings_publish_requests_total`: which front-end read the request
/// (`json` is `/v1/publish` and `/v1/collections/…`).
pub const PUBLISH_FORMATS: [&str; 3] = ["json", "cloudevents", "debezium"];

/// The `outcome` labels of `tidings_reconcile_items_total`.
pub const RECONCILE_OUTCOMES: [&str; 4] = ["created", "updated", "deleted", "unchanged"];

/// The process collector of the `prometheus` crate, with `process_cpu_seconds_total` at the
/// kernel's resolution (clock ticks, usually 10 ms) instead of whole seconds, which drew a
/// broker using 2 % of a core as a 0/1 s sawtooth.
#[cfg(target_os = "linux")]
struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: Counter,
}

#[cfg(target_os = "linux")]
impl ProcessMetrics {
    const CPU: &'static str = "process_cpu_seconds_total";

    fn new() -> Result<Self, prometheus::Error> {
        Ok(ProcessMetrics {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            cpu: Counter::new(
                Self::CPU,
                "Total user and system CPU time spent in seconds.",
            )?,
        })
    }
}

/// User plus system CPU seconds of this process, from `/proc/self/stat` (fields 14 and 15,
/// counted after the parenthesised command name, which may itself hold spaces).
#[cfg(target_os = "linux")]
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / procfs::ticks_per_second() as f64)
}

#[cfg(target_os = "linux")]
impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families: Vec<MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != Self::CPU)
            .collect();
        if let Some(now) = process_cpu_seconds() {
            // Two scrapes at once may both add: the counter only ever moves forward.
            let delta = now - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            families.extend(self.cpu.collect());
        }
        families
    }
}

/// Maps collection names to label values, giving the first `max` distinct collections their
/// own label and reporting the rest as `_other`, so a client cannot grow the series set.
/// A collection's label never changes once assigned.
#[derive(Debug)]
pub struct CollectionLabels {
    max: usize,
    seen: Mutex<HashSet<Arc<str>>>,
}

impl CollectionLabels {
    /// Label value for collections past the cap.
    pub const OTHER: &'static str = "_other";

    fn new(max: usize) -> Self {
        CollectionLabels {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label for `collection`.
    pub fn label(&self, collection: &Arc<str>) -> Arc<str> {
        let mut seen = self.seen.lock();
        if let Some(existing) = seen.get(collection) {
            return existing.clone();
        }
        if seen.len() < self.max {
            seen.insert(collection.clone());
            return collection.clone();
        }
        Arc::from(Self::OTHER)
    }
}

/// Every metric Tidings exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Collection label capping.
    pub collections: CollectionLabels,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Connections accepted.
    pub connections_opened: IntCounter,
    /// Connections closed, by reason.
    pub connections_closed: IntCounterVec,
    /// Upgrades refused, by reason (`limit`, `unauthorized`).
    pub connections_refused: IntCounterVec,
    /// Live subscriptions, by collection.
    pub subscriptions: IntGaugeVec,
    /// Published events, by collection and event.
    pub published_events: IntCounterVec,
    /// Published items (keys for key-only deletes), by collection and event.
    pub published_items: IntCounterVec,
    /// Publish requests, by body format (`PUBLISH_FORMATS`) and HTTP status.
    pub publish_requests: IntCounterVec,
    /// Publish requests that passed authentication, by the publish key's name (`_loopback`:
    /// trusted loopback publisher without a key; `_open`: no key configured).
    pub publish_requests_by_key: IntCounterVec,
    /// Subscriber credentials refused, by why (the client only sees AUTH_FAILED / 401).
    pub auth_rejections: IntCounterVec,
    /// `--jwks-url` fetches, by outcome (`jwks::FETCH_OUTCOMES`).
    pub jwks_fetches: IntCounterVec,
    /// Keys in the current `--jwks-url` set.
    pub jwks_keys: IntGauge,
    /// Frames written to sockets.
    pub deliveries: IntCounter,
    /// Bytes of frames written to sockets.
    pub delivered_bytes: IntCounter,
    /// Frames dropped because an outbox was full or closing.
    pub outbox_dropped: IntCounter,
    /// Connections closed as slow consumers (see the module doc).
    pub slow_consumer_closes: IntCounter,
    /// Always 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// The configured limits, by `limit` (the flag's name with `_`).
    pub limits: IntGaugeVec,
    /// Approximate bytes held by the resume history (all collections).
    pub history_bytes: IntGauge,
    /// Events held by the resume history (all collections).
    pub history_events: IntGauge,
    /// Frames replayed to resuming subscriptions.
    pub replayed_frames: IntCounter,
    /// Resumes, by outcome (`recovered`, `lost`).
    pub resumes: IntCounterVec,
    /// Published events that were duplicates of an idempotency key seen in the window.
    pub publish_duplicates: IntCounter,
    /// Debezium tombstones (`null` values after a delete) received and skipped.
    pub debezium_tombstones: IntCounter,
    /// Idempotency keys forgotten before their window ended, to bound memory (memory engine).
    pub idempotency_evictions: IntCounter,
    /// 1 while the backplane can take publishes and delivers live events, else 0.
    pub backplane_ready: IntGauge,
    /// Times the backplane connection was lost and re-established.
    pub backplane_reconnects: IntCounter,
    /// Times the engine's log was found to have lost its history (new epoch).
    pub backplane_epoch_changes: IntCounter,
    /// Events read from the engine's log into the history on start, not delivered live.
    pub backplane_restored: IntCounter,
    /// Protocol errors sent, by code.
    pub protocol_errors: IntCounterVec,
    /// HTTP 5xx answers, by reason (`http::ServerErrorReason`).
    pub server_errors: IntCounterVec,
    /// Frames queued per event.
    pub fanout_size: Histogram,
    /// Frames written per write of a connection's outbox (one wake-up, one flush).
    pub frames_per_write: Histogram,
    /// Time to match, encode and queue one event.
    pub match_duration: Histogram,
    /// From publish accepted to the frames being queued.
    pub ingest_to_outbox: Histogram,
    /// From a frame being queued to it being written to the socket.
    pub outbox_to_socket: Histogram,
    /// From publish accepted to the frame being written to the socket.
    pub delivery_latency: Histogram,
    /// Items held by the retained state, by collection.
    pub state_items: IntGaugeVec,
    /// Approximate bytes held by the retained state (compact JSON + keys), by collection.
    pub state_bytes: IntGaugeVec,
    /// Publishes refused because the retained state is full, by collection and reason
    /// (`max_items`, `max_bytes`).
    pub state_rejections: IntCounterVec,
    /// Reconcile requests (`PUT …/items`), by HTTP status.
    pub reconcile_requests: IntCounterVec,
    /// Time to answer one reconcile (read and compare the set, publish the differences).
    pub reconcile_duration: Histogram,
    /// Items of accepted-for-publishing reconciles, by outcome (`created`, `updated`,
    /// `deleted`, `unchanged`).
    pub reconcile_items: IntCounterVec,
    /// Time to build one retained `init` snapshot.
    pub state_init_duration: Histogram,
    /// Time to answer one `items` read from the retained state (socket or HTTP).
    pub state_read_duration: Histogram,
    /// Flushes of the retained state to a shared engine, by outcome (`written`, `refused`:
    /// a newer one was stored, `stale`: of an older epoch, `failed`).
    pub state_flushes: IntCounterVec,
    /// Restores of the retained state from a shared engine on start or after an epoch
    /// change, by outcome (`loaded`, `built`: this node's state became a new epoch's base,
    /// `stale`: the snapshot was older than the log holds, `waiting`: not ready, retried).
    pub state_restores: IntCounterVec,
    /// Items that entered or left a subscription group's view on a retained collection, by
    /// collection and cause (`enter`, `leave`); identical subscriptions count once.
    pub transitions: IntCounterVec,
    /// Time to write one `--state-dir` snapshot (cut, encode, fsync, rename).
    pub state_snapshot_duration: Histogram,
    /// Size of the last `--state-dir` snapshot written.
    pub state_snapshot_bytes: IntGauge,
    /// Unix time of the last `--state-dir` snapshot written (0: none yet).
    pub state_snapshot_last_success: IntGauge,
    /// `--state-dir` snapshots that failed to be written.
    pub state_snapshot_failures: IntCounter,
    /// Changes folded into a pending slot of a conflating subscription (merged with it or
    /// cancelling it) instead of being sent on their own, by collection.
    pub conflated: IntCounterVec,
    /// Conflating subscriptions that passed `--conflation-max-keys` and got a fresh `init`.
    pub conflation_resets: IntCounter,
    /// `max_rate` keys written whose cooldown was not kept (a connection remembers at most
    /// `--conflation-max-keys`), so their next change is not held back to the rate.
    pub conflation_rate_unheld: IntCounter,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5,
    ]
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new(max_collection_labels: usize) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let connections = IntGauge::new("tidings_connections", "Open WebSocket connections.")?;
        registry.register(Box::new(connections.clone()))?;
        let subscriptions = IntGaugeVec::new(
            Opts::new(
                "tidings_subscriptions",
                "Live subscriptions, by collection (capped; the rest as _other).",
            ),
            &["collection"],
        )?;
        registry.register(Box::new(subscriptions.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(ProcessMetrics::new()?))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };

        let metrics = Metrics {
            collections: CollectionLabels::new(max_collection_labels),
            connections,
            connections_opened: counter("tidings_connections_opened_total", "WebSocket connections accepted.")?,
            connections_closed: counter_vec(
                "tidings_connections_closed_total",
                "WebSocket connections closed, by reason.",
                &["reason"],
            )?,
            connections_refused: counter_vec(
                "tidings_connections_refused_total",
                "WebSocket upgrades refused, by reason.",
                &["reason"],
            )?,
            subscriptions,
            publish_requests_by_key: counter_vec(
                "tidings_publish_requests_by_key_total",
                "Publish requests that passed authentication, by publish key name.",
                &["key"],
            )?,
            auth_rejections: counter_vec(
                "tidings_auth_rejections_total",
                "Subscriber tokens refused, by reason.",
                &["reason"],
            )?,
            jwks_fetches: counter_vec(
                "tidings_jwks_fetches_total",
                "Fetches of --jwks-url, by outcome (ok, unreachable, http_status, invalid; rate_limited: an unknown-kid refresh not made because the last fetch was too recent).",
                &["outcome"],
            )?,
            jwks_keys: gauge(
                "tidings_jwks_keys",
                "Keys in the current --jwks-url set (the last good one; 0 until a fetch succeeds).",
            )?,
            published_events: counter_vec(
                "tidings_published_events_total",
                "Events accepted for publishing, by collection and event.",
                &["collection", "event"],
            )?,
            published_items: counter_vec(
                "tidings_published_items_total",
                "Items (or keys of key-only deletes) accepted for publishing, by collection and event.",
                &["collection", "event"],
            )?,
            publish_requests: counter_vec(
                "tidings_publish_requests_total",
                "Publish HTTP requests, by body format and response status.",
                &["format", "status"],
            )?,
            deliveries: counter("tidings_deliveries_total", "Live event frames written to WebSocket connections (not init or replayed frames).")?,
            delivered_bytes: counter("tidings_delivered_bytes_total", "Bytes of live event frames written to WebSocket connections.")?,
            outbox_dropped: counter(
                "tidings_outbox_dropped_total",
                "Frames dropped because a connection's outbox was full or closing.",
            )?,
            slow_consumer_closes: counter(
                "tidings_slow_consumer_closes_total",
                "Connections closed as slow consumers: the outbox overflowed or a write outlasted --write-timeout, whatever ended the connection afterwards.",
            )?,
            build_info: gauge_vec(
                "tidings_build_info",
                "Always 1; the version label is the running broker's version.",
                &["version"],
            )?,
            limits: gauge_vec(
                "tidings_config_limit",
                "Configured limits, by flag name (max_connections, outbox_bytes, history_bytes, ...); 0 where the flag means no limit.",
                &["limit"],
            )?,
            history_bytes: gauge(
                "tidings_history_bytes",
                "Approximate bytes held by the resume history of all collections (bounded by --history-bytes).",
            )?,
            history_events: gauge(
                "tidings_history_events",
                "Events held by the resume history of all collections.",
            )?,
            replayed_frames: counter(
                "tidings_replayed_frames_total",
                "Frames replayed to subscriptions resuming with `since`.",
            )?,
            resumes: counter_vec(
                "tidings_resumes_total",
                "Subscriptions that asked to resume, by outcome (recovered, lost).",
                &["outcome"],
            )?,
            backplane_ready: {
                let g = IntGauge::new(
                    "tidings_backplane_ready",
                    "1 while the backplane accepts publishes and delivers live events, else 0.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            backplane_reconnects: counter(
                "tidings_backplane_reconnects_total",
                "Times the backplane connection was lost and re-established.",
            )?,
            backplane_epoch_changes: counter(
                "tidings_backplane_epoch_changes_total",
                "Times the engine's log had lost its history (a new epoch began).",
            )?,
            backplane_restored: counter(
                "tidings_backplane_restored_events_total",
                "Events read back from the engine's log into the history on start.",
            )?,
            idempotency_evictions: counter(
                "tidings_idempotency_evictions_total",
                "Idempotency keys forgotten before their window ended, to keep at most 1,000,000 (memory engine).",
            )?,
            publish_duplicates: counter(
                "tidings_publish_duplicates_total",
                "Published events skipped because their idempotency key was seen within the window.",
            )?,
            debezium_tombstones: counter(
                "tidings_debezium_tombstones_total",
                "Debezium tombstones (null values that follow a delete) received on /v1/debezium and skipped.",
            )?,
            protocol_errors: counter_vec(
                "tidings_protocol_errors_total",
                "Protocol error frames sent to clients, by code.",
                &["code"],
            )?,
            server_errors: counter_vec(
                "tidings_server_errors_total",
                "HTTP 5xx answers, by reason (shutting_down, backplane, connection_limit, internal); the detail is in the log.",
                &["reason"],
            )?,
            fanout_size: histogram(
                "tidings_fanout_frames",
                "Frames queued for one published event.",
                prometheus::exponential_buckets(1.0, 4.0, 10)?,
            )?,
            frames_per_write: histogram(
                "tidings_frames_per_write",
                "Frames written to a connection in one write of its outbox (one wake-up, one flush).",
                prometheus::exponential_buckets(1.0, 2.0, 11)?,
            )?,
            match_duration: histogram(
                "tidings_match_duration_seconds",
                "Time to match, encode and queue one event.",
                latency_buckets(),
            )?,
            ingest_to_outbox: histogram(
                "tidings_ingest_to_outbox_seconds",
                "Time from a publish being accepted to its frames being queued.",
                latency_buckets(),
            )?,
            outbox_to_socket: histogram(
                "tidings_outbox_to_socket_seconds",
                "Time from a frame being queued in a connection's outbox to it being written to the socket.",
                latency_buckets(),
            )?,
            delivery_latency: histogram(
                "tidings_delivery_latency_seconds",
                "Time from a publish being accepted to its frame being written to a socket.",
                latency_buckets(),
            )?,
            state_items: gauge_vec(
                "tidings_state_items",
                "Items held by the retained state, by collection (capped; the rest as _other).",
                &["collection"],
            )?,
            state_bytes: gauge_vec(
                "tidings_state_bytes",
                "Approximate bytes held by the retained state (compact JSON and keys), by collection.",
                &["collection"],
            )?,
            state_rejections: counter_vec(
                "tidings_state_rejections_total",
                "Publishes refused with 507 STATE_FULL, by collection and reason (max_items, max_bytes).",
                &["collection", "reason"],
            )?,
            reconcile_requests: counter_vec(
                "tidings_reconcile_requests_total",
                "Reconcile requests (PUT /v1/collections/{collection}/items), by HTTP status.",
                &["status"],
            )?,
            reconcile_duration: histogram(
                "tidings_reconcile_duration_seconds",
                "Time to answer one reconcile: stream and compare the set, publish the differences.",
                vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            )?,
            reconcile_items: counter_vec(
                "tidings_reconcile_items_total",
                "Items of reconciles that reached the publish, by outcome (created, updated, deleted, unchanged).",
                &["outcome"],
            )?,
            state_init_duration: histogram(
                "tidings_state_init_duration_seconds",
                "Time to build one retained init snapshot (match, sort, slice, project, encode).",
                latency_buckets(),
            )?,
            state_read_duration: histogram(
                "tidings_state_read_duration_seconds",
                "Time to answer one items read from the retained state, over the socket or HTTP (match, count, sort, slice, project, encode).",
                latency_buckets(),
            )?,
            state_flushes: counter_vec(
                "tidings_state_flushes_total",
                "Flushes of the retained state to the shared engine (redis, nats), by outcome (written, refused, stale, failed).",
                &["outcome"],
            )?,
            state_restores: counter_vec(
                "tidings_state_restores_total",
                "Restores of the retained state from the shared engine, by outcome (loaded, built, stale, waiting).",
                &["outcome"],
            )?,
            transitions: counter_vec(
                "tidings_transitions_total",
                "Items that entered or left a subscription group's view (identical subscriptions count once), by collection and cause (enter, leave).",
                &["collection", "cause"],
            )?,
            state_snapshot_duration: histogram(
                "tidings_state_snapshot_duration_seconds",
                "Time to write one --state-dir snapshot of the retained state (cut, encode, fsync, rename).",
                vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            )?,
            state_snapshot_bytes: gauge(
                "tidings_state_snapshot_bytes",
                "Size in bytes of the last --state-dir snapshot written.",
            )?,
            state_snapshot_last_success: gauge(
                "tidings_state_snapshot_last_success_timestamp_seconds",
                "Unix time of the last --state-dir snapshot written (0: none yet).",
            )?,
            state_snapshot_failures: counter(
                "tidings_state_snapshot_failures_total",
                "--state-dir snapshots that could not be written (the previous one stays in place).",
            )?,
            conflated: counter_vec(
                "tidings_conflated_total",
                "Changes folded into a pending change of the same item for a conflating subscription (--slow-consumer-policy conflate) instead of being sent on their own, by collection.",
                &["collection"],
            )?,
            conflation_resets: counter(
                "tidings_conflation_resets_total",
                "Conflating subscriptions whose pending changes passed --conflation-max-keys and that got a fresh init from the retained state instead (recovered: false).",
            )?,
            conflation_rate_unheld: counter(
                "tidings_conflation_rate_unheld_total",
                "Keys of max_rate subscriptions written while their connection already remembered --conflation-max-keys cooldowns: their next change is not held back to the rate.",
            )?,
            registry,
        };
        // Pre-create the fixed label values so every series exists from the first scrape.
        for reason in CloseReason::ALL {
            metrics
                .connections_closed
                .with_label_values(&[reason.as_str()]);
        }
        for outcome in ["written", "refused", "stale", "failed"] {
            metrics.state_flushes.with_label_values(&[outcome]);
        }
        for outcome in ["loaded", "built", "stale", "waiting"] {
            metrics.state_restores.with_label_values(&[outcome]);
        }
        for reason in ["limit", "per_ip_limit", "unauthorized"] {
            metrics.connections_refused.with_label_values(&[reason]);
        }
        for code in ErrorCode::ALL {
            metrics.protocol_errors.with_label_values(&[code.as_str()]);
        }
        for reason in SERVER_ERROR_REASONS {
            metrics.server_errors.with_label_values(&[reason]);
        }
        for reason in AUTH_REJECTION_REASONS {
            metrics.auth_rejections.with_label_values(&[reason]);
        }
        for outcome in crate::auth::jwks::FETCH_OUTCOMES {
            metrics.jwks_fetches.with_label_values(&[outcome]);
        }
        for outcome in ["recovered", "lost"] {
            metrics.resumes.with_label_values(&[outcome]);
        }
        for outcome in RECONCILE_OUTCOMES {
            metrics.reconcile_items.with_label_values(&[outcome]);
        }
        for status in ["200", "413", "422", "507"] {
            metrics.reconcile_requests.with_label_values(&[status]);
        }
        for format in PUBLISH_FORMATS {
            for status in PUBLISH_STATUSES {
                metrics
                    .publish_requests
                    .with_label_values(&[format, status]);
            }
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(metrics)
    }

    /// Exports the configured limits, and creates the per-key publish series at zero.
    pub fn describe_config(&self, limits: &[(&'static str, u64)], publish_key_names: &[&str]) {
        for (name, value) in limits {
            let value = i64::try_from(*value).unwrap_or(i64::MAX);
            self.limits.with_label_values(&[name]).set(value);
        }
        for key in publish_key_names {
            self.publish_requests_by_key.with_label_values(&[key]);
        }
    }

    /// Counts a refused subscriber credential.
    pub fn auth_rejected(&self, error: &AuthError) {
        self.auth_rejections
            .with_label_values(&[auth_rejection_reason(error)])
            .inc();
    }

    /// Counts a protocol error frame.
    pub fn protocol_error(&self, code: ErrorCode) {
        self.protocol_errors
            .with_label_values(&[code.as_str()])
            .inc();
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self, reason: CloseReason) {
        self.connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
        if reason == CloseReason::SlowConsumer {
            self.slow_consumer_closes.inc();
        }
    }

    /// Published events, every collection and kind (the admin endpoint's total).
    pub fn published_events_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.published_events
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().value() as u64)
            .sum()
    }

    /// Counts one reconcile answered with `status` in `seconds`.
    pub fn observe_reconcile(&self, status: &str, seconds: f64) {
        self.reconcile_requests.with_label_values(&[status]).inc();
        self.reconcile_duration.observe(seconds);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_labels_are_capped_and_stable() {
        let labels = CollectionLabels::new(2);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let c: Arc<str> = Arc::from("c");
        assert_eq!(&*labels.label(&a), "a");
        assert_eq!(&*labels.label(&b), "b");
        assert_eq!(&*labels.label(&c), "_other");
        assert_eq!(&*labels.label(&a), "a");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn process_cpu_has_sub_second_resolution() {
        // Burn a little CPU: the reading moves by less than a second, and is not rounded.
        let before = process_cpu_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = process_cpu_seconds().unwrap();
        assert!(after > before, "{before} -> {after}");
        let m = Metrics::new(10).unwrap();
        let text = m.render().unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("process_cpu_seconds_total "))
            .unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value >= after, "{value} < {after}");
        assert_eq!(text.matches("# TYPE process_cpu_seconds_total").count(), 1);
    }

    #[test]
    fn build_info_limits_and_zero_series() {
        let m = Metrics::new(10).unwrap();
        let config = crate::config::Config::default();
        m.describe_config(&config.limit_gauges(), &[]);
        let text = m.render().unwrap();
        for line in [
            format!(
                "tidings_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "tidings_config_limit{limit=\"max_connections\"} 10000".into(),
            "tidings_config_limit{limit=\"history_bytes\"} 67108864".into(),
            "tidings_resumes_total{outcome=\"lost\"} 0".into(),
            "tidings_publish_requests_total{format=\"json\",status=\"202\"} 0".into(),
            "tidings_publish_requests_total{format=\"cloudevents\",status=\"422\"} 0".into(),
            "tidings_history_bytes 0".into(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn renders_every_family() {
        let m = Metrics::new(10).unwrap();
        m.deliveries.inc();
        m.fanout_size.observe(3.0);
        m.frames_per_write.observe(2.0);
        let text = m.render().unwrap();
        for name in [
            "tidings_connections ",
            "tidings_deliveries_total 1",
            "tidings_connections_closed_total{reason=\"slow_consumer\"} 0",
            "tidings_protocol_errors_total{code=\"INVALID_PAYLOAD\"} 0",
            "tidings_fanout_frames_bucket",
            "tidings_frames_per_write_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
