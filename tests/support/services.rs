//! Private servers for the cluster tests: a `redis-server` or a `nats-server -js` of one test
//! alone, on a free loopback port, killed (by PID) when dropped. Tests never touch the shared
//! Redis on 6379 or NATS on 4222, so they cannot disturb (or be disturbed by) anything else.
//!
//! A missing program is a test failure whose message starts with `PREREQUISITE MISSING:` and
//! says how to install it: a suite that cannot run never passes.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::process::Proc;

/// Bound on a private server accepting connections.
const SERVER_START: Duration = Duration::from_secs(20);

/// Fails the test: `what` is missing, `how` gets it.
pub fn prerequisite_missing(what: &str, how: &str) -> ! {
    panic!(
        "PREREQUISITE MISSING: {what}. {how} (README.md, \"Running the tests\", lists everything)"
    )
}

/// Finds `program`: the environment variable `env` if set, else `PATH`, else the sbin
/// directories Debian installs servers to (not on every user's `PATH`).
pub fn find_program(program: &str, env: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A key prefix (so Redis keys, a NATS stream) no other test or run uses.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    format!(
        "t{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits until `port` on loopback accepts connections; fails with the server's output.
fn wait_listening(proc: &mut Proc, port: u16) {
    let deadline = Instant::now() + SERVER_START;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = proc.try_wait_for(Duration::ZERO) {
            panic!("the server exited with {status}: {}", proc.transcript());
        }
        assert!(
            Instant::now() < deadline,
            "the server did not listen within {SERVER_START:?}: {}",
            proc.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of this test only, without persistence.
pub struct PrivateRedis {
    binary: PathBuf,
    pub port: u16,
    proc: Option<Proc>,
}

impl PrivateRedis {
    /// Starts one on a free port (fails the test if `redis-server` is not installed).
    pub fn start() -> PrivateRedis {
        let Some(binary) = find_program("redis-server", "TIDINGS_TEST_REDIS_SERVER") else {
            prerequisite_missing(
                "`redis-server` is not installed (the Redis cluster tests run a private one)",
                "Install it with `apt-get install redis-server` (or set TIDINGS_TEST_REDIS_SERVER)",
            )
        };
        let mut redis = PrivateRedis {
            binary,
            port: free_port(),
            proc: None,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port, empty.
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let mut proc = Proc::spawn_program(
            &self.binary.to_string_lossy(),
            &[
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        );
        wait_listening(&mut proc, self.port);
        self.proc = Some(proc);
    }

    /// SIGKILL: no save, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// An admin connection.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("redis url");
        tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("redis connect timed out")
        .expect("redis connect")
    }

    /// Closes client connections (`all`, or those whose name ends with `kind`); the data stays.
    pub async fn kill_clients(&self, kind: &str) {
        let mut conn = self.admin().await;
        if kind == "all" {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .query_async(&mut conn)
                .await
                .expect("client kill");
            return;
        }
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .expect("client list");
        for line in list.lines() {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .unwrap_or("")
                    .to_string()
            };
            if field("name").ends_with(kind) {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(field("id"))
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
}

/// A `nats-server -js` of this test only, its JetStream store in a directory of its own
/// (kept across [`PrivateNats::restart`], removed on drop).
pub struct PrivateNats {
    binary: PathBuf,
    pub port: u16,
    /// The WebSocket listener's port, when started with [`PrivateNats::start_with_websocket`].
    pub ws_port: Option<u16>,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl PrivateNats {
    /// Starts one on a free port (fails the test if `nats-server` is not installed).
    pub fn start() -> PrivateNats {
        PrivateNats::start_on(None)
    }

    /// Starts one that also listens for WebSocket clients (plain `ws://`, loopback) on a
    /// free port of its own.
    pub fn start_with_websocket() -> PrivateNats {
        PrivateNats::start_on(Some(free_port()))
    }

    fn start_on(ws_port: Option<u16>) -> PrivateNats {
        let Some(binary) = find_program("nats-server", "TIDINGS_TEST_NATS_SERVER") else {
            prerequisite_missing(
                "`nats-server` is not installed (the NATS cluster tests run a private one)",
                "Install it with `apt-get install nats-server` (Debian 12+), or put the release \
                 binary from https://github.com/nats-io/nats-server/releases on PATH (or set \
                 TIDINGS_TEST_NATS_SERVER)",
            )
        };
        let dir = std::env::temp_dir().join(format!("tidings-nats-{}", unique_prefix()));
        std::fs::create_dir_all(&dir).expect("JetStream store dir");
        let mut nats = PrivateNats {
            binary,
            port: free_port(),
            ws_port,
            dir,
            proc: None,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and store.
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut args = vec!["-js", "-a", "127.0.0.1", "-p", &port, "-sd", &dir];
        let config = self.dir.join("websocket.conf");
        let config = config.to_string_lossy().into_owned();
        if let Some(ws_port) = self.ws_port {
            std::fs::write(
                &config,
                format!("websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"),
            )
            .expect("nats-server config");
            args.extend(["-c", &config]);
        }
        let mut proc = Proc::spawn_program(&self.binary.to_string_lossy(), &args);
        wait_listening(&mut proc, self.port);
        self.proc = Some(proc);
    }

    /// SIGKILL, by PID.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    pub fn store(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Chromium the browser tests drive: `TIDINGS_TEST_CHROMIUM` if set, else `chromium`
/// (Debian's package) or `chromium-browser` on `PATH` or in `/usr/bin`. Without one the browser
/// tests skip loudly (a `PREREQUISITE MISSING:` line on stderr, `None`), and under `CI=true`
/// they fail.
pub fn require_chromium() -> Option<PathBuf> {
    let found = find_program("chromium", "TIDINGS_TEST_CHROMIUM")
        .or_else(|| find_program("chromium-browser", "TIDINGS_TEST_CHROMIUM"));
    if found.is_some() {
        return found;
    }
    let what = "no Chromium (`chromium` on PATH, or TIDINGS_TEST_CHROMIUM) for the browser tests";
    let how = "Install Debian's package with `apt-get install chromium` (.ci/run does); the tests \
               never download a browser";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        prerequisite_missing(what, how);
    }
    eprintln!("PREREQUISITE MISSING: {what}. {how}. SKIPPED (this fails under CI=true)");
    None
}

/// The `node --version` of the `node` on PATH, or a failed test saying how to get Node.js.
pub fn require_node() -> String {
    let version = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    let how = "Install Node.js 20 or newer (Debian 12 ships 18: use the NodeSource `nodejs` \
               package or nvm)";
    let Some(version) = version else {
        prerequisite_missing(
            "`node` is not on PATH (Node.js >= 20 with npm runs the official JS clients)",
            how,
        )
    };
    let major: Option<u32> = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok());
    if major.is_none_or(|m| m < 20) {
        prerequisite_missing(&format!("`node` is {version}, older than 20"), how);
    }
    version
}

/// Installs the npm packages pinned by `dir/package-lock.json` (`npm ci`), unless exactly
/// that lock is already installed. A copy of the installed lock in `node_modules/` records
/// what is there, so a changed lock reinstalls. Fails the test if `npm ci` cannot run.
pub fn npm_ci(dir: &Path) {
    require_node();
    let lock = std::fs::read(dir.join("package-lock.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join("package-lock.json").display()));
    let stamp = dir
        .join("node_modules")
        .join(".tidings-installed-lock.json");
    if std::fs::read(&stamp).is_ok_and(|installed| installed == lock) {
        return;
    }
    let started = Instant::now();
    let out = std::process::Command::new("npm")
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            std::fs::write(&stamp, &lock).expect("write the npm stamp");
            eprintln!("npm ci in {} took {:?}", dir.display(), started.elapsed());
        }
        Ok(out) => prerequisite_missing(
            &format!(
                "`npm ci` in {} failed ({}):\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            "It needs the npm registry (or its cache); run it by hand to see why",
        ),
        Err(e) => prerequisite_missing(
            &format!("`npm` cannot run ({e})"),
            "Install it with `apt-get install npm`",
        ),
    }
}

/// Runs the test `test` of this same test binary alone, in a child with `envs` set and the
/// variables `unset` removed: whether it passed, and everything it printed (`--nocapture`).
pub fn run_test_alone(test: &str, envs: &[(&str, &str)], unset: &[&str]) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([test, "--exact", "--test-threads", "1", "--nocapture"])
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null());
    for key in unset {
        cmd.env_remove(key);
    }
    let out = cmd.output().expect("run the test binary");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs the test `test` of this same test binary alone, in a child with `envs` (which take a
/// prerequisite away), and checks that it failed, loudly, rather than passed: what cargo
/// shows for a machine without the prerequisite.
pub fn assert_fails_without_prerequisite(test: &str, envs: &[(&str, &str)]) {
    let (passed, text) = run_test_alone(test, envs, &[]);
    assert!(!passed, "{test} passed without its prerequisite:\n{text}");
    assert!(
        text.contains("1 failed"),
        "{test} did not run and fail:\n{text}"
    );
    assert!(
        text.contains("PREREQUISITE MISSING: "),
        "{test} failed without naming the missing prerequisite:\n{text}"
    );
}
