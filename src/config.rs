//! Every setting, by flag or environment variable (a `.env` file in the working directory
//! is read at start-up). `widgets --help` prints this with the defaults. The subcommands
//! (`migrate`, `wal`, `bench-seed`) are `main.rs`'s, which flattens this into its command
//! line; [`Config`] also parses on its own, as tests build apps from argument lists.

use crate::api::auth::Auth;
use crate::engine::{EngineSettings, SequencerPriority};
use crate::serve::ConnectionLimits;
use crate::store::postgres::{FlushTxSettings, SynchronousCommit};
use crate::wal::{FsyncMode, RecoveryMode};
use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Widgets and the associations between their ports: an HTTP service that keeps its state
/// in memory, makes every write durable in a local write-ahead log before answering, and
/// writes behind to a durable store.
#[derive(Debug, Clone, Parser)]
#[command(name = "widgets", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, env = "WIDGETS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the WAL (`<dir>/wal`, unless --wal-dir) and the embedded store
    /// (`<dir>/store`).
    #[arg(long, env = "WIDGETS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Directory for the WAL instead of `<data dir>/wal`: a disk of its own, so that the
    /// fsync every acknowledged write waits for does not queue behind the embedded store's
    /// writes. The instance locks it as it locks the data directory.
    #[arg(long = "wal-dir", env = "WIDGETS_WAL_DIR")]
    pub wal_dir_option: Option<PathBuf>,

    /// PostgreSQL URL for the durable store (e.g. postgres://user@host:5432/widgets). Unset
    /// or empty: the embedded store in the data directory.
    // Global: `widgets migrate --database-url URL` and `widgets bench-seed --database-url URL`
    // take it after the subcommand too.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// `synchronous_commit` of every flush transaction to PostgreSQL, whatever the database
    /// sets: `on` (the default) waits for the primary's disk and any synchronous standbys'
    /// disks; `remote_apply` also until the standbys show it, for reads off standbys;
    /// `remote_write` and `local` wait less on standbys. Never `off`: the flusher trims
    /// the WAL and clears dirty marks once a flush commits.
    #[arg(long, env = "WIDGETS_PG_SYNCHRONOUS_COMMIT", value_enum, default_value_t = SynchronousCommit::On)]
    pub pg_synchronous_commit: SynchronousCommit,

    /// Longest a flush transaction may run a statement or sit idle waiting on this
    /// instance (1ms to 1h); PostgreSQL then ends it, and the flush is tried again. This
    /// instance abandons a flush, a load from PostgreSQL or a step of a single-node start,
    /// whose statement has no answer within twice this (a backend or a network that
    /// stalls, where PostgreSQL's own timeouts cannot fire; a load's next row: at least a
    /// minute). Redis mode: also the longest a load of Redis waits for the flushes in
    /// flight.
    #[arg(long, env = "WIDGETS_PG_FLUSH_TIMEOUT", default_value = "30s", value_parser = duration_up_to_an_hour)]
    pub pg_flush_timeout: Duration,

    /// Redis URL (e.g. redis://127.0.0.1:6379): keep the hot state in Redis, shared by
    /// several instances, with PostgreSQL (DATABASE_URL, required) as the durable store.
    /// Needs a build with `--features redis`. Unset or empty: single node.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Prefix for every Redis key this service uses (instances sharing state use the same).
    #[arg(long, env = "WIDGETS_REDIS_PREFIX", default_value = "")]
    pub redis_prefix: String,

    /// When the WAL is fsynced: `always` before every acknowledgement (grouped), `interval`
    /// at most once per --fsync-interval (a crash loses up to that much), `never` (benchmarks).
    #[arg(long, env = "WIDGETS_FSYNC", value_enum, default_value_t = FsyncMode::Always)]
    pub fsync: FsyncMode,

    /// How often `--fsync interval` fsyncs (1ms to 1h). Default: 1s.
    #[arg(long, env = "WIDGETS_FSYNC_INTERVAL", value_parser = duration_up_to_an_hour)]
    fsync_interval: Option<Duration>,

    /// With `--fsync always`: how long the sequencer waits after a group, while several
    /// writers are about, to take the writes of that time as the next group (0 to 10ms; 0
    /// turns it off). One fsync then covers more writes, for up to this much more latency;
    /// a lone writer never waits, nor do 16 writes or more that are queued already, and
    /// no group waits longer than the writes it lacks of 16 should take to come at the
    /// rate the last groups came in. Default: 750us.
    #[arg(long, env = "WIDGETS_COMMIT_DELAY", value_parser = commit_delay)]
    commit_delay: Option<Duration>,

    /// How often the flusher writes dirty widgets to the durable store (1ms to 1h).
    /// Default: 1s on PostgreSQL and in Redis mode, 30s on the embedded store, where the
    /// WAL already holds every change and a longer interval writes a widget changed
    /// several times once (see README, "How often the embedded store is written").
    #[arg(long, env = "WIDGETS_FLUSH_INTERVAL", value_parser = duration_up_to_an_hour)]
    pub flush_interval: Option<Duration>,

    /// Flush early once this many widgets are dirty. Default: 50000 on PostgreSQL and in
    /// Redis mode, 1000000 on the embedded store.
    #[arg(long, env = "WIDGETS_FLUSH_BATCH", value_parser = clap::value_parser!(u64).range(1..))]
    pub flush_batch: Option<u64>,

    /// Most widgets waiting for the durable store; past it writes answer `503 overloaded`.
    /// Each one holds a copy of its packed state (~100 bytes) until it is flushed.
    #[arg(long, env = "WIDGETS_MAX_DIRTY", default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_dirty: u64,

    /// WAL segment size in bytes (4 KiB to 1 GiB): a segment is closed and a new one
    /// started past it.
    #[arg(long, env = "WIDGETS_WAL_SEGMENT_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    pub wal_segment_bytes: u64,

    /// Let the kernel back the service's memory with transparent huge pages (2 MB). Off by
    /// default: on a VM a first touch of one took 20-40 ms here, a stall for every request
    /// waiting on that thread, and with them off the p99.9 of a 1 M-widget load fell from
    /// 32-61 ms to 8-13 ms (BENCHMARKS.md, "Transparent huge pages off"). Turn it on where
    /// huge-page faults are cheap and TLB misses cost more. Linux only.
    #[arg(long, env = "WIDGETS_TRANSPARENT_HUGE_PAGES", default_value_t = false, action = clap::ArgAction::Set)]
    pub transparent_huge_pages: bool,

    /// Make each WAL segment ahead of need as a zero-filled file of the segment size, so
    /// that an fdatasync writes the records alone (`false`: segments grow as records are
    /// appended). Leave it on unless the WAL is on a copy-on-write file system (btrfs,
    /// ZFS), where an overwrite allocates anew anyway.
    #[arg(long, env = "WIDGETS_WAL_PREALLOCATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub wal_preallocate: bool,

    /// Most bytes the WAL may hold on disk (it grows while the durable store is down); past
    /// it writes answer `503 overloaded` until the store catches up. Counts records: with
    /// preallocation the directory holds up to two segments more (the newest one's zeros
    /// and a spare).
    #[arg(long, env = "WIDGETS_WAL_MAX_BYTES", default_value_t = 4 << 30, value_parser = clap::value_parser!(u64).range(4096..))]
    pub wal_max_bytes: u64,

    /// What start-up does with a damaged WAL that is not just a torn tail: `strict` refuses
    /// to start and names the file and offset; `truncate` cuts the log there (losing the
    /// records after it) and starts.
    #[arg(long, env = "WIDGETS_WAL_RECOVERY", value_enum, default_value_t = RecoveryMode::Strict)]
    pub wal_recovery: RecoveryMode,

    /// Start even when the WAL and the durable store are not from one history (a WAL of
    /// another store, a store whose WAL is missing, a WAL older than the store), which is
    /// refused otherwise with a message saying which. Read that message first: it names
    /// what would be lost.
    #[arg(long, env = "WIDGETS_ACCEPT_MISMATCHED_WAL")]
    pub accept_mismatched_wal: bool,

    /// `/readyz` answers `503 flush_stalled` while the oldest change waiting for the durable
    /// store is older than this (1ms to 1h): the store has been failing that long. Writes
    /// go on meanwhile (into the WAL), up to the limits. Default: four flush intervals,
    /// and at least 60 s (120 s on the embedded store).
    #[arg(long, env = "WIDGETS_READY_MAX_FLUSH_LAG", value_parser = duration_up_to_an_hour)]
    ready_max_flush_lag: Option<Duration>,

    /// Most writes waiting for the sequencer (1 to 1048576; the queue's room is taken at
    /// start); past it writes answer `503 overloaded`.
    #[arg(long, env = "WIDGETS_WRITE_QUEUE", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=MAX_WRITE_QUEUE))]
    pub write_queue: u64,

    /// Largest request body in bytes (64 B to 64 MiB); larger ones answer
    /// `413 payload_too_large`.
    #[arg(long, env = "WIDGETS_MAX_BODY_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(64..=64 << 20))]
    pub max_body_bytes: u64,

    /// Most open HTTP connections. At the cap a new connection replaces the one idle
    /// longest; only when every connection is in a request does it wait to be accepted.
    /// Lowered, with a warning, to the open-file limit less 64 if it does not fit.
    #[arg(long, env = "WIDGETS_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// How long a connection may take to send a whole request head, counted from when it
    /// opens or its last answer is sent (1ms to 1h): it bounds idle keep-alive connections
    /// and slowly sent headers alike. Past it the connection is closed, as it is when an
    /// answer's write makes no progress for as long (a client that reads nothing; the
    /// kernel takes more of an answer only once a good part of its send buffer is free,
    /// so a client that reads less than that in this time counts as reading nothing).
    #[arg(long, env = "WIDGETS_IDLE_TIMEOUT", default_value = "30s", value_parser = duration_up_to_an_hour)]
    pub idle_timeout: Duration,

    /// How long a client may take to send a request body once its head is in (1ms to 1h);
    /// past it the request answers `408 request_timeout`.
    #[arg(long, env = "WIDGETS_BODY_TIMEOUT", default_value = "30s", value_parser = duration_up_to_an_hour)]
    pub body_timeout: Duration,

    /// Largest request head in bytes (8 KiB to 1 MiB); a longer one is refused, and no
    /// connection buffers more than this while it waits for one.
    #[arg(long, env = "WIDGETS_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(8192..=1 << 20))]
    pub max_header_bytes: u64,

    /// At shutdown, how long requests in progress may take to finish (1ms to 1h); then the
    /// connections still open are closed, the last flush runs and the process exits.
    #[arg(long, env = "WIDGETS_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration_up_to_an_hour)]
    pub drain_timeout: Duration,

    /// At shutdown, after the drain, how long the flush in progress and the last flush
    /// may take together (1ms to 1h); past it the process exits without them, and what
    /// they did not write stays for the next flush (in the WAL, or dirty in Redis).
    #[arg(long, env = "WIDGETS_FINAL_FLUSH_TIMEOUT", default_value = "60s", value_parser = duration_up_to_an_hour)]
    pub final_flush_timeout: Duration,

    /// Log format on stderr: `text` (the default) for people, `json` for log pipelines (one
    /// object a line with timestamp, level, target, fields and the spans it is in).
    #[arg(long, env = "WIDGETS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Bearer tokens (comma-separated, or the flag repeated; several for a rotation):
    /// writes then need `Authorization: Bearer <token>` with one of them, and answer
    /// `401 unauthorized` without. Characters `A-Z a-z 0-9 - . _ ~ + /`, then any `=`.
    /// Default: none, and no request needs a token.
    #[arg(
        long,
        env = "WIDGETS_AUTH_TOKEN",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub auth_token: Vec<Token>,

    /// A file of bearer tokens, one a line (blank lines and lines starting with `#` are
    /// skipped), e.g. a mounted secret; read once at start-up and added to --auth-token.
    /// Default: none.
    #[arg(long, env = "WIDGETS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Reads (`GET`, `HEAD` under `/widgets`) need a token too. Needs a token set. Default:
    /// reads are open.
    #[arg(long, env = "WIDGETS_AUTH_READS")]
    pub auth_reads: bool,

    /// `GET /metrics` needs a token too. Needs a token set. Default: open. (`/healthz`,
    /// `/readyz` and `/openapi.json` are always open.)
    #[arg(long, env = "WIDGETS_AUTH_METRICS")]
    pub auth_metrics: bool,

    /// Page cache of the embedded store, in bytes (1 MiB to 64 GiB). sled's own memory
    /// grows with it several times over: at 10 M widgets, 128 MiB cost ~250 MiB more RSS
    /// than 32 MiB.
    #[arg(long, env = "WIDGETS_SLED_CACHE_BYTES", default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..=64 << 30))]
    pub sled_cache_bytes: u64,

    /// Nice value (0 to 19) of the threads that build each flush's batch and write the
    /// embedded store: above 0 the kernel runs requests before the write-behind, which
    /// then takes the CPU they leave (see README, How it works). 0: the same priority as
    /// requests.
    #[arg(long, env = "WIDGETS_FLUSH_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub flush_nice: i32,

    /// How the sequencer thread (which logs, fsyncs and applies every write) is scheduled:
    /// `normal`, or `realtime` (Linux `SCHED_FIFO` priority 1), so that it has a core as
    /// soon as its fsync returns, ahead of the write-behind and anything else on the
    /// machine (see README, "The sequencer's priority"). `realtime` needs CAP_SYS_NICE or
    /// an RLIMIT_RTPRIO of at least 1, or the service refuses to start. Single node only.
    /// Default: normal.
    #[arg(long, env = "WIDGETS_SEQUENCER_PRIORITY", value_enum, default_value_t = SequencerPriority::Normal)]
    pub sequencer_priority: SequencerPriority,

    /// The embedded store rebuilds itself, in a new directory beside it while it is
    /// written, once its file is over this many times the data it holds (and over
    /// 256 MiB): sled's file otherwise grows under writes with no bound. The same rebuild
    /// gives a store that has outgrown its buckets twice as many. 2.5 to 100, or 0
    /// for never (neither). A store just rebuilt is about 1.8 times its data.
    #[arg(long, env = "WIDGETS_SLED_COMPACT_RATIO", default_value_t = crate::store::sled::compact::DEFAULT_RATIO, value_parser = compact_ratio)]
    pub sled_compact_ratio: f64,
}

/// A bearer token: checked when parsed, and never printed (`Debug` shows `***`). An
/// empty one (`WIDGETS_AUTH_TOKEN=`) counts as none.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::str::FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() {
            crate::api::auth::check_token(s).map_err(|e| e.to_string())?;
        }
        Ok(Token(s.to_owned()))
    }
}

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How log lines are written (see `crate::logging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, coloured on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration from 1 ms to 1 hour: zero would spin a thread (an fsync or flush timer that
/// is always due), and more than an hour is a typo, not a setting.
fn duration_up_to_an_hour(s: &str) -> Result<Duration, String> {
    duration_within(
        s,
        Duration::from_millis(1),
        Duration::from_secs(3600),
        "1ms..=1h",
    )
}

/// A duration from `min` to `max` (`bounds` says which, for the error).
fn duration_within(
    s: &str,
    min: Duration,
    max: Duration,
    bounds: &str,
) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!("{s} is outside {bounds}"));
    }
    Ok(d)
}

/// The embedded store's flush interval and early-flush size: a widget changed several
/// times in the interval is written to sled once (BENCHMARKS.md, "Write-behind, group
/// commit and the bench client at 1 M widgets", and "Writing sled every 30 s"), and the
/// WAL the store has not absorbed stays small (about 30 s of writes, a second or less to
/// replay).
const EMBEDDED_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
const EMBEDDED_FLUSH_BATCH: u64 = 1_000_000;

const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_COMMIT_DELAY: Duration = Duration::from_micros(750);

fn commit_delay(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::ZERO, Duration::from_millis(10), "0..=10ms")
}

/// 0, or 2.5 to 100: below 2.5 a store just rebuilt (~1.8 times its data) would soon be
/// due again, and over 100 is a typo.
fn compact_ratio(s: &str) -> Result<f64, String> {
    let ratio: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if ratio == 0.0 || (2.5..=100.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!("{s} is neither 0 (never) nor within 2.5..=100"))
    }
}

impl Config {
    /// The Redis URL, if one is set (an empty one means none).
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref().filter(|u| !u.trim().is_empty())
    }

    /// The PostgreSQL URL, if one is set (an empty one means none).
    pub fn postgres_url(&self) -> Option<&str> {
        self.database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
    }

    /// Whether the durable store is the embedded one (no PostgreSQL, no Redis).
    fn embedded_store(&self) -> bool {
        self.postgres_url().is_none() && self.redis_url().is_none()
    }

    /// `--flush-interval`, or the store's default.
    pub fn flush_interval(&self) -> Duration {
        self.flush_interval.unwrap_or(if self.embedded_store() {
            EMBEDDED_FLUSH_INTERVAL
        } else {
            Duration::from_secs(1)
        })
    }

    /// `--ready-max-flush-lag`, or four flush intervals and at least 60 s: on a busy
    /// machine a healthy flush can take a good part of an interval (7-11 s at 10 M widgets
    /// on the embedded store under a saturating load, and a compaction's step on top), and
    /// readiness is for a store that fails, not one that is slow.
    pub fn ready_max_flush_lag(&self) -> Duration {
        (self.ready_max_flush_lag)
            .unwrap_or((4 * self.flush_interval()).max(Duration::from_secs(60)))
    }

    /// Settings that are accepted but do nothing, or work against each other, in words for
    /// the start-up log: a setting that is silently ignored is a mistake nobody sees.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.redis_url().is_some() && self.ready_max_flush_lag.is_some() {
            // Redis mode's readiness follows Redis, not the flush (whichever instance
            // flushes).
            warnings.push("--ready-max-flush-lag is ignored in Redis mode".to_owned());
        } else if let Some(lag) = self.ready_max_flush_lag {
            let interval = self.flush_interval();
            if lag <= interval {
                warnings.push(format!(
                    "--ready-max-flush-lag ({}) is not longer than the flush interval ({}): \
                     /readyz will answer 503 flush_stalled between healthy flushes while \
                     writes go on; give it several flush intervals",
                    humantime::format_duration(lag),
                    humantime::format_duration(interval)
                ));
            }
        }
        let fsync = format!("{:?}", self.fsync).to_lowercase();
        if self.redis_url().is_some() {
            for (set, name) in [
                (self.fsync_interval.is_some(), "--fsync-interval"),
                (self.commit_delay.is_some(), "--commit-delay"),
            ] {
                if set {
                    warnings.push(format!(
                        "{name} is ignored in Redis mode, which keeps no WAL"
                    ));
                }
            }
        } else {
            if self.fsync_interval.is_some() && self.fsync != FsyncMode::Interval {
                warnings.push(format!(
                    "--fsync-interval is ignored with --fsync {fsync}: it applies to --fsync \
                     interval"
                ));
            }
            if self.commit_delay.is_some() && self.fsync != FsyncMode::Always {
                warnings.push(format!(
                    "--commit-delay is ignored with --fsync {fsync}: it applies to --fsync always"
                ));
            }
        }
        warnings
    }

    /// `--flush-batch`, or the store's default.
    pub fn flush_batch(&self) -> u64 {
        self.flush_batch.unwrap_or(if self.embedded_store() {
            EMBEDDED_FLUSH_BATCH
        } else {
            50_000
        })
    }

    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            fsync: self.fsync,
            fsync_interval: self.fsync_interval.unwrap_or(DEFAULT_FSYNC_INTERVAL),
            commit_delay: self.commit_delay.unwrap_or(DEFAULT_COMMIT_DELAY),
            wal_segment_bytes: self.wal_segment_bytes,
            wal_preallocate: self.wal_preallocate,
            flush_nice: self.flush_nice,
            sequencer_priority: self.sequencer_priority,
            wal_max_bytes: self.wal_max_bytes,
            wal_recovery: self.wal_recovery,
            queue_depth: self.write_queue as usize,
            max_dirty: self.max_dirty as usize,
            flush_batch_size: self.flush_batch() as usize,
            accept_mismatched_wal: self.accept_mismatched_wal,
        }
    }

    /// How the embedded store is opened and kept.
    pub fn sled_options(&self) -> crate::store::sled::Options {
        let mut options = crate::store::sled::Options::new(self.sled_cache_bytes);
        options.writer_nice = self.flush_nice;
        options.compact.ratio = self.sled_compact_ratio;
        options
    }

    /// What every flush transaction to PostgreSQL sets for itself.
    pub fn flush_tx_settings(&self) -> FlushTxSettings {
        FlushTxSettings {
            synchronous_commit: self.pg_synchronous_commit,
            timeout: self.pg_flush_timeout,
        }
    }

    /// The auth settings: the tokens of --auth-token and --auth-token-file, and what they
    /// protect. Fails naming the file that cannot be read or the setting that is wrong.
    pub fn auth(&self) -> anyhow::Result<Auth> {
        let mut tokens: Vec<String> = self
            .auth_token
            .iter()
            .filter(|t| !t.0.is_empty())
            .map(|t| t.0.clone())
            .collect();
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --auth-token-file {}", path.display()))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if from_file.is_empty() {
                anyhow::bail!(
                    "--auth-token-file {} holds no token (one a line)",
                    path.display()
                );
            }
            for (i, token) in from_file.iter().enumerate() {
                crate::api::auth::check_token(token).with_context(|| {
                    format!("--auth-token-file {}, token {}", path.display(), i + 1)
                })?;
            }
            tokens.extend(from_file);
        }
        Ok(Auth::new(&tokens, self.auth_reads, self.auth_metrics)?)
    }

    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections as usize,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_header_bytes as usize,
            drain_timeout: self.drain_timeout,
        }
    }

    pub fn wal_dir(&self) -> PathBuf {
        match &self.wal_dir_option {
            Some(dir) => dir.clone(),
            None => self.data_dir.join("wal"),
        }
    }

    /// A `--wal-dir` that is the data directory or one of the embedded store's directories
    /// would mix the log with what is not the log: refused, by name (as written, made
    /// absolute).
    pub fn check_wal_dir(&self) -> anyhow::Result<()> {
        let Some(wal) = &self.wal_dir_option else {
            return Ok(());
        };
        // Compared as resolved: `d/x/../store` or a link to the store is the store. Inside
        // the store, or the directories it is rebuilt in and swapped through, a
        // compaction's swap would delete the WAL with the old store.
        let wal = resolved(wal);
        let in_store = crate::store::sled::directories(&self.store_dir())
            .iter()
            .any(|dir| wal.starts_with(resolved(dir)));
        if wal == resolved(&self.data_dir) || in_store {
            anyhow::bail!(
                "--wal-dir {} is the data directory, or the embedded store's directory (store, \
                 store.buckets, store.before-buckets) or inside one: give the WAL a directory \
                 of its own (or leave --wal-dir out for <data dir>/wal)",
                wal.display()
            );
        }
        Ok(())
    }

    /// A PostgreSQL or Redis URL that cannot be read is a mistake in the settings, not a
    /// server that is down: refused at start, where an unreachable one is retried. The
    /// message names the setting and not the URL, which may hold a password.
    pub fn check_store_urls(&self) -> anyhow::Result<()> {
        if let Some(url) = self.postgres_url() {
            use std::str::FromStr;
            if let Err(e) = sqlx::postgres::PgConnectOptions::from_str(url) {
                anyhow::bail!("DATABASE_URL (--database-url) is not a PostgreSQL URL: {e}");
            }
            crate::tls::check_postgres_url(url)?;
        }
        #[cfg(feature = "redis")]
        if let Some(url) = self.redis_url() {
            if let Err(e) = redis::Client::open(url) {
                anyhow::bail!("REDIS_URL (--redis-url) is not a Redis URL: {e}");
            }
            crate::tls::check_redis_url(url)?;
        }
        Ok(())
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }
}

/// Loads `.env` from the working directory into the environment, over nothing already set.
/// A missing file is normal. A malformed one is refused whole, as a bad flag is: applying
/// the lines around a bad one would start the service with part of its settings, and the
/// bad line might be the one that turns auth on. Only the working directory's: dotenvy's
/// own search also takes the nearest parent's, which would let a `.env` two directories up
/// choose a service's data directory and address without a word.
pub fn load_dotenv() -> Result<(), dotenvy::Error> {
    let lines = match dotenvy::from_path_iter(".env") {
        Ok(lines) => lines,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    let vars = lines.collect::<Result<Vec<_>, _>>()?;
    for (name, value) in vars {
        if std::env::var_os(&name).is_none() {
            std::env::set_var(name, value);
        }
    }
    Ok(())
}

/// The most `--write-queue` takes: the queue's room is allocated at start (~32 MiB at this).
const MAX_WRITE_QUEUE: u64 = 1 << 20;

/// `path` made absolute, with its symbolic links resolved as far as it exists and `.` and
/// `..` taken out of the rest, so that two spellings of one directory compare equal.
fn resolved(path: &std::path::Path) -> PathBuf {
    let mut existing = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut rest = Vec::new();
    let base = loop {
        if let Ok(real) = existing.canonicalize() {
            break real;
        }
        match existing.file_name().map(ToOwned::to_owned) {
            // `file_name` is `None` for a last component of `..`.
            Some(name) => rest.push(name),
            None if existing.ends_with("..") => rest.push("..".into()),
            None => break existing,
        }
        if !existing.pop() {
            break existing;
        }
    };
    let mut out = base;
    for part in rest.iter().rev() {
        if part == ".." {
            out.pop();
        } else {
            out.push(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings `widgets <args>` gives.
    fn parsed(args: &[&str]) -> Config {
        Config::try_parse_from([&["widgets"][..], args].concat()).unwrap()
    }

    #[test]
    fn the_wal_goes_into_the_data_directory_unless_wal_dir_says_elsewhere() {
        let default = Config::try_parse_from(["widgets", "--data-dir", "d"]).unwrap();
        assert_eq!(default.wal_dir(), PathBuf::from("d").join("wal"));
        assert!(default.check_wal_dir().is_ok());
        let own = Config::try_parse_from(["widgets", "--data-dir", "d", "--wal-dir", "w"]).unwrap();
        assert_eq!(own.wal_dir(), PathBuf::from("w"));
        assert_eq!(own.store_dir(), PathBuf::from("d").join("store"));
        assert!(own.check_wal_dir().is_ok());
        for mixed in [
            "d",
            "./d",
            "d/store",
            "d/x/../store",
            "d/store/wal",
            "d/./store/",
            "d/store.buckets",
            "d/store.before-buckets/wal",
        ] {
            let c =
                Config::try_parse_from(["widgets", "--data-dir", "d", "--wal-dir", mixed]).unwrap();
            let err = c.check_wal_dir().unwrap_err().to_string();
            assert!(err.contains("--wal-dir"), "{mixed}: {err}");
        }
        for apart in ["d/wal", "d/storage", "d/store.wal", "d/x/../wal", "w/../w2"] {
            let c =
                Config::try_parse_from(["widgets", "--data-dir", "d", "--wal-dir", apart]).unwrap();
            assert!(c.check_wal_dir().is_ok(), "{apart}");
        }
    }

    #[test]
    fn a_wal_dir_reached_through_a_link_into_the_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        std::fs::create_dir_all(data.join("store")).unwrap();
        std::os::unix::fs::symlink(data.join("store"), dir.path().join("link")).unwrap();
        for wal in [dir.path().join("link"), dir.path().join("link/wal")] {
            let c = Config::try_parse_from([
                "widgets".as_ref(),
                "--data-dir".as_ref(),
                data.as_os_str(),
                "--wal-dir".as_ref(),
                wal.as_os_str(),
            ])
            .unwrap();
            assert!(c.check_wal_dir().is_err(), "{}", wal.display());
        }
    }

    #[test]
    fn a_store_url_that_cannot_be_read_is_refused_by_its_setting_and_without_the_url() {
        let check = |args: &[&str]| parsed(args).check_store_urls();
        assert!(check(&["--database-url", "postgres://u:pw@127.0.0.1:5432/db"]).is_ok());
        assert!(check(&["--database-url", ""]).is_ok());
        for bad in ["notaurl", "postgres://u:secret@h:notaport/db"] {
            let err = check(&["--database-url", bad]).unwrap_err().to_string();
            assert!(err.contains("DATABASE_URL"), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
        #[cfg(feature = "redis")]
        {
            assert!(check(&["--redis-url", "redis://127.0.0.1:6379"]).is_ok());
            let err = check(&["--redis-url", "nota://url"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("REDIS_URL"), "{err}");
        }
    }

    #[test]
    fn a_write_queue_past_what_start_may_allocate_is_refused_by_name() {
        let at_most = MAX_WRITE_QUEUE.to_string();
        assert!(Config::try_parse_from(["widgets", "--write-queue", &at_most]).is_ok());
        for absurd in ["1048577", "1000000000000", "18446744073709551615"] {
            let err = Config::try_parse_from(["widgets", "--write-queue", absurd])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains("--write-queue"), "{absurd}: {err}");
        }
    }

    /// `.env.example` names every setting, commented out, and shows each default as
    /// `#NAME=value`: a default changed here and not there would tell an operator the old
    /// one.
    #[test]
    fn env_example_names_every_setting_and_shows_its_default() {
        let command = <Config as clap::CommandFactory>::command();
        let example = include_str!("../.env.example");
        let named = |env: &str| {
            (example.lines()).any(|line| {
                let line = line.trim_start_matches('#').trim_start();
                line.strip_prefix(env)
                    .is_some_and(|rest| rest.starts_with('='))
            })
        };
        let unnamed: Vec<_> = (command.get_arguments())
            .filter_map(|arg| arg.get_env()?.to_str())
            .filter(|env| env.starts_with("WIDGETS_") && !named(env))
            .collect();
        assert!(unnamed.is_empty(), ".env.example does not name {unnamed:?}");

        let mut shown = Vec::new();
        for line in example.lines() {
            assert!(line.is_empty() || line.starts_with('#'), "set: {line}");
            // `#NAME=value`, where `# ...` is prose or an example.
            let Some((name, value)) = line.strip_prefix('#').and_then(|l| l.split_once('=')) else {
                continue;
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                continue;
            }
            let setting = command
                .get_arguments()
                .find(|arg| arg.get_env().is_some_and(|env| env == name));
            match setting {
                // A default that depends on other settings is told in words beside it.
                Some(arg) if arg.get_default_values().is_empty() => {}
                Some(arg) => shown.push(format!("--{}={value}", arg.get_long().unwrap())),
                None => assert!(!name.starts_with("WIDGETS_"), "{name} is no setting"),
            }
        }
        assert!(shown.len() >= 10, "only {shown:?}");
        let default = format!("{:?}", Config::try_parse_from(["widgets"]).unwrap());
        let not_default: Vec<_> = (shown.iter())
            .filter(|arg| {
                let set = Config::try_parse_from(["widgets", arg.as_str()]);
                set.map_or(true, |set| format!("{set:?}") != default)
            })
            .collect();
        assert!(
            not_default.is_empty(),
            ".env.example shows these as defaults, and they are not: {not_default:?}"
        );
    }

    #[test]
    fn settings_that_do_nothing_or_work_against_each_other_are_warned_about() {
        let warnings = |args: &[&str]| parsed(args).warnings();
        assert_eq!(warnings(&[]), Vec::<String>::new(), "the defaults");
        assert_eq!(
            warnings(&["--fsync", "interval", "--fsync-interval", "100ms"]),
            Vec::<String>::new()
        );
        assert_eq!(warnings(&["--commit-delay", "2ms"]), Vec::<String>::new());
        assert_eq!(
            warnings(&["--flush-interval", "10s", "--ready-max-flush-lag", "30s"]),
            Vec::<String>::new()
        );

        let [lag] = &warnings(&["--ready-max-flush-lag", "30s"])[..] else {
            panic!("one warning");
        };
        assert!(
            lag.contains("--ready-max-flush-lag (30s)") && lag.contains("(30s)"),
            "{lag}"
        );
        let [lag] = &warnings(&[
            "--database-url",
            "postgres://h/db",
            "--ready-max-flush-lag",
            "500ms",
        ])[..] else {
            panic!("one warning: PostgreSQL's interval is 1s");
        };
        assert!(lag.contains("flush interval (1s)"), "{lag}");
        let [ignored] = &warnings(&["--fsync-interval", "100ms"])[..] else {
            panic!("one warning");
        };
        assert!(
            ignored.contains("--fsync-interval is ignored with --fsync always"),
            "{ignored}"
        );
        let [ignored] = &warnings(&["--fsync", "never", "--commit-delay", "1ms"])[..] else {
            panic!("one warning");
        };
        assert!(
            ignored.contains("--commit-delay is ignored with --fsync never"),
            "{ignored}"
        );
        let redis = [
            "--database-url",
            "postgres://h/db",
            "--redis-url",
            "redis://h",
        ];
        let both = warnings(
            &[
                &redis[..],
                &["--fsync-interval", "1s", "--commit-delay", "1ms"],
                &["--ready-max-flush-lag", "5m"],
            ]
            .concat(),
        );
        assert_eq!(both.len(), 3, "{both:?}");
        assert!(
            both.iter().all(|w| w.contains("ignored in Redis mode")),
            "{both:?}"
        );
    }

    #[test]
    fn defaults_and_bad_values() {
        let c = Config::try_parse_from(["widgets"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.fsync, FsyncMode::Always);
        assert_eq!(
            (c.flush_interval(), c.flush_batch(), c.ready_max_flush_lag()),
            (Duration::from_secs(30), 1_000_000, Duration::from_secs(120)),
            "the embedded store's defaults"
        );
        let c = Config::try_parse_from(["widgets", "--database-url", "postgres://h/db"]).unwrap();
        assert_eq!(
            (c.flush_interval(), c.flush_batch(), c.ready_max_flush_lag()),
            (Duration::from_secs(1), 50_000, Duration::from_secs(60)),
            "PostgreSQL's defaults"
        );
        let engine = Config::try_parse_from(["widgets"])
            .unwrap()
            .engine_settings();
        assert_eq!(
            (engine.fsync_interval, engine.commit_delay),
            (Duration::from_secs(1), Duration::from_micros(750)),
            "the WAL's defaults"
        );
        assert_eq!(
            (c.drain_timeout, c.final_flush_timeout),
            (Duration::from_secs(10), Duration::from_secs(60)),
            "the stop's bounds"
        );
        let c = Config::try_parse_from(["widgets", "--ready-max-flush-lag", "5s"]).unwrap();
        assert_eq!(c.ready_max_flush_lag(), Duration::from_secs(5));
        let c = Config::try_parse_from([
            "widgets",
            "--fsync",
            "interval",
            "--flush-interval",
            "250ms",
        ])
        .unwrap();
        assert_eq!(
            (c.fsync, c.flush_interval()),
            (FsyncMode::Interval, Duration::from_millis(250))
        );
        assert_eq!(c.sequencer_priority, SequencerPriority::Normal);
        let c = Config::try_parse_from(["widgets", "--sequencer-priority", "realtime"]).unwrap();
        assert_eq!(
            c.engine_settings().sequencer_priority,
            SequencerPriority::Realtime
        );
        for bad in [
            &["widgets", "--fsync", "sometimes"][..],
            &["widgets", "--listen", "nowhere"],
            &["widgets", "--flush-interval", "soon"],
            &["widgets", "--flush-batch", "0"],
            &["widgets", "--wal-segment-bytes", "10"],
            &["widgets", "--wal-segment-bytes", "4294967296"],
            &["widgets", "--fsync-interval", "0s"],
            &["widgets", "--flush-interval", "0ms"],
            &["widgets", "--flush-interval", "3days"],
            &["widgets", "--commit-delay", "11ms"],
            &["widgets", "--commit-delay", "soon"],
            &["widgets", "--flush-nice", "20"],
            &["widgets", "--flush-nice", "-1"],
            &["widgets", "--max-body-bytes", "0"],
            &["widgets", "--sled-cache-bytes", "0"],
            &["widgets", "--sled-compact-ratio", "2"],
            &["widgets", "--sled-compact-ratio", "101"],
            &["widgets", "--sled-compact-ratio", "-3"],
            &["widgets", "--sled-compact-ratio", "NaN"],
            &["widgets", "--sled-compact-ratio", "often"],
            &["widgets", "--sequencer-priority", "high"],
        ] {
            assert!(Config::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_embedded_store_compacts_at_three_times_its_data_unless_told() {
        let ratio = |args: &[&str]| {
            let c = parsed(args);
            c.sled_options().compact.ratio
        };
        assert_eq!(ratio(&[]), 3.0);
        assert_eq!(ratio(&["--sled-compact-ratio", "0"]), 0.0, "never");
        assert_eq!(ratio(&["--sled-compact-ratio", "2.5"]), 2.5);
        let c = Config::try_parse_from(["widgets", "--flush-nice", "7"]).unwrap();
        assert_eq!(c.sled_options().writer_nice, 7);
    }

    #[test]
    fn auth_tokens_from_flags_env_style_lists_and_a_file() {
        let off = Config::try_parse_from(["widgets"]).unwrap().auth().unwrap();
        assert!(!off.is_on());
        let c = Config::try_parse_from([
            "widgets",
            "--auth-token",
            "a,b",
            "--auth-token=c",
            "--auth-reads",
        ])
        .unwrap();
        assert_eq!(c.auth_token.len(), 3);
        assert!(format!("{c:?}").contains("***") && !format!("{c:?}").contains("\"a\""));
        let auth = c.auth().unwrap();
        assert!(auth.protects(crate::api::auth::Class::Read));
        // An empty value means none: then --auth-reads has nothing to check with.
        let c = Config::try_parse_from(["widgets", "--auth-token=", "--auth-reads"]).unwrap();
        assert!(c
            .auth()
            .unwrap_err()
            .to_string()
            .contains("--auth-reads needs a token"));
        assert!(Config::try_parse_from(["widgets", "--auth-token", "has space"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# rotation\nnew-token\n\n  old-token  \r\n").unwrap();
        let c = Config::try_parse_from(["widgets", "--auth-token-file", file.to_str().unwrap()])
            .unwrap();
        assert!(c.auth().unwrap().is_on());
        std::fs::write(&file, "# nothing\n\n").unwrap();
        let e = format!("{:#}", c.auth().unwrap_err());
        assert!(e.contains("holds no token"), "{e}");
        std::fs::write(&file, "ok\nnot ok\n").unwrap();
        let e = format!("{:#}", c.auth().unwrap_err());
        assert!(e.contains("token 2") && !e.contains("not ok"), "{e}");
        let missing = dir.path().join("missing");
        let c = Config::try_parse_from(["widgets", "--auth-token-file", missing.to_str().unwrap()])
            .unwrap();
        assert!(format!("{:#}", c.auth().unwrap_err()).contains("reading --auth-token-file"));
    }

    #[test]
    fn log_format_is_text_unless_asked() {
        let c = Config::try_parse_from(["widgets"]).unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        let c = Config::try_parse_from(["widgets", "--log-format", "json"]).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["widgets", "--log-format", "xml"]).is_err());
    }
}
