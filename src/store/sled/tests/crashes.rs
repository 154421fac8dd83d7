//! Kills and I/O errors at every point of a write, a split and a move into buckets.

use super::*;

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

/// Points inside a write, before its checkpoint is stored: a kill there may leave each
/// widget as before the write or as after it, and the checkpoint before it; or all of
/// the write, with its checkpoint.
fn inside_a_write(at: &str) -> bool {
    at.starts_with("first write:") || at.starts_with("write: a chunk")
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
async fn an_io_error_at_any_point_of_a_move_into_buckets_fails_the_open_and_the_next_one_moves() {
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
