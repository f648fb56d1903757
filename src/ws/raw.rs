//! The session over any byte stream that already carries WebSocket frames (the HTTP upgrade
//! done): tokio-tungstenite in the server role, with the same socket limits as the upgrade,
//! bridged to the axum message types the session speaks. Production goes through axum's
//! upgrade; this is the way in for the fuzz target over raw frames and for tests that feed
//! exact bytes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::{self as ts, Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::{session, WsState, READ_BUFFER, WRITE_BUFFER};

/// A tungstenite stream seen through axum's message types.
struct RawSocket<T>(WebSocketStream<T>);

fn from_tungstenite(message: ts::Message) -> Option<Message> {
    Some(match message {
        ts::Message::Text(text) => Message::Text(Utf8Bytes::from(text.as_str())),
        ts::Message::Binary(bytes) => Message::Binary(bytes),
        ts::Message::Ping(bytes) => Message::Ping(bytes),
        ts::Message::Pong(bytes) => Message::Pong(bytes),
        ts::Message::Close(frame) => Message::Close(frame.map(|f| CloseFrame {
            code: f.code.into(),
            reason: Utf8Bytes::from(f.reason.as_str()),
        })),
        ts::Message::Frame(_) => return None,
    })
}

fn to_tungstenite(message: Message) -> ts::Message {
    match message {
        Message::Text(text) => ts::Message::text(text.as_str()),
        Message::Binary(bytes) => ts::Message::Binary(bytes),
        Message::Ping(bytes) => ts::Message::Ping(bytes),
        Message::Pong(bytes) => ts::Message::Pong(bytes),
        Message::Close(frame) => ts::Message::Close(frame.map(|f| ts::CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for RawSocket<T> {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(Pin::new(&mut self.0).poll_next(cx)) {
                Some(Ok(message)) => {
                    if let Some(message) = from_tungstenite(message) {
                        return Poll::Ready(Some(Ok(message)));
                    }
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(axum::Error::new(error)))),
                None => return Poll::Ready(None),
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Sink<Message> for RawSocket<T> {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_ready(cx)
            .map_err(axum::Error::new)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.0)
            .start_send(to_tungstenite(item))
            .map_err(axum::Error::new)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_flush(cx)
            .map_err(axum::Error::new)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_close(cx)
            .map_err(axum::Error::new)
    }
}

/// Runs one session over `io`, which carries the frames of an upgraded WebSocket, as if
/// `peer` had connected without an `?access_token=`. Returns at once (without a session)
/// when the connection limits refuse `peer`.
pub async fn serve_raw<T>(state: Arc<WsState>, io: T, peer: SocketAddr)
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Ok(slot) = state.limits.acquire(peer.ip()) else {
        return;
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(state.config.max_frame_bytes))
        .max_frame_size(Some(state.config.max_frame_bytes));
    let socket = RawSocket(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await);
    session::drive(state, None, peer, slot, socket).await
}

#[cfg(test)]
#[path = "../../fuzz/ws_oracle.rs"]
mod oracle;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::oracle::{check_server_bytes, exchange, split_input, ServerFrame};
    use super::serve_raw;
    use crate::app::App;
    use crate::auth::{Permissions, TokenStore};
    use crate::config::{AuthMode, Config};

    fn app(handshake: bool) -> App {
        App::new(Config {
            auth_mode: if handshake {
                AuthMode::Handshake
            } else {
                AuthMode::Public
            },
            tokens: TokenStore::from_json(
                r#"{"admin-static-token":{"sub":"admin","collections":{"*":{}}}}"#,
            )
            .unwrap(),
            public_permissions: Permissions::collections(["messages"]),
            ..Config::default()
        })
        .unwrap()
    }

    async fn run(data: &[u8]) -> Vec<ServerFrame> {
        let (handshake, input) = split_input(data).expect("a mode byte");
        let app = app(handshake);
        let state = app.ws_state().clone();
        let peer = "127.0.0.1:9".parse().unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(3600),
            exchange(input, |io| serve_raw(state, io, peer)),
        )
        .await
        .expect("the session ends once its input does");
        assert_eq!(app.registry().counts("messages"), (0, 0), "left behind");
        check_server_bytes(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    /// Every seed of the `ws_session` fuzz target passes the wire checks, and the ones with
    /// a known outcome end that way.
    #[tokio::test(start_paused = true)]
    async fn the_fuzz_seeds_end_as_expected() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ws_session");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("seed corpus") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let frames = run(&std::fs::read(&path).unwrap()).await;
            let last = frames.last();
            let expected = match name.as_str() {
                "invalid-utf8-text" | "invalid-utf8-fragmented" => Some(Some(1007)),
                "over-frame-limit" => Some(Some(1009)),
                "client-close-1000" => Some(Some(1000)),
                // Found by the fuzzer: a registered code the oracle first refused.
                "client-close-1013-found-by-fuzzing" => Some(Some(1013)),
                // tungstenite answers a code not allowed on the wire with 1002.
                "client-close-invalid-code" => Some(Some(1002)),
                "handshake-subscribe-first" | "handshake-bad-token" | "reauth-failed" => Some(None),
                _ => None,
            };
            if let Some(code) = expected {
                assert_eq!(last, Some(&ServerFrame::Close(code)), "{name}: {frames:?}");
            }
            seen += 1;
        }
        assert!(seen >= 20, "{seen} seeds");
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_over_raw_frames_gets_its_init() {
        let seed = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus/ws_session/handshake-auth-subscribe"),
        )
        .unwrap();
        let frames = run(&seed).await;
        let texts: Vec<_> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(texts[0], r#"{"type":"auth","status":"ok"}"#);
        assert!(
            texts[1].starts_with(r#"{"type":"subscription","event":"init","#),
            "{texts:?}"
        );
        // The seed's `items` request has no `action`: a validation error of type `items`.
        assert!(
            texts[2].starts_with(
                r#"{"type":"items","status":"error","error":{"code":"INVALID_PAYLOAD""#
            ),
            "{texts:?}"
        );
    }
}
