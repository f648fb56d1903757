//! The HTTP surface beside the WebSocket:
//!
//! - `POST /v1/publish`: one event or an array of events.
//! - `POST /v1/collections/{collection}/{event}`: the item(s) (or keys) as the body.
//! - `GET /healthz`: the process is up.
//! - `GET /readyz`: the broker accepts publishes and connections (false while shutting down).
//! - `GET /metrics`: Prometheus text format.
//!
//! Every error is JSON, `{"error":{"code","message","where"?}}`, built by [`ApiError`].

mod error;
mod publish;

pub use error::{ApiError, ServerErrorReason};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;

/// Routes of the HTTP API (the WebSocket route is added by [`crate::app`]).
pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/publish", post(publish::publish_handler))
        .route(
            "/v1/collections/{collection}/{event}",
            post(publish::collection_handler),
        )
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn healthz_handler() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz_handler(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Acquire) && state.backplane.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready"})),
        )
            .into_response()
    }
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
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

/// JSON 404 for every unknown route.
pub async fn not_found_handler() -> Response {
    ApiError::NotFound.into_response()
}
