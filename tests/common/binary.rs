//! The real `widgets` binary as a child process, for restart and crash tests: the shared
//! [`Server`] (widgets-testkit), started the tests' way.

use std::path::Path;
use std::time::Duration;
pub use widgets_testkit::server::Server;
use widgets_testkit::server::ServerCommand;

/// How long a started server may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary serving on a free port in `data_dir`, flushing every 200 ms, with extra
/// `args` (on the embedded store unless they name a `--database-url`), and ready.
/// `TEST_LOG=1` echoes its log.
pub async fn start(data_dir: &Path, args: &[&str]) -> Server {
    start_with_env(data_dir, args, &[]).await
}

/// [`start`], with more environment variables for the binary.
pub async fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = ServerCommand::new(env!("CARGO_BIN_EXE_widgets"));
    command.data_dir = Some(data_dir.to_owned());
    command.args = ["--flush-interval", "200ms"]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect();
    command.echo_log = std::env::var_os("TEST_LOG").is_some();
    command.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let server = Server::start(&command)
        .await
        .unwrap_or_else(|e| panic!("starting the widgets binary: {e}"));
    server
        .wait_ready(READY_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the server did not become ready: {e}"));
    server
}

/// `GET /metrics` of `server`: the counters of its process alone.
pub async fn metrics(server: &Server) -> String {
    reqwest::get(format!("{}/metrics", server.base))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics' text")
}

/// Creates widget `serial` (port P) on `server`; the answer's status.
pub async fn create(server: &Server, serial: &str) -> reqwest::StatusCode {
    let body = serde_json::json!({"name": "w", "serial_number": serial, "ports": ["P"]});
    reqwest::Client::new()
        .post(format!("{}/widgets", server.base))
        .json(&body)
        .send()
        .await
        .expect("POST /widgets")
        .status()
}

/// Stops `server` with SIGTERM, and checks that it exited 0 by itself within `bound`.
pub async fn stop_within(server: Server, bound: Duration) {
    let started = std::time::Instant::now();
    let status = server.stop().await.expect("stopping the service");
    let took = started.elapsed();
    assert!(
        status.success(),
        "the service did not stop by itself (killed after {took:?}): {status}"
    );
    assert!(took < bound, "the stop took {took:?}, more than {bound:?}");
}
