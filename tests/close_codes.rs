//! Every way the server ends a WebSocket session, against a real broker: the input that
//! triggers it, the close frame the client sees (its code, or a close frame without one, as
//! Directus sends for auth and heartbeat failures), and the `reason` it is counted under in
//! `tidings_connections_closed_total`. The table in `protocol/README.md` §8 lists the same
//! rows.
//!
//! `1008` (policy violation) and `1011` (internal error) are not in the table: Tidings never
//! sends them (refusals are protocol error frames; no internal failure ends a session).

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{start, TestServer, WAIT};
use tidings::auth::{JwtSettings, TokenStore};
use tidings::config::AuthMode;
use tidings::Config;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How a session ended, as the client saw it.
#[derive(Debug, PartialEq)]
enum End {
    /// A close frame with this code.
    Code(u16),
    /// A close frame without a status code (the client API reports 1005).
    NoCode,
    /// The TCP connection ended without a close frame (the client API reports 1006).
    Dropped,
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// The client closes with 1000: the server answers with the same code.
    ClientCloses,
    /// The broker shuts down.
    Shutdown,
    /// A text frame whose payload is not UTF-8.
    InvalidUtf8,
    /// A message over `--max-frame-bytes`.
    TooBig,
    /// A client that does not read while events pile up past `--outbox-messages`.
    SlowConsumer,
    /// Handshake mode: a first message that is not `auth`.
    HandshakeNotAuth,
    /// Handshake mode: no message within `--auth-timeout`.
    HandshakeTimeout,
    /// A failed re-auth outside public mode.
    ReauthFailed,
    /// The JWT expires and no new `auth` comes within `--auth-timeout`.
    AuthTimeout,
    /// No message for a heartbeat period after the server's ping.
    HeartbeatTimeout,
}

struct Case {
    trigger: Trigger,
    end: End,
    reason: &'static str,
    /// The last text frame before the close, if the server sends one.
    last_frame: Option<&'static str>,
}

const AUTH_FAILED_HANDSHAKE: &str = r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication handshake failed."}}"#;

fn cases() -> Vec<Case> {
    use Trigger::*;
    vec![
        Case {
            trigger: ClientCloses,
            end: End::Code(1000),
            reason: "client",
            last_frame: None,
        },
        Case {
            trigger: Shutdown,
            end: End::Code(1001),
            reason: "shutdown",
            last_frame: None,
        },
        Case {
            trigger: InvalidUtf8,
            end: End::Code(1007),
            reason: "invalid_payload",
            last_frame: None,
        },
        Case {
            trigger: TooBig,
            end: End::Code(1009),
            reason: "frame_too_big",
            last_frame: None,
        },
        Case {
            trigger: SlowConsumer,
            end: End::Code(4008),
            reason: "slow_consumer",
            last_frame: None,
        },
        Case {
            trigger: HandshakeNotAuth,
            end: End::NoCode,
            reason: "auth_failed",
            last_frame: Some(AUTH_FAILED_HANDSHAKE),
        },
        Case {
            trigger: HandshakeTimeout,
            end: End::NoCode,
            reason: "auth_failed",
            last_frame: Some(AUTH_FAILED_HANDSHAKE),
        },
        Case {
            trigger: ReauthFailed,
            end: End::NoCode,
            reason: "auth_failed",
            last_frame: Some(
                r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."}}"#,
            ),
        },
        Case {
            trigger: AuthTimeout,
            end: End::NoCode,
            reason: "auth_timeout",
            last_frame: Some(
                r#"{"type":"auth","status":"error","error":{"code":"AUTH_TIMEOUT","message":"Authentication timed out."}}"#,
            ),
        },
        Case {
            trigger: HeartbeatTimeout,
            end: End::NoCode,
            reason: "heartbeat_timeout",
            last_frame: None,
        },
    ]
}

fn config(trigger: Trigger) -> Config {
    let mut config = Config {
        auth_mode: AuthMode::Handshake,
        tokens: TokenStore::from_json(
            r#"{"admin-static-token":{"sub":"admin","collections":{"*":{}}}}"#,
        )
        .expect("tokens"),
        jwt: Some(Arc::new(
            JwtSettings {
                secret: Some(jwt::SECRET.into()),
                ..JwtSettings::default()
            }
            .build()
            .expect("jwt settings")
            .expect("a key"),
        )),
        heartbeat_period: None,
        ..Config::default()
    };
    match trigger {
        Trigger::TooBig => config.max_frame_bytes = 1024,
        Trigger::SlowConsumer => {
            config.outbox_messages = 4;
            config.write_timeout = Duration::from_millis(500);
        }
        Trigger::HandshakeTimeout | Trigger::AuthTimeout => {
            config.auth_timeout = Duration::from_millis(300)
        }
        Trigger::HeartbeatTimeout => config.heartbeat_period = Some(Duration::from_millis(300)),
        _ => {}
    }
    config
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

async fn authenticate(ws: &mut Ws, token: &str) {
    send(
        ws,
        &json!({"type": "auth", "access_token": token}).to_string(),
    )
    .await;
    match next(ws).await {
        Some(Message::Text(t)) => assert_eq!(t.as_str(), r#"{"type":"auth","status":"ok"}"#),
        other => panic!("expected auth ok, got {other:?}"),
    }
}

async fn next(ws: &mut Ws) -> Option<Message> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

/// Reads to the end: the last text frame before it, and how it ended.
async fn read_to_end(ws: &mut Ws) -> (Option<String>, End) {
    let mut last = None;
    loop {
        match next(ws).await {
            Some(Message::Text(t)) => last = Some(t.to_string()),
            Some(Message::Close(Some(frame))) => return (last, End::Code(frame.code.into())),
            Some(Message::Close(None)) => return (last, End::NoCode),
            Some(other) => panic!("unexpected {other:?}"),
            None => return (last, End::Dropped),
        }
    }
}

async fn run(server: &mut TestServer, trigger: Trigger) -> (Option<String>, End) {
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
        .await
        .expect("handshake");
    match trigger {
        Trigger::HandshakeNotAuth => {
            send(&mut ws, r#"{"type":"subscribe","collection":"orders"}"#).await;
        }
        Trigger::HandshakeTimeout => {}
        Trigger::ReauthFailed => {
            authenticate(&mut ws, "admin-static-token").await;
            send(&mut ws, r#"{"type":"auth","access_token":"not-a-token"}"#).await;
        }
        Trigger::AuthTimeout => {
            let token =
                jwt::hs256(&json!({"sub": "a", "exp": jwt::now() + 2, "tidings": {"*": {}}}));
            authenticate(&mut ws, &token).await;
            match next(&mut ws).await {
                Some(Message::Text(t)) => assert!(t.contains("TOKEN_EXPIRED"), "{t}"),
                other => panic!("expected TOKEN_EXPIRED, got {other:?}"),
            }
        }
        _ => authenticate(&mut ws, "admin-static-token").await,
    }
    match trigger {
        Trigger::ClientCloses => {
            ws.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await
            .expect("close");
        }
        Trigger::Shutdown => drop(server.begin_shutdown()),
        Trigger::InvalidUtf8 => {
            let frame =
                Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
            ws.send(Message::Frame(frame))
                .await
                .expect("send raw frame");
        }
        Trigger::TooBig => send(&mut ws, &"x".repeat(4096)).await,
        Trigger::SlowConsumer => {
            send(&mut ws, r#"{"type":"subscribe","collection":"orders"}"#).await;
            match next(&mut ws).await {
                Some(Message::Text(t)) => assert!(t.contains(r#""event":"init""#), "{t}"),
                other => panic!("expected init, got {other:?}"),
            }
            // The client stops reading; the hub queues faster than the session can write.
            let blob = "y".repeat(2000);
            let mut id = 0;
            while server.metric("tidings_slow_consumer_closes_total").await != Some(1.0) {
                let batch: Vec<_> = (0..100)
                    .map(|_| {
                        id += 1;
                        json!({"collection": "orders", "event": "create", "data": {"id": id, "blob": blob}})
                    })
                    .collect();
                server.publish(json!(batch)).await;
                assert!(id < 100_000, "never closed as a slow consumer");
            }
        }
        Trigger::HeartbeatTimeout => {
            // Stay silent: the ping goes unanswered for a whole period.
        }
        _ => {}
    }
    read_to_end(&mut ws).await
}

#[tokio::test]
async fn every_close_code_with_its_trigger() {
    for case in cases() {
        let mut server = start(config(case.trigger)).await;
        let (last, end) = run(&mut server, case.trigger).await;
        let trigger = case.trigger;
        assert_eq!(end, case.end, "{trigger:?}");
        if let Some(expected) = case.last_frame {
            assert_eq!(last.as_deref(), Some(expected), "{trigger:?}");
        }
        if let Trigger::ClientCloses | Trigger::InvalidUtf8 | Trigger::TooBig = trigger {
            assert_eq!(last, None, "{trigger:?}: no frame before the close");
        }
        if !matches!(trigger, Trigger::Shutdown) {
            server
                .wait_for_metric(
                    &format!(
                        "tidings_connections_closed_total{{reason=\"{}\"}}",
                        case.reason
                    ),
                    1.0,
                )
                .await;
            server.shutdown().await;
        }
    }
}

/// After a 1007 the broker goes on serving: the next connection works.
#[tokio::test]
async fn invalid_utf8_closes_only_that_connection() {
    let server = start(config(Trigger::InvalidUtf8)).await;
    let mut other = server.ws().await;
    other
        .exchange(
            r#"{"type":"auth","access_token":"admin-static-token"}"#,
            r#"{"type":"auth","status":"ok"}"#,
        )
        .await;
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
        .await
        .expect("handshake");
    // Invalid in the middle of an otherwise valid message, split over two fragments.
    let first = Frame::message(b"{\"type\":\"pi".to_vec(), OpCode::Data(Data::Text), false);
    let second = Frame::message(
        vec![0xc3, 0x28, b'"', b'}'],
        OpCode::Data(Data::Continue),
        true,
    );
    ws.send(Message::Frame(first)).await.expect("send");
    ws.send(Message::Frame(second)).await.expect("send");
    assert_eq!(read_to_end(&mut ws).await.1, End::Code(1007));
    other
        .exchange(
            r#"{"type":"subscribe","collection":"orders"}"#,
            r#"{"type":"subscription","event":"init","data":[]}"#,
        )
        .await;
    server.shutdown().await;
}
