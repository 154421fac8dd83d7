//! Disk faults under the WAL (through the file-system seam), damaged logs at start-up, and
//! the limits that turn writes away with `503` while reads go on.

mod common;

use common::{error_code, spawn_app_in, spawn_app_with, try_spawn_app_in};
use reqwest::StatusCode;
use std::sync::Arc;
use tempfile::TempDir;
use widgets::wal::{Fault, FaultyFs, RealFs};

async fn faulty_app(args: &[&str]) -> (common::TestApp, FaultyFs) {
    let fs = FaultyFs::new();
    let app = spawn_app_in(
        Arc::new(TempDir::new().unwrap()),
        args,
        Arc::new(fs.clone()),
    )
    .await;
    (app, fs)
}

async fn assert_503(r: reqwest::Response, code: &str, retry_after: bool) {
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.headers().contains_key("retry-after"),
        retry_after,
        "Retry-After on {code}"
    );
    assert_eq!(error_code(r).await, code);
}

#[tokio::test]
async fn no_space_answers_503_changes_nothing_and_recovers_when_space_returns() {
    let (app, fs) = faulty_app(&[]).await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    assert_eq!(app.create("b", &["P"]).await.status(), StatusCode::CREATED);

    fs.set(Fault::NoSpace);
    assert_503(app.associate("P", "a", "b").await, "disk_full", true).await;
    assert_503(app.create("c", &["P"]).await, "disk_full", true).await;
    assert_eq!(
        app.peer("a", "P").await,
        None,
        "the refused write is not visible"
    );
    assert!(app.widget("c").await.is_none());

    fs.set(Fault::None);
    assert_eq!(app.associate("P", "a", "b").await.status(), StatusCode::OK);
    assert_eq!(app.create("c", &["P"]).await.status(), StatusCode::CREATED);

    // The half-written batch was cut off: the log reads back cleanly (strict recovery).
    let dir = app.stop().await;
    let app = spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    assert_eq!(app.peer("b", "P").await.as_deref(), Some("a"));
    assert!(app.widget("c").await.is_some());
}

#[tokio::test]
async fn refusals_are_counted_by_code() {
    let (app, fs) = faulty_app(&[]).await;
    let refused = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("widgets_refused_total{") && l.contains(r#"code="disk_full""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = refused(&app.get("/metrics").await.text().await.unwrap());
    fs.set(Fault::NoSpace);
    for i in 0..20 {
        let r = app.create(&format!("full{i}"), &["P"]).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    fs.set(Fault::None);
    let after = refused(&app.get("/metrics").await.text().await.unwrap());
    assert!(after - before >= 20.0, "{before} -> {after}");
}

#[tokio::test]
async fn a_write_error_answers_503_and_the_next_write_works() {
    let (app, fs) = faulty_app(&[]).await;
    fs.set(Fault::WalWrite);
    assert_503(app.create("a", &["P"]).await, "storage_error", true).await;
    fs.set(Fault::None);
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_failed_fsync_stops_all_write_acknowledgements_until_restart() {
    let (app, fs) = faulty_app(&[]).await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    assert_eq!(app.create("b", &["P"]).await.status(), StatusCode::CREATED);

    fs.set(Fault::SyncError);
    assert_503(app.associate("P", "a", "b").await, "wal_failed", false).await;
    // Even with the disk healthy again, the writer never retries the fsync as if it worked.
    fs.set(Fault::None);
    assert_503(app.create("c", &["P"]).await, "wal_failed", false).await;
    assert_503(app.free("a", "P").await, "wal_failed", false).await;
    assert_503(app.get("/readyz").await, "wal_failed", false).await;
    // Reads go on, and show only what was acknowledged.
    assert_eq!(app.peer("a", "P").await, None);
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);

    let dir = app.stop().await;
    let app = spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    assert!(app.widget("a").await.is_some() && app.widget("b").await.is_some());
    assert!(app.widget("c").await.is_none());
    assert_eq!(app.create("c", &["P"]).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_failed_directory_fsync_on_rotation_stops_write_acknowledgements() {
    let (app, fs) = faulty_app(&["--wal-segment-bytes", "4096"]).await;
    fs.set(Fault::DirSyncError);
    let mut acknowledged = 0;
    let mut refused = None;
    for i in 0..200 {
        let r = app.create(&format!("w{i}"), &["P", "R"]).await;
        if r.status() == StatusCode::CREATED {
            acknowledged += 1;
        } else {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("a rotation within 200 creates should hit the fault");
    assert_503(r, "wal_failed", false).await;
    assert!(acknowledged > 0, "writes before the rotation were fine");
    fs.set(Fault::None);
    assert_503(app.create("late", &["P"]).await, "wal_failed", false).await;

    let dir = app.stop().await;
    let app = spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    for i in 0..acknowledged {
        assert!(
            app.widget(&format!("w{i}")).await.is_some(),
            "acknowledged w{i} lost"
        );
    }
}

/// The one WAL segment in the data directory `dir`.
fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let segments: Vec<_> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.into_iter().next().unwrap()
}

/// Flips one byte inside the first record of the oldest WAL segment.
fn damage_first_record(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let path = segments.remove(0);
    let mut data = std::fs::read(&path).unwrap();
    let header = widgets::wal::format::SEGMENT_HEADER_LEN + widgets::wal::format::RECORD_HEADER_LEN;
    data[header + 2] ^= 0xff;
    std::fs::write(&path, data).unwrap();
    path
}

#[tokio::test]
async fn a_damaged_log_stops_start_up_naming_file_and_offset_unless_told_to_truncate() {
    // The crash image has no store, so replay starts at LSN 1; damage the first record.
    let app = spawn_app_with(&["--flush-interval", "1h"]).await;
    for i in 0..5 {
        assert_eq!(
            app.create(&format!("w{i}"), &["P"]).await.status(),
            StatusCode::CREATED
        );
    }
    let crashed = app.crash_image();
    app.stop().await;
    let damaged = damage_first_record(crashed.path());

    let mut app = try_spawn_app_in(crashed.path(), &[], Arc::new(RealFs))
        .await
        .unwrap();
    let refused = app
        .ready()
        .await
        .expect_err("start-up must refuse a damaged log");
    let err = refused.to_string();
    let name = damaged.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name) && err.contains("offset 24"), "{err}");
    assert!(err.contains("--wal-recovery truncate"), "{err}");
    // The whole chain, as the service prints it, says it once.
    let chain = format!("{refused:#}");
    assert_eq!(chain.matches("offset 24").count(), 1, "{chain}");
    assert!(
        app.stop().await.is_err(),
        "the app reports the failed recovery"
    );

    let app = spawn_app_in(
        Arc::new(crashed),
        &["--wal-recovery", "truncate"],
        Arc::new(RealFs),
    )
    .await;
    assert!(
        app.widget("w0").await.is_none(),
        "the damaged record and all after it were cut"
    );
    assert!(app.widget("w4").await.is_none());
    assert_eq!(app.create("w0", &["P"]).await.status(), StatusCode::CREATED);
}

/// Damage in records the store already holds, in the newest segment (after a graceful
/// stop): truncate mode cuts there, as asked, and starts from the store, with every widget.
/// It was refused after the cut as a log older than the store, the cut already made.
#[tokio::test]
async fn truncate_mode_cuts_damage_in_what_the_store_holds_and_starts() {
    let app = spawn_app_with(&["--flush-interval", "1h"]).await;
    for i in 0..5 {
        assert_eq!(
            app.create(&format!("w{i}"), &["P"]).await.status(),
            StatusCode::CREATED
        );
    }
    // The graceful stop flushes all five: the store's checkpoint is the log's end, and the
    // one segment holds records 1 to 5. Damage the third: records follow it, so it is no
    // torn tail.
    let dir = app.stop().await;
    let segment = only_segment(dir.path());
    let mut data = std::fs::read(&segment).unwrap();
    let mut at = widgets::wal::format::SEGMENT_HEADER_LEN;
    for _ in 0..2 {
        let (_, len) = widgets::wal::format::check_frame(&data[at..]).unwrap();
        at += len;
    }
    data[at + widgets::wal::format::RECORD_HEADER_LEN + 2] ^= 0xff;
    std::fs::write(&segment, data).unwrap();
    let app = spawn_app_in(dir, &["--wal-recovery", "truncate"], Arc::new(RealFs)).await;
    for i in 0..5 {
        assert!(app.widget(&format!("w{i}")).await.is_some(), "w{i} lost");
    }
    assert_eq!(app.create("w5", &["P"]).await.status(), StatusCode::CREATED);
    let dir = app.stop().await;
    let app = spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    assert!(
        app.widget("w5").await.is_some(),
        "a write after the cut was lost"
    );
}

#[tokio::test]
async fn over_the_dirty_limit_writes_get_503_overloaded_and_reads_go_on() {
    let app = spawn_app_with(&["--max-dirty", "3", "--flush-interval", "1h"]).await;
    for s in ["a", "b", "c"] {
        assert_eq!(app.create(s, &["P"]).await.status(), StatusCode::CREATED);
    }
    assert_503(app.create("d", &["P"]).await, "overloaded", true).await;
    assert_503(app.associate("P", "a", "b").await, "overloaded", true).await;
    assert!(app.widget("a").await.is_some());
    assert!(app.widget("d").await.is_none());
}

#[tokio::test]
async fn over_the_wal_size_limit_writes_get_503_overloaded() {
    let app = spawn_app_with(&["--wal-max-bytes", "4096", "--flush-interval", "1h"]).await;
    let mut status = StatusCode::CREATED;
    let mut i = 0;
    while status == StatusCode::CREATED && i < 500 {
        status = app
            .create(&format!("widget-{i}"), &["P", "R", "Q"])
            .await
            .status();
        i += 1;
    }
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "4 KiB of WAL fill up within 500 creates"
    );
    assert_503(app.create("one-more", &["P"]).await, "overloaded", true).await;
    assert!(app.widget("widget-0").await.is_some());
}
