//! Process signals: a future that resolves on SIGTERM or SIGINT (Ctrl-C).

use std::future::Future;

/// Registers the SIGTERM and SIGINT handlers now, and returns a future that resolves on the
/// first of them. Registering before the broker announces its address means a supervisor
/// that signals right after seeing that line still gets a graceful shutdown.
#[cfg(unix)]
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Registers the Ctrl-C handler and returns a future that resolves on it.
#[cfg(not(unix))]
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received");
        }
    })
}
