//! # widgets
//!
//! An HTTP service that keeps widgets and the associations between their ports in memory,
//! makes every write durable in a local write-ahead log before it answers, and writes
//! behind to a durable store. See `README.md` for the design and its promises.
//!
//! # Layout
//! - [`config`]: every setting, by flag or environment variable, with its default.
//! - [`app`]: start-up (recovery), serving, graceful shutdown.
//! - [`api`]: the HTTP routes, one file per resource, plus health, readiness, metrics, OpenAPI.
//! - [`error`]: `ApiError`, the one HTTP error type and its JSON body.
//! - [`domain`]: serials, names, ports, widgets, and the association rules as pure functions.
//! - [`engine`]: the hot state: the papaya map, the dirty set, the sequencer thread.
//! - [`wal`]: the write-ahead log: format, writer with group commit, recovery, file-system seam.
//! - [`store`]: the durable-store trait and the embedded sled store.
//! - [`flush`]: the flusher that writes dirty widgets behind to the store and trims the WAL.
//! - [`metrics`]: the Prometheus recorder and the state gauges.
//! - [`listener`]: the TCP listener with a connection cap.
//! - [`seed`]: `widgets bench-seed`, filling an empty store with paired widgets to measure at scale.

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod engine;
pub mod error;
pub mod flush;
pub mod listener;
pub mod metrics;
pub mod seed;
pub mod store;
pub mod wal;
