//! The Redis engine (`--engine redis`): several nodes share one log in Redis, so every node
//! delivers every event exactly once, in one order, and any node can resume any client.
//!
//! This module owns the engine's connections, its agreement on the epoch, the restore of
//! history on start and the live read that feeds the hub. Layout of the keys: [`keys`].
//!
//! - **Offsets are stream ids.** Each collection is one Redis Stream whose entry ids are
//!   `<offset>-0`, so a node's read position in a stream *is* the last offset it delivered,
//!   and resuming a read after a dropped connection is `XREAD` from that offset.
//! - **Publish** is one Lua script per request ([`script`]): all events of the request are
//!   appended or none is. The node answers with the offsets the script took; it does not
//!   deliver its own events directly. They come back through the same read as everybody
//!   else's, so all nodes deliver one order.
//! - **Delivery** is one task per node: `XREAD BLOCK` over the collections stream and every
//!   collection's log, each from the last id seen, then the entries to the sink in stream
//!   order. That task is the only caller of the sink, so order per collection holds.
//! - **Restore.** A node starting reads, per announced collection, the newest events within
//!   the history limits (`--history-size`, `--history-age` by the events' `t`) into the
//!   history, and always the newest one, so it knows where each log ends. It is ready only
//!   after that, and reads live from there.
//! - **Epoch.** On connect a node proposes a random epoch with `SET NX` and adopts whatever
//!   is there. A Redis that lost its data (restart without persistence, flush) has no epoch:
//!   the first node back sets a new one, and every node, seeing it differ from its own,
//!   resets its history and reads every log from 0 (the new log holds only new events, which
//!   its subscribers have not seen). A Redis restored to an older snapshot keeps its epoch but
//!   its offsets went back: a node that had delivered further replaces the log and the epoch
//!   ([`script::RENEW_LUA`]), so no offset is ever given to two events under one epoch.
//! - **Connections.** One multiplexed connection for publishes, one dedicated to the blocking
//!   read. Any failure of either drops both; the supervisor reconnects with exponential
//!   backoff (100 ms doubling to 5 s) and the read continues from its last ids, so nothing is
//!   lost. While disconnected the engine is not ready and publishes fail fast.

mod keys;
mod reply;
mod script;
mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, Value};
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use self::keys::Keys;
use self::reply::Entry;
use self::script::Outcome;
use super::memory::random_epoch;
use super::{Accepted, Backplane, BackplaneError, BoxFuture, EngineContext, EventSink, WireEvent};
use crate::event::{valid_collection_name, Event, NewEvent};
use crate::history::HistoryLimits;
use crate::metrics::Metrics;
use crate::state::cluster::Snapshot;
use crate::state::State;

/// How long one `XREAD` blocks waiting for new entries; also how often an idle reader checks
/// the epoch.
const BLOCK: Duration = Duration::from_millis(1000);
/// Most entries one `XREAD` returns per stream.
const READ_COUNT: usize = 1000;
/// Most entries one `XRANGE`/`XREVRANGE` of the restore returns.
const RESTORE_PAGE: usize = 1000;
/// Streams keep at least this many entries, whatever the history size: the stream is also
/// the delivery channel, so a node that falls this far behind on one collection loses events
/// (and logs it).
const MIN_STREAM_LEN: usize = 10_000;
/// How often a node writes the keys of its retained state that changed (besides every
/// [`flush_every`] events of a collection, and at shutdown).
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on the flush at shutdown.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Events of one collection after which its retained state is flushed early: half of what
/// its stream keeps, so the log always holds every event after the last flush.
pub fn flush_every(history_size: usize) -> usize {
    history_size.max(MIN_STREAM_LEN) / 2
}

/// Bound on establishing a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on any reply (publishes answer 503 past it); the blocking read gets `BLOCK` more.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay before reconnecting; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a connection to Redis ended (internal: the supervisor logs it and reconnects).
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// Redis or the connection to it failed.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Redis answered something this engine does not understand.
    #[error("unexpected reply: {0}")]
    Reply(String),
    /// A publish saw the connection fail or the epoch change.
    #[error("a publish saw the connection fail or the epoch change")]
    Trouble,
    /// The retained state cannot be restored yet (the node stays not ready and retries).
    #[error("retained state not restored: {0}")]
    State(String),
}

/// The publish side of a live connection.
#[derive(Clone)]
struct Link {
    conn: MultiplexedConnection,
    /// The epoch the node agreed on when this connection was made.
    epoch: Arc<str>,
    /// Cancelled by a publish that saw this connection fail: the supervisor reconnects.
    trouble: CancellationToken,
}

/// What publishes and the supervisor share.
struct Shared {
    keys: Keys,
    publish: ::redis::Script,
    /// `MAXLEN ~` of every stream.
    stream_len: usize,
    /// Idempotency window in ms (0: no deduplication).
    window_ms: u64,
    /// `Some` while connected, agreed on the epoch, restored and reading: publishes go here.
    link: RwLock<Option<Link>>,
    metrics: Arc<Metrics>,
    /// The retained state this node flushes to Redis (`--state`).
    state: Option<Arc<State>>,
    /// One flush at a time, so a node never refuses its own older flush.
    flushing: tokio::sync::Mutex<()>,
}

impl Shared {
    fn set_link(&self, link: Option<Link>) {
        self.metrics.backplane_ready.set(i64::from(link.is_some()));
        *self.link.write() = link;
    }
}

/// Checks that `url` is a Redis URL this build can connect to (without connecting). The
/// error does not repeat the URL, which may carry a password.
pub fn check_url(url: &str) -> Result<(), String> {
    Client::open(url).map(drop).map_err(|e| e.to_string())
}

/// Whether `url` asks for TLS (`rediss://`, `valkeys://`).
pub fn is_tls_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// The client of `url`: a `rediss://` URL verifies the server against the system's roots,
/// or only against `ca_pem` (`--redis-ca-file`) when given. A `user:password@` in the URL
/// authenticates as that ACL user (`AUTH user password`) on every connection.
fn client(url: &str, ca_pem: Option<&[u8]>) -> Result<Client, String> {
    match ca_pem {
        None => Client::open(url).map_err(|e| e.to_string()),
        Some(_) if !is_tls_url(url) => {
            Err("a CA file (--redis-ca-file) needs a rediss:// URL".into())
        }
        Some(pem) => Client::build_with_tls(
            url,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        )
        .map_err(|e| e.to_string()),
    }
}

/// The Redis backplane.
pub struct RedisBackplane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("keys", &self.shared.keys)
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// Checks `url` and starts connecting in the background (must be called inside a Tokio
    /// runtime). The engine is ready once connected, agreed on the epoch and restored.
    pub fn new(url: &str, ctx: EngineContext) -> Result<Self, BackplaneError> {
        Self::with_ca(url, None, ctx)
    }

    /// [`RedisBackplane::new`], trusting only the CA certificates of `ca_pem` (PEM) for a
    /// `rediss://` URL instead of the system's roots.
    pub fn with_ca(
        url: &str,
        ca_pem: Option<&[u8]>,
        ctx: EngineContext,
    ) -> Result<Self, BackplaneError> {
        // The URL may carry a password: report the error, not the URL.
        let client = client(url, ca_pem).map_err(BackplaneError::Config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BackplaneError::Config("the Redis engine must be started inside a Tokio runtime".into())
        })?;
        let window_ms = match ctx.idempotency_window.as_millis() {
            0 if ctx.idempotency_window.is_zero() => 0,
            // A window under a millisecond still deduplicates, for a millisecond.
            ms => u64::try_from(ms).unwrap_or(u64::MAX).max(1),
        };
        let shared = Arc::new(Shared {
            keys: Keys::new(&ctx.key_prefix),
            publish: ::redis::Script::new(script::PUBLISH_LUA),
            stream_len: ctx.history.max_events.max(MIN_STREAM_LEN),
            window_ms,
            link: RwLock::new(None),
            metrics: ctx.metrics.clone(),
            state: ctx.state.clone().filter(|s| s.tracking()),
            flushing: tokio::sync::Mutex::new(()),
        });
        shared.set_link(None);
        if shared.state.is_some() {
            runtime.spawn(flush_forever(shared.clone(), ctx.shutdown.clone()));
        }
        runtime.spawn(supervise(shared.clone(), client, ctx));
        Ok(RedisBackplane { shared })
    }
}

impl Backplane for RedisBackplane {
    fn publish(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, BackplaneError>> {
        Box::pin(async move {
            let Some(mut link) = self.shared.link.read().clone() else {
                return Err(BackplaneError::Unavailable("not connected to Redis".into()));
            };
            let shared = &self.shared;
            // Capacity is checked against this node's state: per node, and approximate
            // across nodes (another node's publish may be in flight).
            let mut admission = match &shared.state {
                Some(state) => Some(state.admit(&events).map_err(BackplaneError::StateFull)?),
                None => None,
            };
            let call = script::invocation(
                &shared.publish,
                &shared.keys,
                &link.epoch,
                shared.stream_len,
                shared.window_ms,
                &events,
            );
            let reply: Value = match call.invoke_async(&mut link.conn).await {
                Ok(reply) => reply,
                Err(e) => {
                    // A server-side error (a script error) leaves the connection usable;
                    // anything else means it must be replaced.
                    if !matches!(e.kind(), ::redis::ErrorKind::Server(_)) {
                        link.trouble.cancel();
                    }
                    return Err(BackplaneError::Unavailable(format!("redis: {e}")));
                }
            };
            match script::parse(reply, &link.epoch, events.len()) {
                Ok(Outcome::Accepted(mut positions)) => {
                    if let Some(admission) = admission.as_mut() {
                        for (position, stale) in positions.iter_mut().zip(&mut admission.stale) {
                            if !position.duplicate {
                                position.stale = std::mem::take(stale);
                            }
                        }
                    }
                    Ok(positions)
                }
                // The node's epoch is stale: nothing was written. Answering 503 (rather than
                // waiting for the node to adopt the new epoch and retrying) keeps a publish
                // from ever being half-applied; a retry succeeds once the node has caught up.
                Ok(Outcome::EpochChanged(current)) => {
                    tracing::warn!(
                        node = %link.epoch,
                        redis = current.as_deref().unwrap_or("(none)"),
                        "publish refused: the log's epoch changed"
                    );
                    link.trouble.cancel();
                    Err(BackplaneError::Unavailable(
                        "the Redis log changed its epoch; retry".into(),
                    ))
                }
                Err(e) => Err(BackplaneError::Unavailable(e)),
            }
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.link.read().is_some()
    }

    fn engine(&self) -> &'static str {
        "redis"
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn connect(
    client: &Client,
    name: &str,
    response: Duration,
) -> Result<MultiplexedConnection, LinkError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    // Named, so operators (and tests) can tell the engine's connections apart. Best effort:
    // an ACL may forbid it, which must not keep the engine from working.
    let named: Result<(), _> = ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async(&mut conn)
        .await;
    if let Err(e) = named {
        tracing::debug!(error = %e, "CLIENT SETNAME refused");
    }
    Ok(conn)
}

/// Proposes a fresh epoch and returns the one Redis holds (ours if there was none).
/// One page (`RESTORE_PAGE` entries) of `XRANGE`/`XREVRANGE key from to`.
async fn restore_page(
    conn: &mut MultiplexedConnection,
    command: &str,
    key: &str,
    from: &str,
    to: &str,
) -> Result<Vec<reply::Entry>, LinkError> {
    let page: Value = ::redis::cmd(command)
        .arg(key)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(RESTORE_PAGE)
        .query_async(conn)
        .await?;
    reply::entries(page).map_err(LinkError::Reply)
}

async fn agree_epoch(conn: &mut MultiplexedConnection, keys: &Keys) -> Result<Arc<str>, LinkError> {
    let (_, epoch): (Value, Option<String>) = ::redis::pipe()
        .cmd("SET")
        .arg(&keys.epoch)
        .arg(&*random_epoch())
        .arg("NX")
        .cmd("GET")
        .arg(&keys.epoch)
        .query_async(conn)
        .await?;
    epoch
        .map(Arc::from)
        .ok_or_else(|| LinkError::Reply("the epoch vanished right after it was set".into()))
}

/// How one connection ended.
enum Ended {
    /// The broker is shutting down.
    Shutdown,
    /// The epoch changed under a live connection: agree on it again right away.
    EpochChanged,
}

/// Connects, reads and reconnects until shutdown.
async fn supervise(shared: Arc<Shared>, client: Client, ctx: EngineContext) {
    let mut reader = Reader::new(
        shared.keys.clone(),
        ctx.sink.clone(),
        ctx.history,
        shared.metrics.clone(),
    );
    reader.state = shared.state.clone();
    let mut backoff = BACKOFF_MIN;
    let mut was_live = false;
    loop {
        let mut live = false;
        let ended = tokio::select! {
            () = ctx.shutdown.cancelled() => Ok(Ended::Shutdown),
            ended = connection(&shared, &client, &mut reader, &mut live, was_live) => ended,
        };
        if matches!(ended, Ok(Ended::Shutdown)) {
            // What changed since the last flush, so a node started next finds it.
            if tokio::time::timeout(FINAL_FLUSH_TIMEOUT, flush_all(&shared))
                .await
                .is_err()
            {
                tracing::warn!("the retained state's last flush to redis timed out");
            }
        }
        shared.set_link(None);
        if live {
            was_live = true;
            backoff = BACKOFF_MIN;
        }
        // An epoch change also waits (100 ms after a live connection), so a log that keeps
        // changing under the node cannot make it spin.
        match ended {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::EpochChanged) => {}
            Err(LinkError::State(why)) => {
                shared
                    .metrics
                    .state_restores
                    .with_label_values(&["waiting"])
                    .inc();
                tracing::warn!(%why, retry_in = ?backoff, "redis backplane not ready: the retained state cannot be restored yet")
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "redis backplane disconnected")
            }
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    tracing::debug!("redis backplane stopped");
}

/// One connection's life: connect, agree on the epoch, catch up, then read live until
/// something fails. Sets `live` once publishes are accepted.
async fn connection(
    shared: &Shared,
    client: &Client,
    reader: &mut Reader,
    live: &mut bool,
    was_live: bool,
) -> Result<Ended, LinkError> {
    let prefix = &shared.keys.prefix;
    let publish = connect(client, &format!("{prefix}:publish"), RESPONSE_TIMEOUT).await?;
    let mut read = connect(client, &format!("{prefix}:read"), BLOCK + RESPONSE_TIMEOUT).await?;
    let epoch = agree_epoch(&mut read, &shared.keys).await?;
    if !reader.adopt(&mut read, &epoch).await? {
        return Ok(Ended::EpochChanged);
    }
    let trouble = CancellationToken::new();
    shared.set_link(Some(Link {
        conn: publish,
        epoch: epoch.clone(),
        trouble: trouble.clone(),
    }));
    *live = true;
    if was_live {
        shared.metrics.backplane_reconnects.inc();
        tracing::info!(%epoch, "redis backplane reconnected");
    } else {
        tracing::info!(%epoch, "redis backplane ready");
    }
    loop {
        let (keys, ids) = reader.cursors();
        // The epoch is read after the entries, in the same round trip: if it is still ours,
        // every entry read belongs to our log (a new epoch is never an old one again).
        let mut pipe = ::redis::pipe();
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys)
            .arg(&ids)
            .cmd("GET")
            .arg(&shared.keys.epoch);
        let (entries, current): (Value, Option<String>) = tokio::select! {
            () = trouble.cancelled() => return Err(LinkError::Trouble),
            reply = pipe.query_async(&mut read) => reply?,
        };
        if current.as_deref() != Some(&*epoch) {
            tracing::warn!(%epoch, redis = current.as_deref().unwrap_or("(none)"), "the redis log changed its epoch");
            return Ok(Ended::EpochChanged);
        }
        reader.deliver(reply::streams(entries).map_err(LinkError::Reply)?);
    }
}

/// The node's read position in the shared log, and the only caller of the sink.
struct Reader {
    keys: Keys,
    sink: Arc<dyn EventSink>,
    history: HistoryLimits,
    metrics: Arc<Metrics>,
    /// The epoch this node's history belongs to (`None` before the first restore).
    epoch: Option<Arc<str>>,
    /// Last offset delivered (or restored) per collection; every known collection is here.
    last: HashMap<Arc<str>, u64>,
    /// Last id read from the collections stream.
    announced: String,
    /// The retained state restored with the history (`--state`).
    state: Option<Arc<State>>,
    /// Names this node when it writes a new epoch's base of the retained state.
    token: Arc<str>,
}

impl Reader {
    fn new(
        keys: Keys,
        sink: Arc<dyn EventSink>,
        history: HistoryLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reader {
            keys,
            sink,
            history,
            metrics,
            epoch: None,
            last: HashMap::new(),
            announced: "0-0".into(),
            state: None,
            token: state::token(),
        }
    }

    /// Brings the node to `epoch`: the first time, resets the sink and restores history; on
    /// a new epoch, resets and starts reading every log from 0; on the same epoch, checks
    /// the log did not go back. Returns false when the epoch was just replaced (agree again).
    async fn adopt(
        &mut self,
        conn: &mut MultiplexedConnection,
        epoch: &Arc<str>,
    ) -> Result<bool, LinkError> {
        match &self.epoch {
            None => {
                self.sink.reset(epoch.clone());
                let restored = self.fetch_restore(conn, epoch).await?;
                self.apply_restore(restored, epoch);
            }
            Some(mine) if mine != epoch => {
                tracing::warn!(old = %mine, new = %epoch, "the redis log was lost (new epoch): history reset, reading every log from the start");
                self.metrics.backplane_epoch_changes.inc();
                self.sink.reset(epoch.clone());
                // The collections stream, read from its start, announces every collection of
                // the new log; each is then read from its start.
                self.last.clear();
                self.announced = "0-0".into();
                // The retained state outlives the log: this node's becomes the new epoch's
                // base, unless another node's already did (then it loads that one, so every
                // node holds the same).
                if let Some(state) = self.state.clone() {
                    let mut restored = Restored {
                        announced: "0-0".into(),
                        logs: Vec::new(),
                        states: Vec::new(),
                    };
                    for collection in self.retained(&state, state.collections()) {
                        let how = self.restore_state(conn, epoch, &collection, true).await?;
                        restored.states.push((collection, how));
                    }
                    self.apply_restore(restored, epoch);
                    self.announced = "0-0".into();
                }
            }
            Some(_) => {
                if self.went_back(conn).await? {
                    let renewed: i64 = ::redis::Script::new(script::RENEW_LUA)
                        .key(&self.keys.epoch)
                        .key(&self.keys.offsets)
                        .key(&self.keys.collections)
                        .arg(&**epoch)
                        .arg(&*random_epoch())
                        .arg(&self.keys.log_prefix)
                        .invoke_async(conn)
                        .await?;
                    tracing::error!(%epoch, renewed, "the redis log went back in time (restored from an older snapshot?): replaced with a new, empty log");
                    return Ok(false);
                }
            }
        }
        self.epoch = Some(epoch.clone());
        Ok(true)
    }

    /// The retained collections among `known`, and every collection `--state` or the
    /// collections file names.
    fn retained(&self, state: &State, mut known: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let settings = state.settings();
        let declared = settings.file.iter().flat_map(|f| f.collections.keys());
        known.extend(
            settings
                .collections
                .iter()
                .chain(declared)
                .filter(|c| *c != "*" && valid_collection_name(c))
                .map(|c| Arc::from(c.as_str())),
        );
        known.retain(|c| state.retains(c));
        known.sort();
        known.dedup();
        known
    }

    /// How `collection`'s retained state comes back in `epoch`: the stored snapshot and the
    /// log after it, or (when the store has none for this epoch) this node's own state as the
    /// base — its carried state after an epoch change (`carrier`), else the empty state when
    /// the log is whole from its first event. Anything else: not ready, retried.
    async fn restore_state(
        &self,
        conn: &mut MultiplexedConnection,
        epoch: &Arc<str>,
        collection: &Arc<str>,
        carrier: bool,
    ) -> Result<StateRestore, LinkError> {
        let state = self
            .state
            .as_ref()
            .ok_or_else(|| LinkError::State("no retained state".into()))?;
        // At most: claim, build, find the build complete.
        for _ in 0..3 {
            match state::claim(conn, &self.keys, collection, epoch, &self.token).await? {
                state::Claim::Ready(offset) => {
                    let snapshot =
                        state::read_snapshot(conn, &self.keys, collection, offset).await?;
                    let (events, tail) = self.read_after(conn, epoch, collection, offset).await?;
                    return Ok(StateRestore::Load {
                        snapshot,
                        events,
                        tail,
                    });
                }
                state::Claim::Busy => {
                    return Err(LinkError::State(format!(
                        "another node is writing the retained state of {collection}"
                    )))
                }
                state::Claim::EpochChanged => {
                    return Err(LinkError::State("the log's epoch changed".into()))
                }
                state::Claim::Claimed if carrier => {
                    // The carried state is the new log's state before its first event.
                    let image = state.image(collection, 0);
                    let ids = (&**epoch, &*self.token);
                    if state::build(conn, &self.keys, collection, ids, 0, &image).await? {
                        state.rebase(collection, epoch, 0);
                        tracing::info!(%collection, items = image.len(), %epoch, "retained state written to redis as the new log's base");
                        return Ok(StateRestore::Built { offset: 0 });
                    }
                }
                state::Claim::Claimed => {
                    if !self.whole_from_start(conn, collection).await? {
                        state::release(conn, &self.keys, collection, &self.token).await?;
                        return Err(LinkError::State(format!(
                            "redis holds no snapshot of {collection} and its log no longer starts at its first event: waiting for a node holding the state to flush it"
                        )));
                    }
                    let ids = (&**epoch, &*self.token);
                    state::build(conn, &self.keys, collection, ids, 0, &[]).await?;
                }
            }
        }
        Err(LinkError::State(format!(
            "the retained state of {collection} kept changing hands"
        )))
    }

    /// Every event of `collection` after `offset`, and the offset of the last one (at least
    /// `offset`). An error when the log no longer holds the first of them.
    async fn read_after(
        &self,
        conn: &mut MultiplexedConnection,
        epoch: &Arc<str>,
        collection: &str,
        offset: u64,
    ) -> Result<(Vec<Arc<Event>>, u64), LinkError> {
        let taken: Option<u64> = ::redis::cmd("HGET")
            .arg(&self.keys.offsets)
            .arg(collection)
            .query_async(conn)
            .await?;
        let key = self.keys.log(collection);
        let mut events = Vec::new();
        let mut tail = offset;
        let mut start = format!("{}-0", offset + 1);
        'pages: loop {
            let page = restore_page(conn, "XRANGE", &key, &start, "+").await?;
            let full = page.len() == RESTORE_PAGE;
            for entry in page {
                start = format!("({}", entry.id);
                let Some(at) = entry.offset() else { continue };
                if tail == offset && at != offset + 1 {
                    // Trimmed past the snapshot.
                    break 'pages;
                }
                tail = at;
                if let Some(wire) = decode(&entry) {
                    events.push(Arc::new(wire.into_event(at, epoch.clone())));
                }
            }
            if !full {
                break;
            }
        }
        if taken.unwrap_or(0) > offset && tail == offset {
            self.metrics
                .state_restores
                .with_label_values(&["stale"])
                .inc();
            return Err(LinkError::State(format!(
                "the snapshot of {collection} (at offset {offset}) is older than its log holds: waiting for a fresher flush"
            )));
        }
        Ok((events, tail))
    }

    /// Whether `collection`'s log still holds its first event (or has none).
    async fn whole_from_start(
        &self,
        conn: &mut MultiplexedConnection,
        collection: &str,
    ) -> Result<bool, LinkError> {
        let taken: Option<u64> = ::redis::cmd("HGET")
            .arg(&self.keys.offsets)
            .arg(collection)
            .query_async(conn)
            .await?;
        if taken.unwrap_or(0) == 0 {
            return Ok(true);
        }
        let first = restore_page(conn, "XRANGE", &self.keys.log(collection), "-", "+").await?;
        Ok(first.first().and_then(Entry::offset) == Some(1))
    }

    /// True when Redis holds a lower offset for some collection than this node delivered.
    async fn went_back(&self, conn: &mut MultiplexedConnection) -> Result<bool, LinkError> {
        let offsets: HashMap<String, u64> = ::redis::cmd("HGETALL")
            .arg(&self.keys.offsets)
            .query_async(conn)
            .await?;
        Ok(self
            .last
            .iter()
            .any(|(c, &mine)| mine > offsets.get(&**c).copied().unwrap_or(0)))
    }

    /// Reads what to restore: every announced collection's newest events, within the
    /// history limits. Nothing touches the sink until everything is read, so a connection
    /// lost midway leaves nothing half-restored.
    async fn fetch_restore(
        &self,
        conn: &mut MultiplexedConnection,
        epoch: &Arc<str>,
    ) -> Result<Restored, LinkError> {
        let mut restored = Restored {
            announced: "0-0".into(),
            logs: Vec::new(),
            states: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        let mut start = "-".to_string();
        loop {
            let page = restore_page(conn, "XRANGE", &self.keys.collections, &start, "+").await?;
            let full = page.len() == RESTORE_PAGE;
            for entry in page {
                if let Some(c) = entry.field(b"c").and_then(|c| std::str::from_utf8(c).ok()) {
                    if valid_collection_name(c) && seen.insert(c.to_string()) {
                        restored.logs.push((Arc::from(c), 0, Vec::new()));
                    }
                }
                start = format!("({}", entry.id);
                restored.announced = entry.id;
            }
            if !full {
                break;
            }
        }
        // Retained collections restore their state instead: a snapshot, then every event
        // after it (the history is what follows the snapshot).
        if let Some(state) = self.state.clone() {
            let announced = restored.logs.iter().map(|(c, _, _)| c.clone());
            for collection in self.retained(&state, announced.collect()) {
                let how = self.restore_state(conn, epoch, &collection, false).await?;
                restored.states.push((collection, how));
            }
            restored.logs.retain(|(c, _, _)| !state.retains(c));
        }
        let oldest_ms = now_ms()
            .saturating_sub(u64::try_from(self.history.max_age.as_millis()).unwrap_or(u64::MAX));
        for (collection, tail, events) in &mut restored.logs {
            let key = self.keys.log(collection);
            let mut end = "+".to_string();
            'pages: loop {
                let page = restore_page(conn, "XREVRANGE", &key, &end, "-").await?;
                let full = page.len() == RESTORE_PAGE;
                for entry in page {
                    end = format!("({}", entry.id);
                    let Some(offset) = entry.offset() else {
                        continue;
                    };
                    // The newest event is always restored, whatever its age and the history
                    // size: it tells the history where the log ends, so a fresh subscription
                    // starts at the right position and a log with no restored event is known
                    // to be empty (the history is built complete-from-start for this engine).
                    let newest = *tail == 0;
                    if newest {
                        *tail = offset;
                    }
                    if !newest && events.len() >= self.history.max_events {
                        break 'pages;
                    }
                    let Some(wire) = decode(&entry) else { continue };
                    // Newest first: once one is too old, so are the rest.
                    if !newest && wire.accepted_ms < oldest_ms {
                        break 'pages;
                    }
                    events.push(Arc::new(wire.into_event(offset, epoch.clone())));
                }
                if !full {
                    break;
                }
            }
            events.reverse();
        }
        Ok(restored)
    }

    fn apply_restore(&mut self, restored: Restored, epoch: &Arc<str>) {
        let mut count = 0u64;
        for (collection, how) in restored.states {
            let (label, tail) = match how {
                StateRestore::Load {
                    snapshot,
                    events,
                    tail,
                } => {
                    let entries = snapshot.entries.len();
                    self.sink.load_state(&collection, epoch, snapshot);
                    for event in events {
                        count += 1;
                        self.sink.restore(event);
                    }
                    tracing::info!(%collection, items = entries, "retained state restored from redis");
                    ("loaded", tail)
                }
                StateRestore::Built { offset } => ("built", offset),
            };
            self.metrics
                .state_restores
                .with_label_values(&[label])
                .inc();
            self.last.insert(collection, tail);
        }
        for (collection, tail, events) in restored.logs {
            for event in events {
                count += 1;
                self.sink.restore(event);
            }
            self.last.insert(collection, tail);
        }
        self.announced = restored.announced;
        self.metrics.backplane_restored.inc_by(count);
        tracing::info!(
            events = count,
            collections = self.last.len(),
            "history restored from redis"
        );
    }

    /// The streams to read and the id to read each after.
    fn cursors(&self) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::with_capacity(self.last.len() + 1);
        let mut ids = Vec::with_capacity(self.last.len() + 1);
        keys.push(self.keys.collections.clone());
        ids.push(self.announced.clone());
        for (collection, last) in &self.last {
            keys.push(self.keys.log(collection));
            ids.push(format!("{last}-0"));
        }
        (keys, ids)
    }

    /// Hands newly read entries to the sink, in stream order, and advances the positions.
    fn deliver(&mut self, streams: Vec<(String, Vec<Entry>)>) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        for (key, entries) in streams {
            if key == self.keys.collections {
                for entry in entries {
                    if let Some(c) = entry.field(b"c").and_then(|c| std::str::from_utf8(c).ok()) {
                        if valid_collection_name(c) && !self.last.contains_key(c) {
                            // Its log is read from the start: everything in it is new here.
                            self.last.insert(Arc::from(c), 0);
                        }
                    }
                    self.announced = entry.id;
                }
                continue;
            }
            let Some(collection) = self
                .keys
                .collection_of(&key)
                .and_then(|c| self.last.get_key_value(c))
                .map(|(c, _)| c.clone())
            else {
                continue;
            };
            let Some(last) = self.last.get_mut(&collection) else {
                continue;
            };
            for entry in entries {
                let Some(offset) = entry.offset() else {
                    continue;
                };
                if offset <= *last {
                    continue;
                }
                if offset > *last + 1 {
                    tracing::error!(%collection, from = *last + 1, to = offset - 1, "events trimmed from the redis stream before this node read them: not delivered here");
                }
                *last = offset;
                if let Some(wire) = decode(&entry) {
                    self.sink
                        .deliver(Arc::new(wire.into_event(offset, epoch.clone())));
                }
            }
        }
    }
}

/// What a restore read: the collections stream's last id, and per collection its last offset
/// and the events to restore, oldest first; per retained collection, how its state comes back.
struct Restored {
    announced: String,
    logs: Vec<(Arc<str>, u64, Vec<Arc<Event>>)>,
    states: Vec<(Arc<str>, StateRestore)>,
}

/// How one retained collection's state comes back.
enum StateRestore {
    /// Load `snapshot`, then fold `events` (every event after it, oldest first); the log
    /// ends at `tail`.
    Load {
        snapshot: Snapshot,
        events: Vec<Arc<Event>>,
        tail: u64,
    },
    /// This node's own state was written as the base of a new epoch at `offset`.
    Built { offset: u64 },
}

/// Writes the changed keys of the retained state every [`FLUSH_INTERVAL`], and whenever a
/// collection folded [`flush_every`] events, until shutdown (the supervisor writes the last).
async fn flush_forever(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(state) = shared.state.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = state.flush_wanted() => {}
        }
        flush_all(&shared).await;
    }
}

/// One flush of every retained collection that changed, through the publish connection.
async fn flush_all(shared: &Shared) {
    let Some(state) = &shared.state else { return };
    let _one = shared.flushing.lock().await;
    let Some(mut link) = shared.link.read().clone() else {
        return;
    };
    for collection in state.collections() {
        let Some(flush) = state.take_flush(&collection) else {
            continue;
        };
        let outcome = match state::flush(&mut link.conn, &shared.keys, &flush).await {
            Ok(state::Flushed::Written) => "written",
            Ok(state::Flushed::Refused) => "refused",
            Ok(state::Flushed::Stale) => "stale",
            Err(e) => {
                tracing::warn!(%collection, error = %e, "flushing the retained state to redis failed; retried");
                "failed"
            }
        };
        shared
            .metrics
            .state_flushes
            .with_label_values(&[outcome])
            .inc();
        if outcome != "written" {
            state.flush_failed(flush);
        }
    }
}

/// The event of a log entry; a malformed entry is logged and skipped.
fn decode(entry: &Entry) -> Option<WireEvent> {
    let decoded = entry.field(b"e").map(WireEvent::decode);
    match decoded {
        Some(Ok(wire)) => Some(wire),
        Some(Err(e)) => {
            tracing::error!(id = %entry.id, error = %e, "skipping a malformed event in the redis log");
            None
        }
        None => {
            tracing::error!(id = %entry.id, "skipping a redis log entry without an event");
            None
        }
    }
}
