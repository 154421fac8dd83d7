//! PostgreSQL for tests: a fresh database per test on the server `DATABASE_URL` names
//! (`TestDb`, from widgets-testkit), a TCP proxy in front of it that a test can cut and
//! restore to simulate an outage, and the tables' view of every widget.

use reqwest::StatusCode;
use sqlx::{PgConnection, Row};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use widgets::store::postgres::FlushTxSettings;
use widgets::store::PgStore;
pub use widgets_testkit::pg::TestDb;

/// A TCP proxy to the PostgreSQL server that can be cut (every connection dropped, new
/// ones refused) and restored, or made to stall like a network that stops answering.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
    stall: Arc<Stall>,
    /// Set by [`Proxy::vanish`].
    vanished: tokio::sync::watch::Sender<bool>,
    /// How each link's silent close went.
    silenced: Arc<Mutex<Vec<std::io::Result<()>>>>,
}

/// When the proxy's links stop carrying bytes: once a client sends the trigger (a
/// statement's text), every link holds what it reads until the proxy is thawed.
#[derive(Default)]
struct Stall {
    trigger: Mutex<Option<Vec<u8>>>,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl Stall {
    /// Waits while the links are stalled.
    async fn until_thawed(&self) {
        let mut stalled = self.stalled.subscribe();
        let _ = stalled.wait_for(|stalled| !stalled).await;
    }

    /// Stalls every link if `bytes` hold the trigger (which is then spent); returns
    /// whether they did.
    fn look_at(&self, bytes: &[u8]) -> bool {
        let mut trigger = self.trigger.lock().unwrap();
        let found = trigger
            .as_deref()
            .is_some_and(|t| bytes.windows(t.len()).any(|w| w == t));
        if found {
            *trigger = None;
            self.stalled.send_replace(true);
        }
        found
    }
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
        let stall = Arc::new(Stall::default());
        let vanished = tokio::sync::watch::Sender::new(false);
        let silenced: Arc<Mutex<Vec<std::io::Result<()>>>> = Arc::default();
        let accept = {
            let (cut, links, stall) = (cut.clone(), links.clone(), stall.clone());
            let (vanished, silenced) = (vanished.clone(), silenced.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let (target, stall) = (target.clone(), stall.clone());
                    let (mut vanish, silenced) = (vanished.subscribe(), silenced.clone());
                    let link = tokio::spawn(async move {
                        let mut client = client;
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let fd = std::os::fd::AsRawFd::as_raw_fd(&server);
                            // Borrowed halves: an owned write half sends a FIN when it is
                            // dropped, which a machine that vanished would not.
                            let (from_client, to_client) = client.split();
                            let (from_server, to_server) = server.split();
                            let vanished = tokio::select! {
                                _ = async {
                                    tokio::join!(
                                        pump(from_client, to_server, &stall, true),
                                        pump(from_server, to_client, &stall, false),
                                    )
                                } => false,
                                _ = vanish.wait_for(|v| *v) => true,
                            };
                            if vanished {
                                // Dropped at the end of this block, after this.
                                silenced.lock().unwrap().push(close_silently(fd));
                            }
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
            stall,
            vanished,
            silenced,
        }
    }

    /// As if this side's machine lost its power or its network: every link's connection
    /// to PostgreSQL goes without a word (no FIN, no reset; a packet PostgreSQL sends
    /// later is answered with a reset, as by a machine that came back without the
    /// process), and new connections are refused. Needs `CAP_NET_ADMIN` (root).
    ///
    /// Waits a second first, for the links' last acknowledgements to go out: PostgreSQL
    /// would send again what was not acknowledged, and that would meet the reset.
    pub async fn vanish(&self) {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        self.cut.store(true, Ordering::SeqCst);
        self.vanished.send_replace(true);
        let links: Vec<AbortHandle> = self.links.lock().unwrap().drain(..).collect();
        for link in &links {
            while !link.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let silenced = std::mem::take(&mut *self.silenced.lock().unwrap());
        assert!(!silenced.is_empty(), "no link to PostgreSQL was open");
        for closed in silenced {
            if let Err(e) = closed {
                panic!(
                    "TCP_REPAIR on the proxy's connection to PostgreSQL: {e} (this test needs \
                     CAP_NET_ADMIN: run it as root)"
                );
            }
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

    /// From the next time a client sends `statement`: PostgreSQL gets the message that
    /// carries it, and from then on nothing more goes either way on any connection, open or
    /// new, until [`Proxy::thaw`] (a network that stalls with a statement in flight). For a
    /// statement with parameters that message is sqlx's Parse, so PostgreSQL has not run
    /// it yet: what the session did before it stands (a lock it took stays taken).
    pub fn stall_on(&self, statement: &str) {
        *self.stall.trigger.lock().unwrap() = Some(statement.as_bytes().to_vec());
    }

    /// Whether the proxy is stalled.
    pub fn stalled(&self) -> bool {
        *self.stall.stalled.borrow()
    }

    /// Carries bytes again, what was held first.
    pub fn thaw(&self) {
        *self.stall.trigger.lock().unwrap() = None;
        self.stall.stalled.send_replace(false);
    }
}

/// Copies one direction of a link, holding each read while the proxy is stalled; what
/// comes `from_client` may set the stall off.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    stall: &Stall,
    from_client: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        stall.until_thawed().await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // What sets the stall off still goes: PostgreSQL runs the statement. Anything
        // else read is held, also a read that was waiting when the stall began.
        if !(from_client && stall.look_at(&buf[..n])) {
            stall.until_thawed().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Puts `fd`'s TCP connection in repair mode (`TCP_REPAIR`), in which closing it sends
/// nothing to the peer (a shutdown still would).
fn close_silently(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the caller holds `fd` open, and `on` outlives the call.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

/// Every association row whose mirror row is missing or different, in one snapshot.
pub async fn asymmetric_rows(conn: &mut PgConnection) -> Vec<String> {
    let mut tx = sqlx::Connection::begin(conn).await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut bad = Vec::new();
    for table in ["associations_p", "associations_r", "associations_q"] {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT a.serial_number, a.peer_serial_number FROM {table} a \
             LEFT JOIN {table} b ON b.serial_number = a.peer_serial_number \
             WHERE a.peer_serial_number IS NOT NULL \
               AND b.peer_serial_number IS DISTINCT FROM a.serial_number"
        ))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        bad.extend(
            rows.into_iter()
                .map(|(a, b)| format!("{table}: {a} -> {b}")),
        );
    }
    tx.commit().await.unwrap();
    bad
}

/// Sets `setting` to `value` (SQL, quoted as it needs) for every later session on `db`,
/// as an operator's `ALTER DATABASE` would; from the admin database, so that a setting
/// that makes `db`'s sessions read-only can be turned off again.
pub async fn set_for_database(db: &TestDb, setting: &str, value: &str) {
    use sqlx::Connection;
    let admin = widgets_testkit::pg::admin_url();
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    let sql = format!("ALTER DATABASE \"{}\" SET {setting} = {value}", db.name);
    sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
}

/// A session of `db` holding `widgets` locked (`ACCESS EXCLUSIVE`) in a transaction left
/// open: every flush that writes a widget row waits for it. `COMMIT` on it lets them go.
pub async fn lock_widgets(db: &TestDb) -> PgConnection {
    let mut locker = db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE widgets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("locking widgets");
    locker
}

/// Waits (up to 10 s) until no session of the database `conn` is inside a transaction it
/// has left idle: what an abandoned transaction's connection, closed rather than pooled,
/// leaves once PostgreSQL has seen the close.
pub async fn no_transaction_left_open(conn: &mut PgConnection) {
    eventually!("every session's transaction to end", 10, {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("reading pg_stat_activity");
        open == 0
    });
}

/// A store on `url`, migrated, whose flushes time out after `timeout` (and which waits
/// twice that for PostgreSQL's answers).
pub async fn store_timing_out_after(url: &str, timeout: std::time::Duration) -> PgStore {
    let store = PgStore::connect(url)
        .await
        .expect("connecting the store")
        .with_flush_settings(FlushTxSettings {
            timeout,
            ..Default::default()
        });
    store.migrate().await.expect("migrating");
    store
}

/// What a Redis-mode flush in flight holds until it ends, in a transaction begun on
/// `conn`: the fencing epoch, share-locked.
pub async fn hold_the_epoch(conn: &mut PgConnection) -> sqlx::Transaction<'_, sqlx::Postgres> {
    use sqlx::Connection;
    let mut tx = conn.begin().await.expect("BEGIN");
    let _: i64 = sqlx::query_scalar("SELECT epoch FROM redis_epoch FOR SHARE")
        .fetch_one(&mut *tx)
        .await
        .expect("share-locking the epoch");
    tx
}

/// The backend PID of a session of the database `conn` is on that waits for a lock, once
/// one does (within 10 s).
pub async fn backend_waiting_for_a_lock(conn: &mut PgConnection) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .expect("reading pg_stat_activity");
        if let Some(pid) = waiting {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for a session to wait for a lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `widgets` started in `dir` with `args` (a PostgreSQL store), and widget `a` created
/// while `widgets` is locked, so that the flush that writes it waits: the server, the
/// locking session (`COMMIT` on it lets the flush go), a session to watch with, and the
/// PID of the waiting flush's backend.
pub async fn a_flush_held_by_a_lock(
    db: &TestDb,
    dir: &std::path::Path,
    args: &[&str],
) -> (super::binary::Server, PgConnection, PgConnection, i32) {
    let server = super::binary::start(dir, args).await;
    let locker = lock_widgets(db).await;
    assert_eq!(
        super::binary::create(&server, "a").await,
        StatusCode::CREATED
    );
    let mut watcher = db.connect().await;
    let pid = backend_waiting_for_a_lock(&mut watcher).await;
    (server, locker, watcher, pid)
}
