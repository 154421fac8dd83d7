//! A thread of its own, at a lower CPU priority, for the write-behind's blocking work: a
//! store's writes, and the memory engine's building of each flush's batch.
//!
//! The embedded store's flush is CPU work in bursts (sled's inserts, page loads and log
//! writes: a third of the service's CPU at 10,000 PUT/s over 1 M widgets with a flush
//! every second). On tokio's blocking pool it competes with the request path on equal
//! terms; on a thread with a higher nice value the kernel runs requests first and gives
//! the flush what is left, or its small share of a saturated machine, which the dirty-set
//! limit then turns into back-pressure (`503 overloaded`) rather than a stall. (No run in
//! BENCHMARKS.md could tell nice 10 from nice 0 through the latency noise of that
//! machine; this is the design, not a measured gain.)
//!
//! The nice value is per thread on Linux, and threads the work starts (sled's I/O pool)
//! inherit it. Elsewhere the thread runs at the process's priority.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The handle of the thread; the thread ends once every handle is dropped.
#[derive(Debug, Clone)]
pub struct Background {
    jobs: mpsc::Sender<Job>,
}

/// The job did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    #[error("the job panicked: {0}")]
    Panicked(String),
    #[error("the background thread is gone")]
    Gone,
}

impl Background {
    /// Starts the thread `name`, running its jobs at nice value `nice` (0, the usual
    /// priority, to 19, the lowest), or at the caller's if that is already lower.
    pub fn start(name: &str, nice: i32) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                lower_priority(nice);
                for job in queue {
                    job();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the thread, after the jobs before it, and waits for it blocking the
    /// calling thread (which may be an async worker: this is for start-up, not requests).
    pub fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BackgroundError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.submit(work, move |outcome| {
            let _ = reply.send(outcome);
        })?;
        answer.recv().map_err(|_| BackgroundError::Gone)?
    }

    /// Runs `work` on the thread, after the jobs before it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BackgroundError> {
        let (reply, answer) = oneshot::channel();
        self.submit(work, move |outcome| {
            let _ = reply.send(outcome);
        })?;
        answer.await.map_err(|_| BackgroundError::Gone)?
    }

    /// Queues `work` on the thread, after the jobs before it, without waiting for it. A
    /// panic in it is caught and dropped.
    pub fn spawn(&self, work: impl FnOnce() + Send + 'static) -> Result<(), BackgroundError> {
        self.submit(work, |_| {})
    }

    /// Queues `work`; `reply` gets its outcome (a panic caught as an error).
    fn submit<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
        reply: impl FnOnce(Result<T, BackgroundError>) + Send + 'static,
    ) -> Result<(), BackgroundError> {
        let job: Job = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                BackgroundError::Panicked(message)
            });
            reply(outcome);
        });
        self.jobs.send(job).map_err(|_| BackgroundError::Gone)
    }
}

/// Raises the calling thread's nice value to `nice` (never lowers it); a failure is
/// logged, not fatal (the work still runs, at the priority it has).
#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    // SAFETY: gettid has no preconditions; getpriority and setpriority with PRIO_PROCESS
    // and a thread id read and change that one thread's nice value (Linux keeps it per
    // thread). getpriority's -1 can also mean an error, which only makes this try to set
    // the value.
    let result = unsafe {
        let tid = libc::gettid() as libc::id_t;
        if libc::getpriority(libc::PRIO_PROCESS, tid) >= nice {
            return;
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if result != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(),
            "could not lower a write-behind thread's priority; it runs at the process's");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(nice: i32) {
    if nice != 0 {
        tracing::info!(
            nice,
            "thread priorities are Linux-only here: the write-behind runs at the process's"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's own nice value, from /proc (field 19 of its stat line).
    #[cfg(target_os = "linux")]
    fn own_nice() -> i64 {
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn jobs_run_at_the_nice_value_given_and_the_caller_keeps_its_own() {
        let before = own_nice();
        let background = Background::start("test-background", 7).unwrap();
        let theirs = background.run_blocking(own_nice).unwrap();
        assert_eq!(theirs, before.max(7));
        assert_eq!(own_nice(), before, "only the background thread is niced");
        // A thread it starts inherits the value.
        let child = background
            .run_blocking(|| std::thread::spawn(own_nice).join().unwrap())
            .unwrap();
        assert_eq!(child, theirs);
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_thread_goes_on() {
        let background = Background::start("test-background", 0).unwrap();
        let e = background
            .run(|| -> u32 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, BackgroundError::Panicked(m) if m == "boom"),
            "{e}"
        );
        assert_eq!(background.run(|| 2 + 2).await.unwrap(), 4);
    }
}
