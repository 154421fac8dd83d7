use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use widgets::config::Config;
use widgets::seed::{self, SeedArgs};
use widgets::store::PgStore;

/// The write path allocates per request (bodies, widget clones, views): glibc's malloc took
/// about a quarter of the server's CPU under an association-PUT load (perf), so use mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Widgets and the associations between their ports: an HTTP service that keeps its state
/// in memory, makes every write durable in a local write-ahead log before answering, and
/// writes behind to a durable store.
#[derive(Debug, Parser)]
#[command(name = "widgets", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the API (the default).
    Serve,
    /// Apply the PostgreSQL migrations to DATABASE_URL and exit (serving applies them too).
    Migrate,
    /// Look at a WAL directory without changing it.
    Wal {
        #[command(subcommand)]
        command: WalCmd,
    },
    /// Fill an empty durable store (the data directory's, or DATABASE_URL) with widgets
    /// paired on two ports, to measure memory and restart at scale.
    BenchSeed(SeedArgs),
}

#[derive(Debug, Subcommand)]
enum WalCmd {
    /// List every segment and record (LSN, offset, changes), verifying checksums.
    Inspect {
        /// The WAL directory (`<data dir>/wal`).
        dir: PathBuf,
    },
    /// Check every segment; exit 1 naming the file and offset of the first damage.
    Verify {
        /// The WAL directory (`<data dir>/wal`).
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(e) = widgets::config::load_dotenv() {
        eprintln!("error: .env: {e}; nothing in it was applied: mend the line or remove the file");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    widgets::logging::init(cli.config.log_format);
    widgets::tls::install_crypto_provider();
    if !cli.config.transparent_huge_pages {
        turn_off_transparent_huge_pages();
    }
    match run(cli.config, cli.cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Transparent huge pages off for this process and its children (`--transparent-huge-pages`
/// says why). mimalloc asks for them on its arenas; the process-wide flag overrides that,
/// and sled's allocations too. The few pages faulted in before this keep what they got.
#[cfg(target_os = "linux")]
fn turn_off_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE with 1 sets one flag on this process; the kernel wants the
    // other arguments 0.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(),
            "could not turn transparent huge pages off; the kernel's setting stands");
    }
}

#[cfg(not(target_os = "linux"))]
fn turn_off_transparent_huge_pages() {}

async fn run(config: Config, cmd: Option<Cmd>) -> anyhow::Result<()> {
    match cmd {
        Some(Cmd::BenchSeed(args)) => bench_seed(&args, &config).await,
        Some(Cmd::Migrate) => widgets::app::migrate(&config).await,
        Some(Cmd::Wal { command }) => wal_command(command),
        Some(Cmd::Serve) | None => {
            // Listened for before anything starts: see `shutdown_signal`.
            let stop = widgets::app::shutdown_signal();
            let app = widgets::app::start(config).await?;
            app.run_until(stop).await
        }
    }
}

/// `widgets bench-seed`: opens the store the service would serve from (PostgreSQL, migrated,
/// with DATABASE_URL; else the embedded store in the data directory) and seeds it.
async fn bench_seed(args: &SeedArgs, config: &Config) -> anyhow::Result<()> {
    seed::check(args, &config.wal_dir())?;
    match config.postgres_url() {
        Some(url) => {
            let store = PgStore::connect_waiting(url, PgStore::COMMAND_WAIT)
                .await
                .context("connecting to PostgreSQL")?;
            store.migrate().await.context("applying migrations")?;
            seed::into_postgres(args, &store).await
        }
        None => {
            // The data directory's lock, as the service takes it: no seed writes under a
            // running instance (whose WAL may be elsewhere), or tidies up after its
            // compaction as if a crash had left it.
            let _lock = widgets::data_dir::DataDirLock::acquire(&config.data_dir)?;
            let store = widgets::app::open_sled(config).await?;
            seed::fill(&store, args, "the embedded store").await
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
    // A data directory given for its WAL directory: no segment, which is a new log's
    // state too, and "all valid" would say the log had been checked.
    if reports.is_empty() && dir.join("wal").is_dir() {
        anyhow::bail!(
            "{} holds no WAL segment, and {} is a directory: give the WAL directory, not \
             the data directory",
            dir.display(),
            dir.join("wal").display()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use widgets::wal::FsyncMode;

    fn parse(argv: &[&str]) -> Cli {
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    #[test]
    fn settings_come_before_the_subcommand_and_a_later_one_wins() {
        let cli = parse(&["widgets", "--fsync", "never", "--database-url=", "serve"]);
        assert!(matches!(cli.cmd, Some(Cmd::Serve)));
        assert_eq!(cli.config.fsync, FsyncMode::Never);
        assert_eq!(cli.config.postgres_url(), None);
        let cli = parse(&["widgets", "--fsync", "never", "--fsync", "interval"]);
        assert!(cli.cmd.is_none(), "serving is the default");
        assert_eq!(cli.config.fsync, FsyncMode::Interval);
        assert!(Cli::try_parse_from(["widgets", "serve", "--fsync", "never"]).is_err());
    }

    #[test]
    fn the_database_url_may_follow_the_subcommand() {
        let cli = parse(&["widgets", "migrate", "--database-url", "postgres://h/db"]);
        assert!(matches!(cli.cmd, Some(Cmd::Migrate)));
        assert_eq!(cli.config.postgres_url(), Some("postgres://h/db"));
        let cli = parse(&[
            "widgets",
            "--data-dir",
            "d",
            "bench-seed",
            "--database-url=",
        ]);
        assert_eq!(cli.config.postgres_url(), None);
        assert_eq!(cli.config.data_dir, PathBuf::from("d"));
        match cli.cmd {
            Some(Cmd::BenchSeed(args)) => {
                assert_eq!((args.widgets, args.batch), (10_000_000, 10_000))
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn wal_commands_take_a_directory() {
        match parse(&["widgets", "wal", "verify", "data/wal"]).cmd {
            Some(Cmd::Wal {
                command: WalCmd::Verify { dir },
            }) => assert_eq!(dir, PathBuf::from("data/wal")),
            other => panic!("parsed as {other:?}"),
        }
    }
}
