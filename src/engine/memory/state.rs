//! The state the single-node engine's parts share: the map that only ever holds durable
//! state, the lock that makes a group of changes appear at once, the dirty set, and the
//! WAL's failure and size. The engine, the sequencer thread and WAL replay all work on it;
//! none of them owns another.

use super::dirty::DirtySet;
use super::packed::PackedWidget;
#[cfg(test)]
use crate::domain::Serial;
use crate::domain::Widget;
use papaya::Guard;
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};
use tokio::sync::Notify;

/// Serial to widget, packed: the map holds only durable state. Hashed with foldhash, as
/// the dirty set and the sequencer's tables are, under a seed drawn at start: the default
/// (SipHash) cost a replay of a million creates a tenth of its time.
///
/// Each entry is a [`PackedWidget`] keyed by the serial inside it, so that papaya's entry
/// is one pointer and a widget one allocation besides it (see `packed.rs` for what that
/// saves).
pub(super) struct WidgetMap(papaya::HashMap<Keyed, (), foldhash::fast::RandomState>);

/// A map entry: a packed widget, hashed and compared by its serial alone (as the `str` it
/// is found by), so that an insert takes the place of the widget with that serial.
struct Keyed(PackedWidget);

impl Hash for Keyed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.serial().hash(state)
    }
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        self.0.serial() == other.0.serial()
    }
}

impl Eq for Keyed {}

impl Borrow<str> for Keyed {
    fn borrow(&self) -> &str {
        self.0.serial()
    }
}

/// Replaced entries a thread collects before it tries to free them. Each try costs a
/// process-wide memory barrier (an IPI to every CPU running the process): at papaya's
/// default of 32, a third of a multi-threaded WAL replay went to those barriers. At 1024
/// a thread holds at most ~100 KB of replaced widgets.
const RECLAIM_BATCH: usize = 1024;

impl WidgetMap {
    /// An empty map with room for `capacity` widgets before it grows.
    pub fn new(capacity: usize) -> Self {
        Self(
            papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .capacity(capacity)
                .collector(seize::Collector::new().batch_size(RECLAIM_BATCH))
                .build(),
        )
    }

    /// Keeps what the methods below return alive; one for a batch of calls is cheaper
    /// than one each.
    pub fn guard(&self) -> papaya::LocalGuard<'_> {
        self.0.guard()
    }

    pub fn get<'g>(&self, serial: &str, guard: &'g impl Guard) -> Option<&'g PackedWidget> {
        self.0.get_key_value(serial, guard).map(|(k, ())| &k.0)
    }

    /// The widget, unpacked, under a guard of its own.
    pub fn unpacked(&self, serial: &str) -> Option<Widget> {
        self.get(serial, &self.guard()).map(PackedWidget::unpack)
    }

    /// Puts `widget` in the place of the one with its serial, if any. papaya's entries
    /// never change: an insert swaps in a new entry, key and value, whatever its docs
    /// say after std's ("the key is not updated"); `an_insert_replaces_the_whole_entry`
    /// holds it to that.
    pub fn insert(&self, widget: PackedWidget, guard: &impl Guard) {
        self.0.insert(Keyed(widget), (), guard);
    }

    /// Takes out the widget with `serial` and returns it (freed once `guard` is gone).
    pub fn remove<'g>(&self, serial: &str, guard: &'g impl Guard) -> Option<&'g PackedWidget> {
        self.0.remove_entry(serial, guard).map(|(k, ())| &k.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `additional` more widgets without growing.
    pub fn reserve(&self, additional: usize) {
        self.0.pin().reserve(additional)
    }

    /// Every widget, unpacked, by serial.
    #[cfg(test)]
    pub fn widgets(&self) -> std::collections::HashMap<Serial, Widget> {
        let guard = self.guard();
        self.0
            .iter(&guard)
            .map(|(k, ())| (Serial::trusted(k.0.serial()), k.0.unpack()))
            .collect()
    }
}

pub(super) struct Shared {
    pub map: WidgetMap,
    /// The sequencer publishes a group's changes under the write side; reads take the
    /// read side, so no reader sees one side of an association change.
    pub publish_lock: RwLock<()>,
    pub dirty: DirtySet,
    /// Bytes of every WAL segment on disk (the writer keeps it current).
    pub wal_bytes: Arc<AtomicU64>,
    /// The first LSN the WAL still holds (the sequencer keeps it current as it trims).
    pub wal_first_lsn: AtomicU64,
    /// Set once, when writes can no longer be made durable.
    pub failed: OnceLock<String>,
    /// Woken when enough widgets are dirty to flush before the interval is up.
    pub flush_wanted: Notify,
    pub flush_batch_size: usize,
}

impl Shared {
    pub fn new(map: WidgetMap, dirty: DirtySet, flush_batch_size: usize) -> Self {
        Self {
            map,
            publish_lock: RwLock::new(()),
            dirty,
            wal_bytes: Arc::new(AtomicU64::new(0)),
            wal_first_lsn: AtomicU64::new(0),
            failed: OnceLock::new(),
            flush_wanted: Notify::new(),
            flush_batch_size,
        }
    }

    /// Writes can no longer be made durable (the WAL failed, or the store refused this
    /// instance): refuse every write from now on.
    pub fn fail(&self, reason: String) {
        tracing::error!(reason = %reason, "writes can no longer be made durable: refusing all writes until restart");
        let _ = self.failed.set(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, PortType, Ports};

    fn packed(serial: &str, name: &str) -> PackedWidget {
        let w = Widget::new(
            Name::parse("n", name).unwrap(),
            Ports::from_list("p", &[PortType::P]).unwrap(),
        );
        PackedWidget::pack(&Serial::parse("s", serial).unwrap(), &w)
    }

    /// What `WidgetMap::insert` relies on: an insert over a widget with the same serial
    /// leaves the new widget in the map, not the old one with a new value beside it.
    #[test]
    fn an_insert_replaces_the_whole_entry() {
        let map = WidgetMap::new(0);
        let guard = map.guard();
        map.insert(packed("a", "old"), &guard);
        map.insert(packed("b", "other"), &guard);
        map.insert(packed("a", "new"), &guard);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("a", &guard), Some(&packed("a", "new")));
        assert_eq!(map.unpacked("b").unwrap().name.as_str(), "other");
        assert_eq!(map.remove("a", &guard), Some(&packed("a", "new")));
        assert_eq!((map.get("a", &guard), map.len()), (None, 1));
        assert_eq!(map.remove("a", &guard), None);
    }
}
