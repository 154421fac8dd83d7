//! The sequencer: one OS thread that gives every write its place in one total order.
//!
//! It takes whatever writes are queued (a group) and runs the group in three stages, each
//! owning its data:
//!
//! 1. [`plan`]: runs each write's rules against the map plus the group's earlier changes,
//!    stamps each post-image with its record's LSN, pushes the records into the group's
//!    [`LogBatch`], and works out each touched widget's dirty mark from the state the
//!    rules read (no second look into the map);
//! 2. [`Log::write`]: appends the batch with one `write` and, as the fsync mode says, one
//!    `fdatasync`;
//! 3. [`publish`]: only once the batch is durable, puts the post-images into the map
//!    under the publish lock and marks them dirty with the group's last LSN; then every write
//!    is answered.
//!
//! Requests that arrive during an fsync wait in the queue and form the next group, so under
//! load many requests share one fsync. Blocking file I/O stays on this thread, off the
//! async workers.
//!
//! The commit delay (PostgreSQL's `commit_delay`, with the last group standing in for its
//! `commit_siblings`): with `--fsync always`, when the last group held more than one write,
//! concurrent writers are about, and the sequencer sleeps up to this long as soon as it has
//! answered a group, then takes what came meanwhile as the next one, so one fsync covers
//! the writes of the delay. It sleeps first rather than waiting on the queue for the next
//! group's first write: the sleep is a sleep, so the writes that arrive during it wake
//! nothing, and the sequencer leaves its core once a group instead of twice. A lone
//! writer's group never waits, nor does one that holds [`FULL_ENOUGH`] writes when the
//! last is answered; a sleep that ends on an empty queue waits for the next write as
//! without a delay. The sleep lasts no longer than the writes still missing from
//! [`FULL_ENOUGH`] should take to arrive at the rate the last groups came in ([`Pace`]),
//! as MySQL's delay ends once its count is reached: a closed loop of clients, each
//! waiting for its answer before it writes again, sends its next writes only as fast as
//! the answers go out, and a full delay there left the cores idle while every client
//! waited on it.

use super::dirty::Dirty;
use super::packed::PackedWidget;
use super::state::{Shared, WidgetMap};
use crate::domain::{Change, Mark, Rule, Serial, StateView, Touched, Tx, Widget};
use crate::engine::EngineError;
use crate::metrics::Throttle;
use crate::wal::{AppendError, FsyncMode, LogBatch, Record, WalWriter};
// foldhash: randomly seeded like std's SipHash, and several times cheaper on short serials.
use foldhash::HashMap;
use metrics::{Counter, Histogram};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most writes one group takes, so one group's latency stays bounded.
const MAX_GROUP: usize = 4096;

/// When this many jobs are queued as the last group is answered, the next group does not
/// wait for the commit delay (MySQL's `binlog_group_commit_sync_no_delay_count`): its
/// fsync is shared widely already, and the writes behind it would only wait longer. In a
/// closed loop of 64 connections, where ~30 writes are queued at each take, skipping it
/// gave 4-13% more PUTs a second (BENCHMARKS.md, "The commit delay skips a full group").
const FULL_ENOUGH: usize = 16;

pub(super) enum Job {
    Write(Box<dyn Write>),
    /// The store holds everything up to this LSN.
    Trim(u64),
    /// Dirty entries a finished flush is done with, to free here: this thread allocated
    /// them (see [`super::dirty::DirtySet::recycle`]).
    Release(Vec<(Serial, Dirty)>),
    /// A flush has taken the dirty set: fsync what is logged (under `--fsync interval` or
    /// `never` it may not be yet) before the store gets it, and answer once that is done
    /// or cannot be.
    Sync(oneshot::Sender<()>),
    Stop,
}

/// A write of any kind, waiting for its group: its rules, and where its answer goes.
pub(super) trait Write: Send {
    /// Runs the write's rules in `tx` and keeps their outcome for the answer; returns
    /// whether they accepted it.
    fn run(&mut self, tx: &mut Tx<'_, GroupView<'_>>) -> bool;

    /// Answers with the kept outcome if the group was `logged`, else with its error.
    fn answer(self: Box<Self>, logged: Result<(), EngineError>);
}

/// A write of kind `R`, and the channel its typed answer goes to.
struct Pending<R: Rule> {
    rule: R,
    outcome: Option<Result<R::Output, EngineError>>,
    reply: oneshot::Sender<Result<R::Output, EngineError>>,
}

/// The job for `rule`, and where its answer will come.
pub(super) fn write<R: Rule>(rule: R) -> (Job, oneshot::Receiver<Result<R::Output, EngineError>>) {
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        rule,
        outcome: None,
        reply,
    };
    (Job::Write(Box::new(pending)), answer)
}

impl<R: Rule> Write for Pending<R> {
    fn run(&mut self, tx: &mut Tx<'_, GroupView<'_>>) -> bool {
        let outcome = self.rule.run(tx).map_err(EngineError::from);
        let accepted = outcome.is_ok();
        self.outcome = Some(outcome);
        accepted
    }

    fn answer(self: Box<Self>, logged: Result<(), EngineError>) {
        let answer = match (logged, self.outcome) {
            (Err(error), _) => Err(error),
            (Ok(()), Some(outcome)) => outcome,
            // Refused before its rules ran (the WAL had failed).
            (Ok(()), None) => Err(EngineError::WalFailed(
                "the WAL can no longer make writes durable".into(),
            )),
        };
        let _ = self.reply.send(answer);
    }
}

/// When the log is synced.
#[derive(Debug, Clone, Copy)]
pub(super) struct SyncPolicy {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    /// How long the sequencer waits after a group for the next one's writes under
    /// concurrent load (`--fsync always` only).
    pub commit_delay: Duration,
    pub priority: SequencerPriority,
}

/// How the sequencer thread is scheduled (`--sequencer-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SequencerPriority {
    /// The process's own scheduling, as every other thread.
    #[default]
    Normal,
    /// `SCHED_FIFO` at priority 1 (Linux): as its `fdatasync` returns, the sequencer takes
    /// a core ahead of every thread at normal priority (the async workers, the flush, a
    /// PostgreSQL on the same machine) instead of waiting for one of them to be
    /// preempted. Needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least 1.
    Realtime,
}

/// Starts the sequencer thread at `policy.priority`. A priority the thread may not take
/// is an error, and the thread ends before it takes any write.
pub(super) fn spawn(
    shared: Arc<Shared>,
    writer: WalWriter,
    jobs: Receiver<Job>,
    policy: SyncPolicy,
) -> std::io::Result<JoinHandle<()>> {
    let mut seq = Sequencer {
        shared,
        log: Log::new(writer, policy.fsync, policy.fsync_interval),
        batch: LogBatch::default(),
        pending: HashMap::default(),
        commit_delay: policy.commit_delay,
        last_group: 0,
        pace: Pace::default(),
    };
    let (scheduled, was_scheduled) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("widgets-sequencer".into())
        .spawn(move || {
            let result = schedule(policy.priority);
            let ok = result.is_ok();
            let _ = scheduled.send(result);
            if ok {
                seq.run(jobs)
            }
        })?;
    let result = was_scheduled
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended as it started")));
    match result {
        Ok(()) => Ok(thread),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

/// Whether this process may put a thread at `priority`: tried on a thread of its own that
/// ends at once, so that a start that cannot is refused before it touches the data
/// directory (the sequencer takes its priority only once recovery is done).
pub fn check_priority(priority: SequencerPriority) -> std::io::Result<()> {
    if priority == SequencerPriority::Normal {
        return Ok(());
    }
    std::thread::spawn(move || schedule(priority))
        .join()
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the priority check's thread panicked",
            ))
        })
}

/// Puts the calling thread at `priority`.
#[cfg(target_os = "linux")]
fn schedule(priority: SequencerPriority) -> std::io::Result<()> {
    if priority == SequencerPriority::Normal {
        return Ok(());
    }
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pthread_self is the calling thread, and `param` is a valid sched_param that
    // outlives the call.
    let error =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    match error {
        0 => Ok(()),
        libc::EPERM => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "--sequencer-priority realtime needs CAP_SYS_NICE (as root has) or an \
             RLIMIT_RTPRIO of at least 1 (`ulimit -r 1`, systemd's LimitRTPRIO=1, Docker's \
             --ulimit rtprio=1); without either, leave it at normal",
        )),
        _ => Err(std::io::Error::from_raw_os_error(error)),
    }
}

#[cfg(not(target_os = "linux"))]
fn schedule(priority: SequencerPriority) -> std::io::Result<()> {
    match priority {
        SequencerPriority::Normal => Ok(()),
        SequencerPriority::Realtime => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "--sequencer-priority realtime is Linux-only",
        )),
    }
}

struct Sequencer {
    shared: Arc<Shared>,
    log: Log,
    /// The group's records; its buffer is kept from group to group.
    batch: LogBatch,
    /// The group's changes so far, by serial; kept from group to group, so that its table
    /// does not grow (rehashing as it goes) in every group.
    pending: HashMap<Serial, Option<Widget>>,
    commit_delay: Duration,
    /// How many jobs the last group held.
    last_group: usize,
    /// How fast writes have been arriving, which bounds the commit delay.
    pace: Pace,
}

/// The rate at which jobs have been arriving, from the groups taken: a group holds the
/// jobs that came since the last was taken (a time the sequencer waited for a first job
/// counts too, which only makes the rate lower and the delay longer, as without it).
#[derive(Debug, Default)]
struct Pace {
    /// When the last group was taken.
    last_take: Option<Instant>,
    /// Jobs a second, averaged over the last groups; 0 until known.
    per_sec: f64,
}

impl Pace {
    /// A group of `taken` jobs was taken at `now`.
    fn took(&mut self, taken: usize, now: Instant) {
        if let Some(since) = self.last_take.map(|last| now.duration_since(last)) {
            if !since.is_zero() {
                let rate = taken as f64 / since.as_secs_f64();
                self.per_sec = if self.per_sec == 0.0 {
                    rate
                } else {
                    0.75 * self.per_sec + 0.25 * rate
                };
            }
        }
        self.last_take = Some(now);
    }

    /// How long `wanted` more jobs should take to arrive at this rate, at most `cap` (all
    /// of it while the rate is not known).
    fn wait_for(&self, wanted: usize, cap: Duration) -> Duration {
        if !(self.per_sec.is_finite() && self.per_sec > 0.0) {
            return cap;
        }
        Duration::try_from_secs_f64(wanted as f64 / self.per_sec).map_or(cap, |d| d.min(cap))
    }
}

impl Sequencer {
    fn run(&mut self, jobs: Receiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            self.delay_group(&jobs, &mut group);
            if group.is_empty() {
                let first = if self.syncs_on_interval() {
                    let until_sync = self
                        .log
                        .fsync_interval
                        .saturating_sub(self.log.last_sync.elapsed());
                    match jobs.recv_timeout(until_sync) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            self.log.interval_sync(&self.shared);
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
                drain(&jobs, &mut group);
            }
            self.last_group = group.len();
            self.pace.took(group.len(), Instant::now());
            if self.process(&mut group) {
                break;
            }
        }
        if self.shared.failed.get().is_none() {
            if let Err(e) = self.log.writer.sync() {
                tracing::error!(error = %e, "final WAL fsync failed");
            }
        }
        tracing::debug!("sequencer stopped");
    }

    /// When the commit delay applies, takes what is queued into `group` and, unless that is
    /// [`FULL_ENOUGH`], sleeps the delay (or as long as the jobs still missing should take
    /// to come, if that is less) and takes what came meanwhile too. It may leave `group`
    /// empty: then the caller waits for the next job.
    fn delay_group(&mut self, jobs: &Receiver<Job>, group: &mut Vec<Job>) {
        if !self.delays_commits() {
            return;
        }
        drain(jobs, group);
        if group.len() < FULL_ENOUGH {
            let wanted = FULL_ENOUGH - group.len();
            std::thread::sleep(self.pace.wait_for(wanted, self.commit_delay));
            drain(jobs, group);
        }
    }

    /// Whether the next group waits for more writes before its fsync: every group is
    /// fsynced, and concurrent writers are about (the last group held several jobs).
    fn delays_commits(&self) -> bool {
        self.log.fsync == FsyncMode::Always
            && !self.commit_delay.is_zero()
            && self.last_group > 1
            && self.shared.failed.get().is_none()
    }

    /// Whether the WAL is synced on a timer (`--fsync interval`) rather than per group, and
    /// can still be.
    fn syncs_on_interval(&self) -> bool {
        self.log.fsync == FsyncMode::Interval && self.shared.failed.get().is_none()
    }

    /// Runs one group through its three stages; returns true when a `Stop` was among it.
    fn process(&mut self, group: &mut Vec<Job>) -> bool {
        let started = Instant::now();
        self.batch.reset(self.log.writer.next_lsn());
        let plan = plan(
            &self.shared,
            group.drain(..),
            &mut self.batch,
            &mut self.pending,
        );
        // Trim first: it frees disk space, which a group failing for lack of it needs.
        if let Some(to) = plan.trim_to {
            self.log.writer.trim(to);
            (self.shared.wal_first_lsn).store(self.log.writer.first_lsn(), Ordering::Relaxed);
        }
        let logged = if self.batch.is_empty() {
            Ok(())
        } else {
            self.log.write(&self.batch, &self.shared)
        };
        if logged.is_ok() && !self.batch.is_empty() {
            publish(&self.shared, plan.durable, self.batch.next_lsn() - 1);
        }
        if !plan.syncs.is_empty() {
            self.log.sync_for_flush(&self.shared);
            for sync in plan.syncs {
                let _ = sync.send(());
            }
        }
        // Before the answers, so that a scrape after one sees its group.
        self.log.metrics.group_seconds.record(started.elapsed());
        for write in plan.writes {
            write.answer(logged.clone());
        }
        drop(plan.release);
        plan.stop
    }
}

/// What one group will do: the records (in the caller's [`LogBatch`]), what to publish once
/// they are durable, and every write's answer.
#[derive(Default)]
struct Plan {
    /// Every change's widget, in log order, with its mark and packed post-image.
    durable: Vec<(Serial, Dirty)>,
    /// Every write, to answer once the group is logged, refusals included: a refusal may
    /// rest on an earlier change in the group (a create of the same serial), which is not
    /// durable until the group is.
    writes: Vec<Box<dyn Write>>,
    /// The highest checkpoint among the group's trims.
    trim_to: Option<u64>,
    /// Freed once the group is answered.
    release: Vec<Vec<(Serial, Dirty)>>,
    /// Flushes waiting for the log to be on disk up to this group.
    syncs: Vec<oneshot::Sender<()>>,
    stop: bool,
}

/// The map plus the group's earlier changes, which are not in the map yet.
pub(super) struct GroupView<'a> {
    map: &'a WidgetMap,
    /// One for the whole group: a guard of its own for each read cost each of them an
    /// enter and a leave of papaya's collector.
    guard: &'a papaya::LocalGuard<'a>,
    pending: &'a HashMap<Serial, Option<Widget>>,
}

impl StateView for GroupView<'_> {
    fn get(&self, serial: &Serial) -> Option<Widget> {
        match self.pending.get(serial) {
            Some(w) => w.clone(),
            None => (self.map)
                .get(serial.as_str(), self.guard)
                .map(PackedWidget::unpack),
        }
    }
}

/// Moves queued jobs into `group`, up to [`MAX_GROUP`].
fn drain(jobs: &Receiver<Job>, group: &mut Vec<Job>) {
    while group.len() < MAX_GROUP {
        match jobs.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
}

/// Stage 1: runs the group's writes in order, each seeing the ones before it, and frames
/// one record per write that changes something into `batch` (which gives it its LSN).
/// Touches nothing but `batch` and `pending` (the group's changes so far: empty when it is
/// called, and emptied again before it returns): the map and the dirty set wait for
/// [`publish`].
fn plan(
    shared: &Shared,
    jobs: impl IntoIterator<Item = Job>,
    batch: &mut LogBatch,
    pending: &mut HashMap<Serial, Option<Widget>>,
) -> Plan {
    let mut plan = Plan::default();
    debug_assert!(pending.is_empty(), "the last group's changes were emptied");
    let guard = shared.map.guard();
    for job in jobs {
        let mut write = match job {
            Job::Write(write) => write,
            Job::Trim(to) => {
                plan.trim_to = plan.trim_to.max(Some(to));
                continue;
            }
            Job::Stop => {
                plan.stop = true;
                continue;
            }
            Job::Release(entries) => {
                plan.release.push(entries);
                continue;
            }
            Job::Sync(reply) => {
                plan.syncs.push(reply);
                continue;
            }
        };
        if shared.failed.get().is_some() {
            plan.writes.push(write);
            continue;
        }
        let view = GroupView {
            map: &shared.map,
            guard: &guard,
            pending,
        };
        let mut tx = Tx::new(&view);
        let touched = if write.run(&mut tx) {
            tx.into_touched()
        } else {
            Vec::new()
        };
        // A write that changes nothing (an association that already holds) logs nothing.
        if !touched.is_empty() {
            let lsn = batch.next_lsn();
            let mut changes = Vec::with_capacity(touched.len());
            for Touched { mut change, before } in touched {
                if let Change::Put { widget, .. } = &mut change {
                    widget.version = lsn;
                }
                let mark = Mark::of(before.as_ref(), &change);
                let state = change
                    .after()
                    .map(|w| PackedWidget::pack(change.serial(), w));
                pending.insert(change.serial().clone(), change.after().cloned());
                plan.durable
                    .push((change.serial().clone(), Dirty { mark, state }));
                changes.push(change);
            }
            batch.push(&Record { changes });
        }
        plan.writes.push(write);
    }
    // Emptied here, not when the next group starts, so that its clones are not kept while
    // the sequencer waits for it.
    pending.clear();
    plan
}

/// Stage 2: the WAL writer and when it syncs.
struct Log {
    writer: WalWriter,
    fsync: FsyncMode,
    fsync_interval: Duration,
    last_sync: Instant,
    /// Groups refused for a full disk, or a failed write, logged once a second: a line a
    /// group would flood the log while the disk stays full.
    disk_full: Throttle,
    write_failed: Throttle,
    metrics: WalMetrics,
}

/// The sequencer's metrics, looked up once: a look-up by name hashes the name and
/// searches the recorder, and a group made five of them.
struct WalMetrics {
    group_seconds: Histogram,
    records: Counter,
    bytes_written: Counter,
    group_records: Histogram,
    fsync_seconds: Histogram,
}

impl WalMetrics {
    fn new() -> Self {
        // Handles taken before the recorder is installed would count into nothing.
        crate::metrics::handle();
        Self {
            group_seconds: metrics::histogram!("widgets_wal_group_seconds"),
            records: metrics::counter!("widgets_wal_records_total"),
            bytes_written: metrics::counter!("widgets_wal_bytes_written_total"),
            group_records: metrics::histogram!("widgets_wal_group_records"),
            fsync_seconds: metrics::histogram!("widgets_wal_fsync_seconds"),
        }
    }
}

impl Log {
    fn new(writer: WalWriter, fsync: FsyncMode, fsync_interval: Duration) -> Self {
        Self {
            writer,
            fsync,
            fsync_interval,
            last_sync: Instant::now(),
            disk_full: Throttle::default(),
            write_failed: Throttle::default(),
            metrics: WalMetrics::new(),
        }
    }
}

impl Log {
    /// Appends the group's records and makes them as durable as the fsync mode asks. A
    /// failed fsync (or an append that leaves the log in an unknown state) fails the WAL
    /// for good: see [`Shared::fail`].
    fn write(&mut self, batch: &LogBatch, shared: &Shared) -> Result<(), EngineError> {
        match self.writer.append(batch) {
            Ok(()) => {}
            Err(AppendError::NoSpace(e)) => {
                if let Some(groups) = self.disk_full.hit(Instant::now()) {
                    tracing::warn!(error = %e, groups, "WAL disk full: writes refused");
                }
                return Err(EngineError::DiskFull);
            }
            Err(AppendError::Write(e)) => {
                if let Some(groups) = self.write_failed.hit(Instant::now()) {
                    tracing::error!(error = %e, groups, "WAL write failed and was cut back: writes refused");
                }
                return Err(EngineError::WalWrite);
            }
            Err(e @ (AppendError::OutOfOrder { .. } | AppendError::Fatal(_))) => {
                shared.fail(e.to_string());
                return Err(EngineError::WalFailed(e.to_string()));
            }
        }
        let records = batch.records();
        self.metrics.records.increment(records);
        self.metrics
            .bytes_written
            .increment(batch.bytes().len() as u64);
        self.metrics.group_records.record(records as f64);
        let sync_now = match self.fsync {
            FsyncMode::Always => true,
            FsyncMode::Interval => self.last_sync.elapsed() >= self.fsync_interval,
            FsyncMode::Never => false,
        };
        if sync_now {
            self.sync(shared)?;
        }
        Ok(())
    }

    /// A flush's sync: everything logged so far is on disk, unless the log has failed.
    /// A log that has failed is not synced again (a failed fsync may have dropped pages
    /// that a later one would not report); a sync that fails here fails it.
    fn sync_for_flush(&mut self, shared: &Shared) {
        // Under `--fsync always` every logged group was synced before it was published.
        if self.fsync != FsyncMode::Always && shared.failed.get().is_none() {
            let _ = self.sync(shared);
        }
    }

    /// Syncs the log and times it; a failure fails the log for good.
    fn sync(&mut self, shared: &Shared) -> Result<(), EngineError> {
        let started = Instant::now();
        if let Err(e) = self.writer.sync() {
            shared.fail(e.to_string());
            return Err(EngineError::WalFailed(e.to_string()));
        }
        self.last_sync = Instant::now();
        self.metrics
            .fsync_seconds
            .record(self.last_sync.duration_since(started));
        Ok(())
    }

    /// `--fsync interval`: the interval is up with no write to carry the sync.
    fn interval_sync(&mut self, shared: &Shared) {
        if let Err(e) = self.writer.sync() {
            shared.fail(e.to_string());
        }
        self.last_sync = Instant::now();
    }
}

/// Stage 3: makes a logged group visible: its post-images go into the map under the publish
/// lock (readers see all of them or none) and into the dirty set, which then covers
/// `covered_lsn`.
fn publish(shared: &Shared, durable: Vec<(Serial, Dirty)>, covered_lsn: u64) {
    {
        let _publishing = shared.publish_lock.write().expect("publish lock");
        let guard = shared.map.guard();
        for (serial, dirty) in &durable {
            match &dirty.state {
                Some(packed) => shared.map.insert(packed.clone(), &guard),
                None => {
                    shared.map.remove(serial.as_str(), &guard);
                }
            }
        }
    }
    if shared.dirty.mark(durable, covered_lsn) >= shared.flush_batch_size {
        shared.flush_wanted.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::super::dirty::DirtySet;
    use super::super::state::WidgetMap;
    use super::*;
    use crate::domain::{
        Associate, Associated, Create, Delete, DomainError, Name, PortType, Ports, WidgetView,
    };
    use crate::wal::{Fault, FaultyFs};
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc::SyncSender;
    use tokio::sync::oneshot::error::TryRecvError;

    fn s(x: &str) -> Serial {
        Serial::parse("s", x).unwrap()
    }

    fn create(serial: &str) -> Create {
        Create {
            serial: s(serial),
            name: Name::parse("n", "w").unwrap(),
            ports: Ports::from_list("p", &[PortType::P]).unwrap(),
        }
    }

    fn associate(a: &str, b: &str) -> Associate {
        Associate {
            port: PortType::P,
            serial: s(a),
            peer: s(b),
        }
    }

    /// A new WAL in `dir` on `fs`, from LSN 1, its size counted in `bytes`.
    fn new_wal(
        fs: Arc<dyn crate::wal::WalFs>,
        dir: &std::path::Path,
        bytes: Arc<AtomicU64>,
    ) -> WalWriter {
        WalWriter::open(fs, dir, vec![], 1, 1 << 20, bytes).unwrap()
    }

    /// Shared state whose map holds widgets `a` and `b` (port P, free) at version 1.
    fn shared_with_a_and_b() -> Shared {
        let shared = Shared::new(WidgetMap::new(0), DirtySet::default(), 3);
        for serial in ["a", "b"] {
            let mut w = Widget::new(
                Name::parse("n", "w").unwrap(),
                Ports::from_list("p", &[PortType::P]).unwrap(),
            );
            w.version = 1;
            shared
                .map
                .insert(PackedWidget::pack(&s(serial), &w), &shared.map.guard());
        }
        shared
    }

    #[test]
    fn plan_orders_a_group_and_touches_nothing_but_the_batch() {
        let shared = shared_with_a_and_b();
        let (c, mut c_outcome) = write(create("c"));
        let (ab, mut ab_outcome) = write(associate("a", "b"));
        let (c_again, mut c_again_outcome) = write(create("c"));
        let (ab_again, mut ab_again_outcome) = write(associate("b", "a"));
        let released = vec![(
            s("gone"),
            Dirty {
                mark: Mark {
                    row: true,
                    ports: 0,
                },
                state: None,
            },
        )];
        let group = vec![
            c,
            ab,
            Job::Trim(5),
            Job::Release(released.clone()),
            c_again,
            Job::Trim(3),
            ab_again,
        ];
        let mut batch = LogBatch::new(10);

        let plan = plan(&shared, group, &mut batch, &mut HashMap::default());

        assert_eq!(
            (batch.first_lsn(), batch.records()),
            (10, 2),
            "one record for the create, one for the association; the refusal and the \
             association that already holds log nothing"
        );
        let durable: Vec<(&str, Mark, Option<u64>)> = plan
            .durable
            .iter()
            .map(|(serial, d)| {
                (
                    serial.as_str(),
                    d.mark,
                    d.state.as_ref().map(PackedWidget::version),
                )
            })
            .collect();
        let plugged = Mark {
            row: false,
            ports: 0b001,
        };
        assert_eq!(
            durable,
            vec![
                (
                    "c",
                    Mark {
                        row: true,
                        ports: 0
                    },
                    Some(10)
                ),
                ("a", plugged, Some(11)),
                ("b", plugged, Some(11)),
            ],
            "each post-image carries its record's LSN and the mark from its before-image"
        );
        assert_eq!(
            plan.writes.len(),
            4,
            "every write waits for the log to be answered"
        );
        assert!(
            c_outcome.try_recv().is_err(),
            "nothing is answered before the group is logged"
        );
        for write in plan.writes {
            write.answer(Ok(()));
        }
        assert!(matches!(c_outcome.try_recv(), Ok(Ok(WidgetView { .. }))));
        assert!(matches!(ab_outcome.try_recv(), Ok(Ok(Associated { .. }))));
        let c_again = c_again_outcome.try_recv().unwrap();
        assert!(
            matches!(&c_again, Err(EngineError::Domain(DomainError::WidgetExists(x))) if x.as_str() == "c"),
            "the second create sees the first one in the same group: {c_again:?}"
        );
        assert!(matches!(
            ab_again_outcome.try_recv(),
            Ok(Ok(Associated { .. }))
        ));
        assert_eq!(plan.trim_to, Some(5));
        assert_eq!(
            plan.release,
            [released],
            "a flush's entries are kept to free, and change nothing"
        );
        assert!(!plan.stop);
        assert!(
            shared.map.unpacked("c").is_none() && shared.dirty.len() == 0,
            "nothing is visible before the group is logged"
        );
        assert_eq!(
            shared.map.get("a", &shared.map.guard()).unwrap().peers()[0],
            None
        );
    }

    #[test]
    fn publish_shows_the_group_and_marks_it_dirty_up_to_its_lsn() {
        let shared = shared_with_a_and_b();
        let (c, _) = write(create("c"));
        let (ab, _) = write(associate("a", "b"));
        let (delete, _) = write(Delete { serial: s("c") });
        let mut batch = LogBatch::new(7);
        let plan = plan(
            &shared,
            vec![c, ab, delete],
            &mut batch,
            &mut HashMap::default(),
        );

        publish(&shared, plan.durable, batch.next_lsn() - 1);

        assert!(shared.map.unpacked("c").is_none(), "created, then deleted");
        assert_eq!(
            shared.map.get("a", &shared.map.guard()).unwrap().peers()[0],
            Some("b")
        );
        assert_eq!(
            shared.map.get("b", &shared.map.guard()).unwrap().peers()[0],
            Some("a")
        );
        let taken = shared.dirty.take();
        assert_eq!(taken.covered_lsn, 9);
        assert_eq!(taken.widgets.len(), 3);
        assert_eq!(
            taken.widgets[&s("c")],
            Dirty {
                mark: Mark {
                    row: true,
                    ports: 0
                },
                state: None
            },
            "a widget's marks add up and its last state wins"
        );
    }

    #[test]
    fn log_turns_each_disk_fault_into_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let shared = Shared::new(WidgetMap::new(0), DirtySet::default(), 1);
        let writer = new_wal(
            Arc::new(fs.clone()),
            dir.path(),
            Arc::new(AtomicU64::new(0)),
        );
        let mut log = Log::new(writer, FsyncMode::Always, Duration::from_secs(1));
        let batch_at = |lsn| {
            let mut batch = LogBatch::new(lsn);
            batch.push(&Record { changes: vec![] });
            batch
        };

        log.write(&batch_at(1), &shared).unwrap();
        fs.set(Fault::NoSpace);
        assert!(matches!(
            log.write(&batch_at(2), &shared),
            Err(EngineError::DiskFull)
        ));
        fs.set(Fault::WalWrite);
        assert!(matches!(
            log.write(&batch_at(2), &shared),
            Err(EngineError::WalWrite)
        ));
        fs.set(Fault::None);
        assert_eq!(
            log.writer.next_lsn(),
            2,
            "a refused batch leaves the log where it was"
        );
        log.write(&batch_at(2), &shared).unwrap();
        assert!(shared.failed.get().is_none());

        fs.set(Fault::SyncError);
        assert!(matches!(
            log.write(&batch_at(3), &shared),
            Err(EngineError::WalFailed(_))
        ));
        assert!(
            shared.failed.get().is_some(),
            "a failed fsync fails the WAL for good"
        );
    }

    #[test]
    fn a_failed_log_answers_every_write_of_the_group_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let shared = Arc::new(shared_with_a_and_b());
        let writer = new_wal(Arc::new(fs.clone()), dir.path(), shared.wal_bytes.clone());
        let mut seq = Sequencer {
            shared: shared.clone(),
            log: Log::new(writer, FsyncMode::Always, Duration::from_secs(1)),
            batch: LogBatch::default(),
            pending: HashMap::default(),
            commit_delay: Duration::ZERO,
            last_group: 0,
            pace: Pace::default(),
        };
        let (c, mut c_outcome) = write(create("c"));
        let (refused, mut refused_outcome) = write(associate("a", "zz"));
        fs.set(Fault::NoSpace);
        assert!(!seq.process(&mut vec![c, refused]));
        assert!(matches!(
            c_outcome.try_recv(),
            Ok(Err(EngineError::DiskFull))
        ));
        assert!(matches!(
            refused_outcome.try_recv(),
            Ok(Err(EngineError::DiskFull))
        ));
        assert!(shared.map.unpacked("c").is_none());
        assert!(shared.dirty.len() == 0);

        fs.set(Fault::None);
        let (c, mut c_outcome) = write(create("c"));
        assert!(seq.process(&mut vec![c, Job::Stop]));
        assert!(matches!(c_outcome.try_recv(), Ok(Ok(WidgetView { .. }))));
        assert!(matches!(c_outcome.try_recv(), Err(TryRecvError::Closed)));
        assert_eq!(shared.map.unpacked("c").unwrap().version, 1);
    }

    /// Waits up to `within` for a write's answer.
    fn answered<T>(answer: &mut oneshot::Receiver<T>, within: Duration) -> Option<T> {
        let until = Instant::now() + within;
        loop {
            match answer.try_recv() {
                Ok(value) => return Some(value),
                Err(TryRecvError::Closed) => panic!("the write was dropped unanswered"),
                Err(TryRecvError::Empty) if Instant::now() >= until => return None,
                Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// [`shared_with_a_and_b`], and a new WAL on the real file system in a temporary
    /// directory (returned to keep it), its size counted in the shared state.
    fn shared_and_a_real_wal() -> (tempfile::TempDir, Arc<Shared>, WalWriter) {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(shared_with_a_and_b());
        let writer = new_wal(
            Arc::new(crate::wal::RealFs),
            dir.path(),
            shared.wal_bytes.clone(),
        );
        (dir, shared, writer)
    }

    /// A sequencer after a group of two, so that its commit delay of `delay` applies, and
    /// its WAL's directory.
    fn after_a_group_of_two(delay: Duration) -> (tempfile::TempDir, Sequencer) {
        let (dir, shared, writer) = shared_and_a_real_wal();
        let seq = Sequencer {
            shared,
            log: Log::new(writer, FsyncMode::Always, Duration::from_secs(1)),
            batch: LogBatch::default(),
            pending: HashMap::default(),
            commit_delay: delay,
            last_group: 2,
            pace: Pace::default(),
        };
        (dir, seq)
    }

    /// Queues `n` creates and lets the commit delay take a group, as the sequencer does
    /// after answering one; returns how many jobs it took and how long that took.
    fn take_with_queued(seq: &mut Sequencer, n: usize) -> (usize, Duration) {
        let (jobs, queue) = std::sync::mpsc::sync_channel(MAX_GROUP);
        for i in 0..n {
            jobs.send(write(create(&format!("w{i}"))).0).unwrap();
        }
        let mut group = Vec::new();
        let started = Instant::now();
        seq.delay_group(&queue, &mut group);
        (group.len(), started.elapsed())
    }

    #[test]
    fn a_group_full_enough_when_taken_skips_the_commit_delay() {
        // Far longer than a take without a sleep could last.
        let delay = Duration::from_secs(10);
        let (_dir, mut seq) = after_a_group_of_two(delay);
        let (taken, took) = take_with_queued(&mut seq, FULL_ENOUGH);
        assert_eq!(taken, FULL_ENOUGH);
        assert!(took < delay / 2, "a full group waited {took:?}");

        // One write fewer, and the group waits the delay out.
        let delay = Duration::from_millis(300);
        let (_dir, mut seq) = after_a_group_of_two(delay);
        let (taken, took) = take_with_queued(&mut seq, FULL_ENOUGH - 1);
        assert_eq!(taken, FULL_ENOUGH - 1);
        assert!(took >= delay, "a group of {taken} took only {took:?}");
    }

    #[test]
    fn the_pace_bounds_the_wait_by_how_long_the_missing_writes_should_take() {
        let delay = Duration::from_millis(2);
        let mut pace = Pace::default();
        let t0 = Instant::now();
        assert_eq!(
            pace.wait_for(10, delay),
            delay,
            "no rate known: the whole delay"
        );
        pace.took(4, t0);
        assert_eq!(pace.wait_for(10, delay), delay, "one take tells no rate");
        pace.took(32, t0 + Duration::from_millis(1));
        assert_eq!(
            pace.wait_for(16, delay),
            Duration::from_micros(500),
            "at 32,000/s"
        );
        assert_eq!(pace.wait_for(160, delay), delay, "never past the delay");
        // Slower groups pull the average down, a quarter of the way each.
        pace.took(8, t0 + Duration::from_millis(2));
        assert_eq!(pace.per_sec, 0.75 * 32_000.0 + 0.25 * 8_000.0);
    }

    #[test]
    fn writes_arriving_fast_cut_the_commit_delay_short() {
        // Far longer than the test could take without it.
        let delay = Duration::from_secs(2);
        let (_dir, mut seq) = after_a_group_of_two(delay);
        let t0 = Instant::now();
        seq.pace.took(32, t0);
        seq.pace.took(32, t0 + Duration::from_millis(1));
        // One write is missing from a full group, and it should come within ~31 us.
        let (taken, took) = take_with_queued(&mut seq, FULL_ENOUGH - 1);
        assert_eq!(taken, FULL_ENOUGH - 1);
        assert!(took < delay / 4, "the group waited {took:?}");
    }

    /// Queues `rule` as a write to the sequencer behind `jobs`; returns where its answer
    /// comes.
    fn send<R: Rule>(
        jobs: &SyncSender<Job>,
        rule: R,
    ) -> oneshot::Receiver<Result<R::Output, EngineError>> {
        let (job, answer) = write(rule);
        jobs.send(job).unwrap();
        answer
    }

    /// A sequencer thread with a commit delay of `delay` that has answered a group of two,
    /// so that the delay applies to its next group: its WAL's directory, its queue and
    /// the thread.
    fn running_after_a_group_of_two(
        delay: Duration,
    ) -> (tempfile::TempDir, SyncSender<Job>, JoinHandle<()>) {
        let (dir, shared, writer) = shared_and_a_real_wal();
        let policy = SyncPolicy {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_secs(1),
            commit_delay: delay,
            priority: SequencerPriority::Normal,
        };
        let (jobs, queue) = std::sync::mpsc::sync_channel(16);
        // Two writes queued before the sequencer starts make its first group: two.
        let (mut x, mut y) = (send(&jobs, create("x")), send(&jobs, create("y")));
        let thread = spawn(shared, writer, queue, policy).unwrap();
        assert!(answered(&mut x, Duration::from_secs(2)).is_some());
        assert!(answered(&mut y, Duration::from_secs(2)).is_some());
        (dir, jobs, thread)
    }

    #[test]
    fn the_commit_delay_holds_a_group_after_concurrent_writes_and_never_a_lone_writer() {
        // Far longer than anything else here takes, so only the delay can explain a wait.
        let delay = Duration::from_secs(2);
        let (_dir, jobs, thread) = running_after_a_group_of_two(delay);

        // So the next group waits, and a write sent meanwhile joins it.
        let mut held = send(&jobs, create("held"));
        assert!(
            answered(&mut held, Duration::from_millis(300)).is_none(),
            "after a group of two, the next one waits for the commit delay"
        );
        let mut joined = send(&jobs, create("joined"));
        assert!(answered(&mut held, delay * 2).is_some());
        assert!(answered(&mut joined, Duration::from_secs(2)).is_some());

        // A lone writer: after its group of one, its next write does not wait.
        let mut alone = send(&jobs, create("alone"));
        assert!(answered(&mut alone, delay * 2).is_some());
        let mut next = send(&jobs, create("next"));
        assert!(
            answered(&mut next, Duration::from_secs(1)).is_some(),
            "a write after a group of one is not held"
        );

        jobs.send(Job::Stop).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn the_commit_delay_runs_from_the_last_answer_not_from_the_next_write() {
        let delay = Duration::from_millis(1500);
        let (_dir, jobs, thread) = running_after_a_group_of_two(delay);

        // Two thirds of the delay after that group, a write waits out only the last third
        // (a delay counted from the write itself would hold it all of 1.5 s).
        std::thread::sleep(delay * 2 / 3);
        let sent = Instant::now();
        let mut late = send(&jobs, create("late"));
        assert!(answered(&mut late, Duration::from_secs(5)).is_some());
        let waited = sent.elapsed();
        assert!(
            waited < delay * 2 / 3,
            "a write sent 1 s into the delay waited {waited:?}"
        );

        jobs.send(Job::Stop).unwrap();
        thread.join().unwrap();
    }
}
