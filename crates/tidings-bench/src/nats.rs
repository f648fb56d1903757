//! NATS as the system under test (`--nats-ws`), for comparing Tidings with a `nats-server`
//! whose WebSocket listener is enabled: the same subscribers, items and checks, over NATS.
//!
//! - Subscribers connect to the WebSocket listener (`ws://host:port`), send `CONNECT`, `SUB`
//!   and `PING`, and are ready at the `PONG`. `broadcast` and `latency` subscribe to
//!   `<collection>.*`; `filtered` subscriber `i` to `<collection>.<i % K>`, so the server
//!   does the filtering by subject, as Tidings does by `tenant_id`.
//! - Every `MSG` payload is one item, the same JSON the Tidings publisher sends, checked by
//!   the same receiver ([`crate::subscriber::Receiver`]): `frames` then counts messages.
//! - The publisher speaks the plain TCP protocol (`--nats-publish`, `host:port`), pipelining:
//!   one "request" is `--batch` `PUB`s to `<collection>.<seq % K>` and a `PING`, written at
//!   once; at most `--in-flight` of them wait for their `PONG`. A request counts as
//!   published at its `PONG` (the server has then processed every `PUB` before it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use memchr::memmem;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use super::publisher::{pace, PublishOutcome, PublishPlan};
use super::subscriber::{open_ws, Target, Ws};
use super::{BenchError, Clock};

/// What the client says about itself: no `+OK` per command, no echo of its own messages.
const CONNECT: &str = r#"CONNECT {"verbose":false,"pedantic":false,"echo":false,"protocol":1,"lang":"rust","version":"tidings-bench"}"#;

/// How long the last requests may wait for their `PONG` before they count as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The subject subscriber `index` subscribes to (`groups` > 1: one group's).
pub fn subscriber_subject(collection: &str, groups: u64, index: usize) -> String {
    if groups > 1 {
        format!("{collection}.{}", index as u64 % groups)
    } else {
        format!("{collection}.*")
    }
}

/// Connects subscriber `index` to the WebSocket listener, subscribes to `subject` and waits
/// until the server has processed the subscription (the `PONG` to the `PING` after it).
pub async fn connect(target: &Target, index: usize, subject: &str) -> Result<Ws, String> {
    let mut ws = open_ws(target, index).await?;
    let hello = format!("{CONNECT}\r\nSUB {subject} 1\r\nPING\r\n");
    ws.send(Message::binary(hello.into_bytes()))
        .await
        .map_err(|e| format!("cannot send CONNECT/SUB: {e}"))?;
    let mut seen = Vec::new();
    loop {
        let data = match ws.next().await {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec().into(),
            Some(Ok(Message::Close(_))) | None => {
                return Err("the NATS server closed the connection before PONG".into())
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("waiting for PONG: {e}")),
        };
        seen.extend_from_slice(&data);
        if let Some(at) = memmem::find(&seen, b"-ERR") {
            let line = seen[at..].split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(format!(
                "the NATS server refused: {}",
                String::from_utf8_lossy(line)
            ));
        }
        if memmem::find(&seen, b"PONG\r\n").is_some() {
            return Ok(ws);
        }
    }
}

/// Splits NATS protocol bytes into messages; keeps an incomplete tail for the next frame.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

/// One complete protocol message.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// A `MSG`'s payload.
    Msg(&'a [u8]),
    /// The server's `PING` (answer `PONG`).
    Ping,
    /// `-ERR …`.
    Err,
    /// Anything else (`INFO`, `PONG`, `+OK`).
    Other,
}

impl Parser {
    /// Adds `data` and calls `on` for every complete message in order.
    pub fn feed(&mut self, data: &[u8], mut on: impl FnMut(Op<'_>)) {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        while let Some(eol) = memmem::find(&self.buf[pos..], b"\r\n") {
            let rest = &self.buf[pos..];
            let line = &rest[..eol];
            if let Some(args) = line.strip_prefix(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let len = args
                    .rsplit(|&b| b == b' ')
                    .next()
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| n.parse::<usize>().ok());
                let Some(len) = len else {
                    on(Op::Err);
                    pos += eol + 2;
                    continue;
                };
                let end = eol + 2 + len + 2;
                if rest.len() < end {
                    break;
                }
                on(Op::Msg(&rest[eol + 2..eol + 2 + len]));
                pos += end;
            } else {
                on(match line {
                    b"PING" => Op::Ping,
                    l if l.starts_with(b"-ERR") => Op::Err,
                    _ => Op::Other,
                });
                pos += eol + 2;
            }
        }
        self.buf.drain(..pos);
    }
}

/// Runs the publishing plan against the server's TCP listener at `addr`.
pub async fn publish(
    plan: PublishPlan,
    addr: &str,
    collection: &str,
    clock: Clock,
) -> Result<PublishOutcome, BenchError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::Connect(format!("cannot connect to NATS at {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line)
        .await
        .map_err(|e| BenchError::Connect(format!("no INFO from NATS at {addr}: {e}")))?;
    write
        .write_all(format!("{CONNECT}\r\n").as_bytes())
        .await
        .map_err(|e| BenchError::Connect(format!("cannot send CONNECT to NATS: {e}")))?;

    let groups = plan.groups.max(1);
    let slots = Arc::new(Semaphore::new(plan.in_flight.max(1)));
    // Requests written and not yet answered by their PONG, oldest first.
    let pending: Arc<Mutex<VecDeque<(u64, u64)>>> = Arc::default();
    let tally = Arc::new(Mutex::new(PublishOutcome {
        published: 0,
        per_group: vec![0; usize::try_from(groups).unwrap_or(1)],
        requests: 0,
        errors: 0,
        first_error: None,
        started: Instant::now(),
        finished: Instant::now(),
    }));
    let reader = {
        let (slots, pending, tally) = (slots.clone(), pending.clone(), tally.clone());
        tokio::spawn(async move {
            let mut line = String::new();
            loop {
                line.clear();
                match read.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line.starts_with("PONG") {
                    let Some((first, count)) = pending.lock().pop_front() else {
                        continue;
                    };
                    let mut tally = tally.lock();
                    tally.requests += 1;
                    tally.published += count;
                    for seq in first..first + count {
                        if let Some(n) = tally.per_group.get_mut((seq % groups) as usize) {
                            *n += 1;
                        }
                    }
                    drop(tally);
                    slots.add_permits(1);
                } else if line.starts_with("-ERR") {
                    let mut tally = tally.lock();
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(line.trim().to_string());
                    }
                }
            }
        })
    };

    let mut buf = Vec::new();
    let mut item = String::new();
    let started = pace(&plan, async |first, count| {
        slots
            .acquire()
            .await
            .map_err(|_| BenchError::Internal("the publish slots were closed".into()))?
            .forget();
        let ts = clock.now_ns();
        buf.clear();
        for seq in first..first + count {
            item.clear();
            plan.shape.write_item(&mut item, seq, ts);
            let subject = format!("{collection}.{}", seq % groups);
            buf.extend_from_slice(format!("PUB {subject} {}\r\n", item.len()).as_bytes());
            buf.extend_from_slice(item.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        buf.extend_from_slice(b"PING\r\n");
        pending.lock().push_back((first, count));
        write
            .write_all(&buf)
            .await
            .map_err(|e| BenchError::Connect(format!("writing to NATS: {e}")))
    })
    .await?;
    // Every request is answered once all the slots are back.
    let all = u32::try_from(plan.in_flight.max(1)).unwrap_or(u32::MAX);
    let answered = tokio::time::timeout(ANSWER_TIMEOUT, slots.acquire_many(all)).await;
    let finished = Instant::now();
    reader.abort();
    let mut outcome = tally.lock().clone();
    if answered.is_err() {
        let unanswered = pending.lock().len() as u64;
        outcome.errors += unanswered;
        outcome.requests += unanswered;
        outcome.first_error.get_or_insert_with(|| {
            format!("{unanswered} PINGs unanswered after {ANSWER_TIMEOUT:?}")
        });
    }
    outcome.started = started;
    outcome.finished = finished;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(parser: &mut Parser, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        parser.feed(data, |op| {
            out.push(match op {
                Op::Msg(p) => format!("msg {}", String::from_utf8_lossy(p)),
                Op::Ping => "ping".into(),
                Op::Err => "err".into(),
                Op::Other => "other".into(),
            })
        });
        out
    }

    #[test]
    fn parses_messages_split_across_frames() {
        let mut p = Parser::default();
        assert_eq!(ops(&mut p, b"INFO {}\r\nMSG a.1 1 5\r\nhel"), ["other"]);
        assert_eq!(
            ops(&mut p, b"lo\r\nPING\r\nMSG a.2 1 r 2\r\nab\r\nMSG a.3 1 "),
            ["msg hello", "ping", "msg ab"]
        );
        assert_eq!(ops(&mut p, b"1\r\nx\r\n-ERR 'x'\r\n"), ["msg x", "err"]);
        assert!(p.buf.is_empty());
    }

    #[test]
    fn subjects_per_group() {
        assert_eq!(subscriber_subject("bench", 1, 7), "bench.*");
        assert_eq!(subscriber_subject("bench", 10, 17), "bench.7");
    }
}
