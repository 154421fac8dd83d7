//! A full disk under the embedded store, for real: a small tmpfs (mounting one needs root,
//! which CI has). The store fails its flush, nothing is lost, and once there is space
//! again the flusher's retry reaches a working store with no restart.

#[macro_use]
mod common;

use reqwest::StatusCode;
use std::sync::Arc;
use widgets::wal::RealFs;
use widgets_testkit::disk::{fill, Tmpfs};

fn metric(text: &str, name: &str) -> f64 {
    common::metric(text, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_heals_after_a_full_disk_without_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt, "32m");
    let data = Arc::new(tempfile::tempdir_in(&mnt).unwrap());
    // Flushes come only when 3,000 widgets are dirty: the 3,000th create below, after the
    // disk has filled up, sends all of them to the store at once.
    let app = common::spawn_app_in(
        data.clone(),
        &[
            "--flush-interval",
            "1h",
            "--flush-batch",
            "3000",
            "--ready-max-flush-lag",
            "1s",
        ],
        Arc::new(RealFs),
    )
    .await;
    for i in 0..2999 {
        let r = app.create(&format!("f{i}"), &["P"]).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // Full to the last byte, but for a few pages the WAL's next record can use.
    let reserve = mnt.join("reserve");
    std::fs::write(&reserve, vec![0u8; 16 << 10]).unwrap();
    let filler = fill(&mnt);
    std::fs::remove_file(&reserve).unwrap();
    let r = app.create("f2999", &["P"]).await;
    assert_eq!(r.status(), StatusCode::CREATED);

    eventually!("the store's flush to fail on the full disk", 15, {
        let m = app.get("/metrics").await.text().await.unwrap();
        metric(&m, "widgets_flush_failures_total") > 0.0
    });
    assert!(app.widget("f2999").await.is_some(), "reads go on");
    // sled refused the write before the kernel had it: nothing to rebuild the store for
    // (a write that failed otherwise marks it so, beside it).
    assert!(
        !data.path().join("store.rebuild").exists(),
        "a full disk marked the store for a rebuild"
    );
    eventually!("/readyz to say the flusher is stalled", 10, {
        app.get("/readyz").await.status() == StatusCode::SERVICE_UNAVAILABLE
    });

    std::fs::remove_file(&filler).unwrap();
    // With space back, the next write (the backlog is still over --flush-batch) asks for
    // a flush: the store must take it, with no restart.
    assert_eq!(
        app.create("after", &["P"]).await.status(),
        StatusCode::CREATED
    );
    eventually!("the backlog to reach the store without a restart", 60, {
        let m = app.get("/metrics").await.text().await.unwrap();
        metric(&m, "widgets_dirty") == 0.0 && metric(&m, "widgets_checkpoint_lsn") >= 3001.0
    });
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);

    // And the store holds what it said it does: a restart loads it.
    let data = app.stop().await;
    let again = common::spawn_app_in(data, &[], Arc::new(RealFs)).await;
    for serial in ["f0", "f2999", "after"] {
        assert!(again.widget(serial).await.is_some(), "{serial} lost");
    }
    again.stop().await;
}
