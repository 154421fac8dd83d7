//! The dirty set: serials changed since the durable store last took them, what about each
//! changed (so a store can write only those rows), each one's durable state now, the LSN
//! the set covers, and how old its oldest change is (the flush lag).
//!
//! Keeping the state here, not only in the map, makes a flush's take a swap of one hash
//! table under this set's lock: the taken states are exactly those at `covered_lsn`, and
//! nothing reads the map under a lock that writes wait for. (Reading 100,000 widgets out of
//! the map under the lock writes publish under stalled every write for 5-24 ms twice a second.)

use super::packed::PackedWidget;
use crate::domain::{Mark, Serial};
// foldhash: randomly seeded like std's SipHash, and several times cheaper on short serials.
use foldhash::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A widget waiting for the store: what changed, and its state (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub mark: Mark,
    pub state: Option<PackedWidget>,
}

impl Dirty {
    /// Folds a later change in: the marks add up, the later state wins.
    pub(crate) fn then(&mut self, later: Dirty) {
        self.mark.merge(later.mark);
        self.state = later.state;
    }
}

/// Entries [`DirtySet::recycle`] hands over at a time.
pub const RELEASE_CHUNK: usize = 4096;

#[derive(Default)]
pub struct DirtySet {
    inner: Mutex<Inner>,
    /// Widgets waiting for the store (in the set or in a flush under way), readable without
    /// the lock (for the overload check and metrics).
    len: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    serials: HashMap<Serial, Dirty>,
    /// The table of the last flush, emptied ([`DirtySet::recycle`]), with room for twice
    /// what that flush held: the next take swaps it in, so the set fills again without
    /// growing. (Grown from empty, each doubling rehashed every entry and faulted in fresh
    /// pages on the sequencer thread while every write waited: stalls of 61 and 114 ms
    /// in 60 s runs at 1 M widgets, and ~8% of that thread's CPU.)
    spare: Option<HashMap<Serial, Dirty>>,
    /// Every change at or below this LSN has its serial in `serials` or in a taken batch.
    covered_lsn: u64,
    /// When the oldest change not yet in the store was made: in `serials`...
    since: Option<Instant>,
    /// ...or in a batch a flusher has taken and not yet finished.
    in_flight_since: Option<Instant>,
    /// How many widgets that batch holds: they still wait for the store.
    in_flight: usize,
}

impl Inner {
    fn mark(&mut self, changed: impl IntoIterator<Item = (Serial, Dirty)>, lsn: u64) {
        for (serial, dirty) in changed {
            match self.serials.entry(serial) {
                Entry::Occupied(mut e) => e.get_mut().then(dirty),
                Entry::Vacant(e) => {
                    e.insert(dirty);
                }
            }
        }
        self.covered_lsn = self.covered_lsn.max(lsn);
        if self.since.is_none() && !self.serials.is_empty() {
            self.since = Some(Instant::now());
        }
    }
}

/// What a flusher takes: the dirty widgets with their states, and the LSN those states
/// are as of.
#[derive(Debug)]
pub struct Taken {
    pub widgets: HashMap<Serial, Dirty>,
    pub covered_lsn: u64,
    since: Option<Instant>,
}

impl DirtySet {
    /// Marks serials changed by records up to `lsn`, with their state after them; returns
    /// the set's new size.
    pub fn mark(&self, changed: impl IntoIterator<Item = (Serial, Dirty)>, lsn: u64) -> usize {
        let mut inner = self.inner.lock().expect("dirty set lock");
        inner.mark(changed, lsn);
        self.publish_len(&inner)
    }

    /// Marks whole tables of serials changed by records up to `lsn`, as WAL replay's
    /// appliers return them. An empty set adopts the table with the most room as it is, and
    /// the rest go in after one reservation (none, if that table has room for them). (Built
    /// again entry by entry, a million replayed serials took a third of a second on one
    /// thread while the others waited, most of it growing the table and faulting in its
    /// fresh pages.)
    pub fn mark_tables(&self, mut tables: Vec<HashMap<Serial, Dirty>>, lsn: u64) -> usize {
        tables.sort_by_key(|table| std::cmp::Reverse(table.capacity()));
        let mut tables = tables.into_iter();
        let mut inner = self.inner.lock().expect("dirty set lock");
        if inner.serials.is_empty() {
            if let Some(roomiest) = tables.next() {
                inner.serials = roomiest;
            }
        }
        let rest: Vec<_> = tables.collect();
        inner.serials.reserve(rest.iter().map(HashMap::len).sum());
        inner.mark(rest.into_iter().flatten(), lsn);
        self.publish_len(&inner)
    }

    /// Takes the whole set for a flush.
    pub fn take(&self) -> Taken {
        let mut inner = self.inner.lock().expect("dirty set lock");
        // Swapped, not drained: O(1) under the lock. An idle set keeps no room: a take
        // that finds nothing lets the spare and the empty table go.
        let next = if inner.serials.is_empty() {
            inner.spare = None;
            HashMap::default()
        } else {
            inner.spare.take().unwrap_or_default()
        };
        let widgets = std::mem::replace(&mut inner.serials, next);
        let since = inner.since.take();
        inner.in_flight_since = since;
        inner.in_flight = widgets.len();
        self.publish_len(&inner);
        Taken {
            widgets,
            covered_lsn: inner.covered_lsn,
            since,
        }
    }

    /// The flush of `taken` reached the store. Hands the taken widgets back, to be freed
    /// where it suits the caller: freeing a large take is milliseconds of work.
    pub fn done(&self, taken: Taken) -> Taken {
        let mut inner = self.inner.lock().expect("dirty set lock");
        inner.in_flight_since = None;
        inner.in_flight = 0;
        self.publish_len(&inner);
        taken
    }

    /// Keeps the table of a finished flush for the next take, emptied, with room for twice
    /// as many widgets as it held: the room follows what the flushes take, so a burst's
    /// does not stay behind.
    ///
    /// The entries go to `release` in chunks of [`RELEASE_CHUNK`], to be freed by the
    /// thread that allocated them, the sequencer. Freed anywhere else, mimalloc hands each
    /// block back to its owner's heap, which takes them all in its next collection: a
    /// stall of 17-22 ms on the sequencer thread after every flush of ~250,000 widgets
    /// (its one pass over every freed block, cold in cache). Moving the entries out is
    /// milliseconds of work for a large take, so call this where that does not hold up
    /// requests.
    pub fn recycle(
        &self,
        mut widgets: HashMap<Serial, Dirty>,
        mut release: impl FnMut(Vec<(Serial, Dirty)>),
    ) {
        let held = widgets.len();
        let mut entries = widgets.drain();
        loop {
            let chunk: Vec<_> = entries.by_ref().take(RELEASE_CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            release(chunk);
        }
        drop(entries);
        // Grown here if it must be (an empty table: no rehash), or shrunk.
        let room = held.saturating_mul(2);
        widgets.reserve(room);
        widgets.shrink_to(room);
        let replaced = self
            .inner
            .lock()
            .expect("dirty set lock")
            .spare
            .replace(widgets);
        drop(replaced); // outside the lock
    }

    /// The flush of `taken` failed: its serials are dirty again.
    pub fn restore(&self, taken: Taken) {
        let mut inner = self.inner.lock().expect("dirty set lock");
        // A widget changed again since the take keeps its newer state; the marks add up.
        for (serial, taken) in taken.widgets {
            match inner.serials.entry(serial) {
                Entry::Occupied(mut e) => e.get_mut().mark.merge(taken.mark),
                Entry::Vacant(e) => {
                    e.insert(taken);
                }
            }
        }
        inner.since = match (inner.since, taken.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        inner.in_flight_since = None;
        inner.in_flight = 0;
        self.publish_len(&inner);
    }

    fn publish_len(&self, inner: &Inner) -> usize {
        let len = inner.serials.len() + inner.in_flight;
        self.len.store(len, Ordering::Relaxed);
        len
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// How long the oldest change not yet in the store has waited (zero when none waits).
    pub fn lag(&self) -> Duration {
        let inner = self.inner.lock().expect("dirty set lock");
        [inner.since, inner.in_flight_since]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, PortType, Ports, Widget};

    #[test]
    fn take_restore_keeps_everything_and_the_oldest_time() {
        let d = DirtySet::default();
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let state = |name: &str| {
            let w = Widget::new(
                Name::parse("n", name).unwrap(),
                Ports::from_list("p", &[PortType::P]).unwrap(),
            );
            Some(PackedWidget::pack(&s("w"), &w))
        };
        let dirty = |row, ports, name: &str| Dirty {
            mark: Mark { row, ports },
            state: state(name),
        };
        assert_eq!(
            d.mark(
                [
                    (s("a"), dirty(true, 0, "a1")),
                    (s("b"), dirty(true, 0, "b1"))
                ],
                5
            ),
            2
        );
        let taken = d.take();
        assert_eq!((taken.widgets.len(), taken.covered_lsn), (2, 5));
        assert_eq!(
            d.len(),
            2,
            "a flush under way still counts against the limit"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            d.lag() >= Duration::from_millis(5),
            "an in-flight batch counts as lag"
        );
        d.mark(
            [
                (s("b"), dirty(false, 1, "b2")),
                (s("c"), dirty(false, 1, "c2")),
            ],
            7,
        );
        d.restore(taken);
        assert_eq!(d.len(), 3);
        let again = d.take();
        assert_eq!(again.covered_lsn, 7);
        let mut widgets: Vec<_> = again.widgets.clone().into_iter().collect();
        widgets.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            widgets,
            vec![
                (s("a"), dirty(true, 0, "a1")),
                (s("b"), dirty(true, 1, "b2")),
                (s("c"), dirty(false, 1, "c2")),
            ],
            "the marks add up, and b keeps the state it had after the take"
        );
        d.done(again);
        assert_eq!(d.lag(), Duration::ZERO);
    }

    /// Replay's tables: an empty set adopts the roomiest as it is and takes in the others;
    /// a set that already holds serials folds every table in, marks adding up.
    #[test]
    fn marked_tables_join_the_set_whole() {
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let dirty = |ports, name: &str| {
            let w = Widget::new(
                Name::parse("n", name).unwrap(),
                Ports::from_list("p", &PortType::ALL).unwrap(),
            );
            Dirty {
                mark: Mark { row: false, ports },
                state: Some(PackedWidget::pack(&s("w"), &w)),
            }
        };
        let table = |entries: &[(&str, u8, &str)]| -> HashMap<Serial, Dirty> {
            entries
                .iter()
                .map(|&(serial, ports, name)| (s(serial), dirty(ports, name)))
                .collect()
        };
        let sorted = |taken: Taken| {
            let mut widgets: Vec<_> = taken.widgets.into_iter().collect();
            widgets.sort_by(|a, b| a.0.cmp(&b.0));
            (widgets, taken.covered_lsn)
        };

        let d = DirtySet::default();
        let small = table(&[("a", 1, "a1")]);
        let large = table(&[("b", 2, "b1"), ("c", 4, "c1")]);
        assert_eq!(d.mark_tables(vec![small, large], 9), 3);
        assert!(
            d.inner.lock().unwrap().since.is_some(),
            "adopted serials count for the flush lag"
        );
        assert_eq!(
            sorted(d.take()),
            (
                vec![
                    (s("a"), dirty(1, "a1")),
                    (s("b"), dirty(2, "b1")),
                    (s("c"), dirty(4, "c1")),
                ],
                9
            )
        );

        let d = DirtySet::default();
        d.mark([(s("a"), dirty(1, "a0"))], 3);
        assert_eq!(
            d.mark_tables(vec![table(&[("a", 2, "a1"), ("b", 2, "b1")])], 8),
            2
        );
        assert_eq!(
            sorted(d.take()),
            (vec![(s("a"), dirty(3, "a1")), (s("b"), dirty(2, "b1"))], 8),
            "a serial already marked keeps both marks and takes the later state"
        );
    }

    #[test]
    fn a_recycled_table_is_the_next_takes_and_its_room_follows_the_flushes() {
        let d = DirtySet::default();
        let deleted = |i: usize| {
            let serial = Serial::parse("s", &format!("w{i}")).unwrap();
            let dirty = Dirty {
                mark: Mark {
                    row: true,
                    ports: 0,
                },
                state: None,
            };
            (serial, dirty)
        };
        // One flush: `n` widgets marked, taken and written; returns the taken table's room.
        let flush = |n: usize, lsn: u64| {
            d.mark((0..n).map(deleted), lsn);
            let taken = d.take();
            let room = taken.widgets.capacity();
            let mut released = 0;
            d.recycle(d.done(taken).widgets, |chunk| {
                assert!(!chunk.is_empty() && chunk.len() <= RELEASE_CHUNK);
                released += chunk.len();
            });
            assert_eq!(released, n, "every entry is handed over to be freed");
            room
        };

        flush(10_000, 1); // grows a table, which goes back as the spare
        flush(1, 2); // the spare is now the set's table
        assert!(
            flush(1, 3) >= 20_000,
            "the set refills in an earlier flush's table, with room for twice what it held"
        );
        flush(1, 4);
        assert!(
            flush(1, 5) < 100,
            "a table that held one widget comes back small"
        );

        // A take that finds nothing dirty lets the room go: an idle set keeps none.
        flush(10_000, 6);
        d.done(d.take());
        assert!(flush(1, 7) < 100);
        assert!(flush(1, 8) < 100);
    }
}
