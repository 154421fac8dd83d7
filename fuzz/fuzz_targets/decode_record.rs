//! Arbitrary bytes through `decode_record` and `check_frame`, walked frame by frame as recovery walks a segment.
//! The check lives in `../wal_checks.rs`, shared with `tests/wal_props.rs`.

#![no_main]

#[path = "../wal_checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod wal_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wal_checks::check_decode(data));
