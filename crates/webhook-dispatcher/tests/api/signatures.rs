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

/// What the README's receiver does with the Python Standard Webhooks library
/// (`standardwebhooks`, which provisioning installs): `Webhook(secret).verify(body, headers)`.
/// True when it verifies.
fn python_standard_verifier_accepts(secret: &str, received: &Received) -> bool {
    let headers: serde_json::Map<String, serde_json::Value> = received
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
message = json.load(sys.stdin)
try:
    Webhook(message["secret"]).verify(message["body"].encode(), message["headers"])
except WebhookVerificationError:
    sys.exit(3)
"#;
    let input = json!({"secret": secret, "headers": headers, "body": String::from_utf8_lossy(&received.body)});
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (make test provisions it)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    match output.status.code() {
        Some(0) => true,
        Some(3) => false,
        _ => panic!(
            "the Python verifier did not run (provision installs standardwebhooks):\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// The README's promise: a generated `whsec_` secret verifies with the Python library as it
/// is, and a secret of your own once given as `whsec_` + its base64; the body signature is
/// keyed with the whole secret string either way.
#[tokio::test]
async fn the_readme_receiver_verifies_generated_and_own_secrets_with_the_python_library() {
    use base64::Engine as _;
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("greenhouse-1").await;
    let (_, generated) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/generated"), "events": ["device.data"]}),
    )
    .await;
    let own = "my-shared-secret-123";
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/own"), "events": ["device.data"], "secret": own}),
    )
    .await;
    ingest(&app, &token, json!({"temperature": 21.5})).await;
    let generated_request = wait_received(&receiver, "/generated", 1, Duration::from_secs(10))
        .await
        .remove(0);
    let own_request = wait_received(&receiver, "/own", 1, Duration::from_secs(10))
        .await
        .remove(0);

    assert!(python_standard_verifier_accepts(
        &generated,
        &generated_request
    ));
    let keyed = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(own)
    );
    assert!(python_standard_verifier_accepts(&keyed, &own_request));
    // Another webhook's secret is refused, so the checks above can fail.
    assert!(!python_standard_verifier_accepts(&generated, &own_request));
    assert!(seed_receiver_accepts(&generated, &generated_request));
    assert!(seed_receiver_accepts(own, &own_request));
    app.shutdown().await;
}
