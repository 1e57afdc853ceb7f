use std::time::Duration;

use fieldline_testkit::{assert_error, eventually};
use reqwest::StatusCode;
use serde_json::json;

use crate::spawn_registry;

#[tokio::test]
async fn a_created_key_works_and_its_secret_is_shown_once() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post(
            "/api/v1/keys",
            app.admin_key(),
            &json!({"name": "dashboard", "scopes": ["read"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let secret = body["data"]["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("flk_"));
    assert_eq!(body["data"]["scopes"], json!(["read"]));

    let (status, _) = app.get("/api/v1/devices", &secret).await;
    assert_eq!(status, StatusCode::OK);

    let (status, listing) = app.get("/api/v1/keys", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    let text = listing.to_string();
    assert!(!text.contains(&secret), "a listing revealed a secret");
    let keys = listing["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listing}");
    let dashboard = keys.iter().find(|key| key["name"] == "dashboard").unwrap();
    assert_eq!(dashboard["prefix"], secret[..8]);
    // The registry records the use after answering, so look until it shows.
    eventually("last_used_at recorded", Duration::from_secs(5), || async {
        let (_, listing) = app.get("/api/v1/keys", app.admin_key()).await;
        let keys = listing["data"].as_array().cloned().unwrap_or_default();
        keys.iter()
            .any(|key| key["name"] == "dashboard" && key["last_used_at"].is_string())
            .then_some(())
    })
    .await;

    // Nothing in the database is the secret itself.
    let pg = app.env.pg().await;
    let stored: i64 = pg
        .query_one(
            "SELECT count(*) FROM registry.api_keys WHERE encode(secret_hash, 'escape') LIKE '%' || $1 || '%'",
            &[&&secret[4..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once() {
    let app = spawn_registry().await;
    let (key_id, secret) = app.create_key(&["write"]).await;
    // Warm the cache: the revocation must clear it, not wait for the TTL.
    assert_eq!(app.get("/api/v1/devices", &secret).await.0, StatusCode::OK);

    let (status, _) = app
        .delete(&format!("/api/v1/keys/{key_id}"), app.admin_key())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, body) = app.get("/api/v1/devices", &secret).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, listing) = app.get("/api/v1/keys", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    let revoked = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    let (status, body) = app
        .delete("/api/v1/keys/key_doesnotexist", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "key_not_found");
    app.shutdown().await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let app = spawn_registry().await;
    let expires_at = chrono_like_in(2);
    let (status, body) = app
        .post(
            "/api/v1/keys",
            app.admin_key(),
            &json!({"name": "short", "scopes": ["read"], "expires_at": expires_at}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let secret = body["data"]["secret"].as_str().unwrap().to_owned();
    assert_eq!(app.get("/api/v1/devices", &secret).await.0, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (status, body) = app.get("/api/v1/devices", &secret).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/keys",
            app.admin_key(),
            &json!({"name": "past", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_expiry",
    );
    app.shutdown().await;
}

/// RFC 3339 time `seconds` from now.
fn chrono_like_in(seconds: u64) -> String {
    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(seconds);
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap();
    fieldline_common_time(since_epoch.as_micros() as i64)
}

fn fieldline_common_time(us: i64) -> String {
    fieldline_common::time::format_rfc3339(&fieldline_common::time::from_us(us))
}

#[tokio::test]
async fn only_admin_keys_manage_keys() {
    let app = spawn_registry().await;
    let (_, writer) = app.create_key(&["write"]).await;
    let (status, body) = app
        .post(
            "/api/v1/keys",
            &writer,
            &json!({"name": "x", "scopes": ["admin"]}),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app.get("/api/v1/keys", &writer).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    let (status, body) = app
        .post(
            "/api/v1/keys",
            app.admin_key(),
            &json!({"name": "x", "scopes": ["owner"]}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("scopes[0]"),
        "{body}"
    );
    let (status, body) = app
        .post(
            "/api/v1/keys",
            app.admin_key(),
            &json!({"name": "x", "scopes": []}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    app.shutdown().await;
}

#[tokio::test]
async fn a_rotated_key_works_through_its_grace_then_expires() {
    let app = spawn_registry().await;
    let (key_id, old_secret) = app.create_key(&["write"]).await;
    assert_eq!(
        app.get("/api/v1/devices", &old_secret).await.0,
        StatusCode::OK
    );

    let (status, body) = app
        .post(
            &format!("/api/v1/keys/{key_id}/rotate"),
            app.admin_key(),
            &json!({"grace_seconds": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new_secret = body["data"]["secret"].as_str().unwrap().to_owned();
    assert_ne!(body["data"]["id"], key_id.as_str());
    assert_eq!(body["data"]["scopes"], json!(["read", "write"]));
    assert!(body["data"]["previous"]["expires_at"].is_string(), "{body}");

    // Both work during the grace.
    assert_eq!(
        app.get("/api/v1/devices", &old_secret).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.get("/api/v1/devices", &new_secret).await.0,
        StatusCode::OK
    );
    // Then only the new one, although the old one's principal was cached.
    fieldline_testkit::eventually(
        "the old secret to expire",
        std::time::Duration::from_secs(15),
        || async {
            let (status, _) = app.get("/api/v1/devices", &old_secret).await;
            (status == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    assert_eq!(
        app.get("/api/v1/devices", &new_secret).await.0,
        StatusCode::OK
    );

    // An expired key cannot be rotated; a bad grace is named.
    let (status, body) = app
        .post(
            &format!("/api/v1/keys/{key_id}/rotate"),
            app.admin_key(),
            &json!({}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "key_not_found");
    let (status, body) = app
        .post(
            "/api/v1/keys/key_x/rotate",
            app.admin_key(),
            &json!({"grace_seconds": -1}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");

    // last_used_at is kept for every key that was used.
    let (_, listing) = app.get("/api/v1/keys", app.admin_key()).await;
    let used = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert!(used["last_used_at"].is_string(), "{used}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_rotation_without_grace_ends_the_old_secret_at_once() {
    let app = spawn_registry().await;
    let (key_id, old_secret) = app.create_key(&["read"]).await;
    assert_eq!(
        app.get("/api/v1/devices", &old_secret).await.0,
        StatusCode::OK
    );
    let (status, _) = app
        .post(
            &format!("/api/v1/keys/{key_id}/rotate"),
            app.admin_key(),
            &json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app.get("/api/v1/devices", &old_secret).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    app.shutdown().await;
}

#[tokio::test]
async fn the_platform_admin_key_keeps_its_power_through_rotation_and_only_it_may_touch_itself() {
    let app = spawn_registry().await;
    let (_, listing) = app.get("/api/v1/keys", app.admin_key()).await;
    let platform_key = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["platform_admin"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, project_admin) = app.create_key(&["admin"]).await;
    for path in [
        format!("/api/v1/keys/{platform_key}/rotate"),
        format!("/api/v1/keys/{platform_key}"),
    ] {
        let method = if path.ends_with("rotate") {
            reqwest::Method::POST
        } else {
            reqwest::Method::DELETE
        };
        let (status, body) = app
            .request(
                method,
                &path,
                Some(&project_admin),
                Some(&json!({"grace_seconds": 0})),
            )
            .await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }

    let (status, body) = app
        .post(
            &format!("/api/v1/keys/{platform_key}/rotate"),
            app.admin_key(),
            &json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["data"]["platform_admin"], true);
    let new_secret = body["data"]["secret"].as_str().unwrap().to_owned();
    let (status, _) = app.get("/api/v1/projects", &new_secret).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.get("/api/v1/projects", app.admin_key()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.shutdown().await;
}
