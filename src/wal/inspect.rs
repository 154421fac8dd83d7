//! The operators' view of a WAL directory: every segment and record, checksums verified,
//! and the first damage named by file and offset. Read-only: unlike recovery it never cuts
//! or removes anything.

use super::format::{decode_segment_header, parse_segment_file_name, Record};
use super::recovery::{read_segment, scan_records, torn_tail};
use super::WalError;
use crate::domain::Change;
use std::fmt;
use std::path::{Path, PathBuf};

/// One segment as found on disk.
#[derive(Debug)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub first_lsn: u64,
    pub bytes: u64,
    /// Zeros after the last record: the rest of a segment made zero-filled ahead of need.
    pub zero_tail: u64,
    pub records: Vec<RecordInfo>,
    pub damage: Option<Damage>,
}

/// One record: where it starts, its LSN, and what it changes.
#[derive(Debug)]
pub struct RecordInfo {
    pub offset: usize,
    pub lsn: u64,
    pub record: Record,
}

/// The first thing wrong in a segment.
#[derive(Debug)]
pub struct Damage {
    pub offset: usize,
    pub reason: String,
    /// At the end of the newest segment with nothing valid after it: recovery cuts it off
    /// (a crash mid-write). Otherwise recovery refuses to start.
    pub torn_tail: bool,
}

/// Reads every segment in `dir`, oldest first.
pub fn inspect(dir: &Path) -> Result<Vec<SegmentReport>, WalError> {
    let mut names: Vec<(u64, String)> = std::fs::read_dir(dir)
        .map_err(WalError::io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            parse_segment_file_name(&name).map(|lsn| (lsn, name))
        })
        .collect();
    names.sort();
    let count = names.len();
    let mut expected: Option<u64> = None;
    let mut reports = Vec::with_capacity(count);
    for (i, (first_lsn, name)) in names.into_iter().enumerate() {
        let path = dir.join(&name);
        let mut data = Vec::new();
        read_segment(&super::RealFs, &path, &mut data)?;
        let mut records = Vec::new();
        let mut zero_tail = 0;
        // A segment that starts after a gap is never a torn tail, whatever it holds.
        let gap = expected.is_some_and(|e| e != first_lsn);
        let problem = match decode_segment_header(&data) {
            Err(e) => Some((0, e.to_string())),
            Ok(lsn) if lsn != first_lsn => Some((
                0,
                format!("header names LSN {lsn} but the file name says {first_lsn}"),
            )),
            Ok(_) if expected.is_some_and(|e| e != first_lsn) => Some((
                0,
                format!(
                    "segment starts at LSN {first_lsn}, but the previous one ended before LSN {}",
                    expected.unwrap_or_default()
                ),
            )),
            Ok(_) => match scan_records(&data, first_lsn, |offset, lsn, record| {
                records.push(RecordInfo {
                    offset,
                    lsn,
                    record,
                })
            }) {
                Ok(scanned) => {
                    expected = Some(scanned.next);
                    zero_tail = (data.len() - scanned.end) as u64;
                    None
                }
                Err(damage) => Some(damage),
            },
        };
        let damage = problem.map(|(offset, reason)| Damage {
            torn_tail: i + 1 == count && !gap && torn_tail(&data, offset),
            offset,
            reason,
        });
        reports.push(SegmentReport {
            path,
            first_lsn,
            bytes: data.len() as u64,
            zero_tail,
            records,
            damage,
        });
    }
    Ok(reports)
}

impl fmt::Display for SegmentReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        write!(
            f,
            "{name}  first_lsn={}  bytes={}  records={}",
            self.first_lsn,
            self.bytes,
            self.records.len()
        )?;
        if let (Some(a), Some(b)) = (self.records.first(), self.records.last()) {
            write!(f, "  lsns={}..{}", a.lsn, b.lsn)?;
        }
        if self.zero_tail > 0 {
            write!(f, "  zero_tail={}", self.zero_tail)?;
        }
        match &self.damage {
            None => writeln!(f, "  ok")?,
            Some(d) => writeln!(f, "  {d}")?,
        }
        for r in &self.records {
            write!(f, "  lsn={} offset={}", r.lsn, r.offset)?;
            for change in &r.record.changes {
                match change {
                    Change::Put { serial, widget } => {
                        write!(f, " put:{serial}@{}", widget.version)?
                    }
                    Change::Delete { serial } => write!(f, " delete:{serial}")?,
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.torn_tail {
            "TORN TAIL (recovery cuts it off)"
        } else {
            "DAMAGED (recovery refuses to start; --wal-recovery truncate cuts here)"
        };
        write!(f, "{what} at offset {}: {}", self.offset, self.reason)
    }
}
