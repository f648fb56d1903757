//! What the JavaScript suites (`clients/js/test/{integration,conflation}.mjs`, `tests/browser/`) need from
//! Rust: a small control API through which they start, restart and stop `tidings serve`
//! children (so this test process owns every process, killed by PID on drop), static files
//! for the browser pages, and [`node_test`], which runs one `node --test` file and fails unless
//! every test in it ran and passed.
//!
//! The control API, on `127.0.0.1:0`:
//! - `POST /brokers {"args":[…]}`: `tidings serve --listen 127.0.0.1:0 ARGS…` →
//!   `{"id","http","ws"}`;
//! - `POST /brokers/{id}/restart`: SIGTERM, wait for the exit, start again on the same address
//!   with the same flags;
//! - `POST /brokers/{id}/stop`;
//! - `GET /files/{dir}/{name}`: a file of one of the directories given to [`Control::start`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::process::{Broker, Proc};

/// The whole `node --test` run of one suite.
const NODE_DEADLINE: Duration = Duration::from_secs(240);
/// A broker's SIGTERM drain (`--shutdown-delay 0` in the restart tests; 5 s by default).
const BROKER_EXIT: Duration = Duration::from_secs(30);

/// The brokers a suite asked for, by id, and the directories it may read files from.
#[derive(Default)]
struct Shared {
    next: AtomicU32,
    running: Mutex<HashMap<u32, (Vec<String>, Broker)>>,
    dirs: HashMap<String, PathBuf>,
}

type Reply = Result<Json<Value>, (StatusCode, String)>;

impl Shared {
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

async fn start(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Reply {
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
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        shared.put(id, args, broker)
    })
    .await
}

async fn restart(State(shared): State<Arc<Shared>>, UrlPath(id): UrlPath<u32>) -> Reply {
    let (args, mut old) = shared.take(id)?;
    blocking(move || {
        let t = Instant::now();
        stop_broker(&mut old);
        let broker = launch(&old.addr.to_string(), &args);
        eprintln!("broker {id} restarted in {:?}", t.elapsed());
        shared.put(id, args, broker)
    })
    .await
}

async fn stop(State(shared): State<Arc<Shared>>, UrlPath(id): UrlPath<u32>) -> Reply {
    let (_, mut broker) = shared.take(id)?;
    blocking(move || {
        stop_broker(&mut broker);
        json!({"id": id})
    })
    .await
}

/// A file of a served directory; names are plain (`[A-Za-z0-9._-]`, no leading dot).
async fn file(
    State(shared): State<Arc<Shared>>,
    UrlPath((dir, name)): UrlPath<(String, String)>,
) -> Response {
    let plain = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let Some(root) = shared.dirs.get(&dir).filter(|_| plain) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css",
        _ => "application/octet-stream",
    };
    match std::fs::read(root.join(&name)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

/// A running control API.
pub struct Control {
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Control {
    /// Serves the control API, and under `/files/NAME/` each directory of `dirs`.
    pub async fn start(dirs: &[(&str, PathBuf)]) -> Control {
        let shared = Arc::new(Shared {
            dirs: dirs
                .iter()
                .map(|(name, dir)| ((*name).to_string(), dir.clone()))
                .collect(),
            ..Shared::default()
        });
        let app = Router::new()
            .route("/brokers", post(start))
            .route("/brokers/{id}/restart", post(restart))
            .route("/brokers/{id}/stop", post(stop))
            .route("/files/{dir}/{name}", get(file))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the control API");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Control {
            url,
            shared,
            server,
        }
    }

    /// Stops serving; fails if the suite left brokers running (they are killed here, by PID,
    /// when their `Proc`s drop).
    pub fn finish(self) {
        self.server.abort();
        let left: Vec<u32> = self
            .shared
            .running
            .lock()
            .expect("brokers")
            .drain()
            .map(|(id, _)| id)
            .collect();
        assert!(left.is_empty(), "the suite did not stop brokers {left:?}");
    }
}

/// Runs `node --experimental-websocket --test --test-reporter=tap FILE` in `dir` with `envs`;
/// fails unless every test in it ran and passed. Returns the TAP output.
pub fn node_test(dir: &Path, file: &str, envs: &[(&str, String)]) -> String {
    let node = super::services::require_node();
    let mut cmd = Command::new("node");
    cmd.args([
        "--experimental-websocket",
        "--test",
        "--test-reporter=tap",
        file,
    ])
    .current_dir(dir);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn_with_stdin(cmd, &format!("node --test {file}"));
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

/// Fails unless `stdout` (TAP) has a passing test whose name contains each of `names`.
pub fn assert_tests_passed(stdout: &str, names: &[&str]) {
    for name in names {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok ") && l.contains(name)),
            "no passing test named {name:?}:\n{stdout}"
        );
    }
}
