//! The HTTP publish API against a real broker: accepted shapes, offsets and epochs, and every
//! class of bad input with its status and JSON error — a rejected request publishes nothing.

mod support;

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{start, start_default};
use tidings::Config;

fn error_of(body: &Value) -> (&str, Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {body}"
    );
    (e["code"].as_str().unwrap_or_default(), e["where"].as_str())
}

#[tokio::test]
async fn accepted_events_get_per_collection_offsets_and_one_epoch() {
    let server = start_default().await;
    let answer = server
        .publish(json!([
            {"collection":"orders","event":"create","data":[{"id":1},{"id":2}]},
            {"collection":"orders","event":"delete","keys":[1]},
            {"collection":"users","event":"update","data":{"id":"u1"}}
        ]))
        .await;
    let events = answer["events"].as_array().unwrap();
    let summary: Vec<(String, String, u64, u64)> = events
        .iter()
        .map(|e| {
            (
                e["collection"].as_str().unwrap().to_string(),
                e["event"].as_str().unwrap().to_string(),
                e["items"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("orders".into(), "create".into(), 2, 1),
            ("orders".into(), "delete".into(), 1, 2),
            ("users".into(), "update".into(), 1, 1)
        ]
    );
    let epoch = events[0]["epoch"].as_str().unwrap();
    assert!(!epoch.is_empty());
    assert!(events.iter().all(|e| e["epoch"] == epoch));
    let (status, answer) = server
        .post("/v1/collections/orders/update", &json!({"id":1,"total":3}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["events"][0]["offset"], 3);
    assert_eq!(answer["events"][0]["epoch"], epoch);
    support::schema_check_http(&answer);

    // A restarted memory broker has a new epoch.
    let other = start_default().await;
    let answer = other
        .publish(json!({"collection":"orders","event":"create","data":{"id":1}}))
        .await;
    assert_ne!(answer["events"][0]["epoch"], epoch);
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_publish_nothing() {
    let config = Config {
        max_publish_bytes: 4096,
        ..Config::default()
    };
    let server = start(config).await;
    let mut sub = server.ws().await;
    sub.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"o"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"o"}"#,
    )
    .await;

    let json_ct = Some("application/json");
    // (content type, body, path, status, error code, error pointer)
    type Case<'a> = (
        Option<&'a str>,
        Vec<u8>,
        &'a str,
        StatusCode,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (json_ct, b"{\"collection\":".to_vec(), "/v1/publish", StatusCode::BAD_REQUEST, "INVALID_JSON", None),
        (json_ct, b"\xff\xfe".to_vec(), "/v1/publish", StatusCode::BAD_REQUEST, "INVALID_JSON", None),
        (None, br#"{"collection":"orders","event":"create","data":{"id":1}}"#.to_vec(), "/v1/publish", StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", Some("content-type")),
        (Some("text/plain"), br#"{"collection":"orders","event":"create","data":{"id":1}}"#.to_vec(), "/v1/publish", StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", Some("content-type")),
        (json_ct, vec![b' '; 5000], "/v1/publish", StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", None),
        (json_ct, br#"{"collection":"orders","event":"upsert","data":{"id":1}}"#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/event")),
        (json_ct, br#"{"collection":"orders","event":"create","data":{"name":"no key"}}"#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/data/id")),
        (json_ct, br#"{"collection":"orders","event":"create","data":[{"id":1},{"id":true}]}"#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/data/1/id")),
        (json_ct, br#"{"collection":7,"event":"create","data":{"id":1}}"#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/collection")),
        (json_ct, br#"[{"collection":"orders","event":"create","data":{"id":1}},{"collection":"orders","event":"delete"}]"#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/1/keys")),
        (json_ct, br#""just a string""#.to_vec(), "/v1/publish", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("")),
        (json_ct, br#"{"id":1}"#.to_vec(), "/v1/collections/orders/upsert", StatusCode::NOT_FOUND, "NOT_FOUND", None),
        (json_ct, br#"{"id":1}"#.to_vec(), "/v1/collections/bad%20name/create", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("")),
        (json_ct, br#"[1,{"x":1}]"#.to_vec(), "/v1/collections/orders/delete", StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", Some("/1")),
        (json_ct, br#"{}"#.to_vec(), "/v1/nope", StatusCode::NOT_FOUND, "NOT_FOUND", None),
    ];
    for (ct, body, path, status, code, pointer) in cases {
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(80)
            .collect::<String>();
        let (got, answer) = server.post_raw(path, ct, body, &[]).await;
        assert_eq!(got, status, "{path} {shown}: {answer}");
        assert_eq!(
            error_of(&answer),
            (code, pointer),
            "{path} {shown}: {answer}"
        );
        support::schema_check_http(&answer);
    }
    // Nothing above was published, and the broker still serves.
    sub.expect_silence(Duration::from_millis(200)).await;
    let answer = server
        .publish(json!({"collection":"orders","event":"create","data":{"id":9}}))
        .await;
    assert_eq!(
        answer["events"][0]["offset"], 1,
        "rejected requests consumed no offset"
    );
    sub.expect(r#"{"type":"subscription","event":"create","data":[{"id":9}],"uid":"o"}"#)
        .await;
    assert!(
        server
            .metric("tidings_publish_requests_total{format=\"json\",status=\"422\"}")
            .await
            .unwrap()
            >= 7.0
    );
    assert_eq!(
        server
            .metric("tidings_publish_requests_total{format=\"json\",status=\"413\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn publish_keys_are_required_when_configured() {
    let config = Config {
        publish_keys: {
            let mut keys = tidings::auth::PublishKeys::default();
            keys.add_flags(&["k1", "k2"]).expect("keys");
            keys
        },
        ..Config::default()
    };
    let server = start(config).await;
    let body = br#"{"collection":"orders","event":"create","data":{"id":1}}"#.to_vec();
    let json_ct = Some("application/json");
    for headers in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "k1")],
    ] {
        let (status, answer) = server
            .post_raw("/v1/publish", json_ct, body.clone(), &headers)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(error_of(&answer), ("UNAUTHORIZED", Some("authorization")));
    }
    let (status, _) = server
        .post_raw(
            "/v1/publish",
            json_ct,
            body.clone(),
            &[("authorization", "Bearer k2")],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn custom_key_field_per_collection() {
    let mut config = Config::default();
    config.key_fields.insert("orders".into(), "order_id".into());
    let server = start(config).await;
    let (status, answer) = server
        .post("/v1/collections/orders/create", &json!({"id":1}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_of(&answer), ("INVALID_PAYLOAD", Some("/order_id")));
    let mut sub = server.ws().await;
    sub.exchange(
        r#"{"type":"subscribe","collection":"orders","item":"A-7","uid":"one"}"#,
        r#"{"type":"subscription","event":"init","uid":"one"}"#,
    )
    .await;
    server
        .publish(
            json!({"collection":"orders","event":"update","data":{"order_id":"A-7","total":5}}),
        )
        .await;
    sub.expect(r#"{"type":"subscription","event":"update","data":{"order_id":"A-7","total":5},"uid":"one"}"#).await;
}
