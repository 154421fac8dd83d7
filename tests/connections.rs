//! Connections a hostile or broken client holds open: idle sockets and half-sent heads
//! cannot lock other clients out, slow heads and bodies and unread answers are cut off,
//! oversized heads are refused, and a client stalled mid-body cannot hold up a graceful
//! stop.

#[macro_use]
mod common;

use common::binary;
use reqwest::StatusCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection or `within` passes; returns what it read,
/// or `None` if the connection was still open.
async fn read_until_closed(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, socket.read_to_end(&mut got)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn idle_and_half_sent_sockets_at_twice_the_cap_do_not_lock_out_readyz() {
    let app = common::spawn_app_with(&["--max-connections", "20"]).await;
    let mut held = Vec::new();
    for i in 0..40 {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        if i % 2 == 1 {
            // A head that never ends.
            socket
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(socket);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..5 {
        for path in ["/readyz", "/healthz"] {
            let r = client.get(app.url(path)).send().await;
            assert_eq!(
                r.map(|r| r.status()).ok(),
                Some(StatusCode::OK),
                "{path} while 40 sockets are held open against a cap of 20"
            );
        }
    }
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        common::metric(&metrics, "http_connections_evicted_total").unwrap_or(0.0) >= 20.0,
        "the idle sockets made room"
    );
    let mut closed = 0;
    for socket in &mut held {
        if read_until_closed(socket, Duration::from_millis(100))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 20,
        "only {closed} of the 40 held sockets were closed: evicted sockets must not linger"
    );
    drop(held);
    app.stop().await;
}

/// Sends `GET /healthz` with `Connection: close` on a new connection; the answer, or what
/// the server sent before it closed the connection without one.
async fn healthz_on_a_new_connection(addr: std::net::SocketAddr) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("the request was not answered within 5 s")
}

/// The cap makes room only for a connection that is waiting beyond it, and never by closing
/// that newcomer. The connection that reached the cap used to evict at once: the
/// longest-idle one with nobody waiting, or, when the others were all in a request, the
/// newcomer itself, before it had sent its head (an empty reply).
#[tokio::test]
async fn at_the_cap_only_a_waiting_newcomer_evicts_and_never_itself() {
    let app = common::spawn_app_with(&["--max-connections", "20"]).await;
    // Exactly the cap of idle connections, and nobody waiting: every one stays and is
    // served.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(app.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, socket) in idle.iter_mut().enumerate() {
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed(socket, Duration::from_secs(5))
            .await
            .expect("the request was not answered within 5 s");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "idle connection {i} of 20 at a cap of 20 was closed: {answer:?}"
        );
    }
    drop(idle);

    // One below the cap in requests (bodies that stall): each new connection reaches the
    // cap, and is served.
    let mut busy = Vec::new();
    for _ in 0..19 {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        socket
            .write_all(b"POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        busy.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let answer = healthz_on_a_new_connection(app.addr).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {i}: the connection that reached the cap was closed: {answer:?}"
        );
    }
    drop(busy);
    app.stop().await;
}

/// At the cap, with every connection in a request whose body stalls (or trickles in), a
/// newcomer is served: the connection longest in its body is closed for it, with no
/// answer, and its request changes nothing; the others finish as usual. The newcomer used
/// to wait for the body timeout (30 s), `/healthz` included, and an attacker who
/// reconnected then kept every newcomer out.
#[tokio::test]
async fn stalled_bodies_at_the_cap_do_not_lock_out_a_newcomer() {
    let app = common::spawn_app_with(&["--max-connections", "4"]).await;
    let mut slow = Vec::new();
    for i in 0..4 {
        let body = format!(r#"{{"name": "w", "serial_number": "slow{i}", "ports": ["P"]}}"#);
        let head = format!(
            "POST /widgets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(&body.as_bytes()[..10]).await.unwrap();
        slow.push((socket, body));
        // In order, so that the first is the one longest in its body.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = healthz_on_a_new_connection(app.addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");

    let mut answers = Vec::new();
    for (socket, body) in &mut slow {
        let _ = socket.write_all(&body.as_bytes()[10..]).await;
        let answer = read_until_closed(socket, Duration::from_secs(5))
            .await
            .expect("neither answered nor closed");
        answers.push(answer.lines().next().unwrap_or_default().to_owned());
    }
    assert_eq!(
        answers,
        [
            "",
            "HTTP/1.1 201 Created",
            "HTTP/1.1 201 Created",
            "HTTP/1.1 201 Created"
        ]
    );
    assert!(
        app.widget("slow0").await.is_none(),
        "the closed one's write"
    );
    assert!(app.widget("slow1").await.is_some());
    app.stop().await;
}

/// The `widgets` binary on a temporary data directory, started under an open-file limit of
/// `files` (soft and hard) if given, its whole log kept.
struct Limited {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Limited {
    async fn start(files: Option<u64>) -> Limited {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_widgets"));
        widgets_testkit::server::log_on_a_pipe(&mut command)
            .args(["--listen", "127.0.0.1:0", "--database-url=", "--redis-url="])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "info");
        if let Some(files) = files {
            // SAFETY: setrlimit alone between fork and exec, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: files,
                        rlim_max: files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("starting widgets");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = widgets_testkit::server::listen_addr_in_log(&line) {
                    let _ = addr_tx.send(addr.parse::<std::net::SocketAddr>().unwrap());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr =
            tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("widgets did not listen: {:?}", log.lock().unwrap()));
        let server = Limited {
            child,
            addr,
            log,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        eventually!(
            "/readyz",
            30,
            client
                .get(format!("http://{}/readyz", server.addr))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        );
        server
    }

    /// Lowers the running server's open-file limit to the descriptors it has open now and
    /// `more`: as if something else in the process had taken the rest.
    fn leave_files(&self, more: u64) {
        let open = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count() as u64;
        let limit = libc::rlimit {
            rlim_cur: open + more,
            rlim_max: open + more,
        };
        // SAFETY: prlimit(2) on our own child, with one `rlimit` to read and none to write.
        let set = unsafe {
            libc::prlimit(
                self.child.id() as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    }

    /// Log lines that contain `text`.
    fn logged(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Opens 200 connections that say nothing, then checks that `/healthz` answers on new
    /// connections all the same.
    async fn healthz_answers_past_200_idle_connections(&self) -> Vec<TcpStream> {
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(self.addr).await.unwrap());
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        for i in 0..5 {
            let r = client
                .get(format!("http://{}/healthz", self.addr))
                .send()
                .await;
            assert_eq!(
                r.as_ref().map(|r| r.status()).ok(),
                Some(StatusCode::OK),
                "/healthz {i} past 200 idle connections: {r:?}; the log: {:#?}",
                self.log.lock().unwrap()
            );
        }
        idle
    }

    /// SIGTERM, and a graceful exit.
    async fn stop(mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status}");
    }
}

impl Drop for Limited {
    /// A failing test leaves no server behind (a stopped one is reaped already).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An open-file limit below `--max-connections` (4,096 by default) used to leave the cap
/// unreachable: every accept failed with "Too many open files", nothing was evicted, and
/// `/healthz` went unanswered behind idle sockets while the log took about 20 warnings a
/// second. The cap is now lowered to fit, once, with a warning.
#[tokio::test]
async fn an_open_file_limit_below_the_cap_lowers_the_cap_and_eviction_still_makes_room() {
    let server = Limited::start(Some(128)).await;
    let idle = server.healthz_answers_past_200_idle_connections().await;
    assert_eq!(
        server.logged("does not fit in the open-file limit"),
        1,
        "{:#?}",
        server.log.lock().unwrap()
    );
    drop(idle);
    server.stop().await;
}

/// Descriptors run out below the cap (something else in the process holds them): a failed
/// accept closes the longest-idle connection to make room, and is not logged more than once
/// in ten seconds.
#[tokio::test]
async fn out_of_file_descriptors_an_accept_evicts_the_longest_idle_connection() {
    // Then 20 descriptors are left, below the cap it started with (whatever that was).
    let server = Limited::start(None).await;
    server.leave_files(20);
    let idle = server.healthz_answers_past_200_idle_connections().await;
    let warnings = server.logged("accept failed");
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} accept warnings: {:#?}",
        server.log.lock().unwrap()
    );
    drop(idle);
    server.stop().await;
}

/// A client that sends its whole request and then shuts its side down (`shutdown(SHUT_WR)`,
/// as `nc -N` does) gets its answer. hyper closed such a connection when it read the end
/// of the stream, even after making the write, so the client never learnt it was made.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let app = common::spawn_app_with(&[]).await;
    let body = r#"{"name": "w", "serial_number": "half", "ports": ["P"]}"#;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket.shutdown().await.unwrap();
    let answer = read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("the server kept the connection open");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer:?}");
    assert!(answer.contains(r#""serial_number":"half""#), "{answer}");
    assert!(app.widget("half").await.is_some());
    app.stop().await;
}

/// Half-closed connections are bounded as others are: one that sent nothing or half a head
/// is closed, and one that reads none of its answers is closed once its writes stall for
/// the idle timeout.
#[tokio::test]
async fn half_closed_connections_are_still_closed_when_idle_or_unread() {
    let app = common::spawn_app_with(&["--idle-timeout", "500ms"]).await;
    for sent in [&b""[..], b"GET /healthz HTTP/1.1\r\nHo"] {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        socket.write_all(sent).await.unwrap();
        socket.shutdown().await.unwrap();
        let answer = read_until_closed(&mut socket, Duration::from_secs(5)).await;
        assert!(
            answer.is_some(),
            "{:?}: the connection stayed open",
            String::from_utf8_lossy(sent)
        );
    }
    // A body cut short by the end of the stream fails at once, well within --body-timeout.
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        .await
        .unwrap();
    socket.shutdown().await.unwrap();
    let answer = read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("a body cut short was waited for");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // Answers of tens of kilobytes each, thousands of them: far more than the sockets'
    // buffers hold, so the server's writes stall until the client reads.
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    let requests = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let writing = async {
        let mut sent = 0;
        let started = Instant::now();
        while sent < requests.len() && started.elapsed() < Duration::from_secs(2) {
            match socket.try_write(&requests[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => break,
            }
        }
        sent
    };
    let sent = writing.await;
    let _ = socket.shutdown().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now read: a connection still open would go on answering until every request it read
    // had its answer; a closed one ends with what the buffers held (or a reset).
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut got)).await;
    let answers = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    let asked = sent / b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".len();
    assert!(
        read.is_ok() && answers < asked,
        "the server kept the connection open, its answers unread: {answers} answers to {asked} requests"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_idle_connection_and_a_slow_head_are_closed_after_the_idle_timeout() {
    let app = common::spawn_app_with(&["--idle-timeout", "300ms"]).await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for socket in [&mut idle, &mut slow] {
        assert!(
            read_until_closed(socket, Duration::from_secs(5))
                .await
                .is_some(),
            "the server kept the connection open"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A connection that keeps sending requests is not idle.
    let client = reqwest::Client::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    app.stop().await;
}

/// A client that sends requests and reads none of the answers: once the server's writes
/// to it stop moving (its socket buffers full), the connection is closed after the idle
/// timeout. It used to stay open for as long as the client liked, holding the socket and
/// megabytes of the kernel's send buffer.
#[tokio::test]
async fn a_client_that_reads_no_answer_is_closed_after_the_idle_timeout() {
    let app = common::spawn_app_with(&["--idle-timeout", "500ms"]).await;
    let socket = TcpStream::connect(app.addr).await.unwrap();
    // Answers of tens of kilobytes each: a few hundred fill both sides' buffers, and the
    // server's writes wait.
    let requests = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let mut sent = 0;
    let started = Instant::now();
    while sent < requests.len() && started.elapsed() < Duration::from_secs(2) {
        match socket.try_write(&requests[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Closed already: checked below.
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reading would let the server's answers move again, so a write tells instead: on a
    // connection the server has closed (with requests unread: a reset) it fails.
    let written = socket.try_write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        written.is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the server kept the connection open, its answers unread"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        common::metric(&metrics, "http_connections_write_timeouts_total").unwrap_or(0.0) >= 1.0,
        "the closed connection is counted: {metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let app = common::spawn_app_with(&["--max-header-bytes", "8192"]).await;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may close before it has read everything: a failed write is a refusal too.
    let _ = socket.write_all(head.as_bytes()).await;
    let answer = read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("the connection stayed open");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

/// What docs/API.md says of two edges the HTTP layer decides: a request target over
/// 65,534 bytes is `414` whatever `--max-header-bytes` allows, and two `Content-Length`
/// headers that agree are read as one (two that differ are `400`).
#[tokio::test]
async fn a_huge_target_is_414_and_two_agreeing_lengths_are_read_as_one() {
    let app = common::spawn_app_with(&["--max-header-bytes", "1048576"]).await;
    let exchange = |request: String| async move {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        let _ = socket.write_all(request.as_bytes()).await;
        read_until_closed(&mut socket, Duration::from_secs(5))
            .await
            .expect("the connection stayed open")
    };
    let long = format!(
        "GET /widgets/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let answer = exchange(long).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");

    let body = r#"{"name": "w", "serial_number": "twice", "ports": ["P"]}"#;
    let lengths = |second: usize| {
        format!(
            "POST /widgets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\nContent-Length: {second}\r\n\r\n{body}",
            body.len()
        )
    };
    let answer = exchange(lengths(body.len() + 1)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(app.widget("twice").await.is_none());
    let answer = exchange(lengths(body.len())).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_declared_length_over_the_limit_answers_413_at_once_and_invites_no_body() {
    let app = common::spawn_app_with(&["--body-timeout", "30s", "--max-body-bytes", "1024"]).await;
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n{expect}\r\n{{}}"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        // Well inside the 30 s the body would have had.
        let answer = read_until_closed(&mut socket, Duration::from_secs(5))
            .await
            .expect("the request was not answered within 5 s");
        assert!(answer.starts_with("HTTP/1.1 413"), "{expect:?}: {answer}");
        assert!(!answer.contains("100 Continue"), "{expect:?}: {answer}");
        assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_stalls_answers_408_and_changes_nothing() {
    let app = common::spawn_app_with(&["--body-timeout", "300ms"]).await;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    let body = r#"{"name": "w", "serial_number": "slow", "ports": ["P"]}"#;
    let head = format!(
        "POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body.as_bytes()[..10]).await.unwrap();
    let answer = read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("the request was not answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(app.widget("slow").await.is_none());
    app.stop().await;
}

/// At a graceful stop, a connection with no request in progress closes at once, a
/// half-sent head included: one used to hold the stop for the whole drain deadline (here
/// an hour), as if it were a request.
#[tokio::test]
async fn idle_connections_and_half_sent_heads_do_not_hold_up_a_graceful_stop() {
    let app = common::spawn_app_with(&["--drain-timeout", "1h", "--idle-timeout", "1h"]).await;
    let mut half_sent = TcpStream::connect(app.addr).await.unwrap();
    half_sent
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    // A keep-alive connection, idle after its answer.
    let mut kept = TcpStream::connect(app.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0; 12];
    kept.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("idle connections held the stop up until the drain deadline");
    for socket in [&mut half_sent, &mut kept] {
        assert!(
            read_until_closed(socket, Duration::from_secs(1))
                .await
                .is_some(),
            "a connection outlived the stop"
        );
    }
}

#[tokio::test]
async fn a_client_stalled_mid_body_cannot_hold_up_a_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let server = binary::start(
        dir.path(),
        &["--drain-timeout", "1s", "--body-timeout", "1h"],
    )
    .await;
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/widgets", server.base))
        .body(r#"{"name": "w", "serial_number": "kept", "ports": ["P"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /widgets HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let status = server.stop().await.expect("stopping the server");
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stalled client held the stop up for {:?}",
        started.elapsed()
    );

    let again = binary::start(dir.path(), &[]).await;
    let kept = client
        .get(format!("{}/widgets/kept", again.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        kept.status(),
        StatusCode::OK,
        "acknowledged before the stop"
    );
    drop(stalled);
}

/// An answer whose handler has returned but whose body is still being sent when the drain
/// begins is sent whole: the connection has no request in progress, but it owes the rest
/// of an answer. It was dropped mid-body, the client left with half an answer.
#[tokio::test]
async fn an_answer_still_being_sent_at_a_graceful_stop_is_sent_whole() {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(Some(released)));
    let router = axum::Router::new().route(
        "/slow",
        get(move || {
            let released = released.lock().unwrap().take().expect("one request");
            async move {
                // A first chunk at once, the last once the test says so.
                let first =
                    futures_util::stream::once(async { Ok::<_, std::io::Error>(vec![b'a'; 1000]) });
                let last = futures_util::stream::once(async move {
                    let _ = released.await;
                    Ok(vec![b'b'; 1000])
                });
                axum::body::Body::from_stream(futures_util::StreamExt::chain(first, last))
            }
        }),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = widgets::serve::ConnectionLimits {
        max_connections: 10,
        idle_timeout: Duration::from_secs(30),
        max_header_bytes: 16384,
        drain_timeout: Duration::from_secs(30),
    };
    let server = tokio::spawn(widgets::serve::serve(
        listener,
        router,
        limits,
        shutdown.clone(),
    ));
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0; 4096];
    let n = socket.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = release.send(());
    let rest = read_until_closed(&mut socket, Duration::from_secs(10))
        .await
        .expect("the connection was not closed after its answer");
    server.await.unwrap().unwrap();
    let answer = [String::from_utf8_lossy(&first[..n]).into_owned(), rest].concat();
    assert_eq!(
        answer.matches('b').count(),
        1000,
        "the last chunk is missing"
    );
    assert!(
        answer.ends_with("0\r\n\r\n"),
        "the answer was cut off: {answer:?}"
    );
}

/// One newcomer at the cap closes one idle connection, the idlest: a wake-up left over from
/// an earlier connection's end made the loop go round before the evicted one was gone, and
/// close a second.
#[tokio::test]
async fn one_newcomer_at_the_cap_closes_one_idle_connection() {
    let app = common::spawn_app_with(&["--max-connections", "3", "--idle-timeout", "30s"]).await;
    // A connection that ends while nobody waits on its end: the wake-up is kept.
    let mut earlier = TcpStream::connect(app.addr).await.unwrap();
    earlier
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_until_closed(&mut earlier, Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(app.addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = healthz_on_a_new_connection(app.addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut closed = Vec::new();
    for socket in &mut held {
        closed.push(
            read_until_closed(socket, Duration::from_millis(300))
                .await
                .is_some(),
        );
    }
    assert_eq!(closed, [true, false, false], "closed, oldest first");
    app.stop().await;
}
