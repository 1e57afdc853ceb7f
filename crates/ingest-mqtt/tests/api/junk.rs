//! Oversized messages and floods cost ingest-mqtt a counted drop, never its connection: a
//! message over Fieldline's limit is acknowledged and counted, one over the client's packet
//! limit is read once on a connection of its own, and QoS 0 past the backlog is shed while
//! QoS 1 is kept.

use std::time::Duration;

use fieldline_common::Config;
use fieldline_testkit::{TestApp, TestEnv, eventually, servers::PrivateNats};

use crate::{Device, metric, spawn_mqtt, topic, wait_ready};

/// A telemetry payload of exactly `bytes` bytes: valid JSON, text readings of at most 4,000
/// bytes each (`t0`, `t1`, …), no timestamp (they take the arrival time).
fn payload_of(bytes: usize) -> String {
    let mut payload = String::from("{");
    for index in 0.. {
        let key = format!(r#"{}"t{index}":""#, if index == 0 { "" } else { "," });
        // The text, its closing quote and the closing brace fill what is left.
        let room = bytes - payload.len() - key.len() - 2;
        let text = match room {
            0..=4000 => room,
            // Leave the next reading room for its key.
            4001..=4031 => room - 32,
            _ => 4000,
        };
        payload.push_str(&key);
        payload.push_str(&"x".repeat(text));
        payload.push('"');
        if text == room {
            break;
        }
    }
    payload.push('}');
    assert_eq!(payload.len(), bytes);
    payload
}

/// Readings of metric `name` of device `d1` now in JetStream.
async fn stored(app: &TestApp, name: &str) -> usize {
    app.telemetry_batches()
        .await
        .iter()
        .filter(|(_, batch)| batch.device_id == "d1")
        .flat_map(|(_, batch)| batch.readings.iter())
        .filter(|reading| reading.metric == name)
        .count()
}

async fn dropped(app: &TestApp, reason: &str) -> f64 {
    metric(
        app,
        "fieldline_mqtt_dropped_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

async fn connects(app: &TestApp) -> f64 {
    metric(app, "fieldline_mqtt_connects_total", "").await
}

async fn ready(app: &TestApp) -> bool {
    app.http
        .get(format!("{}/health/ready", app.base_url))
        .send()
        .await
        .is_ok_and(|response| response.status().is_success())
}

/// One uplink connection (one slot), so its reconnects are the ones counted.
fn one_connection(config: Config) -> Config {
    Config {
        mqtt_slots: 1,
        ..config
    }
}

/// Publishes three small messages (`after`) behind whatever was sent before, and waits until
/// all three are in JetStream: nothing stalls behind the junk.
async fn good_messages_after(app: &TestApp, device: &Device) {
    let telemetry = topic(app, "d1", "telemetry");
    for n in 0..3 {
        device
            .publish(&telemetry, &format!(r#"{{"after": {n}}}"#))
            .await;
    }
    eventually(
        "the good messages after it stored",
        Duration::from_secs(20),
        || async { (stored(app, "after").await == 3).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_1_mb_message_is_acked_and_counted_and_the_connection_stays_up() {
    let app = spawn_mqtt(TestEnv::new().await, one_connection).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    assert_eq!(connects(&app).await, 1.0);
    let device = Device::connect(&app, "d1", &token).await;

    device
        .publish(&topic(&app, "d1", "telemetry"), &payload_of(1_000_000))
        .await;
    good_messages_after(&app, &device).await;

    eventually("the drop counted", Duration::from_secs(5), || async {
        (dropped(&app, "too_large").await == 1.0).then_some(())
    })
    .await;
    eventually("every message acked", Duration::from_secs(5), || async {
        (device.pubacks() == 4).then_some(())
    })
    .await;
    assert_eq!(connects(&app).await, 1.0, "the connection was lost");
    assert!(ready(&app).await, "not ready");
    assert_eq!(stored(&app, "t0").await, 0, "the large message was stored");
    app.shutdown().await;
}

#[tokio::test]
async fn a_message_at_the_limit_is_stored_and_one_byte_more_is_dropped() {
    let app = spawn_mqtt(TestEnv::new().await, one_connection).await;
    let limit = app.context.config.mqtt_max_message_bytes;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    let telemetry = topic(&app, "d1", "telemetry");

    device.publish(&telemetry, &payload_of(limit + 1)).await;
    let at_limit = payload_of(limit);
    let readings = at_limit.matches("\"t").count();
    device.publish(&telemetry, &at_limit).await;
    eventually(
        "the message at the limit stored",
        Duration::from_secs(20),
        || async { (stored(&app, "t0").await == 1).then_some(()) },
    )
    .await;
    let last = format!("t{}", readings - 1);
    assert_eq!(stored(&app, &last).await, 1, "every reading of it stored");
    assert_eq!(dropped(&app, "too_large").await, 1.0);
    assert_eq!(connects(&app).await, 1.0, "the connection was lost");
    app.shutdown().await;
}

/// A broker that sends more than ingest-mqtt's packet limit (its `max_packet_size` larger, or
/// none, or a session stored before it): the packet ends the connection, and the broker sends
/// it again on every reconnect. It is read once on a connection of its own and dropped.
#[tokio::test]
async fn a_packet_over_the_clients_limit_is_read_once_and_dropped_instead_of_looping() {
    let app = spawn_mqtt(TestEnv::new().await, |config| Config {
        mqtt_max_packet_bytes: 64 * 1024,
        mqtt_max_message_bytes: 16 * 1024,
        ..one_connection(config)
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    assert_eq!(connects(&app).await, 1.0);
    let device = Device::connect(&app, "d1", &token).await;

    device
        .publish(&topic(&app, "d1", "telemetry"), &payload_of(200_000))
        .await;
    good_messages_after(&app, &device).await;

    assert_eq!(dropped(&app, "too_large").await, 1.0);
    assert_eq!(
        connects(&app).await,
        2.0,
        "one connection to read it, no loop"
    );
    wait_ready(&app).await;
    app.shutdown().await;
}

/// The broker bounds QoS 1 by its in-flight window but sends QoS 0 as fast as it comes. With
/// the pipeline stalled (NATS down), QoS 0 past the backlog is dropped and counted; QoS 1 sent
/// after it is all stored once NATS is back, and every QoS 0 message is stored or counted.
#[tokio::test]
async fn qos0_past_the_backlog_is_dropped_and_counted_while_qos1_is_kept() {
    const BACKLOG: usize = 16;
    // More than the pipeline holds (1,024 messages in flight) and the backlog together.
    const QOS0: usize = 1_500;
    const QOS1: usize = 5;
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let app = spawn_mqtt(TestEnv::new().await, move |config| Config {
        nats_url: url.into(),
        mqtt_qos0_backlog: BACKLOG,
        rate_device_requests: 1_000_000,
        ..one_connection(config)
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    let telemetry = topic(&app, "d1", "telemetry");
    device.publish(&telemetry, r#"{"warm": 1}"#).await;
    eventually(
        "the first message stored",
        Duration::from_secs(10),
        || async { (stored(&app, "warm").await == 1).then_some(()) },
    )
    .await;

    nats.kill();
    for n in 0..QOS0 {
        device
            .publish_qos0(&telemetry, &format!(r#"{{"q0": {n}}}"#))
            .await;
    }
    eventually("qos 0 dropped", Duration::from_secs(20), || async {
        (dropped(&app, "overload").await > 0.0).then_some(())
    })
    .await;
    for n in 0..QOS1 {
        device
            .publish(&telemetry, &format!(r#"{{"q1": {n}}}"#))
            .await;
    }

    nats.restart().await;
    // Counters first: the test's own reads of JetStream wait for NATS to be back.
    eventually(
        "every message published or counted",
        Duration::from_secs(60),
        || async {
            let published = metric(
                &app,
                "fieldline_mqtt_messages_total",
                "outcome=\"published\"",
            )
            .await as usize;
            let shed = dropped(&app, "overload").await as usize;
            (published + shed == 1 + QOS0 + QOS1).then_some(())
        },
    )
    .await;
    let shed = dropped(&app, "overload").await as usize;
    assert!(shed > 0 && shed < QOS0, "shed {shed} of {QOS0}");
    assert_eq!(stored(&app, "q1").await, QOS1, "qos 1 lost");
    assert_eq!(
        stored(&app, "q0").await + shed,
        QOS0,
        "qos 0 lost uncounted"
    );
    app.shutdown().await;
}
