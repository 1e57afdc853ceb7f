//! The steady load of the fault suite and the soak: HTTP devices posting batches and MQTT
//! devices publishing at QoS 1, each at a fixed rate. It keeps exactly which readings were
//! acknowledged (a 202, a PUBACK), when, and what every attempt came back with, so that what
//! is stored can be compared reading by reading.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rumqttc::{Event, Outgoing, Packet, QoS};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::MissedTickBehavior};

use crate::platform::Platform;

/// Device ids start with these: what is stored is counted per channel by prefix.
pub const HTTP_PREFIX: &str = "http-";
pub const MQTT_PREFIX: &str = "mqtt-";

/// How many devices send how often.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub http_devices: usize,
    /// Requests a second of each HTTP device.
    pub http_rate: f64,
    pub readings_per_request: usize,
    pub mqtt_devices: usize,
    /// Messages a second of each MQTT device (one reading each).
    pub mqtt_rate: f64,
}

impl Shape {
    /// Readings a second, every device together.
    pub fn readings_per_second(&self) -> f64 {
        self.http_devices as f64 * self.http_rate * self.readings_per_request as f64
            + self.mqtt_devices as f64 * self.mqtt_rate
    }

    /// The same devices at `factor` of the rate.
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            http_rate: self.http_rate * factor,
            mqtt_rate: self.mqtt_rate * factor,
            ..self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Http,
    Mqtt,
}

/// What one attempt came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// HTTP 202, or the broker's PUBACK.
    Acknowledged,
    /// HTTP 503.
    Unavailable,
    /// Any other 5xx.
    ServerError,
    /// Any other status (4xx).
    Refused,
    /// No answer: connection refused or reset, timeout; an MQTT message whose connection
    /// dropped before its PUBACK.
    Failed,
}

/// One attempt: when it finished (since the load started), on which channel, how.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub at: Duration,
    pub channel: Channel,
    pub outcome: Outcome,
}

/// The readings one device had acknowledged: their times, in ms.
pub struct Acknowledged {
    pub device: String,
    pub channel: Channel,
    pub times: Vec<i64>,
    /// When each of `times` was acknowledged, since the load started.
    pub acknowledged_at: Vec<Duration>,
    /// The time before the device's first reading: `times` less it are sequence numbers.
    pub first_ms: i64,
}

/// The devices' credentials, made before the load starts.
pub struct Devices {
    http: Vec<String>,
    mqtt: Vec<String>,
}

impl Devices {
    pub async fn create(platform: &Platform, shape: &Shape) -> anyhow::Result<Self> {
        Ok(Self {
            http: platform
                .create_devices(HTTP_PREFIX, shape.http_devices)
                .await?,
            mqtt: platform
                .create_devices(MQTT_PREFIX, shape.mqtt_devices)
                .await?,
        })
    }
}

/// The running load.
pub struct Load {
    pub started: Instant,
    stopping: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    tasks: Vec<JoinHandle<Acknowledged>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ticker(rate: f64) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.01)));
    // A device that waited on a slow answer carries on at its pace, it does not burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

impl Load {
    /// Starts every device. Reading times start at now and step 1 ms per reading of a device,
    /// slower than the clock, so they stay inside the live window and never repeat.
    pub fn start(platform: &Platform, shape: &Shape, devices: &Devices) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let load = Self {
            started: Instant::now(),
            stopping: Arc::default(),
            attempts: Arc::default(),
            tasks: Vec::new(),
        };
        let first_ms = now_ms() - 60_000;
        let mut load = load;
        let url = format!("{}/api/v1/ingest", platform.url("ingest-http"));
        for (index, token) in devices.http.iter().enumerate() {
            let device = HttpDevice {
                device: format!("{HTTP_PREFIX}{index}"),
                token: token.clone(),
                url: url.clone(),
                http: http.clone(),
                first_ms,
                shape: *shape,
            };
            load.tasks.push(tokio::spawn(device.run(
                load.started,
                load.stopping.clone(),
                load.attempts.clone(),
            )));
        }
        for (index, token) in devices.mqtt.iter().enumerate() {
            let device = MqttDevice {
                device: format!("{MQTT_PREFIX}{index}"),
                username: format!("{}/default/{MQTT_PREFIX}{index}", platform.id),
                token: token.clone(),
                servers: platform.servers.clone(),
                first_ms,
                rate: shape.mqtt_rate,
            };
            load.tasks.push(tokio::spawn(device.run(
                load.started,
                load.stopping.clone(),
                load.attempts.clone(),
            )));
        }
        Ok(load)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every device after its attempt in flight; returns what each had acknowledged.
    pub async fn stop(&mut self) -> anyhow::Result<Vec<Acknowledged>> {
        self.stopping.store(true, Ordering::Relaxed);
        let mut acknowledged = Vec::new();
        for task in self.tasks.drain(..) {
            acknowledged.push(task.await?);
        }
        Ok(acknowledged)
    }
}

fn record(attempts: &Mutex<Vec<Attempt>>, started: Instant, channel: Channel, outcome: Outcome) {
    attempts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Attempt {
            at: started.elapsed(),
            channel,
            outcome,
        });
}

struct HttpDevice {
    device: String,
    token: String,
    url: String,
    http: reqwest::Client,
    first_ms: i64,
    shape: Shape,
}

impl HttpDevice {
    async fn run(
        self,
        started: Instant,
        stopping: Arc<AtomicBool>,
        attempts: Arc<Mutex<Vec<Attempt>>>,
    ) -> Acknowledged {
        let mut acknowledged = Vec::new();
        let mut acknowledged_at = Vec::new();
        let mut ticker = ticker(self.shape.http_rate);
        let mut sequence = 0i64;
        let per_request = self.shape.readings_per_request as i64;
        while !stopping.load(Ordering::Relaxed) {
            ticker.tick().await;
            let first = sequence + 1;
            sequence += per_request;
            let body: Vec<Value> = (first..=sequence)
                .map(|n| json!({"ts": self.first_ms + n, "temperature": (n % 400) as f64 / 10.0}))
                .collect();
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await;
            let outcome = match response.map(|r| r.status().as_u16()) {
                Ok(202) => Outcome::Acknowledged,
                Ok(503) => Outcome::Unavailable,
                Ok(500..=599) => Outcome::ServerError,
                Ok(_) => Outcome::Refused,
                Err(_) => Outcome::Failed,
            };
            if outcome == Outcome::Acknowledged {
                acknowledged.extend((first..=sequence).map(|n| self.first_ms + n));
                acknowledged_at.resize(acknowledged.len(), started.elapsed());
            }
            record(&attempts, started, Channel::Http, outcome);
        }
        Acknowledged {
            device: self.device,
            channel: Channel::Http,
            times: acknowledged,
            acknowledged_at,
            first_ms: self.first_ms,
        }
    }
}

/// What a device's event loop tells its publisher; `u64` is the connection's number.
enum Note {
    Connected(u64),
    Sent(u64),
    Acked(u64),
}

struct MqttDevice {
    device: String,
    username: String,
    token: String,
    servers: crate::platform::Servers,
    first_ms: i64,
    rate: f64,
}

/// Longest a publisher waits for its message's fate before it gives up on the device (its
/// count is exact only while it knows which PUBACK is whose).
const MQTT_ACK_WAIT: Duration = Duration::from_secs(120);

impl MqttDevice {
    /// One message in flight at a time, so each PUBACK is the one message's. A message sent
    /// on a connection that dropped before its PUBACK is unacknowledged: the client starts a
    /// clean session, so it never sends it again.
    async fn run(
        self,
        started: Instant,
        stopping: Arc<AtomicBool>,
        attempts: Arc<Mutex<Vec<Attempt>>>,
    ) -> Acknowledged {
        let mut acknowledged = Vec::new();
        let mut acknowledged_at = Vec::new();
        let topic = format!("{}/telemetry", self.username);
        let (client, mut eventloop) =
            self.servers
                .device_client(false, String::new(), &self.username, &self.token, 1, 16);
        let (notes, mut received) = mpsc::channel::<Note>(64);
        let loop_stopping = stopping.clone();
        let events = tokio::spawn(async move {
            let mut connection = 0u64;
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connection += 1;
                        Note::Connected(connection)
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => Note::Sent(connection),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Note::Acked(connection),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => continue,
                    Err(_) if loop_stopping.load(Ordering::Relaxed) => break,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                if notes.send(note).await.is_err() {
                    break;
                }
            }
        });
        let mut ticker = ticker(self.rate);
        let mut sequence = 0i64;
        'device: while !stopping.load(Ordering::Relaxed) {
            ticker.tick().await;
            sequence += 1;
            let ts = self.first_ms + sequence;
            let payload = format!("{{\"ts\": {ts}, \"temperature\": {}}}", sequence % 400);
            if client
                .publish(&topic, QoS::AtLeastOnce, false, payload.into_bytes())
                .await
                .is_err()
            {
                break;
            }
            let deadline = tokio::time::Instant::now() + MQTT_ACK_WAIT;
            let mut sent_on = None;
            let outcome = loop {
                match tokio::time::timeout_at(deadline, received.recv()).await {
                    Ok(Some(Note::Sent(connection))) => sent_on = Some(connection),
                    Ok(Some(Note::Acked(connection))) if sent_on == Some(connection) => {
                        break Outcome::Acknowledged;
                    }
                    Ok(Some(Note::Acked(_))) => {}
                    Ok(Some(Note::Connected(connection))) => {
                        if sent_on.is_some_and(|sent| sent < connection) {
                            break Outcome::Failed;
                        }
                    }
                    Ok(None) | Err(_) => {
                        record(&attempts, started, Channel::Mqtt, Outcome::Failed);
                        break 'device;
                    }
                }
            };
            if outcome == Outcome::Acknowledged {
                acknowledged.push(ts);
                acknowledged_at.push(started.elapsed());
            }
            record(&attempts, started, Channel::Mqtt, outcome);
        }
        let _ = client.disconnect().await;
        drop(received);
        let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
        Acknowledged {
            device: self.device,
            channel: Channel::Mqtt,
            times: acknowledged,
            acknowledged_at,
            first_ms: self.first_ms,
        }
    }
}

/// What the platform's database holds of the load's devices: (device, time in ms), in rows
/// and in compressed blocks.
pub async fn stored_readings(
    client: &tokio_postgres::Client,
) -> anyhow::Result<HashSet<(String, i64)>> {
    let rows = client
        .query(
            "SELECT s.device_id, (extract(epoch FROM r.ts) * 1000)::int8
             FROM telemetry.readings r JOIN telemetry.series s USING (series_id)
             WHERE s.project = 'default' AND (s.device_id LIKE $1 || '%' OR s.device_id LIKE $2 || '%')",
            &[&HTTP_PREFIX, &MQTT_PREFIX],
        )
        .await?;
    let mut stored: HashSet<(String, i64)> = rows
        .into_iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect();
    let blocks = client
        .query(
            "SELECT s.device_id, b.data
             FROM telemetry.blocks b JOIN telemetry.series s USING (series_id)
             WHERE s.project = 'default' AND (s.device_id LIKE $1 || '%' OR s.device_id LIKE $2 || '%')",
            &[&HTTP_PREFIX, &MQTT_PREFIX],
        )
        .await?;
    for row in &blocks {
        let device: String = row.get(0);
        for (ts_us, _) in query_api::blocks::decode(row.get(1))? {
            stored.insert((device.clone(), ts_us.div_euclid(1000)));
        }
    }
    Ok(stored)
}

/// Readings stored per channel, from the series dictionary (cheap enough to poll).
pub async fn stored_counts(client: &tokio_postgres::Client) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one(
            "SELECT COALESCE(sum(count) FILTER (WHERE device_id LIKE $1 || '%'), 0)::int8,
                    COALESCE(sum(count) FILTER (WHERE device_id LIKE $2 || '%'), 0)::int8
             FROM telemetry.series WHERE project = 'default'",
            &[&HTTP_PREFIX, &MQTT_PREFIX],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
