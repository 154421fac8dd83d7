//! The bench's HTTP side: the requests the phases send, on keep-alive connections, and how
//! an answer becomes an [`Outcome`].
//!
//! The load's requests go through [`Lanes`]: plain HTTP/1.1 connections (hyper's client
//! connection), each carrying one request at a time, taken from a stack and put back once
//! the answer's body is read. The bench shares two cores with the service it measures, so
//! its own cost per request shows in the service's latency: reqwest (a pool behind a
//! lock, a URL parsed and the default headers copied for every request) cost 40-45 us of
//! CPU per PUT here, twice what the echo server spends answering it. The rare requests
//! (readiness, `/metrics`) use reqwest.

use super::load::Outcome;
use super::mix::Request;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request as HttpRequest};
use hyper_util::rt::TokioIo;
use reqwest::{Client, StatusCode};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request that takes longer than this counts as failed (no answer), so a hung server
/// cannot hang the bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("the auth token cannot be sent in a header")]
    Token,
    #[error("{0}: only http://host:port URLs can be loaded")]
    Url(String),
    #[error("GET {0}")]
    Request(String, #[source] reqwest::Error),
    #[error("GET {0} answered {1}")]
    Status(String, StatusCode),
    #[error("{0}/readyz did not answer 200 within {1:?} (last: {2})")]
    NotReady(String, Duration, String),
}

#[derive(Clone)]
pub struct Http {
    client: Client,
    base: Arc<str>,
    lanes: Arc<Lanes>,
}

impl Http {
    /// A client for `base` (`http://host:port`) keeping up to `connections` idle
    /// connections, one per worker, and sending `Authorization: Bearer <token>` on every
    /// request when given a token.
    pub fn new(
        base: &str,
        connections: usize,
        auth_token: Option<&str>,
    ) -> Result<Self, HttpError> {
        let mut headers = reqwest::header::HeaderMap::new();
        let authorization = match auth_token {
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| HttpError::Token)?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value.clone());
                Some(value)
            }
            None => None,
        };
        let client = Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(HttpError::Client)?;
        let base = base.trim_end_matches('/');
        let authority = base
            .strip_prefix("http://")
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| HttpError::Url(base.to_owned()))?;
        let lanes = Lanes {
            authority: authority.to_owned(),
            host: HeaderValue::try_from(authority).map_err(|_| HttpError::Url(base.to_owned()))?,
            authorization,
            idle: Mutex::new(Vec::with_capacity(connections)),
        };
        Ok(Http {
            client,
            base: base.into(),
            lanes: Arc::new(lanes),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /widgets` of a widget with every port, so any port can be associated.
    pub fn create(&self, serial: &str) -> impl Future<Output = Outcome> + Send + 'static {
        // Serials are the bench's own ([A-Za-z0-9-]), so no JSON escaping is needed, and
        // formatting is cheaper than serde on a client that shares the server's cores.
        let body =
            format!(r#"{{"name":"bench","serial_number":"{serial}","ports":["P","R","Q"]}}"#);
        self.lanes
            .clone()
            .send(Method::POST, "/widgets".into(), Some(body))
    }

    /// One request of the mix; indices are into `serials`.
    pub fn mix(
        &self,
        request: Request,
        serials: &[String],
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let (method, path, body) = match request {
            Request::Put { port, widget, peer } => {
                let body = format!(
                    r#"{{"port_type":"{}","widget_serial_num":"{}","peer_widget_serial_num":"{}"}}"#,
                    port.as_str(),
                    serials[widget],
                    serials[peer]
                );
                (Method::PUT, "/widgets/associations".into(), Some(body))
            }
            Request::Free { widget, port } => (
                Method::DELETE,
                format!(
                    "/widgets/{}/associations/{}",
                    serials[widget],
                    port.as_str()
                ),
                None,
            ),
            Request::Get { widget } => (Method::GET, format!("/widgets/{}", serials[widget]), None),
        };
        self.lanes.clone().send(method, path, body)
    }

    /// `GET /healthz`: the cheapest request the service answers.
    pub fn healthz(&self) -> impl Future<Output = Outcome> + Send + 'static {
        self.lanes
            .clone()
            .send(Method::GET, "/healthz".into(), None)
    }

    /// The body of `GET path`, which must answer 200.
    pub async fn text(&self, path: &str) -> Result<String, HttpError> {
        let url = self.url(path);
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| HttpError::Request(url.clone(), e))?;
        if response.status() != StatusCode::OK {
            return Err(HttpError::Status(url, response.status()));
        }
        response
            .text()
            .await
            .map_err(|e| HttpError::Request(url, e))
    }

    /// Waits until `/readyz` answers 200 (the service has recovered and takes writes).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), HttpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.client.get(self.url("/readyz")).send().await {
                Ok(r) if r.status() == StatusCode::OK => return Ok(()),
                Ok(r) => r.status().to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(HttpError::NotReady(self.base.to_string(), timeout, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Keep-alive connections to one `host:port`, each carrying one request at a time: a
/// request takes the connection on top of the stack (or opens one), and puts it back once
/// its answer is read to the end. As many connections open as requests are ever in flight
/// at once: one per worker.
struct Lanes {
    authority: String,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// A request got no answer: the connection could not be made, or broke.
#[derive(Debug)]
struct NoAnswer;

impl Lanes {
    /// Sends one request and reads its answer; `Failed` if none came within
    /// [`REQUEST_TIMEOUT`].
    async fn send(self: Arc<Self>, method: Method, path: String, body: Option<String>) -> Outcome {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body)).await {
            Ok(Ok(status)) => Outcome::Status(status),
            Ok(Err(NoAnswer)) | Err(_) => Outcome::Failed,
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: String,
        body: Option<String>,
    ) -> Result<u16, NoAnswer> {
        let json = body.is_some();
        let mut request = HttpRequest::new(Full::new(Bytes::from(body.unwrap_or_default())));
        *request.method_mut() = method;
        *request.uri_mut() = path.parse().map_err(|_| NoAnswer)?;
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        if json {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        // A kept connection the server has closed meanwhile (its idle timeout, between
        // phases) hands the request back unsent: it goes again on a new connection.
        let (mut lane, reused) = match self.take() {
            Some(lane) => (lane, true),
            None => (self.connect().await?, false),
        };
        let response = match lane.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                Some(request) if reused => {
                    lane = self.connect().await?;
                    lane.send_request(request).await.map_err(|_| NoAnswer)?
                }
                _ => return Err(NoAnswer),
            },
        };
        let status = response.status().as_u16();
        response.into_body().collect().await.map_err(|_| NoAnswer)?;
        self.idle.lock().expect("idle connections").push(lane);
        Ok(status)
    }

    /// An idle connection still open, if any.
    fn take(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().expect("idle connections");
        while let Some(lane) = idle.pop() {
            if lane.is_ready() {
                return Some(lane);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, NoAnswer> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|_| NoAnswer)?;
        let _ = stream.set_nodelay(true);
        let (lane, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| NoAnswer)?;
        // The connection's own task reads and writes the socket; it ends with the socket.
        tokio::spawn(connection);
        Ok(lane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::CONNECTION;
    use axum::routing::{get, put};
    use axum::Router;

    /// A server whose every answer closes its connection; a PUT answers 200 only when its
    /// body arrived whole.
    async fn closing_server() -> String {
        let app = Router::new()
            .route(
                "/healthz",
                get(|| async { ([(CONNECTION, "close")], "ok") }),
            )
            .route(
                "/widgets/associations",
                put(|body: String| async move {
                    let status = if body.contains("\"port_type\":\"P\"") && body.ends_with('}') {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY
                    };
                    (status, [(CONNECTION, "close")], "{}")
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_not_counted_as_a_failure() {
        let http = Http::new(&closing_server().await, 4, None).unwrap();
        for _ in 0..5 {
            assert_eq!(http.healthz().await, Outcome::Status(200));
        }
        let serials = vec!["a".to_owned(), "b".to_owned()];
        let put = Request::Put {
            port: widgets::domain::PortType::P,
            widget: 0,
            peer: 1,
        };
        assert_eq!(
            http.mix(put, &serials).await,
            Outcome::Status(200),
            "the body arrives whole"
        );
    }

    #[tokio::test]
    async fn no_server_is_a_failed_request_and_a_bad_url_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let http = Http::new(&format!("http://{addr}"), 1, None).unwrap();
        assert_eq!(http.healthz().await, Outcome::Failed);
        assert!(matches!(
            Http::new("https://example.com", 1, None),
            Err(HttpError::Url(_))
        ));
    }
}
