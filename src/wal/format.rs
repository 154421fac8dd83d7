//! The WAL's on-disk format: named constants, segment headers, record framing.
//!
//! ```text
//! segment file  <first lsn, 20 digits>.wal
//!   header      magic (8) | format version u32 LE | first LSN u64 LE | CRC32 u32 LE of the 20 bytes before it
//!   records     length u32 LE | CRC32 u32 LE | LSN u64 LE | payload (length bytes)
//!   zeros       (version 2) the rest of a segment made zero-filled ahead of need
//! ```
//!
//! A record's CRC32 covers its length, its LSN and its payload (everything but the CRC
//! itself). The payload is one [`Record`] encoded with bincode 2's standard configuration.
//! Decoding never trusts a length: it is checked against [`MAX_PAYLOAD_LEN`] and against
//! the bytes actually present before anything is allocated.
//!
//! Version 2 segments may end in zeros: the writer fills a segment with zeros before it
//! takes records ([`super::WalWriter::preallocate`]), so that an append changes no file
//! metadata. A record header of zeros followed by nothing but zeros is the end of the
//! segment; no record is ever all zeros (its length is at least 1). Version 1 segments end
//! at their last record, and this build reads them too.

use crate::domain::{Change, Name, Ports, Serial, Widget};
use serde::{Deserialize, Serialize};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WIDGWAL\n";
/// Bumped whenever the layout below changes; files older than
/// [`OLDEST_FORMAT_VERSION`] or newer than this are refused, not guessed at.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest layout this build reads: version 1 differs only in having no zero tails.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// magic + version + first LSN + CRC.
pub const SEGMENT_HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// length + CRC + LSN.
pub const RECORD_HEADER_LEN: usize = 4 + 4 + 8;
/// A record touches at most four widgets (a few hundred bytes); anything longer is damage.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// File name suffix of a segment.
pub const SEGMENT_SUFFIX: &str = ".wal";

/// One atomic change: the post-images of every widget it touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub changes: Vec<Change>,
}

/// The file name of the segment whose first record has `first_lsn`.
pub fn segment_file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// The first LSN a segment file name stands for, or `None` if it is not a segment's name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // LSNs start at 1: no segment ever starts at 0.
    digits.parse().ok().filter(|&lsn| lsn > 0)
}

pub fn encode_segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What is wrong with a segment header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("segment header is cut short ({0} of {SEGMENT_HEADER_LEN} bytes)")]
    Short(usize),
    #[error("not a widgets WAL segment (bad magic)")]
    BadMagic,
    #[error("segment header checksum mismatch")]
    BadChecksum,
    #[error("unsupported WAL format version {0} (this build reads {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})")]
    Version(u32),
}

/// Checks a segment header and returns the first LSN it names.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, HeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Short(buf.len()));
    }
    if buf[..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let crc = u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[..20]) != crc {
        return Err(HeaderError::BadChecksum);
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    Ok(u64::from_le_bytes(buf[12..20].try_into().expect("8 bytes")))
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, lsn: u64, record: &Record) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    // Encoding into a Vec cannot fail for these types; the limit only applies to decoding.
    bincode::serde::encode_into_std_write(record, out, bincode::config::standard())
        .expect("encoding a WAL record into memory");
    let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 16].copy_from_slice(&lsn.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 4]);
    crc.update(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// Records framed for one append, with consecutive LSNs from [`LogBatch::first_lsn`]. The
/// WAL frames every record it writes: a caller pushes records and learns each one's LSN,
/// and the writer checks that a batch starts where the log ends (as raft-engine's
/// `LogBatch` does), so no caller can write a gap or a duplicate LSN.
#[derive(Debug, Default)]
pub struct LogBatch {
    bytes: Vec<u8>,
    first_lsn: u64,
    records: u64,
}

impl LogBatch {
    /// An empty batch whose first record will have `first_lsn`.
    pub fn new(first_lsn: u64) -> Self {
        Self {
            bytes: Vec::new(),
            first_lsn,
            records: 0,
        }
    }

    /// Empties the batch for records from `first_lsn` on, keeping its buffer.
    pub fn reset(&mut self, first_lsn: u64) {
        self.bytes.clear();
        self.first_lsn = first_lsn;
        self.records = 0;
    }

    /// The LSN the next record pushed gets.
    pub fn next_lsn(&self) -> u64 {
        self.first_lsn + self.records
    }

    /// Frames `record` at [`LogBatch::next_lsn`]; returns that LSN.
    pub fn push(&mut self, record: &Record) -> u64 {
        let lsn = self.next_lsn();
        encode_record(&mut self.bytes, lsn, record);
        self.records += 1;
        lsn
    }

    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }

    /// How many records the batch holds.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The framed records, as they go into a segment.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Why the bytes at some offset are not a whole, valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or the length field promise: a torn tail if it is the
    /// end of the log.
    #[error("record is cut short: needs {needed} bytes, {available} present")]
    Truncated { needed: usize, available: usize },
    #[error("record length {0} is out of range")]
    BadLength(u32),
    #[error("record checksum mismatch")]
    BadChecksum,
    #[error("record payload does not decode: {0}")]
    BadPayload(String),
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub lsn: u64,
    pub record: Record,
    /// Header plus payload: where the next record starts.
    pub frame_len: usize,
}

/// Whether the segment ends at the start of `rest`: a zero-filled tail, nothing in it
/// but zeros (an empty `rest` is not one: the segment just ends there).
pub fn is_zero_tail(rest: &[u8]) -> bool {
    // A header's worth first, so that a record costs one short look; then whole pages,
    // OR-ed together, which the compiler vectorizes (a 64 MiB tail in milliseconds).
    let head = rest.len().min(RECORD_HEADER_LEN);
    !rest.is_empty()
        && rest[..head].iter().all(|&b| b == 0)
        && rest
            .chunks(4096)
            .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Checks the frame at the start of `buf` (length, CRC) without decoding the payload.
/// Returns the LSN and the whole frame's length.
pub fn check_frame(buf: &[u8]) -> Result<(u64, usize), FrameError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: RECORD_HEADER_LEN,
            available: buf.len(),
        });
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    if len == 0 || len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::BadLength(len));
    }
    let frame_len = RECORD_HEADER_LEN + len as usize;
    if buf.len() < frame_len {
        return Err(FrameError::Truncated {
            needed: frame_len,
            available: buf.len(),
        });
    }
    let stored = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..4]);
    crc.update(&buf[8..frame_len]);
    if crc.finalize() != stored {
        return Err(FrameError::BadChecksum);
    }
    let lsn = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    Ok((lsn, frame_len))
}

/// Decodes the whole record at the start of `buf`.
pub fn decode_record(buf: &[u8]) -> Result<Decoded, FrameError> {
    let (lsn, frame_len) = check_frame(buf)?;
    let record =
        decode_payload(&buf[RECORD_HEADER_LEN..frame_len]).map_err(FrameError::BadPayload)?;
    Ok(Decoded {
        lsn,
        record,
        frame_len,
    })
}

/// Decodes a record's payload, bincode 2's standard encoding of [`Record`], by hand:
/// serde's decoder through bincode took a fifth of a WAL replay's CPU in visitors and
/// moves. It accepts exactly the bytes [`encode_record`] writes, which the tests hold it
/// to against bincode's own decoder: what that decoder reads, with each integer in its
/// shortest form (as the encoder writes them) and nothing after the record. One
/// difference: bincode's size limit counts each decoded integer at its width in memory
/// (8 bytes for a one-byte version), so it could refuse a long record that fits in
/// [`MAX_PAYLOAD_LEN`]; here the payload's own length is the bound.
pub fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let mut payload = Payload(payload);
    let count = payload.varint()?;
    // A change takes at least two bytes: nothing is allocated past what the payload holds.
    let mut changes = Vec::with_capacity((payload.0.len() / 2).min(count as usize));
    for _ in 0..count {
        changes.push(payload.change()?);
    }
    if !payload.0.is_empty() {
        return Err(format!("{} trailing bytes", payload.0.len()));
    }
    Ok(Record { changes })
}

/// The payload not read yet.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!("{n} bytes needed, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    /// bincode's varint: up to 250 in one byte, else a marker (251, 252, 253) and 2, 4 or
    /// 8 bytes, little-endian. A value a shorter form holds is refused.
    fn varint(&mut self) -> Result<u64, String> {
        let (value, least) = match self.byte()? {
            small @ 0..=250 => return Ok(small.into()),
            251 => (u16::from_le_bytes(self.array()?).into(), 251),
            252 => (u32::from_le_bytes(self.array()?).into(), 1 << 16),
            253 => (u64::from_le_bytes(self.array()?), 1 << 32),
            marker => return Err(format!("integer marker {marker}")),
        };
        if value < least {
            return Err(format!("integer {value} not in its shortest form"));
        }
        Ok(value)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let len = self.varint()?;
        let bytes =
            self.take(usize::try_from(len).map_err(|_| format!("string of {len} bytes"))?)?;
        std::str::from_utf8(bytes).map_err(|e| e.to_string())
    }

    fn option_tag(&mut self) -> Result<bool, String> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(format!("option tag {tag}")),
        }
    }

    /// A [`Change`]: its variant's index, then its fields in declaration order, as
    /// serde's derive lays them out ([`Widget`]: name, ports, peers, version).
    fn change(&mut self) -> Result<Change, String> {
        match self.varint()? {
            0 => {
                let serial = Serial::decoded(self.str()?);
                let name = Name::decoded(self.str()?);
                let ports = Ports::decoded(self.byte()?);
                let mut peers: [Option<Serial>; 3] = Default::default();
                for peer in &mut peers {
                    if self.option_tag()? {
                        *peer = Some(Serial::decoded(self.str()?));
                    }
                }
                let version = self.varint()?;
                Ok(Change::Put {
                    serial,
                    widget: Widget {
                        name,
                        ports,
                        peers,
                        version,
                    },
                })
            }
            1 => Ok(Change::Delete {
                serial: Serial::decoded(self.str()?),
            }),
            variant => Err(format!("change variant {variant}")),
        }
    }
}

/// How many records in `segment` (a whole segment file, header first) with an LSN above
/// `above` hold one [`Change::Put`] and nothing else. Every create is logged so (a record
/// of more changes re-plugs or deletes widgets that exist), so the count bounds how many
/// widgets replaying the segment above a checkpoint can add: replay sizes the map with
/// it. An estimate, read from the frames' lengths, LSNs and each payload's first two bytes
/// (bincode's vector length 1, then variant 0) with no checksum: it stops at the first
/// frame that does not fit, as at a zero tail.
pub fn single_puts(segment: &[u8], above: u64) -> usize {
    let mut at = SEGMENT_HEADER_LEN;
    let mut count = 0;
    while let Some(header) = segment.get(at..at + RECORD_HEADER_LEN) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let end = at + RECORD_HEADER_LEN + len;
        if len == 0 || len > MAX_PAYLOAD_LEN || end > segment.len() {
            break;
        }
        let lsn = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if lsn > above && segment[at + RECORD_HEADER_LEN..end].starts_with(&[1, 0]) {
            count += 1;
        }
        at = end;
    }
    count
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::PortType;

    pub(crate) fn sample(i: u64) -> Record {
        let serial = Serial::parse("s", &format!("w{i}")).unwrap();
        let mut widget = Widget::new(
            Name::parse("n", "widget").unwrap(),
            Ports::from_list("p", &[PortType::P, PortType::Q]).unwrap(),
        );
        widget.peers[0] = Some(Serial::parse("s", "peer").unwrap());
        widget.version = i;
        Record {
            changes: vec![
                Change::Put { serial, widget },
                Change::Delete {
                    serial: Serial::parse("s", "gone").unwrap(),
                },
            ],
        }
    }

    /// bincode's own decoder, which the WAL used before it had its own.
    fn bincode_decode(payload: &[u8]) -> Result<Record, String> {
        let config = bincode::config::standard().with_limit::<MAX_PAYLOAD_LEN>();
        match bincode::serde::decode_from_slice(payload, config) {
            Ok((record, used)) if used == payload.len() => Ok(record),
            Ok(_) => Err("trailing bytes".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn payload(record: &Record) -> Vec<u8> {
        let mut framed = Vec::new();
        encode_record(&mut framed, 1, record);
        framed.split_off(RECORD_HEADER_LEN)
    }

    /// Every form of every field: integers at the edges of bincode's varint forms (the
    /// version, a name's length), peers present and absent, both variants, no change.
    #[test]
    fn the_payload_decoder_reads_what_bincode_writes() {
        let mut records = vec![Record { changes: vec![] }, sample(1)];
        for version in [
            0,
            250,
            251,
            65_535,
            65_536,
            u32::MAX as u64,
            1 << 32,
            u64::MAX,
        ] {
            let mut record = sample(version);
            if let Change::Put { widget, .. } = &mut record.changes[0] {
                widget.peers = [None, Some(Serial::decoded("x")), Some(Serial::decoded("y"))];
                widget.name = Name::decoded(&"n".repeat(version.min(300) as usize));
                widget.ports = Ports::decoded(version as u8);
            }
            records.push(record);
        }
        for record in records {
            let bytes = payload(&record);
            assert_eq!(decode_payload(&bytes), Ok(record.clone()));
            assert_eq!(bincode_decode(&bytes), Ok(record));
        }
    }

    /// What the encoder never writes: cut short anywhere, followed by a byte, an integer
    /// longer than it needs, an unknown variant or option tag, a string that is not UTF-8.
    #[test]
    fn the_payload_decoder_refuses_what_the_encoder_never_writes() {
        let bytes = payload(&sample(300));
        for cut in 0..bytes.len() {
            assert!(decode_payload(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // The layout, field by field: two changes; a put (variant 0) of "w300" named
        // "widget", ports P and Q (5), the first peer "peer", no others, version 300 (251
        // then a u16); a delete (variant 1) of "gone".
        let layout = [
            &[2, 0, 4][..],
            b"w300",
            &[6],
            b"widget",
            &[5, 1, 4],
            b"peer",
            &[0, 0, 251, 44, 1, 1, 4],
            b"gone",
        ];
        assert_eq!(bytes, layout.concat());
        let edited = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            edit(&mut b);
            assert!(bincode_decode(&b).is_err(), "bincode reads {b:?}");
            decode_payload(&b)
        };
        assert_eq!(edited(&|b| b.push(0)), Err("1 trailing bytes".into()));
        assert_eq!(edited(&|b| b[1] = 2), Err("change variant 2".into()));
        assert_eq!(edited(&|b| b[1] = 255), Err("integer marker 255".into()));
        assert_eq!(edited(&|b| b[15] = 2), Err("option tag 2".into()));
        assert!(edited(&|b| b[3] = 0xff).is_err(), "not UTF-8");
        // The version as a u32: a form bincode reads and the encoder never writes.
        let mut wide = bytes[..23].to_vec();
        wide.extend_from_slice(&[252, 44, 1, 0, 0]);
        wide.extend_from_slice(&bytes[26..]);
        assert_eq!(bincode_decode(&wide), Ok(sample(300)));
        assert_eq!(
            decode_payload(&wide),
            Err("integer 300 not in its shortest form".into())
        );
    }

    /// The count replay sizes the map with: records of one put above the checkpoint, and
    /// nothing past the last whole frame.
    #[test]
    fn single_puts_counts_the_records_of_one_put() {
        let put = sample(1).changes.swap_remove(0);
        let delete = sample(1).changes.swap_remove(1);
        assert!(matches!(put, Change::Put { .. }) && matches!(delete, Change::Delete { .. }));
        let mut segment = encode_segment_header(1).to_vec();
        let records = [
            vec![put.clone()],
            vec![put.clone(), put.clone()],
            vec![delete.clone()],
            vec![put.clone()],
            vec![delete, put.clone()],
            vec![],
        ];
        for (lsn, changes) in (1..).zip(records) {
            encode_record(&mut segment, lsn, &Record { changes });
        }
        assert_eq!(single_puts(&segment, 0), 2);
        let whole = segment.len();
        encode_record(&mut segment, 7, &Record { changes: vec![put] });
        assert_eq!(single_puts(&segment, 0), 3);
        assert_eq!(single_puts(&segment, 3), 2, "LSNs 4 and 7 above 3");
        assert_eq!(
            single_puts(&segment, 7),
            0,
            "a checkpoint at the last record"
        );
        assert_eq!(
            single_puts(&segment[..segment.len() - 1], 0),
            2,
            "a torn frame"
        );
        segment.truncate(whole);
        segment.resize(whole + 4096, 0);
        assert_eq!(single_puts(&segment, 0), 2, "a zero tail");
        assert_eq!(single_puts(&segment[..10], 0), 0, "a torn header");
    }

    /// The end of a zero-filled segment cannot be mistaken for a record, nor a record's
    /// bytes for an end.
    #[test]
    fn zeros_are_never_a_record_and_only_zeros_are_a_tail() {
        assert!(check_frame(&[0u8; 256]).is_err());
        assert!(is_zero_tail(&[0u8; 10_000]));
        assert!(is_zero_tail(&[0u8; 3]), "shorter than a header");
        assert!(!is_zero_tail(&[]), "nothing left is no tail");
        for at in [0, 5, RECORD_HEADER_LEN, 4095, 4096, 9_999] {
            let mut tail = vec![0u8; 10_000];
            tail[at] = 1;
            assert!(!is_zero_tail(&tail), "a byte at {at}");
        }
        let mut framed = Vec::new();
        encode_record(&mut framed, 1, &sample(1));
        assert!(!is_zero_tail(&framed));
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        for i in 1..=3 {
            encode_record(&mut buf, i, &sample(i));
        }
        let mut at = 0;
        for i in 1..=3 {
            let d = decode_record(&buf[at..]).unwrap();
            assert_eq!((d.lsn, &d.record), (i, &sample(i)));
            at += d.frame_len;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn torn_tail_and_truncated_header_are_truncated() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, &sample(7));
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    decode_record(&buf[..cut]),
                    Err(FrameError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 9, &sample(9));
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_record(&bad).is_err(),
                    "flip at {byte}.{bit} went unseen"
                );
            }
        }
    }

    #[test]
    fn huge_length_is_refused_before_allocating() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, &sample(1));
        buf[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_record(&buf), Err(FrameError::BadLength(u32::MAX)));
        // Longer than the file but within the limit: truncated, not an allocation.
        buf[..4].copy_from_slice(&60_000u32.to_le_bytes());
        assert!(matches!(
            decode_record(&buf),
            Err(FrameError::Truncated { needed: 60_016, .. })
        ));
    }

    #[test]
    fn segment_header_and_names() {
        let h = encode_segment_header(42);
        assert_eq!(decode_segment_header(&h), Ok(42));
        assert_eq!(decode_segment_header(&h[..10]), Err(HeaderError::Short(10)));
        let mut bad = h;
        bad[13] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(HeaderError::BadChecksum));
        bad = h;
        bad[0] = b'X';
        assert_eq!(decode_segment_header(&bad), Err(HeaderError::BadMagic));
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.wal"), None);
        assert_eq!(parse_segment_file_name(&segment_file_name(0)), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.wal"), None);
    }
}
