//! Compressed history: every read answers the same before and after the days it covers are
//! compressed; late and redelivered readings of a compressed day; retention of blocks; a
//! compression run interrupted or run twice at once; imports of closed days straight into blocks.

use std::time::Duration;

use fieldline_proto::v1::Reading;
use fieldline_testkit::{TestApp, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{boolean, number, publish, spawn_query_with, text};

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
const MINUTE: i64 = 60_000_000;
const DAY: i64 = 24 * 60 * MINUTE;

/// Three days of a device: two numeric metrics every 5 minutes (equal times across metrics),
/// a boolean every 7 minutes, a text every 2 hours, and a third number with negative zero,
/// large and tiny values at full precision.
fn history() -> Vec<Reading> {
    let mut readings = Vec::new();
    let mut level = 2150i64;
    for i in 0..(3 * DAY / (5 * MINUTE)) {
        let ts = T0 + i * 5 * MINUTE;
        level += (i * 7919 % 21) - 10;
        readings.push(number("temp", ts, level as f64 / 100.0));
        readings.push(number("hum", ts, (i % 40) as f64 * 0.25));
        if i % 97 == 0 {
            let odd = [
                -0.0,
                1e-300,
                6.02214076e23,
                -123.456_789_012_345_67,
                0.1 + 0.2,
            ];
            readings.push(number("odd", ts + 1, odd[(i / 97) as usize % odd.len()]));
        }
    }
    for i in 0..(3 * DAY / (7 * MINUTE)) {
        readings.push(boolean("door", T0 + i * 7 * MINUTE, i % 3 == 0));
    }
    for i in 0..(3 * DAY / (120 * MINUTE)) {
        readings.push(text(
            "fw",
            T0 + i * 120 * MINUTE,
            &format!("1.{}, \"b\"", i / 10),
        ));
    }
    readings
}

async fn seed(app: &TestApp, device: &str, readings: Vec<Reading>) {
    let total = readings.len() as i64;
    for chunk in readings.chunks(500) {
        publish(app, "default", device, chunk.to_vec()).await;
    }
    eventually("readings stored", Duration::from_secs(60), || async {
        let (_, body) = app
            .get(
                &format!("/api/v1/devices/{device}/metrics"),
                app.admin_key(),
            )
            .await;
        let counted: i64 = body["data"]
            .as_array()
            .map(|m| m.iter().map(|m| m["count"].as_i64().unwrap()).sum())
            .unwrap_or(0);
        (counted == total).then_some(())
    })
    .await;
}

async fn text_of(app: &TestApp, path: &str, accept: &str) -> String {
    let response = app
        .http
        .get(format!("{}{path}", app.base_url))
        .bearer_auth(app.admin_key())
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.text().await.unwrap()
}

/// Every page of a walk with the cursor, until the last.
async fn walk(app: &TestApp, path: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let url = match &next {
            Some(cursor) => format!("{path}&cursor={cursor}"),
            None => path.to_owned(),
        };
        let (status, body) = app.get(&url, app.admin_key()).await;
        assert_eq!(status, StatusCode::OK, "{url}: {body}");
        pages.push(body["data"].clone());
        match body["page"]["next_cursor"].as_str() {
            Some(cursor) => next = Some(cursor.to_owned()),
            None => return pages,
        }
    }
}

/// The answers of every read over the device's history.
async fn answers(app: &TestApp, device: &str) -> Vec<(String, Value)> {
    let base = format!("/api/v1/devices/{device}");
    let mut out = Vec::new();
    for path in [
        format!("{base}/readings?limit=1000"),
        format!("{base}/readings?limit=333&order=desc"),
        format!(
            "{base}/readings?limit=250&metric=temp,door&start=2026-01-01T13:02:00Z&end=2026-01-03T01:00:00Z"
        ),
        format!("{base}/readings?limit=97&metric=fw&order=desc&end=2026-01-02T12:00:00Z"),
    ] {
        out.push((path.clone(), Value::Array(walk(app, &path).await)));
    }
    for path in [
        format!("{base}/readings/latest"),
        format!("{base}/metrics"),
        format!(
            "{base}/readings/aggregate?metric=temp,hum,odd&start=2026-01-01T00:00:00Z&end=2026-01-04T00:00:00Z&interval=1h&fn=avg,min,max,sum,count,first,last"
        ),
        format!(
            "{base}/readings/aggregate?metric=temp,odd&start=2026-01-01T10:07:00Z&end=2026-01-02T03:31:00Z&interval=5m&fn=count,min,max,first,last&fill=null"
        ),
        format!(
            "{base}/readings/aggregate?metric=hum&start=2026-01-01T00:30:00Z&end=2026-01-03T23:30:00Z&interval=1d&fn=avg,count,first,last"
        ),
    ] {
        let (status, body) = app.get(&path, app.admin_key()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        out.push((path, body["data"].clone()));
    }
    for (path, accept) in [
        (format!("{base}/readings"), "text/csv"),
        (
            format!("{base}/readings?order=desc&start=2026-01-02T05:00:00Z"),
            "application/x-ndjson",
        ),
    ] {
        out.push((
            path.clone(),
            Value::String(text_of(app, &path, accept).await),
        ));
    }
    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": [device], "metrics": ["temp", "fw", "door"],
                    "start": "2026-01-01T23:00:00Z", "end": "2026-01-02T01:00:00Z", "limit": 100}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    out.push(("query".into(), body["data"].clone()));
    out
}

fn assert_same(before: &[(String, Value)], after: &[(String, Value)]) {
    assert_eq!(before.len(), after.len());
    for ((path, a), (_, b)) in before.iter().zip(after) {
        assert!(
            a == b,
            "{path} differs after compression:\nbefore {a}\nafter  {b}"
        );
    }
}

/// The service with its own compression off (days close after a century): the test runs it.
async fn spawn() -> TestApp {
    spawn_query_with(|mut config| {
        config.compress_after = Duration::from_secs(100 * 365 * 24 * 3600);
        config
    })
    .await
}

async fn pool(app: &TestApp) -> deadpool_postgres::Pool {
    fieldline_common::db::connect(&app.context.config)
        .await
        .unwrap()
}

/// (rows in partitions, readings in blocks, blocks)
async fn where_stored(app: &TestApp) -> (i64, i64, i64) {
    let row = app
        .env
        .pg()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM telemetry.readings),
                    (SELECT COALESCE(sum(count), 0)::int8 FROM telemetry.blocks),
                    (SELECT count(*) FROM telemetry.blocks)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn day(offset_days: i64) -> chrono::NaiveDate {
    fieldline_common::time::from_us(T0 + offset_days * DAY).date_naive()
}

#[tokio::test]
async fn reads_answer_the_same_over_compressed_days_and_late_readings_join_them() {
    let app = spawn().await;
    app.create_device("d1").await;
    let readings = history();
    let total = readings.len() as i64;
    seed(&app, "d1", readings.clone()).await;
    let before = answers(&app, "d1").await;
    assert_eq!(where_stored(&app).await, (total, 0, 0));

    // Two days compressed: the third stays in rows, and reads span both without a seam.
    let pool = pool(&app).await;
    let done = query_api::compress::compress_before(&pool, day(2))
        .await
        .unwrap();
    assert_eq!(done.days, [day(0), day(1)]);
    let (rows, in_blocks, blocks) = where_stored(&app).await;
    assert_eq!(rows + in_blocks, total);
    assert!(rows > 0 && in_blocks > 0);
    assert_eq!(blocks, 2 * 5, "one block per series and day");
    assert_same(&before, &answers(&app, "d1").await);

    // Then all three: nothing left in rows; a second run finds nothing to do.
    query_api::compress::compress_before(&pool, day(3))
        .await
        .unwrap();
    assert_eq!(where_stored(&app).await.0, 0);
    let again = query_api::compress::compress_before(&pool, day(3))
        .await
        .unwrap();
    assert_eq!(again.readings, 0);
    assert_same(&before, &answers(&app, "d1").await);

    // A late reading of a compressed day, and a redelivery of a compressed one: the first is
    // stored once, the second not again.
    let late = number("temp", T0 + DAY + 61 * MINUTE + 17, 99.5);
    publish(
        &app,
        "default",
        "d1",
        vec![late.clone(), readings[0].clone()],
    )
    .await;
    publish(&app, "default", "d1", vec![late.clone()]).await;
    eventually("the late reading", Duration::from_secs(30), || async {
        (where_stored(&app).await.0 == 1).then_some(())
    })
    .await;
    let path = "/api/v1/devices/d1/readings?metric=temp&start=2026-01-02T01:00:00Z&end=2026-01-02T01:10:00Z";
    let (_, body) = app.get(path, app.admin_key()).await;
    let times: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts"].as_str().unwrap())
        .collect();
    assert_eq!(
        times,
        [
            "2026-01-02T01:00:00Z",
            "2026-01-02T01:01:00.000017Z",
            "2026-01-02T01:05:00Z"
        ]
    );
    let (_, metrics) = app.get("/api/v1/devices/d1/metrics", app.admin_key()).await;
    let count: i64 = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["count"].as_i64().unwrap())
        .sum();
    assert_eq!(count, total + 1);

    // The next run merges it into the day's block; the answers are those of rows and blocks.
    let with_late = answers(&app, "d1").await;
    query_api::compress::compress_before(&pool, day(3))
        .await
        .unwrap();
    assert_eq!(where_stored(&app).await, (0, total + 1, 15));
    assert_same(&with_late, &answers(&app, "d1").await);
}

#[tokio::test]
async fn compressed_history_takes_a_few_bytes_a_reading() {
    let app = spawn().await;
    app.create_device("d1").await;
    // A day of ten sensor-like metrics every 10 s: 86,400 readings.
    let client = app.env.pg().await;
    let series: Vec<_> = (0..10)
        .map(|m| ("default".to_owned(), "d1".to_owned(), format!("m{m}")))
        .collect();
    let mut levels = [2000i64; 10];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let readings: Vec<(usize, i64, f64)> = (0..8640)
        .flat_map(|i| (0..10).map(move |m| (i, m)))
        .map(|(i, m)| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            levels[m] += (state % 11) as i64 - 5;
            (m, T0 + i * 10_000_000, levels[m] as f64 / 100.0)
        })
        .collect();
    query_api::bulk::load_numbers(&client, &series, (T0, T0 + DAY), readings)
        .await
        .unwrap();
    let size = "SELECT pg_total_relation_size('telemetry.readings_20260101'),
                  pg_total_relation_size('telemetry.blocks')";
    let open: i64 = client.query_one(size, &[]).await.unwrap().get(0);
    query_api::compress::compress_before(&pool(&app).await, day(1))
        .await
        .unwrap();
    let row = client.query_one(size, &[]).await.unwrap();
    let (rows_after, blocks): (i64, i64) = (row.get(0), row.get(1));
    let per_reading = blocks as f64 / 86_400.0;
    eprintln!(
        "open {:.1} B/reading, compressed {per_reading:.2} B/reading (emptied partition {rows_after} B)",
        open as f64 / 86_400.0
    );
    assert!(per_reading <= 3.0, "{per_reading} bytes a reading");
    // The emptied partition gave its space back (an empty index keeps its first page).
    assert!(rows_after <= 16 * 1024, "{rows_after}");
}

#[tokio::test]
async fn retention_drops_compressed_days_too() {
    let app = spawn_query_with(|mut config| {
        config.partition_maintenance_interval = Duration::from_millis(200);
        config
    })
    .await;
    app.create_device("d1").await;
    seed(&app, "d1", history()).await;
    let pool = pool(&app).await;
    query_api::compress::compress_before(&pool, day(3))
        .await
        .unwrap();
    let client = app.env.pg().await;
    // Keep the project's readings so that the first day has expired and the second has not:
    // the cutoff falls 150 s before the second day, between the first day's last readings
    // (23:55) and the second's first (00:00), and moves on with the clock from there.
    let keep_s = (fieldline_common::time::now_us() - (T0 + DAY)) / 1_000_000 + 150;
    client
        .execute(
            "INSERT INTO telemetry.retention (project, readings) VALUES ('default', make_interval(secs => $1))",
            &[&(keep_s as f64)],
        )
        .await
        .unwrap();
    // The service's maintenance round applies it (every 200 ms here).
    let first_day: i64 = history().iter().filter(|r| r.ts_us < T0 + DAY).count() as i64;
    let (_, before) = app.get("/api/v1/devices/d1/metrics", app.admin_key()).await;
    let total_before: i64 = before["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["count"].as_i64().unwrap())
        .sum();
    eventually("first day expired", Duration::from_secs(60), || async {
        let (_, after) = app.get("/api/v1/devices/d1/metrics", app.admin_key()).await;
        let total: i64 = after["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["count"].as_i64().unwrap())
            .sum();
        (total == total_before - first_day).then_some(after)
    })
    .await;
    let (_, page) = app
        .get(
            "/api/v1/devices/d1/readings?limit=1&metric=temp",
            app.admin_key(),
        )
        .await;
    assert_eq!(page["data"][0]["ts"], "2026-01-02T00:00:00Z");
    let (rows, in_blocks, _) = where_stored(&app).await;
    assert_eq!(rows + in_blocks, total_before - first_day);
}

#[tokio::test]
async fn a_backfill_of_closed_days_goes_straight_into_blocks_and_once() {
    // The same readings into a platform that keeps them as rows, and into one where every
    // day before today is closed: there, batches with many readings a series go straight
    // into blocks, the rest into rows; both answer the same.
    let rows = spawn().await;
    let closed = spawn_query_with(|mut config| {
        config.compress_after = Duration::ZERO;
        config
    })
    .await;
    let readings = history();
    let total = readings.len() as i64;
    for app in [&rows, &closed] {
        app.create_device("d1").await;
        seed(app, "d1", readings.clone()).await;
    }
    let (in_rows, in_blocks, _) = where_stored(&closed).await;
    assert_eq!(in_rows + in_blocks, total);
    assert!(
        in_blocks > total / 2,
        "{in_rows} rows, {in_blocks} in blocks"
    );
    let expected = answers(&rows, "d1").await;
    assert_same(&expected, &answers(&closed, "d1").await);

    // Everything again (a redelivered import): nothing is stored twice, nothing counted twice.
    for chunk in readings.chunks(700) {
        publish(&closed, "default", "d1", chunk.to_vec()).await;
    }
    let probe = number("probe", T0 + 5, 1.0);
    publish(&closed, "default", "d1", vec![probe]).await;
    eventually("the import again", Duration::from_secs(60), || async {
        let (_, body) = closed
            .get("/api/v1/devices/d1/metrics", closed.admin_key())
            .await;
        let metrics = body["data"].as_array().cloned().unwrap_or_default();
        metrics.iter().any(|m| m["metric"] == "probe").then_some(())
    })
    .await;
    let (in_rows, in_blocks, _) = where_stored(&closed).await;
    assert_eq!(in_rows + in_blocks, total + 1);
    publish(&rows, "default", "d1", vec![number("probe", T0 + 5, 1.0)]).await;
    eventually("the probe", Duration::from_secs(30), || async {
        (where_stored(&rows).await.0 == total + 1).then_some(())
    })
    .await;
    let expected = answers(&rows, "d1").await;
    assert_same(&expected, &answers(&closed, "d1").await);

    // The compression run takes what went to rows; the answers stay.
    query_api::compress::compress_before(&pool(&closed).await, day(3))
        .await
        .unwrap();
    assert_eq!(where_stored(&closed).await.0, 0);
    assert_same(&expected, &answers(&closed, "d1").await);
}

#[tokio::test]
async fn compression_interrupted_anywhere_or_run_twice_at_once_moves_each_reading_once() {
    let app = spawn().await;
    app.create_device("d1").await;
    let readings = history();
    let total = readings.len() as i64;
    seed(&app, "d1", readings).await;
    let before = answers(&app, "d1").await;
    let pool = pool(&app).await;
    // Runs cut off after a few milliseconds, wherever they are (a transaction dropped
    // mid-way rolls back), then two whole runs at once on separate pools.
    for cut_ms in [1, 2, 5, 10, 20, 40] {
        let _ = tokio::time::timeout(
            Duration::from_millis(cut_ms),
            query_api::compress::compress_before(&pool, day(3)),
        )
        .await;
        let (rows, in_blocks, _) = where_stored(&app).await;
        assert_eq!(rows + in_blocks, total, "after a run cut at {cut_ms} ms");
    }
    let other = self::pool(&app).await;
    let (a, b) = tokio::join!(
        query_api::compress::compress_before(&pool, day(3)),
        query_api::compress::compress_before(&other, day(3)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (rows, in_blocks, blocks) = where_stored(&app).await;
    assert_eq!((rows, in_blocks, blocks), (0, total, 15));
    assert!(a.readings + b.readings <= total as u64);
    assert_same(&before, &answers(&app, "d1").await);
}
