//! End-to-end tests of the real `tidings` binary: `serve`, `tail`, `publish`, `--help`.
//!
//! Each test runs the binary built by Cargo (`CARGO_BIN_EXE_tidings`) as a child process and
//! talks to it over loopback, exactly as a script or a deployment would.
//!
//! The child processes follow the rules of `support::process`: every wait bounded, every child
//! killed by PID when its owner drops, output drained by threads, no `TIDINGS_*` variable of
//! the test's own environment.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::process::{parse_listening_line, Broker as Server, Output, Proc};
use support::schema;
use support::services::free_port;
use tokio_tungstenite::tungstenite::Message;

/// The longest any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// Runs `tidings ARGS…` to completion, at most [`WAIT`] (then it is killed and the test fails).
fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    support::process::run(args, envs, WAIT)
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client (one request per connection)
// ---------------------------------------------------------------------------------------------

/// Sends one request and returns the status and the (de-chunked) body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("read response (bounded by the read timeout)");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        s = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket helpers
// ---------------------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket connect timed out")
        .expect("WebSocket connect");
    ws
}

/// The next text frame as JSON (checked against the protocol schemas); skips server pings.
async fn ws_next_json(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no WebSocket message in time")
            .expect("WebSocket ended")
            .expect("WebSocket error");
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(text.as_str()).expect("frame is JSON");
            schema::assert_server_message(&value);
            if value["type"] != "ping" {
                return value;
            }
        }
    }
}

/// Subscribes to `collection` with `uid` and waits for the `init` answer.
async fn ws_subscribe(ws: &mut Ws, collection: &str, uid: &str) {
    let subscribe = json!({"type": "subscribe", "collection": collection, "uid": uid});
    schema::assert_client_message(&subscribe);
    ws.send(Message::text(subscribe.to_string()))
        .await
        .expect("send subscribe");
    let init = ws_next_json(ws).await;
    assert_eq!(init["type"], "subscription", "{init}");
    assert_eq!(init["event"], "init", "{init}");
    assert_eq!(init["uid"], uid, "{init}");
}

// ---------------------------------------------------------------------------------------------
// 1. serve prints its address; health endpoints answer
// ---------------------------------------------------------------------------------------------

#[test]
fn serve_prints_bound_address_and_answers_healthz() {
    let server = Server::start(&[]);
    assert_ne!(
        server.addr.port(),
        0,
        "port 0 must be replaced by the bound port"
    );
    assert!(server.addr.ip().is_loopback());

    let (status, body) = http(server.addr, "GET", "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("healthz body is JSON");
    assert_eq!(body, json!({"status": "ok"}));

    let (status, body) = http(server.addr, "GET", "/readyz", None);
    assert_eq!(status, 200, "{body}");

    let (status, body) = http(server.addr, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE tidings_connections gauge"), "{body}");

    let (status, body) = http(server.addr, "GET", "/no-such-route", None);
    assert_eq!(status, 404, "{body}");
}

#[test]
fn serve_prints_the_configured_ws_path() {
    let mut proc = Proc::spawn(
        &["serve", "--listen", "127.0.0.1:0", "--ws-path", "/rt"],
        &[],
    );
    let line = match proc.stdout.next_line(Instant::now() + WAIT) {
        Ok(Some(line)) => line,
        _ => panic!("no address line: {}", proc.transcript()),
    };
    assert!(parse_listening_line(&line, "/rt").is_some(), "{line:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. SIGTERM: sessions get 1001, the process exits 0 within the shutdown timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_closes_sessions_with_1001_and_exits_zero() {
    let shutdown_timeout = Duration::from_secs(5);
    let mut server = Server::start(&["--shutdown-timeout", "5", "--shutdown-delay", "0"]);
    let mut ws = ws_connect(&server.ws_url()).await;
    // The init answer proves the session is established before the signal.
    ws_subscribe(&mut ws, "messages", "s1").await;

    let signalled = Instant::now();
    server.proc.sigterm();

    let close = loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close frame within the wait after SIGTERM")
            .expect("the socket ended without a close frame")
            .expect("WebSocket error instead of a close frame");
        match message {
            Message::Close(frame) => break frame,
            Message::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).expect("frame is JSON");
                schema::assert_server_message(&value);
            }
            _ => {}
        }
    };
    let close = close.expect("the close frame carries a code");
    assert_eq!(
        u16::from(close.code),
        1001,
        "close reason: {:?}",
        close.reason
    );
    // Let tungstenite send its close reply; the stream then ends.
    let _ = tokio::time::timeout(WAIT, async { while ws.next().await.is_some() {} }).await;

    // Bounded by the shutdown timeout, plus slack for a loaded machine.
    let status = server
        .proc
        .wait_exit(shutdown_timeout + Duration::from_secs(5));
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
    assert!(signalled.elapsed() < shutdown_timeout + Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_exits_within_the_shutdown_timeout_even_if_a_client_never_reads() {
    let mut server = Server::start(&["--shutdown-timeout", "1", "--shutdown-delay", "0"]);
    // A client that connects and then never reads again (so never answers the close frame).
    let mut ws = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut ws, "messages", "s1").await;

    let signalled = Instant::now();
    server.proc.sigterm();
    let status = server
        .proc
        .wait_exit(Duration::from_secs(1) + Duration::from_secs(8));
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
    assert!(signalled.elapsed() < Duration::from_secs(9));
    drop(ws);
}

#[test]
fn sigterm_on_an_idle_server_exits_zero() {
    let mut server = Server::start(&["--shutdown-delay", "0"]);
    // Wait until the server answers: the signal handler is only installed after the address
    // line is printed (see `sigterm_right_after_the_address_line_exits_zero`).
    let (status, _) = http(server.addr, "GET", "/healthz", None);
    assert_eq!(status, 200);
    server.proc.sigterm();
    let status = server.proc.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
}

/// Scripts and supervisors take the address line as "started". A SIGTERM sent right after it
/// must still be a graceful shutdown (exit 0), not the default action of the signal.
#[test]
fn sigterm_right_after_the_address_line_exits_zero() {
    for _ in 0..10 {
        let mut server = Server::start_with_env(&[], &[("TIDINGS_SHUTDOWN_DELAY", "0")]);
        server.proc.sigterm();
        let status = server.proc.wait_exit(WAIT);
        assert!(
            status.success(),
            "exit status {status}: {}",
            server.proc.transcript()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Bad configuration: exit code 2, the message names the flag
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 2b. The drain: readiness off, serving on for --shutdown-delay, then 1001 with a position
// ---------------------------------------------------------------------------------------------

/// Polls `/readyz` until it answers `want`, failing after [`WAIT`].
fn wait_readyz(server: &mut Server, want: u16) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = http(server.addr, "GET", "/readyz", None);
        if status == want {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}, wanted {want}: {}",
            server.proc.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads frames until the close frame, returning the text frames before it and the close.
async fn ws_until_close(ws: &mut Ws, within: Duration) -> (Vec<Value>, (u16, String)) {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no close frame in time")
            .expect("the socket ended without a close frame")
            .expect("WebSocket error instead of a close frame");
        match message {
            Message::Close(frame) => {
                let frame = frame.expect("the close frame carries a code");
                return (
                    frames,
                    (u16::from(frame.code), frame.reason.as_str().to_owned()),
                );
            }
            Message::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).expect("frame is JSON");
                schema::assert_server_message(&value);
                frames.push(value);
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn sigterm_drains_publishes_during_the_delay_then_closes_1001_with_a_resume_position() {
    let delay = Duration::from_secs(3);
    let timeout = Duration::from_secs(3);
    let mut server = Server::start(&["--shutdown-delay", "3", "--shutdown-timeout", "3"]);
    let mut ws = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut ws, "orders", "s1").await;
    let before = http(
        server.addr,
        "POST",
        "/v1/publish",
        Some(r#"{"collection":"orders","event":"create","data":{"id":0}}"#),
    );
    assert_eq!(before.0, 202, "{}", before.1);
    assert_eq!(ws_next_json(&mut ws).await["data"][0]["id"], 0);

    let signalled = Instant::now();
    server.proc.sigterm();
    // Readiness goes off at once, long before the delay is over.
    let unready = wait_readyz(&mut server, 503);
    assert!(
        unready - signalled < delay,
        "readiness off only after {:?}",
        unready - signalled
    );
    let (status, body) = http(server.addr, "GET", "/readyz", None);
    assert_eq!((status, body.as_str()), (503, r#"{"status":"not_ready"}"#));
    let (status, _) = http(server.addr, "GET", "/healthz", None);
    assert_eq!(status, 200, "liveness stays up during the drain");

    // Publishes during the delay are accepted and delivered.
    let mut offsets = Vec::new();
    for id in 1..=5 {
        let (status, body) = http(
            server.addr,
            "POST",
            "/v1/publish",
            Some(&format!(
                r#"{{"collection":"orders","event":"create","data":{{"id":{id}}}}}"#
            )),
        );
        assert_eq!(status, 202, "publish {id} during the delay: {body}");
        let answer: Value = serde_json::from_str(&body).expect("publish answer is JSON");
        offsets.push(answer["events"][0]["offset"].as_u64().expect("offset"));
    }
    // A new subscriber is still served during the delay.
    let mut late = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut late, "orders", "late").await;
    assert!(
        signalled.elapsed() < delay,
        "the publishes took the whole delay: the test proves nothing on this machine"
    );

    let (frames, (code, reason)) = ws_until_close(&mut ws, delay + timeout + WAIT).await;
    let closed = signalled.elapsed();
    let ids: Vec<&Value> = frames.iter().map(|f| &f["data"][0]["id"]).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "frames before the close: {frames:?}");
    assert!(
        closed >= delay,
        "closed after {closed:?}, before the {delay:?} delay"
    );
    assert_eq!(code, 1001, "close reason: {reason:?}");
    let position = reason
        .strip_prefix("server shutting down: reconnect elsewhere since ")
        .unwrap_or_else(|| panic!("close reason without a position: {reason:?}"));
    let position: Value = serde_json::from_str(position).expect("the position is JSON");
    let last = frames.last().expect("frames")["position"].clone();
    assert_eq!(
        position, last,
        "the close carries the last delivered position"
    );
    assert_eq!(position["offset"], *offsets.last().expect("offsets"));

    let (_, (late_code, late_reason)) = ws_until_close(&mut late, WAIT).await;
    assert_eq!(late_code, 1001, "{late_reason}");
    assert!(late_reason.contains(" since {"), "{late_reason}");

    let status = server
        .proc
        .wait_exit(delay + timeout + Duration::from_secs(5));
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
    assert!(
        signalled.elapsed() < delay + timeout + Duration::from_secs(1),
        "exited after {:?}",
        signalled.elapsed()
    );
}

/// A publish whose request is still being sent when the delay ends is answered (axum's graceful
/// shutdown keeps its connection): with a clean 503, since subscribers are already moving away,
/// so the application retries elsewhere rather than losing the event silently.
#[tokio::test]
async fn a_publish_in_flight_when_the_delay_ends_gets_an_answer() {
    let mut server = Server::start(&["--shutdown-delay", "1", "--shutdown-timeout", "5"]);
    let mut ws = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut ws, "orders", "s1").await;
    let body = r#"{"collection":"orders","event":"create","data":{"id":1}}"#;
    let mut stream = TcpStream::connect_timeout(&server.addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("send head");
    stream
        .write_all(&body.as_bytes()[..10])
        .expect("send part of the body");
    server.proc.sigterm();
    // The close means the delay is over and the listener no longer accepts.
    let (_, (code, _)) = ws_until_close(&mut ws, WAIT).await;
    assert_eq!(code, 1001);
    stream
        .write_all(&body.as_bytes()[10..])
        .expect("send the rest of the body");
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    assert!(
        raw.starts_with("HTTP/1.1 503"),
        "in-flight publish answered {raw:?}: {}",
        server.proc.transcript()
    );
    assert!(raw.contains("SERVICE_UNAVAILABLE"), "{raw}");
    let status = server.proc.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
}

/// Chosen behaviour: a second SIGTERM or SIGINT during the delay ends the delay at once; the
/// sessions are still closed properly (1001 with a position) and the process exits.
#[tokio::test]
async fn a_second_signal_during_the_delay_closes_and_exits_promptly() {
    let mut server = Server::start(&["--shutdown-delay", "60", "--shutdown-timeout", "5"]);
    let mut ws = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut ws, "orders", "s1").await;
    let signalled = Instant::now();
    server.proc.sigterm();
    wait_readyz(&mut server, 503);
    server.proc.signal("INT");
    let (_, (code, reason)) = ws_until_close(&mut ws, WAIT).await;
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains(r#" since {"epoch":"#), "{reason}");
    let status = server.proc.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.transcript()
    );
    assert!(signalled.elapsed() < WAIT, "took {:?}", signalled.elapsed());
}

/// Runs `serve` with `args`/`envs` and expects exit code 2 and `--flag` in stderr.
fn assert_config_error(args: &[&str], envs: &[(&str, &str)], flag: &str) {
    let mut argv = vec!["serve", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let out = run(&argv, envs);
    let what = format!("{envs:?} tidings {}", argv.join(" "));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe(&what));
    assert!(
        out.stderr.contains(&format!("--{flag}")),
        "stderr does not name --{flag}: {}",
        out.describe(&what)
    );
    assert!(
        out.stdout.is_empty(),
        "nothing should be printed on stdout: {}",
        out.describe(&what)
    );
}

#[test]
fn bad_configuration_exits_2_naming_the_flag() {
    assert_config_error(&["--ws-path", "nope"], &[], "ws-path");
    assert_config_error(&["--ws-path", "/metrics"], &[], "ws-path");
    assert_config_error(&["--auth-mode", "strict"], &[], "auth-mode");
    assert_config_error(&["--key-field", "orders"], &[], "key-field");
    assert_config_error(
        &["--tokens-file", "/nonexistent/tokens.json"],
        &[],
        "tokens-file",
    );
    assert_config_error(&["--outbox-bytes", "0"], &[], "outbox-bytes");
    assert_config_error(&["--public-permissions", "[1]"], &[], "public-permissions");
}

#[test]
fn bad_configuration_from_env_exits_2_naming_the_flag() {
    assert_config_error(&[], &[("TIDINGS_WS_PATH", "nope")], "ws-path");
    assert_config_error(&[], &[("TIDINGS_AUTH_MODE", "strict")], "auth-mode");
    assert_config_error(&[], &[("TIDINGS_KEY_FIELD", "orders")], "key-field");
}

#[test]
fn unparsable_flag_values_exit_2_naming_the_flag() {
    // Rejected by the argument parser itself (clap's usage errors also exit 2).
    assert_config_error(&["--auth-mode", "bogus"], &[], "auth-mode");
    assert_config_error(&["--heartbeat-period=-1"], &[], "heartbeat-period");
    assert_config_error(&["--max-frame-bytes", "lots"], &[], "max-frame-bytes");
    // Not an engine at all.
    assert_config_error(&["--engine", "etcd"], &[], "engine");
}

#[test]
fn unreadable_tokens_file_content_exits_2() {
    let dir = std::env::temp_dir().join(format!("tidings-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens.json");
    std::fs::write(&path, "this is not JSON").unwrap();
    assert_config_error(
        &["--tokens-file", path.to_str().unwrap()],
        &[],
        "tokens-file",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bad collections file: exit 2, and the message names the flag, the file, the JSON
/// Pointer of the problem and the problem; so does a flag naming a collection the file
/// forbids.
#[test]
fn a_bad_collections_file_exits_2_naming_the_file_the_pointer_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("tidings-cli-collections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("collections.json");
    let file = path.to_str().unwrap();
    for (content, pointer, problem) in [
        (
            r#"{"collections":{"orders":{"max_items":0}}}"#,
            "/collections/orders/max_items",
            "must be an integer greater than 0",
        ),
        (
            r#"{"undeclared":"deny","collections":{}}"#,
            "/undeclared",
            r#"must be "allow" or "forbid""#,
        ),
        (
            r#"{"collections":{"orders":{"key":"order_id"}}}"#,
            "/collections/orders/key",
            "unknown setting `key`",
        ),
    ] {
        std::fs::write(&path, content).unwrap();
        let argv = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--collections-file",
            file,
        ];
        let out = run(&argv, &[]);
        assert_eq!(out.status.code(), Some(2), "{}", out.describe(content));
        let expected = format!("--collections-file: {file}: at {pointer}: {problem}");
        assert!(
            out.stderr.contains(&expected),
            "stderr lacks {expected:?}: {}",
            out.describe(content)
        );
    }
    std::fs::write(
        &path,
        r#"{"undeclared":"forbid","collections":{"orders":{}}}"#,
    )
    .unwrap();
    assert_config_error(
        &["--collections-file", file, "--state", "ordres"],
        &[],
        "state",
    );
    assert_config_error(
        &["--collections-file", &format!("{file}.missing")],
        &[],
        "collections-file",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn strict_mode_with_a_tokens_file_starts() {
    let dir = std::env::temp_dir().join(format!("tidings-cli-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens.json");
    std::fs::write(&path, r#"{"t1":{"sub":"alice","collections":{"*":{}}}}"#).unwrap();
    let server = Server::start(&[
        "--auth-mode",
        "strict",
        "--tokens-file",
        path.to_str().unwrap(),
    ]);
    let (status, _) = http(server.addr, "GET", "/healthz", None);
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 4. tail + publish
// ---------------------------------------------------------------------------------------------

/// Runs `tidings publish …` and returns the parsed JSON answer, asserting success.
fn publish_ok(server: &Server, collection: &str, data: &str, extra: &[&str]) -> Value {
    let url = server.http_url();
    let mut argv = vec!["publish", collection, "create", data, "--url", &url];
    argv.extend_from_slice(extra);
    let out = run(&argv, &[]);
    assert!(out.status.success(), "{}", out.describe(&argv.join(" ")));
    let answer: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "publish stdout is not JSON ({e}): {}",
            out.describe(&argv.join(" "))
        )
    });
    assert!(
        answer["events"][0]["offset"].is_u64(),
        "no events[0].offset in {answer}"
    );
    answer
}

#[test]
fn tail_prints_published_events_as_json_lines() {
    let server = Server::start(&[]);
    let ws_url = server.ws_url();
    let mut tail = Proc::spawn(
        &[
            "tail", "messages", "--url", &ws_url, "--count", "2", "--fields", "id,text",
        ],
        &[],
    );
    // Publishing before the subscription is live would lose the events: wait for it.
    tail.wait_stderr("subscribed to messages", WAIT);

    let first = publish_ok(
        &server,
        "messages",
        r#"{"id":1,"text":"hi","secret":1}"#,
        &[],
    );
    let second = publish_ok(
        &server,
        "messages",
        r#"{"id":2,"text":"hi","secret":2}"#,
        &[],
    );
    let (o1, o2) = (
        first["events"][0]["offset"].as_u64().unwrap(),
        second["events"][0]["offset"].as_u64().unwrap(),
    );
    assert!(
        o2 > o1,
        "offsets must increase within a collection: {first} then {second}"
    );

    let status = tail.wait_exit(WAIT);
    assert!(
        status.success(),
        "tail exited with {status}: {}",
        tail.transcript()
    );
    let lines: Vec<&String> = tail
        .stdout
        .seen
        .iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "tail --count 2 must print exactly 2 lines: {}",
        tail.transcript()
    );
    for (line, id) in lines.into_iter().zip([1, 2]) {
        let frame: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        schema::assert_server_message(&frame);
        assert_eq!(frame["type"], "subscription", "{frame}");
        assert_eq!(frame["event"], "create", "{frame}");
        let data = frame["data"]
            .as_array()
            .unwrap_or_else(|| panic!("collection data must be an array: {frame}"));
        assert_eq!(data.len(), 1, "{frame}");
        assert_eq!(data[0]["id"], id, "{frame}");
        assert_eq!(data[0]["text"], "hi", "{frame}");
        assert!(
            data[0].get("secret").is_none(),
            "--fields id,text must drop other fields: {frame}"
        );
    }
}

#[test]
fn tail_reports_an_unreachable_broker() {
    // A port that was free a moment ago: nothing listens there now.
    let port = free_port();
    let out = run(
        &[
            "tail",
            "messages",
            "--url",
            &format!("ws://127.0.0.1:{port}/websocket"),
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", out.describe("tail"));
    assert!(
        out.stderr.contains("cannot connect"),
        "{}",
        out.describe("tail")
    );
}

#[test]
fn publish_rejects_invalid_json_without_contacting_the_broker() {
    let port = free_port();
    let out = run(
        &[
            "publish",
            "messages",
            "create",
            "{not json",
            "--url",
            &format!("http://127.0.0.1:{port}"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe("publish"));
    assert!(
        out.stderr.contains("not JSON"),
        "{}",
        out.describe("publish")
    );
}

/// `tail --url` takes the HTTP URL and `publish --url` the WebSocket URL: each derives the
/// other, since one broker serves both on one port.
#[test]
fn tail_and_publish_accept_either_url() {
    let server = Server::start(&[]);
    let http_url = server.http_url();
    let mut tail = Proc::spawn(
        &[
            "tail", "messages", "--url", &http_url, "--count", "1", "--event", "create",
        ],
        &[],
    );
    tail.wait_stderr("subscribed to messages", WAIT);
    let ws_url = server.ws_url();
    let argv = [
        "publish",
        "messages",
        "create",
        r#"{"id":7}"#,
        "--url",
        &ws_url,
    ];
    let out = run(&argv, &[]);
    assert!(out.status.success(), "{}", out.describe(&argv.join(" ")));
    let status = tail.wait_exit(WAIT);
    assert!(status.success(), "{}", tail.transcript());
    let frame: Value = serde_json::from_str(tail.stdout.seen[0].trim()).expect("JSON line");
    assert_eq!(frame["data"][0]["id"], 7, "{frame}");

    // Neither scheme: a usage error (exit 2) that says what to give.
    let out = run(&["tail", "messages", "--url", "127.0.0.1:1"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe("tail"));
    assert!(
        out.stderr
            .contains("give http://host:port or ws://host:port/websocket"),
        "{}",
        out.describe("tail")
    );
}

/// The token travels as `?access_token=`: characters with a meaning in a URL arrive intact.
#[test]
fn tail_sends_a_token_with_reserved_characters_intact() {
    let token = "s3cr+t/ü?&x y#";
    let grant = format!("{token}=messages");
    let server = Server::start(&["--auth-mode", "strict", "--token", &grant]);
    let ws_url = server.ws_url();
    let mut tail = Proc::spawn(
        &[
            "tail", "messages", "--url", &ws_url, "--token", token, "--count", "1",
        ],
        &[],
    );
    tail.wait_stderr("subscribed to messages", WAIT);
    publish_ok(&server, "messages", r#"{"id":1}"#, &[]);
    let status = tail.wait_exit(WAIT);
    assert!(status.success(), "{}", tail.transcript());
}

#[test]
fn publish_of_an_unknown_event_kind_fails_locally_naming_the_kinds() {
    // Nothing listens here: the check must not need the broker.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let argv = ["publish", "orders", "upsert", r#"{"id":1}"#, "--url", &url];
    let out = run(&argv, &[]);
    let what = argv.join(" ");
    assert_eq!(out.status.code(), Some(2), "{}", out.describe(&what));
    assert!(
        out.stderr
            .contains("`upsert` is not an event kind; use one of create, update, delete"),
        "{}",
        out.describe(&what)
    );
    assert!(
        !out.stderr.contains("cannot reach"),
        "{}",
        out.describe(&what)
    );
    let out = run(&["tail", "orders", "--event", "upsert"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe("tail"));
    assert!(out.stderr.contains("use one of create, update, delete"));
}

// ---------------------------------------------------------------------------------------------
// 5. publish keys
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_needs_the_key_when_the_server_requires_one() {
    let server = Server::start(&["--publish-key", "k1"]);
    let url = server.http_url();

    for extra in [&[][..], &["--key", "wrong"][..]] {
        let mut argv = vec![
            "publish",
            "messages",
            "create",
            r#"{"id":1}"#,
            "--url",
            &url,
        ];
        argv.extend_from_slice(extra);
        let out = run(&argv, &[]);
        let what = argv.join(" ");
        assert!(!out.status.success(), "{}", out.describe(&what));
        assert!(
            out.stderr.contains("401"),
            "the 401 answer must be on stderr: {}",
            out.describe(&what)
        );
        assert!(
            out.stderr.contains("\"error\""),
            "the JSON error body must be on stderr: {}",
            out.describe(&what)
        );
        assert!(out.stdout.trim().is_empty(), "{}", out.describe(&what));
    }

    publish_ok(&server, "messages", r#"{"id":1}"#, &["--key", "k1"]);

    // The client also reads its key from TIDINGS_PUBLISH_KEY.
    let out = run(
        &[
            "publish",
            "messages",
            "create",
            r#"{"id":2}"#,
            "--url",
            &url,
        ],
        &[("TIDINGS_PUBLISH_KEY", "k1")],
    );
    assert!(
        out.status.success(),
        "{}",
        out.describe("TIDINGS_PUBLISH_KEY=k1 tidings publish")
    );
}

#[test]
fn publish_keys_from_env_are_semicolon_separated() {
    let server = Server::start_with_env(&[], &[("TIDINGS_PUBLISH_KEY", "k1;k2")]);
    publish_ok(&server, "messages", r#"{"id":1}"#, &["--key", "k1"]);
    publish_ok(&server, "messages", r#"{"id":2}"#, &["--key", "k2"]);
    let url = server.http_url();
    let out = run(
        &[
            "publish",
            "messages",
            "create",
            r#"{"id":3}"#,
            "--url",
            &url,
            "--key",
            "k1;k2",
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "{}",
        out.describe("publish --key 'k1;k2'")
    );
}

// ---------------------------------------------------------------------------------------------
// 6. --help documents the command-line contract
// ---------------------------------------------------------------------------------------------

/// Flags of `tidings serve` named by the command-line contract in `shared/DESIGN.md`.
const DESIGN_SERVE_FLAGS: &[&str] = &[
    "listen",
    "shutdown-delay",
    "shutdown-timeout",
    "ws-path",
    "auth-mode",
    "tokens-file",
    "publish-key",
    "engine",
    "redis-url",
    "nats-url",
    "key-prefix",
    "config",
    "jwt-secret",
    "jwt-public-key",
    "jwks-file",
    "jwt-issuer",
    "jwt-audience",
];

/// Whether `src/config.rs` defines `--flag` (so that the contract test grows with the code).
fn config_defines(config_rs: &str, flag: &str) -> bool {
    let env = format!(
        "\"TIDINGS_{}\"",
        flag.replace('-', "_").to_ascii_uppercase()
    );
    let long = format!("long = \"{flag}\"");
    let field = format!("pub {}:", flag.replace('-', "_"));
    config_rs.contains(&env) || config_rs.contains(&long) || config_rs.contains(&field)
}

fn help(args: &[&str]) -> String {
    let out = run(args, &[]);
    assert!(out.status.success(), "{}", out.describe(&args.join(" ")));
    out.stdout
}

#[test]
fn help_documents_the_command_line_contract() {
    let top = help(&["--help"]);
    for sub in ["serve", "tail", "publish"] {
        assert!(
            top.contains(sub),
            "`tidings --help` does not mention `{sub}`:\n{top}"
        );
    }

    let config_rs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config.rs"))
            .unwrap();
    let serve = help(&["serve", "--help"]);
    let mut checked = BTreeSet::new();
    for flag in DESIGN_SERVE_FLAGS {
        if !config_defines(&config_rs, flag) {
            continue; // not implemented yet
        }
        checked.insert(*flag);
        assert!(
            serve.contains(&format!("--{flag}")),
            "`tidings serve --help` does not mention --{flag}:\n{serve}"
        );
        let env = format!("TIDINGS_{}", flag.replace('-', "_").to_ascii_uppercase());
        assert!(
            serve.contains(&env),
            "`tidings serve --help` does not mention {env}:\n{serve}"
        );
    }
    // The flags that exist today must at least include these.
    for flag in [
        "listen",
        "ws-path",
        "auth-mode",
        "tokens-file",
        "publish-key",
        "engine",
    ] {
        assert!(
            checked.contains(flag),
            "src/config.rs no longer defines --{flag}"
        );
    }

    let tail = help(&["tail", "--help"]);
    for flag in [
        "--url", "--event", "--filter", "--fields", "--item", "--token",
    ] {
        assert!(
            tail.contains(flag),
            "`tidings tail --help` does not mention {flag}:\n{tail}"
        );
    }
    let publish = help(&["publish", "--help"]);
    for flag in ["--url", "--key"] {
        assert!(
            publish.contains(flag),
            "`tidings publish --help` does not mention {flag}:\n{publish}"
        );
    }
}

#[test]
fn version_flag_prints_the_crate_version() {
    let out = help(&["--version"]);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

// ---------------------------------------------------------------------------------------------
// deploy/: the Grafana dashboard only queries metrics the binary exports
// ---------------------------------------------------------------------------------------------

/// Every `tidings_*` / `process_*` metric name in `deploy/grafana/dashboards/tidings.json`.
fn dashboard_metric_names() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards/tidings.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "no panel queries in the dashboard");
    let re = regex::Regex::new(r"\b(?:tidings|process)_[a-z_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| {
            re.find_iter(e)
                .map(|m| m.as_str().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn dashboard_queries_only_exported_metrics() {
    // `--state messages`: the retained-state series exist from the start.
    let server = Server::start(&["--state", "messages"]);
    // Make the labelled families exist: one subscription, one publish, one delivery.
    let mut ws = ws_connect(&server.ws_url()).await;
    ws_subscribe(&mut ws, "messages", "s1").await;
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/publish",
        Some(r#"{"collection":"messages","event":"create","data":{"id":1}}"#),
    );
    assert_eq!(status, 202, "{body}");
    let event = ws_next_json(&mut ws).await;
    assert_eq!(event["event"], "create", "{event}");

    let (status, metrics) = http(server.addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for name in dashboard_metric_names() {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|b| families.contains(b)))
            .unwrap_or(&name);
        assert!(
            families.contains(base),
            "the dashboard queries `{name}`, which /metrics does not export:\n{metrics}"
        );
    }
}
