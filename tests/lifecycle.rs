//! Connection lifecycle against a real broker: graceful shutdown, limits, slow consumers,
//! health, readiness and metrics.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use serde_json::json;
use support::{start, start_default, Received, WAIT};
use tidings::Config;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn shutdown_turns_readiness_off_and_closes_sessions_with_1001() {
    let mut server = start_default().await;
    let (status, body) = server.get("/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"status":"ready"}"#)
    );
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = server.ws().await;
        c.exchange(
            &format!(r#"{{"type":"subscribe","collection":"c","uid":"{i}"}}"#),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{i}"}}"#),
        )
        .await;
        clients.push(c);
    }
    let state = server.state.clone();
    let task = server.begin_shutdown();
    for c in &mut clients {
        assert_eq!(c.expect_close().await, Some(1001));
    }
    assert!(!state.ready.is_ready());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("serve returns after sessions closed")
        .expect("serve");
    assert_eq!(
        state
            .metrics
            .connections_closed
            .with_label_values(&["shutdown"])
            .get(),
        3
    );
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_deadline_even_with_a_stuck_client() {
    let config = Config {
        shutdown_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let mut server = start(config).await;
    // A client that stops reading while a large backlog is being written to it.
    let mut stuck = support::raw_ws_small_buffer(&server).await;
    stuck
        .send(Message::text(r#"{"type":"subscribe","collection":"big"}"#))
        .await
        .unwrap();
    let _init = tokio::time::timeout(WAIT, stuck.next()).await.unwrap();
    let item = json!({"id": 1, "blob": "x".repeat(60_000)});
    for _ in 0..200 {
        server
            .publish(json!({"collection":"big","event":"create","data":item}))
            .await;
    }
    let started = tokio::time::Instant::now();
    let task = server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("bounded shutdown")
        .expect("serve");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connection_limit_refuses_with_503() {
    let config = Config {
        max_connections: 2,
        ..Config::default()
    };
    let server = start(config).await;
    let a = server.ws().await;
    let _b = server.ws().await;
    assert_eq!(server.ws_status(&server.ws_url()).await, 503);
    assert_eq!(
        server
            .metric("tidings_connections_refused_total{reason=\"limit\"}")
            .await,
        Some(1.0)
    );
    a.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.ws_status(&server.ws_url()).await != 101 {
        assert!(tokio::time::Instant::now() < deadline, "slot not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn oversized_inbound_frame_closes_with_1009() {
    let config = Config {
        max_frame_bytes: 1024,
        ..Config::default()
    };
    let server = start(config).await;
    let mut c = server.ws().await;
    c.send(&format!(
        r#"{{"type":"ping","uid":"{}"}}"#,
        "x".repeat(2000)
    ))
    .await;
    assert_eq!(c.expect_close().await, Some(1009));
    server
        .wait_for_metric(
            "tidings_connections_closed_total{reason=\"frame_too_big\"}",
            1.0,
        )
        .await;
    // Others are not disturbed.
    let mut d = server.ws().await;
    d.exchange(r#"{"type":"ping"}"#, r#"{"type":"pong"}"#).await;
}

#[tokio::test]
async fn subscription_limit_per_connection() {
    let config = Config {
        max_subscriptions: 2,
        ..Config::default()
    };
    let server = start(config).await;
    let mut c = server.ws().await;
    for uid in ["a", "b"] {
        c.exchange(
            &format!(r#"{{"type":"subscribe","collection":"c","uid":"{uid}"}}"#),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#),
        )
        .await;
    }
    c.exchange(
        r#"{"type":"subscribe","collection":"c","uid":"c"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"LIMIT_EXCEEDED","message":"Too many subscriptions on this connection (the limit is 2)."},"uid":"c"}"#,
    )
    .await;
    // Replacing an existing uid is not a new subscription.
    c.exchange(
        r#"{"type":"subscribe","collection":"d","uid":"a"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"a"}"#,
    )
    .await;
}

/// One subscriber of 100 never reads. The other 99 receive every event, in order; the stalled one is
/// closed as a slow consumer and counted; the hub is never held up by it.
#[tokio::test]
async fn stalled_subscriber_is_closed_and_others_receive_everything() {
    let config = Config {
        outbox_bytes: 256 * 1024,
        write_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let server = start(config).await;
    let mut stalled = support::raw_ws_small_buffer(&server).await;
    stalled
        .send(Message::text(r#"{"type":"subscribe","collection":"feed"}"#))
        .await
        .unwrap();
    let _init = tokio::time::timeout(WAIT, stalled.next()).await.unwrap();

    let readers = 99;
    let mut handles = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(readers);
    let (stop_tx, _) = tokio::sync::broadcast::channel::<u64>(1);
    for _ in 0..readers {
        let mut c = server.ws().await;
        let ready = ready_tx.clone();
        let mut stop = stop_tx.subscribe();
        handles.push(tokio::spawn(async move {
            c.exchange(
                r#"{"type":"subscribe","collection":"feed","query":{"fields":["id"]}}"#,
                r#"{"type":"subscription","event":"init","data":[]}"#,
            )
            .await;
            ready.send(()).await.unwrap();
            let mut ids = Vec::new();
            let mut last_expected = None;
            loop {
                if let Some(last) = last_expected {
                    if ids.last() == Some(&last) {
                        return ids;
                    }
                }
                tokio::select! {
                    m = c.next() => match m {
                        Received::Text(t) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                            ids.push(v["data"][0]["id"].as_u64().unwrap());
                        }
                        other => panic!("reader got {other:?}"),
                    },
                    last = stop.recv() => last_expected = Some(last.unwrap()),
                }
            }
        }));
    }
    for _ in 0..readers {
        ready_rx.recv().await.unwrap();
    }
    let blob = "y".repeat(4000);
    let mut next_id = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.metric("tidings_slow_consumer_closes_total").await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled subscriber never closed"
        );
        let batch: Vec<_> = (0..10)
            .map(|_| {
                next_id += 1;
                json!({"collection":"feed","event":"create","data":{"id":next_id,"blob":blob}})
            })
            .collect();
        server.publish(json!(batch)).await;
    }
    stop_tx.send(next_id).unwrap();
    for h in handles {
        let ids = tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("reader finished")
            .unwrap();
        assert_eq!(
            ids,
            (1..=next_id).collect::<Vec<_>>(),
            "a reader lost or reordered events"
        );
    }
    assert_eq!(
        server
            .metric("tidings_connections_closed_total{reason=\"slow_consumer\"}")
            .await,
        Some(1.0)
    );
    drop(stalled);
}

#[tokio::test]
async fn health_readiness_and_metrics_reflect_traffic() {
    let server = start_default().await;
    let (status, body) = server.get("/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
    let mut a = server.ws().await;
    let mut b = server.ws().await;
    a.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"1"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"1"}"#,
    )
    .await;
    b.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"1"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"1"}"#,
    )
    .await;
    b.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"2","query":{"filter":{"x":1}}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"2"}"#,
    )
    .await;
    server
        .publish(json!({"collection":"orders","event":"create","data":[{"id":1,"x":1},{"id":2}]}))
        .await;
    for _ in 0..2 {
        a.recv().await;
    }
    for _ in 0..3 {
        b.recv().await;
    }
    b.send("nope").await;
    b.recv().await;
    // Identical subscriptions share one group.
    assert_eq!(server.state.registry.counts("orders"), (2, 3));
    let checks = [
        ("tidings_connections", 2.0),
        ("tidings_connections_opened_total", 2.0),
        ("tidings_subscriptions{collection=\"orders\"}", 3.0),
        (
            "tidings_published_events_total{collection=\"orders\",event=\"create\"}",
            1.0,
        ),
        (
            "tidings_published_items_total{collection=\"orders\",event=\"create\"}",
            2.0,
        ),
        (
            "tidings_publish_requests_total{format=\"json\",status=\"202\"}",
            1.0,
        ),
        ("tidings_deliveries_total", 5.0),
        ("tidings_fanout_frames_count", 1.0),
        ("tidings_fanout_frames_sum", 5.0),
        ("tidings_delivery_latency_seconds_count", 5.0),
        (
            "tidings_protocol_errors_total{code=\"INVALID_PAYLOAD\"}",
            1.0,
        ),
        ("tidings_outbox_dropped_total", 0.0),
    ];
    for (series, want) in checks {
        assert_eq!(server.metric(series).await, Some(want), "{series}");
    }
    assert!(
        server
            .metric("tidings_delivered_bytes_total")
            .await
            .unwrap()
            > 100.0
    );
    assert!(
        server
            .metric("process_resident_memory_bytes")
            .await
            .unwrap()
            > 0.0
    );
    a.close().await;
    server
        .wait_for_metric("tidings_connections_closed_total{reason=\"client\"}", 1.0)
        .await;
    assert_eq!(
        server
            .metric("tidings_subscriptions{collection=\"orders\"}")
            .await,
        Some(2.0)
    );
}

/// Under load (50 subscribers in 5 filtered groups, 1,000 events in 20 batched requests),
/// every fan-out series on `/metrics` matches what the clients actually received.
#[tokio::test]
async fn metrics_match_the_traffic_under_load() {
    const SUBS: usize = 50;
    const GROUPS: u64 = 5;
    const EVENTS: u64 = 1000;
    const BATCH: u64 = 50;
    let server = start_default().await;
    let mut readers = Vec::new();
    for i in 0..SUBS {
        let mut c = server.ws().await;
        let tenant = i as u64 % GROUPS;
        c.send(&format!(
            r#"{{"type":"subscribe","collection":"load","query":{{"filter":{{"tenant":{{"_eq":{tenant}}}}},"fields":["id","tenant"]}}}}"#
        ))
        .await;
        c.recv().await;
        readers.push(c);
    }
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let (mut frames, mut bytes) = (0u64, 0u64);
                while frames < EVENTS / GROUPS {
                    match c.next().await {
                        Received::Text(t) => {
                            frames += 1;
                            bytes += t.len() as u64;
                        }
                        other => panic!("reader got {other:?}"),
                    }
                }
                c.expect_silence(Duration::from_millis(100)).await;
                (c, frames, bytes)
            })
        })
        .collect();
    for b in 0..EVENTS / BATCH {
        let batch: Vec<_> = (b * BATCH..(b + 1) * BATCH)
            .map(|id| json!({"collection":"load","event":"create","data":{"id":id,"tenant":id % GROUPS,"pad":"x".repeat(100)}}))
            .collect();
        server.publish(json!(batch)).await;
    }
    let (mut frames, mut bytes, mut clients) = (0u64, 0u64, Vec::new());
    for t in tasks {
        let (c, f, b) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("reader finished")
            .expect("reader");
        frames += f;
        bytes += b;
        clients.push(c);
    }
    assert_eq!(frames, SUBS as u64 * EVENTS / GROUPS);
    let events = EVENTS as f64;
    let frames = frames as f64;
    let checks = [
        ("tidings_connections", SUBS as f64),
        ("tidings_subscriptions{collection=\"load\"}", SUBS as f64),
        (
            "tidings_published_events_total{collection=\"load\",event=\"create\"}",
            events,
        ),
        (
            "tidings_published_items_total{collection=\"load\",event=\"create\"}",
            events,
        ),
        (
            "tidings_publish_requests_total{format=\"json\",status=\"202\"}",
            (EVENTS / BATCH) as f64,
        ),
        ("tidings_deliveries_total", frames),
        ("tidings_delivered_bytes_total", bytes as f64),
        ("tidings_fanout_frames_count", events),
        ("tidings_fanout_frames_sum", frames),
        ("tidings_match_duration_seconds_count", events),
        ("tidings_ingest_to_outbox_seconds_count", events),
        ("tidings_outbox_to_socket_seconds_count", frames),
        ("tidings_delivery_latency_seconds_count", frames),
        ("tidings_outbox_dropped_total", 0.0),
        ("tidings_slow_consumer_closes_total", 0.0),
        ("tidings_replayed_frames_total", 0.0),
    ];
    for (series, want) in checks {
        assert_eq!(server.metric(series).await, Some(want), "{series}");
    }
    // Every delivery fits the largest latency bucket (2.5 s): the +Inf count equals it.
    assert_eq!(
        server
            .metric("tidings_delivery_latency_seconds_bucket{le=\"2.5\"}")
            .await,
        Some(frames)
    );
    for c in clients {
        c.close().await;
    }
    server
        .wait_for_metric(
            "tidings_connections_closed_total{reason=\"client\"}",
            SUBS as f64,
        )
        .await;
    assert_eq!(server.metric("tidings_connections").await, Some(0.0));
    assert_eq!(
        server
            .metric("tidings_subscriptions{collection=\"load\"}")
            .await,
        Some(0.0)
    );
}
