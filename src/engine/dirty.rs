//! The dirty set: serials changed since the durable store last took them, what about each
//! changed (so a store can write only those rows), the LSN the set covers, and how old its
//! oldest change is (the flush lag).

use crate::domain::{Change, Serial, Widget};
// foldhash: randomly seeded like std's SipHash, and several times cheaper on short serials.
use foldhash::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What changed about one widget since the store last took it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    /// The widget row itself: created, deleted, or deleted and created again.
    pub row: bool,
    /// Bitmask (by port index) of the ports whose peer changed.
    pub ports: u8,
}

impl Mark {
    /// What `change` changes about a widget whose state before it was `before`.
    pub fn of(before: Option<&Widget>, change: &Change) -> Mark {
        let after = match change {
            Change::Put { widget, .. } => Some(widget),
            Change::Delete { .. } => None,
        };
        Mark::between(peers(before), peers(after))
    }

    /// What changed between two states of a widget, known by their peers on each port
    /// (`None`: the widget does not exist).
    pub fn between(before: Option<[Option<&str>; 3]>, after: Option<[Option<&str>; 3]>) -> Mark {
        let mut ports = 0;
        for i in 0..3 {
            let a = before.and_then(|p| p[i]);
            let b = after.and_then(|p| p[i]);
            if a != b {
                ports |= 1 << i;
            }
        }
        Mark {
            row: before.is_none() || after.is_none(),
            ports,
        }
    }

    pub(crate) fn merge(&mut self, other: Mark) {
        self.row |= other.row;
        self.ports |= other.ports;
    }
}

/// A widget's peers as [`Mark::between`] takes them.
pub fn peers(widget: Option<&Widget>) -> Option<[Option<&str>; 3]> {
    widget.map(|w| w.peers.each_ref().map(|p| p.as_ref().map(Serial::as_str)))
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
    serials: HashMap<Serial, Mark>,
    /// Every change at or below this LSN has its serial in `serials` or in a taken batch.
    covered_lsn: u64,
    /// When the oldest change not yet in the store was made: in `serials`...
    since: Option<Instant>,
    /// ...or in a batch a flusher has taken and not yet finished.
    in_flight_since: Option<Instant>,
    /// How many widgets that batch holds: they still wait for the store.
    in_flight: usize,
}

/// What a flusher takes: the serials and what changed about each, and the LSN their
/// current state covers.
#[derive(Debug)]
pub struct Taken {
    pub serials: Vec<(Serial, Mark)>,
    pub covered_lsn: u64,
    since: Option<Instant>,
}

impl DirtySet {
    /// Marks serials changed by records up to `lsn`; returns the set's new size.
    pub fn mark(&self, marks: impl IntoIterator<Item = (Serial, Mark)>, lsn: u64) -> usize {
        let mut inner = self.inner.lock().expect("dirty set lock");
        for (serial, mark) in marks {
            inner.serials.entry(serial).or_default().merge(mark);
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
        // Taken, not drained: a burst must not leave its capacity behind for good.
        let serials: Vec<(Serial, Mark)> = std::mem::take(&mut inner.serials).into_iter().collect();
        let since = inner.since.take();
        inner.in_flight_since = since;
        inner.in_flight = serials.len();
        self.publish_len(&inner);
        Taken {
            serials,
            covered_lsn: inner.covered_lsn,
            since,
        }
    }

    /// The flush of `taken` reached the store.
    pub fn done(&self, _taken: Taken) {
        let mut inner = self.inner.lock().expect("dirty set lock");
        inner.in_flight_since = None;
        inner.in_flight = 0;
        self.publish_len(&inner);
    }

    /// The flush of `taken` failed: its serials are dirty again.
    pub fn restore(&self, taken: Taken) {
        let mut inner = self.inner.lock().expect("dirty set lock");
        for (serial, mark) in taken.serials {
            inner.serials.entry(serial).or_default().merge(mark);
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use crate::domain::{Name, PortType, Ports};

    #[test]
    fn marks_name_exactly_what_changed() {
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let new = Widget::new(
            Name::parse("n", "w").unwrap(),
            Ports::from_list("p", &PortType::ALL).unwrap(),
        );
        let put = |w: &Widget| Change::Put {
            serial: s("a"),
            widget: w.clone(),
        };
        assert_eq!(
            Mark::of(None, &put(&new)),
            Mark {
                row: true,
                ports: 0
            }
        );
        let mut plugged = new.clone();
        plugged.peers[PortType::R.index()] = Some(s("b"));
        assert_eq!(
            Mark::of(Some(&new), &put(&plugged)),
            Mark {
                row: false,
                ports: 0b010
            }
        );
        let mut replugged = plugged.clone();
        replugged.peers[PortType::R.index()] = Some(s("c"));
        replugged.peers[PortType::Q.index()] = Some(s("d"));
        assert_eq!(
            Mark::of(Some(&plugged), &put(&replugged)),
            Mark {
                row: false,
                ports: 0b110
            }
        );
        assert_eq!(Mark::of(Some(&plugged), &put(&plugged)), Mark::default());
        let delete = Change::Delete { serial: s("a") };
        assert_eq!(
            Mark::of(Some(&replugged), &delete),
            Mark {
                row: true,
                ports: 0b110
            }
        );
    }

    #[test]
    fn take_restore_keeps_everything_and_the_oldest_time() {
        let d = DirtySet::default();
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let row = Mark {
            row: true,
            ports: 0,
        };
        let port_p = Mark {
            row: false,
            ports: 1,
        };
        assert_eq!(d.mark([(s("a"), row), (s("b"), row)], 5), 2);
        let taken = d.take();
        assert_eq!((taken.serials.len(), taken.covered_lsn), (2, 5));
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
        d.mark([(s("b"), port_p), (s("c"), port_p)], 7);
        d.restore(taken);
        assert_eq!(d.len(), 3);
        let mut again = d.take();
        again.serials.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(again.covered_lsn, 7);
        let merged = Mark {
            row: true,
            ports: 1,
        };
        assert_eq!(
            again.serials,
            vec![(s("a"), row), (s("b"), merged), (s("c"), port_p)]
        );
        d.done(again);
        assert_eq!(d.lag(), Duration::ZERO);
    }
}
