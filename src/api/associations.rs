//! Associations: plug two widgets together on a port, or free a port.

use super::extract::{JsonBody, PathParams};
use super::widgets::path_serial;
use super::AppState;
use crate::domain::{self, Associated, Free, PortType, Serial, ValidationError};
use crate::error::{ApiError, ErrorBody};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

/// Body of `PUT /widgets/associations`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"port_type": "P", "widget_serial_num": "123", "peer_widget_serial_num": "321"}))]
pub struct Associate {
    /// `P`, `R` or `Q`.
    pub port_type: String,
    pub widget_serial_num: String,
    pub peer_widget_serial_num: String,
}

impl Associate {
    fn validate(&self) -> Result<domain::Associate, ValidationError> {
        Ok(domain::Associate {
            port: PortType::parse("port_type", &self.port_type)?,
            serial: Serial::parse("widget_serial_num", &self.widget_serial_num)?,
            peer: Serial::parse("peer_widget_serial_num", &self.peer_widget_serial_num)?,
        })
    }
}

/// Both widgets as they are after the association.
/// Associate two widgets on a port. Either side's previous peer on that port is freed in
/// the same atomic step; repeating the call changes nothing.
#[utoipa::path(put, path = "/widgets/associations", tag = "associations", request_body = Associate,
    responses(
        (status = 200, description = "Both widgets as they are now", body = Associated),
        (status = 400, description = "Body is not JSON (`invalid_json`)", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time (`request_timeout`)", body = ErrorBody),
        (status = 404, description = "Either widget is missing (`widget_not_found`, naming it)", body = ErrorBody),
        (status = 413, description = "Body too large (`payload_too_large`)", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `port_not_available` or `self_association`", body = ErrorBody),
        (status = 503, description = "Overloaded or not ready; see `Retry-After`", body = ErrorBody),
    ))]
pub async fn associate(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Associate>,
) -> Result<Json<Associated>, ApiError> {
    let associate = body.validate()?;
    Ok(Json(state.engine()?.execute(associate).await?))
}

/// Free a port; the peer's port is freed too. Freeing a free port is a `204`.
#[utoipa::path(delete, path = "/widgets/{serial_number}/associations/{port_type}", tag = "associations",
    params(
        ("serial_number" = String, Path, description = "The widget's serial number"),
        ("port_type" = String, Path, description = "`P`, `R` or `Q`"),
    ),
    responses(
        (status = 204, description = "The port is free"),
        (status = 404, description = "`widget_not_found`", body = ErrorBody),
        (status = 422, description = "`port_not_available`, or a path part breaks its rule (`validation_failed`)", body = ErrorBody),
        (status = 503, description = "Overloaded or not ready; see `Retry-After`", body = ErrorBody),
    ))]
pub async fn free(
    State(state): State<AppState>,
    PathParams((serial, port)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let serial = path_serial(&serial)?;
    let port = PortType::parse("port_type", &port)?;
    state.engine()?.execute(Free { serial, port }).await?;
    Ok(StatusCode::NO_CONTENT)
}
