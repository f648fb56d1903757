//! `POST /v1/cloudevents` against a real broker: events built and serialized by the official
//! CloudEvents JavaScript SDK (npm `cloudevents`, pinned in `tests/cloudevents/package.json`,
//! run by `tests/cloudevents/emit.mjs` under Node) in the binary, structured and batched
//! content modes reach subscribers as exactly the expected frames; a redelivered event
//! (same `source` + `id`) is delivered once; the webhook handshake; and a table of bad
//! inputs, each with its exact status and error, none of which delivers anything.
//!
//! Needs `node` and `npm` (the test runs `npm ci` in `tests/cloudevents` when the installed
//! packages are not the pinned ones); without them it fails with `PREREQUISITE MISSING`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::process::Proc;
use support::{start, TestServer, WsClient};
use tidings::event::EventKind;
use tidings::Config;

/// The whole node run.
const NODE_DEADLINE: Duration = Duration::from_secs(60);

fn emitter_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("cloudevents")
}

/// Runs the SDK emitter over `plan` and returns one answer per request: (status, body).
async fn emit(server: &TestServer, plan: Value) -> Vec<(u16, Value)> {
    let dir = emitter_dir();
    let plan_file = std::env::temp_dir().join(format!(
        "tidings-ce-plan-{}.json",
        support::services::unique_prefix()
    ));
    std::fs::write(&plan_file, plan.to_string()).expect("write the plan");
    let url = format!("http://{}/v1/cloudevents", server.addr);
    let answers = tokio::task::spawn_blocking(move || {
        let script = dir.join("emit.mjs");
        let mut proc = Proc::spawn_program(
            "node",
            &[
                &script.to_string_lossy(),
                &url,
                &plan_file.to_string_lossy(),
            ],
        );
        let status = proc.wait_exit(NODE_DEADLINE);
        let _ = std::fs::remove_file(&plan_file);
        assert!(
            status.success(),
            "the emitter failed: {}",
            proc.transcript()
        );
        proc.stdout
            .seen
            .iter()
            .map(|line| {
                let v: Value = serde_json::from_str(line).expect("an answer line");
                (
                    v["status"].as_u64().expect("status") as u16,
                    v["body"].clone(),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("the emitter task");
    assert_eq!(answers.len(), plan.as_array().map_or(0, Vec::len));
    answers
}

async fn subscribed(server: &TestServer) -> WsClient {
    server
        .ws_subscribed(&[("orders", "o"), ("users", "u")])
        .await
}

fn config() -> Config {
    let mut config = Config {
        max_publish_bytes: 4096,
        ..Config::default()
    };
    config
        .cloudevents
        .type_kinds
        .insert("com.shop.order.placed".into(), EventKind::Create);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_events_in_every_mode_reach_subscribers_once() {
    let node = support::services::require_node();
    support::services::npm_ci(&emitter_dir());
    eprintln!("node {node}");
    let server = start(config()).await;
    let mut ws = subscribed(&server).await;
    let created = json!({
        "specversion": "1.0", "id": "evt-1", "source": "/shop/orders", "type": "com.shop.order.created",
        "subject": "orders", "data": {"id": 1, "status": "new", "total": 5}
    });
    let plan = json!([
        {"mode": "binary", "events": [created]},
        {"mode": "structured", "events": [{
            "specversion": "1.0", "id": "evt-2", "source": "/shop/orders", "type": "com.shop.order.updated",
            "collection": "orders", "data": {"id": 1, "status": "paid", "total": 5}
        }]},
        {"mode": "batch", "events": [
            {"id": "evt-3", "source": "/shop/users", "type": "com.shop.user.create", "subject": "users",
             "data": [{"id": "u1", "name": "ann"}, {"id": "u2", "name": "bob"}]},
            {"id": "evt-4", "source": "/shop/orders", "type": "com.shop.order.deleted", "subject": "orders",
             "data": [1]}
        ]},
        // The same source + id as the first: a redelivery, accepted and not delivered again.
        {"mode": "binary", "events": [created]},
        // A type mapped by --cloudevents-type-kind.
        {"mode": "structured", "events": [{
            "id": "evt-5", "source": "/shop/orders", "type": "com.shop.order.placed", "subject": "orders",
            "data": {"id": 2, "status": "new", "total": 7}
        }]}
    ]);
    let answers = emit(&server, plan).await;
    /// (collection, event, items, offset, duplicate) of one accepted event.
    type Accepted = (String, String, u64, u64, bool);
    let summary: Vec<(u16, Vec<Accepted>)> = answers
        .iter()
        .map(|(status, body)| {
            support::schema_check_http(body);
            let events = body["events"].as_array().cloned().unwrap_or_default();
            let events = events
                .iter()
                .map(|e| {
                    (
                        e["collection"].as_str().unwrap_or_default().to_string(),
                        e["event"].as_str().unwrap_or_default().to_string(),
                        e["items"].as_u64().unwrap_or_default(),
                        e["offset"].as_u64().unwrap_or_default(),
                        e["duplicate"] == true,
                    )
                })
                .collect();
            (*status, events)
        })
        .collect();
    let s =
        |c: &str, e: &str, items, offset, dup| (c.to_string(), e.to_string(), items, offset, dup);
    assert_eq!(
        summary,
        [
            (202, vec![s("orders", "create", 1, 1, false)]),
            (202, vec![s("orders", "update", 1, 2, false)]),
            (
                202,
                vec![
                    s("users", "create", 2, 1, false),
                    s("orders", "delete", 1, 3, false)
                ]
            ),
            (202, vec![s("orders", "create", 1, 1, true)]),
            (202, vec![s("orders", "create", 1, 4, false)]),
        ],
        "{answers:?}"
    );
    for frame in [
        r#"{"type":"subscription","event":"create","data":[{"id":1,"status":"new","total":5}],"uid":"o"}"#,
        r#"{"type":"subscription","event":"update","data":[{"id":1,"status":"paid","total":5}],"uid":"o"}"#,
        // A create of several items is one frame per item, as Directus sends them.
        r#"{"type":"subscription","event":"create","data":[{"id":"u1","name":"ann"}],"uid":"u"}"#,
        r#"{"type":"subscription","event":"create","data":[{"id":"u2","name":"bob"}],"uid":"u"}"#,
        r#"{"type":"subscription","event":"delete","data":[1],"uid":"o"}"#,
        r#"{"type":"subscription","event":"create","data":[{"id":2,"status":"new","total":7}],"uid":"o"}"#,
    ] {
        ws.expect(frame).await;
    }
    ws.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        server
            .metric("tidings_publish_requests_total{format=\"cloudevents\",status=\"202\"}")
            .await,
        Some(5.0)
    );
    assert_eq!(
        server.metric("tidings_publish_duplicates_total").await,
        Some(1.0)
    );
}

/// Runs the SDK test in a child without `node` on PATH: it must fail, naming what is missing.
#[test]
fn without_node_the_sdk_test_fails_loudly() {
    if std::env::var_os("TIDINGS_CE_CHILD").is_some() {
        return;
    }
    support::services::assert_fails_without_prerequisite(
        "sdk_events_in_every_mode_reach_subscribers_once",
        &[("PATH", "/nonexistent"), ("TIDINGS_CE_CHILD", "1")],
    );
}

#[tokio::test]
async fn webhook_handshake() {
    let mut config = config();
    config.cloudevents_webhook_origins = vec!["eventgrid.azure.net".into()];
    let server = start(config).await;
    let (status, headers, body) = server
        .request(
            "OPTIONS",
            "/v1/cloudevents",
            &[
                ("webhook-request-origin", "eventgrid.azure.net"),
                ("webhook-request-rate", "120"),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        header("webhook-allowed-origin"),
        Some("eventgrid.azure.net")
    );
    assert_eq!(header("webhook-allowed-rate"), Some("*"));
    assert_eq!(header("allow"), Some("POST, OPTIONS"));

    for (origin, status, code) in [
        (None, StatusCode::BAD_REQUEST, "INVALID_HEADER"),
        (Some("evil.example"), StatusCode::FORBIDDEN, "FORBIDDEN"),
    ] {
        let sent: Vec<(&str, &str)> = origin
            .map(|o| ("webhook-request-origin", o))
            .into_iter()
            .collect();
        let (got, headers, body) = server
            .request("OPTIONS", "/v1/cloudevents", &sent, Vec::new())
            .await;
        assert_eq!(got, status, "{origin:?}: {body}");
        assert!(headers.get("webhook-allowed-origin").is_none());
        let body: Value = serde_json::from_str(&body).expect("json error");
        assert_eq!(body["error"]["code"], code);
        assert_eq!(body["error"]["where"], "webhook-request-origin");
        support::schema_check_http(&body);
    }
    // Any other method is a 405 that lists both.
    let (got, headers, _) = server
        .request("GET", "/v1/cloudevents", &[], Vec::new())
        .await;
    assert_eq!(got, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("POST, OPTIONS")
    );
}

/// The binary-mode headers of a valid event, minus `drop`, plus `extra`.
fn binary<'a>(drop: &str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers: Vec<(&str, &str)> = [
        ("ce-specversion", "1.0"),
        ("ce-id", "b-1"),
        ("ce-source", "/shop"),
        ("ce-type", "com.shop.order.created"),
        ("ce-subject", "orders"),
    ]
    .into_iter()
    .filter(|(name, _)| *name != drop)
    .collect();
    for (name, value) in extra {
        headers.retain(|(n, _)| n != name);
        headers.push((name, value));
    }
    headers
}

/// A valid structured event with `changes` applied (`null` removes an attribute).
fn structured(changes: Value) -> Value {
    let mut event = json!({
        "specversion": "1.0", "id": "s-1", "source": "/shop", "type": "com.shop.order.created",
        "subject": "orders", "data": {"id": 1}
    });
    if let (Some(obj), Value::Object(changes)) = (event.as_object_mut(), changes) {
        for (k, v) in changes {
            if v.is_null() {
                obj.remove(&k);
            } else {
                obj.insert(k, v);
            }
        }
    }
    event
}

#[tokio::test]
async fn bad_inputs_get_exact_errors_and_deliver_nothing() {
    let server = start(config()).await;
    let mut ws = subscribed(&server).await;
    const JSON: &str = "application/json";
    const CE: &str = "application/cloudevents+json";
    const BATCH: &str = "application/cloudevents-batch+json";
    let item = br#"{"id":1}"#.to_vec();
    let one = |v: Value| v.to_string().into_bytes();
    // (what, content type, extra headers, body, status, code, where, message)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        StatusCode,
        &'a str,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("binary, no ce- headers", JSON, vec![], item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-specversion",
         "invalid ce-specversion header: the required attribute `specversion` is missing"),
        ("binary, specversion 0.3", JSON, binary("", &[("ce-specversion", "0.3")]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-specversion",
         "invalid ce-specversion header: unsupported specversion `0.3`: this endpoint takes CloudEvents 1.0"),
        ("binary, no id", JSON, binary("ce-id", &[]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-id",
         "invalid ce-id header: the required attribute `id` is missing"),
        ("binary, no source", JSON, binary("ce-source", &[]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-source",
         "invalid ce-source header: the required attribute `source` is missing"),
        ("binary, no type", JSON, binary("ce-type", &[]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-type",
         "invalid ce-type header: the required attribute `type` is missing"),
        ("binary, type without a kind", JSON, binary("", &[("ce-type", "com.shop.order.shipped")]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-type",
         "invalid ce-type header: cannot tell the event kind from type `com.shop.order.shipped`: end it in .created, .updated or .deleted, or map it with --cloudevents-type-kind"),
        ("binary, no collection", JSON, binary("ce-subject", &[]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-subject",
         "invalid ce-subject header: no collection: set the `subject` or `collection` attribute"),
        ("binary, bad collection name", JSON, binary("", &[("ce-subject", "bad%20name")]), item.clone(), StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-subject",
         "invalid ce-subject header: invalid collection name `bad name`: 1-128 characters of A-Z a-z 0-9 _ - ., not starting with ."),
        ("binary, item without its key", JSON, binary("", &[]), one(json!({"name": "x"})), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/id",
         "the item has no key field `id`"),
        ("binary, data not JSON", "text/plain", binary("", &[]), b"hello".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "content-type",
         "the request body must be JSON: send `Content-Type: application/json`"),
        ("structured, not JSON", CE, vec![], b"{\"specversion\":".to_vec(), StatusCode::BAD_REQUEST, "INVALID_JSON", "",
         ""),
        ("structured, no specversion", CE, vec![], one(structured(json!({"specversion": null}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/specversion",
         "the required attribute `specversion` is missing"),
        ("structured, specversion 0.3", CE, vec![], one(structured(json!({"specversion": "0.3"}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/specversion",
         "unsupported specversion `0.3`: this endpoint takes CloudEvents 1.0"),
        ("structured, id a number", CE, vec![], one(structured(json!({"id": 7}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/id",
         "`id` must be a string, got number"),
        ("structured, empty source", CE, vec![], one(structured(json!({"source": ""}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/source",
         "the `source` attribute is empty"),
        ("structured, base64 data", CE, vec![], one(structured(json!({"data": null, "data_base64": "eyJpZCI6MX0="}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/data_base64",
         "binary data is not accepted: send the item(s) as JSON in `data`"),
        ("structured, XML data", CE, vec![], one(structured(json!({"datacontenttype": "application/xml"}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/datacontenttype",
         "`data` must be JSON (application/json), not `application/xml`"),
        ("structured, no data", CE, vec![], one(structured(json!({"data": null}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/data",
         "a create needs `data`: the item(s)"),
        ("structured, key of the wrong type", CE, vec![], one(structured(json!({"data": [{"id": 1}, {"id": true}]}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/data/1/id",
         "the key field `id` must be a string or a number, got boolean"),
        ("batch, not an array", BATCH, vec![], one(structured(json!({}))), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "",
         "a batch is a JSON array of CloudEvents, got object"),
        ("batch, empty", BATCH, vec![], b"[]".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "",
         "the array of events is empty"),
        ("batch, the second event bad", BATCH, vec![], one(json!([structured(json!({})), structured(json!({"id": "s-2", "source": null}))])), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1/source",
         "the required attribute `source` is missing"),
        ("batch, a member not an object", BATCH, vec![], one(json!([structured(json!({})), "x"])), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1",
         "a CloudEvent is a JSON object, got string"),
        ("oversized", CE, vec![], one(structured(json!({"data": {"id": 1, "pad": "x".repeat(5000)}}))), StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "",
         "the request body is larger than 4096 bytes"),
    ];
    let mut refused = 0;
    for (what, content_type, headers, body, status, code, pointer, message) in cases {
        let (got, answer) = server
            .post_raw("/v1/cloudevents", Some(content_type), body, &headers)
            .await;
        support::assert_error(what, (got, &answer), status, code, pointer, message);
        refused += 1;
    }
    // Nothing above was delivered, nor took an offset.
    ws.expect_silence(Duration::from_millis(200)).await;
    let (status, answer) = server
        .post_raw(
            "/v1/cloudevents",
            Some(CE),
            one(structured(json!({"id": "ok"}))),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["events"][0]["offset"], 1);
    ws.expect(r#"{"type":"subscription","event":"create","data":[{"id":1}],"uid":"o"}"#)
        .await;
    let mut total = 0.0;
    for status in ["400", "413", "415", "422"] {
        total += server
            .metric(&format!(
                "tidings_publish_requests_total{{format=\"cloudevents\",status=\"{status}\"}}"
            ))
            .await
            .unwrap_or_default();
    }
    assert_eq!(total, f64::from(refused));
}
