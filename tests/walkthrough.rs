//! Runs README's one-minute walkthrough, command by command, against the real binary (with
//! `--state orders`, so the late subscriber's retained `init` is shown too), and compares
//! what each command prints with what README shows. Only the port (README's 8080 is
//! replaced by a free one) and the random epoch are not compared.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const BIN: &str = env!("CARGO_BIN_EXE_tidings");

struct Block {
    lang: String,
    lines: Vec<String>,
}

/// The fenced blocks of README's walkthrough section, in order.
fn walkthrough() -> Vec<Block> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("## A one-minute walkthrough")
        .expect("README has the walkthrough");
    let section = &readme[start..];
    let end = section
        .find("The same from a browser")
        .expect("walkthrough end");
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    for line in section[..end].lines() {
        if let Some(lang) = line.strip_prefix("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => {
                    current = Some(Block {
                        lang: lang.to_owned(),
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(block) = current.as_mut() {
            block.lines.push(line.to_owned());
        }
    }
    blocks
}

/// Commands of a shell block (continuation lines joined), each with the `# ` comment lines
/// that follow it.
fn commands(block: &Block) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut pending = String::new();
    for line in &block.lines {
        if let Some(comment) = line.strip_prefix("# ") {
            out.last_mut()
                .expect("a comment follows a command")
                .1
                .push(comment.to_owned());
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                out.push((std::mem::take(&mut pending), Vec::new()));
            }
        }
    }
    out
}

/// README's command, runnable here: the built binary for `cargo run`, the test's port.
fn localize(command: &str, addr: &str) -> String {
    command
        .replace("cargo run --release --", BIN)
        .replace("cargo run --", BIN)
        .replace("127.0.0.1:8080", addr)
}

fn lines_of(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn mask_epoch(s: &str) -> String {
    let re = regex::Regex::new(r#""epoch":"[a-z0-9]+""#).unwrap();
    re.replace_all(s, r#""epoch":"<epoch>""#).into_owned()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(command: &str, addr: &str) -> std::process::Output {
    Command::new("sh")
        .args(["-c", command])
        .env("TIDINGS_HTTP_URL", format!("http://{addr}"))
        .output()
        .unwrap_or_else(|e| panic!("run {command}: {e}"))
}

#[test]
fn readme_walkthrough_prints_what_readme_shows() {
    let blocks = walkthrough();
    let langs: Vec<&str> = blocks.iter().map(|b| b.lang.as_str()).collect();
    assert_eq!(
        langs,
        ["sh", "sh", "sh", "json", "sh", "sh", "sh", "json"],
        "walkthrough blocks"
    );

    // Terminal 1: the broker, on a free port instead of 8080.
    let serve = commands(&blocks[0]);
    assert_eq!(serve.len(), 1);
    assert_eq!(serve[0].0, "cargo run --release -- serve --state orders");
    let mut broker = Killed(
        Command::new(BIN)
            .args(["serve", "--state", "orders", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the broker"),
    );
    let first = lines_of(broker.0.stdout.take().unwrap())
        .recv_timeout(WAIT)
        .expect("the broker's address line");
    let addr = first
        .strip_prefix("tidings listening on http://")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("address line: {first}"))
        .to_owned();

    // Terminal 2: the subscriber.
    let tail = commands(&blocks[1]);
    assert_eq!(tail.len(), 1);
    let mut tail_child = Killed(
        Command::new("sh")
            .args(["-c", &localize(&tail[0].0, &addr)])
            .env("TIDINGS_URL", format!("ws://{addr}/websocket"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tail"),
    );
    let tail_out = lines_of(tail_child.0.stdout.take().unwrap());
    let tail_err = lines_of(tail_child.0.stderr.take().unwrap());
    assert_eq!(
        tail_err.recv_timeout(WAIT).expect("tail's stderr"),
        "subscribed to orders"
    );

    // Terminal 3: the matching order; curl prints the answer README shows.
    let publish = commands(&blocks[2]);
    assert_eq!(publish.len(), 1);
    let out = sh(&localize(&publish[0].0, &addr), &addr);
    assert!(out.status.success(), "{:?}", out);
    let shown = publish[0].1.join("\n");
    assert_eq!(
        mask_epoch(String::from_utf8_lossy(&out.stdout).trim_end()),
        mask_epoch(&shown),
        "curl's answer"
    );

    // Terminal 2 prints the event exactly as shown.
    let event = tail_out.recv_timeout(WAIT).expect("tail prints the event");
    assert_eq!(mask_epoch(&event), mask_epoch(&blocks[3].lines.join("\n")));

    // The order that does not match: accepted as offset 2, printed by nobody.
    let other = commands(&blocks[4]);
    assert_eq!(other.len(), 1);
    let out = sh(&localize(&other[0].0, &addr), &addr);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains(r#""offset":2"#), "{answer}");

    // `tidings publish`: each `# terminal 2:` line is the next thing tail prints (so nothing
    // was printed for the order that did not match).
    for (command, comments) in commands(&blocks[5]) {
        let out = sh(&localize(&command, &addr), &addr);
        assert!(out.status.success(), "{command}: {out:?}");
        for comment in comments {
            let expected = comment
                .strip_prefix("terminal 2: ")
                .unwrap_or_else(|| panic!("unexpected comment {comment}"));
            let got = tail_out.recv_timeout(WAIT).expect("tail prints the event");
            assert_eq!(mask_epoch(&got), mask_epoch(expected), "after {command}");
        }
    }
    assert!(tail_out.recv_timeout(Duration::from_millis(300)).is_err());

    // Terminal 4: a late subscriber prints the retained init first.
    let late = commands(&blocks[6]);
    assert_eq!(late.len(), 1);
    let mut late_child = Killed(
        Command::new("sh")
            .args(["-c", &localize(&late[0].0, &addr)])
            .env("TIDINGS_URL", format!("ws://{addr}/websocket"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the late tail"),
    );
    let late_out = lines_of(late_child.0.stdout.take().unwrap());
    let init = late_out
        .recv_timeout(WAIT)
        .expect("the late tail prints its init");
    assert_eq!(mask_epoch(&init), mask_epoch(&blocks[7].lines.join("\n")));
    assert!(late_out.recv_timeout(Duration::from_millis(300)).is_err());
}
