//! The hot state behind one interface, [`Engine`], so handlers do not know which backend
//! they talk to: [`MemoryEngine`] (the papaya map made durable by the local WAL through the
//! sequencer thread) or, with the `redis` feature, `redis` (state shared by several
//! instances). Each engine recovers itself and offers a flush protocol (take a batch,
//! finish it) that `crate::flush` drives.

mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use memory::{
    check_priority, EngineSettings, FlushTicket, MemoryEngine, RecoveryError, SequencerPriority,
};

use crate::domain::{DomainError, Rule, Serial, Widget};
use std::sync::Arc;

/// The hot state the API serves from.
#[derive(Clone)]
pub enum Engine {
    Memory(Arc<MemoryEngine>),
    #[cfg(feature = "redis")]
    Redis(Arc<redis::RedisEngine>),
}

impl Engine {
    /// The widget's current state.
    pub async fn get(&self, serial: &Serial) -> Result<Option<Widget>, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.get(serial)),
            #[cfg(feature = "redis")]
            Engine::Redis(r) => r.get(serial).await,
        }
    }

    /// Makes a write atomically; returns its answer once it is as durable as the backend
    /// promises.
    pub async fn execute<R: Rule>(&self, rule: R) -> Result<R::Output, EngineError> {
        match self {
            Engine::Memory(m) => m.execute(rule).await,
            #[cfg(feature = "redis")]
            Engine::Redis(r) => r.execute(rule).await,
        }
    }

    /// Why this instance refuses writes for good, if it does.
    pub fn failure(&self) -> Option<String> {
        match self {
            Engine::Memory(m) => m.failure().map(str::to_owned),
            #[cfg(feature = "redis")]
            Engine::Redis(_) => None,
        }
    }

    /// Whether the shared state can serve now (Redis mode: Redis answers, holds its data
    /// and is not behind PostgreSQL); single node has nothing to ask.
    pub async fn serving(&self) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            #[cfg(feature = "redis")]
            Engine::Redis(r) => r.check_server().await,
        }
    }

    /// How long the oldest change not yet in the durable store has waited, where this
    /// instance knows it cheaply (single node; Redis mode answers `None`: its lag is a
    /// script away, in `/metrics`).
    pub fn flush_lag(&self) -> Option<std::time::Duration> {
        match self {
            Engine::Memory(m) => Some(m.flush_lag()),
            #[cfg(feature = "redis")]
            Engine::Redis(_) => None,
        }
    }

    /// Gauges describing the state now, for `/metrics`.
    pub async fn gauges(&self) -> Vec<(&'static str, f64)> {
        match self {
            Engine::Memory(m) => m.gauges(),
            #[cfg(feature = "redis")]
            Engine::Redis(r) => r.gauges().await,
        }
    }
}

/// Why a write (or a read) was not served. Nothing of a failed write is visible or durable,
/// except that after [`EngineError::WalFailed`] the record may or may not have reached the
/// disk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
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
    WalWrite,
    /// The WAL can no longer make writes durable; no write will be acknowledged until the
    /// process restarts.
    #[error("the WAL failed: {0}")]
    WalFailed(String),
    /// The shared state (Redis) could not be reached or answered with an error.
    #[error("the shared state is unavailable: {0}")]
    Unavailable(String),
    /// A bug: something the engine relies on did not hold. Nothing was changed.
    #[error("internal error: {0}")]
    Internal(String),
}
