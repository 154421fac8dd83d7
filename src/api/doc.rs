//! The OpenAPI document `GET /openapi.json` serves: generated from the handlers' `utoipa`
//! annotations (paths, bodies, success answers), the value schemas the checks are built
//! on (`crate::domain::schema`), and, for the error answers, [`ApiError`] itself: each
//! operation lists the errors it can answer ([`errors`]), and their statuses, `code`
//! values and `Retry-After` headers come from `ApiError::status`, `code` and `retryable`,
//! the same functions that make the answers. The auth settings shape it too: with a token
//! set, the protected operations say so (`security`) and list `401 unauthorized`.
//!
//! The document says what the service checks and no more, so that a tester driven by it
//! (CI runs schemathesis against it, `scripts/contract.sh`) finds every rule in it.

use super::associations::{self, Associate};
use super::auth::{Auth, Class};
use super::ops;
use super::widgets::{self, CreateWidget};
use super::AppState;
use crate::domain::schema::NOT_CONST_EXTENSION;
use crate::domain::{Associated, DomainError, PortType, Serial, ValidationError, WidgetView};
use crate::error::{ApiError, ErrorBody, ErrorDetail};
use axum::extract::State;
use axum::http::Method;
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "widgets",
        description = "Widgets and the associations between their ports. The contract in \
            prose, with the order in which each operation checks its answers, is the \
            repository's docs/API.md.\n\n\
            A path no route has answers `404 not_found`. A method a path does not list, \
            `OPTIONS` included, answers `405 method_not_allowed` with `Allow` naming \
            exactly the path's methods (and `HEAD` where `GET` is). `HEAD` is answered \
            wherever `GET` is. The serial `associations` is reserved: \
            `/widgets/associations` is the association route only."
    ),
    paths(
        widgets::create,
        widgets::read,
        widgets::delete,
        associations::associate,
        associations::free,
        ops::healthz,
        ops::readyz,
        ops::metrics,
    ),
    components(schemas(
        CreateWidget,
        Associate,
        Associated,
        WidgetView,
        PortType,
        ErrorBody,
        ErrorDetail
    ))
)]
pub struct ApiDoc;

/// `GET /openapi.json`: the OpenAPI 3 document of this API, for this service's auth
/// settings.
pub async fn openapi(State(state): State<AppState>) -> Json<Value> {
    Json(document(state.auth()))
}

/// The errors an operation can answer, in any mode (single node or Redis), besides
/// `401` (added by [`document`] where a token is needed).
pub fn errors(method: &Method, path: &str) -> Vec<ApiError> {
    let serial = || Serial::parse("serial", "123").expect("a valid serial");
    let validation = || ApiError::Validation(ValidationError::new("field", "rule"));
    let body = || {
        vec![
            ApiError::PayloadTooLarge,
            ApiError::BodyTimeout,
            ApiError::InvalidJson(String::new()),
            validation(),
        ]
    };
    // A write refused for the state of the service rather than for what it asks.
    let unavailable_write = || {
        vec![
            ApiError::NotReady,
            ApiError::Overloaded(""),
            ApiError::DiskFull,
            ApiError::WalWrite,
            ApiError::WalFailed,
            ApiError::Unavailable,
            ApiError::Internal,
        ]
    };
    let not_found = || ApiError::Domain(DomainError::NotFound(serial()));
    // A path parameter that is empty or holds a `/` makes a path no route has.
    let no_route = || ApiError::NoRoute(String::new());
    let port_not_available = || {
        ApiError::Domain(DomainError::PortNotAvailable {
            serial: serial(),
            port: PortType::P,
        })
    };
    match (method.as_str(), path) {
        ("POST", "/widgets") => {
            let mut e = body();
            e.push(ApiError::Domain(DomainError::WidgetExists(serial())));
            e.extend(unavailable_write());
            e
        }
        // `/widgets/associations` is the association route's: there the serial the
        // template would take is answered `405` with `Allow: PUT`.
        ("GET", "/widgets/{serial_number}") => vec![
            no_route(),
            ApiError::MethodNotAllowed,
            validation(),
            not_found(),
            ApiError::NotReady,
            ApiError::Unavailable,
            ApiError::Internal,
        ],
        ("DELETE", "/widgets/{serial_number}") => {
            let mut e = vec![
                no_route(),
                ApiError::MethodNotAllowed,
                validation(),
                not_found(),
            ];
            e.extend(unavailable_write());
            e
        }
        ("PUT", "/widgets/associations") => {
            let mut e = body();
            e.extend([
                ApiError::Domain(DomainError::SelfAssociation(serial())),
                not_found(),
                port_not_available(),
            ]);
            e.extend(unavailable_write());
            e
        }
        ("DELETE", "/widgets/{serial_number}/associations/{port_type}") => {
            let mut e = vec![no_route(), validation(), not_found(), port_not_available()];
            e.extend(unavailable_write());
            e
        }
        ("GET", "/readyz") => vec![
            ApiError::NotReady,
            ApiError::WalFailed,
            ApiError::FlushStalled(std::time::Duration::ZERO),
            ApiError::Unavailable,
        ],
        _ => vec![],
    }
}

/// The document, for a service with these auth settings.
pub fn document(auth: &Auth) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document is JSON");
    let paths = doc["paths"].as_object_mut().expect("paths");
    let mut secured = false;
    for (path, item) in paths.iter_mut() {
        let item = item.as_object_mut().expect("a path item");
        for (method, operation) in item.iter_mut() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let mut errors = errors(&method, path);
            if auth.protects(Class::of(&method, path)) {
                errors.insert(0, ApiError::Unauthorized(false));
                operation["security"] = json!([{"bearer": []}]);
                secured = true;
            }
            let responses = operation["responses"].as_object_mut().expect("responses");
            add_error_responses(responses, &errors);
        }
    }
    if secured {
        doc["components"]["securitySchemes"] = json!({
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>`, one of the tokens set \
                    with --auth-token or --auth-token-file"
            }
        });
    }
    add_links(&mut doc);
    add_method_not_allowed(&mut doc);
    reserve_words(&mut doc);
    doc
}

/// One response per status among `errors`: the `code` values it can carry (an enum in
/// its schema, listed in its description), `Retry-After` where one of them sends it
/// (required when all do), `WWW-Authenticate` on a `401`, `Allow` on a `405`.
fn add_error_responses(responses: &mut Map<String, Value>, errors: &[ApiError]) {
    let mut by_status: BTreeMap<u16, Vec<&ApiError>> = BTreeMap::new();
    for e in errors {
        by_status.entry(e.status().as_u16()).or_default().push(e);
    }
    for (status, errors) in by_status {
        let codes: Vec<&str> = errors.iter().map(|e| e.code()).collect();
        let retrying: Vec<&str> = errors
            .iter()
            .filter(|e| e.retryable())
            .map(|e| e.code())
            .collect();
        let quoted = |codes: &[&str]| {
            codes
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut headers = Map::new();
        if !retrying.is_empty() {
            headers.insert(
                "Retry-After".into(),
                json!({
                    "description": format!("Seconds to wait before sending the same request again; sent with {}", quoted(&retrying)),
                    "required": retrying.len() == codes.len(),
                    "schema": {"type": "integer", "minimum": 1}
                }),
            );
        }
        if status == 401 {
            headers.insert(
                "WWW-Authenticate".into(),
                json!({
                    "description": "`Bearer`, or `Bearer error=\"invalid_token\"` when a token was sent",
                    "required": true,
                    "schema": {"type": "string", "pattern": "^Bearer"}
                }),
            );
        }
        if status == 405 {
            headers.insert("Allow".into(), allow_header());
        }
        let mut response = json!({
            "description": format!("Error codes: {}", quoted(&codes)),
            "content": {"application/json": {"schema": error_schema(&codes)}}
        });
        if !headers.is_empty() {
            response["headers"] = Value::Object(headers);
        }
        responses.insert(status.to_string(), response);
    }
}

/// The error body, with `code` one of `codes`.
fn error_schema(codes: &[&str]) -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": codes},
                "message": {"type": "string"}
            }
        }}
    })
}

/// The links a client (or a stateful tester) follows: from a created widget to reading,
/// freeing and deleting it; from a widget read to associating it with a peer; from an
/// association to freeing it again, reading its peer, deleting the widget. (Associating is linked from a read, not
/// from the create: the body names a second widget, which no answer of a create knows, and
/// a peer that does not exist answers `404`, which a tester would take for the created
/// widget missing.)
fn add_links(doc: &mut Value) {
    let serial = "$response.body#/serial_number";
    let port = "$response.body#/ports/0";
    let widget_links = json!({
        "FreePort": {"operationId": "free", "parameters": {"serial_number": serial, "port_type": port}},
        "DeleteWidget": {"operationId": "delete", "parameters": {"serial_number": serial}},
    });
    let mut created = widget_links.clone();
    created["ReadWidget"] = json!({"operationId": "read", "parameters": {"serial_number": serial}});
    let mut read = widget_links;
    read["AssociateWidget"] = json!({"operationId": "associate", "requestBody": {
        "port_type": port, "widget_serial_num": serial
    }});
    let paths = &mut doc["paths"];
    paths["/widgets"]["post"]["responses"]["201"]["links"] = created;
    paths["/widgets/{serial_number}"]["get"]["responses"]["200"]["links"] = read;
    paths["/widgets/associations"]["put"]["responses"]["200"]["links"] = json!({
        "FreeWidgetPort": {"operationId": "free", "parameters": {
            "serial_number": "$response.body#/widget/serial_number",
            "port_type": "$request.body#/port_type"
        }},
        "ReadPeer": {"operationId": "read", "parameters": {
            "serial_number": "$response.body#/peer/serial_number"
        }},
        "DeleteWidget": {"operationId": "delete", "parameters": {
            "serial_number": "$response.body#/widget/serial_number"
        }},
    });
}

fn allow_header() -> Value {
    json!({
        "description": "Exactly the methods of the path requested, comma-separated, with `HEAD` where `GET` is",
        "required": true,
        "schema": {"type": "string"}
    })
}

/// A `405` for a method a path does not list is no operation's answer, so it is stated
/// once among the components' responses, with its `Allow` header.
fn add_method_not_allowed(doc: &mut Value) {
    let code = ApiError::MethodNotAllowed.code();
    doc["components"]["responses"] = json!({
        "MethodNotAllowed": {
            "description": format!("A method the path does not list, `OPTIONS` included (`{code}`)"),
            "headers": {"Allow": allow_header()},
            "content": {"application/json": {"schema": error_schema(&[code])}}
        }
    });
}

/// Turns the `x-not-const` marks of `crate::domain::schema` into `"not": {"const": ...}`.
fn reserve_words(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if let Some(word) = object.remove(NOT_CONST_EXTENSION) {
                object.insert("not".into(), json!({"const": word}));
            }
            object.values_mut().for_each(reserve_words);
        }
        Value::Array(items) => items.iter_mut().for_each(reserve_words),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(reads: bool, metrics: bool) -> Auth {
        Auth::new(&["t".to_owned()], reads, metrics).unwrap()
    }

    #[test]
    fn error_answers_come_from_api_error() {
        let doc = document(&Auth::default());
        let create = &doc["paths"]["/widgets"]["post"]["responses"];
        let statuses: Vec<&String> = create.as_object().unwrap().keys().collect();
        assert_eq!(
            statuses,
            ["201", "400", "408", "409", "413", "422", "500", "503"]
        );
        let codes = &create["503"]["content"]["application/json"]["schema"]["properties"]["error"]
            ["properties"]["code"]["enum"];
        assert_eq!(
            codes,
            &json!([
                "not_ready",
                "overloaded",
                "disk_full",
                "storage_error",
                "wal_failed",
                "unavailable"
            ])
        );
        // wal_failed has no Retry-After, so the header is not required on a 503.
        assert_eq!(create["503"]["headers"]["Retry-After"]["required"], false);
        assert!(create["422"]["headers"].is_null());
        let put = &doc["paths"]["/widgets/associations"]["put"]["responses"]["422"];
        assert_eq!(
            put["content"]["application/json"]["schema"]["properties"]["error"]["properties"]
                ["code"]["enum"],
            json!([
                "validation_failed",
                "self_association",
                "port_not_available"
            ])
        );
        let ready = &doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"];
        assert!(ready.to_string().contains("flush_stalled"));
    }

    /// docs/API.md's tables, as `(first cell, second cell, last cell)` rows under each
    /// `##`/`###` heading.
    fn api_md_tables() -> Vec<(String, Vec<[String; 3]>)> {
        let mut sections: Vec<(String, Vec<[String; 3]>)> = Vec::new();
        for line in include_str!("../../docs/API.md").lines() {
            if line.starts_with("## ") || line.starts_with("### ") {
                sections.push((line.trim_start_matches('#').trim().to_owned(), vec![]));
            } else if let (Some(rest), Some((_, rows))) =
                (line.strip_prefix('|'), sections.last_mut())
            {
                let cells: Vec<String> = rest
                    .trim_end()
                    .trim_end_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect();
                if cells.len() >= 3 && !cells[0].starts_with("---") {
                    rows.push([
                        cells[0].clone(),
                        cells[1].clone(),
                        cells[cells.len() - 1].clone(),
                    ]);
                }
            }
        }
        sections
    }

    fn unquote(cell: &str) -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn api_md_error_codes_are_api_errors() {
        let sections = api_md_tables();
        let (_, rows) = sections
            .iter()
            .find(|(h, _)| h == "Error codes")
            .expect("the error code table");
        let documented: Vec<(String, u16, bool)> = rows[1..]
            .iter()
            .map(|[code, status, retry]| {
                (
                    unquote(code)[0].clone(),
                    unquote(status)[0].parse().unwrap(),
                    retry != "no",
                )
            })
            .collect();
        let code: Vec<(String, u16, bool)> = ApiError::every_kind()
            .iter()
            .map(|e| (e.code().to_owned(), e.status().as_u16(), e.retryable()))
            .collect();
        assert_eq!(documented, code);
    }

    /// Each endpoint's table in docs/API.md lists the statuses and codes the document
    /// gives its operation (less `500 internal_error`, which any of them can answer and
    /// the error code table states once).
    #[test]
    fn api_md_endpoint_tables_are_the_documents_responses() {
        let doc = document(&Auth::default());
        let mut seen = 0;
        for (heading, rows) in api_md_tables() {
            let Some(op) = heading.strip_prefix('`').and_then(|h| h.split('`').next()) else {
                continue;
            };
            let Some((method, path)) = op.split_once(' ') else {
                continue;
            };
            let responses = &doc["paths"][path][method.to_lowercase()]["responses"];
            assert!(responses.is_object(), "{op}");
            seen += 1;
            let mut in_md: Vec<String> = rows[1..]
                .iter()
                .map(|[status, _, _]| unquote(status)[0].clone())
                .collect();
            in_md.sort();
            in_md.dedup();
            let mut in_doc: Vec<String> = responses
                .as_object()
                .unwrap()
                .keys()
                .filter(|s| *s != "500")
                .cloned()
                .collect();
            in_doc.sort();
            assert_eq!(in_md, in_doc, "{op}");
            for [status, codes, _] in &rows[1..] {
                let status = &unquote(status)[0];
                let listed = &responses[status]["content"]["application/json"]["schema"]
                    ["properties"]["error"]["properties"]["code"]["enum"];
                for code in unquote(codes) {
                    assert!(
                        listed.as_array().unwrap().contains(&json!(code)),
                        "{op}: {status} {code} not in {listed}"
                    );
                }
            }
        }
        assert_eq!(seen, 5);
    }

    #[test]
    fn no_token_no_security() {
        let doc = document(&Auth::default());
        assert!(doc["components"]["securitySchemes"].is_null());
        assert!(!doc.to_string().contains("\"401\""));
        assert!(!doc.to_string().contains("security"));
    }

    #[test]
    fn a_token_secures_writes_and_what_is_asked() {
        let writes_only = document(&auth(false, false));
        let op = |doc: &Value, path: &str, method: &str| doc["paths"][path][method].clone();
        for (path, method) in [
            ("/widgets", "post"),
            ("/widgets/{serial_number}", "delete"),
            ("/widgets/associations", "put"),
            (
                "/widgets/{serial_number}/associations/{port_type}",
                "delete",
            ),
        ] {
            let o = op(&writes_only, path, method);
            assert_eq!(o["security"], json!([{"bearer": []}]), "{method} {path}");
            assert_eq!(
                o["responses"]["401"]["headers"]["WWW-Authenticate"]["required"],
                true
            );
        }
        for (path, method) in [
            ("/widgets/{serial_number}", "get"),
            ("/metrics", "get"),
            ("/healthz", "get"),
            ("/readyz", "get"),
        ] {
            assert!(
                op(&writes_only, path, method)["security"].is_null(),
                "{path}"
            );
        }
        let all = document(&auth(true, true));
        for (path, open) in [
            ("/widgets/{serial_number}", false),
            ("/metrics", false),
            ("/healthz", true),
            ("/readyz", true),
        ] {
            assert_eq!(op(&all, path, "get")["security"].is_null(), open, "{path}");
        }
        assert_eq!(
            all["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn serials_a_client_names_exclude_the_reserved_word() {
        let doc = document(&Auth::default());
        let param = &doc["paths"]["/widgets/{serial_number}"]["get"]["parameters"][0]["schema"];
        assert_eq!(param["not"], json!({"const": "associations"}));
        assert_eq!(param["pattern"], "^[A-Za-z0-9._:-]{1,36}$");
        let body = &doc["components"]["schemas"]["CreateWidget"]["properties"];
        assert_eq!(
            body["serial_number"]["not"],
            json!({"const": "associations"})
        );
        assert_eq!(body["ports"]["uniqueItems"], true);
        let not_found = &doc["paths"]["/widgets/{serial_number}"]["delete"]["responses"]["404"];
        assert_eq!(
            not_found["content"]["application/json"]["schema"]["properties"]["error"]["properties"]
                ["code"]["enum"],
            json!(["not_found", "widget_not_found"])
        );
        assert!(!doc.to_string().contains(NOT_CONST_EXTENSION));
    }
}
