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

/// CPU used so far, by the server and by the bench, at the start of a phase.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    server: Option<Ticks>,
    client: Option<Ticks>,
}

/// CPU used during a phase, by the server and by the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Used {
    pub server: Option<Duration>,
    pub client: Option<Duration>,
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
        Mark {
            server: self.server.and_then(|pid| read(Some(pid))),
            client: read(None),
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
        Used {
            server: used(mark.server, now.server),
            client: used(mark.client, now.client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_meter_measures_each_side_it_can_read() {
        let meter = Meter::new(Some(std::process::id()));
        let mark = meter.mark();
        let used = meter.since(&mark);
        assert!(used.server.is_some() && used.client.is_some(), "{used:?}");

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
