//! Reading the server's `/metrics` (Prometheus text) before and after the load phase, and
//! turning the two scrapes into what the server did meanwhile: fsyncs, WAL records and
//! their ratio, plus the state gauges at the end (flush lag, widgets, resident memory).

use super::report::ServerStats;
use widgets_testkit::metrics::sample_sum;

/// The numbers the bench needs from one scrape. A counter the server has not touched yet
/// is absent from the text and reads as 0; a missing gauge stays `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub fsyncs: f64,
    pub wal_records: f64,
    pub flush_lag_secs: Option<f64>,
    pub widgets_in_memory: Option<f64>,
    pub rss_bytes: Option<f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        Scrape {
            fsyncs: sample_sum(text, "widgets_wal_fsyncs_total").unwrap_or(0.0),
            wal_records: sample_sum(text, "widgets_wal_records_total").unwrap_or(0.0),
            flush_lag_secs: sample_sum(text, "widgets_flush_lag_seconds"),
            widgets_in_memory: sample_sum(text, "widgets_in_memory"),
            rss_bytes: sample_sum(text, "process_resident_memory_bytes"),
        }
    }
}

/// What happened between `before` and `after`; the gauges are `after`'s.
pub fn server_stats(before: &Scrape, after: &Scrape) -> ServerStats {
    // Counters only grow within one process; a restart in between would make them drop,
    // and a negative count would be nonsense.
    let fsyncs = (after.fsyncs - before.fsyncs).max(0.0) as u64;
    let wal_records = (after.wal_records - before.wal_records).max(0.0) as u64;
    ServerStats {
        fsyncs,
        wal_records,
        requests_per_fsync: (fsyncs > 0).then(|| wal_records as f64 / fsyncs as f64),
        flush_lag_secs: after.flush_lag_secs,
        widgets_in_memory: after.widgets_in_memory.map(|n| n as u64),
        rss_bytes: after.rss_bytes.map(|n| n as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use widgets_testkit::metrics::examples::{AFTER, BEFORE};

    #[test]
    fn requests_per_fsync_from_two_scrapes() {
        let stats = server_stats(&Scrape::parse(BEFORE), &Scrape::parse(AFTER));
        assert_eq!(
            stats,
            ServerStats {
                fsyncs: 50,
                wal_records: 1000,
                requests_per_fsync: Some(20.0),
                flush_lag_secs: Some(0.25),
                widgets_in_memory: Some(200),
                rss_bytes: Some(52_428_800),
            }
        );
    }

    #[test]
    fn no_fsyncs_means_no_ratio() {
        // A fresh server before its first write, and `--fsync never`.
        let empty = Scrape::parse("");
        assert_eq!((empty.fsyncs, empty.rss_bytes), (0.0, None));
        let after = Scrape::parse("widgets_wal_records_total 10\n");
        let stats = server_stats(&empty, &after);
        assert_eq!((stats.fsyncs, stats.wal_records), (0, 10));
        assert_eq!(stats.requests_per_fsync, None);
    }
}
