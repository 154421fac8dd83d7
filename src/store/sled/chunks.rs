//! A write to the embedded store, in chunks of about [`CHUNK`] widgets (see the notes of
//! [`sled`](super) for why), each bucket written whole.

use super::bucket::{self, Layout, Put};
use super::{StoreError, CHECKPOINT_KEY, WIDGETS_KEY};
use crate::store::FlushBatch;

/// About the most widgets one `apply_batch` carries (see the module notes): seeding 2 M
/// widgets, 1,000 kept the writer at ~185 MiB where 5,000 took ~245 MiB and 10,000 over
/// 4 GB. A chunk ends at a bucket's end, so it may go over by a bucket's widgets less one.
pub(super) const CHUNK: usize = 1_000;

/// Hands `batch` to `apply` as sled batches of about `chunk` widgets, bucket by bucket,
/// each bucket's old value read with `read` and written whole, the checkpoint and widget
/// count with the last batch (an empty batch is one sled batch with them alone); stops at
/// the first error. After each chunk it lets sled's epoch collector free what the chunk
/// replaced.
pub(super) fn write_in_chunks(
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

/// Runs sled's epoch collector (crossbeam's global one, which sled's hidden `pin` pins:
/// through it this is the very collector sled defers to, whatever crossbeam it uses) often
/// enough to free what `replaced` inserts deferred: a collection frees up to 8 bags of
/// 64 objects, and an insert defers a few. Left alone, the collector runs on one pin in
/// 128 of a thread, far slower than a bulk write defers.
pub(super) fn collect_garbage(replaced: usize) {
    for _ in 0..replaced.div_ceil(128) {
        sled::pin().flush();
    }
}
