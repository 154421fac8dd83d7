//! Start-up replay: read every segment in LSN order, hand each record above the
//! checkpoint to the caller, cut a torn tail, refuse (or, if asked, cut at) real damage.

use super::format::{
    check_frame, decode_record, decode_segment_header, parse_segment_file_name, HeaderError,
    Record, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use super::fs::WalFs;
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
}

/// Replays the log in `dir`. `apply` gets every record whose LSN is above `checkpoint`, in
/// order. Torn tails are cut on disk so the next start sees a clean log.
pub fn recover(
    fs: &dyn WalFs,
    dir: &Path,
    mode: RecoveryMode,
    checkpoint: u64,
    mut apply: impl FnMut(u64, Record),
) -> Result<Recovered, WalError> {
    fs.create_dir_all(dir).map_err(WalError::io(dir))?;
    let mut names: Vec<(u64, String)> = Vec::new();
    for name in fs.list(dir).map_err(WalError::io(dir))? {
        match parse_segment_file_name(&name) {
            Some(first) => names.push((first, name)),
            None => tracing::warn!(file = %name, "ignoring a file in the WAL directory that is not a segment"),
        }
    }
    names.sort();

    let mut out = Recovered {
        segments: Vec::new(),
        last_lsn: checkpoint,
        replayed: 0,
    };
    // The LSN the next record must have; None until the first segment is read.
    let mut expected: Option<u64> = None;
    let count = names.len();
    for (i, (first_lsn, name)) in names.iter().enumerate() {
        let path = dir.join(name);
        let is_last = i + 1 == count;
        let data = fs.read(&path).map_err(WalError::io(&path))?;
        let damage = |offset: usize, reason: String| Damage {
            path: path.clone(),
            offset,
            reason,
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
                Some(exp) if exp != *first_lsn => Err(damage(
                    0,
                    format!("segment starts at LSN {first_lsn}, but the previous one ended before LSN {exp}"),
                )),
                None if *first_lsn > checkpoint + 1 => Err(damage(
                    0,
                    format!(
                        "the log starts at LSN {first_lsn} but the store's checkpoint is {checkpoint}: \
                         records {} to {} are missing",
                        checkpoint + 1,
                        first_lsn - 1
                    ),
                )),
                _ => scan_records(&data, *first_lsn, |lsn, record| {
                    if lsn > checkpoint {
                        apply(lsn, record);
                        out.replayed += 1;
                    }
                })
                .map_err(|(offset, reason)| damage(offset, reason)),
            },
        };

        let (valid_end, next) = match scan {
            Ok(next) => (data.len(), next),
            Err(d) => {
                let torn = is_last && !valid_record_after(&data, d.offset);
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
                cut_log(fs, dir, &d, &names[i + 1..])?;
                let next = last_lsn_before(&data, d.offset, *first_lsn);
                if d.offset <= SEGMENT_HEADER_LEN {
                    // Nothing valid left in this segment; the removal is in cut_log.
                    out.last_lsn = out.last_lsn.max(next.saturating_sub(1));
                    break;
                }
                (d.offset, next)
            }
        };
        let had_records = next > *first_lsn;
        if is_last && !had_records {
            // An empty newest segment: the writer will create it again.
            fs.remove(&path).map_err(WalError::io(&path))?;
        } else {
            out.segments.push(SegmentInfo {
                first_lsn: *first_lsn,
                path: path.clone(),
                len: valid_end as u64,
            });
        }
        expected = Some(next);
        out.last_lsn = out.last_lsn.max(next - 1);
        if valid_end < data.len() {
            break; // cut_log removed the later segments
        }
    }
    Ok(out)
}

struct Damage {
    path: PathBuf,
    offset: usize,
    reason: String,
}

/// Reads the records of one segment, checking that LSNs run on from `first_lsn`.
/// Returns the LSN after the last record, or the offset and reason of the first damage.
fn scan_records(
    data: &[u8],
    first_lsn: u64,
    mut each: impl FnMut(u64, Record),
) -> Result<u64, (usize, String)> {
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = first_lsn;
    while at < data.len() {
        let d = decode_record(&data[at..]).map_err(|e| (at, e.to_string()))?;
        if d.lsn != next {
            return Err((at, format!("record has LSN {} where {next} was expected", d.lsn)));
        }
        each(d.lsn, d.record);
        at += d.frame_len;
        next += 1;
    }
    Ok(next)
}

/// The LSN after the last whole record before `offset` (records before it are valid).
fn last_lsn_before(data: &[u8], offset: usize, first_lsn: u64) -> u64 {
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = first_lsn;
    while at < offset {
        match check_frame(&data[at..]) {
            Ok((_, len)) => {
                at += len;
                next += 1;
            }
            Err(_) => break,
        }
    }
    next
}

/// Whether any valid record frame starts after `offset`: if so, the damage at `offset` is
/// not a torn tail but a hole in the middle of the log.
fn valid_record_after(data: &[u8], offset: usize) -> bool {
    (offset + 1..data.len().saturating_sub(RECORD_HEADER_LEN - 1))
        .any(|at| check_frame(&data[at..]).is_ok())
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
        fs.remove(&damage.path).map_err(WalError::io(&damage.path))?;
    } else {
        let mut file = fs.open(&damage.path).map_err(WalError::io(&damage.path))?;
        file.set_len(damage.offset as u64)
            .and_then(|()| file.sync_data())
            .map_err(WalError::io(&damage.path))?;
    }
    fs.sync_dir(dir).map_err(WalError::io(dir))
}
