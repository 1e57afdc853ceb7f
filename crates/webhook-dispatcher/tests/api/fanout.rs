//! Failures stay local in fan-out: a message whose device cannot be looked up waits alone,
//! and the messages it shares a batch with (other devices, other projects) go on.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fieldline_proto::v1::{
    DeviceLookupRequest, DeviceLookupResponse, Reading, TelemetryBatch, reading,
};
use fieldline_testkit::{TestApp, receiver::Receiver};
use futures::StreamExt;
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;

use crate::{register, spawn, test_config, wait_received};

async fn publish(
    jetstream: &async_nats::jetstream::Context,
    subjects: &fieldline_proto::Subjects,
    device_id: &str,
    value: f64,
) {
    let batch = TelemetryBatch {
        project: "default".into(),
        device_id: device_id.into(),
        readings: vec![Reading {
            metric: "temp".into(),
            ts_us: 1_767_225_600_000_000,
            value: Some(reading::Value::Number(value)),
        }],
        received_at_us: 1_767_225_600_000_000,
        source: "test".into(),
        message_id: String::new(),
        devices: Vec::new(),
        series: Vec::new(),
    };
    jetstream
        .publish(
            subjects.telemetry("default", device_id),
            batch.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_lookup_for_one_event_delays_only_that_event() {
    // Set up with the whole platform: two devices in group g1, a webhook for the group.
    let app = spawn().await;
    let receiver = Receiver::start().await;
    for id in ["d1", "d2"] {
        let (status, body) = app
            .post(
                "/api/v1/devices",
                app.admin_key(),
                &json!({"id": id, "group": "g1"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/g1"), "events": ["device.data"], "group": "g1"}),
    )
    .await;
    let env = app.stop().await;

    // Now the dispatcher alone; this test answers the device lookups the registry would,
    // for d2 only: d1's lookups time out, as when the registry cannot answer for it.
    let answer_d1 = Arc::new(AtomicBool::new(false));
    let nats = env.nats().await;
    let mut lookups = nats
        .subscribe(env.config().subjects().rpc_auth_device())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let responder = {
        let nats = nats.clone();
        let answer_d1 = answer_d1.clone();
        tokio::spawn(async move {
            while let Some(message) = lookups.next().await {
                let request = DeviceLookupRequest::decode(message.payload.as_ref()).unwrap();
                if request.device_id == "d1" && !answer_d1.load(Ordering::SeqCst) {
                    continue;
                }
                let response = DeviceLookupResponse {
                    found: true,
                    device_type: String::new(),
                    group: "g1".into(),
                    rate_limit: None,
                    tags: Vec::new(),
                };
                if let Some(reply) = message.reply {
                    nats.publish(reply, response.encode_to_vec().into())
                        .await
                        .unwrap();
                }
            }
        })
    };
    // Both wait on the stream before the dispatcher comes back, so it takes them in one batch.
    let jetstream = async_nats::jetstream::new(nats.clone());
    let subjects = env.config().subjects();
    publish(&jetstream, &subjects, "d1", 1.0).await;
    publish(&jetstream, &subjects, "d2", 2.0).await;
    let app = TestApp::spawn_with(env, test_config, |context| async move {
        Ok(vec![webhook_dispatcher::start(&context).await?])
    })
    .await;

    let received = wait_received(&receiver, "/g1", 1, Duration::from_secs(10)).await;
    assert_eq!(received[0].json()["device_id"], "d2");
    // d1 is still waiting for its lookup, and is not lost: once it can be looked up, it goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received("/g1").len(), 1);
    answer_d1.store(true, Ordering::SeqCst);
    let received = wait_received(&receiver, "/g1", 2, Duration::from_secs(20)).await;
    assert_eq!(received[1].json()["device_id"], "d1");
    responder.abort();
    app.shutdown().await;
}

fn temp(value: f64) -> Vec<Reading> {
    vec![Reading {
        metric: "temp".into(),
        ts_us: 1_767_225_600_000_000,
        value: Some(reading::Value::Number(value)),
    }]
}

/// A bus message of several devices (ingest-mqtt under load) makes one device.data event per
/// device, each to the webhooks that want that device, with ids of their own; the same bus
/// message delivered again (its stream sequence unchanged) makes the same ids, so no
/// delivery twice.
#[tokio::test]
async fn a_batch_of_several_devices_fans_out_per_device_with_ids_stable_on_redelivery() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    for id in ["d1", "d2", "d3"] {
        app.create_device(id).await;
    }
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/all"), "events": ["device.data"]}),
    )
    .await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/d2"), "events": ["device.data"], "device_ids": ["d2"]}),
    )
    .await;
    let batch = fieldline_testkit::multi_device_batch(
        "default",
        vec![("d1", temp(1.0)), ("d2", temp(2.0)), ("d3", temp(3.0))],
        1_767_225_600_000_000,
    );
    let sequence = app.publish_telemetry(&batch).await;
    let all = wait_received(&receiver, "/all", 3, Duration::from_secs(10)).await;
    let mut seen: Vec<(String, f64, String)> = all
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["device_id"].as_str().unwrap().to_owned(),
                body["payload"]["readings"][0]["value"].as_f64().unwrap(),
                body["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let devices: Vec<(&str, f64)> = seen.iter().map(|(d, v, _)| (d.as_str(), *v)).collect();
    assert_eq!(devices, vec![("d1", 1.0), ("d2", 2.0), ("d3", 3.0)]);
    let mut ids: Vec<&str> = seen.iter().map(|(_, _, id)| id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one event id per device: {seen:?}");
    let only_d2 = wait_received(&receiver, "/d2", 1, Duration::from_secs(10)).await;
    assert_eq!(only_d2[0].json()["device_id"], "d2");
    assert_eq!(
        only_d2[0].json()["id"],
        seen[1].2.as_str(),
        "one event, two webhooks"
    );

    // The same bus message once more: the fan-out consumer starts again from its sequence,
    // as after a lost ack. A reading published after it shows when it has been handled.
    let env = app.stop().await;
    let nats = env.nats().await;
    let jetstream = async_nats::jetstream::new(nats);
    let subjects = env.config().subjects();
    let stream = jetstream
        .get_stream(subjects.stream_name(fieldline_proto::Stream::Telemetry))
        .await
        .unwrap();
    stream
        .delete_consumer(fieldline_proto::consumers::WEBHOOK_DATA)
        .await
        .unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(fieldline_proto::consumers::WEBHOOK_DATA.to_owned()),
            filter_subject: subjects.telemetry_all(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence,
            },
            ..Default::default()
        })
        .await
        .unwrap();
    publish(&jetstream, &subjects, "d1", 9.0).await;
    let app = TestApp::spawn_with(env, test_config, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            webhook_dispatcher::start(&context).await?,
        ])
    })
    .await;
    let all = wait_received(&receiver, "/all", 4, Duration::from_secs(10)).await;
    assert_eq!(all[3].json()["payload"]["readings"][0]["value"], 9.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.received("/all").len(),
        4,
        "a device's event sent twice"
    );
    assert_eq!(receiver.received("/d2").len(), 1, "d2's event sent twice");
    app.shutdown().await;
}
