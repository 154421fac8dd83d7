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
    /// Every change at or below this LSN has its serial in `serials` or in a taken batch.
    covered_lsn: u64,
    /// When the oldest change not yet in the store was made: in `serials`...
    since: Option<Instant>,
    /// ...or in a batch a flusher has taken and not yet finished.
    in_flight_since: Option<Instant>,
    /// How many widgets that batch holds: they still wait for the store.
    in_flight: usize,
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
        for (serial, dirty) in changed {
            match inner.serials.entry(serial) {
                Entry::Occupied(mut e) => e.get_mut().then(dirty),
                Entry::Vacant(e) => {
                    e.insert(dirty);
                }
            }
        }
        inner.covered_lsn = inner.covered_lsn.max(lsn);
        if inner.since.is_none() && !inner.serials.is_empty() {
            inner.since = Some(Instant::now());
        }
        self.publish_len(&inner)
    }

    /// Takes the whole set for a flush.
    pub fn take(&self) -> Taken {
        let mut inner = self.inner.lock().expect("dirty set lock");
        // Swapped, not drained: O(1) under the lock, and a burst does not leave its
        // capacity behind for good.
        let widgets = std::mem::take(&mut inner.serials);
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
            Some(PackedWidget::pack(&w))
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
}
