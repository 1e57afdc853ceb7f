use std::time::Duration;

use fieldline_common::bus::rpc;
use fieldline_proto::{
    Stream,
    v1::{
        CommandReport, CommandReportResponse, CommandsFetchRequest, CommandsFetchResponse,
        DeviceCommand,
    },
};
use fieldline_testkit::{TestApp, assert_error, eventually};
use reqwest::StatusCode;
use serde_json::json;

use crate::spawn_registry;

async fn fetch(app: &TestApp, device_id: &str) -> CommandsFetchResponse {
    rpc(
        &app.context.nats,
        app.context.subjects.rpc_commands_fetch(),
        &CommandsFetchRequest {
            project: "default".into(),
            device_id: device_id.into(),
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

async fn report(
    app: &TestApp,
    device_id: &str,
    command_id: &str,
    status: &str,
) -> CommandReportResponse {
    rpc(
        &app.context.nats,
        app.context.subjects.rpc_commands_report(),
        &CommandReport {
            project: "default".into(),
            device_id: device_id.into(),
            command_id: command_id.into(),
            status: status.into(),
            detail: "done in 3 s".into(),
            via: "http".into(),
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// A report the registry cannot store (Postgres refuses a NUL in text) is answered as
/// invalid, not left without an answer for the edge to time out on as if the registry were
/// down (as an ack sent over MQTT, which no HTTP edge checks, still can carry one).
#[tokio::test]
async fn a_report_that_cannot_be_stored_is_answered_invalid_at_once() {
    let app = spawn_registry().await;
    app.create_device("valve-1").await;
    let (status, body) = app
        .post(
            "/api/v1/devices/valve-1/commands",
            app.admin_key(),
            &json!({"name": "open"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let command_id = body["data"]["id"].as_str().unwrap().to_owned();
    for (command_id, detail) in [(command_id.as_str(), "stuck\0"), ("cmd_\0", "")] {
        let answer: CommandReportResponse = rpc(
            &app.context.nats,
            app.context.subjects.rpc_commands_report(),
            &CommandReport {
                project: "default".into(),
                device_id: "valve-1".into(),
                command_id: command_id.into(),
                status: "error".into(),
                detail: detail.into(),
                via: "mqtt".into(),
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(!answer.found, "{answer:?}");
        assert!(answer.invalid.contains("cannot be stored"), "{answer:?}");
    }
    let (_, body) = app
        .get("/api/v1/devices/valve-1/commands", app.admin_key())
        .await;
    assert_eq!(body["data"][0]["status"], "pending", "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_command_is_pushed_handed_over_once_and_acknowledged() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    app.create_device("valve-1").await;
    app.create_device("valve-2").await;
    let (status, body) = app
        .post(
            "/api/v1/devices/valve-1/commands",
            &admin,
            &json!({"name": "open", "params": {"percent": 40}, "ttl_s": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let command_id = body["data"]["id"].as_str().unwrap().to_owned();
    assert!(command_id.starts_with("cmd_"));
    assert_eq!(body["data"]["status"], "pending");

    // Pushed toward the device on the commands stream, by the outbox relay.
    let prefix = format!("{}.commands.", app.context.subjects.prefix());
    let push = eventually(
        "the command on the commands stream",
        Duration::from_secs(10),
        || async {
            app.stream_messages::<DeviceCommand>(Stream::Commands, &prefix)
                .await
                .into_iter()
                .map(|(_, push)| push)
                .find(|push| push.kind == "command")
        },
    )
    .await;
    assert_eq!(push.id, command_id);
    assert_eq!(push.name, "open");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&push.params_json).unwrap()["percent"],
        40
    );
    assert!(push.expires_at_us > fieldline_common::time::now_us());

    // Over HTTP a device gets it once; another device never sees it.
    assert!(fetch(&app, "valve-2").await.commands.is_empty());
    let fetched = fetch(&app, "valve-1").await.commands;
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].id, command_id);
    assert!(fetch(&app, "valve-1").await.commands.is_empty());
    let (_, body) = app
        .get(
            &format!("/api/v1/devices/valve-1/commands/{command_id}"),
            &admin,
        )
        .await;
    assert_eq!(body["data"]["status"], "delivered");

    assert!(!report(&app, "valve-2", &command_id, "ok").await.found);
    let acked = report(&app, "valve-1", &command_id, "ok").await;
    assert!(acked.found);
    assert_eq!(acked.status, "acked");
    // A retried ack keeps the first answer.
    assert_eq!(
        report(&app, "valve-1", &command_id, "error").await.status,
        "acked"
    );

    let (status, body) = app
        .get("/api/v1/devices/valve-1/commands?status=acked", &admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed = body["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["detail"], "done in 3 s");
    assert!(listed[0]["acked_at"].is_string());
    let (_, body) = app
        .get("/api/v1/devices/valve-1/commands?status=pending", &admin)
        .await;
    assert!(body["data"].as_array().unwrap().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_command_past_its_ttl_expires_and_cannot_be_acknowledged() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    app.create_device("d1").await;
    let (status, body) = app
        .post(
            "/api/v1/devices/d1/commands",
            &admin,
            &json!({"name": "reboot", "ttl_s": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let command_id = body["data"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/devices/d1/commands/{command_id}");
    eventually("the command to expire", Duration::from_secs(10), || async {
        let (_, body) = app.get(&path, &admin).await;
        (body["data"]["status"] == "expired").then_some(())
    })
    .await;
    assert!(fetch(&app, "d1").await.commands.is_empty());
    assert_eq!(
        report(&app, "d1", &command_id, "ok").await.status,
        "expired"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bad_commands_are_refused() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    app.create_device("d1").await;
    for (body, field) in [
        (json!({"name": "not a name"}), "name"),
        (json!({"name": "x", "ttl_s": 0}), "ttl_s"),
        (json!({"name": "x", "ttl_s": 10_000_000}), "ttl_s"),
        (json!({"name": "x", "params": [1]}), "params"),
        (json!({"name": "x", "extra": 1}), "extra"),
    ] {
        let (status, response) = app.post("/api/v1/devices/d1/commands", &admin, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {response}");
        let message = response["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{field} not named in {message}");
    }
    let (status, body) = app
        .post(
            "/api/v1/devices/nope/commands",
            &admin,
            &json!({"name": "x"}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    let (status, body) = app
        .get("/api/v1/devices/d1/commands?status=done", &admin)
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_parameter");
    let (status, body) = app
        .get("/api/v1/devices/d1/commands/cmd_nope", &admin)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "command_not_found");
    app.shutdown().await;
}
