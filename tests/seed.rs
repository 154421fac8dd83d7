//! `widgets bench-seed` through the real binary: the service must load the seeded store as
//! if it had written it, and a seeded store is never seeded again.

mod common;

use common::binary;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn seed_command(data_dir: &Path, widgets: &str, batch: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_widgets"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--database-url=",
            "bench-seed",
            "--widgets",
            widgets,
            "--batch",
            batch,
        ])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null());
    command
}

fn seed(data_dir: &Path, widgets: &str) -> Output {
    seed_command(data_dir, widgets, "100")
        .output()
        .expect("running widgets bench-seed")
}

/// One store write of 100,000 widgets, the way a flush of a large backlog writes: sled
/// kept every leaf copy such a write replaced until it ended (a debug build peaked at
/// 578 MiB with the write as one `apply_batch`); in chunks it peaked at 109 MiB.
#[test]
fn one_large_store_write_keeps_its_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    #[allow(
        clippy::zombie_processes,
        reason = "wait4 below reaps it, and gives its peak RSS"
    )]
    let child = seed_command(dir.path(), "100000", "100000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running widgets bench-seed");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid, and wait4 reaps only this child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "{}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "bench-seed failed: {status}"
    );
    let peak_mib = usage.ru_maxrss / 1024; // KiB on Linux
    assert!(
        peak_mib < 256,
        "bench-seed's peak RSS was {peak_mib} MiB for one 100,000-widget write"
    );
}

/// A server whose WAL is elsewhere leaves the seed no WAL to refuse on: the data
/// directory's lock refuses it, before it touches the store.
#[tokio::test]
async fn no_seed_runs_under_a_server_on_its_data_directory() {
    let (dir, wal) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let wal_dir = wal.path().to_str().unwrap();
    let server = binary::start(dir.path(), &["--wal-dir", wal_dir]).await;
    let refused = seed(dir.path(), "10");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "seeded under a running server");
    assert!(
        stderr.contains("in use by another widgets process"),
        "{stderr}"
    );
    assert!(server.stop().await.expect("stopping the server").success());
}

#[tokio::test]
async fn a_seeded_store_serves_its_pairs_and_takes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = seed(dir.path(), "1000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-seed failed:\n{stderr}");

    let server = binary::start(dir.path(), &[]).await;
    let client = reqwest::Client::new();
    let get = |base: &str, serial: &str| {
        let url = format!("{base}/widgets/{serial}");
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        get(&server.base, "seed-0000000999").await["associations"],
        json!({"P": "seed-0000000998", "R": "seed-0000000998", "Q": null})
    );
    // The seed's last LSN is behind the service's first: a write over it lands and stays.
    let put = client
        .put(format!("{}/widgets/associations", server.base))
        .body(r#"{"port_type":"P","widget_serial_num":"seed-0000000000","peer_widget_serial_num":"seed-0000000002"}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    assert_eq!(
        get(&server.base, "seed-0000000001").await["associations"],
        json!({"P": null, "R": "seed-0000000000", "Q": null}),
        "re-plugging freed the old peer"
    );
    assert!(server.stop().await.expect("stopping the server").success());

    let server = binary::start(dir.path(), &[]).await;
    assert_eq!(
        get(&server.base, "seed-0000000000").await["associations"],
        json!({"P": "seed-0000000002", "R": "seed-0000000001", "Q": null})
    );
    assert!(server.stop().await.expect("stopping the server").success());

    let again = seed(dir.path(), "10");
    assert!(
        !again.status.success(),
        "seeding a store that holds widgets must fail"
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("only into"), "{stderr}");
}

/// `widgets bench-seed` of `widgets` into the PostgreSQL at `url`, from a new data
/// directory.
fn seed_postgres(url: &str, widgets: &str) -> Output {
    let dir = tempfile::TempDir::new().unwrap();
    Command::new(env!("CARGO_BIN_EXE_widgets"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--database-url", url, "bench-seed", "--widgets", widgets])
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running widgets bench-seed")
}

/// A seed into PostgreSQL leaves the planner statistics of every table it filled: without
/// the association tables', the first start's load joined them 1.6x slower (3 M widgets,
/// BENCHMARKS.md, "Targets 1 and 2 on the eleventh session's machine").
#[tokio::test]
async fn a_seed_into_postgres_analyzes_every_table_it_filled() {
    let db = common::pg::TestDb::create().await;
    let out = seed_postgres(&db.url, "1000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-seed failed:\n{stderr}");
    // The statistics views may show a backend's ANALYZE a moment after it exits.
    let mut conn = db.connect().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let unanalyzed: Vec<String> = sqlx::query_scalar(
            "SELECT relname::text FROM pg_stat_user_tables \
             WHERE relname IN ('widgets', 'associations_p', 'associations_r', 'associations_q') \
             AND last_analyze IS NULL AND last_autoanalyze IS NULL ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        if unanalyzed.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tables the seed filled and did not analyze: {unanalyzed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(conn);
    db.drop_db().await;
}

/// A database a single node has started on, before its first flush, holds no widget: the
/// seed took it for empty, wrote over it, and the node's restart loaded the seed's
/// checkpoint and replayed none of its own acknowledged writes.
#[tokio::test]
async fn no_seed_goes_into_a_database_a_service_has_started_on() {
    let db = common::pg::TestDb::create().await;
    let served = tempfile::TempDir::new().unwrap();
    let server = binary::start(
        served.path(),
        &["--database-url", &db.url, "--flush-interval", "1h"],
    )
    .await;
    assert_eq!(
        binary::create(&server, "acked-1").await,
        reqwest::StatusCode::CREATED
    );
    let out = seed_postgres(&db.url, "100");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "seeded a database in use:\n{stderr}");
    assert!(stderr.contains("belongs to history"), "{stderr}");
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the refused seed wrote widgets");
    drop(conn);
    binary::stop_within(server, std::time::Duration::from_secs(30)).await;
    db.drop_db().await;
}
