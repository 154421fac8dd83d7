//! Building the store anew beside itself: after a write that failed an I/O (the store's
//! file may not hold on disk what sled reads back), and step by step after each write
//! once the file has grown several times its buckets or they have grown crowded (see
//! [`compact`]). Either way the new store is synced and read back before
//! it is swapped in.

use super::bucket::{self, Layout};
use super::compact::{self, Compaction};
use super::files::{
    lock_busy, remove_dir, sibling, swap_in_moved, sync_blobs, sync_files, sync_parent, REBUILDING,
};
use super::{point, SledStore, StoreError, Upkeep};
use crate::store::FlushBatch;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl SledStore {
    /// A write that failed with `e`. Unless [`suspect`] clears it (sled refusing it for a
    /// full disk), the store's file may not hold on disk what sled reads back: a failed
    /// `fsync` leaves the pages it could not write in the page cache, marked clean, and
    /// sled, opened again, reads them as written. Writing on over them could leave the WAL
    /// trimmed behind a store that a power loss takes back to before them, or that sled
    /// then cannot recover (it reuses a segment once its pages have moved on, to those lost
    /// pages). So the next write first rebuilds the store from what sled reads, into a new
    /// file that is synced and read back (see [`Self::rebuild`]); until then no checkpoint
    /// is stored, and the WAL keeps every change. A file beside the store keeps that due
    /// across a restart, which reads the same page cache and rebuilds the store as it opens,
    /// before the start trims the WAL behind the checkpoint it loads.
    pub(super) fn failed_write<T>(&self, db: sled::Db, e: StoreError) -> Result<T, StoreError> {
        if suspect(&e) {
            self.mark_for_rebuild(&e);
        }
        self.closing_on_io_error(db, Err(e))
    }

    /// Makes a rebuild due after `why` (see [`Self::failed_write`]): in memory, and by the
    /// file [`REBUILD_MARK`] beside the store, for a restart. A mark that cannot be made
    /// now is made before the rebuild, which waits for it.
    pub(super) fn mark_for_rebuild(&self, why: &StoreError) {
        if !self.inner.rebuild_due.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %why, path = %self.inner.path.display(),
                "the embedded store failed an I/O as it was written: it is rebuilt before \
                 its next write, as what sled reads back may not be on disk");
        }
        if let Err(e) = self.mark() {
            tracing::warn!(error = %e, "marking the embedded store for a rebuild failed; \
                tried again before the rebuild");
        }
    }

    /// Makes the file [`REBUILD_MARK`] beside the store, synced, if it is not there.
    fn mark(&self) -> Result<(), StoreError> {
        let mark = sibling(&self.inner.path, REBUILD_MARK);
        if mark.try_exists().unwrap_or(false) {
            return Ok(());
        }
        std::fs::File::create(&mark)
            .and_then(|file| file.sync_all())
            .map_err(StoreError::io(format!("creating {}", mark.display())))
            .and_then(|()| sync_parent(&mark))
    }

    /// After the store was built anew (a rebuild, or a move into buckets): no rebuild is
    /// due. A mark that cannot be removed costs the next start a rebuild more.
    pub(super) fn rebuild_done(&self) {
        self.inner.rebuild_due.store(false, Ordering::Relaxed);
        let mark = sibling(&self.inner.path, REBUILD_MARK);
        let removed = match std::fs::remove_file(&mark) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            removed => removed
                .map_err(StoreError::io(format!("removing {}", mark.display())))
                .and_then(|()| sync_parent(&mark)),
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "removing the embedded store's rebuild mark failed");
        }
    }

    /// Copies the store, from what `db` reads back, into a new store beside it, syncs and
    /// reads that back, and puts it in the old one's place (a compaction in one go, `layout`
    /// kept): due after a failed write (see [`Self::failed_write`]). Returns the new store.
    /// A failure removes what it built and fails the write; the next write tries again.
    pub(super) fn rebuild(&self, db: sled::Db, layout: Layout) -> Result<sled::Db, StoreError> {
        let started = Instant::now();
        tracing::warn!(path = %self.inner.path.display(),
            "rebuilding the embedded store before its next write, after a write that failed");
        // Made before anything else is, so that a restart part-way rebuilds too.
        if let Err(e) = self.mark() {
            return self.closing_on_io_error(db, Err(e));
        }
        // A compaction under way is closed first: the rebuild is built where it was.
        self.upkeep().compaction.take();
        let rebuilding = sibling(&self.inner.path, REBUILDING);
        let settings = self.inner.compact;
        let file_bytes = db.size_on_disk().unwrap_or(0);
        let built = Compaction::start(&rebuilding, file_bytes, layout, layout)
            .and_then(|mut copy| {
                // Flushed as it goes, as a compaction's steps are, not in one burst at the end.
                while !copy.step(&db, &settings, REBUILD_FLUSH_BYTES)? {}
                Ok(copy)
            })
            .and_then(|copy| seal(copy, &db, &rebuilding));
        let live = match built {
            Ok(live) => live,
            Err(e) => {
                if let Some(removing) = remove_half_built(&self.inner.path) {
                    tracing::warn!(error = %removing, "removing a failed rebuild failed");
                }
                return self.closing_on_io_error(db, Err(e));
            }
        };
        let db = self.swap_in(db)?;
        self.upkeep().live_bytes = Some(live);
        self.rebuild_done();
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "rebuilt the embedded store"
        );
        Ok(db)
    }

    /// Puts the store built beside this one (closed and synced) in its place and opens it;
    /// `db` is the old store's handle.
    fn swap_in(&self, db: sled::Db) -> Result<sled::Db, StoreError> {
        // Every handle on the old store closed before its directory is renamed, and the
        // kept one's lock held meanwhile, so that nothing opens it again halfway; from here
        // on a failure is finished by `finish_move` when the store opens again.
        drop(db);
        let mut kept = self.handle();
        kept.take();
        let swapped = swap_in_moved(&self.inner.path);
        drop(kept);
        swapped.and_then(|()| self.db())
    }

    /// After a write: takes the compaction under way a step further, and puts the new
    /// store in place once it is whole; or starts one if the file or the buckets are due
    /// (see [`compact`]). A failure abandons the compaction and never fails the write,
    /// which is stored.
    pub(super) fn compact_after(&self, db: sled::Db, layout: Layout, batch: &FlushBatch) {
        let mut upkeep = self.upkeep();
        let file_bytes = db.size_on_disk().unwrap_or(0);
        metrics::gauge!("widgets_store_file_bytes").set(file_bytes as f64);
        // Unknown until the store is loaded (a new store knows it holds nothing).
        let Some(live) = upkeep.live_bytes else {
            return;
        };
        metrics::gauge!("widgets_store_live_bytes").set(live as f64);
        let grown = layout.grown(live);
        if upkeep.compaction.is_none() {
            let waiting = upkeep.retry_at.is_some_and(|at| Instant::now() < at);
            if waiting || !self.inner.compact.due(file_bytes, live, grown != layout) {
                return;
            }
            tracing::info!(
                file_bytes,
                live_bytes = live,
                bucket_bits = layout.bits(),
                new_bucket_bits = grown.bits(),
                "compacting the embedded store: its file is over {} times its buckets, or \
                 they average over {} bytes",
                self.inner.compact.ratio,
                bucket::CROWDED_BYTES
            );
        }
        let settings = self.inner.compact;
        let rebuilding = sibling(&self.inner.path, REBUILDING);
        let stepped = (|| {
            let compaction = match &mut upkeep.compaction {
                Some(compaction) => compaction,
                None => upkeep.compaction.insert(Compaction::start(
                    &rebuilding,
                    file_bytes,
                    layout,
                    grown,
                )?),
            };
            let from = compaction.from();
            let mut changed: Vec<bucket::Key> = (batch.items.iter())
                .map(|item| from.key(item.serial.as_str()))
                .collect();
            changed.sort_unstable();
            changed.dedup();
            compaction.follow(&db, changed.iter().map(|key| &key[..]), settings.chunk)?;
            let quota = live.div_ceil(settings.steps.max(1));
            compaction.step(&db, &settings, quota)
        })();
        let whole = match stepped {
            Ok(false) => return,
            Ok(true) => (upkeep.compaction.take()).map(|c| seal(c, &db, &rebuilding)),
            Err(e) => Some(Err(e)),
        };
        let live = match whole {
            Some(Err(e)) => return self.abandon_compaction(&mut upkeep, &e),
            Some(Ok(live)) => live,
            None => return,
        };
        match self.swap_in(db) {
            Ok(_) => {
                upkeep.compacted += 1;
                upkeep.live_bytes = Some(live);
                metrics::counter!("widgets_store_compactions_total", "outcome" => "done")
                    .increment(1);
            }
            Err(e) => tracing::warn!(error = %e, path = %self.inner.path.display(),
                "swapping in the compacted embedded store failed part-way; the store's \
                 next open finishes it"),
        }
    }

    /// Drops the compaction under way (or one that failed to start) and what it built;
    /// the next may start [`compact::RETRY_AFTER`] from now.
    pub(super) fn abandon_compaction(&self, upkeep: &mut Upkeep, why: &StoreError) {
        // Closed before its directory goes.
        upkeep.compaction.take();
        upkeep.retry_at = Some(Instant::now() + compact::RETRY_AFTER);
        let removed = remove_half_built(&self.inner.path);
        tracing::warn!(error = %why, removing_failed = ?removed.map(|e| e.to_string()),
            retry_in_secs = compact::RETRY_AFTER.as_secs(),
            "abandoned compacting the embedded store; it is written as before");
        metrics::counter!("widgets_store_compactions_total", "outcome" => "abandoned").increment(1);
    }
}

/// A file beside the store (with the store's own name before it) while a rebuild is due
/// after a failed write (see [`SledStore::failed_write`]).
pub(super) const REBUILD_MARK: &str = ".rebuild";

/// The bytes a rebuild copies between two flushes of the new store.
const REBUILD_FLUSH_BYTES: u64 = 64 << 20;

/// Whether a write that failed with `e` leaves the store's file suspect (see
/// [`SledStore::failed_write`]): an I/O error, but for sled's own full disk (taken as
/// refused before the data reached the kernel, as on ext4 and tmpfs, which reserve the
/// space as the data is written) and sled's file lock.
pub(super) fn suspect(e: &StoreError) -> bool {
    match e {
        StoreError::Sled(sled::Error::Io(io)) => {
            io.kind() != std::io::ErrorKind::StorageFull && !lock_busy(io)
        }
        StoreError::Io { .. } => true,
        _ => false,
    }
}

/// Removes the store a compaction or rebuild left half-built beside the one at `path`, if
/// there is one; the error, if that failed.
fn remove_half_built(path: &Path) -> Option<StoreError> {
    let rebuilding = sibling(path, REBUILDING);
    (rebuilding.exists())
        .then(|| remove_dir(&rebuilding).err())
        .flatten()
}

/// Finishes `compaction` from the old store `old`, makes the new store in `path` durable,
/// names included, and reads it back (see [`compact::check`]); returns the bytes of its
/// buckets.
fn seal(compaction: Compaction, old: &sled::Db, path: &Path) -> Result<u64, StoreError> {
    let to = compaction.to();
    compaction
        .finish(old)
        .and_then(|()| sync_blobs(path, &mut 0))
        .and_then(|()| sync_files(path, &["db", "conf", "."]))
        .and_then(|()| point("compaction: the new store synced").map_err(StoreError::from))
        .and_then(|()| compact::check(old, path, to, None))
}
