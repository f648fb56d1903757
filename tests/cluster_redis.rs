//! Several nodes over one Redis (`--engine redis`): one order for every node, resume on any
//! node, idempotency across nodes, history restored by a node started late, and what
//! happens when Redis restarts or drops the connections.
//!
//! Every test starts a private `redis-server` on a free port (`support::services`), and kills
//! only that process. Without `redis-server` a test fails with `PREREQUISITE MISSING`.

mod support;

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::process::Proc;
use support::services::{unique_prefix, PrivateRedis};
use support::{TestServer, WsClient};
use tidings::config::Engine;
use tidings::history::HistoryLimits;
use tidings::Config;

fn config(url: &str, prefix: &str) -> Config {
    Config {
        engine: Engine::Redis,
        redis_url: url.to_string(),
        key_prefix: prefix.to_string(),
        ..Config::default()
    }
}

/// Starts a node and waits until it is ready.
async fn node(config: Config) -> TestServer {
    support::start_ready(config).await
}

/// `n` creates to `orders` with ids `from..from+n`, tenant `id % 3`, one request.
async fn publish_orders(server: &TestServer, from: u64, n: u64) -> Vec<(String, u64)> {
    let events: Vec<Value> = (from..from + n)
        .map(|id| json!({"collection":"orders","event":"create","data":{"id":id,"tenant":id % 3}}))
        .collect();
    positions(&server.publish(Value::Array(events)).await)
}

/// (epoch, offset) of each event of a publish answer.
fn positions(answer: &Value) -> Vec<(String, u64)> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["epoch"].as_str().expect("epoch").to_string(),
                e["offset"].as_u64().expect("offset"),
            )
        })
        .collect()
}

/// Subscribes to `orders` (optionally filtered to tenant 1, optionally resuming) and returns
/// the init frame.
async fn subscribe(client: &mut WsClient, tenant1: bool, since: Option<&Value>) -> Value {
    let mut msg = json!({"type":"subscribe","collection":"orders"});
    if tenant1 {
        msg["query"] = json!({"filter":{"tenant":{"_eq":1}},"fields":["id"]});
    }
    if let Some(since) = since {
        msg["since"] = since.clone();
    }
    client.send(&msg.to_string()).await;
    let init = client.recv_raw().await;
    assert_eq!(init["event"], "init", "{init}");
    init
}

/// Receives `n` create frames: (item id, epoch, offset) of each.
async fn receive(client: &mut WsClient, n: usize) -> Vec<(u64, String, u64)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let frame = client.recv_raw().await;
        assert_eq!(frame["event"], "create", "{frame}");
        out.push((
            frame["data"][0]["id"].as_u64().expect("id"),
            frame["position"]["epoch"]
                .as_str()
                .expect("epoch")
                .to_string(),
            frame["position"]["offset"].as_u64().expect("offset"),
        ));
    }
    out
}

#[tokio::test]
async fn a_bad_redis_url_is_a_config_error_naming_the_flag() {
    let err = tidings::App::new(Config {
        engine: Engine::Redis,
        redis_url: "nope://x".into(),
        ..Config::default()
    })
    .expect_err("bad url");
    match err {
        tidings::app::AppError::Config(e) => assert_eq!(e.flag, "redis-url"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn the_binary_exits_2_naming_redis_url_for_a_bad_url() {
    let mut proc = Proc::spawn(
        &[
            "serve",
            "--engine",
            "redis",
            "--redis-url",
            "nope://x",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let status = proc.wait_exit(Duration::from_secs(10));
    let stderr = proc.stderr.seen.join("\n");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--redis-url"), "{stderr}");
}

#[tokio::test]
async fn every_node_delivers_every_event_in_the_order_the_publisher_was_answered() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(config(&url, &prefix)).await;
    let b = node(config(&url, &prefix)).await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    let init_b = subscribe(&mut on_b, false, None).await;
    subscribe(&mut on_a, false, None).await;
    assert_eq!(init_b["position"]["offset"], 0);

    let mut answered = Vec::new();
    for batch in 0..4 {
        answered.extend(publish_orders(&a, 1 + batch * 50, 50).await);
    }
    let epoch = answered[0].0.clone();
    assert_eq!(
        epoch, init_b["position"]["epoch"],
        "one epoch for the cluster"
    );
    let expected: Vec<(u64, String, u64)> = answered
        .iter()
        .enumerate()
        .map(|(i, (e, o))| (i as u64 + 1, e.clone(), *o))
        .collect();
    assert_eq!(
        expected.iter().map(|e| e.2).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    assert_eq!(receive(&mut on_b, 200).await, expected, "node B");
    assert_eq!(receive(&mut on_a, 200).await, expected, "node A");
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(10)).await;
    assert_eq!(a.metric("tidings_backplane_ready").await, Some(1.0));
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(config(&url, &prefix)).await;
    let b = node(config(&url, &prefix)).await;
    let mut c = a.ws().await;
    subscribe(&mut c, true, None).await;
    publish_orders(&a, 1, 10).await;
    // Tenant 1 among 1..=10: 1, 4, 7, 10.
    let seen = receive(&mut c, 4).await;
    let (id, epoch, offset) = seen.last().cloned().expect("seen");
    assert_eq!((id, offset), (10, 10));
    c.close().await;

    for batch in 0..10 {
        let node = if batch % 2 == 0 { &a } else { &b };
        publish_orders(node, 11 + batch * 100, 100).await;
    }
    let mut back = b.ws().await;
    let since = json!({"epoch": epoch, "offset": offset});
    let init = subscribe(&mut back, true, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let expected: Vec<(u64, String, u64)> = (11..=1010)
        .filter(|id| id % 3 == 1)
        .map(|id| (id, epoch.clone(), id))
        .collect();
    assert_eq!(receive(&mut back, expected.len()).await, expected);
    // Then live, from the other node.
    publish_orders(&a, 1011, 3).await;
    assert_eq!(receive(&mut back, 1).await, [(1012, epoch.clone(), 1012)]);
    back.expect_silence(Duration::from_millis(200)).await;
}

/// The drain (`--shutdown-delay`): a subscriber of a node that shuts down keeps getting events
/// published to either node during the delay, then gets `1001` with a position that another
/// node resumes from with exactly the matching events published after it.
#[tokio::test]
async fn a_draining_node_hands_its_subscribers_a_position_another_node_resumes() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(Config {
        shutdown_delay: Duration::from_secs(1),
        ..config(&url, &prefix)
    })
    .await;
    let b = node(config(&url, &prefix)).await;
    let mut c = a.ws().await;
    subscribe(&mut c, true, None).await;
    publish_orders(&a, 1, 3).await;
    assert_eq!(receive(&mut c, 1).await[0].0, 1);

    let mut a = a;
    let stopped = a.begin_shutdown();
    a.wait_ready(false).await;
    // During the delay: through the draining node and through the other one.
    publish_orders(&a, 4, 3).await;
    publish_orders(&b, 7, 3).await;
    let during: Vec<u64> = receive(&mut c, 2).await.iter().map(|r| r.0).collect();
    assert_eq!(during, [4, 7]);
    let since = match c.next().await {
        support::Received::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
            let position = frame
                .reason
                .as_str()
                .strip_prefix("server shutting down: reconnect elsewhere since ")
                .unwrap_or_else(|| panic!("no position in {:?}", frame.reason))
                .to_owned();
            serde_json::from_str::<Value>(&position).expect("the position is JSON")
        }
        other => panic!("expected a 1001 close, got {other:?}"),
    };
    // Events 8 and 9 match no frame of this subscription: the close position covers them
    // (at least 7, the last frame's), which the last frame's position could not.
    assert!(since["offset"].as_u64().expect("offset") >= 7, "{since}");
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the node stops after the drain")
        .expect("serve");

    publish_orders(&b, 10, 3).await;
    let mut back = b.ws().await;
    let init = subscribe(&mut back, true, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let replayed: Vec<u64> = receive(&mut back, 1).await.iter().map(|r| r.0).collect();
    assert_eq!(replayed, [10]);
    back.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn an_idempotency_key_is_shared_by_the_cluster() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(config(&url, &prefix)).await;
    let b = node(config(&url, &prefix)).await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_a, false, None).await;
    subscribe(&mut on_b, false, None).await;
    publish_orders(&a, 1, 2).await;
    let event =
        json!({"collection":"orders","event":"create","data":{"id":3},"idempotency_key":"order-3"});
    let first = a.publish(event.clone()).await;
    let again = b.publish(event).await;
    assert_eq!(first["events"][0]["offset"], 3);
    assert!(first["events"][0].get("duplicate").is_none());
    assert_eq!(again["events"][0]["offset"], 3);
    assert_eq!(again["events"][0]["epoch"], first["events"][0]["epoch"]);
    assert_eq!(again["events"][0]["duplicate"], true);
    support::schema_check_http(&again);
    // A batch repeating a key within itself: the second is the first's duplicate.
    let batch = json!([
        {"collection":"orders","event":"create","data":{"id":4},"idempotency_key":"order-4"},
        {"collection":"orders","event":"create","data":{"id":4},"idempotency_key":"order-4"}
    ]);
    let answer = b.publish(batch).await;
    assert_eq!(answer["events"][1]["offset"], 4);
    assert_eq!(answer["events"][1]["duplicate"], true);
    for client in [&mut on_a, &mut on_b] {
        let got: Vec<u64> = receive(client, 4).await.iter().map(|e| e.0).collect();
        assert_eq!(got, [1, 2, 3, 4]);
        client.expect_silence(Duration::from_millis(200)).await;
    }
    assert_eq!(
        b.metric("tidings_publish_duplicates_total").await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_node_started_late_restores_the_history_from_redis() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(config(&url, &prefix)).await;
    let answered = publish_orders(&a, 1, 50).await;
    let epoch = answered[0].0.clone();
    // Another collection with one event, and history limited to 30 events.
    a.publish(json!({"collection":"items","event":"create","data":{"id":1}}))
        .await;
    let c = node(Config {
        history: HistoryLimits {
            max_events: 30,
            max_age: Duration::from_secs(300),
            max_bytes: 64 * 1024 * 1024,
        },
        ..config(&url, &prefix)
    })
    .await;
    assert_eq!(
        c.metric("tidings_backplane_restored_events_total").await,
        Some(31.0)
    );
    let mut fresh = c.ws().await;
    let init = subscribe(&mut fresh, false, None).await;
    assert_eq!(init["position"], json!({"epoch": epoch, "offset": 50}));

    let mut early = c.ws().await;
    let since = json!({"epoch": epoch, "offset": 25});
    let init = subscribe(&mut early, false, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let expected: Vec<(u64, String, u64)> = (26..=50).map(|i| (i, epoch.clone(), i)).collect();
    assert_eq!(receive(&mut early, 25).await, expected);
    // Older than the 30 restored: lost.
    let mut older = c.ws().await;
    let since = json!({"epoch": epoch, "offset": 10});
    let init = subscribe(&mut older, false, Some(&since)).await;
    assert_eq!(init["recovered"], false, "{init}");
    // And it goes on live.
    publish_orders(&a, 51, 1).await;
    assert_eq!(receive(&mut early, 1).await, [(51, epoch.clone(), 51)]);
    assert_eq!(receive(&mut fresh, 1).await, [(51, epoch.clone(), 51)]);
}

#[tokio::test]
async fn a_redis_restart_without_persistence_starts_a_new_epoch_on_every_node() {
    let mut redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = node(config(&redis.url(), &prefix)).await;
    let b = node(config(&redis.url(), &prefix)).await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_a, false, None).await;
    subscribe(&mut on_b, false, None).await;
    let before = publish_orders(&a, 1, 5).await;
    let old_epoch = before[0].0.clone();
    assert_eq!(receive(&mut on_b, 5).await.len(), 5);
    assert_eq!(receive(&mut on_a, 5).await.len(), 5);

    redis.kill();
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    assert_eq!(a.metric("tidings_backplane_ready").await, Some(0.0));
    // Refused at once, not accepted, not hanging (the helper bounds the wait).
    let started = std::time::Instant::now();
    let (status, answer) = a
        .post(
            "/v1/publish",
            &json!({"collection":"orders","event":"create","data":{"id":6}}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));

    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let after = publish_orders(&b, 7, 3).await;
    let new_epoch = after[0].0.clone();
    assert_ne!(new_epoch, old_epoch, "Redis lost the log: a new epoch");
    assert_eq!(after.iter().map(|p| p.1).collect::<Vec<_>>(), [1, 2, 3]);
    let expected: Vec<(u64, String, u64)> =
        (7..=9).map(|id| (id, new_epoch.clone(), id - 6)).collect();
    assert_eq!(receive(&mut on_a, 3).await, expected, "node A");
    assert_eq!(receive(&mut on_b, 3).await, expected, "node B");
    for server in [&a, &b] {
        assert_eq!(
            server.metric("tidings_backplane_epoch_changes_total").await,
            Some(1.0)
        );
        assert!(server.metric("tidings_backplane_reconnects_total").await >= Some(1.0));
        // A position from the lost log cannot be resumed.
        let mut c = server.ws().await;
        let since = json!({"epoch": old_epoch, "offset": 5});
        let init = subscribe(&mut c, false, Some(&since)).await;
        assert_eq!(init["recovered"], false, "{init}");
        assert_eq!(init["position"], json!({"epoch": new_epoch, "offset": 3}));
        // One of the new log resumes.
        let mut c = server.ws().await;
        let since = json!({"epoch": new_epoch, "offset": 1});
        let init = subscribe(&mut c, false, Some(&since)).await;
        assert_eq!(init["recovered"], true, "{init}");
        assert_eq!(receive(&mut c, 2).await, expected[1..]);
    }
}

#[tokio::test]
async fn dropped_connections_lose_nothing_when_redis_keeps_its_data() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = node(config(&redis.url(), &prefix)).await;
    let b = node(config(&redis.url(), &prefix)).await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    let init = subscribe(&mut on_a, false, None).await;
    subscribe(&mut on_b, false, None).await;
    let epoch = init["position"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();

    // One event at a time, alternating nodes, each with an idempotency key so a retry after
    // a 503 (the script may have run before the connection dropped) cannot add a second copy.
    const N: u64 = 300;
    let publisher = {
        let (a, b) = (a.addr, b.addr);
        tokio::spawn(async move {
            let client = support::http_client();
            let mut offsets = Vec::new();
            for id in 1..=N {
                let body = json!({"collection":"orders","event":"create","data":{"id":id},"idempotency_key":format!("k{id}")});
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                let answer = loop {
                    let addr = if id % 2 == 0 { a } else { b };
                    let request = hyper::Request::post(format!("http://{addr}/v1/publish"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(hyper::body::Bytes::from(
                            body.to_string(),
                        )))
                        .expect("request");
                    let response = tokio::time::timeout(support::WAIT, client.request(request))
                        .await
                        .expect("publish timed out")
                        .expect("publish");
                    let status = response.status();
                    let bytes = http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .expect("body")
                        .to_bytes();
                    if status == StatusCode::ACCEPTED {
                        break serde_json::from_slice::<Value>(&bytes).expect("json");
                    }
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                    assert!(tokio::time::Instant::now() < deadline, "never accepted");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                offsets.push(answer["events"][0]["offset"].as_u64().expect("offset"));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            offsets
        })
    };
    // The readers only (publishes keep being accepted while no node reads), then everything.
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(80)).await;
        let kind = if round % 3 == 2 { "all" } else { ":read" };
        redis.kill_clients(kind).await;
    }
    let offsets = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher timed out")
        .expect("publisher");
    assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "one offset per event");
    let expected: Vec<(u64, String, u64)> = (1..=N).map(|i| (i, epoch.clone(), i)).collect();
    assert_eq!(receive(&mut on_a, N as usize).await, expected, "node A");
    assert_eq!(receive(&mut on_b, N as usize).await, expected, "node B");
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(10)).await;
    for server in [&a, &b] {
        assert!(server.metric("tidings_backplane_reconnects_total").await >= Some(2.0));
        assert_eq!(
            server.metric("tidings_backplane_epoch_changes_total").await,
            Some(0.0)
        );
    }
}

#[tokio::test]
async fn a_log_that_went_back_or_was_flushed_gets_a_new_epoch() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = node(config(&redis.url(), &prefix)).await;
    let b = node(config(&redis.url(), &prefix)).await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_a, false, None).await;
    subscribe(&mut on_b, false, None).await;
    let first = publish_orders(&a, 1, 5).await[0].0.clone();
    assert_eq!(receive(&mut on_a, 5).await.len(), 5);
    assert_eq!(receive(&mut on_b, 5).await.len(), 5);

    // As if Redis came back from a snapshot taken after offset 2: same epoch, shorter log.
    let mut conn = redis.admin().await;
    let log = format!("{prefix}:log:orders");
    let kept: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&log)
        .arg("-")
        .arg("2-0")
        .query_async(&mut conn)
        .await
        .expect("xrange");
    let _: i64 = redis::cmd("DEL")
        .arg(&log)
        .query_async(&mut conn)
        .await
        .expect("del");
    for (id, fields) in kept {
        let _: String = redis::cmd("XADD")
            .arg(&log)
            .arg(id)
            .arg(&fields[0].0)
            .arg(&fields[0].1)
            .query_async(&mut conn)
            .await
            .expect("xadd");
    }
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{prefix}:offsets"))
        .arg("orders")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("hset");
    redis.kill_clients("all").await;
    for server in [&a, &b] {
        server
            .wait_for_cluster_metric("tidings_backplane_epoch_changes_total", 1.0)
            .await;
        server.wait_ready(true).await;
    }
    let second = publish_orders(&b, 6, 1).await;
    assert_ne!(second[0].0, first);
    assert_eq!(second[0].1, 1, "the new log starts empty");
    let expected = vec![(6, second[0].0.clone(), 1)];
    assert_eq!(receive(&mut on_a, 1).await, expected);
    assert_eq!(receive(&mut on_b, 1).await, expected);

    // Flushed under live connections: the nodes notice within a read and agree on a new one.
    let mut conn = redis.admin().await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flushall");
    for server in [&a, &b] {
        server
            .wait_for_cluster_metric("tidings_backplane_epoch_changes_total", 2.0)
            .await;
        server.wait_ready(true).await;
    }
    let third = publish_orders(&a, 7, 1).await;
    assert_ne!(third[0].0, second[0].0);
    let expected = vec![(7, third[0].0.clone(), 1)];
    assert_eq!(receive(&mut on_a, 1).await, expected);
    assert_eq!(receive(&mut on_b, 1).await, expected);
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_collection_without_events_resumes_from_zero_on_any_node() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let prefix = unique_prefix();
    let a = node(config(&url, &prefix)).await;
    // Some other collection has events; `orders` has none yet.
    a.publish(json!({"collection":"items","event":"create","data":{"id":1}}))
        .await;
    let b = node(config(&url, &prefix)).await;
    let mut first = a.ws().await;
    let init = subscribe(&mut first, false, None).await;
    let position = init["position"].clone();
    assert_eq!(position["offset"], 0);
    first.close().await;
    let mut on_b = b.ws().await;
    let init = subscribe(&mut on_b, false, Some(&position)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let mut on_a = a.ws().await;
    let init = subscribe(&mut on_a, false, Some(&position)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let epoch = position["epoch"].as_str().expect("epoch").to_string();
    publish_orders(&a, 1, 1).await;
    assert_eq!(receive(&mut on_b, 1).await, [(1, epoch.clone(), 1)]);
    assert_eq!(receive(&mut on_a, 1).await, [(1, epoch, 1)]);
}

#[test]
fn without_redis_server_the_suite_fails_saying_so() {
    support::services::assert_fails_without_prerequisite(
        "every_node_delivers_every_event_in_the_order_the_publisher_was_answered",
        &[("TIDINGS_TEST_REDIS_SERVER", "/nonexistent/redis-server")],
    );
}
