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

/// Request metrics are labelled by method, route and status. A method a client makes up is
/// labelled `_OTHER`: made-up methods cannot grow the registry. Each series counts every
/// request of its labels (the handles are kept per worker thread).
#[tokio::test]
async fn made_up_methods_share_one_metric_label() {
    let app = crate::spawn_ingest(TestEnv::new().await).await;
    for index in 0..5 {
        let method = reqwest::Method::from_bytes(format!("BREW{index}").as_bytes()).unwrap();
        let response = app
            .http
            .request(method, format!("{}/api/v1/ingest", app.base_url))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    for _ in 0..3 {
        let (status, _) = app
            .request(reqwest::Method::GET, "/health/live", None, None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let metrics = app.metrics().await;
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("fieldline_http_requests_total{"))
        .collect();
    assert!(
        requests.iter().all(|line| !line.contains("BREW")),
        "{requests:#?}"
    );
    let other: f64 = requests
        .iter()
        .filter(|line| line.contains(r#"method="_OTHER""#))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 5.0, "{requests:#?}");
    let live = crate::metric(
        &app,
        r#"fieldline_http_requests_total{method="GET",route="/health/live",status="200"}"#,
    )
    .await;
    assert_eq!(live, 3.0, "{requests:#?}");
}
