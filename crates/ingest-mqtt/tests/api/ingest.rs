use std::time::Duration;

use fieldline_proto::v1::reading;
use fieldline_testkit::{TestEnv, eventually};

use crate::{Device, metric, mqtt_port, spawn_mqtt, topic, wait_ready};

#[tokio::test]
async fn telemetry_and_heartbeats_reach_jetstream_and_are_acked() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("esp32-1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "esp32-1", &token).await;
    device
        .publish(
            &topic(&app, "esp32-1", "telemetry"),
            r#"{"ts": 1000, "temperature": 21.5, "door_open": false}"#,
        )
        .await;
    device
        .publish(&topic(&app, "esp32-1", "heartbeat"), "")
        .await;

    let messages = eventually(
        "telemetry in jetstream",
        Duration::from_secs(10),
        || async {
            let messages = app.telemetry_batches().await;
            (messages.len() == 1 && app.heartbeats().await.len() == 1).then_some(messages)
        },
    )
    .await;
    let (subject, batch) = &messages[0];
    assert_eq!(
        subject,
        &app.context.subjects.telemetry("default", "esp32-1")
    );
    assert_eq!(batch.source, "mqtt");
    let mut readings: Vec<_> = batch
        .readings
        .iter()
        .map(|r| (r.metric.clone(), r.ts_us, r.value.clone().unwrap()))
        .collect();
    readings.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        readings,
        vec![
            (
                "door_open".into(),
                1_000_000,
                reading::Value::Boolean(false)
            ),
            (
                "temperature".into(),
                1_000_000,
                reading::Value::Number(21.5)
            ),
        ]
    );
    let heartbeats = app.heartbeats().await;
    assert_eq!(
        heartbeats[0].0,
        app.context.subjects.heartbeat("default", "esp32-1")
    );
    app.shutdown().await;
}

#[tokio::test]
async fn unknown_devices_and_malformed_payloads_are_dropped_counted_and_survived() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    app.create_device("known").await;
    wait_ready(&app).await;
    // The broker lets no device publish as another, or outside its topics; ingest-mqtt's own
    // checks stand behind that, tested here with an account the broker lets through.
    let (user, password) = app.env.broker().unrestricted_login();
    let device = Device::connect_as(mqtt_port(&app), &user, &password).await;
    device
        .publish(&topic(&app, "ghost", "telemetry"), r#"{"a": 1}"#)
        .await;
    device
        .publish(&topic(&app, "known", "telemetry"), "{not json")
        .await;
    device
        .publish(&topic(&app, "known", "telemetry"), r#"{"a": null}"#)
        .await;
    device
        .publish(
            &format!(
                "{}/default/bad.id/telemetry",
                app.context.config.mqtt_topic_root
            ),
            r#"{"a": 1}"#,
        )
        .await;
    device
        .publish(&topic(&app, "known", "telemetry"), r#"{"ts": 5, "a": 42}"#)
        .await;

    // The loop went on: the good message after the bad ones arrived, and only it.
    eventually("the good message", Duration::from_secs(10), || async {
        (!app.telemetry_batches().await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let messages = app.telemetry_batches().await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].1.device_id, "known");
    assert_eq!(
        messages[0].1.readings[0].value,
        Some(reading::Value::Number(42.0))
    );

    let metrics = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["unknown_device", "malformed", "invalid_topic"] {
        let line = metrics
            .lines()
            .find(|line| {
                line.starts_with("fieldline_mqtt_dropped_total")
                    && line.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no drop counted for {reason}:\n{metrics}"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_repeated_msg_id_is_published_once() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    for _ in 0..3 {
        device
            .publish(
                &topic(&app, "d1", "telemetry"),
                r#"{"msg_id": "m-1", "a": 1}"#,
            )
            .await;
    }
    device
        .publish(
            &topic(&app, "d1", "telemetry"),
            r#"{"msg_id": "m-2", "a": 2}"#,
        )
        .await;
    eventually("four messages handled", Duration::from_secs(10), || async {
        (published_count(&app).await >= 4.0).then_some(())
    })
    .await;
    // JetStream kept one of the three m-1 and the m-2 (read until both are visible to the
    // reader; three m-1 would make it 4 and fail).
    crate::batches_in_jetstream(&app, 2, "m-1 once and m-2").await;
    assert_eq!(app.telemetry_batches().await.len(), 2);
    app.shutdown().await;
}

/// `fieldline_mqtt_messages_total{outcome="published"}`: messages ingest-mqtt handed to
/// JetStream (duplicates included: JetStream drops those).
async fn published_count(app: &fieldline_testkit::TestApp) -> f64 {
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|line| line.starts_with("fieldline_mqtt_messages_total{outcome=\"published\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A device's burst: messages that wait for the device's previous bus message go out together
/// (docs/decisions/2026-11-23-mqtt-coalescing.md), and every reading still reaches JetStream
/// exactly once, with every message acked to the broker.
#[tokio::test]
async fn a_burst_from_one_device_reaches_jetstream_whole() {
    const MESSAGES: i64 = 300;
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("chatty").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "chatty", &token).await;
    let telemetry = topic(&app, "chatty", "telemetry");
    for n in 1..=MESSAGES {
        device
            .publish(&telemetry, &format!(r#"{{"ts": {n}, "n": {n}}}"#))
            .await;
    }
    let batches = eventually(
        "every reading in jetstream",
        Duration::from_secs(20),
        || async {
            let batches = app.telemetry_batches().await;
            let readings: usize = batches.iter().map(|(_, b)| b.readings.len()).sum();
            (readings >= MESSAGES as usize).then_some(batches)
        },
    )
    .await;
    let mut seen: Vec<i64> = batches
        .iter()
        .flat_map(|(_, batch)| batch.readings.iter().map(|r| r.ts_us / 1_000))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=MESSAGES).collect::<Vec<_>>());
    for (_, batch) in &batches {
        assert_eq!(batch.device_id, "chatty");
        assert!(batch.message_id.is_empty());
    }
    eventually(
        "every message acked to the broker",
        Duration::from_secs(10),
        || async {
            let published = metric(
                &app,
                "fieldline_mqtt_messages_total",
                "outcome=\"published\"",
            )
            .await;
            (published == MESSAGES as f64).then_some(())
        },
    )
    .await;
    eprintln!("{MESSAGES} messages in {} bus messages", batches.len());
    app.shutdown().await;
}
