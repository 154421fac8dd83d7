//! `widgets-bench`: parses the arguments (a `.env` in the working directory counts, as for
//! the service), runs the phases, prints the report as a table, or JSON with `--json`.
//! Ctrl-C or SIGTERM stops the run and the service it started. `widgets-bench echo-server`
//! (hidden) is the echo reference the bench starts for its echo phase.

use clap::Parser;
use std::process::ExitCode;
use widgets_bench::{BenchArgs, BenchCommand};

/// The service's allocator: the client shares the machine's cores with the service, and
/// every number in BENCHMARKS.md was measured with the client on mimalloc (it ran inside
/// the service's binary then). The echo reference needs it too, to be built like the
/// service.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A missing .env is normal; a malformed one is worth saying.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("ignoring .env: {e}");
        }
    }
    let args = BenchArgs::parse();
    widgets::logging::init(widgets::config::LogFormat::Text);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchCommand::EchoServer { listen }) = args.command {
        return widgets_bench::echo::serve(listen, widgets::app::shutdown_signal()).await;
    }
    let json = args.json;
    let report = tokio::select! {
        report = widgets_bench::run(args) => report?,
        _ = widgets::app::shutdown_signal() => anyhow::bail!("interrupted"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
