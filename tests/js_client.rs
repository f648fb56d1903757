//! The TypeScript client in `clients/js`: its unit tests, its integration suite against real
//! `tidings serve` children, and a check that the committed `dist/` is what `tsc` builds from
//! `src/`.
//!
//! The integration suite (`clients/js/test/integration.mjs`, run by `node --test`) starts,
//! restarts and stops brokers through a small control API served here, so that this test owns
//! every process ([`Broker`] children, killed by PID on drop, and a private `redis-server` for
//! the broker-restart test, whose log must outlive the broker).
//!
//! Needs Node.js >= 20 (and npm for the `dist/` check, which installs the pinned `typescript`
//! with `npm ci`): without them the tests fail with `PREREQUISITE MISSING`.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use support::process::{Broker, Proc};
use support::services::PrivateRedis;

/// The whole `node --test` run of one suite.
const NODE_DEADLINE: Duration = Duration::from_secs(180);
/// A broker's SIGTERM drain (`--shutdown-delay 0` in the restart test; 5 s by default).
const BROKER_EXIT: Duration = Duration::from_secs(30);
/// The HS256 secret the brokers of the token test verify (`--jwt-secret`, 32+ bytes).
const JWT_SECRET: &str = "tidings-js-client-test-secret-0123456789";

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join("js")
}

/// Runs `node --test` on `file` (under `clients/js/test/`) with `envs`, fails unless every
/// test in it ran and passed; returns the TAP output.
fn node_test(file: &str, envs: &[(&str, String)]) -> String {
    let node = support::services::require_node();
    let mut cmd = Command::new("node");
    cmd.args([
        "--experimental-websocket",
        "--test",
        "--test-reporter=tap",
        &format!("test/{file}"),
    ])
    .current_dir(client_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn_with_stdin(cmd, &format!("node --test test/{file}"));
    drop(proc.child.stdin.take());
    let status = proc.try_wait_for(NODE_DEADLINE);
    let end = Instant::now() + Duration::from_secs(10);
    let _ = proc
        .stdout
        .read_to_end(end)
        .and(proc.stderr.read_to_end(end));
    let report = proc.transcript();
    let Some(status) = status else {
        panic!("node {node}: {file} did not finish within {NODE_DEADLINE:?}\n{report}");
    };
    let stdout = proc.stdout.seen.join("\n");
    let count = |key: &str| -> Option<u32> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse().ok())
    };
    assert!(status.success(), "{file} failed ({status})\n{report}");
    let (tests, pass) = (count("tests"), count("pass"));
    assert!(
        tests.is_some_and(|n| n > 0) && tests == pass,
        "{file}: not every test ran and passed ({tests:?} tests, {pass:?} passed)\n{report}"
    );
    for key in ["fail", "skipped", "todo", "cancelled"] {
        assert_eq!(count(key), Some(0), "{file}: `# {key}` is not 0\n{report}");
    }
    eprintln!("{file}: {} tests passed (node {node})", tests.unwrap_or(0));
    stdout
}

#[test]
fn js_client_unit_tests() {
    node_test("unit.test.mjs", &[]);
}

/// Every file `tsc` builds from `src/` is in `dist/`, byte for byte, and `dist/` holds nothing
/// else: the committed build is the source's.
#[test]
fn js_client_dist_is_what_tsc_builds() {
    let dir = client_dir();
    support::services::npm_ci(&dir);
    let out = std::env::temp_dir().join(format!(
        "tidings-js-dist-{}",
        support::services::unique_prefix()
    ));
    let built = Command::new(dir.join("node_modules/.bin/tsc"))
        .args(["-p", "tsconfig.json", "--outDir"])
        .arg(&out)
        .current_dir(&dir)
        .output()
        .expect("run tsc");
    assert!(
        built.status.success(),
        "tsc failed:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let list = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let dist = dir.join("dist");
    let names = list(&out);
    assert!(!names.is_empty(), "tsc built nothing");
    assert_eq!(
        list(&dist),
        names,
        "dist/ and the tsc build list different files"
    );
    for name in &names {
        let fresh = std::fs::read(out.join(name)).expect("built file");
        let committed = std::fs::read(dist.join(name)).expect("dist file");
        assert!(
            fresh == committed,
            "dist/{name} is not what tsc builds from src/: run `npm run build` in clients/js"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The brokers the integration suite asked for, by id.
#[derive(Default)]
struct Brokers {
    next: AtomicU32,
    running: Mutex<HashMap<u32, (Vec<String>, Broker)>>,
}

type Reply = Result<Json<Value>, (StatusCode, String)>;

impl Brokers {
    /// Files `broker` under `id` (its flags kept for a restart); answers its URLs.
    fn put(&self, id: u32, args: Vec<String>, broker: Broker) -> Value {
        let reply = json!({"id": id, "http": broker.http_url(), "ws": broker.ws_url()});
        eprintln!(
            "broker {id} on {} (pid {}): {args:?}",
            broker.addr,
            broker.pid()
        );
        self.running
            .lock()
            .expect("brokers")
            .insert(id, (args, broker));
        reply
    }

    fn take(&self, id: u32) -> Result<(Vec<String>, Broker), (StatusCode, String)> {
        self.running
            .lock()
            .expect("brokers")
            .remove(&id)
            .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no broker {id}")))
    }
}

/// Runs a blocking step (children are started and waited for synchronously); a panic in it
/// (a broker that would not start) becomes a 500 with its message, for the suite to show.
async fn blocking(f: impl FnOnce() -> Value + Send + 'static) -> Reply {
    tokio::task::spawn_blocking(f).await.map(Json).map_err(|e| {
        let msg = e
            .try_into_panic()
            .ok()
            .and_then(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
            })
            .unwrap_or_else(|| "the step was cancelled".into());
        (StatusCode::INTERNAL_SERVER_ERROR, msg)
    })
}

/// `tidings serve --listen LISTEN ARGS…`.
fn launch(listen: &str, args: &[String]) -> Broker {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    Broker::start_listening(listen, &argv, &[])
}

/// `POST /brokers {"args":[…]}`: `tidings serve --listen 127.0.0.1:0 ARGS…`.
async fn start(State(brokers): State<Arc<Brokers>>, Json(body): Json<Value>) -> Reply {
    let args: Vec<String> = body["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    blocking(move || {
        let broker = launch("127.0.0.1:0", &args);
        let id = brokers.next.fetch_add(1, Ordering::Relaxed);
        brokers.put(id, args, broker)
    })
    .await
}

/// SIGTERM, then waits for the exit (sessions get their `1001` close first).
fn stop_broker(broker: &mut Broker) {
    broker.proc.sigterm();
    let status = broker.proc.wait_exit(BROKER_EXIT);
    assert!(
        status.success(),
        "broker exited with {status}: {}",
        broker.proc.transcript()
    );
}

/// `POST /brokers/{id}/restart`: SIGTERM, wait, start again on the same address, same flags.
async fn restart(State(brokers): State<Arc<Brokers>>, UrlPath(id): UrlPath<u32>) -> Reply {
    let (args, mut old) = brokers.take(id)?;
    blocking(move || {
        let t = Instant::now();
        stop_broker(&mut old);
        let broker = launch(&old.addr.to_string(), &args);
        eprintln!("broker {id} restarted in {:?}", t.elapsed());
        brokers.put(id, args, broker)
    })
    .await
}

/// `POST /brokers/{id}/stop`.
async fn stop(State(brokers): State<Arc<Brokers>>, UrlPath(id): UrlPath<u32>) -> Reply {
    let (_, mut broker) = brokers.take(id)?;
    blocking(move || {
        stop_broker(&mut broker);
        json!({"id": id})
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_integration() {
    support::services::require_node();
    let redis = PrivateRedis::start();
    let brokers = Arc::new(Brokers::default());
    let app = Router::new()
        .route("/brokers", post(start))
        .route("/brokers/{id}/restart", post(restart))
        .route("/brokers/{id}/stop", post(stop))
        .with_state(brokers.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the control API");
    let control = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let envs = [
        ("TIDINGS_TEST_CONTROL", control),
        ("TIDINGS_TEST_REDIS_URL", redis.url()),
        ("TIDINGS_TEST_JWT_SECRET", JWT_SECRET.to_string()),
    ];
    let stdout = tokio::task::block_in_place(|| node_test("integration.mjs", &envs));
    server.abort();
    // Whatever the suite left running is killed here (Broker's Proc kills by PID on drop).
    let left: Vec<u32> = brokers
        .running
        .lock()
        .expect("brokers")
        .keys()
        .copied()
        .collect();
    assert!(left.is_empty(), "the suite did not stop brokers {left:?}");
    for name in [
        "frames that arrive in one socket read",
        "heartbeat pings are answered",
        "a broker restart loses nothing",
        "an expiring token is renewed",
        "a live view equals the published state",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok ") && l.contains(name)),
            "no passing test named {name:?}:\n{stdout}"
        );
    }
}

#[test]
fn without_node_the_js_client_tests_fail_saying_so() {
    for test in [
        "js_client_unit_tests",
        "js_client_dist_is_what_tsc_builds",
        "js_client_integration",
    ] {
        support::services::assert_fails_without_prerequisite(test, &[("PATH", "/nonexistent")]);
    }
}
