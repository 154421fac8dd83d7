//! The bench's HTTP side: one shared client with a connection per worker kept alive, the
//! requests the phases send, and how an answer becomes an [`Outcome`]. Every request's
//! body is read to the end, so its connection goes back to the pool for the next one.

use super::load::Outcome;
use super::mix::Request;
use reqwest::{Client, RequestBuilder, StatusCode};
use std::future::Future;
use std::sync::Arc;
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
        if let Some(token) = auth_token {
            let mut value = reqwest::header::HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| HttpError::Token)?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let client = Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(HttpError::Client)?;
        Ok(Http {
            client,
            base: base.trim_end_matches('/').into(),
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
        send(self.client.post(self.url("/widgets")).body(body))
    }

    /// One request of the mix; indices are into `serials`.
    pub fn mix(
        &self,
        request: Request,
        serials: &[String],
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let builder = match request {
            Request::Put { port, widget, peer } => {
                let body = format!(
                    r#"{{"port_type":"{}","widget_serial_num":"{}","peer_widget_serial_num":"{}"}}"#,
                    port.as_str(),
                    serials[widget],
                    serials[peer]
                );
                self.client
                    .put(self.url("/widgets/associations"))
                    .body(body)
            }
            Request::Free { widget, port } => self.client.delete(self.url(&format!(
                "/widgets/{}/associations/{}",
                serials[widget],
                port.as_str()
            ))),
            Request::Get { widget } => self
                .client
                .get(self.url(&format!("/widgets/{}", serials[widget]))),
        };
        send(builder)
    }

    /// `GET /healthz`: the cheapest request the service answers.
    pub fn healthz(&self) -> impl Future<Output = Outcome> + Send + 'static {
        send(self.client.get(self.url("/healthz")))
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

async fn send(builder: RequestBuilder) -> Outcome {
    match builder.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(_) => Outcome::Status(status),
                Err(_) => Outcome::Failed,
            }
        }
        Err(_) => Outcome::Failed,
    }
}
