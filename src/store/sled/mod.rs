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
//!
//! Files: `bucket` (a bucket's encoding and the layout that maps serials to buckets),
//! `chunks` (a write, chunk by chunk), `compact` (the store copied beside itself, step by
//! step), `rebuild` (the rebuild after a failed write, and the compaction's steps after a
//! write), `files` (the renames that swap a rebuilt store in, and the syncs sled leaves
//! out), `legacy` (the move into buckets); `tests`, by the same topics.

mod bucket;
mod chunks;
pub mod compact;
mod files;
mod legacy;
mod rebuild;
#[cfg(test)]
mod tests;

pub use self::files::directories;

use self::bucket::Layout;
use self::chunks::{write_in_chunks, CHUNK};
use self::compact::Compaction;
use self::files::{
    finish_move, once_unlocked, remove_unfinished_snapshots, sibling, swap_in_moved, sync_blobs,
    sync_files, sync_parent, REBUILDING,
};
use self::legacy::{check_old_entries, move_into_buckets, PASS_WIDGETS};
use self::rebuild::{suspect, REBUILD_MARK};
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
}

/// The widgets `batch` says the store holds (its items, if it does not say).
fn widgets_held(batch: &FlushBatch) -> u64 {
    (batch.widgets).unwrap_or(batch.items.len() as u64)
}

/// The layout of a new store that `batch` is the first write to, for [`widgets_held`].
fn new_layout(batch: &FlushBatch) -> Layout {
    Layout::for_widgets(widgets_held(batch))
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
