//! Restart tests with the real binary: `kill -9` in the middle of a write load loses no
//! acknowledged write, and a graceful stop (SIGTERM) exits 0 with everything kept.

mod common;

use common::binary;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use widgets::domain::{self, PortType, Rule, Serial, StateView, Tx, Widget};
use widgets_testkit::server::{log_on_a_pipe, output_within};

/// The client's model of its own widgets: the association rules applied to what it sent.
#[derive(Clone, Default)]
struct Model(HashMap<Serial, Widget>);

impl StateView for Model {
    fn get(&self, serial: &Serial) -> Option<Widget> {
        self.0.get(serial).cloned()
    }
}

impl Model {
    fn apply<R: Rule>(&mut self, write: &R) {
        let mut tx = Tx::new(&*self);
        write
            .run(&mut tx)
            .expect("the model accepts what the server accepted");
        for change in tx.into_changes() {
            match change {
                domain::Change::Put { serial, widget } => self.0.insert(serial, widget),
                domain::Change::Delete { serial } => self.0.remove(&serial),
            };
        }
    }

    /// Port -> peer for every widget, as the API shows it.
    fn peers(&self) -> HashMap<String, [Option<String>; 3]> {
        self.0
            .iter()
            .map(|(s, w)| {
                (
                    s.to_string(),
                    w.peers.clone().map(|p| p.map(|p| p.to_string())),
                )
            })
            .collect()
    }
}

fn s(x: &str) -> Serial {
    Serial::parse("s", x).unwrap()
}

async fn server_peers(
    client: &Client,
    base: &str,
    serials: &[String],
) -> HashMap<String, [Option<String>; 3]> {
    let mut out = HashMap::new();
    for serial in serials {
        let w: Value = client
            .get(format!("{base}/widgets/{serial}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let peer = |p: &str| w["associations"][p].as_str().map(str::to_owned);
        out.insert(serial.clone(), [peer("P"), peer("R"), peer("Q")]);
    }
    out
}

const WIDGETS_PER_WRITER: usize = 4;

/// Writes the server acknowledged, across all writers and cycles.
static ACKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One writer: creates its own widgets, then re-plugs and frees ports among them as fast
/// as it can. `acked` is its model after the last acknowledged write; `maybe` is the model
/// after the write in flight (which a crash may or may not keep).
async fn writer(client: Client, base: String, id: usize, ledger: Arc<Mutex<(Model, Model)>>) {
    let serials: Vec<String> = (0..WIDGETS_PER_WRITER)
        .map(|i| format!("t{id}-w{i}"))
        .collect();
    let mut rng = fastrand::Rng::with_seed(id as u64);
    for serial in &serials {
        let body = json!({"name": "crash", "serial_number": serial, "ports": ["P", "R", "Q"]});
        let command = domain::Create {
            serial: s(serial),
            name: domain::Name::parse("n", "crash").unwrap(),
            ports: domain::Ports::from_list("p", &PortType::ALL).unwrap(),
        };
        if !send(
            &client,
            &base,
            &ledger,
            reqwest::Method::POST,
            "/widgets".into(),
            Some(body),
            command,
        )
        .await
        {
            return;
        }
    }
    loop {
        let port = PortType::ALL[rng.usize(..3)];
        let a = &serials[rng.usize(..WIDGETS_PER_WRITER)];
        let b = &serials[rng.usize(..WIDGETS_PER_WRITER)];
        let sent = if rng.u8(..4) == 0 || a == b {
            let command = domain::Free { serial: s(a), port };
            let path = format!("/widgets/{a}/associations/{}", port.as_str());
            send(
                &client,
                &base,
                &ledger,
                reqwest::Method::DELETE,
                path,
                None,
                command,
            )
            .await
        } else {
            let body = json!({"port_type": port.as_str(), "widget_serial_num": a, "peer_widget_serial_num": b});
            let command = domain::Associate {
                port,
                serial: s(a),
                peer: s(b),
            };
            let path = "/widgets/associations".to_owned();
            send(
                &client,
                &base,
                &ledger,
                reqwest::Method::PUT,
                path,
                Some(body),
                command,
            )
            .await
        };
        if !sent {
            return;
        }
    }
}

/// Sends one write; on success moves the ledger forward. Returns false once the server is gone.
async fn send<R: Rule>(
    client: &Client,
    base: &str,
    ledger: &Mutex<(Model, Model)>,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
    command: R,
) -> bool {
    {
        let mut l = ledger.lock().unwrap();
        let mut maybe = l.0.clone();
        maybe.apply(&command);
        l.1 = maybe;
    }
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => {
            let mut l = ledger.lock().unwrap();
            l.0 = l.1.clone();
            ACKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
        Ok(r) => panic!("{path} answered {}", r.status()),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::TempDir::new().unwrap();
    let client = Client::new();
    // CRASH_CYCLES=200 cargo test --test restart for a longer run; CI runs the default.
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let seed = fastrand::u64(..);
    eprintln!("crash loop: {cycles} cycles, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    for cycle in 0..cycles {
        let server = binary::start(dir.path(), &[]).await;
        let acked_before = ACKED.load(std::sync::atomic::Ordering::Relaxed);
        let writers = 16;
        let ledgers: Vec<_> = (0..writers)
            .map(|_| Arc::new(Mutex::new((Model::default(), Model::default()))))
            .collect();
        let tasks: Vec<_> = ledgers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                tokio::spawn(writer(
                    client.clone(),
                    server.base.clone(),
                    cycle * 100 + i,
                    l.clone(),
                ))
            })
            .collect();
        // A random moment under load: once the load has had 100 writes acknowledged (on
        // two busy cores a fixed delay sometimes saw fewer), up to a second later.
        let loaded_by = std::time::Instant::now() + Duration::from_secs(30);
        while ACKED.load(std::sync::atomic::Ordering::Relaxed) - acked_before < 100 {
            assert!(
                std::time::Instant::now() < loaded_by,
                "the load had fewer than 100 writes acknowledged after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
        server.kill9().expect("SIGKILL");
        for t in tasks {
            t.await.unwrap();
        }

        let server = binary::start(dir.path(), &[]).await;
        for ledger in &ledgers {
            let (acked, maybe) = ledger.lock().unwrap().clone();
            let serials: Vec<String> = maybe.0.keys().map(|k| k.to_string()).collect();
            // Widgets whose create was in flight may be missing; all others must be there.
            let mut present = Vec::new();
            for serial in &serials {
                let r = client
                    .get(format!("{}/widgets/{serial}", server.base))
                    .send()
                    .await
                    .unwrap();
                if r.status() == StatusCode::OK {
                    present.push(serial.clone());
                } else {
                    assert!(
                        !acked.0.contains_key(&s(serial)),
                        "acknowledged create of {serial} lost"
                    );
                }
            }
            let got = server_peers(&client, &server.base, &present).await;
            let want_acked: HashMap<_, _> = acked
                .peers()
                .into_iter()
                .filter(|(k, _)| present.contains(k))
                .collect();
            let want_maybe: HashMap<_, _> = maybe
                .peers()
                .into_iter()
                .filter(|(k, _)| present.contains(k))
                .collect();
            assert!(
                got == want_acked || got == want_maybe,
                "cycle {cycle}: state after restart is neither the acknowledged state nor that plus the write in flight\n got: {got:?}\nwant: {want_acked:?}"
            );
        }
        let acked = ACKED.load(std::sync::atomic::Ordering::Relaxed) - acked_before;
        eprintln!(
            "cycle {cycle}: {acked} writes acknowledged before kill -9, all present after restart"
        );
        assert!(
            acked >= 100,
            "the load acknowledged only {acked} writes before the kill"
        );
        server.kill9().expect("SIGKILL");
    }
}

/// Creates `serials` with `ports`, then plugs `port` of `a` into `b`; every answer is a yes.
async fn create_and_plug(
    client: &Client,
    base: &str,
    serials: &[&str],
    ports: &[&str],
    (port, a, b): (&str, &str, &str),
) {
    for serial in serials {
        let r = client
            .post(format!("{base}/widgets"))
            .body(json!({"name": "w", "serial_number": serial, "ports": ports}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = client
        .put(format!("{base}/widgets/associations"))
        .body(
            json!({"port_type": port, "widget_serial_num": a, "peer_widget_serial_num": b})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_exits_zero_and_keeps_everything() {
    let dir = tempfile::TempDir::new().unwrap();
    let client = Client::new();
    let server = binary::start(dir.path(), &[]).await;
    create_and_plug(
        &client,
        &server.base,
        &["g1", "g2", "g3"],
        &["P", "Q"],
        ("Q", "g1", "g3"),
    )
    .await;
    let status = server.stop().await.expect("stopping the server");
    assert!(status.success(), "SIGTERM should exit 0, got {status}");

    let server = binary::start(dir.path(), &[]).await;
    let got = server_peers(
        &client,
        &server.base,
        &["g1".into(), "g2".into(), "g3".into()],
    )
    .await;
    assert_eq!(got["g1"], [None, None, Some("g3".into())]);
    assert_eq!(got["g3"], [None, None, Some("g1".into())]);
    assert_eq!(got["g2"], [None, None, None]);
    // The final flush reached the store, so only the new active segment is left in the WAL.
    let status = server.stop().await.expect("stopping the server");
    assert!(status.success());
    let segments = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("wal".as_ref()))
        .count();
    assert_eq!(segments, 1, "the WAL kept segments the store already holds");
}

/// `--wal-dir`: the log goes where it says, not into the data directory; a `kill -9`
/// loses nothing acknowledged (the store never got it: the WAL there is all there is);
/// and a second instance on another data directory but the same WAL directory is
/// refused, naming that directory's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_dir_of_its_own_holds_the_log_through_kill_9_and_is_locked() {
    let data = tempfile::TempDir::new().unwrap();
    let wal = tempfile::TempDir::new().unwrap();
    let wal_dir = wal.path().join("log");
    let wal_arg = wal_dir.to_str().unwrap();
    // No flush: every write is only in the WAL.
    let args = ["--wal-dir", wal_arg, "--flush-interval", "1h"];
    let client = Client::new();
    let server = binary::start(data.path(), &args).await;
    create_and_plug(
        &client,
        &server.base,
        &["d1", "d2"],
        &["P"],
        ("P", "d1", "d2"),
    )
    .await;
    server.kill9().expect("killing the server");

    let segments: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("wal".as_ref()))
        .collect();
    assert!(!segments.is_empty(), "no WAL segment in --wal-dir");
    assert!(
        !data.path().join("wal").exists(),
        "a WAL directory was made in the data directory too"
    );

    let server = binary::start(data.path(), &args).await;
    let got = server_peers(&client, &server.base, &["d1".into(), "d2".into()]).await;
    assert_eq!(got["d1"], [Some("d2".into()), None, None]);
    assert_eq!(got["d2"], [Some("d1".into()), None, None]);

    second_refused_on_wal_dir(&wal_dir);
    assert!(server.stop().await.expect("stopping").success());
}

/// Runs a second instance, on a data directory of its own and `--wal-dir wal_dir`, and
/// checks that it exits within 10 s without serving, naming `wal_dir`'s lock.
fn second_refused_on_wal_dir(wal_dir: &std::path::Path) {
    let other = tempfile::TempDir::new().unwrap();
    let second = log_on_a_pipe(&mut std::process::Command::new(env!(
        "CARGO_BIN_EXE_widgets"
    )))
    .args(["--listen", "127.0.0.1:0", "--wal-dir"])
    .arg(wal_dir)
    .arg("--data-dir")
    .arg(other.path().join("data"))
    .spawn()
    .expect("running the second widgets process");
    let second = output_within(second, Duration::from_secs(10))
        .expect("a second instance on the same WAL directory still ran after 10 s");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second process served:\n{stderr}"
    );
    assert!(
        stderr.contains(&wal_dir.join("lock").display().to_string()),
        "the refusal names the WAL directory's lock:\n{stderr}"
    );
    // Refused before its own data directory was made (and locked, and left).
    assert!(!other.path().join("data").exists(), "{stderr}");
}

/// A second instance whose `--wal-dir` is a running instance's default WAL directory
/// (`<data dir>/wal`) is refused as one on its `--wal-dir` is. Only a `--wal-dir` was
/// locked, so the second started, replayed the first one's records into its own store,
/// and its flushes trimmed the log the first was still appending to: every write the
/// first acknowledged was lost at its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_dir_that_is_another_instances_default_wal_is_refused() {
    let first_data = tempfile::TempDir::new().unwrap();
    let server = binary::start(first_data.path(), &["--flush-interval", "1h"]).await;
    second_refused_on_wal_dir(&first_data.path().join("wal"));
    assert!(server.stop().await.expect("stopping").success());
}

/// The service turns transparent huge pages off for itself unless told otherwise
/// (`--transparent-huge-pages true`): the kernel's view of the process says so.
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_asked_for() {
    for (args, expected) in [
        (&[][..], "0"),
        (&["--transparent-huge-pages", "true"][..], "1"),
    ] {
        let dir = tempfile::TempDir::new().unwrap();
        let server = binary::start(dir.path(), args).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with("THP_enabled:"))
            .expect(
                "/proc/PID/status has no THP_enabled line: a kernel without transparent huge pages",
            );
        assert_eq!(line.split_whitespace().nth(1), Some(expected), "{args:?}");
        assert!(server.stop().await.unwrap().success());
    }
}

/// A stop during start-up's WAL replay: the process went on replaying, then opened the log
/// for appending, after it had let go of the data directory's lock, and a second instance
/// started beside it on the same log (a fault hunt saw it fail on a segment file the first
/// had just made). The lock is held until the process is done with the log.
#[tokio::test]
async fn a_stop_during_replay_keeps_the_data_directory_locked_until_the_log_is_done_with() {
    use widgets::domain::{Change, Name, Ports};
    use widgets::wal::{LogBatch, Record, WalWriter};
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    // A log long enough that a debug build replays it for a few seconds.
    let mut writer = WalWriter::open(
        Arc::new(widgets::wal::RealFs),
        &wal,
        vec![],
        1,
        64 << 20,
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    )
    .unwrap();
    let (name, ports) = (
        Name::parse("name", "w").unwrap(),
        Ports::from_list("ports", &[PortType::P]).unwrap(),
    );
    let mut lsn = 1;
    for _ in 0..600 {
        let mut batch = LogBatch::new(lsn);
        for _ in 0..1_000 {
            let mut widget = Widget::new(name.clone(), ports);
            widget.version = lsn;
            let serial = Serial::parse("serial", &format!("r{lsn}")).unwrap();
            batch.push(&Record {
                changes: vec![Change::Put { serial, widget }],
            });
            lsn += 1;
        }
        writer.append(&batch).unwrap();
    }
    writer.sync().unwrap();
    drop(writer);

    let mut command = widgets_testkit::server::ServerCommand::new(env!("CARGO_BIN_EXE_widgets"));
    command.data_dir = Some(dir.path().to_owned());
    let first = widgets_testkit::server::Server::start(&command)
        .await
        .unwrap();
    // Into the replay (the empty store loads in a tenth of that).
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&first, libc::SIGTERM);
    // While the first replays the log it was stopped in (its stop has had time to go as
    // far as it goes), a second on the same directory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_widgets"));
    second
        .args(widgets_testkit::server::command_line(dir.path(), &[]))
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL");
    let second = log_on_a_pipe(&mut second).spawn().unwrap();
    let out = output_within(second, Duration::from_secs(60))
        .expect("a second instance started on the log a stopped one was still replaying");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && log.contains("in use by another widgets process"),
        "{log}"
    );
    // The first ends by itself (a second signal would end it at once).
    assert!(
        ended_within(&first, Duration::from_secs(60)).await,
        "still running"
    );
    let status = first.stop().await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// Sends `signal` to `server`'s process.
fn signal(server: &binary::Server, signal: libc::c_int) {
    // SAFETY: a signal to a child this test started, which is not yet reaped.
    assert_eq!(
        unsafe { libc::kill(server.pid() as libc::pid_t, signal) },
        0
    );
}

/// Waits until `server`'s process has ended (not reaped: a zombie) or `within` is up;
/// whether it ended.
async fn ended_within(server: &binary::Server, within: Duration) -> bool {
    let stat = format!("/proc/{}/stat", server.pid());
    let deadline = std::time::Instant::now() + within;
    while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Starts the binary on `dir` again and checks that it serves widget `serial`.
async fn assert_kept_through_a_restart(dir: &std::path::Path, serial: &str) {
    let again = binary::start(dir, &[]).await;
    let got = reqwest::get(format!("{}/widgets/{serial}", again.base))
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK, "{serial} lost");
    binary::stop_within(again, Duration::from_secs(30)).await;
}

/// SIGHUP (a closed terminal) ended the process at once, the signal's default: no drain,
/// no last flush. It stops the service as SIGTERM does.
#[tokio::test]
async fn sighup_stops_the_service_as_sigterm_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = binary::start(dir.path(), &["--flush-interval", "1h"]).await;
    assert_eq!(binary::create(&server, "hup-1").await, StatusCode::CREATED);
    signal(&server, libc::SIGHUP);
    assert!(
        ended_within(&server, Duration::from_secs(30)).await,
        "still running"
    );
    let status = server.stop().await.unwrap();
    assert!(status.success(), "{status:?}");
    assert_kept_through_a_restart(dir.path(), "hup-1").await;
}

/// A second signal during a stop was ignored, and the stop went on for as long as its
/// drain and last flush could take (a minute and more): the operator's second Ctrl-C must
/// end it at once, and nothing acknowledged is lost.
#[tokio::test]
async fn a_second_signal_during_a_stop_exits_at_once() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let server = binary::start(
        dir.path(),
        &["--body-timeout", "120s", "--drain-timeout", "120s"],
    )
    .await;
    assert_eq!(
        binary::create(&server, "twice-1").await,
        StatusCode::CREATED
    );
    // A request whose body stops coming holds the drain up to --drain-timeout.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            b"POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"name\":",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&server, libc::SIGTERM);
    assert!(
        !ended_within(&server, Duration::from_secs(1)).await,
        "the stop did not wait for the request in flight"
    );
    signal(&server, libc::SIGINT);
    assert!(
        ended_within(&server, Duration::from_secs(10)).await,
        "a second signal did not end the stop"
    );
    let status = server.stop().await.unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    drop(stalled);
    assert_kept_through_a_restart(dir.path(), "twice-1").await;
}
