//! The WAL checks behind the fuzz targets, written once. Each target in `fuzz_targets/`
//! includes this file, and so does `tests/wal_props.rs`, which replays the committed corpus
//! through the same functions and drives them from proptest on stable.
//!
//! Inputs are plain bytes read through [`Bytes`], a cursor that yields zeros once the input
//! runs out, so every input (and every corpus file) means something and a shorter input
//! means a smaller case.
//!
//! What the checks hold recovery to (the contract in `src/wal/mod.rs`): it never panics;
//! it hands over records above the checkpoint with consecutive LSNs; on `Ok` the segment
//! files left on disk are exactly the segments it returns, at the lengths it returns, and
//! the writer can open there, append, and a strict recovery then sees the same records plus
//! the new one; a refusal changes nothing on disk; `Truncate` never refuses, and hands over
//! what `Strict` does on a log both accept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tempfile::TempDir;
use widgets::domain::{Change, Name, Ports, Serial, Widget};
use widgets::wal::format::{
    check_frame, decode_payload, decode_record, encode_record, encode_segment_header,
    parse_segment_file_name, segment_file_name, Decoded, FrameError, MAX_PAYLOAD_LEN,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use widgets::wal::{
    recover, LogBatch, RealFs, Record, RecoveryMode, SegmentInfo, WalError, WalWriter,
};

/// A cursor over fuzz input that never runs dry: past the end it yields zeros.
pub struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut le = [0u8; 8];
        for byte in &mut le {
            *byte = self.u8();
        }
        u64::from_le_bytes(le)
    }
}

const SERIAL_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";

fn serial(b: &mut Bytes) -> Serial {
    let len = 1 + b.u8() as usize % 36;
    let s: String = (0..len)
        .map(|_| SERIAL_CHARS[b.u8() as usize % SERIAL_CHARS.len()] as char)
        .collect();
    Serial::parse("serial", &s).expect("built from the allowed characters")
}

fn widget(b: &mut Bytes) -> Widget {
    let len = 1 + b.u8() as usize % 64;
    let name: String = (0..len).map(|_| (0x20 + b.u8() % 95) as char).collect();
    let ports = Ports::from_bits(1 + b.u8() % 7).expect("1..=7");
    let mut widget = Widget::new(Name::parse("name", &name).expect("printable"), ports);
    for port in ports.iter() {
        if b.u8() & 1 == 1 {
            widget.peers[port.index()] = Some(serial(b));
        }
    }
    widget.version = b.u64();
    widget
}

/// A record of up to four changes, as the sequencer writes them.
pub fn record(b: &mut Bytes) -> Record {
    let changes = (0..b.u8() % 5)
        .map(|_| {
            let serial = serial(b);
            if b.u8() & 1 == 0 {
                Change::Delete { serial }
            } else {
                Change::Put {
                    serial,
                    widget: widget(b),
                }
            }
        })
        .collect();
    Record { changes }
}

/// Up to `max` records.
pub fn records(b: &mut Bytes, max: u8) -> Vec<Record> {
    (0..b.u8() % (max + 1)).map(|_| record(b)).collect()
}

/// A temporary WAL directory, on tmpfs when there is one (recovery fsyncs).
fn temp_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("wal-fuzz").tempdir_in(shm) {
            return dir;
        }
    }
    TempDir::new().expect("a temporary directory")
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("listing the WAL directory")
        .map(|e| {
            let path = e.expect("a directory entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("reading a WAL file"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// decode_record

/// Decodes `data` as one record, then walks it frame by frame as recovery does. Whatever
/// the bytes, nothing panics, errors say what the bytes are, and a record that decodes
/// encodes back to itself.
pub fn check_decode(data: &[u8]) {
    check_payload(data);
    check_one_frame(data);
    let mut at = 0;
    while at < data.len() {
        match check_frame(&data[at..]) {
            Ok((_, len)) => at += len,
            Err(_) => at += 1,
        }
        if at < data.len() {
            check_one_frame(&data[at..]);
        }
    }
}

/// The WAL's payload decoder against bincode's, which the WAL used before: it reads what
/// bincode reads where the bytes are exactly what the encoder writes for it, and refuses
/// everything else. The one exception is bincode's size limit, which counts each decoded
/// integer at its width in memory and so can refuse a long record that fits in a payload.
pub fn check_payload(data: &[u8]) {
    let config = bincode::config::standard().with_limit::<MAX_PAYLOAD_LEN>();
    let theirs: Result<(Record, usize), _> = bincode::serde::decode_from_slice(data, config);
    let written = |record: &Record| {
        let mut framed = Vec::new();
        encode_record(&mut framed, 1, record);
        framed[RECORD_HEADER_LEN..] == *data
    };
    match (decode_payload(data), theirs) {
        (Ok(ours), Ok((theirs, used))) => {
            assert_eq!(ours, theirs, "the decoders disagree");
            assert_eq!(used, data.len(), "decoded with bytes left over");
            assert!(written(&ours), "decoded bytes the encoder does not write");
        }
        (Ok(_), Err(bincode::error::DecodeError::LimitExceeded)) => {}
        (Ok(ours), Err(e)) => panic!("decoded {ours:?} where bincode refuses: {e}"),
        (Err(e), Ok((theirs, used))) => assert!(
            used != data.len() || !written(&theirs),
            "refused ({e}) the encoder's bytes for {theirs:?}"
        ),
        (Err(_), Err(_)) => {}
    }
}

fn check_one_frame(buf: &[u8]) {
    let framed = check_frame(buf);
    match decode_record(buf) {
        Ok(d) => {
            assert_eq!(
                framed,
                Ok((d.lsn, d.frame_len)),
                "decode and check_frame disagree"
            );
            assert!(d.frame_len > RECORD_HEADER_LEN && d.frame_len <= buf.len());
            let mut again = Vec::new();
            encode_record(&mut again, d.lsn, &d.record);
            assert!(again.len() <= d.frame_len, "re-encoding grew the record");
            assert_eq!(
                decode_record(&again),
                Ok(Decoded {
                    frame_len: again.len(),
                    ..d
                })
            );
        }
        Err(FrameError::BadPayload(_)) => assert!(framed.is_ok(), "payload checked before frame"),
        Err(e) => {
            assert_eq!(framed, Err(e.clone()), "decode and check_frame disagree");
            match e {
                FrameError::Truncated { needed, available } => {
                    assert!(available == buf.len() && needed > available, "{e}")
                }
                FrameError::BadLength(len) => {
                    assert!(len == 0 || len as usize > MAX_PAYLOAD_LEN, "{e}")
                }
                FrameError::BadChecksum => assert!(buf.len() > RECORD_HEADER_LEN),
                FrameError::BadPayload(_) => unreachable!(),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// recovery

/// What one recovery handed over and left.
#[derive(Debug)]
pub struct Replay {
    pub records: Vec<(u64, Record)>,
    pub last_lsn: u64,
    pub segments: Vec<SegmentInfo>,
}

/// Runs [`recover`] on `dir` and checks what holds for any `Ok`, whatever the log held.
/// A WAL error other than `Corrupt` fails the check: every entry the checks put in the
/// directory is a readable regular file, so an I/O error is recovery tripping over itself.
pub fn replay(dir: &Path, mode: RecoveryMode, checkpoint: u64) -> Result<Replay, WalError> {
    let mut records: Vec<(u64, Record)> = Vec::new();
    let r = recover(&RealFs, dir, mode, checkpoint, |lsn, record| {
        records.push((lsn, record))
    });
    let r = match r {
        Ok(r) => r,
        Err(e @ WalError::Corrupt { .. }) => return Err(e),
        Err(e @ WalError::Io { .. }) => panic!("recovery ({mode:?}) failed with I/O: {e}"),
        // Only the engine's replay checks values and runs threads, and reads the identity;
        // plain recovery does not.
        Err(e @ (WalError::Invalid { .. } | WalError::Replay(_) | WalError::Identity { .. })) => {
            panic!("recovery ({mode:?}) failed in a way only the engine can: {e}")
        }
    };
    assert_eq!(r.replayed, records.len() as u64, "replayed count");
    for (i, (lsn, _)) in records.iter().enumerate() {
        assert!(
            *lsn > checkpoint,
            "handed over LSN {lsn} at or below {checkpoint}"
        );
        if i > 0 {
            assert_eq!(*lsn, records[i - 1].0 + 1, "LSNs do not run on");
        }
    }
    match records.last() {
        Some((lsn, _)) => {
            assert_eq!(r.last_lsn, *lsn, "last LSN is not the last record's");
            assert_eq!(r.end, Some(*lsn), "the log's end is not its last record");
        }
        None => assert!(r.last_lsn >= checkpoint, "last LSN below the checkpoint"),
    }
    // The writer goes on after the log's end or the checkpoint, whichever is later.
    assert_eq!(
        r.last_lsn,
        r.end.map_or(checkpoint, |end| end.max(checkpoint)),
        "last LSN against the log's end {:?} and the checkpoint {checkpoint}",
        r.end
    );
    // A segment's length is where its records end: after it, only a zero tail.
    let returned: BTreeMap<u64, u64> = r.segments.iter().map(|s| (s.first_lsn, s.len)).collect();
    let on_disk: BTreeMap<u64, u64> = snapshot(dir)
        .into_iter()
        .filter_map(|(name, bytes)| {
            let first_lsn = parse_segment_file_name(&name)?;
            let records_end = returned
                .get(&first_lsn)
                .map_or(bytes.len(), |&len| len as usize)
                .min(bytes.len());
            let zeros_after = bytes[records_end..].iter().all(|&b| b == 0);
            Some((
                first_lsn,
                if zeros_after {
                    records_end
                } else {
                    bytes.len()
                } as u64,
            ))
        })
        .collect();
    assert!(
        r.segments
            .windows(2)
            .all(|w| w[0].first_lsn < w[1].first_lsn),
        "segments are not oldest first: {:?}",
        r.segments
    );
    assert_eq!(
        on_disk, returned,
        "segments on disk are not those recovery returned"
    );
    Ok(Replay {
        records,
        last_lsn: r.last_lsn,
        segments: r.segments,
    })
}

/// Reopens the log as the engine does right after recovery (a writer at the next LSN,
/// trimmed to the checkpoint), appends one record, and checks that a strict recovery then
/// sees `before` and it: what recovery kept and cut is a log the service can go on with.
fn check_writer_continues(dir: &Path, checkpoint: u64, before: Replay) {
    // u64::MAX is reserved (recovery refuses a record there): nothing more can be written.
    let Some(next) = before.last_lsn.checked_add(1).filter(|&n| n < u64::MAX) else {
        return;
    };
    let mut writer = WalWriter::open(
        Arc::new(RealFs),
        dir,
        before.segments,
        next,
        1 << 20,
        Arc::new(AtomicU64::new(0)),
    )
    .unwrap_or_else(|e| panic!("the writer cannot open after recovery: {e}"));
    writer.trim(checkpoint);
    let new = Record { changes: vec![] };
    let mut batch = LogBatch::new(next);
    batch.push(&new);
    writer.append(&batch).expect("appending after recovery");
    writer.sync().expect("syncing after recovery");
    drop(writer);
    let after = replay(dir, RecoveryMode::Strict, checkpoint)
        .unwrap_or_else(|e| panic!("strict recovery refused the log the writer continued: {e}"));
    let mut expected = before.records;
    expected.push((next, new));
    assert_eq!(
        after.records, expected,
        "records after the writer continued the log"
    );
}

/// Fills `dir` from the input: up to four files named as segments (mostly running on from
/// the previous one) or not, with a valid header most of the time, valid records, and
/// then damage: trailing bytes, a cut, a flipped bit. Returns the checkpoint.
fn build_dir(dir: &Path, b: &mut Bytes) -> u64 {
    let mut next_lsn = 1 + u64::from(b.u8() % 4);
    for _ in 0..b.u8() % 5 {
        let shape = b.u8();
        let lsn = match shape & 3 {
            0 | 1 => next_lsn,
            2 => u64::from(b.u8()),
            _ => b.u64(),
        };
        let name = match (shape >> 2) & 7 {
            0..=4 => segment_file_name(lsn),
            5 => format!("{:019}.wal", lsn % 10u64.pow(19)),
            6 => format!("{}.tmp", segment_file_name(lsn)),
            _ => {
                let len = 1 + b.u8() % 12;
                (0..len).map(|_| (b'a' + b.u8() % 26) as char).collect()
            }
        };
        let mut bytes = Vec::new();
        match (shape >> 5) & 3 {
            0 | 1 => bytes.extend_from_slice(&encode_segment_header(lsn)),
            2 => bytes.extend_from_slice(&encode_segment_header(b.u64())),
            _ => {
                let n = usize::from(b.u8() % 32);
                bytes.extend_from_slice(b.take(n));
            }
        }
        let count = b.u8() % 6;
        for i in 0..u64::from(count) {
            encode_record(&mut bytes, lsn.wrapping_add(i), &record(b));
        }
        next_lsn = lsn.wrapping_add(count.into());
        let damage = b.u8();
        if damage & 1 == 1 {
            let n = usize::from(b.u8());
            bytes.extend_from_slice(b.take(n));
        }
        if damage & 2 == 2 && !bytes.is_empty() {
            let cut = usize::from(b.u16()) % bytes.len();
            bytes.truncate(cut);
        }
        if damage & 4 == 4 && !bytes.is_empty() {
            let bit = usize::from(b.u16()) % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        std::fs::write(dir.join(name), &bytes).expect("writing a WAL file");
    }
    match b.u8() % 4 {
        0 => 0,
        1 | 2 => u64::from(b.u8()),
        _ => b.u64(),
    }
}

/// Recovers a directory built from `data` in both modes and checks each outcome against
/// the contract and against the other.
pub fn check_recover_dir(data: &[u8]) {
    let (strict_dir, truncate_dir) = (temp_dir(), temp_dir());
    let checkpoint = build_dir(strict_dir.path(), &mut Bytes::new(data));
    build_dir(truncate_dir.path(), &mut Bytes::new(data));
    let before = snapshot(strict_dir.path());

    let strict = match replay(strict_dir.path(), RecoveryMode::Strict, checkpoint) {
        Ok(strict) => {
            let records = strict.records.clone();
            check_writer_continues(strict_dir.path(), checkpoint, strict);
            Some(records)
        }
        Err(_) => {
            assert_eq!(
                snapshot(strict_dir.path()),
                before,
                "refusing changed the log"
            );
            None
        }
    };
    let truncated = replay(truncate_dir.path(), RecoveryMode::Truncate, checkpoint)
        .unwrap_or_else(|e| panic!("truncate mode refused: {e}"));
    if let Some(strict) = strict {
        assert_eq!(
            truncated.records, strict,
            "modes differ on a log both accept"
        );
    }
    check_writer_continues(truncate_dir.path(), checkpoint, truncated);
}

// ---------------------------------------------------------------------------------------
// round trip, cuts and flipped bits

/// One segment holding `records` from `first_lsn` on, as the writer lays it out.
#[derive(Debug, Clone)]
pub struct Log {
    pub first_lsn: u64,
    pub records: Vec<Record>,
    pub bytes: Vec<u8>,
    /// Where each record's frame starts.
    pub starts: Vec<usize>,
}

impl Log {
    pub fn new(first_lsn: u64, records: Vec<Record>) -> Self {
        let mut bytes = encode_segment_header(first_lsn).to_vec();
        let mut starts = Vec::new();
        for (lsn, record) in (first_lsn..).zip(&records) {
            starts.push(bytes.len());
            encode_record(&mut bytes, lsn, record);
        }
        Self {
            first_lsn,
            records,
            bytes,
            starts,
        }
    }

    /// Where the first `n` records end.
    fn end(&self, n: usize) -> usize {
        self.starts.get(n).copied().unwrap_or(self.bytes.len())
    }

    /// The first `n` records with their LSNs.
    fn prefix(&self, n: usize) -> Vec<(u64, Record)> {
        (self.first_lsn..)
            .zip(self.records[..n].iter().cloned())
            .collect()
    }

    /// Writes `bytes` as this log's only segment in a fresh directory.
    fn write(&self, bytes: &[u8]) -> (TempDir, PathBuf) {
        let dir = temp_dir();
        let path = dir.path().join(segment_file_name(self.first_lsn));
        std::fs::write(&path, bytes).expect("writing the segment");
        (dir, path)
    }

    fn recover(&self, dir: &Path) -> Result<Replay, WalError> {
        replay(dir, RecoveryMode::Strict, self.first_lsn - 1)
    }
}

/// Writes `records` from `first_lsn` on through the writer (`batch` records per append,
/// rotating at `segment_size`) and reads them back with recovery; encodes them into one
/// buffer and reads them back with `decode_record`. Both must give back what was written.
pub fn check_round_trip(first_lsn: u64, records: &[Record], batch: usize, segment_size: u64) {
    let log = Log::new(first_lsn, records.to_vec());
    let mut decoded = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while at < log.bytes.len() {
        let d = decode_record(&log.bytes[at..]).expect("decoding what was encoded");
        decoded.push((d.lsn, d.record));
        at += d.frame_len;
    }
    assert_eq!(
        decoded,
        log.prefix(records.len()),
        "decode_record round trip"
    );

    // Plain segments, and zero-filled ones (whose records end where their zeros start).
    for preallocate in [false, true] {
        round_trip_through_writer(&log, batch, segment_size, preallocate);
    }
}

fn round_trip_through_writer(log: &Log, batch: usize, segment_size: u64, preallocate: bool) {
    let (first_lsn, records) = (log.first_lsn, &log.records);
    let dir = temp_dir();
    let mut writer = WalWriter::open(
        Arc::new(RealFs),
        dir.path(),
        vec![],
        first_lsn,
        segment_size,
        Arc::new(AtomicU64::new(0)),
    )
    .expect("opening the writer");
    if preallocate {
        writer.preallocate().expect("preallocating");
    }
    for first in (0..records.len()).step_by(batch.max(1)) {
        let last = (first + batch.max(1)).min(records.len());
        let mut frames = LogBatch::new(first_lsn + first as u64);
        for record in &records[first..last] {
            frames.push(record);
        }
        assert_eq!(
            frames.bytes(),
            &log.bytes[log.starts[first]..log.end(last)],
            "a batch frames its records as encode_record does"
        );
        writer.append(&frames).expect("appending");
    }
    writer.sync().expect("syncing");
    drop(writer);
    let back = log
        .recover(dir.path())
        .expect("recovering what was written");
    assert_eq!(
        back.records,
        log.prefix(records.len()),
        "writer and recovery round trip (zero-filled segments: {preallocate})"
    );
}

/// Cuts the log at byte `cut`: recovery hands over exactly the whole records before the
/// cut, and leaves the segment ending on the last of them.
pub fn check_cut(log: &Log, cut: usize) {
    let (dir, path) = log.write(&log.bytes[..cut]);
    let whole = (1..=log.records.len())
        .take_while(|n| log.end(*n) <= cut)
        .count();
    let r = log
        .recover(dir.path())
        .unwrap_or_else(|e| panic!("a log cut at {cut} is refused: {e}"));
    assert_eq!(
        r.records,
        log.prefix(whole),
        "records of a log cut at {cut}"
    );
    assert_eq!(
        r.last_lsn,
        log.first_lsn - 1 + whole as u64,
        "last LSN, cut at {cut}"
    );
    // With no whole record left, a torn first record takes the segment with it (it says
    // nothing the previous segment does not), and a segment cut right after its header
    // stays as it is: its name says where the log had got to, and the writer goes on in it.
    let kept = match whole {
        0 if cut == SEGMENT_HEADER_LEN => cut,
        0 => 0,
        _ => log.end(whole),
    };
    assert_eq!(file_len(&path), kept, "bytes left of a log cut at {cut}");
}

/// A file's length, 0 if it is gone.
fn file_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

/// Flips bit `bit` of the log. In the header or a record followed by another, recovery
/// refuses, naming that offset, and leaves the file as it was; in the last record, it cuts
/// that record as a torn tail. Either way it hands over no record that was not written.
pub fn check_bit_flip(log: &Log, bit: usize) {
    let mut bytes = log.bytes.clone();
    bytes[bit / 8] ^= 1 << (bit % 8);
    let (dir, path) = log.write(&bytes);
    let hit = log.starts.iter().rposition(|start| *start <= bit / 8);
    let n = log.records.len();
    match (hit, log.recover(dir.path())) {
        (Some(k), Ok(r)) if k + 1 == n => {
            assert_eq!(
                r.records,
                log.prefix(k),
                "records after a flip at bit {bit}"
            );
            let kept = if k == 0 { 0 } else { log.starts[k] };
            assert_eq!(
                file_len(&path),
                kept,
                "bytes left after a flip at bit {bit}"
            );
        }
        (None, Ok(r)) if n == 0 => assert!(r.records.is_empty()),
        (hit, Err(WalError::Corrupt { offset, .. })) if hit.map_or(n > 0, |k| k + 1 < n) => {
            let at = hit.map_or(0, |k| log.starts[k]);
            assert_eq!(offset, at as u64, "offset named for a flip at bit {bit}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "refusing changed the log"
            );
        }
        (hit, outcome) => panic!(
            "flip at bit {bit} (record {hit:?} of {n}): {:?}",
            outcome.map(|r| r.records)
        ),
    }
}

/// The `round_trip` target: records and how to write them from the input, then a round
/// trip, a cut and a flipped bit of the same log.
pub fn check_round_trip_input(data: &[u8]) {
    let mut b = Bytes::new(data);
    let first_lsn = 1 + (b.u64() >> 16);
    let batch = 1 + usize::from(b.u8() % 4);
    let segment_size = 64 + u64::from(b.u16());
    let (cut, bit) = (usize::from(b.u16()), usize::from(b.u16()));
    let records = records(&mut b, 8);
    check_round_trip(first_lsn, &records, batch, segment_size);
    let log = Log::new(first_lsn, records);
    check_cut(&log, cut % (log.bytes.len() + 1));
    check_bit_flip(&log, bit % (log.bytes.len() * 8));
}
