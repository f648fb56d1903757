//! Positions, resume with `since`, and idempotent publish, on the memory engine, over real
//! sockets.

mod support;

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{start, start_default, WsClient};
use tidings::history::HistoryLimits;
use tidings::Config;

/// Publishes `n` creates to `orders` with ids `from..from+n`, tenant `id % 3`, one request.
async fn publish_orders(server: &support::TestServer, from: u64, n: u64) -> Value {
    let events: Vec<Value> = (from..from + n)
        .map(|id| json!({"collection":"orders","event":"create","data":{"id":id,"tenant":id % 3,"total":id * 10}}))
        .collect();
    server.publish(Value::Array(events)).await
}

/// Receives `n` event frames and returns (id of the single item, offset) of each.
async fn ids_and_offsets(client: &mut WsClient, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let frame = client.recv_raw().await;
        assert_eq!(frame["event"], "create", "{frame}");
        out.push((
            frame["data"][0]["id"].as_u64().expect("id"),
            frame["position"]["offset"].as_u64().expect("offset"),
        ));
    }
    out
}

#[tokio::test]
async fn every_event_and_init_carries_its_position() {
    let server = start_default().await;
    let mut c = server.ws().await;
    c.send(r#"{"type":"subscribe","collection":"orders","uid":"o"}"#)
        .await;
    let init = c.recv_raw().await;
    let epoch = init["position"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    assert_eq!(init["position"]["offset"], 0);
    assert!(init.get("recovered").is_none(), "no since, no recovered");
    let answer = publish_orders(&server, 1, 3).await;
    for (i, ev) in answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .enumerate()
    {
        assert_eq!(ev["epoch"], epoch.as_str());
        assert_eq!(ev["offset"], i as u64 + 1);
    }
    assert_eq!(ids_and_offsets(&mut c, 3).await, [(1, 1), (2, 2), (3, 3)]);
    // A later subscriber starts after the last offset.
    let mut late = server.ws().await;
    late.send(r#"{"type":"subscribe","collection":"orders"}"#)
        .await;
    let init = late.recv_raw().await;
    assert_eq!(init["position"], json!({"epoch": epoch, "offset": 3}));
}

#[tokio::test]
async fn a_subscriber_that_missed_1000_events_gets_exactly_its_matching_ones_in_order() {
    let server = start_default().await;
    let subscribe = |since: Option<&Value>| {
        let mut msg = json!({"type":"subscribe","collection":"orders","uid":"t1",
            "query":{"filter":{"tenant":{"_eq":1}},"fields":["id"]}});
        if let Some(since) = since {
            msg["since"] = since.clone();
        }
        msg.to_string()
    };
    let mut c = server.ws().await;
    c.send(&subscribe(None)).await;
    c.recv_raw().await;
    publish_orders(&server, 1, 10).await;
    // Tenant 1 among ids 1..=10: 1, 4, 7, 10.
    let seen = ids_and_offsets(&mut c, 4).await;
    assert_eq!(seen.last(), Some(&(10, 10)));
    let last: Value = json!({"epoch": c_epoch(&server).await, "offset": 10});
    c.close().await;

    // 1,000 events while away, published in batches.
    for batch in 0..10 {
        publish_orders(&server, 11 + batch * 100, 100).await;
    }
    let mut back = server.ws().await;
    back.send(&subscribe(Some(&last))).await;
    let init = back.recv_raw().await;
    assert_eq!(init["recovered"], true, "{init}");
    assert_eq!(init["position"]["offset"], 1010);
    let expected: Vec<(u64, u64)> = (11..=1010)
        .filter(|id| id % 3 == 1)
        .map(|id| (id, id))
        .collect();
    let got = ids_and_offsets(&mut back, expected.len()).await;
    assert_eq!(got, expected);
    // Then live, with no gap and no duplicate.
    publish_orders(&server, 1011, 3).await;
    assert_eq!(ids_and_offsets(&mut back, 1).await, [(1012, 1012)]);
    back.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        server
            .metric("tidings_resumes_total{outcome=\"recovered\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        server.metric("tidings_replayed_frames_total").await,
        Some(expected.len() as f64)
    );
}

async fn c_epoch(server: &support::TestServer) -> String {
    server.state.hub.history().epoch().to_string()
}

#[tokio::test]
async fn resume_while_events_keep_coming_has_no_gap_and_no_duplicate() {
    let server = start_default().await;
    let publisher = {
        let addr = server.addr;
        tokio::spawn(async move {
            let client = support::http_client();
            for id in 1..=400u64 {
                let body = json!({"collection":"orders","event":"create","data":{"id":id}});
                support::post_with(&client, addr, "/v1/publish", &body).await;
            }
        })
    };
    let epoch = c_epoch(&server).await;
    let mut next = 1u64;
    // Drop and resume several times while the publisher runs.
    let mut since = json!({"epoch": epoch, "offset": 0});
    while next <= 400 {
        let mut c = server.ws().await;
        c.send(&json!({"type":"subscribe","collection":"orders","since":since}).to_string())
            .await;
        let init = c.recv_raw().await;
        assert_eq!(init["recovered"], true, "{init}");
        let take = 37.min(401 - next) as usize;
        for (id, offset) in ids_and_offsets(&mut c, take).await {
            assert_eq!((id, offset), (next, next), "gap or duplicate");
            next += 1;
        }
        since = json!({"epoch": epoch, "offset": next - 1});
    }
    publisher.await.expect("publisher");
}

#[tokio::test]
async fn positions_outside_the_history_or_from_another_epoch_are_lost() {
    let server = start(Config {
        history: HistoryLimits {
            max_events: 5,
            max_age: Duration::from_secs(60),
            max_bytes: 64 * 1024 * 1024,
        },
        ..Config::default()
    })
    .await;
    let epoch = c_epoch(&server).await;
    publish_orders(&server, 1, 20).await;
    let cases = [
        (json!({"epoch": epoch, "offset": 14}), false, 0),
        (json!({"epoch": epoch, "offset": 15}), true, 5),
        (json!({"epoch": "otherepoch", "offset": 18}), false, 0),
    ];
    for (since, recovered, replayed) in cases {
        let mut c = server.ws().await;
        c.send(
            &json!({"type":"subscribe","collection":"orders","uid":"x","since":since}).to_string(),
        )
        .await;
        let init = c.recv_raw().await;
        assert_eq!(init["recovered"], recovered, "since {since}: {init}");
        assert_eq!(init["position"]["offset"], 20);
        assert_eq!(init["data"], json!([]));
        let got = ids_and_offsets(&mut c, replayed).await;
        assert_eq!(got.len(), replayed);
        c.expect_silence(Duration::from_millis(100)).await;
    }
    assert_eq!(
        server
            .metric("tidings_resumes_total{outcome=\"lost\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_position_this_node_never_reached_is_lost_after_a_bounded_wait() {
    let server = start_default().await;
    let epoch = c_epoch(&server).await;
    let mut c = server.ws().await;
    c.send(
        &json!({"type":"subscribe","collection":"orders","since":{"epoch":epoch,"offset":99}})
            .to_string(),
    )
    .await;
    let init = c.recv_raw().await;
    assert_eq!(init["recovered"], false);
    assert_eq!(init["position"]["offset"], 0);
}

#[tokio::test]
async fn malformed_since_is_an_invalid_payload() {
    // As for every validation error, Directus style: no uid in the reply.
    let server = start_default().await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"s","since":{"epoch":"e","offset":-1}}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected non-negative integer, received number at \"since.offset\""}}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"s","since":"e:5"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected object, received string at \"since\""}}"#,
    )
    .await;
    // The connection still works.
    c.exchange(r#"{"type":"ping","uid":1}"#, r#"{"type":"pong","uid":1}"#)
        .await;
}

#[tokio::test]
async fn replay_applies_the_subscribers_permissions() {
    let server = start(Config {
        tokens: tidings::auth::TokenStore::from_json(
            r#"{"t1":{"sub":"u1","collections":{"orders":{"filter":{"tenant":{"_eq":2}},"fields":["id"]}}}}"#,
        )
        .expect("tokens"),
        ..Config::default()
    })
    .await;
    let epoch = c_epoch(&server).await;
    publish_orders(&server, 1, 9).await;
    let mut c = server.ws_token("t1").await;
    c.send(
        &json!({"type":"subscribe","collection":"orders","since":{"epoch":epoch,"offset":0}})
            .to_string(),
    )
    .await;
    assert_eq!(c.recv_raw().await["recovered"], true);
    for id in [2u64, 5, 8] {
        let frame = c.recv_raw().await;
        assert_eq!(frame["data"], json!([{"id": id}]), "only tenant 2, only id");
    }
    c.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn idempotency_keys_deduplicate_within_the_window() {
    let server = start_default().await;
    let mut c = server.ws().await;
    c.send(r#"{"type":"subscribe","collection":"orders"}"#)
        .await;
    c.recv_raw().await;
    let event = json!({"collection":"orders","event":"create","data":{"id":1},"idempotency_key":"order-1-created"});
    let first = server.publish(event.clone()).await;
    let again = server.publish(event).await;
    assert_eq!(first["events"][0]["offset"], 1);
    assert!(first["events"][0].get("duplicate").is_none());
    assert_eq!(again["events"][0]["offset"], 1);
    assert_eq!(again["events"][0]["duplicate"], true);
    support::schema_check_http(&again);

    // The header names a batch's events KEY#0, KEY#1.
    let batch = json!([
        {"collection":"orders","event":"create","data":{"id":2}},
        {"collection":"orders","event":"create","data":{"id":3}}
    ]);
    let body = batch.to_string().into_bytes();
    let headers = [("idempotency-key", "req-7")];
    let (status, a) = server
        .post_raw(
            "/v1/publish",
            Some("application/json"),
            body.clone(),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, b) = server
        .post_raw("/v1/publish", Some("application/json"), body, &headers)
        .await;
    assert_eq!(a["events"][1]["offset"], 3);
    assert_eq!(
        b["events"][1],
        json!({"collection":"orders","event":"create","items":1,"offset":3,"epoch":a["events"][1]["epoch"],"duplicate":true})
    );
    let key_one =
        json!({"collection":"orders","event":"create","data":{"id":3},"idempotency_key":"req-7#1"});
    assert_eq!(
        server.publish(key_one).await["events"][0]["duplicate"],
        true
    );

    let got = ids_and_offsets(&mut c, 3).await;
    assert_eq!(got, [(1, 1), (2, 2), (3, 3)]);
    c.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        server.metric("tidings_publish_duplicates_total").await,
        Some(4.0)
    );

    let (status, err) = server
        .post_raw(
            "/v1/publish",
            Some("application/json"),
            br#"{"collection":"orders","event":"create","data":{"id":9}}"#.to_vec(),
            &[("idempotency-key", "has space")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["code"], "INVALID_HEADER");
    assert_eq!(err["error"]["where"], "idempotency-key");
    let (status, err) = server
        .post(
            "/v1/publish",
            &json!({"collection":"orders","event":"create","data":{"id":9},"idempotency_key":""}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["where"], "/idempotency_key");
}
