//! The HTTP contract of `docs/API.md`, row by row: status codes, error codes, the
//! exact JSON shape (canonical port order included) and headers. Every test starts its own
//! app, so they run in parallel.
//!
//! One suite, every backend: the cases in `api/cases.rs` run against the single-node
//! engine (`memory::`), again with bearer auth on for every request class and the token
//! sent (`memory_auth::`), and, with the `redis` feature, against Redis mode (`redis::`).

mod common;

use common::{Backend, TestApp};

macro_rules! contract_suite {
    ($module:ident, $backend:expr, $auth:expr) => {
        mod $module {
            use super::{common, Backend, TestApp};

            async fn spawn_app() -> TestApp {
                common::spawn_backend_auth($backend, &[], $auth).await
            }

            async fn spawn_app_with(args: &[&str]) -> TestApp {
                common::spawn_backend_auth($backend, args, $auth).await
            }

            include!("api/cases.rs");
        }
    };
}

contract_suite!(memory, Backend::Memory, false);
contract_suite!(memory_auth, Backend::Memory, true);
#[cfg(feature = "redis")]
contract_suite!(redis, Backend::Redis, false);

/// The sequencer times each WAL fsync and each group (single node: Redis mode has no WAL).
#[tokio::test]
async fn wal_fsyncs_and_groups_are_timed() {
    let app = common::spawn_backend_auth(Backend::Memory, &["--fsync", "always"], false).await;
    let status = app.create("timed", &["P"]).await.status();
    assert_eq!(status, reqwest::StatusCode::CREATED);
    let text = app.get("/metrics").await.text().await.unwrap();
    for histogram in [
        "widgets_wal_fsync_seconds_count",
        "widgets_wal_group_seconds_count",
    ] {
        assert!(
            common::metric(&text, histogram).is_some_and(|n| n >= 1.0),
            "no {histogram} of at least 1 in:\n{text}"
        );
    }
    app.stop().await;
}
