//! Operational endpoints: liveness, readiness, Prometheus metrics (the OpenAPI document is
//! `super::doc`'s).

use super::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

/// Liveness: `200` while the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Up")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: `200` once recovery has finished and writes can be made durable; `503`
/// while recovering (`not_ready`), once writes can no longer be made durable
/// (`wal_failed`), while a change has waited for the durable store longer than
/// `--ready-max-flush-lag` (`flush_stalled`), or in Redis mode while Redis cannot be
/// reached, lost its data or is behind PostgreSQL and is being loaded again
/// (`unavailable`).
// `super::doc` adds the `503` answer, from `ApiError`.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Takes traffic"),
))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    if engine.failure().is_some() {
        return Err(ApiError::WalFailed);
    }
    engine.serving().await?;
    if let Some(lag) = engine
        .flush_lag()
        .filter(|&lag| lag > state.ready_max_flush_lag())
    {
        return Err(ApiError::FlushStalled(lag));
    }
    Ok(Json(json!({"status": "ready"})))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let gauges = match state.engine() {
        Ok(engine) => engine.gauges().await,
        Err(_) => Vec::new(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&gauges),
    )
}
