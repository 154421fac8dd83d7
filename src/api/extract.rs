//! Extractors whose every failure is an [`ApiError`]: [`PathParams`], and the JSON body
//! extractor [`JsonBody`]. Bodies are parsed as JSON whatever `Content-Type` says (the
//! original curl examples send form-encoded headers), and every way a body can be wrong
//! becomes an [`ApiError`] with the one error shape: not JSON is `400 invalid_json`, JSON
//! of the wrong shape is `422 validation_failed` naming the field, too large is `413`, too
//! slow is `408`.

use super::AppState;
use crate::domain::ValidationError;
use crate::error::ApiError;
use axum::body::{Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set while a request's body is read, for the connection that sent it (the server puts
/// one on each request as an extension): at the connection cap, a connection stalled in
/// its body may be closed to make room, since nothing of its request has happened yet.
#[derive(Clone, Default)]
pub struct ReadingBody(pub Arc<AtomicBool>);

/// Clears [`ReadingBody`] when the body has been read, or the read given up.
struct BodyRead(Option<ReadingBody>);

impl BodyRead {
    fn start(reading: Option<&ReadingBody>) -> Self {
        if let Some(reading) = reading {
            reading.0.store(true, Ordering::Release);
        }
        Self(reading.cloned())
    }
}

impl Drop for BodyRead {
    fn drop(&mut self) {
        if let Some(reading) = &self.0 {
            reading.0.store(false, Ordering::Release);
        }
    }
}

/// Path parameters; a path that does not decode is `422 validation_failed`.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(e) => Err(ApiError::Validation(ValidationError::new(
                "path",
                e.body_text(),
            ))),
        }
    }
}

/// A JSON request body, which must arrive within `--body-timeout` of the request head.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        // A declared length over the limit is refused before any of the body is read:
        // waiting for that body would hold the connection until the body timeout, and
        // answering `Expect: 100-continue` would invite the client to send it.
        // (hyper's size hint: the `Content-Length` it read, and 0 for a chunked body.)
        if req.body().size_hint().lower() > state.max_body_bytes() as u64 {
            return Err(ApiError::PayloadTooLarge);
        }
        let body_read = BodyRead::start(req.extensions().get::<ReadingBody>());
        let reading = Bytes::from_request(req, state);
        let read = tokio::time::timeout(state.body_timeout(), reading).await;
        drop(body_read);
        let bytes = read
            .map_err(|_| ApiError::BodyTimeout)?
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::InvalidJson(format!("could not read the request body: {e}"))
                }
            })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a body, telling syntax errors (400) from shape errors (422): a syntax error
/// anywhere wins over a shape error before it.
///
/// A body that parses straight into `T`, with no field `T` lacks, is parsed once: that is
/// every request a client gets right, and reading it as a JSON value first cost a second
/// parse and an allocation per key and string. Every other body is read again, as a value,
/// to tell the two kinds of error apart and name the field:
/// - one that fails (a key twice takes this path too, and keeps the last value, as a
///   value does);
/// - one with a field `T` lacks: serde_json skips such a field's value without checking
///   all of it (bad UTF-8, a lone surrogate, a number past f64, nesting past 128 levels),
///   where a value refuses each as not JSON.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut skipped = false;
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let once = serde_ignored::deserialize(&mut json, |_| skipped = true)
        .and_then(|parsed| json.end().map(|()| parsed));
    match once {
        Ok(parsed) if !skipped => Ok(parsed),
        _ => parse_as_value(bytes),
    }
}

/// [`parse`] by way of a JSON value, which is what tells a syntax error from a shape error.
fn parse_as_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidJson(format!("request body is not valid JSON: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        shape_error(&path, &e.into_inner())
    })
}

fn shape_error(path: &str, e: &serde_json::Error) -> ApiError {
    let reason = e.to_string();
    let reason = reason.as_str();
    let field = if path == "." {
        // "missing field `name`" is reported at the root; name the field itself.
        reason
            .split('`')
            .nth(1)
            .filter(|_| reason.starts_with("missing field"))
            .unwrap_or("body")
    } else {
        path
    };
    ApiError::Validation(ValidationError::new(field, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Body {
        name: String,
        ports: Vec<String>,
    }

    fn err(json: &str) -> (&'static str, String) {
        let e = parse::<Body>(json.as_bytes()).unwrap_err();
        (e.code(), e.to_string())
    }

    #[test]
    fn syntax_is_400_and_shape_is_422_naming_the_field() {
        assert_eq!(err("").0, "invalid_json");
        assert_eq!(err("{\"name\": ").0, "invalid_json");
        assert_eq!(err("{} trailing").0, "invalid_json");
        let (code, msg) = err(r#"{"ports": []}"#);
        assert_eq!(code, "validation_failed");
        assert!(msg.starts_with("name: missing field"), "{msg}");
        let (code, msg) = err(r#"{"name": "x", "ports": ["P", 7]}"#);
        assert_eq!(code, "validation_failed");
        assert!(msg.starts_with("ports[1]: invalid type"), "{msg}");
        assert!(!msg.contains("line"), "{msg}");
        assert_eq!(err("[1]").0, "validation_failed");
    }

    /// The one-parse path and the path by way of a value give the same body for every
    /// body both accept, and the one-parse path hands the rest (a key twice) to the other.
    #[test]
    fn a_body_parsed_once_is_the_body_parsed_as_a_value() {
        let bodies = [
            r#"{"name": "x", "ports": ["P"]}"#,
            r#"{"ports": ["P", "R"], "name": "y\u00e9", "extra": {"a": [1, 2.5, null]}}"#,
            r#" ["z", ["Q"]] "#,
            r#"{"name": "first", "name": "last", "ports": []}"#,
        ];
        for json in bodies {
            let once = parse::<Body>(json.as_bytes()).unwrap();
            let by_value = parse_as_value::<Body>(json.as_bytes()).unwrap();
            assert_eq!(
                (&once.name, &once.ports),
                (&by_value.name, &by_value.ports),
                "{json}"
            );
        }
        let twice = parse::<Body>(bodies[3].as_bytes()).unwrap();
        assert_eq!(twice.name, "last", "a key twice keeps its last value");
    }

    /// serde_json skips a field the type lacks without checking all of its value; such a
    /// body is still refused as not JSON, as it was before the one-parse path.
    #[test]
    fn a_field_the_body_lacks_is_still_checked_as_json() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let bodies: [Vec<u8>; 4] = [
            b"{\"name\": \"x\", \"ports\": [], \"extra\": \"\xff\"}".to_vec(),
            br#"{"name": "x", "ports": [], "extra": "\ud800"}"#.to_vec(),
            br#"{"name": "x", "ports": [], "extra": 1e400}"#.to_vec(),
            format!(r#"{{"name": "x", "ports": [], "extra": {deep}}}"#).into_bytes(),
        ];
        for body in bodies {
            let e = parse::<Body>(&body).unwrap_err();
            assert_eq!(
                e.code(),
                "invalid_json",
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
