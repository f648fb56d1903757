//! The composition root: builds the shared state and the router from a [`Config`], and
//! serves them on an already-bound listener until the caller's shutdown future resolves.
//!
//! Shutdown sequence: readiness off → every session closes with 1001 and the listener stops
//! accepting → wait for sessions and in-flight requests, at most `shutdown_timeout`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Principal, PublishKeys};
use crate::backplane::memory::MemoryBackplane;
use crate::backplane::nats::NatsBackplane;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::{Backplane, EngineContext};
use crate::config::{Config, ConfigError, Engine};
use crate::history::History;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::ws::PerIpConnections;

/// State shared by every handler and session.
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Metrics handle.
    pub metrics: Arc<Metrics>,
    /// Live subscriptions.
    pub registry: Arc<Registry>,
    /// Delivers events, records history, registers subscriptions.
    pub hub: Arc<Hub>,
    /// Where publishes go.
    pub backplane: Arc<dyn Backplane>,
    /// Publisher API keys.
    pub publish_keys: PublishKeys,
    /// The identity of unauthenticated connections in public mode, shared by all of them.
    pub anonymous: Arc<Principal>,
    /// False once shutdown began.
    pub ready: AtomicBool,
    /// Cancelled when shutdown begins; every session watches it.
    pub shutdown: CancellationToken,
    /// Upgraded WebSocket sessions, which axum's graceful shutdown does not track.
    pub sessions: TaskTracker,
    /// Open WebSocket connections, against `max_connections`.
    pub connections: AtomicUsize,
    /// Open WebSocket connections per client address, against `max_connections_per_ip`.
    pub per_ip: PerIpConnections,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// Why the broker could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Metrics could not be registered (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A built broker, ready to serve.
#[derive(Debug, Clone)]
pub struct App {
    state: Arc<AppState>,
}

impl App {
    /// Validates `config` and builds every component.
    pub fn new(config: Config) -> Result<App, AppError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new(config.metrics_max_collections)?);
        let registry = Arc::new(Registry::new());
        // The memory engine's history starts with its epoch; the Redis engine restores the
        // tail of every collection it holds; other engines' logs predate us.
        let history = Arc::new(History::new(
            config.history,
            Arc::from(""),
            // NATS offsets are the stream sequence, shared by all collections: sparse.
            matches!(config.engine, Engine::Memory | Engine::Redis),
        ));
        let hub = Arc::new(Hub::new(registry.clone(), metrics.clone(), history));
        let shutdown = CancellationToken::new();
        let engine = EngineContext {
            sink: hub.clone(),
            key_prefix: config.key_prefix.clone(),
            history: config.history,
            idempotency_window: config.idempotency_window,
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
        };
        let backplane: Arc<dyn Backplane> = match config.engine {
            Engine::Memory => {
                metrics.backplane_ready.set(1);
                Arc::new(MemoryBackplane::new(
                    engine.sink,
                    engine.idempotency_window,
                    metrics.idempotency_evictions.clone(),
                ))
            }
            Engine::Redis => {
                let ca = config.redis_ca.as_deref();
                Arc::new(
                    RedisBackplane::with_ca(&config.redis_url, ca, engine).map_err(|e| {
                        ConfigError {
                            flag: "redis-url",
                            message: e.to_string(),
                        }
                    })?,
                )
            }
            Engine::Nats => Arc::new(
                NatsBackplane::with_max_bytes(engine, &config.nats_url, config.nats_max_bytes)
                    .map_err(|e| ConfigError {
                        flag: "nats-url",
                        message: e.to_string(),
                    })?,
            ),
        };
        let publish_keys: PublishKeys = config.publish_keys.clone();
        let anonymous = Arc::new(Principal::anonymous(config.public_permissions.clone()));
        Ok(App {
            state: Arc::new(AppState {
                config: Arc::new(config),
                metrics,
                registry,
                hub,
                backplane,
                publish_keys,
                anonymous,
                ready: AtomicBool::new(true),
                shutdown,
                sessions: TaskTracker::new(),
                connections: AtomicUsize::new(0),
                per_ip: PerIpConnections::default(),
            }),
        })
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The full router: HTTP API, health, metrics and the WebSocket endpoint.
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let ws = Router::new()
            .route(&state.config.ws_path, get(crate::ws::upgrade_handler))
            .with_state(state.clone());
        crate::http::routes(state.clone())
            .merge(ws)
            .fallback(crate::http::not_found_handler)
            .layer(DefaultBodyLimit::max(state.config.max_publish_bytes))
    }

    /// Serves on `listener` until `shutdown` resolves, then drains within the configured
    /// shutdown timeout.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let state = self.state.clone();
        let local = listener.local_addr()?;
        if !local.ip().is_loopback()
            && !state.publish_keys.required()
            && !state.config.trust_loopback_publishers
        {
            tracing::warn!(
                %local,
                "publishing is open to anyone who can reach this address: set --publish-key"
            );
        }
        if !local.ip().is_loopback() && state.config.trust_loopback_publishers {
            tracing::warn!(
                %local,
                "--trust-loopback-publishers: requests relayed by a proxy on this host arrive from loopback and need no publish key"
            );
        }
        tracing::info!(%local, ws_path = %state.config.ws_path, engine = state.backplane.engine(), "tidings listening");
        let token = state.shutdown.clone();
        let server = axum::serve(
            listener,
            self.router()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(token.clone().cancelled_owned());
        let server = tokio::spawn(server.into_future());
        let sweeper = tokio::spawn(sweep_history(state.clone()));

        shutdown.await;
        tracing::info!("shutting down: readiness off, closing sessions");
        state.ready.store(false, Ordering::Release);
        token.cancel();
        state.sessions.close();
        let drain = async {
            state.sessions.wait().await;
            server.await
        };
        match tokio::time::timeout(state.config.shutdown_timeout, drain).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => tracing::error!(error = %join, "server task failed"),
            Err(_) => tracing::warn!(
                timeout = ?state.config.shutdown_timeout,
                remaining = state.sessions.len(),
                "shutdown timeout: exiting with sessions still open"
            ),
        }
        sweeper.abort();
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// How often aged-out history is dropped when no event comes to push it out.
const HISTORY_SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

async fn sweep_history(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(HISTORY_SWEEP_PERIOD);
    loop {
        tick.tick().await;
        state.hub.history().sweep();
    }
}

/// Builds the broker from `config` and serves it on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    App::new(config)?.serve(listener, shutdown).await
}
