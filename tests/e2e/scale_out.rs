//! Two ingest-mqtt processes, one killed with SIGKILL under load and never started again
//! (docs/decisions/2026-12-05-mqtt-scale-out.md).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::platform::Platform;

const DEVICES: usize = 10;
/// 20 messages a second per device: 200 msg/s in all.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// A device that publishes `{"ts": base + n, "n": n}` with n = 1, 2, … at QoS 1 and counts
/// the broker's PUBACKs.
struct Device {
    id: String,
    client: AsyncClient,
    pubacks: Arc<AtomicI64>,
    sent: Arc<AtomicI64>,
}

impl Device {
    async fn create(platform: &Platform, id: &str) -> Self {
        let (status, body) = platform
            .post("/api/v1/devices", platform.admin_key(), &json!({"id": id}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let token = body["data"]["token"].as_str().unwrap().to_owned();
        let (host, port) = platform.mqtt_host_port();
        let username = format!("{}/default/{id}", platform.topic_root());
        let mut options = MqttOptions::new(username.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_credentials(username, token);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let pubacks = Arc::new(AtomicI64::new(0));
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
        Self {
            id: id.to_owned(),
            client,
            pubacks,
            sent: Arc::default(),
        }
    }
}

pub async fn one_of_two_ingest_mqtt_killed_for_good(platform: &mut Platform) {
    // Both on this host: the second needs a name of its own (its downlink's client id).
    platform
        .spawn_another(
            "ingest-mqtt",
            "ingest-mqtt-2",
            &[("FIELDLINE_MQTT_CLIENT_ID", "second-ingest-mqtt")],
        )
        .await;
    let mut devices = Vec::new();
    for index in 0..DEVICES {
        devices.push(Arc::new(
            Device::create(platform, &format!("load-{index}")).await,
        ));
    }
    let topic_root = platform.topic_root().to_owned();
    let base_ms = chrono_now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = devices
        .iter()
        .map(|device| {
            let (device, stop) = (device.clone(), stop.clone());
            let topic = format!("{topic_root}/default/{}/telemetry", device.id);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(PUBLISH_EVERY);
                while !stop.load(Ordering::SeqCst) {
                    ticks.tick().await;
                    let n = device.sent.load(Ordering::SeqCst) + 1;
                    let payload = format!(r#"{{"ts": {}, "n": {n}}}"#, base_ms + n);
                    device
                        .client
                        .publish(&topic, QoS::AtLeastOnce, false, payload.into_bytes())
                        .await
                        .unwrap();
                    device.sent.store(n, Ordering::SeqCst);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    platform.kill_for_good("ingest-mqtt-2");
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    for device in &devices {
        fieldline_testkit::eventually(
            "the broker's PUBACK for every message",
            Duration::from_secs(20),
            || async {
                (device.pubacks.load(Ordering::SeqCst) == device.sent.load(Ordering::SeqCst))
                    .then_some(())
            },
        )
        .await;
    }
    let sent: HashMap<String, i64> = devices
        .iter()
        .map(|device| (device.id.clone(), device.sent.load(Ordering::SeqCst)))
        .collect();
    let total: i64 = sent.values().sum();

    // What the writer stored in PostgreSQL, one row per message (metric `n`).
    let pg = platform.env.pg().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let missing = loop {
        let rows = pg
            .query(
                "SELECT s.device_id, count(*) FROM telemetry.readings r
                 JOIN telemetry.series s USING (series_id)
                 WHERE s.metric = 'n' GROUP BY s.device_id",
                &[],
            )
            .await
            .unwrap();
        let stored: HashMap<String, i64> = rows
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
            .collect();
        let missing: i64 = sent
            .iter()
            .map(|(id, sent)| sent - stored.get(id).copied().unwrap_or(0))
            .sum();
        if missing == 0 || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!("{total} readings acknowledged by the broker, {missing} not in PostgreSQL");
    assert_eq!(
        missing, 0,
        "{missing} of {total} acknowledged readings never stored"
    );
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}
