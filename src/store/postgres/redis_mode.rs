//! What Redis mode keeps in PostgreSQL beside the widgets: the fencing epoch a flush
//! must hold, how many flushes have committed, and a log of the last flushes' ids, by
//! which a repair finds a database gone back in time ([`crate::engine`]'s Redis side).

use super::conn::{answer_deadline, is_lock_timeout, pg_millis, CloseUnlessDone, Within};
use super::{one_row, to_i64, PgStore, HIGH_WATER};
use crate::store::{FlushId, StoreError};
use sqlx::{Postgres, Transaction};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What Redis mode checks a Redis server and PostgreSQL against each other with
/// ([`PgStore::redis_fence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The highest version any flush has committed.
    pub high: u64,
    /// The fencing epoch (`redis_epoch`).
    pub epoch: u64,
    /// How many flushes have committed.
    pub flushes: u64,
}

impl PgStore {
    /// [`PgStore::high_water`], Redis mode's fencing epoch and how many flushes have
    /// committed, in one query.
    pub async fn redis_fence(&self) -> Result<Fence, StoreError> {
        let (high, epoch, flushes): (i64, Option<i64>, i64) = self
            .read_optional_row(
                "SELECT version, (SELECT epoch FROM redis_epoch), flushes \
                 FROM version_high_water",
                self.flush.statement_deadline(),
            )
            .await?
            .ok_or(StoreError::MissingRow {
                table: "version_high_water",
            })?;
        let epoch = epoch.ok_or(StoreError::MissingRow {
            table: "redis_epoch",
        })?;
        Ok(Fence {
            high: high.max(0) as u64,
            epoch: epoch.max(0) as u64,
            flushes: flushes.max(0) as u64,
        })
    }

    /// The ids `flush_log` holds for those of `counts` it still keeps.
    pub async fn logged_flushes(&self, counts: &[u64]) -> Result<HashMap<u64, i64>, StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        let counts: Vec<i64> = counts.iter().map(|&c| to_i64(c)).collect();
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT flushes, id FROM flush_log WHERE flushes = ANY($1::int8[])")
                .bind(&counts)
                .fetch_all(conn.conn())
                .within(deadline)
                .await?;
        conn.done();
        Ok(rows
            .into_iter()
            .map(|(c, id)| (c.max(0) as u64, id))
            .collect())
    }

    /// Which of `serials` have a widget row.
    pub async fn existing(&self, serials: &[&str]) -> Result<HashSet<String>, StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT serial_number FROM widgets WHERE serial_number = ANY($1::text[])",
        )
        .bind(serials)
        .fetch_all(conn.conn())
        .within(deadline)
        .await?;
        conn.done();
        Ok(found.into_iter().collect())
    }

    /// Raises Redis mode's fencing epoch, once every flush in flight under the current one
    /// has committed or failed; every batch taken under an older one is refused from now
    /// on. Returns what [`PgStore::redis_fence`] does: the high-water mark, read once those
    /// flushes have ended (so it covers every version they wrote), and the new epoch.
    ///
    /// Waits for those flushes at most `wait` (PostgreSQL's `lock_timeout`), or without it
    /// the flush timeout, then fails: a flush stalled in PostgreSQL holds its lock as long
    /// as it stalls, and must not hold up a request that checks a Redis server, nor a load.
    /// Each statement waits at most twice that for PostgreSQL's answer, and a transaction
    /// left open on a connection that stalls ends in PostgreSQL after as long: it would
    /// hold every flush.
    pub async fn raise_redis_epoch(
        &self,
        wait: Option<Duration>,
    ) -> Result<(u64, u64), StoreError> {
        self.raise_redis_epoch_above(wait, 0).await
    }

    /// [`PgStore::raise_redis_epoch`], to above `floor` too: a database gone back in time
    /// may hold an epoch below the one Redis keeps, and every flush would be refused.
    pub async fn raise_redis_epoch_above(
        &self,
        wait: Option<Duration>,
        floor: u64,
    ) -> Result<(u64, u64), StoreError> {
        let wait = wait.unwrap_or(self.flush.timeout);
        let deadline = answer_deadline(wait);
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        let mut tx = conn.begin().within(deadline).await?;
        sqlx::query(
            "SELECT set_config('lock_timeout', $1, true), \
                    set_config('idle_in_transaction_session_timeout', $2, true)",
        )
        .bind(pg_millis(wait))
        .bind(pg_millis(deadline))
        .execute(&mut *tx)
        .within(deadline)
        .await?;
        let raised = sqlx::query_scalar(
            "UPDATE redis_epoch SET epoch = GREATEST(epoch, $1) + 1 RETURNING epoch",
        )
        .bind(to_i64(floor))
        .fetch_one(&mut *tx)
        .within(deadline)
        .await;
        let epoch: i64 = match raised {
            Err(e) if is_lock_timeout(&e) => {
                // PostgreSQL answered: the connection is sound, and goes back to the pool.
                tx.rollback().within(deadline).await?;
                conn.done();
                return Err(StoreError::EpochHeld { waited: wait });
            }
            other => other.map_err(one_row("redis_epoch"))?,
        };
        tx.commit().within(deadline).await?;
        // After the commit, so that its snapshot is taken after the flushes the raise
        // waited for whatever isolation level the database's default is (under repeatable
        // read, a snapshot in the transaction would be the one before the raise waited).
        let high: i64 = sqlx::query_scalar(HIGH_WATER)
            .fetch_one(conn.conn())
            .within(deadline)
            .await
            .map_err(one_row("version_high_water"))?;
        conn.done();
        Ok((high.max(0) as u64, epoch.max(0) as u64))
    }
}

/// How many flushes `flush_log` keeps.
const FLUSH_LOG_KEPT: u64 = 10_000;

/// Logs `flush`, and every hundredth flush drops the rows the log no longer keeps.
pub(super) async fn log_flush(
    tx: &mut Transaction<'_, Postgres>,
    flush: FlushId,
    deadline: Duration,
) -> Result<(), sqlx::Error> {
    // A row already there under the count is another history's (a log restored apart
    // from the count): this flush's takes its place.
    sqlx::query(
        "INSERT INTO flush_log (flushes, id) VALUES ($1, $2) \
         ON CONFLICT (flushes) DO UPDATE SET id = excluded.id",
    )
    .bind(to_i64(flush.count))
    .bind(flush.id)
    .execute(&mut **tx)
    .within(deadline)
    .await?;
    if flush.count.is_multiple_of(100) {
        sqlx::query("DELETE FROM flush_log WHERE flushes <= $1")
            .bind(to_i64(flush.count.saturating_sub(FLUSH_LOG_KEPT)))
            .execute(&mut **tx)
            .within(deadline)
            .await?;
    }
    Ok(())
}
