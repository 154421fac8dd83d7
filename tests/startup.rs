//! What the binary refuses before it serves, and what it shows from its first scrape: a
//! malformed `.env` or a store URL that cannot be read stops the start with a message
//! naming it (an unreachable store is waited for instead), and event counters start at 0.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use widgets_testkit::server::{log_on_a_pipe, output_within};

/// `widgets` on the embedded store in `dir`/data, run from `dir` with extra `args`, if it
/// exits within 20 s.
fn run_in(dir: &Path, args: &[&str]) -> Option<Output> {
    let child = log_on_a_pipe(&mut Command::new(env!("CARGO_BIN_EXE_widgets")))
        .current_dir(dir)
        .args(["--listen", "127.0.0.1:0", "--database-url="])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .spawn()
        .expect("running widgets");
    output_within(child, Duration::from_secs(20))
}

#[test]
fn a_malformed_env_file_refuses_the_start_and_applies_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    // Before, the line after the bad one was applied and the one before it was not, and
    // the service started either way: here, without the auth token it was given.
    std::fs::write(
        dir.path().join(".env"),
        "broken line here\nWIDGETS_AUTH_TOKEN=secret1\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &[]).expect("widgets served, with a malformed .env");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(".env") && stderr.contains("broken line here"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "it went on to open its data directory"
    );
}

/// The README reads `.env` from the working directory; the service also took the nearest
/// parent's, so a file two directories up chose its settings (here it would refuse the
/// start, as it is malformed).
#[test]
fn a_env_file_in_a_parent_directory_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "broken line here
",
    )
    .unwrap();
    let below = dir.path().join("a").join("b");
    std::fs::create_dir_all(&below).unwrap();
    let started = log_on_a_pipe(&mut Command::new(env!("CARGO_BIN_EXE_widgets")))
        .current_dir(&below)
        .args(["--listen", "127.0.0.1:0", "--database-url=", "--data-dir"])
        .arg(below.join("data"))
        .spawn()
        .expect("running widgets");
    let pid = started.id();
    // Still serving after a moment: the parent's file was not read (it refused at once).
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: a signal to the child this test started, which is not yet reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let out = output_within(started, Duration::from_secs(20)).expect("widgets did not stop");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("broken line here"), "{stderr}");
}

/// A port in use refused the start only after the data directory and its WAL directory
/// were made and locked, and left them behind.
#[test]
fn a_port_in_use_refuses_the_start_with_nothing_made() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_in(dir.path(), &["--listen", &addr]).expect("widgets served on a port in use");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(!dir.path().join("data").exists(), "{stderr}");
}

/// Settings a start cannot go on with are refused before anything in the data directory
/// is made, locked or recovered: a `--wal-dir` that is a file left `<data dir>/lock`
/// behind, and `--sequencer-priority realtime` without the right to it was refused only
/// once recovery had run (on a new directory: the store made, the identity written, a
/// segment preallocated).
#[test]
fn a_start_refused_by_its_settings_leaves_the_data_directory_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let refused_saying = |out: Output, says: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "the data directory was made"
        );
    };
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let out = run_in(dir.path(), &["--wal-dir", file.to_str().unwrap()])
        .expect("widgets served on a --wal-dir that is a file");
    refused_saying(out, "not a directory");

    // Without CAP_SYS_NICE (as root, its bounding set less it; RLIMIT_RTPRIO is 0 here).
    let child = log_on_a_pipe(
        Command::new("setpriv")
            .args(["--bounding-set", "-sys_nice", "--"])
            .arg(env!("CARGO_BIN_EXE_widgets")),
    )
    .args(["--listen", "127.0.0.1:0", "--database-url="])
    .args(["--sequencer-priority", "realtime", "--data-dir"])
    .arg(dir.path().join("data"))
    .spawn()
    .expect("running widgets under setpriv (util-linux), as root");
    let out = output_within(child, Duration::from_secs(20))
        .expect("widgets served at realtime priority without CAP_SYS_NICE");
    refused_saying(out, "CAP_SYS_NICE");
}

#[test]
fn a_store_url_that_cannot_be_read_refuses_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["notaurl", "postgres://u:secret@127.0.0.1:notaport/db"] {
        let out = run_in(dir.path(), &["--database-url", url])
            .unwrap_or_else(|| panic!("widgets still waited for {url} after 20 s"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: {stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{url}: {stderr}");
        assert!(
            !stderr.contains("secret"),
            "{url}: the password in the log: {stderr}"
        );
    }
}

#[tokio::test]
async fn event_counters_are_at_0_from_the_first_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::binary::start(dir.path(), &[]).await;
    let text = common::binary::metrics(&server).await;
    for name in [
        "widgets_flush_failures_total",
        "widgets_flush_rejected_total",
        "widgets_store_reopens_total",
        "http_connections_evicted_total",
        "http_connections_write_timeouts_total",
        "http_accept_errors_total",
    ] {
        assert_eq!(common::metric(&text, name), Some(0.0), "{name} in:\n{text}");
    }
    // The embedded store's file, before any flush has written it: the alerts tell that
    // store's longer flush interval by it, also where every flush fails.
    assert!(
        common::metric(&text, "widgets_store_file_bytes").is_some(),
        "widgets_store_file_bytes in:\n{text}"
    );
    server.stop().await.unwrap();
}
