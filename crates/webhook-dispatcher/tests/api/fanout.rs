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
