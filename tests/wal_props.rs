//! The WAL parser and recovery under random input, on stable, on every `cargo test`: the
//! committed fuzz corpus replayed through the fuzz targets' checks, and the same checks
//! driven by proptest (random records, a cut at every offset, every single flipped bit).

#[path = "../fuzz/wal_checks.rs"]
mod wal_checks;

use proptest::prelude::*;
use std::path::PathBuf;
use wal_checks::{Bytes, Log};
use widgets::wal::format::{encode_record, RECORD_HEADER_LEN};
use widgets::wal::Record;

/// Runs `check` on every file of `fuzz/<dir>`, which must not be empty.
fn replay(dir: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    let failed: Vec<_> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .collect();
    assert!(
        failed.is_empty(),
        "failing inputs (panics above): {failed:#?}"
    );
}

#[test]
fn decode_record_corpus() {
    replay("corpus/decode_record", wal_checks::check_decode);
}

/// The recover_dir corpus includes the inputs on which fuzzing caught recovery breaking
/// its contract (fixed since): `lsn-zero-segment` and `lsn-max-segment` (LSN arithmetic on
/// values read from disk), `gap-segment-raises-last-lsn` and `truncate-missing-records` (a
/// segment cut whole after a hole still moved the log's end past the hole),
/// `empty-older-segment` and `empty-segment-before-removed-gap` (an empty segment left at
/// the end, which the writer then could not create again).
#[test]
fn recover_dir_corpus() {
    replay("corpus/recover_dir", wal_checks::check_recover_dir);
}

#[test]
fn round_trip_corpus() {
    replay("corpus/round_trip", wal_checks::check_round_trip_input);
}

/// Between `min` and `max` records, each built from its own random bytes so that proptest
/// shrinks them one by one.
fn records(min: usize, max: usize) -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), min..=max).prop_map(|raw| {
        raw.iter()
            .map(|bytes| wal_checks::record(&mut Bytes::new(bytes)))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_records_round_trip(
        first_lsn in 1u64..1 << 40,
        records in records(0, 12),
        batch in 1usize..5,
        segment_size in 64u64..2048,
    ) {
        wal_checks::check_round_trip(first_lsn, &records, batch, segment_size);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Each byte of an encoded record's payload replaced, in turn, by every value: the
    /// WAL's decoder and bincode's agree on all of them.
    #[test]
    fn every_byte_of_a_payload_changed_is_read_as_bincode_reads_it(
        raw in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut framed = Vec::new();
        encode_record(&mut framed, 1, &wal_checks::record(&mut Bytes::new(&raw)));
        let payload = &framed[RECORD_HEADER_LEN..];
        wal_checks::check_payload(payload);
        for at in 0..payload.len() {
            let mut changed = payload.to_vec();
            for value in 0..=u8::MAX {
                changed[at] = value;
                wal_checks::check_payload(&changed);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_cut_at_every_offset_keeps_exactly_the_whole_records_before_it(
        first_lsn in 1u64..1 << 40,
        records in records(1, 4),
    ) {
        let log = Log::new(first_lsn, records);
        for cut in 0..=log.bytes.len() {
            wal_checks::check_cut(&log, cut);
        }
    }

    #[test]
    fn every_flipped_bit_is_cut_as_a_torn_tail_or_refused(
        first_lsn in 1u64..1 << 40,
        records in records(2, 4),
    ) {
        let log = Log::new(first_lsn, records);
        for bit in 0..log.bytes.len() * 8 {
            wal_checks::check_bit_flip(&log, bit);
        }
    }
}
