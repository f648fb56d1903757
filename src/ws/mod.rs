//! The WebSocket endpoint: the upgrade (authentication mode, `?access_token=`, connection
//! limit, socket limits) and, in [`session`], the per-connection loop.

mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;
use crate::auth::Principal;
use crate::config::AuthMode;
use crate::http::ApiError;

/// Initial read buffer per connection, allocated up front. tungstenite's default (128 KiB)
/// would dominate the memory of an idle connection; client messages are small and the buffer
/// grows on demand for a larger one (up to `--max-frame-bytes`).
const READ_BUFFER: usize = 512;
/// Frames queued for a connection are encoded into tungstenite's write buffer and written
/// through once it holds this much, then flushed once. The buffer keeps its capacity, so this
/// also caps what a connection that once took a burst holds on to (tungstenite's default,
/// 128 KiB, would cost 128 MiB across 1,000 busy connections).
const WRITE_BUFFER: usize = 8 * 1024;

/// Releases a connection slot when the session (or a refused upgrade) ends.
/// One counted connection against `--max-connections`; released when dropped (the session
/// owns it for its whole life).
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AppState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn unauthorized(state: &AppState) -> Response {
    state
        .metrics
        .connections_refused
        .with_label_values(&["unauthorized"])
        .inc();
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": {"code": "UNAUTHORIZED", "message": "Unauthorized"}})),
    )
        .into_response()
}

/// `GET <ws-path>`: upgrades to a session.
pub async fn upgrade_handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade =
        match upgrade {
            Ok(u) => u,
            Err(rejection) => return (
                rejection.status(),
                Json(
                    json!({"error": {"code": "INVALID_UPGRADE", "message": rejection.body_text()}}),
                ),
            )
                .into_response(),
        };
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::Unavailable("the broker is shutting down".into()).into_response();
    }
    // A token in the URL authenticates at upgrade in every mode; a bad one is refused here.
    let principal: Option<Arc<Principal>> = match params.get("access_token") {
        Some(token) => match state.config.tokens.get(token) {
            Some(p) => Some(p),
            None => return unauthorized(&state),
        },
        None if state.config.auth_mode == AuthMode::Strict => return unauthorized(&state),
        None => None,
    };
    let previous = state.connections.fetch_add(1, Ordering::AcqRel);
    let slot = ConnectionSlot(state.clone());
    if previous >= state.config.max_connections {
        state
            .metrics
            .connections_refused
            .with_label_values(&["limit"])
            .inc();
        drop(slot);
        return ApiError::Unavailable(format!(
            "connection limit reached ({} connections)",
            state.config.max_connections
        ))
        .into_response();
    }
    let config = &state.config;
    let tracker = state.sessions.clone();
    let session_state = state.clone();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(config.max_frame_bytes)
        .max_frame_size(config.max_frame_bytes)
        .on_upgrade(move |socket| {
            // The session future is handed over as is: wrapping it in another async block
            // would store it twice in the task (once captured, once awaited), doubling the
            // memory of every idle connection.
            tracker.track_future(
                session::Session::new(session_state, principal, peer, slot).run(socket),
            )
        })
}
