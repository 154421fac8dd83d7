//! `widgets-bench` through the real binaries: short runs, checked for the report's shape
//! and sense, never for speed.
//!
//! The bench starts the `widgets` binary beside its own, as it does for users: `cargo test`
//! at the workspace root builds both (the server's own tests need it). Testing this crate
//! alone (`cargo test -p widgets-bench`) runs whatever `widgets` binary was built last.

use serde_json::Value;
use std::process::{Command, Stdio};
use widgets_testkit::pg::{admin_url, TestDb};

/// Runs `widgets-bench <args> --json` (without REDIS_URL, and without DATABASE_URL unless
/// `args` give one) and returns its report; fails the test if it exits non-zero.
fn bench_report(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_widgets-bench"))
        .args(args)
        .arg("--json")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running widgets-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "widgets-bench failed:\n{stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON report ({e}):\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn a_short_bench_reports_sane_numbers() {
    let report = bench_report(&[
        "--widgets",
        "200",
        "--duration",
        "1s",
        "--ceiling-secs",
        "1",
        "--concurrency",
        "4",
        // The embedded store, whatever a .env says.
        "--database-url=",
    ]);
    let num = |path: &str| -> f64 {
        report
            .pointer(path)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{path} is not a number in {report:#}"))
    };

    assert_eq!(report["store"], "embedded", "{report:#}");
    assert_eq!(num("/widgets"), 200.0);
    assert_eq!(num("/create/ok"), 200.0, "{report:#}");
    assert!(num("/ceiling/requests") > 0.0, "{report:#}");

    let load = &report["load"];
    assert!(num("/load/requests") > 0.0, "{report:#}");
    let errors = load["errors"].as_object().expect("load.errors is a map");
    assert!(
        errors.keys().all(|status| !status.starts_with('5')),
        "server errors: {errors:?}"
    );
    let percentiles =
        ["p50", "p90", "p99", "p999", "max"].map(|p| num(&format!("/load/latency_us/{p}")));
    assert!(percentiles[0] > 0.0, "{percentiles:?}");
    assert!(
        percentiles.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {percentiles:?}"
    );

    assert!(num("/server/fsyncs") > 0.0, "{report:#}");
    assert!(num("/server/requests_per_fsync") > 0.0, "{report:#}");
    assert!(num("/server/rss_bytes") > 0.0, "{report:#}");
    assert!(report["baseline"].is_null(), "no database, no baseline");
}

/// With a token the started service protects every request class, and the bench sends it
/// on every request: nothing is refused.
#[test]
fn a_bench_with_a_token_is_never_refused() {
    let report = bench_report(&[
        "--widgets",
        "100",
        "--duration",
        "500ms",
        "--ceiling-secs",
        "0",
        "--concurrency",
        "2",
        "--database-url=",
        "--auth-token",
        "bench-token",
    ]);
    assert_eq!(report["create"]["ok"].as_f64(), Some(100.0), "{report:#}");
    assert!(report["load"]["ok"].as_f64().unwrap() > 0.0, "{report:#}");
    let errors = report["load"]["errors"].as_object().expect("load.errors");
    assert!(errors.is_empty(), "refused: {errors:?}");
    // /metrics (protected) was scraped with it.
    assert!(
        report["server"]["fsyncs"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
}

/// A baseline the PostgreSQL server has no room for fails at once with what to do, and the
/// run still reports everything else it measured.
#[tokio::test]
async fn a_baseline_without_enough_connections_is_reported_not_fatal() {
    let admin = admin_url();
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    drop(conn);
    db.drop_db().await;
    let too_many = (max.parse::<u64>().unwrap() + 1).to_string();

    let report = bench_report(&[
        "--widgets",
        "50",
        "--duration",
        "1s",
        "--ceiling-secs",
        "0",
        "--concurrency",
        &too_many,
        "--database-url",
        &admin,
    ]);
    assert!(report["baseline"].is_null(), "{report:#}");
    let why = report["baseline_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("max_connections") && why.contains(&too_many),
        "{report:#}"
    );
    assert!(report["load"]["ok"].as_f64().unwrap() > 0.0, "{report:#}");
}
