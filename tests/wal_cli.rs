//! `widgets wal inspect` and `widgets wal verify` on real logs: clean, torn, damaged.

mod common;

use common::spawn_app_with;
use std::path::Path;
use std::process::{Command, Output};
use widgets::wal::format;

fn wal(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_widgets"))
        .arg("wal")
        .args(args)
        .arg(dir)
        .output()
        .expect("running widgets wal")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A crash image of a WAL with 4 records: three creates and one association.
async fn log_with_records() -> tempfile::TempDir {
    let app = spawn_app_with(&["--flush-interval", "1h"]).await;
    for s in ["alpha", "beta", "gamma"] {
        assert!(app.create(s, &["P"]).await.status().is_success());
    }
    assert!(app
        .associate("P", "alpha", "beta")
        .await
        .status()
        .is_success());
    let image = app.crash_image();
    app.stop().await;
    image
}

fn only_segment(wal_dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("wal".as_ref()))
        .collect();
    assert_eq!(segments.len(), 1);
    segments.pop().unwrap()
}

#[tokio::test]
async fn inspect_lists_segments_and_records_and_verify_passes_a_clean_log() {
    let image = log_with_records().await;
    let dir = image.path().join("wal");
    let out = wal(&["inspect"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let listing = text(&out);
    assert!(
        listing.contains("00000000000000000001.wal") && listing.contains("records=4"),
        "{listing}"
    );
    assert!(listing.contains("lsn=1 offset=24 put:alpha@1"), "{listing}");
    assert!(
        listing.contains("lsn=4") && listing.contains("put:alpha@4 put:beta@4"),
        "{listing}"
    );
    let out = wal(&["verify"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 segments, 4 records, all checksums valid"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn verify_names_the_file_and_offset_of_damage_and_changes_nothing() {
    let image = log_with_records().await;
    let dir = image.path().join("wal");
    let segment = only_segment(&dir);
    let mut data = std::fs::read(&segment).unwrap();
    let second_record = {
        let listing = text(&wal(&["inspect"], &dir));
        let line = listing
            .lines()
            .find(|l| l.contains("lsn=2 "))
            .unwrap()
            .to_owned();
        line.split("offset=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    data[second_record + 20] ^= 0x10;
    std::fs::write(&segment, &data).unwrap();

    let out = wal(&["verify"], &dir);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("00000000000000000001.wal"), "{msg}");
    assert!(msg.contains(&format!("DAMAGED (recovery refuses to start; --wal-recovery truncate cuts here) at offset {second_record}")), "{msg}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        data,
        "verify must not touch the log"
    );

    let out = wal(&["inspect"], &dir);
    assert!(
        !out.status.success(),
        "inspect also fails on damage, after listing"
    );
    assert!(text(&out).contains("lsn=1 offset=24"), "{}", text(&out));
}

#[tokio::test]
async fn verify_reports_a_torn_tail_as_such() {
    let image = log_with_records().await;
    let dir = image.path().join("wal");
    let segment = only_segment(&dir);
    let data = std::fs::read(&segment).unwrap();
    // The segment is zero-filled past its records: tear the last record itself.
    let end = data.iter().rposition(|&b| b != 0).unwrap() + 1;
    std::fs::write(&segment, &data[..end - 5]).unwrap();
    let out = wal(&["verify"], &dir);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("TORN TAIL (recovery cuts it off)"),
        "{}",
        text(&out)
    );
}

/// verify says what recovery does of two newest segments that look like a tail: a
/// header that is whole but wrong, in front of records, is damage, not a torn tail; and a
/// segment of a header alone after a gap is a gap, which recovery refuses.
#[tokio::test]
async fn verify_calls_a_wrong_header_and_a_gap_damage_as_recovery_does() {
    let image = log_with_records().await;
    let dir = image.path().join("wal");
    let segment = only_segment(&dir);
    let good = std::fs::read(&segment).unwrap();
    let mut wrong = good.clone();
    wrong[..8].fill(0);
    std::fs::write(&segment, &wrong).unwrap();
    let out = wal(&["verify"], &dir);
    assert!(!out.status.success());
    assert!(text(&out).contains("DAMAGED"), "{}", text(&out));

    std::fs::write(&segment, &good).unwrap();
    let after_gap = dir.join(format::segment_file_name(1000));
    std::fs::write(&after_gap, format::encode_segment_header(1000)).unwrap();
    let out = wal(&["verify"], &dir);
    assert!(!out.status.success());
    let report = text(&out);
    assert!(
        report.contains("previous one ended before") && report.contains("DAMAGED"),
        "{report}"
    );
}

/// verify given a data directory, not its WAL directory, says so and fails: it found no
/// segment there, and reported "0 segments, all checksums valid".
#[tokio::test]
async fn verify_of_a_data_directory_points_at_its_wal() {
    let image = log_with_records().await;
    let out = wal(&["verify"], image.path());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&image.path().join("wal").display().to_string()),
        "{}",
        text(&out)
    );
}

#[test]
fn verify_of_a_missing_directory_fails_clearly() {
    let out = wal(&["verify"], Path::new("/nonexistent/wal"));
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent/wal"), "{}", text(&out));
}
