//! The sequencer: one OS thread that gives every write its place in one total order.
//!
//! It takes whatever writes are queued (a group), validates each against the map plus the
//! group's earlier changes, frames one WAL record per change, writes the group with one
//! `write` and one `fdatasync`, and only then applies the post-images to the map, marks
//! the serials dirty and answers. Requests that arrive during an fsync wait in the queue
//! and form the next group, so under load many requests share one fsync. Blocking file
//! I/O stays on this thread, off the async workers.

use super::dirty::{Dirty, Mark};
use super::memory::Shared;
use super::packed::PackedWidget;
use super::EngineError;
use crate::domain::{Change, Command, Reply, Serial, StateView, Tx, Widget};
use crate::wal::format::{encode_record, Record};
use crate::wal::{AppendError, FsyncMode, WalWriter};
// foldhash: randomly seeded like std's SipHash, and several times cheaper on short serials.
use foldhash::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most writes one group takes, so one group's latency stays bounded.
const MAX_GROUP: usize = 4096;

/// Where a write's outcome goes.
pub(crate) type Answer = oneshot::Sender<Result<Reply, EngineError>>;

pub(crate) enum Job {
    Write {
        command: Command,
        reply: Answer,
    },
    /// The store holds everything up to this LSN.
    Trim(u64),
    Stop,
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    writer: WalWriter,
    jobs: Receiver<Job>,
    next_lsn: u64,
    fsync: FsyncMode,
    fsync_interval: Duration,
) -> JoinHandle<()> {
    let mut seq = Sequencer {
        shared,
        writer,
        next_lsn,
        fsync,
        fsync_interval,
        last_sync: Instant::now(),
        buf: Vec::with_capacity(1 << 20),
    };
    std::thread::Builder::new()
        .name("widgets-sequencer".into())
        .spawn(move || seq.run(jobs))
        .expect("spawning the sequencer thread")
}

struct Sequencer {
    shared: Arc<Shared>,
    writer: WalWriter,
    next_lsn: u64,
    fsync: FsyncMode,
    fsync_interval: Duration,
    last_sync: Instant,
    buf: Vec<u8>,
}

/// The map plus the current group's changes, which are not in the map yet.
struct GroupView<'a> {
    shared: &'a Shared,
    pending: &'a HashMap<Serial, Option<Widget>>,
}

impl StateView for GroupView<'_> {
    fn get(&self, serial: &Serial) -> Option<Widget> {
        view_get(self.shared, self.pending, serial)
    }
}

fn view_get(
    shared: &Shared,
    pending: &HashMap<Serial, Option<Widget>>,
    serial: &Serial,
) -> Option<Widget> {
    match pending.get(serial) {
        Some(w) => w.clone(),
        None => shared.map.pin().get(serial).map(PackedWidget::unpack),
    }
}

impl Sequencer {
    fn run(&mut self, jobs: Receiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            let first = if self.writer_has_unsynced_interval() {
                match jobs
                    .recv_timeout(self.fsync_interval.saturating_sub(self.last_sync.elapsed()))
                {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        self.interval_sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let stop = self.process(&mut group);
            if stop {
                break;
            }
        }
        if self.shared.failed.get().is_none() {
            if let Err(e) = self.writer.sync() {
                tracing::error!(error = %e, "final WAL fsync failed");
            }
        }
        tracing::debug!("sequencer stopped");
    }

    fn writer_has_unsynced_interval(&self) -> bool {
        self.fsync == FsyncMode::Interval && self.shared.failed.get().is_none()
    }

    fn interval_sync(&mut self) {
        if let Err(e) = self.writer.sync() {
            self.fail(e.to_string());
        }
        self.last_sync = Instant::now();
    }

    fn fail(&self, reason: String) {
        tracing::error!(reason = %reason, "the WAL can no longer make writes durable: refusing all writes until restart");
        let _ = self.shared.failed.set(reason);
    }

    /// Runs one group; returns true when a `Stop` was among it.
    fn process(&mut self, group: &mut Vec<Job>) -> bool {
        let mut stop = false;
        let mut trim_to = None;
        // Every answer, refusals included, waits for the group's log: a refusal may rest on
        // an earlier change in the group (a create of the same serial), which is not durable
        // until the group is.
        let mut answers: Vec<(Answer, Result<Reply, EngineError>)> = Vec::new();
        let mut pending: HashMap<Serial, Option<Widget>> = HashMap::default();
        let mut changes: Vec<Change> = Vec::new();
        let mut marks: Vec<(Serial, Mark)> = Vec::new();
        let first_lsn = self.next_lsn;
        let mut lsn = first_lsn;
        self.buf.clear();

        for job in group.drain(..) {
            let (command, reply) = match job {
                Job::Write { command, reply } => (command, reply),
                Job::Trim(to) => {
                    trim_to = trim_to.max(Some(to));
                    continue;
                }
                Job::Stop => {
                    stop = true;
                    continue;
                }
            };
            if let Some(reason) = self.shared.failed.get() {
                let _ = reply.send(Err(EngineError::WalFailed(reason.clone())));
                continue;
            }
            let view = GroupView {
                shared: &self.shared,
                pending: &pending,
            };
            let mut tx = Tx::new(&view);
            let answer = match command.apply(&mut tx) {
                Ok(answer) => answer,
                Err(e) => {
                    answers.push((reply, Err(e.into())));
                    continue;
                }
            };
            let mut record = Record {
                changes: tx.into_changes(),
            };
            // A write that changes nothing (an association that already holds) logs
            // nothing, but still answers after the group: it may have read the group's
            // earlier, not yet durable, changes.
            if !record.changes.is_empty() {
                for change in &mut record.changes {
                    if let Change::Put { widget, .. } = change {
                        widget.version = lsn;
                    }
                }
                encode_record(&mut self.buf, lsn, &record);
                for change in &record.changes {
                    let before = view_get(&self.shared, &pending, change.serial());
                    marks.push((change.serial().clone(), Mark::of(before.as_ref(), change)));
                    let post = match change {
                        Change::Put { widget, .. } => Some(widget.clone()),
                        Change::Delete { .. } => None,
                    };
                    pending.insert(change.serial().clone(), post);
                }
                changes.extend(record.changes);
                lsn += 1;
            }
            answers.push((reply, Ok(answer)));
        }

        // Trim first: it frees disk space, which a group failing for lack of it needs.
        if let Some(to) = trim_to {
            self.writer.trim(to);
        }
        if !self.buf.is_empty() {
            if let Err(error) = self.log(first_lsn, lsn - first_lsn) {
                for (reply, _) in answers {
                    let _ = reply.send(Err(error.clone()));
                }
                return stop;
            }
            self.next_lsn = lsn;
            // Packed before the apply lock: readers wait while it is held.
            let durable: Vec<(Serial, Dirty)> = marks
                .into_iter()
                .zip(changes)
                .map(|((serial, mark), change)| {
                    debug_assert_eq!(&serial, change.serial());
                    let state = match change {
                        Change::Put { widget, .. } => Some(PackedWidget::pack(&widget)),
                        Change::Delete { .. } => None,
                    };
                    (serial, Dirty { mark, state })
                })
                .collect();
            {
                let _applying = self.shared.apply_lock.write().expect("apply lock");
                let guard = self.shared.map.guard();
                for (serial, dirty) in &durable {
                    match &dirty.state {
                        Some(packed) => {
                            self.shared
                                .map
                                .insert(serial.clone(), packed.clone(), &guard);
                        }
                        None => {
                            self.shared.map.remove(serial, &guard);
                        }
                    }
                }
            }
            if self.shared.dirty.mark(durable, lsn - 1) >= self.shared.flush_batch_size {
                self.shared.flush_wanted.notify_one();
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        stop
    }

    /// Appends the group's records and makes them as durable as the fsync mode asks.
    fn log(&mut self, first_lsn: u64, records: u64) -> Result<(), EngineError> {
        match self.writer.append(&self.buf, first_lsn) {
            Ok(()) => {}
            Err(AppendError::NoSpace(e)) => {
                tracing::warn!(error = %e, "WAL disk full: write refused");
                return Err(EngineError::DiskFull);
            }
            Err(AppendError::Write(e)) => {
                tracing::error!(error = %e, "WAL write failed and was cut back: write refused");
                return Err(EngineError::Storage);
            }
            Err(AppendError::Fatal(e)) => {
                self.fail(e.to_string());
                return Err(EngineError::WalFailed(e.to_string()));
            }
        }
        metrics::counter!("widgets_wal_records_total").increment(records);
        metrics::counter!("widgets_wal_bytes_written_total").increment(self.buf.len() as u64);
        metrics::histogram!("widgets_wal_group_records").record(records as f64);
        let sync_now = match self.fsync {
            FsyncMode::Always => true,
            FsyncMode::Interval => self.last_sync.elapsed() >= self.fsync_interval,
            FsyncMode::Never => false,
        };
        if sync_now {
            if let Err(e) = self.writer.sync() {
                self.fail(e.to_string());
                return Err(EngineError::WalFailed(e.to_string()));
            }
            self.last_sync = Instant::now();
        }
        Ok(())
    }
}
