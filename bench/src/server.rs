//! The service under test, when the bench starts it: which binary (`widgets` beside this
//! one, or `--server-bin`) and with which command line. The child process itself (its
//! address, its log, stopping it, its temporary data directory) is widgets-testkit's
//! [`Server`](widgets_testkit::server::Server), the same one the server's tests use.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use widgets::wal::FsyncMode;

/// The `widgets` binary to start: `given` (`--server-bin`), or `widgets` in this
/// executable's directory, where cargo builds the two side by side.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()
            .context("cannot find this executable to find the service beside it")?
            .with_file_name(format!("widgets{}", std::env::consts::EXE_SUFFIX)),
    };
    if !path.is_file() {
        bail!(
            "no service binary at {}: build it (`cargo build --release` at the workspace \
             root builds it beside widgets-bench) or give --server-bin PATH",
            path.display()
        );
    }
    Ok(path)
}

/// How to start the service.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub fsync: FsyncMode,
    /// PostgreSQL as its durable store; `None`: the embedded store.
    pub database_url: Option<String>,
    /// More top-level settings, passed as they are (e.g. `--flush-interval=200ms`).
    pub extra_args: Vec<String>,
    /// Its one bearer token, protecting every request class (`--auth-reads`,
    /// `--auth-metrics`); `None`: auth off.
    pub auth_token: Option<String>,
}

impl ServerOptions {
    /// The child's arguments after its address and data directory. The settings are
    /// top-level flags, so they come before the `serve` subcommand; `--database-url` is
    /// always given (empty for the embedded store) so a `DATABASE_URL` in a `.env` cannot
    /// choose for us.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["--fsync".to_owned(), fsync_name(self.fsync)];
        args.push(format!(
            "--database-url={}",
            self.database_url.as_deref().unwrap_or("")
        ));
        // Single node unless a --server-arg says otherwise (a later flag wins), whatever
        // REDIS_URL says.
        args.push("--redis-url=".to_owned());
        // Always given, like the URLs, so a WIDGETS_AUTH_TOKEN in a `.env` cannot choose.
        args.push(format!(
            "--auth-token={}",
            self.auth_token.as_deref().unwrap_or("")
        ));
        if self.auth_token.is_some() {
            args.extend(["--auth-reads".to_owned(), "--auth-metrics".to_owned()]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;
    use widgets::config::Config;
    use widgets_testkit::server::command_line;

    /// What the child makes of `args`: its settings, and the subcommand after them.
    fn child_config(args: &[String]) -> Config {
        let (subcommand, settings) = args.split_last().expect("arguments");
        assert_eq!(subcommand, "serve");
        let argv = std::iter::once("widgets").chain(settings.iter().map(String::as_str));
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn settings_go_before_the_subcommand() {
        let options = ServerOptions {
            fsync: FsyncMode::Never,
            database_url: None,
            extra_args: vec!["--flush-interval=200ms".into()],
            auth_token: None,
        };
        let args = options.args();
        assert_eq!(
            command_line(Path::new("/d"), &args),
            [
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/d",
                "--fsync",
                "never",
                "--database-url=",
                "--redis-url=",
                "--auth-token=",
                "--flush-interval=200ms",
                "serve"
            ]
        );
        // What the child will make of them.
        let config = child_config(&args);
        assert_eq!(config.fsync, FsyncMode::Never);
        assert_eq!(config.postgres_url(), None);
        assert_eq!(config.flush_interval(), Duration::from_millis(200));
        assert!(!config.auth().unwrap().is_on());
    }

    #[test]
    fn a_token_protects_every_request_class_of_the_started_service() {
        let options = ServerOptions {
            fsync: FsyncMode::Always,
            database_url: None,
            extra_args: vec![],
            auth_token: Some("t0ken".into()),
        };
        let auth = child_config(&options.args()).auth().unwrap();
        use widgets::api::auth::Class;
        for class in [Class::Write, Class::Read, Class::Metrics] {
            assert!(auth.protects(class), "{class:?}");
        }
    }

    #[test]
    fn a_database_url_is_passed_on() {
        let options = ServerOptions {
            fsync: FsyncMode::Always,
            database_url: Some("postgres://u@h/db".into()),
            extra_args: vec![],
            auth_token: None,
        };
        let config = child_config(&options.args());
        assert_eq!(config.postgres_url(), Some("postgres://u@h/db"));
    }

    #[test]
    fn a_missing_server_binary_says_what_to_do() {
        let e = server_bin(Some(Path::new("/nonexistent/widgets"))).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("/nonexistent/widgets")
                && message.contains("cargo build --release")
                && message.contains("--server-bin"),
            "{message}"
        );
    }
}
