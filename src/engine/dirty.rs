//! The dirty set: serials changed since the durable store last took them, with the LSN the
//! set covers and how old its oldest change is (the flush lag).

use crate::domain::Serial;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct DirtySet {
    inner: Mutex<Inner>,
    /// The set's size, readable without the lock (for the overload check and metrics).
    len: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    serials: HashSet<Serial>,
    /// Every change at or below this LSN has its serial in `serials` or in a taken batch.
    covered_lsn: u64,
    /// When the oldest change not yet in the store was made: in `serials`...
    since: Option<Instant>,
    /// ...or in a batch a flusher has taken and not yet finished.
    in_flight_since: Option<Instant>,
}

/// What a flusher takes: the serials, and the LSN their current state covers.
#[derive(Debug)]
pub struct Taken {
    pub serials: Vec<Serial>,
    pub covered_lsn: u64,
    since: Option<Instant>,
}

impl DirtySet {
    /// Marks serials changed by records up to `lsn`; returns the set's new size.
    pub fn mark<'a>(&self, serials: impl IntoIterator<Item = &'a Serial>, lsn: u64) -> usize {
        let mut inner = self.inner.lock().expect("dirty set lock");
        inner.serials.extend(serials.into_iter().cloned());
        inner.covered_lsn = inner.covered_lsn.max(lsn);
        if inner.since.is_none() && !inner.serials.is_empty() {
            inner.since = Some(Instant::now());
        }
        let len = inner.serials.len();
        self.len.store(len, Ordering::Relaxed);
        len
    }

    /// Takes the whole set for a flush.
    pub fn take(&self) -> Taken {
        let mut inner = self.inner.lock().expect("dirty set lock");
        let serials: Vec<Serial> = inner.serials.drain().collect();
        let since = inner.since.take();
        inner.in_flight_since = since;
        self.len.store(0, Ordering::Relaxed);
        Taken {
            serials,
            covered_lsn: inner.covered_lsn,
            since,
        }
    }

    /// The flush of `taken` reached the store.
    pub fn done(&self, _taken: Taken) {
        self.inner.lock().expect("dirty set lock").in_flight_since = None;
    }

    /// The flush of `taken` failed: its serials are dirty again.
    pub fn restore(&self, taken: Taken) {
        let mut inner = self.inner.lock().expect("dirty set lock");
        inner.serials.extend(taken.serials);
        inner.since = match (inner.since, taken.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        inner.in_flight_since = None;
        self.len.store(inner.serials.len(), Ordering::Relaxed);
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

    #[test]
    fn take_restore_keeps_everything_and_the_oldest_time() {
        let d = DirtySet::default();
        let s = |x: &str| Serial::parse("s", x).unwrap();
        assert_eq!(d.mark([&s("a"), &s("b")], 5), 2);
        let taken = d.take();
        assert_eq!((taken.serials.len(), taken.covered_lsn), (2, 5));
        assert!(d.is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            d.lag() >= Duration::from_millis(5),
            "an in-flight batch counts as lag"
        );
        d.mark([&s("b"), &s("c")], 7);
        d.restore(taken);
        assert_eq!(d.len(), 3);
        let again = d.take();
        assert_eq!(again.covered_lsn, 7);
        d.done(again);
        assert_eq!(d.lag(), Duration::ZERO);
    }
}
