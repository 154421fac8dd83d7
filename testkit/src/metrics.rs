//! Reading a metric out of the service's `/metrics` (Prometheus text format), as the load
//! generator's scrapes and the tests' assertions do.

/// The sum of every sample of metric `name`, whatever its labels; `None` if it has none.
pub fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value` or `name value`, not a longer name sharing the prefix.
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        // A sample may end with a timestamp after the value.
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Two `/metrics` texts as the service writes them, a load phase apart, for the tests of
/// what reads them (here and in the load generator): unlabelled and labelled samples, a
/// histogram, a timestamped sample, and a name that is another's prefix.
pub mod examples {
    pub const BEFORE: &str = "\
# TYPE widgets_wal_fsyncs_total counter
widgets_wal_fsyncs_total 100
# TYPE widgets_wal_records_total counter
widgets_wal_records_total 1000
widgets_wal_records_total_extra 5
widgets_in_memory 200
";

    pub const AFTER: &str = "\
# HELP widgets_wal_fsyncs_total fsyncs
# TYPE widgets_wal_fsyncs_total counter
widgets_wal_fsyncs_total 150
# TYPE widgets_wal_records_total counter
widgets_wal_records_total 2000
# TYPE widgets_wal_group_records histogram
widgets_wal_group_records_bucket{le=\"1\"} 3
widgets_wal_group_records_sum 2000
widgets_wal_group_records_count 50
http_requests_total{method=\"PUT\",route=\"/widgets/associations\",status=\"200\"} 900
http_requests_total{method=\"GET\",route=\"/widgets/{serial_number}\",status=\"200\"} 100 1700000000000
widgets_flush_lag_seconds 0.25
widgets_in_memory 200
process_resident_memory_bytes 52428800
";
}

#[cfg(test)]
mod tests {
    use super::examples::{AFTER, BEFORE};
    use super::*;

    #[test]
    fn labelled_samples_add_up_and_prefixes_do_not_match() {
        assert_eq!(sample_sum(AFTER, "http_requests_total"), Some(1000.0));
        assert_eq!(
            sample_sum(BEFORE, "widgets_wal_records_total"),
            Some(1000.0)
        );
        assert_eq!(sample_sum(AFTER, "widgets_wal_group_records"), None);
        assert_eq!(sample_sum(AFTER, "widgets_dirty"), None);
    }
}
