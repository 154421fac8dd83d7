//! `/widgets`: create, read and delete a widget.

use super::extract::{JsonBody, PathParams};
use super::AppState;
use crate::domain::schema::{self, SerialParam};
use crate::domain::{Create, Delete, Name, PortType, Ports, Serial, ValidationError, WidgetView};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

/// Body of `POST /widgets`.
// The fields' schemas are the checks' own (`crate::domain::schema`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "widget1", "serial_number": "123", "ports": ["P", "R"]}))]
pub struct CreateWidget {
    #[schema(schema_with = schema::name)]
    pub name: String,
    #[schema(schema_with = schema::named_serial)]
    pub serial_number: String,
    #[schema(schema_with = schema::ports)]
    pub ports: Vec<String>,
}

impl CreateWidget {
    fn validate(&self) -> Result<Create, ValidationError> {
        let serial = Serial::parse_named("serial_number", &self.serial_number)?;
        let name = Name::parse("name", &self.name)?;
        let list = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| PortType::parse(&format!("ports[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = Ports::from_list("ports", &list)?;
        Ok(Create {
            serial,
            name,
            ports,
        })
    }
}

/// Validates a serial taken from a URL path.
pub(super) fn path_serial(raw: &str) -> Result<Serial, ApiError> {
    Ok(Serial::parse_named("serial_number", raw)?)
}

/// Create a widget.
// The success answer only: `super::doc` adds every error answer, from `ApiError`.
#[utoipa::path(post, path = "/widgets", tag = "widgets", request_body = CreateWidget,
    responses(
        (status = 201, description = "Created", body = WidgetView,
            headers(("Location" = String, description = "/widgets/{serial_number}"))),
    ))]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateWidget>,
) -> Result<Response, ApiError> {
    let create = body.validate()?;
    let view = state.engine()?.execute(create).await?;
    let location = format!("/widgets/{}", view.serial_number);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// Read a widget.
#[utoipa::path(get, path = "/widgets/{serial_number}", tag = "widgets",
    params(("serial_number" = inline(SerialParam), Path, description = "The widget's serial number")),
    responses((status = 200, description = "The widget", body = WidgetView)))]
pub async fn read(
    State(state): State<AppState>,
    PathParams(serial): PathParams<String>,
) -> Result<Json<WidgetView>, ApiError> {
    read_serial(&state, &serial).await
}

async fn read_serial(state: &AppState, serial: &str) -> Result<Json<WidgetView>, ApiError> {
    let serial = path_serial(serial)?;
    let widget = state
        .engine()?
        .get(&serial)
        .await?
        .ok_or_else(|| crate::domain::DomainError::NotFound(serial.clone()))?;
    Ok(Json(widget.view(&serial)))
}

/// Delete a widget, freeing every peer's port in the same atomic step.
#[utoipa::path(delete, path = "/widgets/{serial_number}", tag = "widgets",
    params(("serial_number" = inline(SerialParam), Path, description = "The widget's serial number")),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<AppState>,
    PathParams(serial): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    delete_serial(&state, &serial).await
}

async fn delete_serial(state: &AppState, serial: &str) -> Result<StatusCode, ApiError> {
    let serial = path_serial(serial)?;
    state.engine()?.execute(Delete { serial }).await?;
    Ok(StatusCode::NO_CONTENT)
}
