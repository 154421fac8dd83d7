//! Start-up WAL replay into the map, on several threads.
//!
//! The calling thread reads and decodes the log; appliers put the post-images into the map
//! and work out the dirty marks. Changes are split among appliers by a hash of their serial,
//! so every change to one widget goes to the same applier, in log order, and the map ends
//! as a one-thread replay would leave it. Each applier keeps its marks to itself and they
//! join the dirty set once, at the end.

use super::dirty::{Dirty, DirtySet};
use super::packed::PackedWidget;
use super::state::WidgetMap;
use crate::domain::change::{self, Change, Mark};
use crate::domain::Serial;
use crate::wal::{self, Recovered, RecoveryMode, WalError, WalFs};
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::mpsc;

/// Changes handed to an applier at a time: large enough that the channel costs little
/// per change, small enough that appliers start early.
const BATCH: usize = 4096;
/// Batches in flight to each applier before the reader waits.
const QUEUE: usize = 8;

/// Replays the log in `dir` above `checkpoint` into `map`, marking what it changes dirty.
///
/// Appliers check every change as every load checks what it reads ([`Change::check`]: a
/// record's checksum says its bytes are the ones written, not that a build of this service
/// wrote them); the first one that fails stops the replay with [`WalError::Invalid`].
pub(super) fn replay(
    map: &WidgetMap,
    dirty: &DirtySet,
    fs: &dyn WalFs,
    dir: &Path,
    mode: RecoveryMode,
    checkpoint: u64,
) -> Result<Recovered, WalError> {
    let appliers = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    // Fixed seed: only the split among appliers depends on it, within this one replay.
    let split = foldhash::fast::FixedState::with_seed(0);
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(appliers);
        let mut handles = Vec::with_capacity(appliers);
        let (spent, recycled) = mpsc::channel();
        for _ in 0..appliers {
            let (tx, rx) = mpsc::sync_channel::<Vec<(u64, Change)>>(QUEUE);
            queues.push((tx, Vec::with_capacity(BATCH)));
            let spent = spent.clone();
            handles.push(scope.spawn(move || apply_all(map, rx, spent)));
        }
        drop(spent);
        // An applier that stopped (a bad change, or a panic) drops its queue; the log is
        // still read to its end, cheaply, and the joins below say what happened.
        let mut stopped = false;
        let recovered = wal::recover(fs, dir, mode, checkpoint, |lsn, record| {
            if stopped {
                return;
            }
            for change in record.changes {
                let i = (split.hash_one(change.serial().as_str()) % appliers as u64) as usize;
                let (tx, batch) = &mut queues[i];
                batch.push((lsn, change));
                if batch.len() == BATCH {
                    let next = recycled
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(BATCH));
                    let full = std::mem::replace(batch, next);
                    stopped |= tx.send(full).is_err();
                }
            }
        });
        for (tx, batch) in queues {
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        }
        // Every applier is joined before anything is returned.
        let applied: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        let recovered = recovered?;
        let mut all = Vec::with_capacity(applied.len());
        for result in applied {
            match result {
                Ok(Ok(marks)) => all.push(marks),
                Ok(Err((lsn, reason))) => return Err(WalError::Invalid { lsn, reason }),
                Err(_) => return Err(WalError::Replay("a replay thread panicked".into())),
            }
        }
        for marks in all {
            dirty.mark(marks, recovered.last_lsn);
        }
        Ok(recovered)
    })
}

/// Applies every change it is sent, in order; returns what each serial's changes changed,
/// with its state at the end, or the LSN and fault of the first change that is not one the
/// service could have made.
///
/// Only the marks add up change by change. The state a serial ends with is read from the
/// map once, after the last batch: this applier is the only one that writes its serials,
/// so the map then holds each one's state after its last change. (Keeping a copy of each
/// change's state instead cost an allocation and a free per change.)
fn apply_all(
    map: &WidgetMap,
    changes: mpsc::Receiver<Vec<(u64, Change)>>,
    spent: mpsc::Sender<Vec<(u64, Change)>>,
) -> Result<Vec<(Serial, Dirty)>, (u64, String)> {
    let mut marks = foldhash::HashMap::<Serial, Mark>::default();
    for mut batch in changes {
        // A guard a batch: replaced entries are reclaimed as replay goes. (One guard for
        // the whole log kept every one of them, and zeroing their fresh pages was a third
        // of replay's time.)
        let guard = map.guard();
        for (lsn, change) in batch.drain(..) {
            change
                .check()
                .map_err(|e| (lsn, format!("{:?}: {e}", change.serial())))?;
            // One probe a change: the replaced state comes back from the insert.
            let (serial, mark) = match change {
                Change::Put { serial, widget } => {
                    let before = map.insert(serial.clone(), PackedWidget::pack(&widget), &guard);
                    let after = change::peers(Some(&widget));
                    (
                        serial,
                        Mark::between(before.map(PackedWidget::peers), after),
                    )
                }
                Change::Delete { serial } => {
                    let before = map.remove(&serial, &guard);
                    (serial, Mark::between(before.map(PackedWidget::peers), None))
                }
            };
            match marks.entry(serial) {
                Entry::Occupied(mut e) => e.get_mut().merge(mark),
                Entry::Vacant(e) => {
                    e.insert(mark);
                }
            }
        }
        // The emptied batch goes back to the reader to be filled again: a new one is
        // fresh memory, which the kernel zeroes page by page.
        let _ = spent.send(batch);
    }
    let guard = map.guard();
    Ok(marks
        .into_iter()
        .map(|(serial, mark)| {
            let state = map.get(&serial, &guard).cloned();
            (serial, Dirty { mark, state })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::state::new_map;
    use super::*;
    use crate::domain::{Name, PortType, Ports, Widget};
    use crate::wal::{LogBatch, RealFs, Record, WalWriter};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A WAL in a new directory holding `records`, LSN 1 upwards, synced.
    fn write_log(records: impl IntoIterator<Item = Vec<Change>>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = WalWriter::open(
            Arc::new(RealFs),
            dir.path(),
            vec![],
            1,
            1 << 20,
            Arc::new(AtomicU64::new(0)),
        )
        .unwrap();
        for (lsn, changes) in (1..).zip(records) {
            let mut batch = LogBatch::new(lsn);
            batch.push(&Record { changes });
            writer.append(&batch).unwrap();
        }
        writer.sync().unwrap();
        dir
    }

    /// A log of puts and deletes over few serials, so every serial changes many times and
    /// its changes land in many batches: replay must end where applying in order ends.
    #[test]
    fn parallel_replay_ends_as_applying_in_log_order() {
        let serial = |i: u64| Serial::parse("s", &format!("w{i}")).unwrap();
        let ports = Ports::from_list("ports", &PortType::ALL).unwrap();
        let mut model: HashMap<Serial, Widget> = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let records = 3 * BATCH as u64;
        let log = (1..=records).map(|lsn| {
            (0..3)
                .map(|k| {
                    let s = serial((lsn * 3 + k) % 97);
                    if rng.u8(..10) == 0 {
                        model.remove(&s);
                        Change::Delete { serial: s }
                    } else {
                        let mut w = Widget::new(Name::parse("n", "n").unwrap(), ports);
                        // Never itself, which no state the service makes holds: w97 is
                        // no key of the log.
                        let peer = Some(serial(rng.u64(..97))).filter(|p| *p != s);
                        w.peers[rng.usize(..3)] = peer.or(Some(serial(97)));
                        w.version = lsn;
                        model.insert(s.clone(), w.clone());
                        Change::Put {
                            serial: s,
                            widget: w,
                        }
                    }
                })
                .collect()
        });
        let dir = write_log(log);

        let map = new_map(0);
        let dirty = DirtySet::default();
        let recovered = replay(&map, &dirty, &RealFs, dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!(recovered.last_lsn, records);
        let replayed: HashMap<Serial, Widget> = map
            .pin()
            .iter()
            .map(|(s, w)| (s.clone(), w.unpack()))
            .collect();
        assert_eq!(replayed, model);
        let taken = dirty.take();
        assert_eq!(taken.covered_lsn, records);
        assert_eq!(taken.widgets.len(), 97, "every serial the log touched");
        for (serial, dirty) in &taken.widgets {
            let state = dirty.state.as_ref().map(PackedWidget::unpack);
            assert_eq!(state.as_ref(), model.get(serial), "{serial:?}");
        }
    }

    /// A record whose checksum holds but whose values no build of the service writes (a
    /// name longer than a length byte) stops the start, naming its LSN; nothing panics.
    #[test]
    fn an_intact_record_with_impossible_values_is_refused() {
        let ports = Ports::from_list("ports", &PortType::ALL).unwrap();
        let fine = Widget::new(Name::parse("n", "n").unwrap(), ports);
        // Decoded, not parsed: what a record from elsewhere could hold.
        let long: Name = serde_json::from_str(&format!("\"{}\"", "n".repeat(300))).unwrap();
        let impossible = Widget::new(long, ports);
        let put = |serial: &str, widget| Change::Put {
            serial: Serial::parse("s", serial).unwrap(),
            widget,
        };
        let dir = write_log([vec![put("w1", fine)], vec![put("w2", impossible)]]);

        let err = replay(
            &new_map(0),
            &DirtySet::default(),
            &RealFs,
            dir.path(),
            RecoveryMode::Strict,
            0,
        )
        .unwrap_err();
        match err {
            WalError::Invalid { lsn, reason } => {
                assert_eq!(lsn, 2);
                assert!(reason.contains("name"), "{reason}");
            }
            other => panic!("expected WalError::Invalid, got {other}"),
        }
    }
}
