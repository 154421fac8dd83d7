//! The store rebuilt beside itself while it is written: compactions, and splits into
//! more buckets.

use super::*;

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
