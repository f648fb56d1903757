//! The operator's view of one node: `GET /v1/admin/stats` (JSON) and `GET /console`, a single
//! page built into the binary that reads it, with the TypeScript client (`clients/js/dist`,
//! served at `/console/tidings-client.js`) for its live tail.
//!
//! This module owns the figures' sampling (a bounded ring of one sample per second, the last
//! five minutes, from which the rates and the page's charts are computed) and the admin key
//! check. What it never shows: item data, filter values or item keys. The console's live tail
//! subscribes over the WebSocket with whatever subscriber credential the operator types in
//! (none in public mode): the broker's normal permissions apply to it, the admin key grants
//! nothing there.
//!
//! With `--admin-key` the endpoint needs `Authorization: Bearer <key>`; without one it is open,
//! which `config` allows only on a loopback listen address. The page itself is static (no
//! figures in it) and is served to anyone who reaches it; it asks for the key. `--console off`
//! routes neither.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::backplane::Backplane;
use crate::config::Config;
use crate::event::EventKind;
use crate::http::ApiError;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::registry::{GroupSnapshot, Registry};
use crate::subscription::Dialect;

/// One sample per this period.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// Samples kept: five minutes.
pub const SAMPLES: usize = 300;
/// The current rates are over (at most) this many of the latest samples.
const RATE_WINDOW: usize = 5;

const CONSOLE_HTML: &str = include_str!("console.html");
const CLIENT_JS: &str = include_str!("../../clients/js/dist/index.js");

/// The node's totals at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    published: u64,
    deliveries: u64,
    connections: i64,
}

/// What the admin routes hold: built by [`crate::app`].
pub struct AdminState {
    /// `--admin-key`, `--ws-path`, `--auth-mode`.
    pub config: Arc<Config>,
    /// Where the figures come from.
    pub metrics: Arc<Metrics>,
    /// Collections, groups and subscriber counts.
    pub registry: Arc<Registry>,
    /// The engine's name and readiness.
    pub backplane: Arc<dyn Backplane>,
    /// Closed once shutdown begins.
    pub readiness: Readiness,
    started: Instant,
    /// The last [`SAMPLES`] samples, oldest first (a leaf lock: nothing is locked under it).
    samples: Mutex<VecDeque<Sample>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("samples", &self.samples.lock().len())
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// The admin state; sampling starts with [`AdminState::sample_forever`].
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
        backplane: Arc<dyn Backplane>,
        readiness: Readiness,
    ) -> AdminState {
        AdminState {
            config,
            metrics,
            registry,
            backplane,
            readiness,
            started: Instant::now(),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        }
    }

    fn now(&self) -> Sample {
        Sample {
            at: Instant::now(),
            published: self.metrics.published_events_total(),
            deliveries: self.metrics.deliveries.get(),
            connections: self.metrics.connections.get(),
        }
    }

    /// Records one sample, dropping the oldest beyond [`SAMPLES`].
    pub fn sample(&self) {
        let sample = self.now();
        let mut samples = self.samples.lock();
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples every [`SAMPLE_PERIOD`] until the task is aborted (by `App::serve_with`).
    pub async fn sample_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample();
        }
    }

    /// The body of `GET /v1/admin/stats` (schema `AdminStats` in protocol/openapi.yaml).
    pub fn stats(&self) -> Value {
        let now = self.now();
        let samples: Vec<Sample> = self.samples.lock().iter().copied().collect();
        // The current rates: from the sample RATE_WINDOW periods ago (or the oldest) to now.
        let base = samples
            .len()
            .checked_sub(RATE_WINDOW)
            .and_then(|i| samples.get(i))
            .or(samples.first());
        let (publishes, deliveries) = base.map_or((0.0, 0.0), |b| rates(b, &now));
        let pairs = samples.windows(2);
        let series_publishes: Vec<f64> = pairs.clone().map(|w| rates(&w[0], &w[1]).0).collect();
        let series_deliveries: Vec<f64> = pairs.map(|w| rates(&w[0], &w[1]).1).collect();
        let series_connections: Vec<i64> = samples.iter().skip(1).map(|s| s.connections).collect();
        let snapshot = self.registry.snapshot();
        let subscriptions: usize = snapshot
            .iter()
            .flat_map(|c| &c.groups)
            .map(|g| g.subscribers)
            .sum();
        let collections: Vec<Value> = snapshot
            .iter()
            .map(|c| {
                json!({
                    "name": &*c.name,
                    "subscribers": c.groups.iter().map(|g| g.subscribers).sum::<usize>(),
                    "groups": c.groups.iter().map(group_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        let m = &self.metrics;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "ready": self.readiness.is_ready(),
            "connections": now.connections,
            "subscriptions": subscriptions,
            "publishes_per_second": round(publishes),
            "deliveries_per_second": round(deliveries),
            "published_events": now.published,
            "deliveries": now.deliveries,
            "drops": m.outbox_dropped.get(),
            "slow_consumer_closes": m.slow_consumer_closes.get(),
            "backplane": {
                "engine": self.backplane.engine(),
                "ready": self.backplane.is_ready(),
                "reconnects": m.backplane_reconnects.get(),
            },
            "series": {
                "period_seconds": SAMPLE_PERIOD.as_secs(),
                "publishes_per_second": series_publishes.into_iter().map(round).collect::<Vec<_>>(),
                "deliveries_per_second": series_deliveries.into_iter().map(round).collect::<Vec<_>>(),
                "connections": series_connections,
            },
            "collections": collections,
        })
    }
}

/// Events and frames per second between two samples.
fn rates(from: &Sample, to: &Sample) -> (f64, f64) {
    let secs = to.at.saturating_duration_since(from.at).as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    (
        per(from.published, to.published),
        per(from.deliveries, to.deliveries),
    )
}

/// Two decimals are plenty for a figure on a page.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A group's shape: counts, event kinds and field names, never filter values or item keys.
fn group_json(g: &GroupSnapshot) -> Value {
    let spec = &g.spec;
    let events: Vec<&str> = EventKind::ALL
        .into_iter()
        .filter(|k| spec.events.contains(*k))
        .map(EventKind::as_str)
        .collect();
    let fields = (!spec.projection.is_all()).then(|| spec.projection.fields());
    let sort: Vec<String> = spec
        .list
        .sort
        .iter()
        .map(|(field, desc)| format!("{}{field}", if *desc { "-" } else { "" }))
        .collect();
    json!({
        "id": g.id,
        "subscribers": g.subscribers,
        "uids": g.uids,
        "events": events,
        "item": spec.item.is_some(),
        "filtered": spec.filter.is_some(),
        "search": spec.search.is_some(),
        "fields": fields,
        "sort": sort,
        "limit": spec.list.limit,
        "dialect": match spec.dialect {
            Dialect::Flat => "flat",
            Dialect::Nested => "nested",
        },
    })
}

/// The admin key check: with a key configured, `Authorization: Bearer <key>` must carry it.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.config.admin_key else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    match presented {
        Some(p) if key.accepts(p) => Ok(()),
        _ => Err(ApiError::AdminUnauthorized),
    }
}

async fn stats_handler(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    match authorize(&state, &headers) {
        Ok(()) => ([(header::CACHE_CONTROL, "no-store")], Json(state.stats())).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `&`, `<`, `>`, `"` and `'` escaped, for an HTML attribute.
fn html_attr(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn console_handler(State(state): State<Arc<AdminState>>) -> Response {
    let mode = match state.config.auth_mode {
        crate::config::AuthMode::Public => "public",
        crate::config::AuthMode::Handshake => "handshake",
        crate::config::AuthMode::Strict => "strict",
    };
    let page = CONSOLE_HTML
        .replace("__WS_PATH__", &html_attr(&state.config.ws_path))
        .replace("__AUTH_MODE__", mode)
        .replace(
            "__ADMIN_KEY_REQUIRED__",
            if state.config.admin_key.is_some() {
                "true"
            } else {
                "false"
            },
        );
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:",
            ),
        ],
        Html(page),
    )
        .into_response()
}

async fn client_handler() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT_JS,
    )
        .into_response()
}

/// `GET /v1/admin/stats`, `GET /console`, `GET /console/tidings-client.js`.
pub fn routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/admin/stats", get(stats_handler))
        .route("/console", get(console_handler))
        .route("/console/tidings-client.js", get(client_handler))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, published: u64, deliveries: u64) -> Sample {
        Sample {
            at,
            published,
            deliveries,
            connections: 0,
        }
    }

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let t = Instant::now();
        let a = sample(t, 10, 100);
        let b = sample(t + Duration::from_secs(2), 30, 500);
        assert_eq!(rates(&a, &b), (10.0, 200.0));
        assert_eq!(rates(&b, &a), (0.0, 0.0));
        assert_eq!(rates(&a, &a), (0.0, 0.0));
    }

    #[test]
    fn html_attributes_are_escaped() {
        assert_eq!(html_attr(r#"/a"<b>&'"#), "/a&quot;&lt;b&gt;&amp;&#39;");
    }
}
