//! Compaction: the store rebuilt in a new directory beside it, while it is written, once
//! its file has grown to several times the data it holds.
//!
//! Why: sled 0.34 reuses a segment of its log only once nothing in it is live. Its
//! cleaner, which moves the last live pages out of mostly dead segments, runs only on the
//! flusher thread this store keeps off, and turning that thread on did not slow the growth.
//! Under writes that reach some buckets again and again and others never, every segment
//! that holds one untouched page stays: a new 10 M-widget store of 1.1 GB reached 3.55 GB
//! after 18 minutes of a closed-loop load, still growing (BENCHMARKS.md, "sled's file
//! under a long load"). The same buckets copied in key order take 1.1 GB again.
//!
//! A compaction is also how a store gets more buckets: one whose buckets have grown
//! crowded (see [`bucket::Layout::grown`]) is due after the write that crowded it, and
//! copied into twice the buckets, each old bucket split into the two that cover its
//! hashes, so that the copy still goes in key order and a bucket changed behind it is
//! copied again alone.
//!
//! How: each write, once stored, is followed by a step on the writer's thread (so no
//! other write runs meanwhile). The first step opens a new store beside the old one; every
//! step copies the next buckets, in key order, 1/[`Settings::steps`] of the store's bytes;
//! and every write copies the buckets it changed below that point again. Once every bucket
//! is across, the store's own keys follow (the checkpoint among them), the new store is
//! flushed and closed, and it takes the old one's place by two renames (see
//! `finish_move` in the parent module for a crash between them). A crash before the
//! renames leaves the old store whole, and the next open removes the half-built one. A
//! failure in the new store (a full disk, above all) abandons the compaction and removes
//! what it built; the write it followed stands, and the next try waits [`RETRY_AFTER`].
//! So does a new store that, opened again once it is whole, does not hold what the old
//! one holds (see [`check`]): the old one is removed only after the new one has been
//! read back.

use super::bucket::{self, Layout};
use super::chunks::collect_garbage;
use super::files::{once_unlocked, remove_dir};
use super::{read_layout, StoreError, BUCKET_BITS_KEY, LEGACY_START, OWN_KEYS};
use std::path::Path;
use std::time::{Duration, Instant};

/// When the store compacts itself, and how big a step is.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Compact once the file is over this many times the bytes of the buckets it holds;
    /// 0 never compacts. A store just built in key order is ~1.8 times its buckets.
    pub ratio: f64,
    /// Nor below this file size: a small store's file is mostly sled's fixed overhead.
    pub min_file_bytes: u64,
    /// A compaction takes about this many writes: each step copies at least 1/`steps` of
    /// the buckets' bytes (and at least one chunk).
    pub steps: u64,
    /// Buckets copied in one sled batch.
    pub chunk: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_RATIO,
            min_file_bytes: 256 << 20,
            steps: 16,
            chunk: 1_000,
        }
    }
}

/// The default of `--sled-compact-ratio`.
pub const DEFAULT_RATIO: f64 = 3.0;

/// The new store's page cache: it is written in key order and read back only where a
/// write follows, so a small cache does, and keeps the memory a compaction adds down (at
/// 10 M widgets the peak was 1,381 MiB with 1 MiB, 1,444 MiB with the old store's 32 MiB).
const NEW_CACHE_BYTES: u64 = 1 << 20;

/// How long after an abandoned compaction the next may start.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

impl Settings {
    /// Whether a file of `file_bytes` holding `live_bytes` of buckets is due a compaction;
    /// one whose buckets are `crowded` is, whatever its size (unless it never compacts).
    pub fn due(&self, file_bytes: u64, live_bytes: u64, crowded: bool) -> bool {
        self.ratio > 0.0
            && (crowded
                || file_bytes >= self.min_file_bytes
                    && file_bytes as f64 > self.ratio * live_bytes as f64)
    }
}

/// A compaction under way: the new store, and how far the copy has come.
pub struct Compaction {
    new: sled::Db,
    /// The old store's layout, and the new one's: the same, or more buckets.
    from: Layout,
    to: Layout,
    /// Every bucket below this key is across (and kept so by each write).
    next: Vec<u8>,
    started: Instant,
    /// The old file's size when the compaction started, for the log.
    file_bytes: u64,
}

impl Compaction {
    /// Opens a new, empty store in `path` (a half-built one left there is removed first),
    /// to copy a store laid out by `from` into one laid out by `to`, with as many buckets
    /// or more.
    pub fn start(
        path: &Path,
        file_bytes: u64,
        from: Layout,
        to: Layout,
    ) -> Result<Self, StoreError> {
        debug_assert!(
            to.bits() >= from.bits(),
            "a compaction never merges buckets"
        );
        if path.exists() {
            remove_dir(path)?;
        }
        let new = sled::Config::new()
            .path(path)
            .cache_capacity(NEW_CACHE_BYTES)
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            new,
            from,
            to,
            next: vec![bucket::PREFIX],
            started: Instant::now(),
            file_bytes,
        })
    }

    /// The layout the store is copied from, which names the buckets a write changed.
    pub fn from(&self) -> Layout {
        self.from
    }

    /// The layout the store is copied into.
    pub fn to(&self) -> Layout {
        self.to
    }

    /// Puts the old bucket `key`, holding `value` (`None`: no longer there), into `batch`
    /// in the new layout: as it is, or split into the new buckets that cover its hashes,
    /// each of them written or, left empty, removed. Returns how many keys it puts.
    fn put(
        &self,
        batch: &mut sled::Batch,
        key: &[u8],
        value: Option<sled::IVec>,
    ) -> Result<usize, StoreError> {
        if self.from == self.to {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
            return Ok(1);
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            key: bucket::describe(key),
            reason,
        };
        let number = bucket::number_of(key).ok_or_else(|| corrupt("not a bucket key".into()))?;
        let mut split = match &value {
            Some(value) => bucket::split(value, self.to).map_err(corrupt)?,
            None => Default::default(),
        };
        let shift = self.to.bits() - self.from.bits();
        let first = u64::from(number) << shift;
        for n in first..first + (1 << shift) {
            let n = u32::try_from(n).expect("a bucket of a layout of at most 32 bits");
            match split.remove(&n) {
                Some(value) => batch.insert(&bucket::key_of(n)[..], value),
                None => batch.remove(&bucket::key_of(n)[..]),
            }
        }
        if let Some(n) = split.keys().next() {
            return Err(corrupt(format!(
                "a widget in it belongs in bucket {}",
                n >> shift
            )));
        }
        Ok(1 << shift)
    }

    /// Copies again, from `old`, every bucket among `changed` that is already across: a
    /// write to `old` has just changed (or removed) them.
    pub fn follow<'k>(
        &self,
        old: &sled::Db,
        changed: impl IntoIterator<Item = &'k [u8]>,
        chunk: usize,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for key in changed {
            if key >= &self.next[..] {
                continue;
            }
            in_batch += self.put(&mut batch, key, old.get(key)?)?;
            if in_batch >= chunk {
                self.new.apply_batch(std::mem::take(&mut batch))?;
                super::point("follow: a batch applied")?;
                collect_garbage(in_batch);
                in_batch = 0;
            }
        }
        self.new.apply_batch(batch)?;
        super::point("follow: the last batch applied")?;
        collect_garbage(in_batch);
        Ok(())
    }

    /// Copies buckets from where the copy stands, `settings.chunk` to a batch, until
    /// their keys and values come to `quota` bytes; true once every bucket is across.
    pub fn step(
        &mut self,
        old: &sled::Db,
        settings: &Settings,
        quota: u64,
    ) -> Result<bool, StoreError> {
        let mut copied = 0;
        let mut buckets = old.range(self.next.clone()..LEGACY_START.to_vec());
        loop {
            let mut batch = sled::Batch::default();
            let mut last = None;
            let mut in_batch = 0;
            let mut read = 0;
            for entry in buckets.by_ref().take(settings.chunk.max(1)) {
                let (key, value) = entry?;
                copied += (key.len() + value.len()) as u64;
                in_batch += self.put(&mut batch, &key, Some(value))?;
                last = Some(key);
                read += 1;
            }
            self.new.apply_batch(batch)?;
            super::point("step: a batch applied")?;
            collect_garbage(in_batch);
            let Some(last) = last else {
                return Ok(true);
            };
            // The next key after `last`: `last` followed by a zero byte.
            self.next = last.to_vec();
            self.next.push(0);
            if read < settings.chunk.max(1) {
                return Ok(true);
            }
            if copied >= quota {
                self.new.flush()?;
                super::point("step: flushed")?;
                return Ok(false);
            }
        }
    }

    /// Copies the store's own keys (the checkpoint, the widget count and the identity)
    /// from `old` and records the new layout, flushes the new store and closes it: it is
    /// whole now.
    pub fn finish(self, old: &sled::Db) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in OWN_KEYS.into_iter().filter(|&key| key != BUCKET_BITS_KEY) {
            match old.get(key)? {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch.insert(BUCKET_BITS_KEY, &self.to.recorded());
        self.new.apply_batch(batch)?;
        super::point("finish: applied")?;
        self.new.flush()?;
        super::point("finish: flushed")?;
        tracing::info!(
            file_bytes_before = self.file_bytes,
            file_bytes_after = self.new.size_on_disk().ok(),
            bucket_bits_before = self.from.bits(),
            bucket_bits_after = self.to.bits(),
            secs = self.started.elapsed().as_secs(),
            "compacted the embedded store"
        );
        Ok(())
    }
}

/// Opens the store a compaction (or the move into buckets) has built in `path` (whole,
/// closed and synced) as the store's next open will, and checks it against `old`, before
/// it takes the old one's place and the old one is removed: the store's own keys the
/// same, its layout `to`, and the `held` widgets `old` holds (`None`: counted in `old`'s
/// buckets), every bucket read. Returns the bytes of its buckets.
///
/// Why: once the old store is gone, a new one that sled cannot open or read back would
/// leave the service with no store, and the WAL holds only what came after the last
/// flush. It costs a read of both stores' buckets.
pub fn check(
    old: &sled::Db,
    path: &Path,
    to: Layout,
    held: Option<u64>,
) -> Result<u64, StoreError> {
    let started = Instant::now();
    let held = match held {
        Some(held) => held,
        None => widgets_in(old)?.0,
    };
    let new = once_unlocked(|| {
        let config = sled::Config::new().path(path);
        Ok(config
            .cache_capacity(NEW_CACHE_BYTES)
            .flush_every_ms(None)
            .open()?)
    })?;
    // The store's own keys are a NUL and a name.
    let name = |key: &[u8]| String::from_utf8_lossy(&key[1..]).into_owned();
    let differs = |what: String, reason: String| StoreError::Corrupt {
        key: format!("{what} in the rebuilt store"),
        reason,
    };
    for key in OWN_KEYS.into_iter().filter(|&key| key != BUCKET_BITS_KEY) {
        let (was, is) = (old.get(key)?, new.get(key)?);
        if was != is {
            return Err(differs(
                name(key),
                format!("{is:?}, where the store holds {was:?}"),
            ));
        }
    }
    let layout = read_layout(&new)?;
    if layout != Some(to) {
        return Err(differs(
            name(BUCKET_BITS_KEY),
            format!("{:?}, expected {}", layout.map(Layout::bits), to.bits()),
        ));
    }
    let (widgets, bytes) = widgets_in(&new)?;
    if widgets != held {
        return Err(differs(
            "the buckets".into(),
            format!("{widgets} widgets, where the store holds {held}"),
        ));
    }
    tracing::info!(
        widgets,
        ms = started.elapsed().as_millis() as u64,
        "read the rebuilt embedded store back: it holds what the store holds"
    );
    Ok(bytes)
}

/// The widgets in `db`'s buckets, and the buckets' bytes (keys and values).
fn widgets_in(db: &sled::Db) -> Result<(u64, u64), StoreError> {
    let (mut widgets, mut bytes) = (0, 0);
    for entry in db.range(&[bucket::PREFIX][..]..LEGACY_START) {
        let (key, value) = entry?;
        for entry in bucket::entries(&value) {
            entry.map_err(|reason| StoreError::Corrupt {
                key: bucket::describe(&key),
                reason,
            })?;
            widgets += 1;
        }
        bytes += (key.len() + value.len()) as u64;
    }
    Ok((widgets, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, PortType, Ports, Widget};
    use bucket::Put;

    /// The bucket value holding `serials`, each a widget of one port.
    fn value(serials: &[&str]) -> Vec<u8> {
        let w = Widget::new(
            Name::parse("name", "n").unwrap(),
            Ports::from_list("ports", &[PortType::P]).unwrap(),
        );
        let puts: Vec<_> = serials.iter().map(|s| (*s, Put::Widget(&w))).collect();
        bucket::merge(None, &puts).unwrap().unwrap()
    }

    fn serials_in(db: &sled::Db) -> Vec<(u32, Vec<String>)> {
        (db.range(&[bucket::PREFIX][..]..LEGACY_START))
            .map(|entry| {
                let (key, value) = entry.unwrap();
                let mut serials: Vec<String> = (bucket::entries(&value))
                    .map(|e| e.unwrap().0.to_owned())
                    .collect();
                serials.sort();
                (bucket::number_of(&key).unwrap(), serials)
            })
            .collect()
    }

    #[test]
    fn a_split_bucket_emptied_behind_the_copy_goes_from_the_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let old = sled::Config::new()
            .path(dir.path().join("old"))
            .open()
            .unwrap();
        let (from, to) = (Layout::new(1).unwrap(), Layout::new(2).unwrap());
        let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let serials = |keep: &dyn Fn(&str) -> bool| -> Vec<&str> {
            names
                .iter()
                .map(String::as_str)
                .filter(|s| keep(s))
                .collect()
        };
        for n in 0..2 {
            let value = value(&serials(&|s| from.number(s) == n));
            old.insert(bucket::key_of(n), value).unwrap();
        }
        let mut compaction = Compaction::start(&dir.path().join("new"), 0, from, to).unwrap();
        assert!(compaction
            .step(&old, &Settings::default(), u64::MAX)
            .unwrap());
        assert_eq!(serials_in(&compaction.new).len(), 4, "split in four");

        // Behind the copy: old bucket 0 emptied, and old bucket 1 left with only the
        // widgets of new bucket 3.
        old.remove(bucket::key_of(0)).unwrap();
        let kept = serials(&|s| to.number(s) == 3);
        old.insert(bucket::key_of(1), value(&kept)).unwrap();
        let changed = [bucket::key_of(0), bucket::key_of(1)];
        (compaction.follow(&old, changed.iter().map(|k| &k[..]), 1_000)).unwrap();
        let mut kept: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
        kept.sort();
        assert_eq!(serials_in(&compaction.new), [(3, kept)]);
    }
}
