//! TLS to PostgreSQL and Redis (README, "TLS to PostgreSQL and Redis").
//!
//! Both clients speak TLS through rustls with the ring crypto provider, and trust the
//! system's root certificates (Debian's `ca-certificates` in the image; `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` point elsewhere), plus, for PostgreSQL, the CA a URL names in
//! `sslrootcert`. PostgreSQL takes libpq's `sslmode` (`disable`, `prefer` — sqlx's default
//! —, `require`, `verify-ca`, `verify-full`); Redis takes the `rediss://` scheme, which
//! always verifies the server's certificate and name.
//!
//! A TLS setting that cannot work is a mistake in the settings, not a server that is down,
//! and is reported as one rather than retried as "not reachable yet": a certificate or key
//! file that cannot be read, or `rediss://...#insecure` (no certificate check, which this
//! build refuses), at start ([`check_postgres_url`], [`check_redis_url`]); a server that
//! refuses TLS, or whose certificate fails verification, at the first connection to
//! PostgreSQL ([`refused_postgres`]). Redis's client reports the same failures of a
//! connection only as text, so those are retried like an unreachable Redis, each retry's
//! log line saying what TLS refused.

use crate::store::StoreError;
use anyhow::bail;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::str::FromStr;

/// Makes rustls's ring provider the process's default. sqlx names its provider itself;
/// Redis's client takes the process default, which rustls can only guess from its crate
/// features (and panics on when two providers are compiled in). Called once at start, by
/// the binary; a provider installed before (by an embedding program) is kept.
pub fn install_crypto_provider() {
    // rustls deprecates ring's provider for lacking post-quantum key exchange, which
    // aws-lc-rs has; but sqlx 0.8 trusts the system's roots only with ring, and both
    // clients should trust the same roots with the same provider.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificate and key files `DATABASE_URL` (or libpq's `PGSSLROOTCERT`, `PGSSLCERT`
/// and `PGSSLKEY`, which sqlx reads too) names for the handshake its `sslmode` makes: one
/// that cannot be read, or a client certificate without its key, refuses the start,
/// naming the parameter and the file (never the URL, which may hold a password). A value
/// of one of those variables that is the PEM itself is not a file; in the URL, sqlx takes
/// every value for a file's name, so a PEM there is refused (without printing it: it may
/// be a private key).
pub fn check_postgres_url(url: &str) -> anyhow::Result<()> {
    let Ok(options) = PgConnectOptions::from_str(url) else {
        return Ok(()); // Config::check_store_urls says what is wrong with it.
    };
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    // (where it was set, the value, whether sqlx takes a PEM there for the PEM itself)
    let param = |names: &[&str], env: &str| {
        let from_url = parsed
            .query_pairs()
            .filter(|(key, _)| names.contains(&&**key))
            .last()
            .map(|(key, value)| (format!("DATABASE_URL's {key}"), value.into_owned(), false));
        from_url.or_else(|| std::env::var(env).ok().map(|v| (env.to_owned(), v, true)))
    };
    let mode = options.get_ssl_mode();
    let handshake = !matches!(mode, PgSslMode::Disable | PgSslMode::Allow);
    let verifies = matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull);
    let root = param(&["sslrootcert", "ssl-root-cert", "ssl-ca"], "PGSSLROOTCERT");
    let cert = param(&["sslcert", "ssl-cert"], "PGSSLCERT");
    let key = param(&["sslkey", "ssl-key"], "PGSSLKEY");
    if handshake && cert.is_some() != key.is_some() {
        bail!(
            "DATABASE_URL: a client certificate (sslcert) and its key (sslkey) go together: \
             set both or neither"
        );
    }
    let read = [(verifies, root), (handshake, cert), (handshake, key)];
    for (name, value, pem_taken) in read.into_iter().filter_map(|(used, p)| p.filter(|_| used)) {
        let trimmed = value.trim();
        if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
            if pem_taken {
                continue; // The PEM itself, as sqlx takes it.
            }
            bail!(
                "{name} holds a PEM, but sqlx reads a value in the URL as a file's name: \
                 give the file's path, or the PEM in PGSSLROOTCERT, PGSSLCERT or PGSSLKEY"
            );
        }
        if let Err(e) = std::fs::read(&value) {
            bail!("{name}: cannot read {value}: {e}");
        }
    }
    Ok(())
}

/// `REDIS_URL`'s TLS settings: `rediss://...#insecure` asks for no certificate check,
/// which this build does not do (a server anyone on the path can impersonate would be
/// given every widget), so it refuses the start rather than failing every connection.
#[cfg(feature = "redis")]
pub fn check_redis_url(url: &str) -> anyhow::Result<()> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.into_connection_info() else {
        return Ok(()); // Config::check_store_urls says what is wrong with it.
    };
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        bail!(
            "REDIS_URL asks for TLS without checking the server's certificate (#insecure), \
             which this build does not do: trust the server's CA instead (SSL_CERT_FILE; \
             README, TLS to PostgreSQL and Redis)"
        );
    }
    Ok(())
}

/// Whether connecting to PostgreSQL failed because TLS refused the connection as
/// configured: the server does not speak TLS and `sslmode` requires it, its certificate
/// or name fails verification (`verify-ca`, `verify-full`), a certificate or key is not
/// one, or the server refused ours. No retry mends these, where an unreachable server
/// comes back.
pub fn refused_postgres(e: &StoreError) -> bool {
    let StoreError::Postgres(e) = e else {
        return false;
    };
    match e {
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => true,
        // rustls's own errors (a certificate refused, an alert from the server) reach sqlx
        // inside the handshake's I/O error.
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

/// What the start fails with when [`refused_postgres`] holds.
pub fn postgres_refused(e: StoreError) -> anyhow::Error {
    anyhow::Error::new(e).context(
        "TLS to PostgreSQL failed in a way no retry mends: check DATABASE_URL's sslmode, \
         sslrootcert, sslcert and sslkey against the server's certificate (README, TLS to \
         PostgreSQL and Redis)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_of(inner: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::Postgres(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            inner,
        )))
    }

    #[test]
    fn tls_refusals_are_not_an_unreachable_server() {
        let refused = [
            StoreError::Postgres(sqlx::Error::Tls("server does not support TLS".into())),
            StoreError::Postgres(sqlx::Error::Configuration("no keys found".into())),
            io_of(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        ];
        for e in &refused {
            assert!(refused_postgres(e), "{e}");
        }
        let passing = [
            StoreError::Postgres(sqlx::Error::Io(
                std::io::ErrorKind::ConnectionRefused.into(),
            )),
            io_of("unexpected end of file"),
            StoreError::Postgres(sqlx::Error::PoolTimedOut),
            StoreError::Task("a task".into()),
        ];
        for e in &passing {
            assert!(!refused_postgres(e), "{e}");
        }
    }

    #[test]
    fn unreadable_tls_files_are_refused_by_name_and_without_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "not read here").unwrap();
        let (pem, missing) = (pem.display(), dir.path().join("gone.pem"));
        let missing = missing.display();
        let base = "postgres://u:secret@127.0.0.1/db";
        for fine in [
            format!("{base}?sslmode=verify-full&sslrootcert={pem}"),
            format!("{base}?sslmode=require&sslcert={pem}&sslkey={pem}"),
            // Read only by a handshake that verifies, or none at all.
            format!("{base}?sslmode=require&sslrootcert={missing}"),
            format!("{base}?sslmode=disable&sslcert={missing}&sslkey={missing}"),
        ] {
            check_postgres_url(&fine).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
        for (bad, names) in [
            (
                format!("{base}?sslmode=verify-ca&sslrootcert={missing}"),
                "sslrootcert",
            ),
            (
                format!("{base}?sslmode=verify-full&ssl-root-cert={missing}"),
                "ssl-root-cert",
            ),
            (format!("{base}?sslcert={missing}&sslkey={pem}"), "sslcert"),
            (format!("{base}?sslmode=require&sslcert={pem}"), "sslkey"),
            // sqlx would look for a file of that name, and wait for ever.
            (
                format!("{base}?sslmode=verify-ca&sslrootcert=-----BEGIN%20CERTIFICATE-----"),
                "holds a PEM",
            ),
        ] {
            let err = check_postgres_url(&bad).unwrap_err().to_string();
            assert!(err.contains(names), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn rediss_without_a_certificate_check_is_refused() {
        assert!(check_redis_url("rediss://127.0.0.1:6380").is_ok());
        assert!(check_redis_url("redis://127.0.0.1:6379").is_ok());
        let err = check_redis_url("rediss://:secret@127.0.0.1:6380/#insecure")
            .unwrap_err()
            .to_string();
        assert!(err.contains("#insecure"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
