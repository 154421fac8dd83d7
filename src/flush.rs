//! The flusher: writes the dirty widgets' current state behind to the durable store, then
//! lets the WAL drop what the store now holds.
//!
//! [`Flusher::flush_once`] takes the whole dirty set and the LSN it covers, reads each
//! widget's current state from the map, and writes the batch plus that LSN to the store in
//! one atomic step. Only after the store has committed does the WAL trim segments wholly
//! below the LSN; if the store fails, the serials go back into the dirty set and the WAL
//! keeps everything. [`Flusher::run`] calls it every interval, or sooner when enough
//! serials are dirty, backing off exponentially (with jitter) while the store fails.

use crate::engine::MemoryEngine;
use crate::store::{FlushBatch, Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait between retries while the store is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

pub struct Flusher<S> {
    engine: Arc<MemoryEngine>,
    store: Arc<S>,
    interval: Duration,
}

impl<S: Store> Flusher<S> {
    pub fn new(engine: Arc<MemoryEngine>, store: Arc<S>, interval: Duration) -> Self {
        Self {
            engine,
            store,
            interval,
        }
    }

    /// Writes every dirty widget to the store; returns how many it wrote.
    pub async fn flush_once(&self) -> Result<usize, StoreError> {
        let dirty = self.engine.dirty();
        let taken = dirty.take();
        if taken.serials.is_empty() {
            dirty.done(taken);
            return Ok(0);
        }
        let mut widgets = self.engine.snapshot(taken.serials.clone());
        widgets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let count = widgets.len();
        let checkpoint = taken.covered_lsn;
        let started = Instant::now();
        match self
            .store
            .write_batch(FlushBatch {
                widgets,
                checkpoint,
            })
            .await
        {
            Ok(()) => {
                dirty.done(taken);
                self.engine.checkpointed(checkpoint);
                metrics::counter!("widgets_flush_batches_total").increment(1);
                metrics::counter!("widgets_flushed_widgets_total").increment(count as u64);
                metrics::histogram!("widgets_flush_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(count, checkpoint, "flushed");
                Ok(count)
            }
            Err(e) => {
                dirty.restore(taken);
                metrics::counter!("widgets_flush_failures_total").increment(1);
                Err(e)
            }
        }
    }

    /// Flushes every interval (or when enough serials are dirty) until `stop` is
    /// cancelled. A flush in progress is never abandoned halfway.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.engine.flush_wanted().notified() => {}
            }
            match self.flush_once().await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(failures, "the durable store is back: flushing again");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures);
                    tracing::warn!(error = %e, failures, retry_in_ms = delay.as_millis() as u64,
                        backlog = self.engine.dirty().len(), "flush failed; the WAL keeps every change");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Exponential backoff with jitter: about 100 ms, 200 ms, 400 ms ... up to 30 s, each
/// scaled by a random factor in [0.5, 1) so many instances do not retry in step.
pub fn backoff(failures: u32) -> Duration {
    let exp = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exp.min(MAX_BACKOFF).mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(50) && first < FIRST_BACKOFF);
            let fourth = backoff(4);
            assert!(fourth >= Duration::from_millis(400) && fourth < Duration::from_millis(800));
            assert!(backoff(u32::MAX) < MAX_BACKOFF);
            assert!(backoff(u32::MAX) >= MAX_BACKOFF / 2);
        }
    }
}
