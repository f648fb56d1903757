//! End-to-end tests of `tidings bench` against the real binary: a `tidings serve` child on an
//! ephemeral loopback port, and `tidings bench <scenario> --json` children pointed at it.
//!
//! The assertions are about exactness, never speed (speed targets belong in benchmarks): every
//! expected delivery arrives once, nothing else arrives, and the report has the fields its
//! scenario promises. The children follow the rules of `support::process`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::process::{Broker, Proc};

/// Longest a small bench run may take on a loaded machine (a debug build, shared cores).
const RUN: Duration = Duration::from_secs(120);

/// `tidings serve` with its HTTP URL.
struct Server {
    broker: Broker,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let broker = Broker::start(args);
        Server {
            url: broker.http_url(),
            broker,
        }
    }

    fn pid(&self) -> String {
        self.broker.pid().to_string()
    }
}

/// `tidings ARGS…`.
fn spawn(args: &[&str]) -> Proc {
    Proc::spawn(args, &[])
}

/// Runs `tidings bench SCENARIO --json --url … --broker-pid … EXTRA…` and parses its report.
fn bench_json(server: &Server, scenario: &str, extra: &[&str]) -> Value {
    let pid = server.pid();
    let mut args = vec![
        "bench",
        scenario,
        "--json",
        "--url",
        &server.url,
        "--broker-pid",
        &pid,
    ];
    args.extend_from_slice(extra);
    let mut proc = spawn(&args);
    let status = proc.wait_exit(RUN);
    assert!(status.success(), "bench failed: {}", proc.transcript());
    let last = proc.stdout.seen.last().cloned().unwrap_or_default();
    serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("stdout is not one JSON report ({e}): {}", proc.transcript()))
}

fn u(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not an unsigned integer in {report}"))
}

fn f(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

/// Every expected delivery arrived exactly once and nothing else did.
fn assert_exact(report: &Value, expected: u64) {
    assert_eq!(u(report, "expected_deliveries"), expected, "{report}");
    assert_eq!(u(report, "received_deliveries"), expected, "{report}");
    assert_eq!(u(report, "frames"), expected, "{report}");
    for zero in [
        "loss",
        "duplicates",
        "unexpected",
        "error_frames",
        "subscribers_with_loss",
        "closed_connections",
        "publish_errors",
    ] {
        assert_eq!(u(report, zero), 0, "{zero} in {report}");
    }
}

/// The resource fields every run with `--broker-pid` has.
fn assert_resources(report: &Value, server: &Server) {
    assert_eq!(report["broker_pid"].to_string(), server.pid(), "{report}");
    for field in [
        "broker_rss_start_bytes",
        "broker_rss_end_bytes",
        "broker_rss_peak_bytes",
        "generator_rss_bytes",
    ] {
        assert!(u(report, field) > 0, "{field} in {report}");
    }
    assert!(u(report, "broker_rss_peak_bytes") >= u(report, "broker_rss_end_bytes"));
    for field in [
        "broker_cpu_seconds",
        "broker_cpu_percent",
        "generator_cpu_seconds",
        "generator_cpu_percent",
    ] {
        assert!(f(report, field) >= 0.0, "{field} in {report}");
    }
    // Every scenario that delivers reports the broker's CPU per delivery.
    if u(report, "received_deliveries") > 0 {
        let per = f(report, "broker_cpu_us_per_delivery");
        let expect =
            f(report, "broker_cpu_seconds") * 1e6 / u(report, "received_deliveries") as f64;
        assert!((per - expect).abs() <= 0.001 + expect * 0.01, "{report}");
    } else {
        assert!(report["broker_cpu_us_per_delivery"].is_null(), "{report}");
    }
}

/// Latency percentiles are present, positive and ordered.
fn assert_latencies(report: &Value) {
    let names = [
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
        "latency_p999_ms",
        "latency_max_ms",
    ];
    let values: Vec<f64> = names.iter().map(|n| f(report, n)).collect();
    assert!(values[0] > 0.0, "{report}");
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert!(f(report, "latency_mean_ms") > 0.0, "{report}");
    assert!(f(report, "elapsed_seconds") > 0.0, "{report}");
    assert!(f(report, "deliveries_per_second") > 0.0, "{report}");
}

#[test]
fn broadcast_delivers_every_event_to_every_subscriber() {
    let server = Server::start(&[]);
    let report = bench_json(&server, "broadcast", &["-s", "20", "-n", "300"]);
    assert_eq!(report["scenario"], "broadcast");
    assert_eq!(u(&report, "subscribers"), 20);
    assert_eq!(u(&report, "events_published"), 300);
    // 300 events in batches of 50.
    assert_eq!(u(&report, "publish_requests"), 6);
    assert_exact(&report, 20 * 300);
    assert_eq!(u(&report, "fields"), 20);
    assert_latencies(&report);
    assert_resources(&report, &server);
    assert!(report["broker_bytes_per_connection"].is_null());
}

#[test]
fn filtered_subscribers_get_only_their_group() {
    let server = Server::start(&[]);
    let report = bench_json(
        &server,
        "filtered",
        &["-s", "20", "-n", "301", "--groups", "4", "--batch", "7"],
    );
    assert_eq!(u(&report, "groups"), 4);
    // seq 0..301 over 4 groups: 76 events for group 0, 75 for groups 1–3; 5 subscribers each.
    assert_exact(&report, 5 * (76 + 75 + 75 + 75));
    assert_eq!(u(&report, "publish_requests"), 301u64.div_ceil(7));
    assert_latencies(&report);
    assert_resources(&report, &server);
}

#[test]
fn projection_delivers_every_event() {
    let server = Server::start(&[]);
    let report = bench_json(&server, "projection", &["-s", "20", "-n", "300"]);
    assert_eq!(report["scenario"], "projection");
    assert_exact(&report, 20 * 300);
    assert_latencies(&report);
    assert_resources(&report, &server);
}

#[test]
fn connections_report_memory_per_connection() {
    let server = Server::start(&[]);
    let report = bench_json(&server, "connections", &["-s", "50", "--settle", "0.3"]);
    assert_eq!(report["scenario"], "connections");
    assert_eq!(u(&report, "subscribers"), 50);
    assert_eq!(u(&report, "events_published"), 0);
    assert_exact(&report, 0);
    assert_eq!(f(&report, "settle_seconds"), 0.3);
    assert!(
        report["broker_bytes_per_connection"].is_number(),
        "{report}"
    );
    assert!(
        report["generator_bytes_per_connection"].is_number(),
        "{report}"
    );
    assert!(report["latency_p50_ms"].is_null(), "{report}");
    assert_resources(&report, &server);
}

#[test]
fn latency_publishes_at_a_fixed_rate() {
    let server = Server::start(&[]);
    let report = bench_json(
        &server,
        "latency",
        &["-s", "20", "--rate", "200", "--duration", "1"],
    );
    assert_eq!(f(&report, "rate"), 200.0);
    let published = u(&report, "events_published");
    // One event is due at once, then one every 5 ms for a second.
    assert!((1..=201).contains(&published), "{report}");
    assert_exact(&report, 20 * published);
    assert_latencies(&report);
    assert_resources(&report, &server);
}

/// Also: `--url` may be the WebSocket URL (the HTTP base is derived from it), and the table
/// says what the `reordered` count means.
/// `--nats-ws` measures a NATS server with the same subscribers, items and checks: every
/// event reaches every subscriber once (broadcast), each group only its own (filtered by
/// subject), with the publisher pipelining single-event `PUB`s.
#[test]
fn nats_ws_mode_delivers_exactly_like_the_broker_mode() {
    let nats = support::services::PrivateNats::start_with_websocket();
    let ws = format!("ws://127.0.0.1:{}", nats.ws_port.expect("a websocket port"));
    let tcp = format!("127.0.0.1:{}", nats.port);
    for (scenario, expected) in [("broadcast", 20 * 100), ("filtered", 100 * 20 / 4)] {
        let mut proc = spawn(&[
            "bench",
            scenario,
            "--json",
            "-s",
            "20",
            "-n",
            "100",
            "-k",
            "4",
            "--batch",
            "1",
            "--in-flight",
            "8",
            "--nats-ws",
            &ws,
            "--nats-publish",
            &tcp,
        ]);
        let status = proc.wait_exit(RUN);
        assert!(status.success(), "bench failed: {}", proc.transcript());
        let last = proc.stdout.seen.last().cloned().unwrap_or_default();
        let report: Value = serde_json::from_str(&last).expect("one JSON report");
        assert_exact(&report, expected);
        assert_eq!(u(&report, "publish_requests"), 100, "{report}");
    }
    let mut proc = spawn(&["bench", "projection", "--nats-ws", &ws]);
    assert!(
        !proc.wait_exit(RUN).success(),
        "projection is not a NATS scenario"
    );
}

#[test]
fn table_output_names_the_numbers() {
    let server = Server::start(&[]);
    let ws_url = format!("{}/websocket", server.url.replacen("http://", "ws://", 1));
    let mut proc = spawn(&[
        "bench",
        "broadcast",
        "--url",
        &ws_url,
        "-s",
        "3",
        "-n",
        "10",
        "--in-flight",
        "1",
    ]);
    let status = proc.wait_exit(RUN);
    assert!(status.success(), "{}", proc.transcript());
    let table = proc.stdout.seen.join("\n");
    assert!(table.contains("30 of 30 expected"), "{table}");
    assert!(table.contains("latency ms"), "{table}");
    assert!(!table.contains("broker RSS"), "no --broker-pid: {table}");
    // One request in flight: publish order is seq order, so nothing may arrive reordered.
    assert!(
        table.lines().any(|l| l.starts_with("reordered ")
            && l.ends_with(" 0 (every connection got the items in seq order)")),
        "{table}"
    );
}

#[test]
fn a_refused_subscribe_aborts_with_the_brokers_reason() {
    let server = Server::start(&["--public-permissions", r#"{"other":{}}"#]);
    let mut proc = spawn(&["bench", "broadcast", "--url", &server.url, "-s", "5"]);
    let status = proc.wait_exit(RUN);
    assert!(!status.success(), "{}", proc.transcript());
    let stderr = proc.stderr.seen.join("\n");
    assert!(stderr.contains("subscribe refused: FORBIDDEN"), "{stderr}");
    assert!(
        stderr.contains("of 5 were connected and subscribed"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_and_unreachable_brokers_are_clear_errors() {
    let mut proc = spawn(&["bench", "broadcast", "--fields", "2"]);
    assert_eq!(proc.wait_exit(RUN).code(), Some(2), "a usage error exits 2");
    let stderr = proc.stderr.seen.join("\n");
    assert!(stderr.contains("--fields must be at least 4"), "{stderr}");

    // Port 9 (discard) on loopback: nothing listens there in a test sandbox.
    let mut proc = spawn(&[
        "bench",
        "broadcast",
        "--url",
        "http://127.0.0.1:9",
        "-s",
        "2",
    ]);
    assert!(!proc.wait_exit(RUN).success());
    let stderr = proc.stderr.seen.join("\n");
    assert!(stderr.contains("cannot connect to 127.0.0.1:9"), "{stderr}");
    assert!(stderr.contains("0 of 2"), "{stderr}");
}
