//! The PostgreSQL store: `widgets` rows, one narrow table per port type for associations
//! (both directions stored), and the checkpoint LSN, all written in one transaction per
//! flush (schema in `migrations/`).
//!
//! A flush writes only what changed: the widget row when a widget was created or deleted,
//! and the association rows of the ports whose peer changed. Rows are written with
//! `UNNEST` arrays in key order, and an upsert or delete only touches a row whose stored
//! version is older, so a retried or reordered batch never writes older state over newer.
//! A deletion leaves a tombstone with its version, and a freed port keeps its association
//! row with no peer, so an older state (from a slower flusher in another instance) can
//! neither bring a deleted widget back nor plug a freed port again.
//! A row PostgreSQL refuses for a reason a retry cannot fix (a constraint, bad data) is
//! found by bisecting the batch under savepoints, logged with its serial, and kept in
//! `flush_rejects`; the rest of the batch and the checkpoint commit, so one bad row never
//! blocks every flush behind it.

use super::{FlushBatch, FlushId, FlushItem, Store, StoreError, Visitor};
use crate::domain::{Name, PortType, Ports, Serial, Widget};
use futures_util::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Acquire, PgConnection, PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The association table of each port type, by port index.
const ASSOCIATION_TABLES: [&str; 3] = ["associations_p", "associations_r", "associations_q"];

/// The session advisory lock a single-node instance holds on its database ("widgets1").
const SINGLE_WRITER_LOCK: i64 = 0x7769_6467_6574_7331;
/// Tries for the lock, 200 ms apart, before a start is refused (about 3 s).
const CLAIM_ATTEMPTS: u32 = 15;
/// The least a load waits for its next row: the first comes once PostgreSQL has joined
/// the widgets with their associations, which over millions of rows takes seconds, however
/// short an operator makes `--pg-flush-timeout`.
const LOAD_ROW_WAIT: Duration = Duration::from_secs(60);
/// The highest version any flush has committed ([`PgStore::high_water`]).
const HIGH_WATER: &str = "SELECT version FROM version_high_water";
/// SQLSTATE `lock_not_available`: `lock_timeout` passed.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE `query_canceled`: a statement past its `statement_timeout`, among others.
const QUERY_CANCELED: &str = "57014";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// What every flush transaction sets for itself, and how long this instance waits for
    /// PostgreSQL's answers (see [`FlushTxSettings::statement_deadline`]).
    flush: FlushTxSettings,
    /// Single node: the fencing token this instance holds, checked in every flush. Unset
    /// in Redis mode, whose instances all write.
    writer: Arc<OnceLock<WriterClaim>>,
    /// The highest checkpoint this instance has loaded or committed: the database's may
    /// not be below it (see `write_batch`).
    checkpoint: Arc<AtomicU64>,
}

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

/// Whether a read of every widget checks that each association row has its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirrors {
    Checked,
    Unchecked,
}

/// A single-node instance's claim on its database: the connection whose session holds the
/// advisory lock (kept open for the process's life), and the token it took.
struct WriterClaim {
    _session: Mutex<PgConnection>,
    token: i64,
}

/// What a flush transaction asks of PostgreSQL, whatever the database or role defaults
/// say: a commit the flusher may trust (it trims the WAL or clears dirty marks after it),
/// and a bound on how long the transaction may run or sit idle, so a stalled connection
/// gives up its locks and its stale batch instead of holding them until TCP gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTxSettings {
    pub synchronous_commit: SynchronousCommit,
    /// `statement_timeout` and `idle_in_transaction_session_timeout` of the transaction.
    pub timeout: Duration,
}

impl FlushTxSettings {
    /// How long this instance waits for PostgreSQL to answer one statement of a flush
    /// (`BEGIN` and `COMMIT` included) before it abandons the flush: twice the bound
    /// PostgreSQL itself puts on the statement, which cannot fire in a backend that stalls
    /// (stopped, swapped out) or behind a network that does. Loads, a single-node start's
    /// other statements, and the reads of the high-water mark and the fencing epoch wait
    /// as long (a load's rows at least [`LOAD_ROW_WAIT`]).
    pub fn statement_deadline(&self) -> Duration {
        answer_deadline(self.timeout)
    }

    /// How long a load waits for its next row (and [`PgStore::max_version`], which reads
    /// every row before it answers): the statement deadline, but at least
    /// [`LOAD_ROW_WAIT`].
    fn row_deadline(&self) -> Duration {
        self.statement_deadline().max(LOAD_ROW_WAIT)
    }
}

/// How long this instance waits for the answer to a statement PostgreSQL itself bounds
/// at `bound` (`statement_timeout`, `lock_timeout`): twice that, since PostgreSQL's own
/// bound cannot fire in a backend or behind a network that stalls.
fn answer_deadline(bound: Duration) -> Duration {
    bound.saturating_mul(2)
}

impl Default for FlushTxSettings {
    fn default() -> Self {
        Self {
            synchronous_commit: SynchronousCommit::On,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The `synchronous_commit` levels a flush may run at: each one waits at least for the
/// primary's own WAL flush, so a commit the flusher sees survives a PostgreSQL crash
/// (`off` and `local` without replicas would not, so `off` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynchronousCommit {
    /// Durable on the primary, and on synchronous standbys' disks if any are configured.
    On,
    /// Durable on the primary only, even with synchronous standbys configured.
    Local,
    /// As `on`, but standbys need only have received the WAL (written, not flushed).
    RemoteWrite,
    /// As `on`, and synchronous standbys have applied it: a read on them sees the flush.
    RemoteApply,
}

impl SynchronousCommit {
    fn as_setting(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Local => "local",
            Self::RemoteWrite => "remote_write",
            Self::RemoteApply => "remote_apply",
        }
    }
}

impl PgStore {
    /// Connects (without applying migrations). Fails fast if the server is unreachable.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            flush: FlushTxSettings::default(),
            writer: Arc::default(),
            checkpoint: Arc::default(),
        })
    }

    /// The same store, its flush transactions set up as `settings` say.
    pub fn with_flush_settings(mut self, settings: FlushTxSettings) -> Self {
        self.flush = settings;
        self
    }

    /// Makes this instance the database's one single-node writer: takes the advisory lock
    /// on a session of its own (held until the process ends) and the next fencing token,
    /// which every later flush checks. Fails with [`StoreError::WriterHeld`] while another
    /// single-node instance holds the lock.
    ///
    /// Each statement waits at most [`FlushTxSettings::statement_deadline`] for PostgreSQL
    /// (the claim's wait for the row, which PostgreSQL bounds itself, at most half that):
    /// a start that stalls here would stay unready for as long as PostgreSQL does not
    /// answer. A claim that gives up closes its session. The lock goes once PostgreSQL
    /// sees it closed, which behind a network that stalls takes as long as the stall, and
    /// an increment of the token it sent may still commit (harmless: tokens only grow).
    pub async fn claim_single_writer(&self) -> Result<i64, StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut session = self.pool.acquire().within(deadline).await?.detach();
        // A predecessor that was just killed holds the lock until PostgreSQL notices its
        // session is gone, which takes a moment: wait that long before refusing.
        let mut locked = false;
        for attempt in 0..CLAIM_ATTEMPTS {
            locked = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SINGLE_WRITER_LOCK)
                .fetch_one(&mut session)
                .within(deadline)
                .await?;
            if locked {
                break;
            }
            if attempt + 1 < CLAIM_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if !locked {
            let holder: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND ((classid::bigint << 32) | objid::bigint) = $1 LIMIT 1",
            )
            .bind(SINGLE_WRITER_LOCK)
            .fetch_optional(&mut session)
            .within(deadline)
            .await?;
            return Err(StoreError::WriterHeld {
                backend_pid: holder,
            });
        }
        // A flush of an earlier writer that is still open holds the row (FOR SHARE), and
        // the claim waits for it to end: a dead writer's ends at once, but one whose
        // backend stalls (stopped, swapped out) would hold this start for as long. Several
        // such flushes are waited for one after another, each up to `lock_timeout`: the
        // statement's own timeout bounds them together, so that only a stall reaches the
        // deadline on this side.
        let waited = self.flush.timeout;
        sqlx::query(
            "SELECT set_config('lock_timeout', $1, false), \
                    set_config('statement_timeout', $1, false)",
        )
        .bind(pg_millis(waited))
        .execute(&mut session)
        .within(deadline)
        .await?;
        let claimed =
            sqlx::query_scalar("UPDATE single_writer SET token = token + 1 RETURNING token")
                .fetch_one(&mut session)
                .within(deadline)
                .await;
        let token: i64 = match claimed {
            Err(e) if is_lock_timeout(&e) || has_code(&e, QUERY_CANCELED) => {
                // The transaction whose row lock it is (the row's xmax), or with several
                // share lockers, one backend holding a row share lock on the table.
                let holder: Option<i32> = sqlx::query_scalar(
                    "SELECT COALESCE( \
                        (SELECT l.pid FROM single_writer s JOIN pg_locks l \
                         ON l.locktype = 'transactionid' AND l.transactionid = s.xmax \
                         AND l.mode = 'ExclusiveLock' AND l.granted LIMIT 1), \
                        (SELECT pid FROM pg_locks WHERE relation = 'single_writer'::regclass \
                         AND mode = 'RowShareLock' AND granted AND pid <> pg_backend_pid() \
                         LIMIT 1))",
                )
                .fetch_optional(&mut session)
                .within(deadline)
                .await?;
                return Err(StoreError::WriterRowHeld {
                    backend_pid: holder,
                    waited,
                });
            }
            claimed => claimed?,
        };
        let claim = WriterClaim {
            _session: Mutex::new(session),
            token,
        };
        if self.writer.set(claim).is_err() {
            return Err(StoreError::Task(
                "the single writer was claimed twice".into(),
            ));
        }
        Ok(token)
    }

    /// Applies the migrations in `migrations/` that are not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The highest version any row holds (widgets, associations, tombstones): a version
    /// counter that starts below it would write changes the version guards then ignore.
    /// It reads every row, and answers at the end: it waits as long as a load's row.
    pub async fn max_version(&self) -> Result<u64, StoreError> {
        let (max,): (i64,) = self
            .read_row(
                "SELECT GREATEST( \
                    (SELECT COALESCE(max(version), 0) FROM widgets), \
                    (SELECT COALESCE(max(version), 0) FROM widget_tombstones), \
                    (SELECT COALESCE(max(version), 0) FROM associations_p), \
                    (SELECT COALESCE(max(version), 0) FROM associations_r), \
                    (SELECT COALESCE(max(version), 0) FROM associations_q))",
                self.flush.row_deadline(),
            )
            .await?;
        Ok(max.max(0) as u64)
    }

    /// [`PgStore::high_water`], Redis mode's fencing epoch and how many flushes have
    /// committed, in one query.
    pub async fn redis_fence(&self) -> Result<Fence, StoreError> {
        let (high, epoch, flushes): (i64, i64, i64) = self
            .read_row(
                "SELECT version, (SELECT epoch FROM redis_epoch), flushes \
                 FROM version_high_water",
                self.flush.statement_deadline(),
            )
            .await?;
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

    /// [`Store::load`], which checks every association row's mirror; a repair of a
    /// database gone back in time reads its rows as they are ([`Mirrors::Unchecked`]),
    /// since it writes each widget it finds differing again, peers and all.
    pub async fn read_widgets(
        &self,
        mut visit: Visitor,
        mirrors: Mirrors,
    ) -> Result<u64, StoreError> {
        let deadline = self.flush.statement_deadline();
        let row_deadline = self.flush.row_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        // One snapshot for the rows and the checkpoint that covers them.
        let mut tx = conn.begin().within(deadline).await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .within(deadline)
            .await?;
        let checkpoint = stored_checkpoint(&mut tx, deadline).await?;
        let mut rows = sqlx::query(
            "SELECT w.serial_number, w.name, w.ports, w.version, \
                    p.peer_serial_number AS p, p.version AS pv, \
                    r.peer_serial_number AS r, r.version AS rv, \
                    q.peer_serial_number AS q, q.version AS qv \
             FROM widgets w \
             LEFT JOIN associations_p p USING (serial_number) \
             LEFT JOIN associations_r r USING (serial_number) \
             LEFT JOIN associations_q q USING (serial_number)",
        )
        .fetch(&mut *tx);
        let mut loaded = 0u64;
        let mut links = LinkBalance::default();
        let mut waiting = RowWait::new(row_deadline);
        while let Some(row) = waiting.for_next(rows.try_next()).await? {
            let key: String = row.try_get("serial_number")?;
            let serial = Serial::parse("serial_number", &key).map_err(|e| corrupt(&key, e))?;
            let name: String = row.try_get("name")?;
            let mut widget = Widget::new(
                Name::parse("name", &name).map_err(|e| corrupt(&key, e))?,
                Ports::from_bits(row.try_get::<i16, _>("ports")? as u8)
                    .ok_or_else(|| corrupt(&key, "ports out of range"))?,
            );
            let mut version: i64 = row.try_get("version")?;
            for port in PortType::ALL {
                let column = port.as_str().to_lowercase();
                let peer: Option<String> = row.try_get(column.as_str())?;
                if let Some(peer) = peer {
                    links.add(&key, &peer, port);
                    widget.peers[port.index()] =
                        Some(Serial::parse("peer", &peer).map_err(|e| corrupt(&key, e))?);
                }
                // A freed port's row (no peer) still carries the version that freed it.
                let v: Option<i64> = row.try_get(format!("{column}v").as_str())?;
                version = version.max(v.unwrap_or(0));
            }
            widget.version = version as u64;
            widget.check(&serial).map_err(|e| corrupt(&key, e))?;
            visit(serial, widget);
            loaded += 1;
            if loaded.is_multiple_of(1_000_000) {
                tracing::info!(loaded, "loading widgets from PostgreSQL");
            }
            if loaded.is_multiple_of(1024) {
                // Rows already received come without a wait: without a yield, a load holds
                // its worker thread for as long as they last, and a task beside it on the
                // same thread (what consumes the visited widgets, a lease's renewal) waits.
                tokio::task::yield_now().await;
            }
        }
        drop(rows);
        if mirrors == Mirrors::Checked && !links.balanced() {
            return Err(one_sided_association(&mut tx, row_deadline).await?);
        }
        tx.commit().within(deadline).await?;
        conn.done();
        self.checkpoint.fetch_max(checkpoint, Ordering::Relaxed);
        Ok(checkpoint)
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

    /// The one row `sql` reads, on a pooled connection (closed unless it answered), waiting
    /// at most `deadline` for the connection and for the answer.
    async fn read_row<T>(&self, sql: &'static str, deadline: Duration) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let row = self.read_optional_row(sql, deadline).await?;
        row.ok_or(StoreError::Postgres(sqlx::Error::RowNotFound))
    }

    /// As [`PgStore::read_row`], for a row that may not be there.
    async fn read_optional_row<T>(
        &self,
        sql: &'static str,
        deadline: Duration,
    ) -> Result<Option<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        let row = sqlx::query_as(sql)
            .fetch_optional(conn.conn())
            .within(deadline)
            .await?;
        conn.done();
        Ok(row)
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
            other => other?,
        };
        tx.commit().within(deadline).await?;
        // After the commit, so that its snapshot is taken after the flushes the raise
        // waited for whatever isolation level the database's default is (under repeatable
        // read, a snapshot in the transaction would be the one before the raise waited).
        let high: i64 = sqlx::query_scalar(HIGH_WATER)
            .fetch_one(conn.conn())
            .within(deadline)
            .await?;
        conn.done();
        Ok((high.max(0) as u64, epoch.max(0) as u64))
    }

    /// The highest version any flush has committed, at or above every version a row
    /// holds: [`PgStore::max_version`] in one row, which every flush raises.
    pub async fn high_water(&self) -> Result<u64, StoreError> {
        let (high,): (i64,) = self
            .read_row(HIGH_WATER, self.flush.statement_deadline())
            .await?;
        Ok(high.max(0) as u64)
    }

    async fn write_items(
        tx: &mut Transaction<'_, Postgres>,
        items: &[FlushItem],
        deadline: Duration,
    ) -> Result<(), sqlx::Error> {
        // Widget rows: deleted widgets leave a tombstone at their deletion's version and go,
        // with their association rows (ON DELETE CASCADE), unless a newer widget of that
        // serial is there...
        let deleted: Vec<&FlushItem> = items.iter().filter(|i| i.widget.is_none()).collect();
        if !deleted.is_empty() {
            let serials: Vec<&str> = deleted.iter().map(|i| i.serial.as_str()).collect();
            let versions: Vec<i64> = deleted.iter().map(|i| to_i64(i.version)).collect();
            sqlx::query(
                "INSERT INTO widget_tombstones (serial_number, version) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[]) \
                 ON CONFLICT (serial_number) DO UPDATE \
                 SET version = GREATEST(widget_tombstones.version, excluded.version)",
            )
            .bind(&serials)
            .bind(&versions)
            .execute(&mut **tx)
            .within(deadline)
            .await?;
            // Each serial's key first: a flush still open on another connection that
            // created the widget (one this instance abandoned on a stalled backend, or
            // another Redis-mode instance's) holds it, and this waits for that flush to end,
            // so that the delete below sees its row. A delete alone sees no row there, and
            // the other commit would bring the widget back. Where no row is, a placeholder
            // (at the deletion's version) takes the key, and the delete removes it again.
            sqlx::query(
                "INSERT INTO widgets (serial_number, name, ports, version) \
                 SELECT serial, '-', 1, version FROM UNNEST($1::text[], $2::int8[]) \
                     AS d(serial, version) \
                 ON CONFLICT (serial_number) DO NOTHING",
            )
            .bind(&serials)
            .bind(&versions)
            .execute(&mut **tx)
            .within(deadline)
            .await?;
            sqlx::query(
                "DELETE FROM widgets w USING UNNEST($1::text[], $2::int8[]) AS d(serial, version) \
                 WHERE w.serial_number = d.serial AND w.version <= d.version",
            )
            .bind(&serials)
            .bind(&versions)
            .execute(&mut **tx)
            .within(deadline)
            .await?;
        }
        // ...and created (or created again) widgets are upserted, unless deleted since.
        let created: Vec<(&Serial, &Widget)> = items
            .iter()
            .filter(|i| i.mark.row)
            .filter_map(|i| i.widget.as_ref().map(|w| (&i.serial, w)))
            .collect();
        if !created.is_empty() {
            sqlx::query(
                "INSERT INTO widgets (serial_number, name, ports, version) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int2[], $4::int8[]) AS u(s, n, p, v) \
                 WHERE NOT EXISTS (SELECT 1 FROM widget_tombstones t \
                                   WHERE t.serial_number = u.s AND t.version >= u.v) \
                 ON CONFLICT (serial_number) DO UPDATE \
                 SET name = excluded.name, ports = excluded.ports, version = excluded.version, \
                     updated_at = now() \
                 WHERE widgets.version < excluded.version",
            )
            .bind(created.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>())
            .bind(created.iter().map(|(_, w)| w.name.as_str()).collect::<Vec<_>>())
            .bind(created.iter().map(|(_, w)| i16::from(w.ports.bits())).collect::<Vec<_>>())
            .bind(created.iter().map(|(_, w)| version(w)).collect::<Vec<_>>())
            .execute(&mut **tx)
            .within(deadline)
            .await?;
        }
        // Association rows, only for the ports whose peer changed: the new peer, or none
        // (a freed port keeps its row as a versioned tombstone). A row belongs to the
        // incarnation of its widget whose row is at or below its version: for a widget that
        // is gone (deleted by a newer flush), or that was created again since (its row is
        // newer), the state is stale and skipped. Deleting a widget drops its association
        // rows with their versions, so without this a slow flusher would plug a port of
        // the old incarnation into the new one.
        for port in PortType::ALL {
            let table = ASSOCIATION_TABLES[port.index()];
            let rows: Vec<(&str, Option<&str>, i64)> = items
                .iter()
                .filter(|i| i.mark.ports & (1 << port.index()) != 0)
                .filter_map(|i| {
                    let w = i.widget.as_ref()?;
                    let peer = w.peer(port).filter(|_| w.ports.contains(port));
                    Some((i.serial.as_str(), peer.map(Serial::as_str), version(w)))
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO {table} (serial_number, peer_serial_number, version) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS u(s, peer, v) \
                 WHERE EXISTS (SELECT 1 FROM widgets w \
                               WHERE w.serial_number = u.s AND w.version <= u.v) \
                 ON CONFLICT (serial_number) DO UPDATE \
                 SET peer_serial_number = excluded.peer_serial_number, version = excluded.version \
                 WHERE {table}.version < excluded.version"
            ))
            .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
            .execute(&mut **tx)
            .within(deadline)
            .await?;
        }
        Ok(())
    }

    /// Writes `items`; where PostgreSQL refuses a part for good, bisects under savepoints
    /// down to the single refused items and returns them with the reason.
    async fn write_or_bisect<'i>(
        tx: &mut Transaction<'_, Postgres>,
        items: &'i [FlushItem],
        deadline: Duration,
    ) -> Result<Vec<(&'i FlushItem, String)>, sqlx::Error> {
        let mut rejected = Vec::new();
        let mut todo = vec![(0, items.len())];
        while let Some((lo, hi)) = todo.pop() {
            sqlx::query("SAVEPOINT flush_part")
                .execute(&mut **tx)
                .within(deadline)
                .await?;
            match Self::write_items(tx, &items[lo..hi], deadline).await {
                Ok(()) => {
                    sqlx::query("RELEASE SAVEPOINT flush_part")
                        .execute(&mut **tx)
                        .within(deadline)
                        .await?;
                }
                Err(e) if is_permanent(&e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT flush_part")
                        .execute(&mut **tx)
                        .within(deadline)
                        .await?;
                    sqlx::query("RELEASE SAVEPOINT flush_part")
                        .execute(&mut **tx)
                        .within(deadline)
                        .await?;
                    if hi - lo == 1 {
                        rejected.push((&items[lo], e.to_string()));
                    } else {
                        let mid = lo + (hi - lo) / 2;
                        todo.push((mid, hi));
                        todo.push((lo, mid));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(rejected)
    }
}

/// `d` as a PostgreSQL time setting in whole milliseconds, at least 1 (0 turns a timeout
/// off).
fn pg_millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Versions are LSNs (or Redis sequence numbers), far below `i64::MAX`.
fn to_i64(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

fn version(w: &Widget) -> i64 {
    to_i64(w.version)
}

/// An error a retry cannot fix: the data itself is refused (SQLSTATE class 22 data
/// exception, 23 integrity constraint violation).
fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// Checks, in one pass and constant memory, that every association row has its mirror
/// (`A -> B` on a port and `B -> A` on the same port): each row adds or subtracts a hash
/// of the unordered pair and the port, by the direction it points, so mirrored rows
/// cancel and the sum ends at zero unless a row is one-sided (a false zero needs a 64-bit
/// collision). The rare failure is then named by [`one_sided_association`].
#[derive(Default)]
struct LinkBalance(u64);

impl LinkBalance {
    fn add(&mut self, serial: &str, peer: &str, port: PortType) {
        use std::hash::{Hash, Hasher};
        let (low, high) = if serial < peer {
            (serial, peer)
        } else {
            (peer, serial)
        };
        let mut hasher = std::hash::DefaultHasher::new();
        (low, high, port.index()).hash(&mut hasher);
        let h = hasher.finish();
        self.0 = if serial < peer {
            self.0.wrapping_add(h)
        } else {
            self.0.wrapping_sub(h)
        };
    }

    fn balanced(&self) -> bool {
        self.0 == 0
    }
}

/// The first association row whose mirror is missing, as the error that names it.
async fn one_sided_association(
    tx: &mut Transaction<'_, Postgres>,
    deadline: Duration,
) -> Result<StoreError, StoreError> {
    for port in PortType::ALL {
        let table = ASSOCIATION_TABLES[port.index()];
        let row: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT a.serial_number, a.peer_serial_number FROM {table} a \
             WHERE a.peer_serial_number IS NOT NULL AND NOT EXISTS ( \
                 SELECT 1 FROM {table} b WHERE b.serial_number = a.peer_serial_number \
                 AND b.peer_serial_number = a.serial_number) \
             ORDER BY a.serial_number LIMIT 1"
        ))
        .fetch_optional(&mut **tx)
        .within(deadline)
        .await?;
        if let Some((serial, peer)) = row {
            return Ok(corrupt(
                &serial,
                format!(
                    "{table}: associated with {peer:?} on port {}, which is not associated back",
                    port.as_str()
                ),
            ));
        }
    }
    Ok(StoreError::Task(
        "the association rows do not mirror each other, but no one-sided row was found".into(),
    ))
}

fn corrupt(key: &str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}

impl Store for PgStore {
    /// The planner's row estimate (kept by ANALYZE and autovacuum): free to read, and
    /// `-1` (no estimate yet) reads as 0. Waits at most
    /// [`FlushTxSettings::statement_deadline`], as the start's other statements do.
    async fn len_hint(&self) -> Result<u64, StoreError> {
        let (estimate,): (f32,) = self
            .read_row(
                "SELECT reltuples FROM pg_class WHERE oid = 'widgets'::regclass",
                self.flush.statement_deadline(),
            )
            .await?;
        Ok(estimate.max(0.0) as u64)
    }

    /// Each statement waits at most [`FlushTxSettings::statement_deadline`] for
    /// PostgreSQL, and each row at most that or [`LOAD_ROW_WAIT`], whichever is longer,
    /// on a connection closed unless the load committed.
    async fn load(&self, visit: Visitor) -> Result<u64, StoreError> {
        self.read_widgets(visit, Mirrors::Checked).await
    }

    /// Waits at most [`FlushTxSettings::statement_deadline`]: a start that stalls here
    /// would stay unready for as long as PostgreSQL does not answer.
    async fn identity(&self) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = self
            .read_optional_row(
                "SELECT identity FROM store_identity",
                self.flush.statement_deadline(),
            )
            .await?;
        Ok(row.map(|(identity,)| identity))
    }

    /// Waits at most [`FlushTxSettings::statement_deadline`], as [`PgStore::identity`].
    async fn set_identity(&self, identity: &str) -> Result<(), StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        sqlx::query(
            "INSERT INTO store_identity (id, identity) VALUES (true, $1) \
             ON CONFLICT (id) DO UPDATE SET identity = excluded.identity",
        )
        .bind(identity)
        .execute(conn.conn())
        .within(deadline)
        .await?;
        conn.done();
        Ok(())
    }

    /// Every statement, `BEGIN` and `COMMIT` included, waits at most
    /// [`FlushTxSettings::statement_deadline`] for PostgreSQL, and a flush that does not
    /// commit closes its connection instead of handing it back to the pool: an abandoned
    /// statement may still be on it, or a transaction nobody ends (sqlx #4393).
    async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        let mut tx = conn.begin().within(deadline).await?;
        let timeout = pg_millis(self.flush.timeout);
        sqlx::query(
            "SELECT set_config('synchronous_commit', $1, true), \
                    set_config('statement_timeout', $2, true), \
                    set_config('idle_in_transaction_session_timeout', $2, true)",
        )
        .bind(self.flush.synchronous_commit.as_setting())
        .bind(&timeout)
        .execute(&mut *tx)
        .within(deadline)
        .await?;
        if let Some(mine) = batch.redis.as_ref().map(|r| r.epoch) {
            // Share-locked until the commit: a raise of the epoch waits for this flush,
            // and a flush after the raise is refused.
            let current: i64 = sqlx::query_scalar("SELECT epoch FROM redis_epoch FOR SHARE")
                .fetch_one(&mut *tx)
                .within(deadline)
                .await?;
            if current != to_i64(mine) {
                return Err(StoreError::StaleEpoch {
                    mine,
                    current: current.max(0) as u64,
                });
            }
        }
        if let Some(claim) = self.writer.get() {
            // Share-locked until the commit: a newer writer's claim waits for this flush,
            // and a flush after that claim sees the new token and is refused.
            let current: i64 = sqlx::query_scalar("SELECT token FROM single_writer FOR SHARE")
                .fetch_one(&mut *tx)
                .within(deadline)
                .await?;
            if current < claim.token {
                // Tokens only grow: the database has gone back to before this claim.
                let stored = stored_checkpoint(&mut tx, deadline).await?;
                return Err(StoreError::Behind {
                    what: format!(
                        "its single-writer token is {current}, below the {} this instance \
                         claimed",
                        claim.token
                    ),
                    stored,
                });
            }
            if current != claim.token {
                return Err(StoreError::Fenced {
                    mine: claim.token,
                    current,
                });
            }
        }
        if batch.checkpoint.is_some() {
            // The stored checkpoint, read before any row is written. Below the last one this
            // instance committed (or loaded), the database has gone back in time (restored
            // from an older backup, failed over to a replica that lagged), and the rows of
            // the flushes it lost are now only in this process's memory, their records
            // perhaps trimmed from the WAL. Moving the checkpoint on would hide that for
            // good: a restart would find no gap between the store and the WAL and serve
            // without those writes.
            let stored = stored_checkpoint(&mut tx, deadline).await?;
            let committed = self.checkpoint.load(Ordering::Relaxed);
            if stored < committed {
                return Err(StoreError::Behind {
                    what: format!(
                        "its checkpoint is {stored}, below the {committed} this instance \
                         committed or loaded"
                    ),
                    stored,
                });
            }
        }
        let rejected = Self::write_or_bisect(&mut tx, &batch.items, deadline).await?;
        for (item, error) in &rejected {
            tracing::error!(serial = %item.serial, %error, checkpoint = ?batch.checkpoint,
                "PostgreSQL refused this widget's change for good; kept in flush_rejects");
            let state = item.widget.as_ref().map(|w| {
                serde_json::json!({
                    "widget": w.view(&item.serial),
                    "version": w.version,
                    "row_changed": item.mark.row,
                    "ports_changed": item.mark.ports,
                })
            });
            sqlx::query(
                "INSERT INTO flush_rejects (serial_number, state, error, checkpoint_lsn) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(item.serial.as_str())
            .bind(state)
            .bind(error)
            // 0: no WAL stands behind the batch (Redis mode).
            .bind(to_i64(batch.checkpoint.unwrap_or(0)))
            .execute(&mut *tx)
            .within(deadline)
            .await?;
        }
        if !rejected.is_empty() {
            metrics::counter!("widgets_flush_rejected_total").increment(rejected.len() as u64);
        }
        // Last, so that concurrent flushes (Redis mode) hold this one row only while they
        // commit.
        let mut committed = None;
        if let Some(newest) = batch.items.iter().map(|i| i.version).max() {
            let count: i64 = sqlx::query_scalar(
                "UPDATE version_high_water \
                 SET version = GREATEST(version, $1), flushes = flushes + 1 RETURNING flushes",
            )
            .bind(to_i64(newest))
            .fetch_one(&mut *tx)
            .within(deadline)
            .await?;
            if batch.redis.is_some() {
                let flush = FlushId {
                    count: count.max(0) as u64,
                    id: fastrand::i64(..),
                };
                log_flush(&mut tx, flush, deadline).await?;
                committed = Some(flush);
            }
        }
        if let Some(checkpoint) = batch.checkpoint {
            sqlx::query("UPDATE checkpoint SET lsn = GREATEST(lsn, $1)")
                .bind(to_i64(checkpoint))
                .execute(&mut *tx)
                .within(deadline)
                .await?;
        }
        tx.commit().within(deadline).await?;
        conn.done();
        if let Some(checkpoint) = batch.checkpoint {
            self.checkpoint.fetch_max(checkpoint, Ordering::Relaxed);
        }
        if let (Some(flush), Some(redis)) = (committed, &batch.redis) {
            let _ = redis.committed.set(flush);
        }
        Ok(())
    }
}

/// How many flushes `flush_log` keeps.
const FLUSH_LOG_KEPT: u64 = 10_000;

/// Logs `flush`, and every hundredth flush drops the rows the log no longer keeps.
async fn log_flush(
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

/// The checkpoint the database holds.
async fn stored_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    deadline: Duration,
) -> Result<u64, sqlx::Error> {
    let stored: i64 = sqlx::query_scalar("SELECT lsn FROM checkpoint")
        .fetch_one(&mut **tx)
        .within(deadline)
        .await?;
    Ok(stored.max(0) as u64)
}

/// A pooled connection that goes back to the pool only once its work is done (a flush
/// committed, a read answered); dropped before that (the work failed, or was abandoned
/// mid-statement) it is closed: an abandoned statement may still be on it, or a
/// transaction nobody ends (sqlx #4393).
struct CloseUnlessDone {
    conn: PoolConnection<Postgres>,
    done: bool,
}

impl CloseUnlessDone {
    /// A connection from `pool`, within `deadline` (as well as the pool's own
    /// `acquire_timeout`): taking one pings an idle connection or opens a new one, and
    /// either waits for PostgreSQL.
    async fn acquire(pool: &PgPool, deadline: Duration) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conn: pool.acquire().within(deadline).await?,
            done: false,
        })
    }

    async fn begin(&mut self) -> Result<Transaction<'_, Postgres>, sqlx::Error> {
        self.conn.begin().await
    }

    fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for CloseUnlessDone {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// Whether `e` is PostgreSQL's `lock_timeout` passing.
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    has_code(e, LOCK_NOT_AVAILABLE)
}

/// Whether PostgreSQL answered `e` with SQLSTATE `code`.
fn has_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(e) if e.code().as_deref() == Some(code))
}

/// A deadline for each row of a stream, as [`Within::within`] sets one for a statement,
/// that reads the clock only when a row is not already at hand: `within` on every row
/// costs ~80 ns, most of a second over a load of 10 M widgets.
struct RowWait {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl RowWait {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// `next`'s answer, or a timeout once it has waited `limit` for it.
    async fn for_next<T>(
        &mut self,
        next: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        let mut next = std::pin::pin!(next);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = next.as_mut().poll(cx) {
                return Poll::Ready(answer);
            }
            if !armed {
                let deadline = tokio::time::Instant::now() + self.limit;
                self.timer.as_mut().reset(deadline);
                armed = true;
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(no_answer(self.limit))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// What a statement, or a connection from the pool, that took longer than `deadline`
/// fails with: an I/O error (never [`is_permanent`]).
fn no_answer(deadline: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from PostgreSQL, or no connection from the pool, within {deadline:?} \
             (a backend or a network that stalls, or every pooled connection busy): \
             abandoned, and its connection closed"
        ),
    ))
}

/// [`Within::within`] for a PostgreSQL statement's future.
trait Within<T>: Future<Output = Result<T, sqlx::Error>> + Sized {
    /// The statement's answer, or an I/O error (never [`is_permanent`]) if PostgreSQL has
    /// not answered within `deadline`.
    async fn within(self, deadline: Duration) -> Result<T, sqlx::Error> {
        tokio::time::timeout(deadline, self)
            .await
            .unwrap_or_else(|_| Err(no_answer(deadline)))
    }
}

impl<T, F: Future<Output = Result<T, sqlx::Error>>> Within<T> for F {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A row that comes `after` this long.
    async fn row_after(after: Duration) -> Result<u32, sqlx::Error> {
        tokio::time::sleep(after).await;
        Ok(1)
    }

    #[tokio::test]
    async fn each_row_waits_its_own_limit_and_a_row_that_never_comes_times_out() {
        let mut waiting = RowWait::new(Duration::from_millis(300));
        // Rows at hand, then rows that each wait most of the limit: 3 x 200 ms is past
        // the limit in all, not for any one row.
        assert_eq!(waiting.for_next(async { Ok(1) }).await.unwrap(), 1);
        for _ in 0..3 {
            let row = waiting.for_next(row_after(Duration::from_millis(200)));
            assert_eq!(row.await.unwrap(), 1);
        }
        let started = Instant::now();
        let never = waiting.for_next(std::future::pending::<Result<u32, sqlx::Error>>());
        let error = never.await.expect_err("a row that never comes");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            error.to_string().contains("no answer from PostgreSQL"),
            "{error}"
        );
    }
}
