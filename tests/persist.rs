//! `--state-dir` with the real binary: a restart after SIGTERM keeps the retained state and
//! the epoch (a client resumes with `recovered: true` and nothing missed), a restart after
//! SIGKILL keeps the last periodic snapshot under a new epoch (a resuming client gets
//! `recovered: false` and the snapshot, never a reused offset), and a corrupt or truncated
//! snapshot stops the start with a message naming the file, the line and the problem.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::process::{Broker, Proc};
use support::{http_client, post_with, WsClient, WAIT};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tidings-persist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn start(dir: &Path, interval: &str) -> Broker {
    Broker::start(&[
        "--state",
        "orders",
        "--state-dir",
        dir.to_str().expect("utf-8 path"),
        "--state-snapshot-interval",
        interval,
        "--shutdown-delay",
        "0",
    ])
}

async fn ws(broker: &Broker) -> WsClient {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(broker.ws_url()))
        .await
        .expect("connect timed out")
        .expect("connect");
    WsClient { ws }
}

async fn publish(broker: &Broker, event: &str, data: Value) -> Value {
    let body = json!({"collection":"orders","event":event,"data":data});
    let answer = post_with(&http_client(), broker.addr, "/v1/publish", &body).await;
    answer["events"][0].clone()
}

async fn subscribe(broker: &Broker, uid: &str, since: Option<&Value>) -> (WsClient, Value) {
    let mut c = ws(broker).await;
    let mut request = json!({"type":"subscribe","collection":"orders","uid":uid});
    if let Some(since) = since {
        request["since"] = since.clone();
    }
    c.send(&request.to_string()).await;
    let init = c.recv_raw().await;
    (c, init)
}

fn position(accepted: &Value) -> Value {
    json!({"epoch": accepted["epoch"], "offset": accepted["offset"]})
}

#[tokio::test]
async fn a_restart_after_sigterm_keeps_the_state_and_the_epoch() {
    let dir = scratch("sigterm");
    let mut first = start(&dir, "0");
    publish(&first, "create", json!([{"id":1,"s":"a"},{"id":2,"s":"b"}])).await;
    let last = publish(&first, "update", json!({"id":1,"n":1})).await;
    let (mut watcher, _) = subscribe(&first, "w", None).await;
    first.proc.sigterm();
    assert!(
        first.proc.wait_exit(WAIT).success(),
        "{}",
        first.proc.transcript()
    );
    assert_eq!(watcher.expect_close().await, Some(1001));

    let second = start(&dir, "0");
    // The same epoch, the next offset: a client that saw everything resumes losing nothing.
    let (mut resumed, init) = subscribe(&second, "r", Some(&position(&last))).await;
    assert_eq!(
        init,
        json!({"type":"subscription","event":"init","data":[],"uid":"r",
               "position": position(&last), "recovered": true})
    );
    let next = publish(&second, "update", json!({"id":2,"n":2})).await;
    assert_eq!(next["epoch"], last["epoch"]);
    assert_eq!(
        next["offset"].as_u64(),
        last["offset"].as_u64().map(|o| o + 1)
    );
    let frame = resumed.recv_raw().await;
    assert_eq!(
        frame,
        json!({"type":"subscription","event":"update","data":[{"id":2,"s":"b","n":2}],
               "uid":"r","position": position(&next)})
    );
    // The state itself came back: a fresh subscriber's init lists the merged items.
    let (_, fresh) = subscribe(&second, "f", None).await;
    assert_eq!(
        fresh["data"],
        json!([{"id":1,"s":"a","n":1},{"id":2,"s":"b","n":2}])
    );
    // A resume from before the restart's position is outside the history: lost, with the
    // snapshot.
    let older = json!({"epoch": last["epoch"], "offset": 1});
    let (_, lost) = subscribe(&second, "o", Some(&older)).await;
    assert_eq!(lost["recovered"], false);
    assert_eq!(lost["data"], fresh["data"]);

    // A crash after a clean restart: the snapshot the restart wrote at once is not clean, so
    // the epoch does not continue a second time (offset 3 of it was handed out since).
    let mut second = second;
    second.proc.kill();
    let third = start(&dir, "0");
    let (_, after_crash) = subscribe(&third, "c", Some(&position(&next))).await;
    assert_eq!(after_crash["recovered"], false, "{after_crash}");
    assert_ne!(after_crash["position"]["epoch"], last["epoch"]);
    assert_eq!(
        after_crash["data"],
        json!([{"id":1,"s":"a","n":1},{"id":2,"s":"b"}])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// In process: the snapshot metrics, and the final snapshot of `App::serve`'s drain.
#[tokio::test]
async fn snapshots_are_counted_in_metrics_and_the_final_one_is_clean() {
    let dir = scratch("metrics");
    let mut config = tidings::Config {
        state_dir: Some(dir.clone()),
        state_snapshot_interval: Some(Duration::from_millis(50)),
        ..tidings::Config::default()
    };
    config.state.collections = vec!["orders".into()];
    let server = support::start(config).await;
    server
        .publish(json!({"collection":"orders","event":"create","data":{"id":1}}))
        .await;
    let text = || std::fs::read_to_string(dir.join("tidings-state.ndjson")).unwrap_or_default();
    let deadline = Instant::now() + WAIT;
    while !text().contains(r#"["1",0,{"id":1}]"#) {
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot: {}",
            text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.metric("tidings_state_snapshot_bytes").await > Some(100.0));
    assert!(
        server
            .metric("tidings_state_snapshot_last_success_timestamp_seconds")
            .await
            > Some(1.7e9)
    );
    assert!(
        server
            .metric("tidings_state_snapshot_duration_seconds_count")
            .await
            >= Some(2.0)
    );
    assert_eq!(
        server.metric("tidings_state_snapshot_failures_total").await,
        Some(0.0)
    );
    assert!(text().contains(r#""clean":false"#));
    server.shutdown().await;
    let last = text();
    assert!(last.contains(r#""clean":true"#), "{last}");
    assert!(
        last.ends_with("{\"end\":true,\"collections\":1,\"items\":1}\n"),
        "{last}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the snapshot on disk has `orders` at `offset`.
fn wait_for_snapshot(dir: &Path, offset: u64, proc: &mut Proc) {
    let needle = format!(r#"{{"collection":"orders","offset":{offset},"#);
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(dir.join("tidings-state.ndjson")).unwrap_or_default();
        if text.contains(&needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot at offset {offset} within {WAIT:?}: {text}\n{}",
            proc.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_restart_after_sigkill_keeps_the_last_periodic_snapshot_under_a_new_epoch() {
    let dir = scratch("sigkill");
    let mut first = start(&dir, "0.1");
    publish(&first, "create", json!([{"id":1,"s":"a"},{"id":2,"s":"b"}])).await;
    let last = publish(&first, "delete", json!([{"id":2}])).await;
    wait_for_snapshot(&dir, 2, &mut first.proc);
    first.proc.kill();

    let second = start(&dir, "0.1");
    let (_, init) = subscribe(&second, "r", Some(&position(&last))).await;
    // Not the old epoch: whatever the crash lost, no offset of it is handed out again.
    let epoch = init["position"]["epoch"].clone();
    assert_ne!(epoch, last["epoch"], "{init}");
    assert_eq!(
        init,
        json!({"type":"subscription","event":"init","data":[{"id":1,"s":"a"}],"uid":"r",
               "position": {"epoch": epoch, "offset": 0}, "recovered": false})
    );
    let next = publish(&second, "update", json!({"id":1,"n":1})).await;
    assert_eq!((&next["epoch"], &next["offset"]), (&epoch, &json!(1)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_or_truncated_snapshot_stops_the_start_naming_the_line_and_the_problem() {
    let dir = scratch("corrupt");
    let file = dir.join("tidings-state.ndjson");
    let header = r#"{"format":"tidings-state","version":1,"epoch":"abc","clean":true,"written_at":"2026-12-07T00:00:00Z"}"#;
    for (content, line, problem) in [
        ("garbage\n".to_string(), 1, "not JSON"),
        (
            format!("{header}\n{{\"collection\":\"orders\",\"offset\":3,\"items\":2}}\n[\"1\",0,{{\"id\":1}}]\n"),
            4,
            "the file ends inside the items of collection `orders` (truncated)",
        ),
        (
            format!("{header}\n{{\"collection\":\"orders\",\"offset\":3,\"items\":1}}\n[\"1\",0,{{\"id\":1}}]\n"),
            4,
            "the file ends before its end line (truncated)",
        ),
        (
            format!("{header}\n{{\"collection\":\"orders\",\"offset\":3,\"items\":1}}\n[1,0]\n"),
            3,
            "not an item line",
        ),
    ] {
        std::fs::write(&file, &content).expect("write snapshot");
        let out = support::process::run(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--state",
                "orders",
                "--state-dir",
                dir.to_str().expect("utf-8 path"),
            ],
            &[],
            Duration::from_secs(10),
        );
        let what = format!("snapshot {content:?}");
        assert_eq!(out.status.code(), Some(1), "{}", out.describe(&what));
        let expected = format!("--state-dir: {}: line {line}: {problem}", file.display());
        assert!(
            out.stderr.contains(&expected) && out.stderr.contains("move it away"),
            "stderr lacks {expected:?}: {}",
            out.describe(&what)
        );
        assert!(
            out.stdout.is_empty(),
            "a broker that cannot restore announces no address: {}",
            out.describe(&what)
        );
        // Refused, not replaced: the file is still there for the operator.
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), content);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
