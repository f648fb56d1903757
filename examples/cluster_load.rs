//! Ad-hoc load measurement: publish-to-receive latency and delivery rate, one node (memory
//! engine) against two nodes over Redis (publish to one, subscribers on the other).
//!
//! ```text
//! cargo build --release && cargo run --release --example cluster_load -- \
//!     <memory|redis> [events=20000] [subscribers=100] [batch=20] [rate=0 (events/s, 0 = flat out)]
//! ```
//!
//! Starts the release binary as child processes (`target/release/tidings`, or `TIDINGS_BIN`),
//! on `TIDINGS_REDIS_URL` (default redis://127.0.0.1:6379) with a fresh key prefix. Every
//! item carries the publisher's clock in microseconds; each subscriber notes the difference
//! when its frame arrives. Publisher, nodes and subscribers share this machine.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Node {
    child: Child,
    addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_node(args: &[&str]) -> Node {
    let bin = std::env::var("TIDINGS_BIN").unwrap_or_else(|_| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/release/tidings")
    });
    let mut child = Command::new(&bin)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--outbox-messages", "100000"])
        .args(["--outbox-bytes", "100000000", "--max-connections", "100000"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("node did not start")
        .expect("join")
        .expect("read");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("address")
        .to_string();
    let node = Node { child, addr };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("http://{}/readyz", node.addr).parse().expect("uri"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false);
        if ready {
            return node;
        }
        assert!(Instant::now() < deadline, "node never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("memory")
        .to_string();
    let num = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (events, subscribers, batch, rate) = (num(1, 20_000), num(2, 100), num(3, 20), num(4, 0));
    let url =
        std::env::var("TIDINGS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("load{}", now_us());

    let (_a, _b, publish_to, subscribe_to) = if mode == "redis" {
        let flags = [
            "--engine",
            "redis",
            "--redis-url",
            &url,
            "--key-prefix",
            &prefix,
        ];
        let a = start_node(&flags).await;
        let b = start_node(&flags).await;
        let (pa, sb) = (a.addr.clone(), b.addr.clone());
        (Some(a), Some(b), pa, sb)
    } else {
        let a = start_node(&[]).await;
        let addr = a.addr.clone();
        (Some(a), None, addr.clone(), addr)
    };

    // Subscribers.
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers as usize);
    for _ in 0..subscribers {
        let url = format!("ws://{subscribe_to}/websocket");
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
            futures_util::SinkExt::send(
                &mut ws,
                Message::text(r#"{"type":"subscribe","collection":"load"}"#),
            )
            .await
            .expect("subscribe");
            let _init = ws.next().await;
            let _ = ready.send(()).await;
            let mut latencies: Vec<u32> = Vec::with_capacity(events as usize);
            let mut last_at = Instant::now();
            while latencies.len() < events as usize {
                let frame = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
                    Ok(Some(Ok(_))) => continue,
                };
                let now = now_us();
                if let Some(ts) = frame
                    .split("\"ts\":")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|d| d.parse::<u64>().ok())
                {
                    latencies.push(now.saturating_sub(ts) as u32);
                    last_at = Instant::now();
                }
            }
            (latencies, last_at)
        }));
    }
    drop(ready_tx);
    for _ in 0..subscribers {
        ready_rx.recv().await.expect("subscriber ready");
    }

    // Publisher: 4 concurrent connections, batches of `batch`, optionally paced.
    let started = Instant::now();
    let requests = events / batch;
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let addr = publish_to.clone();
        publishers.push(tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut r = p;
            while r < requests {
                if rate > 0 {
                    let due = started + Duration::from_secs_f64((r * batch) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let ts = now_us();
                let body: Vec<_> = (0..batch)
                    .map(|i| json!({"collection":"load","event":"create","data":{"id": r * batch + i, "ts": ts, "pad": "x".repeat(100)}}))
                    .collect();
                let req = hyper::Request::post(format!("http://{addr}/v1/publish"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("json"))))
                    .expect("request");
                let resp = client.request(req).await.expect("publish");
                assert_eq!(resp.status(), 202, "publish refused");
                let _ = resp.into_body().collect().await;
                r += 4;
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    let published_in = started.elapsed();

    let mut all = Vec::new();
    let mut last = started;
    let mut short = 0;
    for t in tasks {
        let (lat, at) = t.await.expect("subscriber");
        if lat.len() < (requests * batch) as usize {
            short += 1;
        }
        last = last.max(at);
        all.extend(lat);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let secs = last.duration_since(started).as_secs_f64();
    println!(
        "{mode}: {} events x {subscribers} subscribers (batch {batch}, rate {}): published in {:.2}s, \
         {} deliveries in {:.2}s = {:.0} deliveries/s; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}; \
         subscribers short of events: {short}",
        requests * batch,
        if rate == 0 { "max".to_string() } else { format!("{rate}/s") },
        published_in.as_secs_f64(),
        all.len(),
        secs,
        all.len() as f64 / secs,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
    );
    if mode == "redis" {
        if let Ok(client) = redis::Client::open(url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: redis::RedisResult<i64> =
                        redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                }
            }
        }
    }
}
