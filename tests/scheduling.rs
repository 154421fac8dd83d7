//! `--sequencer-priority`: the sequencer thread runs where it was asked to, and a priority
//! the process may not take refuses the start with what is missing. Setting a real-time
//! policy needs CAP_SYS_NICE, which CI has (it runs as root); these tests say so when they
//! fail for the want of it. One binary of its own, so no other test's sequencer runs
//! beside the one a test looks at.

#[macro_use]
mod common;

use reqwest::StatusCode;
use std::time::Duration;
use widgets_testkit::server::{log_on_a_pipe, output_within};

/// `SCHED_OTHER` and `SCHED_FIFO`, as /proc reports a thread's policy.
const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// The policy and real-time priority of every thread of this process named `name` (as
/// /proc shortens it, to 15 bytes).
fn threads_named(name: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("reading /proc/self/task") {
        let task = task.expect("a task entry").path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue; // the thread has ended since
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis come fields 3 onwards: rt_priority and
        // policy are fields 40 and 41.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
            .split(' ')
            .collect();
        let field = |n: usize| fields[n - 3].parse::<u32>().expect("a number");
        found.push((field(41), field(40)));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencer_runs_at_the_priority_asked_for() {
    let app = common::spawn_app_with(&[]).await;
    assert_eq!(
        threads_named("widgets-sequenc"),
        [(SCHED_OTHER, 0)],
        "by default the sequencer is scheduled as every other thread"
    );
    app.stop().await;
    assert_eq!(threads_named("widgets-sequenc"), [], "stopped");

    let app = common::spawn_app_with(&["--sequencer-priority", "realtime"]).await;
    assert_eq!(
        threads_named("widgets-sequenc"),
        [(SCHED_FIFO, 1)],
        "realtime: SCHED_FIFO at priority 1 (setting it needs CAP_SYS_NICE: run the tests \
         as root, as CI does)"
    );
    // And it does its work there.
    assert_eq!(app.create("rt", &["P"]).await.status(), StatusCode::CREATED);
    assert!(app.widget("rt").await.is_some());
    app.stop().await;
}

/// `widgets --sequencer-priority realtime` on a new data directory, without CAP_SYS_NICE
/// (dropped from the bounding set, so even root loses it at exec) and with no real-time
/// priority allowed by RLIMIT_RTPRIO, its log on a pipe.
fn realtime_without_cap_sys_nice(data: &std::path::Path) -> std::process::Child {
    log_on_a_pipe(&mut std::process::Command::new("prlimit"))
        .arg("--rtprio=0:0")
        .args([
            "--",
            "setpriv",
            "--bounding-set=-sys_nice",
            "--inh-caps=-sys_nice",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_widgets"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--sequencer-priority",
            "realtime",
        ])
        .arg("--data-dir")
        .arg(data)
        .spawn()
        .expect("running widgets under prlimit and setpriv (util-linux)")
}

#[test]
fn realtime_without_the_right_to_it_refuses_to_start_and_says_what_is_missing() {
    let data = tempfile::tempdir().unwrap();
    let child = realtime_without_cap_sys_nice(data.path());
    let out = output_within(child, Duration::from_secs(20))
        .expect("widgets still ran 20 s after it was asked for a priority it may not take");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("setpriv:") && !stderr.contains("prlimit:"),
        "dropping CAP_SYS_NICE needs root (CI runs as root):\n{stderr}"
    );
    assert!(!out.status.success(), "it started:\n{stderr}");
    assert!(
        stderr.contains("CAP_SYS_NICE") && stderr.contains("sequencer"),
        "the refusal names what is missing:\n{stderr}"
    );
}
