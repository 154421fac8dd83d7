//! Throwaway PostgreSQL databases: created empty through an admin URL (a role that may
//! `CREATE DATABASE`) and dropped when done, so a bench run or a test starts from empty
//! tables and never writes into the database that URL names.
//!
//! [`ScratchDb`] returns its errors (the bench reports them and goes on). [`TestDb`] is
//! the tests' face of it: a database of its own per test on `DATABASE_URL` (or the local
//! server), the leftovers of dead test processes swept first, and a panic saying what to
//! set when no PostgreSQL answers.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use std::net::SocketAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

/// The server tests use when `DATABASE_URL` is unset: the local one this project's CI and
/// `docker compose up -d` provide.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Where test databases are created: `DATABASE_URL`, or [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ScratchDbError {
    #[error("'{0}' is not a postgres://… URL")]
    Url(String),
    #[error("'{0}' is not a database name of lowercase letters, digits and '_'")]
    Name(String),
    #[error("connecting to PostgreSQL to create or drop database {0}")]
    Connect(String, #[source] sqlx::Error),
    #[error("creating or dropping database {0}")]
    Ddl(String, #[source] sqlx::Error),
}

#[derive(Debug)]
pub struct ScratchDb {
    admin_url: String,
    pub name: String,
    /// The admin URL with its database replaced by this one.
    pub url: String,
}

impl ScratchDb {
    /// Creates database `name`, empty, on the server `admin_url` names. A database of that
    /// name already there is a leftover (names carry a process id) and is dropped first.
    pub async fn create(admin_url: &str, name: &str) -> Result<ScratchDb, ScratchDbError> {
        // The name goes into DDL as it is.
        let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        if name.is_empty() || !name.bytes().all(plain) {
            return Err(ScratchDbError::Name(name.to_owned()));
        }
        let db = ScratchDb {
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
            url: with_database(admin_url, name)?,
        };
        let mut conn = admin(admin_url, name).await?;
        let ddl = |e| ScratchDbError::Ddl(db.name.clone(), e);
        // Asked first rather than `DROP ... IF EXISTS`, whose notice sqlx would log.
        let stale: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&db.name)
                .fetch_one(&mut conn)
                .await
                .map_err(ddl)?;
        if stale {
            sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
                .execute(&mut conn)
                .await
                .map_err(ddl)?;
        }
        sqlx::query(&format!("CREATE DATABASE {}", db.name))
            .execute(&mut conn)
            .await
            .map_err(ddl)?;
        let _ = conn.close().await;
        Ok(db)
    }

    /// A connection to this database.
    pub async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect(&self.url).await
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_db(self) -> Result<(), ScratchDbError> {
        let mut conn = admin(&self.admin_url, &self.name).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .map_err(|e| ScratchDbError::Ddl(self.name.clone(), e))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// This database's URL with the server's `host:port` replaced by `addr` (a proxy), and
    /// TLS off (`sslmode=disable`, after any other `sslmode`): a test's proxy reads the
    /// statements that pass through it to stall on one, which TLS would hide (the default,
    /// `prefer`, encrypts wherever the server offers TLS).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let after_at = self
            .url
            .rsplit_once('@')
            .map_or(self.url.as_str(), |(_, rest)| rest);
        let host_port = after_at.split('/').next().expect("host:port");
        let url = self.url.replacen(host_port, &addr.to_string(), 1);
        if url.ends_with("sslmode=disable") {
            return url;
        }
        let joint = if url.contains('?') { '&' } else { '?' };
        format!("{url}{joint}sslmode=disable")
    }
}

/// A connection to the admin URL's database, to create or drop `db`. Its statements are not
/// logged: a `DROP DATABASE` routinely takes over sqlx's one-second "slow statement" warning.
async fn admin(admin_url: &str, db: &str) -> Result<PgConnection, ScratchDbError> {
    let connect = |e| ScratchDbError::Connect(db.to_owned(), e);
    let options = PgConnectOptions::from_str(admin_url)
        .map_err(connect)?
        .disable_statement_logging();
    PgConnection::connect_with(&options).await.map_err(connect)
}

/// Drops the databases named `<prefix><pid>_…` whose process is gone (a failed test, or one
/// that never dropped its database, leaves it behind).
pub async fn sweep_orphans(admin_url: &str, prefix: &str) -> Result<(), ScratchDbError> {
    let what = format!("{prefix}*");
    let mut conn = admin(admin_url, &what).await?;
    let pattern = format!("{}%", prefix.replace('_', "\\_"));
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(pattern)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| ScratchDbError::Ddl(what, e))?;
    for name in names {
        let pid = name[prefix.len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
    let _ = conn.close().await;
    Ok(())
}

/// `url` naming database `db` instead of its own (or none), query parameters kept.
pub fn with_database(url: &str, db: &str) -> Result<String, ScratchDbError> {
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "postgres" | "postgresql"))
        .ok_or_else(|| ScratchDbError::Url(url.to_owned()))?;
    let (location, query) = rest
        .split_once('?')
        .map_or((rest, None), |(l, q)| (l, Some(q)));
    let authority = location.split('/').next().unwrap_or_default();
    Ok(match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    })
}

/// The names of test databases: `widgets_test_<pid>_<n>_<random>`.
const TEST_PREFIX: &str = "widgets_test_";

/// A database for one test, on [`admin_url`]'s server. Every failure panics: a test has
/// nothing better to do with it. A test that passed calls [`TestDb::drop_db`]; one that
/// failed leaves its database to the next run's sweep.
#[derive(Debug)]
pub struct TestDb(ScratchDb);

impl TestDb {
    /// Creates an empty database for one test (sweeping dead processes' leftovers first,
    /// once per process).
    pub async fn create() -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        let admin = admin_url();
        SWEPT
            .get_or_init(|| async {
                if let Err(e) = sweep_orphans(&admin, TEST_PREFIX).await {
                    fail(&e);
                }
            })
            .await;
        let name = format!(
            "{TEST_PREFIX}{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        match ScratchDb::create(&admin, &name).await {
            Ok(db) => TestDb(db),
            Err(e) => fail(&e),
        }
    }

    pub async fn connect(&self) -> PgConnection {
        self.0
            .connect()
            .await
            .expect("connecting to the test database")
    }

    /// Drops the database (call at the end of a test that passed).
    pub async fn drop_db(self) {
        if let Err(e) = self.0.drop_db().await {
            panic!("DROP DATABASE: {}", chain(&e));
        }
    }
}

impl Deref for TestDb {
    type Target = ScratchDb;

    fn deref(&self) -> &ScratchDb {
        &self.0
    }
}

/// Panics with what to do when there is no server, or with the whole error otherwise.
fn fail(e: &ScratchDbError) -> ! {
    match e {
        ScratchDbError::Connect(..) => panic!(
            "PostgreSQL tests need a server. Set DATABASE_URL to a role that may CREATE \
             DATABASE (default {DEFAULT_ADMIN_URL}; `docker compose up -d` starts one): {}",
            chain(e)
        ),
        _ => panic!("preparing a test database: {}", chain(e)),
    }
}

/// An error and its sources, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_and_keeps_the_rest() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/x",
            ),
            (
                "postgresql://u:p@h/db?sslmode=disable",
                "postgresql://u:p@h/x?sslmode=disable",
            ),
            ("postgres://h:5432", "postgres://h:5432/x"),
            (
                "postgres://h?application_name=a",
                "postgres://h/x?application_name=a",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "x").unwrap(), expected, "{url}");
        }
        assert!(with_database("mysql://h/db", "x").is_err());
        assert!(with_database("h:5432/db", "x").is_err());
    }

    #[tokio::test]
    async fn a_name_that_is_not_plain_is_refused_before_connecting() {
        for bad in ["", "x; DROP DATABASE postgres", "Upper", "a-b"] {
            let e = ScratchDb::create("postgres://nowhere.invalid/db", bad)
                .await
                .expect_err(bad);
            assert!(matches!(e, ScratchDbError::Name(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn a_proxy_replaces_the_host_and_port_and_sees_plain_text() {
        let addr: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        for (url, via) in [
            (
                "postgres://postgres@127.0.0.1:5432/x?sslmode=disable",
                "postgres://postgres@127.0.0.1:6000/x?sslmode=disable",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/x",
                "postgres://postgres@127.0.0.1:6000/x?sslmode=disable",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/x?sslmode=require",
                "postgres://postgres@127.0.0.1:6000/x?sslmode=require&sslmode=disable",
            ),
        ] {
            let db = ScratchDb {
                admin_url: String::new(),
                name: "x".into(),
                url: url.into(),
            };
            assert_eq!(db.url_via(addr), via);
        }
    }
}
