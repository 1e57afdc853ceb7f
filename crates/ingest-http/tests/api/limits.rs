//! A device token's rate limit on the ingest routes.

use std::time::Duration;

use fieldline_common::Config;
use fieldline_testkit::TestEnv;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_device_over_its_limit_gets_429_and_other_devices_do_not() {
    let app = crate::spawn_ingest_with(TestEnv::new().await, |config| Config {
        rate_device_requests: 2,
        rate_device_period: Duration::from_secs(600),
        ..config
    })
    .await;
    let noisy = app.create_device("noisy").await;
    let quiet = app.create_device("quiet").await;
    let reading = json!({"temperature": 20.5});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = app
            .http
            .post(format!("{}/api/v1/ingest", app.base_url))
            .bearer_auth(&noisy)
            .json(&reading)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let headers = response.headers();
            assert_eq!(headers["ratelimit-limit"], "2");
            assert_eq!(headers["ratelimit-remaining"], "0");
            assert_eq!(headers["retry-after"], "300");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["reason"], "rate_limited");
        }
    }
    assert_eq!(statuses, [202, 202, 429, 429]);
    let (status, body) = app.post("/api/v1/ingest", &quiet, &reading).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Only the two accepted readings of the noisy device reached JetStream.
    let noisy_batches = app
        .telemetry_batches()
        .await
        .into_iter()
        .filter(|(_, batch)| batch.device_id == "noisy")
        .count();
    assert_eq!(noisy_batches, 2);
    app.shutdown().await;
}
