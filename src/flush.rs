//! The flusher: writes the dirty widgets' current state behind to the durable store, then
//! lets the WAL drop what the store now holds; and the loop ([`run`]) every flusher runs in.
//!
//! [`Flusher::flush_once`] takes the whole dirty set and the LSN it covers together with
//! each of those widgets' state at exactly that LSN (an atomic cut, so the store never
//! shows one side of a change), and writes the batch plus that LSN to the store in one
//! atomic step. Only after the store has committed does the WAL trim segments wholly
//! below the LSN; if the store fails, the serials go back into the dirty set and the WAL
//! keeps everything. [`run`] calls it every interval, or sooner when enough
//! serials are dirty, backing off exponentially (with jitter) while the store fails.

use crate::engine::MemoryEngine;
use crate::store::{FlushBatch, Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait between retries while the store is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How often shutdown tries its last flush.
const FINAL_FLUSH_ATTEMPTS: u32 = 3;

pub struct Flusher<S> {
    engine: Arc<MemoryEngine>,
    store: Arc<S>,
}

impl<S: Store> Flusher<S> {
    pub fn new(engine: Arc<MemoryEngine>, store: Arc<S>) -> Self {
        Self { engine, store }
    }

    /// Writes every dirty widget to the store; returns how many it wrote.
    pub async fn flush_once(&self) -> Result<usize, StoreError> {
        let dirty = self.engine.dirty();
        let taken = dirty.take();
        let widgets = self.engine.len() as u64;
        // Unpacking and sorting 100,000 widgets takes milliseconds: off the async workers,
        // where it would hold up every request queued on the same worker. Whatever goes
        // wrong there, the taken widgets go back to the dirty set: dropped, the next flush
        // would checkpoint past them and the WAL would lose them.
        let (taken, items) = tokio::task::spawn_blocking(move || {
            let items = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut items = MemoryEngine::flush_items(&taken);
                items.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
                items
            }));
            (taken, items)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        let items = match items {
            Ok(items) => items,
            Err(_) => {
                dirty.restore(taken);
                return Err(StoreError::Task("building the flush batch panicked".into()));
            }
        };
        if items.is_empty() {
            dirty.done(taken);
            return Ok(0);
        }
        let count = items.len();
        let checkpoint = taken.covered_lsn;
        let started = Instant::now();
        match self
            .store
            .write_batch(FlushBatch {
                items,
                checkpoint,
                widgets: Some(widgets),
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
}

/// A flusher the shared loop can drive: the single-node [`Flusher`], or Redis mode's.
pub trait Flush: Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// Writes what is dirty to the store; returns how many widgets it wrote.
    fn flush_once(&self) -> impl Future<Output = Result<usize, Self::Error>> + Send;

    /// Resolves when a flush is wanted before the interval is up.
    fn wanted(&self) -> impl Future<Output = ()> + Send;
}

impl<S: Store> Flush for Flusher<S> {
    type Error = StoreError;

    async fn flush_once(&self) -> Result<usize, StoreError> {
        Flusher::flush_once(self).await
    }

    async fn wanted(&self) {
        self.engine.flush_wanted().notified().await
    }
}

/// Flushes every `interval` (or sooner when `wanted`) until `stop` is cancelled, backing
/// off while the store fails. A flush in progress is never abandoned halfway.
pub async fn run<F: Flush>(flusher: &F, interval: Duration, stop: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = flusher.wanted() => {}
        }
        match flusher.flush_once().await {
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
                    "flush failed; every change stays dirty and is retried");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The last flush at shutdown, tried a few times; what fails stays for the next start.
pub async fn finish<F: Flush>(flusher: &F) {
    for attempt in 1..=FINAL_FLUSH_ATTEMPTS {
        match flusher.flush_once().await {
            Ok(count) => {
                tracing::info!(count, "final flush done");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "final flush failed; nothing is lost, it stays dirty")
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
    use crate::domain::{Command, Name, PortType, Ports, Serial, Widget};
    use crate::engine::memory::new_map;
    use crate::engine::EngineSettings;
    use crate::store::{SledStore, Visitor};
    use crate::wal::{FsyncMode, RealFs, RecoveryMode};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// The real sled store, with a switch that makes writes fail.
    struct Switchable {
        inner: SledStore,
        down: AtomicBool,
    }

    impl Store for Switchable {
        async fn load(&self, visit: Visitor) -> Result<u64, StoreError> {
            self.inner.load(visit).await
        }

        async fn len_hint(&self) -> Result<u64, StoreError> {
            self.inner.len_hint().await
        }

        async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Task("store switched off by the test".into()));
            }
            self.inner.write_batch(batch).await
        }
    }

    fn settings() -> EngineSettings {
        EngineSettings {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_secs(1),
            wal_segment_bytes: 1024,
            wal_max_bytes: 1 << 30,
            wal_recovery: RecoveryMode::Strict,
            queue_depth: 1024,
            max_dirty: 1 << 20,
            flush_batch_size: 1 << 20,
        }
    }

    fn s(x: &str) -> Serial {
        Serial::parse("s", x).unwrap()
    }

    async fn stored(store: &SledStore) -> (HashMap<Serial, Widget>, u64) {
        let all = Arc::new(Mutex::new(HashMap::new()));
        let sink = all.clone();
        let checkpoint = store
            .load(Box::new(move |serial, w| {
                sink.lock().unwrap().insert(serial, w);
            }))
            .await
            .unwrap();
        let map = std::mem::take(&mut *all.lock().unwrap());
        (map, checkpoint)
    }

    #[tokio::test]
    async fn flush_once_writes_current_state_and_checkpoint_then_trims_the_wal() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal_dir = dir.path().join("wal");
        let sled = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let store = Arc::new(Switchable {
            inner: sled.clone(),
            down: AtomicBool::new(false),
        });
        let engine = Arc::new(
            MemoryEngine::start(new_map(0), 0, &wal_dir, Arc::new(RealFs), settings()).unwrap(),
        );
        let flusher = Flusher::new(engine.clone(), store.clone());
        assert_eq!(flusher.flush_once().await.unwrap(), 0, "nothing dirty yet");

        for i in 0..30 {
            engine
                .execute(Command::Create {
                    serial: s(&format!("w{i}")),
                    name: Name::parse("n", "widget").unwrap(),
                    ports: Ports::from_list("p", &[PortType::P]).unwrap(),
                })
                .await
                .unwrap();
        }
        let assoc = Command::Associate {
            port: PortType::P,
            serial: s("w0"),
            peer: s("w1"),
        };
        engine.execute(assoc).await.unwrap();
        engine
            .execute(Command::Delete { serial: s("w2") })
            .await
            .unwrap();
        let segments_before = std::fs::read_dir(&wal_dir).unwrap().count();
        assert!(segments_before > 1, "the test needs a rotated WAL");

        // The store is down: nothing is lost, the serials stay dirty, the WAL stays.
        store.down.store(true, Ordering::SeqCst);
        assert!(flusher.flush_once().await.is_err());
        assert_eq!(engine.dirty().len(), 30);
        assert_eq!(engine.checkpoint(), 0);

        store.down.store(false, Ordering::SeqCst);
        assert_eq!(
            flusher.flush_once().await.unwrap(),
            30,
            "29 widgets and one deletion"
        );
        assert!(engine.dirty().is_empty());
        let (widgets, checkpoint) = stored(&sled).await;
        assert_eq!(checkpoint, 32);
        assert_eq!(widgets.len(), 29);
        assert!(!widgets.contains_key(&s("w2")));
        assert_eq!(widgets[&s("w0")].peer(PortType::P), Some(&s("w1")));
        assert_eq!(widgets[&s("w1")].peer(PortType::P), Some(&s("w0")));
        assert_eq!(
            widgets[&s("w1")].version,
            31,
            "a widget's version is the LSN that last touched it"
        );

        // The trim runs on the sequencer thread after the checkpoint; stop() waits for it.
        tokio::task::spawn_blocking({
            let engine = engine.clone();
            move || engine.stop()
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_dir(&wal_dir).unwrap().count(),
            1,
            "only the active segment is left"
        );
    }

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
