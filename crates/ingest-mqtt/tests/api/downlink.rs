use std::time::Duration;

use fieldline_common::time::now_us;
use fieldline_proto::v1::DeviceCommand;
use fieldline_testkit::{TestApp, TestEnv, eventually};
use prost::Message;
use serde_json::json;

use crate::{Listener, metric, spawn_mqtt, topic, wait_ready};

/// Publishes a DeviceCommand on the commands stream, as the registry's outbox does.
async fn push(app: &TestApp, command: DeviceCommand) {
    let subject = app
        .context
        .subjects
        .commands(&command.project, &command.device_id);
    app.context
        .jetstream
        .publish(subject, command.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn config(device: &str, version: i64, params: serde_json::Value) -> DeviceCommand {
    DeviceCommand {
        id: format!("cfg_default_{device}_{version}"),
        project: "default".into(),
        device_id: device.into(),
        kind: "config".into(),
        params_json: params.to_string(),
        version,
        ..Default::default()
    }
}

fn command(device: &str, id: &str, expires_at_us: i64) -> DeviceCommand {
    DeviceCommand {
        id: id.into(),
        project: "default".into(),
        device_id: device.into(),
        kind: "command".into(),
        name: "reboot".into(),
        params_json: json!({"delay_s": 5}).to_string(),
        expires_at_us,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_config_is_retained_and_a_stale_version_never_replaces_a_newer_one() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    wait_ready(&app).await;
    let config_topic = topic(&app, "d1", "config");
    let live = Listener::subscribe(&app, &config_topic).await;

    push(&app, config("d1", 2, json!({"interval_s": 10}))).await;
    eventually("config v2 live", Duration::from_secs(10), || async {
        (!live.messages().is_empty()).then_some(())
    })
    .await;
    // A device connecting afterwards gets it from the broker: it is retained.
    let late = Listener::subscribe(&app, &config_topic).await;
    let (retained, retain_flag) = eventually("retained config", Duration::from_secs(5), || async {
        late.messages().first().cloned()
    })
    .await;
    assert!(retain_flag);
    assert_eq!(retained["version"], 2);
    assert_eq!(retained["config"], json!({"interval_s": 10}));
    let updated_at = retained["updated_at"].as_str().unwrap();
    assert!(updated_at.ends_with('Z'), "{updated_at}");

    // Out of order, as after a redelivery: version 1 arrives after 2, then 3.
    push(&app, config("d1", 1, json!({"interval_s": 99}))).await;
    push(&app, config("d1", 3, json!({"interval_s": 30}))).await;
    eventually("config v3 live", Duration::from_secs(10), || async {
        (live.messages().len() >= 2).then_some(())
    })
    .await;
    let versions: Vec<_> = live
        .messages()
        .iter()
        .map(|(message, _)| message["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3]);
    assert!(
        metric(
            &app,
            "fieldline_mqtt_downlink_total",
            "outcome=\"stale_config\""
        )
        .await
            >= 1.0
    );
    let newest = Listener::subscribe(&app, &config_topic).await;
    let (retained, _) = eventually("retained v3", Duration::from_secs(5), || async {
        newest.messages().first().cloned()
    })
    .await;
    assert_eq!(retained["version"], 3);

    app.shutdown().await;
}

#[tokio::test]
async fn a_live_command_reaches_the_device_and_an_expired_one_does_not() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    wait_ready(&app).await;
    let listener = Listener::subscribe(&app, &topic(&app, "d1", "commands")).await;

    push(&app, command("d1", "cmd_old", now_us() - 1_000_000)).await;
    push(&app, command("d1", "cmd_new", now_us() + 60_000_000)).await;
    push(&app, command("d1", "cmd_forever", 0)).await;
    let messages = eventually("two commands", Duration::from_secs(10), || async {
        let messages = listener.messages();
        (messages.len() >= 2).then_some(messages)
    })
    .await;
    // Handled in stream order: the expired one was skipped before the others went out.
    let ids: Vec<_> = messages
        .iter()
        .map(|(message, _)| message["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["cmd_new", "cmd_forever"]);
    let (first, retained) = &messages[0];
    assert!(!retained);
    assert_eq!(first["name"], "reboot");
    assert_eq!(first["params"], json!({"delay_s": 5}));
    assert!(first["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(messages[1].0["expires_at"], serde_json::Value::Null);
    assert!(metric(&app, "fieldline_mqtt_downlink_total", "outcome=\"expired\"").await >= 1.0);
    app.shutdown().await;
}

/// While the broker is down nothing is acked in JetStream; once it is back, both messages go
/// out and are acked.
#[tokio::test]
async fn downlink_messages_wait_for_the_broker_and_are_not_lost() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    wait_ready(&app).await;
    let broker = app.env.broker();
    broker.stop();
    push(&app, command("d1", "cmd_while_down", 0)).await;
    push(&app, config("d1", 1, json!({"a": 1}))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (pending, acked) = consumer_state(&app).await;
    assert_eq!(acked, 0, "nothing acked while the broker is down");
    assert_eq!(pending, 2);

    broker.restart().await;
    eventually("both acked", Duration::from_secs(30), || async {
        (consumer_state(&app).await == (0, 2)).then_some(())
    })
    .await;
    let late = Listener::subscribe(&app, &topic(&app, "d1", "config")).await;
    let (retained, _) = eventually("retained config", Duration::from_secs(5), || async {
        late.messages().first().cloned()
    })
    .await;
    assert_eq!(retained["version"], 1);
    assert!(
        metric(
            &app,
            "fieldline_mqtt_downlink_total",
            "outcome=\"published\""
        )
        .await
            >= 2.0
    );
    app.shutdown().await;
}

/// (messages not yet acked, messages acked) of the downlink consumer.
async fn consumer_state(app: &TestApp) -> (u64, u64) {
    let stream = app
        .context
        .jetstream
        .get_stream(
            app.context
                .subjects
                .stream_name(fieldline_proto::Stream::Commands),
        )
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(fieldline_proto::consumers::MQTT_DOWNLINK)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (
        info.num_pending + info.num_ack_pending as u64,
        info.ack_floor.stream_sequence,
    )
}

async fn command_status(app: &TestApp, device: &str, id: &str) -> String {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/{device}/commands/{id}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    body["data"]["status"].as_str().unwrap().to_owned()
}

/// Through the real registry: a config change reaches the device as a retained message; a
/// command reaches it, is reported delivered, and the device's MQTT ack marks it acked.
#[tokio::test]
async fn a_command_round_trip_over_mqtt_with_the_registry() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let commands = Listener::subscribe(&app, &topic(&app, "d1", "commands")).await;

    let (status, body) = app
        .request(
            reqwest::Method::PUT,
            "/api/v1/devices/d1/config",
            Some(app.admin_key()),
            Some(&json!({"interval_s": 15})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let config_topic = topic(&app, "d1", "config");
    let live = Listener::subscribe(&app, &config_topic).await;
    eventually("config pushed", Duration::from_secs(10), || async {
        (!live.messages().is_empty()).then_some(())
    })
    .await;
    let late = Listener::subscribe(&app, &config_topic).await;
    let (config, retained) = eventually("retained config", Duration::from_secs(5), || async {
        late.messages().first().cloned()
    })
    .await;
    assert!(retained);
    assert_eq!(config["version"], 1);
    assert_eq!(config["config"], json!({"interval_s": 15}));

    let (status, body) = app
        .post(
            "/api/v1/devices/d1/commands",
            app.admin_key(),
            &json!({"name": "reboot", "params": {"delay_s": 1}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    let id = body["data"]["id"].as_str().unwrap().to_owned();
    let received = eventually("the command over mqtt", Duration::from_secs(10), || async {
        commands.messages().first().cloned()
    })
    .await;
    assert_eq!(received.0["id"], id.as_str());
    assert_eq!(received.0["params"], json!({"delay_s": 1}));
    eventually("delivered", Duration::from_secs(10), || async {
        (command_status(&app, "d1", &id).await == "delivered").then_some(())
    })
    .await;

    let ack_topic = topic(&app, "d1", "commands/ack");
    let device = crate::Device::connect(&app, "d1", &token).await;
    device
        .publish(&ack_topic, &json!({"id": id, "status": "ok"}).to_string())
        .await;
    eventually("acked", Duration::from_secs(10), || async {
        (command_status(&app, "d1", &id).await == "acked").then_some(())
    })
    .await;

    // Acks for no such command, or malformed, are dropped and counted; the loop goes on.
    device
        .publish(&ack_topic, r#"{"id": "cmd_nope", "status": "ok"}"#)
        .await;
    device
        .publish(&ack_topic, r#"{"id": "cmd_x", "status": "maybe"}"#)
        .await;
    eventually("drops counted", Duration::from_secs(10), || async {
        let unknown = metric(
            &app,
            "fieldline_mqtt_dropped_total",
            "reason=\"unknown_command\"",
        )
        .await;
        let malformed = metric(&app, "fieldline_mqtt_dropped_total", "reason=\"malformed\"").await;
        (unknown >= 1.0 && malformed >= 1.0).then_some(())
    })
    .await;
    // Every ack was answered to the device's broker session (PUBACKs for all three).
    eventually("pubacks", Duration::from_secs(10), || async {
        (device.pubacks() >= 3).then_some(())
    })
    .await;
    assert!(
        metric(
            &app,
            "fieldline_mqtt_messages_total",
            "outcome=\"forwarded\""
        )
        .await
            >= 1.0
    );

    app.shutdown().await;
}
