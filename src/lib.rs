//! # widgets
//!
//! An HTTP service that keeps widgets and the associations between their ports in memory,
//! makes every write durable in a local write-ahead log before it answers, and writes
//! behind to a durable store. See `README.md` for the design and its promises.
//!
//! # Layout
//! - [`config`]: every setting, by flag or environment variable, with its default.
//! - [`data_dir`]: the lock that makes a data directory one process's alone.
//! - [`app`]: picks the store and engine, serves, runs the flusher, graceful shutdown.
//! - [`backoff`]: the wait before a retry, growing with each failure.
//! - [`api`]: the HTTP routes, one file per resource, plus health, readiness, metrics, bearer
//!   auth, and the OpenAPI document built from the checks.
//! - [`error`]: `ApiError`, the one HTTP error type and its JSON body.
//! - [`domain`]: serials, names, ports and their JSON schemas, widgets and their one
//!   validator, changes and their marks, and the association rules as pure functions.
//! - [`engine`]: the hot state behind one interface: `memory` (the papaya map, the dirty
//!   set, the sequencer thread, recovery from the store and the WAL) and, with the `redis`
//!   feature, `redis` (scripts, optimistic writes, the one-time load from PostgreSQL, the
//!   repair of a PostgreSQL gone back in time).
//! - [`wal`]: the write-ahead log: format and framing, writer with group commit, recovery,
//!   file-system seam.
//! - [`store`]: the durable-store trait; the embedded sled store and PostgreSQL.
//! - [`flush`]: write-behind: the loop with its retries and the one flusher, driving each
//!   engine's side of a flush.
//! - [`metrics`]: the Prometheus recorder and the state gauges.
//! - [`logging`]: the log subscriber: `RUST_LOG`, text or JSON lines on stderr.
//! - [`tls`]: TLS to PostgreSQL and Redis: the crypto provider, and the start-up checks
//!   that tell a TLS setting that cannot work from a server that is down.
//! - [`serve`]: the HTTP server: connection cap with idle eviction, timeouts, header
//!   limit, graceful drain with a deadline.
//! - [`seed`]: `widgets bench-seed`, filling an empty store with paired widgets to measure at scale.

pub mod api;
pub mod app;
pub mod backoff;
pub mod config;
pub mod data_dir;
pub mod domain;
pub mod engine;
pub mod error;
pub mod flush;
pub mod logging;
pub mod metrics;
pub mod seed;
pub mod serve;
pub mod store;
pub mod tls;
pub mod wal;
