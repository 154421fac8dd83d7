//! Arbitrary records written and read back, then cut and bit-flipped.
//! The check lives in `../wal_checks.rs`, shared with `tests/wal_props.rs`.

#![no_main]

#[path = "../wal_checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod wal_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wal_checks::check_round_trip_input(data));
