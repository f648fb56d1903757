//! The history's epoch changing over and over while clients resume with `since` from several
//! tasks: nothing hangs (issue 15: a reset used to hold the epoch lock while locking every
//! collection log, and a subscribe held a log while reading the epoch).
//!
//! On the memory engine the reset is injected through the hub's `EventSink::reset`; on Redis
//! a private `redis-server` (never the shared one on 6379) is flushed in a loop. The time
//! bound is a hang detector, not a speed target; a watchdog thread also ends the process if
//! every runtime worker is stuck, when no tokio timer could fire.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::TestServer;
use tidings::backplane::EventSink;
use tidings::config::Engine;
use tidings::Config;

/// Generous: the work takes a few seconds; only a hang takes this long.
const BOUND: Duration = Duration::from_secs(120);

/// Ends the process (failing the test run) if `done` is not set within twice the bound.
fn watchdog(name: &'static str) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + BOUND * 2;
        while std::time::Instant::now() < until {
            if flag.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Straight to the process's stderr: the test harness would swallow `eprintln!`.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{name}: HUNG (every runtime worker blocked); aborting"
        );
        std::process::exit(101);
    });
    done
}

/// `tasks` tasks, each subscribing `rounds` times with `since` set to the node's current
/// epoch (often stale by the time it arrives), reading the `init` and leaving.
async fn resume_storm(server: &TestServer, tasks: usize, rounds: usize) -> (usize, usize) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let state = server.state.clone();
        let url = server.ws_url();
        handles.push(tokio::spawn(async move {
            let (mut recovered, mut lost) = (0, 0);
            for r in 0..rounds {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .expect("connect");
                let epoch = state.hub.history().epoch();
                let msg = json!({"type":"subscribe","collection": format!("c{}", (t + r) % 3),
                    "since": {"epoch": &*epoch, "offset": 0}});
                use futures_util::{SinkExt, StreamExt};
                ws.send(tokio_tungstenite::tungstenite::Message::text(
                    msg.to_string(),
                ))
                .await
                .expect("send");
                let init = loop {
                    let frame = tokio::time::timeout(support::WAIT * 4, ws.next())
                        .await
                        .expect("init within the wait")
                        .expect("open")
                        .expect("frame");
                    if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
                        break serde_json::from_str::<Value>(&t).expect("json");
                    }
                };
                assert_eq!(init["event"], "init", "{init}");
                match init["recovered"].as_bool() {
                    Some(true) => recovered += 1,
                    Some(false) => lost += 1,
                    None => panic!("a `since` is always answered: {init}"),
                }
                let _ = ws.close(None).await;
            }
            (recovered, lost)
        }));
    }
    let mut totals = (0, 0);
    for h in handles {
        let (r, l) = h.await.expect("task");
        totals.0 += r;
        totals.1 += l;
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_engine_resets_racing_resumes_never_hang() {
    let done = watchdog("memory_engine_resets_racing_resumes_never_hang");
    let server = support::start_default().await;
    let stop = Arc::new(AtomicBool::new(false));
    let resetter = {
        let (hub, stop) = (server.state.hub.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                hub.reset(Arc::from(format!("injected{n}")));
            }
            n
        })
    };
    let publisher = {
        let addr = server.addr;
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = support::http_client();
            let mut id = 0u64;
            while !stop.load(Ordering::Acquire) {
                id += 1;
                let body = json!({"collection": format!("c{}", id % 3), "event":"create","data":{"id":id}});
                support::post_with(&client, addr, "/v1/publish", &body).await;
            }
        })
    };
    let (recovered, lost) = tokio::time::timeout(BOUND, resume_storm(&server, 8, 60))
        .await
        .expect("resumes racing epoch resets hung");
    stop.store(true, Ordering::Release);
    let resets = resetter.join().expect("resetter");
    publisher.await.expect("publisher");
    assert_eq!(recovered + lost, 8 * 60);
    assert!(resets > 100, "only {resets} resets raced the resumes");
    assert!(lost > 0, "some resumes must have crossed a reset");
    // Still serving: a fresh subscription and a live event.
    let mut c = server.ws().await;
    c.send(r#"{"type":"subscribe","collection":"c0"}"#).await;
    let init = c.recv_raw().await;
    assert_eq!(
        init["position"]["epoch"],
        &*server.state.hub.history().epoch()
    );
    server
        .publish(json!({"collection":"c0","event":"create","data":{"id":"last"}}))
        .await;
    assert_eq!(c.recv_raw().await["data"][0]["id"], "last");
    done.store(true, Ordering::Release);
}

/// A private `redis-server` without persistence, killed by its pid on drop.
struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    async fn start() -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                // A check that cannot run fails, under `CI=true` or not.
                support::services::prerequisite_missing(
                    &format!("epoch_reset: cannot run redis-server ({e})"),
                    "apt-get install redis-server",
                )
            }
        };
        let redis = PrivateRedis { port, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while redis.admin().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn admin(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timed out")))?
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.get("/readyz").await.0 != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushall_in_a_loop_racing_resumes_never_hangs() {
    let Some(redis) = PrivateRedis::start().await else {
        return;
    };
    let done = watchdog("redis_flushall_in_a_loop_racing_resumes_never_hangs");
    let server = support::start(Config {
        engine: Engine::Redis,
        redis_url: redis.url(),
        key_prefix: "epochreset".into(),
        ..Config::default()
    })
    .await;
    wait_ready(&server).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let mut conn = redis.admin().await.expect("admin");
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let () = redis::cmd("FLUSHALL")
                    .query_async(&mut conn)
                    .await
                    .expect("flushall");
                n += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            n
        })
    };
    let publisher = {
        let (addr, stop) = (server.addr, stop.clone());
        tokio::spawn(async move {
            let mut id = 0u64;
            let client = reqwest_like(addr);
            while !stop.load(Ordering::Acquire) {
                id += 1;
                // 503 while the node re-reads a flushed log is fine; it must answer.
                let body = json!({"collection": format!("c{}", id % 3), "event":"create","data":{"id":id}});
                client(body).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let (recovered, lost) = tokio::time::timeout(BOUND, resume_storm(&server, 6, 40))
        .await
        .expect("resumes racing FLUSHALL hung");
    stop.store(true, Ordering::Release);
    let flushes = flusher.await.expect("flusher");
    publisher.await.expect("publisher");
    assert_eq!(recovered + lost, 6 * 40);
    assert!(flushes > 5, "only {flushes} flushes");
    let changes = server
        .metric("tidings_backplane_epoch_changes_total")
        .await
        .unwrap_or(0.0);
    assert!(changes >= 1.0, "no epoch change seen in {flushes} flushes");
    wait_ready(&server).await;
    let mut c = server.ws().await;
    c.send(r#"{"type":"subscribe","collection":"c0"}"#).await;
    c.recv_raw().await;
    server
        .publish(json!({"collection":"c0","event":"create","data":{"id":"last"}}))
        .await;
    assert_eq!(c.recv_raw().await["data"][0]["id"], "last");
    done.store(true, Ordering::Release);
}

/// A publish that returns its status, whatever it is (no 202 assertion).
fn reqwest_like(
    addr: std::net::SocketAddr,
) -> impl Fn(Value) -> std::pin::Pin<Box<dyn std::future::Future<Output = StatusCode> + Send>> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let client = support::http_client();
    move |body: Value| {
        let client = client.clone();
        Box::pin(async move {
            let req = hyper::Request::post(format!("http://{addr}/v1/publish"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("request");
            tokio::time::timeout(support::WAIT * 4, client.request(req))
                .await
                .expect("publish answered")
                .expect("http")
                .status()
        })
    }
}
