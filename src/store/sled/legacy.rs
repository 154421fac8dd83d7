//! A store an earlier version wrote, one sled entry a widget keyed by its serial: checked,
//! then moved into buckets as it is opened (see the notes of [`sled`](super)).

use super::bucket::{self, Layout};
use super::chunks::{collect_garbage, CHUNK};
use super::files::remove_dir;
use super::{
    point, StoreError, BUCKET_BITS_KEY, CHECKPOINT_KEY, IDENTITY_KEY, LEGACY_START, WIDGETS_KEY,
};
use std::path::Path;

/// About the most widgets one pass of the move into buckets holds in memory.
pub(super) const PASS_WIDGETS: u64 = 2_000_000;

/// Decodes and checks every entry written before buckets; returns how many there are.
pub(super) fn check_old_entries(db: &sled::Db) -> Result<u64, StoreError> {
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
pub(super) fn move_into_buckets(
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
