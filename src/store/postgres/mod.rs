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
//!
//! Files: this one (connecting, the single-node writer's claim, the flush), `read` (every
//! widget in one snapshot: a load, a repair's read), `redis_mode` (the fencing epoch,
//! the flush count and log Redis mode checks PostgreSQL by) and `conn` (the bounds this
//! side puts on each wait for PostgreSQL).

mod conn;
mod read;
mod redis_mode;

pub use read::Mirrors;
pub use redis_mode::Fence;

use super::{FlushBatch, FlushId, FlushItem, Store, StoreError, Visitor};
use crate::domain::{PortType, Serial, Widget};
use conn::{
    answer_deadline, has_code, is_lock_timeout, pg_millis, pooled, CloseUnlessDone, Within,
    QUERY_CANCELED,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Whether a connection failed in a way a wait may mend: refused, reset or cut short (a
/// server, or a port forwarder in front of one, that is not listening yet), no connection
/// slot free (53300), the server starting up or shutting down (57P03). Not TLS refused
/// as configured, nor a login or database PostgreSQL itself refused.
fn passing(e: &StoreError) -> bool {
    if crate::tls::refused_postgres(e) {
        return false;
    }
    match e {
        StoreError::Postgres(sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => true,
        StoreError::Postgres(e) => has_code(e, "53300") || has_code(e, "57P03"),
        _ => false,
    }
}

/// The association table of each port type, by port index.
const ASSOCIATION_TABLES: [&str; 3] = ["associations_p", "associations_r", "associations_q"];

/// The session advisory lock a single-node instance holds on its database ("widgets1").
const SINGLE_WRITER_LOCK: i64 = 0x7769_6467_6574_7331;
/// Tries for the lock, 200 ms apart, before a start is refused (about 3 s).
const CLAIM_ATTEMPTS: u32 = 15;
/// How PostgreSQL watches the claim's session, which is idle for the process's life: after
/// this long without a packet it probes this instance's side of the connection...
const CLAIM_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...every this long...
const CLAIM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and ends the session, letting the lock go, after this many probes unanswered (or
/// answered with a reset: the machine came back without the process).
const CLAIM_KEEPALIVE_COUNT: u32 = 3;
/// The least a load waits for its next row: the first comes once PostgreSQL has joined
/// the widgets with their associations, which over millions of rows takes seconds, however
/// short an operator makes `--pg-flush-timeout`.
const LOAD_ROW_WAIT: Duration = Duration::from_secs(60);
/// How long taking a connection waits, for one from the pool or a new one.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// The highest version any flush has committed ([`PgStore::high_water`]).
const HIGH_WATER: &str = "SELECT version FROM version_high_water";
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
    /// Single node: the identity of the history this instance's WAL and the database
    /// share, once read or recorded at the start; every flush checks that the database
    /// still holds it (see `write_batch`).
    history: Arc<Mutex<Option<String>>>,
}

/// A single-node instance's claim on its database: the connection whose session holds the
/// advisory lock (kept open for the process's life), and the token it took.
struct WriterClaim {
    session: tokio::sync::Mutex<PgConnection>,
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
    /// Connects (without applying migrations). A server that refuses the connection, or is
    /// starting up, fails it at once, with what the connection met: one connection is
    /// opened outside the pool first, since the pool would try again for its acquire
    /// timeout and then say only that it timed out (see [`conn::pooled`]). The service's
    /// start tries again with backoff, logging each cause; a command that runs once waits
    /// a little with [`PgStore::connect_waiting`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let first = PgConnection::connect_with(&options)
            .within(ACQUIRE_TIMEOUT)
            .await?;
        let _ = first.close().await;
        // Lazy: the connection above has shown the server takes this one's options, and the
        // pool's first use opens its own.
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            flush: FlushTxSettings::default(),
            writer: Arc::default(),
            checkpoint: Arc::default(),
            history: Arc::default(),
        })
    }

    /// How long a command that runs once waits for a server not taking connections yet
    /// ([`PgStore::connect_waiting`]): as long as sqlx's pool waited for it.
    pub const COMMAND_WAIT: Duration = ACQUIRE_TIMEOUT;

    /// As [`PgStore::connect`], trying again for up to `wait` while the server refuses or
    /// drops connections, has no connection slot free or is starting up, for a command
    /// that runs once (`widgets migrate`, `widgets bench-seed`).
    pub async fn connect_waiting(url: &str, wait: Duration) -> Result<Self, StoreError> {
        let until = std::time::Instant::now() + wait;
        loop {
            match Self::connect(url).await {
                Err(e) if passing(&e) && std::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                connected => return connected,
            }
        }
    }

    /// The same store, its flush transactions set up as `settings` say.
    pub fn with_flush_settings(mut self, settings: FlushTxSettings) -> Self {
        self.flush = settings;
        self
    }

    /// A session of its own, detached from the pool, set up to hold the single-writer
    /// lock for the process's life (see [`PgStore::claim_single_writer`]), and whether it
    /// took the lock, tried `attempts` times 200 ms apart.
    async fn lock_session(&self, attempts: u32) -> Result<(PgConnection, bool), StoreError> {
        let deadline = self.flush.statement_deadline();
        let mut session = pooled(&self.pool, deadline).await?.detach();
        let probes_for = CLAIM_KEEPALIVE_IDLE + CLAIM_KEEPALIVE_INTERVAL * CLAIM_KEEPALIVE_COUNT;
        sqlx::query(
            "SELECT set_config('tcp_keepalives_idle', $1, false), \
                    set_config('tcp_keepalives_interval', $2, false), \
                    set_config('tcp_keepalives_count', $3, false), \
                    set_config('tcp_user_timeout', $4, false)",
        )
        .bind(CLAIM_KEEPALIVE_IDLE.as_secs().to_string())
        .bind(CLAIM_KEEPALIVE_INTERVAL.as_secs().to_string())
        .bind(CLAIM_KEEPALIVE_COUNT.to_string())
        .bind(probes_for.as_millis().to_string())
        .execute(&mut session)
        .within(deadline)
        .await?;
        // The session is idle for the process's life: a database or role that ends idle
        // sessions (`idle_session_timeout`, PostgreSQL 14 and later) would end it, and the
        // lock with it, within that timeout, and a second instance would then claim the
        // database and fence this one instead of being refused.
        sqlx::query(
            "SELECT set_config(name, '0', false) FROM pg_settings \
             WHERE name = 'idle_session_timeout'",
        )
        .execute(&mut session)
        .within(deadline)
        .await?;
        // A predecessor that was just killed holds the lock until PostgreSQL notices its
        // session is gone, which takes a moment: wait that long before refusing.
        let mut locked = false;
        for attempt in 0..attempts {
            locked = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SINGLE_WRITER_LOCK)
                .fetch_one(&mut session)
                .within(deadline)
                .await?;
            if locked {
                break;
            }
            if attempt + 1 < attempts {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok((session, locked))
    }

    /// Single node: before a flush, takes the advisory lock again on a new session if the
    /// claim's session has ended (PostgreSQL restarted or failed over, or the session was
    /// terminated), so that a second instance started since is still refused, as at the
    /// start. The token, not the lock, fences the flushes: a lock another instance holds
    /// now is logged, and that instance's claim refuses this one's next flush. PostgreSQL
    /// unreachable fails the flush here, with what the new session met, rather than after
    /// a second wait for the flush's own connection.
    async fn keep_claim(&self, claim: &WriterClaim) -> Result<(), StoreError> {
        let mut session = claim.session.lock().await;
        // Only a session that answers that it has ended is replaced: one that does not
        // answer within a second (PostgreSQL stalled, which the flush meets on its own
        // deadline) may still hold the lock.
        match tokio::time::timeout(Duration::from_secs(1), session.ping()).await {
            Ok(Ok(())) | Err(_) => return Ok(()),
            Ok(Err(_)) => {}
        }
        match self.lock_session(1).await {
            Ok((new, true)) => {
                *session = new;
                metrics::counter!("widgets_pg_writer_lock_retaken_total").increment(1);
                tracing::warn!(
                    token = claim.token,
                    "the session holding the single-writer lock had ended (PostgreSQL \
                     restarted or failed over, or the session was terminated); took the \
                     lock again"
                );
            }
            Ok((_, false)) => tracing::warn!(
                token = claim.token,
                "the session holding the single-writer lock has ended, and another session \
                 holds the lock: this one's old session, until PostgreSQL sees it gone, or \
                 a second single-node instance, whose claim fences this one; tried again \
                 before the next flush"
            ),
            Err(e) => {
                tracing::warn!(error = %e, token = claim.token,
                    "the session holding the single-writer lock has ended, and taking the \
                     lock again failed; tried again before the next flush");
                return Err(e);
            }
        }
        Ok(())
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
    ///
    /// The session turns off `idle_session_timeout` for itself, which would end it.
    ///
    /// The session asks PostgreSQL to probe it with TCP keepalives (over TCP; a Unix
    /// socket has none), so that a writer whose machine died silently (power, network)
    /// lets the lock go within ~25 s ([`CLAIM_KEEPALIVE_IDLE`] and the probes after it)
    /// instead of the operating system's default, two hours on Linux, through which every
    /// start of its replacement would be refused. A writer cut off but alive loses the
    /// lock so too, and takes it again before its next flush if it is still free (see
    /// [`PgStore::keep_claim`]); its flushes are fenced by the token, not by the lock.
    pub async fn claim_single_writer(&self) -> Result<i64, StoreError> {
        let deadline = self.flush.statement_deadline();
        let (mut session, locked) = self.lock_session(CLAIM_ATTEMPTS).await?;
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
            claimed => claimed.map_err(one_row("single_writer"))?,
        };
        let claim = WriterClaim {
            session: tokio::sync::Mutex::new(session),
            token,
        };
        if self.writer.set(claim).is_err() {
            return Err(StoreError::Task(
                "the single writer was claimed twice".into(),
            ));
        }
        Ok(token)
    }

    /// Applies the migrations in `migrations/` that are not applied yet, on a session of
    /// their own with no `statement_timeout`: one the database or role sets for its clients
    /// would cancel a migration that rewrites a large table at every start, and the start,
    /// which retries a cancelled statement as PostgreSQL shutting down, would wait for ever.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // A session's `SET` overrides the database's and the role's (and, unlike a startup
        // parameter, passes a connection pooler).
        let options = (*self.pool.connect_options()).clone();
        let session = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET statement_timeout = 0")
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let migrated = MIGRATOR.run(&session).await;
        session.close().await;
        Ok(migrated?)
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

    /// The highest version any flush has committed, at or above every version a row
    /// holds: [`PgStore::max_version`] in one row, which every flush raises.
    pub async fn high_water(&self) -> Result<u64, StoreError> {
        let (high,): (i64,) = self
            .read_optional_row(HIGH_WATER, self.flush.statement_deadline())
            .await?
            .ok_or(StoreError::MissingRow {
                table: "version_high_water",
            })?;
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
        let identity = row.map(|(identity,)| identity);
        if identity.is_some() {
            identity.clone_into(&mut self.history.lock().expect("history lock"));
        }
        Ok(identity)
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
        *self.history.lock().expect("history lock") = Some(identity.to_owned());
        Ok(())
    }

    /// Every statement, `BEGIN` and `COMMIT` included, waits at most
    /// [`FlushTxSettings::statement_deadline`] for PostgreSQL, and a flush that does not
    /// commit closes its connection instead of handing it back to the pool: an abandoned
    /// statement may still be on it, or a transaction nobody ends (sqlx #4393).
    async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
        if let Some(claim) = self.writer.get() {
            self.keep_claim(claim).await?;
        }
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
                .await
                .map_err(one_row("redis_epoch"))?;
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
            let (current, history): (i64, Option<String>) = sqlx::query_as(
                "SELECT token, (SELECT identity FROM store_identity) FROM single_writer \
                 FOR SHARE OF single_writer",
            )
            .fetch_one(&mut *tx)
            .within(deadline)
            .await
            .map_err(one_row("single_writer"))?;
            // A database of another history (another service's backup restored into it, a
            // failover to another service's cluster) may hold a token and a checkpoint that
            // let the flush through: committed there, and the WAL trimmed behind it, the
            // batch's writes would be in no database of this service's, nor in its WAL.
            let mine = self.history.lock().expect("history lock").clone();
            if let Some(mine) = mine.filter(|mine| history.as_ref() != Some(mine)) {
                return Err(StoreError::OtherHistory {
                    mine,
                    theirs: history,
                });
            }
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
            .await
            .map_err(one_row("version_high_water"))?;
            if batch.redis.is_some() {
                let flush = FlushId {
                    count: count.max(0) as u64,
                    id: fastrand::i64(..),
                };
                redis_mode::log_flush(&mut tx, flush, deadline).await?;
                committed = Some(flush);
            }
        }
        if let Some(checkpoint) = batch.checkpoint {
            // Read above, but not locked: a row deleted since would be updated by none,
            // and the flush commit with no checkpoint stored while the WAL is trimmed.
            let updated = sqlx::query("UPDATE checkpoint SET lsn = GREATEST(lsn, $1)")
                .bind(to_i64(checkpoint))
                .execute(&mut *tx)
                .within(deadline)
                .await?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::MissingRow {
                    table: "checkpoint",
                });
            }
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

/// The checkpoint the database holds.
async fn stored_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    deadline: Duration,
) -> Result<u64, StoreError> {
    let stored: i64 = sqlx::query_scalar("SELECT lsn FROM checkpoint")
        .fetch_one(&mut **tx)
        .within(deadline)
        .await
        .map_err(one_row("checkpoint"))?;
    Ok(stored.max(0) as u64)
}

/// The error of a statement that reads or changes `table`, one of the tables the
/// migrations give one row: no row is [`StoreError::MissingRow`], named, where sqlx says
/// only that a query returned no rows.
fn one_row(table: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match e {
        sqlx::Error::RowNotFound => StoreError::MissingRow { table },
        e => e.into(),
    }
}
