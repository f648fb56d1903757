//! The WebSocket endpoint: the upgrade (authentication mode, `?access_token=`, connection
//! limits in total and per client address, socket limits) and, in [`session`], the
//! per-connection loop.

mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;
use crate::auth::{authenticate, Identity};
use crate::config::AuthMode;
use crate::http::{ApiError, ServerErrorReason};

/// Initial read buffer per connection, allocated up front. tungstenite's default (128 KiB)
/// would dominate the memory of an idle connection; client messages are small and the buffer
/// grows on demand for a larger one (up to `--max-frame-bytes`).
const READ_BUFFER: usize = 256;
/// Frames queued for a connection are encoded into tungstenite's write buffer and written
/// through once it holds this much, then flushed once. The buffer keeps its capacity, so this
/// also caps what a connection that once took a burst holds on to (tungstenite's default,
/// 128 KiB, would cost 128 MiB across 1,000 busy connections).
const WRITE_BUFFER: usize = 8 * 1024;

/// Open connections per client address, for `--max-connections-per-ip`. Only addresses with
/// an open connection have an entry, so its size is bounded by `--max-connections`.
#[derive(Debug, Default)]
pub struct PerIpConnections(dashmap::DashMap<IpAddr, usize>);

impl PerIpConnections {
    /// Counts one more connection from `ip` unless it already has `limit`.
    fn try_acquire(&self, ip: IpAddr, limit: usize) -> bool {
        let mut count = self.0.entry(ip).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        if let dashmap::Entry::Occupied(mut entry) = self.0.entry(ip) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    /// Open connections from `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).map_or(0, |c| *c)
    }
}

/// One counted connection against `--max-connections` (and, when set, against
/// `--max-connections-per-ip` for its address); released when dropped (the session owns it
/// for its whole life).
#[derive(Debug)]
pub struct ConnectionSlot {
    state: Arc<AppState>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            self.state.per_ip.release(ip);
        }
    }
}

fn unauthorized(state: &AppState, error: &crate::auth::AuthError) -> Response {
    tracing::debug!(%error, "upgrade refused: bad token");
    state.metrics.auth_rejected(error);
    refused_unauthorized(state)
}

fn refused_unauthorized(state: &AppState) -> Response {
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
        return ApiError::server(
            &state.metrics,
            ServerErrorReason::ShuttingDown,
            "WebSocket upgrade while draining",
        )
        .into_response();
    }
    // A token in the URL authenticates at upgrade in every mode; a bad one is refused here.
    let identity: Option<Identity> = match params.get("access_token") {
        Some(token) => match authenticate(&state.config.tokens, state.config.jwt.as_deref(), token)
        {
            Ok(identity) => Some(identity),
            Err(error) => return unauthorized(&state, &error),
        },
        None if state.config.auth_mode == AuthMode::Strict => return refused_unauthorized(&state),
        None => None,
    };
    // The peer address as the socket sees it: behind a proxy that is the proxy's (forwarding
    // headers are not trusted; see README).
    let ip = peer.ip().to_canonical();
    let per_ip_limit = state.config.max_connections_per_ip;
    if per_ip_limit > 0 && !state.per_ip.try_acquire(ip, per_ip_limit) {
        state
            .metrics
            .connections_refused
            .with_label_values(&["per_ip_limit"])
            .inc();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": {
                "code": "TOO_MANY_CONNECTIONS",
                "message": format!("too many connections from this address (the limit is {per_ip_limit})"),
            }})),
        )
            .into_response();
    }
    let previous = state.connections.fetch_add(1, Ordering::AcqRel);
    let slot = ConnectionSlot {
        state: state.clone(),
        ip: (per_ip_limit > 0).then_some(ip),
    };
    if previous >= state.config.max_connections {
        state
            .metrics
            .connections_refused
            .with_label_values(&["limit"])
            .inc();
        drop(slot);
        return ApiError::server(
            &state.metrics,
            ServerErrorReason::ConnectionLimit,
            format!(
                "connection limit reached ({} connections)",
                state.config.max_connections
            ),
        )
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
                session::Session::new(session_state, identity, peer, slot).run(socket),
            )
        })
}
