//! Drives requests from C concurrent workers and records what came back: a fixed number
//! of jobs (creating widgets), as fast as the server answers for a while (closed loop), or
//! at a fixed offered rate (open loop).
//!
//! In the open loop every request has an intended send time on one schedule shared by
//! all workers, and its latency counts from that time, not from when a worker got round
//! to sending it. A server that stalls therefore shows the stall in every request queued
//! behind it (no coordinated omission), and the requests a busy worker sent late are
//! counted. The timer wakes a worker up to about a millisecond after the intended time;
//! that slack is in the latencies too.

use super::report::{Latency, OpenLoopStats, Tally, Timeline};
use indicatif::ProgressBar;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A request sent this long after its intended time counts as late: beyond what timer
/// wake-ups and scheduling add when a worker was free.
const LATE_AFTER: Duration = Duration::from_millis(2);

/// What one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No answer (or, for the baseline, a database error).
    Failed,
}

/// How the workers are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Jobs `0..n`, each exactly once, as fast as the server answers.
    Count(u64),
    /// As fast as the server answers, for this long.
    Closed(Duration),
    /// `rate` requests a second in total for this long.
    Open { rate: f64, duration: Duration },
}

/// What a phase measured.
#[derive(Debug, Clone, Default)]
pub struct PhaseResult {
    pub latency: Latency,
    /// The requests by the second of the phase they were (meant to be) sent in.
    pub timeline: Timeline,
    pub tally: Tally,
    pub elapsed: Duration,
    pub open_loop: Option<OpenLoopStats>,
}

/// When request `k` of an open-loop schedule is meant to be sent, after the start.
pub fn intended_offset(k: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(k as f64 / rate)
}

/// How many requests a schedule of `rate` a second holds in `duration`: those whose
/// intended time falls before the end.
pub fn scheduled_count(rate: f64, duration: Duration) -> u64 {
    (rate * duration.as_secs_f64()).ceil() as u64
}

/// Runs `op` from `concurrency` workers at `pace`. `op` gets the worker's random source
/// and the job number (meaningful with [`Pace::Count`]). `progress`, if given, advances
/// once per finished request.
pub async fn drive<F, Fut>(
    concurrency: usize,
    pace: Pace,
    progress: Option<ProgressBar>,
    op: F,
) -> PhaseResult
where
    F: Fn(&mut fastrand::Rng, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let seed = fastrand::u64(..);
    let workers: Vec<_> = (0..concurrency as u64)
        .map(|w| {
            let (op, next, progress) = (op.clone(), next.clone(), progress.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(w));
                let mut worker = Worker::starting(start);
                match pace {
                    Pace::Count(n) => loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= n {
                            break;
                        }
                        let sent = Instant::now();
                        let outcome = op(&mut rng, k).await;
                        worker.record(sent, outcome, progress.as_ref());
                    },
                    Pace::Closed(duration) => {
                        let end = start + duration;
                        while Instant::now() < end {
                            let sent = Instant::now();
                            let outcome = op(&mut rng, 0).await;
                            worker.record(sent, outcome, progress.as_ref());
                        }
                    }
                    Pace::Open { rate, duration } => {
                        let (end, scheduled) = (start + duration, scheduled_count(rate, duration));
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k >= scheduled {
                                break;
                            }
                            let intended = start + intended_offset(k, rate);
                            let now = Instant::now();
                            if now >= end {
                                break; // k and every later one: missed
                            }
                            if intended > now {
                                tokio::time::sleep_until(intended).await;
                            } else if now - intended > LATE_AFTER {
                                worker.late += 1;
                            }
                            worker.sent += 1;
                            let outcome = op(&mut rng, k).await;
                            worker.record(intended, outcome, progress.as_ref());
                        }
                    }
                }
                worker
            })
        })
        .collect();

    let mut result = PhaseResult::default();
    let (mut sent, mut late) = (0, 0);
    for worker in workers {
        // A worker only ends by returning; a panic in `op` is a bug worth surfacing.
        let worker = worker.await.expect("a bench worker panicked");
        result.latency.merge(&worker.latency);
        result.timeline.merge(&worker.timeline);
        result.tally.merge(&worker.tally);
        sent += worker.sent;
        late += worker.late;
    }
    result.elapsed = start.elapsed();
    if let Pace::Open { rate, duration } = pace {
        let scheduled = scheduled_count(rate, duration);
        result.open_loop = Some(OpenLoopStats {
            rate,
            scheduled,
            late,
            missed: scheduled - sent,
        });
    }
    result
}

/// One worker's own counts, merged at the end so workers share nothing while running.
struct Worker {
    /// When the phase started.
    start: Instant,
    latency: Latency,
    timeline: Timeline,
    tally: Tally,
    sent: u64,
    late: u64,
}

impl Worker {
    fn starting(start: Instant) -> Self {
        Worker {
            start,
            latency: Latency::default(),
            timeline: Timeline::default(),
            tally: Tally::default(),
            sent: 0,
            late: 0,
        }
    }

    fn record(&mut self, since: Instant, outcome: Outcome, progress: Option<&ProgressBar>) {
        let latency = since.elapsed();
        self.latency.record(latency);
        self.timeline
            .record(since.saturating_duration_since(self.start), latency);
        match outcome {
            Outcome::Status(status) => self.tally.count_status(status),
            Outcome::Failed => self.tally.failed += 1,
        }
        if let Some(progress) = progress {
            progress.inc(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn open_loop_schedule() {
        assert_eq!(intended_offset(0, 1000.0), Duration::ZERO);
        assert_eq!(intended_offset(1, 1000.0), Duration::from_millis(1));
        assert_eq!(intended_offset(1500, 1000.0), Duration::from_millis(1500));
        assert_eq!(intended_offset(3, 4.0), Duration::from_millis(750));
        assert_eq!(intended_offset(1, 3.0), Duration::from_secs_f64(1.0 / 3.0));
        // Every intended time before the end, none at or after it.
        assert_eq!(scheduled_count(4.0, Duration::from_millis(2500)), 10);
        assert_eq!(scheduled_count(4.0, Duration::from_secs(2)), 8);
        assert_eq!(scheduled_count(0.5, Duration::from_secs(3)), 2);
        let (rate, d) = (7.0, Duration::from_secs(3));
        let n = scheduled_count(rate, d);
        assert!(intended_offset(n - 1, rate) < d && intended_offset(n, rate) >= d);
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_sends_on_schedule_and_counts_from_the_intended_time() {
        // Each request takes 15 ms, so one worker manages 66/s and two 133/s: at 100/s
        // they keep up until request 5 stalls for 100 ms. The other worker alone then
        // falls behind, and the requests queued meanwhile wait.
        let sent_at = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let log = sent_at.clone();
        let result = drive(
            2,
            Pace::Open {
                rate: 100.0,
                duration: Duration::from_secs(1),
            },
            None,
            move |_, k| {
                log.lock().unwrap().push((k, Instant::now() - start));
                async move {
                    let cost = if k == 5 { 100 } else { 15 };
                    tokio::time::sleep(Duration::from_millis(cost)).await;
                    Outcome::Status(200)
                }
            },
        )
        .await;
        let o = result.open_loop.unwrap();
        assert_eq!((o.scheduled, o.missed), (100, 0));
        assert_eq!(result.tally.ok, 100);
        let ms = Duration::from_millis;
        assert_eq!(
            sent_at.lock().unwrap()[..3],
            [(0, ms(0)), (1, ms(10)), (2, ms(20))],
            "a free worker waits for the intended time"
        );
        assert!(o.late > 0, "{o:?}");
        // Measured from the send time, only the stalled request would be slower than
        // 15 ms; from the intended time, the queue behind it (over a tenth of all) is too.
        let latency = result.latency.summary();
        assert!(latency.p90 >= 20_000, "{latency:?}");
        assert!(latency.max >= 100_000, "{latency:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeline_puts_each_request_in_the_second_it_was_meant_for() {
        // 100/s for 3 s; the requests meant for the middle second take 50 ms, the others
        // 5 ms; ten workers keep up with both, so nothing queues.
        let result = drive(
            10,
            Pace::Open {
                rate: 100.0,
                duration: Duration::from_secs(3),
            },
            None,
            move |_, k| async move {
                let cost = if (100..200).contains(&k) { 50 } else { 5 };
                tokio::time::sleep(Duration::from_millis(cost)).await;
                Outcome::Status(200)
            },
        )
        .await;
        let seconds = &result.timeline.0;
        assert_eq!(seconds.len(), 3, "{seconds:?}");
        assert!(seconds.iter().all(|s| s.requests == 100), "{seconds:?}");
        assert_eq!(
            seconds.iter().map(|s| s.over_10ms).collect::<Vec<_>>(),
            [0, 100, 0]
        );
        assert!(
            seconds[1].max_us >= 50_000 && seconds[2].max_us < 10_000,
            "{seconds:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn count_runs_each_job_once_and_tallies_answers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let result = drive(3, Pace::Count(50), None, move |_, k| {
            log.lock().unwrap().push(k);
            async move {
                match k % 10 {
                    0 => Outcome::Failed,
                    1 => Outcome::Status(503),
                    _ => Outcome::Status(201),
                }
            }
        })
        .await;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!((result.tally.ok, result.tally.failed), (40, 5));
        assert_eq!(result.tally.by_status[&503], 5);
        assert_eq!(result.latency.len(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_stops_at_the_end() {
        let result = drive(
            4,
            Pace::Closed(Duration::from_secs(1)),
            None,
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Outcome::Status(200)
            },
        )
        .await;
        // 4 workers x 10 requests of 100 ms each in one second.
        assert_eq!(result.tally.ok, 40);
        assert!(result.open_loop.is_none());
    }
}
