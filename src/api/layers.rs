//! The API's own middleware, as tower layers: [`Track`] counts and times every request,
//! and [`Guard`] refuses one that needs a token and lacks an accepted one.
//!
//! Written as services rather than with `axum::middleware::from_fn`, which boxes a clone
//! of the inner service and the handler's future on every request, and the router stacks
//! them (with tower-http's trace and axum's body limit) into one layer, which it boxes once
//! a route rather than once a layer. Together that cut the connection tasks' instructions
//! by 18% (BENCHMARKS.md, "The request path in instructions").

use super::auth::Auth;
use crate::error::ErrorCode;
use crate::metrics;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use futures_util::future::{self, Either, Ready};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// Wraps a service in [`Track`].
#[derive(Debug, Clone, Default)]
pub struct TrackLayer;

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// Counts and times each request by route template (not raw path, to bound
/// cardinality), and counts a `5xx` answer by its error code.
#[derive(Debug, Clone)]
pub struct Track<S> {
    inner: S,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = req.method().clone();
        Tracked {
            started: Instant::now(),
            inner: self.inner.call(req),
            route,
            method,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer under way, recorded when it is ready.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        route: Option<MatchedPath>,
        method: Method,
        started: Instant,
    }
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let status = response.status();
        metrics::record_request(this.method, route, status.as_u16(), this.started.elapsed());
        if status.is_server_error() {
            if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
                metrics::record_refusal(code);
            }
        }
        Poll::Ready(Ok(response))
    }
}

/// Wraps a service in [`Guard`], checking tokens against `Auth`.
#[derive(Clone)]
pub struct GuardLayer(pub Auth);

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            auth: self.0.clone(),
            inner,
        }
    }
}

/// A request that needs a token and lacks an accepted one answers `401 unauthorized`
/// with `WWW-Authenticate: Bearer`, before the service looks at it further.
#[derive(Clone)]
pub struct Guard<S> {
    auth: Auth,
    inner: S,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self
            .auth
            .check(req.method(), req.uri().path(), authorization)
        {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(e) => Either::Left(future::ready(Ok(e.into_response()))),
        }
    }
}
