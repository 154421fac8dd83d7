//! The single-node hot state: a papaya map that only ever holds durable state, the dirty
//! set, and the sequencer thread that orders and logs every write.
//!
//! [`MemoryEngine::recover`] is the whole of start-up recovery: it loads the durable store
//! into the map, replays the WAL above the store's checkpoint and starts the sequencer.
//! Reads go straight to the map. Writes go through the sequencer, which applies a change
//! to the map only after its WAL record is durable, so a read never returns a change that
//! a crash could still lose; a group's changes appear under one write lock, so no reader
//! sees one side of an association change without the other. A flush takes the dirty set
//! with [`MemoryEngine::take_flush`] and hands it back with [`MemoryEngine::finish_flush`].
//!
//! Files: `state` (what the parts share), `packed` (the map's form of a widget), `dirty`
//! (the dirty set), `replay` (WAL replay on every core), `sequencer` (plan, log, publish).

mod dirty;
mod packed;
mod replay;
mod sequencer;
mod state;

use self::dirty::{DirtySet, Taken};
use self::packed::PackedWidget;
use self::sequencer::Job;
pub use self::sequencer::{check_priority, SequencerPriority};
use self::state::{Shared, WidgetMap};
use super::EngineError;
use crate::domain::{Rule, Serial, Widget};
use crate::store::background::Background;
use crate::store::{FlushBatch, FlushItem, Store, StoreError};
use crate::wal::{identity, FsyncMode, RecoveryMode, WalError, WalFs, WalWriter};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a finished flush waits between the chunks of entries it hands the sequencer to
/// free: about one group's time at 10,000 PUTs/s.
const RELEASE_PAUSE: Duration = Duration::from_millis(2);

/// The most widgets start-up sizes the map for from the store's hint (ten times the
/// design's 10 million); a larger hint is ignored and the map grows as it loads.
const MAX_PRESIZE: u64 = 100_000_000;

/// The engine's limits and WAL settings (see `Config` for what each means).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    /// How long the sequencer waits after a group for the next one's writes under
    /// concurrent load (see the sequencer).
    pub commit_delay: Duration,
    pub wal_segment_bytes: u64,
    pub wal_preallocate: bool,
    /// Nice value of the thread that builds flush batches (`--flush-nice`).
    pub flush_nice: i32,
    /// How the sequencer thread is scheduled (`--sequencer-priority`).
    pub sequencer_priority: SequencerPriority,
    pub wal_max_bytes: u64,
    pub wal_recovery: RecoveryMode,
    pub queue_depth: usize,
    pub max_dirty: usize,
    pub flush_batch_size: usize,
    /// Start even when the WAL and the store are not from one history (see
    /// [`RecoveryError::Identity`]).
    pub accept_mismatched_wal: bool,
}

/// Why recovery could not bring the hot state back.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    // The cause is in the message and not a `source` as well: a report of the whole chain
    // (`{:#}`) printed it twice.
    #[error("loading the durable store: {0}")]
    Store(StoreError),
    #[error("recovering the WAL: {0}")]
    Wal(WalError),
    /// The WAL and the store are not from one history: replaying one over the other would
    /// mix them, or lose acknowledged writes without a word.
    #[error("{0}")]
    Identity(String),
    #[error("starting the sequencer: {0}")]
    Sequencer(std::io::Error),
}

impl From<StoreError> for RecoveryError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<WalError> for RecoveryError {
    fn from(e: WalError) -> Self {
        Self::Wal(e)
    }
}

pub struct MemoryEngine {
    shared: Arc<Shared>,
    settings: EngineSettings,
    jobs: SyncSender<Job>,
    thread: Mutex<Option<JoinHandle<()>>>,
    checkpoint: AtomicU64,
    /// Builds each flush's batch and empties the finished one, at `--flush-nice`. On
    /// tokio's blocking pool that work (unpacking and sorting 170,000 taken widgets) ran
    /// 25-72 ms at a time at the requests' priority, on one of this machine's two cores,
    /// in the slow seconds of a 1 M-widget load (BENCHMARKS.md, "Zero-filled WAL
    /// segments").
    flush_prep: Background,
}

/// A flush under way: the taken widgets, which go back to the dirty set if the store did
/// not take them.
pub struct FlushTicket {
    taken: Taken,
}

impl MemoryEngine {
    /// Brings back the hot state and starts taking writes: sizes the map from the store's
    /// count, loads the store into it, replays the WAL in `wal_dir` above the store's
    /// checkpoint (marking what it replays dirty, for the next flush), opens the WAL for
    /// appending after it and starts the sequencer.
    pub async fn recover<S: Store>(
        store: &S,
        wal_dir: &Path,
        fs: Arc<dyn WalFs>,
        settings: EngineSettings,
    ) -> Result<Self, RecoveryError> {
        let started = Instant::now();
        // Sized up front: grown instead, the map doubles its table near the end of a large
        // load (~150 MB more at 10 M widgets). A hint past any sane size is not trusted.
        let hint = store.len_hint().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no widget count from the store; the map grows as it loads");
            0
        });
        let capacity = if hint <= MAX_PRESIZE {
            hint as usize
        } else {
            0
        };
        let shared = Arc::new(Shared::new(
            WidgetMap::new(capacity),
            DirtySet::default(),
            settings.flush_batch_size,
        ));
        // Every store checks what it loads (`Widget::check`), so packing cannot fail here.
        let sink = shared.clone();
        let checkpoint = store
            .load(Box::new(move |serial, widget| {
                sink.map
                    .insert(PackedWidget::pack(&serial, &widget), &sink.map.guard());
            }))
            .await?;
        tracing::info!(
            widgets = shared.map.len(),
            checkpoint,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store loaded"
        );
        check_identity(store, &*fs, wal_dir, settings.accept_mismatched_wal).await?;
        let (wal_dir, replaying) = (wal_dir.to_owned(), shared.clone());
        let settings_ = settings.clone();
        let (writer, next_lsn) = tokio::task::spawn_blocking(move || {
            replay_and_open(&replaying, &wal_dir, fs, &settings_, checkpoint)
        })
        .await
        .map_err(|e| WalError::Replay(e.to_string()))??;
        let (jobs, rx) = mpsc::sync_channel(settings.queue_depth);
        let policy = sequencer::SyncPolicy {
            fsync: settings.fsync,
            fsync_interval: settings.fsync_interval,
            commit_delay: settings.commit_delay,
            priority: settings.sequencer_priority,
        };
        let flush_prep = Background::start("widgets-flush-prep", settings.flush_nice)
            .map_err(StoreError::io("starting the flush's thread"))?;
        let thread = sequencer::spawn(shared.clone(), writer, rx, policy)
            .map_err(RecoveryError::Sequencer)?;
        tracing::debug!(next_lsn, "sequencer started");
        Ok(Self {
            shared,
            settings,
            jobs,
            thread: Mutex::new(Some(thread)),
            checkpoint: AtomicU64::new(checkpoint),
            flush_prep,
        })
    }

    /// The widget's durable state.
    pub fn get(&self, serial: &Serial) -> Option<Widget> {
        let _published = self.shared.publish_lock.read().expect("publish lock");
        self.shared.map.unpacked(serial.as_str())
    }

    /// Orders, logs and publishes a write; returns its answer once it is durable (or
    /// refused).
    pub async fn execute<R: Rule>(&self, rule: R) -> Result<R::Output, EngineError> {
        if let Some(reason) = self.shared.failed.get() {
            return Err(EngineError::WalFailed(reason.clone()));
        }
        if self.shared.dirty.len() >= self.settings.max_dirty {
            return Err(EngineError::Overloaded(
                "too many changes are waiting for the durable store",
            ));
        }
        if self.wal_bytes() >= self.settings.wal_max_bytes {
            return Err(EngineError::Overloaded(
                "the WAL is over its size limit while the durable store catches up",
            ));
        }
        let (job, answer) = sequencer::write(rule);
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(EngineError::Overloaded("the write queue is full"))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(EngineError::WalFailed("the WAL writer has stopped".into()))
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(EngineError::WalFailed("the WAL writer has stopped".into())))
    }

    /// Takes every dirty widget for a flush: the batch to write (sorted by serial, each
    /// widget's state and what changed about it) and the ticket to hand back to
    /// [`MemoryEngine::finish_flush`]; `None` when nothing is dirty.
    ///
    /// The sequencer marks a group's widgets dirty with their states in one step, so a
    /// take is an exact cut of the state at the batch's checkpoint: a store that commits it
    /// never shows one side of a change. The take itself is a swap under the dirty set's
    /// lock; unpacking and sorting (milliseconds for 100,000 widgets) run off the async
    /// workers, and whatever goes wrong there puts the widgets back, since a lost take
    /// would let the next checkpoint trim their records from the WAL.
    pub async fn take_flush(&self) -> Result<Option<(FlushBatch, FlushTicket)>, EngineError> {
        let taken = self.shared.dirty.take();
        if taken.widgets.is_empty() {
            self.shared.dirty.done(taken);
            return Ok(None);
        }
        let widgets = self.len() as u64;
        // The blocking task shares the take, so it comes back whatever happens there (a
        // panic included: tokio catches it and the task's share is dropped).
        let taken = Arc::new(taken);
        let building = taken.clone();
        // Under `--fsync interval` (or `never`) the taken states may rest on records not
        // yet on disk: the store should not get them, and a checkpoint past them, before
        // the WAL has them, or a power loss leaves a log that ends below the store's
        // checkpoint, which a start refuses as a WAL older than its store. The flush goes
        // on whatever the sync says: a log that failed (or a sequencer that is gone) can
        // no longer keep what was acknowledged since its last good sync, and the store is
        // then its only durable copy; a refused start can be told to go on, a lost write
        // cannot be brought back.
        let sync = (self.settings.fsync != FsyncMode::Always).then(|| self.jobs.clone());
        let built = self
            .flush_prep
            .run(move || {
                let items = flush_items(&building);
                if let Some(jobs) = sync {
                    let (reply, synced) = tokio::sync::oneshot::channel();
                    if jobs.send(Job::Sync(reply)).is_ok() {
                        let _ = synced.blocking_recv();
                    }
                }
                items
            })
            .await;
        let Some(taken) = Arc::into_inner(taken) else {
            // Cannot happen (the task has ended, and its share with it); were it to, the
            // widgets would be in no take, so stop acknowledging writes rather than risk
            // a checkpoint past them.
            let reason = "a flush lost its take of the dirty set".to_owned();
            self.shared.fail(reason.clone());
            return Err(EngineError::Internal(reason));
        };
        let items = match built {
            Ok(items) => items,
            Err(e) => {
                self.shared.dirty.restore(taken);
                return Err(EngineError::Internal(format!(
                    "building the flush batch failed: {e}"
                )));
            }
        };
        let batch = FlushBatch {
            items,
            checkpoint: Some(taken.covered_lsn),
            widgets: Some(widgets),
            redis: None,
        };
        Ok(Some((batch, FlushTicket { taken })))
    }

    /// The store has committed the ticket's batch (`written`), and the WAL may drop every
    /// record up to its checkpoint; or it has not, and the widgets are dirty again (a
    /// widget changed since the take keeps its newer state).
    pub fn finish_flush(&self, ticket: FlushTicket, written: bool) {
        let lsn = ticket.taken.covered_lsn;
        if written {
            let taken = self.shared.dirty.done(ticket.taken);
            // The take's table goes back to the dirty set for the next one, and its entries
            // to the sequencer to be freed, a chunk at a time with a pause between, so that
            // no group frees more than about one (see `DirtySet::recycle`). Emptying a take
            // of 250,000 widgets held an async worker, and every request on it, for
            // milliseconds; the flush's own thread does it instead.
            let large = taken.widgets.len() > 1024;
            let shared = self.shared.clone();
            let jobs = self.jobs.clone();
            let recycle = move || {
                shared.dirty.recycle(taken.widgets, |chunk| {
                    // A full queue or a stopped sequencer hands the chunk back: it is
                    // freed here.
                    if jobs.try_send(Job::Release(chunk)).is_ok() && large {
                        std::thread::sleep(RELEASE_PAUSE);
                    }
                })
            };
            if !large {
                recycle();
            } else if let Err(e) = self.flush_prep.spawn(recycle) {
                // The take is freed here, and the next one grows a table of its own.
                tracing::warn!(error = %e, "could not hand a finished flush to its thread");
            }
            self.checkpoint.fetch_max(lsn, Ordering::Relaxed);
            // If the queue is full the next checkpoint trims instead.
            let _ = self.jobs.try_send(Job::Trim(lsn));
        } else {
            self.shared.dirty.restore(ticket.taken);
        }
    }

    /// The store went back in time to checkpoint `stored` (its flushes above it are lost):
    /// says whether the WAL still holds every record above it, so that a restart replays
    /// them into the store, or which records are only in this process's memory now.
    pub fn store_behind(&self, stored: u64) {
        let first = self.shared.wal_first_lsn.load(Ordering::Relaxed);
        if first <= stored.saturating_add(1) {
            tracing::error!(
                stored,
                wal_first_lsn = first,
                "the store has gone back in time, and the WAL holds every record above its \
                 checkpoint: restarting this instance replays them into it, and nothing is lost"
            );
        } else {
            tracing::error!(
                stored,
                wal_first_lsn = first,
                "the store has gone back in time, and the WAL no longer holds the records \
                 after its checkpoint up to wal_first_lsn: they are only in this process's \
                 memory. Keep it running and bring back the store that holds them; a restart \
                 would refuse to start, naming them, and starting anyway (--wal-recovery \
                 truncate) would lose them"
            );
        }
    }

    /// Resolves when enough widgets are dirty to flush before the interval is up.
    pub async fn flush_wanted(&self) {
        self.shared.flush_wanted.notified().await
    }

    /// How long the oldest change not yet in the durable store has waited (zero when none
    /// waits).
    pub fn flush_lag(&self) -> Duration {
        self.shared.dirty.lag()
    }

    /// Widgets waiting for the durable store (in the dirty set or in a flush under way).
    pub fn dirty_len(&self) -> usize {
        self.shared.dirty.len()
    }

    /// The LSN the durable store holds everything up to, as far as this process knows.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.load(Ordering::Relaxed)
    }

    /// Widgets in memory.
    pub fn len(&self) -> usize {
        self.shared.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn wal_bytes(&self) -> u64 {
        self.shared.wal_bytes.load(Ordering::Relaxed)
    }

    /// Gauges describing the state now, for `/metrics`.
    pub fn gauges(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("widgets_in_memory", self.len() as f64),
            ("widgets_dirty", self.dirty_len() as f64),
            ("widgets_flush_lag_seconds", self.flush_lag().as_secs_f64()),
            ("widgets_wal_bytes", self.wal_bytes() as f64),
            ("widgets_checkpoint_lsn", self.checkpoint() as f64),
            (
                "widgets_wal_failed",
                f64::from(u8::from(self.failure().is_some())),
            ),
        ]
    }

    /// Stops acknowledging writes for good (as after a failed fsync): the store has
    /// refused this instance, so a write could never get past its WAL.
    pub fn refuse_writes(&self, reason: String) {
        self.shared.fail(reason);
    }

    /// Why this instance stopped taking writes, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failed.get().map(String::as_str)
    }

    /// Stops the sequencer after the writes already queued, syncs the WAL, and waits for
    /// the thread. Blocking: call it off the async workers.
    pub fn stop(&self) {
        let _ = self.jobs.send(Job::Stop);
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            if thread.join().is_err() {
                tracing::error!("the sequencer thread panicked");
            }
        }
    }
}

/// Replays the WAL above `checkpoint` into the shared map and dirty set, then opens the
/// log for appending after its last record (trimmed to the checkpoint). Blocking.
fn replay_and_open(
    shared: &Shared,
    wal_dir: &Path,
    fs: Arc<dyn WalFs>,
    settings: &EngineSettings,
    checkpoint: u64,
) -> Result<(WalWriter, u64), RecoveryError> {
    let started = Instant::now();
    let recovered = replay::replay(
        &shared.map,
        &shared.dirty,
        &*fs,
        wal_dir,
        settings.wal_recovery,
        checkpoint,
        replay::FOLD,
    )?;
    tracing::info!(
        replayed = recovered.replayed,
        last_lsn = recovered.last_lsn,
        segments = recovered.segments.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "WAL replayed"
    );
    // Cut at damage in truncate mode, as asked: the log may end below the checkpoint for
    // that alone, and what the cut dropped the store holds or the operator gave up.
    let older = recovered
        .end
        .filter(|&end| end < checkpoint && !recovered.cut);
    if let Some(last) = older {
        let reason = format!(
            "the WAL in {} ends at LSN {last}, below the store's checkpoint {checkpoint}: it is \
             older than the store (a copy restored from before the store's last flush?), so \
             it is not the log of the writes the store holds. Point --data-dir at the WAL \
             that belongs to this store, or start with --accept-mismatched-wal to go on \
             from the store (new writes are numbered above its checkpoint)",
            wal_dir.display()
        );
        if !settings.accept_mismatched_wal {
            return Err(RecoveryError::Identity(reason));
        }
        tracing::warn!(%reason, "--accept-mismatched-wal: starting anyway");
    }
    // LSN u64::MAX is reserved (see recovery), so the log can always say what comes next.
    let next_lsn = recovered
        .last_lsn
        .checked_add(1)
        .filter(|&n| n < u64::MAX)
        .ok_or_else(|| WalError::Corrupt {
            file: wal_dir.to_owned(),
            offset: 0,
            reason: "the log or the store's checkpoint has used up every LSN".into(),
        })?;
    // The LSNs the WAL goes on with are above the store's checkpoint even when the WAL
    // ended below it (accepted above): recovered.last_lsn counts the checkpoint in.
    let mut writer = WalWriter::open(
        fs,
        wal_dir,
        recovered.segments,
        next_lsn,
        settings.wal_segment_bytes,
        shared.wal_bytes.clone(),
    )?;
    if settings.wal_preallocate {
        writer.preallocate()?;
    }
    writer.trim(checkpoint);
    (shared.wal_first_lsn).store(writer.first_lsn(), Ordering::Relaxed);
    Ok((writer, next_lsn))
}

/// Checks that the WAL in `wal_dir` and `store` are from one history, and gives both the
/// same identity on their first start (or when either was written before identities).
/// Refused: a WAL and a store with different identities, and a store with an identity
/// beside a WAL directory without one (the WAL was deleted or moved away: writes
/// acknowledged after the store's checkpoint would be lost without a word).
async fn check_identity<S: Store>(
    store: &S,
    fs: &dyn WalFs,
    wal_dir: &Path,
    accept: bool,
) -> Result<(), RecoveryError> {
    let in_store = store.identity().await?;
    let in_wal = identity::read(fs, wal_dir)?;
    let refusal = match (&in_store, &in_wal) {
        (Some(s), Some(w)) if s != w => Some(format!(
            "the WAL in {} belongs to history {w}, the store to history {s}: they are not \
             the log and the store of one service, and replaying one over the other would \
             mix two histories. Give --data-dir and the store (DATABASE_URL) that belong \
             together, or start with --accept-mismatched-wal to replay this WAL's records \
             above the store's checkpoint into this store",
            wal_dir.display()
        )),
        (Some(s), None) => Some(format!(
            "the store belongs to history {s}, but {} holds no WAL of it: the WAL was deleted \
             or moved, and every write acknowledged after the store's last flush would be \
             lost without a word. Restore the WAL directory, or start with \
             --accept-mismatched-wal to go on from the store alone",
            wal_dir.display()
        )),
        _ => None,
    };
    if let Some(reason) = refusal {
        if !accept {
            return Err(RecoveryError::Identity(reason));
        }
        tracing::warn!(%reason, "--accept-mismatched-wal: starting anyway");
    }
    // From here on both carry one identity: the store's, if it has one.
    let identity = in_store
        .clone()
        .or_else(|| in_wal.clone())
        .unwrap_or_else(identity::new_identity);
    if in_wal.as_deref() != Some(identity.as_str()) {
        identity::write(fs, wal_dir, &identity)?;
    }
    if in_store.as_deref() != Some(identity.as_str()) {
        store.set_identity(&identity).await?;
    }
    Ok(())
}

/// The flush items of a take: each widget's state (`None`: deleted), unpacked, sorted by
/// serial.
fn flush_items(taken: &Taken) -> Vec<FlushItem> {
    let mut items: Vec<FlushItem> = taken
        .widgets
        .iter()
        .map(|(serial, dirty)| {
            let widget = dirty.state.as_ref().map(PackedWidget::unpack);
            FlushItem {
                // A deletion is at or before the cut's LSN.
                version: widget.as_ref().map_or(taken.covered_lsn, |w| w.version),
                widget,
                serial: serial.clone(),
                mark: dirty.mark,
            }
        })
        .collect();
    items.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
    items
}
