//! The retained state's property (issue 10, "Done when"): random creates, partial updates
//! and deletes are published while subscribers with random filters, projections and row
//! rules join. For every subscriber, the list built from its `init` and live frames, applied
//! as a Directus client would (create = add, update = replace, delete = remove), equals at
//! the end a direct read of the state (`GET /v1/collections/{c}/items`) through the same
//! filter, projection and credential.
//!
//! It runs on the memory engine (one node) and on the redis engine (two nodes sharing a
//! private `redis-server`, publishes and subscribers spread over both; without the server it
//! fails with `PREREQUISITE MISSING`). The NATS engine keeps no state yet (`--state` is
//! refused there), so it has no run here.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use support::services::{unique_prefix, PrivateRedis};
use support::{TestServer, WsClient};
use tidings::auth::TokenStore;
use tidings::config::Engine;
use tidings::Config;

const COLLECTION: &str = "props";
const STATUS: [&str; 3] = ["open", "paid", "closed"];
/// Row rules: two tenants and a range; no token reads with the public permissions (all).
const TOKENS: &str = r#"{
    "t0": {"sub": "zero", "collections": {"props": {"filter": {"tenant": {"_eq": 0}}}}},
    "t1": {"sub": "one", "collections": {"props": {"filter": {"tenant": {"_eq": 1}}}}},
    "low": {"sub": "low", "collections": {"props": {"filter": {"n": {"_lt": 50}}}}}
}"#;
const CREDENTIALS: [Option<&str>; 4] = [None, Some("t0"), Some("t1"), Some("low")];

/// One event of a publish request.
#[derive(Debug, Clone)]
enum Op {
    Create {
        id: u8,
        tenant: u8,
        status: u8,
        n: u8,
    },
    /// A partial update: only the fields given (a key the state lacks is stored as given).
    Update {
        id: u8,
        tenant: Option<u8>,
        status: Option<u8>,
        n: Option<u8>,
        flag: Option<Option<bool>>,
    },
    /// A key-only delete.
    Delete { id: u8 },
}

impl Op {
    fn event(&self) -> Value {
        match self {
            Op::Create {
                id,
                tenant,
                status,
                n,
            } => json!({"collection": COLLECTION, "event": "create", "data": {
                "id": id, "tenant": tenant, "status": STATUS[*status as usize], "n": n}}),
            Op::Update {
                id,
                tenant,
                status,
                n,
                flag,
            } => {
                let mut item = serde_json::Map::new();
                item.insert("id".into(), json!(id));
                if let Some(t) = tenant {
                    item.insert("tenant".into(), json!(t));
                }
                if let Some(s) = status {
                    item.insert("status".into(), json!(STATUS[*s as usize]));
                }
                if let Some(n) = n {
                    item.insert("n".into(), json!(n));
                }
                if let Some(f) = flag {
                    item.insert("flag".into(), json!(f));
                }
                json!({"collection": COLLECTION, "event": "update", "data": item})
            }
            Op::Delete { id } => json!({"collection": COLLECTION, "event": "delete", "keys": [id]}),
        }
    }
}

/// A subscriber: when it joins (after that many requests were answered), its credential,
/// filter and projection.
#[derive(Debug, Clone)]
struct Sub {
    after: usize,
    credential: usize,
    filter: Option<Value>,
    projected: bool,
}

impl Sub {
    fn query(&self) -> Value {
        let mut query = json!({"limit": -1});
        if let Some(f) = &self.filter {
            query["filter"] = f.clone();
        }
        if self.projected {
            query["fields"] = json!(["id", "status"]);
        }
        query
    }

    /// The same read over HTTP: path and query string.
    fn read_path(&self) -> String {
        let mut path = format!("/v1/collections/{COLLECTION}/items?limit=-1");
        if let Some(f) = &self.filter {
            let text = f.to_string();
            let encoded =
                percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC);
            path.push_str(&format!("&filter={encoded}"));
        }
        if self.projected {
            path.push_str("&fields=id,status");
        }
        path
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    requests: Vec<Vec<Op>>,
    subs: Vec<Sub>,
}

fn op() -> impl Strategy<Value = Op> {
    let id = 0..12u8;
    prop_oneof![
        3 => (id.clone(), 0..2u8, 0..3u8, 0..100u8)
            .prop_map(|(id, tenant, status, n)| Op::Create { id, tenant, status, n }),
        4 => (
            id.clone(),
            proptest::option::of(0..2u8),
            proptest::option::of(0..3u8),
            proptest::option::of(0..100u8),
            proptest::option::of(proptest::option::of(any::<bool>())),
        )
            .prop_map(|(id, tenant, status, n, flag)| Op::Update { id, tenant, status, n, flag }),
        2 => id.prop_map(|id| Op::Delete { id }),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..3usize).prop_map(|s| json!({"status": {"_eq": STATUS[s]}})),
        (0..3usize).prop_map(|s| json!({"status": {"_neq": STATUS[s]}})),
        (0..100u8).prop_map(|n| json!({"n": {"_gt": n}})),
        (0..100u8).prop_map(|n| json!({"n": {"_lte": n}})),
        (0..2u8).prop_map(|t| json!({"tenant": {"_eq": t}})),
        any::<bool>().prop_map(|b| json!({"flag": {"_null": b}})),
        Just(json!({"flag": {"_eq": true}})),
    ]
}

fn filter() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        leaf().prop_map(Some),
        (leaf(), leaf()).prop_map(|(a, b)| Some(json!({"_and": [a, b]}))),
        (leaf(), leaf()).prop_map(|(a, b)| Some(json!({"_or": [a, b]}))),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    proptest::collection::vec(proptest::collection::vec(op(), 1..4), 5..40).prop_flat_map(
        |requests| {
            let n = requests.len();
            let sub = (0..=n, 0..CREDENTIALS.len(), filter(), any::<bool>()).prop_map(
                |(after, credential, filter, projected)| Sub {
                    after,
                    credential,
                    filter,
                    projected,
                },
            );
            (Just(requests), proptest::collection::vec(sub, 1..8))
                .prop_map(|(requests, subs)| Scenario { requests, subs })
        },
    )
}

fn config(engine: Option<(&str, &str)>) -> Config {
    let mut config = support::retaining(&[COLLECTION]);
    config.tokens = TokenStore::from_json(TOKENS).expect("tokens");
    config.heartbeat_period = None;
    if let Some((url, prefix)) = engine {
        config.engine = Engine::Redis;
        config.redis_url = url.to_string();
        config.key_prefix = prefix.to_string();
    }
    config
}

/// A client's list, by key, from one subscription frame after another.
fn apply(list: &mut BTreeMap<u64, Value>, frame: &Value) {
    let data = frame["data"].as_array().cloned().unwrap_or_default();
    let id = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("key in {frame}"));
    match frame["event"].as_str() {
        Some("init") => {
            list.clear();
            for item in data {
                list.insert(id(&item["id"]), item);
            }
        }
        Some("create" | "update") => {
            for item in data {
                list.insert(id(&item["id"]), item);
            }
        }
        Some("delete") => {
            for key in data {
                list.remove(&id(&key));
            }
        }
        _ => panic!("unexpected frame {frame}"),
    }
}

/// Subscribes as `sub` says on `server`: the socket and the list its `init` holds.
async fn join(server: &TestServer, sub: &Sub) -> (WsClient, BTreeMap<u64, Value>) {
    let mut ws = match CREDENTIALS[sub.credential] {
        Some(token) => server.ws_token(token).await,
        None => server.ws().await,
    };
    let subscribe =
        json!({"type": "subscribe", "collection": COLLECTION, "uid": "s", "query": sub.query()});
    ws.send(&subscribe.to_string()).await;
    let init = ws.recv_raw().await;
    assert_eq!(init["event"], "init", "{subscribe} got {init}");
    let mut list = BTreeMap::new();
    apply(&mut list, &init);
    (ws, list)
}

/// The state through `sub`'s filter, projection and credential, read over HTTP.
async fn read(server: &TestServer, sub: &Sub) -> BTreeMap<u64, Value> {
    let bearer = CREDENTIALS[sub.credential].map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let (status, _, body) = server
        .request("GET", &sub.read_path(), &headers, Vec::new())
        .await;
    assert_eq!(status, 200, "{}: {body}", sub.read_path());
    let answer: Value = serde_json::from_str(&body).expect("json");
    let mut list = BTreeMap::new();
    apply(&mut list, &json!({"event": "init", "data": answer["data"]}));
    list
}

/// Reads frames until the list equals the state's read (the last events may still be on
/// their way, on a shared engine from another node), failing after a generous bound.
async fn converge(
    ws: &mut WsClient,
    list: &mut BTreeMap<u64, Value>,
    server: &TestServer,
    sub: &Sub,
) {
    let deadline = tokio::time::Instant::now() + support::CLUSTER_WAIT;
    loop {
        while let Ok(Some(Ok(message))) = tokio::time::timeout(
            Duration::from_millis(100),
            futures_util::StreamExt::next(&mut ws.ws),
        )
        .await
        {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).expect("json");
                support::schema::assert_server_message(&frame);
                apply(list, &frame);
            }
        }
        let truth = read(server, sub).await;
        if *list == truth {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            assert_eq!(
                *list, truth,
                "subscriber {sub:?}: its list against the state"
            );
        }
    }
}

/// Publishes `body`, retrying while the node answers 503 (its engine link is being
/// re-established on a loaded machine: nothing was published, as its reply says).
async fn publish(server: &TestServer, body: Value) {
    let deadline = tokio::time::Instant::now() + support::CLUSTER_WAIT;
    loop {
        let (status, _, answer) = server
            .request(
                "POST",
                "/v1/publish",
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            )
            .await;
        if status == 202 {
            return;
        }
        assert!(
            status == 503 && tokio::time::Instant::now() < deadline,
            "publish refused: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `scenario` over `nodes`.
async fn run(nodes: Vec<Arc<TestServer>>, scenario: Scenario) {
    let answered = Arc::new(AtomicUsize::new(0));
    // Two publishers take turns over the requests, concurrently (each waits for its turn's
    // reply before its next request, not for the other's).
    let mut publishers = Vec::new();
    for lane in 0..2 {
        let requests: Vec<Value> = scenario
            .requests
            .iter()
            .skip(lane)
            .step_by(2)
            .map(|ops| Value::Array(ops.iter().map(Op::event).collect()))
            .collect();
        let server = nodes[lane % nodes.len()].clone();
        let answered = answered.clone();
        publishers.push(tokio::spawn(async move {
            for body in requests {
                publish(&server, body).await;
                answered.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut joining = Vec::new();
    for (i, sub) in scenario.subs.iter().cloned().enumerate() {
        let server = nodes[i % nodes.len()].clone();
        let answered = answered.clone();
        joining.push(tokio::spawn(async move {
            while answered.load(Ordering::SeqCst) < sub.after {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let (ws, list) = join(&server, &sub).await;
            (server, sub, ws, list)
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    for j in joining {
        let (server, sub, mut ws, mut list) = j.await.expect("subscriber");
        converge(&mut ws, &mut list, &server, &sub).await;
        ws.close().await;
    }
}

/// A runtime for one case. The frame schemas are compiled first: compiling them inside it
/// (on the first frame checked) would hold its workers for seconds in a debug build.
fn runtime() -> tokio::runtime::Runtime {
    support::schema::assert_server_message(&json!({"type": "pong"}));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 8, ..ProptestConfig::default() })]

    #[test]
    fn on_the_memory_engine_every_list_equals_the_state(scenario in scenario()) {
        runtime().block_on(async {
            let node = Arc::new(support::start(config(None)).await);
            run(vec![node], scenario).await;
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 4, ..ProptestConfig::default() })]

    #[test]
    fn on_the_redis_engine_every_list_on_every_node_equals_the_state(scenario in scenario()) {
        let redis = PrivateRedis::start();
        let url = redis.url();
        let prefix = unique_prefix();
        runtime().block_on(async {
            let a = Arc::new(support::start_ready(config(Some((&url, &prefix)))).await);
            let b = Arc::new(support::start_ready(config(Some((&url, &prefix)))).await);
            run(vec![a, b], scenario).await;
        });
    }
}
