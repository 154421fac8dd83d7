//! Bearer auth from outside: for every class of request (writes, reads, `/metrics`, the
//! open probes), what a missing, a wrong, a rotated-in and the right token get, with and
//! without `--auth-reads` and `--auth-metrics`; tokens from the environment and from a
//! file, through the real binary. The contract suite (`tests/api.rs`, `memory_auth::`)
//! runs every contract case with auth on besides.

mod common;

use common::{bearer_client, spawn_app_with, TestApp};
use reqwest::{header, Client, Method, StatusCode};
use serde_json::{json, Value};

/// One request of each class, on widgets `a` (ports P, R) and `b` (P), which the app has.
fn requests() -> Vec<(&'static str, Method, String, Option<Value>)> {
    let associate =
        json!({"port_type": "P", "widget_serial_num": "a", "peer_widget_serial_num": "b"});
    vec![
        (
            "write",
            Method::POST,
            "/widgets".into(),
            Some(json!({"name": "n", "serial_number": "c", "ports": ["P"]})),
        ),
        (
            "write",
            Method::PUT,
            "/widgets/associations".into(),
            Some(associate),
        ),
        (
            "write",
            Method::DELETE,
            "/widgets/a/associations/P".into(),
            None,
        ),
        ("write", Method::DELETE, "/widgets/c".into(), None),
        ("read", Method::GET, "/widgets/a".into(), None),
        ("read", Method::HEAD, "/widgets/a".into(), None),
        ("metrics", Method::GET, "/metrics".into(), None),
        ("open", Method::GET, "/healthz".into(), None),
        ("open", Method::GET, "/readyz".into(), None),
        ("open", Method::GET, "/openapi.json".into(), None),
    ]
}

async fn send(
    app: &TestApp,
    client: &Client,
    method: &Method,
    path: &str,
    body: &Option<Value>,
) -> reqwest::Response {
    let mut request = client.request(method.clone(), app.url(path));
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    request.send().await.expect("request")
}

/// An app with widgets `a` and `b`, made with `token` (auth is on in `args`).
async fn app(args: &[&str], token: &str) -> TestApp {
    let app = spawn_app_with(args).await;
    let client = bearer_client(token);
    for (serial, ports) in [("a", json!(["P", "R"])), ("b", json!(["P"]))] {
        let body = json!({"name": serial, "serial_number": serial, "ports": ports});
        let resp = client
            .post(app.url("/widgets"))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    app
}

/// Asserts the answer is `401 unauthorized` with its challenge, and a JSON error body
/// (none for `HEAD`).
async fn assert_unauthorized(resp: reqwest::Response, what: &str, wrong: bool) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    let challenge = resp.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .to_owned();
    if wrong {
        assert_eq!(challenge, r#"Bearer error="invalid_token""#, "{what}");
    } else {
        assert_eq!(challenge, "Bearer", "{what}");
    }
    let method_is_head = what.starts_with("HEAD");
    let text = resp.text().await.unwrap();
    if !method_is_head {
        let body: Value = serde_json::from_str(&text).expect("a JSON body");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
}

/// Every request class with no token, a wrong one, each of `good`; `protected` names the
/// classes that need one.
async fn check_classes(app: &TestApp, good: &[&str], protected: &[&str]) {
    let none = Client::new();
    let wrong = bearer_client("not-the-token");
    let basic = Client::builder()
        .default_headers(
            [(header::AUTHORIZATION, "Basic YTpi".parse().unwrap())]
                .into_iter()
                .collect(),
        )
        .build()
        .unwrap();
    for (class, method, path, body) in requests() {
        let what = format!("{method} {path} ({class})");
        if protected.contains(&class) {
            assert_unauthorized(send(app, &none, &method, &path, &body).await, &what, false).await;
            assert_unauthorized(send(app, &wrong, &method, &path, &body).await, &what, true).await;
            assert_unauthorized(send(app, &basic, &method, &path, &body).await, &what, true).await;
        } else {
            let resp = send(app, &none, &method, &path, &body).await;
            assert!(resp.status().is_success(), "{what}: {}", resp.status());
        }
    }
    // The whole round (create, associate, free, delete, reads) with each accepted token.
    for token in good {
        let client = bearer_client(token);
        for (class, method, path, body) in requests() {
            let resp = send(app, &client, &method, &path, &body).await;
            assert!(
                resp.status().is_success(),
                "{method} {path} ({class}) with {token}: {}",
                resp.status()
            );
        }
    }
}

#[tokio::test]
async fn a_token_protects_writes_only_by_default() {
    let app = app(&["--auth-token", "right"], "right").await;
    check_classes(&app, &["right"], &["write"]).await;
}

#[tokio::test]
async fn auth_reads_and_auth_metrics_protect_those_too() {
    let app = app(
        &["--auth-token", "right", "--auth-reads", "--auth-metrics"],
        "right",
    )
    .await;
    check_classes(&app, &["right"], &["write", "read", "metrics"]).await;
    // Without a token even a route that does not exist says nothing more than 401.
    let resp = Client::new().get(app.url("/nope")).send().await.unwrap();
    assert_unauthorized(resp, "GET /nope", false).await;
}

#[tokio::test]
async fn every_token_of_a_rotation_is_accepted_and_no_other() {
    let app = app(
        &[
            "--auth-token",
            "old,new",
            "--auth-token",
            "newest",
            "--auth-reads",
        ],
        "old",
    )
    .await;
    check_classes(&app, &["old", "new", "newest"], &["write", "read"]).await;
}

#[tokio::test]
async fn a_refused_write_changes_nothing() {
    let app = app(&["--auth-token", "right"], "right").await;
    let before = app.widget("a").await;
    for path in ["/widgets/a", "/widgets/b/associations/P"] {
        let resp = Client::new().delete(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.widget("a").await, before);
    assert!(app.widget("b").await.is_some());
}

#[tokio::test]
async fn bad_auth_settings_refuse_to_start_naming_the_setting() {
    let dir = tempfile::TempDir::new().unwrap();
    for (args, says) in [
        (&["--auth-reads"][..], "--auth-reads needs a token"),
        (
            &["--auth-metrics", "--auth-token="],
            "--auth-metrics needs a token",
        ),
    ] {
        let e =
            common::try_spawn_app_in(dir.path(), args, std::sync::Arc::new(widgets::wal::RealFs))
                .await
                .err()
                .expect("refused");
        assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}");
    }
}

/// The real binary, with its tokens in the environment or a mounted file, and its
/// `/openapi.json` stating what it protects.
#[tokio::test]
async fn tokens_from_the_environment_and_a_file_reach_the_binary() {
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        "# current, then the one being retired\nfrom-file\nretiring\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let server = common::binary::start_with_env(
        &data,
        &["--auth-reads"],
        &[
            ("WIDGETS_AUTH_TOKEN", "from-env"),
            ("WIDGETS_AUTH_TOKEN_FILE", file.to_str().unwrap()),
        ],
    )
    .await;
    let url = format!("{}/widgets/nope", server.base);
    let resp = Client::new().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for token in ["from-env", "from-file", "retiring"] {
        let resp = bearer_client(token).get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{token}");
    }
    let doc: Value = Client::new()
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let read = &doc["paths"]["/widgets/{serial_number}"]["get"];
    assert_eq!(read["security"], json!([{"bearer": []}]));
    assert!(read["responses"]["401"].is_object());
    assert!(doc["paths"]["/metrics"]["get"]["security"].is_null());
    server.stop().await.unwrap();
}
