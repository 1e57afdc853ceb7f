//! Under load ingest-mqtt puts the waiting messages of several devices of a project in one bus
//! message; every MQTT message is still acknowledged, and stored once.

use std::time::Duration;

use fieldline_testkit::{TestApp, TestEnv, eventually};

use crate::{Device, topic, wait_ready};

const DEVICES: usize = 24;
const MESSAGES: usize = 25;

#[tokio::test]
async fn under_load_several_devices_share_bus_messages_and_each_message_is_stored_once() {
    let env = TestEnv::new().await.with_broker().await;
    // One publish in flight at a time: while it is, every device's messages wait, as when
    // JetStream is the bottleneck.
    let tweak = |config| fieldline_common::Config {
        mqtt_publishes_in_flight: 1,
        ..config
    };
    let app = TestApp::spawn_with(env, tweak, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_mqtt::start(&context).await?,
            query_api::start(&context).await?,
        ])
    })
    .await;
    let mut devices = Vec::new();
    for index in 0..DEVICES {
        let id = format!("m{index}");
        let token = app.create_device(&id).await;
        devices.push((id, token));
    }
    wait_ready(&app).await;
    let mut clients = Vec::new();
    for (id, token) in &devices {
        clients.push((id.clone(), Device::connect(&app, id, token).await));
    }
    // Every device at once, each message its own time and value.
    let sends = clients.iter().map(|(id, client)| {
        let app = &app;
        async move {
            for n in 0..MESSAGES {
                let payload = format!(r#"{{"ts": {}, "n": {n}}}"#, 1_000 + n);
                client.publish(&topic(app, id, "telemetry"), &payload).await;
            }
        }
    });
    futures::future::join_all(sends).await;
    let total = DEVICES * MESSAGES;
    eventually("every message acked", Duration::from_secs(30), || async {
        let acked: usize = clients.iter().map(|(_, client)| client.pubacks()).sum();
        (acked == total).then_some(())
    })
    .await;

    // The broker acked them; ingest-mqtt acks each to the broker once it is in JetStream.
    let messages = eventually(
        "every message on the bus",
        Duration::from_secs(30),
        || async {
            let messages = app.telemetry_messages().await;
            let readings: usize = messages
                .iter()
                .map(|(_, batch)| {
                    batch.readings.len()
                        + batch
                            .devices
                            .iter()
                            .map(|d| d.readings.len())
                            .sum::<usize>()
                })
                .sum();
            (readings >= total).then_some(messages)
        },
    )
    .await;
    // Some bus messages carry several devices; each device's messages are there once each
    // (in the order ingest-mqtt took them in, which its parallel connections may change).
    let shared = messages
        .iter()
        .filter(|(subject, batch)| {
            batch.devices.len() > 1
                && subject == &app.context.subjects.telemetry_batch("default", "mqtt")
        })
        .count();
    assert!(
        shared > 0,
        "no bus message carried several devices ({} messages)",
        messages.len()
    );
    let mut on_bus: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for (_, batch) in app.telemetry_batches().await {
        let values = batch.readings.iter().map(|reading| match reading.value {
            Some(fieldline_proto::v1::reading::Value::Number(n)) => n as i64,
            _ => -1,
        });
        on_bus
            .entry(batch.device_id.clone())
            .or_default()
            .extend(values);
    }
    for values in on_bus.values_mut() {
        values.sort_unstable();
    }
    for (id, _) in &devices {
        let expected: Vec<i64> = (0..MESSAGES as i64).collect();
        assert_eq!(
            on_bus.get(id),
            Some(&expected),
            "{id}'s readings on the bus"
        );
    }

    // And stored once each.
    let pg = app.env.pg().await;
    let stored = eventually("every reading stored", Duration::from_secs(30), || async {
        let row = pg
            .query_one(
                "SELECT count(*), count(DISTINCT (series_id, ts)) FROM telemetry.readings",
                &[],
            )
            .await
            .unwrap();
        let (count, distinct): (i64, i64) = (row.get(0), row.get(1));
        (count == total as i64).then_some(distinct)
    })
    .await;
    assert_eq!(stored, total as i64, "a reading stored twice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = pg
        .query_one("SELECT count(*) FROM telemetry.readings", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), total as i64);
    for (_, client) in clients {
        client.close().await;
    }
    app.shutdown().await;
}
