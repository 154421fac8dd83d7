//! The service under test as a child process: this same binary serving on a free port in
//! a temporary data directory. The child's address comes from its `listening ... addr=`
//! log line; its log is drained all along (at debug level here) so it never blocks on a
//! full pipe. Dropping a [`Server`] that was not stopped sends it SIGTERM and waits, so
//! an error in the bench never leaves a server running; the data directory goes with it.

use crate::wal::FsyncMode;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long the child may take to log its address (it binds before recovery).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop (final flush to the store included) may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines kept to explain a child that exits early.
const LOG_TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot find this executable to start the service")]
    Exe(#[source] std::io::Error),
    #[error("cannot create the service's data directory")]
    DataDir(#[source] std::io::Error),
    #[error("cannot start the service")]
    Spawn(#[source] std::io::Error),
    #[error("the service exited before listening; its last log lines:\n{0}")]
    Exited(String),
    #[error(
        "the service did not log its address within {LISTEN_TIMEOUT:?}; its last log lines:\n{0}"
    )]
    NoAddress(String),
    #[error("waiting for the service to stop")]
    Wait(#[source] std::io::Error),
}

/// How to start the service.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub fsync: FsyncMode,
    /// PostgreSQL as its durable store; `None`: the embedded store.
    pub database_url: Option<String>,
    /// More top-level settings, passed as they are (e.g. `--flush-interval=200ms`).
    pub extra_args: Vec<String>,
}

impl ServerOptions {
    /// The child's arguments. The settings are top-level flags, so they come before the
    /// `serve` subcommand; `--database-url` is always given (empty for the embedded
    /// store) so a `DATABASE_URL` in the environment or `.env` cannot choose for us.
    fn args(&self, data_dir: &str) -> Vec<String> {
        let fsync = fsync_name(self.fsync);
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
            "--fsync",
            &fsync,
        ]
        .map(str::to_owned)
        .into();
        args.push(format!(
            "--database-url={}",
            self.database_url.as_deref().unwrap_or("")
        ));
        // Single node unless a --server-arg says otherwise (a later flag wins), whatever
        // REDIS_URL says.
        args.push("--redis-url=".to_owned());
        args.extend(self.extra_args.iter().cloned());
        args.push("serve".to_owned());
        args
    }
}

/// The mode as `--fsync` spells it.
pub fn fsync_name(mode: FsyncMode) -> String {
    clap::ValueEnum::to_possible_value(&mode)
        .expect("every fsync mode has a name")
        .get_name()
        .to_owned()
}

pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    stopped: bool,
    // Dropped after the child is reaped (fields drop in order, after `Drop::drop`).
    _data_dir: TempDir,
}

impl Server {
    /// Starts the service and waits for its address (not for readiness).
    pub async fn start(options: &ServerOptions) -> Result<Server, ServerError> {
        let exe = std::env::current_exe().map_err(ServerError::Exe)?;
        let data_dir = tempfile::Builder::new()
            .prefix("widgets-bench-")
            .tempdir()
            .map_err(ServerError::DataDir)?;
        let dir = data_dir.path().to_string_lossy().into_owned();
        let mut child = Command::new(exe)
            .args(options.args(&dir))
            // The address is in an info line, whatever the bench's own RUST_LOG says.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(ServerError::Spawn)?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let tail = log_tail.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = crate::app::listen_addr_in_log(&line) {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr.to_owned());
                    }
                }
                tracing::debug!(target: "widgets::bench::server", "{line}");
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
            _data_dir: data_dir,
        };
        match tokio::time::timeout(LISTEN_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => server.base = format!("http://{addr}"),
            Ok(Err(_)) => return Err(ServerError::Exited(server.tail())),
            Err(_) => return Err(ServerError::NoAddress(server.tail())),
        }
        Ok(server)
    }

    fn tail(&self) -> String {
        let tail = self.log_tail.lock().expect("log tail lock");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
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
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        terminate(&self.child);
        // Blocking here is acceptable: this only runs when the bench is failing anyway.
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
    use clap::Parser;

    #[test]
    fn settings_go_before_the_subcommand() {
        let options = ServerOptions {
            fsync: FsyncMode::Never,
            database_url: None,
            extra_args: vec!["--flush-interval=200ms".into()],
        };
        let args = options.args("/tmp/d");
        assert_eq!(
            args,
            [
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/tmp/d",
                "--fsync",
                "never",
                "--database-url=",
                "--redis-url=",
                "--flush-interval=200ms",
                "serve"
            ]
        );
        // What the child will make of them.
        let argv = std::iter::once("widgets".to_owned()).chain(args);
        let config = crate::config::Config::try_parse_from(argv).unwrap();
        assert_eq!(config.fsync, FsyncMode::Never);
        assert_eq!(config.postgres_url(), None);
        assert_eq!(config.flush_interval, Duration::from_millis(200));
    }

    #[test]
    fn a_database_url_is_passed_on() {
        let options = ServerOptions {
            fsync: FsyncMode::Always,
            database_url: Some("postgres://u@h/db".into()),
            extra_args: vec![],
        };
        let argv = std::iter::once("widgets".to_owned()).chain(options.args("/d"));
        let config = crate::config::Config::try_parse_from(argv).unwrap();
        assert_eq!(config.postgres_url(), Some("postgres://u@h/db"));
    }
}
