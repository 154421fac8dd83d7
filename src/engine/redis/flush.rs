//! Redis mode's flusher, one in every instance, safe to run concurrently.
//!
//! Each round takes a batch of dirty widgets with their state (atomically), writes it to
//! PostgreSQL, and only after the commit removes each serial from the dirty set, and only
//! if its entry has not moved since it was taken. A flusher that dies before its commit or
//! between its commit and that removal loses nothing: the serials are still dirty and the
//! next round writes them again (an idempotent write). PostgreSQL's version guards stop a
//! slow flusher from writing older state over what a faster one wrote.

use super::RedisEngine;
use crate::engine::EngineError;
use crate::flush::Flush;
use crate::store::{FlushBatch, PgStore, Store, StoreError};
use std::sync::Arc;

/// Most rounds one flush runs, so a flush under constant load still ends.
const MAX_ROUNDS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] EngineError),
}

pub struct RedisFlusher {
    engine: Arc<RedisEngine>,
    store: Arc<PgStore>,
    batch: usize,
}

impl RedisFlusher {
    pub fn new(engine: Arc<RedisEngine>, store: Arc<PgStore>, batch: usize) -> Self {
        Self {
            engine,
            store,
            batch: batch.max(1),
        }
    }

    /// Takes one batch and writes it to PostgreSQL, without acknowledging it: what a
    /// flusher that dies right after its commit leaves behind. Returns the entries an
    /// [`RedisEngine::ack`] would need.
    pub async fn write_one_batch(
        &self,
    ) -> Result<Vec<(crate::domain::Serial, String)>, FlushError> {
        let taken = self.engine.take(self.batch).await?;
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let (mut items, entries): (Vec<_>, Vec<_>) = taken
            .into_iter()
            .map(|(item, entry)| {
                let serial = item.serial.clone();
                (item, (serial, entry))
            })
            .unzip();
        items.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
        // Redis mode has no WAL: the checkpoint stays where it is.
        self.store
            .write_batch(FlushBatch {
                items,
                checkpoint: 0,
            })
            .await?;
        Ok(entries)
    }

    pub async fn flush_once(&self) -> Result<usize, FlushError> {
        let mut written = 0;
        for _ in 0..MAX_ROUNDS {
            let entries = self.write_one_batch().await?;
            if entries.is_empty() {
                break;
            }
            written += entries.len();
            self.engine.ack(&entries).await?;
            metrics::counter!("widgets_flush_batches_total").increment(1);
            metrics::counter!("widgets_flushed_widgets_total").increment(entries.len() as u64);
            if entries.len() < self.batch {
                break;
            }
        }
        Ok(written)
    }
}

impl Flush for RedisFlusher {
    type Error = FlushError;

    async fn flush_once(&self) -> Result<usize, FlushError> {
        RedisFlusher::flush_once(self).await
    }

    async fn wanted(&self) {
        // Redis mode flushes on the interval only.
        std::future::pending().await
    }
}
