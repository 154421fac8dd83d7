//! The "no cache" baseline: the association updates of the load phase written straight to
//! PostgreSQL, one transaction per update, from as many clients as the load phase had
//! connections. It runs in a throwaway database migrated with the service's own schema and
//! seeded with the run's widgets, so it writes the same rows the flusher would, only one
//! change at a time.
//!
//! One update locks the widget rows involved (both sides and their current peers, in key
//! order, so two updates never deadlock), checks the peers did not change while it waited
//! (or starts again), frees the old peers and upserts both sides. It locks widget rows,
//! not association rows, because a free port has no association row to lock; every
//! transaction that changes a widget's association rows holds that widget's row lock.

use super::cpu::{self, Used};
use super::load::{self, Outcome, Pace, PhaseResult};
use super::mix::{distinct_pair, random_port};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use widgets::domain::PortType;
use widgets::store::{PgStore, StoreError};
use widgets_testkit::pg::{ScratchDb, ScratchDbError};

/// The association table of each port type, by port index (as in `migrations/`).
const ASSOCIATION_TABLES: [&str; 3] = ["associations_p", "associations_r", "associations_q"];
/// Widget rows per seeding statement.
const SEED_CHUNK: usize = 10_000;
/// SQLSTATEs after which a transaction is simply run again.
const RETRYABLE: [&str; 2] = ["40001", "40P01"];

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error(transparent)]
    ScratchDb(#[from] ScratchDbError),
    #[error("preparing the baseline database {0}")]
    Prepare(String, #[source] StoreError),
    #[error("seeding the baseline database {0} with widgets")]
    Seed(String, #[source] sqlx::Error),
    #[error("opening {1} connections to the baseline database {0}")]
    Connect(String, usize, #[source] sqlx::Error),
    #[error(
        "the baseline needs {needed} connections (one per --concurrency), but the server \
         allows {max} (max_connections) and {in_use} are open: use --concurrency {free} or less"
    )]
    TooFewConnections {
        needed: usize,
        max: i64,
        in_use: i64,
        free: i64,
    },
}

/// What the baseline measured.
pub struct BaselineResult {
    pub phase: PhaseResult,
    pub retries: u64,
    /// This client's CPU during the updates (PostgreSQL's own is not the bench's to read).
    pub cpu: Used,
}

/// Runs the baseline in a new database on the server `admin_url` names, then drops it.
pub async fn run(
    admin_url: &str,
    serials: Arc<Vec<String>>,
    concurrency: usize,
    pace: Pace,
) -> Result<BaselineResult, BaselineError> {
    let db = crate::scratch_db(admin_url, "baseline").await?;
    let result = run_in(&db, serials, concurrency, pace).await;
    if let Err(e) = db.drop_db().await {
        tracing::warn!("leaving the baseline database behind: {e}");
    }
    result
}

enum Budget {
    Short(BaselineError),
    Query(sqlx::Error),
}

/// Fails at once, saying what to do, when the server cannot open a connection per
/// client; otherwise opening them would wait out the pool's timeout and fail vaguely.
/// The connection this check runs on is closed before the clients connect.
async fn check_connection_budget(pool: &PgPool, needed: usize) -> Result<(), Budget> {
    let (max, reserved, in_use): (i64, i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_connections')::bigint, \
                current_setting('superuser_reserved_connections')::bigint, \
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(pool)
    .await
    .map_err(Budget::Query)?;
    // This check's own connections close before the clients open theirs.
    let others = (in_use - i64::from(pool.size())).max(0);
    let free = max - reserved - others;
    if needed as i64 > free {
        return Err(Budget::Short(BaselineError::TooFewConnections {
            needed,
            max,
            in_use: others,
            free: free.max(0),
        }));
    }
    Ok(())
}

async fn run_in(
    db: &ScratchDb,
    serials: Arc<Vec<String>>,
    concurrency: usize,
    pace: Pace,
) -> Result<BaselineResult, BaselineError> {
    let store = PgStore::connect(&db.url)
        .await
        .map_err(|e| BaselineError::Prepare(db.name.clone(), e))?;
    store
        .migrate()
        .await
        .map_err(|e| BaselineError::Prepare(db.name.clone(), e))?;
    seed(store.pool(), &serials)
        .await
        .map_err(|e| BaselineError::Seed(db.name.clone(), e))?;
    check_connection_budget(store.pool(), concurrency)
        .await
        .map_err(|e| match e {
            Budget::Short(e) => e,
            Budget::Query(e) => BaselineError::Connect(db.name.clone(), concurrency, e),
        })?;
    store.pool().close().await;

    let connect = |e| BaselineError::Connect(db.name.clone(), concurrency, e);
    // Not logged: under load a lock wait past a second is a measurement, not a warning.
    let options = PgConnectOptions::from_str(&db.url)
        .map_err(connect)?
        .disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(concurrency as u32)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(connect)?;
    // Open every connection now, so no update's latency includes connecting.
    let warm = futures_util::future::try_join_all((0..concurrency).map(|_| pool.acquire()))
        .await
        .map_err(connect)?;
    drop(warm);

    let retries = Arc::new(AtomicU64::new(0));
    let version = Arc::new(AtomicI64::new(1));
    let warned = Arc::new(AtomicBool::new(false));
    let meter = cpu::Meter::new(None);
    let mark = meter.mark();
    let phase = {
        let (pool, retries) = (pool.clone(), retries.clone());
        load::drive(concurrency, pace, None, move |rng, _| {
            let (a, b) = distinct_pair(rng, serials.len());
            let port = random_port(rng);
            let (serials, pool, retries, warned) = (
                serials.clone(),
                pool.clone(),
                retries.clone(),
                warned.clone(),
            );
            let version = version.fetch_add(1, Ordering::Relaxed);
            async move {
                match associate(&pool, port, &serials[a], &serials[b], version, &retries).await {
                    Ok(()) => Outcome::Status(200),
                    Err(e) => {
                        if !warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!("baseline update failed (counted, not retried): {e}");
                        }
                        Outcome::Failed
                    }
                }
            }
        })
        .await
    };
    let cpu = meter.since(&mark);
    pool.close().await;
    Ok(BaselineResult {
        phase,
        retries: retries.load(Ordering::Relaxed),
        cpu,
    })
}

/// The run's widgets as rows, every one with all three ports.
async fn seed(pool: &PgPool, serials: &[String]) -> Result<(), sqlx::Error> {
    for chunk in serials.chunks(SEED_CHUNK) {
        sqlx::query(
            "INSERT INTO widgets (serial_number, name, ports, version) \
             SELECT s, 'bench', 7, 0 FROM UNNEST($1::text[]) AS s",
        )
        .bind(chunk)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Associates `a` and `b` on `port` in one transaction, running it again if a peer
/// changed before the locks were held or PostgreSQL asks for a retry.
async fn associate(
    pool: &PgPool,
    port: PortType,
    a: &str,
    b: &str,
    version: i64,
    retries: &AtomicU64,
) -> Result<(), sqlx::Error> {
    let table = ASSOCIATION_TABLES[port.index()];
    loop {
        match try_associate(pool, table, a, b, version).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(sqlx::Error::Database(e))
                if e.code().is_some_and(|c| RETRYABLE.contains(&c.as_ref())) => {}
            Err(e) => return Err(e),
        }
        retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// `Ok(false)`: a peer changed between reading it and locking it; nothing was written.
async fn try_associate(
    pool: &PgPool,
    table: &str,
    a: &str,
    b: &str,
    version: i64,
) -> Result<bool, sqlx::Error> {
    let pair = [a, b];
    let mut tx = pool.begin().await?;
    let peers = peers(&mut tx, table, &pair).await?;
    let mut lock: Vec<&str> = pair.to_vec();
    lock.extend(peers.iter().map(|(_, peer)| peer.as_str()));
    lock.sort_unstable();
    lock.dedup();
    // ORDER BY before the locking clause: rows are locked in key order.
    sqlx::query(
        "SELECT serial_number FROM widgets WHERE serial_number = ANY($1) \
         ORDER BY serial_number FOR NO KEY UPDATE",
    )
    .bind(&lock)
    .execute(&mut *tx)
    .await?;
    if self::peers(&mut tx, table, &pair).await? != peers {
        tx.rollback().await?;
        return Ok(false);
    }
    let old: Vec<&str> = peers
        .iter()
        .map(|(_, peer)| peer.as_str())
        .filter(|peer| !pair.contains(peer))
        .collect();
    if !old.is_empty() {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE serial_number = ANY($1)"
        ))
        .bind(&old)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(&format!(
        "INSERT INTO {table} (serial_number, peer_serial_number, version) \
         VALUES ($1, $2, $3), ($2, $1, $3) \
         ON CONFLICT (serial_number) DO UPDATE \
         SET peer_serial_number = excluded.peer_serial_number, version = excluded.version"
    ))
    .bind(a)
    .bind(b)
    .bind(version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// `(serial, peer)` for each of `serials` that has a peer on the table's port, by serial.
async fn peers(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    serials: &[&str],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT serial_number, peer_serial_number FROM {table} \
         WHERE serial_number = ANY($1) ORDER BY serial_number"
    ))
    .bind(serials)
    .fetch_all(&mut **tx)
    .await
}
