//! A device over its MQTT rate limit loses only its own excess: acknowledged to the broker,
//! dropped, counted, never published.

use std::time::{Duration, Instant};

use fieldline_common::Config;
use fieldline_testkit::{TestApp, TestEnv, eventually};
use reqwest::Method;
use serde_json::json;

use crate::{Device, metric, spawn_mqtt, topic, wait_ready};

/// Readings of `device_id` now in JetStream.
async fn stored(app: &TestApp, device_id: &str) -> usize {
    app.telemetry_batches()
        .await
        .iter()
        .filter(|(_, batch)| batch.device_id == device_id)
        .map(|(_, batch)| batch.readings.len())
        .sum()
}

async fn publish_many(app: &TestApp, device: &Device, device_id: &str, from: usize, count: usize) {
    let telemetry = topic(app, device_id, "telemetry");
    for n in from..from + count {
        device
            .publish(&telemetry, &format!(r#"{{"ts": {n}, "n": {n}}}"#))
            .await;
    }
}

/// Waits until `device` has every PUBACK of `count` messages: nothing stalls its session.
async fn all_acked(device: &Device, count: usize) {
    eventually("every message acked", Duration::from_secs(30), || async {
        (device.pubacks() >= count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_device_over_its_mqtt_limit_loses_only_its_own_excess() {
    const ALLOWANCE: usize = 20;
    const NOISY: usize = 200;
    const QUIET: usize = 15;
    let app = spawn_mqtt(TestEnv::new().await, |config| Config {
        rate_device_requests: ALLOWANCE as u32,
        // One more message every 3 s.
        rate_device_period: Duration::from_secs(60),
        ..config
    })
    .await;
    let noisy_token = app.create_device("noisy").await;
    let quiet_token = app.create_device("quiet").await;
    wait_ready(&app).await;
    let started = Instant::now();
    let noisy = Device::connect(&app, "noisy", &noisy_token).await;
    let quiet = Device::connect(&app, "quiet", &quiet_token).await;
    tokio::join!(
        publish_many(&app, &noisy, "noisy", 0, NOISY),
        publish_many(&app, &quiet, "quiet", 0, QUIET),
    );
    // Every message is acknowledged, the dropped ones too, so neither session stalls.
    all_acked(&noisy, NOISY).await;
    all_acked(&quiet, QUIET).await;
    let dropped = eventually("the drops counted", Duration::from_secs(10), || async {
        let published = metric(
            &app,
            "fieldline_mqtt_messages_total",
            "outcome=\"published\"",
        )
        .await;
        let dropped = metric(
            &app,
            "fieldline_mqtt_dropped_total",
            "reason=\"rate_limited\"",
        )
        .await;
        (published + dropped >= (NOISY + QUIET) as f64).then_some(dropped as usize)
    })
    .await;
    let elapsed = started.elapsed();

    let quiet_stored = stored(&app, "quiet").await;
    let noisy_stored = stored(&app, "noisy").await;
    assert_eq!(quiet_stored, QUIET, "the quiet device lost readings");
    // Its allowance, plus what refilled while the test ran (one every 3 s).
    let refilled = (elapsed.as_secs() / 3) as usize + 1;
    assert!(
        (ALLOWANCE..=ALLOWANCE + refilled).contains(&noisy_stored),
        "noisy stored {noisy_stored} in {elapsed:?}"
    );
    assert_eq!(dropped, NOISY - noisy_stored, "drops counted");
    app.shutdown().await;
}

#[tokio::test]
async fn a_project_override_reaches_ingest_mqtt_at_once() {
    let app = spawn_mqtt(TestEnv::new().await, |config| Config {
        rate_device_requests: 5,
        rate_device_period: Duration::from_secs(600),
        ..config
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    publish_many(&app, &device, "d1", 0, 10).await;
    all_acked(&device, 10).await;
    eventually("the first five stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 5).then_some(())
    })
    .await;

    let (status, body) = app
        .request(
            Method::PUT,
            "/api/v1/projects/default/limits",
            Some(app.admin_key()),
            Some(&json!({"device": {"requests": 1000, "period_s": 60}})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    publish_many(&app, &device, "d1", 100, 30).await;
    all_acked(&device, 40).await;
    eventually(
        "all thirty more stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 35).then_some(()) },
    )
    .await;
    app.shutdown().await;
}
