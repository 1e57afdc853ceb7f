//! webhook-dispatcher against the real PostgreSQL and NATS, the real registry and ingest-http
//! producing events, and a real receiver on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod delivery;
mod disabled;
mod fanout;
mod registration;
mod retention;
mod shapes;
mod signatures;
mod ssrf;

use std::time::Duration;

use fieldline_common::Config;
use fieldline_testkit::{
    TestApp, TestEnv, eventually,
    receiver::{Received, Receiver},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Fast schedule for tests: three retries, a second apart.
pub fn test_config(config: Config) -> Config {
    Config {
        webhook_allow_private: true,
        webhook_retry_schedule: "1s,1s,1s".into(),
        webhook_timeout: Duration::from_secs(2),
        webhook_poll_interval: Duration::from_millis(100),
        ..config
    }
}

pub async fn spawn_with(tweak: impl FnOnce(Config) -> Config) -> TestApp {
    TestApp::spawn_with(
        TestEnv::new().await,
        |config| tweak(test_config(config)),
        |context| async move {
            Ok(vec![
                device_registry::start(&context).await?,
                ingest_http::start(&context).await?,
                webhook_dispatcher::start(&context).await?,
            ])
        },
    )
    .await
}

pub async fn spawn() -> TestApp {
    spawn_with(|config| config).await
}

/// Registers a webhook with the admin key; returns (id, secret).
pub async fn register(app: &TestApp, key: &str, body: Value) -> (String, String) {
    let (status, created) = app.post("/api/v1/webhooks", key, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    (
        created["data"]["id"].as_str().unwrap().to_owned(),
        created["data"]["secret"].as_str().unwrap().to_owned(),
    )
}

/// Sends readings as a device.
pub async fn ingest(app: &TestApp, token: &str, body: Value) {
    let (status, answer) = app.post("/api/v1/ingest", token, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

pub async fn wait_received(
    receiver: &Receiver,
    path: &str,
    count: usize,
    within: Duration,
) -> Vec<Received> {
    eventually(&format!("{count} requests on {path}"), within, || async {
        let received = receiver.received(path);
        (received.len() >= count).then_some(received)
    })
    .await
}

pub fn default_body(url: &str) -> Value {
    json!({"url": url})
}
