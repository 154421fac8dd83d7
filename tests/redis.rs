//! Redis mode against a real Redis and a real PostgreSQL: several instances serving one
//! set of widgets, flushers that die at the worst moments, and the one-time load of an
//! empty Redis. Each test has its own key prefix and its own database. (The whole API
//! contract suite also runs on Redis mode: see tests/api.rs.)

#![cfg(feature = "redis")]

#[macro_use]
mod common;

use common::pg::{app_state, asymmetric_rows, pg_state, Proxy, TestDb};
use common::{redis_prefix, redis_url, spawn_app_with, TestApp};
use redis::AsyncCommands;
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use widgets::domain::{Associate, Create, Delete, Free, Name, PortType, Ports, Serial};
use widgets::engine::redis::{Acks, RedisEngine};
use widgets::flush::redis::RedisSource;
use widgets::flush::Flusher;
use widgets::store::postgres::FlushTxSettings;
use widgets::store::{FlushBatch, PgStore, Store};

async fn instance(db: &TestDb, prefix: &str) -> TestApp {
    common::spawn_redis_instance(db, prefix, &[]).await
}

/// A database with the schema, an engine on a fresh prefix, and a flusher between them,
/// for driving flushes step by step.
/// A Redis-mode flusher, as every instance runs one.
type RedisFlusher = Flusher<RedisSource, PgStore>;

async fn flush_parts() -> (TestDb, Arc<PgStore>, Arc<RedisEngine>, RedisFlusher) {
    flush_parts_with(&redis_url(), FlushTxSettings::default()).await
}

/// [`flush_parts`] on the Redis server at `url`, with `settings` for PostgreSQL.
async fn flush_parts_with(
    url: &str,
    settings: FlushTxSettings,
) -> (TestDb, Arc<PgStore>, Arc<RedisEngine>, RedisFlusher) {
    let db = TestDb::create().await;
    let store = Arc::new(
        PgStore::connect(&db.url)
            .await
            .unwrap()
            .with_flush_settings(settings),
    );
    store.migrate().await.unwrap();
    let engine = Arc::new(
        RedisEngine::connect(url, &redis_prefix(), 1000, (*store).clone())
            .await
            .unwrap(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    assert!(
        widgets::engine::redis::load::ensure_loaded(&engine, &store, &stop)
            .await
            .unwrap()
    );
    let source = Arc::new(RedisSource::new(engine.clone(), 1000));
    let flusher = Flusher::new(source, store.clone());
    (db, store, engine, flusher)
}

async fn dirty(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    common::metric(&text, "widgets_dirty").expect("widgets_dirty in /metrics")
}

/// What a slow flusher does last: commits the older state it took long ago.
async fn commit_late(store: &PgStore, items: Vec<widgets::store::FlushItem>) {
    store
        .write_batch(FlushBatch {
            items,
            checkpoint: None,
            widgets: None,
            redis: None,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_serve_one_consistent_set_and_postgres_converges() {
    let db = TestDb::create().await;
    let prefix = redis_prefix();
    let (a, b) = (
        Arc::new(instance(&db, &prefix).await),
        Arc::new(instance(&db, &prefix).await),
    );
    let names: Vec<String> = (0..16).map(|i| format!("x{i}")).collect();
    for (i, s) in names.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            app.create(s, &["P", "R", "Q"]).await.status(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        b.create("x0", &["P"]).await.status(),
        StatusCode::CONFLICT,
        "b sees a's widget"
    );

    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let (a, b, names) = (a.clone(), b.clone(), names.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t);
                for i in 0..60 {
                    let app = if (t + i) % 2 == 0 { &a } else { &b };
                    let (x, y) = (&names[rng.usize(..16)], &names[rng.usize(..16)]);
                    let port = ["P", "R", "Q"][rng.usize(..3)];
                    let r = if x == y || rng.u8(..5) == 0 {
                        app.free(x, port).await
                    } else {
                        app.associate(port, x, y).await
                    };
                    assert!(r.status().is_success(), "{}", r.status());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    let via_a = app_state(|p| a.url(p), &names).await;
    let via_b = app_state(|p| b.url(p), &names).await;
    assert_eq!(via_a, via_b, "both instances read the same state");
    for (serial, (_, _, peers)) in &via_a {
        for (i, peer) in peers.iter().enumerate() {
            if let Some(peer) = peer {
                assert_eq!(
                    via_a[peer].2[i].as_deref(),
                    Some(serial.as_str()),
                    "{serial} -> {peer} is one-sided"
                );
            }
        }
    }
    eventually!("the dirty set to drain", 10, { dirty(&a).await == 0.0 });
    let mut conn = db.connect().await;
    assert_eq!(
        pg_state(&mut conn).await,
        via_a,
        "PostgreSQL equals Redis once nothing is dirty"
    );
    drop(conn);
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
    db.drop_db().await;
}

fn s(x: &str) -> Serial {
    Serial::parse("s", x).unwrap()
}

async fn create(engine: &RedisEngine, serial: &str) {
    let command = Create {
        serial: s(serial),
        name: Name::parse("n", "w").unwrap(),
        ports: Ports::from_list("p", &[PortType::P]).unwrap(),
    };
    engine.execute(command).await.unwrap();
}

async fn associate(engine: &RedisEngine, a: &str, b: &str) {
    let command = Associate {
        port: PortType::P,
        serial: s(a),
        peer: s(b),
    };
    engine.execute(command).await.unwrap();
}

/// The engine's view of `serials`, in the same shape as `pg_state`.
async fn redis_state(
    engine: &RedisEngine,
    serials: &[&str],
) -> std::collections::BTreeMap<String, common::pg::Row3> {
    let mut out = std::collections::BTreeMap::new();
    for serial in serials {
        if let Some(w) = engine.get(&s(serial)).await.unwrap() {
            let peers = [0, 1, 2].map(|i| w.peers[i].as_ref().map(|p| p.to_string()));
            out.insert(
                serial.to_string(),
                ("w".to_owned(), i16::from(w.ports.bits()), peers),
            );
        }
    }
    out
}

#[tokio::test]
async fn flushers_that_die_before_or_after_their_commit_lose_nothing_and_write_nothing_stale() {
    let (db, store, engine, flusher) = flush_parts().await;
    let all = ["a", "b", "c", "d"];
    for w in all {
        create(&engine, w).await;
    }
    associate(&engine, "a", "b").await;

    // Dies before its commit: it took a batch and wrote nothing.
    assert_eq!(engine.take(1000).await.unwrap().items.len(), 4);
    // Dies between its commit and the dirty-set removal.
    let unacked = flusher.write_unfinished().await.unwrap().unwrap();
    assert_eq!(unacked.entries.len(), 4);
    let mut conn = db.connect().await;
    assert_eq!(pg_state(&mut conn).await, redis_state(&engine, &all).await);
    // Both left every serial dirty: a live flusher writes them again, harmlessly.
    assert_eq!(engine.take(1000).await.unwrap().items.len(), 4);

    // A slow flusher takes a batch; the state moves on and a fast flusher writes it...
    let slow = engine.take(1000).await.unwrap().items;
    associate(&engine, "c", "b").await; // b re-plugged from a to c
    engine.execute(Delete { serial: s("d") }).await.unwrap();
    assert_eq!(flusher.flush_once().await.unwrap(), 4);
    // ...and changes again (c re-plugged from b to a: a, b, c dirty again).
    associate(&engine, "a", "c").await;
    // Only now does the slow one commit its older state and acknowledge it.
    let (items, entries): (Vec<_>, Vec<_>) = slow
        .into_iter()
        .map(|(item, entry)| {
            let serial = item.serial.clone();
            (item, (serial, entry))
        })
        .unzip();
    commit_late(&store, items).await;
    assert_eq!(
        engine.ack(&entries, None, None).await.unwrap(),
        0,
        "the late ack removed newer dirty entries"
    );
    let gauges = engine.gauges().await;
    assert!(gauges.contains(&("widgets_dirty", 3.0)), "{gauges:?}");
    assert!(
        !pg_state(&mut conn).await.contains_key("d"),
        "the slow flusher brought a deleted widget back"
    );
    assert_eq!(
        pg_state(&mut conn).await["b"].2[0].as_deref(),
        Some("c"),
        "older state won over newer"
    );

    flusher.flush_once().await.unwrap();
    assert_eq!(pg_state(&mut conn).await, redis_state(&engine, &all).await);
    drop(conn);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_redis_is_loaded_from_postgres_once_by_instances_starting_together() {
    let db = TestDb::create().await;
    // Fill PostgreSQL through a single-node instance on it.
    let single = spawn_app_with(&["--database-url", &db.url]).await;
    let names: Vec<String> = (0..30).map(|i| format!("l{i}")).collect();
    for s in &names {
        single.create(s, &["P", "R"]).await;
    }
    single.associate("P", "l0", "l1").await;
    single.associate("R", "l1", "l2").await;
    let want = app_state(|p| single.url(p), &names).await;
    single.stop().await;

    let prefix = redis_prefix();
    let (a, b) = tokio::join!(instance(&db, &prefix), instance(&db, &prefix));
    assert_eq!(app_state(|p| a.url(p), &names).await, want);
    assert_eq!(app_state(|p| b.url(p), &names).await, want);
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let loads: u64 = conn.get(format!("{prefix}loads")).await.unwrap();
    assert_eq!(
        loads, 1,
        "two instances starting together must load Redis once"
    );

    // New writes carry versions above everything PostgreSQL holds, so they reach it.
    assert_eq!(b.associate("P", "l0", "l2").await.status(), StatusCode::OK);
    let mut pg = db.connect().await;
    eventually!("the new association in PostgreSQL", 10, {
        pg_state(&mut pg).await["l0"].2[0].as_deref() == Some("l2")
    });
    drop(pg);
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn writes_past_the_dirty_limit_get_503_overloaded_and_reads_go_on() {
    let db = TestDb::create().await;
    let app = common::spawn_redis_instance(
        &db,
        &redis_prefix(),
        &["--flush-interval", "1h", "--max-dirty", "3"],
    )
    .await;
    for s in ["a", "b", "c"] {
        assert_eq!(app.create(s, &["P"]).await.status(), StatusCode::CREATED);
    }
    let r = app.create("d", &["P"]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(common::error_code(r).await, "overloaded");
    assert!(app.widget("a").await.is_some(), "reads go on");
    assert!(
        app.widget("d").await.is_none(),
        "the refused write changed nothing"
    );
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn flush_lag_is_the_age_of_the_oldest_unflushed_change_not_of_the_backlog() {
    let (db, _store, engine, flusher) = flush_parts().await;
    let lag = |gauges: Vec<(&'static str, f64)>| {
        gauges
            .into_iter()
            .find(|(n, _)| *n == "widgets_flush_lag_seconds")
            .unwrap()
            .1
    };
    create(&engine, "old").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A flush takes the whole dirty set; a new change lands before its acknowledgement.
    let acks = flusher.write_unfinished().await.unwrap().unwrap();
    let (entries, whole_set_at) = (acks.entries, acks.whole_set_at);
    assert!(whole_set_at.is_some(), "the batch held the whole dirty set");
    create(&engine, "new").await;
    engine
        .ack(&entries, whole_set_at.as_deref(), None)
        .await
        .unwrap();
    // The dirty set was never empty, but its oldest change is the new one.
    let lag = lag(engine.gauges().await);
    assert!(lag < 0.5, "lag {lag}s counts the flushed change's age");
    db.drop_db().await;
}

#[tokio::test]
async fn versions_start_above_everything_postgres_holds_tombstones_included() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    // A widget deleted at version 1000 by an earlier life of the service.
    sqlx::query("INSERT INTO widget_tombstones (serial_number, version) VALUES ('zombie', 1000)")
        .execute(store.pool())
        .await
        .unwrap();
    let app = instance(&db, &redis_prefix()).await;
    assert_eq!(
        app.create("zombie", &["P"]).await.status(),
        StatusCode::CREATED
    );
    let mut conn = db.connect().await;
    eventually!("the re-created widget in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("zombie")
    });
    drop(conn);
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_refused_not_served_as_empty_then_loaded_again() {
    let db = TestDb::create().await;
    let prefix = redis_prefix();
    let app = instance(&db, &prefix).await;
    assert_eq!(
        app.create("kept", &["P"]).await.status(),
        StatusCode::CREATED
    );
    eventually!("kept in PostgreSQL", 10, dirty(&app).await == 0.0);
    let mut conn = redis_conn().await;
    // What a restart without AOF leaves: nothing, not even `loaded`.
    let _: () = conn
        .del(&[format!("{prefix}loaded"), format!("{prefix}w:kept")])
        .await
        .unwrap();
    // Never answered as if it did not exist: refused until loaded again, then there.
    eventually!("kept loaded again", 15, {
        let r = app.get("/widgets/kept").await;
        match r.status() {
            StatusCode::OK => true,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(common::error_code(r).await, "unavailable");
                false
            }
            other => panic!("a widget Redis lost was answered {other}"),
        }
    });
    assert_eq!(
        app.create("new", &["P"]).await.status(),
        StatusCode::CREATED
    );
    let loads: u64 = conn.get(format!("{prefix}loads")).await.unwrap();
    assert_eq!(loads, 2, "loaded at start and once again");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_snapshot_loses_no_acknowledged_write() {
    let db = TestDb::create().await;
    let mut redis = common::OwnRedis::start().await;
    let app = own_redis_instance(&db, &redis, "50ms").await;
    let serials = serials_of(&["a", "b", "c"]);
    for s in ["a", "b"] {
        assert_eq!(app.create(s, &["P"]).await.status(), StatusCode::CREATED);
    }
    eventually!("a and b in PostgreSQL", 10, dirty(&app).await == 0.0);
    redis.save().await; // the snapshot: a and b, free, at version 2
    assert_eq!(app.associate("P", "a", "b").await.status(), StatusCode::OK);
    assert_eq!(app.free("a", "P").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.create("c", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("every write in PostgreSQL", 10, dirty(&app).await == 0.0);
    let mut pg = db.connect().await;
    let before = pg_state(&mut pg).await;
    assert_eq!(before, app_state(|p| app.url(p), &serials).await);

    // Redis crashes and comes back from the snapshot: versions 3 to 5 forgotten, which
    // PostgreSQL holds.
    redis.kill();
    redis.restart().await;
    // The next write is refused until Redis is in line, never acknowledged and dropped.
    eventually!("a write after the restore", 20, {
        let r = app.associate("P", "a", "b").await;
        match r.status() {
            StatusCode::OK => true,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(r.headers().contains_key("retry-after"));
                assert_eq!(common::error_code(r).await, "unavailable");
                false
            }
            other => panic!("the write after the restore answered {other}"),
        }
    });
    assert!(
        app.widget("c").await.is_some(),
        "a widget created after the snapshot was lost"
    );
    eventually!("the new association in PostgreSQL", 10, {
        pg_state(&mut pg).await["a"].2[0].as_deref() == Some("b")
    });
    assert_eq!(
        pg_state(&mut pg).await,
        app_state(|p| app.url(p), &serials).await
    );
    drop(pg);
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_503_while_redis_is_behind_postgres() {
    let db = TestDb::create().await;
    let mut redis = common::OwnRedis::start().await;
    // No flush for an hour: nothing brings Redis in line during the test.
    let app = own_redis_instance(&db, &redis, "1h").await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    redis.save().await;
    // PostgreSQL moves on past Redis (another life of the service wrote version 1000).
    let mut pg = db.connect().await;
    sqlx::raw_sql(
        "INSERT INTO widget_tombstones (serial_number, version) VALUES ('z', 1000); \
         UPDATE version_high_water SET version = 1000",
    )
    .execute(&mut pg)
    .await
    .unwrap();
    redis.kill();
    redis.restart().await;
    eventually!("/readyz to see the restarted Redis", 10, {
        let r = app.get("/readyz").await;
        r.status() == StatusCode::SERVICE_UNAVAILABLE
            && common::error_code(r).await == "unavailable"
    });
    let r = app.create("b", &["P"]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(common::error_code(r).await, "unavailable");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        common::metric(&metrics, "widgets_redis_behind_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    drop(pg);
    app.stop().await;
    db.drop_db().await;
}

/// A Redis that stalls past the client's response timeout, or goes down, while an
/// instance is starting is waited for, as an unreachable PostgreSQL is: `/readyz` says 503
/// meanwhile, and the instance becomes ready once Redis answers. It used to fail the start
/// for good on the first command that timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stalls_or_goes_down_during_the_start_is_waited_for() {
    for down in [false, true] {
        let db = TestDb::create().await;
        let mut redis = common::OwnRedis::start().await;
        let (url, prefix) = (redis.url(), redis_prefix());
        // Another loader holds the lock for a few seconds: the instance connects, then
        // polls Redis while it waits for that load, and the fault hits one of those polls.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}load_lock"))
            .arg("another-instance")
            .arg("PX")
            .arg(4000)
            .query_async(&mut conn)
            .await
            .unwrap();
        drop(conn);
        let dir = Arc::new(tempfile::TempDir::new().unwrap());
        let mut app = common::spawn_unready_in(
            dir,
            &[
                "--database-url",
                &db.url,
                "--redis-url",
                &url,
                "--redis-prefix",
                &prefix,
            ],
            Arc::new(widgets::wal::RealFs),
        )
        .await;
        // Connected, and waiting for the other loader, before the fault.
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        eventually!("the instance to connect to Redis", 30, {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query_async(&mut conn)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .is_some_and(|n| n >= 2)
        });
        drop(conn);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if down {
            redis.kill();
        } else {
            redis.pause();
        }
        // Past the client's 500 ms response timeout, several times over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ended = tokio::time::timeout(Duration::from_millis(100), app.ready()).await;
        assert!(
            ended.is_err(),
            "the start ended while Redis was {}: {ended:?}",
            if down { "down" } else { "stalled" }
        );
        assert_eq!(
            app.get("/readyz").await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        if down {
            redis.restart().await;
        } else {
            redis.resume();
        }
        tokio::time::timeout(Duration::from_secs(30), app.ready())
            .await
            .expect("ready within 30 s of Redis answering again")
            .expect("recovery");
        assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
        assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
        assert_eq!(app.get("/widgets/a").await.status(), StatusCode::OK);
        app.stop().await;
        db.drop_db().await;
    }
}

/// A flush that stalls inside PostgreSQL holds the fencing epoch; a request that finds a
/// restarted Redis server must check it, which raises that epoch. The request answers
/// `503 unavailable` within seconds instead of waiting as long as the flush stalls, and so
/// do requests that come while a check runs, instead of queueing behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_of_a_restarted_redis_waits_for_postgres_only_seconds() {
    let db = TestDb::create().await;
    let mut redis = common::OwnRedis::start().await;
    let app = Arc::new(own_redis_instance(&db, &redis, "1h").await);
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    redis.save().await;
    redis.kill();
    redis.restart().await; // the same data, a new run_id: checked before it is used
                           // What a flush stalled in PostgreSQL holds until it ends.
    let mut stalled = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT epoch FROM redis_epoch FOR SHARE")
        .execute(&mut stalled)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all((0..8).map(|i| {
        let app = app.clone();
        async move {
            let r = if i % 2 == 0 {
                app.get("/widgets/a").await
            } else {
                app.get("/readyz").await
            };
            (r.status(), common::error_code(r).await)
        }
    }));
    let answers = tokio::time::timeout(Duration::from_secs(15), answers)
        .await
        .expect("requests to a Redis being checked answered within 15 s");
    for (status, code) in &answers {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(8), "answered after {waited:?}");
    sqlx::raw_sql("COMMIT").execute(&mut stalled).await.unwrap();
    eventually!("the restarted Redis to be checked and used", 10, {
        app.get("/widgets/a").await.status() == StatusCode::OK
    });
    drop(stalled);
    Arc::try_unwrap(app).ok().expect("one owner").stop().await;
    db.drop_db().await;
}

/// A request that finds a restarted Redis server checks it against PostgreSQL. If
/// PostgreSQL stops answering in the middle (a network or a backend that stalls), the
/// request answers `503 unavailable` within seconds and the check's connection is closed;
/// once PostgreSQL answers again the server is checked and used. The request used to wait
/// for as long as PostgreSQL stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_whose_postgres_stops_answering_answers_503_within_seconds() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let mut redis = common::OwnRedis::start().await;
    let url = redis.url();
    let app = spawn_app_with(&[
        "--database-url",
        &db.url_via(proxy.addr),
        "--redis-url",
        &url,
        "--flush-interval",
        "1h",
    ])
    .await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    redis.save().await;
    redis.kill();
    redis.restart().await; // the same data, a new run_id: checked before it is used
                           // The check's transaction is the only one this instance begins now (no flush for an
                           // hour): PostgreSQL gets its BEGIN, and nothing more goes either way. The requests
                           // before it find the connection to the killed server broken.
    proxy.stall_on("BEGIN");
    let mut tries = 0;
    let (answer, waited) = loop {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(20), app.get("/widgets/a"))
            .await
            .expect("a request checking Redis against a stalled PostgreSQL answered within 20 s");
        if proxy.stalled() {
            break (answer, started.elapsed());
        }
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        tries += 1;
        assert!(tries < 100, "no request checked the restarted Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (answer.status(), common::error_code(answer).await.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    // The abandoned transaction's connection was closed, not handed back to the pool:
    // once the proxy passes the close on, no backend is left inside it.
    proxy.thaw();
    let mut conn = db.connect().await;
    common::pg::no_transaction_left_open(&mut conn).await;
    eventually!("the restarted Redis to be checked and used", 15, {
        app.get("/widgets/a").await.status() == StatusCode::OK
    });
    app.stop().await;
    drop(conn);
    drop(proxy);
    db.drop_db().await;
}

/// A flush that fails in its first step, taking the batch from Redis, counts in
/// `widgets_flush_failures_total` as a failed write does: the alert on that counter is
/// how an operator learns that the flushes stopped. It used to count only failed writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_cannot_take_its_batch_from_redis_counts_as_a_failure() {
    let db = TestDb::create().await;
    let redis = common::OwnRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    // Its own process: the counter is the flusher's alone.
    let server = common::binary::start(
        dir.path(),
        &["--database-url", &db.url, "--redis-url", &url],
    )
    .await;
    let failures = || async {
        let text = common::binary::metrics(&server).await;
        common::metric(&text, "widgets_flush_failures_total").expect("the counter")
    };
    assert_eq!(failures().await, 0.0);
    redis.pause(); // every take (a script on Redis) times out
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    eventually!("the flusher's failed takes to be counted", 10, {
        failures().await >= 1.0
    });
    server.stop().await.unwrap();
    db.drop_db().await;
}

/// A loader that stalled past its lease while another loaded Redis, and writes began,
/// writes none of its older rows over them when it wakes: each batch it writes checks
/// that it still holds the lock. It used to write them all and fail only at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_lost_its_lock_writes_no_widget() {
    let (db, store, engine, flusher) = flush_parts().await;
    create(&engine, "a").await;
    create(&engine, "b").await;
    associate(&engine, "a", "b").await;
    flush_all(&flusher, &engine).await; // PostgreSQL holds both, plugged
                                        // Another loader took over and cleared what this one had written.
    let mut conn = redis_conn().await;
    let prefix = engine.prefix().to_owned();
    let _: () = conn
        .set(format!("{prefix}load_lock"), "another-loader")
        .await
        .unwrap();
    let _: () = conn
        .del(&["w:a", "w:b", "c:a", "c:b"].map(|k| format!("{prefix}{k}")))
        .await
        .unwrap();
    let lost = widgets::engine::redis::load::load(&engine, &store, "the-stalled-one")
        .await
        .expect_err("a loader without the lock");
    assert!(
        lost.is::<widgets::engine::redis::load::LockLost>(),
        "{lost:#}"
    );
    let written: Vec<String> = conn.keys(format!("{prefix}[wc]:*")).await.unwrap();
    assert!(written.is_empty(), "written without the lock: {written:?}");
    drop(conn);
    db.drop_db().await;
}

/// An instance on a Redis of the test's own, flushing every `flush_interval`.
async fn own_redis_instance(
    db: &TestDb,
    redis: &common::OwnRedis,
    flush_interval: &str,
) -> TestApp {
    let url = redis.url();
    spawn_app_with(&[
        "--database-url",
        &db.url,
        "--redis-url",
        &url,
        "--flush-interval",
        flush_interval,
    ])
    .await
}

fn serials_of(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_slow_flusher_cannot_plug_a_freed_port_again() {
    let (db, store, engine, flusher) = flush_parts().await;
    for w in ["x", "y"] {
        create(&engine, w).await;
    }
    associate(&engine, "x", "y").await;
    let slow = engine.take(1000).await.unwrap().items; // x and y plugged
    engine
        .execute(Free {
            serial: s("x"),
            port: PortType::P,
        })
        .await
        .unwrap();
    flusher.flush_once().await.unwrap(); // the freed state reaches PostgreSQL first
    let items = slow.into_iter().map(|(item, _)| item).collect();
    commit_late(&store, items).await;
    let mut conn = db.connect().await;
    let state = pg_state(&mut conn).await;
    assert_eq!(
        state["x"].2[0], None,
        "an older state plugged a freed port again"
    );
    assert_eq!(state["y"].2[0], None);
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn a_slow_flusher_cannot_plug_an_old_incarnation_into_a_recreated_widget() {
    let (db, store, engine, flusher) = flush_parts().await;
    for w in ["a", "b"] {
        create(&engine, w).await;
    }
    flusher.flush_once().await.unwrap();
    associate(&engine, "a", "b").await;
    let slow = engine.take(1000).await.unwrap().items; // a and b plugged
                                                       // Deleted and created again with no port P, all flushed before the slow one commits.
    engine.execute(Delete { serial: s("a") }).await.unwrap();
    flusher.flush_once().await.unwrap();
    let command = Create {
        serial: s("a"),
        name: Name::parse("n", "w").unwrap(),
        ports: Ports::from_list("p", &[PortType::R]).unwrap(),
    };
    engine.execute(command).await.unwrap();
    flusher.flush_once().await.unwrap();
    let items = slow.into_iter().map(|(item, _)| item).collect();
    commit_late(&store, items).await;

    let mut conn = db.connect().await;
    let p_rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT serial_number, peer_serial_number FROM associations_p")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(
        !p_rows.iter().any(|(s, peer)| s == "a" && peer.is_some()),
        "the old incarnation's association came back: {p_rows:?}"
    );
    assert_eq!(
        pg_state(&mut conn).await,
        redis_state(&engine, &["a", "b"]).await
    );
    // And the database loads, as a single-node start would load it.
    store
        .load(Box::new(|_, _| {}))
        .await
        .expect("the rows PostgreSQL holds are ones the API allows");
    drop(conn);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_killed_mid_load_is_replaced_within_seconds() {
    let db = TestDb::create().await;
    // Enough widgets that loading them takes a few seconds (debug build).
    let seeded = std::process::Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args([
            "bench-seed",
            "--widgets",
            "100000",
            "--database-url",
            &db.url,
        ])
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let prefix = redis_prefix();
    let redis = redis_url();
    let mut command = widgets_testkit::server::ServerCommand::new(env!("CARGO_BIN_EXE_widgets"));
    command.args = [
        "--database-url",
        &db.url,
        "--redis-url",
        &redis,
        "--redis-prefix",
        &prefix,
    ]
    .map(String::from)
    .into();
    let loader = common::binary::Server::start(&command).await.unwrap();
    // Killed once it holds the lock and has written some widgets, before it is done.
    let mut conn = redis_conn().await;
    eventually!("the loader to start writing widgets", 30, {
        let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}w:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        !keys.is_empty()
    });
    loader.kill9().unwrap();
    let lock: Option<String> = conn.get(format!("{prefix}load_lock")).await.unwrap();
    let loaded: bool = conn.exists(format!("{prefix}loaded")).await.unwrap();
    assert!(
        lock.is_some() && !loaded,
        "the loader finished before it was killed: seed more widgets"
    );

    let started = std::time::Instant::now();
    let app = instance(&db, &prefix).await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(40),
        "another instance took {waited:?} to take over the load"
    );
    let loads: u64 = conn.get(format!("{prefix}loads")).await.unwrap();
    assert_eq!(loads, 1);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert_eq!(common::metric(&text, "widgets_in_memory"), Some(100_000.0));
    app.stop().await;
    db.drop_db().await;
}

/// The keys of a test process that is gone are removed when the next one takes its first
/// prefix; a live process's keys stay.
#[tokio::test]
async fn the_keys_of_test_processes_that_are_gone_are_swept() {
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let dead_key = format!("test:{pid}:1:w:a");
    let live_key = format!("{}w:a", redis_prefix());
    let mut conn = redis_conn().await;
    let _: () = conn.set(&dead_key, 1).await.unwrap();
    let _: () = conn.set(&live_key, 1).await.unwrap();
    tokio::task::spawn_blocking(common::sweep_dead_prefixes)
        .await
        .unwrap()
        .unwrap();
    let dead: bool = conn.exists(&dead_key).await.unwrap();
    let live: bool = conn.exists(&live_key).await.unwrap();
    let _: () = conn.del(&live_key).await.unwrap();
    assert!(!dead, "{dead_key} is still there");
    assert!(live, "{live_key} was removed");
}

/// A connection of the test's own to Redis.
async fn redis_conn() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test]
async fn the_load_lock_is_renewed_while_held_and_released_only_by_its_holder() {
    use widgets::engine::redis::load::{holding_lock, release_lock};
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let prefix = redis_prefix();
    let engine = RedisEngine::connect(&redis_url(), &prefix, 1000, store)
        .await
        .unwrap();
    let lock = format!("{prefix}load_lock");
    let mut conn = redis_conn().await;
    let lease = Duration::from_millis(300);
    let take = |token: &'static str| {
        redis::cmd("SET")
            .arg(&lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis() as u64)
            .clone()
    };
    let taken: Option<String> = take("mine").query_async(&mut conn).await.unwrap();
    assert!(taken.is_some());
    let mut other = redis_conn().await;
    let held = holding_lock(&engine, "mine", lease, async {
        for _ in 0..10 {
            tokio::time::sleep(lease / 3).await;
            let stolen: Option<String> = take("theirs").query_async(&mut other).await.unwrap();
            assert!(stolen.is_none(), "the lock lapsed while its holder worked");
        }
        Ok(())
    });
    held.await.unwrap();
    assert!(!release_lock(&engine, "theirs").await.unwrap());
    let holder: Option<String> = conn.get(&lock).await.unwrap();
    assert_eq!(
        holder.as_deref(),
        Some("mine"),
        "another loader's release took it"
    );
    assert!(release_lock(&engine, "mine").await.unwrap());
    let holder: Option<String> = conn.get(&lock).await.unwrap();
    assert_eq!(holder, None);

    // A holder that finds the lock another's stops, leaving its work undone.
    let _: Option<String> = take("theirs").query_async(&mut conn).await.unwrap();
    let lost = holding_lock(&engine, "mine", lease, async {
        tokio::time::sleep(lease * 2).await;
        Ok(())
    })
    .await;
    assert!(lost.is_err(), "a holder went on without its lock");
    drop(engine);
    db.drop_db().await;
}

/// Flushes until nothing is dirty.
async fn flush_all(flusher: &RedisFlusher, engine: &RedisEngine) {
    for _ in 0..100 {
        flusher.flush_once().await.unwrap();
        if engine.gauges().await.contains(&("widgets_dirty", 0.0)) {
            return;
        }
    }
    panic!("the dirty set did not drain");
}

#[tokio::test]
async fn a_flush_round_takes_every_change_whole() {
    let (db, _store, engine, flusher) = flush_parts().await;
    for w in ["a", "b", "c"] {
        create(&engine, w).await;
    }
    associate(&engine, "a", "b").await;
    flush_all(&flusher, &engine).await;
    associate(&engine, "a", "c").await; // a re-plugged from b to c: b freed
    create(&engine, "e").await; // a change of its own
    let footprint = ["a", "b", "c"].map(String::from);
    for _ in 0..20 {
        let taken = engine.take(1).await.unwrap();
        let mut serials: Vec<String> = taken
            .items
            .iter()
            .map(|(item, _)| item.serial.to_string())
            .collect();
        serials.sort();
        assert!(
            serials == footprint || serials == ["e"],
            "a round took part of a change: {serials:?}"
        );
        assert!(!taken.whole_set, "{serials:?} is not the whole dirty set");
    }
    assert!(engine.take(4).await.unwrap().whole_set);
    flush_all(&flusher, &engine).await;
    let mut conn = db.connect().await;
    assert_eq!(
        pg_state(&mut conn).await,
        redis_state(&engine, &["a", "b", "c", "e"]).await
    );
    drop(conn);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_never_shows_one_side_of_a_re_plug_even_with_one_side_locked() {
    let (db, _store, engine, _) = flush_parts().await;
    let store = Arc::new(PgStore::connect(&db.url).await.unwrap());
    // Rounds of one widget each: the smallest a round can be.
    let flusher = Arc::new(Flusher::new(
        Arc::new(RedisSource::new(engine.clone(), 1)),
        store,
    ));
    for w in ["a", "b", "c"] {
        create(&engine, w).await;
    }
    associate(&engine, "a", "b").await;
    flush_all(&flusher, &engine).await;

    // b's row is locked: a flush that writes b waits, and one that does not could commit
    // a -> c without b's side.
    let mut locker = db.connect().await;
    let mut lock = sqlx::Connection::begin(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM associations_p WHERE serial_number = 'b' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    associate(&engine, "a", "c").await; // a re-plugged from b to c: b freed
                                        // Flushers of four instances, each taking rounds of one widget.
    let flushers: Vec<_> = (0..4)
        .map(|_| {
            let flusher = flusher.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    flusher.flush_once().await.unwrap();
                }
            })
        })
        .collect();
    let mut reader = db.connect().await;
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        let bad = asymmetric_rows(&mut reader).await;
        assert!(bad.is_empty(), "PostgreSQL showed one side: {bad:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();
    for f in flushers {
        f.await.unwrap();
    }
    flush_all(&flusher, &engine).await;
    assert!(asymmetric_rows(&mut reader).await.is_empty());
    assert_eq!(
        pg_state(&mut reader).await,
        redis_state(&engine, &["a", "b", "c"]).await
    );
    drop((reader, locker));
    db.drop_db().await;
}

#[tokio::test]
async fn a_redis_whose_seq_went_back_in_place_is_caught_by_the_next_flush_round() {
    let (db, store, engine, flusher) = flush_parts().await;
    for w in ["a", "b"] {
        create(&engine, w).await;
    }
    flush_all(&flusher, &engine).await;
    assert!(store.high_water().await.unwrap() >= 2);
    // Redis's counter goes back in place (the same server: no new run_id to notice).
    let mut conn = redis_conn().await;
    let prefix = engine.prefix().to_owned();
    let _: () = conn.set(format!("{prefix}seq"), 0).await.unwrap();
    create(&engine, "c").await; // version 1, below what PostgreSQL holds
                                // The next round finds seq below PostgreSQL's high water before it takes anything,
                                // writes what Redis holds dirty, and loads Redis again from PostgreSQL.
    flush_all(&flusher, &engine).await;
    let loads: u64 = conn.get(format!("{prefix}loads")).await.unwrap();
    assert_eq!(loads, 2, "Redis was not loaded again");
    let seq: u64 = conn.get(format!("{prefix}seq")).await.unwrap();
    assert!(seq >= store.high_water().await.unwrap());
    let mut pg = db.connect().await;
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b", "c"]).await
    );
    assert!(
        pg_state(&mut pg).await.contains_key("c"),
        "the write was lost"
    );
    drop(pg);
    db.drop_db().await;
}

#[tokio::test]
async fn an_ack_to_a_redis_whose_seq_went_back_clears_no_dirty_mark() {
    let (db, store, engine, flusher) = flush_parts().await;
    for w in ["a", "b"] {
        create(&engine, w).await;
    }
    flush_all(&flusher, &engine).await;
    let taken = engine.take(1000).await.unwrap(); // nothing dirty: an empty batch
    assert!(taken.items.is_empty());
    create(&engine, "c").await;
    let (batch, acks) = engine.take(1000).await.unwrap().into_flush();
    store.write_batch(batch).await.unwrap();
    // Between the commit and the ack, Redis's counter goes back in place.
    let mut conn = redis_conn().await;
    let _: () = conn
        .set(format!("{}seq", engine.prefix()), 1)
        .await
        .unwrap();
    assert!(
        engine.finish_flush(&acks).await.is_err(),
        "acknowledged to a Redis behind PostgreSQL"
    );
    let gauges = engine.gauges().await;
    assert!(
        gauges.contains(&("widgets_dirty", 1.0)),
        "the dirty mark was cleared: {gauges:?}"
    );
    drop(flusher);
    db.drop_db().await;
}

#[tokio::test]
async fn a_batch_taken_before_a_server_was_checked_again_cannot_commit_after() {
    let (db, store, engine, _flusher) = flush_parts().await;
    for w in ["a", "b"] {
        create(&engine, w).await;
    }
    associate(&engine, "a", "b").await;
    // A flusher takes a batch, then stalls before its transaction...
    let (late, _) = engine.take(1000).await.unwrap().into_flush();
    // ...while another instance checks the server (as after a failover) and trusts it.
    let other = RedisEngine::connect(&redis_url(), engine.prefix(), 1000, (*store).clone())
        .await
        .unwrap();
    other.check_server().await.unwrap();
    match store.write_batch(late).await {
        Err(widgets::store::StoreError::StaleEpoch { mine, current }) => assert!(mine < current),
        other => panic!("a batch from before the check committed: {other:?}"),
    }
    let mut pg = db.connect().await;
    assert!(pg_state(&mut pg).await.is_empty());
    drop(pg);
    db.drop_db().await;
}

#[tokio::test]
async fn a_load_that_postgres_rows_would_fail_leaves_redis_as_it_is() {
    // PostgreSQL holds a one-sided row, and Redis is found behind.
    let (db, engine, flusher, pg) = a_and_b_flushed_with_a_one_sided_row().await;
    let mut conn = redis_conn().await;
    let prefix = engine.prefix().to_owned();
    let _: () = conn.set(format!("{prefix}seq"), 0).await.unwrap();
    let failed = flusher.flush_once().await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        format!("{:?}", failed.unwrap_err()).contains("cannot be loaded"),
        "the error does not say why"
    );
    let loaded: bool = conn.exists(format!("{prefix}loaded")).await.unwrap();
    let a: bool = conn.exists(format!("{prefix}w:a")).await.unwrap();
    assert!(
        loaded && a,
        "Redis was cleared for a load that could not work"
    );
    drop(pg);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_of_postgres_never_sees_one_side_while_two_instances_re_plug() {
    let db = TestDb::create().await;
    let prefix = redis_prefix();
    // Rounds of one widget picked, flushed as often as possible, by both instances.
    let args = ["--flush-interval", "5ms", "--flush-batch", "1"];
    let (a, b) = tokio::join!(
        common::spawn_redis_instance(&db, &prefix, &args),
        common::spawn_redis_instance(&db, &prefix, &args)
    );
    let apps = Arc::new([a, b]);
    let names: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    for s in &names {
        assert_eq!(
            apps[0].create(s, &["P", "R"]).await.status(),
            StatusCode::CREATED
        );
    }
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (apps, names) = (apps.clone(), names.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t);
                for i in 0..150 {
                    let (x, y) = (&names[rng.usize(..12)], &names[rng.usize(..12)]);
                    let port = ["P", "R"][rng.usize(..2)];
                    if x != y {
                        let status = apps[i % 2].associate(port, x, y).await.status();
                        assert!(status.is_success(), "{status}");
                    }
                }
            })
        })
        .collect();
    let mut conn = db.connect().await;
    let mut samples = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let bad = asymmetric_rows(&mut conn).await;
        assert!(bad.is_empty(), "PostgreSQL showed one side: {bad:?}");
        samples += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(samples > 10, "too few samples ({samples}) to mean anything");
    eventually!("PostgreSQL to catch up", 10, dirty(&apps[0]).await == 0.0);
    assert_eq!(
        pg_state(&mut conn).await,
        app_state(|p| apps[1].url(p), &names).await
    );
    // Two flushers committing and acknowledging in any order never look like a
    // PostgreSQL gone back in time (the instances share this process's metrics with the
    // other tests, so Redis's keys tell).
    let mut redis = redis_conn().await;
    for key in ["repairs", "lost_flush"] {
        let value: Option<String> = redis.get(format!("{prefix}{key}")).await.unwrap();
        assert_eq!(value, None, "{key}");
    }
    let acked: u64 = redis.zcard(format!("{prefix}acked")).await.unwrap();
    assert!(acked > 10, "only {acked} flushes acknowledged");
    drop(conn);
    let [a, b] = Arc::into_inner(apps).expect("writers are done");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// A PostgreSQL that stays locked at SIGTERM holds a Redis-mode instance's exit for
/// `--final-flush-timeout`, not for the flush in progress and every retry of the last one
/// (here at least 4 x 5 s); what it did not write stays dirty in Redis, and the next
/// instance flushes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_behind_a_locked_postgres_leaves_its_widgets_dirty_in_redis_for_the_next() {
    let db = TestDb::create().await;
    let redis = common::OwnRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let args = [
        "--database-url",
        &db.url,
        "--redis-url",
        &url,
        "--pg-flush-timeout",
        "5s",
        "--final-flush-timeout",
        "1s",
        "--flush-interval",
        "200ms",
    ];
    let (server, mut locker, mut watcher, _) =
        common::pg::a_flush_held_by_a_lock(&db, dir.path(), &args).await;

    // The final flush is bounded at 1 s; each of its tries would take 5 s.
    common::binary::stop_within(server, Duration::from_secs(10)).await;
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    let next = common::binary::start(dir.path(), &args).await;
    eventually!("the next instance to flush the widget", 20, {
        let flushed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM widgets WHERE serial_number = 'a'")
                .fetch_one(&mut watcher)
                .await
                .unwrap();
        flushed == 1
    });
    next.stop().await.unwrap();
    drop((locker, watcher));
    db.drop_db().await;
}

/// The high-water mark a check compares Redis's `seq` with is read after the flushes the
/// epoch's raise waited for, also where the database's default isolation is repeatable
/// read: a snapshot taken inside the raise's transaction predates them there, and would
/// trust a Redis server behind a version one of them committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raise_reads_the_high_water_mark_after_the_flushes_it_waited_for() {
    let db = TestDb::create().await;
    let mut admin = db.connect().await;
    common::pg::set_for_database(&db, "default_transaction_isolation", "'repeatable read'").await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    // A flush in flight: it holds the epoch it was taken under and raises the mark.
    let mut flush = db.connect().await;
    let mut tx = common::pg::hold_the_epoch(&mut flush).await;
    sqlx::query("UPDATE version_high_water SET version = GREATEST(version, 1000)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let raising = tokio::spawn({
        let store = store.clone();
        async move { store.raise_redis_epoch(Some(Duration::from_secs(5))).await }
    });
    // The raise waits for the flush's lock: its snapshot, if it took one in its own
    // transaction, predates the flush's commit.
    common::pg::backend_waiting_for_a_lock(&mut admin).await;
    tx.commit().await.unwrap();
    let (high, _) = raising.await.unwrap().unwrap();
    assert_eq!(high, 1000);
    drop((admin, flush, store));
    db.drop_db().await;
}

/// A load of Redis behind a flush that holds the fencing epoch (one whose PostgreSQL
/// backend stalls) gives up after the flush timeout, says why, releases the load lock and
/// is tried again; it used to wait as long as the flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_behind_a_flush_holding_the_epoch_gives_up_and_is_tried_again() {
    let db = TestDb::create().await;
    let store = common::pg::store_timing_out_after(&db.url, Duration::from_secs(1)).await;
    let engine = RedisEngine::connect(&redis_url(), &redis_prefix(), 1000, store.clone())
        .await
        .unwrap();
    let mut flush = db.connect().await;
    let tx = common::pg::hold_the_epoch(&mut flush).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let loading = widgets::engine::redis::load::ensure_loaded(&engine, &store, &stop);
    let error = tokio::time::timeout(Duration::from_secs(20), loading)
        .await
        .expect("a load behind a held epoch gave up within 20 s")
        .expect_err("a load behind a held epoch");
    assert!(widgets::engine::redis::load::passing(&error), "{error:#}");
    let message = format!("{error:#}");
    assert!(
        message.contains("fencing epoch was not raised"),
        "{message}"
    );
    let mut redis = redis_conn().await;
    let lock: Option<String> = redis
        .get(format!("{}load_lock", engine.prefix()))
        .await
        .unwrap();
    assert_eq!(lock, None, "the load lock was released");
    tx.rollback().await.unwrap();
    assert!(
        widgets::engine::redis::load::ensure_loaded(&engine, &store, &stop)
            .await
            .unwrap()
    );
    drop(flush);
    db.drop_db().await;
}

/// The tables a flush writes, and the counters beside them.
const FLUSHED_TABLES: [&str; 8] = [
    "widgets",
    "associations_p",
    "associations_r",
    "associations_q",
    "widget_tombstones",
    "version_high_water",
    "flush_log",
    "redis_epoch",
];

/// A backup of the database: a copy of every table a flush writes.
async fn back_up(pg: &mut sqlx::PgConnection) {
    for table in FLUSHED_TABLES {
        sqlx::raw_sql(&format!(
            "CREATE TABLE saved_{table} AS SELECT * FROM {table}"
        ))
        .execute(&mut *pg)
        .await
        .unwrap();
    }
}

/// The backup restored, in one transaction: the database goes back in time.
async fn restore(pg: &mut sqlx::PgConnection) {
    let mut sql = String::from("BEGIN;");
    for table in FLUSHED_TABLES {
        sql += &format!("DELETE FROM {table}; INSERT INTO {table} SELECT * FROM saved_{table};");
    }
    sql += "COMMIT";
    sqlx::raw_sql(&sql).execute(&mut *pg).await.unwrap();
}

async fn redis_counter(engine: &RedisEngine, name: &str) -> u64 {
    let count: Option<u64> = redis_conn()
        .await
        .get(format!("{}{name}", engine.prefix()))
        .await
        .unwrap();
    count.unwrap_or(0)
}

/// PostgreSQL restored from a backup under running instances (or failed over to a replica
/// that lagged) has lost flushes whose dirty marks Redis cleared: those widgets were only
/// in Redis, and the flushes after went on without them (or, where the backup held an
/// older fencing epoch, were refused for ever). The next flush round finds the database's
/// count of flushes below the one Redis acknowledged, marks the lost widgets dirty again,
/// and the flushes write them, each change whole even in rounds of one widget.
async fn a_postgres_gone_back_in_time_gets_its_lost_widgets_again(epoch_raised_since: bool) {
    let (db, store, engine, flusher) = flush_parts().await;
    let all = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for w in &all[..6] {
        create(&engine, w).await;
    }
    associate(&engine, "a", "b").await;
    associate(&engine, "c", "d").await;
    associate(&engine, "e", "f").await;
    flush_all(&flusher, &engine).await;
    let mut pg = db.connect().await;
    back_up(&mut pg).await;

    // Flushed after the backup: a re-plug freeing two peers, a delete freeing one, a
    // create plugged into the freed one.
    associate(&engine, "a", "c").await;
    engine.execute(Delete { serial: s("e") }).await.unwrap();
    create(&engine, "g").await;
    associate(&engine, "g", "f").await;
    if epoch_raised_since {
        // Another instance checks the server (as after a Redis failover).
        another_instance(&engine, &store).await;
    }
    flush_all(&flusher, &engine).await;
    assert_eq!(pg_state(&mut pg).await, redis_state(&engine, &all).await);

    restore(&mut pg).await;
    create(&engine, "h").await;
    assert_ne!(pg_state(&mut pg).await, redis_state(&engine, &all).await);
    // Rounds of one widget (and what it is linked to), each checked on its own. The first
    // finds the database behind before it takes anything.
    assert_eq!(redis_counter(&engine, "repairs").await, 0);
    let mut rounds = 0;
    while let Some((batch, acks)) = engine.take_flush(1).await.unwrap() {
        if rounds == 0 {
            assert_eq!(redis_counter(&engine, "repairs").await, 1);
        }
        rounds += 1;
        store.write_batch(batch).await.unwrap();
        engine.finish_flush(&acks).await.unwrap();
        let bad = asymmetric_rows(&mut pg).await;
        assert!(bad.is_empty(), "PostgreSQL showed one side: {bad:?}");
    }
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &all).await,
        "PostgreSQL misses what it lost"
    );
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    // Once in line, the rounds after find nothing to repair.
    create(&engine, "i").await;
    flush_all(&flusher, &engine).await;
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    assert!(pg_state(&mut pg).await.contains_key("i"));
    drop(pg);
    db.drop_db().await;
}

#[tokio::test]
async fn a_postgres_gone_back_in_time_gets_the_widgets_it_lost_written_again() {
    a_postgres_gone_back_in_time_gets_its_lost_widgets_again(false).await;
}

#[tokio::test]
async fn a_postgres_gone_back_to_an_older_epoch_gets_its_flushes_again() {
    a_postgres_gone_back_in_time_gets_its_lost_widgets_again(true).await;
}

/// While a repair holds the load lock, no flush takes anything: a widget lost by the
/// database and not yet marked again could otherwise be written without its peer.
#[tokio::test]
async fn no_flush_takes_anything_while_a_repair_compares_postgres_with_redis() {
    let (db, _store, engine, _flusher) = flush_parts().await;
    create(&engine, "a").await;
    let mut conn = redis_conn().await;
    let lock = format!("{}load_lock", engine.prefix());
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("repair-test")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(engine.take(1000).await.unwrap().items.is_empty());
    let _: () = conn.del(&lock).await.unwrap();
    assert_eq!(engine.take(1000).await.unwrap().items.len(), 1);
    db.drop_db().await;
}

/// A flush lost by a failover, and the flush that was in flight across it: checked and
/// taken before the failover, committed on the new primary after it, by a flusher that
/// dies before its acknowledgement. The new primary's count of flushes is then the one
/// Redis acknowledged last, but under another id.
#[tokio::test]
async fn a_lost_flush_is_found_though_the_next_one_brings_the_count_back() {
    let (db, store, engine, flusher, _, mut pg) = a_flushed_and_backed_up(0).await;
    create(&engine, "b").await; // flushed and acknowledged on the primary, then lost
    flush_all(&flusher, &engine).await;
    create(&engine, "c").await;
    let (batch, acks) = engine.take_flush(1000).await.unwrap().unwrap();
    restore(&mut pg).await; // the failover to the replica
    store.write_batch(batch).await.unwrap();
    drop(acks);
    create(&engine, "d").await;
    flush_all(&flusher, &engine).await;
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b", "c", "d"]).await,
        "PostgreSQL lost b and no repair noticed"
    );
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    drop(pg);
    db.drop_db().await;
}

/// The same with two instances: the other's batch, taken before this one's flush was
/// acknowledged, commits on the new primary after the failover.
#[tokio::test]
async fn a_lost_flush_is_found_though_another_instance_brings_the_count_back() {
    let (db, store, engine, flusher, other, mut pg) = backed_up_with_b_and_c_dirty().await;
    let taken_by_other = take_one(&other, "c").await;
    let (batch, acks) = engine.take_flush(1000).await.unwrap().unwrap();
    store.write_batch(batch).await.unwrap();
    engine.finish_flush(&acks).await.unwrap();
    restore(&mut pg).await; // the failover: b's flush lost
    store.write_batch(taken_by_other.0).await.unwrap();
    other.finish_flush(&taken_by_other.1).await.unwrap();
    create(&engine, "d").await;
    flush_all(&flusher, &engine).await;
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b", "c", "d"]).await,
        "PostgreSQL lost b and no repair noticed"
    );
    drop(pg);
    db.drop_db().await;
}

/// A backup taken after the last flush and restored after two epoch raises: every flush
/// is there, only the epoch went back, and every flush would be refused for good.
#[tokio::test]
async fn a_postgres_gone_back_to_an_older_epoch_alone_takes_flushes_again() {
    let (db, store, engine, flusher, _, mut pg) = a_flushed_and_backed_up(0).await;
    for _ in 0..2 {
        another_instance(&engine, &store).await;
    }
    restore(&mut pg).await;
    create(&engine, "b").await;
    flush_all(&flusher, &engine).await;
    assert!(pg_state(&mut pg).await.contains_key("b"));
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    drop(pg);
    db.drop_db().await;
}

/// A repair of a database that lost nothing marks nothing: after any mix of writes and
/// flushes, every widget's version is the same on both sides.
#[tokio::test]
async fn a_repair_of_a_postgres_in_line_marks_nothing() {
    let (db, _store, engine, flusher) = flush_parts().await;
    let names: Vec<String> = (0..12).map(|i| format!("x{i}")).collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let all = Ports::from_list("p", &PortType::ALL).unwrap();
    for i in 0..400 {
        let x = s(&names[rng.usize(..12)]);
        let y = s(&names[rng.usize(..12)]);
        let port = PortType::ALL[rng.usize(..3)];
        // Refusals (a widget that is not there, a port it lacks) are part of the mix.
        let _ = match rng.u8(..6) {
            0 => engine
                .execute(Create {
                    serial: x,
                    name: Name::parse("n", "w").unwrap(),
                    ports: all,
                })
                .await
                .map(drop),
            1 => engine.execute(Delete { serial: x }).await.map(drop),
            2 => engine.execute(Free { serial: x, port }).await.map(drop),
            _ => engine
                .execute(Associate {
                    port,
                    serial: x,
                    peer: y,
                })
                .await
                .map(drop),
        };
        if i % 50 == 0 {
            flush_all(&flusher, &engine).await;
        }
    }
    flush_all(&flusher, &engine).await;
    // A repair forced by hand.
    let _: () = redis_conn()
        .await
        .set(format!("{}lost_flush", engine.prefix()), 1)
        .await
        .unwrap();
    assert!(
        engine.take(1000).await.unwrap().items.is_empty(),
        "the repair marked widgets PostgreSQL holds as Redis does"
    );
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    db.drop_db().await;
}

/// A flush committed on the old primary and acknowledged only after the failover, once
/// another flush has been acknowledged under the same count on the new primary: the late
/// acknowledgement clears the lost flush's dirty marks, and the count Redis keeps matches
/// the new primary's; only the two ids under one count tell.
#[tokio::test]
async fn a_lost_flush_acknowledged_late_is_found() {
    let (db, store, engine, flusher, other, mut pg) = backed_up_with_b_and_c_dirty().await;
    let taken_by_other = take_one(&other, "c").await;
    let (batch, late) = take_one(&engine, "b").await;
    store.write_batch(batch).await.unwrap(); // on the old primary
    restore(&mut pg).await; // the failover: b's flush lost
    store.write_batch(taken_by_other.0).await.unwrap();
    other.finish_flush(&taken_by_other.1).await.unwrap();
    engine.finish_flush(&late).await.unwrap(); // b's marks cleared
    flush_all(&flusher, &engine).await;
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b", "c"]).await,
        "PostgreSQL lost b and no repair noticed"
    );
    drop(pg);
    db.drop_db().await;
}

/// An acknowledgement of a flush older than every one Redis keeps could never be checked
/// against PostgreSQL by a later round: it clears nothing, and its widgets are written
/// again.
#[tokio::test]
async fn an_acknowledgement_too_old_to_be_checked_clears_nothing() {
    let (db, _store, engine, _flusher) = flush_parts().await;
    create(&engine, "a").await;
    let (_, acks) = engine.take_flush(1000).await.unwrap().unwrap();
    let mut conn = redis_conn().await;
    let acked = format!("{}acked", engine.prefix());
    for count in 1000..1256u64 {
        let _: () = conn.zadd(&acked, count.to_string(), count).await.unwrap();
    }
    let old = widgets::store::FlushId { count: 10, id: 7 };
    assert_eq!(engine.ack(&acks.entries, None, Some(old)).await.unwrap(), 0);
    assert!(engine.gauges().await.contains(&("widgets_dirty", 1.0)));
    let kept: u64 = conn.zcard(&acked).await.unwrap();
    assert_eq!(kept, 256);
    // One newer than the oldest kept is recorded, and clears.
    let new = widgets::store::FlushId { count: 2000, id: 8 };
    assert_eq!(engine.ack(&acks.entries, None, Some(new)).await.unwrap(), 1);
    let oldest: Vec<(String, u64)> = conn.zrange_withscores(&acked, 0, 0).await.unwrap();
    assert_eq!(oldest, vec![("1001".to_owned(), 1001)]);
    db.drop_db().await;
}

/// Another instance on the engine's Redis and PostgreSQL, its server checked (which raises
/// the fencing epoch).
async fn another_instance(engine: &RedisEngine, store: &PgStore) -> RedisEngine {
    let other = RedisEngine::connect(&redis_url(), engine.prefix(), 1000, store.clone())
        .await
        .unwrap();
    other.check_server().await.unwrap();
    other
}

/// A flush round of `engine` that took `serial` (rounds of one widget, taken again until
/// one does).
async fn take_one(engine: &RedisEngine, serial: &str) -> (FlushBatch, Acks) {
    loop {
        let (batch, acks) = engine.take_flush(1).await.unwrap().unwrap();
        if batch.items[0].serial.as_str() == serial {
            return (batch, acks);
        }
    }
}

/// `a` created, flushed and backed up (the replica, lagging from here), with `others`
/// more instances checked in before.
async fn a_flushed_and_backed_up(
    others: usize,
) -> (
    TestDb,
    Arc<PgStore>,
    Arc<RedisEngine>,
    RedisFlusher,
    Vec<RedisEngine>,
    sqlx::PgConnection,
) {
    let (db, store, engine, flusher) = flush_parts().await;
    let mut instances = Vec::new();
    for _ in 0..others {
        instances.push(another_instance(&engine, &store).await);
    }
    create(&engine, "a").await;
    flush_all(&flusher, &engine).await;
    let mut pg = db.connect().await;
    back_up(&mut pg).await;
    (db, store, engine, flusher, instances, pg)
}

/// Two instances; `a` flushed and backed up, then `b` and `c` created and not flushed.
async fn backed_up_with_b_and_c_dirty() -> (
    TestDb,
    Arc<PgStore>,
    Arc<RedisEngine>,
    RedisFlusher,
    RedisEngine,
    sqlx::PgConnection,
) {
    let (db, store, engine, flusher, mut others, pg) = a_flushed_and_backed_up(1).await;
    let other = others.pop().expect("one more instance");
    create(&engine, "b").await;
    create(&engine, "c").await;
    (db, store, engine, flusher, other, pg)
}

/// Redis comes back from a snapshot taken after PostgreSQL went back in time and before the
/// repair forgot the flushes it had acknowledged: its `acked` names a flush of the lost
/// history, and its `seq` is below versions PostgreSQL got since. Such a Redis is loaded
/// again from PostgreSQL, which forgets them; the rounds used to stop at a repair that
/// refused a Redis behind the database, every one of them, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_from_before_a_repair_is_loaded_again_not_stuck_on_its_old_flushes() {
    let mut redis = common::OwnRedis::start().await;
    let (db, _store, engine, flusher) =
        flush_parts_with(&redis.url(), FlushTxSettings::default()).await;
    let prefix = engine.prefix().to_owned();
    create(&engine, "a").await;
    flush_all(&flusher, &engine).await;
    let mut pg = db.connect().await;
    back_up(&mut pg).await;
    create(&engine, "b").await;
    flush_all(&flusher, &engine).await;
    restore(&mut pg).await; // PostgreSQL loses b's flush
    redis.save().await; // the snapshot still holds b's flush in `acked`
    create(&engine, "c").await;
    flush_all(&flusher, &engine).await; // repaired: b and c written again
    create(&engine, "d").await;
    flush_all(&flusher, &engine).await;
    redis.restart().await; // back at the snapshot: seq below PostgreSQL's versions
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually!("Redis loaded again from PostgreSQL", 10, {
        let _ = flusher.flush_once().await;
        conn.get::<_, u64>(format!("{prefix}loads")).await.unwrap() == 2
    });
    flush_all(&flusher, &engine).await;
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b", "c", "d"]).await
    );
    assert!(pg_state(&mut pg).await.contains_key("d"));
    drop(pg);
    db.drop_db().await;
}

/// While a repair cannot run (here: a flush in flight elsewhere holds the fencing epoch, so
/// its raise gives up), no flush is written: one would publish a lost widget's new
/// association without the widget, one side of it. Once the repair can run, everything is
/// written, both sides. The flushes used to go on during the repair's backoff; the one-side
/// row they wrote then failed every later repair's read of the database.
#[tokio::test]
async fn no_flush_is_written_while_a_repair_cannot_run() {
    let settings = FlushTxSettings {
        timeout: Duration::from_millis(300),
        ..FlushTxSettings::default()
    };
    let (db, store, engine, flusher) = flush_parts_with(&redis_url(), settings).await;
    create(&engine, "c").await;
    flush_all(&flusher, &engine).await;
    let mut pg = db.connect().await;
    back_up(&mut pg).await;
    create(&engine, "a").await;
    flush_all(&flusher, &engine).await;
    restore(&mut pg).await; // a's flush lost
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT epoch FROM redis_epoch FOR SHARE")
        .execute(&mut holder)
        .await
        .unwrap();
    associate(&engine, "a", "c").await;
    for _ in 0..5 {
        assert!(engine.take(1000).await.unwrap().items.is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis_counter(&engine, "repairs").await, 0);
    assert!(!pg_state(&mut pg).await.contains_key("a"));
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    eventually!("a repair", 10, {
        flusher.flush_once().await.unwrap();
        redis_counter(&engine, "repairs").await == 1
    });
    flush_all(&flusher, &engine).await;
    assert!(asymmetric_rows(&mut pg).await.is_empty());
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "c"]).await
    );
    drop((pg, holder, store));
    db.drop_db().await;
}

/// Redis loaded again from PostgreSQL forgets the flushes it had acknowledged, and the load
/// raises the epoch; then, before any flush, the database fails over to a replica without
/// the load's epoch and without `b`. Nothing Redis acknowledged tells a loss, only the
/// epoch: the widgets are compared all the same, since nothing tells there was none. The
/// repair used to take it for the epoch alone, and `b` was never written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_gone_back_with_nothing_acknowledged_since_a_load_is_compared_in_full() {
    let (db, store, engine, flusher, _, mut pg) = a_flushed_and_backed_up(0).await;
    create(&engine, "b").await;
    flush_all(&flusher, &engine).await;
    let mut conn = redis_conn().await;
    let _: () = conn
        .del(format!("{}loaded", engine.prefix()))
        .await
        .unwrap();
    let _ = flusher.flush_once().await; // loaded again
    assert_eq!(redis_counter(&engine, "loads").await, 2);
    restore(&mut pg).await;
    for _ in 0..3 {
        let _ = flusher.flush_once().await;
    }
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b"]).await,
        "PostgreSQL lost b and the repair did not write it again"
    );
    drop((pg, store));
    db.drop_db().await;
}

/// Redis's keys set back in place (no new run_id) to before `b`, with a lost flush
/// recorded (a snapshot taken before a repair): the repair must not run on a Redis behind
/// the database. It used to, on the server it still trusted, and marked `b` (in
/// PostgreSQL, not in Redis) deleted at a version from the old `seq`, which deleted b's
/// row from PostgreSQL.
#[tokio::test]
async fn a_repair_never_runs_on_a_redis_behind_postgres() {
    let (db, _store, engine, flusher) = flush_parts().await;
    create(&engine, "a").await;
    create(&engine, "b").await;
    flush_all(&flusher, &engine).await;
    let mut conn = redis_conn().await;
    let prefix = engine.prefix().to_owned();
    let seq: u64 = conn.get(format!("{prefix}seq")).await.unwrap();
    let _: () = conn.set(format!("{prefix}seq"), seq - 1).await.unwrap();
    let _: () = conn.del(format!("{prefix}w:b")).await.unwrap();
    let _: () = conn.decr(format!("{prefix}count"), 1).await.unwrap();
    let _: () = conn.set(format!("{prefix}lost_flush"), 1).await.unwrap();
    for _ in 0..3 {
        let _ = flusher.flush_once().await;
    }
    let mut pg = db.connect().await;
    assert!(
        pg_state(&mut pg).await.contains_key("b"),
        "b's flushed row was deleted from PostgreSQL"
    );
    drop(pg);
    db.drop_db().await;
}

/// `a` and `b` created and flushed, then a row PostgreSQL's loads refuse: `a`'s P port
/// plugged into `b` without `b`'s side.
async fn a_and_b_flushed_with_a_one_sided_row(
) -> (TestDb, Arc<RedisEngine>, RedisFlusher, sqlx::PgConnection) {
    let (db, _store, engine, flusher) = flush_parts().await;
    for w in ["a", "b"] {
        create(&engine, w).await;
    }
    flush_all(&flusher, &engine).await;
    let mut pg = db.connect().await;
    sqlx::query("INSERT INTO associations_p VALUES ('a', 'b', 5)")
        .execute(&mut pg)
        .await
        .unwrap();
    (db, engine, flusher, pg)
}

/// A repair reads the database's rows as they are: one that refused a one-sided
/// association, as a load does, would fail every time, and no flush would be written again.
#[tokio::test]
async fn a_repair_reads_a_one_sided_row_as_it_is() {
    let (db, engine, flusher, pg) = a_and_b_flushed_with_a_one_sided_row().await;
    let mut conn = redis_conn().await;
    let _: () = conn
        .set(format!("{}lost_flush", engine.prefix()), 7)
        .await
        .unwrap();
    create(&engine, "c").await;
    flusher.flush_once().await.unwrap();
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    flush_all(&flusher, &engine).await;
    drop(pg);
    db.drop_db().await;
}

/// A flush committed on the old primary and acknowledged only while a repair of an epoch
/// gone back alone runs (after its check under the lock): the acknowledgement clears b's
/// dirty mark, and only `acked` still tells b's flush was lost. The repair's end used to
/// forget `acked`, and b was gone from PostgreSQL for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_acknowledgement_during_an_epoch_repair_is_not_forgotten() {
    let (db, store, engine, flusher, _, mut pg) = a_flushed_and_backed_up(0).await;
    another_instance(&engine, &store).await; // an epoch raise after the backup
    create(&engine, "b").await;
    let (batch, late) = take_one(&engine, "b").await;
    store.write_batch(batch).await.unwrap(); // on the old primary
    restore(&mut pg).await; // the failover: b's flush and the epoch raise lost
                            // A flush in flight on the new primary holds the epoch: the repair's raise waits.
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT epoch FROM redis_epoch FOR SHARE")
        .execute(&mut holder)
        .await
        .unwrap();
    let round = tokio::spawn({
        let engine = engine.clone();
        async move { engine.take(1000).await.map(|t| t.items.len()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.finish_flush(&late).await.unwrap(); // b's flusher is back from the failover
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    round.await.unwrap().unwrap();
    assert_eq!(redis_counter(&engine, "repairs").await, 1);
    for _ in 0..5 {
        let _ = flusher.flush_once().await;
    }
    assert_eq!(
        pg_state(&mut pg).await,
        redis_state(&engine, &["a", "b"]).await,
        "PostgreSQL lost b for good: its late acknowledgement was forgotten by the repair"
    );
    drop((pg, holder));
    db.drop_db().await;
}

/// With Redis down, every request, `/readyz` and `/metrics` waited out the client's whole
/// reconnection round (six retries backing off from 100 ms) before answering: ~9.4 s each,
/// past the readiness probe's 3 s timeout in the manifests and near a scrape's 10 s. Each
/// answers at once now, the requests and `/readyz` with `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_every_answer_comes_within_a_probes_timeout() {
    let db = TestDb::create().await;
    let mut redis = common::OwnRedis::start().await;
    let app = own_redis_instance(&db, &redis, "50ms").await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    // In PostgreSQL, from which the Redis that comes back empty is loaded again.
    eventually!("a in PostgreSQL", 10, dirty(&app).await == 0.0);
    redis.kill();
    // The manifests' readiness probe gives up after 3 s.
    let bound = std::time::Duration::from_secs(3);
    for _ in 0..3 {
        for (path, status) in [
            ("/readyz", StatusCode::SERVICE_UNAVAILABLE),
            ("/widgets/a", StatusCode::SERVICE_UNAVAILABLE),
            ("/metrics", StatusCode::OK),
        ] {
            let started = std::time::Instant::now();
            let answer = app.get(path).await;
            let took = started.elapsed();
            assert_eq!(answer.status(), status, "{path}");
            assert!(
                took < bound,
                "{path} answered after {took:?} with Redis down"
            );
        }
    }
    redis.restart().await;
    eventually!("the instance to be ready again", 20, {
        app.get("/readyz").await.status() == StatusCode::OK
    });
    assert!(app.widget("a").await.is_some());
    app.stop().await;
    db.drop_db().await;
}
