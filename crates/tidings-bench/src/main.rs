//! `tidings-bench`: the load generator as a binary of its own, for a broker built without the
//! `bench` feature. The same flags as `tidings bench`.

use std::process::ExitCode;

use clap::Parser;
use tidings_bench::BenchArgs;

/// Load-test a running Tidings broker: many subscribers, a publisher, a report.
#[derive(Debug, Parser)]
#[command(name = "tidings-bench", version, about)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidings-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tidings_bench::bench(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
