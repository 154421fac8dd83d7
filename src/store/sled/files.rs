//! The embedded store's files: the directories a rebuild goes through and the renames
//! that swap a rebuilt store in (finished by the next open if a crash cuts them short),
//! the `fsync`s sled 0.34 leaves out (its file, its blobs, the directories), the
//! snapshots it leaves unfinished, and the wait for its file lock as a store opens again.

use super::{point, StoreError};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The store's directory while it is built anew (with the store's own name before it),
/// by the move into buckets or a compaction, and the old store's, between the two renames
/// that swap them. (The names are the move's, which came first: a store a crash left
/// half-moved by an earlier version is finished under them.)
pub(super) const REBUILDING: &str = ".buckets";
pub(super) const REPLACED: &str = ".before-buckets";

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
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or(path.as_os_str()).to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// Puts the store [`move_into_buckets`](super::legacy::move_into_buckets) or a compaction built in the place of the one at
/// `path` (closed), by two renames, and removes the old one.
pub(super) fn swap_in_moved(path: &Path) -> Result<(), StoreError> {
    let (moving, moved_out) = (sibling(path, REBUILDING), sibling(path, REPLACED));
    rename(path, &moved_out)?;
    point("swap: the old store moved out")?;
    rename(&moving, path)?;
    point("swap: the new store moved in")?;
    remove_dir(&moved_out)?;
    point("swap: the old store removed")?;
    Ok(())
}

/// Finishes what a crash left of a rebuild (a move into buckets or a compaction), before
/// the store at `path` opens: with the old store moved out and the new one not yet in, the
/// new one (whole: it is moved in only once built) goes in; a new one still beside the
/// store was cut short while it was built, and goes (the next open builds it again); an
/// old one moved out goes.
pub(super) fn finish_move(path: &Path) -> Result<(), StoreError> {
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
pub(super) fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StoreError> {
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

pub(super) fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(StoreError::io(format!(
        "renaming {} to {}",
        from.display(),
        to.display()
    )))?;
    sync_parent(to)
}

pub(super) fn remove_dir(path: &Path) -> Result<(), StoreError> {
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
pub(super) fn sync_files(dir: &Path, names: &[&str]) -> Result<(), StoreError> {
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
pub(super) fn sync_blobs(dir: &Path, from: &mut u64) -> Result<(), StoreError> {
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
pub(super) fn lock_busy(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// What `open` opens, waiting up to 5 s for the file lock of a database this process has
/// just closed: sled's I/O threads may hold it a moment after the last handle is gone.
pub(super) fn once_unlocked<T>(
    mut open: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
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
pub(super) fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(StoreError::io(format!("syncing {}", parent.display())))
}
