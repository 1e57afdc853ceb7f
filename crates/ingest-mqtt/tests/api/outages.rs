use std::time::Duration;

use fieldline_testkit::{TestEnv, eventually, servers::PrivateNats};

use crate::{Device, spawn_mqtt, topic, wait_ready};

/// ingest-mqtt acknowledges a message to the broker only once JetStream has it. While NATS
/// is down nothing is acknowledged, so when ingest-mqtt stops in that state the broker keeps
/// the message in the persistent session and hands it to the next instance.
#[tokio::test]
async fn a_message_not_yet_in_jetstream_is_not_acked_to_the_broker() {
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let env = TestEnv::new().await.with_broker().await;
    let client_id = format!("{}-ingest", env.id);
    let tweak = |url: String, client_id: String| {
        move |config| fieldline_common::Config {
            nats_url: url.into(),
            mqtt_client_id: Some(client_id),
            ..config
        }
    };
    let app = spawn_mqtt(env, tweak(url.clone(), client_id.clone())).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    eventually("first message", Duration::from_secs(10), || async {
        (app.telemetry_batches().await.len() == 1).then_some(())
    })
    .await;

    nats.kill();
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 2, "a": 2}"#)
        .await;
    // The broker has it (the device got its PUBACK) and ingest-mqtt is retrying it.
    eventually(
        "broker puback to the device",
        Duration::from_secs(10),
        || async { (device.pubacks() == 2).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let env = app.stop().await;

    nats.restart().await;
    let app = spawn_mqtt(env, tweak(url, client_id)).await;
    let messages = eventually(
        "the unacked message redelivered",
        Duration::from_secs(30),
        || async {
            let messages = app.telemetry_batches().await;
            (messages.len() == 2).then_some(messages)
        },
    )
    .await;
    assert_eq!(messages[1].1.readings[0].ts_us, 2_000);
    app.shutdown().await;
}

#[tokio::test]
async fn reconnects_when_the_broker_restarts() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    eventually("first message", Duration::from_secs(10), || async {
        (app.telemetry_batches().await.len() == 1).then_some(())
    })
    .await;

    app.env.broker().restart().await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 2, "a": 2}"#)
        .await;
    eventually(
        "message after the restart",
        Duration::from_secs(20),
        || async { (app.telemetry_batches().await.len() == 2).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

/// A NATS outage longer than a slot's lease lets every slot go (no instance may hold one it
/// cannot refresh); when NATS is back the slots are leased again and messages flow.
#[tokio::test]
async fn slots_let_go_during_a_nats_outage_are_leased_again_after_it() {
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let env = TestEnv::new().await.with_broker().await;
    let app = spawn_mqtt(env, move |config| fieldline_common::Config {
        nats_url: url.into(),
        mqtt_slot_lease: Duration::from_secs(4),
        ..config
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;

    nats.kill();
    // Three quarters of the lease, then the watchdogs close the slots' connections.
    tokio::time::sleep(Duration::from_secs(5)).await;
    nats.restart().await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    eventually(
        "the message after the outage",
        Duration::from_secs(20),
        || async { (app.telemetry_batches().await.len() == 1).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

/// The lease bucket removed under a running instance (a NATS that lost its store): the
/// instance lets its slots go, makes the bucket again and leases them anew.
#[tokio::test]
async fn a_lost_lease_bucket_is_made_again_and_the_slots_leased_anew() {
    let app = spawn_mqtt(TestEnv::new().await, |config| fieldline_common::Config {
        mqtt_slot_lease: Duration::from_secs(4),
        ..config
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let bucket = app.context.subjects.mqtt_slots_bucket();
    app.context
        .jetstream
        .delete_stream(format!("KV_{bucket}"))
        .await
        .unwrap();
    eventually(
        "the bucket made again and every slot leased",
        Duration::from_secs(20),
        || async {
            let store = app.context.jetstream.get_key_value(&bucket).await.ok()?;
            let mut leased = 0;
            for slot in 0..app.context.config.mqtt_slots {
                if store.get(format!("slot.{slot}")).await.ok()??.is_empty() {
                    return None;
                }
                leased += 1;
            }
            (leased == app.context.config.mqtt_slots).then_some(())
        },
    )
    .await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    eventually(
        "the message afterwards",
        Duration::from_secs(20),
        || async { (app.telemetry_batches().await.len() == 1).then_some(()) },
    )
    .await;
    app.shutdown().await;
}
