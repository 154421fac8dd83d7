//! Bringing a PostgreSQL that went back in time in line with Redis.
//!
//! A database restored from an older backup, or failed over to a replica that lagged, has
//! lost flushes whose dirty marks Redis has already cleared: those widgets are then only in
//! Redis, and PostgreSQL would miss them until they changed again (and a Redis that lost
//! its data later would be loaded without them). Every flush counts itself in PostgreSQL
//! (`version_high_water.flushes`) as it commits and logs the count with an id of its own
//! (`flush_log`), and Redis keeps the count and id of the latest flushes it acknowledged
//! (`acked`, written by the ACK script after the commit). So each flush round reads Redis
//! first and PostgreSQL second: a database whose count is below a flush Redis
//! acknowledged, or whose log holds another id under its count (a flush of its new
//! history that brought the count back), has lost that flush; so has one under whose count
//! two ids were acknowledged. Redis keeps the lost count (`lost_flush`) until a repair, so
//! the flushes of the new history cannot push it out of sight. A database whose fencing
//! epoch is below Redis's (raised in PostgreSQL first, always) has gone back too.
//!
//! The repair runs under the load lock, with a token that pauses every instance's flushes
//! (the TAKE script takes nothing while it is held), on a Redis in line with PostgreSQL
//! (checked, loaded, `seq` not below the database's versions). It raises the fencing epoch
//! above Redis's (so no batch taken before commits, and flushes commit again where the
//! database kept an older epoch). If only the epoch had gone back (a flush acknowledged
//! since Redis was loaded or repaired, and every one in the database), that is all, and
//! `acked` is kept: a flush acknowledged meanwhile may be one the database lost. Otherwise
//! it compares every widget PostgreSQL holds with Redis, and every widget Redis holds with
//! PostgreSQL, and marks dirty again each one PostgreSQL lost (scripts::MARK_LOST), linked
//! to its peers on both sides, so that the flushes after it write each lost change whole;
//! then it forgets the flushes acknowledged before (the ones from then on are the ones to
//! check). Either way it forgets the lost count and lets the flushes go on. Writes and
//! reads go on meanwhile. A repair that fails keeps `acked` and `lost_flush`, so the next
//! one starts over; it is tried again after a backoff, and no flush is written until one
//! succeeds (a lost widget not yet marked would be written without its peers).

use super::load::{self, holding_lock, lock_token, release_lock, take_lock, KeyScan};
use super::{scripts, unavailable, RedisEngine};
use crate::domain::PortType;
use crate::engine::EngineError;
use crate::store::postgres::Mirrors;
use crate::store::{Fence, FlushId};
use redis::AsyncCommands;

/// What a repair that stalled past its lease is told at its next step: another instance
/// may be repairing, and its lock lets the flushes go on.
const LOST_WHILE_REPAIRING: load::LockLost = load::LockLost::new("repaired PostgreSQL");

/// What the check found: PostgreSQL's fence, and what Redis had acknowledged before it.
#[derive(Debug, Clone)]
pub struct Found {
    pub postgres: Fence,
    /// The fencing epoch Redis holds.
    pub epoch: u64,
    /// The count of a flush found lost before (`lost_flush`).
    pub recorded: Option<u64>,
    /// The first of them PostgreSQL does not hold.
    pub lost: Option<FlushId>,
    /// How many flushes Redis has acknowledged since it was loaded or last repaired.
    pub acked: usize,
}

impl Found {
    fn behind(&self) -> bool {
        self.lost_flush().is_some() || self.postgres.epoch < self.epoch
    }

    /// The count of a flush PostgreSQL lost, found now or before.
    pub fn lost_flush(&self) -> Option<u64> {
        self.recorded.or(self.lost.map(|f| f.count))
    }
}

/// Redis's acknowledged flushes and epoch, then PostgreSQL's, in that order: every flush
/// and epoch Redis holds was PostgreSQL's first, so a database that has not gone back in
/// time shows them all after. A flush of Redis's is lost if the database's count is below
/// it, or its log holds another id under that count (a log that no longer keeps the count
/// says nothing). Returns the fence, and what was found if the database has gone back.
pub async fn postgres_behind(engine: &RedisEngine) -> Result<(Fence, Option<Found>), EngineError> {
    let flat: Vec<String> = scripts::ACKED
        .prepare_invoke()
        .arg(engine.prefix())
        .invoke_async(&mut engine.conn())
        .await
        .map_err(unavailable)?;
    let bad = || EngineError::Unavailable("Redis holds a bad acknowledged flush".into());
    let [epoch, recorded, acked @ ..] = &flat[..] else {
        return Err(bad());
    };
    let acked = acked
        .chunks(2)
        .map(|pair| match pair {
            [id, count] => Some(FlushId {
                count: count.parse().ok()?,
                id: id.parse().ok()?,
            }),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    let postgres_failed = |e| EngineError::Unavailable(format!("PostgreSQL: {e}"));
    let store = engine.store();
    let postgres = store.redis_fence().await.map_err(postgres_failed)?;
    let logged = if acked.is_empty() {
        Default::default()
    } else {
        let counts: Vec<u64> = acked.iter().map(|f| f.count).collect();
        store
            .logged_flushes(&counts)
            .await
            .map_err(postgres_failed)?
    };
    let lost = acked
        .iter()
        .copied()
        .find(|f| f.count > postgres.flushes || logged.get(&f.count).is_some_and(|&id| id != f.id));
    let found = Found {
        postgres,
        epoch: epoch.parse().map_err(|_| bad())?,
        recorded: recorded.parse().ok(),
        lost,
        acked: acked.len(),
    };
    if !found.behind() {
        return Ok((postgres, None));
    }
    if let (None, Some(lost)) = (found.recorded, found.lost) {
        // Kept until a repair: the flushes of the new history push `acked` on. Only while
        // `acked` still holds it: a repair that has just forgotten it is not undone.
        let _: i64 = scripts::RECORD_LOST
            .prepare_invoke()
            .arg(engine.prefix())
            .arg(lost.count)
            .arg(lost.id)
            .invoke_async(&mut engine.conn())
            .await
            .map_err(unavailable)?;
    }
    Ok((postgres, Some(found)))
}

/// Counts and logs (at most once a second) that a flush round found PostgreSQL behind.
pub fn report(found: &Found) {
    metrics::counter!("widgets_postgres_behind_total").increment(1);
    if let Some(count) = crate::metrics::throttled("postgres behind redis") {
        tracing::error!(
            count,
            postgres_flushes = found.postgres.flushes,
            postgres_epoch = found.postgres.epoch,
            lost_flush = ?found.lost,
            found_before = ?found.recorded,
            redis_epoch = found.epoch,
            "PostgreSQL has gone back in time (restored from an older backup, or failed over \
             to a replica that lagged): it lost flushes whose widgets only Redis holds now. \
             No flush is written until they are marked dirty again"
        );
    }
}

/// Marks dirty again every widget PostgreSQL lost (see the module's text); returns whether
/// it did, `false` if another instance holds the load lock (repairing, or loading Redis).
pub async fn repair(engine: &RedisEngine) -> anyhow::Result<bool> {
    let token = format!("repair-{}", lock_token());
    if !take_lock(engine, &token).await? {
        return Ok(false);
    }
    let done = holding_lock(engine, &token, load::LOCK_LEASE, async {
        // Checked again under the lock: another instance may have repaired it just now.
        let (_, Some(found)) = postgres_behind(engine).await? else {
            return Ok(());
        };
        engine.check_server().await?;
        let started = std::time::Instant::now();
        let store = engine.store();
        // Waits for the flushes in flight; none taken before commits after it.
        let (high, epoch) = store.raise_redis_epoch_above(None, found.epoch).await?;
        engine.raise_epoch(epoch).await?;
        // A Redis behind the database is loaded again from it instead (load::resync): its
        // widgets are not the newer ones.
        let (_, seq, loaded) = engine.server_state().await?;
        anyhow::ensure!(
            loaded && seq >= high,
            "Redis is behind PostgreSQL (seq {seq}, PostgreSQL's versions up to {high}): it \
             is loaded again from PostgreSQL first"
        );
        // With a flush acknowledged since Redis was loaded or repaired, and every such
        // flush in the database, the database holds everything Redis took for written; the
        // epoch alone went back. Without one, nothing tells, and the widgets are compared.
        if found.lost_flush().is_none() && found.acked > 0 {
            tracing::warn!(
                postgres_epoch = found.postgres.epoch,
                redis_epoch = found.epoch,
                epoch,
                "PostgreSQL's fencing epoch had gone back below Redis's; raised above it"
            );
            // `acked` stays: each flush it holds is in the database, and one acknowledged
            // while this ran (committed before the failover, and lost) must still tell.
            finish(engine, &token, Forget::LostFlush).await?;
            return Ok(());
        }
        tracing::warn!(
            postgres_flushes = found.postgres.flushes,
            lost_flush = ?found.lost_flush(),
            "comparing PostgreSQL with Redis to write again the widgets it lost; flushes wait"
        );
        let fresh: u64 = engine
            .conn()
            .incr(engine.key("seq"), 1)
            .await
            .map_err(unavailable)?;
        let mut marked = mark_lost_in_postgres(engine, &token, fresh).await?;
        marked += mark_missing_from_postgres(engine, &token, fresh).await?;
        finish(engine, &token, Forget::Acknowledged).await?;
        tracing::warn!(
            marked,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the widgets PostgreSQL lost are dirty again; the flushes write them from Redis"
        );
        Ok(())
    })
    .await;
    release_lock(engine, &token).await?;
    done.map(|()| true)
}

/// What a repair forgets at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forget {
    /// The lost flush's count only.
    LostFlush,
    /// That and every flush acknowledged before: the comparison marked what they lost.
    Acknowledged,
}

/// Ends a repair while `token` still holds the lock: forgets what `forget` says (the
/// flushes from now on are the ones to check), and counts the repair, in Redis (every
/// instance's) and in this instance's metrics.
async fn finish(engine: &RedisEngine, token: &str, forget: Forget) -> anyhow::Result<()> {
    let done: i64 = scripts::FINISH_REPAIR
        .prepare_invoke()
        .arg(engine.prefix())
        .arg(token)
        .arg(if forget == Forget::Acknowledged {
            "1"
        } else {
            "0"
        })
        .invoke_async(&mut engine.conn())
        .await
        .map_err(unavailable)?;
    if done != 1 {
        return Err(LOST_WHILE_REPAIRING.into());
    }
    metrics::counter!("widgets_postgres_repairs_total").increment(1);
    Ok(())
}

/// Compares every widget PostgreSQL holds with Redis's; returns how many it marked.
async fn mark_lost_in_postgres(
    engine: &RedisEngine,
    token: &str,
    fresh: u64,
) -> anyhow::Result<u64> {
    // As the rows are: a one-sided association the database holds is mended by writing
    // both widgets again, which a load that refused it would not allow.
    let (reading, mut batches) = load::widget_batches(engine.store(), Mirrors::Unchecked);
    let marking = async {
        let mut marked = 0;
        while let Some(batch) = batches.next().await {
            let widgets = batch.into_iter().map(|(serial, w)| {
                let peers = PortType::ALL.map(|p| w.peer(p).map(|s| s.as_str().to_owned()));
                (serial.as_str().to_owned(), Some(w.version), peers)
            });
            marked += mark_lost(engine, token, fresh, widgets.collect()).await?;
        }
        Ok::<_, anyhow::Error>(marked)
    };
    let (read, marked) = tokio::join!(reading, marking);
    read?;
    marked
}

/// Looks for every widget Redis holds in PostgreSQL; returns how many it marked (those
/// PostgreSQL has no row for).
async fn mark_missing_from_postgres(
    engine: &RedisEngine,
    token: &str,
    fresh: u64,
) -> anyhow::Result<u64> {
    let widgets = engine.key("w:");
    let mut scan = KeyScan::new(engine, &widgets);
    let mut marked = 0;
    while let Some(keys) = scan.next_page().await? {
        let serials: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(widgets.as_str()))
            .collect();
        if !serials.is_empty() {
            let there = engine.store().existing(&serials).await?;
            let missing: Vec<_> = serials
                .iter()
                .filter(|s| !there.contains(**s))
                .map(|s| ((*s).to_owned(), None, [None, None, None]))
                .collect();
            if !missing.is_empty() {
                marked += mark_lost(engine, token, fresh, missing).await?;
            }
        }
    }
    Ok(marked)
}

/// One widget as PostgreSQL holds it: its serial, its version (`None`: no row) and its
/// peer on P, R, Q.
type Held = (String, Option<u64>, [Option<String>; 3]);

/// Runs MARK_LOST over `widgets`; returns how many it marked.
async fn mark_lost(
    engine: &RedisEngine,
    token: &str,
    fresh: u64,
    widgets: Vec<Held>,
) -> anyhow::Result<u64> {
    let mut script = scripts::MARK_LOST.prepare_invoke();
    script
        .arg(engine.trusted())
        .arg(engine.prefix())
        .arg(token)
        .arg(fresh);
    for (serial, version, peers) in &widgets {
        script.arg(serial).arg(version.map_or(-1, |v| v as i64));
        for peer in peers {
            script.arg(peer.as_deref().unwrap_or(""));
        }
    }
    let answer: Vec<String> = script
        .invoke_async(&mut engine.conn())
        .await
        .map_err(unavailable)?;
    match &answer[..] {
        [ok, marked] if ok == "ok" => Ok(marked.parse().unwrap_or(0)),
        [lost] if lost == "lock_lost" => Err(LOST_WHILE_REPAIRING.into()),
        _ => anyhow::bail!("the Redis server changed while PostgreSQL was compared with it"),
    }
}

#[cfg(test)]
mod tests {
    //! Against a real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) and PostgreSQL
    //! (`widgets_testkit::pg::admin_url`), as tests/redis.rs runs the rest of the repair.
    use super::*;
    use crate::domain::{Create, Name, Ports, Serial};
    use crate::store::PgStore;
    use widgets_testkit::pg::TestDb;

    /// A prefix in the shape tests/common gives (`test:<pid>:<random>:`), so its keys are
    /// swept as theirs are once this process is gone.
    fn prefix() -> String {
        format!("test:{}:{}:", std::process::id(), fastrand::u64(..))
    }

    #[tokio::test]
    async fn a_repair_whose_lock_another_holds_now_marks_nothing() {
        let url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let db = TestDb::create().await;
        let store = PgStore::connect(&db.url).await.unwrap();
        store.migrate().await.unwrap();
        let engine = RedisEngine::connect(&url, &prefix(), 1000, store.clone())
            .await
            .unwrap_or_else(|e| panic!("no Redis at {url} (set REDIS_URL): {e}"));
        let stop = tokio_util::sync::CancellationToken::new();
        assert!(load::ensure_loaded(&engine, &store, &stop).await.unwrap());
        let serial = Serial::parse("serial", "lost-1").unwrap();
        let create = Create {
            serial: serial.clone(),
            name: Name::parse("name", "w").unwrap(),
            ports: Ports::from_list("ports", &[PortType::P]).unwrap(),
        };
        engine.execute(create).await.unwrap();
        let dirty = format!("{}dirty", engine.prefix());
        let lock = format!("{}load_lock", engine.prefix());
        let mut conn = engine.conn();
        let before: Option<String> = conn.hget(&dirty, serial.as_str()).await.unwrap();
        let fresh = 1_000_000;
        // PostgreSQL holds no row of a widget Redis holds: the repair would mark it.
        let lost = || vec![(serial.as_str().to_owned(), None, [None, None, None])];

        // The repair stalled past its lease, and another took the lock meanwhile.
        let _: () = conn.set(&lock, "theirs").await.unwrap();
        let stale = mark_lost(&engine, "mine", fresh, lost()).await;
        assert!(stale.is_err(), "a repair marked without its lock");
        let after: Option<String> = conn.hget(&dirty, serial.as_str()).await.unwrap();
        assert_eq!(after, before, "a repair without its lock changed a mark");

        // The holder of the lock marks it, at the fresh version.
        assert_eq!(
            mark_lost(&engine, "theirs", fresh, lost()).await.unwrap(),
            1
        );
        let marked: Option<String> = conn.hget(&dirty, serial.as_str()).await.unwrap();
        assert!(
            marked.as_deref().is_some_and(|m| m.ends_with(":1000000")),
            "{marked:?}"
        );
        drop(engine);
        db.drop_db().await;
    }
}
