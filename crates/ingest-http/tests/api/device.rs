use std::time::{Duration, Instant};

use fieldline_testkit::{TestApp, TestEnv, assert_error, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{metric, spawn_ingest};

async fn send_command(app: &TestApp, device: &str, body: Value) -> String {
    let (status, response) = app
        .post(
            &format!("/api/v1/devices/{device}/commands"),
            app.admin_key(),
            &body,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{response}");
    response["data"]["id"].as_str().unwrap().to_owned()
}

async fn command_status(app: &TestApp, device: &str, id: &str) -> String {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/{device}/commands/{id}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]["status"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_device_reads_its_config_version_0_then_the_latest() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    let (status, body) = app.get("/api/v1/ingest/config", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({"version": 0, "config": {}, "updated_at": null})
    );

    let (status, body) = app
        .request(
            Method::PUT,
            "/api/v1/devices/d1/config",
            Some(app.admin_key()),
            Some(&json!({"interval_s": 10})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.get("/api/v1/ingest/config", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["version"], 1);
    assert_eq!(body["data"]["config"], json!({"interval_s": 10}));
    assert!(body["data"]["updated_at"].as_str().unwrap().ends_with('Z'));

    let (status, body) = app.get("/api/v1/ingest/config", app.admin_key()).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    app.shutdown().await;
}

#[tokio::test]
async fn commands_are_fetched_once_and_acked() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    let other = app.create_device("d2").await;
    let id = send_command(
        &app,
        "d1",
        json!({"name": "reboot", "params": {"delay_s": 5}}),
    )
    .await;

    let (status, body) = app.get("/api/v1/ingest/commands", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let commands = body["data"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "{body}");
    assert_eq!(commands[0]["id"], id.as_str());
    assert_eq!(commands[0]["name"], "reboot");
    assert_eq!(commands[0]["params"], json!({"delay_s": 5}));
    assert!(commands[0]["expires_at"].as_str().unwrap().ends_with('Z'));
    // Handed over once: the registry marked it delivered.
    let (_, body) = app.get("/api/v1/ingest/commands?wait=0", &token).await;
    assert_eq!(body["data"], json!([]));
    assert_eq!(command_status(&app, "d1", &id).await, "delivered");

    // Another device cannot ack it, and an unknown id is 404.
    let path = format!("/api/v1/ingest/commands/{id}/ack");
    let (status, body) = app.post(&path, &other, &json!({"status": "ok"})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "command_not_found");
    let (status, body) = app
        .post(
            "/api/v1/ingest/commands/cmd_nope/ack",
            &token,
            &json!({"status": "ok"}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "command_not_found");

    let (status, body) = app
        .post(
            &path,
            &token,
            &json!({"status": "error", "detail": "motor stuck"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!({"id": id, "status": "failed"}));
    assert_eq!(command_status(&app, "d1", &id).await, "failed");
    app.shutdown().await;
}

/// A NUL in an ack's detail or in the id in its path is a 400 at once; it used to reach the
/// registry, which Postgres refused, and the edge answered 503 after the RPC timeout.
#[tokio::test]
async fn a_nul_in_an_ack_is_refused_at_once() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    let id = send_command(&app, "d1", json!({"name": "reboot"})).await;
    let path = format!("/api/v1/ingest/commands/{id}/ack");
    let started = Instant::now();
    let (status, body) = app
        .post(
            &path,
            &token,
            &json!({"status": "ok", "detail": "done\u{0}"}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_character");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("detail:"),
        "{body}"
    );
    for bad_path in [
        format!("/api/v1/ingest/commands/{id}%00/ack"),
        "/api/v1/ingest/commands/%00/ack".to_owned(),
        format!("/api/v1/ingest/commands/{id}/ack?x=%00"),
    ] {
        let (status, body) = app.post(&bad_path, &token, &json!({"status": "ok"})).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_character");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Nothing was stored: the command still takes a good ack.
    let (status, body) = app
        .post(&path, &token, &json!({"status": "ok", "detail": "done"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["status"], "acked");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    for wait in ["61", "-1", "x"] {
        let (status, body) = app
            .get(&format!("/api/v1/ingest/commands?wait={wait}"), &token)
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("wait:"),
            "{body}"
        );
    }
    let path = "/api/v1/ingest/commands/cmd_1/ack";
    let cases = [
        (json!({"status": "done"}), "status"),
        (
            json!({"status": "ok", "detail": "x".repeat(1025)}),
            "detail",
        ),
        (json!({"status": "ok", "extra": 1}), "extra"),
    ];
    for (body, field) in cases {
        let (status, response) = app.post(path, &token, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{response}");
        assert!(
            response["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{response}"
        );
    }
    let (status, body) = app.post_raw(path, &token, "text/plain", "ok").await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_command_is_sent() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    let started = Instant::now();
    let poll = {
        let request = app
            .http
            .get(format!("{}/api/v1/ingest/commands?wait=30", app.base_url))
            .bearer_auth(&token)
            .send();
        tokio::spawn(async move { fieldline_testkit::read(request.await.unwrap()).await })
    };
    eventually("the poll to wait", Duration::from_secs(10), || async {
        (metric(&app, "fieldline_ingest_long_polls_waiting").await >= 1.0).then_some(())
    })
    .await;
    let id = send_command(&app, "d1", json!({"name": "blink"})).await;
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["id"], id.as_str(), "{body}");
    assert_eq!(body["data"][0]["params"], json!({}));
    assert!(started.elapsed() < Duration::from_secs(20));

    // With nothing to hand over, the poll ends empty at its deadline.
    let started = Instant::now();
    let (status, body) = app.get("/api/v1/ingest/commands?wait=1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!([]));
    assert!(started.elapsed() >= Duration::from_secs(1));
    app.shutdown().await;
}

/// A long-poll waits in `tokio::spawn`ed reads, so it holds the place it took while the test
/// goes on.
fn start_long_poll(
    app: &TestApp,
    token: &str,
    wait_s: u64,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let request = app
        .http
        .get(format!(
            "{}/api/v1/ingest/commands?wait={wait_s}",
            app.base_url
        ))
        .bearer_auth(token)
        .send();
    tokio::spawn(async move { fieldline_testkit::read(request.await.unwrap()).await })
}

#[tokio::test]
async fn past_the_long_poll_cap_a_long_poll_is_503_at_once_until_a_place_frees() {
    let app = crate::spawn_ingest_with(TestEnv::new().await, |config| fieldline_common::Config {
        long_poll_max: 2,
        ..config
    })
    .await;
    let first = app.create_device("d1").await;
    let second = app.create_device("d2").await;
    let polls = [
        start_long_poll(&app, &first, 30),
        start_long_poll(&app, &second, 30),
    ];
    eventually("two polls to wait", Duration::from_secs(10), || async {
        (metric(&app, "fieldline_ingest_long_polls_waiting").await >= 2.0).then_some(())
    })
    .await;

    let started = Instant::now();
    let response = app
        .http
        .get(format!("{}/api/v1/ingest/commands?wait=30", app.base_url))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = fieldline_testkit::read(response).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_long_polls",
    );
    // At once, not after the 30 s it asked to wait (10 s leaves room for a loaded runner).
    assert!(started.elapsed() < Duration::from_secs(10), "not at once");
    assert_eq!(retry_after.unwrap().to_str().unwrap(), "5");
    assert_eq!(
        metric(&app, "fieldline_ingest_long_polls_refused_total").await,
        1.0
    );
    // Asking without waiting takes no place.
    let (status, _) = app.get("/api/v1/ingest/commands?wait=0", &first).await;
    assert_eq!(status, StatusCode::OK);

    // One poll ends (a command for its device); its place takes a new long-poll.
    let [first_poll, second_poll] = polls;
    let id = send_command(&app, "d1", json!({"name": "blink"})).await;
    let (status, body) = first_poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["id"], id.as_str(), "{body}");
    let started = Instant::now();
    let (status, body) = app.get("/api/v1/ingest/commands?wait=1", &first).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!([]));
    assert!(started.elapsed() >= Duration::from_secs(1), "did not wait");
    second_poll.abort();
    app.shutdown().await;
}

#[tokio::test]
async fn acking_an_expired_command_is_409() {
    let app = spawn_ingest(TestEnv::new().await).await;
    let token = app.create_device("d1").await;
    let id = send_command(&app, "d1", json!({"name": "blink", "ttl_s": 1})).await;
    eventually("the command to expire", Duration::from_secs(10), || async {
        (command_status(&app, "d1", &id).await == "expired").then_some(())
    })
    .await;
    let (status, body) = app
        .post(
            &format!("/api/v1/ingest/commands/{id}/ack"),
            &token,
            &json!({"status": "ok"}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "command_expired");
    app.shutdown().await;
}
