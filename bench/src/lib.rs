//! # widgets-bench
//!
//! The load generator of the widgets service, a crate of its own so that the service
//! links none of it. It drives the service from outside, over HTTP, and reads only the
//! service's domain types, its PostgreSQL store (for the baseline) and its fsync modes.
//! One run, in phases:
//!
//! 1. start the service (the `widgets` binary beside this one, or `--server-bin`, in a
//!    temporary directory) or reach `--url`;
//! 2. create `--widgets` widgets, each with ports P, R and Q, from `--concurrency`
//!    connections, with a progress bar;
//! 3. the HTTP ceiling: `GET /healthz` at full speed for `--ceiling-secs`, same client and
//!    connections, so the load numbers can be read against what HTTP alone costs here;
//! 4. the echo reference (`echo`): the load's association PUTs at the load's pace (full
//!    speed, or the offered `--rate`) for `--echo-secs`, answered by a bare axum JSON echo
//!    in a process of its own, so the service's CPU per PUT can be read against what
//!    parsing and answering one costs at the same rate;
//! 5. the load: the `--mix` of association PUTs, frees and GETs for `--duration`, at full
//!    speed or at an offered `--rate` (open loop), with `/metrics` scraped before and after
//!    for fsyncs, records per fsync, flush lag and the server's memory;
//! 6. with a database URL, the "no cache" baseline (`baseline`): the same association
//!    updates as one PostgreSQL transaction each, from as many clients.
//!
//! Every phase reports the CPU the server process (the service, or the echo) and this
//! client spent per request (`cpu`), read from `/proc` just before and after its load.
//!
//! Answers that are not 2xx are counted by status and reported, never fatal: a benchmark
//! of an overloaded service still reports. Only failing to start or reach the service (or
//! the echo, or to create at least two widgets) ends a run early.
//!
//! # Layout
//! - [`http`]: the client and the requests the phases send.
//! - [`cpu`]: CPU time of the server and of the bench, from `/proc/<pid>/stat`.
//! - [`echo`]: the echo reference, its server and its child process.
//! - [`load`]: the workers, closed and open loop.
//! - [`mix`]: the request mix.
//! - [`report`]: histograms and the printed report.
//! - [`scrape`]: `/metrics` before and after the load.
//! - [`server`]: which service binary to start, and its command line.
//! - [`baseline`]: PostgreSQL written directly, one transaction per update.
//!
//! The child process and the throwaway databases are widgets-testkit's, shared with the
//! service's tests.

pub mod baseline;
pub mod cpu;
pub mod echo;
pub mod http;
pub mod load;
pub mod mix;
pub mod report;
pub mod scrape;
pub mod server;

use anyhow::Context;
use clap::{Parser, Subcommand};
use echo::EchoServer;
use http::Http;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use load::{Outcome, Pace};
use mix::Mix;
use report::{BaselineStats, PhaseStats, Report};
use scrape::Scrape;
use server::ServerOptions;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use widgets::wal::FsyncMode;
use widgets_testkit::pg::{ScratchDb, ScratchDbError};
use widgets_testkit::server::{Server, ServerCommand};

/// How long the service may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The echo phase's requests: the load's association PUTs, nothing else.
const PUTS_ONLY: Mix = Mix {
    put: 1,
    free: 0,
    get: 0,
};

/// Load-test the widgets service (started here, or at --url) and report throughput,
/// latency percentiles, errors, fsyncs and memory, next to the HTTP ceiling and, with a
/// database URL, PostgreSQL written directly.
#[derive(Debug, Clone, Parser)]
#[command(name = "widgets-bench", version, about, long_about = None, args_override_self = true)]
pub struct BenchArgs {
    /// Base URL of a running service to load (e.g. http://127.0.0.1:8080). Default: start
    /// the service (see --server-bin) on a free port with its data in a temporary directory.
    #[arg(long)]
    pub url: Option<String>,

    /// The service binary to start (default: `widgets` in this binary's directory, where
    /// `cargo build` puts it); not with --url.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub server_bin: Option<PathBuf>,

    /// PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432/postgres, a role that may
    /// CREATE DATABASE): the started service's store and the direct-PostgreSQL baseline,
    /// each in a throwaway database dropped at the end. Unset or empty: the embedded store
    /// and no baseline.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Widgets to create before the load (default 100000).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(2..))]
    pub widgets: u64,

    /// Concurrent connections (and baseline clients) (default 64).
    #[arg(short, long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub concurrency: u64,

    /// How long the load runs (default 20s); takes units: 500ms, 20s, 1m.
    #[arg(short, long, default_value = "20s", value_parser = positive_duration)]
    pub duration: Duration,

    /// Seconds of `GET /healthz` measuring the HTTP ceiling (default 5); 0 skips it.
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u64,

    /// Seconds of the load's association PUTs, at the load's pace (`--rate`, or full
    /// speed), against a bare axum JSON echo, the reference for the service's CPU per PUT
    /// (default 5); 0 skips it.
    #[arg(long, default_value_t = 5)]
    pub echo_secs: u64,

    /// Offered rate in requests per second across all connections (open loop; latency
    /// counts from each request's intended send time). Default: as fast as answers come.
    #[arg(long, value_parser = positive_rate)]
    pub rate: Option<f64>,

    /// Weights of association PUTs, port frees and widget GETs (default
    /// put=80,free=10,get=10); a key left out weighs 0.
    #[arg(long, default_value_t = Mix::default())]
    pub mix: Mix,

    /// Print the report as JSON on stdout (default: a table); hides the progress bar.
    #[arg(long)]
    pub json: bool,

    /// `--fsync` of the started service (default always); not with --url.
    #[arg(long, value_enum, default_value_t = FsyncMode::Always, conflicts_with = "url")]
    pub fsync: FsyncMode,

    /// Another setting for the started service, as it would be written on its command line
    /// (e.g. --server-arg=--flush-interval=200ms); repeatable (default none); not with --url.
    #[arg(
        long = "server-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        conflicts_with = "url"
    )]
    pub server_args: Vec<String>,

    /// A bearer token, sent on every request. The started service gets it as its only
    /// token, with reads and /metrics protected too (`--auth-token TOKEN --auth-reads
    /// --auth-metrics`), so that every request of the load pays for the check; with --url,
    /// the token of that service. Default: none, auth off.
    #[arg(long, env = "WIDGETS_BENCH_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<widgets::config::Token>,

    #[command(subcommand)]
    pub command: Option<BenchCommand>,
}

/// What `widgets-bench` runs besides the bench itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum BenchCommand {
    /// Serve the echo reference and print its address on stdout (the bench starts it
    /// itself for the echo phase).
    #[command(hide = true)]
    EchoServer {
        /// Address to serve on (default 127.0.0.1:0: a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a number of requests per second above 0".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

impl BenchArgs {
    /// The PostgreSQL URL, if one is set (an empty one means none).
    pub fn postgres_url(&self) -> Option<&str> {
        self.database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
    }

    /// The bearer token, if one is set (an empty one means none).
    pub fn auth_token(&self) -> Option<&str> {
        self.auth_token
            .as_ref()
            .map(|t| t.as_str())
            .filter(|t| !t.is_empty())
    }

    fn pace(&self) -> Pace {
        self.pace_for(self.duration)
    }

    /// The load's pace for `duration`: the echo runs at it, so that its CPU per request is
    /// read at the same offered rate as the load's. A server answering 10,000 requests a
    /// second wakes for each; at full speed it answers many per wake-up and spends a
    /// fraction of that a request (here 7-13 us against ~20 us), which no durable PUT at
    /// 10,000/s can be held to.
    fn pace_for(&self, duration: Duration) -> Pace {
        match self.rate {
            Some(rate) => Pace::Open { rate, duration },
            None => Pace::Closed(duration),
        }
    }
}

/// Runs every phase. A database URL (`--database-url` or `DATABASE_URL`) makes the
/// started service use PostgreSQL and adds the baseline; both get throwaway databases on
/// that server, dropped at the end.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let database_url = args.postgres_url().map(str::to_owned);
    let mut server_db = None;
    let (server, base) = match &args.url {
        Some(url) => (None, url.clone()),
        None => {
            let bin = server::server_bin(args.server_bin.as_deref())?;
            if let Some(admin) = &database_url {
                let db = scratch_db(admin, "server")
                    .await
                    .context("creating the service's database")?;
                server_db = Some(db);
            }
            let options = ServerOptions {
                fsync: args.fsync,
                database_url: server_db.as_ref().map(|db| db.url.clone()),
                extra_args: args.server_args.clone(),
                auth_token: args.auth_token().map(str::to_owned),
            };
            let mut command = ServerCommand::new(&bin);
            command.args = options.args();
            match Server::start(&command).await {
                Ok(server) => {
                    tracing::info!(url = %server.base, bin = %bin.display(), "started the service");
                    let base = server.base.clone();
                    (Some(server), base)
                }
                Err(e) => {
                    drop_scratch(server_db).await;
                    return Err(e).context("starting the service");
                }
            }
        }
    };
    let result = measure(&args, &base, server, database_url.as_deref()).await;
    drop_scratch(server_db).await;
    result
}

async fn measure(
    args: &BenchArgs,
    base: &str,
    mut server: Option<Server>,
    database_url: Option<&str>,
) -> anyhow::Result<Report> {
    let concurrency = args.concurrency as usize;
    let http = Http::new(base, concurrency, args.auth_token())?;
    http.wait_ready(READY_TIMEOUT)
        .await
        .context("waiting for the service")?;
    // The service's CPU, when the bench started it (a --url service may be anywhere).
    let meter = cpu::Meter::new(server.as_ref().map(Server::pid));

    let (create, serials) = create_widgets(args, &http, &meter).await?;

    let ceiling = if args.ceiling_secs > 0 {
        tracing::info!(
            secs = args.ceiling_secs,
            "measuring the HTTP ceiling (GET /healthz)"
        );
        let client = http.clone();
        let mark = meter.mark();
        let r = load::drive(
            concurrency,
            Pace::Closed(Duration::from_secs(args.ceiling_secs)),
            None,
            move |_, _| client.healthz(),
        )
        .await;
        let used = meter.since(&mark);
        Some(PhaseStats::new(&r.latency, &r.tally, r.elapsed, None).with_cpu(used))
    } else {
        None
    };

    let echo = if args.echo_secs > 0 {
        Some(echo_phase(args, &serials).await?)
    } else {
        None
    };

    let pace = args
        .rate
        .map_or("full speed".to_owned(), |r| format!("{r} req/s"));
    tracing::info!(duration = ?args.duration, mix = %args.mix, %pace, "load");
    let before = scrape(&http).await?;
    // Inside the scrapes: their CPU is not the load's.
    let mark = meter.mark();
    let steal = cpu::StealSampler::start();
    let r = {
        let (client, serials, mix) = (http.clone(), serials.clone(), args.mix);
        load::drive(concurrency, args.pace(), None, move |rng, _| {
            client.mix(mix.draw(rng, serials.len()), &serials)
        })
        .await
    };
    let used = meter.since(&mark);
    let steal = steal.stop();
    let after = scrape(&http).await?;
    let load = PhaseStats::new(&r.latency, &r.tally, r.elapsed, r.open_loop)
        .with_cpu(used)
        .with_timeline(&r.timeline)
        .with_steal(&steal);
    let server_stats = scrape::server_stats(&before, &after);

    // The baseline gets the machine to itself.
    let started = server.is_some();
    if let Some(server) = server.take() {
        let status = server.stop().await.context("stopping the service")?;
        if !status.success() {
            tracing::warn!(%status, "the service did not exit cleanly");
        }
    }

    // A baseline that cannot run is reported, not allowed to discard the run's numbers.
    let (baseline, baseline_error) = match database_url {
        Some(admin) => {
            tracing::info!(duration = ?args.duration, "baseline: association updates straight to PostgreSQL");
            match baseline::run(admin, serials.clone(), concurrency, args.pace()).await {
                Ok(b) => {
                    let p = &b.phase;
                    let stats = BaselineStats {
                        phase: PhaseStats::new(&p.latency, &p.tally, p.elapsed, p.open_loop)
                            .with_cpu(b.cpu),
                        retries: b.retries,
                    };
                    (Some(stats), None)
                }
                Err(e) => {
                    let e = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!("the PostgreSQL baseline did not run: {e}");
                    (None, Some(e))
                }
            }
        }
        None => (None, None),
    };

    Ok(Report {
        target: http.base().to_owned(),
        store: match (started, database_url) {
            (false, _) => "external",
            (true, Some(_)) => "postgres",
            (true, None) => "embedded",
        }
        .to_owned(),
        fsync: started.then(|| server::fsync_name(args.fsync)),
        widgets: serials.len() as u64,
        concurrency,
        duration_secs: args.duration.as_secs_f64(),
        rate: args.rate,
        mix: args.mix.to_string(),
        create,
        ceiling,
        server_cpu_vs_echo: echo
            .as_ref()
            .and_then(|echo| report::server_cpu_vs_echo(&load, echo)),
        echo,
        load,
        server: server_stats,
        baseline,
        baseline_error,
    })
}

/// The echo phase: the echo reference started from this executable, then the load's
/// association PUTs (the same requests, from as many connections, at the load's pace) for
/// `--echo-secs`, with the echo's CPU and this process's measured around them.
async fn echo_phase(args: &BenchArgs, serials: &Arc<Vec<String>>) -> anyhow::Result<PhaseStats> {
    let bin = std::env::current_exe()
        .context("cannot find this executable to start the echo reference")?;
    let echo = EchoServer::start(&bin)
        .await
        .context("starting the echo reference")?;
    tracing::info!(secs = args.echo_secs, url = %echo.base, "measuring the echo reference (PUT /widgets/associations)");
    let concurrency = args.concurrency as usize;
    let http = Http::new(&echo.base, concurrency, args.auth_token())?;
    let meter = cpu::Meter::new(Some(echo.pid()));
    let mark = meter.mark();
    let r = {
        let serials = serials.clone();
        load::drive(
            concurrency,
            args.pace_for(Duration::from_secs(args.echo_secs)),
            None,
            move |rng, _| http.mix(PUTS_ONLY.draw(rng, serials.len()), &serials),
        )
        .await
    };
    let used = meter.since(&mark);
    drop(echo);
    Ok(PhaseStats::new(&r.latency, &r.tally, r.elapsed, r.open_loop).with_cpu(used))
}

/// Creates the widgets; returns the phase and the serials that were created.
async fn create_widgets(
    args: &BenchArgs,
    http: &Http,
    meter: &cpu::Meter,
) -> anyhow::Result<(PhaseStats, Arc<Vec<String>>)> {
    let n = args.widgets;
    // A prefix of its own per run, so runs against one --url service never collide.
    let prefix = format!("b{:08x}-", fastrand::u32(..));
    let serials: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("{prefix}{i}")).collect());
    let created: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
    let progress = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "creating widgets {wide_bar} {pos}/{len} {rate} eta {eta}",
            )
            .expect("a valid progress template")
            .with_key(
                "rate",
                |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            ),
        )
    };
    tracing::info!(
        widgets = n,
        concurrency = args.concurrency,
        "creating widgets"
    );
    let mark = meter.mark();
    let r = {
        let (client, serials, created) = (http.clone(), serials.clone(), created.clone());
        load::drive(
            args.concurrency as usize,
            Pace::Count(n),
            Some(progress.clone()),
            move |_, k| {
                let send = client.create(&serials[k as usize]);
                let created = created.clone();
                async move {
                    let outcome = send.await;
                    if outcome == Outcome::Status(201) {
                        created[k as usize].store(true, Ordering::Relaxed);
                    }
                    outcome
                }
            },
        )
        .await
    };
    let used = meter.since(&mark);
    progress.finish_and_clear();
    let stats = PhaseStats::new(&r.latency, &r.tally, r.elapsed, None).with_cpu(used);
    let live: Vec<String> = serials
        .iter()
        .zip(created.iter())
        .filter(|(_, ok)| ok.load(Ordering::Relaxed))
        .map(|(s, _)| s.clone())
        .collect();
    if live.len() < 2 {
        anyhow::bail!(
            "only {} of {n} widgets could be created (errors by status: {:?}, no answer: {})",
            live.len(),
            stats.errors,
            stats.transport_errors
        );
    }
    if (live.len() as u64) < n {
        tracing::warn!(
            created = live.len(),
            of = n,
            "not every widget could be created"
        );
    }
    Ok((stats, Arc::new(live)))
}

async fn scrape(http: &Http) -> anyhow::Result<Scrape> {
    let text = http
        .text("/metrics")
        .await
        .context("reading the service's metrics")?;
    Ok(Scrape::parse(&text))
}

/// A throwaway database `widgets_bench_<purpose>_<pid>` on the server `admin_url` names.
pub async fn scratch_db(admin_url: &str, purpose: &str) -> Result<ScratchDb, ScratchDbError> {
    let name = format!("widgets_bench_{purpose}_{}", std::process::id());
    ScratchDb::create(admin_url, &name).await
}

async fn drop_scratch(db: Option<ScratchDb>) {
    if let Some(db) = db {
        let name = db.name.clone();
        if let Err(e) = db.drop_db().await {
            tracing::warn!("leaving database {name} behind: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let argv = ["widgets-bench"].into_iter().chain(args.iter().copied());
        BenchArgs::try_parse_from(argv)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.url, None);
        assert_eq!((a.widgets, a.concurrency, a.ceiling_secs), (100_000, 64, 5));
        assert_eq!((a.echo_secs, a.command), (5, None));
        assert_eq!(a.duration, Duration::from_secs(20));
        assert_eq!((a.rate, a.mix, a.json), (None, Mix::default(), false));
        assert_eq!(a.fsync, FsyncMode::Always);
        assert!(a.server_args.is_empty());
        assert_eq!(a.auth_token(), None);
        assert_eq!(a.pace(), Pace::Closed(Duration::from_secs(20)));
    }

    #[test]
    fn every_flag() {
        let a = parse(&[
            "--widgets",
            "200",
            "-c",
            "4",
            "--duration",
            "1500ms",
            "--ceiling-secs",
            "0",
            "--echo-secs",
            "2",
            "--rate",
            "250.5",
            "--mix",
            "put=1,get=1",
            "--json",
            "--fsync",
            "never",
            "--server-arg",
            "--flush-interval=200ms",
            "--server-arg=--max-dirty=10",
        ])
        .unwrap();
        assert_eq!((a.widgets, a.concurrency, a.ceiling_secs), (200, 4, 0));
        assert_eq!(a.echo_secs, 2);
        assert_eq!(
            a.pace(),
            Pace::Open {
                rate: 250.5,
                duration: Duration::from_millis(1500)
            }
        );
        assert_eq!((a.mix.put, a.mix.free, a.mix.get), (1, 0, 1));
        assert!(a.json);
        assert_eq!(a.fsync, FsyncMode::Never);
        assert_eq!(a.server_args, ["--flush-interval=200ms", "--max-dirty=10"]);
        assert_eq!(a.server_bin, None);
        let a = parse(&["--server-bin", "target/debug/widgets"]).unwrap();
        assert_eq!(a.server_bin, Some(PathBuf::from("target/debug/widgets")));
        let a = parse(&["--url", "http://127.0.0.1:8080"]).unwrap();
        assert_eq!(a.url.as_deref(), Some("http://127.0.0.1:8080"));
        let a = parse(&["--auth-token", "s3cret"]).unwrap();
        assert_eq!(a.auth_token(), Some("s3cret"));
        assert!(
            !format!("{a:?}").contains("s3cret"),
            "the token is never printed"
        );
        assert_eq!(parse(&["--auth-token="]).unwrap().auth_token(), None);
    }

    #[test]
    fn the_echo_server_is_a_hidden_subcommand() {
        let a = parse(&["echo-server"]).unwrap();
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            a.command,
            Some(BenchCommand::EchoServer { listen: any_port })
        );
        let a = parse(&["echo-server", "--listen", "127.0.0.1:9999"]).unwrap();
        let listen: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        assert_eq!(a.command, Some(BenchCommand::EchoServer { listen }));
        let help = parse(&["--help"]).unwrap_err().to_string();
        assert!(help.contains("--echo-secs"), "{help}");
        assert!(!help.contains("echo-server"), "{help}");
    }

    #[test]
    fn an_empty_database_url_means_none() {
        let a = parse(&["--database-url", "postgres://h/db"]).unwrap();
        assert_eq!(a.postgres_url(), Some("postgres://h/db"));
        let a = parse(&["--database-url="]).unwrap();
        assert_eq!(a.postgres_url(), None);
    }

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        for (args, reason) in [
            (&["--duration", "0s"][..], "more than 0"),
            (&["--duration", "soon"], "soon"),
            (&["--concurrency", "0"], "concurrency"),
            (&["--widgets", "1"], "widgets"),
            (&["--rate", "0"], "above 0"),
            (&["--rate=-5"], "above 0"),
            (&["--rate", "inf"], "above 0"),
            (&["--mix", "put=0,free=0,get=0"], "add up to 0"),
            (&["--mix", "put=1,delete=1"], "unknown mix key 'delete'"),
            (&["--mix", "put"], "KEY=WEIGHT"),
            (&["--url", "http://h", "--fsync", "never"], "--fsync"),
            (
                &["--url", "http://h", "--server-arg", "--max-dirty=1"],
                "--server-arg",
            ),
            (&["--url", "http://h", "--server-bin", "w"], "--server-bin"),
            (&["--auth-token", "two words"], "RFC 6750"),
            (&["--bogus"], "--bogus"),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} was accepted"));
            let message = e.to_string();
            assert!(message.contains(reason), "{args:?}: {message}");
        }
    }
}
