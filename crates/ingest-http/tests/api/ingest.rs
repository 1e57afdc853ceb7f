use std::io::Write;

use fieldline_proto::v1::reading;
use fieldline_testkit::{TestEnv, assert_error, read};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::spawn_ingest;

async fn post_raw(
    app: &fieldline_testkit::TestApp,
    token: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    app.post_raw("/api/v1/ingest", token, content_type, body)
        .await
}

#[tokio::test]
async fn accepted_readings_are_in_jetstream_exactly_as_sent() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("esp32-1").await;
    let body = json!([
        {"ts": "2026-01-01T00:00:00Z", "temperature": 23.4, "door_open": true, "fw": "1.2.0"},
        {"ts": 1767225601000u64, "values": {"temperature": 23.5}}
    ]);
    let (status, response) = app.post("/api/v1/ingest", &token, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{response}");
    assert_eq!(response["data"]["accepted"], 4);

    let messages = app.telemetry_batches().await;
    assert_eq!(messages.len(), 1);
    let (subject, batch) = &messages[0];
    assert_eq!(
        subject,
        &app.context.subjects.telemetry("default", "esp32-1")
    );
    assert_eq!(batch.device_id, "esp32-1");
    assert_eq!(batch.project, "default");
    assert_eq!(batch.source, "http");
    let mut readings: Vec<_> = batch
        .readings
        .iter()
        .map(|r| (r.ts_us, r.metric.clone(), r.value.clone().unwrap()))
        .collect();
    readings.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    assert_eq!(
        readings,
        vec![
            (
                1_767_225_600_000_000,
                "door_open".into(),
                reading::Value::Boolean(true)
            ),
            (
                1_767_225_600_000_000,
                "fw".into(),
                reading::Value::Text("1.2.0".into())
            ),
            (
                1_767_225_600_000_000,
                "temperature".into(),
                reading::Value::Number(23.4)
            ),
            (
                1_767_225_601_000_000,
                "temperature".into(),
                reading::Value::Number(23.5)
            ),
        ]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_idempotency_key_is_published_once() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("dev-1").await;
    let send = |key: &'static str| {
        app.http
            .post(format!("{}/api/v1/ingest", app.base_url))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .json(&json!({"temp": 1}))
            .send()
    };
    let (status, first) = read(send("req-1").await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first["data"]["duplicate"], false);
    let (status, second) = read(send("req-1").await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["data"]["duplicate"], true);
    let (status, _) = read(send("req-2").await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let messages = app.telemetry_batches().await;
    assert_eq!(messages.len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_in_the_envelope_and_nothing_is_published() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("dev-1").await;

    let (status, body) = post_raw(&app, &token, "application/json", b"{\"temp\": ".to_vec()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");

    let (status, body) = app
        .post("/api/v1/ingest", &token, &json!({"temp": {"c": 1}}))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("temp:"),
        "{body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/ingest",
            &token,
            &json!([{"a": 1}, {"ts": "soon", "a": 2}]),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1].ts:"),
        "{body}"
    );

    let big = format!("{{\"note\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let (status, body) = post_raw(&app, &token, "application/json", big.into_bytes()).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    let many: Vec<Value> = (0..10_001).map(|i| json!({"ts": i + 1, "a": i})).collect();
    let (status, body) = app.post("/api/v1/ingest", &token, &json!(many)).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    let (status, body) = post_raw(&app, &token, "text/plain", b"temp=1".to_vec()).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn only_device_tokens_may_ingest() {
    let app = spawn_ingest(TestEnv::new().await).await;
    app.create_device("dev-1").await;
    let (status, body) = app
        .post("/api/v1/ingest", "fld_wrong", &json!({"a": 1}))
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = app
        .post("/api/v1/ingest", app.admin_key(), &json!({"a": 1}))
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn gzip_and_senml_bodies_are_accepted() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("dev-1").await;
    let mut encoder = flate2_free_gzip(br#"{"ts": 1000, "temp": 7}"#);
    let response = app
        .http
        .post(format!("{}/api/v1/ingest", app.base_url))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(std::mem::take(&mut encoder))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let senml =
        br#"[{"bn": "room.", "bt": 1700000000, "n": "temp", "v": 21.5}, {"n": "lit", "vb": true}]"#;
    let (status, body) = post_raw(&app, &token, "application/senml+json", senml.to_vec()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["accepted"], 2);

    let messages = app.telemetry_batches().await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].1.readings[0].metric, "temp");
    assert_eq!(messages[0].1.readings[0].ts_us, 1_000_000);
    assert_eq!(messages[1].1.readings[0].metric, "room.temp");
    app.shutdown().await;
}

#[tokio::test]
async fn heartbeats_are_published() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("dev-1").await;
    let response = app
        .http
        .post(format!("{}/api/v1/ingest/heartbeat", app.base_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let messages = app.heartbeats().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].0,
        app.context.subjects.heartbeat("default", "dev-1")
    );
    app.shutdown().await;
}

/// Gzip with the stored (uncompressed) deflate method: a valid gzip stream, built by hand so
/// the test needs no compression crate.
fn flate2_free_gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    out.push(1); // final stored block
    let len = data.len() as u16;
    out.write_all(&len.to_le_bytes()).unwrap();
    out.write_all(&(!len).to_le_bytes()).unwrap();
    out.write_all(data).unwrap();
    out.write_all(&crc32(data).to_le_bytes()).unwrap();
    out.write_all(&(data.len() as u32).to_le_bytes()).unwrap();
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
