//! Every registry route: another project's ids are "not found", and scopes hold.

use fieldline_testkit::{TestApp, assert_error};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::spawn_registry;

/// Creates project `other` and returns its admin key.
async fn other_project(app: &TestApp) -> String {
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The project's routes that name one of its resources, with a valid body for each.
fn routes(
    device: &str,
    command: &str,
    rule: &str,
    key: &str,
) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, format!("/api/v1/devices/{device}"), None),
        (
            Method::PUT,
            format!("/api/v1/devices/{device}"),
            Some(json!({"name": "x"})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/devices/{device}"),
            Some(json!({"name": "x"})),
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{device}/token"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/api/v1/devices/{device}/config"),
            None,
        ),
        (
            Method::PUT,
            format!("/api/v1/devices/{device}/config"),
            Some(json!({"a": 1})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/devices/{device}/config"),
            Some(json!({"a": 2})),
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{device}/commands"),
            Some(json!({"name": "ping"})),
        ),
        (
            Method::GET,
            format!("/api/v1/devices/{device}/commands"),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/devices/{device}/commands/{command}"),
            None,
        ),
        (Method::GET, format!("/api/v1/alert-rules/{rule}"), None),
        (
            Method::PUT,
            format!("/api/v1/alert-rules/{rule}"),
            Some(
                json!({"name": "r", "device_id": device, "metric": "m", "op": "gt", "threshold": 1}),
            ),
        ),
        (
            Method::PATCH,
            format!("/api/v1/alert-rules/{rule}"),
            Some(json!({"threshold": 2})),
        ),
        (Method::DELETE, format!("/api/v1/alert-rules/{rule}"), None),
        (
            Method::POST,
            format!("/api/v1/keys/{key}/rotate"),
            Some(json!({})),
        ),
        (Method::DELETE, format!("/api/v1/keys/{key}"), None),
        (Method::DELETE, format!("/api/v1/devices/{device}"), None),
    ]
}

async fn fixtures(app: &TestApp) -> (String, String, String) {
    let admin = app.admin_key().to_owned();
    app.create_device("secret-device").await;
    let (_, body) = app
        .post(
            "/api/v1/devices/secret-device/commands",
            &admin,
            &json!({"name": "reboot"}),
        )
        .await;
    let command = body["data"]["id"].as_str().unwrap().to_owned();
    let (_, body) = app
        .post(
            "/api/v1/alert-rules",
            &admin,
            &json!({"name": "r", "device_id": "secret-device", "metric": "m", "op": "gt", "threshold": 1}),
        )
        .await;
    let rule = body["data"]["id"].as_str().unwrap().to_owned();
    let (key, _) = app.create_key(&["read"]).await;
    (command, rule, key)
}

#[tokio::test]
async fn another_projects_ids_are_not_found_on_every_route() {
    let app = spawn_registry().await;
    let (command, rule, key) = fixtures(&app).await;
    let intruder = other_project(&app).await;
    for (method, path, body) in routes("secret-device", &command, &rule, &key) {
        let (status, response) = app
            .request(method.clone(), &path, Some(&intruder), body.as_ref())
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {response}");
        assert_eq!(response["status"], "error", "{method} {path}");
    }
    // Listings show nothing of it either.
    for path in ["/api/v1/devices", "/api/v1/alert-rules", "/api/v1/keys"] {
        let (_, body) = app.get(path, &intruder).await;
        let text = body.to_string();
        assert!(
            !text.contains("secret-device") && !text.contains(&rule) && !text.contains(&key),
            "{path}: {text}"
        );
    }
    // And the intruder harmed nothing.
    let (status, body) = app
        .get("/api/v1/devices/secret-device", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["name"], serde_json::Value::Null);
    app.shutdown().await;
}

#[tokio::test]
async fn scopes_hold_on_every_route() {
    let app = spawn_registry().await;
    let (command, rule, key) = fixtures(&app).await;
    let (_, read) = app.create_key(&["read"]).await;
    let (_, write) = app.create_key(&["write"]).await;
    for (method, path, body) in routes("secret-device", &command, &rule, &key) {
        let needs = if path.starts_with("/api/v1/keys") {
            "admin"
        } else if method == Method::GET {
            "read"
        } else {
            "write"
        };
        let refused: &[&str] = match needs {
            "admin" => &[&read, &write],
            "write" => &[&read],
            _ => &[],
        };
        for credential in refused {
            let (status, response) = app
                .request(method.clone(), &path, Some(credential), body.as_ref())
                .await;
            assert_error(status, &response, StatusCode::FORBIDDEN, "forbidden");
        }
        if needs == "read" {
            let (status, response) = app.request(method.clone(), &path, Some(&read), None).await;
            assert_eq!(status, StatusCode::OK, "{method} {path}: {response}");
        }
    }
    for (method, path) in [
        (Method::POST, "/api/v1/alert-rules"),
        (Method::GET, "/api/v1/alert-rules"),
        (Method::POST, "/api/v1/devices"),
    ] {
        let (status, response) = app
            .request(method.clone(), path, None, Some(&json!({})))
            .await;
        assert_error(status, &response, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    app.shutdown().await;
}
