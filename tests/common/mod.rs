//! Test helpers: start the app in-process on port 0 in a fresh temp dir, with typed
//! request helpers. Set `TEST_LOG=1` to see the app's logs.

#![allow(dead_code)]

/// Polls `$check` (an expression that may `.await`) until it holds or `$secs` pass.
#[allow(unused_macros)]
macro_rules! eventually {
    ($what:expr, $secs:expr, $check:expr) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs($secs);
        while !$check {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }};
}

pub mod binary;
pub mod pg;

use clap::Parser;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Once};
use tempfile::TempDir;
use widgets::app::{self, RunningApp};
use widgets::config::Config;
use widgets::data_dir::LockError;
use widgets::wal::{RealFs, WalFs};

static TRACING: Once = Once::new();

fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
                .with_test_writer()
                .init();
        }
    });
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    /// The data directory; kept alive as long as the app (and reusable for a restart).
    pub dir: Arc<TempDir>,
    app: Option<RunningApp>,
    /// The PostgreSQL database of a Redis-mode app, dropped when the app stops.
    db: Option<pg::TestDb>,
}

/// Which engine a test app runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// Single node: the in-process map, the WAL, the embedded store.
    Memory,
    /// Redis mode, on its own key prefix and its own PostgreSQL database.
    #[cfg(feature = "redis")]
    Redis,
}

/// The Redis tests use: `REDIS_URL`, or the local server CI and docker compose provide.
#[cfg(feature = "redis")]
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses: `test:<pid>:<random>:`. The first call in a test
/// process removes the keys of test processes that are gone (no test deletes its own), so
/// that they do not pile up run after run: a Redis-mode start scans the keyspace for its
/// prefix, and 1.8 M leftover keys once made that scan outlast a test's wait.
#[cfg(feature = "redis")]
pub fn redis_prefix() -> String {
    static SWEPT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Err(e) = SWEPT.get_or_init(sweep_dead_prefixes) {
        panic!("{e}");
    }
    format!("test:{}:{}:", std::process::id(), fastrand::u64(..))
}

/// Unlinks every `test:<pid>:` key whose process is gone, as the PostgreSQL tests drop
/// the databases of dead processes, and on the same assumption: every test process that
/// shares this Redis runs on this host, in this PID namespace.
#[cfg(feature = "redis")]
pub fn sweep_dead_prefixes() -> Result<(), String> {
    let url = redis_url();
    let fail =
        |what: &str, e: redis::RedisError| format!("{what} Redis at {url} (set REDIS_URL): {e}");
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|client| client.get_connection_with_timeout(std::time::Duration::from_secs(5)))
        .map_err(|e| fail("connecting to", e))?;
    let gone = |key: &String| {
        let pid = key
            .split(':')
            .nth(1)
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("test:*")
            .arg("COUNT")
            .arg(10_000)
            .query(&mut conn)
            .map_err(|e| fail("scanning", e))?;
        let dead: Vec<&String> = keys.iter().filter(|key| gone(key)).collect();
        if !dead.is_empty() {
            redis::cmd("UNLINK")
                .arg(dead)
                .query::<()>(&mut conn)
                .map_err(|e| fail("removing dead tests' keys from", e))?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The token the contract suite's auth variant sets, and sends on every request.
pub const AUTH_TOKEN: &str = "contract-token";

/// A ready app on `backend` with extra settings; with `auth`, every class of request
/// needs a token (`--auth-token`, `--auth-reads`, `--auth-metrics`) and the app's client
/// sends it on every request, so the contract holds with auth on as with it off.
pub async fn spawn_backend_auth(backend: Backend, args: &[&str], auth: bool) -> TestApp {
    if !auth {
        return spawn_backend(backend, args).await;
    }
    let flag = format!("--auth-token={AUTH_TOKEN}");
    let mut all = vec![flag.as_str(), "--auth-reads", "--auth-metrics"];
    all.extend_from_slice(args);
    let mut app = spawn_backend(backend, &all).await;
    app.client = bearer_client(AUTH_TOKEN);
    app
}

/// A client that sends `Authorization: Bearer <token>` on every request.
pub fn bearer_client(token: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("a header value"),
    );
    Client::builder()
        .default_headers(headers)
        .build()
        .expect("a client")
}

/// A ready app on `backend` with extra settings.
pub async fn spawn_backend(backend: Backend, args: &[&str]) -> TestApp {
    match backend {
        Backend::Memory => spawn_app_with(args).await,
        #[cfg(feature = "redis")]
        Backend::Redis => {
            let db = pg::TestDb::create().await;
            let mut app = spawn_redis_instance(&db, &redis_prefix(), args).await;
            app.db = Some(db);
            app
        }
    }
}

/// A ready Redis-mode app on `db` and the keys under `prefix` (instances given the same
/// ones share their state), flushing every 100 ms, with extra settings.
#[cfg(feature = "redis")]
pub async fn spawn_redis_instance(db: &pg::TestDb, prefix: &str, args: &[&str]) -> TestApp {
    let redis = redis_url();
    let mut all = vec![
        "--database-url",
        &db.url,
        "--redis-url",
        &redis,
        "--redis-prefix",
        prefix,
        "--flush-interval",
        "100ms",
    ];
    all.extend_from_slice(args);
    spawn_app_with(&all).await
}

/// A ready app in a new temp dir, with extra command-line settings.
pub async fn spawn_app_with(args: &[&str]) -> TestApp {
    let dir = Arc::new(TempDir::new().expect("temp dir"));
    spawn_app_in(dir, args, Arc::new(RealFs)).await
}

/// A ready app on an existing data dir and file system (for restarts and fault injection).
///
/// A data directory an app of this process has just let go of can still look locked by
/// this process for a moment: a test running beside it that starts a child process forks
/// first, and the child holds a copy of every open file, the lock's included, until it
/// execs. So a start refused for a lock this process holds is tried again, for a while.
pub async fn spawn_app_in(dir: Arc<TempDir>, args: &[&str], fs: Arc<dyn WalFs>) -> TestApp {
    let mut app = spawn_unready_in(dir, args, fs).await;
    app.ready().await.expect("the app did not become ready");
    app
}

/// An app started on `dir` and serving HTTP, recovering or not yet ready.
pub async fn spawn_unready_in(dir: Arc<TempDir>, args: &[&str], fs: Arc<dyn WalFs>) -> TestApp {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let app = loop {
        match try_spawn_app_in(dir.path(), args, fs.clone()).await {
            Err(e) if held_by_this_process(&e) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            started => break started.expect("starting the app"),
        }
    };
    TestApp {
        addr: app.addr(),
        client: Client::new(),
        dir,
        app: Some(app),
        db: None,
    }
}

/// Whether `e` is a data directory's lock held by this very process.
fn held_by_this_process(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<LockError>(),
        Some(LockError::Held { holder, .. }) if *holder == std::process::id().to_string())
}

/// Starts (without waiting for recovery) an app on `dir`.
pub async fn try_spawn_app_in(
    dir: &Path,
    args: &[&str],
    fs: Arc<dyn WalFs>,
) -> anyhow::Result<RunningApp> {
    init_tracing();
    let data_dir = dir.to_str().expect("utf-8 temp dir");
    // Empty --database-url and --redis-url mean single node on the embedded store, whatever
    // the environment says; tests that want PostgreSQL or Redis pass their own in `args`,
    // which win.
    let mut argv = vec![
        "widgets",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--database-url=",
        "--redis-url=",
        // Zero-filled segments of a megabyte, not 64: every start writes one, and a spare.
        "--wal-segment-bytes",
        "1048576",
    ];
    argv.extend_from_slice(args);
    let config = Config::try_parse_from(argv)?;
    app::start_with_fs(config, fs).await
}

impl TestApp {
    /// Waits for recovery to finish; the reason if it failed.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        self.app.as_mut().expect("a running app").ready().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends a raw body, as curl -d does (form-encoded content type).
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &str) -> Response {
        self.client
            .request(method, self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn create(&self, serial: &str, ports: &[&str]) -> Response {
        let body =
            json!({"name": format!("widget {serial}"), "serial_number": serial, "ports": ports});
        self.send(reqwest::Method::POST, "/widgets", &body.to_string())
            .await
    }

    pub async fn associate(&self, port: &str, serial: &str, peer: &str) -> Response {
        let body =
            json!({"port_type": port, "widget_serial_num": serial, "peer_widget_serial_num": peer});
        self.send(
            reqwest::Method::PUT,
            "/widgets/associations",
            &body.to_string(),
        )
        .await
    }

    pub async fn free(&self, serial: &str, port: &str) -> Response {
        self.delete(&format!("/widgets/{serial}/associations/{port}"))
            .await
    }

    /// The widget's JSON, or `None` on 404.
    pub async fn widget(&self, serial: &str) -> Option<Value> {
        let r = self.get(&format!("/widgets/{serial}")).await;
        match r.status() {
            StatusCode::OK => Some(r.json().await.expect("json")),
            StatusCode::NOT_FOUND => None,
            s => panic!("GET /widgets/{serial} answered {s}"),
        }
    }

    /// The peer on `port` of `serial` (`None` when free).
    pub async fn peer(&self, serial: &str, port: &str) -> Option<String> {
        let w = self.widget(serial).await.expect("widget exists");
        w["associations"][port].as_str().map(str::to_owned)
    }

    /// A new data dir holding a copy of this running app's WAL and no store: what a crash
    /// would leave behind, since every acknowledged record is already fsynced.
    pub fn crash_image(&self) -> TempDir {
        let image = TempDir::new().expect("temp dir");
        let wal = image.path().join("wal");
        std::fs::create_dir(&wal).expect("wal dir");
        for entry in std::fs::read_dir(self.dir.path().join("wal")).expect("reading the WAL") {
            let entry = entry.expect("dir entry");
            std::fs::copy(entry.path(), wal.join(entry.file_name())).expect("copying a segment");
        }
        image
    }

    /// Graceful stop; the data dir stays for a restart.
    pub async fn stop(mut self) -> Arc<TempDir> {
        if let Some(app) = self.app.take() {
            app.stop().await.expect("graceful stop");
        }
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
        self.dir.clone()
    }
}

impl Drop for TestApp {
    /// A test that ends without `stop()` still drops its database. Drop cannot await, and
    /// the test's runtime is busy, so a thread of its own does it.
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            let dropped = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to drop the test database")
                    .block_on(db.drop_db())
            });
            let _ = dropped.join();
        }
    }
}

/// The value of metric `name` in a `/metrics` text (summed over its labels), if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    widgets_testkit::metrics::sample_sum(text, name)
}

/// Reads an error body and returns its code, checking its shape.
pub async fn error_code(r: Response) -> String {
    let body: Value = r.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    code
}

/// A Redis server of the test's own on a free port, keeping its RDB snapshot (written by
/// `SAVE` only) in a temporary directory, so a test can kill it and start it again from
/// that snapshot: Redis restored from an older snapshot.
#[cfg(feature = "redis")]
pub struct OwnRedis {
    pub port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
}

#[cfg(feature = "redis")]
impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = OwnRedis {
            port,
            dir: TempDir::new().expect("temp dir"),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again), from its last snapshot if there is one.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting redis-server: install Redis (Debian: redis-server) on the PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    /// Writes the snapshot a restart comes back to.
    pub async fn save(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    }

    /// SIGSTOP: the server keeps its connections and port but answers nothing, as a
    /// stalled one does (a paused VM, a swapping host), until `resume`.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running redis-server").id();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill {signal} {pid} failed");
    }

    /// SIGKILL: whatever was not in the snapshot is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// By inode: the ranges (offset, length) of a file written since its last `fdatasync`.
type Unsynced = Arc<std::sync::Mutex<std::collections::HashMap<u64, Vec<(u64, usize)>>>>;

/// The real file system, remembering which bytes of each WAL file were written since its
/// last fsync: what a power loss (or a kernel crash) would take back, as
/// [`PowerLossFs::image`] shows.
#[derive(Clone, Default)]
pub struct PowerLossFs {
    /// By inode (a segment is renamed into place after it is made): the ranges written
    /// since the file's last `fdatasync`.
    unsynced: Unsynced,
}

struct TrackedFile {
    inner: Box<dyn widgets::wal::fs::WalFile>,
    inode: u64,
    unsynced: Unsynced,
}

impl widgets::wal::fs::WalFile for TrackedFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)?;
        let mut unsynced = self.unsynced.lock().unwrap();
        unsynced
            .entry(self.inode)
            .or_default()
            .push((offset, buf.len()));
        Ok(())
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        self.inner.sync_data()?;
        self.unsynced.lock().unwrap().remove(&self.inode);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

impl PowerLossFs {
    fn track(
        &self,
        path: &Path,
        inner: Box<dyn widgets::wal::fs::WalFile>,
    ) -> std::io::Result<Box<dyn widgets::wal::fs::WalFile>> {
        use std::os::unix::fs::MetadataExt;
        Ok(Box::new(TrackedFile {
            inner,
            inode: std::fs::metadata(path)?.ino(),
            unsynced: self.unsynced.clone(),
        }))
    }

    /// A new data dir holding the WAL in `wal` as a power loss now would leave it: every
    /// byte written since its file's last fsync is zero again (what the zero-filled
    /// segments held before).
    pub fn image(&self, wal: &Path) -> TempDir {
        use std::os::unix::fs::MetadataExt;
        let image = TempDir::new().expect("temp dir");
        let to = image.path().join("wal");
        std::fs::create_dir(&to).expect("wal dir");
        let unsynced = self.unsynced.lock().unwrap();
        for entry in std::fs::read_dir(wal).expect("reading the WAL") {
            let entry = entry.expect("dir entry");
            let mut bytes = std::fs::read(entry.path()).expect("reading a WAL file");
            let inode = entry.metadata().expect("a WAL file's metadata").ino();
            for &(offset, len) in unsynced.get(&inode).into_iter().flatten() {
                let start = (offset as usize).min(bytes.len());
                let end = (start + len).min(bytes.len());
                bytes[start..end].fill(0);
            }
            std::fs::write(to.join(entry.file_name()), bytes).expect("writing a WAL file");
        }
        image
    }
}

impl WalFs for PowerLossFs {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        RealFs.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        RealFs.list(dir)
    }

    fn read(&self, path: &Path, buf: &mut Vec<u8>) -> std::io::Result<()> {
        RealFs.read(path, buf)
    }

    fn len(&self, path: &Path) -> std::io::Result<u64> {
        RealFs.len(path)
    }

    fn create_new(&self, path: &Path) -> std::io::Result<Box<dyn widgets::wal::fs::WalFile>> {
        let file = RealFs.create_new(path)?;
        self.track(path, file)
    }

    fn open(&self, path: &Path) -> std::io::Result<Box<dyn widgets::wal::fs::WalFile>> {
        let file = RealFs.open(path)?;
        self.track(path, file)
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        RealFs.remove(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        RealFs.rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        RealFs.sync_dir(dir)
    }
}
