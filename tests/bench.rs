//! `widgets bench` through the real binary: a short run on the embedded store, checked for
//! the report's shape and sense, never for speed.

use serde_json::Value;
use std::process::{Command, Stdio};

#[test]
fn a_short_bench_reports_sane_numbers() {
    let output = Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args([
            "bench",
            "--widgets",
            "200",
            "--duration",
            "1s",
            "--ceiling-secs",
            "1",
            "--concurrency",
            "4",
            "--json",
            // The embedded store, whatever DATABASE_URL or a .env says.
            "--database-url=",
        ])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running widgets bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "widgets bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON report ({e}):\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
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
