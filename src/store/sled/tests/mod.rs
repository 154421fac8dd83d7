//! The embedded store's tests: writes, chunks and damage here, the rest by topic, with
//! the helpers they share and the hook ([`crash`]) that stops or fails a store at a point.

use super::bucket::Put;
use super::files::{rename, REPLACED};
use super::*;
use crate::domain::{Mark, Name, PortType, Ports, Serial, Widget};
use crate::store::FlushItem;
use std::collections::BTreeMap;

mod compaction;
mod crashes;
mod legacy;
mod rebuild;

fn widget(name: &str) -> Widget {
    Widget::new(
        Name::parse("name", name).unwrap(),
        Ports::from_list("ports", &[PortType::P]).unwrap(),
    )
}

#[test]
fn a_failed_rename_says_what_it_was_doing_and_keeps_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("missing");
    match rename(&from, &dir.path().join("to")) {
        Err(StoreError::Io { what, source }) => {
            assert_eq!(
                what,
                format!(
                    "renaming {} to {}",
                    from.display(),
                    dir.path().join("to").display()
                )
            );
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

fn item(serial: &str) -> FlushItem {
    let widget = widget("n");
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
        redis: None,
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

/// sled 0.34 panics if the `fsync` it runs as its last handle closes fails, and the
/// store drops handles while it holds the lock on the kept one: such a panic (caught by
/// the writer's thread) must not leave the store refusing every write until a restart.
#[tokio::test]
async fn a_panic_while_the_handle_was_held_does_not_stop_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let batch = |serial: &str, checkpoint| FlushBatch {
        items: vec![item(serial)],
        checkpoint: Some(checkpoint),
        widgets: Some(2),
        redis: None,
    };
    store.write_batch(batch("a", 1)).await.unwrap();
    // What a failed fsync in sled's drop does there: the handle taken out, then a panic.
    let held = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut kept = store.inner.db.lock().unwrap();
        drop(kept.take());
        panic!("sled's fsync as its last handle closed failed");
    }));
    assert!(held.is_err() && store.inner.db.is_poisoned());

    store.write_batch(batch("b", 2)).await.unwrap();
    let (widgets, checkpoint) = loaded(&store).await;
    assert_eq!(checkpoint, 2);
    assert_eq!(widgets.keys().collect::<Vec<_>>(), ["a", "b"]);
}

/// Widgets stored (in buckets) and the checkpoint, straight from the tree.
fn contents(db: &sled::Db) -> (usize, Option<u64>) {
    let checkpoint = db
        .get(CHECKPOINT_KEY)
        .unwrap()
        .map(|v| decode_u64("checkpoint", &v).unwrap());
    (stored(db).len(), checkpoint)
}

/// Every widget in the buckets, by serial, straight from the tree (each serial once).
fn stored(db: &sled::Db) -> BTreeMap<String, Widget> {
    let layout = read_layout(db).unwrap().expect("a layout");
    let mut widgets = BTreeMap::new();
    for entry in db.range(&[bucket::PREFIX][..]..LEGACY_START) {
        let (key, value) = entry.unwrap();
        for entry in bucket::entries(&value) {
            let (serial, encoded) = entry.unwrap();
            let (serial, widget) = bucket::decode(layout, &key, serial, encoded).unwrap();
            assert!(widgets.insert(serial.as_str().to_owned(), widget).is_none());
        }
    }
    widgets
}

/// `layout`, recorded as the layout of `db` (a new store's, written to directly).
fn recorded(db: &sled::Db, layout: Layout) -> Layout {
    db.insert(BUCKET_BITS_KEY, &layout.recorded()).unwrap();
    layout
}

fn bucket_bits(db: &sled::Db) -> u32 {
    read_layout(db).unwrap().expect("a layout").bits()
}

fn buckets(db: &sled::Db) -> usize {
    db.range(&[bucket::PREFIX][..]..LEGACY_START).count()
}

/// Bytes of the buckets' keys and values, straight from the tree.
fn bucket_bytes(db: &sled::Db) -> u64 {
    (db.range(&[bucket::PREFIX][..]..LEGACY_START))
        .map(|entry| entry.map(|(k, v)| (k.len() + v.len()) as u64).unwrap())
        .sum()
}

fn legacy(db: &sled::Db) -> usize {
    db.range(LEGACY_START..).count()
}

fn many(n: usize) -> FlushBatch {
    FlushBatch {
        items: (0..n).map(|i| item(&format!("w{i:05}"))).collect(),
        checkpoint: Some(9),
        widgets: Some(n as u64),
        redis: None,
    }
}

#[test]
fn a_large_write_goes_in_bounded_chunks_with_the_checkpoint_last() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let db = store.db().unwrap();
    let mut seen = Vec::new();
    write_in_chunks(
        &many(2_500),
        recorded(&db, Layout::for_widgets(2_500)),
        1_000,
        &mut 0,
        |k| db.get(k),
        |chunk| {
            db.apply_batch(chunk)?;
            seen.push(contents(&db));
            Ok(())
        },
    )
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
    let err = write_in_chunks(
        &many(2_500),
        recorded(&db, Layout::for_widgets(2_500)),
        1_000,
        &mut 0,
        |k| db.get(k),
        |chunk| {
            if applied == 1 {
                return Err(sled::Error::Unsupported("the test's failure".into()).into());
            }
            applied += 1;
            Ok(db.apply_batch(chunk)?)
        },
    )
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
    write_in_chunks(
        &many(0),
        recorded(&db, Layout::for_widgets(0)),
        1_000,
        &mut 0,
        |k| db.get(k),
        |chunk| {
            calls += 1;
            Ok(db.apply_batch(chunk)?)
        },
    )
    .unwrap();
    assert_eq!((calls, contents(&db)), (1, (0, Some(9))));
}

#[tokio::test]
async fn a_stored_widget_with_impossible_values_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let mut widget = item("a").widget.unwrap();
    widget.peers[PortType::Q.index()] = Some(Serial::parse("s", "b").unwrap());
    store.write_batch(many(0)).await.unwrap();
    let key = store
        .layout()
        .expect("laid out by its first write")
        .key("a");
    let value = bucket::merge(None, &[("a", Put::Widget(&widget))]).unwrap();
    store.db().unwrap().insert(key, value.unwrap()).unwrap();
    let err = store.load(Box::new(|_, _| {})).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key: k, reason }
            if *k == bucket::describe(&key) && reason.contains("widget a") && reason.contains("port Q")),
        "{err}"
    );
}

/// The database in `path`, with no flusher thread of sled's: dropped, it is closed, and
/// a store can open it at once.
fn raw(path: &Path) -> sled::Db {
    raw_open(path).unwrap()
}

fn raw_open(path: &Path) -> sled::Result<sled::Db> {
    sled::Config::new().path(path).flush_every_ms(None).open()
}

/// A store of two buckets, so that most widgets share one.
fn two_bucket_store(path: &Path) -> SledStore {
    let db = raw(path);
    recorded(&db, Layout::new(1).unwrap());
    db.flush().unwrap();
    drop(db);
    SledStore::open(path, 1 << 20).unwrap()
}

async fn loaded(store: &SledStore) -> (BTreeMap<String, Widget>, u64) {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let sink = seen.clone();
    let checkpoint = store
        .load(Box::new(move |serial, widget| {
            let again = sink
                .lock()
                .unwrap()
                .insert(serial.as_str().to_owned(), widget);
            assert!(again.is_none(), "{serial} loaded twice");
        }))
        .await
        .unwrap();
    let widgets = std::mem::take(&mut *seen.lock().unwrap());
    (widgets, checkpoint)
}

#[tokio::test]
async fn widgets_sharing_a_bucket_are_written_and_removed_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = two_bucket_store(dir.path());
    assert_eq!(
        store.layout().map(Layout::bits),
        Some(1),
        "the store's own layout, not the default"
    );
    store.write_batch(many(50)).await.unwrap();

    let mut changes = many(20);
    for (i, item) in changes.items.iter_mut().enumerate() {
        if i % 2 == 0 {
            item.widget = Some(widget("renamed"));
        } else {
            item.widget = None;
        }
    }
    changes.checkpoint = Some(10);
    store.write_batch(changes).await.unwrap();

    let (widgets, checkpoint) = loaded(&store).await;
    assert_eq!(checkpoint, 10);
    let expected: BTreeMap<_, _> = (0..50)
        .filter(|i| i >= &20 || i % 2 == 0)
        .map(|i| {
            let name = if i < 20 { "renamed" } else { "n" };
            (format!("w{i:05}"), widget(name))
        })
        .collect();
    assert_eq!(widgets, expected);
    assert_eq!(buckets(&store.db().unwrap()), 2);

    let mut gone = many(50);
    gone.items.iter_mut().for_each(|item| item.widget = None);
    store.write_batch(gone).await.unwrap();
    assert!(loaded(&store).await.0.is_empty());
    assert_eq!(
        buckets(&store.db().unwrap()),
        0,
        "an empty bucket is removed"
    );
}

/// sled writes a snapshot as it opens (`snap.<lsn>.generating`, synced, then renamed
/// `snap.<lsn>`), and takes any `snap.*` file for one, that name included. The open of a
/// flush's retry on a full disk left it empty (or a kill, cut short), and every later
/// open then took it for a damaged snapshot and refused the store: no flush once there
/// was space again, and no start.
#[tokio::test]
async fn a_snapshot_sled_left_unfinished_as_it_opened_does_not_stop_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = SledStore::open(&path, 1 << 20).unwrap();
    store.write_batch(many(100)).await.unwrap();
    drop(store);
    let unfinished = path.join("snap.7FFFFFFFFFFFFFFF.generating");
    for (round, left) in [&[][..], &[7u8; 40][..]].into_iter().enumerate() {
        std::fs::write(&unfinished, left).unwrap();
        let store = SledStore::open(&path, 1 << 20).unwrap();
        assert_eq!(loaded(&store).await.0.len(), 100 + round);
        let mut batch = many(0);
        batch.items.push(item(&format!("after{round}")));
        store.write_batch(batch).await.unwrap();
        drop(store);
    }
    let store = SledStore::open(&path, 1 << 20).unwrap();
    assert_eq!(loaded(&store).await.0.len(), 102);
    assert!(!unfinished.exists());
}

#[tokio::test]
async fn a_damaged_bucket_is_named_on_load_and_refused_by_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    store.write_batch(many(1)).await.unwrap();
    let db = store.db().unwrap();
    let key = store.layout().unwrap().key("w00000");
    let value = db.get(key).unwrap().unwrap();
    db.insert(key, &value[..value.len() - 1]).unwrap();

    let err = store.load(Box::new(|_, _| {})).await.unwrap_err();
    let name = bucket::describe(&key);
    assert!(
        matches!(&err, StoreError::Corrupt { key, reason } if *key == name && reason.contains("cut short")),
        "{err}"
    );
    let err = store.write_batch(many(1)).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, .. } if *key == name),
        "{err}"
    );
    assert_eq!(
        db.get(key).unwrap().unwrap().len(),
        value.len() - 1,
        "left as it was"
    );
}

#[test]
fn a_layout_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = raw(dir.path());
    db.insert(BUCKET_BITS_KEY, &33u64.to_be_bytes()).unwrap();
    db.flush().unwrap();
    drop(db);
    let err = SledStore::open(dir.path(), 1 << 20).err().expect("refused");
    assert!(err.to_string().contains("bucket_bits"), "{err}");
}

/// A store as versions before buckets wrote it: one entry a widget, keyed by serial.
fn legacy_store(path: &Path, n: usize) -> sled::Db {
    let db = raw(path);
    for item in many(n).items {
        let value =
            bincode::serde::encode_to_vec(item.widget.unwrap(), bincode::config::standard());
        db.insert(item.serial.as_str(), value.unwrap()).unwrap();
    }
    db.insert(CHECKPOINT_KEY, &7u64.to_be_bytes()).unwrap();
    db.insert(WIDGETS_KEY, &(n as u64).to_be_bytes()).unwrap();
    db.flush().unwrap();
    db
}

/// No directory of a rebuild (a move into buckets or a compaction) is left.
fn assert_rebuilt(path: &Path) {
    for suffix in [REBUILDING, REPLACED] {
        assert!(!sibling(path, suffix).exists(), "{suffix} is left");
    }
}

/// A store of `2^bits` buckets in `path` (if it is new), compacting by `settings`.
fn store_of(path: &Path, bits: u32, settings: compact::Settings) -> SledStore {
    if !path.exists() {
        let db = raw(path);
        recorded(&db, Layout::new(bits).unwrap());
        db.flush().unwrap();
    }
    let mut options = Options::new(1 << 20);
    options.compact = settings;
    SledStore::open_with(path, options).unwrap()
}

/// Writes `round`: renames widgets `r0..r300` (a few of them removed, a few new), as
/// checkpoint `round`, into both `store` and `model`.
async fn write_round(store: &SledStore, model: &mut BTreeMap<String, Widget>, round: u64) {
    store.write_batch(round_batch(model, round)).await.unwrap();
}

/// The batch of [`write_round`], put into `model`.
fn round_batch(model: &mut BTreeMap<String, Widget>, round: u64) -> FlushBatch {
    let items = (0..300).map(|i| {
        let serial = format!("r{:03}", (i + round as usize * 7) % 320);
        let widget = (i % 50 != 0).then(|| widget(&format!("round {round}")));
        match &widget {
            Some(w) => model.insert(serial.clone(), w.clone()),
            None => model.remove(&serial),
        };
        FlushItem {
            widget,
            ..item(&serial)
        }
    });
    let items = items.collect();
    FlushBatch {
        items,
        checkpoint: Some(round),
        widgets: Some(model.len() as u64),
        redis: None,
    }
}

/// Compaction settings under which only crowding makes a store due (its file is never
/// big enough), a step copying one bucket, so that writes go on while it runs.
fn crowding_only() -> compact::Settings {
    compact::Settings {
        ratio: 3.0,
        min_file_bytes: u64::MAX,
        steps: 16,
        chunk: 1,
    }
}

fn never_compacting() -> Options {
    let mut options = Options::new(1 << 20);
    options.compact = compact::Settings {
        ratio: 0.0,
        ..crowding_only()
    };
    options
}

/// The first few serials where `got` differs from `want`, by name.
fn differences(got: &BTreeMap<String, Widget>, want: &BTreeMap<String, Widget>) -> Vec<String> {
    let serials: std::collections::BTreeSet<_> = got.keys().chain(want.keys()).collect();
    let wrong = serials
        .into_iter()
        .filter(|serial| got.get(*serial) != want.get(*serial));
    let name = |widgets: &BTreeMap<String, Widget>, serial: &str| {
        widgets.get(serial).map(|w| w.name.as_str().to_owned())
    };
    wrong
        .take(5)
        .map(|serial| {
            format!(
                "{serial}: {:?}, not {:?}",
                name(got, serial),
                name(want, serial)
            )
        })
        .collect()
}

/// A hook on a store's writer thread, run at each [`point`] the store reaches there.
pub(super) mod crash {
    use super::SledStore;
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// What to do at a point: `None` goes on, `Some` ends the step with that outcome.
    pub type Hook = Box<dyn FnMut(&'static str) -> Option<sled::Result<()>> + Send>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// What the hook on this thread says at `what`.
    pub(in crate::store::sled) fn at(what: &'static str) -> Option<sled::Result<()>> {
        HOOK.with(|hook| hook.borrow_mut().as_mut().and_then(|hook| hook(what)))
    }

    /// Puts `hook` on `store`'s writer thread; `None` takes it off.
    pub async fn set(store: &SledStore, hook: Option<Hook>) {
        let set = move || HOOK.with(|h| *h.borrow_mut() = hook);
        store.inner.writer.run(set).await.unwrap();
    }

    /// Hooks for stores not yet open, by path: the store's writer thread takes its own
    /// as the store opens there (before a move into buckets).
    static ON_OPEN: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

    /// Puts `hook` on the writer thread of the store that opens next at `path`, from
    /// the start of its opening; [`set`] takes it off.
    pub fn on_open(path: &Path, hook: Hook) {
        ON_OPEN.lock().unwrap().push((path.to_owned(), hook));
    }

    /// Called on a store's writer thread as it opens the store at `path`.
    pub(in crate::store::sled) fn opening(path: &Path) {
        let mut waiting = ON_OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = waiting.iter().position(|(p, _)| p == path) {
            let (_, hook) = waiting.swap_remove(i);
            HOOK.with(|h| *h.borrow_mut() = Some(hook));
        }
    }
}
