//! Filling an empty Redis from PostgreSQL, once, however many instances start together.
//!
//! The first instance to take `load_lock` (SET NX with a short lease, renewed while it
//! loads) streams every widget out of PostgreSQL into Redis and sets `loaded`. The lock is
//! released only by its holder (compare and delete); a loader that dies stops renewing,
//! and another instance takes over once the lease runs out, seconds later. Every
//! instance, loader or not, raises the version counter `seq` above every version
//! PostgreSQL holds (tombstones included) before it serves. The others wait for
//! `loaded`; nobody answers `/readyz` before it is there. A Redis that lost its data
//! (restarted without AOF) has no `loaded` and is filled again from PostgreSQL. `loads`
//! counts the fills, for operators (and tests) to see it happened once.

use super::{scripts, unavailable, RedisEngine, Take};
use crate::domain::{PortType, Serial, Widget};
use crate::engine::EngineError;
use crate::store::postgres::Mirrors;
use crate::store::{PgStore, Store, StoreError};
use anyhow::Context;
use redis::AsyncCommands;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the load lock lasts unless its holder renews it (every third of it): what a
/// loader that dies costs the other instances.
pub const LOCK_LEASE: Duration = Duration::from_secs(5);
/// Widgets per batch written to Redis while loading (one script each), and keys per
/// `SCAN` while clearing.
const BATCH: usize = 1000;

/// The load lock expired while this instance held it (it stalled for longer than the
/// lease), so another instance may be loading: this one stops, leaving its work unfinished.
#[derive(Debug, thiserror::Error)]
#[error(
    "the Redis load lock expired while this instance {doing} (it stalled for longer than the \
     {lease:?} lease); another instance may hold it now"
)]
pub struct LockLost {
    doing: &'static str,
    lease: Duration,
}

impl LockLost {
    /// The lock lost while this instance did `doing`, past [`LOCK_LEASE`].
    pub(super) const fn new(doing: &'static str) -> Self {
        Self {
            doing,
            lease: LOCK_LEASE,
        }
    }
}

/// What a loader is told whose lock was taken while it loaded: at a batch or at its finish.
const LOST_WHILE_LOADING: LockLost = LockLost {
    doing: "loaded",
    lease: LOCK_LEASE,
};

/// Whether a failure to connect to Redis or to load it is one that passes: Redis or
/// PostgreSQL unreachable, stalled past a response timeout, or restarting, flushes in
/// flight holding the fencing epoch, or the load lock lost to a stall. The start retries
/// those with backoff; any other failure (damaged rows in PostgreSQL, a bug) fails it.
pub fn passing(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<EngineError>(),
            Some(EngineError::Unavailable(_))
        ) || matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::Postgres(_) | StoreError::EpochHeld { .. })
        ) || cause.is::<LockLost>()
    })
}

/// Returns once Redis holds PostgreSQL's widgets (loaded by this instance or another);
/// `Ok(false)` if `stop` came first.
pub async fn ensure_loaded(
    engine: &RedisEngine,
    store: &PgStore,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut conn = engine.conn();
    let token = lock_token();
    loop {
        // A loaded Redis is checked against PostgreSQL by the first script this instance
        // runs on it (RedisEngine::check_server), and brought in line if behind.
        if conn
            .exists::<_, bool>(engine.key("loaded"))
            .await
            .map_err(unavailable)?
        {
            return Ok(true);
        }
        if take_lock(engine, &token).await? {
            let loading = async {
                if !conn
                    .exists::<_, bool>(engine.key("loaded"))
                    .await
                    .map_err(unavailable)?
                {
                    load(engine, store, &token).await?;
                }
                Ok(())
            };
            let loaded = holding_lock(engine, &token, LOCK_LEASE, loading).await;
            release_lock(engine, &token).await?;
            loaded?;
            return Ok(true);
        }
        tracing::info!("another instance is loading Redis from PostgreSQL; waiting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => return Ok(false),
        }
    }
}

/// Takes the load lock as `token` for one lease, if no loader holds it.
pub(super) async fn take_lock(engine: &RedisEngine, token: &str) -> Result<bool, EngineError> {
    let locked: Option<String> = redis::cmd("SET")
        .arg(engine.key("load_lock"))
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(LOCK_LEASE.as_millis() as u64)
        .query_async(&mut engine.conn())
        .await
        .map_err(unavailable)?;
    Ok(locked.is_some())
}

/// A token no other loader has.
pub(super) fn lock_token() -> String {
    format!("{}-{}", std::process::id(), fastrand::u64(..))
}

/// Widgets per round while the dirty set of a server being brought in line is written.
const DRAIN_ROUND: usize = 2000;

/// Brings a Redis server that is behind PostgreSQL (restored from an older snapshot,
/// failed over to a lagging replica, an AOF that lost its last writes) or that lost its
/// data back in line, under the load lock: the widgets it still has dirty go to PostgreSQL
/// first (whole changes, as every flush; where PostgreSQL holds a newer version of a row,
/// the newer stays), then its widgets are cleared and loaded again from PostgreSQL, with
/// `seq` above every version there. Returns whether the server is now trusted: `false` if
/// another instance holds the lock (it is doing the same; the next round checks again).
pub async fn resync(engine: &RedisEngine) -> anyhow::Result<bool> {
    match engine.check_server().await {
        Ok(()) => return Ok(true),
        Err(e) => tracing::debug!(error = %e, "Redis needs bringing in line"),
    }
    let token = lock_token();
    if !take_lock(engine, &token).await? {
        return Ok(false);
    }
    let done = holding_lock(engine, &token, LOCK_LEASE, async {
        let store = engine.store();
        // PostgreSQL first, as in RedisEngine::check_server.
        let high = store.high_water().await?;
        let (run_id, seq, loaded) = engine.server_state().await?;
        if loaded && seq >= high {
            // Not behind after all (or another instance has just loaded it): check it.
            engine.check_server().await?;
            return Ok(true);
        }
        tracing::warn!(
            run_id,
            redis_seq = seq,
            postgres_version = high,
            loaded,
            "loading Redis again from PostgreSQL"
        );
        // PostgreSQL's rows must load before Redis is touched: a load that failed after the
        // clear would leave every instance without data.
        store
            .load(Box::new(|_, _| {}))
            .await
            .context("PostgreSQL's rows cannot be loaded; Redis is left as it is")?;
        // No batch taken before commits from now on; this drain's own commit under the new
        // epoch. And no write anywhere: every write script needs `loaded`.
        let (_, epoch) = store.raise_redis_epoch(None).await?;
        engine.raise_epoch(epoch).await?;
        // A Redis loaded again from PostgreSQL has acknowledged nothing the database lacks:
        // the flushes it kept are forgotten before its dirty widgets are written.
        let _: () = engine
            .conn()
            .del(&[
                engine.key("loaded"),
                engine.key("acked"),
                engine.key("lost_flush"),
            ])
            .await
            .map_err(unavailable)?;
        let drained = drain_dirty(engine, &run_id).await?;
        let cleared = clear(engine).await?;
        load(engine, store, &token).await?;
        let (now, seq, loaded) = engine.server_state().await?;
        anyhow::ensure!(
            now == run_id && loaded && seq >= high,
            "the Redis server changed while it was loaded again"
        );
        metrics::counter!("widgets_redis_resyncs_total").increment(1);
        tracing::warn!(
            run_id,
            drained,
            cleared,
            "Redis is in line with PostgreSQL again"
        );
        engine.trust(&run_id);
        Ok(true)
    })
    .await;
    release_lock(engine, &token).await?;
    done
}

/// Writes every widget dirty on the server `run_id` to PostgreSQL, whole changes at a
/// time; returns how many.
async fn drain_dirty(engine: &RedisEngine, run_id: &str) -> anyhow::Result<usize> {
    let mut drained = 0;
    loop {
        let Take::Taken(taken) = engine.take_on(run_id, DRAIN_ROUND, 0).await? else {
            anyhow::bail!("the Redis server changed while its dirty widgets were written");
        };
        if taken.items.is_empty() {
            return Ok(drained);
        }
        drained += taken.items.len();
        let (batch, acks) = taken.into_flush();
        engine.store().write_batch(batch).await?;
        // Known to be behind: PostgreSQL keeps its newer rows, and the widgets are
        // loaded again from it next.
        engine
            .ack_up_to(&acks.entries, acks.whole_set_at.as_deref(), 0, acks.flush())
            .await?;
    }
}

/// Deletes `loaded` (so every instance refuses to serve meanwhile), then every widget,
/// association, link and dirty key under the prefix; returns how many widget keys went.
async fn clear(engine: &RedisEngine) -> Result<u64, EngineError> {
    let mut conn = engine.conn();
    let _: () = conn
        .del(&[
            engine.key("loaded"),
            engine.key("dirty"),
            engine.key("dirty_since"),
            engine.key("count"),
        ])
        .await
        .map_err(unavailable)?;
    let kinds = ["w:", "c:", "l:"].map(|kind| engine.key(kind));
    let mut scan = KeyScan::new(engine, &engine.key(""));
    let mut cleared = 0u64;
    while let Some(keys) = scan.next_page().await? {
        let ours: Vec<&String> = keys
            .iter()
            .filter(|k| kinds.iter().any(|kind| k.starts_with(kind.as_str())))
            .collect();
        if !ours.is_empty() {
            cleared += ours.iter().filter(|k| k.starts_with(&kinds[0])).count() as u64;
            let _: () = redis::cmd("UNLINK")
                .arg(&ours)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
    }
    Ok(cleared)
}

/// The keys that start with a prefix, a page of about [`BATCH`] at a time (`SCAN`: a key
/// there throughout is seen at least once; one written or deleted meanwhile, perhaps not).
pub(super) struct KeyScan {
    conn: redis::aio::ConnectionManager,
    pattern: String,
    /// `None` once the scan has come round.
    cursor: Option<u64>,
}

impl KeyScan {
    pub(super) fn new(engine: &RedisEngine, prefix: &str) -> Self {
        Self {
            conn: engine.conn(),
            pattern: format!("{}*", glob_escape(prefix)),
            cursor: Some(0),
        }
    }

    /// The next page (perhaps empty), or `None` once every key has been seen.
    pub(super) async fn next_page(&mut self) -> Result<Option<Vec<String>>, EngineError> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut self.conn)
            .await
            .map_err(unavailable)?;
        self.cursor = (next != 0).then_some(next);
        Ok(Some(keys))
    }
}

/// `text` as a SCAN pattern that matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Runs `work` while holding the load lock as `token`, renewing its `lease` every third
/// of it. Fails, leaving `work` unfinished, if the lock is found to be another's (this
/// instance stalled past its lease and another took over).
pub async fn holding_lock<T>(
    engine: &RedisEngine,
    token: &str,
    lease: Duration,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let renew = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
         return 0",
    );
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.tick().await; // the first tick is now: the lock was just taken
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => {
                let renewed: i64 = renew
                    .key(engine.key("load_lock"))
                    .arg(token)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(&mut engine.conn())
                    .await
                    .map_err(unavailable)?;
                if renewed != 1 {
                    return Err(LockLost { doing: "held it", lease }.into());
                }
            }
        }
    }
}

/// Deletes the load lock if `token` still holds it, never another loader's.
pub async fn release_lock(engine: &RedisEngine, token: &str) -> Result<bool, EngineError> {
    let released: i64 = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
         return 0",
    )
    .key(engine.key("load_lock"))
    .arg(token)
    .invoke_async(&mut engine.conn())
    .await
    .map_err(unavailable)?;
    Ok(released == 1)
}

/// Streams PostgreSQL's widgets into Redis and sets `loaded` with `seq` above every
/// version PostgreSQL holds, while `token` holds the load lock: each batch of widgets is
/// written only if it still does ([`LockLost`] otherwise), so a loader that stalled past
/// its lease writes nothing over what was written since. The fencing epoch is raised
/// first, so no flush taken before commits after the snapshot the load reads. (Public for
/// tests; [`ensure_loaded`] and [`resync`] take the lock first.)
pub async fn load(engine: &RedisEngine, store: &PgStore, token: &str) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (_, epoch) = store.raise_redis_epoch(None).await?;
    let (reading, mut batches) = widget_batches(store, Mirrors::Checked);
    let writing = async {
        let mut conn = engine.conn();
        let (mut count, mut max_version) = (0u64, 0u64);
        while let Some(batch) = batches.next().await {
            let mut script = scripts::LOAD_BATCH.prepare_invoke();
            script.arg(engine.prefix()).arg(token);
            for (serial, w) in batch {
                max_version = max_version.max(w.version);
                count += 1;
                let peers: Vec<(&str, &str)> = PortType::ALL
                    .into_iter()
                    .filter_map(|p| w.peer(p).map(|s| (field(p), s.as_str())))
                    .collect();
                script
                    .arg(serial.as_str())
                    .arg(w.name.as_str())
                    .arg(w.ports.bits())
                    .arg(w.version)
                    .arg(peers.len());
                for (port, peer) in peers {
                    script.arg(port).arg(peer);
                }
            }
            let written: i64 = script.invoke_async(&mut conn).await.map_err(unavailable)?;
            if written != 1 {
                return Err(LOST_WHILE_LOADING.into());
            }
        }
        Ok::<_, anyhow::Error>((count, max_version))
    };
    let (read, written) = tokio::join!(reading, writing);
    read?;
    let (count, max_version) = written?;
    let floor = max_version.max(store.max_version().await?);
    let finished: i64 = scripts::FINISH_LOAD
        .prepare_invoke()
        .arg(engine.prefix())
        .arg(token)
        .arg(count)
        .arg(floor)
        .arg(epoch)
        .invoke_async(&mut engine.conn())
        .await
        .map_err(unavailable)?;
    if finished != 1 {
        return Err(LOST_WHILE_LOADING.into());
    }
    tracing::info!(
        widgets = count,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded Redis from PostgreSQL"
    );
    Ok(())
}

/// Every widget `store` holds, read as `mirrors` says, [`BATCH`] at a time: the read, to
/// be awaited beside what takes the batches (`tokio::join!`), and the batches it fills.
pub(super) fn widget_batches(
    store: &PgStore,
    mirrors: Mirrors,
) -> (
    impl Future<Output = Result<u64, StoreError>> + '_,
    WidgetBatches,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reading = store.read_widgets(
        Box::new(move |serial, widget| {
            let _ = tx.send((serial, widget));
        }),
        mirrors,
    );
    (reading, WidgetBatches { rx })
}

/// What [`widget_batches`] reads, as it comes.
pub(super) struct WidgetBatches {
    rx: tokio::sync::mpsc::UnboundedReceiver<(Serial, Widget)>,
}

impl WidgetBatches {
    /// The next batch of at most [`BATCH`] widgets, or `None` once the read has ended.
    pub(super) async fn next(&mut self) -> Option<Vec<(Serial, Widget)>> {
        let mut batch = Vec::with_capacity(BATCH);
        (self.rx.recv_many(&mut batch, BATCH).await > 0).then_some(batch)
    }
}

fn field(port: PortType) -> &'static str {
    match port {
        PortType::P => "p",
        PortType::R => "r",
        PortType::Q => "q",
    }
}
