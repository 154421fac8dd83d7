//! PostgreSQL for tests: a fresh database per test on the server `DATABASE_URL` names, and
//! a TCP proxy in front of it that a test can cut and restore to simulate an outage.

use reqwest::StatusCode;
use sqlx::{Connection, PgConnection, Row};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The server tests use when `DATABASE_URL` is unset: the local one this project's CI and
/// `docker compose up -d` provide.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
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
        static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server. Set DATABASE_URL to a role that may CREATE \
                 DATABASE (default {DEFAULT_URL}; `docker compose up -d` starts one): {e}"
            )
        });
        SWEPT.get_or_init(|| drop_orphans(&admin)).await;
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

/// Drops the databases of test processes that are gone (a failed test, or one that never
/// stopped its app, leaves its database behind); names carry the process id.
async fn drop_orphans(admin: &str) {
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("admin connection");
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'widgets\\_test\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("listing test databases");
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
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

/// A widget as the tables hold it: name, ports bitmask, peer per port (P, R, Q).
pub type Row3 = (String, i16, [Option<String>; 3]);

pub async fn pg_state(conn: &mut PgConnection) -> BTreeMap<String, Row3> {
    let mut out = BTreeMap::new();
    for row in sqlx::query("SELECT serial_number, name, ports FROM widgets")
        .fetch_all(&mut *conn)
        .await
        .unwrap()
    {
        out.insert(row.get(0), (row.get(1), row.get(2), [None, None, None]));
    }
    for (i, table) in ["associations_p", "associations_r", "associations_q"]
        .iter()
        .enumerate()
    {
        for row in sqlx::query(&format!(
            "SELECT serial_number, peer_serial_number FROM {table} \
             WHERE peer_serial_number IS NOT NULL"
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        {
            let serial: String = row.get(0);
            out.get_mut(&serial)
                .expect("association row without a widget row")
                .2[i] = Some(row.get(1));
        }
    }
    out
}

/// The same view, read from the service over HTTP.
pub async fn app_state(
    app_url: impl Fn(&str) -> String,
    serials: &[String],
) -> BTreeMap<String, Row3> {
    let client = reqwest::Client::new();
    let mut out = BTreeMap::new();
    for serial in serials {
        let r = client
            .get(app_url(&format!("/widgets/{serial}")))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            continue;
        }
        let w: serde_json::Value = r.json().await.unwrap();
        let mut bits = 0i16;
        let mut peers = [None, None, None];
        for (i, port) in ["P", "R", "Q"].iter().enumerate() {
            if w["ports"].as_array().unwrap().iter().any(|p| p == port) {
                bits |= 1 << i;
                peers[i] = w["associations"][port].as_str().map(str::to_owned);
            }
        }
        out.insert(
            serial.clone(),
            (w["name"].as_str().unwrap().to_owned(), bits, peers),
        );
    }
    out
}
