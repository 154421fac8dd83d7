//! Start-up, serving and shutdown.
//!
//! [`start`] binds the listener and serves at once (`/healthz` answers, `/readyz` says
//! `503` while recovering), then recovers in the background: open the store, load it into
//! the map, replay the WAL above the store's checkpoint, start the sequencer and the
//! flusher. [`RunningApp::stop`] (what `SIGTERM` and Ctrl-C trigger) stops accepting,
//! finishes in-flight requests, stops the flusher, flushes once more, and syncs and closes
//! the WAL.

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::MemoryEngine;
use crate::flush::Flusher;
use crate::listener::CappedListener;
use crate::store::{SledStore, Store};
use crate::wal::{RealFs, WalFs};
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often shutdown retries its last flush before leaving the rest to the WAL.
const FINAL_FLUSH_ATTEMPTS: u32 = 3;

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
    if config.database_url.is_some() {
        bail!("DATABASE_URL is set, but this build has no PostgreSQL store yet: unset it to use the embedded store");
    }
    if config.redis_url.is_some() {
        bail!("REDIS_URL is set, but this build has no Redis mode yet: unset it");
    }
    crate::metrics::handle();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), fsync = ?config.fsync, "listening");
    if config.fsync != crate::wal::FsyncMode::Always {
        tracing::warn!(fsync = ?config.fsync, "WAL fsync is not `always`: a crash can lose acknowledged writes");
    }
    let listener = CappedListener::new(listener, config.max_connections as usize);
    let state = AppState::new();
    let shutdown = CancellationToken::new();
    let router = api::router(state.clone(), config.max_body_bytes);
    let serve =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let server = tokio::spawn(async move { serve.await });
    let (recovered_tx, recovery) = watch::channel(None);
    let task = tokio::spawn(supervise(
        config,
        fs,
        state,
        shutdown.clone(),
        server,
        recovered_tx,
    ));
    Ok(RunningApp {
        addr,
        shutdown,
        recovery,
        task,
    })
}

async fn supervise(
    config: Config,
    fs: Arc<dyn WalFs>,
    state: AppState,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    recovered: watch::Sender<Option<Result<(), String>>>,
) -> anyhow::Result<()> {
    let outcome = tokio::select! {
        r = recover(&config, fs) => r,
        _ = shutdown.cancelled() => {
            server.await??;
            return Ok(());
        }
    };
    let (engine, store) = match outcome {
        Ok(parts) => parts,
        Err(e) => {
            recovered.send_replace(Some(Err(format!("{e:#}"))));
            shutdown.cancel();
            server.await??;
            return Err(e);
        }
    };
    state.set_engine(engine.clone());
    recovered.send_replace(Some(Ok(())));
    tracing::info!(widgets = engine.len(), "ready");

    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(
        Flusher::new(engine.clone(), store.clone(), config.flush_interval)
            .run(flusher_stop.clone()),
    );
    shutdown.cancelled().await;
    let served = server.await;
    flusher_stop.cancel();
    flusher.await.context("the flusher panicked")?;
    let last = Flusher::new(engine.clone(), store, config.flush_interval);
    for attempt in 1..=FINAL_FLUSH_ATTEMPTS {
        match last.flush_once().await {
            Ok(count) => {
                tracing::info!(count, "final flush done");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "final flush failed; the WAL keeps every change")
            }
        }
    }
    tokio::task::spawn_blocking(move || engine.stop())
        .await
        .context("stopping the sequencer")?;
    served??;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the store into a map, replays the WAL over it and starts the engine.
async fn recover(
    config: &Config,
    fs: Arc<dyn WalFs>,
) -> anyhow::Result<(Arc<MemoryEngine>, Arc<SledStore>)> {
    let started = Instant::now();
    let store_dir = config.store_dir();
    let cache = config.sled_cache_bytes;
    let store = tokio::task::spawn_blocking(move || SledStore::open(&store_dir, cache))
        .await?
        .with_context(|| {
            format!(
                "opening the embedded store in {}",
                config.store_dir().display()
            )
        })?;
    let map = Arc::new(crate::engine::memory::WidgetMap::new());
    let sink = map.clone();
    let checkpoint = store
        .load(Box::new(move |serial, widget| {
            sink.pin().insert(serial, widget);
        }))
        .await
        .context("loading the embedded store")?;
    let map = Arc::try_unwrap(map).map_err(|_| anyhow::anyhow!("the store kept the map"))?;
    tracing::info!(
        widgets = map.len(),
        checkpoint,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store loaded"
    );
    let wal_dir = config.wal_dir();
    let settings = config.engine_settings();
    let engine = tokio::task::spawn_blocking(move || {
        MemoryEngine::start(map, checkpoint, &wal_dir, fs, settings)
    })
    .await?
    .context("recovering the WAL")?;
    Ok((Arc::new(engine), Arc::new(store)))
}
