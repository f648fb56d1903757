//! Raw WebSocket bytes (what a client puts on the wire after the upgrade) into a real
//! session of a real broker (memory engine), through tungstenite's frame parser in the
//! server role with the broker's socket limits. Whatever the input, the session must end
//! once its input does, leave no subscription behind, and write only well-formed server
//! frames: text that is a JSON message, a close code allowed on the wire, nothing after the
//! close (see `../ws_oracle.rs`).
#![no_main]

#[path = "../ws_oracle.rs"]
mod oracle;

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tidings::app::App;
use tidings::auth::{Permissions, TokenStore};
use tidings::config::{AuthMode, Config};

fn app(handshake: bool) -> &'static App {
    static APPS: OnceLock<[App; 2]> = OnceLock::new();
    let apps = APPS.get_or_init(|| {
        [AuthMode::Public, AuthMode::Handshake].map(|auth_mode| {
            App::new(Config {
                auth_mode,
                tokens: TokenStore::from_json(
                    r#"{"admin-static-token":{"sub":"admin","collections":{"*":{}}}}"#,
                )
                .expect("tokens"),
                public_permissions: Permissions::collections(["messages"]),
                ..Config::default()
            })
            .expect("config")
        })
    });
    &apps[usize::from(handshake)]
}

fuzz_target!(|data: &[u8]| {
    let Some((handshake, input)) = oracle::split_input(data) else {
        return;
    };
    let app = app(handshake);
    // A paused clock: the session's timers (handshake window, write timeouts, the resume
    // wait) pass as soon as nothing else can run, so an input is never slow because of them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let state = app.ws_state().clone();
    let peer = "127.0.0.1:9".parse().expect("addr");
    let out = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(24 * 3600),
            oracle::exchange(input, |io| tidings::ws::serve_raw(state, io, peer)),
        )
        .await
        .expect("the session must end once its input does")
    });
    if let Err(error) = oracle::check_server_bytes(&out) {
        panic!("{error}: {out:?}");
    }
    assert_eq!(
        app.registry().counts("messages"),
        (0, 0),
        "subscription left behind"
    );
});
