//! One writer, one history: a second instance on the same data directory refuses to start
//! at once, naming the lock and the holder's PID, in-process and as a real process; and a
//! WAL and a store that are not from one history (another store's WAL, a store whose WAL
//! is gone, a WAL older than the store, a store older than the WAL) refuse to start
//! together unless told to.

mod common;

use common::binary;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use widgets::wal::RealFs;

#[tokio::test]
async fn a_second_app_on_one_data_directory_is_refused_until_the_first_stops() {
    let first = common::spawn_app_with(&[]).await;
    assert_eq!(first.create("a", &["P"]).await.status(), 201);
    let dir = first.dir.clone();

    let refused = common::try_spawn_app_in(dir.path(), &[], Arc::new(RealFs)).await;
    let message = format!("{:#}", refused.err().expect("the second app started"));
    let lock = dir.path().join("lock");
    assert!(
        message.contains(&lock.display().to_string()),
        "the refusal names the lock: {message}"
    );
    assert!(
        message.contains(&format!("PID {}", std::process::id())),
        "the refusal names the holder: {message}"
    );
    assert!(
        first.widget("a").await.is_some(),
        "the first app goes on serving"
    );

    let dir = first.stop().await;
    let again = common::spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    assert!(
        again.widget("a").await.is_some(),
        "free once the holder has stopped"
    );
    again.stop().await;
}

#[tokio::test]
async fn a_second_process_on_one_data_directory_exits_at_once_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = binary::start(dir.path(), &[]).await;
    let holder = std::fs::read_to_string(dir.path().join("lock")).unwrap();

    let started = Instant::now();
    let second = Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running the second widgets process");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second process served:\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused late: {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!("PID {}", holder.trim())),
        "the refusal names the holder's PID {holder}:\n{stderr}"
    );
    assert_eq!(first.stop().await.expect("stopping").code(), Some(0));
}

/// Replaces `dir`'s WAL directory with a copy of `from`.
fn put_wal(dir: &std::path::Path, from: &std::path::Path) {
    let wal = dir.join("wal");
    std::fs::remove_dir_all(&wal).unwrap();
    std::fs::create_dir(&wal).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), wal.join(entry.file_name())).unwrap();
    }
}

/// Starts an app on `dir`, which must refuse with a message holding every one of `why`;
/// then starts it with `--accept-mismatched-wal`, which must work.
async fn refused_unless_accepted(dir: Arc<tempfile::TempDir>, why: &[&str]) -> common::TestApp {
    refused(&dir, &[], why).await;
    common::spawn_app_in(dir, &["--accept-mismatched-wal"], Arc::new(RealFs)).await
}

#[tokio::test]
async fn a_wal_and_a_store_from_different_histories_refuse_to_start_together() {
    let a = common::spawn_app_with(&[]).await;
    assert_eq!(a.create("a", &["P"]).await.status(), 201);
    let b = common::spawn_app_with(&[]).await;
    assert_eq!(b.create("b", &["P"]).await.status(), 201);
    let (a_dir, b_dir) = (a.stop().await, b.stop().await);

    put_wal(b_dir.path(), &a_dir.path().join("wal"));
    let accepted =
        refused_unless_accepted(b_dir, &["belongs to history", "--accept-mismatched-wal"]).await;
    assert!(
        accepted.widget("b").await.is_some(),
        "the store's own widgets"
    );
    accepted.stop().await;
}

#[tokio::test]
async fn a_store_whose_wal_is_gone_refuses_to_start() {
    let app = common::spawn_app_with(&["--flush-interval", "1h"]).await;
    assert_eq!(app.create("kept", &["P"]).await.status(), 201);
    let dir = app.stop().await;
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();

    let accepted = refused_unless_accepted(dir, &["holds no WAL"]).await;
    assert!(
        accepted.widget("kept").await.is_some(),
        "flushed at the graceful stop"
    );
    accepted.stop().await;
}

#[tokio::test]
async fn a_wal_older_than_its_store_refuses_to_start() {
    let app = common::spawn_app_with(&["--flush-interval", "1h"]).await;
    assert_eq!(app.create("early", &["P"]).await.status(), 201);
    let old_wal = app.crash_image();
    assert_eq!(app.create("late", &["P"]).await.status(), 201);
    let dir = app.stop().await;

    put_wal(dir.path(), &old_wal.path().join("wal"));
    let accepted = refused_unless_accepted(dir, &["below the store's checkpoint"]).await;
    assert!(accepted.widget("late").await.is_some());
    assert_eq!(
        accepted.create("after", &["P"]).await.status(),
        201,
        "new writes go on above the store's checkpoint"
    );
    accepted.stop().await;
}

/// A copy of `from` (a directory tree) at `to`, which must not exist.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Starts an app on `dir` with `args`, which must be refused with a message holding every
/// one of `why`; returns once the refused app has let go of the directory.
async fn refused(dir: &Arc<tempfile::TempDir>, args: &[&str], why: &[&str]) {
    let mut app = common::try_spawn_app_in(dir.path(), args, Arc::new(RealFs))
        .await
        .expect("binding");
    let err = app.ready().await.expect_err("the app started");
    let message = format!("{err:#}");
    for part in why {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    // The refused app says so before its task has ended and let go of the data
    // directory's lock: wait for that, or the next start finds the directory in use.
    app.stop()
        .await
        .expect_err("a refused app ends with its error");
}

/// After a graceful stop and a start with no write, the WAL holds one segment with no
/// record: its name is all that says where the log had got to. A store that is behind it
/// (restored from a backup taken before the last writes, or a new store where the old one
/// was) must be refused, naming the records it lacks, not served without them: that
/// segment was taken for a torn tail and cut.
#[tokio::test]
async fn a_store_behind_a_wal_with_no_record_refuses_to_start() {
    for replace_with_new in [false, true] {
        let app = common::spawn_app_with(&["--flush-interval", "1h"]).await;
        assert_eq!(app.create("early", &["P"]).await.status(), 201);
        let dir = app.stop().await;
        let backup = tempfile::TempDir::new().unwrap();
        copy_tree(&dir.path().join("store"), &backup.path().join("store"));

        let app = common::spawn_app_in(dir, &["--flush-interval", "1h"], Arc::new(RealFs)).await;
        assert_eq!(app.create("late", &["P"]).await.status(), 201);
        let dir = app.stop().await;
        // A start and stop with no write: the store and the WAL end at the same LSN.
        let idle = common::spawn_app_in(dir, &[], Arc::new(RealFs)).await;
        assert!(idle.widget("late").await.is_some());
        let dir = idle.stop().await;

        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        if !replace_with_new {
            copy_tree(&backup.path().join("store"), &dir.path().join("store"));
        }
        refused(&dir, &[], &["are in neither", "--wal-recovery truncate"]).await;
        // Refused again, and left as it was: the WAL still says where it had got to.
        refused(&dir, &[], &["are in neither"]).await;
    }
}

/// A copy of the WAL taken after a start with no write (one segment, no record) put
/// back beside a store that has moved on since is older than the store: refused, as a
/// WAL whose last record is below the store's checkpoint is.
#[tokio::test]
async fn an_old_wal_with_no_record_beside_a_newer_store_refuses_to_start() {
    let app = common::spawn_app_with(&["--flush-interval", "1h"]).await;
    assert_eq!(app.create("early", &["P"]).await.status(), 201);
    let dir = app.stop().await;
    let idle = common::spawn_app_in(dir, &[], Arc::new(RealFs)).await;
    let dir = idle.stop().await;
    let old_wal = tempfile::TempDir::new().unwrap();
    copy_tree(&dir.path().join("wal"), &old_wal.path().join("wal"));

    let app = common::spawn_app_in(dir, &["--flush-interval", "1h"], Arc::new(RealFs)).await;
    assert_eq!(app.create("late", &["P"]).await.status(), 201);
    let dir = app.stop().await;

    put_wal(dir.path(), &old_wal.path().join("wal"));
    // Refused again at the next start: the first refusal left the log as it found it.
    refused(&dir, &[], &["below the store's checkpoint"]).await;
    let accepted = refused_unless_accepted(dir, &["below the store's checkpoint"]).await;
    assert!(accepted.widget("late").await.is_some());
    accepted.stop().await;
}
