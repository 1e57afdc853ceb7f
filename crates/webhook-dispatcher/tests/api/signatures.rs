use std::time::Duration;

use fieldline_testkit::receiver::{Received, Receiver};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::{ingest, register, spawn, wait_received};

/// The receiver code of the seed lessons: hex HMAC-SHA256 of the raw body, keyed with the
/// secret as registered, compared to `X-Webhook-Signature: sha256=<hex>`.
pub fn seed_receiver_accepts(secret: &str, received: &Received) -> bool {
    let header = received.header("X-Webhook-Signature").unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&received.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    header == expected
}

/// The Standard Webhooks reference verifier (the `standardwebhooks` crate).
pub fn standard_verifier_accepts(secret: &str, received: &Received) -> bool {
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &received.headers {
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            reqwest::header::HeaderValue::from_str(value).unwrap(),
        );
    }
    let verifier = if secret.starts_with("whsec_") {
        standardwebhooks::Webhook::new(secret).unwrap()
    } else {
        standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec()).unwrap()
    };
    verifier.verify(&received.body, &headers).is_ok()
}

#[tokio::test]
async fn both_signatures_verify_with_independent_verifiers() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("edge-node-321").await;
    let (_, generated) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/generated"), "events": ["device.data"]}),
    )
    .await;
    assert!(generated.starts_with("whsec_"));
    let plain = "a-plain-secret-of-the-seed-lessons";
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/plain"), "events": ["device.data"], "secret": plain, "headers": {"X-Tenant": "t1"}}),
    )
    .await;

    ingest(
        &app,
        &token,
        json!({"ts": "2026-03-01T10:00:00Z", "temperature": 21.5, "fw": "1.2"}),
    )
    .await;
    let generated_request = wait_received(&receiver, "/generated", 1, Duration::from_secs(10))
        .await
        .remove(0);
    let plain_request = wait_received(&receiver, "/plain", 1, Duration::from_secs(10))
        .await
        .remove(0);

    assert!(seed_receiver_accepts(&generated, &generated_request));
    assert!(standard_verifier_accepts(&generated, &generated_request));
    assert!(seed_receiver_accepts(plain, &plain_request));
    assert!(standard_verifier_accepts(plain, &plain_request));
    // A wrong secret is refused by both, so the checks above can fail.
    assert!(!seed_receiver_accepts("whsec_wrong", &generated_request));
    assert!(!standard_verifier_accepts(plain, &generated_request));

    let body = generated_request.json();
    assert_eq!(body["event"], "device.data");
    assert_eq!(body["project"], "default");
    assert_eq!(body["device_id"], "edge-node-321");
    assert!(body["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(generated_request.header("webhook-id"), body["id"].as_str());
    assert_eq!(
        generated_request.header("content-type"),
        Some("application/json")
    );
    let mut readings = body["payload"]["readings"].as_array().unwrap().clone();
    readings.sort_by_key(|r| r["metric"].as_str().unwrap().to_owned());
    assert_eq!(
        readings,
        vec![
            json!({"metric": "fw", "ts": "2026-03-01T10:00:00Z", "value": "1.2"}),
            json!({"metric": "temperature", "ts": "2026-03-01T10:00:00Z", "value": 21.5}),
        ]
    );
    // The same event, the same body, to both webhooks; custom headers only where set.
    assert_eq!(generated_request.body, plain_request.body);
    assert_eq!(plain_request.header("x-tenant"), Some("t1"));
    assert_eq!(generated_request.header("x-tenant"), None);
    app.shutdown().await;
}

#[tokio::test]
async fn during_a_rotation_both_secrets_sign() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("d1").await;
    let (id, old) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/hook"), "events": ["device.data"]}),
    )
    .await;
    let (status, rotated) = app
        .post(
            &format!("/api/v1/webhooks/{id}/rotate-secret"),
            app.admin_key(),
            &json!({"grace_seconds": 3600}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{rotated}");
    let new = rotated["data"]["secret"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    let (_, shown) = app
        .get(&format!("/api/v1/webhooks/{id}/secret"), app.admin_key())
        .await;
    assert_eq!(shown["data"]["secret"], new.as_str());
    assert_eq!(shown["data"]["previous_secret"], old.as_str());

    ingest(&app, &token, json!({"a": 1})).await;
    let request = wait_received(&receiver, "/hook", 1, Duration::from_secs(10))
        .await
        .remove(0);
    assert!(
        standard_verifier_accepts(&old, &request),
        "old secret no longer verifies during the grace"
    );
    assert!(standard_verifier_accepts(&new, &request));
    assert!(seed_receiver_accepts(&new, &request));
    let previous = request.header("X-Webhook-Signature-Previous").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(old.as_bytes()).unwrap();
    mac.update(&request.body);
    assert_eq!(
        previous,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    app.shutdown().await;
}
