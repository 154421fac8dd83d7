//! Redis mode's flusher, one in every instance, safe to run concurrently.
//!
//! Each round takes a batch of dirty widgets with their state (atomically), writes it to
//! PostgreSQL, and only after the commit removes each serial from the dirty set, and only
//! if its entry has not moved since it was taken. A flusher that dies before its commit or
//! between its commit and that removal loses nothing: the serials are still dirty and the
//! next round writes them again (an idempotent write). PostgreSQL's version guards stop a
//! slow flusher from writing older state over what a faster one wrote.

use super::RedisEngine;
use crate::domain::Serial;
use crate::engine::EngineError;
use crate::flush::Flush;
use crate::store::{FlushBatch, PgStore, Store, StoreError};
use std::sync::Arc;

/// Most widgets one round takes: each take is one script, and a script blocks Redis while
/// it runs, so rounds stay small.
const MAX_ROUND: usize = 2000;
/// Most rounds one flush runs, so a flush under constant load still ends.
const MAX_ROUNDS: usize = 1000;

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
            batch: batch.clamp(1, MAX_ROUND),
        }
    }

    /// Takes one batch and writes it to PostgreSQL, without acknowledging it: what a
    /// flusher that dies right after its commit leaves behind. Returns what
    /// [`RedisEngine::ack`] needs: the entries, and the take's time if it took the whole
    /// dirty set.
    pub async fn write_one_batch(
        &self,
    ) -> Result<(Vec<(Serial, String)>, Option<String>), FlushError> {
        let taken = self.engine.take(self.batch).await?;
        if taken.items.is_empty() {
            return Ok((Vec::new(), None));
        }
        let whole_set_at = taken.whole_set.then_some(taken.at_ms);
        let (mut items, entries): (Vec<_>, Vec<_>) = taken
            .items
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
                widgets: None,
            })
            .await?;
        Ok((entries, whole_set_at))
    }

    pub async fn flush_once(&self) -> Result<usize, FlushError> {
        let mut written = 0;
        for _ in 0..MAX_ROUNDS {
            let (entries, whole_set_at) = self.write_one_batch().await?;
            if entries.is_empty() {
                break;
            }
            written += entries.len();
            self.engine.ack(&entries, whole_set_at.as_deref()).await?;
            metrics::counter!("widgets_flush_batches_total").increment(1);
            metrics::counter!("widgets_flushed_widgets_total").increment(entries.len() as u64);
            if whole_set_at.is_some() {
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
