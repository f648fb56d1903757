//! The collections file (`--collections-file`) over real sockets: undeclared collections
//! refused to subscribers (Directus' `FORBIDDEN`) and publishers (404, nothing published), and
//! each per-collection setting (key field, state, max items, transitions) taking effect end
//! to end, with the flags filling in what the file leaves out.

mod support;

use std::path::Path;
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{assert_error, caused, frame, start, TestServer, WsClient};
use tidings::collections::CollectionsFile;
use tidings::Config;

fn with_file(text: &str) -> Config {
    let file = CollectionsFile::parse(Path::new("collections.json"), text).expect("valid file");
    Config {
        collections_file: Some(Arc::new(file)),
        ..Config::default()
    }
}

async fn subscribe(server: &TestServer, collection: &str, uid: &str, query: Value) -> WsClient {
    let mut c = server.ws().await;
    c.send(
        &json!({"type":"subscribe","collection":collection,"uid":uid,"query":query}).to_string(),
    )
    .await;
    c
}

const FORBID: &str = r#"{"undeclared":"forbid","collections":{
    "orders":{"key_field":"order_id","state":true,"max_items":2},
    "chat":{}}}"#;

#[tokio::test]
async fn an_undeclared_collection_is_forbidden_to_subscribers_exactly_as_directus_answers() {
    let server = start(with_file(FORBID)).await;
    let mut c = subscribe(&server, "ordres", "1", json!({})).await;
    c.expect(r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"ordres\" or it does not exist. Queried in root."},"uid":"1"}"#).await;
    // The connection stays open and a declared collection is served.
    c.send(r#"{"type":"subscribe","collection":"chat","uid":"2"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"2"}"#)
        .await;
    // An item subscription is refused the same way.
    c.send(r#"{"type":"subscribe","collection":"nope","item":1,"uid":3}"#)
        .await;
    c.expect(r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"nope\" or it does not exist. Queried in root."},"uid":3}"#).await;
}

#[tokio::test]
async fn a_publish_to_an_undeclared_collection_is_refused_whole_with_a_pointer() {
    let server = start(with_file(FORBID)).await;
    let mut chat = subscribe(&server, "chat", "c", json!({})).await;
    chat.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"c"}"#)
        .await;
    let message = r#"collection "ordres" is not declared in the collections file ("undeclared": "forbid"); nothing was published"#;
    let batch = json!([
        {"collection":"chat","event":"create","data":{"id":1}},
        {"collection":"ordres","event":"create","data":{"order_id":1}},
    ]);
    let answer = server.post("/v1/publish", &batch).await;
    assert_error(
        "batch",
        (answer.0, &answer.1),
        StatusCode::NOT_FOUND,
        "UNKNOWN_COLLECTION",
        "/1/collection",
        message,
    );
    let one = json!({"collection":"ordres","event":"create","data":{"order_id":1}});
    let answer = server.post("/v1/publish", &one).await;
    assert_error(
        "one event",
        (answer.0, &answer.1),
        StatusCode::NOT_FOUND,
        "UNKNOWN_COLLECTION",
        "/collection",
        message,
    );
    let answer = server
        .post("/v1/collections/ordres/create", &json!({"order_id":1}))
        .await;
    assert_error(
        "collection endpoint",
        (answer.0, &answer.1),
        StatusCode::NOT_FOUND,
        "UNKNOWN_COLLECTION",
        "/collection",
        message,
    );
    // Nothing of the refused batch was published: chat's first event is the next one, at
    // offset 1.
    let accepted = server
        .publish(json!({"collection":"chat","event":"create","data":{"id":2}}))
        .await;
    assert_eq!(accepted["events"][0]["offset"], 1, "{accepted}");
    chat.expect(&frame("create", "c", json!([{"id":2}]))).await;
}

#[tokio::test]
async fn the_file_key_field_state_and_max_items_work_end_to_end() {
    let server = start(with_file(FORBID)).await;
    let mut open = subscribe(
        &server,
        "orders",
        "o",
        json!({"filter":{"status":{"_eq":"open"}}}),
    )
    .await;
    open.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"o"}"#)
        .await;
    let publish =
        |event: &str, data: Value| json!({"collection":"orders","event":event,"data":data});
    server
        .publish(publish(
            "create",
            json!({"order_id":7,"status":"open","n":1}),
        ))
        .await;
    open.expect(&frame(
        "create",
        "o",
        json!([{"order_id":7,"status":"open","n":1}]),
    ))
    .await;
    // A partial update keyed by the file's key field merges into the stored item.
    server
        .publish(publish("update", json!({"order_id":7,"n":2})))
        .await;
    open.expect(&frame(
        "update",
        "o",
        json!([{"order_id":7,"status":"open","n":2}]),
    ))
    .await;
    // An update without the key field is refused, naming it.
    let (status, answer) = server
        .post("/v1/publish", &publish("update", json!({"id":7,"n":3})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("order_id")),
        "{answer}"
    );
    // The init of a new subscriber is the retained view, sorted by the key field.
    server
        .publish(publish(
            "create",
            json!({"order_id":3,"status":"open","n":0}),
        ))
        .await;
    open.expect(&frame(
        "create",
        "o",
        json!([{"order_id":3,"status":"open","n":0}]),
    ))
    .await;
    let mut late = subscribe(&server, "orders", "l", json!({"fields":["order_id"]})).await;
    late.expect(r#"{"type":"subscription","event":"init","data":[{"order_id":3},{"order_id":7}],"uid":"l"}"#)
        .await;
    // max_items 2 (the file's, not --state-max-items): a third key is refused, naming it.
    let answer = server
        .post("/v1/publish", &publish("create", json!({"order_id":9})))
        .await;
    assert_error(
        "third key",
        (answer.0, &answer.1),
        StatusCode::INSUFFICIENT_STORAGE,
        "STATE_FULL",
        "",
        r#"the retained state of collection "orders" is full: event 0 would create 1 new item(s) beyond its max_items in --collections-file (2); nothing was published"#,
    );
    // A key-only delete by the file's key field resolves to the stored item.
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[7]}))
        .await;
    open.expect(&frame("delete", "o", json!([7]))).await;
    late.expect(&frame("delete", "l", json!([7]))).await;
}

#[tokio::test]
async fn transitions_are_per_collection_and_flags_fill_in_what_the_file_leaves_out() {
    // The file: orders keeps the flags' transitions (view), chat asks for Directus'.
    // The flags: --state * (both retain), --transitions view.
    let mut config =
        with_file(r#"{"collections":{"chat":{"transitions":"directus"},"logs":{"state":false}}}"#);
    config.state.collections = vec!["*".into()];
    let server = start(config).await;
    let filter = json!({"filter":{"status":{"_eq":"open"}}});
    let mut orders = subscribe(&server, "orders", "o", filter.clone()).await;
    let mut chat = subscribe(&server, "chat", "c", filter).await;
    orders
        .expect(r#"{"type":"subscription","event":"init","data":[],"uid":"o"}"#)
        .await;
    chat.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"c"}"#)
        .await;
    for collection in ["orders", "chat"] {
        server
            .publish(
                json!({"collection":collection,"event":"create","data":{"id":1,"status":"draft"}}),
            )
            .await;
        server
            .publish(
                json!({"collection":collection,"event":"update","data":{"id":1,"status":"open"}}),
            )
            .await;
        server
            .publish(
                json!({"collection":collection,"event":"update","data":{"id":1,"status":"closed"}}),
            )
            .await;
    }
    let item = json!([{"id":1,"status":"open"}]);
    orders
        .expect(&caused("create", "o", item.clone(), "enter"))
        .await;
    orders
        .expect(&caused("delete", "o", json!([1]), "leave"))
        .await;
    // Directus: enter arrives as update, leave sends nothing.
    chat.expect(&frame("update", "c", item)).await;
    // `logs` is declared without state: a key-only delete is not resolved, it reaches every
    // unrestricted subscriber as sent (the collection does not retain), and a partial update
    // is delivered as published.
    let mut logs = subscribe(&server, "logs", "g", json!({})).await;
    logs.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"g"}"#)
        .await;
    server
        .publish(json!({"collection":"logs","event":"update","data":{"id":1,"n":1}}))
        .await;
    logs.expect(&frame("update", "g", json!([{"id":1,"n":1}])))
        .await;
    chat.expect_silence(std::time::Duration::from_millis(200))
        .await;
}
