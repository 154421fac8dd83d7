//! The hot state behind one interface. Today one backend: [`memory`], the papaya map made
//! durable by the local WAL through the [`sequencer`] thread.

pub mod dirty;
pub mod memory;
mod sequencer;

pub use memory::{EngineSettings, MemoryEngine};

use crate::domain::DomainError;

/// Why a write was not applied. Nothing of a failed write is visible or durable, except
/// that after [`WriteError::WalFailed`] the record may or may not have reached the disk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The write queue, the dirty set or the WAL is over its limit.
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The WAL's disk is full; the write was not logged.
    #[error("no space left for the WAL")]
    DiskFull,
    /// The WAL write failed and was cut back; the write was not logged.
    #[error("WAL write failed")]
    Storage,
    /// The WAL can no longer make writes durable; no write will be acknowledged until the
    /// process restarts.
    #[error("the WAL failed: {0}")]
    WalFailed(String),
}
