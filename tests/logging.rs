//! `WIDGETS_LOG_FORMAT=json` on the real binary: every line on stderr is one JSON object
//! with the keys a log pipeline reads, and a request's lines carry its span.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[tokio::test]
async fn json_logs_are_one_object_a_line_with_the_request_span() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("WIDGETS_LOG_FORMAT", "json")
        // The request span is at debug level, and so are the lines tower-http logs in it.
        .env("RUST_LOG", "info,tower_http=debug")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the widgets binary");
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = widgets_testkit::server::listen_addr_in_log(&line) {
                let _ = addr_tx.send(addr.to_owned());
            }
            lines.push(line);
        }
        lines
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the JSON log names the address it listens on");

    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the server did not become ready");
    let missing = client
        .get(format!("{base}/widgets/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();

    assert!(lines.len() >= 4, "{lines:#?}");
    let mut request_lines = 0;
    for line in &lines {
        let object: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(object[key].is_string(), "no {key}: {line}");
        }
        assert!(
            object["fields"]["message"].is_string(),
            "no message: {line}"
        );
        let span = &object["span"];
        if span["name"] == "request" && span["uri"] == "/widgets/missing" {
            assert_eq!(span["method"], "GET", "{line}");
            assert_eq!(object["spans"][0]["name"], "request", "{line}");
            request_lines += 1;
        }
    }
    assert!(
        request_lines >= 1,
        "no line in the request's span: {lines:#?}"
    );
    for message in ["listening", "ready", "stopped"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(r#""message":"{message}""#))),
            "no {message:?} line: {lines:#?}"
        );
    }
}
