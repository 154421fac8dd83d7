//! The embedded store: one sled tree, serial -> bincode-encoded widget, plus the checkpoint
//! LSN under a key no serial can have. A write is a run of `apply_batch`es of at most
//! [`CHUNK`] widgets each (each atomic in sled, and flushed to disk before the next), the
//! checkpoint and the widget count in the last.
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
//! After an I/O error (a full disk, above all) sled refuses every later write until it is
//! opened again, so the store closes it on such an error and the next operation reopens
//! it: sled recovers from its own log as after a crash, and the flusher's retry finds a
//! working store once there is space again, with no restart.

use super::background::{Background, BackgroundError};
use super::{FlushBatch, Store, StoreError, Visitor};
use crate::domain::{Serial, Widget};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Serials never contain a NUL byte, so these keys cannot collide with a widget.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
/// The hot state's widget count at the last flush (for [`Store::len_hint`]).
const WIDGETS_KEY: &[u8] = b"\0widgets";
/// The identity of the history the store belongs to (see [`Store::identity`]).
const IDENTITY_KEY: &[u8] = b"\0identity";

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
    /// The thread that opens the database and writes to it, at the writer's nice value.
    writer: Background,
}

impl SledStore {
    /// Opens (or creates) the store in `path`; `cache_bytes` bounds sled's page cache. It
    /// writes at the usual priority.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_writer_nice(path, cache_bytes, 0)
    }

    /// Opens (or creates) the store in `path`, writing on a thread of its own at nice
    /// value `writer_nice` (0 to 19: see [`Background`]). Blocks while sled opens.
    pub fn open_with_writer_nice(
        path: &Path,
        cache_bytes: u64,
        writer_nice: i32,
    ) -> Result<Self, StoreError> {
        let inner = Inner {
            path: path.to_owned(),
            cache_bytes,
            db: Mutex::new(None),
            writer: Background::start("widgets-store", writer_nice)
                .map_err(|e| StoreError::Task(format!("starting the store's thread: {e}")))?,
        };
        let store = Self {
            inner: Arc::new(inner),
        };
        // Opened on the writer's thread, so that the threads sled starts share its priority.
        let opening = store.clone();
        store
            .inner
            .writer
            .run_blocking(move || opening.db().map(drop))
            .map_err(task_error)??;
        Ok(store)
    }

    /// The open database, opened again if an I/O error closed it.
    fn db(&self) -> Result<sled::Db, StoreError> {
        let mut db = self.inner.db.lock().expect("sled handle lock");
        if let Some(db) = db.as_ref() {
            return Ok(db.clone());
        }
        let opened = sled::Config::new()
            .path(&self.inner.path)
            .cache_capacity(self.inner.cache_bytes)
            // Every write ends with its own `flush`; sled's timer would only add a thread
            // flushing at the usual priority.
            .flush_every_ms(None)
            .open()?;
        *db = Some(opened.clone());
        Ok(opened)
    }

    /// Passes `result` on; an I/O error first closes the database (its handle `used` and
    /// the kept one), so that the next operation opens it again.
    fn closing_on_io_error<T>(
        &self,
        used: sled::Db,
        result: Result<T, sled::Error>,
    ) -> Result<T, StoreError> {
        if let Err(sled::Error::Io(e)) = &result {
            tracing::warn!(error = %e, path = %self.inner.path.display(),
                "the embedded store failed an I/O; it is opened again for the next flush");
            drop(used);
            self.inner.db.lock().expect("sled handle lock").take();
            metrics::counter!("widgets_store_reopens_total").increment(1);
        }
        Ok(result?)
    }

    fn load_blocking(&self, mut visit: Visitor) -> Result<u64, StoreError> {
        let mut checkpoint = 0;
        let mut loaded = 0u64;
        for entry in self.db()?.iter() {
            let (key, value) = entry?;
            if &*key == CHECKPOINT_KEY {
                checkpoint = decode_u64("checkpoint", &value)?;
                continue;
            }
            if &*key == WIDGETS_KEY || &*key == IDENTITY_KEY {
                continue;
            }
            let corrupt = |reason: String| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason,
            };
            let serial = std::str::from_utf8(&key)
                .map_err(|e| corrupt(e.to_string()))
                .and_then(|s| Serial::parse("key", s).map_err(|e| corrupt(e.to_string())))?;
            let (widget, _): (Widget, usize) =
                bincode::serde::decode_from_slice(&value, bincode::config::standard())
                    .map_err(|e| corrupt(e.to_string()))?;
            widget.check(&serial).map_err(|e| corrupt(e.to_string()))?;
            visit(serial, widget);
            loaded += 1;
            if loaded.is_multiple_of(1_000_000) {
                tracing::info!(loaded, "loading widgets from the embedded store");
            }
        }
        Ok(checkpoint)
    }

    fn write_blocking(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let db = self.db()?;
        // Each chunk is made durable before the next: sled otherwise leaves a whole flush's
        // log to the kernel's page cache until its one `flush`, and the disk then writes
        // it in one burst that every WAL fsync queues behind (fsyncs of 100-500 ms, a few
        // times a minute at 10,000 PUTs/s over 1 M widgets; see BENCHMARKS.md).
        let written = write_in_chunks(&batch, CHUNK, |chunk| {
            db.apply_batch(chunk)?;
            db.flush().map(drop)
        });
        self.closing_on_io_error(db, written)?;
        Ok(())
    }
}

/// Most widgets one `apply_batch` carries (see the module notes): seeding 2 M widgets,
/// 1,000 kept the writer at ~185 MiB where 5,000 took ~245 MiB and 10,000 over 4 GB.
const CHUNK: usize = 1_000;

/// Hands `batch` to `apply` as sled batches of at most `chunk` widgets, in order, the
/// checkpoint and widget count with the last one (an empty batch is one sled batch with
/// them alone); stops at the first error. After each chunk it lets sled's epoch collector
/// free what the chunk replaced.
fn write_in_chunks(
    batch: &FlushBatch,
    chunk: usize,
    mut apply: impl FnMut(sled::Batch) -> sled::Result<()>,
) -> sled::Result<()> {
    let mut chunks = batch.items.chunks(chunk.max(1)).peekable();
    loop {
        let items = chunks.next().unwrap_or_default();
        let last = chunks.peek().is_none();
        let mut b = sled::Batch::default();
        // A key-value store keeps whole widgets, so every changed widget is written whole.
        for item in items {
            let key = item.serial.as_str().as_bytes();
            match &item.widget {
                Some(w) => {
                    let value = bincode::serde::encode_to_vec(w, bincode::config::standard())
                        .expect("encoding a widget into memory");
                    b.insert(key, value);
                }
                None => b.remove(key),
            }
        }
        if last {
            if let Some(checkpoint) = batch.checkpoint {
                b.insert(CHECKPOINT_KEY, &checkpoint.to_be_bytes());
            }
            if let Some(widgets) = batch.widgets {
                b.insert(WIDGETS_KEY, &widgets.to_be_bytes());
            }
        }
        apply(b)?;
        collect_garbage(items.len());
        if last {
            return Ok(());
        }
    }
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
        // On the writer's thread, like every write: so is opening the database again
        // after an I/O error closed it.
        self.inner
            .writer
            .run(move || {
                let db = this.db()?;
                db.insert(IDENTITY_KEY, identity.as_bytes())?;
                db.flush()?;
                Ok(())
            })
            .await
            .map_err(task_error)?
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
    use crate::domain::Mark;
    use crate::domain::{Name, PortType, Ports};
    use crate::store::FlushItem;

    fn item(serial: &str) -> FlushItem {
        let widget = Widget::new(
            Name::parse("name", "n").unwrap(),
            Ports::from_list("ports", &[PortType::P]).unwrap(),
        );
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
            epoch: None,
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

    /// Widgets stored and the checkpoint, straight from the tree.
    fn contents(db: &sled::Db) -> (usize, Option<u64>) {
        let checkpoint = db
            .get(CHECKPOINT_KEY)
            .unwrap()
            .map(|v| decode_u64("checkpoint", &v).unwrap());
        let widgets = db
            .iter()
            .keys()
            .filter(|k| !k.as_ref().unwrap().starts_with(b"\0"))
            .count();
        (widgets, checkpoint)
    }

    fn many(n: usize) -> FlushBatch {
        FlushBatch {
            items: (0..n).map(|i| item(&format!("w{i:05}"))).collect(),
            checkpoint: Some(9),
            widgets: Some(n as u64),
            epoch: None,
        }
    }

    #[test]
    fn a_large_write_goes_in_bounded_chunks_with_the_checkpoint_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let db = store.db().unwrap();
        let mut seen = Vec::new();
        write_in_chunks(&many(2_500), 1_000, |chunk| {
            db.apply_batch(chunk)?;
            seen.push(contents(&db));
            Ok(())
        })
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
        let err = write_in_chunks(&many(2_500), 1_000, |chunk| {
            if applied == 1 {
                return Err(sled::Error::Unsupported("the test's failure".into()));
            }
            applied += 1;
            db.apply_batch(chunk)
        })
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
        write_in_chunks(&many(0), 1_000, |chunk| {
            calls += 1;
            db.apply_batch(chunk)
        })
        .unwrap();
        assert_eq!((calls, contents(&db)), (1, (0, Some(9))));
    }

    #[tokio::test]
    async fn a_stored_widget_with_impossible_values_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let mut widget = item("a").widget.unwrap();
        widget.peers[PortType::Q.index()] = Some(Serial::parse("s", "b").unwrap());
        let value = bincode::serde::encode_to_vec(&widget, bincode::config::standard()).unwrap();
        store.db().unwrap().insert("a", value).unwrap();
        let err = store.load(Box::new(|_, _| {})).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, reason } if key == "a" && reason.contains("port Q")),
            "{err}"
        );
    }
}
