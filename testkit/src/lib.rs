//! # widgets-testkit
//!
//! What the service's tests and its load generator (`widgets-bench`) both need to drive
//! the real service from outside, in one place instead of a copy on each side. Nothing
//! here links the service itself: it talks to the `widgets` binary, its log, its HTTP
//! port and PostgreSQL. Not published; a dev-dependency of the server, a dependency of
//! the bench.
//!
//! # Layout
//! - [`server`]: the `widgets` binary as a child process on a free port: its address from
//!   its log, readiness, graceful stop, `kill -9`; and, for a child a test starts by hand,
//!   its environment and pipes, and its output once it exits within a deadline.
//! - [`pg`]: throwaway PostgreSQL databases (`ScratchDb`), and `TestDb`, one per test.
//! - [`metrics`]: a metric's value out of the `/metrics` text.
//! - [`disk`]: a full disk, for real (a small tmpfs; needs root).

pub mod disk;
pub mod metrics;
pub mod pg;
pub mod server;
