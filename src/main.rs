use clap::Parser;
use std::process::ExitCode;
use widgets::bench::BenchArgs;
use widgets::config::{Cmd, Config, WalCmd};

/// The write path allocates per request (bodies, widget clones, views): glibc's malloc took
/// about a quarter of the server's CPU under an association-PUT load (perf), so use mimalloc.
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
    let config = Config::parse();
    widgets::logging::init(config.log_format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let database_url = config.postgres_url().map(str::to_owned);
    match config.command {
        Some(Cmd::Bench(args)) => bench(args, database_url).await,
        Some(Cmd::BenchSeed(ref args)) => widgets::bench::seed::run(args, &config).await,
        Some(Cmd::Migrate) => widgets::app::migrate(&config).await,
        Some(Cmd::Wal { command }) => wal_command(command),
        Some(Cmd::Serve) | None => {
            let app = widgets::app::start(config).await?;
            app.run_until(shutdown_signal()).await
        }
    }
}

/// `widgets wal inspect|verify DIR`: prints the report; fails on the first damage (verify)
/// or on any damage (inspect, after printing everything).
fn wal_command(command: WalCmd) -> anyhow::Result<()> {
    let (dir, verbose) = match &command {
        WalCmd::Inspect { dir } => (dir, true),
        WalCmd::Verify { dir } => (dir, false),
    };
    let reports = widgets::wal::inspect::inspect(dir)?;
    let mut records = 0;
    for report in &reports {
        records += report.records.len();
        if verbose {
            print!("{report}");
        }
        if let Some(damage) = &report.damage {
            anyhow::bail!("{}: {damage}", report.path.display());
        }
    }
    println!(
        "{} segments, {records} records, all checksums valid",
        reports.len()
    );
    Ok(())
}

/// `widgets bench`: prints the report as a table, or JSON with `--json`. Ctrl-C stops the
/// run and the service it started.
async fn bench(args: BenchArgs, database_url: Option<String>) -> anyhow::Result<()> {
    let json = args.json;
    let report = tokio::select! {
        report = widgets::bench::run(args, database_url) => report?,
        _ = shutdown_signal() => anyhow::bail!("interrupted"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
