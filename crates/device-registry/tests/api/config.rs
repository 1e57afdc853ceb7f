use std::time::Duration;

use fieldline_common::bus::rpc;
use fieldline_proto::{
    Stream,
    v1::{ConfigRequest, ConfigResponse, DeviceCommand},
};
use fieldline_testkit::{assert_error, eventually};
use reqwest::StatusCode;
use serde_json::json;

use crate::{events, patch, put, spawn_registry};

#[tokio::test]
async fn every_change_is_a_version_an_event_and_a_push() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    let (status, body) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "pump-1", "config": {"interval_s": 60, "mode": "eco"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["data"]["config_version"], 1);

    let (status, body) = put(
        &app,
        "/api/v1/devices/pump-1/config",
        &admin,
        &json!({"interval_s": 10, "mode": "eco", "led": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["version"], 2);

    // A merge patch: null removes, others replace.
    let (status, body) = patch(
        &app,
        "/api/v1/devices/pump-1/config",
        &admin,
        &json!({"led": null, "mode": "boost"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["version"], 3);
    assert_eq!(
        body["data"]["config"],
        json!({"interval_s": 10, "mode": "boost"})
    );

    // The same document again is no new version, and announces nothing.
    let (status, body) = put(
        &app,
        "/api/v1/devices/pump-1/config",
        &admin,
        &json!({"interval_s": 10, "mode": "boost"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["version"], 3);

    let (status, body) = app.get("/api/v1/devices/pump-1/config", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["version"], 3);
    assert!(body["data"]["updated_at"].as_str().unwrap().ends_with('Z'));

    let updates = eventually(
        "three config.update events",
        Duration::from_secs(10),
        || async {
            let updates = events(&app, "config.update").await;
            (updates.len() >= 3).then_some(updates)
        },
    )
    .await;
    let versions: Vec<_> = updates
        .iter()
        .map(|(_, payload)| payload["version"].clone())
        .collect();
    assert_eq!(versions, vec![json!(1), json!(2), json!(3)]);
    assert_eq!(
        updates[2].1["config"],
        json!({"interval_s": 10, "mode": "boost"})
    );
    assert_eq!(updates[2].0.device_id, "pump-1");

    let commands_prefix = format!("{}.commands.", app.context.subjects.prefix());
    let pushes: Vec<DeviceCommand> = app
        .stream_messages::<DeviceCommand>(Stream::Commands, &commands_prefix)
        .await
        .into_iter()
        .map(|(_, push)| push)
        .filter(|push| push.kind == "config")
        .collect();
    assert_eq!(
        pushes.iter().map(|p| p.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // What the ingest edges ask on a device's behalf.
    let config: ConfigResponse = rpc(
        &app.context.nats,
        app.context.subjects.rpc_device_config(),
        &ConfigRequest {
            project: "default".into(),
            device_id: "pump-1".into(),
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(config.found);
    assert_eq!(config.version, 3);
    let document: serde_json::Value = serde_json::from_str(&config.config_json).unwrap();
    assert_eq!(document["mode"], "boost");
    let missing: ConfigResponse = rpc(
        &app.context.nats,
        app.context.subjects.rpc_device_config(),
        &ConfigRequest {
            project: "default".into(),
            device_id: "nope".into(),
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(!missing.found);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_configs_are_refused_and_change_nothing() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    app.create_device("d1").await;
    let (status, body) = put(&app, "/api/v1/devices/d1/config", &admin, &json!([1, 2])).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_body");
    let (status, body) = patch(&app, "/api/v1/devices/d1/config", &admin, &json!("x")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_body");
    let huge = json!({"blob": "x".repeat(70 * 1024)});
    let (status, body) = put(&app, "/api/v1/devices/d1/config", &admin, &huge).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = app
        .post_raw(
            "/api/v1/devices/d1/config",
            &admin,
            "application/json",
            "{}",
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, body) = put(&app, "/api/v1/devices/nope/config", &admin, &json!({})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");

    let (status, body) = app.get("/api/v1/devices/d1/config", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["version"], 0);
    assert_eq!(body["data"]["config"], json!({}));
    app.shutdown().await;
}

#[tokio::test]
async fn config_versions_list_newest_first_for_the_projects_devices_only() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    let (status, body) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "valve", "config": {"open": false}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = put(
        &app,
        "/api/v1/devices/valve/config",
        &admin,
        &json!({"open": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, read_key) = app.create_key(&["read"]).await;
    let (status, body) = app
        .get("/api/v1/devices/valve/config/versions", &read_key)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let versions = body["data"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{body}");
    assert_eq!(versions[0]["version"], 2);
    assert_eq!(versions[0]["config"], json!({"open": true}));
    assert_eq!(versions[1]["version"], 1);
    assert_eq!(versions[1]["config"], json!({"open": false}));
    assert!(versions[0]["changed_by"].is_string());

    let (status, body) = app
        .post("/api/v1/projects", &admin, &json!({"slug": "elsewhere"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other = body["data"]["admin_key"]["secret"].as_str().unwrap();
    let (status, body) = app
        .get("/api/v1/devices/valve/config/versions", other)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
}
