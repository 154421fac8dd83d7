//! Optional bearer-token auth (`--auth-token`, `--auth-token-file`): which requests need a
//! token, and the check that the router's guard (`layers::Guard`) runs before any handler
//! (or body) is touched.
//!
//! Requests fall in four classes by path and method ([`Class::of`]): `/healthz`, `/readyz`
//! and `/openapi.json` are always open (probes and tooling carry no token); `/metrics`
//! needs a token with `--auth-metrics`; `GET` and `HEAD` anywhere else are reads, which
//! need one with `--auth-reads`; every other method is a write, which needs one whenever
//! a token is set. Several tokens may be set at once, so that one can be rotated out
//! while clients move to the next. A token is compared by its SHA-256 digest with each set
//! token's, in constant time (`subtle`), every set token every time: the time an answer
//! takes tells nothing of how much of a token matched, which one, or how long they are.

use crate::error::ApiError;
use axum::http::Method;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What is kept of a token: its SHA-256 digest, so that every comparison is of 32 bytes.
type TokenDigest = [u8; 32];

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

/// The tokens a request may present, and which classes need one. The default has no
/// token: nothing is checked.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<[TokenDigest]>,
    reads: bool,
    metrics: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("reads", &self.reads)
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// What a request is, for auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `/healthz`, `/readyz`, `/openapi.json`: never needs a token.
    Open,
    /// `/metrics`: needs one with `--auth-metrics`.
    Metrics,
    /// `GET` or `HEAD` of any other path: needs one with `--auth-reads`.
    Read,
    /// Any other method on any other path: needs one whenever a token is set.
    Write,
}

/// Paths that never need a token.
pub const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

impl Class {
    pub fn of(method: &Method, path: &str) -> Class {
        if OPEN_PATHS.contains(&path) {
            Class::Open
        } else if path == "/metrics" {
            Class::Metrics
        } else if method == Method::GET || method == Method::HEAD {
            Class::Read
        } else {
            Class::Write
        }
    }
}

/// A token that breaks the bearer token syntax, or a setting that needs a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "an auth token may only hold the characters A-Z a-z 0-9 - . _ ~ + / \
         (then any '='): the token syntax of RFC 6750; found {0}"
    )]
    Syntax(String),
    #[error("{0} needs a token: set --auth-token or --auth-token-file")]
    NoToken(&'static str),
}

/// Checks a token against RFC 6750's `b64token`, so that any token set can be sent in a
/// header. The error names the offending character, never the token.
pub fn check_token(token: &str) -> Result<(), AuthError> {
    let body = token.trim_end_matches('=');
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~+/".contains(c);
    if body.is_empty() {
        return Err(AuthError::Syntax(
            "a token with no characters before '='".into(),
        ));
    }
    match body.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(AuthError::Syntax(format!("{c:?}"))),
        None => Ok(()),
    }
}

impl Auth {
    /// Auth with `tokens` (none: off); `reads` and `metrics` protect those classes too.
    pub fn new(tokens: &[String], reads: bool, metrics: bool) -> Result<Auth, AuthError> {
        for token in tokens {
            check_token(token)?;
        }
        if tokens.is_empty() {
            if reads {
                return Err(AuthError::NoToken("--auth-reads"));
            }
            if metrics {
                return Err(AuthError::NoToken("--auth-metrics"));
            }
        }
        Ok(Auth {
            tokens: tokens.iter().map(|t| digest(t.as_bytes())).collect(),
            reads,
            metrics,
        })
    }

    /// Whether any token is set.
    pub fn is_on(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether requests of `class` need a token.
    pub fn protects(&self, class: Class) -> bool {
        self.is_on()
            && match class {
                Class::Open => false,
                Class::Metrics => self.metrics,
                Class::Read => self.reads,
                Class::Write => true,
            }
    }

    /// Whether `presented` is one of the tokens, compared with every one in constant time.
    fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let mut any = subtle::Choice::from(0);
        for token in self.tokens.iter() {
            any |= token.ct_eq(&presented);
        }
        any.into()
    }

    /// `Ok` if the request may go on: its class needs no token, or it carries one of them.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<(), ApiError> {
        if !self.protects(Class::of(method, path)) {
            return Ok(());
        }
        let token = authorization.and_then(bearer_token);
        match token {
            Some(token) if self.accepts(token) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized(true)),
            // A header in another scheme counts as a wrong credential, not a missing one.
            None => Err(ApiError::Unauthorized(authorization.is_some())),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &[&str], reads: bool, metrics: bool) -> Auth {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        Auth::new(&tokens, reads, metrics).unwrap()
    }

    fn code(result: Result<(), ApiError>) -> Option<(&'static str, String)> {
        result.err().map(|e| (e.code(), e.to_string()))
    }

    #[test]
    fn classes_by_path_and_method() {
        use Class::*;
        for (method, path, class) in [
            (Method::GET, "/healthz", Open),
            (Method::POST, "/readyz", Open),
            (Method::GET, "/openapi.json", Open),
            (Method::GET, "/metrics", Metrics),
            (Method::GET, "/widgets/1", Read),
            (Method::HEAD, "/widgets/1", Read),
            (Method::GET, "/nope", Read),
            (Method::POST, "/widgets", Write),
            (Method::PUT, "/widgets/associations", Write),
            (Method::DELETE, "/widgets/1/associations/P", Write),
            (Method::OPTIONS, "/widgets/1", Write),
            (Method::PATCH, "/nope", Write),
        ] {
            assert_eq!(Class::of(&method, path), class, "{method} {path}");
        }
    }

    #[test]
    fn off_by_default_checks_nothing() {
        let off = Auth::default();
        assert!(!off.is_on());
        assert!(off.check(&Method::POST, "/widgets", None).is_ok());
        assert!(Auth::new(&[], false, false).is_ok());
    }

    #[test]
    fn missing_wrong_and_right_tokens() {
        let a = auth(&["s3cret"], false, false);
        let post = |h: Option<&str>| code(a.check(&Method::POST, "/widgets", h.map(str::as_bytes)));
        let missing = post(None).unwrap();
        assert_eq!(missing.0, "unauthorized");
        assert!(missing.1.contains("Authorization: Bearer"), "{}", missing.1);
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "Bearers3cret",
            "Bearer ",
            "s3cret",
        ] {
            let e = post(Some(wrong)).unwrap();
            assert_eq!(
                e,
                ("unauthorized", "the bearer token is not accepted".into()),
                "{wrong}"
            );
        }
        for right in ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret  "] {
            assert_eq!(post(Some(right)), None, "{right}");
        }
        // Reads and metrics are open unless asked.
        assert!(a.check(&Method::GET, "/widgets/1", None).is_ok());
        assert!(a.check(&Method::GET, "/metrics", None).is_ok());
    }

    #[test]
    fn every_token_of_a_rotation_is_accepted() {
        let a = auth(&["old", "new"], true, true);
        for token in ["old", "new"] {
            let header = format!("Bearer {token}");
            for (method, path) in [
                (Method::PUT, "/widgets/associations"),
                (Method::GET, "/widgets/1"),
                (Method::GET, "/metrics"),
            ] {
                assert!(
                    a.check(&method, path, Some(header.as_bytes())).is_ok(),
                    "{token} {path}"
                );
                assert!(a.check(&method, path, None).is_err(), "{path}");
            }
        }
        assert!(a
            .check(&Method::GET, "/widgets/1", Some(b"Bearer older"))
            .is_err());
        assert!(a.check(&Method::GET, "/healthz", None).is_ok());
    }

    #[test]
    fn bad_tokens_and_settings_are_refused_naming_the_problem() {
        for bad in ["", "=", "a b", "tok\n", "é", "a=b"] {
            let e = Auth::new(&[bad.to_owned()], false, false).unwrap_err();
            assert!(matches!(e, AuthError::Syntax(_)), "{bad:?}: {e}");
        }
        assert!(Auth::new(&["abc+/_-.~==".to_owned()], false, false).is_ok());
        assert_eq!(
            Auth::new(&[], true, false).unwrap_err(),
            AuthError::NoToken("--auth-reads")
        );
        assert_eq!(
            Auth::new(&[], false, true).unwrap_err(),
            AuthError::NoToken("--auth-metrics")
        );
    }
}
