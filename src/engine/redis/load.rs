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

use super::{unavailable, RedisEngine};
use crate::domain::{PortType, Serial, Widget};
use crate::engine::EngineError;
use crate::store::{PgStore, Store};
use redis::AsyncCommands;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the load lock lasts unless its holder renews it (every third of it): what a
/// loader that dies costs the other instances.
pub const LOCK_LEASE: Duration = Duration::from_secs(5);
/// Widgets per pipeline sent to Redis while loading.
const PIPELINE: usize = 1000;

/// Returns once Redis holds PostgreSQL's widgets (loaded by this instance or another);
/// `Ok(false)` if `stop` came first.
pub async fn ensure_loaded(
    engine: &RedisEngine,
    store: &PgStore,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut conn = engine.conn();
    let token = format!("{}-{}", std::process::id(), fastrand::u64(..));
    loop {
        if conn
            .exists::<_, bool>(engine.key("loaded"))
            .await
            .map_err(unavailable)?
        {
            raise_seq(engine, store.max_version().await?).await?;
            return Ok(true);
        }
        let locked: Option<String> = redis::cmd("SET")
            .arg(engine.key("load_lock"))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_LEASE.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if locked.is_some() {
            let loading = async {
                if !conn
                    .exists::<_, bool>(engine.key("loaded"))
                    .await
                    .map_err(unavailable)?
                {
                    load(engine, store).await?;
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
                anyhow::ensure!(
                    renewed == 1,
                    "the Redis load lock expired while this instance held it (it stalled for \
                     longer than {lease:?}); another instance is loading"
                );
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

async fn load(engine: &RedisEngine, store: &PgStore) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Serial, Widget)>();
    let reading = store.load(Box::new(move |serial, widget| {
        let _ = tx.send((serial, widget));
    }));
    let writing = async {
        let mut conn = engine.conn();
        let (mut count, mut max_version) = (0u64, 0u64);
        let mut batch = Vec::with_capacity(PIPELINE);
        loop {
            let done = rx.recv_many(&mut batch, PIPELINE).await == 0;
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                for (serial, w) in batch.drain(..) {
                    max_version = max_version.max(w.version);
                    count += 1;
                    pipe.hset_multiple(
                        engine.key(&format!("w:{serial}")),
                        &[
                            ("name", w.name.as_str().to_owned()),
                            ("ports", w.ports.bits().to_string()),
                            ("version", w.version.to_string()),
                        ],
                    )
                    .ignore();
                    let peers: Vec<(&str, &str)> = PortType::ALL
                        .into_iter()
                        .filter_map(|p| w.peer(p).map(|s| (field(p), s.as_str())))
                        .collect();
                    if !peers.is_empty() {
                        pipe.hset_multiple(engine.key(&format!("c:{serial}")), &peers)
                            .ignore();
                    }
                }
                let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
            }
            if done {
                break;
            }
        }
        Ok::<_, EngineError>((count, max_version))
    };
    let (read, written) = tokio::join!(reading, writing);
    read?;
    let (count, max_version) = written?;
    raise_seq(engine, max_version.max(store.max_version().await?)).await?;
    let mut conn = engine.conn();
    let _: () = redis::pipe()
        .set(engine.key("count"), count)
        .set(engine.key("loaded"), 1)
        .incr(engine.key("loads"), 1)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    tracing::info!(
        widgets = count,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded Redis from PostgreSQL"
    );
    Ok(())
}

/// Moves `seq` up to at least `floor` (never down), atomically. Every instance does it at
/// start, so a Redis that lost increments (a crash under `appendfsync everysec`) cannot
/// hand out versions PostgreSQL already holds.
async fn raise_seq(engine: &RedisEngine, floor: u64) -> Result<(), EngineError> {
    let _: () = redis::Script::new(
        "local k = KEYS[1] \
         if tonumber(redis.call('GET', k) or '0') < tonumber(ARGV[1]) then \
           redis.call('SET', k, ARGV[1]) end",
    )
    .key(engine.key("seq"))
    .arg(floor)
    .invoke_async(&mut engine.conn())
    .await
    .map_err(unavailable)?;
    Ok(())
}

fn field(port: PortType) -> &'static str {
    match port {
        PortType::P => "p",
        PortType::R => "r",
        PortType::Q => "q",
    }
}
