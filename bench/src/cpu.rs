//! CPU time of the process under test (the service, or the echo reference) and of the bench
//! itself, so each phase can say how many microseconds of CPU a request cost on each side
//! of the connection. The client shares the machine with the server, so its own cost is
//! part of every number the bench reports.
//!
//! Both are read from `/proc/<pid>/stat` (Linux): `utime` and `stime`, fields 14 and 15,
//! in clock ticks (`sysconf(_SC_CLK_TCK)`, 100 a second on common kernels), summed over
//! every thread of the process, finished ones included. The resolution is one tick, so a
//! phase should run for seconds, not milliseconds, for its CPU per request to mean much.
//! Where `/proc` cannot be read (another OS, a process that is gone) the numbers are
//! absent from the report, never made up.
//!
//! On a virtual machine the hypervisor may run other guests on this one's CPUs; that time,
//! `steal` in the first line of `/proc/stat`, is read for the whole machine around each
//! phase too. A phase that lost a tenth of the machine that way has a tail that says more
//! about the host than about the service.

use std::collections::BTreeMap;
use std::time::Duration;

/// Fields of `/proc/<pid>/stat` after the `comm` field's closing parenthesis: field 3
/// (`state`) is the first, so `utime` (field 14) is the twelfth.
const UTIME_AFTER_COMM: usize = 14 - 3;
/// `stime`, field 15, right after `utime`.
const STIME_AFTER_COMM: usize = 15 - 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuError {
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("{0} is not a process stat line: {1}")]
    Parse(String, &'static str),
    #[error("sysconf(_SC_CLK_TCK) gave {0}, not a number of ticks a second")]
    ClockTicks(libc::c_long),
}

/// CPU time in clock ticks, as `/proc/<pid>/stat` counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticks {
    pub user: u64,
    pub system: u64,
}

impl Ticks {
    pub fn total(&self) -> u64 {
        self.user + self.system
    }
}

/// `utime` and `stime` of one `/proc/<pid>/stat` line. The second field, `comm`, is the
/// executable's name in parentheses and may itself hold spaces and parentheses, so the
/// fields are counted from its last `)`.
pub fn parse_stat(line: &str) -> Result<Ticks, &'static str> {
    let (_, rest) = line
        .rsplit_once(')')
        .ok_or("no ')' closing the command name")?;
    let mut fields = rest.split_whitespace();
    let user = fields
        .nth(UTIME_AFTER_COMM)
        .ok_or("too few fields for utime")?;
    let system = fields
        .nth(STIME_AFTER_COMM - UTIME_AFTER_COMM - 1)
        .ok_or("too few fields for stime")?;
    let parse = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| "utime or stime is not a count")
    };
    Ok(Ticks {
        user: parse(user)?,
        system: parse(system)?,
    })
}

/// The thread name in a `/proc/<pid>/task/<tid>/stat` line: the `comm` field between the
/// first `(` and the last `)` (a name may hold either).
pub fn parse_comm(line: &str) -> Option<&str> {
    let start = line.find('(')? + 1;
    let end = line.rfind(')')?;
    line.get(start..end)
}

/// The name and CPU ticks so far of each live thread of process `pid`, by thread id. A
/// thread that ends is gone from `/proc`, its ticks with it: the process's own total
/// ([`read_ticks`]) still counts them.
pub fn read_thread_ticks(pid: u32) -> Result<BTreeMap<u32, (String, Ticks)>, CpuError> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| CpuError::Read(dir.clone(), e.to_string()))?;
    let mut threads = BTreeMap::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path().join("stat");
        // A thread may end between the listing and the read.
        let Ok(line) = std::fs::read_to_string(&path) else {
            continue;
        };
        let path = path.display().to_string();
        let ticks = parse_stat(&line).map_err(|why| CpuError::Parse(path.clone(), why))?;
        let name = parse_comm(&line).ok_or(CpuError::Parse(path, "no command name"))?;
        threads.insert(tid, (name.to_owned(), ticks));
    }
    Ok(threads)
}

/// The CPU ticks process `pid` has used so far; `None` reads this process's own.
pub fn read_ticks(pid: Option<u32>) -> Result<Ticks, CpuError> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let line =
        std::fs::read_to_string(&path).map_err(|e| CpuError::Read(path.clone(), e.to_string()))?;
    parse_stat(&line).map_err(|why| CpuError::Parse(path, why))
}

/// The whole machine's CPU time so far, in clock ticks: all of it, and what the hypervisor
/// gave other guests while this one wanted to run (`steal`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    pub total: u64,
    pub steal: u64,
}

/// [`MachineTicks`] of `/proc/stat`: its first line, `cpu` then user, nice, system, idle,
/// iowait, irq, softirq, steal and (on newer kernels) guest and guest_nice, which user and
/// nice already count, so the total is the first eight.
pub fn parse_proc_stat(text: &str) -> Result<MachineTicks, &'static str> {
    let mut fields = text.lines().next().unwrap_or_default().split_whitespace();
    if fields.next() != Some("cpu") {
        return Err("the first line is not the all-CPU line");
    }
    let mut ticks = [0u64; 8];
    for tick in &mut ticks {
        *tick = fields
            .next()
            .ok_or("too few fields for steal")?
            .parse()
            .map_err(|_| "a CPU time is not a count")?;
    }
    Ok(MachineTicks {
        total: ticks.iter().sum(),
        steal: ticks[7],
    })
}

/// The machine's CPU ticks so far.
pub fn read_machine() -> Result<MachineTicks, CpuError> {
    let path = "/proc/stat";
    let text =
        std::fs::read_to_string(path).map_err(|e| CpuError::Read(path.into(), e.to_string()))?;
    parse_proc_stat(&text).map_err(|why| CpuError::Parse(path.into(), why))
}

/// The share of the machine's CPU time from `before` to `after` that the hypervisor took
/// (0 to 1); `None` when no time passed.
pub fn steal_share(before: MachineTicks, after: MachineTicks) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    let steal = after.steal.saturating_sub(before.steal).min(total);
    Some(steal as f64 / total as f64)
}

/// Samples the machine's steal second by second on a thread of its own, from
/// [`StealSampler::start`] until [`StealSampler::stop`]: a phase's timeline can then say
/// which of its slow seconds the host took.
pub struct StealSampler {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<Option<f64>>>,
}

impl StealSampler {
    pub fn start() -> StealSampler {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut shares = Vec::new();
            let mut last = read_machine().ok();
            for second in 1u32.. {
                let due = start + Duration::from_secs(second.into());
                let wait = due.saturating_duration_since(std::time::Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    // Stopped, or the sampler dropped: a second cut short is not sampled.
                    _ => break,
                }
                let now = read_machine().ok();
                shares.push(last.zip(now).and_then(|(a, b)| steal_share(a, b)));
                last = now;
            }
            shares
        });
        StealSampler { stop, thread }
    }

    /// The share of each whole second since the start that the hypervisor took (0 to 1);
    /// `None` for a second whose `/proc/stat` could not be read.
    pub fn stop(self) -> Vec<Option<f64>> {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}

/// Clock ticks a second, the unit of `/proc/<pid>/stat`'s CPU times.
pub fn ticks_per_second() -> Result<u64, CpuError> {
    // SAFETY: sysconf only reads a system setting; it takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&t| t > 0)
        .ok_or(CpuError::ClockTicks(ticks))
}

/// `ticks` clock ticks as a duration.
pub fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// Microseconds of CPU per request; `None` when no request completed.
pub fn micros_per_request(cpu: Duration, requests: u64) -> Option<f64> {
    (requests > 0).then(|| cpu.as_secs_f64() * 1e6 / requests as f64)
}

/// Reads the CPU time of the server (when the bench started it, so it has its pid) and of
/// the bench, around one phase.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    server: Option<u32>,
    ticks_per_second: Option<u64>,
}

/// CPU used so far, by the server (in all and by thread name), by the bench and by the
/// whole machine, at the start of a phase.
#[derive(Debug, Clone)]
pub struct Mark {
    server: Option<Ticks>,
    server_threads: Option<BTreeMap<u32, (String, Ticks)>>,
    client: Option<Ticks>,
    machine: Option<MachineTicks>,
}

/// CPU used during a phase, by the server and by the bench, and the share of the machine's
/// CPU time the hypervisor took ([`steal_share`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Used {
    pub server: Option<Duration>,
    /// The server's by thread name ([`read_thread_ticks`]): threads alive at the phase's
    /// end, each from its ticks at the start (zero for one started since). Empty where
    /// they could not be read.
    pub server_threads: BTreeMap<String, Duration>,
    pub client: Option<Duration>,
    pub steal: Option<f64>,
}

impl Meter {
    /// A meter of process `server` (if any) and of this one.
    pub fn new(server: Option<u32>) -> Meter {
        let ticks_per_second = ticks_per_second()
            .inspect_err(|e| tracing::warn!("no CPU times in the report: {e}"))
            .ok();
        Meter {
            server,
            ticks_per_second,
        }
    }

    pub fn mark(&self) -> Mark {
        let read = |pid| {
            self.ticks_per_second?;
            read_ticks(pid)
                .inspect_err(|e| tracing::warn!("no CPU time for this phase: {e}"))
                .ok()
        };
        let machine = self.ticks_per_second.and_then(|_| {
            read_machine()
                .inspect_err(|e| tracing::warn!("no steal time for this phase: {e}"))
                .ok()
        });
        let server_threads = self.server.zip(self.ticks_per_second).and_then(|(pid, _)| {
            read_thread_ticks(pid)
                .inspect_err(|e| tracing::warn!("no CPU time by thread for this phase: {e}"))
                .ok()
        });
        Mark {
            server: self.server.and_then(|pid| read(Some(pid))),
            server_threads,
            client: read(None),
            machine,
        }
    }

    /// CPU used since `mark`; a side whose CPU could not be read at either end is `None`.
    pub fn since(&self, mark: &Mark) -> Used {
        let now = self.mark();
        let used = |before: Option<Ticks>, after: Option<Ticks>| {
            let (before, after, per_second) = (before?, after?, self.ticks_per_second?);
            // CPU time of one process only grows.
            let ticks = after.total().saturating_sub(before.total());
            Some(ticks_to_duration(ticks, per_second))
        };
        let server_threads = match (&mark.server_threads, &now.server_threads) {
            (Some(before), Some(after)) => thread_use(before, after, self.ticks_per_second),
            _ => BTreeMap::new(),
        };
        Used {
            server: used(mark.server, now.server),
            server_threads,
            client: used(mark.client, now.client),
            steal: mark
                .machine
                .zip(now.machine)
                .and_then(|(before, after)| steal_share(before, after)),
        }
    }
}

/// The CPU each thread used between two readings of [`read_thread_ticks`], summed by
/// thread name (tokio's workers and its blocking threads share one). Taken thread by
/// thread before the sum, so that a thread that ended in between (missing from `after`,
/// and left out) takes none of the others' time with it; one that started in between
/// (missing from `before`) counts from zero.
fn thread_use(
    before: &BTreeMap<u32, (String, Ticks)>,
    after: &BTreeMap<u32, (String, Ticks)>,
    per_second: Option<u64>,
) -> BTreeMap<String, Duration> {
    let Some(per_second) = per_second else {
        return BTreeMap::new();
    };
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for (tid, (name, now)) in after {
        let then = before.get(tid).map_or(0, |(_, then)| then.total());
        *by_name.entry(name.clone()).or_default() += now.total().saturating_sub(then);
    }
    (by_name.into_iter())
        .map(|(name, ticks)| (name, ticks_to_duration(ticks, per_second)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's name is what the kernel keeps of it, and may hold spaces and parentheses.
    #[test]
    fn a_thread_is_named_by_its_comm_field() {
        let line = "4242 (widgets-sequenc) S 1 2 3 0 -1 4194624 10 0 0 0 70 5 0 0 20 0 1 0";
        assert_eq!(parse_comm(line), Some("widgets-sequenc"));
        assert_eq!(parse_comm("7 (a (b) c) R 1"), Some("a (b) c"));
        assert_eq!(parse_comm("7 no name"), None);
    }

    /// This process's own threads, read live: a named thread that burns CPU shows under
    /// its name, and the difference of two readings keeps threads started in between and
    /// drops those that ended.
    #[test]
    fn threads_are_read_by_name_and_their_use_is_the_difference() {
        let (started, stop) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let spinner = std::thread::Builder::new()
            .name("bench-spinner".into())
            .spawn(move || {
                let until = std::time::Instant::now() + Duration::from_millis(200);
                while std::time::Instant::now() < until {
                    std::hint::black_box(0u64);
                }
                started.0.send(()).unwrap();
                stop.1.recv().ok();
            })
            .unwrap();
        started.1.recv().unwrap();
        let threads = read_thread_ticks(std::process::id()).unwrap();
        let spun = (threads.values())
            .find(|(name, _)| name == "bench-spinner")
            .expect("the spinner is listed");
        assert!(spun.1.total() > 0, "{threads:?}");
        stop.0.send(()).unwrap();
        spinner.join().unwrap();

        let thread = |name: &str, user| (name.to_owned(), Ticks { user, system: 1 });
        // Two threads named `a`, one of which ends with 300 ticks behind it; a thread that
        // ends alone; one that starts.
        let before = BTreeMap::from([
            (1, thread("a", 10)),
            (2, thread("a", 300)),
            (3, thread("gone", 5)),
        ]);
        let after = BTreeMap::from([(1, thread("a", 60)), (4, thread("new", 20))]);
        assert_eq!(
            thread_use(&before, &after, Some(100)),
            BTreeMap::from([
                ("a".to_owned(), Duration::from_millis(500)),
                ("new".to_owned(), Duration::from_millis(210)),
            ])
        );
        // Two live threads of one name add up.
        let after = BTreeMap::from([(1, thread("a", 60)), (2, thread("a", 350))]);
        assert_eq!(
            thread_use(&before, &after, Some(100)),
            BTreeMap::from([("a".to_owned(), Duration::from_millis(1_000))])
        );
        assert!(thread_use(&before, &after, None).is_empty());
    }

    /// A real line's shape (from a `widgets` process), utime 1234 and stime 56.
    fn stat_line(comm: &str) -> String {
        format!(
            "4242 ({comm}) S 1 4242 4242 0 -1 4194560 5063 0 0 0 1234 56 0 0 20 0 3 0 \
             12345 1073741824 20000 18446744073709551615 1 1 0 0 0 0 0 4096 17928 0 0 0 17 1 \
             0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    #[test]
    fn utime_and_stime_are_fields_14_and_15() {
        let ticks = parse_stat(&stat_line("widgets")).unwrap();
        assert_eq!(
            ticks,
            Ticks {
                user: 1234,
                system: 56
            }
        );
        assert_eq!(ticks.total(), 1290);
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped_whole() {
        for comm in [
            "a b",
            "x) S 9 9 (y",
            "((",
            ") 1 2 3 4 5 6 7 8 9 10 11 12 13",
        ] {
            let ticks = parse_stat(&stat_line(comm)).unwrap_or_else(|e| panic!("{comm:?}: {e}"));
            assert_eq!((ticks.user, ticks.system), (1234, 56), "comm {comm:?}");
        }
    }

    #[test]
    fn a_line_that_is_not_a_stat_line_is_refused() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("4242 (widgets S 1 2 3").is_err(), "no ')'");
        assert!(parse_stat("4242 (widgets) S 1 2 3").is_err(), "too short");
        let garbled = stat_line("widgets").replace(" 1234 ", " -1 ");
        assert!(parse_stat(&garbled).is_err(), "a negative utime");
    }

    #[test]
    fn this_process_has_a_readable_cpu_time() {
        let per_second = ticks_per_second().unwrap();
        let before = read_ticks(None).unwrap();
        // Burn enough CPU for a few ticks, whatever the clock rate.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = read_ticks(Some(std::process::id())).unwrap();
        assert!(after.total() > before.total(), "{before:?} then {after:?}");
        let spent = ticks_to_duration(after.total() - before.total(), per_second);
        assert!(spent <= Duration::from_secs(10), "{spent:?}");
    }

    #[test]
    fn ticks_become_time_and_time_per_request() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(ticks_to_duration(0, 100), Duration::ZERO);
        // 2.5 s of CPU over 50,000 requests: 50 µs each.
        assert_eq!(
            micros_per_request(Duration::from_millis(2500), 50_000),
            Some(50.0)
        );
        assert_eq!(micros_per_request(Duration::from_secs(1), 0), None);
        assert_eq!(micros_per_request(Duration::ZERO, 10), Some(0.0));
    }

    #[test]
    fn steal_is_the_eighth_time_of_the_all_cpu_line() {
        // A real /proc/stat's start (guest and guest_nice last, already in user and nice).
        let text =
            "cpu  1000 10 300 8000 50 0 40 600 200 0\ncpu0 500 5 150 4000 25 0 20 300 100 0\n";
        let ticks = parse_proc_stat(text).unwrap();
        assert_eq!(
            ticks,
            MachineTicks {
                total: 10_000,
                steal: 600
            }
        );
        // An older kernel's line ends at steal.
        assert_eq!(
            parse_proc_stat("cpu 1 2 3 4 5 6 7 8\n").unwrap(),
            MachineTicks {
                total: 36,
                steal: 8
            }
        );
        assert!(parse_proc_stat("").is_err());
        assert!(
            parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n").is_err(),
            "a single CPU's line"
        );
        assert!(parse_proc_stat("cpu 1 2 3 4 5 6 7\n").is_err(), "no steal");
        assert!(
            parse_proc_stat("cpu 1 2 3 4 5 6 7 x\n").is_err(),
            "not a count"
        );
    }

    #[test]
    fn steal_share_is_steal_over_all_the_time_that_passed() {
        let at = |total, steal| MachineTicks { total, steal };
        assert_eq!(steal_share(at(1_000, 10), at(1_400, 110)), Some(0.25));
        assert_eq!(steal_share(at(1_000, 10), at(1_400, 10)), Some(0.0));
        // No time passed, or the counters went back: no share.
        assert_eq!(steal_share(at(1_000, 10), at(1_000, 10)), None);
        assert_eq!(steal_share(at(1_000, 10), at(900, 10)), None);
    }

    #[test]
    fn the_sampler_gives_a_share_for_each_whole_second() {
        let sampler = StealSampler::start();
        std::thread::sleep(Duration::from_millis(2_300));
        let shares = sampler.stop();
        assert_eq!(shares.len(), 2, "{shares:?}");
        for share in shares {
            let share = share.expect("this machine's /proc/stat is readable");
            assert!((0.0..=1.0).contains(&share), "{share}");
        }
        // Stopped at once: no second, and no wait for one.
        let start = std::time::Instant::now();
        assert!(StealSampler::start().stop().is_empty());
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn a_meter_measures_each_side_it_can_read() {
        let meter = Meter::new(Some(std::process::id()));
        let mark = meter.mark();
        // Long enough for the machine's clock to tick.
        std::thread::sleep(Duration::from_millis(50));
        let used = meter.since(&mark);
        assert!(used.server.is_some() && used.client.is_some(), "{used:?}");
        let steal = used.steal.expect("this machine's /proc/stat is readable");
        assert!((0.0..=1.0).contains(&steal), "{used:?}");

        // A process that does not exist: the server's side is unknown, not zero.
        let meter = Meter::new(Some(u32::MAX));
        let used = meter.since(&meter.mark());
        assert_eq!(used.server, None);
        assert!(used.client.is_some());

        // No server to measure (the bench was given --url).
        let meter = Meter::new(None);
        assert_eq!(meter.since(&meter.mark()).server, None);
    }
}
