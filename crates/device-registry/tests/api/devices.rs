use fieldline_testkit::assert_error;
use reqwest::StatusCode;
use serde_json::json;

use crate::spawn_registry;

#[tokio::test]
async fn create_get_and_conflict() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "esp32-1", "name": "Greenhouse", "type": "sensor", "group": "greenhouse",
                    "tags": ["north"], "metadata": {"fw": "1.2.0"}, "heartbeat_interval_s": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let device = &body["data"];
    assert!(device["token"].as_str().unwrap().starts_with("fld_"));
    assert_eq!(device["group"], "greenhouse");

    let (status, body) = app.get("/api/v1/devices/esp32-1", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["name"], "Greenhouse");
    assert_eq!(body["data"]["metadata"]["fw"], "1.2.0");
    assert!(
        body["data"].get("token").is_none(),
        "token shown twice: {body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "esp32-1"}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "device_exists");

    let (status, body) = app.get("/api/v1/devices/esp32-404", app.admin_key()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    app.shutdown().await;
}

#[tokio::test]
async fn listing_is_paged_and_filtered_by_type() {
    let app = spawn_registry().await;
    for index in 0..5 {
        app.create_device(&format!("s{index}")).await;
    }
    let (status, _) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "a1", "type": "actuator"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let mut seen = Vec::new();
    let mut path = "/api/v1/devices?type=sensor&limit=2".to_owned();
    loop {
        let (status, body) = app.get(&path, app.admin_key()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["page"]["limit"], 2);
        for device in body["data"].as_array().unwrap() {
            seen.push(device["id"].as_str().unwrap().to_owned());
        }
        match body["page"]["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/devices?type=sensor&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4"]);

    let (status, body) = app
        .get("/api/v1/devices?type=toaster", app.admin_key())
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_device_type",
    );
    let (status, body) = app.get("/api/v1/devices?limit=0", app.admin_key()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
    let (status, body) = app
        .get("/api/v1/devices?cursor=garbage", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_cursor");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_get_400_or_415_naming_the_problem() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post("/api/v1/devices", app.admin_key(), &json!({"id": "bad id"}))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("id:"),
        "{body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "x", "type": 5}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("type"),
        "{body}"
    );

    let (status, body) = app
        .post_raw(
            "/api/v1/devices",
            app.admin_key(),
            "application/json",
            "{\"id\": ",
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");

    let (status, body) = app
        .post_raw("/api/v1/devices", app.admin_key(), "text/plain", "id=x")
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let (status, body) = app.get("/api/v1/devices", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["data"].as_array().unwrap().len(),
        0,
        "a bad request stored something: {body}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_read_key_cannot_create_devices() {
    let app = spawn_registry().await;
    let (_, reader) = app.create_key(&["read"]).await;
    let (status, body) = app
        .post("/api/v1/devices", &reader, &json!({"id": "x"}))
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        app.get("/api/v1/devices/x", app.admin_key()).await.0,
        StatusCode::NOT_FOUND
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_wrong_method_and_a_nul_character_get_the_envelope() {
    let app = spawn_registry().await;
    let (status, body) = app
        .request(
            reqwest::Method::PUT,
            "/api/v1/keys",
            Some(app.admin_key()),
            Some(&json!({})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, body) = app.get("/api/v1/nothing-here", app.admin_key()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "route_not_found");
    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "x", "name": "a\u{0}b"}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_value");
    app.shutdown().await;
}
