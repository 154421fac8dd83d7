//! `widgets-bench` through the real binaries: short runs, checked for the report's shape
//! and sense, never for speed.
//!
//! The bench starts the `widgets` binary beside its own, as it does for users: `cargo test`
//! at the workspace root builds both (the server's own tests need it). Testing this crate
//! alone (`cargo test -p widgets-bench`) runs whatever `widgets` binary was built last.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use widgets::wal::FsyncMode;
use widgets_bench::echo::EchoServer;
use widgets_bench::server::ServerOptions;
use widgets_testkit::pg::{admin_url, TestDb};
use widgets_testkit::server::{Server, ServerCommand};

const BENCH: &str = env!("CARGO_BIN_EXE_widgets-bench");

/// The `widgets` binary beside `widgets-bench`, as the bench finds it.
fn service_bin() -> PathBuf {
    Path::new(BENCH).with_file_name(format!("widgets{}", std::env::consts::EXE_SUFFIX))
}

/// Runs `widgets-bench <args> --json` (without REDIS_URL, and without DATABASE_URL unless
/// `args` give one) and returns its report; fails the test if it exits non-zero.
fn bench_report(args: &[&str]) -> Value {
    let output = Command::new(BENCH)
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
        "--echo-secs",
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

    // The echo reference answered every PUT.
    assert!(num("/echo/requests") > 0.0, "{report:#}");
    assert_eq!(num("/echo/ok"), num("/echo/requests"), "{report:#}");
    // CPU per request on both sides of every timed phase (a second of load is many clock
    // ticks on each side), and the load against the echo. Creating 200 widgets can take
    // less than a tick of the client's CPU, so that phase's figures need only be there.
    for field in ["server_secs", "client_secs"] {
        assert!(num(&format!("/create/cpu/{field}")) >= 0.0, "{report:#}");
    }
    for phase in ["ceiling", "echo", "load"] {
        for field in ["server_secs", "client_secs"] {
            assert!(num(&format!("/{phase}/cpu/{field}")) > 0.0, "{report:#}");
        }
        let server = num(&format!("/{phase}/cpu/server_us_per_request"));
        let secs = num(&format!("/{phase}/cpu/server_secs"));
        let requests = num(&format!("/{phase}/requests"));
        assert!(
            (server - secs * 1e6 / requests).abs() < 1e-6 * server,
            "{phase}: {server} µs/request is not {secs} s over {requests}"
        );
        assert!(num(&format!("/{phase}/cpu/client_us_per_request")) > 0.0);
    }
    let ratio = num("/server_cpu_vs_echo");
    let expected = num("/load/cpu/server_us_per_request") / num("/echo/cpu/server_us_per_request");
    assert!((ratio - expected).abs() < 1e-9 * expected, "{report:#}");
    // A closed-loop load, so a closed-loop echo.
    assert!(report["echo"]["open_loop"].is_null(), "{report:#}");
}

/// With `--rate`, the echo is offered the load's rate too: its CPU per request is read at
/// the same pace as the load's, not at full speed.
#[test]
fn the_echo_runs_at_the_loads_offered_rate() {
    let report = bench_report(&[
        "--widgets",
        "200",
        "--duration",
        "1s",
        "--rate",
        "300",
        "--ceiling-secs",
        "0",
        "--echo-secs",
        "2",
        "--concurrency",
        "4",
        "--database-url=",
    ]);
    for phase in ["load", "echo"] {
        let open_loop = &report[phase]["open_loop"];
        assert_eq!(open_loop["rate"], 300.0, "{phase}: {report:#}");
    }
    // Two seconds at 300/s: the schedule, and about that many sent, where full speed
    // would send thousands.
    assert_eq!(report["echo"]["open_loop"]["scheduled"], 600, "{report:#}");
    let sent = report["echo"]["requests"].as_f64().expect("echo.requests");
    assert!((500.0..=700.0).contains(&sent), "{report:#}");
}

/// The echo reference, as the bench starts it, answers the load's PUT with what the
/// service answers for two fresh widgets, and is gone when dropped.
#[tokio::test]
async fn the_echo_answers_the_put_as_the_service_does() {
    let echo = EchoServer::start(Path::new(BENCH)).await.unwrap();
    let options = ServerOptions {
        fsync: FsyncMode::Never,
        database_url: None,
        extra_args: vec![],
        auth_token: None,
    };
    let mut command = ServerCommand::new(service_bin());
    command.args = options.args();
    let service = Server::start(&command).await.unwrap();
    service.wait_ready(Duration::from_secs(30)).await.unwrap();

    let client = reqwest::Client::new();
    for serial in ["e-1", "e-2"] {
        let body =
            format!(r#"{{"name":"bench","serial_number":"{serial}","ports":["P","R","Q"]}}"#);
        let r = client
            .post(format!("{}/widgets", service.base))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // The body the load sends, as it sends it (no content type).
    let put = r#"{"port_type":"Q","widget_serial_num":"e-1","peer_widget_serial_num":"e-2"}"#;
    let mut answers = Vec::new();
    for base in [&service.base, &echo.base] {
        let r = client
            .put(format!("{base}/widgets/associations"))
            .body(put)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{base}");
        assert_eq!(r.headers()["content-type"], "application/json", "{base}");
        let body = r.bytes().await.unwrap();
        answers.push(serde_json::from_slice::<Value>(&body).unwrap());
    }
    assert_eq!(
        answers[0], answers[1],
        "the service's answer, then the echo's"
    );
    assert_eq!(answers[1]["peer"]["associations"]["Q"], "e-1");

    let pid = echo.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(echo);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "still running"
    );
    service.stop().await.unwrap();
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
