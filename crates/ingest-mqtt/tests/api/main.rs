//! ingest-mqtt against the real Mosquitto, NATS and PostgreSQL, with the real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod batches;
mod downlink;
mod identity;
mod ingest;
mod junk;
mod limits;
mod livetime;
mod outages;
mod scale_out;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use fieldline_testkit::{TestApp, TestEnv};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The registry and ingest-mqtt on the test's own broker (one is started when `env` has none).
pub async fn spawn_mqtt(
    env: TestEnv,
    tweak: impl FnOnce(fieldline_common::Config) -> fieldline_common::Config,
) -> TestApp {
    let env = match env.broker {
        Some(_) => env,
        None => env.with_broker().await,
    };
    TestApp::spawn_with(env, tweak, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_mqtt::start(&context).await?,
        ])
    })
    .await
}

/// Waits until ingest-mqtt reports ready (connected and subscribed).
pub async fn wait_ready(app: &TestApp) {
    fieldline_testkit::eventually("ingest-mqtt ready", Duration::from_secs(15), || async {
        let response = app
            .http
            .get(format!("{}/health/ready", app.base_url))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    // The subscription is sent right after the CONNACK; give the broker a moment to apply it.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Waits until `count` telemetry batches are in JetStream.
pub async fn batches_in_jetstream(app: &TestApp, count: usize, what: &str) {
    fieldline_testkit::eventually(what, Duration::from_secs(20), || async {
        (app.telemetry_batches().await.len() == count).then_some(())
    })
    .await;
}

/// A device on the broker: publishes and counts the PUBACKs it gets back.
pub struct Device {
    pub client: AsyncClient,
    pub pubacks: Arc<AtomicUsize>,
    events: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Logs in as device `id` of project `default` with its token (a device's client id is
    /// its user name).
    pub async fn connect(app: &TestApp, id: &str, token: &str) -> Self {
        let username = format!("{}/default/{id}", app.context.config.mqtt_topic_root);
        Self::connect_with_id(mqtt_port(app), &username, &username, token).await
    }

    /// Logs in with any user and password (another account, or a wrong password).
    pub async fn connect_as(port: u16, username: &str, password: &str) -> Self {
        let client_id = format!("dev-{}", fieldline_testkit::unique_suffix());
        Self::connect_with_id(port, &client_id, username, password).await
    }

    async fn connect_with_id(port: u16, client_id: &str, username: &str, password: &str) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_credentials(username, password)
            // Devices may send more than the platform takes: what the broker or ingest-mqtt
            // then does is under test.
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let pubacks = Arc::new(AtomicUsize::new(0));
        let counter = pubacks.clone();
        let events = tokio::spawn(async move {
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
            client,
            pubacks,
            events,
        }
    }

    pub async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    pub async fn publish_qos0(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    pub fn pubacks(&self) -> usize {
        self.pubacks.load(Ordering::SeqCst)
    }

    /// Disconnects for good (the event loop would otherwise connect again).
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.events.abort();
    }
}

/// The plain listener of the test's broker, where test clients connect (ingest-mqtt may log
/// in over another, TLS, listener).
pub fn mqtt_port(app: &TestApp) -> u16 {
    app.env.broker().port
}

pub fn topic(app: &TestApp, device: &str, kind: &str) -> String {
    format!(
        "{}/default/{device}/{kind}",
        app.context.config.mqtt_topic_root
    )
}

/// A device listening on one topic: every message it got, with its retain flag, as JSON.
pub struct Listener {
    pub client: AsyncClient,
    pub messages: Arc<Mutex<Vec<(serde_json::Value, bool)>>>,
    subacked: Arc<AtomicUsize>,
}

impl Listener {
    /// Connects as the broker's admin (who may read any topic) and subscribes at QoS 1;
    /// returns once the broker confirmed the subscription.
    pub async fn subscribe(app: &TestApp, topic: &str) -> Self {
        Self::connect(app, topic, true).await
    }

    /// With a persistent session: the broker queues what arrives while it is away (or the
    /// broker restarts), and it reconnects by itself.
    pub async fn subscribe_persistent(app: &TestApp, topic: &str) -> Self {
        Self::connect(app, topic, false).await
    }

    async fn connect(app: &TestApp, topic: &str, clean_session: bool) -> Self {
        let (username, password) = app.env.broker().admin_login();
        let mut options = MqttOptions::new(
            format!("listen-{}", fieldline_testkit::unique_suffix()),
            "127.0.0.1",
            mqtt_port(app),
        );
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(clean_session)
            .set_credentials(username, password);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let messages: Arc<Mutex<Vec<(serde_json::Value, bool)>>> = Arc::default();
        let subacked = Arc::new(AtomicUsize::new(0));
        let (seen, acks) = (messages.clone(), subacked.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let value = serde_json::from_slice(&publish.payload)
                            .unwrap_or(serde_json::Value::Null);
                        seen.lock().unwrap().push((value, publish.retain));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        let listener = Self {
            client,
            messages,
            subacked,
        };
        fieldline_testkit::eventually("suback", Duration::from_secs(5), || async {
            (listener.subacked.load(Ordering::SeqCst) > 0).then_some(())
        })
        .await;
        listener
    }

    pub fn messages(&self) -> Vec<(serde_json::Value, bool)> {
        self.messages.lock().unwrap().clone()
    }
}

/// A counter of `/metrics` with the given name and label (`name{label}`), 0 when absent.
pub async fn metric(app: &TestApp, name: &str, label: &str) -> f64 {
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
        .find(|line| line.starts_with(name) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
