//! The subscribing side of `tidings bench`: opening a WebSocket (from a chosen loopback source
//! address), subscribing and waiting for `init`, then one task per connection that counts what
//! arrives, finds duplicates ([`Seen`]), measures latency, answers heartbeats and records why
//! the connection ended.
//!
//! Receivers have to stay cheap so that the generator is not what the benchmark measures: a
//! frame is never deserialized; its bytes are scanned for `"seq":` and `"ts":` (the publisher
//! writes them first in every item, and the broker keeps that order, or the requested one for
//! `fields: ["seq","ts"]`). A frame with several items counts each one. Per-connection counters
//! live in the task; the only shared writes are two uncontended atomics per frame
//! ([`Progress`]) and a latency buffer flushed into one of a few sharded histograms every
//! [`LATENCY_BUFFER`] samples.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use parking_lot::Mutex;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::seen::Seen;
use super::Clock;

/// How long one connection may take to connect, upgrade and get its `init`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Latency samples a receiver keeps before flushing them into a shared histogram.
const LATENCY_BUFFER: usize = 64;

/// Shared latency histograms; receiver `i` flushes into shard `i % LATENCY_SHARDS`.
const LATENCY_SHARDS: usize = 32;

/// Largest latency the histograms hold, in microseconds (an hour); larger ones are clamped.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// The broker's frames are small; 128 KiB per connection (the library default) would cost
/// gigabytes at tens of thousands of connections, and the library zeroes the free part of the
/// buffer before every read.
const READ_BUFFER_BYTES: usize = 4 * 1024;

static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""seq":"#));
static TS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""ts":"#));
static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""status":"error""#));

/// A subscriber's connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Where subscribers connect, and from where.
#[derive(Debug, Clone)]
pub struct Target {
    /// The broker's address.
    pub addr: SocketAddr,
    /// `ws://host:port/path[?access_token=…]`.
    pub ws_url: String,
    /// Spread connections over `127.0.0.1 ..= 127.0.0.M` (1 = let the OS choose).
    pub source_addrs: u8,
}

impl Target {
    /// The local address subscriber `index` binds to, if any.
    fn source_ip(&self, index: usize) -> Option<IpAddr> {
        (self.source_addrs > 1).then(|| {
            let host = 1 + (index % usize::from(self.source_addrs)) as u8;
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))
        })
    }
}

/// Which events a subscriber should receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Every event.
    All,
    /// Events whose `seq % groups == group`.
    Group {
        /// Number of groups.
        groups: u64,
        /// This subscriber's group.
        group: u64,
    },
}

impl Expect {
    fn wants(self, seq: u64) -> bool {
        match self {
            Expect::All => true,
            Expect::Group { groups, group } => seq % groups == group,
        }
    }

    /// A dense index of the wanted `seq`s (a group's are `group + k × groups`), which keeps
    /// [`Seen`]'s window full.
    fn index(self, seq: u64) -> u64 {
        match self {
            Expect::All => seq,
            Expect::Group { groups, .. } => seq / groups,
        }
    }
}

/// What a receiver publishes while it runs, for the driver to poll. Aligned to a cache line
/// so that neighbouring receivers on different cores do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Progress {
    /// Expected items received once, in order.
    pub unique: AtomicU64,
    /// Clock time (ns) of the last frame carrying items.
    pub last_ns: AtomicU64,
    /// The connection ended before the run did.
    pub closed: AtomicBool,
}

/// Counters of one connection, returned when its task ends.
#[derive(Debug, Default, Clone)]
pub struct SubStats {
    /// Event frames.
    pub frames: u64,
    /// Items in those frames.
    pub items: u64,
    /// Expected items received once, in order.
    pub unique: u64,
    /// Items received more than once.
    pub duplicates: u64,
    /// Items that arrived after an item with a higher `seq` (concurrent publish requests may
    /// be sequenced by the broker in another order than they were numbered).
    pub reordered: u64,
    /// Items this subscriber's filter should have excluded.
    pub unexpected: u64,
    /// Error frames received after the subscription started.
    pub error_frames: u64,
    /// Why the connection ended early, if it did.
    pub close: Option<String>,
}

/// Latency histograms shared by every receiver, in microseconds.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    /// Empty histograms.
    pub fn new() -> Result<Latencies, String> {
        let shards = (0..LATENCY_SHARDS)
            .map(|_| Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot create a latency histogram: {e}"))?;
        Ok(Latencies { shards })
    }

    fn record(&self, index: usize, samples: &mut Vec<u64>) {
        if samples.is_empty() {
            return;
        }
        let mut shard = self.shards[index % self.shards.len()].lock();
        for us in samples.drain(..) {
            shard.saturating_record(us.clamp(1, LATENCY_MAX_US));
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Result<Histogram<u64>, String> {
        let mut all = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
            .map_err(|e| format!("cannot create a latency histogram: {e}"))?;
        for shard in &self.shards {
            all.add(&*shard.lock())
                .map_err(|e| format!("cannot merge latency histograms: {e}"))?;
        }
        Ok(all)
    }
}

/// Opens subscriber `index`'s connection: TCP from its source address (if any), then the
/// WebSocket upgrade with the generator's small buffers.
pub async fn open_ws(target: &Target, index: usize) -> Result<Ws, String> {
    let stream = open_tcp(target, index).await?;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(target.ws_url.as_str(), stream, Some(config))
            .await
            .map_err(describe_upgrade_error)?;
    Ok(ws)
}

/// Opens subscriber `index`'s TCP connection (from its source address, if any).
async fn open_tcp(target: &Target, index: usize) -> Result<TcpStream, String> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("cannot create a socket: {e}"))?;
    if let Some(ip) = target.source_ip(index) {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("cannot bind a socket to {ip}: {e}"))?;
    }
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.addr))?;
    // Pongs are tiny and must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects subscriber `index`, sends `subscribe` and waits for its `init`.
pub async fn connect(target: &Target, index: usize, subscribe: &str) -> Result<Ws, String> {
    let mut ws = open_ws(target, index).await?;
    ws.send(Message::text(subscribe))
        .await
        .map_err(|e| format!("cannot send the subscribe: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let bytes = text.as_bytes();
                if bytes.starts_with(br#"{"type":"subscription","event":"init""#) {
                    return Ok(ws);
                }
                if ERROR.find(bytes).is_some() {
                    return Err(format!(
                        "subscribe refused: {}",
                        error_message(text.as_str())
                    ));
                }
                if is_ping(bytes) {
                    ws.send(Message::text(PONG))
                        .await
                        .map_err(|e| format!("cannot answer a ping: {e}"))?;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "the broker closed the connection before init: {}",
                    describe_close(frame.as_ref())
                ))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("waiting for init: {e}")),
            None => return Err("the broker closed the connection before init".into()),
        }
    }
}

const PONG: &str = r#"{"type":"pong"}"#;

fn is_ping(frame: &[u8]) -> bool {
    frame.starts_with(br#"{"type":"ping""#)
}

/// `CODE: message` of an error frame, or the frame itself if it has no such shape.
fn error_message(frame: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(frame).unwrap_or_default();
    match (
        value["error"]["code"].as_str(),
        value["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => frame.to_string(),
    }
}

fn describe_upgrade_error(e: WsError) -> String {
    match e {
        WsError::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let hint = if response.status() == 503 {
                " (is the broker's --max-connections large enough?)"
            } else {
                ""
            };
            format!(
                "the broker refused the WebSocket upgrade: HTTP {}: {body}{hint}",
                response.status()
            )
        }
        e => format!("WebSocket upgrade failed: {e}"),
    }
}

/// The close reason as counted in the report, e.g. `4008 slow consumer: outbox full`.
fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.code == CloseCode::Status => "closed without a status code".into(),
        Some(f) => format!("{} {}", u16::from(f.code), f.reason)
            .trim()
            .to_string(),
        None => "closed without a status code".into(),
    }
}

/// One connection's receive loop; runs until `stop` or until the connection ends.
pub struct Receiver {
    /// Subscriber number (chooses the latency shard).
    pub index: usize,
    /// What it should get.
    pub expect: Expect,
    /// Counters the driver polls.
    pub progress: Arc<Progress>,
    /// Where latencies go.
    pub latencies: Arc<Latencies>,
    /// The run's time base.
    pub clock: Clock,
    /// The connection speaks NATS (`--nats-ws`) rather than the Tidings protocol.
    pub nats: bool,
}

impl Receiver {
    /// Receives until `stop` is cancelled or the connection ends, and returns the counters.
    pub async fn run(self, mut ws: Ws, stop: CancellationToken) -> SubStats {
        let mut state = State {
            stats: SubStats::default(),
            seen: Seen::default(),
            highest: None,
            samples: Vec::with_capacity(LATENCY_BUFFER),
        };
        // One select around the whole loop, not one per frame: the cancellation future is
        // registered once instead of at every message.
        let close = tokio::select! {
            _ = stop.cancelled() => None,
            reason = self.receive_either(&mut ws, &mut state) => Some(reason),
        };
        self.latencies.record(self.index, &mut state.samples);
        if close.is_some() {
            self.progress.closed.store(true, Ordering::Relaxed);
        }
        SubStats {
            close,
            ..state.stats
        }
    }

    /// Handles frames until the connection ends; returns why it ended.
    async fn receive(&self, ws: &mut Ws, state: &mut State) -> String {
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => return describe_close(frame.as_ref()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return describe_ws_error(&e),
                None => return "connection ended without a close frame".into(),
            };
            let bytes = text.as_bytes();
            if let Some(event) = bytes.strip_prefix(EVENT_PREFIX.as_bytes()) {
                if !event.starts_with(b"init\"") {
                    self.on_event(bytes, state);
                }
            } else if is_ping(bytes) {
                if let Err(e) = ws.send(Message::text(PONG)).await {
                    return describe_ws_error(&e);
                }
            } else if ERROR.find(bytes).is_some() {
                state.stats.error_frames += 1;
            }
        }
    }

    async fn receive_either(&self, ws: &mut Ws, state: &mut State) -> String {
        if self.nats {
            self.receive_nats(ws, state).await
        } else {
            self.receive(ws, state).await
        }
    }

    /// As [`Receiver::receive`], for a NATS connection: every `MSG` payload is one item.
    async fn receive_nats(&self, ws: &mut Ws, state: &mut State) -> String {
        let mut parser = crate::nats::Parser::default();
        loop {
            let data = match ws.next().await {
                Some(Ok(Message::Binary(data))) => data,
                Some(Ok(Message::Text(text))) => text.as_bytes().to_vec().into(),
                Some(Ok(Message::Close(frame))) => return describe_close(frame.as_ref()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return describe_ws_error(&e),
                None => return "connection ended without a close frame".into(),
            };
            let mut pings = 0;
            parser.feed(&data, |op| match op {
                crate::nats::Op::Msg(payload) => self.on_event(payload, state),
                crate::nats::Op::Ping => pings += 1,
                crate::nats::Op::Err => state.stats.error_frames += 1,
                crate::nats::Op::Other => {}
            });
            for _ in 0..pings {
                if let Err(e) = ws.send(Message::binary(&b"PONG\r\n"[..])).await {
                    return describe_ws_error(&e);
                }
            }
        }
    }

    fn on_event(&self, frame: &[u8], state: &mut State) {
        let now = self.clock.now_ns();
        let stats = &mut state.stats;
        stats.frames += 1;
        for (seq, ts) in scan_items(frame) {
            stats.items += 1;
            if !self.expect.wants(seq) {
                stats.unexpected += 1;
                continue;
            }
            if !state.seen.insert(self.expect.index(seq)) {
                stats.duplicates += 1;
                continue;
            }
            if state.highest.is_some_and(|h| seq < h) {
                stats.reordered += 1;
            } else {
                state.highest = Some(seq);
            }
            stats.unique += 1;
            if let Some(ts) = ts {
                state.samples.push(now.saturating_sub(ts) / 1_000);
                if state.samples.len() == LATENCY_BUFFER {
                    self.latencies.record(self.index, &mut state.samples);
                }
            }
        }
        self.progress.unique.store(stats.unique, Ordering::Relaxed);
        self.progress.last_ns.store(now, Ordering::Relaxed);
    }
}

/// What a receiver keeps between frames.
struct State {
    stats: SubStats,
    seen: Seen,
    /// Highest `seq` received so far.
    highest: Option<u64>,
    /// Latencies (µs) not yet flushed into the shared histograms.
    samples: Vec<u64>,
}

/// How every subscription frame starts (the broker writes keys in a fixed order, §1 of the
/// protocol); the event name follows.
const EVENT_PREFIX: &str = r#"{"type":"subscription","event":""#;

fn describe_ws_error(e: &WsError) -> String {
    match e {
        WsError::Io(io) => format!("I/O error: {}", io.kind()),
        WsError::Protocol(p) => format!("protocol error: {p}"),
        e => format!("error: {e}"),
    }
}

/// `(seq, ts)` of every item of an event frame, in order; `ts` is `None` when an item has
/// `seq` but no `ts` before the next item's `seq`.
pub fn scan_items(frame: &[u8]) -> impl Iterator<Item = (u64, Option<u64>)> + '_ {
    const TS_NEXT: &[u8] = br#","ts":"#;
    let mut at = 0;
    std::iter::from_fn(move || {
        let seq_at = at + SEQ.find(&frame[at..])? + SEQ.needle().len();
        let (seq, after_seq) = number(frame, seq_at)?;
        at = after_seq;
        // The publisher writes ts right after seq, and both field orders the bench asks for
        // keep it there; search only when it is somewhere else.
        let ts_at = if frame[at..].starts_with(TS_NEXT) {
            Some(at + TS_NEXT.len())
        } else {
            let next_seq = SEQ
                .find(&frame[at..])
                .map_or(frame.len(), |offset| at + offset);
            TS.find(&frame[at..next_seq])
                .map(|offset| at + offset + TS.needle().len())
        };
        let ts = ts_at
            .and_then(|ts_at| number(frame, ts_at))
            .map(|(ts, end)| {
                at = end;
                ts
            });
        Some((seq, ts))
    })
}

/// The unsigned integer starting at `at`, and the index after it; `None` if there is no digit
/// there or it does not fit in a `u64`.
fn number(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut end = at;
    while let Some(&b) = bytes.get(end).filter(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        end += 1;
    }
    (end > at).then_some((value, end))
}

/// Close reasons counted over every connection, for the report.
pub fn count_closes<'a>(stats: impl IntoIterator<Item = &'a SubStats>) -> BTreeMap<String, u64> {
    let mut closes = BTreeMap::new();
    for reason in stats.into_iter().filter_map(|s| s.close.as_ref()) {
        *closes.entry(reason.clone()).or_insert(0) += 1;
    }
    closes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_full_and_projected_items() {
        let full = br#"{"type":"subscription","event":"create","data":[{"seq":42,"ts":123456789,"id":42,"tenant_id":2,"f1":"counts"}],"uid":"b"}"#;
        assert_eq!(
            scan_items(full).collect::<Vec<_>>(),
            [(42, Some(123456789))]
        );
        let projected =
            br#"{"type":"subscription","event":"create","data":[{"seq":0,"ts":7}],"uid":"b"}"#;
        assert_eq!(scan_items(projected).collect::<Vec<_>>(), [(0, Some(7))]);
    }

    #[test]
    fn scans_several_items_and_missing_ts() {
        let frame = br#"{"data":[{"seq":1,"ts":10},{"seq":2},{"seq":3,"ts":30}]}"#;
        assert_eq!(
            scan_items(frame).collect::<Vec<_>>(),
            [(1, Some(10)), (2, None), (3, Some(30))]
        );
        assert_eq!(scan_items(br#"{"type":"ping"}"#).count(), 0);
        assert_eq!(scan_items(br#"{"seq":"x"}"#).count(), 0);
        assert_eq!(scan_items(br#"{"seq":99999999999999999999}"#).count(), 0);
        assert_eq!(
            scan_items(br#"[{"ts":5,"seq":4},{"id":1,"seq":6,"x":1,"ts":7}]"#).collect::<Vec<_>>(),
            [(4, None), (6, Some(7))]
        );
    }

    #[test]
    fn groups_and_sources() {
        let expect = Expect::Group {
            groups: 4,
            group: 1,
        };
        assert!(expect.wants(5) && !expect.wants(6));
        assert_eq!(
            (expect.index(1), expect.index(5), expect.index(9)),
            (0, 1, 2)
        );
        assert!(Expect::All.wants(6));
        let mut target = Target {
            addr: "127.0.0.1:1".parse().unwrap(),
            ws_url: String::new(),
            source_addrs: 1,
        };
        assert_eq!(target.source_ip(7), None);
        target.source_addrs = 3;
        assert_eq!(target.source_ip(0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(target.source_ip(5), Some("127.0.0.3".parse().unwrap()));
    }

    #[test]
    fn error_frames_are_summarised() {
        let frame = r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"No."},"uid":"b"}"#;
        assert_eq!(error_message(frame), "FORBIDDEN: No.");
        assert_eq!(error_message("nope"), "nope");
    }
}
