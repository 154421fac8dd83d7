//! Start-up, serving and shutdown.
//!
//! [`start`] binds the listener and serves at once (`/healthz` answers, `/readyz` says
//! `503` while recovering), then recovers in the background: open the store, let the
//! engine recover on it (`MemoryEngine::recover`: load the store, replay the WAL above its
//! checkpoint, start the sequencer), and start the flusher. [`RunningApp::stop`] (what `SIGTERM` and Ctrl-C trigger) stops accepting,
//! finishes in-flight requests, stops the flusher, flushes once more, and syncs and closes
//! the WAL.

use crate::api::{self, AppState};
use crate::config::Config;
use crate::data_dir::DataDirLock;
use crate::engine::{Engine, MemoryEngine};
use crate::flush::{self, Flusher, Source};
use crate::store::{PgStore, SledStore, Store};
use crate::wal::{RealFs, WalFs};
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A served app: its address, and the handles to make it ready or stop it.
pub struct RunningApp {
    addr: SocketAddr,
    shutdown: CancellationToken,
    recovery: watch::Receiver<Option<Result<(), String>>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until recovery has finished; fails with the reason if it failed.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let outcome = self
            .recovery
            .wait_for(Option::is_some)
            .await
            .map_err(|_| anyhow::anyhow!("the app stopped before recovery finished"))?;
        match outcome.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => bail!("recovery failed: {reason}"),
            None => unreachable!("wait_for returned before recovery finished"),
        }
    }

    /// Graceful stop: finish in-flight requests, flush, close the WAL.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("the app task panicked")?
    }

    /// Runs until the app stops by itself (recovery failed) or `signal` completes.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(signal);
        let shutdown = self.shutdown.clone();
        let mut task = self.task;
        tokio::select! {
            result = &mut task => return result.context("the app task panicked")?,
            _ = &mut signal => tracing::info!("shutting down"),
        }
        shutdown.cancel();
        task.await.context("the app task panicked")?
    }
}

/// Binds, serves and starts recovery on the real file system.
pub async fn start(config: Config) -> anyhow::Result<RunningApp> {
    start_with_fs(config, Arc::new(RealFs)).await
}

/// [`start`], with the WAL on the given file system (tests inject faults through it).
pub async fn start_with_fs(config: Config, fs: Arc<dyn WalFs>) -> anyhow::Result<RunningApp> {
    if config.redis_url().is_some() && config.postgres_url().is_none() {
        bail!("Redis mode (REDIS_URL) needs PostgreSQL as its durable store: set DATABASE_URL too");
    }
    #[cfg(not(feature = "redis"))]
    if config.redis_url().is_some() {
        bail!("REDIS_URL is set, but this build has no Redis mode: build with --features redis, or unset it");
    }
    config.check_store_urls()?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let auth = config.auth()?;
    let mut limits = config.connection_limits();
    limits.max_connections = crate::serve::fit_to_open_file_limit(limits.max_connections)
        .context("fitting --max-connections to the open-file limit")?;
    if auth.is_on() {
        tracing::info!(?auth, "bearer auth is on");
    }
    // Single node: the WAL and the embedded store in the data directory are this
    // process's alone, and so is the WAL directory, wherever it is: the default
    // `<data dir>/wal` is locked too, or another instance given it as its --wal-dir would
    // append to this one's log and trim it. (Redis mode keeps nothing there.)
    config.check_wal_dir()?;
    // Bound before the directories are made and locked: a port in use refuses the start
    // with nothing made.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let data_dir = match config.redis_url() {
        None => {
            // What would refuse the start later is refused before anything in the data
            // directory is made, locked or recovered.
            crate::engine::check_priority(config.sequencer_priority)?;
            for dir in [&config.data_dir, &config.wal_dir()] {
                DataDirLock::check(dir)?;
            }
            Some(vec![
                DataDirLock::acquire(&config.data_dir)?,
                DataDirLock::acquire(&config.wal_dir())?,
            ])
        }
        Some(_) => None,
    };
    crate::metrics::handle();
    let addr = listener.local_addr()?;
    // Whoever started the service with `--listen 127.0.0.1:0` (its tests, the load
    // generator) reads its address from `addr=` here (widgets-testkit's server.rs).
    tracing::info!(%addr, data_dir = %config.data_dir.display(), wal_dir = %config.wal_dir().display(), fsync = ?config.fsync, "listening");
    if config.fsync != crate::wal::FsyncMode::Always {
        tracing::warn!(fsync = ?config.fsync, "WAL fsync is not `always`: a crash can lose acknowledged writes");
    }
    let state = AppState::new(
        config.body_timeout,
        config.max_body_bytes as usize,
        config.ready_max_flush_lag(),
        auth,
    );
    let shutdown = CancellationToken::new();
    let router = api::router(state.clone());
    let server = tokio::spawn(crate::serve::serve(
        listener,
        router,
        limits,
        shutdown.clone(),
    ));
    let (recovered, recovery) = watch::channel(None);
    let serving = Serving {
        config,
        fs,
        state,
        shutdown: shutdown.clone(),
        server,
        recovered,
    };
    let task = tokio::spawn(async move {
        // Held until the run has ended, the WAL's last fsync included.
        let _data_dir = data_dir;
        serving.supervise().await
    });
    Ok(RunningApp {
        addr,
        shutdown,
        recovery,
        task,
    })
}

/// Everything one serving run needs besides its store.
struct Serving {
    config: Config,
    fs: Arc<dyn WalFs>,
    state: AppState,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    recovered: watch::Sender<Option<Result<(), String>>>,
}

impl Serving {
    /// Picks the store (and in Redis mode the engine), recovers, and serves until shutdown.
    async fn supervise(self) -> anyhow::Result<()> {
        match self.config.postgres_url().map(str::to_owned) {
            Some(url) => match connect_postgres(&url, &self.shutdown).await {
                Ok(Some(store)) => {
                    let store = store.with_flush_settings(self.config.flush_tx_settings());
                    #[cfg(feature = "redis")]
                    if let Some(redis) = self.config.redis_url().map(str::to_owned) {
                        return self.run_redis(&redis, store).await;
                    }
                    // Single node: this instance's LSNs are the database's only ones.
                    let claimed = tokio::select! {
                        claimed = store.claim_single_writer() => claimed,
                        _ = self.shutdown.cancelled() => return self.drain().await,
                    };
                    match claimed {
                        Ok(token) => {
                            tracing::info!(token, "this instance is the database's single writer")
                        }
                        Err(e) => {
                            let e = anyhow::Error::new(e)
                                .context("claiming the database's single writer");
                            return self.fail(e).await;
                        }
                    }
                    self.run(store).await
                }
                // Shut down while waiting for PostgreSQL.
                Ok(None) => self.drain().await,
                Err(e) => self.fail(e).await,
            },
            None => match open_sled(&self.config).await {
                Ok(store) => self.run(store).await,
                Err(e) => self.fail(e).await,
            },
        }
    }

    /// Runs `flusher` every flush interval until shutdown; then lets in-flight requests
    /// finish (they are acknowledged before the last flush) and flushes once more.
    async fn flush_until_shutdown<E: Source, S: Store>(
        self,
        flusher: Flusher<E, S>,
    ) -> anyhow::Result<()> {
        let flusher = Arc::new(flusher);
        let stop = CancellationToken::new();
        let mut running = tokio::spawn({
            let (flusher, interval, stop) =
                (flusher.clone(), self.config.flush_interval(), stop.clone());
            async move { flush::run(&flusher, interval, stop).await }
        });
        self.shutdown.cancelled().await;
        let served = self.server.await.context("the HTTP server panicked")?;
        stop.cancel();
        // A store that stalls must not hold the exit past what the orchestrator allows:
        // nothing acknowledged depends on these flushes.
        let timeout = self.config.final_flush_timeout;
        let last = async {
            (&mut running).await.context("the flusher panicked")?;
            flush::flush_at_shutdown(&flusher).await;
            anyhow::Ok(())
        };
        match tokio::time::timeout(timeout, last).await {
            Ok(flushed) => flushed?,
            Err(_) => {
                // The loop still runs if its flush in progress is what timed out: it ends at
                // its next await. (Once it has ended, its handle is spent.)
                if !running.is_finished() {
                    running.abort();
                    let _ = running.await;
                }
                tracing::warn!(
                    ?timeout,
                    "the last flush did not finish within \
                    --final-flush-timeout: exiting without it; nothing is lost, what it did \
                    not write is in the WAL (single node) or dirty in Redis for the next flush"
                );
            }
        }
        served?;
        Ok(())
    }

    /// Start-up failed: say why, stop serving, return the error.
    async fn fail(self, e: anyhow::Error) -> anyhow::Result<()> {
        self.recovered.send_replace(Some(Err(format!("{e:#}"))));
        self.shutdown.cancel();
        self.drain().await?;
        Err(e)
    }

    /// Waits for the HTTP server to finish its in-flight requests after shutdown.
    async fn drain(self) -> anyhow::Result<()> {
        self.server.await.context("the HTTP server panicked")??;
        Ok(())
    }

    /// Recovers on `store`, serves until shutdown, then stops the flusher, flushes once
    /// more and closes the WAL. The HTTP server itself is drained by the caller.
    async fn run<S: Store>(self, store: S) -> anyhow::Result<()> {
        let store = Arc::new(store);
        let wal_dir = self.config.wal_dir();
        let recovered = {
            let recovery = MemoryEngine::recover(
                &*store,
                &wal_dir,
                self.fs.clone(),
                self.config.engine_settings(),
            );
            tokio::pin!(recovery);
            tokio::select! {
                r = &mut recovery => Some(r),
                _ = self.shutdown.cancelled() => {
                    // Not dropped: the WAL's replay and opening run on a thread that no
                    // drop stops, and the data directory's locks, let go as this returns,
                    // must outlive them, or another instance starts on the log this one is
                    // still writing. As long as a start takes (a stalled store's load ends
                    // at its deadline).
                    tracing::info!("stopping during start-up: the recovery under way ends first");
                    if let Ok(engine) = recovery.await {
                        tokio::task::spawn_blocking(move || engine.stop())
                            .await
                            .context("stopping the sequencer")?;
                    }
                    None
                }
            }
        };
        let engine = match recovered {
            Some(Ok(engine)) => Arc::new(engine),
            Some(Err(e)) => return self.fail(e.into()).await,
            None => return self.drain().await,
        };
        self.state.set_engine(Engine::Memory(engine.clone()));
        self.recovered.send_replace(Some(Ok(())));
        tracing::info!(widgets = engine.len(), "ready");

        let flusher = Flusher::new(engine.clone(), store);
        let served = self.flush_until_shutdown(flusher).await;
        tokio::task::spawn_blocking(move || engine.stop())
            .await
            .context("stopping the sequencer")?;
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

#[cfg(feature = "redis")]
impl Serving {
    /// Redis mode: connects, fills an empty Redis from PostgreSQL once, serves, and flushes
    /// Redis's dirty widgets to PostgreSQL until shutdown.
    async fn run_redis(self, url: &str, store: PgStore) -> anyhow::Result<()> {
        use crate::engine::redis::{load, RedisEngine};
        use crate::flush::redis::RedisSource;
        let max_dirty = self.config.max_dirty as usize;
        let attempt = || async {
            let engine =
                RedisEngine::connect(url, &self.config.redis_prefix, max_dirty, store.clone())
                    .await
                    .context("connecting to Redis")?;
            let loaded = load::ensure_loaded(&engine, &store, &self.shutdown)
                .await
                .context("loading Redis from PostgreSQL")?;
            Ok::<_, anyhow::Error>(loaded.then_some(engine))
        };
        let tried = retried(
            &self.shutdown,
            "Redis cannot be loaded yet; not ready",
            load::passing,
            attempt,
        );
        let engine = match tried.await {
            Ok(Some(Some(engine))) => Arc::new(engine),
            Ok(_) => return self.drain().await,
            Err(e) => return self.fail(e).await,
        };
        self.state.set_engine(Engine::Redis(engine.clone()));
        self.recovered.send_replace(Some(Ok(())));
        tracing::info!(prefix = %self.config.redis_prefix, "ready (Redis mode)");

        let batch = self.config.flush_batch() as usize;
        let source = Arc::new(RedisSource::new(engine, batch));
        self.flush_until_shutdown(Flusher::new(source, Arc::new(store)))
            .await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the embedded store in the data directory (serving, and `widgets bench-seed`).
pub async fn open_sled(config: &Config) -> anyhow::Result<SledStore> {
    let (dir, options) = (config.store_dir(), config.sled_options());
    let opened = tokio::task::spawn_blocking(move || SledStore::open_with(&dir, options)).await?;
    opened.with_context(|| {
        format!(
            "opening the embedded store in {}",
            config.store_dir().display()
        )
    })
}

/// Connects to PostgreSQL and applies migrations, retrying with backoff while it is
/// unreachable (`/readyz` says `503` meanwhile). `Ok(None)` if shutdown came first; an
/// error if TLS refused the connection as configured, which no retry mends
/// ([`crate::tls::refused_postgres`]).
async fn connect_postgres(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<PgStore>> {
    let attempt = || async {
        let store = PgStore::connect(url).await?;
        store.migrate().await?;
        Ok::<_, crate::store::StoreError>(store)
    };
    let tried = retried(
        shutdown,
        "PostgreSQL is not reachable yet; not ready",
        |e| !crate::tls::refused_postgres(e) && !migration_refused(e),
        attempt,
    );
    let refused = |e| {
        if migration_refused(&e) {
            anyhow::Error::new(e).context(
                "the database's schema cannot be brought to this version's, and no retry \
                 mends that: a migration this version does not have (the database was \
                 migrated by a newer version), one applied that differs from this version's, \
                 or one PostgreSQL refuses (what it names)",
            )
        } else {
            crate::tls::postgres_refused(e)
        }
    };
    let Some(store) = tried.await.map_err(refused)? else {
        return Ok(None);
    };
    tracing::info!("connected to PostgreSQL; migrations applied");
    Ok(Some(store))
}

/// Whether applying the migrations failed in a way no retry mends: the applied ones are
/// not this version's (one it lacks, one that differs, one left half-applied), or
/// PostgreSQL refused a migration's SQL for what the database holds or who runs it. A
/// connection that fails or a server that is busy, starting or stopping is retried, as an
/// unreachable one is.
fn migration_refused(e: &crate::store::StoreError) -> bool {
    use sqlx::migrate::MigrateError;
    let crate::store::StoreError::Migrate(e) = e else {
        return false;
    };
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
            let sqlx::Error::Database(e) = e else {
                return false;
            };
            // Connection (08), resources (53), operator intervention (57: shutdown,
            // starting up, cancelled), a rollback (40: deadlock, serialization), a lock
            // not available (55P03) and a read-only transaction (25006: a standby a
            // failover has not promoted yet) pass, and so do a login refused (28) or a
            // database missing (3D) on a connection the migration opens, as they pass
            // on the first; anything else is the SQL refused.
            let code = e.code().unwrap_or_default();
            !["08", "53", "57", "40", "28", "3D"]
                .iter()
                .any(|c| code.starts_with(c))
                && !["55P03", "25006"].contains(&code.as_ref())
        }
        _ => true,
    }
}

/// Runs `attempt` until it succeeds, or fails in a way `passing` does not accept; after a
/// failure that passes it logs `waiting` with the error and waits, backing off, before
/// the next. `Ok(None)` if shutdown came first, even in the middle of an attempt.
async fn retried<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    shutdown: &CancellationToken,
    waiting: &'static str,
    passing: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<Option<T>, E> {
    let mut failures = 0;
    loop {
        let attempted = tokio::select! {
            attempted = attempt() => attempted,
            _ = shutdown.cancelled() => return Ok(None),
        };
        match attempted {
            Ok(done) => return Ok(Some(done)),
            Err(e) if passing(&e) => {
                failures += 1;
                let delay = crate::backoff::backoff(failures);
                tracing::warn!(
                    error = format!("{e:#}"),
                    failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "{waiting}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `widgets migrate`: applies the migrations to `DATABASE_URL`.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let url = config
        .postgres_url()
        .context("widgets migrate needs DATABASE_URL (or --database-url)")?;
    let store = PgStore::connect_waiting(url, PgStore::COMMAND_WAIT)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// What stops the service: SIGTERM, SIGINT (Ctrl-C) or SIGHUP (a closed terminal; nothing
/// is reloaded), listened for from this call on, so that one that comes while the service
/// starts waits for it instead of ending the process at once (the signals' default). The
/// future ends at the first. A second one after that exits the process at once, with
/// status 1 and without the last flush: nothing acknowledged is lost (single node: it is
/// in the WAL; Redis mode: in Redis, dirty for the next flush).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, ?kind, "cannot listen for a signal; it ends the process");
            None
        }
    };
    let mut signals = [
        ("SIGTERM", listen(SignalKind::terminate())),
        ("SIGINT", listen(SignalKind::interrupt())),
        ("SIGHUP", listen(SignalKind::hangup())),
    ];
    async move {
        let first = next_signal(&mut signals).await;
        tracing::info!(
            signal = first,
            "stopping: requests drain, then a last flush; a \
            second signal exits at once"
        );
        // Not owned or awaited, unlike every other task: it has nothing to finish, and a
        // stop that ends by itself ends it with the runtime.
        tokio::spawn(async move {
            let second = next_signal(&mut signals).await;
            tracing::warn!(
                signal = second,
                "a second signal: exiting at once, without the \
                last flush (nothing acknowledged is lost)"
            );
            std::process::exit(1);
        });
    }
}

/// The name of the next of `signals` to come.
async fn next_signal(
    signals: &mut [(&'static str, Option<tokio::signal::unix::Signal>); 3],
) -> &'static str {
    let [(a, sa), (b, sb), (c, sc)] = signals;
    async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
        match signal {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        _ = recv(sa) => a,
        _ = recv(sb) => b,
        _ = recv(sc) => c,
    }
}
