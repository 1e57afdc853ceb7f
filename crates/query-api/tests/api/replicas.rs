//! History read from a real streaming replica (`pg_basebackup -R` of a private primary): what
//! the replica has not replayed is not seen while its lag is within the bound, the lag is a
//! metric, and a replica too far behind or stopped is skipped for the primary.

use std::time::Duration;

use fieldline_testkit::{TestApp, TestEnv, eventually, secure::PrivatePostgres};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::Value;

use crate::{number, publish, stored};

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

/// The value of `family{replica="…"}` in a /metrics text, if there.
fn replica_metric(metrics: &str, family: &str, replica: &str) -> Option<f64> {
    let prefix = format!("{family}{{replica=\"{replica}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn temperatures(app: &TestApp) -> Vec<f64> {
    let (status, body) = app
        .get("/api/v1/devices/d1/readings?metric=temp", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|reading| reading["value"].as_f64().unwrap())
        .collect()
}

async fn latest_temperature(app: &TestApp) -> Value {
    let (status, body) = app
        .get(
            "/api/v1/devices/d1/readings/latest?metric=temp",
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"][0]["value"].clone()
}

async fn replica_sql(replica: &PrivatePostgres, sql: &str) {
    let (client, connection) = tokio_postgres::connect(
        &format!("{}/postgres", replica.server_url()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
}

#[tokio::test]
async fn history_is_read_from_a_replica_within_its_lag_bound_and_from_the_primary_otherwise() {
    let primary = PrivatePostgres::start_plain().await;
    let mut replica = primary.start_replica().await;
    let env = TestEnv::new_on(&primary.server_url()).await;
    let replica_url = format!("{}/{}", replica.server_url(), env.database);
    let name = format!("127.0.0.1:{}", replica.port);
    let max_lag = Duration::from_secs(5);
    let app = TestApp::spawn_with(
        env,
        |mut config| {
            config.database_read_url = Some(SecretString::from(replica_url));
            config.database_read_max_lag = max_lag;
            config.database_read_probe_interval = Duration::from_millis(100);
            config
        },
        |context| async move {
            Ok(vec![
                device_registry::start(&context).await?,
                query_api::start(&context).await?,
            ])
        },
    )
    .await;
    let metric = async |family: &str| replica_metric(&app.metrics().await, family, &name);
    eventually("the replica in use", Duration::from_secs(20), || async {
        (metric("fieldline_db_replica_usable").await == Some(1.0)).then_some(())
    })
    .await;
    app.create_device("d1").await;
    publish(&app, "default", "d1", vec![number("temp", T0, 1.0)]).await;
    eventually(
        "the first reading on the replica",
        Duration::from_secs(10),
        || async { (temperatures(&app).await == [1.0]).then_some(()) },
    )
    .await;

    // Replay paused: the primary stores a second reading the replica does not show.
    replica_sql(&replica, "SELECT pg_wal_replay_pause()").await;
    publish(
        &app,
        "default",
        "d1",
        vec![number("temp", T0 + 1_000_000, 2.0)],
    )
    .await;
    eventually(
        "the second reading on the primary",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 2).then_some(()) },
    )
    .await;
    let seen = temperatures(&app).await;
    let latest = latest_temperature(&app).await;
    let lag = metric("fieldline_db_replica_lag_seconds").await.unwrap();
    // Served by the paused replica: proof that history is read from it (unless this machine
    // was so slow that the lag bound passed meanwhile, which the lag says).
    assert!(lag < max_lag.as_secs_f64(), "lag {lag}");
    assert_eq!(seen, [1.0], "the replica's history");
    assert_eq!(latest, 1.0, "the replica's latest value");

    // The lag grows while replay is paused, although nothing else is written...
    eventually("the lag growing", Duration::from_secs(10), || async {
        (metric("fieldline_db_replica_lag_seconds").await? >= 2.0).then_some(())
    })
    .await;
    // ...and past the bound the replica is skipped: the primary answers.
    eventually("the primary's history", Duration::from_secs(20), || async {
        (temperatures(&app).await == [1.0, 2.0]).then_some(())
    })
    .await;
    assert_eq!(metric("fieldline_db_replica_usable").await, Some(0.0));
    assert_eq!(latest_temperature(&app).await, 2.0);

    // Replay resumed: caught up (lag 0, with the primary idle) and used again.
    replica_sql(&replica, "SELECT pg_wal_replay_resume()").await;
    eventually("the replica caught up", Duration::from_secs(20), || async {
        (metric("fieldline_db_replica_lag_seconds").await? == 0.0
            && metric("fieldline_db_replica_usable").await? == 1.0)
            .then_some(())
    })
    .await;
    // Idle for a while, still 0 behind: the lag is not the age of the last transaction.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(metric("fieldline_db_replica_lag_seconds").await, Some(0.0));
    assert_eq!(temperatures(&app).await, [1.0, 2.0]);

    // The replica stops: reads succeed at once on the primary, and it is skipped.
    replica.stop_immediate();
    assert_eq!(temperatures(&app).await, [1.0, 2.0]);
    assert_eq!(latest_temperature(&app).await, 2.0);
    eventually(
        "the stopped replica skipped",
        Duration::from_secs(10),
        || async { (metric("fieldline_db_replica_usable").await? == 0.0).then_some(()) },
    )
    .await;
    let (status, body) = app
        .get(
            "/api/v1/devices/d1/readings/aggregate?metric=temp&interval=1h&start=2026-01-01T00:00:00Z&end=2026-01-01T01:00:00Z",
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(app);
}
