//! The single-node hot state: a papaya map that only ever holds durable state, the dirty
//! set, and the handle to the sequencer thread that orders and logs every write.
//!
//! Reads go straight to the map. Writes go through the sequencer, which applies a change
//! to the map only after its WAL record is durable, so a read never returns a change that
//! a crash could still lose. The sequencer applies each group of changes under
//! `apply_lock`'s write side, and reads take its read side, so no reader sees one side of
//! an association change without the other.

use super::dirty::{DirtySet, Taken};
use super::packed::PackedWidget;
use super::replay;
use super::sequencer::{self, Job};
use super::EngineError;
use crate::domain::{Command, Reply, Serial, Widget};
use crate::store::FlushItem;
use crate::wal::{FsyncMode, RecoveryMode, WalError, WalFs, WalWriter};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// Serial to widget, packed: the map holds only durable state.
pub type WidgetMap = papaya::HashMap<Serial, PackedWidget>;

/// Replaced entries a thread collects before it tries to free them. Each try costs a
/// process-wide memory barrier (an IPI to every CPU running the process): at papaya's
/// default of 32, a third of a multi-threaded WAL replay went to those barriers. At 1024
/// a thread holds at most ~100 KB of replaced widgets.
const RECLAIM_BATCH: usize = 1024;

/// An empty map with room for `capacity` widgets before it grows.
pub fn new_map(capacity: usize) -> WidgetMap {
    papaya::HashMap::builder()
        .capacity(capacity)
        .collector(seize::Collector::new().batch_size(RECLAIM_BATCH))
        .build()
}

/// The engine's limits and WAL settings (see `Config` for what each means).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    pub wal_segment_bytes: u64,
    pub wal_max_bytes: u64,
    pub wal_recovery: RecoveryMode,
    pub queue_depth: usize,
    pub max_dirty: usize,
    pub flush_batch_size: usize,
}

pub(crate) struct Shared {
    pub map: WidgetMap,
    pub apply_lock: RwLock<()>,
    pub dirty: DirtySet,
    pub wal_bytes: Arc<AtomicU64>,
    /// Set once, when the WAL can no longer make writes durable.
    pub failed: OnceLock<String>,
    pub flush_wanted: Notify,
    pub flush_batch_size: usize,
}

pub struct MemoryEngine {
    shared: Arc<Shared>,
    settings: EngineSettings,
    jobs: SyncSender<Job>,
    thread: Mutex<Option<JoinHandle<()>>>,
    checkpoint: AtomicU64,
}

impl MemoryEngine {
    /// Recovers and starts: `map` holds what the store loaded, up to `checkpoint`; the WAL
    /// in `wal_dir` is replayed over it, then the sequencer starts appending after it.
    pub fn start(
        map: WidgetMap,
        checkpoint: u64,
        wal_dir: &Path,
        fs: Arc<dyn WalFs>,
        settings: EngineSettings,
    ) -> Result<Self, WalError> {
        let dirty = DirtySet::default();
        let started = std::time::Instant::now();
        let recovered = replay::replay(
            &map,
            &dirty,
            &*fs,
            wal_dir,
            settings.wal_recovery,
            checkpoint,
        )?;
        tracing::info!(
            replayed = recovered.replayed,
            last_lsn = recovered.last_lsn,
            segments = recovered.segments.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "WAL replayed"
        );
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
        let wal_bytes = Arc::new(AtomicU64::new(0));
        let mut writer = WalWriter::open(
            fs,
            wal_dir,
            recovered.segments,
            next_lsn,
            settings.wal_segment_bytes,
            wal_bytes.clone(),
        )?;
        writer.trim(checkpoint);
        let shared = Arc::new(Shared {
            map,
            apply_lock: RwLock::new(()),
            dirty,
            wal_bytes,
            failed: OnceLock::new(),
            flush_wanted: Notify::new(),
            flush_batch_size: settings.flush_batch_size,
        });
        let (jobs, rx) = mpsc::sync_channel(settings.queue_depth);
        let thread = sequencer::spawn(
            shared.clone(),
            writer,
            rx,
            next_lsn,
            settings.fsync,
            settings.fsync_interval,
        );
        Ok(Self {
            shared,
            settings,
            jobs,
            thread: Mutex::new(Some(thread)),
            checkpoint: AtomicU64::new(checkpoint),
        })
    }

    /// The widget's durable state.
    pub fn get(&self, serial: &Serial) -> Option<Widget> {
        let _applied = self.shared.apply_lock.read().expect("apply lock");
        self.shared.map.pin().get(serial).map(PackedWidget::unpack)
    }

    /// Orders, logs and applies a write; returns once it is durable (or refused).
    pub async fn execute(&self, command: Command) -> Result<Reply, EngineError> {
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
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job::Write { command, reply }) {
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

    pub fn dirty(&self) -> &DirtySet {
        &self.shared.dirty
    }

    /// Wakes when enough serials are dirty to flush before the interval is up.
    pub fn flush_wanted(&self) -> &Notify {
        &self.shared.flush_wanted
    }

    /// The flush items of a take from [`MemoryEngine::dirty`]: each widget's state
    /// (`None`: deleted), unpacked. The sequencer marks a group's widgets dirty with their
    /// states in one step, so a take is an exact cut of the state at `taken.covered_lsn`:
    /// a store that commits it never shows one side of a change. The take itself is a swap
    /// under the dirty set's lock; writes never wait for this part.
    pub fn flush_items(taken: &Taken) -> Vec<FlushItem> {
        taken
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
            .collect()
    }

    /// The durable store now holds every change up to `lsn`: the WAL may drop them.
    pub fn checkpointed(&self, lsn: u64) {
        self.checkpoint.fetch_max(lsn, Ordering::Relaxed);
        // If the queue is full the next checkpoint trims instead.
        let _ = self.jobs.try_send(Job::Trim(lsn));
    }

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
            ("widgets_dirty", self.dirty().len() as f64),
            (
                "widgets_flush_lag_seconds",
                self.dirty().lag().as_secs_f64(),
            ),
            ("widgets_wal_bytes", self.wal_bytes() as f64),
            ("widgets_checkpoint_lsn", self.checkpoint() as f64),
            (
                "widgets_wal_failed",
                f64::from(u8::from(self.failure().is_some())),
            ),
        ]
    }

    /// Why the WAL stopped taking writes, if it did.
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
