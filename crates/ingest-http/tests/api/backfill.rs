use std::time::Duration;

use fieldline_proto::v1::reading;
use fieldline_testkit::{TestApp, TestEnv, assert_error, eventually, read};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::spawn_all;

async fn post_csv(app: &TestApp, device: &str, key: &str, csv: &str) -> (StatusCode, Value) {
    app.post_raw(
        &format!("/api/v1/devices/{device}/readings"),
        key,
        "text/csv; charset=utf-8",
        csv.to_owned(),
    )
    .await
}

/// A CSV backfill of device `d1` under an `Idempotency-Key`.
async fn post_csv_once(
    app: &TestApp,
    key: &str,
    idempotency: &str,
    csv: &str,
) -> (StatusCode, Value) {
    app.post_with_headers(
        "/api/v1/devices/d1/readings",
        key,
        &[
            ("content-type", "text/csv"),
            ("idempotency-key", idempotency),
        ],
        csv.to_owned(),
    )
    .await
}

/// Every reading in the telemetry stream as (metric, ts_us, value), with each batch's source.
async fn published(app: &TestApp) -> (Vec<(String, i64, reading::Value)>, Vec<String>) {
    let batches = app.telemetry_batches().await;
    let sources = batches.iter().map(|(_, b)| b.source.clone()).collect();
    let mut readings: Vec<_> = batches
        .iter()
        .flat_map(|(_, batch)| batch.readings.iter())
        .map(|r| (r.metric.clone(), r.ts_us, r.value.clone().unwrap()))
        .collect();
    readings.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    (readings, sources)
}

#[tokio::test]
async fn json_and_csv_backfills_are_published_in_batches_with_source_backfill() {
    let app = spawn_all(TestEnv::new().await, |config| fieldline_common::Config {
        ingest_max_readings: 2,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;

    let (status, body) = app
        .post(
            "/api/v1/devices/d1/readings",
            &key,
            &json!([
                {"ts": "2020-01-01T00:00:00Z", "temp": 1.5, "door": true},
                {"ts": 1577836801000u64, "values": {"fw": "1.0"}}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["accepted"], 3);

    let (status, body) = post_csv(
        &app,
        "d1",
        &key,
        "ts,metric,value\n2020-01-01T00:00:02Z,temp,2\n1577836803000,temp,\n",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["accepted"], 1);

    let (status, body) = post_csv(
        &app,
        "d1",
        &key,
        "ts,temp,hum\n1577836804000,4,40\n1577836805000,,41\n",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["accepted"], 3);

    let (readings, sources) = published(&app).await;
    // 3 readings in batches of at most 2, then 1, then 3: five batches.
    assert_eq!(sources, vec!["backfill"; 5]);
    let s = 1_577_836_800_000_000i64;
    assert_eq!(
        readings,
        vec![
            ("door".into(), s, reading::Value::Boolean(true)),
            ("temp".into(), s, reading::Value::Number(1.5)),
            (
                "fw".into(),
                s + 1_000_000,
                reading::Value::Text("1.0".into())
            ),
            ("temp".into(), s + 2_000_000, reading::Value::Number(2.0)),
            ("hum".into(), s + 4_000_000, reading::Value::Number(40.0)),
            ("temp".into(), s + 4_000_000, reading::Value::Number(4.0)),
            ("hum".into(), s + 5_000_000, reading::Value::Number(41.0)),
        ]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_publishes_once() {
    let app = spawn_all(TestEnv::new().await, |config| fieldline_common::Config {
        ingest_max_readings: 1,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    for _ in 0..2 {
        let (status, body) = post_csv_once(&app, &key, "import-1", "ts,a,b\n1000,1,2\n").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    assert_eq!(app.telemetry_batches().await.len(), 2);
    app.shutdown().await;
}

/// A backfill's batches go out several at a time, and still land on the bus in time order,
/// each once: more batches than are published at once, then the same body again under the
/// same key (every batch a duplicate).
#[tokio::test]
async fn batches_published_together_land_in_time_order() {
    let app = spawn_all(TestEnv::new().await, |config| fieldline_common::Config {
        ingest_max_readings: 3,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    // 60 rows in reverse time order: the route sorts them, then cuts 20 batches of 3.
    let mut body = String::from("ts,temp\n");
    for row in (0..60).rev() {
        body.push_str(&format!("{},{row}\n", 1_577_836_800_000u64 + row * 1000));
    }
    for _ in 0..2 {
        let (status, body) = post_csv_once(&app, &key, "ordered-1", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["data"]["accepted"], 60);
    }
    let batches = app.telemetry_batches().await;
    assert_eq!(batches.len(), 20);
    let times: Vec<i64> = batches
        .iter()
        .flat_map(|(_, batch)| batch.readings.iter().map(|reading| reading.ts_us))
        .collect();
    let expected: Vec<i64> = (0..60)
        .map(|row| (1_577_836_800_000 + row * 1000) * 1000)
        .collect();
    assert_eq!(times, expected);
    app.shutdown().await;
}

/// In one process, POST goes to ingest-http and GET to query-api on the same path: the
/// backfilled past readings come back from history.
#[tokio::test]
async fn backfilled_readings_are_returned_by_query_api() {
    let app = spawn_all(TestEnv::new().await, |config| config).await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    let (status, body) = post_csv(
        &app,
        "d1",
        &key,
        "ts,temp\n2021-06-01T00:00:00Z,20.5\n2021-06-01T00:01:00Z,21\n",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let rows = eventually("history", Duration::from_secs(15), || async {
        let (status, body) = app
            .get(
                "/api/v1/devices/d1/readings?metric=temp&start=2021-01-01T00:00:00Z&end=2022-01-01T00:00:00Z",
                &key,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let rows = body["data"].as_array().cloned().unwrap_or_default();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let values: Vec<_> = rows.iter().map(|row| row["value"].clone()).collect();
    assert!(
        values.contains(&json!(20.5)) && values.contains(&json!(21.0)),
        "{rows:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bad_backfills_are_refused_and_nothing_is_published() {
    let app = spawn_all(TestEnv::new().await, |config| fieldline_common::Config {
        backfill_max_body_bytes: 4096,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    let path = "/api/v1/devices/d1/readings";

    let json_cases = [
        (json!({"temp": 1}), "invalid_field", "ts:"),
        (
            json!([{"ts": 1, "a": 1}, {"a": 2}]),
            "invalid_field",
            "[1].ts:",
        ),
        (json!([{"ts": 1, "a": {"x": 1}}]), "invalid_field", "[0].a:"),
        (json!({"ts": "yesterday", "a": 1}), "invalid_field", "ts:"),
    ];
    for (body, reason, prefix) in json_cases {
        let (status, response) = app.post(path, &key, &body).await;
        assert_error(status, &response, StatusCode::BAD_REQUEST, reason);
        let message = response["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(prefix), "{body}: {message}");
    }
    let (status, body) = app
        .post_raw(path, &key, "application/json", "{\"ts\": 1, ")
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");

    let csv_cases = [
        ("ts,temp\n1000,1\nlater,2\n", "line 3, column 1 (ts):"),
        ("ts,temp\n1000,1,9\n", "line 2:"),
        ("ts,bad name\n1000,1\n", "line 1, column 2 (bad name):"),
        (
            "ts,metric,value\n1000,temp,1\n1000,,2\n",
            "line 3, column 2 (metric):",
        ),
        ("when,temp\n1000,1\n", "line 1:"),
        ("ts,temp\n", "body:"),
    ];
    for (csv, prefix) in csv_cases {
        let (status, body) = post_csv(&app, "d1", &key, csv).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_csv");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(prefix), "{csv:?}: {message}");
    }

    let big = format!("ts,note\n1000,{}\n", "x".repeat(5000));
    let (status, body) = post_csv(&app, "d1", &key, &big).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = app.post_raw(path, &key, "text/plain", "ts,a\n1,2\n").await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    // A read key may not write; another project's device (or none) is 404.
    let (_, read_key) = app.create_key(&["read"]).await;
    let (status, body) = post_csv(&app, "d1", &read_key, "ts,a\n1000,1\n").await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other", "name": "Other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other_admin = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = app
        .post("/api/v1/devices", &other_admin, &json!({"id": "theirs"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = post_csv(&app, "theirs", &key, "ts,a\n1000,1\n").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    let (status, body) = post_csv(&app, "ghost", &key, "ts,a\n1000,1\n").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    // A device token is not an API key.
    let token = app.create_device("d2").await;
    let (status, body) = post_csv(&app, "d2", &token, "ts,a\n1000,1\n").await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}

/// A backfill body of `messages` messages of ten metrics each, a second apart from 2020 on,
/// the last without its `ts`: valid up to its very end, so that it is parsed whole and then
/// refused (nothing published; the request lasts as long as the parse).
fn large_backfill_refused_at_the_end(messages: usize) -> String {
    let mut body = String::with_capacity(messages * 230 + 2);
    body.push('[');
    for index in 0..messages {
        if index > 0 {
            body.push(',');
        }
        let ts_ms = 1_577_836_800_000u64 + index as u64 * 1000;
        if index + 1 < messages {
            body.push_str(&format!("{{\"ts\":{ts_ms},"));
        } else {
            body.push('{');
        }
        for metric in 0..10 {
            if metric > 0 {
                body.push(',');
            }
            body.push_str(&format!("\"metric_{metric}\":{index}.{metric}5"));
        }
        body.push('}');
    }
    body.push(']');
    body
}

/// The parse of a large backfill runs off the HTTP worker: while it runs, the same (single)
/// worker answers other requests at once. Parsed on the worker, a health check waited for
/// the whole parse, which is most of this request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backfill_leaves_the_worker_free_while_it_parses() {
    let app = spawn_all(TestEnv::new().await, |config| config).await;
    assert_eq!(app.context.config.http_workers, 1);
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    let messages = 72_000;
    let body = large_backfill_refused_at_the_end(messages);
    assert!(
        body.len() > 15 << 20 && body.len() <= 16 << 20,
        "{}",
        body.len()
    );

    let started = std::time::Instant::now();
    let backfill = {
        let request = app
            .http
            .post(format!("{}/api/v1/devices/d1/readings", app.base_url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send();
        tokio::spawn(async move { read(request.await.unwrap()).await })
    };
    let mut slowest = Duration::ZERO;
    while !backfill.is_finished() {
        let asked = std::time::Instant::now();
        let response = app
            .http
            .get(format!("{}/health/live", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let (status, body) = backfill.await.unwrap();
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    let message = body["error"]["message"].as_str().unwrap();
    let last = format!("[{}].ts: required", messages - 1);
    assert!(message.starts_with(&last), "{message}");
    // Only meaningful when the parse itself takes a while (it does in a debug build).
    assert!(
        took > Duration::from_millis(250),
        "the backfill took only {took:?}"
    );
    // On the worker, one health check lasted about the whole request; off it, a health
    // check lasts what the machine's load makes it, far less.
    assert!(
        slowest < took / 3,
        "a health check took {slowest:?} during a backfill of {took:?}"
    );
    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}

/// What a backfill costs in memory is its parse, every reading of the body at once: one
/// process parses at most `backfill_concurrency` at a time, and one more than that waits at
/// most `backfill_wait`, then gets 503 `too_many_backfills` with `Retry-After`. The place is
/// given back when a backfill ends.
#[tokio::test]
async fn backfills_past_the_concurrency_wait_then_get_503() {
    let app = crate::spawn_ingest_with(TestEnv::new().await, |config| fieldline_common::Config {
        backfill_concurrency: 1,
        backfill_wait: Duration::ZERO,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let (_, key) = app.create_key(&["write"]).await;
    // About 2 MB of CSV (200,000 readings): parsing and publishing it takes far longer than
    // sending the others beside it.
    let mut csv = String::from("ts,a,b,c,d,e,f,g,h,i,j\n");
    let start_ms = 1_622_505_600_000i64; // 2021-06-01
    for row in 0..20_000 {
        csv.push_str(&format!(
            "{},1.5,2.5,3.5,4.5,5.5,6.5,7.5,8.5,9.5,{row}\n",
            start_ms + row * 10_000
        ));
    }
    let send = |n: usize| {
        let app = &app;
        let key = &key;
        let csv = csv.clone();
        async move {
            let response = app
                .http
                .post(format!("{}/api/v1/devices/d1/readings", app.base_url))
                .bearer_auth(key)
                .header("content-type", "text/csv")
                .header("idempotency-key", format!("import-{n}"))
                .body(csv)
                .send()
                .await
                .unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().to_owned());
            let (status, body) = read(response).await;
            (status, body, retry_after)
        }
    };
    // Three at once, a few rounds if a round happens not to overlap.
    let mut refused = 0;
    for round in 0..5 {
        let answers = futures::future::join_all((0..3).map(|n| send(round * 3 + n))).await;
        for (status, body, retry_after) in answers {
            match status {
                StatusCode::ACCEPTED => assert_eq!(body["data"]["accepted"], 200_000),
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_error(status, &body, status, "too_many_backfills");
                    assert_eq!(retry_after.as_deref(), Some("1"));
                    refused += 1;
                }
                other => panic!("{other}: {body}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no backfill was refused beside another");
    assert!(
        crate::metric(&app, "fieldline_ingest_backfills_refused_total").await >= refused as f64
    );
    // The place was given back: the next one alone is taken.
    let (status, body, _) = send(99).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.shutdown().await;
}
