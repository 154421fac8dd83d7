//! The one HTTP error type: a stable `code`, a status, and the JSON body
//! `{"error": {"code": ..., "message": ...}}`. A 5xx never carries internals; the detail
//! is logged where it happens.

use crate::domain::{DomainError, ValidationError};
use crate::engine::EngineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// Seconds a client is told to wait before retrying a `503`.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("request body is larger than the limit (--max-body-bytes)")]
    PayloadTooLarge,
    #[error("the request body did not arrive in time (--body-timeout)")]
    BodyTimeout,
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `--auth-token` is set and the request has no `Authorization: Bearer` header
    /// (`false`), or one whose token is not one of those set (`true`: a token was sent).
    #[error("{}", if *.0 { "the bearer token is not accepted" } else { "this request needs an `Authorization: Bearer <token>` header" })]
    Unauthorized(bool),
    #[error("the service is still recovering; try again shortly")]
    NotReady,
    #[error("{0}; try again shortly")]
    Overloaded(&'static str),
    #[error("no disk space left for the write-ahead log; the write was not made")]
    DiskFull,
    /// The WAL write failed and was cut back (its wire code, `storage_error`, predates
    /// the name and stays for clients that branch on it).
    #[error("the write could not be logged and was not made; try again")]
    WalWrite,
    /// The WAL failed (an fsync), or another instance took over the store: this process
    /// acknowledges no write until it is restarted.
    #[error("this instance can no longer make writes durable (see its log) and accepts no writes until it is restarted")]
    WalFailed,
    #[error("the shared state is unavailable; try again shortly")]
    Unavailable,
    /// `/readyz` only: the durable store has not taken a change for this long.
    #[error("a change has waited {} s for the durable store (over --ready-max-flush-lag)", .0.as_secs())]
    FlushStalled(std::time::Duration),
    #[error("internal error")]
    Internal,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Domain(d) => ApiError::Domain(d),
            EngineError::Overloaded(why) => ApiError::Overloaded(why),
            EngineError::DiskFull => ApiError::DiskFull,
            EngineError::WalWrite => ApiError::WalWrite,
            // The reason was logged when the WAL failed; clients get no internals.
            EngineError::WalFailed(_) => ApiError::WalFailed,
            EngineError::Unavailable(reason) => {
                if let Some(count) = crate::metrics::throttled("shared state unavailable") {
                    tracing::warn!(%reason, count, "shared state unavailable");
                }
                ApiError::Unavailable
            }
            EngineError::Internal(reason) => {
                tracing::error!(%reason, "internal error");
                ApiError::Internal
            }
        }
    }
}

impl ApiError {
    /// The stable, snake_case word a program can branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Validation(_) => "validation_failed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::BodyTimeout => "request_timeout",
            ApiError::Domain(DomainError::WidgetExists(_)) => "widget_exists",
            ApiError::Domain(DomainError::NotFound(_)) => "widget_not_found",
            ApiError::Domain(DomainError::PortNotAvailable { .. }) => "port_not_available",
            ApiError::Domain(DomainError::SelfAssociation(_)) => "self_association",
            ApiError::NoRoute(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotReady => "not_ready",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::DiskFull => "disk_full",
            ApiError::WalWrite => "storage_error",
            ApiError::WalFailed => "wal_failed",
            ApiError::Unavailable => "unavailable",
            ApiError::FlushStalled(_) => "flush_stalled",
            ApiError::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Domain(DomainError::WidgetExists(_)) => StatusCode::CONFLICT,
            ApiError::Domain(DomainError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Domain(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotReady
            | ApiError::Overloaded(_)
            | ApiError::DiskFull
            | ApiError::WalWrite
            | ApiError::WalFailed
            | ApiError::Unavailable
            | ApiError::FlushStalled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// One error of every kind, in the order of `docs/API.md`'s error code table (which a
    /// test compares with this list, as the OpenAPI document is built from it).
    pub fn every_kind() -> Vec<ApiError> {
        use crate::domain::Serial;
        let serial = Serial::parse("serial", "123").expect("a valid serial");
        let all = vec![
            ApiError::InvalidJson(String::new()),
            ApiError::PayloadTooLarge,
            ApiError::BodyTimeout,
            ApiError::Validation(ValidationError::new("field", "rule")),
            ApiError::Domain(DomainError::WidgetExists(serial.clone())),
            ApiError::Domain(DomainError::NotFound(serial.clone())),
            ApiError::Domain(DomainError::PortNotAvailable {
                serial: serial.clone(),
                port: crate::domain::PortType::P,
            }),
            ApiError::Domain(DomainError::SelfAssociation(serial)),
            ApiError::Unauthorized(false),
            ApiError::NoRoute(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::NotReady,
            ApiError::Overloaded(""),
            ApiError::DiskFull,
            ApiError::WalWrite,
            ApiError::WalFailed,
            ApiError::Unavailable,
            ApiError::FlushStalled(std::time::Duration::ZERO),
            ApiError::Internal,
        ];
        // A new variant fails to compile here until it is in the list above.
        for e in &all {
            match e {
                ApiError::InvalidJson(_)
                | ApiError::Validation(_)
                | ApiError::PayloadTooLarge
                | ApiError::BodyTimeout
                | ApiError::Domain(
                    DomainError::WidgetExists(_)
                    | DomainError::NotFound(_)
                    | DomainError::PortNotAvailable { .. }
                    | DomainError::SelfAssociation(_),
                )
                | ApiError::NoRoute(_)
                | ApiError::MethodNotAllowed
                | ApiError::Unauthorized(_)
                | ApiError::NotReady
                | ApiError::Overloaded(_)
                | ApiError::DiskFull
                | ApiError::WalWrite
                | ApiError::WalFailed
                | ApiError::Unavailable
                | ApiError::FlushStalled(_)
                | ApiError::Internal => {}
            }
        }
        all
    }

    /// Whether the client may retry the same request after a pause (the answer carries
    /// `Retry-After`).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NotReady
                | ApiError::Overloaded(_)
                | ApiError::DiskFull
                | ApiError::WalWrite
                | ApiError::Unavailable
        )
    }
}

/// The `code` of an error response, kept in its extensions for the request metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// The error body, as the OpenAPI document describes it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case word, e.g. `widget_not_found`.
    pub code: String,
    /// For people: names the offending field or serial.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        // For the request metrics: which refusal this was, without parsing the body.
        response.extensions_mut().insert(ErrorCode(self.code()));
        if self.retryable() {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if let ApiError::Unauthorized(presented) = self {
            // RFC 6750: a wrong token is `invalid_token`; a missing one gets the bare
            // challenge.
            let challenge = if presented {
                r#"Bearer error="invalid_token""#
            } else {
                "Bearer"
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}
