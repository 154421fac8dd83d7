//! Recovery, in both modes, over a WAL directory built from arbitrary bytes.
//! The check lives in `../wal_checks.rs`, shared with `tests/wal_props.rs`.

#![no_main]

#[path = "../wal_checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod wal_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wal_checks::check_recover_dir(data));
