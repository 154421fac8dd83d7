//! The API's own middleware, as tower layers: [`Track`] counts and times every request,
//! [`Guard`] refuses one that needs a token and lacks an accepted one, and [`NoEmpty`]
//! answers a path with an empty segment as one no route has.
//!
//! Written as services rather than with `axum::middleware::from_fn`, which boxes a clone
//! of the inner service and the handler's future on every request, and the router stacks
//! them (with tower-http's trace and axum's body limit) into one layer, which it boxes once
//! a route rather than once a layer. Together that cut the connection tasks' instructions
//! by 18% (BENCHMARKS.md, "The request path in instructions").

use super::auth::Auth;
use crate::error::{ApiError, ErrorCode};
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
        let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
        // `not_found` is a path no route has, even where the router matched a template
        // (an empty segment: see `NoEmpty`).
        let route = match this.route {
            Some(route) if code != Some(ApiError::NoRoute(String::new()).code()) => route.as_str(),
            _ => "unmatched",
        };
        let status = response.status();
        metrics::record_request(this.method, route, status.as_u16(), this.started.elapsed());
        if status.is_server_error() {
            if let Some(code) = code {
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

/// Wraps a service in [`NoEmpty`].
#[derive(Debug, Clone, Default)]
pub struct NoEmptyLayer;

impl<S> Layer<S> for NoEmptyLayer {
    type Service = NoEmpty<S>;

    fn layer(&self, inner: S) -> NoEmpty<S> {
        NoEmpty { inner }
    }
}

/// A path with an empty segment (`/widgets//associations/P`, `/widgets/123/`) answers
/// `404 not_found`, as a path no route has, before the route sees it: the router matches
/// a parameter to an empty segment, and the serial or port type it gave was answered
/// `422`, or the route's `405`. docs/API.md (Routing) makes an empty serial or port type
/// a path no route has.
#[derive(Debug, Clone)]
pub struct NoEmpty<S> {
    inner: S,
}

impl<S> Service<Request> for NoEmpty<S>
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
        let path = req.uri().path();
        if has_empty_segment(path) {
            let e = ApiError::NoRoute(format!("{} {path}", req.method()));
            return Either::Left(future::ready(Ok(e.into_response())));
        }
        Either::Right(self.inner.call(req))
    }
}

/// Whether `path` has an empty segment: `//` in it, or a `/` at its end.
fn has_empty_segment(path: &str) -> bool {
    path.starts_with('/') && path[1..].split('/').any(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::has_empty_segment;

    #[test]
    fn empty_segments_are_found_wherever_they_are() {
        for path in [
            "/",
            "//",
            "/widgets/",
            "/widgets//associations/P",
            "//widgets",
        ] {
            assert!(has_empty_segment(path), "{path}");
        }
        for path in ["/widgets", "/widgets/123/associations/P", "/healthz", "*"] {
            assert!(!has_empty_segment(path), "{path}");
        }
    }
}
