//! `tidings bench churn`: connections come and go as fast as `--subscribers` workers can make
//! them while a publisher keeps events flowing, to show that nothing a connection owns (its
//! task, outbox, subscriptions, socket) outlives it.
//!
//! Each worker repeats one cycle after another, rotating through five endings:
//! - `close`: connect, subscribe, wait for `init`, send a close frame, wait for the answer;
//! - `reset`: as far as `init`, then write half of a text frame and drop the socket with
//!   `SO_LINGER 0`: a TCP reset in the middle of a frame;
//! - `half_close`: as far as `init`, then shut the write side (FIN, no close frame) and read
//!   until the broker ends the connection;
//! - `silent`: as far as `init`, then neither read nor write for `--settle` seconds (the peer
//!   has vanished as far as the broker can tell; on loopback a truly half-open socket cannot
//!   be made), then reset;
//! - `before_init`: reset right after sending the subscribe, before reading anything.
//!
//! The report counts cycles, what each client saw, and what was published, so a caller (the
//! `churn` test, or an operator with `/metrics`) can check the broker's counters agree. This
//! file is self-contained so it can move with the generator.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long one step of a cycle may take before the cycle counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to churn against.
#[derive(Debug, Clone)]
pub struct ChurnPlan {
    /// The broker's address.
    pub addr: SocketAddr,
    /// `ws://host:port/path[?access_token=…]`.
    pub ws_url: String,
    /// `http://host:port/v1/publish`.
    pub publish_uri: String,
    /// `Authorization: Bearer` for publishing, if any.
    pub publish_key: Option<String>,
    /// Collection subscribed and published to.
    pub collection: String,
    /// Concurrent workers, each one connection at a time.
    pub workers: usize,
    /// How long to churn.
    pub duration: Duration,
    /// Events published per second while churning (0: none).
    pub rate: f64,
    /// How long a `silent` connection stays silent.
    pub silent_for: Duration,
}

/// What the clients saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChurnCounts {
    /// Cycles finished (any ending).
    pub cycles: u64,
    /// WebSocket upgrades that succeeded: connections the broker accepted.
    pub upgraded: u64,
    /// `init` frames received.
    pub inits: u64,
    /// Endings, by kind.
    pub closed: u64,
    /// Reset mid-frame.
    pub reset: u64,
    /// Write side shut, no close frame.
    pub half_closed: u64,
    /// Silent, then reset.
    pub silent: u64,
    /// Reset before `init`.
    pub before_init: u64,
    /// Cycles that failed (connect refused, upgrade refused, timeout): `first_error` says why.
    pub failed: u64,
    /// Events the broker accepted (202) while churning.
    pub published: u64,
    /// Publish requests refused or failed.
    pub publish_errors: u64,
}

/// A churn run's outcome.
#[derive(Debug, Clone)]
pub struct ChurnReport {
    /// The counts.
    pub counts: ChurnCounts,
    /// How long it ran.
    pub elapsed: Duration,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl ChurnReport {
    /// Cycles per minute held over the run.
    pub fn cycles_per_minute(&self) -> f64 {
        self.counts.cycles as f64 * 60.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct Shared {
    cycles: AtomicU64,
    upgraded: AtomicU64,
    inits: AtomicU64,
    endings: [AtomicU64; 5],
    failed: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    first_error: parking_lot::Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(why);
        }
    }
}

/// Runs the churn for `plan.duration`, calling `tick` about every second with the cycles so far
/// (for progress lines and RSS samples).
pub async fn run(plan: ChurnPlan, mut tick: impl FnMut(Duration, u64)) -> ChurnReport {
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let until = started + plan.duration;
    let mut workers = Vec::with_capacity(plan.workers);
    for w in 0..plan.workers {
        let (plan, shared) = (plan.clone(), shared.clone());
        workers.push(tokio::spawn(async move {
            let mut n = w as u64;
            while Instant::now() < until {
                let ending = (n % 5) as usize;
                n += 1;
                match tokio::time::timeout(STEP_TIMEOUT * 3, cycle(&plan, &shared, ending)).await {
                    Ok(Ok(())) => {
                        shared.endings[ending].fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => shared.fail(e),
                    Err(_) => shared.fail("a cycle timed out".into()),
                }
                shared.cycles.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let publisher = (plan.rate > 0.0).then(|| {
        let (plan, shared) = (plan.clone(), shared.clone());
        tokio::spawn(async move { publish(&plan, &shared, until).await })
    });
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())).await;
        tick(started.elapsed(), shared.cycles.load(Ordering::Relaxed));
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = publisher {
        let _ = p.await;
    }
    let elapsed = started.elapsed();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let counts = ChurnCounts {
        cycles: get(&shared.cycles),
        upgraded: get(&shared.upgraded),
        inits: get(&shared.inits),
        closed: get(&shared.endings[0]),
        reset: get(&shared.endings[1]),
        half_closed: get(&shared.endings[2]),
        silent: get(&shared.endings[3]),
        before_init: get(&shared.endings[4]),
        failed: get(&shared.failed),
        published: get(&shared.published),
        publish_errors: get(&shared.publish_errors),
    };
    let first_error = shared.first_error.lock().clone();
    ChurnReport {
        counts,
        elapsed,
        first_error,
    }
}

/// One connection's life, ending the `ending` way.
async fn cycle(plan: &ChurnPlan, shared: &Shared, ending: usize) -> Result<(), String> {
    let step = |what: &'static str| move |_| format!("{what} timed out");
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(plan.addr))
        .await
        .map_err(step("connect"))?
        .map_err(|e| format!("connect: {e}"))?;
    let (mut ws, _) = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::client_async(plan.ws_url.as_str(), tcp),
    )
    .await
    .map_err(step("upgrade"))?
    .map_err(|e| format!("upgrade: {e}"))?;
    shared.upgraded.fetch_add(1, Ordering::Relaxed);
    let subscribe = json!({"type":"subscribe","collection": plan.collection, "uid":"churn"});
    ws.send(Message::text(subscribe.to_string()))
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
    if ending == 4 {
        return reset(ws.into_inner());
    }
    loop {
        let frame = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .map_err(step("init"))?
            .ok_or("the broker ended the connection before init")?
            .map_err(|e| format!("before init: {e}"))?;
        if let Message::Text(text) = frame {
            if text.contains("\"init\"") {
                break;
            }
            if text.contains("\"ping\"") {
                continue;
            }
            return Err(format!("expected init, got {text}"));
        }
    }
    shared.inits.fetch_add(1, Ordering::Relaxed);
    match ending {
        0 => {
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            // Read to the broker's close answer (events may come first).
            while let Ok(Some(Ok(_))) = tokio::time::timeout(STEP_TIMEOUT, ws.next()).await {}
            Ok(())
        }
        1 => {
            let mut tcp = ws.into_inner();
            // A masked text frame header announcing 100 bytes, then only 10 of them.
            let mut partial = vec![0x81, 0x80 | 100, 1, 2, 3, 4];
            partial.extend_from_slice(&[b'x'; 10]);
            tcp.write_all(&partial)
                .await
                .map_err(|e| format!("partial frame: {e}"))?;
            reset(tcp)
        }
        2 => {
            let mut tcp = ws.into_inner();
            tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut buf = [0u8; 4096];
            loop {
                use tokio::io::AsyncReadExt;
                match tokio::time::timeout(STEP_TIMEOUT, tcp.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return Err("the broker kept a half-closed connection".into()),
                }
            }
        }
        _ => {
            tokio::time::sleep(plan.silent_for).await;
            reset(ws.into_inner())
        }
    }
}

/// Drops the socket with `SO_LINGER 0`: the kernel sends a reset, not a FIN.
fn reset(tcp: TcpStream) -> Result<(), String> {
    // Zero linger never blocks on drop (tokio deprecates only a non-zero linger).
    tcp.set_zero_linger()
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    drop(tcp);
    Ok(())
}

/// Publishes one event per request at `plan.rate` until `until`.
async fn publish(plan: &ChurnPlan, shared: &Shared, until: Instant) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        seq += 1;
        let body = json!({"collection": plan.collection, "event": "create",
            "data": {"id": seq, "seq": seq}});
        let mut request =
            Request::post(&plan.publish_uri).header("content-type", "application/json");
        if let Some(key) = &plan.publish_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let Ok(request) = request.body(Full::new(Bytes::from(body.to_string()))) else {
            shared.publish_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let ok = match tokio::time::timeout(STEP_TIMEOUT, client.request(request)).await {
            Ok(Ok(response)) => {
                let accepted = response.status() == hyper::StatusCode::ACCEPTED;
                let _ = response.into_body().collect().await;
                accepted
            }
            _ => false,
        };
        let counter = if ok {
            &shared.published
        } else {
            &shared.publish_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// `tidings bench churn`: runs [`run`] against `--url` and prints the counts, cycles per
/// minute and (with `--broker-pid`) the broker's RSS every ten seconds.
pub async fn bench(args: &super::BenchArgs) -> Result<(), super::BenchError> {
    let usage = |m: String| Err(super::BenchError::Usage(m));
    if args.subscribers == 0 {
        return usage("--subscribers must be at least 1".into());
    }
    let duration = args.duration.unwrap_or(10.0);
    if !(duration.is_finite() && duration > 0.0) {
        return usage(format!(
            "--duration must be more than 0 seconds, not {duration}"
        ));
    }
    let rate = args.rate.unwrap_or(100.0);
    if !(rate.is_finite() && rate >= 0.0) {
        return usage(format!(
            "--rate must be 0 or more events per second, not {rate}"
        ));
    }
    if !(args.settle.is_finite() && args.settle >= 0.0) {
        return usage(format!(
            "--settle must be 0 or more seconds, not {}",
            args.settle
        ));
    }
    let broker = super::parse_broker_url("url", &args.url)?;
    let publish_base = match &args.publish_url {
        Some(url) => super::parse_broker_url("publish-url", url)?.http,
        None => broker.http.clone(),
    };
    let authority = broker.authority;
    let ws_path = broker.ws_path.as_deref().unwrap_or(&args.ws_path);
    let addr = super::resolve(&authority).await?;
    let ws_url = super::subscriber_url(&authority, ws_path, args.token.as_deref());
    let broker = args.broker_pid.map(super::Proc::Pid);
    let rss_kib = move || broker.and_then(|p| p.memory()).map(|m| m.rss / 1024);
    let plan = ChurnPlan {
        addr,
        ws_url,
        publish_uri: format!("{publish_base}/v1/publish"),
        publish_key: args.publish_key.clone(),
        collection: args.collection.clone(),
        workers: args.subscribers,
        duration: Duration::from_secs_f64(duration),
        rate,
        // `--settle` is the silent connections' silence here (capped: a worker is busy).
        silent_for: Duration::from_secs_f64(args.settle.min(5.0)),
    };
    let start_rss = rss_kib();
    let mut samples: Vec<(u64, Option<u64>, u64)> = vec![(0, start_rss, 0)];
    let json_out = args.json;
    let report = run(plan, |at, cycles| {
        let secs = at.as_secs();
        if secs > 0 && secs % 10 == 0 && samples.last().is_some_and(|s| s.0 != secs) {
            let rss = rss_kib();
            samples.push((secs, rss, cycles));
            if !json_out {
                eprintln!(
                    "churn: {secs:>5} s  {cycles:>9} cycles  broker RSS {}",
                    rss.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
                );
            }
        }
    })
    .await;
    let end_rss = rss_kib();
    let c = &report.counts;
    let out = json!({
        "scenario": "churn",
        "workers": args.subscribers,
        "elapsed_seconds": report.elapsed.as_secs_f64(),
        "cycles": c.cycles,
        "cycles_per_minute": report.cycles_per_minute(),
        "upgraded": c.upgraded,
        "inits": c.inits,
        "endings": {"close": c.closed, "reset_mid_frame": c.reset, "half_close": c.half_closed,
                    "silent_then_reset": c.silent, "reset_before_init": c.before_init},
        "failed": c.failed,
        "first_error": report.first_error,
        "events_published": c.published,
        "publish_errors": c.publish_errors,
        "broker_rss_kib_start": start_rss,
        "broker_rss_kib_end": end_rss,
        "broker_rss_kib_every_10s": samples.iter().map(|s| json!([s.0, s.1, s.2])).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    Ok(())
}
