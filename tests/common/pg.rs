//! PostgreSQL for tests: a fresh database per test on the server `DATABASE_URL` names, and
//! a TCP proxy in front of it that a test can cut and restore to simulate an outage.

use sqlx::{Connection, PgConnection};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The server tests use when `DATABASE_URL` is unset: the local one this project's CI and
/// `docker compose up -d` provide.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL has a /database part");
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database for one test.
    pub async fn create() -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server. Set DATABASE_URL to a role that may CREATE \
                 DATABASE (default {DEFAULT_URL}; `docker compose up -d` starts one): {e}"
            )
        });
        let name = format!(
            "widgets_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        TestDb {
            url: with_database(&admin, &name),
            name,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connecting to the test database")
    }

    /// Drops the database (call at the end of a test that passed).
    pub async fn drop_db(self) {
        let mut conn = PgConnection::connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .expect("DROP DATABASE");
    }

    /// The URL of this database reached through `proxy`.
    pub fn url_via(&self, proxy: &Proxy) -> String {
        let after_at = self
            .url
            .rsplit_once('@')
            .map_or(self.url.as_str(), |(_, rest)| rest);
        let host_port = after_at.split('/').next().expect("host:port");
        self.url.replacen(host_port, &proxy.addr.to_string(), 1)
    }
}

/// A TCP proxy to the PostgreSQL server that can be cut (every connection dropped, new
/// ones refused) and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(db: &TestDb) -> Proxy {
        let after_at = db
            .url
            .rsplit_once('@')
            .map_or(db.url.as_str(), |(_, rest)| rest);
        let target = after_at.split('/').next().expect("host:port").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, links) = (cut.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let target = target.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            })
            .abort_handle()
        };
        Proxy {
            addr,
            cut,
            links,
            accept,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
