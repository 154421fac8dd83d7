//! The write-ahead log: what makes a write durable before it is acknowledged.
//!
//! # Contract
//! - The WAL frames every record: a caller pushes [`Record`]s into a [`LogBatch`], which
//!   gives each the next LSN, and [`WalWriter::append`] refuses a batch that does not start
//!   where the log ends, so the log has no gap and no LSN twice.
//! - When [`WalWriter::append`] and then [`WalWriter::sync`] return `Ok`, every record of
//!   the batch is on disk and fdatasynced; a new segment file and the WAL directory entry
//!   naming it were fsynced before the first record went into it. Under
//!   [`FsyncMode::Interval`] or [`FsyncMode::Never`] the caller skips `sync` and accepts
//!   that a crash loses the records since the last one.
//! - When `append` fails, nothing of the batch is left in the log (the segment is cut back
//!   to where the batch began), so the log stays valid and the LSNs are not used up. If
//!   even that cut fails, or `sync` fails, the error is [`AppendError::Fatal`]: the caller
//!   must stop acknowledging writes. A failed fsync is never retried as if it had worked
//!   (the kernel may have dropped the dirty pages it could not write).
//! - Recovery ([`recover`]) replays segments in LSN order. It tolerates a torn tail: a
//!   partial or damaged record at the very end of the newest segment with no valid record
//!   after it is cut off with a warning. It refuses damage followed by valid records, a
//!   damaged older segment, or a gap in the LSNs (between segments, or between the store's
//!   checkpoint and the first segment, even one with no record), naming the file and
//!   offset, unless the operator chose [`RecoveryMode::Truncate`], which cuts the log at
//!   the first damage. A segment the next one's name shows to hold nothing above the
//!   checkpoint is not read: the store has it all, and the writer trims it.
//!
//! Layout: `format` (constants and framing), `fs` (the file-system seam; `faulty_fs`, its
//! fault-injecting twin for tests), `writer`
//! (append, group sync, rotation, trimming), `recovery` (start-up replay), `inspect`
//! (the read-only operators' view behind `widgets wal inspect|verify`).

/// The name of the file an instance locks its data directory by (`crate::data_dir`), and
/// its WAL directory when that is elsewhere (`--wal-dir`): recovery passes it by.
pub const LOCK_FILE: &str = "lock";

#[cfg(any(test, feature = "fault-injection"))]
mod faulty_fs;
pub mod format;
pub mod fs;
pub mod identity;
pub mod inspect;
mod recovery;
mod writer;

#[cfg(any(test, feature = "fault-injection"))]
pub use faulty_fs::{Fault, FaultyFs};
pub use format::{LogBatch, Record};
pub use fs::{RealFs, WalFs};
pub use recovery::{recover, recover_segments, Recovered};
pub use writer::{AppendError, SegmentInfo, WalWriter};

use std::io;
use std::path::PathBuf;

/// When the WAL writer fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncMode {
    /// After every group of records, before any of them is acknowledged (the default).
    Always,
    /// At most once per `--fsync-interval`, like Redis's `appendfsync everysec`: a crash
    /// loses up to that much acknowledged work.
    Interval,
    /// Never (the OS writes back when it likes): for benchmarks only.
    Never,
}

/// What recovery does at damage that is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecoveryMode {
    /// Refuse to start, naming the file and offset (the default).
    Strict,
    /// Cut the log at the first damage, dropping every record after it, and start.
    Truncate,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "WAL is damaged in {} at offset {offset}: {reason}. Records after this point \
         cannot be trusted; to cut the log here and start anyway (losing them), run with \
         --wal-recovery truncate",
        file.display()
    )]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "the WAL's identity file {} is damaged ({reason}): it names the history the log \
         belongs to, and no start goes on without knowing it (--wal-recovery truncate does \
         not help). Restore it from a backup of this data directory; or, if the store is \
         this log's, remove it and start once with --accept-mismatched-wal, which gives the \
         log the store's identity",
        file.display()
    )]
    Identity { file: PathBuf, reason: String },
    #[error(
        "WAL record {lsn} is intact but holds a change this service never writes ({reason}): \
         the log was not written by this service; start refused, the log left as it is"
    )]
    Invalid { lsn: u64, reason: String },
    #[error("WAL replay failed: {0}")]
    Replay(String),
}

impl WalError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> WalError {
        let path = path.into();
        move |source| WalError::Io { path, source }
    }
}
