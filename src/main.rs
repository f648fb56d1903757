//! The `tidings` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tidings::cli::{Cli, Command};
use tidings::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Exit code for invalid configuration or usage (as clap uses for usage errors).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidings: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            let config = match args.clone().into_config() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tidings: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime
                .block_on(serve(args.listen, config))
                .map_err(Failure::Other)
        }
        Command::Tail(args) => runtime.block_on(tidings::cli::tail(args)).map_err(client),
        Command::Publish(args) => runtime
            .block_on(tidings::cli::publish(args))
            .map_err(client),
        Command::Healthcheck(args) => runtime
            .block_on(tidings::cli::healthcheck(args))
            .map_err(client),
        #[cfg(feature = "bench")]
        Command::Bench(args) => runtime
            .block_on(tidings::cli::bench(*args))
            .map_err(|e| match e {
                tidings_bench::BenchError::Usage(_) => Failure::Usage(e.into()),
                e => Failure::Other(e.into()),
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("tidings: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("tidings: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why a subcommand failed: a usage error exits 2 (like clap's), anything else 1.
enum Failure {
    Usage(anyhow::Error),
    Other(anyhow::Error),
}

fn client(e: tidings::cli::CliError) -> Failure {
    match e {
        tidings::cli::CliError::Usage(_) => Failure::Usage(e.into()),
        e => Failure::Other(e.into()),
    }
}

async fn serve(listen: std::net::SocketAddr, config: tidings::Config) -> anyhow::Result<()> {
    let shutdown = tidings::shutdown::signals().context("cannot install signal handlers")?;
    let ws_path = config.ws_path.clone();
    // Built first: a snapshot in --state-dir is restored before the address is announced.
    let app = tidings::App::new(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // Scripts and tests read the bound address (port 0 picks one) from this line.
    println!("tidings listening on http://{local} (WebSocket ws://{local}{ws_path})");
    app.serve_with(listener, shutdown).await?;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
