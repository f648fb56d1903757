//! What a WebSocket server may put on the wire, checked byte by byte. Shared by the
//! `ws_session` fuzz target and the seed-corpus test in `src/ws/raw.rs`.
#![allow(dead_code)]

/// One frame the server sent.
#[derive(Debug, PartialEq)]
pub enum ServerFrame {
    /// A text frame: a JSON object with a string `type`.
    Text(String),
    /// A close frame: its code, if it has one.
    Close(Option<u16>),
    /// A ping or pong control frame.
    Control,
}

/// Splits the server's bytes into frames and checks each: final, no extension bits, not
/// masked, no binary data, text that is a JSON object with a `type`, a close code that is
/// allowed on the wire, nothing after the close, no truncated frame at the end.
pub fn check_server_bytes(mut bytes: &[u8]) -> Result<Vec<ServerFrame>, String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        if matches!(frames.last(), Some(ServerFrame::Close(_))) {
            return Err(format!("{} bytes after the close frame", bytes.len()));
        }
        if bytes.len() < 2 {
            return Err("truncated frame header".into());
        }
        let (b0, b1) = (bytes[0], bytes[1]);
        if b0 & 0x80 == 0 || b0 & 0x70 != 0 {
            return Err(format!("fragmented or extension bits set: {b0:#04x}"));
        }
        if b1 & 0x80 != 0 {
            return Err("server frame is masked".into());
        }
        let (len, header) = match b1 & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return Err("truncated length".into()),
            n => (n as usize, 2),
        };
        if bytes.len() < header + len {
            return Err("truncated payload".into());
        }
        let payload = &bytes[header..header + len];
        bytes = &bytes[header + len..];
        frames.push(match b0 & 0x0f {
            0x1 => {
                let text = std::str::from_utf8(payload).map_err(|e| format!("text frame: {e}"))?;
                let value: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("{text}: {e}"))?;
                if !value.get("type").is_some_and(serde_json::Value::is_string) {
                    return Err(format!("no string type: {text}"));
                }
                ServerFrame::Text(text.to_string())
            }
            0x8 => match payload.len() {
                0 => ServerFrame::Close(None),
                1 => return Err("close payload of one byte".into()),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    // RFC 6455 §7.4 plus the registered 1012 and 1013, which a client may
                    // close with and gets echoed (tungstenite answers any other code with 1002).
                    let allowed = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
                    if !allowed {
                        return Err(format!("close code {code} is not allowed on the wire"));
                    }
                    std::str::from_utf8(&payload[2..]).map_err(|e| format!("close reason: {e}"))?;
                    ServerFrame::Close(Some(code))
                }
            },
            0x9 | 0xa => ServerFrame::Control,
            op => return Err(format!("unexpected opcode {op:#x}")),
        });
    }
    Ok(frames)
}

/// The first input byte picks the broker's auth mode (even: `public`, odd: `handshake`); the
/// rest is what the client puts on the wire after the upgrade.
pub fn split_input(data: &[u8]) -> Option<(bool, &[u8])> {
    let (&mode, frames) = data.split_first()?;
    Some((mode % 2 == 1, frames))
}

/// Runs `serve` over one end of an in-memory pipe, writes `input` into the other end, then
/// ends it, and returns everything the server wrote until it let go of its end.
pub async fn exchange<F, Fut>(input: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async move {
        // The server may close before reading everything: a broken pipe is part of the game.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let ((), (), out) = tokio::join!(serve(server), write, read);
    out
}
