//! Associations: plug two widgets together on a port, or free a port.

use super::extract::{JsonBody, PathParams};
use super::widgets::path_serial;
use super::AppState;
use crate::domain::schema::{self, PortTypeParam, SerialParam};
use crate::domain::{self, Associated, Free, PortType, Serial, ValidationError};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

/// Body of `PUT /widgets/associations`.
// The fields' schemas are the checks' own (`crate::domain::schema`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"port_type": "P", "widget_serial_num": "123", "peer_widget_serial_num": "321"}))]
pub struct Associate {
    #[schema(schema_with = schema::port_type)]
    pub port_type: String,
    #[schema(schema_with = schema::named_serial)]
    pub widget_serial_num: String,
    // Another widget than `widget_serial_num` (the same one is `422 self_association`),
    // which a JSON schema cannot say.
    #[schema(schema_with = schema::named_serial)]
    pub peer_widget_serial_num: String,
}

impl Associate {
    /// The checked association, or the field that is wrong (`422 validation_failed`).
    pub fn validate(&self) -> Result<domain::Associate, ValidationError> {
        Ok(domain::Associate {
            port: PortType::parse("port_type", &self.port_type)?,
            serial: Serial::parse_named("widget_serial_num", &self.widget_serial_num)?,
            peer: Serial::parse_named("peer_widget_serial_num", &self.peer_widget_serial_num)?,
        })
    }
}

/// Associate two widgets on a port. Either side's previous peer on that port is freed in
/// the same atomic step; repeating the call changes nothing.
#[utoipa::path(put, path = "/widgets/associations", tag = "associations", request_body = Associate,
    responses((status = 200, description = "Both widgets as they are now", body = Associated)))]
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
        ("serial_number" = inline(SerialParam), Path, description = "The widget's serial number"),
        ("port_type" = inline(PortTypeParam), Path, description = "The port to free"),
    ),
    responses((status = 204, description = "The port is free")))]
pub async fn free(
    State(state): State<AppState>,
    PathParams((serial, port)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let serial = path_serial(&serial)?;
    let port = PortType::parse("port_type", &port)?;
    state.engine()?.execute(Free { serial, port }).await?;
    Ok(StatusCode::NO_CONTENT)
}
