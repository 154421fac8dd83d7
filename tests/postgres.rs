//! PostgreSQL as the durable store, against a real server: each test gets its own database
//! (see `common::pg`). Widgets written through the API reach the tables within the flush
//! interval; restarts replay the WAL above the checkpoint; an outage loses nothing; older
//! state never overwrites newer; a row PostgreSQL refuses is kept aside, not dropped.

#[macro_use]
mod common;

use common::binary;
use common::pg::{
    a_flush_held_by_a_lock, app_state, asymmetric_rows, pg_state, set_for_database, Proxy, TestDb,
};
use common::{spawn_app_with, TestApp};
use reqwest::StatusCode;
use sqlx::PgConnection;
use std::time::Duration;
use widgets::domain::{Mark, Name, PortType, Ports, Serial, Widget};
use widgets::store::{FlushBatch, FlushItem, PgStore, Store, StoreError};
use widgets::wal::identity::new_identity;

async fn checkpoint(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT lsn FROM checkpoint")
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn widget_rows(conn: &mut PgConnection) -> Vec<(String, i64, String)> {
    sqlx::query_as("SELECT serial_number, version, updated_at::text FROM widgets ORDER BY 1")
        .fetch_all(conn)
        .await
        .unwrap()
}

/// Ends every session holding an advisory lock on the database (the single writer's), as a
/// PostgreSQL restart would; whether each was ended.
async fn end_lock_sessions(conn: &mut PgConnection) -> Vec<bool> {
    sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Starts a second single-node instance with `args` on a data directory of its own and
/// checks that its start is refused as the database's second writer; returns why.
async fn second_writer_refused(args: &[&str]) -> String {
    let dir = tempfile::TempDir::new().unwrap();
    let mut second =
        common::try_spawn_app_in(dir.path(), args, std::sync::Arc::new(widgets::wal::RealFs))
            .await
            .unwrap();
    let refused = second.ready().await.expect_err("a second writer started");
    let message = format!("{refused:#}");
    assert!(message.contains("single-node"), "{message}");
    message
}

/// Whether `serial` has a widget row.
async fn has_row(conn: &mut PgConnection, serial: &str) -> bool {
    widget_rows(conn).await.iter().any(|(s, _, _)| s == serial)
}

/// The version of `serial`'s association on P, if it is plugged (a freed port's row has
/// no peer).
async fn association_version(conn: &mut PgConnection, serial: &str) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT version FROM associations_p WHERE serial_number = $1 AND peer_serial_number IS NOT NULL",
    )
        .bind(serial)
        .fetch_optional(conn)
        .await
        .unwrap()
}

/// A metric from `/metrics`; a counter the service has not touched yet reads 0.
fn metric(text: &str, name: &str) -> f64 {
    common::metric(text, name).unwrap_or(0.0)
}

async fn pg_app(db_url: &str, extra: &[&str]) -> TestApp {
    let mut args = vec!["--database-url", db_url, "--flush-interval", "100ms"];
    args.extend_from_slice(extra);
    spawn_app_with(&args).await
}

fn serials(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn writes_reach_postgres_within_the_flush_interval_both_directions() {
    let db = TestDb::create().await;
    let app = pg_app(&db.url, &[]).await;
    let mut conn = db.connect().await;
    for (s, ports) in [
        ("a", &["P", "R"][..]),
        ("b", &["P"]),
        ("c", &["P", "R"]),
        ("d", &["R"]),
    ] {
        assert_eq!(app.create(s, ports).await.status(), StatusCode::CREATED);
    }
    assert_eq!(app.associate("P", "a", "b").await.status(), StatusCode::OK);
    assert_eq!(app.associate("R", "a", "c").await.status(), StatusCode::OK);
    assert_eq!(app.associate("R", "d", "c").await.status(), StatusCode::OK); // re-plug: frees a.R
    let all = serials(&["a", "b", "c", "d"]);
    let want = app_state(|p| app.url(p), &all).await;
    eventually!("PostgreSQL to match the service", 5, {
        pg_state(&mut conn).await == want
    });
    assert_eq!(want["a"].2, [Some("b".into()), None, None]);
    assert_eq!(want["c"].2, [None, Some("d".into()), None]);

    // Deleting a widget removes its row and, by cascade, its association rows; its peer's
    // association row goes too.
    assert_eq!(
        app.delete("/widgets/a").await.status(),
        StatusCode::NO_CONTENT
    );
    let want = app_state(|p| app.url(p), &all).await;
    eventually!("the delete to reach PostgreSQL", 5, {
        pg_state(&mut conn).await == want
    });
    assert!(!want.contains_key("a") && want["b"].2 == [None, None, None]);
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn an_association_change_writes_association_rows_and_versions_only_grow() {
    let db = TestDb::create().await;
    let app = pg_app(&db.url, &[]).await;
    let mut conn = db.connect().await;
    for s in ["a", "b", "c"] {
        app.create(s, &["P"]).await;
    }
    app.associate("P", "a", "b").await;
    eventually!("the first flush", 5, {
        sqlx::query("SELECT 1 FROM associations_p")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .len()
            == 2
    });
    let before = widget_rows(&mut conn).await;
    let b_before = association_version(&mut conn, "b").await.unwrap();

    app.associate("P", "c", "b").await; // re-plug b from a to c
    eventually!("the re-plug to reach PostgreSQL", 5, {
        association_version(&mut conn, "c").await.is_some()
            && association_version(&mut conn, "a").await.is_none()
    });
    assert!(
        association_version(&mut conn, "b").await.unwrap() > b_before,
        "versions only move forward"
    );
    assert_eq!(
        widget_rows(&mut conn).await,
        before,
        "no widget row was written for an association change"
    );
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_wal_records_above_the_postgres_checkpoint() {
    let db = TestDb::create().await;
    let dir = tempfile::TempDir::new().unwrap();
    let client = reqwest::Client::new();
    // No timed flushes: only once 10 widgets are dirty, so the last few stay in the WAL only.
    let args = [
        "--database-url",
        &db.url,
        "--flush-interval",
        "1h",
        "--flush-batch",
        "10",
    ];
    let server = binary::start(dir.path(), &args).await;
    let names: Vec<String> = (0..14).map(|i| format!("w{i}")).collect();
    for (i, s) in names.iter().enumerate() {
        assert_eq!(binary::create(&server, s).await, StatusCode::CREATED);
        if i == 9 {
            let mut conn = db.connect().await;
            eventually!("the size-triggered flush", 5, {
                checkpoint(&mut conn).await == 10
            });
        }
    }
    let body = serde_json::json!({"port_type": "P", "widget_serial_num": "w0", "peer_widget_serial_num": "w13"});
    let r = client
        .put(format!("{}/widgets/associations", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.kill9().expect("SIGKILL");

    let mut conn = db.connect().await;
    assert_eq!(
        checkpoint(&mut conn).await,
        10,
        "records 11..15 exist only in the WAL"
    );
    assert_eq!(pg_state(&mut conn).await.len(), 10);

    let server = binary::start(dir.path(), &args).await;
    let state = app_state(|p| format!("{}{p}", server.base), &names).await;
    assert_eq!(state.len(), 14, "every acknowledged create is back");
    assert_eq!(state["w0"].2[0].as_deref(), Some("w13"));
    assert_eq!(state["w13"].2[0].as_deref(), Some("w0"));
    // A graceful stop flushes the replayed records, and PostgreSQL equals the service.
    assert!(server.stop().await.expect("stopping the server").success());
    assert_eq!(pg_state(&mut conn).await, state);
    assert_eq!(checkpoint(&mut conn).await, 15);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_postgres_converges_when_it_returns() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let app = pg_app(&db.url_via(proxy.addr), &[]).await;
    let names: Vec<String> = (0..20).map(|i| format!("o{i}")).collect();
    for s in &names {
        assert_eq!(
            app.create(s, &["P", "R", "Q"]).await.status(),
            StatusCode::CREATED
        );
    }
    let mut conn = db.connect().await;
    eventually!("the first flush", 5, {
        pg_state(&mut conn).await.len() == 20
    });

    proxy.cut();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..300 {
        let (a, b) = (&names[rng.usize(..20)], &names[rng.usize(..20)]);
        let port = ["P", "R", "Q"][rng.usize(..3)];
        let r = if a == b {
            app.free(a, port).await
        } else {
            app.associate(port, a, b).await
        };
        assert!(
            r.status().is_success(),
            "writes go on while PostgreSQL is down: {}",
            r.status()
        );
    }
    assert_eq!(
        app.delete("/widgets/o19").await.status(),
        StatusCode::NO_CONTENT
    );
    let failures_before = metric(
        &app.get("/metrics").await.text().await.unwrap(),
        "widgets_flush_failures_total",
    );
    eventually!("a failed flush to show in /metrics", 10, {
        let m = app.get("/metrics").await.text().await.unwrap();
        metric(&m, "widgets_flush_failures_total") > failures_before
    });
    let m = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metric(&m, "widgets_dirty") > 0.0,
        "the backlog shows in /metrics"
    );
    assert!(
        metric(&m, "widgets_flush_lag_seconds") > 0.0,
        "the lag shows in /metrics"
    );

    proxy.restore();
    let want = app_state(|p| app.url(p), &names).await;
    eventually!("PostgreSQL to converge after the outage", 40, {
        pg_state(&mut conn).await == want
    });
    eventually!("the backlog to drain", 5, {
        metric(
            &app.get("/metrics").await.text().await.unwrap(),
            "widgets_dirty",
        ) == 0.0
    });
    app.stop().await;
    drop(proxy);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_503_while_the_store_takes_no_change_and_200_once_it_does() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let app = pg_app(&db.url_via(proxy.addr), &["--ready-max-flush-lag", "500ms"]).await;
    assert_eq!(app.create("s1", &["P"]).await.status(), StatusCode::CREATED);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);

    proxy.cut();
    assert_eq!(app.create("s2", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("/readyz to say the flusher is stalled", 10, {
        let r = app.get("/readyz").await;
        r.status() == StatusCode::SERVICE_UNAVAILABLE
            && common::error_code(r).await == "flush_stalled"
    });
    assert_eq!(
        app.create("s3", &["P"]).await.status(),
        StatusCode::CREATED,
        "writes go on into the WAL meanwhile"
    );

    proxy.restore();
    eventually!("/readyz to be 200 once the backlog is in", 40, {
        app.get("/readyz").await.status() == StatusCode::OK
    });
    app.stop().await;
    drop(proxy);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_postgres_and_readyz_says_so() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    proxy.cut();
    let dir = tempfile::TempDir::new().unwrap();
    let url = db.url_via(proxy.addr);
    let mut app = common::try_spawn_app_in(
        dir.path(),
        &["--database-url", &url],
        std::sync::Arc::new(widgets::wal::RealFs),
    )
    .await
    .unwrap();
    let base = format!("http://{}", app.addr());
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(common::error_code(r).await, "not_ready");
    let r = client
        .get(format!("{base}/widgets/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no reads before recovery"
    );
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(40), app.ready())
        .await
        .expect("ready in time")
        .unwrap();
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    app.stop().await.unwrap();
    drop(proxy);
    db.drop_db().await;
}

fn item(serial: &str, peer: Option<&str>, version: u64, mark: Mark) -> FlushItem {
    let mut w = Widget::new(
        Name::parse("n", "w").unwrap(),
        Ports::from_list("p", &[PortType::P]).unwrap(),
    );
    w.peers[0] = peer.map(|p| Serial::parse("s", p).unwrap());
    w.version = version;
    FlushItem {
        serial: Serial::parse("s", serial).unwrap(),
        mark,
        widget: Some(w),
        version,
    }
}

#[tokio::test]
async fn an_older_batch_applied_after_a_newer_one_changes_nothing() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let created = Mark {
        row: true,
        ports: 1,
    };
    let plugged = Mark {
        row: false,
        ports: 1,
    };
    let batch = |items, checkpoint| FlushBatch {
        items,
        checkpoint: Some(checkpoint),
        widgets: None,
        redis: None,
    };
    store
        .write_batch(batch(
            vec![item("a", None, 1, created), item("b", None, 2, created)],
            2,
        ))
        .await
        .unwrap();
    let newer = batch(
        vec![
            item("a", Some("b"), 9, plugged),
            item("b", Some("a"), 9, plugged),
        ],
        9,
    );
    let older = batch(
        vec![
            item("a", None, 5, plugged),
            item("b", Some("zz"), 5, plugged),
        ],
        5,
    );
    store.write_batch(newer).await.unwrap();
    store.write_batch(older).await.unwrap();
    let mut conn = db.connect().await;
    let state = pg_state(&mut conn).await;
    assert_eq!(
        state["a"].2[0].as_deref(),
        Some("b"),
        "an older free did not undo a newer plug"
    );
    assert_eq!(
        state["b"].2[0].as_deref(),
        Some("a"),
        "an older plug did not overwrite a newer one"
    );
    assert_eq!(
        checkpoint(&mut conn).await,
        9,
        "the checkpoint never moves back"
    );

    // A deletion at 12, then a slower flusher's older state of that widget (plugged at
    // 11): the widget stays deleted, and its association row is not written.
    let deletion = FlushItem {
        serial: Serial::parse("s", "b").unwrap(),
        mark: Mark {
            row: true,
            ports: 1,
        },
        widget: None,
        version: 12,
    };
    store.write_batch(batch(vec![deletion], 12)).await.unwrap();
    let stale = batch(
        vec![item(
            "b",
            Some("a"),
            11,
            Mark {
                row: true,
                ports: 1,
            },
        )],
        11,
    );
    store.write_batch(stale).await.unwrap();
    let state = pg_state(&mut conn).await;
    assert!(
        !state.contains_key("b"),
        "an older state brought a deleted widget back"
    );
    // A newer widget of the same serial is welcome.
    store
        .write_batch(batch(vec![item("b", None, 13, created)], 13))
        .await
        .unwrap();
    assert!(pg_state(&mut conn).await.contains_key("b"));
    drop(conn);
    drop(store);
    db.drop_db().await;
}

/// A table the migrations give one row that has lost it (deleted by hand, or left out by a
/// restore) refuses a flush, naming the table, and the flush commits nothing; and the
/// writer's table refuses a claim. The error said only that a query returned no rows.
#[tokio::test]
async fn a_table_that_lost_its_one_row_refuses_a_flush_naming_it() {
    let created = Mark {
        row: true,
        ports: 1,
    };
    // With the writer's claim, as the service flushes, and without it, as a seed does.
    let cases = [
        ("checkpoint", true),
        ("checkpoint", false),
        ("version_high_water", false),
        ("single_writer", true),
    ];
    for (table, claimed) in cases {
        let db = TestDb::create().await;
        let store = PgStore::connect(&db.url).await.unwrap();
        store.migrate().await.unwrap();
        if claimed {
            store.claim_single_writer().await.unwrap();
        }
        let mut conn = db.connect().await;
        sqlx::raw_sql(&format!("DELETE FROM {table}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let batch = FlushBatch {
            items: vec![item("a", None, 1, created)],
            checkpoint: Some(1),
            widgets: None,
            redis: None,
        };
        let refused = store.write_batch(batch).await.unwrap_err();
        assert!(
            matches!(refused, StoreError::MissingRow { table: t } if t == table),
            "{table}: {refused}"
        );
        assert!(refused.to_string().contains(table), "{refused}");
        assert!(
            widget_rows(&mut conn).await.is_empty(),
            "{table}: the flush committed"
        );
        drop(store);
        if table == "single_writer" {
            let claim = PgStore::connect(&db.url).await.unwrap();
            let refused = claim.claim_single_writer().await.unwrap_err();
            assert!(
                matches!(
                    refused,
                    StoreError::MissingRow {
                        table: "single_writer"
                    }
                ),
                "the claim: {refused}"
            );
        }
        drop(conn);
        db.drop_db().await;
    }
}

/// A flush still open on another connection that created a widget (a flush this instance
/// abandoned on a stalled backend, or another Redis-mode instance's), and a newer flush
/// that deletes the widget: the deletion waits for the open one to end, and the widget
/// stays deleted. The deletion used to see no row and delete nothing, and the open flush's
/// commit then brought the widget back beside its tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_waits_for_an_open_flush_that_created_the_widget() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let mut open = db.connect().await;
    sqlx::raw_sql(
        "BEGIN; INSERT INTO widgets (serial_number, name, ports, version) VALUES ('x', 'w', 1, 5)",
    )
    .execute(&mut open)
    .await
    .unwrap();
    let deletion = FlushItem {
        serial: Serial::parse("s", "x").unwrap(),
        mark: Mark {
            row: true,
            ports: 1,
        },
        widget: None,
        version: 6,
    };
    let deleting = tokio::spawn({
        let store = store.clone();
        async move {
            let batch = FlushBatch {
                items: vec![deletion],
                checkpoint: Some(6),
                widgets: None,
                redis: None,
            };
            store.write_batch(batch).await
        }
    });
    let mut watcher = db.connect().await;
    eventually!("the deletion to end or to wait for a lock", 10, {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        deleting.is_finished() || waiting > 0
    });
    sqlx::raw_sql("COMMIT").execute(&mut open).await.unwrap();
    deleting.await.unwrap().unwrap();
    let state = pg_state(&mut watcher).await;
    assert!(
        !state.contains_key("x"),
        "the open flush's commit brought a deleted widget back: {state:?}"
    );
    drop((open, watcher, store));
    db.drop_db().await;
}

#[tokio::test]
async fn a_row_postgres_refuses_is_kept_in_flush_rejects_and_the_rest_commits() {
    let db = TestDb::create().await;
    let app = pg_app(&db.url, &[]).await;
    let mut conn = db.connect().await;
    // A constraint the service does not know: PostgreSQL will refuse one widget for good.
    sqlx::query(
        "ALTER TABLE widgets ADD CONSTRAINT test_no_poison CHECK (serial_number <> 'poison')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for s in ["ok1", "poison", "ok2", "ok3"] {
        assert_eq!(app.create(s, &["P"]).await.status(), StatusCode::CREATED);
    }
    eventually!("the good rows to commit", 5, {
        pg_state(&mut conn).await.len() == 3
    });
    let rejects: Vec<(String, String)> =
        sqlx::query_as("SELECT serial_number, error FROM flush_rejects")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0].0, "poison");
    assert!(rejects[0].1.contains("test_no_poison"), "{}", rejects[0].1);
    assert!(
        checkpoint(&mut conn).await >= 4,
        "the checkpoint moved past the refused row"
    );
    // Later flushes are not blocked.
    assert_eq!(
        app.associate("P", "ok1", "ok2").await.status(),
        StatusCode::OK
    );
    eventually!("a later flush", 5, {
        pg_state(&mut conn).await["ok1"].2[0].as_deref() == Some("ok2")
    });
    app.stop().await;
    db.drop_db().await;
}

/// A session standing in for a single-node flush left open: in a transaction that holds
/// the single_writer row as every flush does (FOR SHARE), until it commits or closes.
async fn a_flush_holding_the_writer_row(db: &TestDb) -> PgConnection {
    let mut open = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT token FROM single_writer FOR SHARE")
        .execute(&mut open)
        .await
        .unwrap();
    open
}

/// A flush of an earlier writer left open on a backend that stalls holds the
/// single_writer row: a new instance's claim waits for it `--pg-flush-timeout`, then
/// refuses the start naming that backend. The claim used to wait with no end, and a
/// SIGTERM could not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_behind_a_stalled_flush_refuses_the_start_naming_its_backend() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let mut open = a_flush_holding_the_writer_row(&db).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut open)
        .await
        .unwrap();
    // A reader of the table (a backup, a monitoring query) holds a lock there too, and is
    // not the one to name.
    let mut reader = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT * FROM single_writer")
        .execute(&mut reader)
        .await
        .unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let args = ["--database-url", &db.url, "--pg-flush-timeout", "1s"];
    let mut app =
        common::try_spawn_app_in(dir.path(), &args, std::sync::Arc::new(widgets::wal::RealFs))
            .await
            .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(30), app.ready())
        .await
        .expect("the claim still waits after 30 s")
        .expect_err("started behind an open flush");
    let message = format!("{refused:#}");
    assert!(
        message.contains("still open") && message.contains(&format!("PID {pid}")),
        "{message}"
    );
    drop((open, reader, store));
    db.drop_db().await;
}

/// Several flushes of an earlier writer, each holding the single_writer row and ending a
/// little before `--pg-flush-timeout`, one after another: the claim waits for each in
/// turn, and PostgreSQL's `lock_timeout` never fires. The claim still ends within the
/// flush timeout, named for what it is, not as a PostgreSQL that stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_behind_flushes_ending_one_after_another_refuses_within_the_flush_timeout() {
    let db = TestDb::create().await;
    let store = common::pg::store_timing_out_after(&db.url, Duration::from_secs(1)).await;
    let mut flushes = Vec::new();
    for _ in 0..5 {
        flushes.push(a_flush_holding_the_writer_row(&db).await);
    }
    let ending = tokio::spawn(async move {
        for open in flushes {
            tokio::time::sleep(Duration::from_millis(700)).await;
            // Its transaction ends with its session.
            sqlx::Connection::close(open).await.unwrap();
        }
    });
    let claimed = tokio::time::timeout(Duration::from_secs(20), store.claim_single_writer())
        .await
        .expect("the claim gave up within 20 s");
    assert!(
        matches!(claimed, Err(StoreError::WriterRowHeld { .. })),
        "{claimed:?}"
    );
    ending.await.unwrap();
    drop(store);
    db.drop_db().await;
}

#[tokio::test]
async fn one_single_node_writer_per_database_and_a_replaced_one_cannot_flush() {
    let db = TestDb::create().await;
    let first = pg_app(&db.url, &[]).await;
    assert_eq!(
        first.create("a1", &["P"]).await.status(),
        StatusCode::CREATED
    );

    // A second single-node instance on the same database refuses to start.
    let args = ["--database-url", &db.url, "--flush-interval", "100ms"];
    let message = second_writer_refused(&args).await;
    assert!(message.contains("Redis mode"), "{message}");

    // The first loses its lock (its session dies) and a third instance takes over: the
    // first can no longer commit a flush, and what it acknowledges since stays its own.
    let mut conn = db.connect().await;
    end_lock_sessions(&mut conn).await;
    // (Without the first one's WAL: the operator says so, or the store's identity refuses.)
    let third_dir = tempfile::TempDir::new().unwrap();
    let takeover = [&args[..], &["--accept-mismatched-wal"]].concat();
    let third = common::spawn_app_in(
        std::sync::Arc::new(third_dir),
        &takeover,
        std::sync::Arc::new(widgets::wal::RealFs),
    )
    .await;
    assert!(
        third.widget("a1").await.is_some(),
        "the takeover loads what was flushed"
    );
    assert_eq!(
        first.create("a2", &["P"]).await.status(),
        StatusCode::CREATED
    );
    let text = first.get("/metrics").await.text().await.unwrap();
    let failures = metric(&text, "widgets_flush_failures_total");
    eventually!("the fenced flush to fail", 5, {
        let text = first.get("/metrics").await.text().await.unwrap();
        metric(&text, "widgets_flush_failures_total") > failures
    });
    // Ten flush intervals: an unfenced flush would have committed a2 long since.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = widget_rows(&mut conn).await;
    assert!(
        rows.iter().all(|(serial, _, _)| serial != "a2"),
        "a fenced instance committed a flush: {rows:?}"
    );
    // Nor does it acknowledge writes it could never flush: it says so and is not ready.
    let refused = first.create("a3", &["P"]).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(common::error_code(refused).await, "wal_failed");
    assert_eq!(
        first.get("/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    third.stop().await;
    db.drop_db().await;
}

/// A database or role that ends idle sessions (`idle_session_timeout`, which managed
/// PostgreSQL services often set) does not end the single writer's claim, whose session is
/// idle for the process's life: a second single-node instance is still refused, and the
/// first goes on flushing. The claim's session used to be ended at the timeout and the lock
/// with it, so that every later start of a second instance claimed the database and fenced
/// the running one, which then refused every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_ends_idle_sessions_keeps_the_writers_claim() {
    let db = TestDb::create().await;
    // Before the setting, which ends a session opened after it once idle for 1 s.
    let mut conn = db.connect().await;
    set_for_database(&db, "idle_session_timeout", "'1s'").await;
    let first = pg_app(&db.url, &[]).await;
    assert_eq!(
        first.create("a", &["P"]).await.status(),
        StatusCode::CREATED
    );
    // Past the timeout: an idle session has been ended by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = PgStore::connect(&db.url).await.unwrap();
    let claimed = second.claim_single_writer().await;
    assert!(
        matches!(claimed, Err(StoreError::WriterHeld { .. })),
        "a second writer claimed the database: {claimed:?}"
    );
    drop(second);
    assert_eq!(
        first.create("b", &["P"]).await.status(),
        StatusCode::CREATED
    );
    eventually!("b in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("b")
    });
    first.stop().await;
    drop(conn);
    db.drop_db().await;
}

/// The session that holds a single node's lock ends while the instance lives (PostgreSQL
/// restarted or failed over, or the session was terminated): the instance takes the lock
/// again before its next flush, so that a second instance started since is refused, as
/// at the start. The second used to start, take the next token and fence the first,
/// whose writes acknowledged since its last flush were then stranded in its WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_lock_session_ended_takes_the_lock_again_before_its_next_flush() {
    let db = TestDb::create().await;
    let first = pg_app(&db.url, &[]).await;
    let mut conn = db.connect().await;
    assert_eq!(
        end_lock_sessions(&mut conn).await,
        [true],
        "the lock's session"
    );
    assert_eq!(
        first.create("a1", &["P"]).await.status(),
        StatusCode::CREATED
    );
    eventually!("a1 to be flushed", 10, has_row(&mut conn, "a1").await);

    // Told to go on without the first one's WAL, as a takeover is.
    let args = [
        "--database-url",
        &db.url,
        "--flush-interval",
        "100ms",
        "--accept-mismatched-wal",
    ];
    second_writer_refused(&args).await;
    assert_eq!(
        first.create("a2", &["P"]).await.status(),
        StatusCode::CREATED
    );
    eventually!(
        "a2 to be flushed by the first",
        10,
        has_row(&mut conn, "a2").await
    );
    let text = first.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "widgets_pg_writer_lock_retaken_total"), 1.0);
    drop(conn);
    first.stop().await;
    db.drop_db().await;
}

/// Starts on `db` (migrated, then changed by `sql`) and waits up to 20 s for the start to
/// fail; returns why. A start that is still trying then fails the test.
async fn start_refused_after(db: &TestDb, sql: &str) -> String {
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    drop(store);
    let mut conn = db.connect().await;
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let args = ["--database-url", &db.url];
    let mut app =
        common::try_spawn_app_in(dir.path(), &args, std::sync::Arc::new(widgets::wal::RealFs))
            .await
            .unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(20), app.ready())
        .await
        .expect("the start was still retrying after 20 s, as if PostgreSQL were unreachable");
    let refused = ready.expect_err("the start went on");
    let _ = app.stop().await;
    format!("{refused:#}")
}

/// A schema no retry makes right is refused at the start, naming the migration: one a
/// newer version applied (a rollback to this one), one applied that differs from this
/// version's, and a migration PostgreSQL refuses. They were retried for ever as a
/// PostgreSQL "not reachable yet", and the service never became ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_no_retry_mends_refuses_the_start_naming_the_migration() {
    let cases = [
        (
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (29991231000001, 'newer', true, '\\x00', 1)",
            "29991231000001",
        ),
        (
            "UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 20261124000001",
            "20261124000001",
        ),
        (
            // The last migration, to be applied again, fails on what the database holds.
            "DELETE FROM _sqlx_migrations WHERE version = 20261207000001",
            "20261207000001",
        ),
    ];
    for (sql, migration) in cases {
        let db = TestDb::create().await;
        let message = start_refused_after(&db, sql).await;
        assert!(
            message.contains(migration) && message.contains("migration"),
            "{message}"
        );
        db.drop_db().await;
    }
}

/// A `statement_timeout` that the database (or the role) sets for its clients does not
/// cancel the migrations: one that rewrites a large table may take minutes, and was
/// cancelled at every start, which then waited for ever as if PostgreSQL were down.
#[tokio::test]
async fn a_statement_timeout_the_database_sets_does_not_cancel_the_migrations() {
    let db = TestDb::create().await;
    set_for_database(&db, "statement_timeout", "1").await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let mut conn = db.connect().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        applied as usize,
        std::fs::read_dir("migrations").unwrap().count()
    );
    drop(conn);
    drop(store);
    db.drop_db().await;
}

/// A database that takes no write for now (a standby that a failover has not promoted
/// yet, here one whose sessions are read-only) is waited for, as an unreachable one is,
/// not refused as a schema no retry mends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_waited_for_until_it_takes_writes() {
    let db = TestDb::create().await;
    set_for_database(&db, "default_transaction_read_only", "on").await;
    let dir = tempfile::TempDir::new().unwrap();
    let mut app = common::try_spawn_app_in(
        dir.path(),
        &["--database-url", &db.url],
        std::sync::Arc::new(widgets::wal::RealFs),
    )
    .await
    .unwrap();
    let still_waiting = tokio::time::timeout(Duration::from_secs(3), app.ready()).await;
    assert!(
        still_waiting.is_err(),
        "the start did not wait: {still_waiting:?}"
    );
    let base = format!("http://{}", app.addr());
    let client = reqwest::Client::new();
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    set_for_database(&db, "default_transaction_read_only", "off").await;
    tokio::time::timeout(Duration::from_secs(40), app.ready())
        .await
        .expect("ready in time")
        .unwrap();
    let r = client
        .post(format!("{base}/widgets"))
        .json(&serde_json::json!({"serial_number": "after", "name": "w", "ports": ["P"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    app.stop().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn widgets_migrate_applies_the_schema() {
    let db = TestDb::create().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conn = db.connect().await;
    assert_eq!(checkpoint(&mut conn).await, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_widgets"))
        .args(["migrate", "--database-url", ""])
        .output()
        .unwrap();
    assert!(!out.status.success(), "migrate without a URL must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
    drop(conn);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_flush_is_a_consistent_cut_postgres_never_shows_one_side() {
    let db = TestDb::create().await;
    let app = std::sync::Arc::new(pg_app(&db.url, &["--flush-interval", "5ms"]).await);
    let names: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    for s in &names {
        app.create(s, &["P", "R"]).await;
    }
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (app, names) = (app.clone(), names.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t);
                for _ in 0..300 {
                    let (a, b) = (&names[rng.usize(..12)], &names[rng.usize(..12)]);
                    let port = ["P", "R"][rng.usize(..2)];
                    if a != b {
                        assert!(app.associate(port, a, b).await.status().is_success());
                    }
                }
            })
        })
        .collect();
    let mut conn = db.connect().await;
    let mut samples = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let bad = asymmetric_rows(&mut conn).await;
        assert!(
            bad.is_empty(),
            "PostgreSQL showed one side of an association: {bad:?}"
        );
        samples += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(samples > 10, "too few samples ({samples}) to mean anything");
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn a_load_names_a_one_sided_association_row_instead_of_loading_it() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "INSERT INTO widgets (serial_number, name, ports, version) VALUES \
           ('a', 'w', 1, 1), ('b', 'w', 1, 1), ('c', 'w', 1, 1), ('d', 'w', 1, 1); \
         INSERT INTO associations_p (serial_number, peer_serial_number, version) VALUES \
           ('a', 'b', 2), ('b', 'a', 2), ('c', 'd', 3)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    match store.load(Box::new(|_, _| {})).await {
        Err(widgets::store::StoreError::Corrupt { key, reason }) => {
            assert_eq!(key, "c", "{reason}");
            assert!(reason.contains("\"d\""), "{reason}");
        }
        other => panic!("a one-sided row was not named: {other:?}"),
    }
    // Its mirror written, the same rows load.
    sqlx::query("INSERT INTO associations_p VALUES ('d', 'c', 3)")
        .execute(&mut conn)
        .await
        .unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    store
        .load(Box::new(move |_, _| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }))
        .await
        .unwrap();
    assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 4);
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn a_flush_commits_synchronously_within_its_timeout_whatever_the_database_default() {
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // The database's own defaults would let a commit vanish in a crash and a stalled
    // transaction hold its locks for ever.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE \"{name}\" SET synchronous_commit = off; \
         ALTER DATABASE \"{name}\" SET statement_timeout = 0; \
         ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = 0"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let store = PgStore::connect(&db.url)
        .await
        .unwrap()
        .with_flush_settings(widgets::store::postgres::FlushTxSettings {
            synchronous_commit: widgets::store::postgres::SynchronousCommit::RemoteApply,
            timeout: Duration::from_millis(2500),
        });
    store.migrate().await.unwrap();
    // What the flush transaction runs with, as a trigger inside it sees.
    sqlx::raw_sql(
        "CREATE TABLE seen (sync text, statement text, idle text); \
         CREATE FUNCTION note_settings() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO seen VALUES (current_setting('synchronous_commit'), \
             current_setting('statement_timeout'), \
             current_setting('idle_in_transaction_session_timeout')); \
           RETURN NULL; END $$; \
         CREATE TRIGGER note AFTER UPDATE ON checkpoint FOR EACH ROW EXECUTE FUNCTION note_settings()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let created = Mark {
        row: true,
        ports: 0,
    };
    store
        .write_batch(FlushBatch {
            items: vec![item("a", None, 1, created)],
            checkpoint: Some(1),
            widgets: None,
            redis: None,
        })
        .await
        .unwrap();
    let seen: Vec<(String, String, String)> = sqlx::query_as("SELECT * FROM seen")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        seen,
        [(
            "remote_apply".to_owned(),
            "2500ms".to_owned(),
            "2500ms".to_owned()
        )]
    );
    drop(conn);
    db.drop_db().await;
}

/// A PostgreSQL backend stopped with a signal: it keeps its connection and its locks and
/// answers nothing, and PostgreSQL's own timeouts cannot fire in it. Resumed when dropped.
struct StoppedBackend(i32);

impl StoppedBackend {
    fn stop(pid: i32) -> StoppedBackend {
        signal_backend("-STOP", pid);
        StoppedBackend(pid)
    }
}

impl Drop for StoppedBackend {
    fn drop(&mut self) {
        signal_backend("-CONT", self.0);
    }
}

fn signal_backend(signal: &str, pid: i32) {
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(
        sent.success(),
        "kill {signal} {pid}: signalling a PostgreSQL backend needs the tests to run as \
         root or as PostgreSQL's user"
    );
}

/// A flush whose backend stalls (stopped: PostgreSQL's own timeouts cannot fire in it) is
/// abandoned after twice `--pg-flush-timeout` for one statement, and its connection
/// closed: the next flush commits on another one while that backend is still stopped, and
/// a shutdown does not wait on it either. The flusher used to wait as long as the backend
/// stalled, and a SIGTERM with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_a_stalled_backend_is_abandoned_and_the_next_one_commits() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--database-url",
        &db.url,
        "--pg-flush-timeout",
        "1s",
        "--flush-interval",
        "200ms",
    ];
    // The flush waits for the lock at its first write; its backend is stopped there.
    let (server, mut locker, mut watcher, flushing) =
        a_flush_held_by_a_lock(&db, dir.path(), &args).await;
    let stopped = StoppedBackend::stop(flushing);
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();

    // The stopped backend never answers; another flush writes the widget meanwhile.
    assert_eq!(binary::create(&server, "b").await, StatusCode::CREATED);
    eventually!(
        "both widgets in PostgreSQL, the stalled backend still stopped",
        20,
        {
            let flushed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM widgets WHERE serial_number IN ('a', 'b')",
            )
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            flushed == 2
        }
    );
    let metrics = binary::metrics(&server).await;
    assert!(
        !metrics.contains("widgets_flush_failures_total 0\n"),
        "the abandoned flush is a failed one: {metrics}"
    );

    binary::stop_within(server, Duration::from_secs(30)).await;
    drop(stopped);
    let server = binary::start(dir.path(), &args).await;
    for serial in ["a", "b"] {
        let r = reqwest::get(format!("{}/widgets/{serial}", server.base))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{serial}");
    }
    server.stop().await.unwrap();
    drop((locker, watcher));
    db.drop_db().await;
}

/// A PostgreSQL that stays locked at SIGTERM holds the exit for `--final-flush-timeout`,
/// not for the flush in progress and every retry of the last flush, each waiting out
/// `--pg-flush-timeout` (here at least 4 x 5 s); what was not flushed is in the WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_a_locked_store_no_longer_than_the_final_flush_timeout() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--database-url",
        &db.url,
        "--pg-flush-timeout",
        "5s",
        "--final-flush-timeout",
        "1s",
        "--flush-interval",
        "200ms",
    ];
    let (server, mut locker, watcher, _) = a_flush_held_by_a_lock(&db, dir.path(), &args).await;

    // The final flush is bounded at 1 s; each of its tries would take 5 s.
    binary::stop_within(server, Duration::from_secs(10)).await;
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    let server = binary::start(dir.path(), &args).await;
    let r = reqwest::get(format!("{}/widgets/a", server.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.stop().await.unwrap();
    drop((locker, watcher));
    db.drop_db().await;
}

/// A database that goes back in time under a running instance (restored from an older
/// backup, a failover to a replica that lagged) has lost flushes. The next flush sees the
/// checkpoint below the one this instance committed and fails without moving it, so the
/// WAL keeps every record above the database's checkpoint: a restart replays them (here,
/// where the WAL still holds them all), or finds the gap and refuses where they were
/// trimmed. The flush used to move the checkpoint on, and a restart skipped the lost
/// flush's records and served without its widget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_gone_back_in_time_keeps_its_checkpoint_and_the_wal_behind_it() {
    let db = TestDb::create().await;
    let app = pg_app(&db.url, &[]).await;
    let mut conn = db.connect().await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("a in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("a")
    });
    // The backup.
    sqlx::raw_sql("CREATE TABLE saved AS SELECT * FROM widgets")
        .execute(&mut conn)
        .await
        .unwrap();
    let saved = checkpoint(&mut conn).await;
    assert_eq!(app.create("b", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("b in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("b") && checkpoint(&mut conn).await > saved
    });
    // The restore: b's flush is gone from the database, and its record from the WAL.
    sqlx::raw_sql(&format!(
        "BEGIN; DELETE FROM widgets; INSERT INTO widgets SELECT * FROM saved; \
         UPDATE checkpoint SET lsn = {saved}; COMMIT"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(app.create("c", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("a flush after the restore, failed or not", 10, {
        let text = app.get("/metrics").await.text().await.unwrap();
        metric(&text, "widgets_flush_failures_total") >= 2.0 || checkpoint(&mut conn).await != saved
    });
    assert_eq!(
        checkpoint(&mut conn).await,
        saved,
        "the checkpoint moved on over the lost flush"
    );

    restart_and_flush(app, &db, &mut conn, &["a", "b", "c"]).await;
    drop(conn);
    db.drop_db().await;
}

/// A database restored from a backup taken before this instance claimed it holds an older
/// single-writer token: that is the database gone back in time, not another instance
/// taking over, so writes go on into the WAL and a restart replays them. It used to be
/// taken for a takeover, and the instance stopped acknowledging writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_before_the_claim_is_gone_back_in_time_not_taken_over() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    drop(store);
    let mut conn = db.connect().await;
    let token: i64 = sqlx::query_scalar("SELECT token FROM single_writer")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let app = pg_app(&db.url, &[]).await;
    assert_eq!(app.create("a", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("a in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("a")
    });
    // The restore of the backup taken before the start.
    sqlx::raw_sql(&format!(
        "BEGIN; DELETE FROM widgets; UPDATE checkpoint SET lsn = 0; \
         UPDATE single_writer SET token = {token}; COMMIT"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(app.create("b", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("a failed flush", 10, {
        let text = app.get("/metrics").await.text().await.unwrap();
        metric(&text, "widgets_flush_failures_total") >= 1.0
    });
    assert_eq!(
        app.create("c", &["P"]).await.status(),
        StatusCode::CREATED,
        "the instance stopped acknowledging writes"
    );
    restart_and_flush(app, &db, &mut conn, &["a", "b", "c"]).await;
    drop(conn);
    db.drop_db().await;
}

/// A database replaced under a running instance by one of another history (another
/// service's backup restored into it, a failover to another service's cluster) holds
/// another identity. A flush there is refused, and the WAL keeps what it did not commit:
/// once this service's database is back, a restart replays it. The flush used to commit
/// into the other history whenever its token and checkpoint let it (a first start's
/// token, a checkpoint ahead), and trim the WAL behind it: those writes were then in no
/// database of this service's, nor in its WAL, and the restart refused to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_another_history_under_a_running_instance_takes_no_flush() {
    let (db, other_db) = (TestDb::create().await, TestDb::create().await);
    // The other history: one start, and a checkpoint ahead of this one's.
    let other = pg_app(&other_db.url, &[]).await;
    for i in 0..50 {
        let serial = format!("t{i}");
        assert_eq!(
            other.create(&serial, &["P"]).await.status(),
            StatusCode::CREATED
        );
    }
    let mut theirs = other_db.connect().await;
    eventually!("the other history's flush", 10, {
        checkpoint(&mut theirs).await == 50
    });
    other.stop().await;
    let their_identity: String = sqlx::query_scalar("SELECT identity FROM store_identity")
        .fetch_one(&mut theirs)
        .await
        .unwrap();
    let their_rows: Vec<(String, String, i16, i64)> =
        sqlx::query_as("SELECT serial_number, name, ports, version FROM widgets")
            .fetch_all(&mut theirs)
            .await
            .unwrap();
    drop(theirs);

    // Small segments, so that a flush's checkpoint trims whole ones.
    let app = pg_app(&db.url, &["--wal-segment-bytes", "4096"]).await;
    let mut conn = db.connect().await;
    assert_eq!(app.create("a0", &["P"]).await.status(), StatusCode::CREATED);
    eventually!("a0 in PostgreSQL", 10, {
        pg_state(&mut conn).await.contains_key("a0")
    });
    // This service's backup, as of now; then the other's restored over it.
    sqlx::raw_sql(
        "CREATE TABLE saved AS SELECT * FROM widgets; \
         CREATE TABLE saved_lsn AS SELECT lsn FROM checkpoint; \
         CREATE TABLE saved_identity AS SELECT identity FROM store_identity",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut restore = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::query("DELETE FROM widgets")
        .execute(&mut *restore)
        .await
        .unwrap();
    for (serial, name, ports, version) in &their_rows {
        sqlx::query(
            "INSERT INTO widgets (serial_number, name, ports, version) VALUES ($1, $2, $3, $4)",
        )
        .bind(serial)
        .bind(name)
        .bind(ports)
        .bind(version)
        .execute(&mut *restore)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE checkpoint SET lsn = 50")
        .execute(&mut *restore)
        .await
        .unwrap();
    sqlx::query("UPDATE store_identity SET identity = $1")
        .bind(&their_identity)
        .execute(&mut *restore)
        .await
        .unwrap();
    restore.commit().await.unwrap();

    // Writes go on, over several WAL segments, and flushes are tried.
    let names: Vec<String> = (0..400).map(|i| format!("a{i}")).collect();
    for serial in &names[1..] {
        assert_eq!(
            app.create(serial, &["P"]).await.status(),
            StatusCode::CREATED
        );
    }
    eventually!("the writes flushed, or a flush refused", 10, {
        let text = app.get("/metrics").await.text().await.unwrap();
        metric(&text, "widgets_dirty") == 0.0
            || metric(&text, "widgets_flush_failures_total") >= 1.0
    });
    // This service's database is back.
    sqlx::raw_sql(
        "BEGIN; DELETE FROM widgets; INSERT INTO widgets SELECT * FROM saved; \
         UPDATE checkpoint SET lsn = (SELECT lsn FROM saved_lsn); \
         UPDATE store_identity SET identity = (SELECT identity FROM saved_identity); COMMIT",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let serials: Vec<&str> = names.iter().map(String::as_str).collect();
    restart_and_flush(app, &db, &mut conn, &serials).await;
    drop(conn);
    db.drop_db().await;
    other_db.drop_db().await;
}

/// Stops `app` and starts it again on its data directory and `db`: it serves every one of
/// `serials`, and writes them all to the database (replayed from the WAL where the
/// database lost them).
async fn restart_and_flush(app: TestApp, db: &TestDb, conn: &mut PgConnection, serials: &[&str]) {
    let dir = app.stop().await;
    let args = ["--database-url", &db.url, "--flush-interval", "100ms"];
    let again = common::spawn_app_in(dir, &args, std::sync::Arc::new(widgets::wal::RealFs)).await;
    for serial in serials {
        assert!(
            again.widget(serial).await.is_some(),
            "a restart served without {serial}"
        );
    }
    eventually!("the restart to flush what the database lost", 10, {
        let state = pg_state(conn).await;
        serials.iter().all(|s| state.contains_key(*s))
    });
    again.stop().await;
}

/// Waits up to 20 s for `step` of a start, which must give up on a PostgreSQL stalled on
/// `statement` with PostgreSQL's silence as the reason. The proxy stays stalled.
async fn gives_up_on_a_stall<T: std::fmt::Debug>(
    proxy: &Proxy,
    statement: &str,
    step: impl std::future::Future<Output = Result<T, widgets::store::StoreError>>,
) {
    proxy.stall_on(statement);
    let tried = tokio::time::timeout(Duration::from_secs(20), step)
        .await
        .unwrap_or_else(|_| panic!("a start stalled on {statement:?} did not give up in 20 s"));
    assert!(proxy.stalled(), "{statement:?} reached PostgreSQL");
    let error = tried.expect_err("a step that got no answer").to_string();
    assert!(error.contains("no answer from PostgreSQL"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_start_whose_postgres_stops_answering_gives_up_at_each_step() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let url = db.url_via(proxy.addr);
    let store = common::pg::store_timing_out_after(&url, Duration::from_secs(1)).await;

    let steps = [
        "SELECT set_config('tcp_keepalives_idle'",
        "SELECT set_config(name, '0', false)",
        "SELECT pg_try_advisory_lock",
        "SELECT set_config('lock_timeout'",
    ];
    for statement in steps {
        gives_up_on_a_stall(&proxy, statement, store.claim_single_writer()).await;
        proxy.thaw();
    }
    // Stalled with the lock taken: the abandoned session holds it until PostgreSQL sees
    // it closed, and another instance is refused meanwhile, with that session named.
    gives_up_on_a_stall(&proxy, "UPDATE single_writer", store.claim_single_writer()).await;
    let other = PgStore::connect(&db.url).await.unwrap();
    let refused = other.claim_single_writer().await;
    assert!(
        matches!(
            refused,
            Err(StoreError::WriterHeld {
                backend_pid: Some(_)
            })
        ),
        "{refused:?}"
    );
    drop(other);
    proxy.thaw();
    gives_up_on_a_stall(&proxy, "SELECT reltuples", store.len_hint()).await;
    proxy.thaw();
    gives_up_on_a_stall(&proxy, "SELECT identity", store.identity()).await;
    proxy.thaw();
    let (first, second) = (new_identity(), new_identity());
    gives_up_on_a_stall(
        &proxy,
        "INSERT INTO store_identity",
        store.set_identity(&first),
    )
    .await;
    proxy.thaw();

    // Each gave up on a connection of its own, and left nothing open or held once
    // PostgreSQL saw it closed.
    let mut conn = db.connect().await;
    common::pg::no_transaction_left_open(&mut conn).await;
    store.set_identity(&second).await.unwrap();
    assert_eq!(store.identity().await.unwrap(), Some(second));
    let token = tokio::time::timeout(Duration::from_secs(20), store.claim_single_writer())
        .await
        .expect("the claim after the stalled ones")
        .expect("the abandoned claim's session let its lock go");
    assert!(token >= 1);
    drop(store);
    drop(proxy);
    db.drop_db().await;
}

/// A single-node writer whose machine dies without a word (power, network) lets the
/// database's single-writer lock go within a minute, so that its replacement can start:
/// PostgreSQL probes the claim's idle session with TCP keepalives. Without them it kept
/// the session, and the lock, for the operating system's default (two hours on Linux),
/// and refused every other start meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_machine_dies_silently_lets_the_lock_go_within_a_minute() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let dead = PgStore::connect(&db.url_via(proxy.addr)).await.unwrap();
    dead.migrate().await.unwrap();
    let token = dead.claim_single_writer().await.unwrap();
    proxy.vanish().await;

    let other = PgStore::connect(&db.url).await.unwrap();
    let started = std::time::Instant::now();
    let claimed = loop {
        match other.claim_single_writer().await {
            Ok(claimed) => break claimed,
            Err(StoreError::WriterHeld { .. }) if started.elapsed() < Duration::from_secs(60) => {}
            Err(e) => panic!(
                "the lock of a writer whose machine died was still held after {:?}: {e}",
                started.elapsed()
            ),
        }
    };
    assert!(claimed > token, "{claimed} after {token}");
    drop(other);
    drop(dead);
    drop(proxy);
    db.drop_db().await;
}

/// A stop asked for while the start's claim waits on a PostgreSQL that does not answer
/// ends the process at once, not after the claim's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_stalled_claim_is_not_held_by_it() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let url = db.url_via(proxy.addr);
    proxy.stall_on("UPDATE single_writer");
    let dir = tempfile::TempDir::new().unwrap();
    // The claim would wait 60 s for its answer.
    let args = ["--database-url", &url, "--pg-flush-timeout", "30s"];
    let app =
        common::try_spawn_app_in(dir.path(), &args, std::sync::Arc::new(widgets::wal::RealFs))
            .await
            .unwrap();
    eventually!("the claim reached its UPDATE", 20, { proxy.stalled() });
    let stopped = tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the stop waited for the stalled claim");
    stopped.expect("a stop before the start finished is a clean one");
    proxy.thaw();
    drop(proxy);
    db.drop_db().await;
}

/// A load from PostgreSQL (a start, or Redis mode loading Redis) whose PostgreSQL stops
/// answering gives up after the statement deadline instead of waiting as long as it
/// stalls, and closes its connection rather than handing back a transaction still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_whose_postgres_stops_answering_gives_up_and_closes_its_connection() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let url = db.url_via(proxy.addr);
    let store = common::pg::store_timing_out_after(&url, Duration::from_secs(1)).await;
    // Stalled in its BEGIN: the connection handed back to the pool then would be inside
    // the transaction once the BEGIN's answer arrives (sqlx #4393).
    proxy.stall_on("BEGIN");
    let loaded = tokio::time::timeout(Duration::from_secs(20), store.load(Box::new(|_, _| {})))
        .await
        .expect("a load from a stalled PostgreSQL gave up within 20 s");
    assert!(proxy.stalled(), "the load began its transaction");
    let error = loaded.expect_err("a load that got no answer").to_string();
    assert!(error.contains("no answer from PostgreSQL"), "{error}");
    proxy.thaw();
    let mut conn = db.connect().await;
    common::pg::no_transaction_left_open(&mut conn).await;
    assert_eq!(store.load(Box::new(|_, _| {})).await.unwrap(), 0);
    drop(store);
    drop(proxy);
    db.drop_db().await;
}

/// Under `--fsync interval` a write is acknowledged before its record is fsynced. A flush
/// must not commit such a record's change, and a checkpoint past it, to PostgreSQL before
/// the WAL has it on disk: a power loss then takes the WAL's unsynced tail and leaves a log
/// that ends below the store's checkpoint, and the restart refused to start, taking the
/// WAL for a copy older than the store. The flush syncs the WAL first, so the log on disk
/// reaches the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_fsync_interval_a_flush_never_puts_postgres_ahead_of_the_wal_on_disk() {
    let db = TestDb::create().await;
    let fs = common::PowerLossFs::default();
    let args = [
        "--database-url",
        &db.url,
        "--flush-interval",
        "100ms",
        "--fsync",
        "interval",
        "--fsync-interval",
        "30m",
    ];
    let dir = std::sync::Arc::new(tempfile::TempDir::new().unwrap());
    let app = common::spawn_app_in(dir.clone(), &args, std::sync::Arc::new(fs.clone())).await;
    let mut conn = db.connect().await;
    for serial in ["a", "b", "c"] {
        assert_eq!(
            app.create(serial, &["P"]).await.status(),
            StatusCode::CREATED
        );
    }
    eventually!("the flush of a, b and c", 10, {
        pg_state(&mut conn).await.len() == 3
    });
    // The machine loses its power: the WAL keeps what was fsynced, PostgreSQL its commits.
    let image = std::sync::Arc::new(fs.image(&dir.path().join("wal")));
    app.stop().await;
    let mut again = common::try_spawn_app_in(
        image.path(),
        &args,
        std::sync::Arc::new(widgets::wal::RealFs),
    )
    .await
    .unwrap();
    if let Err(e) = again.ready().await {
        panic!("the start after a power loss was refused: {e:#}");
    }
    let base = format!("http://{}", again.addr());
    for serial in ["a", "b", "c"] {
        let r = reqwest::get(format!("{base}/widgets/{serial}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{serial}");
    }
    again.stop().await.unwrap();
    drop(image);
    db.drop_db().await;
}

/// A port nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// sqlx's pool, while it cannot connect, tries again until its acquire timeout (10 s) and
/// then says only "pool timed out while waiting for an open connection" (sqlx #3808). A
/// start on a PostgreSQL that is down logged that, every 10 s, and never why.
#[tokio::test]
async fn a_connect_to_a_postgres_that_is_down_says_why_at_once() {
    let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let started = std::time::Instant::now();
    let refused = PgStore::connect(&url).await.err().expect("nothing listens");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    assert_names_the_refusal(&refused);
}

/// `e` is the connection's own refusal, not the pool's timeout (which names no cause) nor
/// the deadline's (which reads as a stall).
fn assert_names_the_refusal(e: &StoreError) {
    assert!(
        !matches!(e, StoreError::Postgres(sqlx::Error::PoolTimedOut)),
        "the pool's timeout names no cause: {e}"
    );
    assert!(
        e.to_string().contains("refused"),
        "the connection's own error: {e}"
    );
}

/// A flush while PostgreSQL cannot be reached, whose claim's session has ended with it:
/// it fails once, after one wait for a connection, and says what the connection met.
/// Retaking the lock first waited out the pool's 10 s and went on to the flush's own
/// connection, which waited 10 s more, and both said only that the pool timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_while_postgres_cannot_be_reached_fails_after_one_wait_and_says_why() {
    let (failed, took) = a_flush_while_postgres_cannot_be_reached(Duration::from_secs(30)).await;
    assert_names_the_refusal(&failed);
    // One acquire timeout (10 s) and the try outside the pool, not two.
    assert!(
        took < Duration::from_secs(15),
        "the flush failed after {took:?}"
    );
}

/// With `--pg-flush-timeout 1s` a flush waits 2 s for a connection, before the pool's own
/// 10 s are up: the cause went unnamed, and the log read as if PostgreSQL had stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_with_a_short_timeout_still_says_why_postgres_cannot_be_reached() {
    let (failed, took) = a_flush_while_postgres_cannot_be_reached(Duration::from_secs(1)).await;
    assert_names_the_refusal(&failed);
    assert!(
        took < Duration::from_secs(4),
        "the flush failed after {took:?}"
    );
}

/// Starts a single writer's store through a proxy, with flushes bounded by `timeout`,
/// takes the proxy away (its port then refuses connections, as a PostgreSQL that is
/// down), and flushes: what the flush failed with, and after how long.
async fn a_flush_while_postgres_cannot_be_reached(timeout: Duration) -> (StoreError, Duration) {
    let db = TestDb::create().await;
    let proxy = Proxy::start(&db).await;
    let store = PgStore::connect(&db.url_via(proxy.addr))
        .await
        .unwrap()
        .with_flush_settings(widgets::store::postgres::FlushTxSettings {
            timeout,
            ..Default::default()
        });
    store.migrate().await.unwrap();
    store.claim_single_writer().await.unwrap();
    // Gone, listener and all: a connection is refused, as by a PostgreSQL that is down.
    // (One the proxy accepts and then drops fails at once.)
    let addr = proxy.addr;
    drop(proxy);
    eventually!("the proxy's port to refuse connections", 5, {
        tokio::net::TcpStream::connect(addr).await.is_err()
    });
    let batch = FlushBatch {
        items: vec![item(
            "a",
            None,
            1,
            Mark {
                row: true,
                ports: 1,
            },
        )],
        checkpoint: Some(1),
        widgets: None,
        redis: None,
    };
    let started = std::time::Instant::now();
    let failed = store.write_batch(batch).await.unwrap_err();
    let took = started.elapsed();
    drop(store);
    db.drop_db().await;
    (failed, took)
}

/// `widgets migrate` and `bench-seed` run once, so they wait a little for a server that
/// refuses or drops connections (down, starting up, behind a port forwarder), as sqlx's
/// pool did for them; a server that answers with a refusal of its own (no such database)
/// fails them at once.
#[tokio::test]
async fn a_command_that_runs_once_waits_for_a_refusing_server_but_not_for_a_refusal() {
    let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let started = std::time::Instant::now();
    let refused = PgStore::connect_waiting(&url, Duration::from_secs(1))
        .await
        .err()
        .expect("nothing listens");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(refused.to_string().contains("refused"), "{refused}");

    // A port forwarder in front of a server not listening yet: accepted, then dropped.
    let forwarder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "postgres://postgres@{}/test",
        forwarder.local_addr().unwrap()
    );
    let dropping = tokio::spawn(async move {
        while let Ok((conn, _)) = forwarder.accept().await {
            drop(conn);
        }
    });
    let started = std::time::Instant::now();
    let dropped = PgStore::connect_waiting(&url, Duration::from_secs(1))
        .await
        .err()
        .expect("every connection dropped");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up on a dropped connection after {:?}: {dropped}",
        started.elapsed()
    );
    dropping.abort();

    let db = TestDb::create().await;
    let missing = widgets_testkit::pg::with_database(&db.url, "widgets_no_such_database").unwrap();
    let started = std::time::Instant::now();
    let refused = PgStore::connect_waiting(&missing, Duration::from_secs(30))
        .await
        .err()
        .expect("no such database");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?} for a refusal no wait mends",
        started.elapsed()
    );
    assert!(
        refused.to_string().contains("widgets_no_such_database"),
        "{refused}"
    );
    db.drop_db().await;
}
