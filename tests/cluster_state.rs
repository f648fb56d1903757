//! Retained state (`--state`) on a shared engine: every node holds the same state, a node
//! that starts late or restarts has the full state before it reports ready, and a restart of
//! the engine leaves every node with the same state (or not ready).
//!
//! Every test runs a private `redis-server` (`support::services`); without it a test fails
//! with `PREREQUISITE MISSING`. The expected state is folded here, by the merge rules of
//! `protocol/README.md`, from the events the test published.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::process::Broker;
use support::services::{unique_prefix, PrivateRedis};
use support::{TestServer, WsClient};
use tidings::config::Engine;
use tidings::history::HistoryLimits;
use tidings::state::StateSettings;
use tidings::Config;

fn config(url: &str, prefix: &str) -> Config {
    let defaults = Config::default();
    Config {
        engine: Engine::Redis,
        redis_url: url.to_string(),
        key_prefix: prefix.to_string(),
        state: StateSettings {
            collections: vec!["orders".into()],
            ..defaults.state.clone()
        },
        ..defaults
    }
}

/// The command line of a node process retaining `collection` on the redis engine.
fn node_args<'a>(url: &'a str, prefix: &'a str, collection: &'a str) -> [&'a str; 8] {
    [
        "--engine",
        "redis",
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--state",
        collection,
    ]
}

/// The items the state should hold, by id.
#[derive(Default, Debug, Clone, PartialEq)]
struct Model(BTreeMap<u64, Value>);

impl Model {
    /// Applies one published event (create = upsert, update = shallow merge, delete).
    fn apply(&mut self, event: &Value) {
        match event["event"].as_str() {
            Some("create") => {
                let item = event["data"].clone();
                self.0.insert(item["id"].as_u64().expect("id"), item);
            }
            Some("update") => {
                let item = &event["data"];
                let id = item["id"].as_u64().expect("id");
                let stored = self.0.entry(id).or_insert_with(|| json!({}));
                for (k, v) in item.as_object().expect("object") {
                    stored[k] = v.clone();
                }
            }
            Some("delete") => {
                for key in event["keys"].as_array().expect("keys") {
                    self.0.remove(&key.as_u64().expect("key"));
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }

    fn items(&self) -> Vec<Value> {
        self.0.values().cloned().collect()
    }
}

/// A deterministic mix of creates, partial updates and deletes over `keys` ids.
struct Workload {
    seed: u64,
    keys: u64,
    n: u64,
}

impl Workload {
    fn new(seed: u64, keys: u64) -> Workload {
        Workload { seed, keys, n: 0 }
    }

    fn next(&mut self) -> Value {
        self.seed = self
            .seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let r = self.seed >> 33;
        self.n += 1;
        let id = r % self.keys;
        let status = ["open", "paid", "closed"][(r / 7 % 3) as usize];
        match r / 31 % 10 {
            0..=3 => json!({"collection":"orders","event":"create",
                "data":{"id":id,"status":status,"n":self.n,"tag":format!("t{}", r % 5)}}),
            4..=8 => json!({"collection":"orders","event":"update",
                "data":{"id":id,"status":status,"n":self.n}}),
            _ => json!({"collection":"orders","event":"delete","keys":[id]}),
        }
    }

    /// `count` events published through `addrs` in turn, `batch` per request; applied to
    /// `model`. Returns the last offset.
    async fn publish(
        &mut self,
        addrs: &[std::net::SocketAddr],
        count: usize,
        batch: usize,
        model: &mut Model,
    ) -> u64 {
        let client = support::http_client();
        let mut last = 0;
        let mut sent = 0;
        let mut turn = 0;
        while sent < count {
            let events: Vec<Value> = (0..batch.min(count - sent)).map(|_| self.next()).collect();
            sent += events.len();
            for e in &events {
                model.apply(e);
            }
            let addr = addrs[turn % addrs.len()];
            turn += 1;
            let answer =
                support::post_with(&client, addr, "/v1/publish", &Value::Array(events)).await;
            last = answer["events"]
                .as_array()
                .and_then(|e| e.last())
                .and_then(|e| e["offset"].as_u64())
                .unwrap_or_else(|| panic!("publish answered {answer}"));
        }
        last
    }
}

async fn ws_to(addr: std::net::SocketAddr) -> WsClient {
    let url = format!("ws://{addr}/websocket");
    let (ws, _) = tokio::time::timeout(support::WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    WsClient { ws }
}

/// The `init` of a subscription to every item of `orders`: (items sorted by id, position).
async fn init_at(addr: std::net::SocketAddr) -> (Vec<Value>, Value) {
    init_of(addr, "orders").await
}

/// The `init` of a subscription to every item of `collection`.
async fn init_of(addr: std::net::SocketAddr, collection: &str) -> (Vec<Value>, Value) {
    let mut c = ws_to(addr).await;
    c.send(&json!({"type":"subscribe","collection":collection,"query":{"limit":-1}}).to_string())
        .await;
    let init = c.recv_raw().await;
    assert_eq!(init["event"], "init", "{init}");
    let mut items = init["data"].as_array().expect("data").clone();
    items.sort_by_key(|i| i["id"].as_u64());
    c.close().await;
    (items, init["position"].clone())
}

/// Waits until the node at `addr` serves exactly `model` (it may still be delivering).
async fn wait_state(addr: std::net::SocketAddr, model: &Model, node: &str) {
    let deadline = tokio::time::Instant::now() + support::CLUSTER_WAIT;
    let want = model.items();
    loop {
        let (got, _) = init_at(addr).await;
        if got == want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            assert_eq!(got, want, "node {node} never served the expected state");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    let client = support::http_client();
    let req = hyper::Request::get(format!("http://{addr}/readyz"))
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .expect("request");
    match tokio::time::timeout(support::WAIT, client.request(req)).await {
        Ok(Ok(response)) => response.status().as_u16(),
        _ => 0,
    }
}

async fn wait_readyz(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + support::CLUSTER_WAIT;
    while readyz(addr).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first offset the stream of `orders` still holds.
async fn first_in_log(redis: &PrivateRedis, prefix: &str) -> u64 {
    let mut conn = redis.admin().await;
    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:log:orders"))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("xrange");
    first
        .first()
        .and_then(|(id, _)| id.split('-').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_nodes_hold_the_same_state_whichever_takes_the_publishes() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = support::start_ready(config(&redis.url(), &prefix)).await;
    let b = support::start_ready(config(&redis.url(), &prefix)).await;
    let mut model = Model::default();
    let mut work = Workload::new(1, 60);
    work.publish(&[a.addr, b.addr], 600, 20, &mut model).await;
    assert!(model.0.len() > 10, "the workload leaves items: {model:?}");
    wait_state(a.addr, &model, "A").await;
    wait_state(b.addr, &model, "B").await;
    // A filtered, projected init is cut from the same state on both.
    for server in [&a, &b] {
        let mut c = server.ws().await;
        c.send(
            &json!({"type":"subscribe","collection":"orders","query":{
                "filter":{"status":{"_eq":"paid"}},"fields":["id","n"],"limit":-1}})
            .to_string(),
        )
        .await;
        let init = c.recv_raw().await;
        let mut got = init["data"].as_array().expect("data").clone();
        got.sort_by_key(|i| i["id"].as_u64());
        let want: Vec<Value> = model
            .items()
            .into_iter()
            .filter(|i| i["status"] == "paid")
            .map(|i| json!({"id": i["id"], "n": i["n"]}))
            .collect();
        assert_eq!(got, want);
    }
    // Both flush; neither's flush was ever taken for a newer one's.
    for server in [&a, &b] {
        server
            .wait_for_cluster_metric("tidings_state_flushes_total{outcome=\"written\"}", 1.0)
            .await;
    }
}

#[tokio::test]
async fn a_node_started_after_the_log_was_trimmed_has_the_full_state_when_ready() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let small_history = HistoryLimits {
        max_events: 50,
        ..Config::default().history
    };
    let a = support::start_ready(Config {
        history: small_history,
        ..config(&redis.url(), &prefix)
    })
    .await;
    let mut model = Model::default();
    let mut work = Workload::new(2, 300);
    // More than the stream keeps (10,000 entries at least): its start is trimmed away.
    let last = work.publish(&[a.addr], 12_000, 500, &mut model).await;
    assert_eq!(last, 12_000);
    let first = first_in_log(&redis, &prefix).await;
    assert!(first > 1, "the log was trimmed (first offset {first})");
    wait_state(a.addr, &model, "A").await;

    let late = support::start(Config {
        history: small_history,
        ..config(&redis.url(), &prefix)
    })
    .await;
    late.wait_ready(true).await;
    // Ready means restored: the very first init has everything.
    let (items, position) = init_at(late.addr).await;
    assert_eq!(items, model.items(), "the late node's state");
    assert_eq!(position["offset"], 12_000);
    assert_eq!(
        late.metric("tidings_state_restores_total{outcome=\"loaded\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        late.metric("tidings_state_items{collection=\"orders\"}")
            .await,
        Some(model.0.len() as f64)
    );
    // And it goes on with the cluster.
    work.publish(&[late.addr, a.addr], 100, 10, &mut model)
        .await;
    wait_state(late.addr, &model, "late").await;
    wait_state(a.addr, &model, "A").await;
}

#[tokio::test]
async fn a_node_killed_and_started_again_has_the_full_state_when_ready() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let url = redis.url();
    let args = node_args(&url, &prefix, "orders");
    let a = support::start_ready(config(&url, &prefix)).await;
    let mut b = Broker::start(&args);
    wait_readyz(b.addr).await;
    let mut model = Model::default();
    let mut work = Workload::new(3, 80);
    work.publish(&[a.addr, b.addr], 400, 20, &mut model).await;
    wait_state(b.addr, &model, "B").await;

    b.proc.kill();
    work.publish(&[a.addr], 400, 20, &mut model).await;
    wait_state(a.addr, &model, "A").await;
    let b = Broker::start(&args);
    wait_readyz(b.addr).await;
    let (items, _) = init_at(b.addr).await;
    assert_eq!(items, model.items(), "the restarted node's state");
    work.publish(&[b.addr], 50, 10, &mut model).await;
    wait_state(a.addr, &model, "A").await;
    wait_state(b.addr, &model, "B").await;
}

/// The keys Redis holds for `collection`'s state, sorted.
async fn stored_keys(redis: &PrivateRedis, prefix: &str, collection: &str) -> Vec<String> {
    let mut conn = redis.admin().await;
    let mut keys: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:state:{collection}"))
        .query_async(&mut conn)
        .await
        .expect("hkeys");
    keys.sort();
    keys
}

async fn wait_stored_keys(redis: &PrivateRedis, prefix: &str, collection: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + support::CLUSTER_WAIT;
    loop {
        let got = stored_keys(redis, prefix, collection).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stored state of {collection} never held exactly {want:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Debezium truncate (its own example) on a retained collection reaches the state Redis
/// holds: the removed keys are deleted by the next flush, so a node that restarts loads
/// only what was created after the truncate.
#[tokio::test]
async fn a_truncate_reaches_the_stored_state_and_a_restarted_node() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let url = redis.url();
    let collection = "customers";
    let args = node_args(&url, &prefix, collection);
    let mut config = config(&url, &prefix);
    config.state.collections = vec![collection.into()];
    let a = support::start_ready(config).await;
    let mut b = Broker::start(&args);
    wait_readyz(b.addr).await;
    let client = support::http_client();
    let create = |data: Value| {
        let body = json!({"collection": collection, "event": "create", "data": data});
        let client = client.clone();
        async move { support::post_with(&client, a.addr, "/v1/publish", &body).await }
    };
    create((1..=5).map(|id| json!({"id": id, "n": id})).collect()).await;
    wait_stored_keys(&redis, &prefix, collection, &["1", "2", "3", "4", "5"]).await;
    // Both nodes flushed the creates, so nothing pends for those keys: only the truncate's
    // own changes can delete them from Redis (a node still holding them as changed would
    // flush their absence anyway, and hide a truncate that marks nothing).
    let written = r#"tidings_state_flushes_total{outcome="written"}"#;
    for addr in [a.addr, b.addr] {
        support::wait_for_metric_at(addr, written, 1.0, support::CLUSTER_WAIT).await;
    }

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium/postgresql-truncate.json");
    let truncate: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
    let answer = support::post_with(&client, b.addr, "/v1/debezium", &truncate).await;
    assert_eq!(answer["events"][0]["event"], "delete", "{answer}");
    let later = json!({"id": 9, "n": 9});
    create(later.clone()).await;
    wait_stored_keys(&redis, &prefix, collection, &["9"]).await;
    let want = vec![later];
    assert_eq!(init_of(a.addr, collection).await.0, want);
    assert_eq!(init_of(b.addr, collection).await.0, want);

    b.proc.kill();
    let b = Broker::start(&args);
    wait_readyz(b.addr).await;
    assert_eq!(
        init_of(b.addr, collection).await.0,
        want,
        "the restarted node's state"
    );
}

#[tokio::test]
async fn a_redis_restart_leaves_every_node_with_the_same_state() {
    let mut redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = support::start_ready(config(&redis.url(), &prefix)).await;
    let b = support::start_ready(config(&redis.url(), &prefix)).await;
    let mut model = Model::default();
    let mut work = Workload::new(4, 50);
    work.publish(&[a.addr, b.addr], 300, 10, &mut model).await;
    wait_state(a.addr, &model, "A").await;
    wait_state(b.addr, &model, "B").await;
    let (_, before) = init_at(a.addr).await;
    let restores = |outcome: &'static str| {
        let (a, b) = (&a, &b);
        async move {
            let series = format!("tidings_state_restores_total{{outcome=\"{outcome}\"}}");
            a.metric(&series).await.unwrap_or(0.0) + b.metric(&series).await.unwrap_or(0.0)
        }
    };
    let (built_before, loaded_before) = (restores("built").await, restores("loaded").await);

    // Without persistence: the log, the epoch and the stored state are gone.
    redis.kill();
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // The nodes' state outlives the log: one node's became the new log's base, the other
    // loaded it.
    let (on_a, position) = init_at(a.addr).await;
    let (on_b, _) = init_at(b.addr).await;
    assert_eq!(on_a, model.items(), "node A after the restart");
    assert_eq!(on_b, model.items(), "node B after the restart");
    assert_ne!(position["epoch"], before["epoch"], "a new epoch");
    let built = restores("built").await - built_before;
    let loaded = restores("loaded").await - loaded_before;
    assert_eq!(
        (built, loaded),
        (1.0, 1.0),
        "one base, loaded by the other node"
    );

    // A client of the old epoch gets a fresh snapshot.
    let mut c = a.ws().await;
    c.send(
        &json!({"type":"subscribe","collection":"orders","query":{"limit":-1},"since":before})
            .to_string(),
    )
    .await;
    let init = c.recv_raw().await;
    assert_eq!(init["recovered"], false, "{init}");
    let mut data = init["data"].as_array().expect("data").clone();
    data.sort_by_key(|i| i["id"].as_u64());
    assert_eq!(data, model.items());

    // The cluster goes on, and a node started now gets the same state.
    work.publish(&[b.addr, a.addr], 100, 10, &mut model).await;
    wait_state(a.addr, &model, "A").await;
    wait_state(b.addr, &model, "B").await;
    let late = support::start_ready(config(&redis.url(), &prefix)).await;
    let (items, _) = init_at(late.addr).await;
    assert_eq!(items, model.items(), "a node started after the restart");
}

/// Subscribes to open orders (ids and status), resuming after `since` if given.
async fn subscribe_open(server: &TestServer, since: Option<&Value>) -> (WsClient, Value) {
    let mut c = server.ws().await;
    let mut msg = json!({"type":"subscribe","collection":"orders",
        "query":{"filter":{"status":{"_eq":"open"}},"fields":["id","status"],"limit":-1}});
    if let Some(since) = since {
        msg["since"] = since.clone();
    }
    c.send(&msg.to_string()).await;
    let init = c.recv_raw().await;
    assert_eq!(init["event"], "init", "{init}");
    (c, init)
}

#[tokio::test]
async fn a_resume_on_another_node_replays_enter_and_leave() {
    let redis = PrivateRedis::start();
    let prefix = unique_prefix();
    let a = support::start_ready(config(&redis.url(), &prefix)).await;
    let b = support::start_ready(config(&redis.url(), &prefix)).await;
    let create = |id: u64, status: &str| json!({"collection":"orders","event":"create","data":{"id":id,"status":status,"n":0}});
    a.publish(json!([
        create(1, "open"),
        create(2, "open"),
        create(3, "paid")
    ]))
    .await;
    let (c, init) = subscribe_open(&a, None).await;
    assert_eq!(
        init["data"],
        json!([{"id":1,"status":"open"},{"id":2,"status":"open"}])
    );
    let since = init["position"].clone();
    c.close().await;
    // While away: 1 leaves, 3 enters (partial updates: the state knows the rest), 2 changes
    // a field outside the projection.
    a.publish(json!([
        {"collection":"orders","event":"update","data":{"id":1,"status":"paid"}},
        {"collection":"orders","event":"update","data":{"id":3,"status":"open"}},
        {"collection":"orders","event":"update","data":{"id":2,"n":5}}
    ]))
    .await;
    let (mut back, init) = subscribe_open(&b, Some(&since)).await;
    assert_eq!(init["recovered"], true, "{init}");
    let leave = back.recv_raw().await;
    assert_eq!(
        (&leave["event"], &leave["data"], &leave["cause"]),
        (&json!("delete"), &json!([1]), &json!("leave")),
        "{leave}"
    );
    let enter = back.recv_raw().await;
    assert_eq!(
        (&enter["event"], &enter["data"], &enter["cause"]),
        (
            &json!("create"),
            &json!([{"id":3,"status":"open"}]),
            &json!("enter")
        ),
        "{enter}"
    );
    let update = back.recv_raw().await;
    assert_eq!(
        (&update["event"], &update["data"]),
        (&json!("update"), &json!([{"id":2,"status":"open"}])),
        "{update}"
    );
    back.expect_silence(Duration::from_millis(200)).await;
}

#[test]
fn without_redis_server_the_suite_fails_saying_so() {
    support::services::assert_fails_without_prerequisite(
        "two_nodes_hold_the_same_state_whichever_takes_the_publishes",
        &[("TIDINGS_TEST_REDIS_SERVER", "/nonexistent/redis-server")],
    );
}
