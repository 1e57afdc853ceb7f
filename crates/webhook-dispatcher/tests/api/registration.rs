use std::time::Duration;

use fieldline_testkit::{TestApp, TestEnv, assert_error, receiver::Receiver};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{ingest, register, spawn, wait_received};

#[tokio::test]
async fn crud_filters_and_aliases() {
    let app = spawn().await;
    let key = app.admin_key();
    let (status, device) = app
        .post(
            "/api/v1/devices",
            key,
            &json!({"id": "gw-1", "group": "north"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{device}");
    let (a, _) = register(
        &app,
        key,
        json!({"name": "all", "url": "http://127.0.0.1:9/a", "metadata": {"team": "ops"}}),
    )
    .await;
    let (b, _) = register(
        &app,
        key,
        json!({"url": "http://127.0.0.1:9/b", "events": ["device.alert"], "group": "north"}),
    )
    .await;
    let (status, created) = app.post("/api/v1/devices/gw-1/webhooks", key, &json!([{"url": "http://127.0.0.1:9/c"}, {"url": "http://127.0.0.1:9/d", "enabled": false}])).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["data"][0]["device_ids"], json!(["gw-1"]));

    let count = |body: &serde_json::Value| body["data"].as_array().unwrap().len();
    let (_, all) = app.get("/api/v1/webhooks", key).await;
    assert_eq!(count(&all), 4);
    assert!(
        all["data"][0].get("secret").is_none(),
        "a listing showed a secret"
    );
    assert_eq!(
        count(&app.get("/api/v1/webhooks?event=device.alert", key).await.1),
        4
    );
    assert_eq!(
        count(&app.get("/api/v1/webhooks?group=north", key).await.1),
        1
    );
    assert_eq!(
        count(&app.get("/api/v1/webhooks?device_id=gw-1", key).await.1),
        2
    );
    assert_eq!(
        count(&app.get("/api/v1/webhooks?enabled=false", key).await.1),
        1
    );
    assert_eq!(
        count(&app.get("/api/v1/devices/gw-1/webhooks", key).await.1),
        2
    );
    assert_eq!(
        count(&app.get("/api/v1/groups/north/webhooks", key).await.1),
        1
    );
    let (_, page) = app.get("/api/v1/webhooks?limit=3", key).await;
    assert_eq!(count(&page), 3);
    let cursor = page["page"]["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        count(
            &app.get(&format!("/api/v1/webhooks?limit=3&cursor={cursor}"), key)
                .await
                .1
        ),
        1
    );

    let (status, patched) = app
        .request(
            Method::PATCH,
            &format!("/api/v1/webhooks/{a}"),
            Some(key),
            Some(&json!({"name": "renamed", "metadata": {"team": null, "tier": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["data"]["name"], "renamed");
    assert_eq!(patched["data"]["metadata"], json!({"tier": 1}));
    assert_eq!(patched["data"]["url"], "http://127.0.0.1:9/a");
    let (status, replaced) = app
        .request(
            Method::PUT,
            &format!("/api/v1/webhooks/{b}"),
            Some(key),
            Some(&json!({"url": "http://127.0.0.1:9/b2"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(
        replaced["data"]["events"].as_array().unwrap().len(),
        4,
        "PUT replaces every field"
    );
    assert_eq!(replaced["data"]["group"], serde_json::Value::Null);

    let (status, deleted) = app
        .request(
            Method::DELETE,
            "/api/v1/webhooks",
            Some(key),
            Some(&json!({"webhook_ids": [a, "wh_nope"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["data"]["deleted"], json!([a]));
    assert_eq!(deleted["data"]["not_found"], json!(["wh_nope"]));
    assert_eq!(
        app.delete(&format!("/api/v1/webhooks/{b}"), key).await.0,
        StatusCode::NO_CONTENT
    );
    let (status, body) = app.get(&format!("/api/v1/webhooks/{b}"), key).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "webhook_not_found");

    // EdgeSense aliases.
    let (status, registered) = app.post("/api/webhooks/register", key, &json!({"url": "http://127.0.0.1:9/e", "events": ["device.data"], "secret": "edge-sense-secret-123"})).await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["status"], "registered");
    let edge_id = registered["webhookId"].as_str().unwrap().to_owned();
    let (_, listed) = app.get("/api/webhooks", key).await;
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["webhookId"] == edge_id.as_str())
    );
    let (status, _) = app.delete(&format!("/api/webhooks/{edge_id}"), key).await;
    assert_eq!(status, StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_registrations_are_refused_with_the_field_named() {
    let app = spawn().await;
    let key = app.admin_key();
    for (body, status, reason, field) in [
        (
            json!({"url": "ftp://example.com/x"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "url:",
        ),
        (
            json!({"url": "not a url"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "url:",
        ),
        (
            json!({"url": "http://127.0.0.1:9/x", "events": ["device.nope"]}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "events[0]:",
        ),
        (
            json!({"url": "http://127.0.0.1:9/x", "secret": "short"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "secret:",
        ),
        (
            json!({"url": "http://127.0.0.1:9/x", "headers": {"webhook-signature": "x"}}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "headers.webhook-signature:",
        ),
        (
            json!({"url": 5}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "url:",
        ),
    ] {
        let (got, answer) = app.post("/api/v1/webhooks", key, &body).await;
        assert_error(got, &answer, status, reason);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{body}: {answer}"
        );
    }
    let (status, answer) = app
        .post(
            "/api/v1/devices/ghost/webhooks",
            key,
            &json!([{"url": "http://127.0.0.1:9/x"}]),
        )
        .await;
    assert_error(status, &answer, StatusCode::NOT_FOUND, "device_not_found");
    let (status, answer) = app
        .get("/api/v1/webhooks/wh_x/deliveries?status=lost", key)
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_query");
    let (_, body) = app.get("/api/v1/webhooks", key).await;
    assert!(
        body["data"].as_array().unwrap().is_empty(),
        "a refused webhook was stored"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let app = TestApp::spawn(TestEnv::new().await, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            webhook_dispatcher::start(&context).await?,
        ])
    })
    .await;
    assert!(!app.context.config.webhook_allow_private);
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
    ] {
        let (status, body) = app
            .post("/api/v1/webhooks", app.admin_key(), &json!({"url": url}))
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "url_not_allowed",
        );
    }
    let (status, body) = app
        .post(
            "/api/v1/webhooks",
            app.admin_key(),
            &json!({"url": "https://93.184.216.34/hook"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn scopes_and_project_isolation() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let (_, reader) = app.create_key(&["read"]).await;
    let (status, body) = app
        .post(
            "/api/v1/webhooks",
            &reader,
            &json!({"url": receiver.url("/x"), "events": ["device.data"]}),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    let (status, project) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{project}");
    let other_admin = project["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mine, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/default"), "events": ["device.data"]}),
    )
    .await;
    register(
        &app,
        &other_admin,
        json!({"url": receiver.url("/other"), "events": ["device.data"]}),
    )
    .await;
    for (method, path) in [
        (Method::GET, format!("/api/v1/webhooks/{mine}")),
        (Method::GET, format!("/api/v1/webhooks/{mine}/deliveries")),
        (Method::GET, format!("/api/v1/webhooks/{mine}/secret")),
        (Method::POST, format!("/api/v1/webhooks/{mine}/enable")),
        (Method::POST, format!("/api/v1/webhooks/{mine}/test")),
        (Method::DELETE, format!("/api/v1/webhooks/{mine}")),
    ] {
        let (status, body) = app
            .request(method, &path, Some(&other_admin), Some(&json!({})))
            .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "webhook_not_found");
    }
    let (_, listed) = app.get("/api/v1/webhooks", &other_admin).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);

    // Each project's webhook sees only its own devices' events.
    let (status, device) = app
        .post("/api/v1/devices", &other_admin, &json!({"id": "theirs"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let their_token = device["data"]["token"].as_str().unwrap().to_owned();
    let my_token = app.create_device("mine").await;
    ingest(&app, &their_token, json!({"a": 1})).await;
    ingest(&app, &my_token, json!({"b": 2})).await;
    let other = wait_received(&receiver, "/other", 1, Duration::from_secs(10)).await;
    let default = wait_received(&receiver, "/default", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received("/other").len(), 1);
    assert_eq!(receiver.received("/default").len(), 1);
    assert_eq!(other[0].json()["device_id"], "theirs");
    assert_eq!(default[0].json()["device_id"], "mine");
    app.shutdown().await;
}

#[tokio::test]
async fn event_device_and_group_filters_hold() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let key = app.admin_key();
    let (status, d1) = app
        .post("/api/v1/devices", key, &json!({"id": "d1", "group": "g1"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let d1 = d1["data"]["token"].as_str().unwrap().to_owned();
    let d2 = app.create_device("d2").await;
    register(
        &app,
        key,
        json!({"url": receiver.url("/all"), "events": ["device.data"]}),
    )
    .await;
    register(
        &app,
        key,
        json!({"url": receiver.url("/alerts"), "events": ["device.alert"]}),
    )
    .await;
    register(
        &app,
        key,
        json!({"url": receiver.url("/d2"), "events": ["device.data"], "device_ids": ["d2"]}),
    )
    .await;
    register(
        &app,
        key,
        json!({"url": receiver.url("/g1"), "events": ["device.data"], "group": "g1"}),
    )
    .await;
    ingest(&app, &d1, json!({"a": 1})).await;
    ingest(&app, &d2, json!({"a": 2})).await;
    wait_received(&receiver, "/all", 2, Duration::from_secs(10)).await;
    wait_received(&receiver, "/d2", 1, Duration::from_secs(10)).await;
    wait_received(&receiver, "/g1", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.received("/alerts").is_empty());
    let devices = |path: &str| {
        receiver
            .received(path)
            .iter()
            .map(|r| r.json()["device_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(devices("/d2"), ["d2"]);
    assert_eq!(devices("/g1"), ["d1"]);
    app.shutdown().await;
}

/// A webhook's name with a control character, or a blank one, is a 400 naming the field.
#[tokio::test]
async fn control_characters_and_blank_names_are_refused() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    for name in ["a\r\nb", "\u{1b}]0;title\u{7}", "  ", "", "x\u{0}"] {
        let (status, body) = app
            .post(
                "/api/v1/webhooks",
                app.admin_key(),
                &json!({"name": name, "url": receiver.url("/n")}),
            )
            .await;
        let reason = if name.contains('\0') {
            "invalid_character"
        } else {
            "invalid_name"
        };
        assert_error(status, &body, StatusCode::BAD_REQUEST, reason);
    }
    app.create_device("d1").await;
    let (status, body) = app
        .post(
            "/api/v1/devices/d1/webhooks",
            app.admin_key(),
            &json!([{"name": "fine", "url": receiver.url("/n")}, {"name": "\n", "url": receiver.url("/n")}]),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_name");
    let (_, body) = app.get("/api/v1/webhooks", app.admin_key()).await;
    assert!(body["data"].as_array().unwrap().is_empty(), "{body}");
    app.shutdown().await;
}
