//! The `tidings` command line: `serve` runs the broker; `tail` and `publish` are small
//! clients for trying it out and scripting; `bench` (cargo feature `bench`, on by default) is
//! the load generator of the `tidings-bench` crate, for a running broker; `healthcheck` probes
//! a broker on this host for container healthchecks.

mod healthcheck;
mod publish;
mod tail;
pub mod url;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

pub use healthcheck::{healthcheck, HealthcheckArgs};
pub use publish::{publish, PublishArgs};
pub use tail::{tail, TailArgs};
#[cfg(feature = "bench")]
pub use tidings_bench::{bench, BenchArgs};

/// Tidings: a realtime broker for collection events, speaking the Directus realtime protocol.
#[derive(Debug, Parser)]
#[command(name = "tidings", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Subscribe to a collection and print one JSON line per event.
    Tail(TailArgs),
    /// Publish one event over HTTP.
    Publish(PublishArgs),
    /// Load-test a running broker: many subscribers, a publisher, a report.
    #[cfg(feature = "bench")]
    Bench(Box<BenchArgs>),
    /// Exit 0 if the broker on this host is alive (`--ready`: ready), else 1; for container
    /// healthchecks (the image has no curl).
    Healthcheck(HealthcheckArgs),
}

/// Parses an event kind (`tail --event`, `publish EVENT`), naming the valid ones otherwise.
pub fn parse_event_kind(s: &str) -> Result<crate::event::EventKind, String> {
    crate::event::EventKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = crate::event::EventKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect();
        format!(
            "`{s}` is not an event kind; use one of {}",
            kinds.join(", ")
        )
    })
}

/// Errors of the client subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag or argument is invalid (exit status 2, as clap's own usage errors).
    #[error("{0}")]
    Usage(String),
    /// The connection failed.
    #[error("{0}")]
    Connect(String),
    /// The server refused the request.
    #[error("{0}")]
    Refused(String),
}
