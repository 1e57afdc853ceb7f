use fieldline_testkit::assert_error;
use reqwest::StatusCode;
use serde_json::json;

use crate::spawn_registry;

#[tokio::test]
async fn projects_are_isolated_from_each_other() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "acme", "name": "Acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let acme_admin = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, _) = app
        .post(
            "/api/v1/devices",
            &acme_admin,
            &json!({"id": "shared-name"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // The same id in another project is another device.
    app.create_device("shared-name").await;
    app.create_device("default-only").await;

    let (status, body) = app.get("/api/v1/devices/default-only", &acme_admin).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    let (status, body) = app.get("/api/v1/devices", &acme_admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["data"][0]["project"], "acme");

    // Only the platform admin manages projects.
    let (status, body) = app
        .post("/api/v1/projects", &acme_admin, &json!({"slug": "evil"}))
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "acme"}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "project_exists");
    let (status, body) = app.get("/api/v1/projects", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
    app.shutdown().await;
}
