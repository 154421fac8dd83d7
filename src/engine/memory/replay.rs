//! Start-up WAL replay into the map, on several threads.
//!
//! The calling thread reads and decodes the log; appliers put the post-images into the map
//! and work out the dirty marks. Changes are split among appliers by a hash of their serial,
//! so every change to one widget goes to the same applier, in log order, and the map ends
//! as a one-thread replay would leave it. Each applier keeps its marks to itself, in a
//! table of the dirty set's own kind, and the tables join the dirty set at the end.

use super::dirty::{Dirty, DirtySet};
use super::packed::PackedWidget;
use super::state::WidgetMap;
use crate::domain::change::{self, Change, Mark};
use crate::domain::{Serial, Widget};
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
/// Serials an applier folds before it settles them ([`apply_all`]): ~145 bytes each in a
/// table of at most 131,072 places, ~19 MiB an applier.
pub(super) const FOLD: usize = 1 << 16;
/// The most widgets the map makes room for ahead of one segment's changes; more than a
/// segment of the default size holds.
const MAX_RESERVE: usize = 1 << 22;

/// Replays the log in `dir` above `checkpoint` into `map`, marking what it changes dirty.
/// Each applier settles the changes it folded once it holds `fold` serials' worth
/// ([`apply_all`]; [`FOLD`] outside tests).
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
    fold: usize,
) -> Result<Recovered, WalError> {
    let appliers = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    // Fixed seed: only the split among appliers depends on it, within this one replay.
    let split = foldhash::fast::FixedState::with_seed(0);
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(appliers);
        let mut handles = Vec::with_capacity(appliers);
        let (spent, recycled) = mpsc::channel();
        for i in 0..appliers {
            let (tx, rx) = mpsc::sync_channel::<Vec<(u64, Change)>>(QUEUE);
            queues.push((tx, Vec::with_capacity(BATCH)));
            let spent = spent.clone();
            // The first applier's table makes room for all of them, so that the dirty set
            // can adopt it and take in the others without growing it.
            let room_for = if i == 0 { appliers } else { 1 };
            handles.push(scope.spawn(move || apply_all(map, rx, spent, fold, room_for)));
        }
        drop(spent);
        // An applier that stopped (a bad change, or a panic) drops its queue; the log is
        // still read to its end, cheaply, and the joins below say what happened.
        let mut stopped = false;
        // Room in the map for every widget a segment's records above the checkpoint may
        // add, before its changes reach the appliers: grown as they insert instead, the
        // map copies every entry it holds at each doubling, a sixth of a replay of a
        // million creates. A record of one put that rewrites a widget the map holds
        // counts too, so the map may end larger than it needs.
        let reserve = |segment: &[u8]| {
            map.reserve(wal::format::single_puts(segment, checkpoint).min(MAX_RESERVE));
        };
        let recovered = wal::recover_segments(fs, dir, mode, checkpoint, reserve, |lsn, record| {
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
        let mut tables = Vec::with_capacity(applied.len());
        for result in applied {
            match result {
                Ok(Ok(marks)) => tables.push(marks),
                Ok(Err((lsn, reason))) => return Err(WalError::Invalid { lsn, reason }),
                Err(_) => return Err(WalError::Replay("a replay thread panicked".into())),
            }
        }
        dirty.mark_tables(tables, recovered.last_lsn);
        Ok(recovered)
    })
}

/// Applies every change it is sent, in order; returns what each serial's changes changed,
/// with its state at the end (a table the dirty set can adopt), or the LSN and fault of the
/// first change that is not one the service could have made.
///
/// A serial's first change goes straight into the map, after a look-up of the state
/// before it (for the mark), and into the returned table. Its later changes fold into
/// `folded`, a table much smaller than the returned one that keeps only the last state,
/// unpacked, beside the serial (one cache miss a fold, where a table of places in a
/// vector of states cost two); each folded state goes into the map and the returned table
/// once `fold` serials are folded, and at the end. An insert into the map costs two
/// allocations and a replaced entry for papaya to reclaim, and a look-up in the returned
/// table a cache miss, so a serial that changes many times costs a few of each, not some
/// a change; one that changes once costs one of each.
///
/// The returned table has room for `room_for` appliers' serials.
fn apply_all(
    map: &WidgetMap,
    changes: mpsc::Receiver<Vec<(u64, Change)>>,
    spent: mpsc::Sender<Vec<(u64, Change)>>,
    fold: usize,
    room_for: usize,
) -> Result<foldhash::HashMap<Serial, Dirty>, (u64, String)> {
    let mut seen = foldhash::HashMap::<Serial, Dirty>::default();
    // At most `fold` + a batch of serials, so this table stays small where `seen` does not.
    let mut folded = foldhash::HashMap::<Serial, Folded>::default();
    for mut batch in changes {
        // A guard a batch: replaced entries are reclaimed as replay goes. (One guard for
        // the whole log kept every one of them, and zeroing their fresh pages was a third
        // of replay's time.)
        let guard = map.guard();
        for (lsn, change) in batch.drain(..) {
            change
                .check()
                .map_err(|e| (lsn, format!("{:?}: {e}", change.serial())))?;
            let (serial, after) = match change {
                Change::Put { serial, widget } => (serial, Some(widget)),
                Change::Delete { serial } => (serial, None),
            };
            if let Some(folded) = folded.get_mut(&serial) {
                folded.mark.merge(Mark::between(
                    change::peers(folded.state.as_ref()),
                    change::peers(after.as_ref()),
                ));
                folded.state = after;
                continue;
            }
            match seen.entry(serial) {
                Entry::Vacant(first) => {
                    let packed = after.as_ref().map(|w| PackedWidget::pack(first.key(), w));
                    let before = match &packed {
                        Some(state) => {
                            // This applier is the only one with this serial, so nothing
                            // comes between the look-up and the insert.
                            let before = map.get(first.key().as_str(), &guard);
                            map.insert(state.clone(), &guard);
                            before
                        }
                        None => map.remove(first.key().as_str(), &guard),
                    };
                    let mark = Mark::between(
                        before.map(PackedWidget::peers),
                        change::peers(after.as_ref()),
                    );
                    first.insert(Dirty {
                        mark,
                        state: packed,
                    });
                }
                Entry::Occupied(again) => {
                    let before = again.get().state.as_ref().map(PackedWidget::peers);
                    let mark = Mark::between(before, change::peers(after.as_ref()));
                    folded.insert(again.key().clone(), Folded { mark, state: after });
                }
            }
        }
        drop(guard);
        // The emptied batch goes back to the reader to be filled again: a new one is
        // fresh memory, which the kernel zeroes page by page.
        let _ = spent.send(batch);
        if folded.len() >= fold {
            settle(map, &mut seen, &mut folded);
        }
    }
    settle(map, &mut seen, &mut folded);
    // Serials split evenly among appliers: as many again for each of the others.
    seen.reserve(seen.len() * room_for.saturating_sub(1));
    Ok(seen)
}

/// A serial's changes since its state in the applier's table: what they changed, and its
/// state after the last one.
struct Folded {
    mark: Mark,
    state: Option<Widget>,
}

/// Puts each folded serial's marks into `seen`, and its last state into `seen` and the
/// map, emptying `folded` (and keeping its room).
fn settle(
    map: &WidgetMap,
    seen: &mut foldhash::HashMap<Serial, Dirty>,
    folded: &mut foldhash::HashMap<Serial, Folded>,
) {
    let mut changes = folded.drain().peekable();
    while changes.peek().is_some() {
        // A guard a batch, as in `apply_all`.
        let guard = map.guard();
        for (serial, change) in changes.by_ref().take(BATCH) {
            let state = change
                .state
                .as_ref()
                .map(|w| PackedWidget::pack(&serial, w));
            // Every folded serial was in `seen` before it folded.
            if let Some(dirty) = seen.get_mut(&serial) {
                dirty.mark.merge(change.mark);
                dirty.state = state.clone();
            }
            match state {
                Some(state) => map.insert(state, &guard),
                None => {
                    map.remove(serial.as_str(), &guard);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::WidgetMap;
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

    /// A log of puts and deletes on a map that already holds some of its serials: each
    /// serial changes a few times (few enough that its marks rarely cover every port), in
    /// several batches. Replay must end where applying in order ends, with each serial
    /// marked for exactly what its changes changed, however often the appliers settle what
    /// they folded.
    #[test]
    fn parallel_replay_ends_as_applying_in_log_order() {
        const SERIALS: u64 = 9973;
        let serial = |i: u64| Serial::parse("s", &format!("w{i}")).unwrap();
        let ports = Ports::from_list("ports", &PortType::ALL).unwrap();
        let widget = |peer_of: u64, port: usize, version: u64| {
            let mut w = Widget::new(Name::parse("n", "n").unwrap(), ports);
            w.peers[port] = Some(serial(peer_of));
            w.version = version;
            w
        };
        // The store's states: every third serial, with a peer that is no key of the log.
        let stored: HashMap<Serial, Widget> = (0..SERIALS)
            .step_by(3)
            .map(|i| (serial(i), widget(SERIALS, 0, 0)))
            .collect();
        let mut model = stored.clone();
        let mut marks: HashMap<Serial, Mark> = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let records = 3 * BATCH as u64;
        let mut log = Vec::new();
        for lsn in 1..=records {
            let changes = (0..3)
                .map(|k| {
                    let s = serial((lsn * 3 + k) % SERIALS);
                    let after = (rng.u8(..10) != 0).then(|| {
                        // Never itself, which no state the service makes holds.
                        let peer = Some(rng.u64(..SERIALS)).filter(|p| serial(*p) != s);
                        widget(peer.unwrap_or(SERIALS), rng.usize(..3), lsn)
                    });
                    let mark =
                        Mark::between(change::peers(model.get(&s)), change::peers(after.as_ref()));
                    marks.entry(s.clone()).or_default().merge(mark);
                    match after {
                        Some(widget) => {
                            model.insert(s.clone(), widget.clone());
                            Change::Put { serial: s, widget }
                        }
                        None => {
                            model.remove(&s);
                            Change::Delete { serial: s }
                        }
                    }
                })
                .collect();
            log.push(changes);
        }
        let dir = write_log(log);

        // Folded changes settled after every batch, and only at the end.
        for fold in [1, FOLD] {
            let map = WidgetMap::new(0);
            for (s, w) in &stored {
                map.insert(PackedWidget::pack(s, w), &map.guard());
            }
            let dirty = DirtySet::default();
            let recovered = replay(
                &map,
                &dirty,
                &RealFs,
                dir.path(),
                RecoveryMode::Strict,
                0,
                fold,
            )
            .unwrap();
            assert_eq!(recovered.last_lsn, records);
            let replayed: HashMap<Serial, Widget> = map.widgets();
            assert!(
                replayed == model,
                "fold {fold}: the map differs from the model"
            );
            let taken = dirty.take();
            assert_eq!(taken.covered_lsn, records);
            assert_eq!(
                taken.widgets.len(),
                SERIALS as usize,
                "every serial the log touched"
            );
            for (serial, dirty) in &taken.widgets {
                let state = dirty.state.as_ref().map(PackedWidget::unpack);
                assert_eq!(state.as_ref(), model.get(serial), "fold {fold}: {serial:?}");
                assert_eq!(dirty.mark, marks[serial], "fold {fold}: {serial:?}");
            }
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
            &WidgetMap::new(0),
            &DirtySet::default(),
            &RealFs,
            dir.path(),
            RecoveryMode::Strict,
            0,
            FOLD,
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
