//! The composition root: builds every component from a [`Config`], gives each edge its own
//! state ([`HttpState`] for the HTTP API, [`WsState`] for the WebSocket endpoint), merges
//! their routers, and serves them on an already-bound listener until the caller's shutdown
//! future resolves. It is the only module that knows every other one; nothing imports it.
//!
//! The shutdown sequence (readiness off, serve on for the delay, close sessions with 1001 and
//! a resume position, bounded wait) lives in [`crate::shutdown`].
//!
//! Shutdown sequence: readiness off → every session closes with 1001 and the listener stops
//! accepting → wait for sessions and in-flight requests, at most `shutdown_timeout`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::auth::jwks::{JwksFetcher, JwksMetrics};
use crate::auth::Authenticator;
use crate::backplane::memory::MemoryBackplane;
use crate::backplane::nats::NatsBackplane;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::{Backplane, EngineContext};
use crate::config::{check_admin_exposure, Config, ConfigError, Engine};
use crate::history::History;
use crate::http::HttpState;
use crate::hub::{Hub, Subscriptions};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::registry::Registry;
use crate::shutdown::Shutdown;
use crate::state::persist::{self, PersistError, Persister};
use crate::state::State;
use crate::ws::limits::ConnectionLimits;
use crate::ws::WsState;

/// Everything the broker built, kept by the composition root. The edges never see it: each
/// gets its own state ([`HttpState`], [`WsState`]) holding only what it may reach.
struct Parts {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    backplane: Arc<dyn Backplane>,
    readiness: Readiness,
    http: Arc<HttpState>,
    ws: Arc<WsState>,
    /// The console's and admin endpoint's state (`None` with `--console off`).
    admin: Option<Arc<AdminState>>,
    /// Cancelled at the very end of the drain; the backplane engine's tasks watch it.
    engine_shutdown: CancellationToken,
    /// Keeps the `--jwks-url` keys fresh while serving.
    jwks: Option<Arc<JwksFetcher>>,
    /// The memory engine, closed before the final `--state-dir` snapshot.
    memory: Option<Arc<MemoryBackplane>>,
    /// Writes the `--state-dir` snapshots.
    persister: Option<Arc<Persister>>,
}

/// Why the broker could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `--jwks-url` client could not be built.
    #[error("--jwks-url: {0}")]
    Jwks(#[from] crate::auth::jwks::JwksError),
    /// Metrics could not be registered (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    /// The `--state-dir` snapshot could not be read (the broker does not start) or written.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// A built broker, ready to serve.
#[derive(Clone)]
pub struct App {
    parts: Arc<Parts>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("engine", &self.parts.backplane.engine())
            .field("ready", &self.parts.readiness.is_ready())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Validates `config` and builds every component.
    pub fn new(config: Config) -> Result<App, AppError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new(config.metrics_max_collections)?);
        let key_names: Vec<&str> = config.publish_keys.names().collect();
        metrics.describe_config(&config.limit_gauges(), &key_names);
        let registry = Arc::new(Registry::new());
        // The memory engine's history starts with its epoch; the Redis engine restores the
        // tail of every collection it holds; other engines' logs predate us.
        let history = Arc::new(History::new(
            config.history,
            Arc::from(""),
            // NATS offsets are the stream sequence, shared by all collections: sparse.
            matches!(config.engine, Engine::Memory | Engine::Redis),
        ));
        let state_settings = crate::state::StateSettings {
            file: config.collections_file.clone(),
            ..config.state.clone()
        };
        let state = state_settings.any().then(|| {
            let state = State::new(state_settings, metrics.clone());
            Arc::new(match config.engine {
                Engine::Memory => state,
                // Flushed often enough that the engine's log still holds every event after
                // the last flush (see `state::cluster`).
                Engine::Redis => state.with_tracking(crate::backplane::redis::flush_every(
                    config.history.max_events,
                )),
                Engine::Nats => state.with_tracking((config.history.max_events / 2).max(1)),
            })
        });
        // Restored before anything is served (the listener is not accepted from yet).
        let loaded = match &config.state_dir {
            Some(dir) => persist::load(dir, state.as_deref())?,
            None => None,
        };
        let continued = loaded
            .as_ref()
            .filter(|l| l.clean)
            .map(|l| (l.epoch.clone(), &l.offsets[..]));
        let hub = Arc::new(Hub::with_state(
            registry.clone(),
            metrics.clone(),
            history,
            state.clone(),
        ));
        let shutdown = CancellationToken::new();
        // The engine outlives the sessions: it stops only once they are closed and in-flight
        // publishes are answered (see `shutdown::drain`).
        let engine_shutdown = CancellationToken::new();
        let engine = EngineContext {
            sink: hub.clone(),
            key_prefix: config.key_prefix.clone(),
            history: config.history,
            idempotency_window: config.idempotency_window,
            shutdown: engine_shutdown.clone(),
            metrics: metrics.clone(),
            state: state.clone(),
        };
        let mut memory = None;
        let backplane: Arc<dyn Backplane> = match config.engine {
            Engine::Memory => {
                metrics.backplane_ready.set(1);
                let engine = Arc::new(MemoryBackplane::continuing(
                    engine.sink,
                    engine.idempotency_window,
                    metrics.idempotency_evictions.clone(),
                    state.clone(),
                    continued.clone(),
                ));
                for (collection, offset) in continued.map_or(&[][..], |(_, offsets)| offsets) {
                    hub.history().continue_at(collection, *offset);
                }
                memory = Some(engine.clone());
                engine
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
        let persister = match &config.state_dir {
            None => None,
            Some(dir) => {
                let persister = Persister::new(
                    dir.clone(),
                    state.clone(),
                    hub.history().clone(),
                    metrics.clone(),
                )?;
                // At once, and not clean: a crash from here on must not continue this epoch
                // again (and an unwritable directory stops the start, not a later snapshot).
                let written = persister.write(false)?;
                match &loaded {
                    Some(l) => tracing::info!(
                        items = l.items,
                        skipped = l.skipped,
                        epoch = %hub.history().epoch(),
                        continued = l.clean,
                        "retained state restored from --state-dir"
                    ),
                    None => tracing::info!(
                        bytes = written.bytes,
                        "no snapshot in --state-dir yet: starting empty"
                    ),
                }
                Some(Arc::new(persister))
            }
        };
        let jwks = match config.jwt.as_ref().and_then(|j| j.remote_keys()) {
            None => None,
            Some(keys) => Some(Arc::new(JwksFetcher::new(
                keys.clone(),
                JwksMetrics {
                    fetches: metrics.jwks_fetches.clone(),
                    keys: metrics.jwks_keys.clone(),
                },
            )?)),
        };
        let mut auth = Authenticator::new(
            config.tokens.clone(),
            config.jwt.clone(),
            config.public_permissions.clone(),
        );
        if let Some(fetcher) = &jwks {
            auth = auth.with_jwks(fetcher.clone());
        }
        let config = Arc::new(config);
        let readiness = Readiness::new();
        let auth = Arc::new(auth);
        let http = Arc::new(HttpState {
            config: config.clone(),
            metrics: metrics.clone(),
            backplane: backplane.clone(),
            publish_keys: config.publish_keys.clone(),
            readiness: readiness.clone(),
            shutdown: shutdown.clone(),
            history: hub.history().clone(),
            state: hub.state().cloned(),
            auth: auth.clone(),
        });
        let ws = Arc::new(WsState {
            config: config.clone(),
            metrics: metrics.clone(),
            auth,
            subscriptions: Subscriptions::new(hub.clone(), registry.clone(), backplane.clone()),
            limits: Arc::new(ConnectionLimits::new(
                config.max_connections,
                config.max_connections_per_ip,
            )),
            readiness: readiness.clone(),
            shutdown,
            sessions: TaskTracker::new(),
        });
        let admin = config.console.then(|| {
            Arc::new(AdminState::new(
                config.clone(),
                metrics.clone(),
                registry.clone(),
                backplane.clone(),
                readiness.clone(),
            ))
        });
        Ok(App {
            parts: Arc::new(Parts {
                config,
                metrics,
                registry,
                hub,
                backplane,
                readiness,
                http,
                ws,
                admin,
                engine_shutdown,
                jwks,
                memory,
                persister,
            }),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.parts.config
    }

    /// The metrics handle.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.parts.metrics
    }

    /// The live subscriptions (tests read their counts).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.parts.registry
    }

    /// The hub (tests read its history's epoch).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.parts.hub
    }

    /// The engine publishes go to.
    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.parts.backplane
    }

    /// Open until shutdown begins.
    pub fn readiness(&self) -> &Readiness {
        &self.parts.readiness
    }

    /// The WebSocket edge's state (fuzzing and tests drive sessions over it).
    pub fn ws_state(&self) -> &Arc<WsState> {
        &self.parts.ws
    }

    /// The full router: HTTP API, health, metrics and the WebSocket endpoint.
    pub fn router(&self) -> Router {
        let parts = &self.parts;
        let mut router = crate::http::routes(parts.http.clone())
            .merge(crate::ws::routes(&parts.config.ws_path, parts.ws.clone()));
        if let Some(admin) = &parts.admin {
            router = router.merge(crate::admin::routes(admin.clone()));
        }
        router
            .method_not_allowed_fallback(crate::http::method_not_allowed_handler)
            .fallback(crate::http::not_found_handler)
            // Bounds the extractors that buffer a body (`Bytes`, `Json`). The reconcile
            // (`PUT …/items`) takes the raw `Body` and streams it, bounding each item instead:
            // its whole body is not bounded by this.
            .layer(DefaultBodyLimit::max(parts.config.max_publish_bytes))
    }

    /// Serves on `listener` until `shutdown` resolves, then drains (see [`crate::shutdown`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        self.serve_with(listener, Shutdown::on(shutdown)).await
    }

    /// Serves on `listener` until the first request of `shutdown`, then drains (see
    /// [`crate::shutdown`]; later requests hurry the drain).
    pub async fn serve_with(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> Result<(), AppError> {
        let parts = self.parts.clone();
        let config = &parts.config;
        let local = listener.local_addr()?;
        // `ServeArgs::into_config` checked the flag's address; an embedder's listener may be
        // another one.
        check_admin_exposure(config.console, config.admin_key.is_some(), local)?;
        if !local.ip().is_loopback()
            && !config.publish_keys.required()
            && !config.trust_loopback_publishers
        {
            tracing::warn!(
                %local,
                "publishing is open to anyone who can reach this address: set --publish-key"
            );
        }
        if !local.ip().is_loopback() && config.trust_loopback_publishers {
            tracing::warn!(
                %local,
                "--trust-loopback-publishers: requests relayed by a proxy on this host arrive from loopback and need no publish key"
            );
        }
        tracing::info!(%local, ws_path = %config.ws_path, engine = parts.backplane.engine(), "tidings listening");
        let sessions = &parts.ws.sessions;
        let token = parts.ws.shutdown.clone();
        let server = axum::serve(
            listener,
            self.router()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(token.clone().cancelled_owned());
        let server = tokio::spawn(server.into_future());
        let sweeper = tokio::spawn(sweep_history(parts.hub.clone()));
        let sampler = parts
            .admin
            .clone()
            .map(|admin| tokio::spawn(admin.sample_forever()));
        // Not awaited before listening: the broker serves whether or not the identity
        // provider answers (see `auth::jwks`); a token arriving first waits for this fetch.
        let jwks = parts
            .jwks
            .clone()
            .map(|fetcher| tokio::spawn(fetcher.run(parts.engine_shutdown.clone())));

        let snapshots = match (&parts.persister, config.state_snapshot_interval) {
            (Some(persister), Some(every)) => {
                Some(tokio::spawn(snapshot_forever(persister.clone(), every)))
            }
            _ => None,
        };
        let result = crate::shutdown::drain(
            crate::shutdown::Drain {
                readiness: &parts.readiness,
                delay: config.shutdown_delay,
                timeout: config.shutdown_timeout,
                sessions_and_listener: token.clone(),
                sessions,
                engine: &parts.engine_shutdown,
            },
            shutdown,
            server,
        )
        .await;
        sweeper.abort();
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        if let Some(jwks) = jwks {
            jwks.abort();
        }
        if let Some(snapshots) = snapshots {
            snapshots.abort();
        }
        if let Some(persister) = parts.persister.clone() {
            // Nothing can be published any more: this snapshot holds every accepted event,
            // so the next start may continue the epoch.
            if let Some(memory) = &parts.memory {
                memory.close();
            }
            let written = tokio::task::spawn_blocking(move || persister.write(true))
                .await
                .map_err(std::io::Error::other)??;
            tracing::info!(
                items = written.items,
                bytes = written.bytes,
                "final snapshot written to --state-dir"
            );
        }
        result?;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// How often aged-out history is dropped when no event comes to push it out.
const HISTORY_SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

async fn sweep_history(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(HISTORY_SWEEP_PERIOD);
    loop {
        tick.tick().await;
        hub.history().sweep();
    }
}

/// Writes a `--state-dir` snapshot every `every` (the first one `every` after the start,
/// which wrote its own). A failure is logged and counted; the previous snapshot stays.
async fn snapshot_forever(persister: Arc<Persister>, every: std::time::Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let one = persister.clone();
        match tokio::task::spawn_blocking(move || one.write(false)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "periodic --state-dir snapshot failed"),
            Err(e) => tracing::error!(error = %e, "periodic --state-dir snapshot task failed"),
        }
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
