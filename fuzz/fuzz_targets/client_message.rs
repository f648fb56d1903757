//! Client frames: any bytes a WebSocket client can send, through the parser the session
//! uses, and every error back into the frame the client would get.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::protocol::{parse_client, ClientMessage};

fuzz_target!(|data: &[u8]| {
    // The session turns non-UTF-8 frames into a parse error before the parser sees them.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client(text) {
        Ok(ClientMessage::Subscribe(request)) => {
            if let Some(uid) = &request.uid {
                let _ = uid.to_json();
                let _ = uid.as_subscription_str();
            }
        }
        Ok(_) => {}
        Err(error) => {
            let frame = error.to_frame();
            // Every error frame must itself be valid JSON.
            assert!(
                serde_json::from_str::<serde_json::Value>(&frame).is_ok(),
                "{frame}"
            );
        }
    }
});
