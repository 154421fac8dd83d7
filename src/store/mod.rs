//! The durable store the flusher writes behind to, and start-up loads from.
//!
//! A store holds every widget's state as of a checkpoint LSN, and writes a batch of
//! widgets together with the checkpoint that covers them atomically: after a crash it holds
//! either the whole batch and the new checkpoint or neither, so start-up knows exactly where
//! WAL replay begins.

pub mod background;
pub mod postgres;
pub mod sled;

pub use self::postgres::{Fence, PgStore};

pub use self::sled::SledStore;

use crate::domain::{Mark, Serial, Widget};
use std::future::Future;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("the store holds a damaged entry for key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("PostgreSQL migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store task failed: {0}")]
    Task(String),
    /// A file or thread the store needs: what was being done, and the OS's error.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "another single-node widgets instance writes to this PostgreSQL database (its \
         session, backend PID {}, holds the single-writer lock): one single-node instance \
         owns its database; run several instances in Redis mode",
        backend_pid.map_or("unknown".to_owned(), |p| p.to_string())
    )]
    WriterHeld { backend_pid: Option<i32> },
    #[error(
        "a flush of an earlier single-node instance is still open in PostgreSQL: backend PID \
         {} holds the single_writer row, and did not let it go in {waited:?}. Its backend \
         stalls (stopped, swapped out, or its client's network gone); start again once it \
         has ended (`SELECT pg_terminate_backend(PID)` ends it once it runs)",
        backend_pid.map_or("unknown".to_owned(), |p| p.to_string())
    )]
    WriterRowHeld {
        backend_pid: Option<i32>,
        waited: std::time::Duration,
    },
    #[error(
        "Redis mode's fencing epoch was not raised: flushes in flight held it for longer \
         than {waited:?} (another instance's, or one whose PostgreSQL backend stalls); \
         tried again"
    )]
    EpochHeld { waited: std::time::Duration },
    #[error(
        "the batch was taken from Redis under epoch {mine}, and Redis has since been checked \
         or loaded again (epoch {current}): not committed; it is taken again"
    )]
    StaleEpoch { mine: u64, current: u64 },
    #[error(
        "this instance is no longer the database's writer (its token {mine}, the database's \
         {current}): another single-node instance took over; flush refused"
    )]
    Fenced { mine: i64, current: i64 },
    #[error("{}", other_history(mine, theirs.as_deref()))]
    OtherHistory {
        mine: String,
        theirs: Option<String>,
    },
    /// A table the migrations give one row (the checkpoint's, the writer's token's, the
    /// version high water's, Redis mode's epoch's) has lost it.
    #[error(
        "PostgreSQL's {table} table has lost its one row (deleted by hand, or left out by a \
         restore): nothing is committed, and what was to be written is kept and tried \
         again. Restore the database, or put the row back as the migration that made it \
         did (migrations/)"
    )]
    MissingRow { table: &'static str },
    /// The database has gone back in time; `stored` is its checkpoint.
    #[error(
        "PostgreSQL has gone back in time: {what}. It was restored from an older backup, or \
         failed over to a replica that lagged, and lost flushes. The checkpoint is not moved, \
         and the WAL is kept from here on (README, \"When PostgreSQL goes back in time\")"
    )]
    Behind { what: String, stored: u64 },
}

/// What [`StoreError::OtherHistory`] says: a database that records no history at all was
/// not necessarily another service's.
fn other_history(mine: &str, theirs: Option<&str>) -> String {
    let what = match theirs {
        Some(theirs) => format!(
            "PostgreSQL now holds another history ({theirs}), not this instance's ({mine}): it \
             was replaced by another service's database or restored from another service's \
             backup"
        ),
        None => format!(
            "PostgreSQL now records no history where this instance's is {mine}: it was \
             restored from a backup taken before the service recorded one (written by an \
             older version), or its store_identity row was deleted"
        ),
    };
    format!(
        "{what}. Not committed, and the WAL is kept from here on: bring back this service's \
         database"
    )
}

impl StoreError {
    /// Wraps an I/O error with what was being done when it happened (like `WalError::io`).
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let what = what.into();
        move |source| StoreError::Io { what, source }
    }

    /// No later write from this instance can succeed either: another instance owns the
    /// store now, so acknowledging more writes would only strand them in this one's WAL.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }
}

/// One widget in a flush: its current state (`None`: deleted), what changed about it since
/// the last flush (a store may write only that), and the version of that state.
#[derive(Debug, Clone)]
pub struct FlushItem {
    pub serial: Serial,
    pub mark: Mark,
    pub widget: Option<Widget>,
    /// The widget's version, or for a deletion a version at or after it.
    pub version: u64,
}

/// One flush: the changed widgets, sorted by serial, and the LSN their state covers.
#[derive(Debug, Clone)]
pub struct FlushBatch {
    pub items: Vec<FlushItem>,
    /// The WAL LSN the store is complete up to once it holds this batch; `None` where no
    /// WAL stands behind the batch (Redis mode): the stored checkpoint stays as it is.
    pub checkpoint: Option<u64>,
    /// How many widgets the hot state held at the batch's cut, when the writer knows: a
    /// store may keep it for [`Store::len_hint`], and the embedded store lays itself out
    /// for it at its first write (`bench-seed` gives the count it will have written).
    pub widgets: Option<u64>,
    /// Redis mode: what the batch was taken under, and where its commit is counted.
    pub redis: Option<RedisTake>,
}

/// Redis mode's side of a flush batch.
#[derive(Debug, Clone, Default)]
pub struct RedisTake {
    /// The fencing epoch the batch was taken under: the store commits it only while that
    /// is still the current epoch ([`StoreError::StaleEpoch`]).
    pub epoch: u64,
    /// Where the store puts the flush that committed the batch, which Redis keeps with its
    /// acknowledgement.
    pub committed: Arc<OnceLock<FlushId>>,
}

/// One committed flush: its count (`version_high_water.flushes`, the commits before it
/// and itself) and the id it logged with it (`flush_log`). Two histories of a database
/// that went back in time can each hold a flush of one count, never of one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushId {
    pub count: u64,
    pub id: i64,
}

/// Called with every widget the store holds, while it loads.
pub type Visitor = Box<dyn FnMut(Serial, Widget) + Send>;

pub trait Store: Send + Sync + 'static {
    /// Streams every widget to `visit` and returns the checkpoint LSN (0 for a new store).
    /// Every widget visited has passed [`Widget::check`]: damage is a
    /// [`StoreError::Corrupt`] naming its key, never a widget the engine cannot hold.
    fn load(&self, visit: Visitor) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// About how many widgets `load` will stream (0: no idea), cheaply: start-up sizes the
    /// map with it, since growing a 10-million-entry map doubles its table near the end.
    fn len_hint(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The identity of the history the store belongs to (the same as its WAL's); `None`
    /// for a store that has none yet (new, or written before identities existed).
    fn identity(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Records `identity` as the store's, durably, replacing any it had.
    fn set_identity(&self, identity: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes the batch and its checkpoint atomically and durably.
    fn write_batch(&self, batch: FlushBatch)
        -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Where `serial` lies in the store's own order, for a bulk write (a seed) that wants
    /// to write in that order: the embedded store keeps widgets in buckets by a hash of
    /// the serial, and fills its tree several times faster in bucket order. By default
    /// every serial is alike, and the writer's own order stands.
    fn write_order(&self, _serial: &str) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::StoreError;

    #[test]
    fn a_database_that_records_no_history_is_not_called_another_services() {
        let none = StoreError::OtherHistory {
            mine: "abc".into(),
            theirs: None,
        }
        .to_string();
        assert!(none.contains("records no history"), "{none}");
        assert!(!none.contains("another service"), "{none}");
        let other = StoreError::OtherHistory {
            mine: "abc".into(),
            theirs: Some("xyz".into()),
        }
        .to_string();
        assert!(
            other.contains("another history (xyz)") && other.contains("another service's backup"),
            "{other}"
        );
        assert!(
            other.ends_with("bring back this service's database"),
            "{other}"
        );
    }
}
