//! The state the single-node engine's parts share: the map that only ever holds durable
//! state, the lock that makes a group of changes appear at once, the dirty set, and the
//! WAL's failure and size. The engine, the sequencer thread and WAL replay all work on it;
//! none of them owns another.

use super::dirty::DirtySet;
use super::packed::PackedWidget;
use crate::domain::Serial;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};
use tokio::sync::Notify;

/// Serial to widget, packed: the map holds only durable state. Hashed with foldhash, as
/// the dirty set and the sequencer's tables are, under a seed drawn at start: the default
/// (SipHash) cost a replay of a million creates a tenth of its time.
pub(super) type WidgetMap = papaya::HashMap<Serial, PackedWidget, foldhash::fast::RandomState>;

/// Replaced entries a thread collects before it tries to free them. Each try costs a
/// process-wide memory barrier (an IPI to every CPU running the process): at papaya's
/// default of 32, a third of a multi-threaded WAL replay went to those barriers. At 1024
/// a thread holds at most ~100 KB of replaced widgets.
const RECLAIM_BATCH: usize = 1024;

/// An empty map with room for `capacity` widgets before it grows.
pub(super) fn new_map(capacity: usize) -> WidgetMap {
    papaya::HashMap::builder()
        .hasher(foldhash::fast::RandomState::default())
        .capacity(capacity)
        .collector(seize::Collector::new().batch_size(RECLAIM_BATCH))
        .build()
}

pub(super) struct Shared {
    pub map: WidgetMap,
    /// The sequencer publishes a group's changes under the write side; reads take the
    /// read side, so no reader sees one side of an association change.
    pub publish_lock: RwLock<()>,
    pub dirty: DirtySet,
    /// Bytes of every WAL segment on disk (the writer keeps it current).
    pub wal_bytes: Arc<AtomicU64>,
    /// Set once, when writes can no longer be made durable.
    pub failed: OnceLock<String>,
    /// Woken when enough widgets are dirty to flush before the interval is up.
    pub flush_wanted: Notify,
    pub flush_batch_size: usize,
}

impl Shared {
    pub fn new(map: WidgetMap, dirty: DirtySet, flush_batch_size: usize) -> Self {
        Self {
            map,
            publish_lock: RwLock::new(()),
            dirty,
            wal_bytes: Arc::new(AtomicU64::new(0)),
            failed: OnceLock::new(),
            flush_wanted: Notify::new(),
            flush_batch_size,
        }
    }

    /// Writes can no longer be made durable (the WAL failed, or the store refused this
    /// instance): refuse every write from now on.
    pub fn fail(&self, reason: String) {
        tracing::error!(reason = %reason, "writes can no longer be made durable: refusing all writes until restart");
        let _ = self.failed.set(reason);
    }
}
