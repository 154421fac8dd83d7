//! A store an earlier version wrote, moved into buckets as it opens.

use super::*;

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
