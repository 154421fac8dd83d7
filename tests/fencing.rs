//! One writer per data directory: a second instance on the same directory refuses to start
//! at once, naming the lock and the holder's PID, in-process and as a real process.

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
