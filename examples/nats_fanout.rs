//! Ad-hoc measurement of two nodes over NATS JetStream: publish to node A, receive on node B.
//!
//! Starts two `tidings serve --engine nats` processes (the binary given as the first argument,
//! e.g. `target/release/tidings`) on a fresh key prefix, opens `SUBSCRIBERS` WebSockets to
//! node B subscribed to `orders`, publishes `EVENTS` events to node A in requests of `BATCH`
//! (as fast as the answers come, or paced to `RATE` events/s when given), and reports
//! deliveries per second (frames received by all subscribers / time from the first publish to
//! the last frame) and percentiles of publish-to-receive latency (each event carries the time
//! its request was sent; one clock, one machine).
//!
//! ```text
//! cargo build --release && cargo run --release --example nats_fanout -- target/release/tidings
//! NATS_URL=nats://127.0.0.1:4222 EVENTS=20000 SUBSCRIBERS=100 BATCH=100 RATE=2000 …
//! ```
//! Needs a NATS server with JetStream; deletes its stream at the end.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_tungstenite::tungstenite::Message;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A node process, killed when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node(binary: &str, url: &str, prefix: &str) -> (Node, SocketAddr) {
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--engine",
            "nats",
            "--nats-url",
            url,
            "--key-prefix",
            prefix,
            "--max-connections",
            "100000",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tidings");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("address line");
    let addr = line
        .trim()
        .strip_prefix("tidings listening on http://")
        .and_then(|r| r.split_once(' '))
        .and_then(|(a, _)| a.parse().ok())
        .expect("address");
    (Node(child), addr)
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn request(http: &Http, method: &str, url: &str, body: Option<String>) -> (u16, String) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let resp = http.request(req).await.expect("http");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The number after `"key":` in `text` (the frames are not parsed: the reader must keep up).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[tokio::main]
async fn main() {
    let binary = std::env::args()
        .nth(1)
        .expect("usage: nats_fanout PATH/TO/tidings");
    let url: String = env_or("NATS_URL", "nats://127.0.0.1:4222".to_string());
    let events: u64 = env_or("EVENTS", 20_000);
    let subscribers: usize = env_or("SUBSCRIBERS", 100);
    let batch: u64 = env_or("BATCH", 100);
    let rate: u64 = env_or("RATE", 0);
    let prefix = format!("bench{}", now_us());

    let (_a, addr_a) = spawn_node(&binary, &url, &prefix);
    let (_b, addr_b) = spawn_node(&binary, &url, &prefix);
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    for addr in [addr_a, addr_b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while request(&http, "GET", &format!("http://{addr}/readyz"), None)
            .await
            .0
            != 200
        {
            assert!(Instant::now() < deadline, "{addr} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Subscribers on node B: each records (latency in µs) per event and the last arrival.
    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
    for _ in 0..subscribers {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr_b}/websocket"))
            .await
            .expect("ws");
        let ready_tx = ready_tx.clone();
        readers.push(tokio::spawn(async move {
            ws.send(Message::text(
                r#"{"type":"subscribe","collection":"orders"}"#,
            ))
            .await
            .expect("subscribe");
            let mut latencies = Vec::with_capacity(events as usize);
            let mut last_id = 0;
            let mut last_at = Instant::now();
            let mut initialized = false;
            while last_id < events {
                let Ok(Some(Ok(message))) =
                    tokio::time::timeout(Duration::from_secs(30), ws.next()).await
                else {
                    eprintln!("a subscriber stopped after id {last_id}");
                    break;
                };
                let Message::Text(text) = message else {
                    continue;
                };
                if !initialized {
                    initialized = true;
                    let _ = ready_tx.send(()).await;
                    continue;
                }
                let at = now_us();
                if let (Some(id), Some(sent)) = (
                    number_after(&text, "\"id\":"),
                    number_after(&text, "\"t\":"),
                ) {
                    latencies.push(at.saturating_sub(sent) as u32);
                    last_id = id;
                    last_at = Instant::now();
                }
            }
            (latencies, last_at)
        }));
    }
    drop(ready_tx);
    for _ in 0..subscribers {
        ready_rx
            .recv()
            .await
            .expect("a subscriber failed to subscribe");
    }

    let started = Instant::now();
    let mut next = 1;
    while next <= events {
        let n = batch.min(events - next + 1);
        let t = now_us();
        let body: Vec<String> = (next..next + n)
            .map(|id| {
                format!(
                    r#"{{"collection":"orders","event":"create","data":{{"id":{id},"t":{t}}}}}"#
                )
            })
            .collect();
        let (status, answer) = request(
            &http,
            "POST",
            &format!("http://{addr_a}/v1/publish"),
            Some(format!("[{}]", body.join(","))),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
        next += n;
        if rate > 0 {
            let due = started + Duration::from_secs_f64((next - 1) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let published = started.elapsed();

    let mut all = Vec::with_capacity(subscribers * events as usize);
    let mut last = started;
    for reader in readers {
        let (latencies, at) = reader.await.expect("reader");
        all.extend(latencies);
        last = last.max(at);
    }
    let elapsed = last.duration_since(started);
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let (_, metrics) = request(&http, "GET", &format!("http://{addr_b}/metrics"), None).await;
    let slow = metrics
        .lines()
        .find(|l| l.starts_with("tidings_slow_consumer_closes_total "))
        .unwrap_or("?");
    println!(
        "{events} events x {subscribers} subscribers (batch {batch}, rate {}): published in {:.2}s ({:.0} events/s)",
        if rate > 0 { rate.to_string() } else { "max".into() },
        published.as_secs_f64(),
        events as f64 / published.as_secs_f64()
    );
    println!(
        "received {} of {} frames in {:.2}s: {:.0} deliveries/s",
        all.len(),
        events as usize * subscribers,
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "publish-to-receive latency ms: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}; {slow}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );

    let cleanup = async {
        let client = async_nats::connect(url.as_str()).await.ok()?;
        async_nats::jetstream::new(client)
            .delete_stream(format!("TIDINGS_{prefix}"))
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
}
