//! Connections a hostile or broken client holds open: idle sockets and half-sent heads
//! cannot lock other clients out, slow heads and bodies and unread answers are cut off,
//! oversized heads are refused, and a client stalled mid-body cannot hold up a graceful
//! stop.

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
