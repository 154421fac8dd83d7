//! The HTTP API: the router, the shared [`AppState`], one file per resource
//! ([`widgets`], [`associations`]), the operational endpoints ([`ops`]), optional bearer
//! auth ([`auth`]), and the OpenAPI document ([`doc`]).
//!
//! Routing: `/widgets/associations` is the association route and only that (`PUT`); the
//! serial `associations` is reserved, so no request for it is a request for a widget. A
//! route answers a method it lacks, `OPTIONS` included, with `405 method_not_allowed` and
//! `Allow` listing exactly its own methods (`HEAD` wherever `GET` is).

pub mod associations;
pub mod auth;
pub mod doc;
mod extract;
pub(crate) use extract::ReadingBody;
mod layers;
pub mod ops;
pub mod widgets;

use crate::engine::Engine;
use crate::error::ApiError;
use auth::Auth;
use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{delete, get, put};
use axum::Router;
use layers::{GuardLayer, NoEmptyLayer, TrackLayer};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;

/// What every handler shares. The engine is set once recovery has finished; until then
/// writes and reads answer `503 not_ready`.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: OnceLock<Engine>,
    body_timeout: Duration,
    max_body_bytes: usize,
    ready_max_flush_lag: Duration,
    auth: Auth,
}

impl AppState {
    /// State whose request bodies must arrive within `body_timeout` and hold at most
    /// `max_body_bytes`, which is not ready while a change has waited for the store longer
    /// than `ready_max_flush_lag`, and whose requests need the tokens `auth` says.
    pub fn new(
        body_timeout: Duration,
        max_body_bytes: usize,
        ready_max_flush_lag: Duration,
        auth: Auth,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine: OnceLock::new(),
                body_timeout,
                max_body_bytes,
                ready_max_flush_lag,
                auth,
            }),
        }
    }

    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    pub fn body_timeout(&self) -> Duration {
        self.inner.body_timeout
    }

    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    pub fn ready_max_flush_lag(&self) -> Duration {
        self.inner.ready_max_flush_lag
    }

    /// Makes the service ready: from now on requests reach `engine`.
    pub fn set_engine(&self, engine: Engine) {
        if self.inner.engine.set(engine).is_err() {
            tracing::error!("the engine was set twice; keeping the first");
        }
    }

    pub fn engine(&self) -> Result<&Engine, ApiError> {
        self.inner.engine.get().ok_or(ApiError::NotReady)
    }
}

/// The whole API, with the body limit and request metrics applied.
pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes();
    Router::new()
        .route("/widgets", axum::routing::post(widgets::create))
        .route(
            "/widgets/{serial_number}",
            get(widgets::read).delete(widgets::delete),
        )
        .route("/widgets/associations", put(associations::associate))
        .route(
            "/widgets/{serial_number}/associations/{port_type}",
            delete(associations::free),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(doc::openapi))
        .fallback(|req: Request| async move {
            ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // One layer, so that the router boxes each route's service once (see `layers`).
        .layer(
            ServiceBuilder::new()
                // 5xx answers are counted and logged once a second per code by `Track`,
                // not once each: one line per refused request would flood the log exactly
                // when the node is overloaded or its disk is full.
                .layer(TraceLayer::new_for_http().on_failure(()))
                .layer(TrackLayer)
                // Before routing answers anything but an open path: without a token, a
                // protected request learns nothing, not even whether its route exists.
                .layer(GuardLayer(state.auth().clone()))
                // An empty serial or port type is a path no route has, not a bad value:
                // before the route answers (the router matches parameters to empty
                // segments), after the token, which comes before any route.
                .layer(NoEmptyLayer)
                .layer(DefaultBodyLimit::max(max_body_bytes)),
        )
        .with_state(state)
}
