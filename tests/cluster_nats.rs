//! Several nodes over a real NATS JetStream server (`--engine nats`): one order for every
//! node, resume across nodes, idempotency across nodes, history restored by a late node, a
//! node killed with SIGKILL, the NATS connection dropped and restored, the stream recreated.
//!
//! Every test starts a private `nats-server -js` on a free port with a store of its own
//! (`support::services`), and kills only that process. Without `nats-server` a test fails
//! with `PREREQUISITE MISSING`. Every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{json, Value};
use support::process::{Broker, Proc};
use support::services::{free_port, unique_prefix, PrivateNats};
use support::{Received, TestServer, WsClient};
use tidings::config::Engine;
use tidings::Config;

/// Bound on a node becoming ready, or NATS coming back.
const READY_WAIT: Duration = support::CLUSTER_WAIT;

// ---------------------------------------------------------------------------------------------
// NATS and nodes
// ---------------------------------------------------------------------------------------------

fn nats_config(url: &str, prefix: &str) -> Config {
    Config {
        engine: Engine::Nats,
        nats_url: url.to_string(),
        key_prefix: prefix.to_string(),
        ..Config::default()
    }
}

/// An in-process node of the cluster `prefix`, once ready.
async fn node(url: &str, prefix: &str) -> TestServer {
    support::start_ready(nats_config(url, prefix)).await
}

/// Deletes the stream of `prefix` (best effort).
async fn delete_stream(url: &str, prefix: &str) {
    let cleanup = async {
        let client = async_nats::connect(url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        js.delete_stream(format!("TIDINGS_{prefix}")).await.ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
}

// ---------------------------------------------------------------------------------------------
// Publishing and receiving
// ---------------------------------------------------------------------------------------------

/// `n` creates of `orders` with ids `from..from+n`, tenant `id % 3`, each followed by a
/// create of `invoices`: the stream sequence is shared by all collections, so `orders`'
/// offsets have gaps, as they do in real use.
fn orders(from: u64, n: u64) -> Value {
    Value::Array(
        (from..from + n)
            .flat_map(|id| {
                [
                    json!({"collection":"orders","event":"create","data":{"id":id,"tenant":id % 3}}),
                    json!({"collection":"invoices","event":"create","data":{"id":id}}),
                ]
            })
            .collect(),
    )
}

/// Publishes `orders(from, n)` and returns the offsets answered, in order.
async fn publish_orders(server: &TestServer, from: u64, n: u64) -> Vec<u64> {
    let answer = server.publish(orders(from, n)).await;
    offsets_of(&answer)
}

/// The offsets answered for the `orders` events, in order.
fn offsets_of(answer: &Value) -> Vec<u64> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["collection"] == "orders")
        .map(|e| e["offset"].as_u64().expect("offset"))
        .collect()
}

fn epoch_of(answer: &Value) -> String {
    answer["events"][0]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string()
}

/// Subscribes to `orders` (optionally filtered, from `since`) and returns the `init` frame.
async fn subscribe(client: &mut WsClient, filter: Option<Value>, since: Option<&Value>) -> Value {
    let mut msg = json!({"type":"subscribe","collection":"orders","uid":"o"});
    if let Some(filter) = filter {
        msg["query"] = json!({"filter": filter, "fields": ["id"]});
    }
    if let Some(since) = since {
        msg["since"] = since.clone();
    }
    client.send(&msg.to_string()).await;
    let init = client.recv_raw().await;
    assert_eq!(init["event"], "init", "{init}");
    init
}

/// Receives `n` event frames: (id of the single item, offset) of each.
async fn ids_and_offsets(client: &mut WsClient, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let frame = client.recv_raw().await;
        out.push(id_and_offset(&frame));
    }
    out
}

fn id_and_offset(frame: &Value) -> (u64, u64) {
    assert_eq!(frame["event"], "create", "{frame}");
    (
        frame["data"][0]["id"].as_u64().expect("id"),
        frame["position"]["offset"].as_u64().expect("offset"),
    )
}

async fn ws_at(url: &str) -> WsClient {
    let (ws, _) = tokio::time::timeout(support::WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    WsClient { ws }
}

// ---------------------------------------------------------------------------------------------
// 1-4: nodes in one process
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_nodes_deliver_every_event_in_one_order_with_the_publishers_offsets() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let mut on_b = b.ws().await;
    let mut on_a = a.ws().await;
    let init_b = subscribe(&mut on_b, None, None).await;
    subscribe(&mut on_a, None, None).await;

    let mut expected = Vec::new();
    let mut epoch = String::new();
    for batch in 0..4 {
        let from = 1 + batch * 50;
        let answer = a.publish(orders(from, 50)).await;
        epoch = epoch_of(&answer);
        expected.extend((from..from + 50).zip(offsets_of(&answer)));
    }
    assert!(
        expected.windows(2).all(|w| w[0].1 < w[1].1),
        "offsets increase: {expected:?}"
    );
    assert_eq!(init_b["position"]["epoch"], epoch.as_str(), "one epoch");
    assert_eq!(ids_and_offsets(&mut on_b, 200).await, expected);
    assert_eq!(ids_and_offsets(&mut on_a, 200).await, expected);
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_subscriber_resumes_on_another_node_with_exactly_its_missed_events() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let tenant_1 = json!({"tenant": {"_eq": 1}});

    let mut c = a.ws().await;
    subscribe(&mut c, Some(tenant_1.clone()), None).await;
    let first = a.publish(orders(1, 10)).await;
    let epoch = epoch_of(&first);
    let mut offset_of: Vec<(u64, u64)> = (1..=10).zip(offsets_of(&first)).collect();
    // Tenant 1 among ids 1..=10: 1, 4, 7, 10.
    let seen = ids_and_offsets(&mut c, 4).await;
    let last = seen.last().expect("seen").1;
    c.close().await;

    // 1,000 events while away, through both nodes.
    for batch in 0..10u64 {
        let from = 11 + batch * 100;
        let via = if batch % 2 == 0 { &a } else { &b };
        let offsets = publish_orders(via, from, 100).await;
        offset_of.extend((from..from + 100).zip(offsets));
    }
    let mut back = b.ws().await;
    let since = json!({"epoch": epoch, "offset": last});
    let init = subscribe(&mut back, Some(tenant_1), Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let expected: Vec<(u64, u64)> = offset_of
        .iter()
        .copied()
        .filter(|(id, _)| id % 3 == 1 && *id > 10)
        .collect();
    assert_eq!(ids_and_offsets(&mut back, expected.len()).await, expected);
    // Then live, with no gap and no duplicate.
    let live = publish_orders(&a, 1011, 3).await;
    assert_eq!(ids_and_offsets(&mut back, 1).await, [(1012, live[1])]);
    back.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn an_idempotency_key_is_deduplicated_across_nodes() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_b, None, None).await;

    let event =
        json!({"collection":"orders","event":"create","data":{"id":1},"idempotency_key":"order-1"});
    let first = a.publish(event.clone()).await;
    let again = b.publish(event.clone()).await;
    assert!(first["events"][0].get("duplicate").is_none(), "{first}");
    assert_eq!(again["events"][0]["duplicate"], true, "{again}");
    assert_eq!(again["events"][0]["offset"], first["events"][0]["offset"]);
    assert_eq!(again["events"][0]["epoch"], first["events"][0]["epoch"]);
    support::schema_check_http(&again);
    // The same key in another collection is another event.
    let other = a
        .publish(json!({"collection":"invoices","event":"create","data":{"id":1},"idempotency_key":"order-1"}))
        .await;
    assert!(other["events"][0].get("duplicate").is_none(), "{other}");
    // A batch repeating a key: the second is the first.
    let batch = b
        .publish(json!([
            {"collection":"orders","event":"create","data":{"id":2},"idempotency_key":"order-2"},
            {"collection":"orders","event":"create","data":{"id":2},"idempotency_key":"order-2"}
        ]))
        .await;
    assert_eq!(batch["events"][1]["duplicate"], true, "{batch}");
    assert_eq!(batch["events"][1]["offset"], batch["events"][0]["offset"]);

    let got = ids_and_offsets(&mut on_b, 2).await;
    assert_eq!(
        got,
        [
            (1, first["events"][0]["offset"].as_u64().expect("offset")),
            (2, batch["events"][0]["offset"].as_u64().expect("offset"))
        ]
    );
    on_b.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        b.metric("tidings_publish_duplicates_total").await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_node_started_late_restores_the_history_and_resumes_from_it() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let answer = a.publish(orders(1, 30)).await;
    let epoch = epoch_of(&answer);
    let offsets = offsets_of(&answer);

    let late = node(&url, &prefix).await;
    // 30 orders and the 30 invoices between them.
    assert_eq!(
        late.metric("tidings_backplane_restored_events_total").await,
        Some(60.0)
    );
    let mut c = late.ws().await;
    let since = json!({"epoch": epoch, "offset": offsets[4]});
    let init = subscribe(&mut c, None, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    assert_eq!(init["position"]["offset"], offsets[29]);
    let expected: Vec<(u64, u64)> = (6..=30).zip(offsets[5..].iter().copied()).collect();
    assert_eq!(ids_and_offsets(&mut c, 25).await, expected);
    // Restored events are history only: a fresh subscriber gets nothing replayed.
    let mut fresh = late.ws().await;
    subscribe(&mut fresh, None, None).await;
    fresh.expect_silence(Duration::from_millis(200)).await;
    // And live events still flow on the late node.
    let live = publish_orders(&a, 31, 1).await;
    assert_eq!(ids_and_offsets(&mut fresh, 1).await, [(31, live[0])]);
}

#[tokio::test]
async fn deleting_the_stream_starts_a_new_epoch_on_every_node() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let old = a.publish(orders(1, 5)).await;
    let old_epoch = epoch_of(&old);
    let last = *offsets_of(&old).last().expect("offsets");
    delete_stream(&url, &prefix).await;

    // Both nodes notice (periodic check or missed heartbeats), recreate the stream and
    // reset their history into the new epoch.
    for server in [&a, &b] {
        server
            .wait_for_cluster_metric("tidings_backplane_epoch_changes_total", 1.0)
            .await;
        server.wait_ready(true).await;
    }
    let deadline = Instant::now() + READY_WAIT;
    let new = loop {
        let (status, answer) = a.post("/v1/publish", &orders(6, 1)).await;
        if status == StatusCode::ACCEPTED {
            break answer;
        }
        assert!(Instant::now() < deadline, "publish still refused: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(epoch_of(&new), old_epoch);
    let mut c = b.ws().await;
    let since = json!({"epoch": old_epoch, "offset": last});
    let init = subscribe(&mut c, None, Some(&since)).await;
    assert_eq!(
        init["recovered"], false,
        "an old-epoch position is lost: {init}"
    );
    assert_eq!(init["position"]["epoch"], epoch_of(&new).as_str());
}

#[tokio::test]
async fn a_node_without_nats_serves_but_is_not_ready_and_refuses_publishes() {
    // A port nothing listens on.
    let port = free_port();
    let server = support::start(nats_config(
        &format!("nats://127.0.0.1:{port}"),
        &unique_prefix(),
    ))
    .await;
    assert!(!server.state.backplane.is_ready());
    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let started = Instant::now();
    let (status, answer) = server.post("/v1/publish", &orders(1, 1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "SERVICE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(server.metric("tidings_backplane_ready").await, Some(0.0));
    // Subscriptions still work (they will get events once NATS is back), but the node's
    // history cannot be trusted yet: the init position is a provisional one, and a resume is
    // answered as lost rather than replayed from an incomplete history.
    let mut c = server.ws().await;
    let init = subscribe(&mut c, None, None).await;
    assert_ne!(
        init["position"]["epoch"],
        server.state.hub.history().epoch().as_ref()
    );
    let mut again = server.ws().await;
    let since = json!({"epoch": server.state.hub.history().epoch().as_ref(), "offset": 0});
    let init = subscribe(&mut again, None, Some(&since)).await;
    assert_eq!(init["recovered"], false, "{init}");
    server.shutdown().await;
}

#[test]
fn a_bad_nats_url_is_a_configuration_error_naming_the_flag() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = runtime.enter();
    for url in ["http://127.0.0.1:4222", "nats://[::1", ""] {
        let config = nats_config(url, "p");
        match tidings::App::new(config) {
            Err(tidings::app::AppError::Config(e)) => assert_eq!(e.flag, "nats-url", "{url}"),
            other => panic!("{url}: expected a nats-url error, got {other:?}"),
        }
    }
    // The binary exits 2 naming the flag.
    let mut proc = Proc::spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--engine",
            "nats",
            "--nats-url",
            "redis://127.0.0.1:6379",
        ],
        &[],
    );
    let status = proc.wait_exit(support::WAIT);
    assert_eq!(status.code(), Some(2));
    let stderr = proc.stderr.seen.join("\n");
    assert!(stderr.contains("--nats-url"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 5: a node killed with SIGKILL (real processes)
// ---------------------------------------------------------------------------------------------

/// `tidings serve` on the cluster `prefix`, with the address it printed.
fn spawn_node(url: &str, prefix: &str) -> (Broker, SocketAddr) {
    let broker = Broker::start(&[
        "--engine",
        "nats",
        "--nats-url",
        url,
        "--key-prefix",
        prefix,
    ]);
    let addr = broker.addr;
    (broker, addr)
}

async fn http_status(client: &support::Http, addr: SocketAddr, path: &str) -> Option<u16> {
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .expect("request");
    match tokio::time::timeout(support::WAIT, client.request(req)).await {
        Ok(Ok(resp)) => Some(resp.status().as_u16()),
        _ => None,
    }
}

async fn wait_process_ready(client: &support::Http, addr: SocketAddr) {
    let deadline = Instant::now() + READY_WAIT;
    while http_status(client, addr, "/readyz").await != Some(200) {
        assert!(Instant::now() < deadline, "{addr} not ready in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_of_a_node_killed_with_sigkill_resumes_on_another_without_loss() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let http = support::http_client();
    let (mut node1, addr1) = spawn_node(&url, &prefix);
    let (node2, addr2) = spawn_node(&url, &prefix);
    wait_process_ready(&http, addr1).await;
    wait_process_ready(&http, addr2).await;

    let mut c = ws_at(&format!("ws://{addr1}/websocket")).await;
    subscribe(&mut c, None, None).await;

    // Publish 600 events to node 2, in batches of 5, while the client's node dies.
    const TOTAL: u64 = 600;
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let published = published.clone();
        tokio::spawn(async move {
            let http = support::http_client();
            let mut from = 1;
            while from <= TOTAL {
                support::post_with(&http, addr2, "/v1/publish", &orders(from, 5)).await;
                published.store(from + 4, Ordering::Release);
                from += 5;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut received: Vec<(u64, u64)> = Vec::new();
    let mut epoch = String::new();
    while received.len() < 100 {
        let frame = c.recv_raw().await;
        epoch = frame["position"]["epoch"].as_str().expect("epoch").into();
        received.push(id_and_offset(&frame));
    }
    node1.proc.kill();
    // What was already on its way is still read, as a real client would, until the socket
    // ends.
    while let Received::Text(t) = c.next().await {
        let frame: Value = serde_json::from_str(&t).expect("json");
        received.push(id_and_offset(&frame));
    }
    let (last_id, last) = *received.last().expect("received");
    // The client is away while at least 50 more events are published.
    let deadline = Instant::now() + READY_WAIT;
    while published.load(Ordering::Acquire) < (last_id + 50).min(TOTAL) {
        assert!(Instant::now() < deadline, "the publisher stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut back = ws_at(&format!("ws://{addr2}/websocket")).await;
    let since = json!({"epoch": epoch, "offset": last});
    let init = subscribe(&mut back, None, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    assert!(
        init["position"]["offset"].as_u64() > Some(last),
        "events were missed while away: {init}"
    );
    while received.last().is_some_and(|(id, _)| *id < TOTAL) {
        let frame = back.recv_raw().await;
        received.push(id_and_offset(&frame));
    }
    publisher.await.expect("publisher");
    let ids: Vec<u64> = received.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(received.windows(2).all(|w| w[0].1 < w[1].1));
    back.expect_silence(Duration::from_millis(200)).await;
    drop(node2);
}

// ---------------------------------------------------------------------------------------------
// 6: the NATS server goes away and comes back (a private nats-server)
// ---------------------------------------------------------------------------------------------

/// Publishes with idempotency keys, retrying on 503 until accepted (as a client should).
async fn publish_until_accepted(server: &TestServer, id: u64) -> u64 {
    let event = json!({"collection":"orders","event":"create","data":{"id":id,"tenant":0},
        "idempotency_key": format!("order-{id}")});
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let (status, answer) = server.post("/v1/publish", &event).await;
        if status == StatusCode::ACCEPTED {
            return answer["events"][0]["offset"].as_u64().expect("offset");
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert!(Instant::now() < deadline, "still refused: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn nodes_survive_a_nats_restart_without_losing_events_published_after_it() {
    let mut nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let mut c = b.ws().await;
    subscribe(&mut c, None, None).await;
    let before = a.publish(orders(1, 10)).await;
    let epoch = epoch_of(&before);
    let expected: Vec<(u64, u64)> = (1..=10).zip(offsets_of(&before)).collect();
    assert_eq!(ids_and_offsets(&mut c, 10).await, expected);

    nats.kill();
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    let (status, answer) = a.post("/v1/publish", &orders(11, 1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let (status, _) = a.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.metric("tidings_backplane_ready").await, Some(0.0));

    // Same store: same stream, same epoch.
    nats.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let mut after = Vec::new();
    for id in 11..=30 {
        after.push((id, publish_until_accepted(&a, id).await));
    }
    assert_eq!(ids_and_offsets(&mut c, 20).await, after);
    c.expect_silence(Duration::from_millis(300)).await;
    assert!(after[0].1 > expected[9].1, "the log went on");
    let again = a.publish(orders(31, 1)).await;
    assert_eq!(epoch_of(&again), epoch, "same stream, same epoch");
    assert!(a.metric("tidings_backplane_reconnects_total").await >= Some(1.0));
    assert_eq!(
        b.metric("tidings_backplane_epoch_changes_total").await,
        Some(0.0)
    );
    drop(c);
    a.shutdown().await;
    b.shutdown().await;
    drop(nats);
}

#[test]
fn without_nats_server_the_suite_fails_saying_so() {
    support::services::assert_fails_without_prerequisite(
        "two_nodes_deliver_every_event_in_one_order_with_the_publishers_offsets",
        &[("TIDINGS_TEST_NATS_SERVER", "/nonexistent/nats-server")],
    );
}

// ---------------------------------------------------------------------------------------------
// Limits: max_payload and the stream's byte limit
// ---------------------------------------------------------------------------------------------

/// The stream of `prefix`, as the server reports it.
async fn stream_info(url: &str, prefix: &str) -> async_nats::jetstream::stream::Info {
    let client = async_nats::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(format!("TIDINGS_{prefix}"))
        .await
        .expect("the node created its stream");
    stream.cached_info().clone()
}

#[tokio::test]
async fn an_event_over_max_payload_answers_413_and_its_batch_publishes_nothing() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    // The broker's own body limit is above the server's max_payload (1 MiB by default), so
    // the backplane's limit is the one that trips.
    let server = support::start(Config {
        max_publish_bytes: 4 * 1024 * 1024,
        ..nats_config(&url, &prefix)
    })
    .await;
    server.wait_ready(true).await;
    let max_payload = {
        let client = async_nats::connect(url.as_str()).await.expect("connect");
        client.server_info().max_payload
    };
    let big = "x".repeat(max_payload + 1);
    let batch = json!([
        {"collection":"orders","event":"create","data":{"id":1}},
        {"collection":"orders","event":"create","data":{"id":2,"blob":big}},
    ]);
    let mut client = server.ws().await;
    subscribe(&mut client, None, None).await;
    let (status, answer) = server.post("/v1/publish", &batch).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "EVENT_TOO_LARGE", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(message.contains("event 1"), "names the event: {message}");
    // Nothing of the batch reached the stream or a subscriber, and the connection to NATS
    // survived (an oversized message would have made the server close it).
    assert_eq!(stream_info(&url, &prefix).await.state.messages, 0);
    client.expect_silence(Duration::from_millis(300)).await;
    assert!(server.state.backplane.is_ready());
    let ok = server.publish(orders(3, 1)).await;
    assert_eq!(offsets_of(&ok), [1], "the stream's first message: {ok}");
    delete_stream(&url, &prefix).await;
}

#[tokio::test]
async fn the_stream_gets_the_configured_byte_limit() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let server = support::start(Config {
        nats_max_bytes: 8 * 1024 * 1024,
        ..nats_config(&url, &prefix)
    })
    .await;
    server.wait_ready(true).await;
    assert_eq!(
        stream_info(&url, &prefix).await.config.max_bytes,
        8 * 1024 * 1024
    );
    server.shutdown().await;
    // A node with another limit brings the existing stream in line.
    let server = support::start(Config {
        nats_max_bytes: 0,
        ..nats_config(&url, &prefix)
    })
    .await;
    server.wait_ready(true).await;
    assert_eq!(stream_info(&url, &prefix).await.config.max_bytes, -1);
    server.shutdown().await;
    delete_stream(&url, &prefix).await;
}

#[tokio::test]
async fn a_publish_right_after_a_recreation_never_answers_the_old_epoch() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let old = a.publish(orders(1, 5)).await;
    let old_epoch = epoch_of(&old);
    // Delivery reads the old stream back too (the high-water mark comes from acks anyway).
    tokio::time::sleep(Duration::from_millis(200)).await;
    delete_stream(&url, &prefix).await;
    {
        let client = async_nats::connect(url.as_str()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: format!("TIDINGS_{prefix}"),
            subjects: vec![format!("{prefix}.ev.>")],
            ..Default::default()
        })
        .await
        .expect("recreate the stream");
    }
    // At once, well inside the periodic identity check (5 s): the new stream's sequences
    // restart at 1, and the answer must carry the new stream's epoch.
    let (status, answer) = a.post("/v1/publish", &orders(6, 1)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let new_epoch = epoch_of(&answer);
    assert_ne!(new_epoch, old_epoch, "a stale epoch was answered: {answer}");
    // The node adopts the new stream promptly (woken by the publish, not the 5 s check).
    let started = Instant::now();
    a.wait_for_cluster_metric("tidings_backplane_epoch_changes_total", 1.0)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    a.wait_ready(true).await;
    let later = a.publish(orders(7, 1)).await;
    assert_eq!(epoch_of(&later), new_epoch);
    delete_stream(&url, &prefix).await;
}

/// A batch whose third event JetStream refuses (over the stream's `max_msg_size`, set by an
/// operator after the node created the stream) answers 503 `PARTIALLY_ACCEPTED`, naming
/// exactly which events were accepted: those, and only those, are in the stream and
/// delivered, with the offsets answered.
#[tokio::test]
async fn a_batch_partly_refused_by_jetstream_answers_exactly_which_events_were_accepted() {
    let nats = PrivateNats::start();
    let url = nats.url();
    let prefix = unique_prefix();
    let server = node(&url, &prefix).await;
    {
        let client = async_nats::connect(url.as_str()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut config = stream_info(&url, &prefix).await.config;
        config.max_message_size = 512;
        js.update_stream(config)
            .await
            .expect("limit the message size");
    }
    let mut subscriber = server.ws().await;
    subscribe(&mut subscriber, None, None).await;
    let event = |id: u64, blob: usize| json!({"collection":"orders","event":"create","data":{"id":id,"blob":"x".repeat(blob)}});
    let batch = json!([event(1, 0), event(2, 0), event(3, 2048), event(4, 0)]);
    let (status, answer) = server.post("/v1/publish", &batch).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    support::schema_check_http(&answer);
    assert_eq!(answer["error"]["code"], "PARTIALLY_ACCEPTED", "{answer}");
    assert_eq!(answer["error"]["where"], "/2", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("3 of 4") && message.contains("retry"),
        "{message}"
    );
    for internal in ["maximum", "NATS", "nats", "10054", "stream", &url] {
        assert!(
            !message.contains(internal),
            "internal detail `{internal}`: {message}"
        );
    }
    let events = answer["events"].as_array().expect("events");
    assert_eq!(events.len(), 4);
    assert_eq!(
        events[2],
        json!({"collection":"orders","event":"create","items":1,"accepted":false})
    );
    let offsets: Vec<u64> = [0, 1, 3]
        .iter()
        .map(|&i| {
            events[i]["offset"]
                .as_u64()
                .expect("offset of an accepted event")
        })
        .collect();
    // Exactly the accepted events are in the stream and delivered, with their offsets.
    assert_eq!(stream_info(&url, &prefix).await.state.messages, 3);
    let got = ids_and_offsets(&mut subscriber, 3).await;
    assert_eq!(got, vec![(1, offsets[0]), (2, offsets[1]), (4, offsets[2])]);
    subscriber.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        server
            .metric("tidings_published_events_total{collection=\"orders\",event=\"create\"}")
            .await,
        Some(3.0)
    );
    assert_eq!(
        server
            .metric("tidings_server_errors_total{reason=\"backplane\"}")
            .await,
        Some(1.0)
    );
    // The node is still ready and its connection alive: the next publish goes through.
    let ok = server.publish(orders(5, 1)).await;
    assert_eq!(offsets_of(&ok).len(), 1, "{ok}");
    delete_stream(&url, &prefix).await;
}
