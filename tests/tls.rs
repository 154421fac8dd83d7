//! TLS to PostgreSQL and (Redis mode) Redis, against real servers: the service reaches a
//! PostgreSQL that wants `sslmode=require` over an encrypted session, trusts the CA a URL
//! names in `sslrootcert`, and stops at once on a certificate that fails verification
//! (no retry mends it) instead of waiting as for a server that is down; in Redis mode it
//! serves from a Redis that speaks only TLS (`rediss://`), trusting the CA the system's
//! roots hold, and no other.
//!
//! The PostgreSQL tests need the server to accept TLS (`ssl = on`); each says what to set
//! when it does not.

#[macro_use]
mod common;

use common::binary;
use common::pg::TestDb;
use sqlx::{Connection, PgConnection};
use std::process::Command;
use std::time::Duration;
use widgets::store::{PgStore, Store};
use widgets_testkit::server::{log_on_a_pipe, output_within};

/// `url` with `params` (`key=value&...`) added to its query.
fn with_params(url: &str, params: &str) -> String {
    let joint = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joint}{params}")
}

/// A connection to `db` without TLS, after checking that the server accepts TLS at all:
/// panics saying what to set if it does not.
async fn plain_connection(db: &TestDb) -> PgConnection {
    let mut conn = PgConnection::connect(&with_params(&db.url, "sslmode=disable"))
        .await
        .expect("connecting to the test database without TLS");
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "the TLS tests need a PostgreSQL that accepts TLS, and the one DATABASE_URL names \
         (default 127.0.0.1:5432) has `ssl = off`: set `ssl = on` in its postgresql.conf with \
         ssl_cert_file and ssl_key_file (Debian's ssl-cert package makes a self-signed \
         \"snakeoil\" pair) and reload it (SELECT pg_reload_conf())"
    );
    conn
}

/// Whether the session on `conn` is encrypted, as the server sees it.
async fn encrypted(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn sslmode_require_reaches_postgres_over_an_encrypted_session() {
    let db = TestDb::create().await;
    let mut plain = plain_connection(&db).await;
    assert!(
        !encrypted(&mut plain).await,
        "sslmode=disable was encrypted"
    );
    let url = with_params(&db.url, "sslmode=require");
    let mut conn = PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting with sslmode=require: {e}"));
    assert!(
        encrypted(&mut conn).await,
        "sslmode=require, and not encrypted"
    );
    // The store's own pool, as the service opens it.
    let store = PgStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PgStore::connect with sslmode=require: {e}"));
    store.migrate().await.unwrap();
    assert_eq!(store.len_hint().await.unwrap(), 0);
    drop((conn, plain, store));
    db.drop_db().await;
}

#[tokio::test]
async fn the_service_on_sslmode_require_holds_only_encrypted_sessions() {
    let db = TestDb::create().await;
    let mut plain = plain_connection(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let url = with_params(&db.url, "sslmode=require");
    let server = binary::start(dir.path(), &["--database-url", &url]).await;
    assert_eq!(binary::create(&server, "tls1").await, 201);
    eventually!("the widget to reach PostgreSQL", 10, {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM widgets WHERE serial_number = 'tls1'")
            .fetch_one(&mut plain)
            .await
            .unwrap()
            == 1
    });
    // Every session the service holds on its database (its pool, and the single-writer
    // lock's own session), other than this test's.
    let (sessions, all_encrypted): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut plain)
    .await
    .unwrap();
    assert!(sessions >= 2, "the service holds {sessions} sessions");
    assert_eq!(
        all_encrypted,
        Some(true),
        "a session of the service is not encrypted"
    );
    binary::stop_within(server, Duration::from_secs(20)).await;
    drop(plain);
    db.drop_db().await;
}

/// The binary on a temporary data directory with `args` and more environment `env`, and
/// what it printed, if it exits within `within`.
fn exits_within(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
    within: Duration,
) -> Option<std::process::Output> {
    let dir = tempfile::tempdir().unwrap();
    let child = log_on_a_pipe(&mut Command::new(env!("CARGO_BIN_EXE_widgets")))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .envs(env.iter().copied())
        .spawn()
        .expect("starting widgets");
    output_within(child, within)
}

/// A CA of the test's own, self-signed, as PEM in `dir`: its key, and the file.
fn a_ca(dir: &std::path::Path) -> (rcgen::Issuer<'static, rcgen::KeyPair>, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let file = dir.join("ca.pem");
    std::fs::write(&file, cert.pem()).unwrap();
    (Issuer::new(params, key), file)
}

/// The environment that makes the certificates in the file `roots` the system's roots,
/// alone: rustls-native-certs reads `SSL_CERT_FILE` and `SSL_CERT_DIR` (an empty one
/// names no directory) instead of the system's store when either is set.
fn roots_alone(roots: &std::path::Path) -> [(&'static str, &std::path::Path); 2] {
    [
        ("SSL_CERT_FILE", roots),
        ("SSL_CERT_DIR", std::path::Path::new("")),
    ]
}

/// `widgets migrate` on `url` (one connection, no retry) with [`roots_alone`]: whether
/// it succeeded, and its log.
fn migrate_trusting(url: &str, roots: &std::path::Path) -> (bool, String) {
    let out = exits_within(
        &["--database-url", url, "migrate"],
        &roots_alone(roots),
        Duration::from_secs(30),
    )
    .expect("widgets migrate still ran after 30 s");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), log)
}

#[tokio::test]
async fn verification_trusts_the_ca_that_sslrootcert_names() {
    let db = TestDb::create().await;
    let mut plain = plain_connection(&db).await;
    let dir = tempfile::tempdir().unwrap();
    // Roots that hold none of the server's issuers, whatever this machine's store holds
    // (Debian's ssl-cert links its snakeoil certificate into the system's store).
    let (_, unrelated) = a_ca(dir.path());
    let verify_full = with_params(&db.url, "sslmode=verify-full");
    let (migrated, log) = migrate_trusting(&verify_full, &unrelated);
    assert!(
        !migrated,
        "verify-full trusted a certificate no root signed: {log}"
    );
    assert!(log.contains("UnknownIssuer"), "{log}");
    // The server's own certificate, self-signed, as its CA (read as the superuser the
    // tests' admin URL names).
    let pem: String = sqlx::query_scalar("SELECT pg_read_file(current_setting('ssl_cert_file'))")
        .fetch_one(&mut plain)
        .await
        .expect("reading the server's certificate (the tests' role must be a superuser)");
    let ca = dir.path().join("server-ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let url = with_params(&verify_full, &format!("sslrootcert={}", ca.display()));
    // The issuer is now known. What may be left is the name: the tests connect to
    // 127.0.0.1, which a certificate made for a host name does not hold.
    let (migrated, log) = migrate_trusting(&url, &unrelated);
    assert!(
        migrated || log.contains("not valid for name"),
        "with the server's certificate as its CA: {log}"
    );
    assert!(
        !log.contains("UnknownIssuer"),
        "sslrootcert was not trusted: {log}"
    );
    drop(plain);
    db.drop_db().await;
}

#[tokio::test]
async fn a_certificate_that_fails_verification_stops_the_start_instead_of_waiting() {
    let db = TestDb::create().await;
    drop(plain_connection(&db).await);
    // Roots that hold none of the server's issuers.
    let dir = tempfile::tempdir().unwrap();
    let (_, unrelated) = a_ca(dir.path());
    let url = with_params(&db.url, "sslmode=verify-full");
    let roots = roots_alone(&unrelated);
    let out = exits_within(&["--database-url", &url], &roots, Duration::from_secs(30)).expect(
        "the service still waited after 30 s: a certificate no retry mends was retried as a \
         PostgreSQL that is not reachable yet",
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("TLS to PostgreSQL failed"), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert!(!log.contains("not reachable yet"), "{log}");
    db.drop_db().await;
}

#[test]
fn an_sslrootcert_that_cannot_be_read_refuses_the_start_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-ca.pem");
    let url = format!(
        "postgres://widgets:secret@127.0.0.1:1/widgets?sslmode=verify-full&sslrootcert={}",
        missing.display()
    );
    let out = exits_within(&["--database-url", &url], &[], Duration::from_secs(10))
        .expect("the service started on an sslrootcert it cannot read");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("DATABASE_URL's sslrootcert"), "{log}");
    assert!(log.contains("missing-ca.pem"), "{log}");
    assert!(!log.contains("secret"), "{log}");
}

/// Redis mode over TLS: a Redis of the test's own that has no plain port at all.
#[cfg(feature = "redis")]
mod redis_tls {
    use super::*;
    use common::redis_prefix;
    use widgets_testkit::server::{Server, ServerCommand};

    /// A CA, and a certificate it signed for 127.0.0.1 and localhost, as PEM files in
    /// `dir`: (ca, server certificate, server key).
    fn certificates(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
        let (issuer, ca) = a_ca(dir);
        let key = rcgen::KeyPair::generate().unwrap();
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let files = [ca, dir.join("server.pem"), dir.join("server.key")];
        std::fs::write(&files[1], cert.pem()).unwrap();
        std::fs::write(&files[2], key.serialize_pem()).unwrap();
        files
    }

    /// redis-server listening on TLS alone, on a free port; killed on drop.
    struct TlsRedis {
        port: u16,
        child: std::process::Child,
    }

    impl TlsRedis {
        async fn start(dir: &std::path::Path, [ca, cert, key]: &[std::path::PathBuf; 3]) -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", "0"])
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"])
                .arg("--dir")
                .arg(dir)
                .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("starting redis-server: install Redis (Debian: redis-server) on the PATH");
            let redis = TlsRedis { port, child };
            eventually!("redis-server to listen on its TLS port", 10, {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            });
            redis
        }
    }

    impl Drop for TlsRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The binary in Redis mode on `redis_url`, with `env`; started, not yet ready.
    async fn instance(db: &TestDb, redis_url: &str, env: &[(&str, &str)]) -> Server {
        let mut command = ServerCommand::new(env!("CARGO_BIN_EXE_widgets"));
        command.args = [
            "--database-url",
            &db.url,
            "--redis-url",
            redis_url,
            "--redis-prefix",
            &redis_prefix(),
        ]
        .map(str::to_owned)
        .into();
        command.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        command.echo_log = std::env::var_os("TEST_LOG").is_some();
        Server::start(&command)
            .await
            .unwrap_or_else(|e| panic!("starting the widgets binary: {e}"))
    }

    #[tokio::test]
    async fn rediss_serves_from_a_redis_that_speaks_only_tls_trusting_the_system_roots() {
        let dir = tempfile::tempdir().unwrap();
        let files = certificates(dir.path());
        let redis = TlsRedis::start(dir.path(), &files).await;
        let db = TestDb::create().await;
        let url = format!("rediss://127.0.0.1:{}", redis.port);
        // The system's roots, pointed at the test's CA as an operator points them at a
        // private one.
        let ca = files[0].display().to_string();
        let server = instance(&db, &url, &[("SSL_CERT_FILE", &ca)]).await;
        server
            .wait_ready(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("Redis mode over TLS: {e}"));
        assert_eq!(binary::create(&server, "tls-redis").await, 201);
        let got = reqwest::get(format!("{}/widgets/tls-redis", server.base))
            .await
            .unwrap();
        assert_eq!(got.status(), 200);
        binary::stop_within(server, Duration::from_secs(30)).await;
        drop(redis);
        db.drop_db().await;
    }

    #[tokio::test]
    async fn rediss_refuses_a_certificate_the_roots_do_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let files = certificates(dir.path());
        let redis = TlsRedis::start(dir.path(), &files).await;
        let db = TestDb::create().await;
        let url = format!("rediss://127.0.0.1:{}", redis.port);
        // The system's own roots: none signed the test's CA. (Each attempt takes ~10 s:
        // the Redis client's own retries, before the service's.)
        let server = instance(&db, &url, &[]).await;
        let err = server
            .wait_ready(Duration::from_secs(20))
            .await
            .expect_err("ready on a Redis whose certificate no trusted root signed");
        let log = err.to_string();
        assert!(log.contains("Redis cannot be loaded yet"), "{log}");
        assert!(log.contains("invalid peer certificate"), "{log}");
        drop(server);
        drop(redis);
        db.drop_db().await;
    }

    #[test]
    fn rediss_without_a_certificate_check_refuses_the_start() {
        let url = "rediss://:secret@127.0.0.1:1/#insecure";
        let out = exits_within(
            &[
                "--database-url",
                "postgres://postgres@127.0.0.1:1/widgets",
                "--redis-url",
                url,
            ],
            &[],
            Duration::from_secs(10),
        )
        .expect("the service started on a rediss URL that checks no certificate");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{log}");
        assert!(log.contains("#insecure"), "{log}");
        assert!(!log.contains("secret"), "{log}");
    }
}
