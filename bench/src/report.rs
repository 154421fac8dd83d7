//! What a bench run measured: the latency histogram wrapper (HDR, microseconds), the tally
//! of answers by status, the CPU each side spent per request, and the [`Report`] printed as
//! a table or serialised with `--json`.

use super::cpu::{self, Used};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Highest latency the histogram tells apart: anything slower is recorded as this much.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant digits kept: values are exact to within 0.1%.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Latencies in microseconds.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(
            Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
        )
    }
}

impl Latency {
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // The histogram's lowest value is 1: a sub-microsecond answer counts as 1 µs.
        self.0.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always add");
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Percentiles of what was recorded; all zero when nothing was.
    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50: self.0.value_at_quantile(0.5),
            p90: self.0.value_at_quantile(0.9),
            p99: self.0.value_at_quantile(0.99),
            p999: self.0.value_at_quantile(0.999),
            max: self.0.max(),
            mean: self.0.mean(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// Answers counted by kind: 2xx, other statuses, and requests that got no answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub ok: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// No answer: connection refused or reset, timeout, or (for the baseline) a database
    /// error.
    pub failed: u64,
}

impl Tally {
    pub fn count_status(&mut self, status: u16) {
        if (200..300).contains(&status) {
            self.ok += 1;
        } else {
            *self.by_status.entry(status).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed + self.by_status.values().sum::<u64>()
    }

    pub fn errors(&self) -> u64 {
        self.total() - self.ok
    }
}

/// One phase of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseStats {
    /// Requests answered or failed (every one that was sent).
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    pub secs: f64,
    /// `requests / secs`.
    pub throughput: f64,
    pub latency_us: LatencySummary,
    /// Non-2xx answers by status code.
    pub errors: BTreeMap<String, u64>,
    /// Requests that got no answer (or, for the baseline, failed in the database).
    pub transport_errors: u64,
    /// Only when the phase ran at a fixed offered rate.
    pub open_loop: Option<OpenLoopStats>,
    /// CPU spent during the phase, by the server and by this client.
    pub cpu: CpuStats,
    /// The load phase, second by second (by each request's intended send time in the open
    /// loop): when its slow requests came, to tell a periodic stall (a flush every
    /// interval) from a random one. Empty for the other phases.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Second>,
}

impl PhaseStats {
    pub fn new(
        latency: &Latency,
        tally: &Tally,
        elapsed: Duration,
        open_loop: Option<OpenLoopStats>,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        let requests = tally.total();
        PhaseStats {
            requests,
            ok: tally.ok,
            secs,
            throughput: if secs > 0.0 {
                requests as f64 / secs
            } else {
                0.0
            },
            latency_us: latency.summary(),
            errors: tally
                .by_status
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
            transport_errors: tally.failed,
            open_loop,
            cpu: CpuStats::default(),
            timeline: Vec::new(),
        }
    }

    /// With the CPU `used` during the phase, per request sent.
    pub fn with_cpu(mut self, used: Used) -> Self {
        self.cpu = CpuStats::new(used, self.requests);
        self
    }

    pub fn with_timeline(mut self, timeline: &Timeline) -> Self {
        self.timeline = timeline.0.clone();
        self
    }

    /// With the share of each second the hypervisor took ([`cpu::StealSampler`], sampled
    /// from the phase's start), in the timeline's seconds.
    pub fn with_steal(mut self, shares: &[Option<f64>]) -> Self {
        for (second, share) in self.timeline.iter_mut().zip(shares) {
            second.steal_percent = share.map(|s| s * 100.0);
        }
        self
    }
}

/// A request slower than this counts in [`Second::over_10ms`].
const SLOW: Duration = Duration::from_millis(10);

/// One second of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Second {
    /// Requests whose (intended) send time fell in this second.
    pub requests: u64,
    /// Of them, those that took over 10 ms.
    pub over_10ms: u64,
    /// The slowest of them, in microseconds.
    pub max_us: u64,
    /// Percent of the machine's CPU time the hypervisor took in this second (see
    /// [`CpuStats::steal_percent`]); `None` where it was not sampled.
    pub steal_percent: Option<f64>,
}

/// A phase's requests by the second they were (meant to be) sent in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline(pub Vec<Second>);

impl Timeline {
    /// A request sent `at` into the phase took `latency`.
    pub fn record(&mut self, at: Duration, latency: Duration) {
        let second = at.as_secs() as usize;
        if self.0.len() <= second {
            self.0.resize(second + 1, Second::default());
        }
        let s = &mut self.0[second];
        s.requests += 1;
        s.over_10ms += u64::from(latency > SLOW);
        s.max_us = s
            .max_us
            .max(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Timeline) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), Second::default());
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.requests += theirs.requests;
            mine.over_10ms += theirs.over_10ms;
            mine.max_us = mine.max_us.max(theirs.max_us);
        }
    }
}

/// CPU time (user + system, every thread) during a phase, in all and per request, on each
/// side of the connection. A side the bench could not read is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuStats {
    /// Seconds of CPU the server process used: the service, or the echo reference in the
    /// echo phase. `None` for a service the bench did not start (`--url`) and for the
    /// PostgreSQL baseline (the database server is not the bench's child).
    pub server_secs: Option<f64>,
    pub server_us_per_request: Option<f64>,
    /// Seconds of CPU this client (the whole `widgets-bench` process) used.
    pub client_secs: Option<f64>,
    pub client_us_per_request: Option<f64>,
    /// The server's CPU per request by thread name (tokio's workers are
    /// `tokio-rt-worker`; the service names its own threads `widgets-...`, cut to the
    /// kernel's 15 bytes): where a request's cost went. Threads alive at the phase's end
    /// only, so the parts may add up to a little less than the whole.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub server_threads_us_per_request: BTreeMap<String, f64>,
    /// Percent of the machine's CPU time the hypervisor gave other guests during the phase
    /// (`steal` in `/proc/stat`): on a shared host, the phase's tail is partly the host's.
    pub steal_percent: Option<f64>,
}

impl CpuStats {
    pub fn new(used: Used, requests: u64) -> Self {
        let per_request = |cpu| cpu::micros_per_request(cpu, requests);
        CpuStats {
            server_secs: used.server.map(|d| d.as_secs_f64()),
            server_us_per_request: used.server.and_then(per_request),
            client_secs: used.client.map(|d| d.as_secs_f64()),
            client_us_per_request: used.client.and_then(per_request),
            server_threads_us_per_request: (used.server_threads.iter())
                .filter_map(|(name, &cpu)| Some((name.clone(), per_request(cpu)?)))
                .collect(),
            steal_percent: used.steal.map(|share| share * 100.0),
        }
    }
}

/// The service's CPU per request of `load` over the echo reference's per request of
/// `echo`: how many bare JSON round trips one request of the mix costs the server. `None`
/// unless both were measured and the echo's is above zero.
pub fn server_cpu_vs_echo(load: &PhaseStats, echo: &PhaseStats) -> Option<f64> {
    let load = load.cpu.server_us_per_request?;
    let echo = echo.cpu.server_us_per_request.filter(|&us| us > 0.0)?;
    Some(load / echo)
}

/// How well a fixed-rate phase kept to its schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OpenLoopStats {
    /// Requests per second offered.
    pub rate: f64,
    /// Requests the schedule held for the phase.
    pub scheduled: u64,
    /// Sent later than their intended time because every connection was busy (their
    /// latency counts from the intended time, so the wait is in the percentiles).
    pub late: u64,
    /// Never sent: the phase ended before a connection was free for them.
    pub missed: u64,
}

/// The server's side of the load phase, from `/metrics` before and after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerStats {
    pub fsyncs: u64,
    pub wal_records: u64,
    /// WAL records per fsync: how many writes one fsync acknowledged. `None` without fsyncs
    /// (`--fsync never`).
    pub requests_per_fsync: Option<f64>,
    /// Age of the oldest change not yet in the durable store, at the end of the phase.
    pub flush_lag_secs: Option<f64>,
    pub widgets_in_memory: Option<u64>,
    /// Resident memory of the server process at the end of the phase.
    pub rss_bytes: Option<u64>,
}

/// The same association updates written straight to PostgreSQL, one transaction each.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineStats {
    #[serde(flatten)]
    pub phase: PhaseStats,
    /// Transactions started again because a peer changed under them or PostgreSQL chose
    /// them as a deadlock victim (not counted as requests).
    pub retries: u64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The service's base URL.
    pub target: String,
    /// `embedded` or `postgres` for a service the bench started; `external` with `--url`.
    pub store: String,
    /// The started service's `--fsync`; `None` with `--url`.
    pub fsync: Option<String>,
    pub widgets: u64,
    pub concurrency: usize,
    pub duration_secs: f64,
    /// Offered rate; `None` at full speed (closed loop).
    pub rate: Option<f64>,
    pub mix: String,
    pub create: PhaseStats,
    /// `GET /healthz` at full speed: the HTTP ceiling of this client and machine.
    pub ceiling: Option<PhaseStats>,
    /// The load's association PUTs, at the load's pace, answered by a bare axum JSON echo
    /// in a process of its own: what parsing the request and answering it cost, without
    /// the service's work.
    pub echo: Option<PhaseStats>,
    /// The mix: the numbers the run is for.
    pub load: PhaseStats,
    /// [`server_cpu_vs_echo`] of the load and the echo, when both ran and were measured.
    pub server_cpu_vs_echo: Option<f64>,
    pub server: ServerStats,
    pub baseline: Option<BaselineStats>,
    /// Why the baseline did not run, when a database URL asked for it.
    pub baseline_error: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fsync = self
            .fsync
            .as_deref()
            .map_or(String::new(), |m| format!(", fsync {m}"));
        writeln!(
            f,
            "widgets bench: {} ({} store{fsync})",
            self.target, self.store
        )?;
        let pace = self
            .rate
            .map_or("full speed".to_owned(), |r| format!("{r} req/s offered"));
        writeln!(
            f,
            "{} widgets, {} connections, mix {}, {} at {pace}",
            self.widgets,
            self.concurrency,
            self.mix,
            humantime::format_duration(Duration::from_secs_f64(self.duration_secs)),
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<18} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "phase", "requests", "req/s", "p50", "p90", "p99", "p99.9", "max", "errors"
        )?;
        let mut rows = vec![("create", &self.create)];
        if let Some(ceiling) = &self.ceiling {
            rows.push(("ceiling (healthz)", ceiling));
        }
        if let Some(echo) = &self.echo {
            rows.push(("echo (axum JSON)", echo));
        }
        rows.push(("load (mix)", &self.load));
        if let Some(baseline) = &self.baseline {
            rows.push(("postgres baseline", &baseline.phase));
        }
        for (name, p) in &rows {
            let l = &p.latency_us;
            writeln!(
                f,
                "{name:<18} {:>9} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                p.requests,
                p.throughput,
                micros(l.p50),
                micros(l.p90),
                micros(l.p99),
                micros(l.p999),
                micros(l.max),
                p.requests - p.ok,
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<18} {:>12} {:>12} {:>12} {:>12} {:>8}",
            "CPU", "server/req", "client/req", "server cores", "client cores", "steal"
        )?;
        for (name, p) in &rows {
            let c = &p.cpu;
            let cores = |secs: Option<f64>| match secs {
                Some(secs) if p.secs > 0.0 => format!("{:.2}", secs / p.secs),
                _ => "-".to_owned(),
            };
            let steal = c
                .steal_percent
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"));
            writeln!(
                f,
                "{name:<18} {:>12} {:>12} {:>12} {:>12} {steal:>8}",
                cpu_micros(c.server_us_per_request),
                cpu_micros(c.client_us_per_request),
                cores(c.server_secs),
                cores(c.client_secs),
            )?;
        }
        let mut threads: Vec<_> = (self.load.cpu.server_threads_us_per_request.iter())
            .filter(|(_, us)| **us >= 0.05)
            .collect();
        if !threads.is_empty() {
            threads.sort_by(|a, b| b.1.total_cmp(a.1));
            let threads: Vec<String> = (threads.iter())
                .map(|(name, us)| format!("{name} {}", cpu_micros(Some(**us))))
                .collect();
            writeln!(
                f,
                "server CPU per load request by thread: {}",
                threads.join(", ")
            )?;
        }
        if let (Some(ratio), Some(echo)) = (self.server_cpu_vs_echo, &self.echo) {
            writeln!(
                f,
                "server CPU per load request: {ratio:.2}x the echo's ({} against {})",
                cpu_micros(self.load.cpu.server_us_per_request),
                cpu_micros(echo.cpu.server_us_per_request),
            )?;
        }
        writeln!(f)?;
        for (name, p) in &rows {
            if p.requests > p.ok {
                let statuses: Vec<String> =
                    p.errors.iter().map(|(s, n)| format!("{s}: {n}")).collect();
                writeln!(
                    f,
                    "errors, {name}: {} no answer{}{}",
                    p.transport_errors,
                    if statuses.is_empty() { "" } else { "; " },
                    statuses.join(", ")
                )?;
            }
            if let Some(o) = &p.open_loop {
                writeln!(
                    f,
                    "open loop, {name}: {} scheduled at {} req/s, {} sent late, {} missed",
                    o.scheduled, o.rate, o.late, o.missed
                )?;
            }
        }
        let s = &self.server;
        writeln!(
            f,
            "server during load: {} fsyncs, {} WAL records, {} records per fsync",
            s.fsyncs,
            s.wal_records,
            s.requests_per_fsync
                .map_or("-".to_owned(), |r| format!("{r:.1}")),
        )?;
        writeln!(
            f,
            "server after load: flush lag {}, {} widgets in memory, RSS {}",
            s.flush_lag_secs
                .map_or("-".to_owned(), |l| format!("{l:.3}s")),
            s.widgets_in_memory
                .map_or("-".to_owned(), |n| n.to_string()),
            s.rss_bytes.map_or("-".to_owned(), |b| format!(
                "{:.1} MiB",
                b as f64 / f64::from(1 << 20)
            )),
        )?;
        if let Some(b) = &self.baseline {
            writeln!(f, "postgres baseline: {} transactions retried", b.retries)?;
        }
        if let Some(e) = &self.baseline_error {
            writeln!(f, "postgres baseline: did not run: {e}")?;
        }
        Ok(())
    }
}

/// CPU microseconds per request, or `-` when not measured.
fn cpu_micros(us: Option<f64>) -> String {
    us.map_or("-".to_owned(), |us| format!("{us:.1}µs"))
}

/// A latency in the unit that keeps it short.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the histogram's precision (3 significant digits) of `expected`.
    fn close(actual: u64, expected: u64) -> bool {
        actual.abs_diff(expected) <= expected / 1000 + 1
    }

    #[test]
    fn percentiles_of_known_values() {
        let mut latency = Latency::default();
        for us in 1..=10_000 {
            latency.record(Duration::from_micros(us));
        }
        let s = latency.summary();
        for (name, actual, expected) in [
            ("p50", s.p50, 5_000),
            ("p90", s.p90, 9_000),
            ("p99", s.p99, 9_900),
            ("p99.9", s.p999, 9_990),
            ("max", s.max, 10_000),
        ] {
            assert!(
                close(actual, expected),
                "{name} = {actual}, not ~{expected}"
            );
        }
        assert!((s.mean - 5_000.5).abs() < 10.0, "mean {}", s.mean);
    }

    #[test]
    fn a_slow_tail_shows_in_the_high_percentiles_only() {
        let mut latency = Latency::default();
        for _ in 0..990 {
            latency.record(Duration::from_millis(1));
        }
        for _ in 0..10 {
            latency.record(Duration::from_secs(2));
        }
        let s = latency.summary();
        assert!(close(s.p50, 1_000) && close(s.p90, 1_000), "{s:?}");
        assert!(close(s.p999, 2_000_000) && close(s.max, 2_000_000), "{s:?}");
    }

    #[test]
    fn empty_and_out_of_range() {
        let empty = Latency::default();
        assert!(empty.is_empty());
        assert_eq!(empty.summary(), LatencySummary::default());

        let mut latency = Latency::default();
        latency.record(Duration::ZERO);
        latency.record(Duration::from_secs(100_000));
        let s = latency.summary();
        assert_eq!((latency.len(), s.p50), (2, 1));
        assert!(close(s.max, MAX_LATENCY_US), "saturates: {}", s.max);
    }

    #[test]
    fn merged_histograms_and_tallies_add_up() {
        let (mut a, mut b) = (Latency::default(), Latency::default());
        a.record(Duration::from_micros(100));
        b.record(Duration::from_micros(300));
        a.merge(&b);
        assert_eq!((a.len(), a.summary().max), (2, 300));

        let mut t = Tally::default();
        t.count_status(201);
        t.count_status(404);
        let mut u = Tally {
            failed: 1,
            ..Tally::default()
        };
        u.count_status(404);
        u.count_status(503);
        t.merge(&u);
        assert_eq!((t.ok, t.failed, t.total(), t.errors()), (1, 1, 5, 4));
        assert_eq!(t.by_status, BTreeMap::from([(404, 2), (503, 1)]));
        let stats = PhaseStats::new(&a, &t, Duration::from_secs(2), None);
        assert_eq!((stats.requests, stats.throughput), (5, 2.5));
        assert_eq!(stats.errors["404"], 2);
    }

    /// A phase of `requests` 2xx answers in `secs`, with `used` CPU.
    fn phase(requests: u64, secs: u64, used: Used) -> PhaseStats {
        let tally = Tally {
            ok: requests,
            ..Tally::default()
        };
        let mut latency = Latency::default();
        latency.record(Duration::from_micros(500));
        PhaseStats::new(&latency, &tally, Duration::from_secs(secs), None).with_cpu(used)
    }

    #[test]
    fn cpu_per_request_is_cpu_time_over_requests() {
        let used = Used {
            server: Some(Duration::from_millis(3_000)),
            server_threads: BTreeMap::from([
                ("tokio-rt-worker".to_owned(), Duration::from_millis(1_800)),
                ("widgets-sequenc".to_owned(), Duration::from_millis(1_200)),
            ]),
            client: Some(Duration::from_millis(1_500)),
            steal: Some(0.125),
        };
        let cpu = phase(60_000, 2, used).cpu;
        assert_eq!(
            cpu,
            CpuStats {
                server_secs: Some(3.0),
                server_us_per_request: Some(50.0),
                client_secs: Some(1.5),
                client_us_per_request: Some(25.0),
                server_threads_us_per_request: BTreeMap::from([
                    ("tokio-rt-worker".to_owned(), 30.0),
                    ("widgets-sequenc".to_owned(), 20.0),
                ]),
                steal_percent: Some(12.5),
            }
        );
        let json = serde_json::to_value(&cpu).unwrap();
        assert_eq!(
            json["server_threads_us_per_request"]["widgets-sequenc"], 20.0,
            "{json:#}"
        );
        // No server to read, no requests, no /proc/stat: unknown, not zero or infinite.
        let client_only = Used {
            server: None,
            client: Some(Duration::from_secs(1)),
            steal: None,
            ..Used::default()
        };
        let cpu = phase(0, 1, client_only).cpu;
        let json = serde_json::to_value(&cpu).unwrap();
        assert!(
            json.get("server_threads_us_per_request").is_none(),
            "no threads read, none reported: {json:#}"
        );
        assert_eq!((cpu.server_secs, cpu.server_us_per_request), (None, None));
        assert_eq!(cpu.steal_percent, None);
        assert_eq!(
            (cpu.client_secs, cpu.client_us_per_request),
            (Some(1.0), None)
        );
    }

    #[test]
    fn each_second_of_the_timeline_carries_the_steal_sampled_in_it() {
        let mut timeline = Timeline::default();
        for at in [0, 1_500, 2_100] {
            timeline.record(Duration::from_millis(at), Duration::from_millis(20));
        }
        // Two seconds sampled, the second unreadable; the third not sampled at all.
        let load = phase(3, 3, Used::default())
            .with_timeline(&timeline)
            .with_steal(&[Some(0.25), None]);
        let steal: Vec<_> = load.timeline.iter().map(|s| s.steal_percent).collect();
        assert_eq!(steal, [Some(25.0), None, None]);
        let json = serde_json::to_value(&load).unwrap();
        assert_eq!(json["timeline"][0]["steal_percent"], 25.0, "{json:#}");
        assert!(json["timeline"][1]["steal_percent"].is_null(), "{json:#}");
        assert_eq!(json["timeline"][2]["over_10ms"], 1, "{json:#}");
    }

    #[test]
    fn the_load_against_the_echo_is_a_ratio_of_server_cpu_per_request() {
        let cpu = |server_ms: Option<u64>| Used {
            server: server_ms.map(Duration::from_millis),
            client: Some(Duration::from_secs(1)),
            steal: None,
            ..Used::default()
        };
        // 120 µs per load request against 20 µs per echo: six echoes' worth.
        let load = phase(10_000, 1, cpu(Some(1_200)));
        let echo = phase(50_000, 1, cpu(Some(1_000)));
        assert_eq!(server_cpu_vs_echo(&load, &echo), Some(6.0));
        assert_eq!(server_cpu_vs_echo(&phase(10, 1, cpu(None)), &echo), None);
        assert_eq!(server_cpu_vs_echo(&load, &phase(10, 1, cpu(None))), None);
        assert_eq!(server_cpu_vs_echo(&load, &phase(10, 1, cpu(Some(0)))), None);
    }

    #[test]
    fn the_report_shows_cpu_per_request_and_the_echo() {
        let used = |server_ms: u64, client_ms: u64| Used {
            server: Some(Duration::from_millis(server_ms)),
            client: Some(Duration::from_millis(client_ms)),
            steal: Some(0.03),
            ..Used::default()
        };
        let load = Used {
            server_threads: BTreeMap::from([
                ("tokio-rt-worker".to_owned(), Duration::from_millis(480)),
                ("widgets-sequenc".to_owned(), Duration::from_millis(700)),
                ("idle".to_owned(), Duration::ZERO),
            ]),
            ..used(1_200, 900)
        };
        let (load, echo) = (phase(10_000, 2, load), phase(50_000, 2, used(1_000, 2_000)));
        let report = Report {
            target: "http://127.0.0.1:1".into(),
            store: "embedded".into(),
            fsync: Some("always".into()),
            widgets: 100,
            concurrency: 4,
            duration_secs: 2.0,
            rate: None,
            mix: "put=1,free=0,get=0".into(),
            create: phase(100, 1, Used::default()),
            ceiling: None,
            server_cpu_vs_echo: server_cpu_vs_echo(&load, &echo),
            echo: Some(echo),
            load,
            server: ServerStats::default(),
            baseline: None,
            baseline_error: None,
        };
        let table = report.to_string();
        for expected in [
            "echo (axum JSON)",
            "server/req",
            // The load: 120 µs of server and 90 µs of client CPU a request, 0.60 and 0.45
            // cores over its 2 s, 3% of the machine's time stolen.
            "120.0µs       90.0µs         0.60         0.45     3.0%",
            // The echo: 20 µs and 40 µs a request.
            "20.0µs       40.0µs         0.50         1.00     3.0%",
            "server CPU per load request: 6.00x the echo's (120.0µs against 20.0µs)",
            // The costliest thread first, whatever the names' order; one that took
            // nothing is left out.
            "server CPU per load request by thread: widgets-sequenc 70.0µs, tokio-rt-worker 48.0µs\n",
        ] {
            assert!(table.contains(expected), "no {expected:?} in\n{table}");
        }
        // Not measured: a dash, not a zero.
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("create") && l.contains(" -")),
            "{table}"
        );

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["server_cpu_vs_echo"], 6.0, "{json:#}");
        assert_eq!(
            json["echo"]["cpu"]["server_us_per_request"], 20.0,
            "{json:#}"
        );
        assert_eq!(
            json["load"]["cpu"]["client_us_per_request"], 90.0,
            "{json:#}"
        );
        assert_eq!(json["load"]["cpu"]["server_secs"], 1.2, "{json:#}");
        assert_eq!(json["load"]["cpu"]["steal_percent"], 3.0, "{json:#}");
        assert!(json["create"]["cpu"]["server_secs"].is_null(), "{json:#}");
        // The fields the chart reads are still there.
        assert_eq!(json["load"]["throughput"], 5_000.0, "{json:#}");
        assert_eq!(json["load"]["latency_us"]["p99"], 500, "{json:#}");
    }
}
