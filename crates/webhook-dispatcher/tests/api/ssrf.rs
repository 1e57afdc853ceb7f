//! The SSRF guard at delivery time: a webhook stored while private targets were allowed is
//! never sent to a private address once they are not, however its IP literal is spelled.

use std::time::Duration;

use fieldline_common::Config;
use fieldline_testkit::{TestApp, eventually, receiver::Receiver};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{ingest, register, spawn, test_config};

/// Every spelling of a private or loopback address the receiver's port is tried on; the
/// first eight reach the receiver on 127.0.0.1 when nothing stops them.
fn private_urls(port: u16) -> Vec<(String, String)> {
    [
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "0.0.0.0",
        "0x7f000001",
        "[::1]",
        "[::127.0.0.1]",
        "[2002:7f00:1::]",
        "[64:ff9b::7f00:1]",
        "[fd00::1]",
        "[fe80::1]",
        "10.0.0.1",
        "169.254.169.254",
    ]
    .iter()
    .enumerate()
    .map(|(index, host)| {
        let path = format!("/h{index}");
        (format!("http://{host}:{port}{path}"), path)
    })
    .collect()
}

async fn attempts(app: &TestApp, webhook_id: &str) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!("/api/v1/webhooks/{webhook_id}/deliveries?status=failed"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|delivery| {
            delivery["attempt_log"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn ip_literals_stored_while_allowed_are_refused_at_delivery_after_a_restart() {
    let app = spawn().await;
    assert!(app.context.config.webhook_allow_private);
    let receiver = Receiver::start().await;
    let port: u16 = receiver
        .url("")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let token = app.create_device("d1").await;
    let mut webhooks = Vec::new();
    for (url, path) in private_urls(port) {
        let (id, _) = register(
            &app,
            app.admin_key(),
            json!({"url": url, "events": ["device.data"]}),
        )
        .await;
        webhooks.push((id, url, path));
    }
    // A host name is checked by the client's resolver at each connection, every address it
    // resolves to (localhost: 127.0.0.1 and ::1).
    let (by_name, _) = register(
        &app,
        app.admin_key(),
        json!({"url": format!("http://localhost:{port}/by-name"), "events": ["config.update"]}),
    )
    .await;
    let env = app.stop().await;

    // Restarted without FIELDLINE_WEBHOOK_ALLOW_PRIVATE.
    let app = TestApp::spawn_with(
        env,
        |config| Config {
            webhook_allow_private: false,
            ..test_config(config)
        },
        |context| async move {
            Ok(vec![
                device_registry::start(&context).await?,
                ingest_http::start(&context).await?,
                webhook_dispatcher::start(&context).await?,
            ])
        },
    )
    .await;
    assert!(!app.context.config.webhook_allow_private);
    ingest(&app, &token, json!({"temp": 21})).await;
    for (id, url, _) in &webhooks {
        let failed = eventually(
            &format!("the delivery to {url} failed"),
            Duration::from_secs(10),
            || async {
                let attempts = attempts(&app, id).await;
                (!attempts.is_empty()).then_some(attempts)
            },
        )
        .await;
        assert_eq!(failed.len(), 1, "{url}: refused is not retried: {failed:?}");
        let error = failed[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("refused:") && error.contains("private"),
            "{url}: {error}"
        );
        assert!(failed[0]["status_code"].is_null(), "{url}: {failed:?}");

        // The test endpoint sends through the same check.
        let (status, body) = app
            .post(
                &format!("/api/v1/webhooks/{id}/test"),
                app.admin_key(),
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let error = body["data"]["attempt"]["error"]
            .as_str()
            .unwrap_or_default();
        assert!(error.starts_with("refused:"), "{url}: {body}");
    }
    let (status, body) = app
        .post(
            &format!("/api/v1/webhooks/{by_name}/test"),
            app.admin_key(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let error = body["data"]["attempt"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("resolves only to private or reserved addresses"),
        "{body}"
    );
    assert!(receiver.received("/by-name").is_empty());
    for (_, url, path) in &webhooks {
        assert!(
            receiver.received(path).is_empty(),
            "{url} was delivered to the receiver on loopback"
        );
    }
    app.shutdown().await;
}
