//! Retained state (`--state`) on the memory engine, over real sockets: the merge rules, the
//! `init` snapshot (filter, row rule, sort, slice, projection), key-only deletes resolved to
//! the stored item, capacity refusals (507, nothing published, no offset taken), the
//! `--max-init-items` bound, and an exact cut while publishes run.

mod support;

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{
    all_and_open, caused, frame, init_frame as init, retaining, start,
    subscribe_orders as subscribe, TestServer,
};
use tidings::auth::TokenStore;
use tidings::config::Engine;
use tidings::Config;

/// [`retaining`] `orders`, with the static tokens of `tokens` (JSON).
fn retaining_with_tokens(tokens: &str) -> Config {
    Config {
        tokens: TokenStore::from_json(tokens).expect("tokens"),
        ..retaining(&["orders"])
    }
}

#[tokio::test]
async fn every_merge_rule_with_its_exact_frame() {
    let server = start(retaining(&["orders"])).await;
    // A filter on a field a partial update does not carry still matches the merged item.
    let (mut all, mut open) = all_and_open(&server).await;
    let table: Vec<(Value, &str, Value)> = vec![
        // create: the whole item is stored.
        (
            json!({"event":"create","data":{"id":1,"status":"open","a":1,"n":{"x":1,"y":2},"l":[1,2]}}),
            "create",
            json!([{"id":1,"status":"open","a":1,"n":{"x":1,"y":2},"l":[1,2]}]),
        ),
        // update: shallow merge; null sets null; nested objects and arrays replaced whole.
        (
            json!({"event":"update","data":{"id":1,"a":null,"n":{"x":3},"l":[]}}),
            "update",
            json!([{"id":1,"status":"open","a":null,"n":{"x":3},"l":[]}]),
        ),
        // update: a new field is appended.
        (
            json!({"event":"update","data":{"id":1,"b":true}}),
            "update",
            json!([{"id":1,"status":"open","a":null,"n":{"x":3},"l":[],"b":true}]),
        ),
        // create again: an upsert of the whole item.
        (
            json!({"event":"create","data":{"id":1,"status":"open","c":1}}),
            "create",
            json!([{"id":1,"status":"open","c":1}]),
        ),
        // update of a key the state does not hold: stored as given (and, new to every
        // subscriber, it enters: see the transition tests).
        (
            json!({"event":"update","data":{"id":2,"d":1}}),
            "create",
            json!([{"id":2,"d":1}]),
        ),
    ];
    for (body, event, data) in table {
        let mut body = body;
        body["collection"] = json!("orders");
        server.publish(body).await;
        let expected = match data[0]["id"] == 2 {
            true => caused(event, "a", data.clone(), "enter"),
            false => frame(event, "a", data.clone()),
        };
        all.expect(&expected).await;
        let open_data: Vec<Value> = data
            .as_array()
            .expect("list")
            .iter()
            .filter(|i| i["status"] == "open")
            .cloned()
            .collect();
        if !open_data.is_empty() {
            open.expect(&frame(event, "o", Value::Array(open_data)))
                .await;
        }
    }
    // A partial update of a matching item reaches the filtered subscriber, merged.
    server
        .publish(json!({"collection":"orders","event":"update","data":{"id":1,"c":2}}))
        .await;
    all.expect(&frame(
        "update",
        "a",
        json!([{"id":1,"status":"open","c":2}]),
    ))
    .await;
    open.expect(&frame(
        "update",
        "o",
        json!([{"id":1,"status":"open","c":2}]),
    ))
    .await;
    // delete: removed, key-only; the filtered subscriber never saw item 2.
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[2]}))
        .await;
    all.expect(&frame("delete", "a", json!([2]))).await;
    open.expect_silence(std::time::Duration::from_millis(200))
        .await;
    // What is left is what a new subscriber's init shows.
    let (_late, snapshot) = subscribe(&server, "l", json!({})).await;
    assert_eq!(snapshot, init("l", json!([{"id":1,"status":"open","c":2}])));
    assert_eq!(
        server
            .metric("tidings_state_items{collection=\"orders\"}")
            .await,
        Some(1.0)
    );
}

async fn seed(server: &TestServer) {
    let items: Vec<Value> = (1..=6)
        .map(|id| json!({"id":id,"tenant":id % 2,"total":(id * 7) % 10,"note":format!("n{id}")}))
        .collect();
    server
        .publish(json!({"collection":"orders","event":"create","data":items}))
        .await;
}

#[tokio::test]
async fn init_is_filtered_sorted_sliced_and_projected() {
    let server = start(retaining(&["orders"])).await;
    seed(&server).await;
    // totals: 1→7, 2→4, 3→1, 4→8, 5→5, 6→2
    let cases: Vec<(Value, Value)> = vec![
        // No sort: by key.
        (
            json!({"fields":["id"]}),
            json!([{"id":1},{"id":2},{"id":3},{"id":4},{"id":5},{"id":6}]),
        ),
        (
            json!({"filter":{"tenant":{"_eq":0}},"fields":["id","total"]}),
            json!([{"id":2,"total":4},{"id":4,"total":8},{"id":6,"total":2}]),
        ),
        (
            json!({"sort":["-total"],"limit":2,"fields":["id","total"]}),
            json!([{"id":4,"total":8},{"id":1,"total":7}]),
        ),
        (
            json!({"sort":["total"],"limit":2,"page":2,"fields":["id"]}),
            json!([{"id":2},{"id":5}]),
        ),
        (
            json!({"offset":4,"fields":["id"]}),
            json!([{"id":5},{"id":6}]),
        ),
        (
            json!({"search":"n3","fields":["id","note"]}),
            json!([{"id":3,"note":"n3"}]),
        ),
        (json!({"filter":{"missing":{"_eq":1}}}), json!([])),
    ];
    for (i, (query, data)) in cases.into_iter().enumerate() {
        let uid = format!("q{i}");
        let (_c, got) = subscribe(&server, &uid, query.clone()).await;
        assert_eq!(got, init(&uid, data), "query {query}");
    }
    // Directus' default limit without `limit`; `limit: -1` takes every item.
    let many: Vec<Value> = (100..=250).map(|id| json!({"id":id})).collect();
    server
        .publish(json!({"collection":"orders","event":"create","data":many}))
        .await;
    let count = |text: &str| {
        serde_json::from_str::<Value>(text).expect("json")["data"]
            .as_array()
            .expect("list")
            .len()
    };
    let (_c, default) = subscribe(&server, "d", json!({})).await;
    assert_eq!(count(&default), 100);
    let (_c, every) = subscribe(&server, "e", json!({"limit":-1})).await;
    assert_eq!(count(&every), 157);
    // Event and item subscriptions keep their Directus init.
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","event":"create","uid":"ev"}"#,
        r#"{"type":"subscription","event":"init","uid":"ev"}"#,
    )
    .await;
}

#[tokio::test]
async fn row_rules_narrow_init_and_key_only_deletes_reach_exactly_who_saw_the_item() {
    let server = start(retaining_with_tokens(
        r#"{"t1":{"sub":"one","collections":{"orders":{"filter":{"tenant":{"_eq":1}}}}},
                "t0":{"sub":"zero","collections":{"orders":{"filter":{"tenant":{"_eq":0}}}}}}"#,
    ))
    .await;
    seed(&server).await;
    let sub = r#"{"type":"subscribe","collection":"orders","uid":"s","query":{"fields":["id"]}}"#;
    let mut one = server.ws_token("t1").await;
    one.exchange(sub, &init("s", json!([{"id":1},{"id":3},{"id":5}])))
        .await;
    let mut zero = server.ws_token("t0").await;
    zero.exchange(sub, &init("s", json!([{"id":2},{"id":4},{"id":6}])))
        .await;
    let (mut all, _) = subscribe(
        &server,
        "a",
        json!({"filter":{"total":{"_gt":4}},"fields":["id"]}),
    )
    .await;
    // Key-only delete of item 3 (tenant 1, total 1): the restricted reader of tenant 1 saw
    // it, the tenant-0 reader and the filtered reader did not.
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[3]}))
        .await;
    one.expect(&frame("delete", "s", json!([3]))).await;
    // Item 4 (tenant 0, total 8): the tenant-0 reader and the filtered reader.
    server
        .publish(json!({"collection":"orders","event":"delete","keys":["4"]}))
        .await;
    zero.expect(&frame("delete", "s", json!(["4"]))).await;
    all.expect(&frame("delete", "a", json!(["4"]))).await;
    // A key the state never held reaches nobody.
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[99]}))
        .await;
    for c in [&mut one, &mut zero, &mut all] {
        c.expect_silence(std::time::Duration::from_millis(200))
            .await;
    }
}

#[tokio::test]
async fn a_collection_without_state_is_unchanged() {
    let server = start(retaining(&["orders"])).await;
    server
        .publish(json!({"collection":"other","event":"create","data":{"id":1}}))
        .await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"other","uid":"x"}"#,
        &init("x", json!([])),
    )
    .await;
    server
        .publish(json!({"collection":"other","event":"update","data":{"id":1,"b":2}}))
        .await;
    c.expect(&frame("update", "x", json!([{"id":1,"b":2}])))
        .await;
}

#[tokio::test]
async fn creating_past_a_limit_is_refused_whole_with_507() {
    let mut config = retaining(&["orders"]);
    config.state.max_items = 2;
    let server = start(config).await;
    let (mut c, _) = subscribe(&server, "a", json!({"fields":["id"]})).await;
    server
        .publish(json!({"collection":"orders","event":"create","data":[{"id":1},{"id":2}]}))
        .await;
    c.expect(&frame("create", "a", json!([{"id":1}]))).await;
    c.expect(&frame("create", "a", json!([{"id":2}]))).await;
    // A batch whose second event creates a third key: refused whole.
    let (status, body) = server
        .post(
            "/v1/publish",
            &json!([
                {"collection":"orders","event":"update","data":{"id":1,"x":1}},
                {"collection":"orders","event":"create","data":{"id":3}}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(
        body,
        json!({"error":{"code":"STATE_FULL","message":"the retained state of collection \"orders\" is full: event 1 would create 1 new item(s) beyond --state-max-items (2); nothing was published","where":"/1"}})
    );
    let (status, body) = server
        .post("/v1/collections/orders/update", &json!({"id":7}))
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(body["error"]["where"], "");
    c.expect_silence(std::time::Duration::from_millis(200))
        .await;
    // No offset was consumed; updates and deletes of held keys always pass.
    let answer = server
        .publish(json!({"collection":"orders","event":"update","data":{"id":2,"x":1}}))
        .await;
    assert_eq!(
        answer["events"][0]["offset"], 2,
        "one event (offset 1) came before"
    );
    c.expect(&frame("update", "a", json!([{"id":2}]))).await;
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[1]}))
        .await;
    c.expect(&frame("delete", "a", json!([1]))).await;
    // With room again, a new key is accepted.
    let answer = server
        .publish(json!({"collection":"orders","event":"create","data":{"id":3}}))
        .await;
    assert_eq!(answer["events"][0]["offset"], 4);
    assert_eq!(
        server
            .metric("tidings_state_rejections_total{collection=\"orders\",reason=\"max_items\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        server
            .metric("tidings_publish_requests_total{format=\"json\",status=\"507\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn the_byte_limit_counts_all_collections_together() {
    let mut config = retaining(&["*"]);
    config.state.max_bytes = 400;
    let server = start(config).await;
    let pad = "x".repeat(100);
    server
        .publish(json!({"collection":"a","event":"create","data":{"id":1,"pad":pad}}))
        .await;
    server
        .publish(json!({"collection":"b","event":"create","data":{"id":1,"pad":pad}}))
        .await;
    let (status, body) = server
        .post(
            "/v1/publish",
            &json!({"collection":"c","event":"create","data":{"id":1,"pad":pad}}),
        )
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(
        body["error"]["message"],
        "the retained state of collection \"c\" is full: event 0 would create 1 new item(s) beyond --state-max-bytes (400); nothing was published"
    );
    // Updating a held key may grow it past the limit.
    server
        .publish(json!({"collection":"a","event":"update","data":{"id":1,"more":pad}}))
        .await;
}

#[tokio::test]
async fn an_init_over_max_init_items_is_a_clear_error() {
    let mut config = retaining(&["orders"]);
    config.state.max_init_items = 3;
    let server = start(config).await;
    seed(&server).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"big"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"LIMIT_EXCEEDED","message":"The initial list would hold 6 items, over --max-init-items (3); narrow the filter or set a smaller limit."},"uid":"big"}"#,
    )
    .await;
    // Nothing was registered; a narrower subscription works.
    assert_eq!(server.state.registry.counts("orders"), (0, 0));
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"ok","query":{"limit":3,"fields":["id"]}}"#,
        &init("ok", json!([{"id":1},{"id":2},{"id":3}])),
    )
    .await;
}

#[test]
fn state_with_nats_is_refused_naming_the_flag() {
    let config = Config {
        engine: Engine::Nats,
        ..retaining(&["orders"])
    };
    let err = config.validate().expect_err("refused");
    assert_eq!(
        err.to_string(),
        "--state: retained state needs --engine memory or redis for now (state shared through NATS is not built yet)"
    );
    let bad = retaining(&["no spaces"]);
    assert_eq!(
        bad.validate().expect_err("refused").to_string(),
        "--state: `no spaces` is not a collection name (or `*`)"
    );
}

/// Applies a frame to a list as a Directus client would: init replaces, create adds, update
/// replaces, delete removes.
fn apply(list: &mut BTreeMap<u64, Value>, frame: &Value) {
    let data = frame["data"].as_array().cloned().unwrap_or_default();
    match frame["event"].as_str() {
        Some("init") => {
            list.clear();
            for item in data {
                list.insert(item["id"].as_u64().expect("id"), item);
            }
        }
        Some("create" | "update") => {
            for item in data {
                list.insert(item["id"].as_u64().expect("id"), item);
            }
        }
        Some("delete") => {
            for key in data {
                list.remove(&key.as_u64().expect("key"));
            }
        }
        other => panic!("unexpected frame {other:?}: {frame}"),
    }
}

#[tokio::test]
async fn init_while_publishing_has_no_gap_and_no_duplicate() {
    let server = std::sync::Arc::new(start(retaining(&["orders"])).await);
    const ROUNDS: u64 = 150;
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            for i in 1..=ROUNDS {
                server
                    .publish(json!({"collection":"orders","event":"create","data":{"id":i,"v":0}}))
                    .await;
                server
                    .publish(json!({"collection":"orders","event":"update","data":{"id":i / 2 + 1,"v":i}}))
                    .await;
                if i % 5 == 0 {
                    server
                        .publish(json!({"collection":"orders","event":"delete","keys":[i - 3]}))
                        .await;
                }
            }
        })
    };
    // Subscribers join while the publisher runs; each keeps its list from init + live frames.
    let mut clients = Vec::new();
    for n in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(15 * n)).await;
        let mut c = server.ws().await;
        c.send(r#"{"type":"subscribe","collection":"orders","uid":"s","query":{"limit":-1}}"#)
            .await;
        let first = c.recv_raw().await;
        let mut list = BTreeMap::new();
        apply(&mut list, &first);
        let offset = first["position"]["offset"].as_u64().expect("offset");
        clients.push((c, list, offset));
    }
    publisher.await.expect("publisher");
    let last = server
        .publish(json!({"collection":"orders","event":"create","data":{"id":100000,"v":0}}))
        .await["events"][0]["offset"]
        .as_u64()
        .expect("offset");
    let (_c, truth) = subscribe(&server, "t", json!({"limit":-1})).await;
    let truth: Value = serde_json::from_str(&truth).expect("json");
    let mut expected = BTreeMap::new();
    apply(&mut expected, &truth);
    for (c, list, mut offset) in &mut clients {
        while offset < last {
            let f = c.recv_raw().await;
            let at = f["position"]["offset"].as_u64().expect("offset");
            assert_eq!(at, offset + 1, "gap or duplicate: {f}");
            offset = at;
            apply(list, &f);
        }
        assert_eq!(*list, expected);
    }
}

async fn publish_orders(server: &TestServer, event: &str, data: Value) {
    server
        .publish(json!({"collection":"orders","event":event,"data":data}))
        .await;
}

#[tokio::test]
async fn an_update_that_enters_or_leaves_a_filter_is_a_create_or_a_key_only_delete() {
    let server = start(retaining(&["orders"])).await;
    let (mut all, _) = subscribe(&server, "a", json!({})).await;
    // `status _eq` is indexed: the index must find this group through the previous version.
    let (mut open, _) = subscribe(
        &server,
        "o",
        json!({"filter":{"status":{"_eq":"open"}},"fields":["id","status"]}),
    )
    .await;
    let quiet = std::time::Duration::from_millis(150);
    // (published event, item, frame for "a", frame for "o")
    let table: Vec<(&str, Value, String, Option<String>)> = vec![
        (
            "create",
            json!({"id":1,"status":"open","n":1}),
            frame("create", "a", json!([{"id":1,"status":"open","n":1}])),
            Some(frame("create", "o", json!([{"id":1,"status":"open"}]))),
        ),
        // Leave: the key only, never the new content.
        (
            "update",
            json!({"id":1,"status":"closed"}),
            frame("update", "a", json!([{"id":1,"status":"closed","n":1}])),
            Some(caused("delete", "o", json!([1]), "leave")),
        ),
        // Matched neither before nor after: nothing.
        (
            "update",
            json!({"id":1,"n":2}),
            frame("update", "a", json!([{"id":1,"status":"closed","n":2}])),
            None,
        ),
        // Enter: a create with the full (projected) item.
        (
            "update",
            json!({"id":1,"status":"open"}),
            frame("update", "a", json!([{"id":1,"status":"open","n":2}])),
            Some(caused(
                "create",
                "o",
                json!([{"id":1,"status":"open"}]),
                "enter",
            )),
        ),
        // Matched before and after: as published.
        (
            "update",
            json!({"id":1,"n":3}),
            frame("update", "a", json!([{"id":1,"status":"open","n":3}])),
            Some(frame("update", "o", json!([{"id":1,"status":"open"}]))),
        ),
        // An upsert that stops matching leaves too.
        (
            "create",
            json!({"id":1,"status":"closed"}),
            frame("create", "a", json!([{"id":1,"status":"closed"}])),
            Some(caused("delete", "o", json!([1]), "leave")),
        ),
        // An update of a key the state does not hold, matching: an enter.
        (
            "update",
            json!({"id":2,"status":"open"}),
            caused("create", "a", json!([{"id":2,"status":"open"}]), "enter"),
            Some(caused(
                "create",
                "o",
                json!([{"id":2,"status":"open"}]),
                "enter",
            )),
        ),
    ];
    for (event, item, for_all, for_open) in table {
        publish_orders(&server, event, item).await;
        all.expect(&for_all).await;
        match for_open {
            Some(expected) => open.expect(&expected).await,
            None => open.expect_silence(quiet).await,
        }
    }
    // One update of three items: the one still shown, then the enter, then the leave.
    publish_orders(
        &server,
        "create",
        json!([{"id":3,"status":"open"},{"id":4,"status":"closed"}]),
    )
    .await;
    open.expect(&frame("create", "o", json!([{"id":3,"status":"open"}])))
        .await;
    publish_orders(
        &server,
        "update",
        json!([{"id":2,"status":"closed"},{"id":3,"x":1},{"id":4,"status":"open"}]),
    )
    .await;
    open.expect(&frame("update", "o", json!([{"id":3,"status":"open"}])))
        .await;
    open.expect(&caused(
        "create",
        "o",
        json!([{"id":4,"status":"open"}]),
        "enter",
    ))
    .await;
    open.expect(&caused("delete", "o", json!([2]), "leave"))
        .await;
    assert_eq!(
        server
            .metric("tidings_transitions_total{cause=\"enter\",collection=\"orders\"}")
            .await,
        Some(4.0),
        "items 1, 2 and 4 entered \"o\"; item 2 (unknown key) entered \"a\""
    );
    assert_eq!(
        server
            .metric("tidings_transitions_total{cause=\"leave\",collection=\"orders\"}")
            .await,
        Some(3.0)
    );
}

#[tokio::test]
async fn a_row_rule_that_stops_matching_is_a_leave_for_collection_and_item_subscriptions() {
    let server = start(retaining_with_tokens(
        r#"{"t1":{"sub":"one","collections":{"orders":{"filter":{"tenant":{"_eq":1}}}}}}"#,
    ))
    .await;
    publish_orders(&server, "create", json!({"id":5,"tenant":1,"secret":"a"})).await;
    let mut list = server.ws_token("t1").await;
    list.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"l"}"#,
        &init("l", json!([{"id":5,"tenant":1,"secret":"a"}])),
    )
    .await;
    let mut item = server.ws_token("t1").await;
    item.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"i","query":{"fields":["id","tenant"]},"item":5}"#,
        r#"{"type":"subscription","event":"init","data":{"id":5,"tenant":1},"uid":"i"}"#,
    )
    .await;
    // Moved to another tenant: both learn it left, neither sees the new content.
    publish_orders(&server, "update", json!({"id":5,"tenant":2,"secret":"b"})).await;
    list.expect(&caused("delete", "l", json!([5]), "leave"))
        .await;
    item.expect(&caused("delete", "i", json!("5"), "leave"))
        .await;
    // Moved back: it enters (the item subscription gets it as an update, never a create).
    publish_orders(&server, "update", json!({"id":5,"tenant":1})).await;
    list.expect(&caused(
        "create",
        "l",
        json!([{"id":5,"tenant":1,"secret":"b"}]),
        "enter",
    ))
    .await;
    item.expect(&caused("update", "i", json!({"id":5,"tenant":1}), "enter"))
        .await;
}

/// Runs a leave and an enter past a filtered subscription and returns its frames.
async fn leave_then_enter(server: &TestServer, subscribe_msg: &str) -> Vec<String> {
    publish_orders(server, "create", json!({"id":1,"status":"open"})).await;
    let mut c = server.ws().await;
    c.send(subscribe_msg).await;
    let _init = c.recv_text().await;
    publish_orders(server, "update", json!({"id":1,"status":"closed"})).await;
    publish_orders(server, "update", json!({"id":1,"status":"open"})).await;
    // A marker that reaches every subscription of the test, so we know nothing else is coming.
    publish_orders(server, "update", json!({"id":9,"status":"open"})).await;
    let mut frames = Vec::new();
    loop {
        let f = c.recv_text().await;
        if f.contains(r#""id":9"#) {
            return frames;
        }
        frames.push(f);
    }
}

#[tokio::test]
async fn subscriptions_with_event_and_the_directus_mode_keep_directus_semantics() {
    let filtered = r#"{"type":"subscribe","collection":"orders","uid":"u","query":{"filter":{"status":{"_eq":"open"}}}}"#;
    let with_event = r#"{"type":"subscribe","collection":"orders","uid":"u","event":"update","query":{"filter":{"status":{"_eq":"open"}}}}"#;
    // `event` set: no synthetic events; the enter arrives as the update it is.
    let server = start(retaining(&["orders"])).await;
    let frames = leave_then_enter(&server, with_event).await;
    assert_eq!(
        frames,
        [frame("update", "u", json!([{"id":1,"status":"open"}]))]
    );
    // --transitions directus: the same for every subscription.
    let config = Config {
        transitions: tidings::config::Transitions::Directus,
        ..retaining(&["orders"])
    };
    let server = start(config).await;
    let frames = leave_then_enter(&server, filtered).await;
    assert_eq!(
        frames,
        [frame("update", "u", json!([{"id":1,"status":"open"}]))]
    );
    // The default (`view`), for comparison.
    let server = start(retaining(&["orders"])).await;
    let frames = leave_then_enter(&server, filtered).await;
    assert_eq!(
        frames,
        [
            caused("delete", "u", json!([1]), "leave"),
            caused("create", "u", json!([{"id":1,"status":"open"}]), "enter"),
        ]
    );
}

#[tokio::test]
async fn a_resume_replays_the_transitions_it_missed() {
    let server = start(retaining(&["orders"])).await;
    publish_orders(
        &server,
        "create",
        json!([{"id":1,"status":"open"},{"id":2,"status":"closed"}]),
    )
    .await;
    let sub = |since: Option<&Value>| {
        let mut msg = json!({"type":"subscribe","collection":"orders","uid":"o",
            "query":{"filter":{"status":{"_eq":"open"}},"fields":["id"]}});
        if let Some(since) = since {
            msg["since"] = since.clone();
        }
        msg.to_string()
    };
    let mut c = server.ws().await;
    c.send(&sub(None)).await;
    let first = c.recv_raw().await;
    assert_eq!(first["data"], json!([{"id":1}]));
    let position = first["position"].clone();
    c.close().await;
    publish_orders(
        &server,
        "update",
        json!([{"id":1,"status":"closed"},{"id":2,"status":"open"}]),
    )
    .await;
    let mut back = server.ws().await;
    back.send(&sub(Some(&position))).await;
    let init = back.recv_raw().await;
    assert_eq!(
        (&init["recovered"], &init["data"]),
        (&json!(true), &json!([]))
    );
    back.expect(&caused("create", "o", json!([{"id":2}]), "enter"))
        .await;
    back.expect(&caused("delete", "o", json!([1]), "leave"))
        .await;
}

#[tokio::test]
async fn an_item_subscription_init_carries_the_item_in_directus_shape() {
    let server = start(retaining_with_tokens(
        r#"{"t0":{"sub":"zero","collections":{"orders":{"filter":{"tenant":{"_eq":0}}}}}}"#,
    ))
    .await;
    seed(&server).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"i","item":"3","query":{"fields":["id","note"]}}"#,
        r#"{"type":"subscription","event":"init","data":{"id":3,"note":"n3"},"uid":"i"}"#,
    )
    .await;
    // Not held: no data (the item arrives when it is published).
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"u","item":77}"#,
        r#"{"type":"subscription","event":"init","uid":"u"}"#,
    )
    .await;
    // Held but outside the reader's rows (item 3 is tenant 1): no data either.
    let mut zero = server.ws_token("t0").await;
    zero.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"i","item":3}"#,
        r#"{"type":"subscription","event":"init","uid":"i"}"#,
    )
    .await;
    zero.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"j","item":4,"query":{"fields":["id"]}}"#,
        r#"{"type":"subscription","event":"init","data":{"id":4},"uid":"j"}"#,
    )
    .await;
}

#[tokio::test]
async fn a_stale_version_changes_nothing_reaches_nobody_and_is_reported() {
    let server = start(retaining(&["orders"])).await;
    let (mut c, _) = subscribe(&server, "a", json!({})).await;
    let quiet = std::time::Duration::from_millis(150);
    let post = |body: Value| {
        let server = &server;
        async move { server.publish(body).await["events"].clone() }
    };
    let events =
        post(json!({"collection":"orders","event":"create","data":{"id":1,"v":"a"},"version":2}))
            .await;
    assert!(events[0].get("stale").is_none(), "{events}");
    c.expect(&frame("create", "a", json!([{"id":1,"v":"a"}])))
        .await;
    // Not newer (equal, older): changes nothing, delivered to nobody, reported.
    for version in [2, 1] {
        let events = post(json!({"collection":"orders","event":"update","data":{"id":1,"v":"old"},"version":version})).await;
        assert_eq!(events[0]["stale"], json!([1]), "{events}");
        c.expect_silence(quiet).await;
    }
    // Within one batch, the later event is judged after the earlier one.
    let events = post(json!([
        {"collection":"orders","event":"update","data":[{"id":1,"v":"c"},{"id":2,"v":"new"}],"version":5},
        {"collection":"orders","event":"update","data":{"id":1,"v":"b"},"version":4}
    ]))
    .await;
    assert!(events[0].get("stale").is_none(), "{events}");
    assert_eq!(events[1]["stale"], json!([1]), "{events}");
    c.expect(&frame("update", "a", json!([{"id":1,"v":"c"}])))
        .await;
    c.expect(&caused("create", "a", json!([{"id":2,"v":"new"}]), "enter"))
        .await;
    c.expect_silence(quiet).await;
    // A stale delete deletes nothing.
    let events = post(json!({"collection":"orders","event":"delete","keys":[1],"version":5})).await;
    assert_eq!(events[0]["stale"], json!([1]), "{events}");
    c.expect_silence(quiet).await;
    let (_l, snapshot) = subscribe(&server, "l", json!({})).await;
    assert_eq!(
        snapshot,
        init("l", json!([{"id":1,"v":"c"},{"id":2,"v":"new"}]))
    );
    // A newer one applies; an unversioned write always applies.
    post(json!({"collection":"orders","event":"delete","keys":[1],"version":6})).await;
    c.expect(&frame("delete", "a", json!([1]))).await;
    post(json!({"collection":"orders","event":"update","data":{"id":2,"v":"free"}})).await;
    c.expect(&frame("update", "a", json!([{"id":2,"v":"free"}])))
        .await;
    // A version is a non-negative integer.
    for (bad, why) in [
        (json!(-1), "-1"),
        (json!(1.5), "1.5"),
        (json!("3"), "string"),
    ] {
        let (status, body) = server
            .post(
                "/v1/publish",
                &json!([{"collection":"orders","event":"update","data":{"id":2},"version":bad}]),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body,
            json!({"error":{"code":"INVALID_PAYLOAD","message":format!("expected an integer from 0 to 9007199254740991, got {why}"),"where":"/0/version"}})
        );
    }
}
