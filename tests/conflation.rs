//! Conflation (`--slow-consumer-policy conflate`, issue 16) over real sockets: a subscriber
//! of a retained collection that stops reading while 100,000 updates hit 1,000 keys gets,
//! when it reads again, exactly one frame per changed key with its latest value and every
//! delete, then a checkpoint, and its list equals the state; subscribers that keep up get
//! every frame in order. Past `--conflation-max-keys` the subscriber gets a fresh `init`
//! (`recovered: false`), and the third reset within a minute closes it with 4008. A
//! `max_rate` subscription gets a hot key at most N times a second, the latest value last.
//! Past the cap of remembered cooldowns a rated key is not held back, and that is counted.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{raw_ws_small_buffer, start, TestServer};
use tidings::config::SlowConsumerPolicy;
use tidings::state::StateSettings;
use tidings::Config;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const COLLECTION: &str = "prices";

/// Bound on one frame arriving while a loaded machine works through 100,000 events.
const FRAME_WAIT: Duration = Duration::from_secs(60);

fn config(outbox_messages: usize, max_keys: usize) -> Config {
    let defaults = Config::default();
    Config {
        state: StateSettings {
            collections: vec![COLLECTION.to_string()],
            ..defaults.state.clone()
        },
        slow_consumer_policy: SlowConsumerPolicy::Conflate,
        conflation_max_keys: max_keys,
        outbox_messages,
        outbox_bytes: 512 * 1024 * 1024,
        // The stalled reader blocks its session's write for the whole test: the write
        // timeout would close it (conflation spares the outbox, not a write that hangs).
        write_timeout: Duration::from_secs(600),
        heartbeat_period: None,
        ..defaults
    }
}

type Raw = WebSocketStream<TcpStream>;

async fn next_json(ws: &mut Raw) -> Value {
    loop {
        let m = tokio::time::timeout(FRAME_WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                support::schema::assert_server_message(&v);
                return v;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A subscriber over a socket with a tiny receive buffer, subscribed with checkpoints; its
/// `init` list.
async fn stalling_subscriber(server: &TestServer, uid: &str) -> (Raw, Value) {
    let mut ws = raw_ws_small_buffer(server).await;
    let subscribe = json!({"type":"subscribe","collection":COLLECTION,"uid":uid,
        "query":{"limit":-1},"checkpoints":true});
    ws.send(Message::text(subscribe.to_string()))
        .await
        .expect("send");
    let init = next_json(&mut ws).await;
    assert_eq!(init["event"], "init", "{init}");
    (ws, init["data"].clone())
}

/// The retained state as a fresh subscriber's `init` lists it, by key.
async fn state(server: &TestServer) -> BTreeMap<String, Value> {
    let mut ws = server.ws().await;
    ws.send(
        &json!({"type":"subscribe","collection":COLLECTION,"uid":"check","query":{"limit":-1}})
            .to_string(),
    )
    .await;
    let init = ws.recv_raw().await;
    ws.close().await;
    by_key(&init["data"])
}

fn key_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn by_key(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|item| (key_of(&item["id"]), item.clone()))
        .collect()
}

/// Applies one subscription frame to a client's list, as a live view does.
fn apply(list: &mut BTreeMap<String, Value>, frame: &Value) {
    match frame["event"].as_str() {
        Some("init") => *list = by_key(&frame["data"]),
        Some("create") | Some("update") => {
            for item in frame["data"].as_array().expect("items") {
                list.insert(key_of(&item["id"]), item.clone());
            }
        }
        Some("delete") => {
            for key in frame["data"].as_array().expect("keys") {
                list.remove(&key_of(key));
            }
        }
        _ => {}
    }
}

/// Publishes `events` in requests of at most 1,000.
async fn publish_all(server: &TestServer, events: &[Value]) {
    for batch in events.chunks(1000) {
        server.publish(Value::Array(batch.to_vec())).await;
    }
}

fn update(key: &str, v: Value) -> Value {
    json!({"collection":COLLECTION,"event":"update","data":{"id":key,"v":v}})
}

async fn conflated(server: &TestServer) -> f64 {
    server
        .metric(&format!(
            "tidings_conflated_total{{collection=\"{COLLECTION}\"}}"
        ))
        .await
        .unwrap_or(0.0)
}

/// Frames each published event brings a subscriber of the whole collection, in order:
/// (event, data).
fn expected_frames(events: &[Value]) -> Vec<(String, Value)> {
    events
        .iter()
        .map(|e| {
            let event = e["event"].as_str().expect("event").to_string();
            let data = match event.as_str() {
                "delete" => e["keys"].clone(),
                _ => json!([e["data"]]),
            };
            (event, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_gets_one_frame_per_changed_key() {
    // Soft bound 5,000 frames: subscribers that keep up stay far below it (the publisher
    // waits for them), the stalled one passes it.
    let server = start(config(5000, 10_000)).await;
    let blob = "b".repeat(2000);
    let filler_keys = 20;
    let mut setup: Vec<Value> = (0..filler_keys)
        .map(|j| json!({"collection":COLLECTION,"event":"create","data":{"id":format!("f{j}"),"v":-1,"blob":blob}}))
        .collect();
    setup.extend((0..1000).map(
        |j| json!({"collection":COLLECTION,"event":"create","data":{"id":format!("k{j}"),"v":-1}}),
    ));
    publish_all(&server, &setup).await;

    let (mut slow, slow_init) = stalling_subscriber(&server, "slow").await;
    let mut slow_list = by_key(&slow_init);
    assert_eq!(slow_list.len(), 1000 + filler_keys);

    // What the run publishes: filler updates until the stalled subscriber folds (its kernel
    // buffers and outbox full), then the 100,000 updates and the deletes and creates.
    let mut fillers: Vec<Value> = Vec::new();
    let mut phase: Vec<Value> = (0..100_000)
        .map(|i| update(&format!("k{}", i % 1000), json!(i)))
        .collect();
    // update + delete → delete
    phase.push(json!({"collection":COLLECTION,"event":"delete",
        "keys":(0..100).map(|j| format!("k{j}")).collect::<Vec<_>>()}));
    // delete + create → update (latest)
    phase.push(json!({"collection":COLLECTION,"event":"delete",
        "keys":(100..150).map(|j| format!("k{j}")).collect::<Vec<_>>()}));
    phase.extend((100..150).map(|j| {
        json!({"collection":COLLECTION,"event":"create","data":{"id":format!("k{j}"),"v":"again"}})
    }));
    // create + delete → nothing
    phase.extend((0..50).map(
        |j| json!({"collection":COLLECTION,"event":"create","data":{"id":format!("n{j}"),"v":0}}),
    ));
    phase.push(json!({"collection":COLLECTION,"event":"delete",
        "keys":(0..50).map(|j| format!("n{j}")).collect::<Vec<_>>()}));

    // Two subscribers that keep up, reading while the run publishes (the publisher stays
    // within 2,000 frames of them); told how many frames to expect once it is known.
    let (tx_count, rx_count) = tokio::sync::watch::channel(usize::MAX);
    let mut seen = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let mut ws = server.ws().await;
        ws.send(
            &json!({"type":"subscribe","collection":COLLECTION,"uid":"fast","query":{"limit":-1}})
                .to_string(),
        )
        .await;
        let init = ws.recv_raw().await;
        assert_eq!(init["event"], "init");
        let count = Arc::new(AtomicUsize::new(0));
        seen.push(count.clone());
        let mut rx = rx_count.clone();
        handles.push(tokio::spawn(async move {
            let mut frames: Vec<Value> = Vec::new();
            loop {
                let want = *rx.borrow_and_update();
                if frames.len() >= want {
                    return frames;
                }
                let m = tokio::select! {
                    m = tokio::time::timeout(FRAME_WAIT, ws.ws.next()) => m,
                    _ = rx.changed() => continue,
                };
                match m.expect("a subscriber that keeps up waited too long") {
                    Some(Ok(Message::Text(t))) => {
                        frames.push(serde_json::from_str::<Value>(&t).expect("json"));
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    other => panic!("a subscriber that keeps up lost its socket: {other:?}"),
                }
            }
        }));
    }
    let wait_for_fast = |published: usize| {
        let seen = seen.clone();
        async move {
            for s in &seen {
                let started = tokio::time::Instant::now();
                while s.load(Ordering::Relaxed) + 2000 < published {
                    assert!(started.elapsed() < FRAME_WAIT, "a fast subscriber stalled");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    };
    let mut published = 0usize;
    let mut round = 0;
    while conflated(&server).await == 0.0 {
        round += 1;
        assert!(round < 100, "the stalled subscriber never folded");
        let batch: Vec<Value> = (0..500)
            .map(|i| {
                let n = fillers.len() + i;
                json!({"collection":COLLECTION,"event":"update",
                    "data":{"id":format!("f{}", n % filler_keys),"v":n,"blob":blob}})
            })
            .collect();
        server.publish(Value::Array(batch.clone())).await;
        fillers.extend(batch);
        published += 500;
        wait_for_fast(published).await;
    }
    let folded_before = conflated(&server).await;
    for batch in phase.chunks(1000) {
        server.publish(Value::Array(batch.to_vec())).await;
        published += batch.len();
        wait_for_fast(published).await;
    }
    tx_count.send(published).expect("readers alive");

    // The subscribers that kept up got every frame, in order.
    let mut all_events = fillers.clone();
    all_events.extend(phase.iter().cloned());
    let expected = expected_frames(&all_events);
    let mut last_position = None;
    for handle in handles {
        let frames = handle.await.expect("reader");
        assert_eq!(frames.len(), expected.len());
        let mut offset = 0;
        for (i, (frame, (event, data))) in frames.iter().zip(&expected).enumerate() {
            assert_eq!(
                (&frame["event"], &frame["data"]),
                (&json!(event), data),
                "frame {i} of a subscriber that kept up"
            );
            let at = frame["position"]["offset"].as_u64().expect("position");
            assert!(at > offset, "frame {i}: positions increase");
            offset = at;
        }
        last_position = Some(frames.last().expect("frames")["position"].clone());
    }
    let last_position = last_position.expect("a position");
    assert!(
        conflated(&server).await - folded_before >= 99_000.0,
        "tidings_conflated_total counts the folds"
    );

    // The stalled subscriber reads again: whatever its kernel buffers and unkeyed queue
    // held (filler), then one frame per changed key, then a checkpoint at the end.
    let mut per_key: HashMap<String, Vec<Value>> = HashMap::new();
    let checkpoint = loop {
        let frame = next_json(&mut slow).await;
        assert_eq!(frame["uid"], "slow");
        if frame["event"] == "checkpoint" {
            break frame;
        }
        apply(&mut slow_list, &frame);
        let keys: Vec<String> = match frame["event"].as_str() {
            Some("delete") => frame["data"]
                .as_array()
                .expect("keys")
                .iter()
                .map(key_of)
                .collect(),
            _ => frame["data"]
                .as_array()
                .expect("items")
                .iter()
                .map(|i| key_of(&i["id"]))
                .collect(),
        };
        for key in keys.into_iter().filter(|k| !k.starts_with('f')) {
            assert!(
                frame.get("position").is_none(),
                "a folded frame carries no position: {frame}"
            );
            per_key.entry(key).or_default().push(frame.clone());
        }
    };
    assert_eq!(
        checkpoint["position"], last_position,
        "the checkpoint is at the end"
    );
    assert!(
        per_key.keys().all(|k| !k.starts_with('n')),
        "create + delete → nothing"
    );
    for j in 0..1000 {
        let key = format!("k{j}");
        let frames = per_key.get(&key).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(frames.len(), 1, "{key}: exactly one frame, got {frames:?}");
        let frame = &frames[0];
        let (event, data) = match j {
            0..100 => ("delete", json!([key])),
            100..150 => ("update", json!([{"id":key,"v":"again"}])),
            _ => ("update", json!([{"id":key,"v":99_000 + j}])),
        };
        assert_eq!(
            (&frame["event"], &frame["data"]),
            (&json!(event), &data),
            "{key}"
        );
        assert!(frame.get("cause").is_none(), "{frame}");
    }
    assert_eq!(per_key.len(), 1000);
    assert_eq!(
        slow_list,
        state(&server).await,
        "the client's list is the state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_hard_bound_a_fresh_init_then_a_close() {
    let server = start(config(50, 300)).await;
    let blob = "b".repeat(2000);
    let setup: Vec<Value> = (0..1000)
        .map(|j| json!({"collection":COLLECTION,"event":"create","data":{"id":format!("r{j}"),"v":-1}}))
        .collect();
    publish_all(&server, &setup).await;
    let (mut slow, init) = stalling_subscriber(&server, "slow").await;
    let mut list = by_key(&init);

    // Stall: blobs on ten keys until it folds.
    let mut n = 0;
    while conflated(&server).await == 0.0 {
        assert!(n < 100_000, "never folded");
        let batch: Vec<Value> = (0..200)
            .map(|i| update(&format!("r{}", i % 10), json!({"n": n + i, "blob": blob})))
            .collect();
        n += 200;
        server.publish(Value::Array(batch)).await;
    }
    // 390 more keys: past 300 slots, a reset.
    let wide: Vec<Value> = (10..400)
        .map(|j| update(&format!("r{j}"), json!("wide")))
        .collect();
    publish_all(&server, &wide).await;
    assert_eq!(
        server.metric("tidings_conflation_resets_total").await,
        Some(1.0)
    );
    // After the reset, changes fold again behind the fresh init.
    let after: Vec<Value> = (0..5)
        .map(|j| update(&format!("r{j}"), json!("after")))
        .collect();
    publish_all(&server, &after).await;

    let mut fresh = 0;
    let mut after_init = Vec::new();
    loop {
        let frame = next_json(&mut slow).await;
        // Read until the five updates after the reset are in: the session may write what
        // follows the reset in more than one batch, with or without a checkpoint.

        let done = |frames: &[Value]| {
            (0..5).all(|j| {
                let latest = json!([{"id":format!("r{j}"),"v":"after"}]);
                frames.iter().any(|f| f["data"] == latest)
            })
        };
        if frame["event"] == "checkpoint" {
            continue;
        }
        if frame["event"] == "init" {
            assert_eq!(frame["recovered"], false, "{frame}");
            fresh += 1;
            after_init.clear();
        } else if fresh > 0 && frame["event"] != "checkpoint" {
            after_init.push(frame.clone());
        }
        apply(&mut list, &frame);
        if fresh > 0 && done(&after_init) {
            break;
        }
    }
    assert_eq!(fresh, 1, "one fresh init");
    // The rest of the wide publish (after the event that passed the bound) and the five
    // updates fold behind the init: one frame per key.
    let mut keys: Vec<String> = after_init
        .iter()
        .map(|f| key_of(&f["data"][0]["id"]))
        .collect();
    let changed = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), changed, "one frame per key after the reset");
    assert_eq!(list, state(&server).await, "the client's list is the state");
    drop(slow);

    // A second stalled subscriber is reset twice, and the third reset within the window
    // closes it with 4008.
    let (mut slow, _) = stalling_subscriber(&server, "slow2").await;
    let base = server
        .metric("tidings_conflation_resets_total")
        .await
        .unwrap_or(0.0);
    let wave = |tag: usize| -> Vec<Value> {
        (400..800)
            .map(|j| update(&format!("r{j}"), json!({"wave": tag, "blob": blob})))
            .collect()
    };
    let mut tag = 0;
    while server.metric("tidings_conflation_resets_total").await < Some(base + 2.0) {
        tag += 1;
        assert!(tag < 200, "never reset twice");
        publish_all(&server, &wave(tag)).await;
    }
    publish_all(&server, &wave(tag + 1)).await;
    assert_eq!(
        server.metric("tidings_conflation_resets_total").await,
        Some(base + 2.0),
        "the third is a close, not a reset"
    );
    let close = loop {
        let m = tokio::time::timeout(FRAME_WAIT, slow.next())
            .await
            .expect("timed out waiting for the close");
        match m {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 4008);
    assert_eq!(close.reason.as_str(), "slow consumer: conflation resets");
}

/// A server whose policy is `close` (so only `max_rate` folds), remembering at most
/// `max_keys` keys per connection, with `keys` created (`v` -1).
async fn rated_server(max_keys: usize, keys: &[&str]) -> TestServer {
    let server = start(Config {
        slow_consumer_policy: SlowConsumerPolicy::Close,
        ..config(5000, max_keys)
    })
    .await;
    let setup: Vec<Value> = keys
        .iter()
        .map(|k| json!({"collection":COLLECTION,"event":"create","data":{"id":k,"v":-1}}))
        .collect();
    publish_all(&server, &setup).await;
    server
}

/// A subscriber (uid `rated`) of every item at `max_rate`, asking for `checkpoints`, and its
/// init.
async fn subscribe_rated(
    server: &TestServer,
    max_rate: f64,
    checkpoints: bool,
) -> (support::WsClient, Value) {
    let mut rated = server.ws().await;
    rated
        .send(
            &json!({"type":"subscribe","collection":COLLECTION,"uid":"rated",
                "query":{"limit":-1},"max_rate":max_rate,"checkpoints":checkpoints})
            .to_string(),
        )
        .await;
    let init = rated.recv_raw().await;
    assert_eq!(init["event"], "init", "{init}");
    (rated, init)
}

/// A `max_rate` subscription of a collection whose policy is `close`: at most N frames per
/// key per second from its first change, the latest value last, other keys and every delete
/// arriving; bad values and subscriptions that cannot conflate get `INVALID_PAYLOAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_holds_a_hot_key_to_its_rate() {
    let server = rated_server(10_000, &["hot", "gone", "c0", "c1", "c2"]).await;
    let (mut rated, init) = subscribe_rated(&server, 2.0, true).await;
    let mut list = by_key(&init["data"]);
    let mut plain = server.ws().await;
    plain
        .send(&json!({"type":"subscribe","collection":COLLECTION,"uid":"plain"}).to_string())
        .await;
    assert_eq!(plain.recv_raw().await["event"], "init");

    // 200 updates of one key over about a second; the other keys change once each, and
    // `gone` is deleted 50 ms after its update (inside its interval).
    let started = tokio::time::Instant::now();
    let mut published = 0;
    for round in 0..20 {
        let mut batch: Vec<Value> = (0..10)
            .map(|i| update("hot", json!(round * 10 + i)))
            .collect();
        match round {
            10 => batch.extend(["c0", "c1", "c2"].map(|k| update(k, json!("once")))),
            15 => batch.push(update("gone", json!("last"))),
            16 => batch.push(json!({"collection":COLLECTION,"event":"delete","keys":["gone"]})),
            _ => {}
        }
        published += batch.len();
        server.publish(Value::Array(batch)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The subscriber without a rate gets every frame; its last position is the end.
    let mut last_position = Value::Null;
    for _ in 0..published {
        let frame = plain.recv_raw().await;
        assert!(frame["position"].is_object(), "{frame}");
        last_position = frame["position"].clone();
    }

    // The rated one: read until a checkpoint at the end (it comes once nothing is held).
    let mut hot = Vec::new();
    let mut others: HashMap<String, Vec<Value>> = HashMap::new();
    loop {
        let frame = rated.recv_raw().await;
        assert_eq!(frame["uid"], "rated");
        if frame["event"] == "checkpoint" {
            if frame["position"] == last_position {
                break;
            }
            continue;
        }
        assert!(frame.get("position").is_none(), "folded: {frame}");
        apply(&mut list, &frame);
        let key = match frame["event"].as_str() {
            Some("delete") => key_of(&frame["data"][0]),
            _ => key_of(&frame["data"][0]["id"]),
        };
        match key.as_str() {
            "hot" => hot.push(frame["data"][0]["v"].clone()),
            _ => others.entry(key).or_default().push(frame),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "max_rate 2: {} frames for 200 updates in {elapsed:.2} s",
        hot.len()
    );
    // At most one frame per half second since the first (each key's interval starts when
    // its frame is written); a loaded machine only makes it fewer.
    assert!(
        hot.len() as f64 <= (elapsed * 2.0).floor() + 1.0,
        "{} frames in {elapsed:.2} s: {hot:?}",
        hot.len()
    );
    assert_eq!(hot.last(), Some(&json!(199)), "the latest value comes last");
    let values: Vec<i64> = hot.iter().map(|v| v.as_i64().expect("v")).collect();
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "order per key: {values:?}"
    );
    for k in ["c0", "c1", "c2"] {
        let frames = &others[k];
        assert_eq!(frames.len(), 1, "{k}: {frames:?}");
        assert_eq!(frames[0]["data"], json!([{"id":k,"v":"once"}]));
    }
    let gone = &others["gone"];
    assert_eq!(
        gone.last().expect("gone")["event"],
        "delete",
        "the delete arrives: {gone:?}"
    );
    assert_eq!(list, state(&server).await, "the client's list is the state");

    // Bad values (parse errors), and subscriptions that cannot conflate (compile errors).
    let mut ws = server.ws().await;
    let refused = [
        json!({"type":"subscribe","collection":COLLECTION,"uid":"s","max_rate":"2"}),
        json!({"type":"subscribe","collection":COLLECTION,"uid":"z","max_rate":0}),
        json!({"type":"subscribe","collection":COLLECTION,"uid":"n","max_rate":-1}),
        json!({"type":"subscribe","collection":COLLECTION,"uid":"b","max_rate":5000}),
        json!({"type":"subscribe","collection":"chat","uid":"chat","max_rate":2}),
        json!({"type":"subscribe","collection":COLLECTION,"uid":"e","event":"update","max_rate":2}),
        json!({"type":"subscribe","uid":"nested","data":{"collection":COLLECTION,"max_rate":2}}),
    ];
    for request in refused {
        ws.send(&request.to_string()).await;
        let error = ws.recv_raw().await;
        assert_eq!(error["status"], "error", "{request}: {error}");
        assert_eq!(
            error["error"]["code"], "INVALID_PAYLOAD",
            "{request}: {error}"
        );
        let message = error["error"]["message"].as_str().expect("message");
        assert!(message.contains("max_rate"), "{request}: {message}");
        // Parse errors carry no uid (as Directus' validation errors); compile errors do.
        if request.get("max_rate").is_some_and(|r| r == 2) || request["uid"] == "nested" {
            assert_eq!(error["uid"], request["uid"], "{request}: {error}");
        }
    }
    // A fraction is allowed: 0.5 is one frame per key every 2 s.
    ws.send(
        &json!({"type":"subscribe","collection":COLLECTION,"uid":"slow","max_rate":0.5})
            .to_string(),
    )
    .await;
    assert_eq!(ws.recv_raw().await["event"], "init");
}

/// Past `--conflation-max-keys` remembered cooldowns, a `max_rate` key is not held back to
/// its rate: its next change arrives at once, and `tidings_conflation_rate_unheld_total`
/// counts every write of it without a cooldown; keys within the cap are still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_past_the_key_cap_is_counted_not_held() {
    const UNHELD: &str = "tidings_conflation_rate_unheld_total";
    let server = rated_server(2, &["k0", "k1", "k2"]).await;
    assert_eq!(
        server.metric(UNHELD).await,
        Some(0.0),
        "exported from the start"
    );
    let (mut rated, _) = subscribe_rated(&server, 0.01, false).await;
    // One key at a time (three pending at once would pass the bound and reset): the first
    // two get a 100 s cooldown, the third finds the cap reached.
    for (i, k) in ["k0", "k1", "k2"].iter().enumerate() {
        server.publish(update(k, json!(i))).await;
        let frame = rated.recv_raw().await;
        assert_eq!(frame["data"][0]["id"], *k, "{frame}");
    }
    server.publish(update("k2", json!("again"))).await;
    let frame = rated.recv_raw().await;
    assert_eq!(
        frame["data"],
        json!([{"id":"k2","v":"again"}]),
        "not held back"
    );
    assert_eq!(
        server.metric(UNHELD).await,
        Some(2.0),
        "k2 written twice without a cooldown"
    );
    // A key within the cap is still held for its interval.
    server.publish(update("k0", json!("held"))).await;
    rated.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(server.metric(UNHELD).await, Some(2.0));
}
