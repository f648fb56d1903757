//! The HTTP surface beside the WebSocket:
//!
//! - `POST /v1/publish`: one event or an array of events.
//! - `POST /v1/collections/{collection}/{event}`: the item(s) (or keys) as the body.
//! - `POST /v1/cloudevents`: CloudEvents 1.0 in any HTTP content mode; `OPTIONS` answers the
//!   webhook handshake.
//! - `POST /v1/debezium`: Debezium change events (JSON, with or without schema, or as
//!   CloudEvents).
//! - `GET /v1/collections/{collection}/items`: a read of the retained state (subscriber
//!   credential).
//! - `PUT /v1/collections/{collection}/items`: a reconcile, the complete set of a retained
//!   collection's items (JSON array or NDJSON, streamed; publisher credential), published as
//!   the differences with the state.
//! - `GET /healthz`: the process is up.
//! - `GET /readyz`: the broker accepts publishes and connections (false while shutting down).
//! - `GET /metrics`: Prometheus text format.
//!
//! Every error is JSON, `{"error":{"code","message","where"?}}`, built by [`ApiError`].

mod error;
mod ingest;
mod items;
mod publish;
mod reconcile;
mod split;

pub use error::{ApiError, ServerErrorReason};

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::PublishKeys;
use crate::backplane::Backplane;
use crate::config::Config;
use crate::history::History;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// What the HTTP edge holds: built by [`crate::app`], shared by every handler.
pub struct HttpState {
    /// Publish limits, key fields, the loopback trust setting.
    pub config: Arc<Config>,
    /// Publish counters and the `/metrics` text.
    pub metrics: Arc<Metrics>,
    /// Where accepted events go; `/readyz` also asks whether it is ready.
    pub backplane: Arc<dyn Backplane>,
    /// Publisher API keys.
    pub publish_keys: PublishKeys,
    /// Closed when shutdown begins: `/readyz` answers 503 from then on.
    pub readiness: Readiness,
    /// Cancelled when the shutdown delay ends: publishes answer 503 from then on (during the
    /// delay they are still served: that is the delay's point).
    pub shutdown: CancellationToken,
    /// The resume history, for its size gauges at each scrape.
    pub history: Arc<History>,
    /// The retained state, which `GET …/items` reads (`None`: nothing retained).
    pub state: Option<Arc<crate::state::State>>,
    /// Subscriber credentials, for `GET …/items`.
    pub auth: Arc<crate::auth::Authenticator>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("engine", &self.backplane.engine())
            .field("ready", &self.readiness.is_ready())
            .finish_non_exhaustive()
    }
}

/// Routes of the HTTP API (the WebSocket route is [`crate::ws::routes`]).
pub fn routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/publish", post(publish::publish_handler))
        .route(
            "/v1/collections/{collection}/{event}",
            post(publish::collection_handler),
        )
        .route(
            "/v1/collections/{collection}/items",
            get(items::read_handler).put(reconcile::reconcile_handler),
        )
        .route(
            "/v1/cloudevents",
            post(ingest::cloudevents_handler).options(ingest::webhook_handshake_handler),
        )
        .route("/v1/debezium", post(ingest::debezium_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn healthz_handler() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz_handler(State(state): State<Arc<HttpState>>) -> Response {
    if state.readiness.is_ready() && state.backplane.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready"})),
        )
            .into_response()
    }
}

async fn metrics_handler(State(state): State<Arc<HttpState>>) -> Response {
    let (_, events) = state.history.size();
    let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    state
        .metrics
        .history_bytes
        .set(gauge(state.history.bytes()));
    state.metrics.history_events.set(gauge(events));
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::server(
            &state.metrics,
            error::ServerErrorReason::Internal,
            format!("rendering metrics: {e}"),
        )
        .into_response(),
    }
}

/// JSON 405 for a known route asked with another method: the publish routes take `POST`
/// (and `/v1/cloudevents` `OPTIONS`, the webhook handshake), the items route `GET` (read) and
/// `PUT` (reconcile), the others (health, readiness, metrics, the WebSocket) `GET`.
pub async fn method_not_allowed_handler(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let allow = if path == "/v1/cloudevents" {
        "POST, OPTIONS"
    } else if path.starts_with("/v1/collections/") && path.ends_with("/items") {
        "GET, PUT"
    } else if path.starts_with("/v1/") {
        "POST"
    } else {
        "GET, HEAD"
    };
    ApiError::MethodNotAllowed { allow }.into_response()
}

/// JSON 404 for every unknown route.
pub async fn not_found_handler() -> Response {
    ApiError::NotFound.into_response()
}
