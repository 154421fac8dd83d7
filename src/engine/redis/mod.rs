//! Redis mode: the hot state lives in Redis so that any number of stateless instances
//! serve the same widgets; PostgreSQL stays the durable truth, written behind by a flusher
//! in every instance ([`flush`]), and loaded into an empty Redis once ([`load`]).
//!
//! A write is optimistic: the instance reads the widgets a command names (one atomic read
//! script), runs the same association rules as every backend ([`crate::domain::rules`]),
//! reading old peers in a second round if the rules need them, and then sends the
//! post-images in one script ([`scripts::WRITE_IF_UNCHANGED`]) that checks every widget read is still
//! at the version read, and only then writes them all, bumps their versions from one
//! counter and marks them dirty, atomically. If another write got there first the command
//! runs again on fresh state. So every change is atomic and no client of any instance
//! sees half of one, and the rules are written once, in Rust.
//!
//! A write is as durable as the Redis server's AOF setting (see the README). A Redis
//! server that comes back older than PostgreSQL (restored from an older snapshot, a
//! failover to a lagging replica, an AOF that lost its last second) would hand out
//! versions PostgreSQL already holds, whose writes its version guards then drop: so every
//! script that reads or writes widgets runs only on a server this instance has checked
//! ([`RedisEngine::check_server`]: its `seq` is not below PostgreSQL's newest version),
//! and a server that fails the check is brought back in line by the flusher
//! ([`load::resync`]) while writes and reads answer `503 unavailable`. The other way round,
//! a PostgreSQL that comes back older than Redis has the widgets it lost marked dirty
//! again, and written from Redis ([`repair`]).

pub mod load;
pub mod repair;
mod scripts;

use super::EngineError;
use crate::domain::{Mark, Name, PortType, Ports, Rule, Serial, StateView, Touched, Tx, Widget};
use crate::store::PgStore;
use crate::store::{FlushBatch, FlushId, FlushItem, RedisTake};
use redis::aio::ConnectionManager;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// How often a write is retried after losing a race on the same widgets before it answers
/// `503 overloaded`.
const MAX_ATTEMPTS: usize = 64;

pub struct RedisEngine {
    conn: ConnectionManager,
    prefix: String,
    /// Most widgets waiting for PostgreSQL before writes answer `503 overloaded`.
    max_dirty: usize,
    /// The durable truth a Redis server must not be behind.
    store: PgStore,
    /// The `run_id` of the Redis server this instance has checked; the scripts refuse to
    /// run on any other ("" until the first check).
    trusted: RwLock<String>,
    /// One check at a time, and the server last found behind, with when: a burst of
    /// requests to a server found behind a moment ago does not each ask PostgreSQL.
    checking: tokio::sync::Mutex<Option<(String, Instant)>>,
    /// Repairs of a PostgreSQL gone back in time that failed in a row, and when to try
    /// again.
    repair_retry: std::sync::Mutex<(u32, Option<Instant>)>,
}

/// How long a server found behind PostgreSQL is answered for without asking again.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// A check runs on the request path, and the epoch it raises waits for every flush in
/// flight, which a flush stalled in PostgreSQL holds for as long as it stalls. So a check
/// waits for the flushes at most `CHECK_EPOCH_WAIT` (PostgreSQL's `lock_timeout`), and a
/// request waits at most `CHECK_WAIT` for another request's check; past either it answers
/// `503 unavailable`. A PostgreSQL that stalls whole answers the request checking
/// `503 unavailable` too: the check waits at most twice `CHECK_EPOCH_WAIT` for a pooled
/// connection and for each of PostgreSQL's answers.
const CHECK_WAIT: Duration = Duration::from_secs(1);
const CHECK_EPOCH_WAIT: Duration = Duration::from_millis(1500);

/// A widget as read, with its version as Redis holds it ("0" when absent).
type Known = HashMap<Serial, (Option<Widget>, String)>;

/// Redis could not be reached or answered with an error.
pub(super) fn unavailable(e: redis::RedisError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// Redis has no `loaded` key: it lost its data (a restart without AOF, a flush). Serving
/// it as an empty store would answer 404 for every widget PostgreSQL holds.
fn lost_data() -> EngineError {
    if let Some(count) = crate::metrics::throttled("redis lost its data") {
        tracing::error!(
            count,
            "Redis has lost its data (no 'loaded' key): refusing reads and writes until the \
             flusher has loaded it again from PostgreSQL"
        );
    }
    EngineError::Unavailable(
        "Redis has lost its data; it is being loaded again from PostgreSQL".into(),
    )
}

/// PostgreSQL could not be asked.
fn postgres(e: crate::store::StoreError) -> EngineError {
    EngineError::Unavailable(format!("PostgreSQL: {e}"))
}

/// The Redis server is older than PostgreSQL: it went back in time.
/// What a request to a Redis found behind PostgreSQL is told.
const BEING_LOADED_AGAIN: &str =
    "Redis is behind PostgreSQL; it is being loaded again from PostgreSQL";

/// Counts and logs (at most once a second) that Redis, at `seq`, was found behind the
/// version `high` PostgreSQL holds.
fn behind(seq: u64, high: u64) -> EngineError {
    metrics::counter!("widgets_redis_behind_total").increment(1);
    if let Some(count) = crate::metrics::throttled("redis behind postgres") {
        tracing::error!(
            count,
            redis_seq = seq,
            postgres_version = high,
            "Redis is behind PostgreSQL (restored from an older snapshot, failed over to a \
             lagging replica, or lost writes): refusing reads and writes until the flusher \
             has loaded it again from PostgreSQL"
        );
    }
    EngineError::Unavailable(BEING_LOADED_AGAIN.into())
}

fn corrupt(serial: &str, what: &str) -> EngineError {
    EngineError::Unavailable(format!("widget {serial:?} in Redis has a bad {what}"))
}

/// How long a command, or an attempt to connect, waits for Redis: a stalled Redis answers
/// `503` after it (the client's default for a command).
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

impl RedisEngine {
    /// Connects (the connection reconnects by itself later). `prefix` goes before every key;
    /// past `max_dirty` widgets waiting for PostgreSQL, writes are refused as overloaded.
    /// `store` is the PostgreSQL the Redis server is checked against.
    pub async fn connect(
        url: &str,
        prefix: &str,
        max_dirty: usize,
        store: PgStore,
    ) -> Result<Self, EngineError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        // One attempt a reconnection: the client's default retries six times, backing off
        // from 100 ms, and every command waits for that round, so with Redis down each
        // request (and `/readyz`, and `/metrics`) took ~9.4 s to answer `503`. The next
        // command tries again. An attempt that gets no answer ends as a command does.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let conn =
            (client.get_connection_manager_with_config(config).await).map_err(unavailable)?;
        // Shown at 0 from the start, as `metrics::EVENTS` says why.
        crate::metrics::show_at_zero(&[
            "widgets_redis_behind_total",
            "widgets_redis_resyncs_total",
            "widgets_redis_write_conflicts_total",
            "widgets_postgres_behind_total",
            "widgets_postgres_repairs_total",
            "widgets_postgres_repair_failures_total",
        ]);
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            max_dirty,
            store,
            trusted: RwLock::default(),
            checking: tokio::sync::Mutex::default(),
            repair_retry: std::sync::Mutex::default(),
        })
    }

    pub(crate) fn store(&self) -> &PgStore {
        &self.store
    }

    fn trusted(&self) -> String {
        self.trusted.read().expect("trusted lock").clone()
    }

    pub(crate) fn trust(&self, run_id: &str) {
        let mut trusted = self.trusted.write().expect("trusted lock");
        if *trusted != run_id {
            tracing::info!(run_id, "Redis server checked: not behind PostgreSQL");
            *trusted = run_id.to_owned();
        }
    }

    /// The Redis server's `run_id`, `seq`, and whether it holds `loaded`, atomically.
    pub(crate) async fn server_state(&self) -> Result<(String, u64, bool), EngineError> {
        let (run_id, seq, loaded): (String, String, String) = scripts::STATE
            .prepare_invoke()
            .arg(&self.prefix)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if run_id.len() != 40 {
            return Err(EngineError::Unavailable(
                "Redis reports no run_id in INFO server (an ACL that denies INFO to scripts, or \
                 a server that hides it): Redis mode needs it to notice a restart or failover"
                    .into(),
            ));
        }
        let seq = seq
            .parse()
            .map_err(|_| EngineError::Unavailable("Redis holds a bad seq".into()))?;
        Ok((run_id, seq, loaded == "1"))
    }

    /// A script found a server this instance has not checked (the first call, or Redis was
    /// restarted or failed over): trusts it if it holds its data and its `seq` is not
    /// below the newest version PostgreSQL holds. Otherwise it went back in time (or lost
    /// its data), and new writes would get versions PostgreSQL already has: refused, until
    /// [`load::resync`] has loaded it again. Before it trusts a server, it raises the
    /// fencing epoch, so that no batch taken from the server before (or from another one)
    /// can commit after it looked at PostgreSQL.
    pub async fn check_server(&self) -> Result<(), EngineError> {
        let Ok(mut last_behind) = tokio::time::timeout(CHECK_WAIT, self.checking.lock()).await
        else {
            return Err(EngineError::Unavailable(
                "the Redis server is being checked against PostgreSQL".into(),
            ));
        };
        let (run_id, _, loaded) = self.server_state().await?;
        if !loaded {
            return Err(lost_data());
        }
        if *self.trusted.read().expect("trusted lock") == run_id {
            return Ok(()); // checked while this one waited
        }
        if let Some((_, at)) = last_behind
            .as_ref()
            .filter(|(id, at)| *id == run_id && at.elapsed() < RECHECK_AFTER)
        {
            tracing::debug!(since_ms = at.elapsed().as_millis() as u64, "still behind");
            return Err(EngineError::Unavailable(BEING_LOADED_AGAIN.into()));
        }
        // PostgreSQL first: every version it holds was handed out by Redis before this
        // read, so a server that is not behind shows a `seq` at least as high after it.
        let (high, epoch) = (self.store)
            .raise_redis_epoch(Some(CHECK_EPOCH_WAIT))
            .await
            .map_err(postgres)?;
        let (now, seq, loaded) = self.server_state().await?;
        if now != run_id {
            return Err(changed_while_checked());
        }
        if !loaded {
            return Err(lost_data());
        }
        if seq < high {
            *last_behind = Some((run_id, Instant::now()));
            return Err(behind(seq, high));
        }
        self.raise_epoch(epoch).await?;
        *last_behind = None;
        self.trust(&run_id);
        Ok(())
    }

    /// Raises the fencing epoch Redis holds (the one its takes carry) to `epoch`.
    pub(crate) async fn raise_epoch(&self, epoch: u64) -> Result<(), EngineError> {
        let _: i64 = scripts::RAISE_EPOCH
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(epoch)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The trusted server's `seq` is below `high`: it went back in time without a new
    /// `run_id` (its data replaced in place). Stops trusting it, so that the next script
    /// checks it again, and returns what to answer (or why its `seq` could not be read).
    async fn behind_in_place(&self, high: u64) -> Result<EngineError, EngineError> {
        self.trusted.write().expect("trusted lock").clear();
        let (_, seq, _) = self.server_state().await?;
        Ok(behind(seq, high))
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The prefix of every key this engine uses.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub async fn get(&self, serial: &Serial) -> Result<Option<Widget>, EngineError> {
        let mut known = Known::new();
        for _ in 0..2 {
            match self
                .read_into(std::slice::from_ref(serial), &mut known, &self.trusted())
                .await?
            {
                OnServer::Done => return Ok(known.remove(serial).and_then(|(w, _)| w)),
                OnServer::Untrusted => self.check_server().await?,
            }
        }
        Err(changed_while_checked())
    }

    /// Reads `serials` atomically into `known`, on the server `server` only.
    async fn read_into(
        &self,
        serials: &[Serial],
        known: &mut Known,
        server: &str,
    ) -> Result<OnServer, EngineError> {
        let mut invocation = scripts::READ.prepare_invoke();
        invocation.arg(server).arg(&self.prefix);
        for s in serials {
            invocation.arg(s.as_str());
        }
        let flat: Vec<String> = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match flat.first().map(String::as_str) {
            Some("not_loaded") => return Err(lost_data()),
            Some("untrusted") => return Ok(OnServer::Untrusted),
            _ => {}
        }
        if flat.len() != serials.len() * scripts::WIDGET_FIELDS {
            return Err(EngineError::Unavailable(
                "unexpected answer from the read script".into(),
            ));
        }
        for (serial, fields) in serials.iter().zip(flat.chunks(scripts::WIDGET_FIELDS)) {
            known.insert(serial.clone(), parse_widget(serial.as_str(), fields)?);
        }
        Ok(OnServer::Done)
    }

    pub async fn execute<R: Rule>(&self, rule: R) -> Result<R::Output, EngineError> {
        let mut checks = 0;
        'attempt: for _ in 0..MAX_ATTEMPTS {
            // One server for the reads and the write of an attempt.
            let server = self.trusted();
            let mut known = Known::new();
            let mut wanted: Vec<Serial> = rule.serials().into_iter().cloned().collect();
            let (reply, touched) = loop {
                if let OnServer::Untrusted = self.read_into(&wanted, &mut known, &server).await? {
                    checks += 1;
                    if checks > 2 {
                        return Err(changed_while_checked());
                    }
                    self.check_server().await?;
                    continue 'attempt;
                }
                match run_rules(&rule, &known) {
                    Rules::NeedsMore(more) => wanted = more,
                    Rules::Refused(e) => return Err(e.into()),
                    Rules::Done(reply, touched) => break (reply, touched),
                }
            };
            if touched.is_empty() {
                return Ok(reply); // already so: nothing to write
            }
            match self.write_if_unchanged(&known, &touched, &server).await? {
                Written::Done => return Ok(reply),
                Written::Overloaded => {
                    return Err(EngineError::Overloaded(
                        "too many changes are waiting for the durable store",
                    ))
                }
                Written::Conflict => {
                    metrics::counter!("widgets_redis_write_conflicts_total").increment(1)
                }
                Written::Untrusted => {
                    checks += 1;
                    if checks > 2 {
                        return Err(changed_while_checked());
                    }
                    self.check_server().await?
                }
            }
        }
        Err(EngineError::Overloaded(
            "too many concurrent changes to the same widgets",
        ))
    }

    /// Sends the post-images, unless a widget read has changed since (a lost race) or the
    /// dirty set is full. Each goes with the mark of what it changes, from the state the
    /// rules read.
    async fn write_if_unchanged(
        &self,
        known: &Known,
        touched: &[Touched],
        server: &str,
    ) -> Result<Written, EngineError> {
        let mut invocation = scripts::WRITE_IF_UNCHANGED.prepare_invoke();
        invocation
            .arg(server)
            .arg(&self.prefix)
            .arg(self.max_dirty)
            .arg(known.len());
        for (serial, (_, version)) in known {
            invocation.arg(serial.as_str()).arg(version);
        }
        invocation.arg(touched.len());
        for Touched { change, before } in touched {
            // The eight strings WRITE_IF_UNCHANGED reads per change: serial, kind, name, ports, the peer
            // on P, R, Q, and the mark.
            invocation.arg(change.serial().as_str());
            match change.after() {
                Some(widget) => {
                    invocation
                        .arg("put")
                        .arg(widget.name.as_str())
                        .arg(widget.ports.bits());
                    for port in PortType::ALL {
                        invocation.arg(widget.peer(port).map_or("", |p| p.as_str()));
                    }
                }
                None => {
                    invocation.arg("del").arg("").arg(0).arg("").arg("").arg("");
                }
            }
            invocation.arg(Mark::of(before.as_ref(), change).to_bits());
        }
        let answer: Vec<String> = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match answer.first().map(String::as_str) {
            Some("ok") => Written::Done,
            Some("overloaded") => Written::Overloaded,
            Some("not_loaded") => return Err(lost_data()),
            Some("untrusted") => Written::Untrusted,
            _ => Written::Conflict,
        })
    }

    /// Gauges describing the shared state now.
    pub async fn gauges(&self) -> Vec<(&'static str, f64)> {
        let read: Result<(i64, i64, i64), _> = scripts::GAUGES
            .prepare_invoke()
            .arg(&self.prefix)
            .invoke_async(&mut self.conn())
            .await;
        match read {
            Ok((count, dirty, lag_ms)) => vec![
                ("widgets_in_memory", count as f64),
                ("widgets_dirty", dirty as f64),
                ("widgets_flush_lag_seconds", lag_ms.max(0) as f64 / 1000.0),
                ("widgets_redis_up", 1.0),
            ],
            Err(_) => vec![("widgets_redis_up", 0.0)],
        }
    }

    /// Takes `count` dirty widgets at random with their state, atomically, and with them
    /// every dirty widget their changes touched (transitively), so each change is taken
    /// whole. Each comes with its dirty entry, which [`RedisEngine::ack`] needs.
    ///
    /// On a server this instance has not checked, one that lost its data, or one whose
    /// `seq` is below the highest version PostgreSQL holds (it went back in time in place,
    /// with no new `run_id`), the take first brings it in line ([`load::resync`]), and
    /// takes nothing if it could not.
    ///
    /// A server in line also checks PostgreSQL the other way round: a database that lost
    /// flushes Redis acknowledged, or holds an older fencing epoch, has gone back in time,
    /// and the take marks the widgets it lost dirty again first ([`repair::repair`]). A
    /// repair that fails is tried again after a backoff, and until one succeeds the takes
    /// take nothing.
    pub async fn take(&self, count: usize) -> Result<Taken, EngineError> {
        // Redis's acknowledged flushes are read before PostgreSQL's (see the repair).
        let (fence, behind) = repair::postgres_behind(self).await?;
        let (high, epoch) = (fence.high, fence.epoch);
        let mut taken = self.take_on(&self.trusted(), count, high).await?;
        if matches!(&taken, Take::Taken(t) if t.loaded && t.epoch < epoch) {
            // Another instance raised the epoch and has not raised Redis's yet (or died
            // first): this batch would be refused. Nothing taken before the raise was read
            // can commit after it, so a take from now on may carry it.
            self.raise_epoch(epoch).await?;
            taken = self.take_on(&self.trusted(), count, high).await?;
        }
        match taken {
            Take::Taken(taken) if taken.loaded => {
                let Some(found) = behind else {
                    return Ok(taken);
                };
                repair::report(&found);
                // Nothing is flushed while the database is behind: a lost widget not yet
                // marked again would be written without its peers. And the repair raises
                // the epoch, so the batch taken before it would be refused.
                if !self.repair_due() || !self.repair().await {
                    return Ok(Taken::nothing());
                }
                let high = self.store.redis_fence().await.map_err(postgres)?.high;
                return match self.take_on(&self.trusted(), count, high).await? {
                    Take::Taken(taken) if taken.loaded => Ok(taken),
                    _ => Ok(Taken::nothing()),
                };
            }
            Take::Paused => return Ok(Taken::nothing()),
            Take::Behind => {
                // Logged and counted; the resync below is the answer.
                self.behind_in_place(high).await?;
            }
            _ => {}
        }
        let in_line = load::resync(self).await.map_err(|e| {
            EngineError::Unavailable(format!("bringing Redis in line with PostgreSQL: {e:#}"))
        })?;
        // A database found behind is checked again next round, against the Redis now in
        // line, before anything is flushed.
        if in_line && behind.is_none() {
            if let Take::Taken(taken) = self.take_on(&self.trusted(), count, high).await? {
                return Ok(taken);
            }
        }
        Ok(Taken::nothing())
    }

    /// Whether a repair may be tried: not while the backoff after a failed one runs.
    fn repair_due(&self) -> bool {
        let retry = self.repair_retry.lock().expect("repair retry lock");
        retry.1.is_none_or(|at| Instant::now() >= at)
    }

    /// Repairs a PostgreSQL found behind Redis ([`repair::repair`]); returns whether it did
    /// (`false`: another instance holds the lock, or the repair failed, which is logged,
    /// counted and tried again after a backoff).
    async fn repair(&self) -> bool {
        match repair::repair(self).await {
            Ok(done) => {
                *self.repair_retry.lock().expect("repair retry lock") = (0, None);
                done
            }
            Err(e) => {
                let mut retry = self.repair_retry.lock().expect("repair retry lock");
                retry.0 = retry.0.saturating_add(1);
                let delay = crate::backoff::backoff(retry.0);
                retry.1 = Some(Instant::now() + delay);
                metrics::counter!("widgets_postgres_repair_failures_total").increment(1);
                tracing::error!(error = %format!("{e:#}"), failures = retry.0,
                    retry_in_ms = delay.as_millis() as u64,
                    "marking the widgets PostgreSQL lost dirty again failed; no flush is \
                     written until it succeeds");
                false
            }
        }
    }

    /// [`RedisEngine::take`] on the server whose `run_id` is `server`, trusted or not, if
    /// its `seq` is at least `high`.
    pub(crate) async fn take_on(
        &self,
        server: &str,
        count: usize,
        high: u64,
    ) -> Result<Take, EngineError> {
        let flat: Vec<String> = scripts::TAKE
            .prepare_invoke()
            .arg(server)
            .arg(&self.prefix)
            .arg(count)
            .arg(high)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match flat.first().map(String::as_str) {
            Some("untrusted") => return Ok(Take::OtherServer),
            Some("behind") => return Ok(Take::Behind),
            Some("paused") => return Ok(Take::Paused),
            _ => {}
        }
        let [at_ms, whole, loaded, epoch, flat @ ..] = &flat[..] else {
            return Err(EngineError::Unavailable(
                "unexpected answer from the take script".into(),
            ));
        };
        let epoch = epoch
            .parse()
            .map_err(|_| EngineError::Unavailable("Redis holds a bad epoch".into()))?;
        let mut out = Vec::with_capacity(flat.len() / scripts::TAKEN_FIELDS);
        for chunk in flat.chunks(scripts::TAKEN_FIELDS) {
            let [serial, entry, fields @ ..] = chunk else {
                return Err(EngineError::Unavailable(
                    "unexpected answer from the take script".into(),
                ));
            };
            let (mark, version) = entry
                .split_once(':')
                .and_then(|(b, v)| {
                    Some((
                        Mark::from_bits(b.parse::<u8>().ok()?)?,
                        v.parse::<u64>().ok()?,
                    ))
                })
                .ok_or_else(|| corrupt(serial, "dirty entry"))?;
            let (widget, _) = parse_widget(serial, fields)?;
            let item = FlushItem {
                serial: Serial::parse("serial", serial).map_err(|_| corrupt(serial, "serial"))?,
                mark,
                version: widget.as_ref().map_or(version, |w| w.version),
                widget,
            };
            out.push((item, entry.clone()));
        }
        Ok(Take::Taken(Taken {
            whole_set: whole == "1",
            at_ms: at_ms.clone(),
            loaded: loaded == "1",
            epoch,
            items: out,
        }))
    }

    /// PostgreSQL has committed these, as `flush` (`None`: not known): Redis keeps it among
    /// the flushes it acknowledged, and drops each entry from the dirty set unless it
    /// changed since. `whole_set_at`: the take's time if it took the whole dirty set (see
    /// [`Taken`]).
    pub async fn ack(
        &self,
        entries: &[(Serial, String)],
        whole_set_at: Option<&str>,
        flush: Option<FlushId>,
    ) -> Result<usize, EngineError> {
        let high = self.store.high_water().await.map_err(postgres)?;
        self.ack_up_to(entries, whole_set_at, high, flush).await
    }

    /// [`RedisEngine::ack`], checking `seq` against `high` (0: not at all, for the dirty
    /// widgets of a server being brought in line, which is known to be behind).
    pub(crate) async fn ack_up_to(
        &self,
        entries: &[(Serial, String)],
        whole_set_at: Option<&str>,
        high: u64,
        flush: Option<FlushId>,
    ) -> Result<usize, EngineError> {
        let mut invocation = scripts::ACK.prepare_invoke();
        invocation
            .arg(&self.prefix)
            .arg(whole_set_at.unwrap_or(""))
            .arg(high)
            .arg(flush.map_or(0, |f| f.count))
            .arg(flush.map_or(0, |f| f.id));
        for (serial, entry) in entries {
            invocation.arg(serial.as_str()).arg(entry);
        }
        let removed: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if removed == -2 {
            // Acknowledged too late to be checked against PostgreSQL by a later round: its
            // widgets stay dirty, and are written again.
            tracing::debug!(?flush, "a flush acknowledged after 256 later ones");
            return Ok(0);
        }
        if removed < 0 {
            return Err(self.behind_in_place(high).await?);
        }
        Ok(removed as usize)
    }
}

/// What acknowledging a flushed batch needs: each serial with the dirty entry it was taken
/// with, the take's time if it took the whole dirty set (see [`Taken`]), and the flush
/// that committed it, which the store puts there ([`RedisTake::committed`]).
#[derive(Debug)]
pub struct Acks {
    pub entries: Vec<(Serial, String)>,
    pub whole_set_at: Option<String>,
    pub committed: Arc<OnceLock<FlushId>>,
}

impl Acks {
    /// The flush that committed the batch (`None` before it has).
    pub fn flush(&self) -> Option<FlushId> {
        self.committed.get().copied()
    }
}

impl RedisEngine {
    /// Takes up to `count` dirty widgets as one flush batch (sorted by serial, no WAL
    /// checkpoint) and what [`RedisEngine::finish_flush`] needs once PostgreSQL has
    /// committed it; `None` when nothing is dirty.
    pub async fn take_flush(
        &self,
        count: usize,
    ) -> Result<Option<(FlushBatch, Acks)>, EngineError> {
        let taken = self.take(count).await?;
        if taken.items.is_empty() {
            return Ok(None);
        }
        Ok(Some(taken.into_flush()))
    }

    /// PostgreSQL has committed the batch of `acks`: see [`RedisEngine::ack`].
    pub async fn finish_flush(&self, acks: &Acks) -> Result<usize, EngineError> {
        self.ack(&acks.entries, acks.whole_set_at.as_deref(), acks.flush())
            .await
    }
}

impl Taken {
    /// The flush batch (sorted by serial, no WAL checkpoint) and what acknowledging it
    /// needs.
    pub fn into_flush(self) -> (FlushBatch, Acks) {
        let taken = self;
        let epoch = taken.epoch;
        let whole_set_at = taken.whole_set.then_some(taken.at_ms);
        let (mut items, entries): (Vec<_>, Vec<_>) = taken
            .items
            .into_iter()
            .map(|(item, entry)| {
                let serial = item.serial.clone();
                (item, (serial, entry))
            })
            .unzip();
        items.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
        let committed = Arc::new(OnceLock::new());
        let batch = FlushBatch {
            items,
            checkpoint: None,
            widgets: None,
            redis: Some(RedisTake {
                epoch,
                committed: committed.clone(),
            }),
        };
        (
            batch,
            Acks {
                entries,
                whole_set_at,
                committed,
            },
        )
    }
}

/// A batch taken for a flush.
pub struct Taken {
    /// Each widget with its dirty entry.
    pub items: Vec<(FlushItem, String)>,
    /// The batch is the whole dirty set as it was at `at_ms`.
    pub whole_set: bool,
    /// Redis's clock at the take, in ms.
    pub at_ms: String,
    /// Redis still holds its data (`loaded`).
    pub loaded: bool,
    /// The fencing epoch the batch was taken under (see [`FlushBatch::epoch`]).
    pub epoch: u64,
}

impl Taken {
    fn nothing() -> Self {
        Self {
            items: Vec::new(),
            whole_set: true,
            at_ms: String::new(),
            loaded: false,
            epoch: 0,
        }
    }
}

/// What a take found.
pub(crate) enum Take {
    Taken(Taken),
    /// Redis is not the server asked for.
    OtherServer,
    /// Redis's `seq` is below the highest version PostgreSQL holds.
    Behind,
    /// A repair holds the load lock: nothing is taken until it has marked every widget
    /// PostgreSQL lost.
    Paused,
}

/// Whether a script ran on the server it was meant for.
enum OnServer {
    Done,
    /// Redis is not the server this instance checked: check it, then run again.
    Untrusted,
}

fn changed_while_checked() -> EngineError {
    EngineError::Unavailable("the Redis server changed while it was being checked".into())
}

enum Written {
    Done,
    Conflict,
    Overloaded,
    /// The server is not the one this instance checked: check it, then run again.
    Untrusted,
}

enum Rules<T> {
    /// The rules need these widgets too (old peers): read them and run again.
    NeedsMore(Vec<Serial>),
    Refused(crate::domain::DomainError),
    Done(T, Vec<Touched>),
}

/// The widgets read so far; a read of any other is recorded as missing.
struct Prefetched<'a> {
    known: &'a Known,
    missing: RefCell<Vec<Serial>>,
}

impl StateView for Prefetched<'_> {
    fn get(&self, serial: &Serial) -> Option<Widget> {
        match self.known.get(serial) {
            Some((w, _)) => w.clone(),
            None => {
                self.missing.borrow_mut().push(serial.clone());
                None
            }
        }
    }
}

fn run_rules<R: Rule>(rule: &R, known: &Known) -> Rules<R::Output> {
    let view = Prefetched {
        known,
        missing: RefCell::new(Vec::new()),
    };
    let mut tx = Tx::new(&view);
    let result = rule.run(&mut tx);
    let touched = tx.into_touched();
    let missing = view.missing.into_inner();
    if !missing.is_empty() {
        return Rules::NeedsMore(missing);
    }
    match result {
        Ok(reply) => Rules::Done(reply, touched),
        Err(e) => Rules::Refused(e),
    }
}

/// Parses READ's fields for one serial into the widget (if it exists) and its version.
fn parse_widget(serial: &str, f: &[String]) -> Result<(Option<Widget>, String), EngineError> {
    if f.len() != scripts::WIDGET_FIELDS {
        return Err(corrupt(serial, "answer"));
    }
    if f[0] != "1" {
        return Ok((None, "0".to_owned()));
    }
    let name = Name::parse("name", &f[1]).map_err(|_| corrupt(serial, "name"))?;
    let ports = f[2]
        .parse::<u8>()
        .ok()
        .and_then(Ports::from_bits)
        .ok_or_else(|| corrupt(serial, "ports"))?;
    let mut widget = Widget::new(name, ports);
    widget.version = f[3].parse().map_err(|_| corrupt(serial, "version"))?;
    for (i, peer) in f[4..7].iter().enumerate() {
        if !peer.is_empty() {
            widget.peers[i] =
                Some(Serial::parse("peer", peer).map_err(|_| corrupt(serial, "peer"))?);
        }
    }
    Ok((Some(widget), f[3].clone()))
}
