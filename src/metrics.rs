//! Prometheus metrics. Counters and histograms are recorded where things happen (requests
//! here, WAL fsyncs in the WAL, flushes in the flusher); gauges that describe state (dirty
//! widgets, flush lag, WAL bytes, widgets in memory, resident memory) are read at scrape
//! time.

use axum::http::Method;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (every app in a test process shares it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let latency = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ];
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("widgets_wal_group_records".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                    ],
                )
            })
            .expect("valid histogram buckets")
            .install_recorder()
            .inspect(|_| show_at_zero(&EVENTS))
            .expect("installing the metrics recorder")
    })
}

/// Counters of events that may not happen for a long time, shown at 0 from the start: a
/// series that first appears at 1 has no increase for `rate()` or `increase()` to see, so
/// an alert on the first flush failure would miss it. (Redis mode adds its own on
/// connecting.)
const EVENTS: [&str; 11] = [
    "widgets_flush_failures_total",
    "widgets_flush_rejected_total",
    "widgets_flush_batches_total",
    "widgets_flushed_widgets_total",
    "widgets_store_reopens_total",
    "http_connections_evicted_total",
    "http_connections_write_timeouts_total",
    "http_accept_errors_total",
    "widgets_wal_fsyncs_total",
    "widgets_wal_records_total",
    "widgets_wal_bytes_written_total",
];

/// Registers each of `counters` at 0, so that it is scraped before its first event.
pub fn show_at_zero(counters: &[&'static str]) {
    for &name in counters {
        metrics::counter!(name).increment(0);
    }
}

/// Counts and times one request. Every label comes from a closed set, so no client can
/// grow `/metrics` by sending made-up methods or paths: `route` is a route template or
/// `unmatched`, and the method is one HTTP defines or `other`.
pub fn record_request(method: &Method, route: &str, status: u16, elapsed: Duration) {
    let method = method_label(method);
    REQUESTS.with_borrow_mut(|requests| {
        requests.record(method, route, status, elapsed.as_secs_f64());
    });
}

thread_local! {
    /// Each thread's handles on the request metrics, by their labels.
    static REQUESTS: RefCell<RequestMetrics> = RefCell::default();
}

/// The counter and histogram of each label set a thread has recorded. Looking a metric up
/// by its labels in the recorder builds its key (three label strings) and hashes it, for
/// every request; a thread keeps the handles instead, which count into the same metrics.
/// The labels come from a closed set, so this stays small.
#[derive(Default)]
struct RequestMetrics(HashMap<(&'static str, u16), ByRoute>);

/// A request's counter and histogram, by route.
type ByRoute = HashMap<String, (Counter, Histogram)>;

impl RequestMetrics {
    /// Counts and times one request: one look-up of its handles once this thread has them.
    fn record(&mut self, method: &'static str, route: &str, status: u16, seconds: f64) {
        let routes = self.0.entry((method, status)).or_default();
        if let Some((count, time)) = routes.get(route) {
            count.increment(1);
            time.record(seconds);
            return;
        }
        // Handles taken before the recorder is installed would count into nothing.
        handle();
        let labels = [
            ("method", method.to_owned()),
            ("route", route.to_owned()),
            ("status", status.to_string()),
        ];
        let (count, time) = (
            metrics::counter!("http_requests_total", &labels),
            metrics::histogram!("http_request_duration_seconds", &labels),
        );
        count.increment(1);
        time.record(seconds);
        routes.insert(route.to_owned(), (count, time));
    }
}

/// Counts a `5xx` answer by its error code (`widgets_refused_total{code}`) and logs it,
/// at most once a second per code with how many there were since the last line.
pub fn record_refusal(code: &'static str) {
    metrics::counter!("widgets_refused_total", "code" => code).increment(1);
    if let Some(count) = throttled(code) {
        if code == "internal_error" {
            tracing::error!(
                code,
                count,
                "requests answered 5xx since the last such line"
            );
        } else {
            tracing::warn!(
                code,
                count,
                "requests answered 5xx since the last such line"
            );
        }
    }
}

/// An event of kind `key` that is worth a log line, but not one a request: `Some(events
/// since the last line, this one included)` at most once a second per key, else `None`.
pub fn throttled(key: &'static str) -> Option<u64> {
    static LINES: OnceLock<Mutex<HashMap<&'static str, Throttle>>> = OnceLock::new();
    let mut lines = LINES
        .get_or_init(Default::default)
        .lock()
        .expect("throttle lock");
    lines.entry(key).or_default().hit(Instant::now())
}

/// Lets one log line through per [`Throttle::PERIOD`], carrying how many events it stands
/// for.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// An event at `now`: `Some(events since the last line, this one included)` when a
    /// line should be logged now, `None` when it is only counted.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        match self.last {
            Some(last) if now.duration_since(last) < Self::PERIOD => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// The `method` label of a request: its method if HTTP defines it, else `other`.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ];
    KNOWN
        .iter()
        .find(|m| *m == method)
        .map_or("other", Method::as_str)
}

/// The text exposition, with the state gauges (read by the caller just now) set first.
pub fn render(gauges: &[(&'static str, f64)]) -> String {
    // Install the recorder first: gauges set before it would go nowhere.
    let handle = handle();
    for (name, value) in gauges {
        metrics::gauge!(*name).set(*value);
    }
    // Served by the process itself so `widgets bench --url` can report a remote server's
    // memory, with no access to its /proc.
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    handle.render()
}

/// This process's resident set size: `/proc/self/statm` counts pages. `None` off Linux.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant; it has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_a_second_through_with_the_count() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.hit(start), Some(1), "the first event is logged");
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.hit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            t.hit(start + Duration::from_millis(1000)),
            Some(5),
            "a second later: one line for the five events since the last"
        );
        assert_eq!(t.hit(start + Duration::from_millis(1500)), None);
        assert_eq!(t.hit(start + Duration::from_secs(5)), Some(2));
    }

    /// A thread's kept handles count into the metric its labels name, as a look-up does.
    #[test]
    fn requests_count_into_their_labels_metrics() {
        let route = "/requests-count-into-their-labels";
        let count = |text: &str, status: &str| -> Option<f64> {
            text.lines()
                .find(|l| {
                    l.starts_with("http_requests_total{")
                        && l.contains(route)
                        && l.contains(&format!("status=\"{status}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        for _ in 0..3 {
            record_request(&Method::PUT, route, 200, Duration::from_micros(5));
        }
        let other_thread = std::thread::spawn(move || {
            record_request(&Method::PUT, route, 200, Duration::from_micros(5));
            record_request(&Method::PUT, route, 409, Duration::from_micros(5));
        });
        other_thread.join().unwrap();
        let text = render(&[]);
        assert_eq!(count(&text, "200"), Some(4.0), "{text}");
        assert_eq!(count(&text, "409"), Some(1.0), "{text}");
    }

    #[test]
    fn a_made_up_method_is_labelled_other() {
        assert_eq!(method_label(&Method::PUT), "PUT");
        let junk = Method::from_bytes(b"JUNK123").unwrap();
        assert_eq!(method_label(&junk), "other");
    }

    #[test]
    fn resident_memory_is_reported() {
        let rss = resident_bytes().expect("/proc/self/statm on Linux");
        assert!(rss > 0);
        assert!(render(&[]).contains("process_resident_memory_bytes "));
    }
}
