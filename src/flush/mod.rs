//! Write-behind: the one flusher that writes what an engine holds dirty to the durable
//! store, and the loop ([`run`]) it runs in.
//!
//! An engine offers its side of a flush as a [`Source`]: take a batch (each widget's state
//! and what changed about it, an exact cut the store can commit in one transaction), then
//! finish it once the store has answered. [`Flusher::flush_once`] writes batches until the
//! source says it has taken everything dirty; a batch the store did not commit stays dirty
//! and is written again, so nothing acknowledged is lost. [`run`] calls it every interval,
//! or sooner when the source wants it, backing off exponentially (with jitter) while the
//! store fails.
//!
//! Files: `memory` (the single-node engine's side: the whole dirty set at once, then the
//! WAL is trimmed), `redis` (Redis mode's: rounds of at most 2,000 widgets, acknowledged
//! one by one only if unchanged since the take).

mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use crate::engine::EngineError;
use crate::store::{FlushBatch, Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often shutdown tries its last flush.
const FINAL_FLUSH_ATTEMPTS: u32 = 3;
/// Most batches one flush writes, so a flush under constant load still ends.
const MAX_ROUNDS: usize = 1000;

/// An engine's side of a flush.
pub trait Source: Send + Sync + 'static {
    /// What the engine needs back to finish a batch.
    type Ticket: Send;

    /// The next batch to write; `None` when nothing is dirty.
    fn take(&self)
        -> impl Future<Output = Result<Option<Taken<Self::Ticket>>, EngineError>> + Send;

    /// The store has committed the ticket's batch (`written`), or has not.
    fn finish(
        &self,
        ticket: Self::Ticket,
        written: bool,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Resolves when a flush is wanted before the interval is up.
    fn wanted(&self) -> impl Future<Output = ()> + Send;

    /// The store refused this instance for good ([`StoreError::is_fatal`]): stop
    /// acknowledging writes, since none could ever reach the store.
    fn halt(&self, reason: String);

    /// The store's checkpoint is `stored`, below what this instance committed
    /// ([`StoreError::Behind`]): say what a restart would do about it.
    fn store_behind(&self, stored: u64) {
        let _ = stored;
    }
}

/// A batch taken for the store.
pub struct Taken<T> {
    pub batch: FlushBatch,
    pub ticket: T,
    /// The batch held everything dirty at the take: this flush needs no more rounds.
    pub last: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Writes `source`'s dirty widgets to `store`.
pub struct Flusher<E, S> {
    source: Arc<E>,
    store: Arc<S>,
}

impl<E: Source, S: Store> Flusher<E, S> {
    pub fn new(source: Arc<E>, store: Arc<S>) -> Self {
        Self { source, store }
    }

    /// Writes every dirty widget to the store; returns how many it wrote. A failure at any
    /// step (taking a batch, writing it, finishing it) counts in
    /// `widgets_flush_failures_total`.
    pub async fn flush_once(&self) -> Result<usize, FlushError> {
        let flushed = self.rounds().await;
        if flushed.is_err() {
            metrics::counter!("widgets_flush_failures_total").increment(1);
        }
        flushed
    }

    async fn rounds(&self) -> Result<usize, FlushError> {
        let mut written = 0;
        for _ in 0..MAX_ROUNDS {
            let Some(Taken {
                batch,
                ticket,
                last,
            }) = self.source.take().await?
            else {
                break;
            };
            written += self.write(batch, ticket).await?;
            if last {
                break;
            }
        }
        Ok(written)
    }

    /// Writes one batch and finishes it either way; returns how many widgets it wrote.
    async fn write(&self, batch: FlushBatch, ticket: E::Ticket) -> Result<usize, FlushError> {
        let count = batch.items.len();
        let checkpoint = batch.checkpoint;
        let started = Instant::now();
        match self.store.write_batch(batch).await {
            Ok(()) => {
                self.source.finish(ticket, true).await?;
                metrics::counter!("widgets_flush_batches_total").increment(1);
                metrics::counter!("widgets_flushed_widgets_total").increment(count as u64);
                metrics::histogram!("widgets_flush_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(count, ?checkpoint, "flushed");
                Ok(count)
            }
            Err(e) => {
                if let Err(finishing) = self.source.finish(ticket, false).await {
                    tracing::warn!(error = %finishing, "handing a failed batch back failed too; it stays dirty");
                }
                if e.is_fatal() {
                    self.source.halt(e.to_string());
                }
                if let StoreError::Behind { stored, .. } = e {
                    self.source.store_behind(stored);
                }
                Err(e.into())
            }
        }
    }

    /// Takes one batch and commits it to the store without finishing it: what a flusher
    /// that dies right after its commit leaves behind. Returns the unfinished ticket.
    pub async fn write_unfinished(&self) -> Result<Option<E::Ticket>, FlushError> {
        let Some(taken) = self.source.take().await? else {
            return Ok(None);
        };
        self.store.write_batch(taken.batch).await?;
        Ok(Some(taken.ticket))
    }
}

/// Flushes every `interval` (or sooner when the source wants it) until `stop` is
/// cancelled, backing off while the store fails. `stop` does not cut a flush in progress
/// short; only the shutdown's `--final-flush-timeout` abandons one.
pub async fn run<E: Source, S: Store>(
    flusher: &Flusher<E, S>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = flusher.source.wanted() => {}
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
                let delay = crate::backoff::backoff(failures);
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
pub async fn flush_at_shutdown<E: Source, S: Store>(flusher: &Flusher<E, S>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Mark, Serial};
    use crate::store::{FlushItem, Visitor};
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// A source that always has one widget dirty, hands out `round` of them per batch
    /// until `per_flush` are taken, and counts what comes back. Only the loop's timing is
    /// under test here; the engines' own sides are tested with real stores.
    struct Counting {
        wanted: Notify,
        taken: AtomicUsize,
        finished: Mutex<Vec<bool>>,
        per_flush: usize,
    }

    impl Counting {
        fn new(per_flush: usize) -> Arc<Self> {
            Arc::new(Self {
                wanted: Notify::new(),
                taken: AtomicUsize::new(0),
                finished: Mutex::new(Vec::new()),
                per_flush,
            })
        }
    }

    impl Source for Counting {
        type Ticket = ();

        async fn take(&self) -> Result<Option<Taken<()>>, EngineError> {
            let n = self.taken.fetch_add(1, Ordering::SeqCst) + 1;
            let item = FlushItem {
                serial: Serial::parse("s", "w").unwrap(),
                mark: Mark::default(),
                widget: None,
                version: n as u64,
            };
            Ok(Some(Taken {
                batch: FlushBatch {
                    items: vec![item],
                    checkpoint: None,
                    widgets: None,
                    redis: None,
                },
                ticket: (),
                last: n.is_multiple_of(self.per_flush),
            }))
        }

        async fn finish(&self, _: (), written: bool) -> Result<(), EngineError> {
            self.finished.lock().unwrap().push(written);
            Ok(())
        }

        async fn wanted(&self) {
            self.wanted.notified().await
        }

        fn halt(&self, _: String) {}
    }

    /// A store that fails its first `failing` writes and records when each write came
    /// (in the test's paused time, from its start).
    struct Recording {
        started: tokio::time::Instant,
        failing: AtomicU32,
        writes: Mutex<Vec<(Duration, bool)>>,
    }

    impl Recording {
        fn new(failing: u32) -> Arc<Self> {
            Arc::new(Self {
                started: tokio::time::Instant::now(),
                failing: AtomicU32::new(failing),
                writes: Mutex::new(Vec::new()),
            })
        }

        fn writes(&self) -> Vec<(Duration, bool)> {
            self.writes.lock().unwrap().clone()
        }
    }

    impl Store for Recording {
        async fn load(&self, _: Visitor) -> Result<u64, StoreError> {
            Ok(0)
        }

        async fn len_hint(&self) -> Result<u64, StoreError> {
            Ok(0)
        }

        async fn identity(&self) -> Result<Option<String>, StoreError> {
            Ok(None)
        }

        async fn set_identity(&self, _: &str) -> Result<(), StoreError> {
            Ok(())
        }

        async fn write_batch(&self, _: FlushBatch) -> Result<(), StoreError> {
            let ok = self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err();
            self.writes
                .lock()
                .unwrap()
                .push((self.started.elapsed(), ok));
            if ok {
                Ok(())
            } else {
                Err(StoreError::Task("down".into()))
            }
        }
    }

    /// Starts the loop on `source` and `store` at `interval`; cancel the token to stop it.
    fn start(
        source: &Arc<Counting>,
        store: &Arc<Recording>,
        interval: Duration,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let flusher = Flusher::new(source.clone(), store.clone());
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { run(&flusher, interval, stop).await }
        });
        (stop, running)
    }

    /// Runs the loop at a 1 s interval for `secs` of paused time (and half a second), then
    /// stops it.
    async fn run_for(source: &Arc<Counting>, store: &Arc<Recording>, secs: u64) {
        let (stop, running) = start(source, store, Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(secs) + Duration::from_millis(500)).await;
        stop.cancel();
        running.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_every_interval_in_rounds_until_the_last() {
        let (source, store) = (Counting::new(3), Recording::new(0));
        run_for(&source, &store, 3).await;
        let times: Vec<u64> = store.writes().iter().map(|(t, _)| t.as_secs()).collect();
        assert_eq!(
            times,
            vec![1, 1, 1, 2, 2, 2, 3, 3, 3],
            "three flushes, each of three rounds"
        );
        assert_eq!(*source.finished.lock().unwrap(), vec![true; 9]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wanted_flush_comes_before_the_interval() {
        let (source, store) = (Counting::new(1), Recording::new(0));
        let (stop, running) = start(&source, &store, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(300)).await;
        source.wanted.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            store.writes(),
            vec![(Duration::from_millis(300), true)],
            "flushed when wanted, not at the 10 s interval"
        );
        stop.cancel();
        running.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_is_retried_with_growing_waits_and_the_batch_handed_back() {
        let (source, store) = (Counting::new(1), Recording::new(4));
        run_for(&source, &store, 8).await;
        let writes = store.writes();
        let oks: Vec<bool> = writes.iter().map(|(_, ok)| *ok).collect();
        assert_eq!(&oks[..5], &[false, false, false, false, true]);
        // Each retry waits the interval plus a backoff that doubles (with jitter in
        // [0.5, 1)): 100, 200, 400, 800 ms at most.
        let gaps: Vec<Duration> = writes.windows(2).map(|w| w[1].0 - w[0].0).collect();
        for (i, max_backoff_ms) in [100, 200, 400, 800].into_iter().enumerate() {
            let max = Duration::from_secs(1) + Duration::from_millis(max_backoff_ms);
            let min = Duration::from_secs(1) + Duration::from_millis(max_backoff_ms / 2);
            // At most, not below: the paused clock rounds timers to whole milliseconds.
            assert!(
                gaps[i] >= min && gaps[i] <= max,
                "retry {i} came after {:?}",
                gaps[i]
            );
        }
        assert_eq!(
            &source.finished.lock().unwrap()[..5],
            &[false, false, false, false, true],
            "every failed batch is handed back to the source"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_loop_even_during_a_backoff() {
        let (source, store) = (Counting::new(1), Recording::new(u32::MAX));
        let (stop, running) = start(&source, &store, Duration::from_secs(1));
        // After the first failure, the loop backs off; stop it then.
        tokio::time::sleep(Duration::from_millis(1010)).await;
        assert_eq!(store.writes().len(), 1);
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(1), running)
            .await
            .expect("the loop stopped at once")
            .unwrap();
        assert_eq!(store.writes().len(), 1, "no write after stop");
    }
}
