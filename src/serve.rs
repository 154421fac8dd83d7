//! The HTTP server: accepts connections and serves the router on each, with the bounds a
//! hostile or broken client must not get past (axum's own `serve` has none of them):
//!
//! - **A cap on open connections** (`--max-connections`). At the cap, a new connection
//!   waiting to be accepted takes the place of the connection that has been idle longest
//!   (open, but with no request in progress: a keep-alive socket, or one still sending its
//!   headers), which is closed. Nothing is closed while nobody waits, and the newcomer is
//!   never the one closed: it stays in the kernel's backlog until there is room. With none
//!   idle, the connection longest in a request whose body is still coming is closed
//!   instead, with no answer (nothing of its request has happened yet). Only when every
//!   connection is in a request past its body does the newcomer wait for one to end or go
//!   idle. So idle or half-sent sockets and slow bodies cannot lock other clients out,
//!   and `/healthz` and `/readyz` answer while an attacker holds thousands of them.
//! - **An idle timeout** (`--idle-timeout`): a connection must send a whole request head
//!   within this time of opening or of its last answer, or it is closed. (hyper starts the
//!   header clock when a connection goes idle, so this one bound covers both keep-alive
//!   idling and slowly sent headers.) The same bound applies to a client that reads
//!   nothing of its answers: a write to it that makes no progress for that long closes the
//!   connection, which otherwise held its socket and the kernel's send buffer (megabytes)
//!   for as long as the client liked.
//! - **Half-closed connections are answered**: a client that shuts its side down after its
//!   request still gets the answer, under the same bounds.
//! - **HTTP/1.1 only.** The API has no use for HTTP/2 over plain TCP (clients speak it only
//!   with prior knowledge), and its connections would need bounds of their own: an evicted
//!   HTTP/2 connection waits for the client's answer to a PING before it closes.
//! - **A header size limit** (`--max-header-bytes`): a longer request head is refused, and
//!   no connection buffers more than that while it waits for one.
//! - **A drain deadline** (`--drain-timeout`): at shutdown, idle connections (half-sent
//!   heads included) close at once and requests in progress may finish; whatever is still
//!   open at the deadline is closed, so a client stalled mid-body cannot hold the process
//!   up.
//!
//! The request body's own deadline (`--body-timeout`) is the body extractor's.

use crate::api::ReadingBody;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutWriter;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// File descriptors kept for everything but the HTTP connections: the standard streams,
/// the data directory's locks, the WAL's segments and directory, the embedded store (twice
/// over during a compaction), the PostgreSQL pool and its single-writer session, the
/// Redis connections, the runtime's own, the listener and the connection being accepted.
/// About 20 are in use at a time; the rest is margin.
pub const FD_HEADROOM: usize = 64;

/// How often at most an accept that fails is logged (the others are counted in
/// `http_accept_errors_total`, and in the next warning).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// The bounds on connections (see `Config` for each setting).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

/// Raises the process's soft open-file limit to its hard limit, and returns how many
/// connections the service can hold within it: `max_connections`, or, when that and
/// [`FD_HEADROOM`] do not fit, the limit less the headroom, with one warning saying so.
/// Past the limit every accept fails, so a cap above it would never be reached and never
/// make room. A limit that leaves no room for a connection at all is an error.
pub fn fit_to_open_file_limit(max_connections: usize) -> std::io::Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one `rlimit` it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the one `rlimit` it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), soft = limit.rlim_cur,
                hard = limit.rlim_max, "could not raise the open-file limit to its hard limit");
        }
    }
    let files = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    let room = files.saturating_sub(FD_HEADROOM);
    if room == 0 {
        return Err(std::io::Error::other(format!(
            "the open-file limit ({files}) leaves no file descriptor for a connection: the \
             service keeps {FD_HEADROOM} for its files and store connections; raise the \
             limit (`ulimit -n`, systemd's LimitNOFILE, the container's nofile) to at least \
             {}, --max-connections plus {FD_HEADROOM}",
            max_connections.saturating_add(FD_HEADROOM)
        )));
    }
    if room < max_connections {
        tracing::warn!(
            max_connections,
            open_file_limit = files,
            serving_at_most = room,
            "--max-connections does not fit in the open-file limit (less {FD_HEADROOM} kept \
             for the service's files and store connections): the cap is lowered to \
             {room} connections; raise the limit (`ulimit -n`, systemd's LimitNOFILE, the \
             container's nofile) to at least {} for the whole cap",
            max_connections.saturating_add(FD_HEADROOM)
        );
        return Ok(room);
    }
    Ok(max_connections)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains: stops
/// accepting, lets requests in progress finish until the drain deadline, and closes what
/// is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes)
        // A client that shuts its side down once its request is sent still gets the
        // answer (hyper's default closes at the end of the stream, after the request has
        // been served). The bounds hold all the same: the end of the stream closes an idle
        // connection or a half-sent head at once, a body cut short fails its read, and an
        // answer that is not read stalls its write into the idle timeout.
        .half_close(true);
    let builder = Arc::new(builder);
    let open = Arc::new(Connections::default());
    let mut tasks = JoinSet::new();
    let drain = CancellationToken::new();
    let mut accept_errors = AcceptErrors::default();
    // Watched for readiness rather than accepted from at once: at the cap, a connection
    // waiting in the backlog is what makes room, and it is not accepted until there is.
    // SAFETY: the `AsyncFd` owns the listener, whose descriptor stays open and the same
    // until the `AsyncFd` is dropped.
    let listener =
        unsafe { AsyncFd::register_with_interest(listener.into_std()?, Interest::READABLE)? };
    loop {
        let mut waiting = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            ready = listener.readable() => ready?,
        };
        // A connection may be waiting. At the cap, if one really is (the readiness is an
        // edge's, and may be older than the accept that took the last one): close the
        // longest-idle connection (every open one is older than the newcomer) and wait for
        // it to go, or, when every connection is in a request, wait for one to end or go
        // idle (a request ending notifies nothing, hence the tick). The newcomer stays in
        // the backlog meanwhile, and the listener stays ready. If nobody waits, nothing is
        // closed, and the next connection to arrive wakes the loop again.
        if open.len() >= limits.max_connections {
            if !backlog_holds_a_connection(listener.get_ref()) {
                waiting.clear_ready();
                continue;
            }
            drop(waiting);
            open.evict_idlest();
            if !open
                .changed_within(&shutdown, Duration::from_millis(10))
                .await
            {
                break;
            }
            continue;
        }
        let accepted = match waiting.try_io(|listener| listener.get_ref().accept()) {
            Ok(accepted) => accepted,
            // Gone already (the readiness was stale): wait for the next one.
            Err(_would_block) => continue,
        };
        let stream = match accepted.and_then(|(stream, _)| {
            stream.set_nonblocking(true)?;
            TcpStream::from_std(stream)
        }) {
            Ok(stream) => stream,
            Err(e) => {
                metrics::counter!("http_accept_errors_total").increment(1);
                // Out of file descriptors (below the cap: something else took them): close
                // the longest-idle connection to free one, as the cap would, rather than
                // let idle sockets lock every newcomer out. Then wait for it to go, or for
                // a while, instead of spinning.
                let out_of_files = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let evicted = out_of_files && open.evict_idlest();
                accept_errors.warn(&e, evicted);
                if !open
                    .changed_within(&shutdown, Duration::from_millis(50))
                    .await
                {
                    break;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = open.add();
        let (builder, open, drain) = (builder.clone(), open.clone(), drain.clone());
        let router = router.clone();
        let mut stream = TimeoutWriter::new(stream);
        stream.set_timeout(Some(limits.idle_timeout));
        tasks.spawn(async move {
            serve_connection(&builder, Box::pin(stream), router, &connection, &drain).await;
            open.remove(connection.id);
        });
        // Reap finished tasks so the set does not grow with every connection ever made.
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    drain.cancel();
    let deadline = tokio::time::sleep(limits.drain_timeout);
    let mut deadline = pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                let left = tasks.len();
                tracing::warn!(connections = left, timeout = ?limits.drain_timeout,
                    "drain deadline passed: closing the connections still open");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    Ok(())
}

/// Serves one connection until it ends, is evicted, or the drain begins. Either of the
/// last two closes it at once if it is idle or holds a half-sent head; otherwise it
/// finishes the request in progress, or sends the rest of an answer, and closes.
async fn serve_connection(
    builder: &Builder,
    stream: Pin<Box<TimeoutWriter<TcpStream>>>,
    router: Router,
    connection: &Connection,
    drain: &CancellationToken,
) {
    let busy = connection.busy.clone();
    // Busy from the request's arrival until its answer is ready.
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let in_request = InRequest::enter(&busy);
        req.extensions_mut().insert(busy.reading_body.clone());
        let router = router.clone();
        // A raw non-ASCII byte in the path is not HTTP/1.1, which the HTTP layer lets
        // through when it is UTF-8: refused as the HTTP layer refuses the rest.
        let readable = req.uri().path().is_ascii();
        if readable {
            decode_unreserved(req.uri_mut());
        }
        async move {
            let answer = if readable {
                router.oneshot(req.map(axum::body::Body::new)).await
            } else {
                Ok(not_http())
            };
            drop(in_request);
            answer
        }
    });
    let stream = Watched {
        io: stream,
        busy: connection.busy.clone(),
    };
    let served = builder.serve_connection(TokioIo::new(stream), service);
    let mut served = pin!(served);
    tokio::select! {
        served = served.as_mut() => {
            if served.as_ref().is_err_and(write_timed_out) {
                metrics::counter!("http_connections_write_timeouts_total").increment(1);
            }
            return;
        }
        // Evicted, or the drain has begun.
        _ = connection.close.cancelled() => {}
        _ = drain.cancelled() => {}
    }
    let busy = &connection.busy;
    if busy.requests.load(Ordering::Acquire) == 0 && busy.head_started.load(Ordering::Acquire) {
        // Part of a request head and no request in progress: no answer is owed, and a
        // graceful close would wait for the rest of the head until the idle timeout.
        // Dropping the connection closes the socket now.
        return;
    }
    if connection.close.is_cancelled() && busy.reading_body.0.load(Ordering::Acquire) {
        // Evicted while its request's body is still coming: nothing of the request has
        // happened (the handler is parked in the read, and nothing polls it meanwhile),
        // and finishing it would hold the room until the body timeout.
        return;
    }
    // A request in progress finishes; an answer still being sent (its handler has
    // returned, its body or its last bytes are still going out) is sent whole, within
    // the write timeout; an idle connection closes at once.
    served.as_mut().graceful_shutdown();
    let _ = served.as_mut().await;
}

/// A connection's socket, noting when bytes of a new request head arrive while no request
/// is in progress ([`Busy::head_started`]).
struct Watched<S> {
    io: S,
    busy: Arc<Busy>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.busy.requests.load(Ordering::Acquire) == 0
        {
            self.busy.head_started.store(true, Ordering::Release);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Failed accepts, logged at most once per [`ACCEPT_WARN_EVERY`]: out of file descriptors,
/// every newcomer fails, and a warning each would flood the log.
#[derive(Default)]
struct AcceptErrors {
    last_warned: Option<Instant>,
    held_back: u64,
}

impl AcceptErrors {
    fn warn(&mut self, e: &std::io::Error, evicted: bool) {
        let now = Instant::now();
        if self
            .last_warned
            .is_some_and(|last| now.duration_since(last) < ACCEPT_WARN_EVERY)
        {
            self.held_back += 1;
            return;
        }
        tracing::warn!(error = %e, evicted_an_idle_connection = evicted,
            failed_since_last_warning = self.held_back,
            "accept failed (logged once per {ACCEPT_WARN_EVERY:?} at most; counted in http_accept_errors_total)");
        self.last_warned = Some(now);
        self.held_back = 0;
    }
}

/// Whether a connection is waiting in `listener`'s backlog to be accepted (a `poll` that
/// does not block, and accepts nothing). An error counts as one waiting: the accept that
/// follows tells what it is.
fn backlog_holds_a_connection(listener: &std::net::TcpListener) -> bool {
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one `pollfd`, valid for the call, on a descriptor the listener holds open.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        if ready >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return ready != 0;
        }
    }
}

/// Whether hyper ended the connection because a write to it made no progress for the idle
/// timeout (the client reads nothing).
fn write_timed_out(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = cause.source();
    }
    false
}

/// The answer to a request the HTTP layer cannot read, as hyper gives it: `400 Bad
/// Request`, no body, and the connection closed.
fn not_http() -> axum::response::Response {
    let mut answer = axum::response::Response::new(axum::body::Body::empty());
    *answer.status_mut() = StatusCode::BAD_REQUEST;
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

/// Decodes the percent-encoded unreserved characters of `uri`'s path (`A-Z a-z 0-9 - . _
/// ~`), which RFC 3986 (6.2.2.2) makes the same path either way, so that routing sees them
/// as the path parameters are seen: `/widgets/%61ssociations` is the association route,
/// not a serial. Other escapes stay as they are. A path with no `%` is left untouched.
fn decode_unreserved(uri: &mut axum::http::Uri) {
    let path = uri.path();
    if !path.contains('%') {
        return;
    }
    // On bytes: a character outside ASCII is several, each kept as it is.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| bytes.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?))
            .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c));
        match escaped {
            Some(c) => {
                decoded.push(c);
                at += 3;
            }
            None => {
                decoded.push(bytes[at]);
                at += 1;
            }
        }
    }
    // UTF-8 still: only whole escapes of ASCII characters were replaced.
    let Ok(decoded) = String::from_utf8(decoded) else {
        return;
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{decoded}?{query}"),
        None => decoded,
    };
    // Neither can fail (the same path with fewer escapes); if one did, the URI stays.
    let Ok(path_and_query) = path_and_query.parse() else {
        return;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(decoded) = axum::http::Uri::from_parts(parts) {
        *uri = decoded;
    }
}

/// The value of one hexadecimal digit.
fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The open connections, by id.
#[derive(Default)]
struct Connections {
    inner: Mutex<Inner>,
    /// Notified whenever a connection ends.
    changed: Notify,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Arc<Connection>>,
}

/// One open connection: whether it is in a request, since when it has been idle, and how
/// to close it.
struct Connection {
    id: u64,
    busy: Arc<Busy>,
    close: CancellationToken,
}

/// Requests in progress on one connection (HTTP/2 runs several), and when the last ended.
struct Busy {
    requests: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Bytes of a request head have come since the last request began (so none is in
    /// progress, and the previous answer was sent: the HTTP layer reads the next head
    /// only then).
    head_started: AtomicBool,
    /// The request in progress is still reading its body.
    reading_body: ReadingBody,
}

impl Connections {
    fn len(&self) -> usize {
        self.inner.lock().expect("connections lock").open.len()
    }

    fn add(&self) -> Arc<Connection> {
        let mut inner = self.inner.lock().expect("connections lock");
        inner.next_id += 1;
        let connection = Arc::new(Connection {
            id: inner.next_id,
            busy: Arc::new(Busy {
                requests: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
                head_started: AtomicBool::new(false),
                reading_body: ReadingBody::default(),
            }),
            close: CancellationToken::new(),
        });
        inner.open.insert(connection.id, connection.clone());
        connection
    }

    fn remove(&self, id: u64) {
        self.inner
            .lock()
            .expect("connections lock")
            .open
            .remove(&id);
        self.changed.notify_one();
    }

    /// Closes the connection idle longest, if one is idle, or else the one longest in a
    /// request that is still reading its body (a slow or stalled body: nothing of the
    /// request has happened yet), and counts it; returns whether it found one. One at a
    /// time: while a connection told to close is still open, that is the room being made,
    /// and none is closed (a wake-up from before it closed must not close a second for the
    /// same newcomer). It stays counted until its task has closed
    /// it, so the cap bounds open sockets, evicted ones included.
    fn evict_idlest(&self) -> bool {
        let inner = self.inner.lock().expect("connections lock");
        if inner.open.values().any(|c| c.close.is_cancelled()) {
            return false;
        }
        let idle_since = |c: &&Arc<Connection>| *c.busy.idle_since.lock().expect("idle lock");
        let idle = |c: &&Arc<Connection>| c.busy.requests.load(Ordering::Acquire) == 0;
        let in_body = |c: &&Arc<Connection>| c.busy.reading_body.0.load(Ordering::Acquire);
        let idlest = (inner.open.values().filter(idle).min_by_key(idle_since))
            .or_else(|| inner.open.values().filter(in_body).min_by_key(idle_since));
        let Some(idlest) = idlest else {
            return false;
        };
        idlest.close.cancel();
        metrics::counter!("http_connections_evicted_total").increment(1);
        true
    }

    /// Waits until a connection ends, or `tick` has passed (a request ending notifies
    /// nothing); `false` if the shutdown came first.
    async fn changed_within(&self, shutdown: &CancellationToken, tick: Duration) -> bool {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = self.changed.notified() => true,
            _ = tokio::time::sleep(tick) => true,
        }
    }
}

/// Marks its connection busy while a request is in progress.
struct InRequest(Arc<Busy>);

impl InRequest {
    fn enter(busy: &Arc<Busy>) -> Self {
        busy.requests.fetch_add(1, Ordering::AcqRel);
        busy.head_started.store(false, Ordering::Release);
        Self(busy.clone())
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("idle lock") = Instant::now();
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::decode_unreserved;
    use axum::http::Uri;

    fn decoded(uri: &str) -> String {
        let mut uri: Uri = uri.parse().unwrap();
        decode_unreserved(&mut uri);
        uri.to_string()
    }

    #[test]
    fn escaped_unreserved_characters_are_decoded_and_other_escapes_kept() {
        assert_eq!(decoded("/widgets/%61ssociations"), "/widgets/associations");
        assert_eq!(decoded("/widgets/%31%32%33?x=%61"), "/widgets/123?x=%61");
        assert_eq!(decoded("/widgets/a%2Db%7e%5F%2e"), "/widgets/a-b~_.");
        // Reserved and other characters stay escaped, as do broken escapes.
        assert_eq!(decoded("/widgets/a%2Fb%20c%25"), "/widgets/a%2Fb%20c%25");
        assert_eq!(decoded("/widgets/%6"), "/widgets/%6");
        assert_eq!(decoded("/widgets/%zz%"), "/widgets/%zz%");
        assert_eq!(decoded("/widgets/%+6%-1"), "/widgets/%+6%-1");
        assert_eq!(decoded("/widgets/plain"), "/widgets/plain");
    }

    #[test]
    fn escapes_are_decoded_on_bytes_and_other_characters_kept_whole() {
        // Each byte was taken for a character of its own: é came out as Ã©.
        assert_eq!(decoded("/%C3%A9/é%41"), "/%C3%A9/éA");
        assert_eq!(decoded("/€%7E"), "/€~");
    }
}
