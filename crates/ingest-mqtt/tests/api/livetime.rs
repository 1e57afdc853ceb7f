//! Live time over MQTT: a message with a reading far from now is dropped, counted as
//! `out_of_window` and acknowledged (never redelivered), and nothing else is held up
//! (issue 16).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{TimeZone, Utc};
use fieldline_common::time::format_rfc3339;
use fieldline_testkit::{TestApp, TestEnv, eventually, live_time_defaults};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::{metric, mqtt_port, topic, wait_ready};

/// A device whose client sends packets as large as the platform takes (rumqttc's default
/// stops at 10 KiB); returns its client and its PUBACK count.
async fn connect(app: &TestApp, id: &str, token: &str) -> (AsyncClient, Arc<AtomicUsize>) {
    let username = format!("{}/default/{id}", app.context.config.mqtt_topic_root);
    // A device's client id is its user name.
    let mut options = MqttOptions::new(username.clone(), "127.0.0.1", mqtt_port(app));
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_credentials(username, token)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let pubacks = Arc::new(AtomicUsize::new(0));
    let counter = pubacks.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, pubacks)
}

async fn partitions(app: &TestApp) -> i64 {
    app.env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry.readings'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn readings(app: &TestApp, device: &str) -> usize {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/{device}/readings"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn the_four_thousand_day_message_is_dropped_counted_and_acknowledged() {
    let env = TestEnv::new().await.with_broker().await;
    let app = TestApp::spawn_with(env, live_time_defaults, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_mqtt::start(&context).await?,
            query_api::start(&context).await?,
        ])
    })
    .await;
    let attacker_token = app.create_device("attacker").await;
    let neighbour_token = app.create_device("neighbour").await;
    wait_ready(&app).await;
    let before = eventually("partitions made ahead", Duration::from_secs(10), || async {
        let count = partitions(&app).await;
        (count >= 9).then_some(count)
    })
    .await;

    let start = Utc.with_ymd_and_hms(2300, 1, 1, 12, 0, 0).unwrap();
    let messages: Vec<String> = (0..4_000)
        .map(|day| {
            let ts = format_rfc3339(&(start + chrono::Duration::days(day)));
            format!(r#"{{"ts":"{ts}","temp":{day}}}"#)
        })
        .collect();
    let body = format!("[{}]", messages.join(","));
    let (attacker, attacker_pubacks) = connect(&app, "attacker", &attacker_token).await;
    attacker
        .publish(
            topic(&app, "attacker", "telemetry"),
            QoS::AtLeastOnce,
            false,
            body.into_bytes(),
        )
        .await
        .unwrap();
    eventually(
        "the drop, counted and acked",
        Duration::from_secs(15),
        || async {
            let dropped = metric(
                &app,
                "fieldline_mqtt_dropped_total",
                "reason=\"out_of_window\"",
            )
            .await;
            (dropped == 1.0 && attacker_pubacks.load(Ordering::SeqCst) == 1).then_some(())
        },
    )
    .await;

    let (neighbour, _) = connect(&app, "neighbour", &neighbour_token).await;
    neighbour
        .publish(
            topic(&app, "neighbour", "telemetry"),
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 21.5}"#.to_vec(),
        )
        .await
        .unwrap();
    eventually(
        "the neighbour's reading",
        Duration::from_secs(15),
        || async { (readings(&app, "neighbour").await == 1).then_some(()) },
    )
    .await;
    assert_eq!(readings(&app, "attacker").await, 0);
    let batches = app.telemetry_batches().await;
    assert!(
        batches
            .iter()
            .all(|(_, batch)| batch.device_id == "neighbour"),
        "{batches:?}"
    );
    assert_eq!(partitions(&app).await, before);
    // Not redelivered: still one drop after the broker had every chance to resend.
    assert_eq!(
        metric(
            &app,
            "fieldline_mqtt_dropped_total",
            "reason=\"out_of_window\""
        )
        .await,
        1.0
    );
    app.shutdown().await;
}
