//! The echo reference: a bare axum JSON echo of the load's association PUT. It takes
//! `PUT /widgets/associations` with the body the load sends, parses and checks it, and
//! answers 200 with both widgets as the service would answer for two fresh widgets (the
//! service's own `Associated` type, so the same shape and size), and does nothing else: no
//! state, no WAL, no middleware. What the service spends per PUT beyond this is the service's work.
//!
//! It runs as a process of its own, the hidden `widgets-bench echo-server` subcommand
//! started by the bench, so its CPU is measured as the service's is, from `/proc`. It is
//! built like the service: the same runtime (`#[tokio::main]` in both binaries: tokio's
//! multi-thread runtime, one worker per core), the same allocator (mimalloc) and the same
//! connection loop and limits ([`widgets::serve`], with the service's defaults), so only
//! the handler differs. It prints its address as the first line on stdout.

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use clap::Parser;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use widgets::api::associations::Associate;
use widgets::config::Config;
use widgets::domain::widget::{Associations, PortList};
use widgets::domain::{Associated, Name, PortType, Ports, Serial, ValidationError, WidgetView};
use widgets::error::ApiError;

/// How long the echo process may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The name the bench gives every widget it creates, so the echo's answer is the size of
/// the service's.
const WIDGET_NAME: &str = "bench";

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("cannot start the echo reference ({})", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the echo reference exited before printing its address")]
    Exited,
    #[error("the echo reference did not print its address within {START_TIMEOUT:?}")]
    NoAddress,
    #[error("the echo reference printed {0:?}, not its address")]
    BadAddress(String),
}

/// The echo's routes: only the association PUT.
pub fn router() -> Router {
    Router::new().route("/widgets/associations", put(associate))
}

/// Parses the body whatever its content type (the bench, like any client of the service,
/// need not send one), as the service's extractor does, and refuses what the service
/// would refuse before its rules run, with the service's own errors: not JSON is `400
/// invalid_json`, a bad port or serial `422 validation_failed`.
async fn associate(body: Bytes) -> Response {
    let request = match serde_json::from_slice::<Associate>(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("request body is not valid JSON: {e}");
            return ApiError::InvalidJson(message).into_response();
        }
    };
    match answer(&request) {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => ApiError::Validation(e).into_response(),
    }
}

/// Both widgets with every port, associated with each other on the request's port, from
/// the request checked as the service checks it.
fn answer(request: &Associate) -> Result<Associated, ValidationError> {
    let checked = request.validate()?;
    let name = Name::parse("name", WIDGET_NAME)?;
    let ports = Ports::from_list("ports", &PortType::ALL)?;
    let view = |serial: &Serial, peer: &Serial| WidgetView {
        serial_number: serial.clone(),
        name: name.clone(),
        ports: PortList(ports),
        associations: Associations {
            ports,
            peers: PortType::ALL.map(|on| (on == checked.port).then(|| peer.clone())),
        },
    };
    Ok(Associated {
        widget: view(&checked.serial, &checked.peer),
        peer: view(&checked.peer, &checked.serial),
    })
}

/// Serves the echo on `listen` until `shutdown` completes, after printing the address it
/// bound (the port, when `listen`'s is 0) on stdout.
pub async fn serve(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    use anyhow::Context;
    // The service's connection limits, as its defaults (and WIDGETS_* variables) set them.
    let limits = Config::try_parse_from(["widgets"])
        .context("reading the service's connection limits")?
        .connection_limits();
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{addr}").and_then(|()| stdout.flush())?;
    drop(stdout);
    let token = CancellationToken::new();
    let cancel = token.clone();
    let serving = tokio::spawn(widgets::serve::serve(listener, router(), limits, token));
    shutdown.await;
    cancel.cancel();
    serving
        .await
        .context("the echo's server loop panicked")?
        .context("serving the echo")
}

/// The echo reference as a child process, killed and reaped when dropped (it has nothing
/// to save).
pub struct EchoServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl EchoServer {
    /// Starts `bin echo-server` (`bin` is a `widgets-bench`) on a free port and waits for
    /// its address.
    pub async fn start(bin: &Path) -> Result<EchoServer, EchoError> {
        let mut child = Command::new(bin)
            .args(["echo-server", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| EchoError::Spawn(bin.to_owned(), e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        // Reads the address, then drains stdout until the child exits, so it never blocks
        // on a full pipe.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            if let Some(first) = lines.next() {
                let _ = addr_tx.send(first);
            }
            lines.for_each(drop);
        });
        // From here on, dropping `server` kills the child, whatever goes wrong.
        let mut server = EchoServer {
            child,
            base: String::new(),
        };
        let line = match tokio::time::timeout(START_TIMEOUT, addr_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => return Err(EchoError::Exited),
            Err(_) => return Err(EchoError::NoAddress),
        };
        let addr: SocketAddr = line
            .trim()
            .parse()
            .map_err(|_| EchoError::BadAddress(line.clone()))?;
        server.base = format!("http://{addr}");
        Ok(server)
    }

    /// The child's process id, for its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn the_answer_is_both_widgets_associated_on_the_port() {
        let request: Associate = serde_json::from_str(
            r#"{"port_type":"R","widget_serial_num":"b1-0","peer_widget_serial_num":"b1-7"}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&answer(&request).unwrap()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"widget":{"serial_number":"b1-0","name":"bench","ports":["P","R","Q"],"#,
                r#""associations":{"P":null,"R":"b1-7","Q":null}},"#,
                r#""peer":{"serial_number":"b1-7","name":"bench","ports":["P","R","Q"],"#,
                r#""associations":{"P":null,"R":"b1-0","Q":null}}}"#
            )
        );
    }

    #[tokio::test]
    async fn the_echo_answers_the_put_with_json_and_refuses_what_is_not_json() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let limits = Config::try_parse_from(["widgets"])
            .unwrap()
            .connection_limits();
        let token = CancellationToken::new();
        let serving = tokio::spawn(widgets::serve::serve(
            listener,
            router(),
            limits,
            token.clone(),
        ));
        let client = reqwest::Client::new();
        let url = format!("{base}/widgets/associations");

        // As the load sends it: no content type.
        let body = r#"{"port_type":"P","widget_serial_num":"a","peer_widget_serial_num":"b"}"#;
        let response = client.put(&url).body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{response:?}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(json["widget"]["associations"]["P"], "b", "{json}");
        assert_eq!(json["peer"]["associations"]["P"], "a", "{json}");

        let response = client.put(&url).body("{not json").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let json: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(json["error"]["code"], "invalid_json", "{json}");
        let body = r#"{"port_type":"P","widget_serial_num":"a b","peer_widget_serial_num":"b"}"#;
        let response = client.put(&url).body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let json: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(json["error"]["code"], "validation_failed", "{json}");
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

        token.cancel();
        serving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_binary_that_is_not_the_bench_is_named() {
        let e = EchoServer::start(Path::new("/nonexistent/widgets-bench"))
            .await
            .err()
            .expect("started nothing");
        assert!(e.to_string().contains("/nonexistent/widgets-bench"), "{e}");
        // `true` exits at once, without an address.
        let e = EchoServer::start(Path::new("true"))
            .await
            .err()
            .expect("printed no address");
        assert!(matches!(e, EchoError::Exited), "{e}");
    }
}
