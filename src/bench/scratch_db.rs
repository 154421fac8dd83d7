//! Throwaway PostgreSQL databases for one bench run, created through the URL the user gave
//! (which must name a role that may `CREATE DATABASE`) and dropped at the end, so a run
//! starts from empty tables and never writes into the database that URL names.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ScratchDbError {
    #[error("'{0}' is not a postgres://… URL")]
    Url(String),
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
    /// Creates `widgets_bench_<purpose>_<pid>`, empty.
    pub async fn create(admin_url: &str, purpose: &str) -> Result<ScratchDb, ScratchDbError> {
        let name = format!("widgets_bench_{purpose}_{}", std::process::id());
        let url = with_database(admin_url, &name)?;
        let db = ScratchDb {
            admin_url: admin_url.to_owned(),
            name,
            url,
        };
        let mut conn = db.admin().await?;
        let ddl = |e| ScratchDbError::Ddl(db.name.clone(), e);
        let stale: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&db.name)
                .fetch_one(&mut conn)
                .await
                .map_err(ddl)?;
        if stale {
            // Left by an interrupted run that had the same pid.
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

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_db(self) -> Result<(), ScratchDbError> {
        let mut conn = self.admin().await?;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&mut conn)
            .await
            .map_err(|e| ScratchDbError::Ddl(self.name.clone(), e))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// A connection to the admin URL's database. Its statements are not logged: a
    /// `DROP DATABASE` routinely takes over sqlx's one-second "slow statement" warning.
    async fn admin(&self) -> Result<PgConnection, ScratchDbError> {
        let connect = |e| ScratchDbError::Connect(self.name.clone(), e);
        let options = PgConnectOptions::from_str(&self.admin_url)
            .map_err(connect)?
            .disable_statement_logging();
        PgConnection::connect_with(&options).await.map_err(connect)
    }
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
}
