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
