//! Conformance with the real official client: `@directus/sdk` `realtime()` (npm, pinned in
//! `tests/sdk/package.json`) runs `tests/sdk/conformance.mjs` against a broker started here,
//! and `tests/sdk/retained.mjs` against one retaining a collection (`--state`).
//!
//! Needs `node` and `npm`: the test runs `npm ci` in `tests/sdk` itself when the installed
//! packages are not exactly the pinned ones. Without Node.js, or when `npm ci` fails, the test
//! fails with `PREREQUISITE MISSING` (it never passes without having run).
//!
//! The script prints `READY_FOR_RESTART` once its first phase passed; this test then shuts the
//! broker down (sessions get close 1001), binds a new broker to the same address and answers
//! `RESTARTED` on the script's stdin, so that the SDK's own reconnect (same URL, 1 s delay)
//! and resubscribe are exercised.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::process::Proc;
use tidings::app::App;
use tidings::config::AuthMode;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The whole node run (the script has its own 60 s watchdog).
const CHILD_DEADLINE: Duration = Duration::from_secs(120);
const OK_PREFIX: &str = "SDK CONFORMANCE OK ";

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("sdk")
}

/// A broker bound to an exact address (the restart reuses the first broker's port).
struct Broker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn bind_same_addr(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}, retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {addr} for the restarted broker: {e}"),
        }
    }
}

async fn start_at(addr: SocketAddr) -> Broker {
    let listener = bind_same_addr(addr).await;
    let app = App::new(support::directus_like(AuthMode::Handshake)).expect("valid config");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.serve(listener, async move {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    Broker { stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directus_sdk_realtime_conformance() {
    let node = support::services::require_node();
    support::services::npm_ci(&sdk_dir());
    eprintln!("node {node}");

    let first = support::start(support::directus_like(AuthMode::Handshake)).await;
    let addr = first.addr;
    let base = format!("http://{addr}");

    let mut cmd = Command::new("node");
    cmd.arg(sdk_dir().join("conformance.mjs"))
        .arg(&base)
        .env("TIDINGS_HTTP", &base)
        .current_dir(sdk_dir());
    let mut node = Proc::spawn_with_stdin(cmd, "node conformance.mjs");
    let mut stdin = node.child.stdin.take().expect("stdin");

    // The child's lines come over a std channel: wait for them off the runtime's threads.
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut first = Some(first);
    let mut second: Option<Broker> = None;
    let mut driver_error: Option<String> = None;
    loop {
        let line = match tokio::task::block_in_place(|| node.stdout.next_line(deadline)) {
            Ok(Some(line)) => line,
            Ok(None) => break, // stdout closed: the script exited
            Err(()) => {
                driver_error = Some(format!("node did not finish within {CHILD_DEADLINE:?}"));
                break;
            }
        };
        if line.trim() == "READY_FOR_RESTART" {
            let Some(server) = first.take() else {
                driver_error = Some("READY_FOR_RESTART printed twice".into());
                break;
            };
            let t = Instant::now();
            server.shutdown().await;
            second = Some(start_at(addr).await);
            eprintln!("broker restarted on {addr} in {:?}", t.elapsed());
            if let Err(e) = writeln!(stdin, "RESTARTED {base}").and_then(|()| stdin.flush()) {
                driver_error = Some(format!("cannot write RESTARTED to node: {e}"));
                break;
            }
        }
    }

    let left = deadline.saturating_duration_since(Instant::now());
    let status = tokio::task::block_in_place(|| node.try_wait_for(left));
    drop(stdin);
    if let Some(server) = first.take() {
        server.shutdown().await;
    }
    if let Some(broker) = second.take() {
        let _ = broker.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), broker.task).await;
    }
    if status.is_some() {
        let end = Instant::now() + Duration::from_secs(10);
        let _ = tokio::task::block_in_place(|| {
            node.stdout
                .read_to_end(end)
                .and(node.stderr.read_to_end(end))
        });
    }
    let report = node.transcript();
    if let Some(e) = driver_error {
        panic!("{e}\n{report}");
    }
    let Some(status) = status else {
        panic!("node did not exit within {CHILD_DEADLINE:?} (killed on drop)\n{report}");
    };
    assert!(
        status.success(),
        "conformance.mjs failed ({status})\n{report}"
    );
    let stdout = node.stdout.seen.join("\n");
    let ok = stdout.lines().find(|l| l.starts_with(OK_PREFIX));
    assert!(ok.is_some(), "no `{OK_PREFIX}<n> checks` line\n{report}");
    assert!(
        stdout.contains("READY_FOR_RESTART"),
        "the restart phase did not run\n{report}"
    );
    eprintln!("{}", ok.unwrap());
}

/// `tests/sdk/retained.mjs` on a broker retaining `orders`: the SDK receives a non-empty
/// `init` (with `meta`) and the list its application keeps stays equal to the broker's state
/// through an enter, a leave and a partial update, read back over HTTP and by a socket
/// `items` read sent with the SDK's `sendMessage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directus_sdk_keeps_a_retained_list() {
    support::services::require_node();
    support::services::npm_ci(&sdk_dir());
    let mut config = support::directus_like(AuthMode::Handshake);
    config.state.collections = vec!["orders".into()];
    let server = support::start(config).await;
    let base = format!("http://{}", server.addr);
    let mut cmd = Command::new("node");
    cmd.arg(sdk_dir().join("retained.mjs"))
        .arg(&base)
        .current_dir(sdk_dir());
    let mut node = Proc::spawn_with_stdin(cmd, "node retained.mjs");
    let status = tokio::task::block_in_place(|| node.try_wait_for(CHILD_DEADLINE));
    let end = Instant::now() + Duration::from_secs(10);
    let _ = tokio::task::block_in_place(|| {
        node.stdout
            .read_to_end(end)
            .and(node.stderr.read_to_end(end))
    });
    let report = node.transcript();
    server.shutdown().await;
    let Some(status) = status else {
        panic!("node did not exit within {CHILD_DEADLINE:?}\n{report}");
    };
    assert!(status.success(), "retained.mjs failed ({status})\n{report}");
    let stdout = node.stdout.seen.join("\n");
    assert!(
        stdout.lines().any(|l| l.starts_with("SDK RETAINED OK ")),
        "no `SDK RETAINED OK <n> checks` line\n{report}"
    );
}

#[test]
fn without_node_the_sdk_test_fails_saying_so() {
    support::services::assert_fails_without_prerequisite(
        "directus_sdk_realtime_conformance",
        &[("PATH", "/nonexistent")],
    );
}
