//! The writer stores only times in `[readings_earliest, now + ingest_max_future + 1 day]`,
//! whatever reaches it over the bus (an older edge that checks no window), and writes at
//! most `MAX_DAYS_PER_TRANSACTION` daily partitions per transaction (issue 16).

use std::time::Duration;

use fieldline_common::{Config, time::now_us};
use fieldline_testkit::{TestApp, eventually, live_time_defaults};
use reqwest::StatusCode;
use serde_json::json;

use crate::{number, publish, spawn_query_with, stored};

const DAY_US: i64 = 86_400_000_000;

/// Daily partitions of the readings table.
async fn partitions(app: &TestApp) -> i64 {
    app.env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry.readings'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A counter of `/metrics` whose line starts with `name` (labels included), 0 when absent.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn writer_idle(app: &TestApp) {
    let consumer = app
        .context
        .jetstream
        .get_stream(
            app.context
                .subjects
                .stream_name(fieldline_proto::Stream::Telemetry),
        )
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(query_api::WRITER_CONSUMER)
        .await
        .unwrap();
    eventually("every message acked", Duration::from_secs(15), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(info.num_redelivered)
        }
    })
    .await;
}

async fn wait_for_partitions_ahead(app: &TestApp) -> i64 {
    // The maintenance task makes yesterday's to a week ahead's at start.
    eventually("partitions made ahead", Duration::from_secs(10), || async {
        let count = partitions(app).await;
        (count >= 9).then_some(count)
    })
    .await
}

#[tokio::test]
async fn readings_outside_the_stored_window_are_refused_counted_and_acked() {
    let app = spawn_query_with(live_time_defaults).await;
    app.create_device("attacker").await;
    app.create_device("neighbour").await;
    let before = wait_for_partitions_ahead(&app).await;

    // 4,000 days from 2300-01-01, one before readings_earliest, and one good reading, in one
    // message, as an edge that checks no window would publish it.
    let year_2300 = 10_413_792_000_000_000;
    let mut readings: Vec<_> = (0..4_000)
        .map(|day| number("temp", year_2300 + day * DAY_US + 43_200_000_000, 1.0))
        .collect();
    readings.push(number("temp", 915_148_800_000_000, 2.0)); // 1999-01-01
    let good = now_us() - 60_000_000;
    readings.push(number("temp", good, 3.0));
    publish(&app, "default", "attacker", readings).await;
    publish(
        &app,
        "default",
        "neighbour",
        vec![number("temp", good, 4.0)],
    )
    .await;

    eventually("the good readings", Duration::from_secs(15), || async {
        (stored(&app, "attacker").await == 1 && stored(&app, "neighbour").await == 1).then_some(())
    })
    .await;
    writer_idle(&app).await;
    let refused = "fieldline_writer_dropped_total{reason=\"out_of_window\"}";
    assert_eq!(metric(&app, refused).await, 4_001.0);
    assert_eq!(partitions(&app).await, before);
    // Both devices read: the refused one's good reading, and the neighbour's.
    for device in ["attacker", "neighbour"] {
        let (status, body) = app
            .get(
                &format!("/api/v1/devices/{device}/readings"),
                app.admin_key(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_of_many_days_is_stored_in_transactions_of_few_days() {
    let app = spawn_query_with(live_time_defaults).await;
    app.create_device("d1").await;
    let before = wait_for_partitions_ahead(&app).await;
    let transactions_before = metric(&app, "fieldline_writer_transactions_total").await;

    let days = 40;
    let now = now_us();
    let readings: Vec<_> = (0..days)
        .map(|day| number("temp", now - day * DAY_US, day as f64))
        .collect();
    publish(&app, "default", "d1", readings).await;
    eventually("every day stored", Duration::from_secs(15), || async {
        (stored(&app, "d1").await == days).then_some(())
    })
    .await;
    writer_idle(&app).await;
    // 40 days in transactions of at most 8 days: 5 of them at least.
    let transactions = metric(&app, "fieldline_writer_transactions_total").await;
    let expected = (days as usize).div_ceil(query_api::MAX_DAYS_PER_TRANSACTION) as f64;
    assert!(
        transactions - transactions_before >= expected,
        "{transactions_before} -> {transactions}"
    );
    assert!(partitions(&app).await <= before + days);
    // The series moved by every reading once, across its transactions.
    let count: i64 = app
        .env
        .pg()
        .await
        .query_one(
            "SELECT count FROM telemetry.series WHERE device_id = 'd1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, days);
    app.shutdown().await;
}

#[tokio::test]
async fn reads_touch_only_the_partitions_of_their_range() {
    let app = spawn_query_with(|config| Config {
        query_statement_timeout: Duration::from_secs(2),
        ..live_time_defaults(config)
    })
    .await;
    app.create_device("d1").await;
    wait_for_partitions_ahead(&app).await;
    let now = now_us();
    let hour_us = 3_600_000_000;
    let readings = (1..=3)
        .map(|hours| number("temp", now - hours * hour_us, hours as f64))
        .collect();
    publish(&app, "default", "d1", readings).await;
    eventually("the readings", Duration::from_secs(15), || async {
        (stored(&app, "d1").await == 3).then_some(())
    })
    .await;

    // A partition outside every range read below, held by another session the way a DROP
    // or a long maintenance statement holds one: a read that plans or locks every partition
    // (a generic plan, a phase without the range, an open range) waits for it and is
    // cancelled after the statement timeout.
    let mut pg = app.env.pg().await;
    pg.execute(
        "SELECT telemetry.ensure_readings_partition('2001-01-01')",
        &[],
    )
    .await
    .unwrap();
    let holder = pg.transaction().await.unwrap();
    holder
        .batch_execute("LOCK TABLE telemetry.readings_20010101 IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // More than five times each: PostgreSQL may switch a prepared statement to a generic
    // plan after five runs.
    for _ in 0..7 {
        for path in [
            "/api/v1/devices/d1/readings?start=-1d",
            "/api/v1/devices/d1/readings",
            "/api/v1/devices/d1/readings?order=desc&limit=2",
        ] {
            let (status, body) = app.get(path, app.admin_key()).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let expected = if path.contains("limit=2") { 2 } else { 3 };
            assert_eq!(body["data"].as_array().unwrap().len(), expected, "{path}");
        }
        let (status, body) = app
            .get(
                "/api/v1/devices/d1/readings/aggregate?metric=temp&interval=1h",
                app.admin_key(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = app
            .post(
                "/api/v1/query",
                app.admin_key(),
                &json!({"devices": ["d1"], "metrics": ["temp"]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["data"]["readings"].as_array().unwrap().len(),
            3,
            "{body}"
        );
    }
    let csv = app
        .http
        .get(format!(
            "{}/api/v1/devices/d1/readings?format=csv",
            app.base_url
        ))
        .bearer_auth(app.admin_key())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    holder.rollback().await.unwrap();
    app.shutdown().await;
}
