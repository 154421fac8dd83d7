//! Appending to the log: one write and (by the caller's choice) one fdatasync per batch,
//! segment rotation at a set size, segments made zero-filled ahead of need, and trimming
//! of segments the store has absorbed.

use super::format::{encode_segment_header, segment_file_name, LogBatch, SEGMENT_HEADER_LEN};
use super::fs::{WalFile, WalFs};
use super::WalError;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// A segment on disk: its first LSN, path and length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub first_lsn: u64,
    pub path: PathBuf,
    pub len: u64,
}

/// Why a batch was not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The disk is full; nothing of the batch is in the log. Writing may work later.
    #[error("no space left for the WAL: {0}")]
    NoSpace(io::Error),
    /// Another write error; nothing of the batch is in the log.
    #[error("WAL write failed: {0}")]
    Write(io::Error),
    /// The batch does not start where the log ends (a bug in the caller); nothing of it
    /// was written.
    #[error("a batch starting at LSN {got} does not follow the log, which ends before {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    /// The log's state on disk is unknown: stop acknowledging writes.
    #[error("{0}")]
    Fatal(WalError),
}

impl AppendError {
    fn from_write(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull {
            AppendError::NoSpace(e)
        } else {
            AppendError::Write(e)
        }
    }
}

pub struct WalWriter {
    fs: Arc<dyn WalFs>,
    dir: PathBuf,
    sealed: VecDeque<SegmentInfo>,
    active: SegmentInfo,
    file: Box<dyn WalFile>,
    segment_size: u64,
    /// Bytes of every segment on disk, shared with whoever enforces the WAL size limit.
    total_bytes: Arc<AtomicU64>,
    /// Whether the active segment has bytes not yet fdatasynced.
    unsynced: bool,
    /// The LSN the next batch must start at.
    next_lsn: u64,
    /// Where trimmed segments go to be deleted, off the caller's thread.
    remover: Remover,
    /// Makes zero-filled segments ahead of need, if the writer preallocates.
    spares: Option<Spares>,
    /// `widgets_wal_fsyncs_total`, looked up once rather than by name at every fsync.
    fsyncs: metrics::Counter,
}

impl WalWriter {
    /// Opens the log for appending after recovery: `sealed` are the segments recovery kept,
    /// and the active segment starts at `next_lsn`: the last of them if it starts there and
    /// holds no record (its name stays on disk throughout), or a new one.
    pub fn open(
        fs: Arc<dyn WalFs>,
        dir: &Path,
        mut sealed: Vec<SegmentInfo>,
        next_lsn: u64,
        segment_size: u64,
        total_bytes: Arc<AtomicU64>,
    ) -> Result<Self, WalError> {
        let path = dir.join(segment_file_name(next_lsn));
        let empty_at_next =
            sealed.pop_if(|s| s.first_lsn == next_lsn && s.len == SEGMENT_HEADER_LEN as u64);
        let opened = match empty_at_next {
            Some(active) => fs
                .open(&active.path)
                .map(|file| (active, file))
                .map_err(AppendError::from_write),
            None => create_segment(&*fs, dir, next_lsn),
        };
        let (active, file) = opened.map_err(|e| match e {
            AppendError::Fatal(e) => e,
            AppendError::NoSpace(source) | AppendError::Write(source) => {
                WalError::Io { path, source }
            }
            other => WalError::Io {
                path,
                source: io::Error::other(other.to_string()),
            },
        })?;
        let bytes = sealed.iter().map(|s| s.len).sum::<u64>() + active.len;
        total_bytes.store(bytes, Ordering::Relaxed);
        let remover = Remover::start(fs.clone(), dir, total_bytes.clone()).map_err(|source| {
            WalError::Io {
                path: dir.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            remover,
            fs,
            dir: dir.to_owned(),
            sealed: sealed.into(),
            active,
            file,
            segment_size,
            total_bytes,
            unsynced: false,
            next_lsn,
            spares: None,
            fsyncs: {
                crate::metrics::handle();
                metrics::counter!("widgets_wal_fsyncs_total")
            },
        })
    }

    /// From now on, every segment is a file of the segment size written with zeros and
    /// synced before it takes records: the open one (empty until now) at once, each later
    /// one ahead of need on a thread of the writer's own. Appending into blocks already
    /// written changes no file metadata, so each fdatasync writes the records alone;
    /// appending to a growing file also writes its new size and block map, which took 57
    /// us of CPU per fdatasync here against 39 us into zeros and, on a file system without
    /// a journal, two more waits on the disk (BENCHMARKS.md, "Zero-filled WAL segments").
    /// A segment that cannot be made so (a full disk) is logged, and a plain one taken
    /// instead.
    ///
    /// The cost: each segment's zeros are written once more, the directory holds a spare
    /// segment besides the log, and a start waits for one segment's zeros. Worth it where
    /// a written block stays put; on a copy-on-write file system (btrfs, ZFS) an
    /// overwrite allocates anew anyway.
    pub fn preallocate(&mut self) -> Result<(), WalError> {
        if self.spares.is_some() {
            return Ok(());
        }
        let mut spares = Spares::start(self.fs.clone(), &self.dir, self.segment_size)
            .map_err(WalError::io(&self.dir))?;
        if self.active.len == SEGMENT_HEADER_LEN as u64 {
            // The open segment holds no record: a zero-filled one takes its name.
            let made = make_spare(
                &*self.fs,
                &self.dir,
                self.segment_size,
                &AtomicBool::new(false),
            )
            .map_err(AppendError::from_write)
            .and_then(|spare| use_spare(&*self.fs, &self.dir, spare, self.active.first_lsn));
            match made {
                Ok((active, file)) => {
                    self.active = active;
                    self.file = file;
                }
                Err(AppendError::Fatal(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not make a zero-filled WAL segment; the first one grows as records come")
                }
            }
        }
        spares.ask();
        self.spares = Some(spares);
        Ok(())
    }

    /// Appends `batch`, which must start at [`WalWriter::next_lsn`]. On error no byte of
    /// the batch remains in the log and its LSNs are not used up.
    pub fn append(&mut self, batch: &LogBatch) -> Result<(), AppendError> {
        if batch.first_lsn() != self.next_lsn {
            return Err(AppendError::OutOfOrder {
                expected: self.next_lsn,
                got: batch.first_lsn(),
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        let bytes = batch.bytes();
        if self.active.len > SEGMENT_HEADER_LEN as u64
            && self.active.len + bytes.len() as u64 > self.segment_size
        {
            self.rotate(batch.first_lsn())?;
        }
        let at = self.active.len;
        if let Err(e) = self.file.write_all_at(bytes, at) {
            // Part of the batch may be in the file: cut it off so the log ends on a whole
            // record, as if the batch had never been written. (A zero-filled segment loses
            // its zeros too, and grows from here like a plain one.)
            if let Err(cut) = self.file.set_len(at) {
                return Err(AppendError::Fatal(WalError::Io {
                    path: self.active.path.clone(),
                    source: io::Error::new(
                        cut.kind(),
                        format!("write failed ({e}) and cutting it back failed too: {cut}"),
                    ),
                }));
            }
            return Err(AppendError::from_write(e));
        }
        self.active.len += bytes.len() as u64;
        self.total_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.unsynced = true;
        self.next_lsn = batch.next_lsn();
        Ok(())
    }

    /// The LSN the next batch must start at.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// fdatasyncs the active segment if it has unsynced bytes; returns whether it did.
    /// An error here is fatal for the writer.
    pub fn sync(&mut self) -> Result<bool, WalError> {
        if !self.unsynced {
            return Ok(false);
        }
        self.file
            .sync_data()
            .map_err(WalError::io(&self.active.path))?;
        self.unsynced = false;
        self.fsyncs.increment(1);
        Ok(true)
    }

    fn rotate(&mut self, first_lsn: u64) -> Result<(), AppendError> {
        // The old segment must be whole on disk before records follow it in a new one.
        self.sync().map_err(AppendError::Fatal)?;
        let spare = self.spares.as_mut().and_then(Spares::take);
        let (active, file) = match spare {
            Some(spare) => use_spare(&*self.fs, &self.dir, spare, first_lsn)?,
            None => create_segment(&*self.fs, &self.dir, first_lsn)?,
        };
        if let Some(spares) = &mut self.spares {
            spares.ask();
        }
        self.total_bytes.fetch_add(active.len, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.active, active);
        self.sealed.push_back(old);
        self.file = file;
        Ok(())
    }

    /// Deletes the segments whose every record is at or below `checkpoint` (the store
    /// holds them), oldest first, on the writer's deleting thread: this returns at once.
    /// Never deletes the active segment. Returns how many it handed over.
    pub fn trim(&mut self, checkpoint: u64) -> usize {
        let mut trimmed = 0;
        while !self.sealed.is_empty() {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_lsn, |s| s.first_lsn);
            if next_first > checkpoint.saturating_add(1) {
                break;
            }
            let oldest = self.sealed.pop_front().expect("a front segment");
            self.remover.remove(oldest);
            trimmed += 1;
        }
        trimmed
    }

    /// The first LSN the log still holds (that of its oldest segment on disk).
    pub fn first_lsn(&self) -> u64 {
        self.sealed.front().unwrap_or(&self.active).first_lsn
    }

    /// Every segment on disk, oldest first.
    pub fn segments(&self) -> impl Iterator<Item = &SegmentInfo> {
        self.sealed.iter().chain(std::iter::once(&self.active))
    }
}

/// Deletes trimmed segments on a thread of its own. Unlinking a 64 MiB segment took 40-52
/// ms here (the kernel drops the file's cached pages as it goes): on the sequencer thread,
/// that stalled every write once a segment's worth of log had reached the store.
///
/// Segments go in the order they were trimmed, oldest first, and a segment that could
/// not be deleted is tried again, before any later one, when a later trim hands over the
/// next segment: a younger segment never goes while an older one stays, so the log on
/// disk never has a hole. The WAL's byte count drops as each file goes. Dropping the remover waits for what
/// it was handed.
struct Remover {
    queue: Option<mpsc::Sender<SegmentInfo>>,
    thread: Option<JoinHandle<()>>,
}

impl Remover {
    fn start(fs: Arc<dyn WalFs>, dir: &Path, total_bytes: Arc<AtomicU64>) -> io::Result<Self> {
        let (queue, trimmed) = mpsc::channel::<SegmentInfo>();
        let dir = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("widgets-wal-trim".into())
            .spawn(move || {
                let mut waiting = VecDeque::new();
                while let Ok(first) = trimmed.recv() {
                    waiting.push_back(first);
                    waiting.extend(trimmed.try_iter());
                    remove_in_order(&*fs, &dir, &mut waiting, &total_bytes);
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    fn remove(&self, segment: SegmentInfo) {
        if let Some(queue) = &self.queue {
            // The thread ends only once the queue is dropped, below.
            let _ = queue.send(segment);
        }
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Deletes `waiting` from the front, up to the first that cannot be deleted (left for the
/// next try), then fsyncs the directory if any went.
fn remove_in_order(
    fs: &dyn WalFs,
    dir: &Path,
    waiting: &mut VecDeque<SegmentInfo>,
    total_bytes: &AtomicU64,
) {
    let mut removed = 0;
    while let Some(oldest) = waiting.front() {
        if let Err(e) = fs.remove(&oldest.path) {
            tracing::warn!(path = %oldest.path.display(), error = %e, "could not delete a trimmed WAL segment; will retry when the next one is trimmed");
            break;
        }
        total_bytes.fetch_sub(oldest.len, Ordering::Relaxed);
        waiting.pop_front();
        removed += 1;
    }
    if removed > 0 {
        if let Err(e) = fs.sync_dir(dir) {
            // Harmless: a resurrected old segment only holds records below the checkpoint.
            tracing::warn!(error = %e, "fsync of the WAL directory after trimming failed");
        }
    }
}

/// The file name of the spare segment, from when it is begun until it becomes a segment.
/// Recovery passes it by; the writer makes it again.
pub(super) const SPARE_FILE: &str = "spare.tmp";
/// Zeros written at a time into a spare, and synced every [`SPARE_SYNC_EVERY`] of them,
/// so that the disk never holds much of a spare's zeros at once in front of the log's own
/// fdatasyncs.
const SPARE_CHUNK: usize = 1 << 20;
const SPARE_SYNC_EVERY: u64 = 4 << 20;

/// Makes one spare segment at a time, on request, on a thread of its own
/// ([`WalWriter::preallocate`]).
struct Spares {
    ask: Option<mpsc::Sender<()>>,
    made: mpsc::Receiver<io::Result<Box<dyn WalFile>>>,
    /// A spare was asked for and not yet taken.
    asked: bool,
    /// Tells the thread to give up the spare it is making (the writer is going).
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    fs: Arc<dyn WalFs>,
    dir: PathBuf,
}

impl Spares {
    fn start(fs: Arc<dyn WalFs>, dir: &Path, size: u64) -> io::Result<Self> {
        let (ask, asked) = mpsc::channel::<()>();
        let (done, made) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fs, dir, stop) = (fs.clone(), dir.to_owned(), stop.clone());
            std::thread::Builder::new()
                .name("widgets-wal-spare".into())
                .spawn(move || {
                    for () in asked {
                        let spare = make_spare(&*fs, &dir, size, &stop);
                        if done.send(spare).is_err() {
                            break;
                        }
                    }
                })?
        };
        Ok(Self {
            ask: Some(ask),
            made,
            asked: false,
            stop,
            thread: Some(thread),
            fs,
            dir: dir.to_owned(),
        })
    }

    /// Asks for a spare, unless one is on its way.
    fn ask(&mut self) {
        if !self.asked {
            if let Some(ask) = &self.ask {
                self.asked = ask.send(()).is_ok();
            }
        }
    }

    /// The spare asked for, if it is ready.
    fn take(&mut self) -> Option<Box<dyn WalFile>> {
        if !self.asked {
            return None;
        }
        match self.made.try_recv() {
            Ok(Ok(spare)) => {
                self.asked = false;
                Some(spare)
            }
            Ok(Err(e)) => {
                // Asked for again after this rotation.
                tracing::warn!(error = %e, "could not make a zero-filled WAL segment ahead; starting a plain one");
                self.asked = false;
                None
            }
            Err(_) => None,
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.ask.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // An unused spare is only zeros: not left behind to take up room.
        let _ = self.fs.remove(&self.dir.join(SPARE_FILE));
    }
}

/// Writes the spare segment: `size` bytes of zeros, synced. A failure (or `stop`) removes
/// what was written.
fn make_spare(
    fs: &dyn WalFs,
    dir: &Path,
    size: u64,
    stop: &AtomicBool,
) -> io::Result<Box<dyn WalFile>> {
    let path = dir.join(SPARE_FILE);
    match fs.remove(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let write = || {
        let mut file = fs.create_new(&path)?;
        let zeros = vec![0u8; SPARE_CHUNK];
        let mut at = 0;
        while at < size {
            if stop.load(Ordering::Relaxed) {
                return Err(io::Error::other("the writer is closing"));
            }
            let n = (size - at).min(SPARE_CHUNK as u64);
            file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
            if at % SPARE_SYNC_EVERY == 0 || at == size {
                file.sync_data()?;
            }
        }
        Ok(file)
    };
    write().inspect_err(|_| {
        let _ = fs.remove(&path);
    })
}

/// Makes the spare the segment that starts at `first_lsn`: its header goes in and is
/// synced before the file takes the segment's name, so a segment never has a header of
/// zeros; then the directory is fsynced, as for a new segment.
fn use_spare(
    fs: &dyn WalFs,
    dir: &Path,
    mut spare: Box<dyn WalFile>,
    first_lsn: u64,
) -> Result<(SegmentInfo, Box<dyn WalFile>), AppendError> {
    let from = dir.join(SPARE_FILE);
    let path = dir.join(segment_file_name(first_lsn));
    write_header(fs, &mut *spare, first_lsn, &from)?;
    if let Err(e) = fs.rename(&from, &path) {
        let _ = fs.remove(&from);
        return Err(AppendError::from_write(e));
    }
    segment_in_dir(fs, dir, path, first_lsn, spare)
}

/// Creates a segment file with its header, fsyncs it and the directory.
fn create_segment(
    fs: &dyn WalFs,
    dir: &Path,
    first_lsn: u64,
) -> Result<(SegmentInfo, Box<dyn WalFile>), AppendError> {
    let path = dir.join(segment_file_name(first_lsn));
    let mut file = fs.create_new(&path).map_err(AppendError::from_write)?;
    write_header(fs, &mut *file, first_lsn, &path)?;
    segment_in_dir(fs, dir, path, first_lsn, file)
}

/// Writes a new segment's header into `file`, found at `path`, and syncs it. A failed
/// write removes the file; a failed sync is fatal.
fn write_header(
    fs: &dyn WalFs,
    file: &mut dyn WalFile,
    first_lsn: u64,
    path: &Path,
) -> Result<(), AppendError> {
    if let Err(e) = file.write_all_at(&encode_segment_header(first_lsn), 0) {
        let _ = fs.remove(path);
        return Err(AppendError::from_write(e));
    }
    file.sync_data()
        .map_err(|e| AppendError::Fatal(WalError::io(path)(e)))
}

/// fsyncs the directory that now holds the new segment at `path`, and hands it over.
fn segment_in_dir(
    fs: &dyn WalFs,
    dir: &Path,
    path: PathBuf,
    first_lsn: u64,
    file: Box<dyn WalFile>,
) -> Result<(SegmentInfo, Box<dyn WalFile>), AppendError> {
    fs.sync_dir(dir)
        .map_err(|e| AppendError::Fatal(WalError::io(dir)(e)))?;
    tracing::debug!(path = %path.display(), "new WAL segment");
    Ok((
        SegmentInfo {
            first_lsn,
            path,
            len: SEGMENT_HEADER_LEN as u64,
        },
        file,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::tests::sample;
    use crate::wal::{Fault, FaultyFs};
    use tempfile::TempDir;

    /// A writer whose segments hold one record each, with records 1..=`n` appended.
    fn log_of(dir: &Path, fs: &FaultyFs, n: u64, bytes: &Arc<AtomicU64>) -> WalWriter {
        let mut w =
            WalWriter::open(Arc::new(fs.clone()), dir, vec![], 1, 64, bytes.clone()).unwrap();
        for lsn in 1..=n {
            let mut batch = LogBatch::new(lsn);
            batch.push(&sample(lsn));
            w.append(&batch).unwrap();
        }
        w.sync().unwrap();
        w
    }

    fn on_disk(dir: &Path) -> Vec<u64> {
        let mut lsns: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                crate::wal::format::parse_segment_file_name(e.unwrap().file_name().to_str()?)
            })
            .collect();
        lsns.sort();
        lsns
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn trimmed_segments_go_oldest_first_and_a_failed_one_holds_back_the_younger() {
        let dir = TempDir::new().unwrap();
        let fs = FaultyFs::new();
        let bytes = Arc::new(AtomicU64::new(0));
        let mut w = log_of(dir.path(), &fs, 4, &bytes);
        assert_eq!(on_disk(dir.path()), [1, 2, 3, 4]);

        // Segments 1 and 2 are in the store, but nothing can be deleted.
        fs.set(Fault::RemoveError);
        assert_eq!(w.trim(2), 2, "handed over at once");
        // The deleting thread has nothing else to do: give it time to fail.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            on_disk(dir.path()),
            [1, 2, 3, 4],
            "2 stays while 1 cannot go: no hole in the log"
        );
        assert_eq!(bytes.load(Ordering::Relaxed), disk_bytes(dir.path()));

        // The next trim tries 1 and 2 again, before 3.
        fs.set(Fault::None);
        assert_eq!(w.trim(3), 1);
        drop(w); // waits for the deletions handed over
        assert_eq!(on_disk(dir.path()), [4]);
        assert_eq!(
            bytes.load(Ordering::Relaxed),
            disk_bytes(dir.path()),
            "the byte count follows the files"
        );
    }

    /// With preallocation, every segment is the segment's size on disk from the start,
    /// zeros after its records, the open one included; the WAL's byte count is its
    /// records'. Recovery reads every record back in order, and closing the writer removes
    /// the unused spare.
    #[test]
    fn preallocated_segments_take_every_record_and_replay() {
        let dir = TempDir::new().unwrap();
        let size = 4096;
        let bytes = Arc::new(AtomicU64::new(0));
        let mut w = WalWriter::open(
            Arc::new(crate::wal::RealFs),
            dir.path(),
            vec![],
            1,
            size,
            bytes.clone(),
        )
        .unwrap();
        w.preallocate().unwrap();
        assert_eq!(std::fs::metadata(&w.active.path).unwrap().len(), size);
        let mut lsn = 1;
        let mut append = |w: &mut WalWriter| {
            let mut batch = LogBatch::new(lsn);
            batch.push(&sample(lsn));
            w.append(&batch).unwrap();
            w.sync().unwrap();
            lsn += 1;
        };
        // Slowly enough that a spare is ready at each rotation, most likely.
        let mut zero_filled = 0;
        while w.segments().count() < 5 {
            let active = w.active.path.clone();
            append(&mut w);
            if w.active.path != active {
                zero_filled += u64::from(std::fs::metadata(&w.active.path).unwrap().len() == size);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(
            zero_filled >= 2,
            "the spares became segments: {zero_filled} of 4"
        );
        assert_eq!(
            bytes.load(Ordering::Relaxed),
            w.segments().map(|s| s.len).sum::<u64>()
        );
        let last = w.next_lsn() - 1;
        drop(w);
        assert!(!dir.path().join(SPARE_FILE).exists());

        let mut seen = Vec::new();
        let recovered = crate::wal::recover(
            &crate::wal::RealFs,
            dir.path(),
            crate::wal::RecoveryMode::Strict,
            0,
            |lsn, record| {
                assert_eq!(record, sample(lsn));
                seen.push(lsn);
            },
        )
        .unwrap();
        assert_eq!(seen, (1..=last).collect::<Vec<_>>());
        assert_eq!(recovered.last_lsn, last);
    }
}
