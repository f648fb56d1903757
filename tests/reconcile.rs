//! Reconcile (`PUT /v1/collections/{collection}/items`) on the memory engine, over real
//! sockets: seeding, healing drift (a subscriber sees exactly the differences, enter and
//! leave included), JSON array and NDJSON bodies, a body larger than `--max-publish-bytes`,
//! capacity with the batch's deletes counted first, and every refusal with its exact reply,
//! none of which publishes anything.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{
    all_and_open, assert_error, caused, frame, init_frame as init, retaining,
    schema_check_component, start, subscribe_orders as subscribe, TestServer, WsClient,
};
use tidings::Config;

const ITEMS: &str = "/v1/collections/orders/items";

async fn put(
    server: &TestServer,
    path: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, Value) {
    let (status, _, text) = server
        .request(
            "PUT",
            path,
            &[("content-type", content_type)],
            body.as_bytes().to_vec(),
        )
        .await;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// PUTs `items` as a JSON array and asserts 200 with the counts `[created, updated, deleted,
/// unchanged]`; the answer.
async fn reconcile(server: &TestServer, items: Value, counts: [usize; 4]) -> Value {
    let (status, answer) = put(server, ITEMS, "application/json", &items.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_counts(&answer, counts);
    answer
}

fn assert_counts(answer: &Value, [created, updated, deleted, unchanged]: [usize; 4]) {
    assert_eq!(
        [
            &answer["created"],
            &answer["updated"],
            &answer["deleted"],
            &answer["unchanged"]
        ],
        [
            &json!(created),
            &json!(updated),
            &json!(deleted),
            &json!(unchanged)
        ],
        "{answer}"
    );
    schema_check_component("ReconcileResponse", answer);
}

/// One refusal: what, path, content type, body, whether the publish key is sent, status,
/// code, `where`, message (a prefix when it ends with `": "`).
type Refusal<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    bool,
    StatusCode,
    &'a str,
    &'a str,
    &'a str,
);

/// The last frames of a heal in which `item` stopped matching `o`: its replacement reaches
/// `a`, its leave `o`, and nothing follows.
async fn updated_then_left(all: &mut WsClient, open: &mut WsClient, item: Value) {
    all.expect(&frame("update", "a", json!([item.clone()])))
        .await;
    open.expect(&caused("delete", "o", json!([item["id"]]), "leave"))
        .await;
    all.expect_silence(QUIET).await;
    open.expect_silence(QUIET).await;
}

const QUIET: Duration = Duration::from_millis(200);

#[tokio::test]
async fn a_reconcile_seeds_then_heals_drift_with_exactly_the_differences() {
    let server = start(retaining(&["orders"])).await;
    let (mut all, mut open) = all_and_open(&server).await;
    // Seed: everything is created, one event (one offset) for the batch of creates.
    let seed = json!([
        {"id":1,"status":"open","n":1},
        {"id":2,"status":"open","n":2},
        {"id":3,"status":"closed","n":3}
    ]);
    let answer = reconcile(&server, seed.clone(), [3, 0, 0, 0]).await;
    assert_eq!(
        answer["events"],
        json!([{"collection":"orders","event":"create","items":3,"offset":1,"epoch":answer["events"][0]["epoch"]}])
    );
    for id in 1..=3 {
        let item = json!([{"id":id,"status":if id == 3 {"closed"} else {"open"},"n":id}]);
        all.expect(&frame("create", "a", item.clone())).await;
        if id != 3 {
            open.expect(&frame("create", "o", item)).await;
        }
    }
    // The same set again: nothing changes, nothing is published.
    reconcile(&server, seed, [0, 0, 0, 3]).await;
    all.expect_silence(QUIET).await;
    // Drift: the application's database moved on while Tidings missed it. As NDJSON, with
    // item 1's fields in another order (the same item), 2 closed (it leaves `o`), 3 reopened
    // (it enters `o`, whole: a replacement, not a merge), 4 new.
    let ndjson = concat!(
        "{\"n\":1,\"status\":\"open\",\"id\":1}\n",
        "\n",
        "{\"id\":2,\"status\":\"closed\",\"n\":2}\n",
        "{\"id\":3,\"status\":\"open\"}\n",
        "{\"id\":4,\"status\":\"open\",\"n\":4}\n",
    );
    // First remove 2 from the set: it is deleted.
    let (status, answer) = put(
        &server,
        ITEMS,
        "application/x-ndjson",
        &ndjson.replace("{\"id\":2,\"status\":\"closed\",\"n\":2}\n", ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_counts(&answer, [1, 1, 1, 1]);
    let kinds: Vec<(&Value, &Value)> = answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (&e["event"], &e["offset"]))
        .collect();
    assert_eq!(
        kinds,
        [
            (&json!("delete"), &json!(2)),
            (&json!("create"), &json!(3)),
            (&json!("update"), &json!(4))
        ],
        "deletes, creates, replacements: each its own offset"
    );
    all.expect(&frame("delete", "a", json!([2]))).await;
    open.expect(&frame("delete", "o", json!([2]))).await;
    let four = json!([{"id":4,"status":"open","n":4}]);
    all.expect(&frame("create", "a", four.clone())).await;
    open.expect(&frame("create", "o", four)).await;
    let three = json!([{"id":3,"status":"open"}]);
    all.expect(&frame("update", "a", three.clone())).await;
    open.expect(&caused("create", "o", three, "enter")).await;
    // Then 2 comes back closed and 3 closes: 2 reaches `a` only, 3 leaves `o`.
    let (status, answer) = put(
        &server,
        ITEMS,
        "application/x-ndjson",
        &ndjson.replace(
            "{\"id\":3,\"status\":\"open\"}",
            "{\"id\":3,\"status\":\"closed\"}",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_counts(&answer, [1, 1, 0, 2]);
    all.expect(&frame(
        "create",
        "a",
        json!([{"id":2,"status":"closed","n":2}]),
    ))
    .await;
    updated_then_left(&mut all, &mut open, json!({"id":3,"status":"closed"})).await;
    // The state equals the set.
    let (_late, snapshot) = subscribe(&server, "l", json!({"sort":["id"]})).await;
    assert_eq!(
        snapshot,
        init(
            "l",
            json!([
                {"id":1,"status":"open","n":1},
                {"id":2,"status":"closed","n":2},
                {"id":3,"status":"closed"},
                {"id":4,"status":"open","n":4}
            ])
        )
    );
    // An empty set empties the collection.
    reconcile(&server, json!([]), [0, 0, 4, 0]).await;
    all.expect(&frame("delete", "a", json!([1, 2, 3, 4]))).await;
    for (series, value) in [
        ("tidings_state_items{collection=\"orders\"}", 0.0),
        ("tidings_reconcile_requests_total{status=\"200\"}", 5.0),
        ("tidings_reconcile_items_total{outcome=\"deleted\"}", 5.0),
        ("tidings_reconcile_items_total{outcome=\"unchanged\"}", 6.0),
    ] {
        assert_eq!(server.metric(series).await, Some(value), "{series}");
    }
}

#[tokio::test]
async fn the_body_is_streamed_each_item_bounded_by_max_publish_bytes() {
    let mut config = retaining(&["orders"]);
    config.max_publish_bytes = 1_000;
    let server = start(config).await;
    // 2,000 items of ~50 bytes: 100 times the limit as a whole.
    let items: Vec<Value> = (0..2_000)
        .map(|id| json!({"id":id,"text":"x".repeat(30)}))
        .collect();
    let answer = reconcile(&server, Value::Array(items.clone()), [2_000, 0, 0, 0]).await;
    let events = answer["events"].as_array().expect("events");
    assert!(events.len() > 1, "creates cut into events under the limit");
    let total: u64 = events.iter().filter_map(|e| e["items"].as_u64()).sum();
    assert_eq!(total, 2_000);
    // One item over the limit: 413 naming the flag and the item.
    let mut big = items;
    big[7]["text"] = json!("y".repeat(1_000));
    let (status, answer) = put(
        &server,
        ITEMS,
        "application/json",
        &Value::Array(big).to_string(),
    )
    .await;
    assert_error(
        "item too large",
        (status, &answer),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "/7",
        "item /7 is larger than --max-publish-bytes (1000 bytes), which bounds each item of a reconcile; nothing was published",
    );
    let ndjson = format!(
        "{{\"id\":1}}\n{{\"id\":2,\"t\":\"{}\"}}\n",
        "z".repeat(1_000)
    );
    let (status, answer) = put(&server, ITEMS, "application/x-ndjson", &ndjson).await;
    assert_error(
        "line too large",
        (status, &answer),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "line 2",
        "",
    );
    assert_eq!(
        server
            .metric("tidings_state_items{collection=\"orders\"}")
            .await,
        Some(2_000.0),
        "nothing of the refused sets was applied"
    );
}

#[tokio::test]
async fn capacity_counts_the_deletes_before_the_creates() {
    let mut config = retaining(&["orders"]);
    config.state.max_items = 2;
    let server = start(config).await;
    reconcile(&server, json!([{"id":1},{"id":2}]), [2, 0, 0, 0]).await;
    // Held {1,2}; the set {2,3} deletes 1 before it creates 3: never over the limit.
    reconcile(&server, json!([{"id":2},{"id":3}]), [1, 0, 1, 1]).await;
    // The same through POST /v1/publish: a batch whose delete makes room.
    let answer = server
        .publish(json!([
            {"collection":"orders","event":"delete","keys":[2]},
            {"collection":"orders","event":"create","data":{"id":4}}
        ]))
        .await;
    assert_eq!(answer["events"][1]["offset"], 5);
    // Three items cannot fit, whatever is deleted: 507, pointing at the first item over.
    let (mut c, _) = subscribe(&server, "a", json!({})).await;
    let (status, answer) = put(
        &server,
        ITEMS,
        "application/json",
        r#"[{"id":5},{"id":6},{"id":7}]"#,
    )
    .await;
    assert_error(
        "over max_items",
        (status, &answer),
        StatusCode::INSUFFICIENT_STORAGE,
        "STATE_FULL",
        "/2",
        "the retained state of collection \"orders\" is full: the set holds more than 2 items, beyond --state-max-items (2); nothing was published",
    );
    c.expect_silence(QUIET).await;
    assert_eq!(
        server
            .metric("tidings_state_rejections_total{collection=\"orders\",reason=\"max_items\"}")
            .await,
        Some(1.0)
    );
    // Bytes: new and changed items over --state-max-bytes.
    let mut config = retaining(&["orders"]);
    config.state.max_bytes = 100;
    let small = start(config).await;
    let (status, answer) = put(
        &small,
        ITEMS,
        "application/json",
        &json!([{"id":1,"t":"a".repeat(40)},{"id":2,"t":"b".repeat(40)}]).to_string(),
    )
    .await;
    assert_error(
        "over max_bytes",
        (status, &answer),
        StatusCode::INSUFFICIENT_STORAGE,
        "STATE_FULL",
        "/1",
        "the retained state of collection \"orders\" is full: the set's new and changed items alone are over --state-max-bytes (100); nothing was published",
    );
}

#[tokio::test]
async fn every_refusal_has_its_exact_reply_and_publishes_nothing() {
    let mut config = retaining(&["orders"]);
    config.publish_keys = {
        let mut keys = tidings::auth::PublishKeys::default();
        keys.add_flags(&["k1"]).expect("keys");
        keys
    };
    let server = start(config).await;
    let auth = ("authorization", "Bearer k1");
    let send = |path: &'static str, ct: Option<&'static str>, body: &str, key: bool| {
        let mut headers = Vec::new();
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        if key {
            headers.push(auth);
        }
        let body = body.as_bytes().to_vec();
        let server = &server;
        async move {
            let (status, _, text) = server.request("PUT", path, &headers, body).await;
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let (status, answer) = send(ITEMS, Some("application/json"), r#"[{"id":1,"v":1}]"#, true).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut c = server.ws().await;
    c.send(r#"{"type":"subscribe","collection":"orders","uid":"a"}"#)
        .await;
    c.expect(&init("a", json!([{"id":1,"v":1}]))).await;
    let json_ct = Some("application/json");
    let nd = Some("application/x-ndjson");
    let not_json = "the item is not JSON: ";
    let table: Vec<Refusal> = vec![
        ("no key", ITEMS, json_ct, "[]", false, StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authorization", "a valid publish key is required: send `Authorization: Bearer <key>`"),
        ("text/plain", ITEMS, Some("text/plain"), "[]", true, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "content-type", "the body must be a JSON array of items (`Content-Type: application/json`) or NDJSON, one item per line (`Content-Type: application/x-ndjson`)"),
        ("no content type", ITEMS, None, "[]", true, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "content-type", ""),
        ("not retained", "/v1/collections/chat/items", json_ct, "[]", true, StatusCode::UNPROCESSABLE_ENTITY, "NOT_RETAINED", "collection", "collection \"chat\" retains no items (start Tidings with --state chat, or give it \"state\": true in the collections file); nothing was published"),
        ("not an array", ITEMS, json_ct, r#"{"id":2}"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "", "expected a JSON array of items"),
        ("empty body", ITEMS, json_ct, "", true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "", "expected a JSON array of items, got an empty body"),
        ("unclosed", ITEMS, json_ct, r#"[{"id":2}"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/0", "the body ends inside the array (no closing `]`)"),
        ("trailing comma", ITEMS, json_ct, r#"[{"id":2},]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1", "expected an item after `,`"),
        ("after the array", ITEMS, json_ct, r#"[{"id":2}] []"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "", "unexpected data after the array's closing `]`"),
        ("item not JSON", ITEMS, json_ct, r#"[{"id":2},{"id":3,}]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1", not_json),
        ("not an object", ITEMS, json_ct, r#"[{"id":2},3]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1", "expected an item object, got number"),
        ("no key field", ITEMS, json_ct, r#"[{"id":2},{"name":"x"}]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1/id", "the item has no key field `id`"),
        ("bad key", ITEMS, json_ct, r#"[{"id":true}]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/0/id", "the key field `id` must be a string or a number, got boolean"),
        ("duplicate key", ITEMS, json_ct, r#"[{"id":2},{"id":3},{"id":2,"x":1}]"#, true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/2/id", "duplicate key 2: the set holds each key once"),
        ("ndjson not JSON", ITEMS, nd, "{\"id\":2}\n\n{\"id\":\n", true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "line 3", not_json),
        ("ndjson duplicate", ITEMS, nd, "{\"id\":2}\n{\"id\":\"2\"}\n", true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "line 2", "duplicate key \"2\": the set holds each key once"),
        ("ndjson array line", ITEMS, nd, "[{\"id\":2}]\n", true, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "line 1", "expected an item object, got array"),
    ];
    for (what, path, ct, body, key, status, code, pointer, message) in table {
        let (got, answer) = send(path, ct, body, key).await;
        let exact = if message.ends_with(": ") { "" } else { message };
        assert_error(what, (got, &answer), status, code, pointer, exact);
        let text = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(text.starts_with(message), "{what}: {answer}");
    }
    // Nothing was published: no frame, and the next publish takes offset 2.
    c.expect_silence(QUIET).await;
    let (status, answer) = send(ITEMS, json_ct, r#"[{"id":1,"v":2}]"#, true).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["events"][0]["offset"], 2, "{answer}");
    c.expect(&frame("update", "a", json!([{"id":1,"v":2}])))
        .await;
    // Another method on the route: 405 naming both.
    let (status, headers, _) = server.request("POST", ITEMS, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, PUT");
}

#[tokio::test]
async fn an_undeclared_collection_is_refused_where_the_file_forbids_them() {
    let file = tidings::collections::CollectionsFile::parse(
        std::path::Path::new("collections.json"),
        r#"{"undeclared":"forbid","collections":{"orders":{"state":true}}}"#,
    )
    .expect("valid file");
    let server = start(Config {
        collections_file: Some(Arc::new(file)),
        ..Config::default()
    })
    .await;
    let (status, answer) = put(
        &server,
        "/v1/collections/ordres/items",
        "application/json",
        "[]",
    )
    .await;
    assert_error(
        "undeclared",
        (status, &answer),
        StatusCode::NOT_FOUND,
        "UNKNOWN_COLLECTION",
        "collection",
        "collection \"ordres\" is not declared in the collections file (\"undeclared\": \"forbid\"); nothing was published",
    );
    reconcile(&server, json!([{"id":1}]), [1, 0, 0, 0]).await;
}

/// Two nodes over a private Redis: a reconcile on one node publishes only the differences
/// through the shared log, a subscriber on the other node sees exactly those frames (the
/// leave included), and both nodes end holding the set.
#[tokio::test]
async fn a_reconcile_on_one_redis_node_reaches_the_other_as_the_differences() {
    let redis = support::services::PrivateRedis::start();
    let prefix = support::services::unique_prefix();
    let node = || {
        let defaults = retaining(&["orders"]);
        Config {
            engine: tidings::config::Engine::Redis,
            redis_url: redis.url(),
            key_prefix: prefix.clone(),
            ..defaults
        }
    };
    let a = support::start_ready(node()).await;
    let b = support::start_ready(node()).await;
    let (mut all, mut open) = all_and_open(&b).await;
    let seed = json!([
        {"id":1,"status":"open"},
        {"id":2,"status":"open"},
        {"id":3,"status":"closed"}
    ]);
    let answer = reconcile(&a, seed, [3, 0, 0, 0]).await;
    assert_eq!(answer["events"][0]["offset"], 1, "{answer}");
    for id in 1..=3 {
        let status = if id == 3 { "closed" } else { "open" };
        let item = json!([{"id":id,"status":status}]);
        all.expect(&frame("create", "a", item.clone())).await;
        if id != 3 {
            open.expect(&frame("create", "o", item)).await;
        }
    }
    // Drift healed from node a: 1 unchanged, 2 closed (leaves `o`), 3 gone, 4 new.
    let set = json!([
        {"id":1,"status":"open"},
        {"id":2,"status":"closed"},
        {"id":4,"status":"open"}
    ]);
    reconcile(&a, set.clone(), [1, 1, 1, 1]).await;
    all.expect(&frame("delete", "a", json!([3]))).await;
    let four = json!([{"id":4,"status":"open"}]);
    all.expect(&frame("create", "a", four.clone())).await;
    open.expect(&frame("create", "o", four)).await;
    updated_then_left(&mut all, &mut open, json!({"id":2,"status":"closed"})).await;
    // Both nodes hold the set: the same reconcile on node b changes nothing.
    reconcile(&b, set.clone(), [0, 0, 0, 3]).await;
    for server in [&a, &b] {
        let (_c, snapshot) = subscribe(server, "l", json!({"sort":["id"]})).await;
        assert_eq!(snapshot, init("l", set.clone()));
    }
}
