//! Process signals and the drain they start.
//!
//! On the first SIGTERM or SIGINT, in order:
//! 1. readiness goes off (`/readyz` answers 503) at once;
//! 2. the broker keeps serving everything — publishes, subscriptions, new connections — for
//!    `--shutdown-delay`, so load balancers stop routing to it and an application stopped at
//!    the same moment still lands its last publishes;
//! 3. the shutdown token is cancelled: the listener stops accepting, in-flight HTTP requests
//!    complete (axum's graceful shutdown), and every session writes out its outbox and closes
//!    with `1001` and [`close_reason`] (reconnect elsewhere, and where to resume);
//! 4. the process waits for all of that at most `--shutdown-timeout`, then stops the backplane
//!    engine (which served the publishes and deliveries until then) and exits.
//!
//! A second signal during the delay ends the delay at once (step 3 follows, still bounded by
//! the timeout); a third, or a second one during step 3, stops waiting and exits.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::WirePosition;
use crate::readiness::Readiness;

/// The longest close reason a WebSocket close frame can carry (RFC 6455 §5.5: 125 bytes of
/// payload, two of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// The close reason of a shutdown close, without a position.
pub const CLOSE_REASON: &str = "server shutting down: reconnect elsewhere";

/// What starts and hurries the drain: a count of shutdown requests (signals), fed by the
/// signal handlers or by an embedder's future.
#[derive(Debug, Clone)]
pub struct Shutdown {
    requests: watch::Receiver<u32>,
}

impl Shutdown {
    /// Shutdown requested once `first` resolves; never hurried.
    pub fn on(first: impl Future<Output = ()> + Send + 'static) -> Shutdown {
        let (tx, requests) = watch::channel(0);
        tokio::spawn(async move {
            // Dropping the sender alone would not count as a request.
            tokio::select! {
                _ = first => { let _ = tx.send(1); }
                _ = tx.closed() => {}
            }
        });
        Shutdown { requests }
    }

    /// A shutdown driven by hand: every [`ShutdownHandle::request`] counts as one signal.
    pub fn manual() -> (ShutdownHandle, Shutdown) {
        let (tx, requests) = watch::channel(0);
        (ShutdownHandle(tx), Shutdown { requests })
    }

    /// Resolves once `n` shutdown requests arrived (never, if their source is gone first).
    async fn requested(&self, n: u32) {
        let mut rx = self.requests.clone();
        if rx.wait_for(|count| *count >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// How many requests arrived so far.
    fn count(&self) -> u32 {
        *self.requests.borrow()
    }
}

/// Feeds a [`Shutdown::manual`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<u32>);

impl ShutdownHandle {
    /// One more shutdown request, as one more signal would be.
    pub fn request(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// Registers the SIGTERM and SIGINT handlers now, and returns the [`Shutdown`] they feed.
/// Registering before the broker announces its address means a supervisor that signals right
/// after seeing that line still gets a graceful shutdown.
#[cfg(unix)]
pub fn signals() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (handle, shutdown) = Shutdown::manual();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            handle.request();
        }
    });
    Ok(shutdown)
}

/// Registers the Ctrl-C handler and returns the [`Shutdown`] it feeds.
#[cfg(not(unix))]
pub fn signals() -> std::io::Result<Shutdown> {
    let (handle, shutdown) = Shutdown::manual();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received");
            handle.request();
        }
    });
    Ok(shutdown)
}

/// What the drain acts on, handed over by the composition root.
pub(crate) struct Drain<'a> {
    /// Closed at once: `/readyz` answers 503.
    pub readiness: &'a Readiness,
    /// `--shutdown-delay`: how long everything is still served, readiness off.
    pub delay: Duration,
    /// `--shutdown-timeout`: how long closing may take after the delay.
    pub timeout: Duration,
    /// Cancelled when the delay ends: the listener stops accepting, sessions close.
    pub sessions_and_listener: CancellationToken,
    /// The upgraded sessions (axum's graceful shutdown does not track them).
    pub sessions: &'a TaskTracker,
    /// Cancelled last: the backplane engine's tasks.
    pub engine: &'a CancellationToken,
}

/// Waits for the first shutdown request, then runs the drain (module docs) up to the point
/// where the server and every session are done or the timeout passed. `server` is the
/// spawned axum server, which the shutdown token stops.
pub(crate) async fn drain(
    state: Drain<'_>,
    shutdown: Shutdown,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> std::io::Result<()> {
    shutdown.requested(1).await;
    let delay = state.delay;
    state.readiness.close();
    tracing::info!(
        ?delay,
        "shutting down: readiness off, still serving for the delay"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.requested(2) => tracing::info!("second shutdown request: delay cut short"),
    }
    // The request that cut the delay short does not also cut the close phase short.
    let hurried_at = shutdown.count().max(1) + 1;
    tracing::info!("closing sessions and finishing in-flight requests");
    state.sessions_and_listener.cancel();
    state.sessions.close();
    let timeout = state.timeout;
    let done = async {
        state.sessions.wait().await;
        server.await
    };
    let outcome = tokio::select! {
        result = tokio::time::timeout(timeout, done) => match result {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => {
                tracing::error!(error = %join, "server task failed");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    ?timeout,
                    remaining = state.sessions.len(),
                    "shutdown timeout: exiting with sessions still open"
                );
                Ok(())
            }
        },
        _ = shutdown.requested(hurried_at) => {
            tracing::warn!(
                remaining = state.sessions.len(),
                "another shutdown request: exiting without waiting"
            );
            Ok(())
        }
    };
    state.engine.cancel();
    outcome
}

/// The reason of the `1001` shutdown close: [`CLOSE_REASON`], then ` since ` and the position
/// as JSON when there is one and it fits the close frame.
pub fn close_reason(position: Option<&WirePosition>) -> String {
    if let Some(position) = position {
        let reason = format!("{CLOSE_REASON} since {}", position.to_json());
        if reason.len() <= MAX_CLOSE_REASON {
            return reason;
        }
    }
    CLOSE_REASON.to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn close_reason_carries_the_position_when_it_fits() {
        let position = WirePosition {
            epoch: Arc::from("k3v9x2m1q8za"),
            offset: 44,
        };
        assert_eq!(
            close_reason(Some(&position)),
            r#"server shutting down: reconnect elsewhere since {"epoch":"k3v9x2m1q8za","offset":44}"#
        );
        assert_eq!(close_reason(None), CLOSE_REASON);
        let long = WirePosition {
            epoch: Arc::from("e".repeat(100)),
            offset: 1,
        };
        assert_eq!(close_reason(Some(&long)), CLOSE_REASON);
    }

    #[tokio::test]
    async fn requests_are_counted() {
        let (handle, shutdown) = Shutdown::manual();
        handle.request();
        shutdown.requested(1).await;
        assert_eq!(shutdown.count(), 1);
        handle.request();
        shutdown.requested(2).await;
    }

    #[tokio::test]
    async fn a_future_counts_as_one_request() {
        let shutdown = Shutdown::on(async {});
        shutdown.requested(1).await;
        let second =
            tokio::time::timeout(std::time::Duration::from_millis(50), shutdown.requested(2));
        assert!(second.await.is_err(), "a future is never a second request");
    }
}
