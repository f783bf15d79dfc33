//! Opening: migrations from an empty schema, reopening, refusals at open, close, corruption.

use crate::TestSchema;
use mageflow_store::conformance::{all, assert_conflict, check_consistent, event, request, stream};
use mageflow_store::{Error, EventLog};
use mageflow_store_pg::{PgLog, PgOptions, MIGRATOR};
use sqlx::Executor;

async fn tables(conn: &mut sqlx::PgConnection, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
         ORDER BY table_name",
    )
    .bind(schema)
    .fetch_all(conn)
    .await
    .expect("list tables")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_set_up_an_empty_schema() {
    let schema = TestSchema::new().await;
    let mut admin = schema.admin().await;
    assert!(tables(&mut admin, &schema.name).await.is_empty());

    let log = schema.open().await;
    assert_eq!(
        tables(&mut admin, &schema.name).await,
        [
            "_sqlx_migrations",
            "mageflow_archive",
            "mageflow_events",
            "mageflow_head",
            "mageflow_snapshot"
        ]
    );
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut admin)
            .await
            .expect("applied migrations");
    let expected: Vec<(i64, bool)> = MIGRATOR.iter().map(|m| (m.version, true)).collect();
    assert!(!expected.is_empty());
    assert_eq!(applied, expected);
    assert_eq!(log.head(), 0);
    assert_eq!(log.verify().expect("verify"), 0);

    // A second process opening the same schema finds the migrations applied and shares the log.
    let other = schema.open().await;
    log.append(vec![request(stream(1), 0, 2)])
        .await
        .expect("append");
    assert_eq!(
        other.read_stream(stream(1), 1).expect("read"),
        all(&log).into_iter().map(|r| r.event).collect::<Vec<_>>()
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut admin)
        .await
        .expect("count");
    assert_eq!(count as usize, expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopened_log_serves_what_it_stored() {
    let schema = TestSchema::new().await;
    let (before, versions) = {
        let log = schema.open().await;
        for i in 0..20u128 {
            let s = stream(i % 5);
            let v = log.stream_version(s).expect("version");
            log.append(vec![request(s, v, 1 + (i as u64 % 3))])
                .await
                .expect("append");
        }
        let versions: Vec<u64> = (0..5)
            .map(|i| log.stream_version(stream(i)).expect("version"))
            .collect();
        (all(&log), versions)
    };
    let log = schema.open().await;
    assert_eq!(log.head(), before.len() as u64);
    assert_eq!(*log.subscribe().borrow(), log.head());
    assert_eq!(all(&log), before);
    assert_eq!(log.verify().expect("verify"), log.head());
    let s = stream(0);
    let v = versions[0];
    let err = log
        .append(vec![request(s, v - 1, 1)])
        .await
        .expect_err("stale");
    assert_conflict(&err, s, v - 1, v);
    let head = log.head();
    let got = log.append(vec![request(s, v, 2)]).await.expect("append");
    assert_eq!(got, vec![head + 2]);
    check_consistent(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_clear_open_error() {
    // Port 1 on the loopback: nothing listens there, the connection is refused at once.
    let url = "postgres://postgres:secret@127.0.0.1:1/test";
    let err = match PgLog::open(url, PgOptions::default()).await {
        Ok(_) => panic!("opened a log on a port where nothing listens"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(
        message.contains("postgres://postgres:***@127.0.0.1:1/test"),
        "the URL (password hidden) is named: {message}"
    );
    assert!(!message.contains("secret"), "{message}");
    assert!(message.contains("not reachable"), "{message}");
    assert!(
        message.to_lowercase().contains("refused"),
        "the cause is named: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_schema_names_are_refused_at_open() {
    for bad in [
        "mysql://localhost/test",
        "postgres://[::1/test",
        "localhost:5432",
    ] {
        let err = PgLog::open(bad, PgOptions::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(matches!(err, Error::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
    }
    for bad in ["", "Upper", "semi;colon", "1digit", &"x".repeat(60)] {
        let options = PgOptions {
            schema: Some(bad.to_owned()),
            ..PgOptions::default()
        };
        let err = PgLog::open(&crate::url(), options)
            .await
            .err()
            .unwrap_or_else(|| panic!("schema name {bad:?} accepted"));
        assert!(err.to_string().contains("schema name"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_log_refuses_appends_and_still_reads() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    log.append(vec![request(stream(1), 0, 1)])
        .await
        .expect("append");
    // Appends queued before close are still committed and answered.
    let queued = log.append(vec![request(stream(1), 1, 1)]);
    log.close();
    assert_eq!(queued.await.expect("queued before close"), vec![2]);
    let err = log
        .append(vec![request(stream(1), 2, 1)])
        .await
        .expect_err("closed");
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert_eq!(
        log.read_stream(stream(1), 1).expect("read"),
        vec![event(stream(1), 1), event(stream(1), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_rows_are_reported_with_their_position() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let (a, b) = (stream(1), stream(2));
    log.append(vec![request(a, 0, 3), request(b, 0, 2)])
        .await
        .expect("append");
    let mut admin = schema.admin().await;

    // One flipped payload bit: the checksum catches it, on every read path.
    admin
        .execute(
            "UPDATE mageflow_events SET payload = set_byte(payload, 7, get_byte(payload, 7) # 1) \
             WHERE position = 2",
        )
        .await
        .expect("damage a payload");
    // `read_all` by another process: this one serves what it just committed from memory.
    let reader = schema.open().await;
    for err in [
        reader.read_all(1, 10).expect_err("read_all"),
        log.read_stream(a, 1).expect_err("read_stream"),
        log.verify().expect_err("verify"),
    ] {
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("position 2"), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    // Untouched events still read.
    assert_eq!(log.read_stream(b, 1).expect("read b").len(), 2);

    // A payload replaced by one that checks out but belongs elsewhere.
    admin
        .execute(
            "UPDATE mageflow_events SET (payload, crc32) = \
             (SELECT payload, crc32 FROM mageflow_events WHERE position = 1) WHERE position = 2",
        )
        .await
        .expect("swap a payload");
    let err = reader.read_all(2, 1).expect_err("misplaced event");
    assert!(
        err.to_string().contains("position 2") && err.to_string().contains("row says"),
        "{err}"
    );

    // A missing row: a gap in positions and in the stream's seqs.
    admin
        .execute("DELETE FROM mageflow_events WHERE position = 2")
        .await
        .expect("delete a row");
    let err = reader.read_all(1, 10).expect_err("gap");
    assert!(err.to_string().contains("position 2 is missing"), "{err}");
    let err = log.read_stream(a, 1).expect_err("gap in the stream");
    assert!(err.to_string().contains("seq 2"), "{err}");
    let err = log.verify().expect_err("verify");
    assert!(err.to_string().contains("position 2 is missing"), "{err}");
}
