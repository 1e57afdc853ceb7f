//! Retention: old partitions are dropped, the rollups stay and still answer, equal to the
//! aggregate computed from raw rows before they went.

use std::time::Duration;

use fieldline_testkit::{TestApp, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{create_project, number, publish, spawn_query_with, stored};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;

fn rfc3339(ts_us: i64) -> String {
    fieldline_common::time::format_rfc3339(&fieldline_common::time::from_us(ts_us))
}

async fn partitions(app: &TestApp) -> Vec<String> {
    app.env
        .pg()
        .await
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'telemetry.readings'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn aggregate(app: &TestApp, query: &str) -> Value {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/d1/readings/aggregate?{query}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].clone()
}

#[tokio::test]
async fn retention_drops_old_partitions_and_keeps_rollups() {
    let app = spawn_query_with(|mut config| {
        config.partition_maintenance_interval = Duration::from_millis(100);
        config
    })
    .await;
    app.create_device("d1").await;
    // Partitions are created ahead: today and the coming week exist before any reading.
    let today = chrono::Utc::now().date_naive();
    let ahead = format!(
        "readings_{}",
        (today + chrono::Days::new(7)).format("%Y%m%d")
    );
    eventually("partitions ahead", Duration::from_secs(10), || async {
        partitions(&app).await.contains(&ahead).then_some(())
    })
    .await;

    // Readings 6 to 4 days ago (whole days), every 10 minutes.
    let now_us = chrono::Utc::now().timestamp_micros();
    let first_day = (now_us / DAY - 6) * DAY;
    let readings: Vec<_> = (0..(2 * DAY / (10 * 60_000_000)))
        .map(|i| {
            number(
                "temp",
                first_day + i * 10 * 60_000_000,
                ((i * 13) % 40) as f64 / 2.0,
            )
        })
        .collect();
    let count = readings.len() as i64;
    publish(&app, "default", "d1", readings).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == count).then_some(())
    })
    .await;
    let range = format!(
        "metric=temp&start={}&end={}&fn=avg,min,max,sum,count,first,last",
        rfc3339(first_day),
        rfc3339(first_day + 2 * DAY)
    );
    let raw_hourly = aggregate(&app, &format!("{range}&interval=1h&source=raw")).await;
    let raw_daily = aggregate(&app, &format!("{range}&interval=1d&source=raw")).await;
    assert_eq!(
        raw_hourly["series"][0]["buckets"].as_array().unwrap().len(),
        48
    );
    let before = partitions(&app).await;
    let old_partition = format!(
        "readings_{}",
        fieldline_common::time::from_us(first_day).format("%Y%m%d")
    );
    assert!(before.contains(&old_partition), "{before:?}");

    // This project keeps raw readings 2 days, rollups forever.
    app.env
        .pg()
        .await
        .execute(
            "INSERT INTO telemetry.retention (project, readings) VALUES ('default', interval '2 days')",
            &[],
        )
        .await
        .unwrap();
    eventually(
        "old partitions dropped",
        Duration::from_secs(10),
        || async { (!partitions(&app).await.contains(&old_partition)).then_some(()) },
    )
    .await;
    assert_eq!(stored(&app, "d1").await, 0);
    let (_, body) = app
        .get("/api/v1/devices/d1/readings", app.admin_key())
        .await;
    assert_eq!(body["data"], json!([]));
    // The dictionary forgot the rows too, but not the latest value.
    let (_, body) = app.get("/api/v1/devices/d1/metrics", app.admin_key()).await;
    assert_eq!(body["data"], json!([]));
    let (_, body) = app
        .get("/api/v1/devices/d1/readings/latest", app.admin_key())
        .await;
    assert_eq!(body["data"][0]["metric"], "temp");

    // Rollups answer, equal to what raw rows gave before they went.
    let hourly = aggregate(&app, &format!("{range}&interval=1h")).await;
    assert_eq!(hourly["sources"], json!(["rollup_1h"]));
    assert_eq!(hourly["series"], raw_hourly["series"]);
    let daily = aggregate(&app, &format!("{range}&interval=1d")).await;
    assert_eq!(daily["sources"], json!(["rollup_1d"]));
    assert_eq!(daily["series"], raw_daily["series"]);

    // A reading older than retention is not stored again (it would only be dropped again).
    publish(
        &app,
        "default",
        "d1",
        vec![number("temp", first_day + 1, 1.0)],
    )
    .await;
    publish(&app, "default", "d1", vec![number("fresh", now_us, 1.0)]).await;
    eventually("fresh reading stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 1).then_some(())
    })
    .await;

    // Rollups have their own retention.
    app.env
        .pg()
        .await
        .execute(
            "UPDATE telemetry.retention SET rollups = interval '1 day' WHERE project = 'default'",
            &[],
        )
        .await
        .unwrap();
    eventually("old rollups deleted", Duration::from_secs(10), || async {
        let data = aggregate(&app, &format!("{range}&interval=1h")).await;
        data["series"][0]["buckets"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    app.shutdown().await;
}

async fn put_retention(app: &TestApp, key: &str, body: Value) -> (StatusCode, Value) {
    app.request(Method::PUT, "/api/v1/retention", Some(key), Some(&body))
        .await
}

#[tokio::test]
async fn a_projects_retention_is_set_through_the_api_and_applied_to_it_alone() {
    let app = spawn_query_with(|mut config| {
        config.partition_maintenance_interval = Duration::from_millis(100);
        config.rollups_retention = Some(Duration::from_secs(400 * 24 * 3600));
        config
    })
    .await;
    let other_key = create_project(&app, "other").await;
    let admin = app.admin_key();

    let (status, body) = app.get("/api/v1/retention", admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({"project": "default", "readings": null, "rollups": null,
               "defaults": {"readings": null, "rollups": "400d"},
               "effective": {"readings": null, "rollups": "400d"}})
    );

    // Each bad value is a 400 naming its field; nothing is stored.
    for (body, field) in [
        (json!({"readings": "soon"}), "readings"),
        (json!({"readings": "0d"}), "readings"),
        (json!({"readings": "5m"}), "readings"),
        (json!({"readings": "90d", "rollups": 30}), "rollups"),
        (json!({"rollups": "1001y"}), "rollups"),
        (json!({"readings": "90d", "raw": "1d"}), "raw"),
    ] {
        let (status, answer) = put_retention(&app, admin, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {answer}"
        );
    }
    let (_, read_key) = app.create_key(&["read"]).await;
    let (status, answer) = put_retention(&app, &read_key, json!({"readings": "1d"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (_, body) = app.get("/api/v1/retention", admin).await;
    assert_eq!(body["data"]["readings"], Value::Null);

    // Each project has readings from 3 days ago and from now.
    let now_us = chrono::Utc::now().timestamp_micros();
    let old_us = now_us - 3 * DAY;
    publish(
        &app,
        "default",
        "d1",
        vec![number("t", old_us, 1.0), number("t", now_us, 2.0)],
    )
    .await;
    publish(
        &app,
        "other",
        "d2",
        vec![number("t", old_us, 1.0), number("t", now_us, 2.0)],
    )
    .await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 2 && stored(&app, "d2").await == 2).then_some(())
    })
    .await;

    let (status, body) =
        put_retention(&app, admin, json!({"readings": "48h", "rollups": "2y"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({"project": "default", "readings": "2d", "rollups": "2y",
               "defaults": {"readings": null, "rollups": "400d"},
               "effective": {"readings": "2d", "rollups": "2y"}})
    );
    let (_, body) = app.get("/api/v1/retention", admin).await;
    assert_eq!(body["data"]["readings"], "2d");
    let (_, body) = app.get("/api/v1/retention", &other_key).await;
    assert_eq!(body["data"]["project"], "other");
    assert_eq!(body["data"]["readings"], Value::Null);

    eventually(
        "the old reading of this project removed",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        stored(&app, "d2").await,
        2,
        "another project's readings went too"
    );
    // The dictionary counts what is left, from the oldest row left.
    let pg = app.env.pg().await;
    for (device, count, first_us) in [("d1", 1, now_us), ("d2", 2, old_us)] {
        let row = pg
            .query_one(
                "SELECT count, first_ts FROM telemetry.series WHERE device_id = $1",
                &[&device],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), count, "{device}");
        let first_ts: chrono::DateTime<chrono::Utc> = row.get(1);
        assert_eq!(first_ts.timestamp_micros(), first_us, "{device}");
    }

    // null goes back to the defaults.
    let (status, body) = put_retention(&app, admin, json!({"readings": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["effective"],
        json!({"readings": null, "rollups": "400d"})
    );
    app.shutdown().await;
}
