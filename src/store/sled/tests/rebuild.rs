//! A write that failed an I/O, and the rebuild that follows it.

use super::*;

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
