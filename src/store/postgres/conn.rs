//! Waiting on PostgreSQL with a bound on this side: a statement, a row of a stream, a
//! connection from the pool, each given up after a deadline, and a connection that goes
//! back to the pool only once its work is done. PostgreSQL bounds its own waits
//! (`statement_timeout`, `lock_timeout`), but those cannot fire in a backend that stalls
//! (stopped, swapped out) or behind a network that does.

use sqlx::pool::PoolConnection;
use sqlx::{Acquire, Connection, PgConnection, PgPool, Postgres, Transaction};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use std::time::Instant;

/// SQLSTATE `lock_not_available`: `lock_timeout` passed.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE `query_canceled`: a statement past its `statement_timeout`, among others.
pub(super) const QUERY_CANCELED: &str = "57014";

/// How long this instance waits for the answer to a statement PostgreSQL itself bounds
/// at `bound` (`statement_timeout`, `lock_timeout`): twice that, since PostgreSQL's own
/// bound cannot fire in a backend or behind a network that stalls.
pub(super) fn answer_deadline(bound: Duration) -> Duration {
    bound.saturating_mul(2)
}

/// `d` as a PostgreSQL time setting in whole milliseconds, at least 1 (0 turns a timeout
/// off).
pub(super) fn pg_millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// A pooled connection that goes back to the pool only once its work is done (a flush
/// committed, a read answered); dropped before that (the work failed, or was abandoned
/// mid-statement) it is closed: an abandoned statement may still be on it, or a
/// transaction nobody ends (sqlx #4393).
pub(super) struct CloseUnlessDone {
    conn: PoolConnection<Postgres>,
    done: bool,
}

impl CloseUnlessDone {
    /// A connection from `pool`, within `deadline` (as well as the pool's own
    /// `acquire_timeout`): taking one pings an idle connection or opens a new one, and
    /// either waits for PostgreSQL.
    pub(super) async fn acquire(pool: &PgPool, deadline: Duration) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conn: pooled(pool, deadline).await?,
            done: false,
        })
    }

    pub(super) async fn begin(&mut self) -> Result<Transaction<'_, Postgres>, sqlx::Error> {
        self.conn.begin().await
    }

    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    pub(super) fn done(&mut self) {
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

/// A connection from `pool`, within `deadline` (as well as the pool's own
/// `acquire_timeout`). While sqlx's pool cannot connect it tries again until its
/// `acquire_timeout`, then answers `PoolTimedOut`, which names no cause (sqlx #3808): a
/// PostgreSQL that is down and one that is starting up would both read "pool timed out".
/// So when the pool gives none, one connection is opened outside it, and its error, if
/// it fails, is the answer. The pool is given the deadline less [`CAUSE_WAIT`] (half of
/// it, for a deadline under twice that), so that the connection that names the cause has
/// time within the deadline: with a short `--pg-flush-timeout` the deadline comes before
/// the pool's own timeout, and the cause went unnamed, as if PostgreSQL had stalled.
pub(super) async fn pooled(
    pool: &PgPool,
    deadline: Duration,
) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let started = Instant::now();
    let for_pool = deadline.saturating_sub(CAUSE_WAIT).max(deadline / 2);
    match pool.acquire().within(for_pool).await {
        Err(none) if no_connection(&none) => {
            let left = deadline.saturating_sub(started.elapsed());
            Err(why_no_connection(pool, left.min(CAUSE_WAIT), none).await)
        }
        acquired => acquired,
    }
}

/// The longest [`pooled`] waits for the connection that tells why the pool had none.
const CAUSE_WAIT: Duration = Duration::from_secs(2);

/// Whether `e` says the pool gave no connection: its own timeout, or the deadline's.
fn no_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    }
}

/// Why `pool` gave no connection: the error of one opened outside it, or `none` (what the
/// pool said) if that one opens (every connection the pool may hold was busy) or does not
/// within `wait` (PostgreSQL stalls).
async fn why_no_connection(pool: &PgPool, wait: Duration, none: sqlx::Error) -> sqlx::Error {
    let options = pool.connect_options();
    match tokio::time::timeout(wait, PgConnection::connect_with(&options)).await {
        Ok(Err(e)) => e,
        // Dropped, it closes its socket.
        Ok(Ok(_)) | Err(_) => none,
    }
}

/// Whether `e` is PostgreSQL's `lock_timeout` passing.
pub(super) fn is_lock_timeout(e: &sqlx::Error) -> bool {
    has_code(e, LOCK_NOT_AVAILABLE)
}

/// Whether PostgreSQL answered `e` with SQLSTATE `code`.
pub(super) fn has_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(e) if e.code().as_deref() == Some(code))
}

/// A deadline for each row of a stream, as [`Within::within`] sets one for a statement,
/// that reads the clock only when a row is not already at hand: `within` on every row
/// costs ~80 ns, most of a second over a load of 10 M widgets.
pub(super) struct RowWait {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl RowWait {
    pub(super) fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// `next`'s answer, or a timeout once it has waited `limit` for it.
    pub(super) async fn for_next<T>(
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
/// fails with: an I/O error (never `is_permanent`).
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
pub(super) trait Within<T>: Future<Output = Result<T, sqlx::Error>> + Sized {
    /// The statement's answer, or an I/O error (never `is_permanent`) if PostgreSQL has
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
