//! The embedded store: one sled tree of buckets, each holding the bincode-encoded widgets
//! whose serials hash to it (see [`bucket`]), plus the checkpoint LSN and a few other
//! values under keys no bucket can have. A write is a run of `apply_batch`es of at most
//! about [`CHUNK`] widgets each (each atomic in sled, and flushed to disk before the next),
//! the checkpoint and the widget count in the last.
//!
//! Why chunks: sled 0.34 holds one epoch guard for a whole `apply_batch`, and every insert
//! replaces an in-memory copy of its leaf (~2 KB here) that is freed only after the guard
//! is gone, by a collector that frees a few hundred objects per 128 guards a thread takes.
//! 10,000-widget batches left ~2.4 KB per widget written behind for good (4.7 GB after
//! seeding 2 M widgets; 10 M were OOM-killed), and 2 M widgets in one batch, the size of
//! a flush of a `--max-dirty` backlog, peaked at 12.8 GB. Chunks of 1,000, each followed
//! by a few collections, keep it bounded: 235 and 511 MiB for the same two writes (see
//! BENCHMARKS.md, "The embedded store's memory while writing").
//!
//! A write cut short after some chunks leaves widgets newer than the stored checkpoint;
//! that is safe because the WAL holds every change above the checkpoint as a post-image
//! and is trimmed only once the checkpoint is stored: start-up replays those changes over
//! whatever the store holds and ends at the same state. Only the checkpoint says what the
//! store covers, so it goes in the last chunk.
//!
//! A store written before buckets (one sled entry a widget, keyed by its serial) is moved
//! into buckets when it is opened: a new store is built beside it, synced, and put in its
//! place by two renames, as a compaction's is. A crash while it is built leaves the old
//! store whole, and the next open builds it again; a crash between the renames is finished
//! by the next open (see [`finish_move`]).
//!
//! After an I/O error (a full disk, above all) sled refuses every later write until it is
//! opened again, so the store closes it on such an error and the next operation reopens
//! it: sled recovers from its own log as after a crash, and the flusher's retry finds a
//! working store once there is space again, with no restart.
//!
//! sled's file grows under writes well past the data it holds, so the store rebuilds
//! itself beside the old one, a step after each write, once the file is several times its
//! buckets; the same rebuild gives a store whose buckets have grown crowded twice as many
//! (see [`compact`]).

mod bucket;
pub mod compact;

use self::bucket::{Layout, Put};
use self::compact::Compaction;
use super::background::{Background, BackgroundError};
use super::{FlushBatch, Store, StoreError, Visitor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Bucket keys start with [`bucket::PREFIX`] and serials with none of these bytes, so the
/// store's own keys, which start with a NUL, cannot collide with either.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
/// The hot state's widget count at the last flush (for [`Store::len_hint`]).
const WIDGETS_KEY: &[u8] = b"\0widgets";
/// The identity of the history the store belongs to (see [`Store::identity`]).
const IDENTITY_KEY: &[u8] = b"\0identity";
/// The bits of bucket number of the store's layout: set by its first write, changed by a
/// compaction that gives it more buckets (see [`bucket::Layout`]).
const BUCKET_BITS_KEY: &[u8] = b"\0bucket_bits";
/// The first key a widget written before buckets can have: a serial's first byte is above
/// every bucket key's.
const LEGACY_START: &[u8] = &[bucket::PREFIX + 1];
/// Every key of the store's own, as a compaction copies them.
const OWN_KEYS: [&[u8]; 4] = [CHECKPOINT_KEY, WIDGETS_KEY, IDENTITY_KEY, BUCKET_BITS_KEY];

fn decode_u64(name: &str, value: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(value.try_into().map_err(|_| {
        StoreError::Corrupt {
            key: name.into(),
            reason: format!("{} bytes, expected 8", value.len()),
        }
    })?))
}

#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` after an I/O error closed it, until the next operation opens it again.
    db: Mutex<Option<sled::Db>>,
    /// Read whenever the database is opened; a new store has none until its first write
    /// lays it out for the widgets that write says the store holds.
    layout: Mutex<Option<Layout>>,
    /// The thread that opens the database and writes to it, at the writer's nice value.
    writer: Background,
    compact: compact::Settings,
    upkeep: Mutex<Upkeep>,
    /// The first of sled's blob files not yet synced since the database was opened (see
    /// [`sync_blobs`]).
    blobs_unsynced: AtomicU64,
    /// Set by a write that failed an I/O other than a full disk's, and kept on disk by the
    /// file [`REBUILD_MARK`] beside the store until it is cleared: the next write first
    /// rebuilds the store (see [`SledStore::rebuild`]).
    rebuild_due: AtomicBool,
}

/// What the store knows of its size, and its compaction.
#[derive(Default)]
struct Upkeep {
    /// Bytes of the buckets (keys and values), once known: counted by [`Store::load`]
    /// (zero for a new store) and kept up by every write.
    live_bytes: Option<u64>,
    /// The compaction under way.
    compaction: Option<Compaction>,
    /// After an abandoned compaction, when the next may start.
    retry_at: Option<Instant>,
    /// Compactions finished since the store was opened.
    compacted: u64,
}

/// How the embedded store is opened and kept.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Bounds sled's page cache.
    pub cache_bytes: u64,
    /// The writer thread's nice value, 0 to 19 (see [`Background`]).
    pub writer_nice: i32,
    pub compact: compact::Settings,
}

impl Options {
    /// A cache of `cache_bytes`, writing at the usual priority, compacting by default.
    pub fn new(cache_bytes: u64) -> Self {
        Self {
            cache_bytes,
            writer_nice: 0,
            compact: compact::Settings::default(),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path`; `cache_bytes` bounds sled's page cache. It
    /// writes at the usual priority.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, Options::new(cache_bytes))
    }

    /// Opens (or creates) the store in `path`, writing on a thread of its own. Blocks while
    /// sled opens.
    pub fn open_with(path: &Path, options: Options) -> Result<Self, StoreError> {
        let inner = Inner {
            path: path.to_owned(),
            cache_bytes: options.cache_bytes,
            db: Mutex::new(None),
            layout: Mutex::new(None),
            writer: Background::start("widgets-store", options.writer_nice)
                .map_err(StoreError::io("starting the store's thread"))?,
            compact: options.compact,
            upkeep: Mutex::new(Upkeep::default()),
            blobs_unsynced: AtomicU64::new(0),
            // A mark that cannot be looked at may be there.
            rebuild_due: AtomicBool::new(sibling(path, REBUILD_MARK).try_exists().unwrap_or(true)),
        };
        let store = Self {
            inner: Arc::new(inner),
        };
        // Opened on the writer's thread, so that the threads sled starts share its priority.
        let opening = store.clone();
        store
            .inner
            .writer
            .run_blocking(move || opening.prepare())
            .map_err(task_error)??;
        Ok(store)
    }

    /// Opens the database (which reads its layout). A new store gets its layout at its
    /// first write; a store written before buckets is moved into them first (see
    /// [`move_into_buckets`]).
    fn prepare(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        tests::crash::opening(&self.inner.path);
        let path = &self.inner.path;
        let db = self.db()?;
        // From the start, not from the first write: it is also how an alert tells the
        // embedded store (whose flush interval is longer) from PostgreSQL, whose flushes
        // may fail from the start.
        metrics::gauge!("widgets_store_file_bytes").set(db.size_on_disk().unwrap_or(0) as f64);
        if let Some(layout) = self.layout() {
            // Before the store is loaded: the start trims the WAL behind the checkpoint it
            // reads. (A store with no layout holds no checkpoint: its first write rebuilds it.)
            if self.inner.rebuild_due.load(Ordering::Relaxed) {
                self.rebuild(db, layout)?;
            }
            return Ok(());
        }
        let old = check_old_entries(&db)?;
        if old == 0 {
            if let Some(entry) = db.range(&[bucket::PREFIX][..]..LEGACY_START).next() {
                let (key, _) = entry?;
                return Err(StoreError::Corrupt {
                    key: bucket::describe(&key),
                    reason: "a bucket in a store that records no bucket layout".into(),
                });
            }
            self.upkeep().live_bytes = Some(0);
            return Ok(());
        }
        let layout = Layout::for_widgets(old);
        tracing::info!(
            widgets = old,
            "moving the embedded store's widgets into buckets (once, for a store an earlier \
             version wrote; a crash part-way is safe)"
        );
        let started = std::time::Instant::now();
        let moving = sibling(path, REBUILDING);
        let moved = move_into_buckets(
            &db,
            &moving,
            self.inner.cache_bytes,
            layout,
            old,
            PASS_WIDGETS,
        );
        self.closing_on_io_error(db.clone(), moved)?;
        // On disk, names included, before the old store goes, as a compaction's copy is.
        sync_blobs(&moving, &mut 0).and_then(|()| sync_files(&moving, &["db", "conf", "."]))?;
        point("move: the new store synced")?;
        // Read back before the old store goes, as a compaction's copy is.
        let checked = compact::check(&db, &moving, layout, Some(old));
        self.closing_on_io_error(db.clone(), checked)?;
        // Closed (this handle and the kept one) before its directory is renamed.
        drop(db);
        self.handle().take();
        swap_in_moved(path)?;
        self.db()?;
        // Built anew, synced and read back: what a rebuild due would do.
        self.rebuild_done();
        if self.layout().is_none() {
            return Err(StoreError::Corrupt {
                key: "bucket_bits".into(),
                reason: "missing from the store just moved into buckets".into(),
            });
        }
        tracing::info!(
            widgets = old,
            secs = started.elapsed().as_secs(),
            "the embedded store's widgets are in buckets now"
        );
        Ok(())
    }

    /// The kept handle. A panic while it was held leaves it as it was: sled 0.34 panics
    /// if the `fsync` it runs as its last handle closes fails, and every place that drops
    /// a handle under this lock has taken it out first, so the next [`Self::db`] opens the
    /// database again rather than panicking on the lock for the rest of the process.
    fn handle(&self) -> MutexGuard<'_, Option<sled::Db>> {
        self.inner.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's layout: `None` for a new store until its first write.
    fn layout(&self) -> Option<Layout> {
        *self
            .inner
            .layout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_layout(&self, layout: Option<Layout>) {
        *self
            .inner
            .layout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = layout;
    }

    /// The layout of the store; if it is new, laid out for the widgets `batch` says it
    /// holds (its items, if it does not say) and recorded, on disk before any bucket.
    fn layout_for(&self, db: &sled::Db, batch: &FlushBatch) -> Result<Layout, StoreError> {
        if let Some(layout) = self.layout() {
            return Ok(layout);
        }
        let layout = new_layout(batch);
        db.insert(BUCKET_BITS_KEY, &layout.recorded())?;
        point("first write: the layout inserted")?;
        db.flush()?;
        point("first write: the layout flushed")?;
        tracing::info!(
            widgets = widgets_held(batch),
            bucket_bits = layout.bits(),
            "laying out the new embedded store"
        );
        self.set_layout(Some(layout));
        Ok(layout)
    }

    /// The open database, opened again if an I/O error or a compaction closed it (first
    /// finishing what a crash left of a rebuild: see [`finish_move`]), with the layout it
    /// records read again. Opening again waits for this process's last use of the database
    /// to let it go (see [`once_unlocked`]).
    fn db(&self) -> Result<sled::Db, StoreError> {
        let mut db = self.handle();
        if let Some(db) = db.as_ref() {
            return Ok(db.clone());
        }
        finish_move(&self.inner.path)?;
        remove_unfinished_snapshots(&self.inner.path)?;
        let config = sled::Config::new()
            .path(&self.inner.path)
            .cache_capacity(self.inner.cache_bytes)
            // Every write ends with its own `flush`; sled's timer would only add a thread
            // flushing at the usual priority. (sled 0.34 cleans its log's segments only on
            // that thread, and turning it on did not slow the log's growth: BENCHMARKS.md,
            // "sled's file under a long load". The store compacts itself instead.)
            .flush_every_ms(None);
        // The names of a store sled has just made are on disk before a write the WAL is
        // trimmed behind: each write `fsync`s only the file `db`. And `db` itself: a kill
        // between a write's `flush` and its `fsync` leaves the write in the page cache,
        // where this open reads it as written, and the start trims the WAL behind it.
        // (sled's recovery writes and syncs too.) A failure here leaves the file as
        // suspect as a failed write does.
        let opened = once_unlocked(|| Ok(config.open()?)).and_then(|opened| {
            sync_files(&self.inner.path, &["db", "conf", "."])
                .and_then(|()| sync_parent(&self.inner.path))
                .map(|()| opened)
        });
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                if suspect(&e) {
                    self.mark_for_rebuild(&e);
                }
                return Err(e);
            }
        };
        // What the store records, even none: a layout a new store chose just before an I/O
        // error closed it may never have reached the disk.
        self.set_layout(read_layout(&opened)?);
        // A blob written before an I/O error closed the database may never have been synced.
        self.inner.blobs_unsynced.store(0, Ordering::Relaxed);
        *db = Some(opened.clone());
        Ok(opened)
    }

    /// Passes `result` on; an I/O error first closes the database (its handle `used` and
    /// the kept one), so that the next operation opens it again.
    fn closing_on_io_error<T, E: Into<StoreError>>(
        &self,
        used: sled::Db,
        result: Result<T, E>,
    ) -> Result<T, StoreError> {
        let result = result.map_err(Into::into);
        // sled's own I/O, or the `fsync` after it: either way what sled holds in memory
        // may not be what is on disk, and reading it back is how to know.
        if let Err(e @ (StoreError::Sled(sled::Error::Io(_)) | StoreError::Io { .. })) = &result {
            tracing::warn!(error = %e, path = %self.inner.path.display(),
                "the embedded store failed an I/O; it is opened again for the next flush");
            drop(used);
            self.handle().take();
            metrics::counter!("widgets_store_reopens_total").increment(1);
        }
        result
    }

    /// What the store knows of its size and compaction. A panic while it was held (sled
    /// panics if an fsync fails as a handle closes) leaves it as it was, which every use
    /// copes with: the next write goes on, and at worst a compaction is abandoned.
    fn upkeep(&self) -> MutexGuard<'_, Upkeep> {
        self.inner
            .upkeep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn load_blocking(&self, mut visit: Visitor) -> Result<u64, StoreError> {
        // Opened first: opening again (after a swap that failed part-way, say) reads the
        // layout again.
        let db = self.db()?;
        let layout = self.layout();
        let mut checkpoint = 0;
        let mut loaded = 0u64;
        let mut live_bytes = 0;
        for entry in db.iter() {
            let (key, value) = entry?;
            if &*key == CHECKPOINT_KEY {
                checkpoint = decode_u64("checkpoint", &value)?;
                continue;
            }
            if [WIDGETS_KEY, IDENTITY_KEY, BUCKET_BITS_KEY].contains(&&*key) {
                continue;
            }
            let corrupt = |reason: String| StoreError::Corrupt {
                key: bucket::describe(&key),
                reason,
            };
            if key.first() != Some(&bucket::PREFIX) {
                return Err(corrupt(
                    "neither a bucket nor one of the store's own keys".into(),
                ));
            }
            live_bytes += (key.len() + value.len()) as u64;
            let layout = layout.ok_or_else(|| {
                corrupt("a bucket in a store that records no bucket layout".into())
            })?;
            for entry in bucket::entries(&value) {
                let (serial, widget) = entry
                    .and_then(|(serial, widget)| bucket::decode(layout, &key, serial, widget))
                    .map_err(corrupt)?;
                visit(serial, widget);
                loaded += 1;
                if loaded.is_multiple_of(1_000_000) {
                    tracing::info!(loaded, "loading widgets from the embedded store");
                }
            }
        }
        self.upkeep().live_bytes = Some(live_bytes);
        Ok(checkpoint)
    }

    fn write_blocking(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let mut db = self.db()?;
        if self.inner.rebuild_due.load(Ordering::Relaxed) {
            let layout = self.layout().unwrap_or_else(|| new_layout(&batch));
            db = self.rebuild(db, layout)?;
        }
        // Each chunk is made durable before the next: sled otherwise leaves a whole flush's
        // log to the kernel's page cache until its one `flush`, and the disk then writes
        // it in one burst that every WAL fsync queues behind (fsyncs of 100-500 ms, a few
        // times a minute at 10,000 PUTs/s over 1 M widgets; see BENCHMARKS.md).
        let mut grown = 0;
        let layout = match self.layout_for(&db, &batch) {
            Ok(layout) => layout,
            Err(e) => return self.failed_write(db, e),
        };
        let written = write_in_chunks(
            &batch,
            layout,
            CHUNK,
            &mut grown,
            |key| db.get(key),
            |chunk| {
                db.apply_batch(chunk)?;
                point("write: a chunk applied")?;
                let mut from = self.inner.blobs_unsynced.load(Ordering::Relaxed);
                sync_blobs(&self.inner.path, &mut from)?;
                self.inner.blobs_unsynced.store(from, Ordering::Relaxed);
                point("write: a chunk's blobs synced")?;
                db.flush()?;
                Ok(point("write: a chunk flushed")?)
            },
        )
        .and_then(|()| sync_files(&self.inner.path, &["db"]))
        .and_then(|()| point("write: synced").map_err(StoreError::from));
        let mut upkeep = self.upkeep();
        if let Some(live) = &mut upkeep.live_bytes {
            *live = live.saturating_add_signed(grown);
        }
        if let (Err(e), Some(_)) = (&written, &upkeep.compaction) {
            // The buckets it changed before it failed may be across already, stale there.
            self.abandon_compaction(&mut upkeep, e);
        }
        drop(upkeep);
        if let Err(e) = written {
            return self.failed_write(db, e);
        }
        self.compact_after(db, layout, &batch);
        Ok(())
    }

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
    fn failed_write<T>(&self, db: sled::Db, e: StoreError) -> Result<T, StoreError> {
        if suspect(&e) {
            self.mark_for_rebuild(&e);
        }
        self.closing_on_io_error(db, Err(e))
    }

    /// Makes a rebuild due after `why` (see [`Self::failed_write`]): in memory, and by the
    /// file [`REBUILD_MARK`] beside the store, for a restart. A mark that cannot be made
    /// now is made before the rebuild, which waits for it.
    fn mark_for_rebuild(&self, why: &StoreError) {
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
    fn rebuild_done(&self) {
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
    fn rebuild(&self, db: sled::Db, layout: Layout) -> Result<sled::Db, StoreError> {
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
    fn compact_after(&self, db: sled::Db, layout: Layout, batch: &FlushBatch) {
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
    fn abandon_compaction(&self, upkeep: &mut Upkeep, why: &StoreError) {
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

/// About the most widgets one `apply_batch` carries (see the module notes): seeding 2 M
/// widgets, 1,000 kept the writer at ~185 MiB where 5,000 took ~245 MiB and 10,000 over
/// 4 GB. A chunk ends at a bucket's end, so it may go over by a bucket's widgets less one.
const CHUNK: usize = 1_000;

/// Hands `batch` to `apply` as sled batches of about `chunk` widgets, bucket by bucket,
/// each bucket's old value read with `read` and written whole, the checkpoint and widget
/// count with the last batch (an empty batch is one sled batch with them alone); stops at
/// the first error. After each chunk it lets sled's epoch collector free what the chunk
/// replaced.
fn write_in_chunks(
    batch: &FlushBatch,
    layout: Layout,
    chunk: usize,
    grown: &mut i64,
    mut read: impl FnMut(&[u8]) -> sled::Result<Option<sled::IVec>>,
    mut apply: impl FnMut(sled::Batch) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut items: Vec<_> = (batch.items.iter())
        .map(|item| (layout.key(item.serial.as_str()), item))
        .collect();
    items.sort_unstable_by_key(|(key, _)| *key);
    let mut buckets = items.chunk_by(|a, b| a.0 == b.0).peekable();
    let mut changes = Vec::new();
    loop {
        let mut b = sled::Batch::default();
        let mut widgets = 0;
        let mut chunk_grown = 0;
        while widgets < chunk.max(1) {
            let Some(bucket) = buckets.next() else { break };
            let key = bucket[0].0;
            // The bucket is written whole: the entries it keeps copied as they are, each
            // changed widget encoded whole.
            changes.clear();
            changes.extend(bucket.iter().map(|(_, item)| {
                let put = item.widget.as_ref().map_or(Put::Remove, Put::Widget);
                (item.serial.as_str(), put)
            }));
            let old = read(&key)?;
            let merged =
                bucket::merge(old.as_deref(), &changes).map_err(|reason| StoreError::Corrupt {
                    key: bucket::describe(&key),
                    reason,
                })?;
            let size = |value: Option<&[u8]>| value.map_or(0, |v| (key.len() + v.len()) as i64);
            chunk_grown += size(merged.as_deref()) - size(old.as_deref());
            match merged {
                Some(value) => b.insert(&key[..], value),
                None if old.is_some() => b.remove(&key[..]),
                None => {}
            }
            widgets += bucket.len();
        }
        let last = buckets.peek().is_none();
        if last {
            if let Some(checkpoint) = batch.checkpoint {
                b.insert(CHECKPOINT_KEY, &checkpoint.to_be_bytes());
            }
            if let Some(widgets) = batch.widgets {
                b.insert(WIDGETS_KEY, &widgets.to_be_bytes());
            }
        }
        apply(b)?;
        *grown += chunk_grown;
        collect_garbage(widgets);
        if last {
            return Ok(());
        }
    }
}

/// About the most widgets one pass of the move into buckets holds in memory.
const PASS_WIDGETS: u64 = 2_000_000;

/// The store's directory while it is built anew (with the store's own name before it),
/// by the move into buckets or a compaction, and the old store's, between the two renames
/// that swap them. (The names are the move's, which came first: a store a crash left
/// half-moved by an earlier version is finished under them.)
const REBUILDING: &str = ".buckets";
const REPLACED: &str = ".before-buckets";
/// A file beside the store (with the store's own name before it) while a rebuild is due
/// after a failed write (see [`SledStore::failed_write`]).
const REBUILD_MARK: &str = ".rebuild";

/// The bytes a rebuild copies between two flushes of the new store.
const REBUILD_FLUSH_BYTES: u64 = 64 << 20;

/// Whether a write that failed with `e` leaves the store's file suspect (see
/// [`SledStore::failed_write`]): an I/O error, but for sled's own full disk (taken as
/// refused before the data reached the kernel, as on ext4 and tmpfs, which reserve the
/// space as the data is written) and sled's file lock.
fn suspect(e: &StoreError) -> bool {
    match e {
        StoreError::Sled(sled::Error::Io(io)) => {
            io.kind() != std::io::ErrorKind::StorageFull && !lock_busy(io)
        }
        StoreError::Io { .. } => true,
        _ => false,
    }
}

/// The widgets `batch` says the store holds (its items, if it does not say).
fn widgets_held(batch: &FlushBatch) -> u64 {
    (batch.widgets).unwrap_or(batch.items.len() as u64)
}

/// The layout of a new store that `batch` is the first write to, for [`widgets_held`].
fn new_layout(batch: &FlushBatch) -> Layout {
    Layout::for_widgets(widgets_held(batch))
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

/// Every directory the embedded store at `path` writes, renames or removes: its own and
/// those it is rebuilt in and swapped through. Nothing else may live in them.
pub fn directories(path: &Path) -> [PathBuf; 3] {
    [
        path.to_owned(),
        sibling(path, REBUILDING),
        sibling(path, REPLACED),
    ]
}

/// `path` with `suffix` added to its last component.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or(path.as_os_str()).to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// The layout the store records, if it records one.
fn read_layout(db: &sled::Db) -> Result<Option<Layout>, StoreError> {
    let Some(value) = db.get(BUCKET_BITS_KEY)? else {
        return Ok(None);
    };
    let bits = decode_u64("bucket_bits", &value)?;
    let layout = u32::try_from(bits).ok().and_then(Layout::new);
    layout.map(Some).ok_or_else(|| StoreError::Corrupt {
        key: "bucket_bits".into(),
        reason: format!("{bits}, expected 1 to 32"),
    })
}

/// Decodes and checks every entry written before buckets; returns how many there are.
fn check_old_entries(db: &sled::Db) -> Result<u64, StoreError> {
    // Any layout does: each entry is decoded as if in the bucket it belongs in.
    let layout = Layout::new(32).expect("a valid layout");
    let mut old = 0;
    for entry in db.range(LEGACY_START..) {
        let (key, value) = entry?;
        let corrupt = |reason: String| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason,
        };
        let serial = std::str::from_utf8(&key).map_err(|e| corrupt(e.to_string()))?;
        let home = layout.key(serial);
        bucket::decode(layout, &home, serial, &value).map_err(corrupt)?;
        old += 1;
    }
    Ok(old)
}

/// Builds, in `moving` (a new directory), a store of buckets holding the `old` widgets of
/// `db`, a store written before buckets (one entry a widget, keyed by its serial, every
/// one checked by [`check_old_entries`]), with its checkpoint, count and identity, and the
/// layout last. Buckets go in key order, which sled fills several times faster than it
/// takes them at random, in passes over the old entries of about `pass_widgets` widgets
/// each, so that memory stays bounded. Rebuilding in place instead took ~7 minutes for
/// 10 M widgets, most of it in removing the old entries one by one.
fn move_into_buckets(
    db: &sled::Db,
    moving: &Path,
    cache_bytes: u64,
    layout: Layout,
    old: u64,
    pass_widgets: u64,
) -> Result<(), StoreError> {
    if moving.exists() {
        remove_dir(moving)?;
    }
    let new = sled::Config::new()
        .path(moving)
        .cache_capacity(cache_bytes)
        .flush_every_ms(None)
        .open()?;
    let passes = old.div_ceil(pass_widgets.max(1));
    for pass in 0..passes {
        let first = layout.buckets() * pass / passes;
        let end = layout.buckets() * (pass + 1) / passes;
        let mut buckets = std::collections::BTreeMap::<u32, (Vec<u8>, usize)>::new();
        for entry in db.range(LEGACY_START..) {
            let (key, value) = entry?;
            let serial = std::str::from_utf8(&key).expect("checked by check_old_entries");
            let number = layout.number(serial);
            if (first..end).contains(&u64::from(number)) {
                let (bucket, widgets) = buckets.entry(number).or_default();
                bucket::append(bucket, serial, &value);
                *widgets += 1;
            }
        }
        let mut buckets = buckets.into_iter().peekable();
        while buckets.peek().is_some() {
            let mut b = sled::Batch::default();
            let mut widgets = 0;
            while widgets < CHUNK {
                let Some((number, (value, n))) = buckets.next() else {
                    break;
                };
                b.insert(&bucket::key_of(number)[..], value);
                widgets += n;
            }
            new.apply_batch(b)?;
            collect_garbage(widgets);
        }
        new.flush()?;
        point("move: a pass flushed")?;
        tracing::info!(
            pass = pass + 1,
            passes,
            "moving the embedded store's widgets into buckets"
        );
    }
    let mut b = sled::Batch::default();
    for key in [CHECKPOINT_KEY, WIDGETS_KEY, IDENTITY_KEY] {
        if let Some(value) = db.get(key)? {
            b.insert(key, value);
        }
    }
    b.insert(BUCKET_BITS_KEY, &layout.recorded());
    new.apply_batch(b)?;
    new.flush()?;
    point("move: the layout flushed")?;
    Ok(())
}

/// Puts the store [`move_into_buckets`] or a compaction built in the place of the one at
/// `path` (closed), by two renames, and removes the old one.
fn swap_in_moved(path: &Path) -> Result<(), StoreError> {
    let (moving, moved_out) = (sibling(path, REBUILDING), sibling(path, REPLACED));
    rename(path, &moved_out)?;
    point("swap: the old store moved out")?;
    rename(&moving, path)?;
    point("swap: the new store moved in")?;
    remove_dir(&moved_out)?;
    point("swap: the old store removed")?;
    Ok(())
}

/// A named step of a write (the identity's too), a compaction, a move into buckets or a
/// swap, where the tests stop the process (by copying the store's files as they are
/// there) or fail the step with an I/O error. Nothing, outside tests.
fn point(what: &'static str) -> sled::Result<()> {
    #[cfg(test)]
    if let Some(failed) = tests::crash::at(what) {
        return failed;
    }
    let _ = what;
    Ok(())
}

/// Finishes what a crash left of a rebuild (a move into buckets or a compaction), before
/// the store at `path` opens: with the old store moved out and the new one not yet in, the
/// new one (whole: it is moved in only once built) goes in; a new one still beside the
/// store was cut short while it was built, and goes (the next open builds it again); an
/// old one moved out goes.
fn finish_move(path: &Path) -> Result<(), StoreError> {
    let (moving, moved_out) = (sibling(path, REBUILDING), sibling(path, REPLACED));
    if !path.exists() && moving.exists() && moved_out.exists() {
        tracing::warn!(path = %path.display(), "finishing a rebuild a crash cut short");
        rename(&moving, path)?;
    }
    if moving.exists() {
        tracing::warn!(path = %moving.display(), "removing a rebuild a crash cut short");
        remove_dir(&moving)?;
    }
    if moved_out.exists() {
        if !path.exists() {
            // Only something from outside removes the new store after the first rename.
            return Err(StoreError::Io {
                what: format!(
                    "opening the embedded store: {} is missing, and {} holds the store it \
                     was replacing; move that back to {} to start",
                    path.display(),
                    moved_out.display(),
                    path.display()
                ),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        remove_dir(&moved_out)?;
    }
    Ok(())
}

/// Removes the snapshots sled left unfinished in the store's directory `dir`. sled 0.34
/// writes a snapshot only as it opens, to `snap.<lsn>.generating`, synced and then renamed
/// `snap.<lsn>`; but it takes any `snap.*` file for a snapshot, that name included, and
/// refuses to open when the newest is empty or cut short, as a full disk (a flush's retry
/// opens the store again) or a kill while it opens leaves it. Without it sled opens from
/// the snapshot before and its log, as it did before it began this one.
fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StoreError> {
    let listing = |e| StoreError::io(format!("listing {}", dir.display()))(e);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // A new store: sled makes the directory.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(listing(e)),
    };
    let mut removed = false;
    for entry in entries {
        let path = entry.map_err(listing)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(path = %path.display(),
                "removing a snapshot sled left unfinished (a full disk or a kill as it opened)");
            std::fs::remove_file(&path)
                .map_err(StoreError::io(format!("removing {}", path.display())))?;
            removed = true;
        }
    }
    if removed {
        sync_files(dir, &["."])?;
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(StoreError::io(format!(
        "renaming {} to {}",
        from.display(),
        to.display()
    )))?;
    sync_parent(to)
}

fn remove_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::remove_dir_all(path)
        .map_err(StoreError::io(format!("removing {}", path.display())))?;
    sync_parent(path)
}

/// `fsync`s the files `names` (`.`: the directory itself) in `dir`. sled 0.34's `flush`
/// on Linux is a `sync_file_range`, which writes a file's data but not the metadata (a
/// grown file's size) needed to read it after a power loss, and it `fsync`s only on the
/// flusher thread this store keeps off. The WAL is trimmed on the strength of a store
/// write, so every write ends with an `fsync` of sled's file, and a rebuilt store's files
/// and directory are synced before it replaces the old one.
fn sync_files(dir: &Path, names: &[&str]) -> Result<(), StoreError> {
    for name in names {
        let path = dir.join(name);
        std::fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(StoreError::io(format!("syncing {}", path.display())))?;
    }
    Ok(())
}

/// sled 0.34 writes a log record too big for a quarter of a log segment (over 128 KiB: a
/// leaf holding a bucket that many widgets share, and serials can be chosen to share one)
/// to a file of its own, `blobs/<lsn>`, as the record is reserved, and `fsync`s neither
/// that file nor the directory. Its recovery skips a record whose file is gone, and the
/// records after it (a write's checkpoint) stand: a power loss could lose the bucket with
/// the WAL trimmed behind it. So the blobs a chunk wrote are synced before the chunk's
/// `flush`, and a rebuilt store's before it replaces the old one. Blobs are named by
/// their LSN, which only grows: those from `from` on are synced, and `from` is moved past
/// the newest.
fn sync_blobs(dir: &Path, from: &mut u64) -> Result<(), StoreError> {
    let blobs = dir.join("blobs");
    let listing = |e| StoreError::io(format!("listing {}", blobs.display()))(e);
    let mut next = *from;
    for entry in std::fs::read_dir(&blobs).map_err(listing)? {
        let name = entry.map_err(listing)?.file_name();
        // sled ignores (and warns of) a name that is not an LSN.
        let Some(lsn) = name.to_str().and_then(|name| name.parse::<u64>().ok()) else {
            continue;
        };
        if lsn >= *from {
            sync_files(&blobs, &[&name.to_string_lossy()])?;
            next = next.max(lsn.saturating_add(1));
        }
    }
    if next > *from {
        sync_files(&blobs, &["."])?;
        *from = next;
    }
    Ok(())
}

/// Whether sled refused to open because another handle holds its file lock (sled 0.34
/// says so only in the message).
fn lock_busy(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// What `open` opens, waiting up to 5 s for the file lock of a database this process has
/// just closed: sled's I/O threads may hold it a moment after the last handle is gone.
fn once_unlocked<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open() {
            Err(StoreError::Sled(sled::Error::Io(e)))
                if lock_busy(&e) && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(StoreError::io(format!("syncing {}", parent.display())))
}

/// Runs sled's epoch collector (crossbeam's global one, which sled's hidden `pin` pins:
/// through it this is the very collector sled defers to, whatever crossbeam it uses) often
/// enough to free what `replaced` inserts deferred: a collection frees up to 8 bags of
/// 64 objects, and an insert defers a few. Left alone, the collector runs on one pin in
/// 128 of a thread, far slower than a bulk write defers.
fn collect_garbage(replaced: usize) {
    for _ in 0..replaced.div_ceil(128) {
        sled::pin().flush();
    }
}

impl Store for SledStore {
    async fn load(&self, visit: Visitor) -> Result<u64, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking(visit))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn len_hint(&self) -> Result<u64, StoreError> {
        match self.db()?.get(WIDGETS_KEY)? {
            Some(value) => decode_u64("widgets", &value),
            None => Ok(0),
        }
    }

    async fn identity(&self) -> Result<Option<String>, StoreError> {
        match self.db()?.get(IDENTITY_KEY)? {
            Some(value) => {
                String::from_utf8(value.to_vec())
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        key: "identity".into(),
                        reason: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    async fn set_identity(&self, identity: &str) -> Result<(), StoreError> {
        let (this, identity) = (self.clone(), identity.to_owned());
        // On the writer's thread, like every write (and the opening of the database
        // again after an I/O error closed it, if this is the next operation).
        self.inner
            .writer
            .run(move || {
                let db = this.db()?;
                let written = db
                    .insert(IDENTITY_KEY, identity.as_bytes())
                    .and_then(|_| db.flush())
                    .and_then(|_| point("identity: flushed"));
                match written {
                    Ok(()) => Ok(()),
                    Err(e) => this.failed_write(db, e.into()),
                }
            })
            .await
            .map_err(task_error)?
    }

    fn write_order(&self, serial: &str) -> u64 {
        bucket::order(serial)
    }

    async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let this = self.clone();
        self.inner
            .writer
            .run(move || this.write_blocking(batch))
            .await
            .map_err(task_error)?
    }
}

fn task_error(e: BackgroundError) -> StoreError {
    StoreError::Task(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Mark, Name, PortType, Ports, Serial, Widget};
    use crate::store::FlushItem;
    use std::collections::BTreeMap;

    fn widget(name: &str) -> Widget {
        Widget::new(
            Name::parse("name", name).unwrap(),
            Ports::from_list("ports", &[PortType::P]).unwrap(),
        )
    }

    #[test]
    fn a_failed_rename_says_what_it_was_doing_and_keeps_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("missing");
        match rename(&from, &dir.path().join("to")) {
            Err(StoreError::Io { what, source }) => {
                assert_eq!(
                    what,
                    format!(
                        "renaming {} to {}",
                        from.display(),
                        dir.path().join("to").display()
                    )
                );
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    fn item(serial: &str) -> FlushItem {
        let widget = widget("n");
        FlushItem {
            serial: Serial::parse("serial", serial).unwrap(),
            mark: Mark::default(),
            widget: Some(widget),
            version: 1,
        }
    }

    #[tokio::test]
    async fn keeps_the_widget_count_apart_from_the_widgets() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            store.len_hint().await.unwrap(),
            0,
            "a new store has no hint"
        );
        let batch = FlushBatch {
            items: vec![item("a"), item("b")],
            checkpoint: Some(9),
            widgets: Some(2),
            redis: None,
        };
        store.write_batch(batch).await.unwrap();
        assert_eq!(store.len_hint().await.unwrap(), 2);

        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let checkpoint = store
            .load(Box::new(move |serial, _| sink.lock().unwrap().push(serial)))
            .await
            .unwrap();
        assert_eq!(checkpoint, 9);
        assert_eq!(seen.lock().unwrap().len(), 2, "the count is not a widget");

        store
            .db()
            .unwrap()
            .insert(WIDGETS_KEY, &b"bad"[..])
            .unwrap();
        let err = store.len_hint().await.unwrap_err();
        assert!(err.to_string().contains("widgets"), "{err}");
    }

    /// sled 0.34 panics if the `fsync` it runs as its last handle closes fails, and the
    /// store drops handles while it holds the lock on the kept one: such a panic (caught by
    /// the writer's thread) must not leave the store refusing every write until a restart.
    #[tokio::test]
    async fn a_panic_while_the_handle_was_held_does_not_stop_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let batch = |serial: &str, checkpoint| FlushBatch {
            items: vec![item(serial)],
            checkpoint: Some(checkpoint),
            widgets: Some(2),
            redis: None,
        };
        store.write_batch(batch("a", 1)).await.unwrap();
        // What a failed fsync in sled's drop does there: the handle taken out, then a panic.
        let held = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut kept = store.inner.db.lock().unwrap();
            drop(kept.take());
            panic!("sled's fsync as its last handle closed failed");
        }));
        assert!(held.is_err() && store.inner.db.is_poisoned());

        store.write_batch(batch("b", 2)).await.unwrap();
        let (widgets, checkpoint) = loaded(&store).await;
        assert_eq!(checkpoint, 2);
        assert_eq!(widgets.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    /// Widgets stored (in buckets) and the checkpoint, straight from the tree.
    fn contents(db: &sled::Db) -> (usize, Option<u64>) {
        let checkpoint = db
            .get(CHECKPOINT_KEY)
            .unwrap()
            .map(|v| decode_u64("checkpoint", &v).unwrap());
        (stored(db).len(), checkpoint)
    }

    /// Every widget in the buckets, by serial, straight from the tree (each serial once).
    fn stored(db: &sled::Db) -> BTreeMap<String, Widget> {
        let layout = read_layout(db).unwrap().expect("a layout");
        let mut widgets = BTreeMap::new();
        for entry in db.range(&[bucket::PREFIX][..]..LEGACY_START) {
            let (key, value) = entry.unwrap();
            for entry in bucket::entries(&value) {
                let (serial, encoded) = entry.unwrap();
                let (serial, widget) = bucket::decode(layout, &key, serial, encoded).unwrap();
                assert!(widgets.insert(serial.as_str().to_owned(), widget).is_none());
            }
        }
        widgets
    }

    /// `layout`, recorded as the layout of `db` (a new store's, written to directly).
    fn recorded(db: &sled::Db, layout: Layout) -> Layout {
        db.insert(BUCKET_BITS_KEY, &layout.recorded()).unwrap();
        layout
    }

    fn bucket_bits(db: &sled::Db) -> u32 {
        read_layout(db).unwrap().expect("a layout").bits()
    }

    fn buckets(db: &sled::Db) -> usize {
        db.range(&[bucket::PREFIX][..]..LEGACY_START).count()
    }

    /// Bytes of the buckets' keys and values, straight from the tree.
    fn bucket_bytes(db: &sled::Db) -> u64 {
        (db.range(&[bucket::PREFIX][..]..LEGACY_START))
            .map(|entry| entry.map(|(k, v)| (k.len() + v.len()) as u64).unwrap())
            .sum()
    }

    fn legacy(db: &sled::Db) -> usize {
        db.range(LEGACY_START..).count()
    }

    fn many(n: usize) -> FlushBatch {
        FlushBatch {
            items: (0..n).map(|i| item(&format!("w{i:05}"))).collect(),
            checkpoint: Some(9),
            widgets: Some(n as u64),
            redis: None,
        }
    }

    #[test]
    fn a_large_write_goes_in_bounded_chunks_with_the_checkpoint_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let db = store.db().unwrap();
        let mut seen = Vec::new();
        write_in_chunks(
            &many(2_500),
            recorded(&db, Layout::for_widgets(2_500)),
            1_000,
            &mut 0,
            |k| db.get(k),
            |chunk| {
                db.apply_batch(chunk)?;
                seen.push(contents(&db));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            [(1_000, None), (2_000, None), (2_500, Some(9))],
            "no chunk over 1,000 widgets; the checkpoint only once all are in"
        );
        assert_eq!(
            db.get(WIDGETS_KEY).unwrap().as_deref(),
            Some(&2_500u64.to_be_bytes()[..])
        );
    }

    #[test]
    fn a_write_cut_short_leaves_the_checkpoint_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let db = store.db().unwrap();
        let mut applied = 0;
        let err = write_in_chunks(
            &many(2_500),
            recorded(&db, Layout::for_widgets(2_500)),
            1_000,
            &mut 0,
            |k| db.get(k),
            |chunk| {
                if applied == 1 {
                    return Err(sled::Error::Unsupported("the test's failure".into()).into());
                }
                applied += 1;
                Ok(db.apply_batch(chunk)?)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("the test's failure"), "{err}");
        assert_eq!(contents(&db), (1_000, None), "stopped at the failed chunk");
    }

    #[test]
    fn an_empty_write_still_stores_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let db = store.db().unwrap();
        let mut calls = 0;
        write_in_chunks(
            &many(0),
            recorded(&db, Layout::for_widgets(0)),
            1_000,
            &mut 0,
            |k| db.get(k),
            |chunk| {
                calls += 1;
                Ok(db.apply_batch(chunk)?)
            },
        )
        .unwrap();
        assert_eq!((calls, contents(&db)), (1, (0, Some(9))));
    }

    #[tokio::test]
    async fn a_stored_widget_with_impossible_values_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let mut widget = item("a").widget.unwrap();
        widget.peers[PortType::Q.index()] = Some(Serial::parse("s", "b").unwrap());
        store.write_batch(many(0)).await.unwrap();
        let key = store
            .layout()
            .expect("laid out by its first write")
            .key("a");
        let value = bucket::merge(None, &[("a", Put::Widget(&widget))]).unwrap();
        store.db().unwrap().insert(key, value.unwrap()).unwrap();
        let err = store.load(Box::new(|_, _| {})).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key: k, reason }
                if *k == bucket::describe(&key) && reason.contains("widget a") && reason.contains("port Q")),
            "{err}"
        );
    }

    /// The database in `path`, with no flusher thread of sled's: dropped, it is closed, and
    /// a store can open it at once.
    fn raw(path: &Path) -> sled::Db {
        raw_open(path).unwrap()
    }

    fn raw_open(path: &Path) -> sled::Result<sled::Db> {
        sled::Config::new().path(path).flush_every_ms(None).open()
    }

    /// A store of two buckets, so that most widgets share one.
    fn two_bucket_store(path: &Path) -> SledStore {
        let db = raw(path);
        recorded(&db, Layout::new(1).unwrap());
        db.flush().unwrap();
        drop(db);
        SledStore::open(path, 1 << 20).unwrap()
    }

    async fn loaded(store: &SledStore) -> (BTreeMap<String, Widget>, u64) {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let sink = seen.clone();
        let checkpoint = store
            .load(Box::new(move |serial, widget| {
                let again = sink
                    .lock()
                    .unwrap()
                    .insert(serial.as_str().to_owned(), widget);
                assert!(again.is_none(), "{serial} loaded twice");
            }))
            .await
            .unwrap();
        let widgets = std::mem::take(&mut *seen.lock().unwrap());
        (widgets, checkpoint)
    }

    #[tokio::test]
    async fn widgets_sharing_a_bucket_are_written_and_removed_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_bucket_store(dir.path());
        assert_eq!(
            store.layout().map(Layout::bits),
            Some(1),
            "the store's own layout, not the default"
        );
        store.write_batch(many(50)).await.unwrap();

        let mut changes = many(20);
        for (i, item) in changes.items.iter_mut().enumerate() {
            if i % 2 == 0 {
                item.widget = Some(widget("renamed"));
            } else {
                item.widget = None;
            }
        }
        changes.checkpoint = Some(10);
        store.write_batch(changes).await.unwrap();

        let (widgets, checkpoint) = loaded(&store).await;
        assert_eq!(checkpoint, 10);
        let expected: BTreeMap<_, _> = (0..50)
            .filter(|i| i >= &20 || i % 2 == 0)
            .map(|i| {
                let name = if i < 20 { "renamed" } else { "n" };
                (format!("w{i:05}"), widget(name))
            })
            .collect();
        assert_eq!(widgets, expected);
        assert_eq!(buckets(&store.db().unwrap()), 2);

        let mut gone = many(50);
        gone.items.iter_mut().for_each(|item| item.widget = None);
        store.write_batch(gone).await.unwrap();
        assert!(loaded(&store).await.0.is_empty());
        assert_eq!(
            buckets(&store.db().unwrap()),
            0,
            "an empty bucket is removed"
        );
    }

    /// sled writes a snapshot as it opens (`snap.<lsn>.generating`, synced, then renamed
    /// `snap.<lsn>`), and takes any `snap.*` file for one, that name included. The open of a
    /// flush's retry on a full disk left it empty (or a kill, cut short), and every later
    /// open then took it for a damaged snapshot and refused the store: no flush once there
    /// was space again, and no start.
    #[tokio::test]
    async fn a_snapshot_sled_left_unfinished_as_it_opened_does_not_stop_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = SledStore::open(&path, 1 << 20).unwrap();
        store.write_batch(many(100)).await.unwrap();
        drop(store);
        let unfinished = path.join("snap.7FFFFFFFFFFFFFFF.generating");
        for (round, left) in [&[][..], &[7u8; 40][..]].into_iter().enumerate() {
            std::fs::write(&unfinished, left).unwrap();
            let store = SledStore::open(&path, 1 << 20).unwrap();
            assert_eq!(loaded(&store).await.0.len(), 100 + round);
            let mut batch = many(0);
            batch.items.push(item(&format!("after{round}")));
            store.write_batch(batch).await.unwrap();
            drop(store);
        }
        let store = SledStore::open(&path, 1 << 20).unwrap();
        assert_eq!(loaded(&store).await.0.len(), 102);
        assert!(!unfinished.exists());
    }

    /// A store as versions before buckets wrote it: one entry a widget, keyed by serial.
    fn legacy_store(path: &Path, n: usize) -> sled::Db {
        let db = raw(path);
        for item in many(n).items {
            let value =
                bincode::serde::encode_to_vec(item.widget.unwrap(), bincode::config::standard());
            db.insert(item.serial.as_str(), value.unwrap()).unwrap();
        }
        db.insert(CHECKPOINT_KEY, &7u64.to_be_bytes()).unwrap();
        db.insert(WIDGETS_KEY, &(n as u64).to_be_bytes()).unwrap();
        db.flush().unwrap();
        db
    }

    #[tokio::test]
    async fn a_store_written_before_buckets_is_moved_into_them_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        drop(legacy_store(dir.path(), 2_500));
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let (widgets, checkpoint) = loaded(&store).await;
        assert_eq!(checkpoint, 7);
        let expected: BTreeMap<_, _> = (many(2_500).items.into_iter())
            .map(|item| (item.serial.as_str().to_owned(), item.widget.unwrap()))
            .collect();
        assert_eq!(widgets, expected);
        let db = store.db().unwrap();
        assert_eq!(legacy(&db), 0, "no entry is left in the old layout");
        assert_eq!(
            bucket_bits(&db),
            Layout::for_widgets(2_500).bits(),
            "laid out for the widgets it holds"
        );
        assert_eq!(store.len_hint().await.unwrap(), 2_500);
        assert_rebuilt(dir.path());
    }

    /// No directory of a rebuild (a move into buckets or a compaction) is left.
    fn assert_rebuilt(path: &Path) {
        for suffix in [REBUILDING, REPLACED] {
            assert!(!sibling(path, suffix).exists(), "{suffix} is left");
        }
    }

    #[tokio::test]
    async fn a_move_cut_short_while_it_built_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(legacy_store(&path, 2_500));
        let moving = sibling(&path, REBUILDING);
        {
            // Half a pass: a store with some buckets and no layout.
            let partial = raw(&moving);
            partial.insert(bucket::key_of(7), &b"junk"[..]).unwrap();
            partial.flush().unwrap();
        }
        let store = SledStore::open(&path, 1 << 20).unwrap();
        let (widgets, checkpoint) = loaded(&store).await;
        assert_eq!((widgets.len(), checkpoint), (2_500, 7));
        assert_eq!(legacy(&store.db().unwrap()), 0);
        assert_rebuilt(&path);
    }

    #[tokio::test]
    async fn a_move_cut_short_between_its_renames_is_finished() {
        for renamed in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            {
                let db = legacy_store(&path, 2_500);
                let layout = Layout::for_widgets(2_500);
                let moving = sibling(&path, REBUILDING);
                move_into_buckets(&db, &moving, 1 << 20, layout, 2_500, 1_000).unwrap();
            }
            std::fs::rename(&path, sibling(&path, REPLACED)).unwrap();
            if renamed == 2 {
                std::fs::rename(sibling(&path, REBUILDING), &path).unwrap();
            }
            let store = SledStore::open(&path, 1 << 20).unwrap();
            let (widgets, checkpoint) = loaded(&store).await;
            assert_eq!((widgets.len(), checkpoint), (2_500, 7), "after {renamed}");
            assert_eq!(legacy(&store.db().unwrap()), 0);
            assert_eq!(store.len_hint().await.unwrap(), 2_500);
            assert_rebuilt(&path);
        }
    }

    #[test]
    fn a_store_gone_from_beside_the_one_it_replaced_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(legacy_store(&sibling(&path, REPLACED), 10));
        let err = SledStore::open(&path, 1 << 20).err().expect("refused");
        assert!(err.to_string().contains("move that back"), "{err}");
        assert_eq!(
            legacy(&raw(&sibling(&path, REPLACED))),
            10,
            "kept as it was"
        );
        assert!(!path.exists(), "no empty store in its place");
    }

    #[test]
    fn damage_in_an_old_entry_stops_the_move_with_the_store_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let db = legacy_store(dir.path(), 10);
        db.insert("w00004", &b"\xff\xff"[..]).unwrap();
        db.flush().unwrap();
        drop(db);
        let err = SledStore::open(dir.path(), 1 << 20).err().expect("refused");
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if key == "w00004"),
            "{err}"
        );
        let db = raw(dir.path());
        assert_eq!((legacy(&db), buckets(&db)), (10, 0), "nothing moved");
        assert!(db.get(BUCKET_BITS_KEY).unwrap().is_none());
        assert!(!sibling(dir.path(), REBUILDING).exists());
    }

    #[tokio::test]
    async fn a_damaged_bucket_is_named_on_load_and_refused_by_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        store.write_batch(many(1)).await.unwrap();
        let db = store.db().unwrap();
        let key = store.layout().unwrap().key("w00000");
        let value = db.get(key).unwrap().unwrap();
        db.insert(key, &value[..value.len() - 1]).unwrap();

        let err = store.load(Box::new(|_, _| {})).await.unwrap_err();
        let name = bucket::describe(&key);
        assert!(
            matches!(&err, StoreError::Corrupt { key, reason } if *key == name && reason.contains("cut short")),
            "{err}"
        );
        let err = store.write_batch(many(1)).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if *key == name),
            "{err}"
        );
        assert_eq!(
            db.get(key).unwrap().unwrap().len(),
            value.len() - 1,
            "left as it was"
        );
    }

    #[test]
    fn a_layout_out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = raw(dir.path());
        db.insert(BUCKET_BITS_KEY, &33u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
        drop(db);
        let err = SledStore::open(dir.path(), 1 << 20).err().expect("refused");
        assert!(err.to_string().contains("bucket_bits"), "{err}");
    }

    /// A store of 64 buckets in `path`, compacting by `ratio` (0: never) a sixteenth of
    /// it a step, four buckets to a batch.
    fn compacting_store(path: &Path, ratio: f64) -> SledStore {
        store_of(
            path,
            6,
            compact::Settings {
                ratio,
                min_file_bytes: 0,
                steps: 16,
                chunk: 4,
            },
        )
    }

    /// A store of `2^bits` buckets in `path` (if it is new), compacting by `settings`.
    fn store_of(path: &Path, bits: u32, settings: compact::Settings) -> SledStore {
        if !path.exists() {
            let db = raw(path);
            recorded(&db, Layout::new(bits).unwrap());
            db.flush().unwrap();
        }
        let mut options = Options::new(1 << 20);
        options.compact = settings;
        SledStore::open_with(path, options).unwrap()
    }

    /// Writes `round`: renames widgets `r0..r300` (a few of them removed, a few new), as
    /// checkpoint `round`, into both `store` and `model`.
    async fn write_round(store: &SledStore, model: &mut BTreeMap<String, Widget>, round: u64) {
        store.write_batch(round_batch(model, round)).await.unwrap();
    }

    /// The batch of [`write_round`], put into `model`.
    fn round_batch(model: &mut BTreeMap<String, Widget>, round: u64) -> FlushBatch {
        let items = (0..300).map(|i| {
            let serial = format!("r{:03}", (i + round as usize * 7) % 320);
            let widget = (i % 50 != 0).then(|| widget(&format!("round {round}")));
            match &widget {
                Some(w) => model.insert(serial.clone(), w.clone()),
                None => model.remove(&serial),
            };
            FlushItem {
                widget,
                ..item(&serial)
            }
        });
        let items = items.collect();
        FlushBatch {
            items,
            checkpoint: Some(round),
            widgets: Some(model.len() as u64),
            redis: None,
        }
    }

    /// A store in `path` grown by 150 rounds of writes (never compacted), then opened
    /// again due for a compaction at its next write (its ratio 0.8 times the grown file's
    /// to its buckets) and loaded; the grown file's size.
    async fn store_due(path: &Path, model: &mut BTreeMap<String, Widget>) -> (SledStore, u64) {
        let (file, live) = {
            let store = compacting_store(path, 0.0);
            loaded(&store).await;
            for round in 1..=150 {
                write_round(&store, model, round).await;
            }
            let file = store.db().unwrap().size_on_disk().unwrap();
            let live = store.upkeep().live_bytes.expect("counted by the load");
            assert_eq!(live, bucket_bytes(&store.db().unwrap()));
            (file, live)
        };
        assert!(file > 4 * live, "the file grew: {file} bytes for {live}");
        let store = compacting_store(path, (file / live) as f64 * 0.8);
        assert_eq!(loaded(&store).await.1, 150);
        (store, file)
    }

    #[tokio::test]
    async fn a_grown_store_is_compacted_while_written_and_keeps_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        // A sixteenth of the store a step, so several writes go by while it runs, each
        // changing buckets already copied.
        let (store, file) = store_due(&path, &mut model).await;
        let mut compacting = Vec::new();
        for round in 151..=170 {
            write_round(&store, &mut model, round).await;
            if store.upkeep().compaction.is_some() {
                compacting.push(round);
            }
        }
        assert_eq!(compacting[0], 151, "started by the first write");
        assert!(compacting.len() >= 8, "a step a write: {compacting:?}");
        assert_eq!(store.upkeep().compacted, 1);
        let compacted = store.db().unwrap().size_on_disk().unwrap();
        assert!(compacted < file / 2, "{compacted} bytes, from {file}");
        assert_rebuilt(&path);
        assert_eq!(loaded(&store).await, (model.clone(), 170));
        assert_eq!(store.len_hint().await.unwrap(), model.len() as u64);
        assert_eq!(
            bucket_bits(&store.db().unwrap()),
            6,
            "the layout came along"
        );
        drop(store);

        let store = compacting_store(&path, 0.0);
        assert_eq!(loaded(&store).await, (model, 170), "opened again");
    }

    #[tokio::test]
    async fn a_new_store_is_laid_out_for_the_widgets_its_first_write_says_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.layout(), None, "nothing to lay out yet");
        assert_eq!(loaded(&store).await, (BTreeMap::new(), 0));
        let mut batch = many(10);
        batch.widgets = Some(1_000_000);
        store.write_batch(batch).await.unwrap();
        let layout = store.layout().expect("laid out");
        assert_eq!(layout.bits(), 17, "for a million widgets, not for ten");
        for item in many(10).items {
            let serial = item.serial.as_str();
            assert_eq!(
                store.write_order(serial) >> (32 - 17),
                u64::from(layout.number(serial)),
                "the write order is the buckets' order"
            );
        }
        store.write_batch(many(20)).await.unwrap();
        drop(store);

        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.layout(), Some(layout), "kept");
        assert_eq!(loaded(&store).await.0.len(), 20);
        assert_eq!(bucket_bits(&store.db().unwrap()), 17);
    }

    /// Compaction settings under which only crowding makes a store due (its file is never
    /// big enough), a step copying one bucket, so that writes go on while it runs.
    fn crowding_only() -> compact::Settings {
        compact::Settings {
            ratio: 3.0,
            min_file_bytes: u64::MAX,
            steps: 16,
            chunk: 1,
        }
    }

    #[tokio::test]
    async fn a_crowded_store_gets_more_buckets_while_written_and_keeps_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        // Two buckets for ~300 widgets, ~3.5 KB each: crowded, and still crowded with
        // four. The writes go on while it is split, changing buckets already split.
        let settings = crowding_only();
        let store = store_of(&path, 1, settings);
        loaded(&store).await;
        let mut model = BTreeMap::new();
        let mut compacting = Vec::new();
        for round in 1..=20 {
            write_round(&store, &mut model, round).await;
            if store.upkeep().compaction.is_some() {
                compacting.push(round);
            }
        }
        assert_eq!(
            compacting.first(),
            Some(&1),
            "due at the write that crowded it"
        );
        assert!(compacting.len() >= 6, "a bucket a step: {compacting:?}");
        assert_eq!(
            store.upkeep().compacted,
            2,
            "twice: four buckets are still crowded, eight are not"
        );
        assert_eq!(store.layout().map(Layout::bits), Some(3));
        assert_eq!(bucket_bits(&store.db().unwrap()), 3);
        assert!(buckets(&store.db().unwrap()) > 4);
        assert_rebuilt(&path);
        assert_eq!(loaded(&store).await, (model.clone(), 20));
        write_round(&store, &mut model, 21).await;
        drop(store);

        let store = store_of(&path, 1, settings);
        assert_eq!(store.layout().map(Layout::bits), Some(3), "opened again");
        assert_eq!(loaded(&store).await, (model, 21));
    }

    #[tokio::test]
    async fn a_split_cut_short_leaves_the_store_whole_in_its_old_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let settings = crowding_only();
        let store = store_of(&path, 2, settings);
        loaded(&store).await;
        let mut model = BTreeMap::new();
        for round in 1..=2 {
            write_round(&store, &mut model, round).await;
        }
        assert!(store.upkeep().compaction.is_some(), "halfway");
        drop(store);

        let never = compact::Settings {
            ratio: 0.0,
            ..settings
        };
        let store = store_of(&path, 2, never);
        assert_rebuilt(&path);
        assert_eq!(store.layout().map(Layout::bits), Some(2), "as it was");
        assert_eq!(loaded(&store).await, (model, 2));
    }

    #[tokio::test]
    async fn a_compaction_cut_short_leaves_the_store_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, _) = store_due(&path, &mut model).await;
        for round in 151..=155 {
            write_round(&store, &mut model, round).await;
        }
        assert!(store.upkeep().compaction.is_some(), "halfway");
        assert!(sibling(&path, REBUILDING).exists());
        drop(store);

        let store = compacting_store(&path, 0.0);
        assert_rebuilt(&path);
        assert_eq!(loaded(&store).await, (model, 155));
    }

    #[tokio::test]
    async fn a_compaction_that_fails_is_abandoned_and_the_write_stands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, _) = store_due(&path, &mut model).await;
        // Where the new store would go, a file that cannot be removed as a directory.
        std::fs::write(sibling(&path, REBUILDING), b"in the way").unwrap();
        write_round(&store, &mut model, 151).await;
        {
            let upkeep = store.upkeep();
            assert!(upkeep.compaction.is_none() && upkeep.compacted == 0);
            assert!(upkeep.retry_at.is_some(), "waits before trying again");
        }
        write_round(&store, &mut model, 152).await;
        assert!(
            store.upkeep().compaction.is_none(),
            "not tried again at once"
        );
        assert_eq!(loaded(&store).await, (model, 152));
    }

    /// A hook that, at `at`, takes the first bucket out of the store being rebuilt beside
    /// the one at `path`.
    fn losing_a_bucket(at: &'static str, path: &Path) -> crash::Hook {
        let rebuilding = sibling(path, REBUILDING);
        Box::new(move |point| {
            if point == at {
                let db = once_unlocked(|| Ok(raw_open(&rebuilding)?)).unwrap();
                let (first, _) = (db.range(&[bucket::PREFIX][..]..LEGACY_START))
                    .next()
                    .unwrap()
                    .unwrap();
                db.remove(first).unwrap();
                db.flush().unwrap();
            }
            None
        })
    }

    /// A move into buckets whose new store, read back, lacks what the old store holds
    /// fails the open with the old store as it was, and the next open moves it again.
    #[tokio::test]
    async fn a_move_whose_new_store_lacks_a_bucket_keeps_the_old_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(legacy_store(&path, 2_500));
        crash::on_open(&path, losing_a_bucket("move: the new store synced", &path));
        let refused = SledStore::open(&path, 1 << 20).err().expect("opened");
        assert!(refused.to_string().contains("rebuilt store"), "{refused}");
        assert_eq!(legacy(&raw(&path)), 2_500, "the old store as it was");
        let store = SledStore::open(&path, 1 << 20).unwrap();
        let (widgets, checkpoint) = loaded(&store).await;
        assert_eq!((widgets.len(), checkpoint), (2_500, 7));
        assert_rebuilt(&path);
    }

    /// A compacted copy that, read back, lacks what the store holds (here a bucket taken
    /// out of it once it is whole) is abandoned, and the old store stays. It used to be
    /// swapped in unread, and the old store removed.
    #[tokio::test]
    async fn a_compacted_copy_that_lacks_a_bucket_does_not_replace_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, _) = store_due(&path, &mut model).await;
        let hook = losing_a_bucket("compaction: the new store synced", &path);
        crash::set(&store, Some(hook)).await;
        for round in 151..=170 {
            write_round(&store, &mut model, round).await;
        }
        crash::set(&store, None).await;
        {
            let upkeep = store.upkeep();
            assert_eq!(upkeep.compacted, 0, "swapped in");
            assert!(upkeep.compaction.is_none() && upkeep.retry_at.is_some());
        }
        assert!(!sibling(&path, REBUILDING).exists());
        assert_eq!(loaded(&store).await, (model, 170));
    }

    #[tokio::test]
    async fn a_compaction_that_runs_out_of_disk_is_abandoned_and_every_write_stands() {
        use widgets_testkit::disk::{fill, Tmpfs};
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        let _tmpfs = Tmpfs::mount(&mnt, "64m");
        let path = mnt.join("store");
        // 4,096 buckets of ~5 widgets with long names: a write of a few widgets rewrites
        // a few KB, a copy of the store takes MBs.
        let settings = compact::Settings {
            ratio: 2.5,
            min_file_bytes: 0,
            steps: 1,
            chunk: 1_000,
        };
        let store = store_of(&path, 12, settings);
        loaded(&store).await;
        let long = |i: usize| widget(&format!("{i:0>60}"));
        let mut model: BTreeMap<String, Widget> =
            (0..20_000).map(|i| (format!("w{i:05}"), long(i))).collect();
        let items = (model.iter())
            .map(|(serial, widget)| FlushItem {
                widget: Some(widget.clone()),
                ..item(serial)
            })
            .collect();
        let written = |items, checkpoint| FlushBatch {
            items,
            checkpoint: Some(checkpoint),
            widgets: Some(20_000),
            redis: None,
        };
        // Not due yet: written once, in one batch, the file is near its widgets' size.
        let mut compacting = compact::Settings {
            ratio: 0.0,
            ..settings
        };
        drop(store);
        let store = store_of(&path, 12, compacting);
        loaded(&store).await;
        store.write_batch(written(items, 1)).await.unwrap();
        drop(store);

        // Opened first (sled may take a fresh segment of its file as it opens), then the
        // disk is filled but for room for a small write to the store.
        compacting.ratio = 0.01;
        let store = store_of(&path, 12, compacting);
        loaded(&store).await;
        let reserve = mnt.join("reserve");
        std::fs::write(&reserve, vec![0u8; 256 << 10]).unwrap();
        let filler = fill(&mnt);
        std::fs::remove_file(&reserve).unwrap();
        for (i, checkpoint) in [(7, 2), (8, 3)] {
            model.insert(format!("w{i:05}"), widget("renamed"));
            let changed = vec![FlushItem {
                widget: Some(widget("renamed")),
                ..item(&format!("w{i:05}"))
            }];
            store
                .write_batch(written(changed, checkpoint))
                .await
                .unwrap();
            let upkeep = store.upkeep();
            assert!(upkeep.compaction.is_none() && upkeep.compacted == 0);
            assert!(upkeep.retry_at.is_some(), "abandoned, waiting to try again");
        }
        assert!(
            !sibling(&path, REBUILDING).exists(),
            "what it built is gone"
        );
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(loaded(&store).await, (model, 3));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Any run of writes (creates, renames, deletions, in batches cut in small chunks)
        /// into a store of few buckets loads back as exactly what a map of the same writes
        /// holds.
        #[test]
        fn buckets_hold_what_a_map_of_the_same_writes_holds(
            bits in 1u32..4,
            batches in proptest::collection::vec(
                proptest::collection::btree_map(0u8..40, proptest::option::of(0u8..3), 0..30),
                1..8,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = raw(dir.path());
            let layout = Layout::new(bits).unwrap();
            let mut model = BTreeMap::new();
            let mut grown = 0;
            for (lsn, changes) in batches.iter().enumerate() {
                let items = changes.iter().map(|(&n, &name)| {
                    let serial = format!("w{n}");
                    let widget = name.map(|k| widget(&format!("n{k}")));
                    match &widget {
                        Some(w) => model.insert(serial.clone(), w.clone()),
                        None => model.remove(&serial),
                    };
                    FlushItem { widget, ..item(&serial) }
                });
                let batch = FlushBatch {
                    items: items.collect(),
                    checkpoint: Some(lsn as u64 + 1),
                    widgets: Some(model.len() as u64),
                    redis: None,
                };
                write_in_chunks(&batch, layout, 7, &mut grown, |k| db.get(k), |b| Ok(db.apply_batch(b)?))
                    .unwrap();
            }
            recorded(&db, layout);
            proptest::prop_assert_eq!(stored(&db), model);
            proptest::prop_assert!(buckets(&db) <= 1 << bits);
            proptest::prop_assert_eq!(grown, bucket_bytes(&db) as i64, "the live bytes counted");
        }
    }

    /// A hook on a store's writer thread, run at each [`point`] the store reaches there.
    pub(super) mod crash {
        use super::SledStore;
        use std::cell::RefCell;
        use std::path::{Path, PathBuf};
        use std::sync::Mutex;

        /// What to do at a point: `None` goes on, `Some` ends the step with that outcome.
        pub type Hook = Box<dyn FnMut(&'static str) -> Option<sled::Result<()>> + Send>;

        thread_local! {
            static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
        }

        /// What the hook on this thread says at `what`.
        pub(in crate::store::sled) fn at(what: &'static str) -> Option<sled::Result<()>> {
            HOOK.with(|hook| hook.borrow_mut().as_mut().and_then(|hook| hook(what)))
        }

        /// Puts `hook` on `store`'s writer thread; `None` takes it off.
        pub async fn set(store: &SledStore, hook: Option<Hook>) {
            let set = move || HOOK.with(|h| *h.borrow_mut() = hook);
            store.inner.writer.run(set).await.unwrap();
        }

        /// Hooks for stores not yet open, by path: the store's writer thread takes its own
        /// as the store opens there (before a move into buckets).
        static ON_OPEN: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

        /// Puts `hook` on the writer thread of the store that opens next at `path`, from
        /// the start of its opening; [`set`] takes it off.
        pub fn on_open(path: &Path, hook: Hook) {
            ON_OPEN.lock().unwrap().push((path.to_owned(), hook));
        }

        /// Called on a store's writer thread as it opens the store at `path`.
        pub(in crate::store::sled) fn opening(path: &Path) {
            let mut waiting = ON_OPEN.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = waiting.iter().position(|(p, _)| p == path) {
                let (_, hook) = waiting.swap_remove(i);
                HOOK.with(|h| *h.borrow_mut() = Some(hook));
            }
        }
    }

    /// A data directory as a kill at a point would have left it: the files as the store
    /// had written them there, whatever sled still held in memory lost.
    struct Killed {
        dir: tempfile::TempDir,
        at: &'static str,
        /// The write under way (1 for the first).
        write: usize,
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let (from, to) = (entry.path(), to.join(entry.file_name()));
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&from, &to);
            } else {
                std::fs::copy(&from, &to).unwrap();
            }
        }
    }

    /// A hook that copies `data_dir` at every point, tagged with the write `under_way`.
    fn killing(
        data_dir: &Path,
        under_way: Arc<std::sync::atomic::AtomicUsize>,
        killed: Arc<Mutex<Vec<Killed>>>,
    ) -> crash::Hook {
        let data_dir = data_dir.to_owned();
        Box::new(move |at| {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(&data_dir, dir.path());
            let write = under_way.load(std::sync::atomic::Ordering::SeqCst);
            killed.lock().unwrap().push(Killed { dir, at, write });
            None
        })
    }

    /// sled 0.34 writes a log record too big for a quarter of a log segment (128 KiB) to a
    /// file of its own in `blobs/`, and never fsyncs the file or the directory; its
    /// recovery skips a record whose file is gone. Serials can be chosen to share a bucket
    /// (its hash is known), and a bucket of ~1,500 widgets is such a record. So a power
    /// loss after a write could leave its checkpoint (in a later record) without the
    /// bucket, once the WAL was trimmed behind it. Here the power loss is modelled: the
    /// store's files as they are once the write is done, less each blob file the store had
    /// not synced.
    #[tokio::test]
    async fn a_bucket_too_big_for_sleds_log_is_synced_before_its_checkpoint() {
        use crate::domain::MAX_NAME_LEN;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = two_bucket_store(&path);
        let blobs = path.join("blobs");
        let listing = move |dir: &Path| -> std::collections::BTreeSet<std::ffi::OsString> {
            (std::fs::read_dir(dir).unwrap())
                .map(|entry| entry.unwrap().file_name())
                .collect()
        };
        let lost_power = Arc::new(Mutex::new(None::<tempfile::TempDir>));
        let (copy_to, store_dir) = (lost_power.clone(), path.clone());
        let mut synced = Default::default();
        let hook: crash::Hook = Box::new(move |at| {
            match at {
                "write: a chunk's blobs synced" => synced = listing(&store_dir.join("blobs")),
                "write: synced" => {
                    let copy = tempfile::tempdir().unwrap();
                    copy_dir(&store_dir, copy.path());
                    for name in listing(&copy.path().join("blobs")) {
                        if !synced.contains(&name) {
                            std::fs::remove_file(copy.path().join("blobs").join(name)).unwrap();
                        }
                    }
                    *copy_to.lock().unwrap() = Some(copy);
                }
                _ => {}
            }
            None
        });
        crash::set(&store, Some(hook)).await;

        let big = Widget::new(
            Name::parse("name", &"n".repeat(MAX_NAME_LEN)).unwrap(),
            Ports::from_list("ports", &PortType::ALL).unwrap(),
        );
        let mut batch = many(5_000);
        batch
            .items
            .iter_mut()
            .for_each(|i| i.widget = Some(big.clone()));
        store.write_batch(batch).await.unwrap();
        crash::set(&store, None).await;
        assert!(
            !listing(&blobs).is_empty(),
            "a bucket this big goes to a blob file"
        );

        let copy = lost_power
            .lock()
            .unwrap()
            .take()
            .expect("the write was synced");
        let after = SledStore::open(copy.path(), 1 << 20)
            .unwrap_or_else(|e| panic!("the store after a power loss: {e}"));
        let (widgets, checkpoint) = loaded(&after).await;
        assert_eq!(checkpoint, 9);
        assert_eq!(
            widgets.len(),
            5_000,
            "the checkpoint stands for every widget of the write"
        );
    }

    fn never_compacting() -> Options {
        let mut options = Options::new(1 << 20);
        options.compact = compact::Settings {
            ratio: 0.0,
            ..crowding_only()
        };
        options
    }

    /// Points inside a write, before its checkpoint is stored: a kill there may leave each
    /// widget as before the write or as after it, and the checkpoint before it; or all of
    /// the write, with its checkpoint.
    fn inside_a_write(at: &str) -> bool {
        at.starts_with("first write:") || at.starts_with("write: a chunk")
    }

    /// The first few serials where `got` differs from `want`, by name.
    fn differences(got: &BTreeMap<String, Widget>, want: &BTreeMap<String, Widget>) -> Vec<String> {
        let serials: std::collections::BTreeSet<_> = got.keys().chain(want.keys()).collect();
        let wrong = serials
            .into_iter()
            .filter(|serial| got.get(*serial) != want.get(*serial));
        let name = |widgets: &BTreeMap<String, Widget>, serial: &str| {
            widgets.get(serial).map(|w| w.name.as_str().to_owned())
        };
        wrong
            .take(5)
            .map(|serial| {
                format!(
                    "{serial}: {:?}, not {:?}",
                    name(got, serial),
                    name(want, serial)
                )
            })
            .collect()
    }

    /// The copies `killed` holds, taken out, once every one of `points` has been reached.
    fn reaching(killed: &Mutex<Vec<Killed>>, points: &[&str]) -> Vec<Killed> {
        let killed = std::mem::take(&mut *killed.lock().unwrap());
        let reached: std::collections::BTreeSet<_> = killed.iter().map(|k| k.at).collect();
        for at in points {
            assert!(reached.contains(at), "{at:?} never reached: {reached:?}");
        }
        killed
    }

    /// Opens each of `killed` (compaction off) and checks it holds what `states` say:
    /// `states[k]`, the widgets and checkpoint once write `k` is done.
    async fn check_killed(killed: Vec<Killed>, states: &[(BTreeMap<String, Widget>, u64)]) {
        for Killed { dir, at, write } in killed {
            let path = dir.path().join("store");
            let store = SledStore::open_with(&path, never_compacting()).unwrap();
            let (got, checkpoint) = loaded(&store).await;
            let (after, after_checkpoint) = &states[write];
            if inside_a_write(at) {
                let (before, before_checkpoint) = &states[write - 1];
                if checkpoint == *after_checkpoint {
                    let wrong = differences(&got, after);
                    assert!(
                        wrong.is_empty(),
                        "write {write}, killed at {at:?}: its checkpoint, so all of it: {wrong:?}"
                    );
                } else {
                    assert_eq!(
                        checkpoint, *before_checkpoint,
                        "write {write}, killed at {at:?}"
                    );
                    for serial in before.keys().chain(after.keys()).chain(got.keys()) {
                        let widget = got.get(serial);
                        assert!(
                            widget == before.get(serial) || widget == after.get(serial),
                            "write {write}, killed at {at:?}: {serial} is {widget:?}"
                        );
                    }
                }
            } else {
                assert_eq!(
                    checkpoint, *after_checkpoint,
                    "write {write}, killed at {at:?}"
                );
                let wrong = differences(&got, after);
                assert!(
                    wrong.is_empty(),
                    "write {write}, killed at {at:?}: {wrong:?}"
                );
            }
            drop(store);
            for rebuild in [REBUILDING, REPLACED] {
                assert!(
                    !sibling(&path, rebuild).exists(),
                    "killed at {at:?}: {rebuild} left"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_kill_at_any_point_of_a_split_while_written_leaves_the_write_or_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_of(&dir.path().join("store"), 1, crowding_only());
        loaded(&store).await;
        let under_way = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let killed = Arc::new(Mutex::new(Vec::new()));
        crash::set(
            &store,
            Some(killing(dir.path(), under_way.clone(), killed.clone())),
        )
        .await;
        let mut model = BTreeMap::new();
        let mut states = vec![(model.clone(), 0)];
        for round in 1..=20 {
            under_way.store(round as usize, std::sync::atomic::Ordering::SeqCst);
            write_round(&store, &mut model, round).await;
            states.push((model.clone(), round));
        }
        crash::set(&store, None).await;
        assert_eq!(store.upkeep().compacted, 2, "split twice");
        let killed = reaching(
            &killed,
            &[
                "write: a chunk applied",
                "write: a chunk flushed",
                "write: synced",
                "follow: the last batch applied",
                "step: a batch applied",
                "step: flushed",
                "finish: applied",
                "finish: flushed",
                "compaction: the new store synced",
                "swap: the old store moved out",
                "swap: the new store moved in",
                "swap: the old store removed",
            ],
        );
        check_killed(killed, &states).await;
    }

    #[tokio::test]
    async fn a_kill_at_any_point_of_a_first_write_leaves_none_of_it_or_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        loaded(&store).await;
        let killed = Arc::new(Mutex::new(Vec::new()));
        let under_way = Arc::new(std::sync::atomic::AtomicUsize::new(1));
        crash::set(&store, Some(killing(dir.path(), under_way, killed.clone()))).await;
        let batch = many(2 * CHUNK + 500);
        let written = batch
            .items
            .iter()
            .map(|i| (i.serial.as_str().to_owned(), i.widget.clone().unwrap()));
        let states = [(BTreeMap::new(), 0), (written.collect(), 9)];
        store.write_batch(batch).await.unwrap();
        crash::set(&store, None).await;
        let killed = reaching(&killed, &["first write: the layout flushed"]);
        let chunks = killed
            .iter()
            .filter(|k| k.at == "write: a chunk flushed")
            .count();
        assert_eq!(chunks, 3, "three chunks");
        check_killed(killed, &states).await;
    }

    /// Every point of a move into buckets, its swap's included.
    const MOVE_POINTS: [&str; 6] = [
        "move: a pass flushed",
        "move: the layout flushed",
        "move: the new store synced",
        "swap: the old store moved out",
        "swap: the new store moved in",
        "swap: the old store removed",
    ];

    #[tokio::test]
    async fn a_kill_at_any_point_of_a_move_into_buckets_leaves_the_old_store_or_the_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(legacy_store(&path, 2_500));
        let killed = Arc::new(Mutex::new(Vec::new()));
        let under_way = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        crash::on_open(&path, killing(dir.path(), under_way, killed.clone()));
        let store = SledStore::open(&path, 1 << 20).unwrap();
        crash::set(&store, None).await;
        drop(store);
        let killed = reaching(&killed, &MOVE_POINTS);
        // Wherever the move stopped, the store opens with every widget and the checkpoint
        // it held before (as "write 0").
        let moved = (many(2_500).items.into_iter())
            .map(|item| (item.serial.as_str().to_owned(), item.widget.unwrap()));
        check_killed(killed, &[(moved.collect(), 7)]).await;
    }

    #[tokio::test]
    async fn an_io_error_at_any_point_of_a_move_into_buckets_fails_the_open_and_the_next_one_moves()
    {
        for fail_at in MOVE_POINTS {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            drop(legacy_store(&path, 2_500));
            crash::on_open(
                &path,
                Box::new(move |at| {
                    (at == fail_at).then(|| Err(std::io::Error::other("injected").into()))
                }),
            );
            let failed = SledStore::open(&path, 1 << 20).err();
            assert!(
                failed
                    .as_ref()
                    .is_some_and(|e| e.to_string().contains("injected")),
                "at {fail_at:?}: {failed:?}"
            );
            let store = SledStore::open(&path, 1 << 20).unwrap();
            let (widgets, checkpoint) = loaded(&store).await;
            assert_eq!((widgets.len(), checkpoint), (2_500, 7), "at {fail_at:?}");
            assert_eq!(legacy(&store.db().unwrap()), 0, "at {fail_at:?}");
            drop(store);
            assert_rebuilt(&path);
        }
    }

    /// One I/O error at each point in turn, of the split of the kill test above: the failed
    /// batch's widgets stay dirty and go out with the next write (its own newer ones win), as the
    /// flusher does, and the store ends with every write, loaded as it stands and opened
    /// again.
    #[tokio::test]
    async fn an_io_error_at_any_point_of_a_split_while_written_loses_no_write() {
        for fail_at in 1.. {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let store = store_of(&path, 1, crowding_only());
            loaded(&store).await;
            let mut reached = 0;
            let failed_at = Arc::new(Mutex::new(None));
            let noted = failed_at.clone();
            crash::set(
                &store,
                Some(Box::new(move |at| {
                    reached += 1;
                    (reached == fail_at).then(|| {
                        *noted.lock().unwrap() = Some(at);
                        Err(sled::Error::Io(std::io::Error::other(format!(
                            "failed at {at}"
                        ))))
                    })
                })),
            )
            .await;
            let mut model = BTreeMap::new();
            let mut dirty: BTreeMap<String, FlushItem> = BTreeMap::new();
            for round in 1..=20 {
                let batch = round_batch(&mut model, round);
                dirty.extend(
                    batch
                        .items
                        .into_iter()
                        .map(|i| (i.serial.as_str().to_owned(), i)),
                );
                let batch = FlushBatch {
                    items: dirty.values().cloned().collect(),
                    ..batch
                };
                // A compaction's failure abandons it and fails no write.
                if store.write_batch(batch).await.is_ok() {
                    dirty.clear();
                }
            }
            if !dirty.is_empty() {
                let batch = FlushBatch {
                    items: dirty.into_values().collect(),
                    checkpoint: Some(20),
                    widgets: None,
                    redis: None,
                };
                store.write_batch(batch).await.unwrap();
            }
            crash::set(&store, None).await;
            let Some(at) = *failed_at.lock().unwrap() else {
                assert!(fail_at > 100, "only {} points reached", fail_at - 1);
                return;
            };
            let (got, checkpoint) = loaded(&store).await;
            let wrong = differences(&got, &model);
            assert!(
                checkpoint == 20 && wrong.is_empty(),
                "error at point {fail_at}, {at:?}: {checkpoint}, {wrong:?}"
            );
            drop(store);
            let store = SledStore::open_with(&path, never_compacting()).unwrap();
            let (got, checkpoint) = loaded(&store).await;
            let wrong = differences(&got, &model);
            assert!(
                checkpoint == 20 && wrong.is_empty(),
                "error at point {fail_at}, {at:?}, opened again: {checkpoint}, {wrong:?}"
            );
        }
    }

    /// The inode of the store's file: a rebuilt store has a new one.
    fn file_of(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path.join("db")).unwrap().ino()
    }

    /// Writes `batch` into the store at `path`; returns the inode of the store's file as
    /// the write's first chunk went in.
    async fn written_into(store: &SledStore, path: &Path, batch: FlushBatch) -> u64 {
        let seen = Arc::new(Mutex::new(None));
        let (noted, path) = (seen.clone(), path.to_owned());
        let hook = move |at| {
            if at == "write: a chunk applied" {
                noted.lock().unwrap().get_or_insert(file_of(&path));
            }
            None
        };
        crash::set(store, Some(Box::new(hook))).await;
        store.write_batch(batch).await.unwrap();
        crash::set(store, None).await;
        let inode = seen.lock().unwrap().expect("no chunk written");
        inode
    }

    /// Fails the next step of `store` named `at` with an I/O error of `kind`; returns
    /// what `act` gave.
    async fn failing_once<T>(
        store: &SledStore,
        at: &'static str,
        kind: std::io::ErrorKind,
        act: impl std::future::Future<Output = T>,
    ) -> T {
        let mut fail = true;
        let hook = move |point| {
            (point == at && std::mem::take(&mut fail)).then(|| Err(sled::Error::Io(kind.into())))
        };
        crash::set(store, Some(Box::new(hook))).await;
        let done = act.await;
        crash::set(store, None).await;
        done
    }

    /// Round `round` (see [`round_batch`]) over the widgets of `failed`, which the store
    /// did not take: the flusher's retry writes both.
    fn after(failed: &FlushBatch, model: &mut BTreeMap<String, Widget>, round: u64) -> FlushBatch {
        let batch = round_batch(model, round);
        let mut items: BTreeMap<String, FlushItem> = (failed.items.iter().cloned())
            .map(|i| (i.serial.as_str().to_owned(), i))
            .collect();
        items.extend(
            (batch.items)
                .into_iter()
                .map(|i| (i.serial.as_str().to_owned(), i)),
        );
        FlushBatch {
            items: items.into_values().collect(),
            ..batch
        }
    }

    /// A store with round 1 written and round 2 failed at `at` with `kind`; returns the
    /// store and the failed batch.
    async fn failed_at(
        path: &Path,
        model: &mut BTreeMap<String, Widget>,
        at: &'static str,
        kind: std::io::ErrorKind,
    ) -> (SledStore, FlushBatch) {
        let store = SledStore::open_with(path, never_compacting()).unwrap();
        loaded(&store).await;
        store.set_identity("history").await.unwrap();
        store.write_batch(round_batch(model, 1)).await.unwrap();
        let failed = round_batch(model, 2);
        failing_once(&store, at, kind, store.write_batch(failed.clone()))
            .await
            .unwrap_err();
        (store, failed)
    }

    const OTHER: std::io::ErrorKind = std::io::ErrorKind::Other;

    /// Checks that `store` loads `model`'s widgets and `checkpoint`.
    async fn assert_holds(store: &SledStore, model: &BTreeMap<String, Widget>, checkpoint: u64) {
        let (got, stored) = loaded(store).await;
        assert_eq!((stored, differences(&got, model)), (checkpoint, vec![]));
    }

    #[tokio::test]
    async fn a_write_that_failed_an_io_rebuilds_the_store_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, failed) = failed_at(&path, &mut model, "write: a chunk flushed", OTHER).await;
        let mark = sibling(&path, REBUILD_MARK);
        assert!(mark.exists(), "no mark after the failed write");
        let before = file_of(&path);
        let retry = after(&failed, &mut model, 3);
        let into = written_into(&store, &path, retry).await;
        assert_ne!(into, before, "written on over the failed file");
        assert!(!mark.exists(), "the mark is left after the rebuild");
        assert_rebuilt(&path);
        assert_holds(&store, &model, 3).await;
        assert_eq!(store.identity().await.unwrap().as_deref(), Some("history"));
        // Rebuilt once: the next write goes into the same new file.
        let rebuilt = file_of(&path);
        let next = round_batch(&mut model, 4);
        assert_eq!(written_into(&store, &path, next).await, rebuilt);
    }

    #[tokio::test]
    async fn a_rebuild_due_when_the_store_closed_is_done_as_it_opens_before_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, _) = failed_at(&path, &mut model, "write: a chunk flushed", OTHER).await;
        drop(store);
        let before = file_of(&path);
        let store = SledStore::open_with(&path, never_compacting()).unwrap();
        // The start trims the WAL behind what it loads: that must be the new file's.
        assert_ne!(file_of(&path), before, "opened on the failed file");
        assert!(!sibling(&path, REBUILD_MARK).exists());
        assert_holds(&store, &model, 2).await;
    }

    #[tokio::test]
    async fn a_rebuild_that_fails_is_tried_again_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let (store, failed) = failed_at(&path, &mut model, "write: a chunk flushed", OTHER).await;
        let before = file_of(&path);
        let retry = after(&failed, &mut model, 3);
        let synced = "compaction: the new store synced";
        failing_once(&store, synced, OTHER, store.write_batch(retry.clone()))
            .await
            .unwrap_err();
        assert_eq!(file_of(&path), before);
        assert!(sibling(&path, REBUILD_MARK).exists(), "the mark went");
        assert_rebuilt(&path);
        assert_ne!(written_into(&store, &path, retry).await, before);
        assert_holds(&store, &model, 3).await;
    }

    #[tokio::test]
    async fn a_first_write_that_failed_an_io_is_rebuilt_with_the_layout_it_chose() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = SledStore::open_with(&path, never_compacting()).unwrap();
        loaded(&store).await;
        let mut model = BTreeMap::new();
        let first = round_batch(&mut model, 1);
        let at = "first write: the layout flushed";
        failing_once(&store, at, OTHER, store.write_batch(first.clone()))
            .await
            .unwrap_err();
        let before = file_of(&path);
        assert_ne!(written_into(&store, &path, first.clone()).await, before);
        assert_holds(&store, &model, 1).await;
        assert_eq!(store.layout(), Some(new_layout(&first)));
    }

    #[tokio::test]
    async fn an_identity_that_failed_an_io_is_followed_by_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = SledStore::open_with(&path, never_compacting()).unwrap();
        loaded(&store).await;
        let mut model = BTreeMap::new();
        store.write_batch(round_batch(&mut model, 1)).await.unwrap();
        failing_once(
            &store,
            "identity: flushed",
            OTHER,
            store.set_identity("history"),
        )
        .await
        .unwrap_err();
        assert!(sibling(&path, REBUILD_MARK).exists(), "no mark");
        let before = file_of(&path);
        let next = round_batch(&mut model, 2);
        assert_ne!(written_into(&store, &path, next).await, before);
        assert_eq!(store.identity().await.unwrap().as_deref(), Some("history"));
        assert_holds(&store, &model, 2).await;
    }

    #[tokio::test]
    async fn a_write_refused_for_a_full_disk_is_written_on_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut model = BTreeMap::new();
        let full = std::io::ErrorKind::StorageFull;
        let (store, failed) = failed_at(&path, &mut model, "write: a chunk flushed", full).await;
        assert!(!sibling(&path, REBUILD_MARK).exists());
        let before = file_of(&path);
        let retry = after(&failed, &mut model, 3);
        assert_eq!(written_into(&store, &path, retry).await, before);
        assert_holds(&store, &model, 3).await;
    }
}
