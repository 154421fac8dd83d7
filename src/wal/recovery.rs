//! Start-up replay: read every segment in LSN order, hand each record above the
//! checkpoint to the caller, cut a torn tail, refuse (or, if asked, cut at) real damage.

use super::format::{
    check_frame, decode_record, decode_segment_header, is_zero_tail, parse_segment_file_name,
    HeaderError, Record, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use super::fs::{create_dir_durably, WalFs};
use super::writer::SegmentInfo;
use super::{RecoveryMode, WalError};
use std::path::{Path, PathBuf};

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    /// The segments that remain, oldest first, ready for [`super::WalWriter::open`].
    pub segments: Vec<SegmentInfo>,
    /// The last LSN in the log, or the checkpoint if the log holds nothing above it.
    pub last_lsn: u64,
    /// How many records above the checkpoint were handed to the caller.
    pub replayed: u64,
    /// Where the log ends, as far as its segments show: its last whole record, or, when
    /// its newest segment holds none, the LSN before that segment's first (the log ended
    /// there when the segment was made). `None` for a directory with no segment. A log
    /// that ends below the store's checkpoint is older than the store.
    pub end: Option<u64>,
    /// Whether truncate mode cut the log at damage (not a torn tail): what it dropped is
    /// gone, and the log may then end below the store's checkpoint.
    pub cut: bool,
}

/// Replays the log in `dir`. `apply` gets every record whose LSN is above `checkpoint`, in
/// order. Torn tails are cut on disk so the next start sees a clean log.
pub fn recover(
    fs: &dyn WalFs,
    dir: &Path,
    mode: RecoveryMode,
    checkpoint: u64,
    apply: impl FnMut(u64, Record),
) -> Result<Recovered, WalError> {
    recover_segments(fs, dir, mode, checkpoint, |_| {}, apply)
}

/// [`recover`], showing `segment` the bytes of each segment that may hold records above
/// the checkpoint (header first, possibly ending in damage or zeros) before `apply` gets
/// its records: for a caller that sizes what it replays into. A segment that the next
/// one's first LSN shows to end at or below the checkpoint is not shown; the last one
/// always is, and may hold none.
///
/// Such a segment is not read either: everything in it is in the store already, and the
/// writer trims it. It is there after a crash between a flush's commit and the trim's
/// unlink, and damage in it is no reason to refuse a start, nor to cut the log after it.
///
/// A log whose first segment starts above the LSN after the checkpoint is refused in
/// either mode as [`WalError::Corrupt`] (truncate mode cuts it all): the records between
/// are in neither the store nor the log, and a segment with no record still names where
/// the log had got to.
pub fn recover_segments(
    fs: &dyn WalFs,
    dir: &Path,
    mode: RecoveryMode,
    checkpoint: u64,
    mut segment: impl FnMut(&[u8]),
    mut apply: impl FnMut(u64, Record),
) -> Result<Recovered, WalError> {
    create_dir_durably(fs, dir).map_err(|(path, source)| WalError::Io { path, source })?;
    let mut names: Vec<(u64, String)> = Vec::new();
    for name in fs.list(dir).map_err(WalError::io(dir))? {
        match parse_segment_file_name(&name) {
            Some(first) => names.push((first, name)),
            // A spare segment being made when the last instance stopped: the next writer
            // makes it again.
            None if name == super::identity::IDENTITY_FILE
                || name == super::identity::IDENTITY_TEMP_FILE
                || name == super::LOCK_FILE
                || name == super::writer::SPARE_FILE => {}
            None => {
                tracing::warn!(file = %name, "ignoring a file in the WAL directory that is not a segment")
            }
        }
    }
    names.sort();

    let mut out = Recovered {
        segments: Vec::new(),
        last_lsn: checkpoint,
        replayed: 0,
        end: None,
        cut: false,
    };
    // The LSN the next record must have; None until the first segment is read.
    let mut expected: Option<u64> = None;
    let count = names.len();
    let mut data = Vec::new();
    for (i, (first_lsn, name)) in names.iter().enumerate() {
        let path = dir.join(name);
        let is_last = i + 1 == count;
        // Whether the segment may hold a record above the checkpoint: the next one's
        // first LSN shows where it ends.
        let replays = names
            .get(i + 1)
            .is_none_or(|(next, _)| *next > checkpoint.saturating_add(1));
        if !replays {
            let next = names[i + 1].0;
            let len = fs.len(&path).map_err(WalError::io(&path))?;
            out.segments.push(SegmentInfo {
                first_lsn: *first_lsn,
                path,
                len,
            });
            expected = Some(next);
            continue;
        }
        read_segment(fs, &path, &mut data)?;
        let damage = |offset: usize, reason: String| Damage {
            path: path.clone(),
            offset,
            reason,
            hole: false,
        };

        let scan = match decode_segment_header(&data) {
            Err(HeaderError::Short(_)) if is_last => {
                // A crash while creating the segment: it never held a record.
                tracing::warn!(file = %path.display(), "removing a WAL segment whose header was never completed");
                fs.remove(&path).map_err(WalError::io(&path))?;
                fs.sync_dir(dir).map_err(WalError::io(dir))?;
                break;
            }
            Err(e) => Err(damage(0, e.to_string())),
            Ok(lsn) if lsn != *first_lsn => Err(damage(
                0,
                format!("header names LSN {lsn} but the file name says {first_lsn}"),
            )),
            Ok(_) => match expected {
                // Never a torn tail either: a segment is made only once the one before it
                // is synced.
                Some(exp) if exp != *first_lsn => Err(Damage {
                    hole: true,
                    ..damage(
                        0,
                        format!("segment starts at LSN {first_lsn}, but the previous one ended before LSN {exp}"),
                    )
                }),
                None if *first_lsn > checkpoint.saturating_add(1) => Err(Damage {
                    // Never a torn tail, even in a segment with no record: its name says
                    // the log had reached the LSN before it.
                    hole: true,
                    ..damage(
                        0,
                        format!(
                            "the log starts at LSN {first_lsn} but the store's checkpoint is \
                             {checkpoint}: records {} to {} are in neither. The store is older \
                             than this log (restored from an older backup, or a new or another \
                             store: check DATABASE_URL and --data-dir), or the log's older \
                             segments were deleted",
                            checkpoint.saturating_add(1),
                            first_lsn - 1
                        ),
                    )
                }),
                _ => {
                    segment(&data);
                    scan_records(&data, *first_lsn, |_, lsn, record| {
                        if lsn > checkpoint {
                            apply(lsn, record);
                            out.replayed += 1;
                        }
                    })
                    .map_err(|(offset, reason)| damage(offset, reason))
                }
            },
        };

        let mut cut = false;
        let (valid_end, next) = match scan {
            Ok(scanned) => (scanned.end, scanned.next),
            Err(d) => {
                cut = true;
                let torn = !d.hole && is_last && torn_tail(&data, d.offset);
                if !torn && mode == RecoveryMode::Strict {
                    return Err(WalError::Corrupt {
                        file: d.path,
                        offset: d.offset as u64,
                        reason: d.reason,
                    });
                }
                if torn {
                    tracing::warn!(file = %d.path.display(), offset = d.offset, reason = %d.reason,
                        dropped_bytes = data.len() - d.offset, "cutting a torn tail off the WAL");
                } else {
                    tracing::error!(file = %d.path.display(), offset = d.offset, reason = %d.reason,
                        "WAL damaged: cutting the log here as --wal-recovery truncate asks, dropping everything after it");
                }
                out.cut = !torn;
                cut_log(fs, dir, &d, &names[i + 1..])?;
                if d.offset <= SEGMENT_HEADER_LEN {
                    // Nothing valid was in this segment and cut_log removed it. It says
                    // nothing about the LSNs before it (it may stand after a hole), so the
                    // log ends where the previous segment ended.
                    break;
                }
                (d.offset, last_lsn_before(&data, d.offset, *first_lsn))
            }
        };
        out.end = Some(next - 1);
        // Kept also with no record (the newest segment after a start with no write): its
        // name is what says where the log had got to, until the writer goes on in it.
        out.segments.push(SegmentInfo {
            first_lsn: *first_lsn,
            path: path.clone(),
            len: valid_end as u64,
        });
        expected = Some(next);
        // Segment names and LSNs start at 1, and scan_records checks for overflow.
        out.last_lsn = out.last_lsn.max(next.saturating_sub(1));
        if cut {
            break; // cut_log removed the later segments
        }
    }
    Ok(out)
}

/// The most bytes a segment file of this log holds: twice the largest
/// `--wal-segment-bytes` (a segment is closed before a group would take it past its size,
/// and a group is far smaller than that).
pub const MAX_SEGMENT_FILE_BYTES: u64 = 2 << 30;

/// Reads the segment at `path` into `data`. A file over [`MAX_SEGMENT_FILE_BYTES`] (a
/// sparse file, or another file under a segment's name) is refused, as damage, before
/// it is read: reading it would take that much memory, and the process would be killed
/// for it rather than say what is wrong.
pub(super) fn read_segment(
    fs: &dyn WalFs,
    path: &Path,
    data: &mut Vec<u8>,
) -> Result<(), WalError> {
    let len = fs.len(path).map_err(WalError::io(path))?;
    if len > MAX_SEGMENT_FILE_BYTES {
        return Err(WalError::Corrupt {
            file: path.to_owned(),
            offset: MAX_SEGMENT_FILE_BYTES,
            reason: format!(
                "the file is {len} bytes, more than any segment of this log holds \
                 ({MAX_SEGMENT_FILE_BYTES}): not one of its segments (a sparse file, or \
                 another file under a segment's name)"
            ),
        });
    }
    fs.read(path, data).map_err(WalError::io(path))
}

struct Damage {
    path: PathBuf,
    offset: usize,
    reason: String,
    /// Records missing before the log's first: never a torn tail.
    hole: bool,
}

/// Where the records of a segment end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scanned {
    /// The LSN after the last record.
    pub next: u64,
    /// The offset after the last record: the file's length, or where its zero tail starts.
    pub end: usize,
}

/// Reads the records of one segment, checking that LSNs run on from `first_lsn`, up to
/// the end of the file or the start of a zero tail ([`is_zero_tail`]). Returns where they
/// end, or the offset and reason of the first damage.
pub(super) fn scan_records(
    data: &[u8],
    first_lsn: u64,
    mut each: impl FnMut(usize, u64, Record),
) -> Result<Scanned, (usize, String)> {
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = first_lsn;
    while at < data.len() {
        if is_zero_tail(&data[at..]) {
            break;
        }
        let d = decode_record(&data[at..]).map_err(|e| (at, e.to_string()))?;
        if d.lsn != next {
            return Err((
                at,
                format!("record has LSN {} where {next} was expected", d.lsn),
            ));
        }
        if d.lsn == u64::MAX {
            // Reserved, so that the LSN after the last record always exists.
            return Err((at, "LSN u64::MAX is reserved".to_owned()));
        }
        each(at, d.lsn, d.record);
        at += d.frame_len;
        next += 1;
    }
    Ok(Scanned {
        next,
        end: at.min(data.len()),
    })
}

/// The LSN after the last whole record before `offset` (records before it are valid).
fn last_lsn_before(data: &[u8], offset: usize, first_lsn: u64) -> u64 {
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = first_lsn;
    while at < offset {
        match check_frame(&data[at..]) {
            Ok((_, len)) => {
                at += len;
                next = next.saturating_add(1);
            }
            Err(_) => break,
        }
    }
    next
}

/// Whether damage at `offset` in the newest segment, `data`, is a torn tail, which recovery
/// cuts off: what a crash mid-write leaves. Damage with a valid record after it is not (a
/// hole in the middle of the log), and neither is a header that is whole but wrong with
/// anything after it: a segment's header is synced before any record goes in, and a
/// spare's before it takes the segment's name. A header alone, left wrong by a crash
/// before its sync, is.
pub(super) fn torn_tail(data: &[u8], offset: usize) -> bool {
    if offset < SEGMENT_HEADER_LEN {
        return data.len() <= SEGMENT_HEADER_LEN;
    }
    !valid_record_after(data, offset)
}

/// Whether any valid record frame starts after `offset`: if so, the damage at `offset` is
/// not a torn tail but a hole in the middle of the log. Only offsets up to the file's last
/// non-zero byte are tried: a frame starting in a zero tail has a zero length, which no
/// frame has.
fn valid_record_after(data: &[u8], offset: usize) -> bool {
    let last_nonzero = data.iter().rposition(|&b| b != 0).map_or(0, |at| at + 1);
    let end = last_nonzero.min(data.len().saturating_sub(RECORD_HEADER_LEN - 1));
    (offset + 1..end).any(|at| check_frame(&data[at..]).is_ok())
}

/// Cuts the segment at the damage and removes every later segment.
fn cut_log(
    fs: &dyn WalFs,
    dir: &Path,
    damage: &Damage,
    later: &[(u64, String)],
) -> Result<(), WalError> {
    for (_, name) in later.iter().rev() {
        let path = dir.join(name);
        fs.remove(&path).map_err(WalError::io(&path))?;
    }
    if damage.offset <= SEGMENT_HEADER_LEN {
        fs.remove(&damage.path)
            .map_err(WalError::io(&damage.path))?;
    } else {
        let mut file = fs.open(&damage.path).map_err(WalError::io(&damage.path))?;
        file.set_len(damage.offset as u64)
            .and_then(|()| file.sync_data())
            .map_err(WalError::io(&damage.path))?;
    }
    fs.sync_dir(dir).map_err(WalError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::tests::sample;
    use crate::wal::{LogBatch, RealFs, WalWriter};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use tempfile::TempDir;

    /// Writes records 1..=n, `per_batch` at a time, rotating at `segment_size`.
    fn write_log(dir: &Path, n: u64, per_batch: u64, segment_size: u64) {
        let mut w = WalWriter::open(
            Arc::new(RealFs),
            dir,
            vec![],
            1,
            segment_size,
            Arc::new(AtomicU64::new(0)),
        )
        .unwrap();
        let mut lsn = 1;
        while lsn <= n {
            let mut batch = LogBatch::new(lsn);
            let first = lsn;
            while lsn <= n && lsn < first + per_batch {
                batch.push(&sample(lsn));
                lsn += 1;
            }
            w.append(&batch).unwrap();
            w.sync().unwrap();
        }
    }

    fn replay(
        dir: &Path,
        mode: RecoveryMode,
        checkpoint: u64,
    ) -> Result<(Recovered, Vec<u64>), WalError> {
        let mut seen = Vec::new();
        let r = recover(&RealFs, dir, mode, checkpoint, |lsn, record| {
            assert_eq!(record, sample(lsn));
            seen.push(lsn);
        })?;
        Ok((r, seen))
    }

    /// Writes a segment that starts at `first_lsn` and holds no record; returns its path.
    fn empty_segment(dir: &Path, first_lsn: u64) -> PathBuf {
        let path = dir.join(crate::wal::format::segment_file_name(first_lsn));
        std::fs::write(&path, crate::wal::format::encode_segment_header(first_lsn)).unwrap();
        path
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replays_everything_above_the_checkpoint_across_segments() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 100, 7, 1024);
        assert!(
            segments(dir.path()).len() > 2,
            "the test needs several segments"
        );
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 40).unwrap();
        assert_eq!(seen, (41..=100).collect::<Vec<_>>());
        assert_eq!((r.last_lsn, r.replayed), (100, 60));
        // A second recovery finds the same log.
        let (_, again) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!(again.len(), 100);
    }

    /// A caller sees each segment that holds records above the checkpoint, whole, before
    /// those records, and no earlier segment.
    #[test]
    fn each_segment_with_records_to_replay_is_shown_before_them() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 100, 7, 1024);
        let files = segments(dir.path());
        assert!(files.len() > 3, "the test needs several segments");
        let firsts: Vec<u64> = files
            .iter()
            .map(|f| parse_segment_file_name(f.file_name().unwrap().to_str().unwrap()).unwrap())
            .collect();
        // The checkpoint is the last record of the second segment.
        let checkpoint = firsts[2] - 1;
        let events = std::cell::RefCell::new(Vec::new());
        recover_segments(
            &RealFs,
            dir.path(),
            RecoveryMode::Strict,
            checkpoint,
            |segment| events.borrow_mut().push(Err(segment.to_vec())),
            |lsn, _| events.borrow_mut().push(Ok(lsn)),
        )
        .unwrap();
        let events = events.into_inner();
        let mut expected = Vec::new();
        for (k, file) in files.iter().enumerate().skip(2) {
            expected.push(Err(std::fs::read(file).unwrap()));
            let end = firsts.get(k + 1).copied().unwrap_or(101);
            expected.extend((firsts[k]..end).map(Ok));
        }
        assert_eq!(events, expected);
    }

    /// A crash mid-write leaves part of the last record: a torn tail, cut off, whatever
    /// part of it reached the disk, in a plain segment or in front of a zero-filled
    /// segment's zeros.
    #[test]
    fn a_torn_tail_is_cut_at_every_offset_of_the_last_record() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 5, 1, 1 << 20);
        let seg = segments(dir.path()).pop().unwrap();
        let whole = std::fs::read(&seg).unwrap();
        let mut last_start = SEGMENT_HEADER_LEN;
        for _ in 0..4 {
            last_start += check_frame(&whole[last_start..]).unwrap().1;
        }
        for zeros in [0, 4096] {
            for cut in last_start + 1..whole.len() {
                let mut data = whole[..cut].to_vec();
                data.resize(cut + zeros, 0);
                std::fs::write(&seg, &data).unwrap();
                let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
                assert_eq!(
                    (seen.len(), r.last_lsn),
                    (4, 4),
                    "cut at {cut}, {zeros} zeros"
                );
                // The tail was cut on disk: the next recovery sees a clean log.
                assert_eq!(std::fs::metadata(&seg).unwrap().len(), last_start as u64);
            }
        }
    }

    /// Segments made zero-filled ahead of need end where their zeros start, the newest and
    /// the older ones alike: every record is read, nothing is cut, and each segment's
    /// length is its records'.
    #[test]
    fn a_zero_tail_ends_any_segment_and_stays() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 60, 5, 1024);
        let segs = segments(dir.path());
        assert!(segs.len() >= 3, "the test needs several segments");
        let mut lens = Vec::new();
        for seg in &segs {
            let mut data = std::fs::read(seg).unwrap();
            lens.push(data.len() as u64);
            data.resize(data.len() + 5000, 0);
            std::fs::write(seg, &data).unwrap();
        }
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!(seen, (1..=60).collect::<Vec<_>>());
        assert_eq!(r.segments.iter().map(|s| s.len).collect::<Vec<_>>(), lens);
        for (seg, len) in segs.iter().zip(&lens) {
            assert_eq!(std::fs::metadata(seg).unwrap().len(), len + 5000, "not cut");
        }
    }

    /// Zeros with records after them are no tail: a hole in the log, refused.
    #[test]
    fn zeros_in_front_of_records_are_a_hole() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 10, 10, 1 << 20);
        let seg = segments(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        let second = SEGMENT_HEADER_LEN + check_frame(&data[SEGMENT_HEADER_LEN..]).unwrap().1;
        let len = check_frame(&data[second..]).unwrap().1;
        data[second..second + len].fill(0);
        std::fs::write(&seg, &data).unwrap();
        match replay(dir.path(), RecoveryMode::Strict, 0) {
            Err(WalError::Corrupt { file, offset, .. }) => {
                assert_eq!((file, offset), (seg.clone(), second as u64));
            }
            other => panic!("expected a corruption error, got {other:?}"),
        }
    }

    /// A segment written before zero tails (format version 1) is read as it always was.
    #[test]
    fn a_version_1_segment_is_read() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 3, 1, 1 << 20);
        let seg = segments(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        data[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&data[..20]);
        data[20..24].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&seg, &data).unwrap();
        let (_, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[test]
    fn a_flipped_byte_followed_by_valid_records_is_refused_naming_file_and_offset() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 10, 10, 1 << 20);
        let seg = segments(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        let first_len = check_frame(&data[SEGMENT_HEADER_LEN..]).unwrap().1;
        let second = SEGMENT_HEADER_LEN + first_len;
        data[second + RECORD_HEADER_LEN + 3] ^= 0x40;
        std::fs::write(&seg, &data).unwrap();
        match replay(dir.path(), RecoveryMode::Strict, 0) {
            Err(WalError::Corrupt { file, offset, .. }) => {
                assert_eq!((file, offset), (seg.clone(), second as u64));
            }
            other => panic!("expected a corruption error, got {other:?}"),
        }
        let msg = replay(dir.path(), RecoveryMode::Strict, 0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--wal-recovery truncate"), "{msg}");
        // Refusing changed nothing on disk.
        assert_eq!(std::fs::read(&seg).unwrap(), data);
        // The operator's choice: cut there.
        let (r, seen) = replay(dir.path(), RecoveryMode::Truncate, 0).unwrap();
        assert_eq!((seen, r.last_lsn), (vec![1], 1));
        let (_, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!(seen, vec![1], "the cut is on disk");
    }

    #[test]
    fn damage_in_an_older_segment_is_refused_even_at_its_end() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 60, 5, 1024);
        let segs = segments(dir.path());
        assert!(segs.len() >= 2);
        let data = std::fs::read(&segs[0]).unwrap();
        std::fs::write(&segs[0], &data[..data.len() - 3]).unwrap();
        assert!(matches!(
            replay(dir.path(), RecoveryMode::Strict, 0),
            Err(WalError::Corrupt { file, .. }) if file == segs[0]
        ));
        let (r, seen) = replay(dir.path(), RecoveryMode::Truncate, 0).unwrap();
        assert_eq!(seen.len() as u64, r.last_lsn);
        assert_eq!(segments(dir.path()).len(), 1, "later segments were dropped");
    }

    #[test]
    fn a_missing_segment_is_a_gap() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 60, 5, 1024);
        let segs = segments(dir.path());
        assert!(segs.len() >= 3);
        std::fs::remove_file(&segs[1]).unwrap();
        let err = replay(dir.path(), RecoveryMode::Strict, 0).unwrap_err();
        assert!(err.to_string().contains("previous one ended"), "{err}");
        // Segments wholly below the store's checkpoint may be gone; above it, never.
        std::fs::remove_file(&segs[0]).unwrap();
        let err = replay(dir.path(), RecoveryMode::Strict, 0).unwrap_err();
        assert!(err.to_string().contains("are in neither"), "{err}");
    }

    /// After a clean stop and a start with no write, the log is one segment with no
    /// record, whose name is all that says where the log had got to. A store that is
    /// behind it (restored from an older backup, replaced by a new one) is refused, not
    /// taken for a torn tail, and the segment is left as it was.
    #[test]
    fn an_empty_segment_after_a_gap_is_refused_not_cut() {
        let dir = TempDir::new().unwrap();
        let empty = empty_segment(dir.path(), 61);
        let err = replay(dir.path(), RecoveryMode::Strict, 40).unwrap_err();
        assert!(
            err.to_string().contains("records 41 to 60 are in neither"),
            "{err}"
        );
        assert!(empty.exists(), "refusing removed the segment");
        // The store that belongs with it: an empty log that ends at its checkpoint.
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 60).unwrap();
        assert!(seen.is_empty());
        assert_eq!((r.last_lsn, r.end), (60, Some(60)));
        // Truncate mode cuts it, as it cuts any damage, and says so.
        empty_segment(dir.path(), 61);
        let (r, seen) = replay(dir.path(), RecoveryMode::Truncate, 40).unwrap();
        assert!(seen.is_empty());
        assert_eq!((r.last_lsn, r.end), (40, None));
    }

    /// A segment after a jump in the LSNs is never a torn tail, even the newest with no
    /// record: one is made only once the segment before it is synced.
    #[test]
    fn a_jump_before_an_empty_newest_segment_is_refused_not_cut() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 3, 3, 1 << 20);
        let empty = empty_segment(dir.path(), 5);
        let err = replay(dir.path(), RecoveryMode::Strict, 3).unwrap_err();
        assert!(err.to_string().contains("previous one ended"), "{err}");
        assert!(empty.exists(), "refusing removed the segment");
    }

    /// A log whose newest segment holds no record ends before that segment's first LSN,
    /// also when an older segment holds records: what the engine compares with the
    /// store's checkpoint to find a log older than the store.
    #[test]
    fn an_empty_newest_segment_says_where_the_log_ends() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 10, 5, 1 << 20);
        empty_segment(dir.path(), 11);
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 4).unwrap();
        assert_eq!(seen, (5..=10).collect::<Vec<_>>());
        assert_eq!((r.last_lsn, r.end), (10, Some(10)));

        let dir = TempDir::new().unwrap();
        empty_segment(dir.path(), 8);
        let (r, _) = replay(dir.path(), RecoveryMode::Strict, 30).unwrap();
        assert_eq!(
            r.end,
            Some(7),
            "a log that ended at 7, beside a store at 30"
        );
    }

    /// `--accept-mismatched-wal` on a log older than the store goes on at the LSN after the
    /// store's checkpoint, in a new segment, and the old ones are unlinked after: a crash
    /// before that leaves a jump from the old segments to the new one, which recovery takes
    /// as it is, since the old ones hold nothing above the checkpoint.
    #[test]
    fn old_segments_before_a_jump_to_the_checkpoint_are_passed_over() {
        let (old, new) = (TempDir::new().unwrap(), TempDir::new().unwrap());
        write_log(old.path(), 10, 5, 1 << 20);
        let mut w = WalWriter::open(
            Arc::new(RealFs),
            new.path(),
            vec![],
            31,
            1 << 20,
            Arc::new(AtomicU64::new(0)),
        )
        .unwrap();
        let mut batch = LogBatch::new(31);
        for lsn in 31..=35 {
            batch.push(&sample(lsn));
        }
        w.append(&batch).unwrap();
        w.sync().unwrap();
        drop(w);
        for file in segments(old.path()) {
            std::fs::copy(&file, new.path().join(file.file_name().unwrap())).unwrap();
        }
        for mode in [RecoveryMode::Strict, RecoveryMode::Truncate] {
            let (r, seen) = replay(new.path(), mode, 30).unwrap();
            assert_eq!(seen, (31..=35).collect::<Vec<_>>(), "{mode:?}");
            assert_eq!((r.last_lsn, r.end, r.segments.len()), (35, Some(35), 2));
        }
    }

    /// A segment the next one shows to lie wholly at or below the checkpoint (a crash
    /// between a flush's commit and the trim's unlink left it) is not read: damage in it
    /// neither refuses the start nor, in truncate mode, cuts the records after it.
    #[test]
    fn damage_in_a_segment_the_store_holds_is_not_read() {
        for mode in [RecoveryMode::Strict, RecoveryMode::Truncate] {
            let dir = TempDir::new().unwrap();
            write_log(dir.path(), 60, 5, 1024);
            let segs = segments(dir.path());
            assert!(segs.len() >= 3, "the test needs several segments");
            let second_first = crate::wal::format::parse_segment_file_name(
                &segs[1].file_name().unwrap().to_string_lossy(),
            )
            .unwrap();
            let mut bytes = std::fs::read(&segs[0]).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x10;
            std::fs::write(&segs[0], &bytes).unwrap();

            let checkpoint = second_first - 1;
            let (r, seen) = replay(dir.path(), mode, checkpoint).unwrap();
            assert_eq!(seen, (second_first..=60).collect::<Vec<_>>(), "{mode:?}");
            assert_eq!((r.last_lsn, r.end), (60, Some(60)));
            assert_eq!(
                segments(dir.path()),
                segs,
                "{mode:?}: a segment was removed"
            );
            // Below that checkpoint the segment still holds records to replay: refused.
            if mode == RecoveryMode::Strict {
                let err = replay(dir.path(), mode, checkpoint - 1).unwrap_err();
                assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
            }
        }
    }

    #[test]
    fn a_half_written_segment_header_is_removed() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 3, 1, 1 << 20);
        let torn = dir.path().join(crate::wal::format::segment_file_name(4));
        std::fs::write(&torn, &crate::wal::format::encode_segment_header(4)[..10]).unwrap();
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!((seen.len(), r.last_lsn), (3, 3));
        assert!(!torn.exists());
    }

    /// A header that is whole but wrong in the newest segment (another format version
    /// with a valid checksum, zeros over it, the whole segment zeroed) is damage, refused
    /// in strict mode: a segment's header is synced before any record goes in (a spare's
    /// before it takes the segment's name), so no crash leaves one under records. It was
    /// taken for a torn tail, and the segment removed with every record in it.
    #[test]
    fn a_whole_but_wrong_header_in_the_newest_segment_is_refused_not_cut() {
        let newer = |segment: &mut Vec<u8>| {
            segment[8..12].copy_from_slice(&99u32.to_le_bytes());
            let crc = crc32fast::hash(&segment[..20]);
            segment[20..24].copy_from_slice(&crc.to_le_bytes());
        };
        let zeroed_header = |segment: &mut Vec<u8>| segment[..SEGMENT_HEADER_LEN].fill(0);
        let zeroed = |segment: &mut Vec<u8>| segment.fill(0);
        let damages: [fn(&mut Vec<u8>); 3] = [newer, zeroed_header, zeroed];
        for (i, damage) in damages.into_iter().enumerate() {
            let dir = TempDir::new().unwrap();
            write_log(dir.path(), 30, 1, 1024);
            let newest = segments(dir.path()).pop().unwrap();
            let mut bytes = std::fs::read(&newest).unwrap();
            damage(&mut bytes);
            std::fs::write(&newest, &bytes).unwrap();
            let err = replay(dir.path(), RecoveryMode::Strict, 0).unwrap_err();
            assert!(matches!(err, WalError::Corrupt { .. }), "damage {i}: {err}");
            assert_eq!(
                std::fs::read(&newest).unwrap(),
                bytes,
                "damage {i}: changed"
            );
        }
    }

    /// A segment file far larger than any this log writes (here a sparse file of 3 GiB)
    /// is refused, naming it, before it is read. It was read whole, and a start asked for
    /// that much memory at once: the process was aborted, or killed for it.
    #[test]
    fn a_segment_larger_than_any_this_log_writes_is_refused_unread() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 3, 1, 1 << 20);
        let newest = segments(dir.path()).pop().unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap();
        file.set_len(3 << 30).unwrap();
        for mode in [RecoveryMode::Strict, RecoveryMode::Truncate] {
            let err = replay(dir.path(), mode, 0).unwrap_err();
            assert!(
                matches!(&err, WalError::Corrupt { file, .. } if file == &newest),
                "{mode:?}: {err}"
            );
            assert_eq!(std::fs::metadata(&newest).unwrap().len(), 3 << 30);
        }
    }

    /// A new segment's header that a crash left wrong before its sync, with nothing after
    /// it, is cut off as a torn tail.
    #[test]
    fn a_wrong_header_with_nothing_after_it_is_a_torn_tail() {
        let dir = TempDir::new().unwrap();
        write_log(dir.path(), 3, 1, 1 << 20);
        let torn = dir.path().join(crate::wal::format::segment_file_name(4));
        std::fs::write(&torn, [0u8; SEGMENT_HEADER_LEN]).unwrap();
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 0).unwrap();
        assert_eq!((seen.len(), r.last_lsn), (3, 3));
        assert!(!torn.exists());
    }

    #[test]
    fn foreign_files_are_ignored_and_an_empty_dir_is_an_empty_log() {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        let (r, seen) = replay(dir.path(), RecoveryMode::Strict, 17).unwrap();
        assert!(seen.is_empty());
        assert_eq!((r.last_lsn, r.segments.len()), (17, 0));
    }

    #[test]
    fn a_new_wal_directory_is_fsynced_into_its_parent() {
        use crate::wal::{Fault, FaultyFs};
        let root = TempDir::new().unwrap();
        let fs = FaultyFs::new();
        fs.set(Fault::DirSyncError);
        let new = root.path().join("data").join("wal");
        let err = recover(&fs, &new, RecoveryMode::Strict, 0, |_, _| {}).unwrap_err();
        assert!(
            matches!(&err, WalError::Io { path, .. } if path == root.path() || path == &root.path().join("data")),
            "{err}"
        );
        fs.set(Fault::None);
        recover(&fs, &new, RecoveryMode::Strict, 0, |_, _| {}).unwrap();
        fs.set(Fault::DirSyncError);
        recover(&fs, &new, RecoveryMode::Strict, 0, |_, _| {})
            .expect("an existing directory needs no directory fsync");
    }
}
