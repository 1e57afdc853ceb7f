//! Live time: `/ingest` takes readings from `ingest_max_age` back to `ingest_max_future`
//! ahead, backfill older ones down to `readings_earliest`, and no request can make the
//! writer create partitions without limit (issue 16).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fieldline_common::time::format_rfc3339;
use fieldline_testkit::{TestApp, TestEnv, assert_error, eventually, live_time_defaults};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::spawn_all;

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

/// The readings of a device the history route answers, over the last `days` days.
async fn history(app: &TestApp, device: &str, days: u32) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/{device}/readings?start=-{days}d&limit=10000"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().clone()
}

/// The request of issue 16: 4,000 readings, one per day from 2300-01-01.
fn four_thousand_days() -> Value {
    let start = Utc.with_ymd_and_hms(2300, 1, 1, 12, 0, 0).unwrap();
    let messages: Vec<Value> = (0..4_000)
        .map(|day| {
            let ts: DateTime<Utc> = start + chrono::Duration::days(day);
            json!({"ts": format_rfc3339(&ts), "temp": day})
        })
        .collect();
    Value::Array(messages)
}

fn ago(duration: chrono::Duration) -> String {
    format_rfc3339(&(Utc::now() - duration))
}

#[tokio::test]
async fn the_four_thousand_day_request_is_refused_and_every_other_device_keeps_working() {
    let app = spawn_all(TestEnv::new().await, live_time_defaults).await;
    let attacker = app.create_device("attacker").await;
    let neighbour = app.create_device("neighbour").await;
    // The maintenance task's own partitions (yesterday to a week ahead) come at start.
    eventually("partitions made ahead", Duration::from_secs(10), || async {
        (partitions(&app).await >= 9).then_some(())
    })
    .await;
    let before = partitions(&app).await;

    let (status, body) = app
        .post("/api/v1/ingest", &attacker, &four_thousand_days())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "out_of_window");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("[0].ts: 2300-01-01T12:00:00Z is outside"),
        "{message}"
    );
    // Nothing of it reached the bus.
    assert!(app.telemetry_batches().await.is_empty());

    // Other devices go on being stored and read, and so does the refused one's history.
    let (status, body) = app
        .post(
            "/api/v1/ingest",
            &neighbour,
            &json!({"ts": ago(chrono::Duration::minutes(1)), "temp": 21.5}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    eventually(
        "the neighbour's reading",
        Duration::from_secs(15),
        || async { (history(&app, "neighbour", 1).await.len() == 1).then_some(()) },
    )
    .await;
    assert!(history(&app, "attacker", 30).await.is_empty());
    let (status, body) = app
        .get("/api/v1/devices/attacker/readings", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(partitions(&app).await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn a_reading_two_days_ahead_is_refused_and_one_a_minute_old_accepted() {
    let app = spawn_all(TestEnv::new().await, live_time_defaults).await;
    let token = app.create_device("d1").await;
    let ahead = format_rfc3339(&(Utc::now() + chrono::Duration::days(2)));
    // The good first message is not stored either: a request is taken whole or not at all.
    let (status, body) = app
        .post(
            "/api/v1/ingest",
            &token,
            &json!([{"ts": ago(chrono::Duration::minutes(1)), "a": 1}, {"ts": ahead, "a": 2}]),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "out_of_window");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("[1].ts: "), "{message}");
    // Dead clocks (1970) and weeks past the window are refused too; SenML names its record.
    for (content_type, body, field) in [
        ("application/json", json!({"ts": 1000, "a": 1}), "ts: "),
        (
            "application/json",
            json!({"ts": ago(chrono::Duration::days(31)), "a": 1}),
            "ts: ",
        ),
        (
            "application/senml+json",
            json!([{"n": "a", "v": 1, "bt": (Utc::now() + chrono::Duration::days(2)).timestamp()}]),
            "[0].t: ",
        ),
    ] {
        let (status, answer) = app
            .post_raw(
                "/api/v1/ingest",
                &token,
                content_type,
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "out_of_window");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    assert!(app.telemetry_batches().await.is_empty());

    let minute_ago = ago(chrono::Duration::minutes(1));
    let (status, body) = app
        .post("/api/v1/ingest", &token, &json!({"ts": minute_ago, "a": 3}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let stored = eventually(
        "the reading a minute old",
        Duration::from_secs(15),
        || async {
            let readings = history(&app, "d1", 1).await;
            (!readings.is_empty()).then_some(readings)
        },
    )
    .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["value"], 3.0);
    app.shutdown().await;
}

#[tokio::test]
async fn backfill_of_many_days_is_stored_whole_in_bounded_partitions() {
    let app = spawn_all(TestEnv::new().await, live_time_defaults).await;
    app.create_device("old").await;
    let (_, key) = app.create_key(&["write"]).await;
    eventually("partitions made ahead", Duration::from_secs(10), || async {
        (partitions(&app).await >= 9).then_some(())
    })
    .await;
    let before = partitions(&app).await;

    // 90 days of history, one reading a day, older than live ingest takes: backfill's.
    let days = 90;
    let body: Vec<Value> = (1..=days)
        .map(|day| json!({"ts": ago(chrono::Duration::days(day)), "temp": day}))
        .collect();
    let (status, answer) = app
        .post("/api/v1/devices/old/readings", &key, &Value::Array(body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["data"]["accepted"], days);
    let stored = eventually("every backfilled day", Duration::from_secs(30), || async {
        let readings = history(&app, "old", 91).await;
        (readings.len() == days as usize).then_some(readings)
    })
    .await;
    assert_eq!(stored.len(), days as usize);
    // One partition per day of history, and nothing else.
    let after = partitions(&app).await;
    assert!(after <= before + days, "{before} -> {after}");
    // The whole history reads back without a range too (narrowed to what the device holds).
    let (status, page) = app
        .get("/api/v1/devices/old/readings?limit=10000", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), days as usize);

    // Never the far future, nor before readings_earliest; nothing of such a body is stored.
    let ahead = format_rfc3339(&(Utc::now() + chrono::Duration::days(2)));
    for (body, field) in [
        (
            json!([{"ts": ago(chrono::Duration::days(1)), "a": 1}, {"ts": ahead, "a": 1}]),
            "[1].ts: ",
        ),
        (json!({"ts": "1999-12-31T23:59:59Z", "a": 1}), "ts: "),
    ] {
        let (status, answer) = app.post("/api/v1/devices/old/readings", &key, &body).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "out_of_window");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{message}");
    }
    let (status, answer) = app
        .post_raw(
            "/api/v1/devices/old/readings",
            &key,
            "text/csv",
            b"ts,a\n1000,1\n".to_vec(),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "out_of_window");
    assert_eq!(history(&app, "old", 91).await.len(), days as usize);
    app.shutdown().await;
}
