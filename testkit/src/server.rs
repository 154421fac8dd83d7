//! The `widgets` binary as a child process serving on a free port: the tests that need the
//! real process (restart, `kill -9`) and the load generator both start it through here.
//!
//! The child's address comes from its `listening ... addr=` log line; it binds before it
//! recovers, so the address comes first and [`Server::wait_ready`] waits for `/readyz`.
//! Its log is drained all along so it never blocks on a full pipe: each line is logged at
//! debug level, echoed on stderr when asked (the tests' `TEST_LOG`), and the last few are
//! kept to explain a child that exits early. `DATABASE_URL` and `REDIS_URL` are removed
//! from its environment, so its store is what its arguments say. Dropping a [`Server`]
//! that was not stopped sends it SIGTERM and waits (SIGKILL after [`STOP_TIMEOUT`]), so a
//! failing test or bench never leaves a server running.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long the child may take to log its address (it binds before recovery).
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop (final flush to the store included) may take before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines kept to explain a child that exits early.
const LOG_TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the service's data directory")]
    DataDir(#[source] std::io::Error),
    #[error("cannot start the service ({})", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the service exited before listening; its last log lines:\n{0}")]
    Exited(String),
    #[error(
        "the service did not log its address within {LISTEN_TIMEOUT:?}; its last log lines:\n{0}"
    )]
    NoAddress(String),
    #[error("{0}/readyz did not answer 200 within {1:?}; the service's last log lines:\n{2}")]
    NotReady(String, Duration, String),
    #[error("killing the service")]
    Kill(#[source] std::io::Error),
    #[error("waiting for the service to stop")]
    Wait(#[source] std::io::Error),
}

/// How to start the service.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The `widgets` binary.
    pub bin: PathBuf,
    /// Its data directory (kept, e.g. for a restart on it); `None`: a temporary directory
    /// of its own, removed with the [`Server`].
    pub data_dir: Option<PathBuf>,
    /// Its arguments after `--listen 127.0.0.1:0 --data-dir DIR`, as its command line
    /// takes them: settings (a later one wins), then a subcommand if any.
    pub args: Vec<String>,
    /// Echo each line of its log on stderr as it comes.
    pub echo_log: bool,
    /// More environment variables for it (e.g. settings given the way a deployment
    /// gives them).
    pub env: Vec<(String, String)>,
}

impl ServerCommand {
    /// `bin` on a temporary data directory, with no more arguments.
    pub fn new(bin: impl Into<PathBuf>) -> ServerCommand {
        ServerCommand {
            bin: bin.into(),
            data_dir: None,
            args: Vec::new(),
            echo_log: false,
            env: Vec::new(),
        }
    }
}

/// The child's whole command line on `data_dir`: a free port, the data directory, `args`.
pub fn command_line(data_dir: &Path, args: &[String]) -> Vec<OsString> {
    let mut line: Vec<OsString> = ["--listen", "127.0.0.1:0", "--data-dir"]
        .map(OsString::from)
        .into();
    line.push(data_dir.into());
    line.extend(args.iter().map(OsString::from));
    line
}

/// The address in the "listening" line the service logs at start-up, in either log format
/// (`addr=HOST:PORT`, or `"addr":"HOST:PORT"` with `--log-format json`, which a
/// `WIDGETS_LOG_FORMAT` in the child's environment may choose).
pub fn listen_addr_in_log(line: &str) -> Option<&str> {
    if let Some(json) = line.split(r#""addr":""#).nth(1) {
        return json.split('"').next();
    }
    line.split("addr=").nth(1)?.split_whitespace().next()
}

/// Sets `command` up as every child the tests start is: its store from its command line
/// alone (no `DATABASE_URL` or `REDIS_URL` from the caller's environment), no stdin, its
/// stdout dropped and its log on a pipe.
pub fn log_on_a_pipe(command: &mut Command) -> &mut Command {
    command
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
}

/// What `child` printed to its piped stdout and stderr, and how it exited, if it exits
/// within `within`; if not, kills it and returns `None`. Blocks the calling thread.
pub fn output_within(mut child: Child, within: Duration) -> Option<Output> {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("polling the child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(
        child
            .wait_with_output()
            .expect("reading the child's output"),
    )
}

pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    stopped: bool,
    /// The temporary data directory, if the server has one of its own. Removed after the
    /// child is reaped (fields drop in order, after `Drop::drop`).
    _own_data_dir: Option<TempDir>,
}

impl Server {
    /// Starts the service and waits for its address (not for readiness).
    pub async fn start(command: &ServerCommand) -> Result<Server, ServerError> {
        let (own_data_dir, dir) = match &command.data_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("widgets-server-")
                    .tempdir()
                    .map_err(ServerError::DataDir)?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
        };
        let mut child = log_on_a_pipe(&mut Command::new(&command.bin))
            .args(command_line(&dir, &command.args))
            // The address is in an info line, whatever the caller's own RUST_LOG says.
            .env("RUST_LOG", "info")
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .map_err(|e| ServerError::Spawn(command.bin.clone(), e))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (tail, echo) = (log_tail.clone(), command.echo_log);
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listen_addr_in_log(&line) {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr.to_owned());
                    }
                }
                tracing::debug!("{line}");
                if echo {
                    eprintln!("[server] {line}");
                }
                let mut tail = tail.lock().expect("log tail lock");
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            // End of the log: the child exited, and `addr_tx` (if unused) is dropped.
        });
        let mut server = Server {
            child,
            base: String::new(),
            log_tail,
            stopped: false,
            _own_data_dir: own_data_dir,
        };
        match tokio::time::timeout(LISTEN_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => server.base = format!("http://{addr}"),
            Ok(Err(_)) => return Err(ServerError::Exited(server.tail())),
            Err(_) => return Err(ServerError::NoAddress(server.tail())),
        }
        Ok(server)
    }

    /// The child's process id, e.g. to read its CPU time from `/proc/<pid>/stat`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let tail = self.log_tail.lock().expect("log tail lock");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits until `/readyz` answers 200 (recovery done), for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ServerError> {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.base);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == reqwest::StatusCode::OK {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ServerError::NotReady(
            self.base.clone(),
            timeout,
            self.tail(),
        ))
    }

    /// SIGTERM, then waits for the graceful exit (SIGKILL after [`STOP_TIMEOUT`]).
    pub async fn stop(mut self) -> Result<ExitStatus, ServerError> {
        terminate(&self.child);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().map_err(ServerError::Wait)? {
                break status;
            }
            if Instant::now() >= deadline {
                tracing::warn!("the service did not stop within {STOP_TIMEOUT:?}: killing it");
                let _ = self.child.kill();
                break self.child.wait().map_err(ServerError::Wait)?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Only now: a stop abandoned half-way (Ctrl-C) still gets the drop's wait.
        self.stopped = true;
        Ok(status)
    }

    /// SIGKILL: a crash, as far as the service can tell. Waits until it is gone.
    pub fn kill9(mut self) -> Result<(), ServerError> {
        self.child.kill().map_err(ServerError::Kill)?;
        self.child.wait().map_err(ServerError::Wait)?;
        self.stopped = true;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        terminate(&self.child);
        // Blocking here is acceptable: this only runs when a test or the bench is failing
        // (or interrupted) anyway.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM: the service's graceful shutdown (finish requests, flush, close the WAL).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with our own child's pid; the child is not reaped yet, so the pid
        // cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_read_from_the_listening_line() {
        let line = "2026-01-01T00:00:00.000000Z  INFO widgets::app: listening \
                    addr=127.0.0.1:41234 data_dir=/d fsync=Always";
        assert_eq!(listen_addr_in_log(line), Some("127.0.0.1:41234"));
        assert_eq!(
            listen_addr_in_log("INFO widgets::app: ready widgets=0"),
            None
        );
        let json = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","addr":"127.0.0.1:41234","data_dir":"/d"},"target":"widgets::app"}"#;
        assert_eq!(listen_addr_in_log(json), Some("127.0.0.1:41234"));
    }

    #[test]
    fn the_data_dir_and_a_free_port_come_first() {
        let line = command_line(Path::new("/d"), &["--fsync".into(), "never".into()]);
        assert_eq!(
            line,
            [
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/d",
                "--fsync",
                "never"
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_binary_is_named() {
        let command = ServerCommand::new("/nonexistent/widgets");
        let e = Server::start(&command)
            .await
            .err()
            .expect("started nothing");
        assert!(e.to_string().contains("/nonexistent/widgets"), "{e}");
    }
}
