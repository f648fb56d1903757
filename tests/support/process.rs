//! Child processes for the end-to-end tests: the real `tidings` binary, and the servers the
//! cluster tests run (`redis-server`, `nats-server`).
//!
//! Robustness rules, because these run on small, loaded CI machines:
//! - every wait has a deadline; nothing sleeps to synchronise, only polling loops bounded by
//!   a deadline;
//! - every child is owned by a [`Proc`], whose `Drop` kills it by PID and reaps it, so a
//!   failing assertion never leaves a process running;
//! - a child's stdout and stderr are drained by threads into channels, so a chatty child never
//!   blocks on a full pipe, and failure messages show what the child printed;
//! - `tidings` children get an environment without any `TIDINGS_*` variable of the test's own
//!   environment, so a developer's shell settings cannot change the outcome.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Poll period of the bounded loops that wait for a child to exit.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for the pipes to close once a child exited, or for `serve`'s address line.
pub const START: Duration = Duration::from_secs(10);

/// Lines of one output stream of a child, read by a background thread.
pub struct Lines {
    rx: Receiver<String>,
    /// Every line received so far, for failure messages and final checks.
    pub seen: Vec<String>,
}

impl Lines {
    pub fn spawn(stream: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line, `Ok(None)` at end of stream, `Err(())` when `deadline` passes first.
    pub fn next_line(&mut self, deadline: Instant) -> Result<Option<String>, ()> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Err(()),
        }
    }

    /// Moves whatever has arrived into `seen`, without waiting.
    pub fn drain_now(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
    }

    /// Reads to end of stream (the writer exited), at most until `deadline`.
    pub fn read_to_end(&mut self, deadline: Instant) -> Result<(), ()> {
        while self.next_line(deadline)?.is_some() {}
        Ok(())
    }
}

/// A running child process, killed (by PID) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    pub status: Option<ExitStatus>,
}

/// `tidings` with piped output and no `TIDINGS_*` variable of the test's environment.
pub fn tidings() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIDINGS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

impl Proc {
    /// Starts `tidings ARGS…` with extra environment `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = tidings();
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::start(cmd, format!("tidings {}", args.join(" ")))
    }

    /// Starts `program ARGS…` (a server the test needs).
    pub fn spawn_program(program: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Proc::start(cmd, format!("{program} {}", args.join(" ")))
    }

    /// Starts `cmd` with its stdin piped (taken from `child.stdin`), for a script the test
    /// talks to.
    pub fn spawn_with_stdin(mut cmd: Command, name: &str) -> Proc {
        cmd.stdin(Stdio::piped());
        Proc::start_with(cmd, name.to_string())
    }

    fn start(mut cmd: Command, name: String) -> Proc {
        cmd.stdin(Stdio::null());
        Proc::start_with(cmd, name)
    }

    fn start_with(mut cmd: Command, name: String) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Lines::spawn(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::spawn(child.stderr.take().expect("piped stderr"));
        Proc {
            name,
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child printed so far, for failure messages.
    pub fn transcript(&mut self) -> String {
        self.stdout.drain_now();
        self.stderr.drain_now();
        format!(
            "`{}`\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.stdout.seen.join("\n"),
            self.stderr.seen.join("\n")
        )
    }

    /// Waits for the child to exit, at most `timeout`; `None` if it is still running.
    pub fn try_wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return self.status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => return None,
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// Waits for the child to exit (at most `timeout`, else the test fails), then reads the
    /// rest of its output.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let Some(status) = self.try_wait_for(timeout) else {
            panic!("still running after {timeout:?}: {}", self.transcript());
        };
        let deadline = Instant::now() + START;
        // The pipes close when the child exits (unless it left a grandchild holding them).
        let done =
            self.stdout.read_to_end(deadline).is_ok() && self.stderr.read_to_end(deadline).is_ok();
        assert!(
            done,
            "output pipes still open after exit: {}",
            self.transcript()
        );
        status
    }

    /// Waits for a stderr line containing `needle`; fails if the child exits or `timeout` passes.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.stderr.next_line(deadline) {
                Ok(Some(line)) if line.contains(needle) => return line,
                Ok(Some(_)) => {}
                Ok(None) => panic!("stderr ended before {needle:?}: {}", self.transcript()),
                Err(()) => panic!(
                    "no {needle:?} on stderr within {timeout:?}: {}",
                    self.transcript()
                ),
            }
        }
    }

    /// Sends SIGTERM by PID (`kill` the command: the crate does not depend on libc).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends `SIG<name>` by PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }

    /// SIGKILL, by this child's PID only, and reap it.
    pub fn kill(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        if let Ok(status) = self.child.wait() {
            self.status = Some(status);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The result of a short-lived command.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn describe(&self, what: &str) -> String {
        format!(
            "`{what}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `tidings ARGS…` to completion, at most `timeout` (then it is killed and the test fails).
pub fn run(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut proc = Proc::spawn(args, envs);
    let status = proc.wait_exit(timeout);
    Output {
        status,
        stdout: proc.stdout.seen.join("\n"),
        stderr: proc.stderr.seen.join("\n"),
    }
}

/// Parses `tidings listening on http://ADDR (WebSocket ws://ADDR<ws_path>)`.
pub fn parse_listening_line(line: &str, ws_path: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("tidings listening on http://")?;
    let (addr, rest) = rest.split_once(" (WebSocket ws://")?;
    let parsed: SocketAddr = addr.parse().ok()?;
    (rest == format!("{addr}{ws_path})")).then_some(parsed)
}

/// `tidings serve --listen 127.0.0.1:0 ARGS…` as a child process, with the address it printed.
pub struct Broker {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Broker {
    pub fn start(args: &[&str]) -> Broker {
        Broker::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Broker {
        Broker::start_listening("127.0.0.1:0", args, envs)
    }

    /// `tidings serve --listen LISTEN ARGS…` (a restart binds the address of the broker
    /// it replaces).
    pub fn start_listening(listen: &str, args: &[&str], envs: &[(&str, &str)]) -> Broker {
        let mut argv = vec!["serve", "--listen", listen];
        argv.extend_from_slice(args);
        let mut proc = Proc::spawn(&argv, envs);
        let line = match proc.stdout.next_line(Instant::now() + START) {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "serve exited before printing its address: {}",
                proc.transcript()
            ),
            Err(()) => panic!(
                "serve printed no address within {START:?}: {}",
                proc.transcript()
            ),
        };
        let addr = parse_listening_line(&line, "/websocket").unwrap_or_else(|| {
            panic!(
                "unexpected first stdout line {line:?}: {}",
                proc.transcript()
            )
        });
        Broker { proc, addr }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/websocket", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
