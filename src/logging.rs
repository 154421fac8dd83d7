//! The process's log subscriber: `RUST_LOG` (tracing's `EnvFilter` syntax, `info` when
//! unset) picks what is logged, [`LogFormat`] how, always on stderr.
//!
//! `json` writes one object per line, tracing-subscriber's shape: `timestamp` (RFC 3339,
//! UTC), `level`, `target`, `fields` (the event's, with its `message`), and for an event
//! inside spans `span` (the innermost: its `name` and fields) and `spans` (every one, outermost
//! first). Each request runs in tower-http's `request` span (`method`, `uri`, `version`),
//! which is at debug level: `RUST_LOG=info,tower_http::trace::make_span=debug` puts it on
//! every line a request logs without logging every request.

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; call once, before anything logs.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(format == LogFormat::Text && std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}
