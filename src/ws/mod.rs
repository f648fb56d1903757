//! The WebSocket endpoint: the upgrade (authentication mode, `?access_token=`, connection
//! limits in total and per client address, socket limits), [`WsState`] (everything the edge
//! may reach), and, in `session`, the per-connection loop.

pub mod limits;
mod rate_limit;
mod raw;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, Identity};
use crate::config::{AuthMode, Config};
use crate::http::{ApiError, ServerErrorReason};
use crate::hub::Subscriptions;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use limits::{ConnectionLimits, Refused};

pub use raw::serve_raw;
pub use session::{drive, Socket};

/// Initial read buffer per connection, allocated up front. tungstenite's default (128 KiB)
/// would dominate the memory of an idle connection; client messages are small and the buffer
/// grows on demand for a larger one (up to `--max-frame-bytes`).
const READ_BUFFER: usize = 256;
/// Frames queued for a connection are encoded into tungstenite's write buffer and written
/// through once it holds this much, then flushed once. The buffer keeps its capacity, so this
/// also caps what a connection that once took a burst holds on to (tungstenite's default,
/// 128 KiB, would cost 128 MiB across 1,000 busy connections).
const WRITE_BUFFER: usize = 8 * 1024;

/// What the WebSocket edge holds: built by [`crate::app`], shared by the upgrade handler
/// and every session. It is all a session can reach.
#[derive(Debug)]
pub struct WsState {
    /// The session settings (timeouts, limits, auth mode, key fields).
    pub config: Arc<Config>,
    /// Connection, delivery and protocol-error metrics.
    pub metrics: Arc<Metrics>,
    /// Turns access tokens into identities.
    pub auth: Arc<Authenticator>,
    /// The door to the subscription core.
    pub subscriptions: Subscriptions,
    /// `--max-connections` and `--max-connections-per-ip`.
    pub limits: Arc<ConnectionLimits>,
    /// Closed when shutdown begins: upgrades are refused from then on.
    pub readiness: Readiness,
    /// Cancelled when shutdown begins; every session watches it and closes with 1001.
    pub shutdown: CancellationToken,
    /// Upgraded sessions, which axum's graceful shutdown does not track.
    pub sessions: TaskTracker,
}

/// The WebSocket route at `path`.
pub fn routes(path: &str, state: Arc<WsState>) -> Router {
    Router::new()
        .route(path, get(upgrade_handler))
        .with_state(state)
}

fn unauthorized(state: &WsState, error: &crate::auth::AuthError) -> Response {
    tracing::debug!(%error, "upgrade refused: bad token");
    state.metrics.auth_rejected(error);
    refused_unauthorized(state)
}

fn refused_unauthorized(state: &WsState) -> Response {
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
    State(state): State<Arc<WsState>>,
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
    // Still accepted during the shutdown delay: a client the load balancer sends here before
    // it notices readiness is off is served, then moved with a resume position like the rest.
    if state.shutdown.is_cancelled() {
        return ApiError::server(
            &state.metrics,
            ServerErrorReason::ShuttingDown,
            "WebSocket upgrade after the shutdown delay",
        )
        .into_response();
    }
    // A token in the URL authenticates at upgrade in every mode; a bad one is refused here.
    let identity: Option<Identity> = match params.get("access_token") {
        Some(token) => match state.auth.authenticate(token).await {
            Ok(identity) => Some(identity),
            Err(error) => return unauthorized(&state, &error),
        },
        None if state.config.auth_mode == AuthMode::Strict => return refused_unauthorized(&state),
        None => None,
    };
    // The peer address as the socket sees it: behind a proxy that is the proxy's (forwarding
    // headers are not trusted; see README).
    let ip = peer.ip().to_canonical();
    let slot = match state.limits.acquire(ip) {
        Ok(slot) => slot,
        Err(Refused::PerIp(limit)) => {
            state
                .metrics
                .connections_refused
                .with_label_values(&["per_ip_limit"])
                .inc();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {
                    "code": "TOO_MANY_CONNECTIONS",
                    "message": format!("too many connections from this address (the limit is {limit})"),
                }})),
            )
                .into_response();
        }
        Err(Refused::Total(limit)) => {
            state
                .metrics
                .connections_refused
                .with_label_values(&["limit"])
                .inc();
            return ApiError::server(
                &state.metrics,
                ServerErrorReason::ConnectionLimit,
                format!("connection limit reached ({limit} connections)"),
            )
            .into_response();
        }
    };
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
