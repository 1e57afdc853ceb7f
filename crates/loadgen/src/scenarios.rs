//! The product scenarios: ingest over HTTP (batched and single), over MQTT QoS 1, and
//! webhook delivery, each measured end to end on the platform under test.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use rumqttc::{Event, Packet, QoS};
use serde_json::{Value, json};

use crate::{
    platform::Platform,
    receiver::Receiver,
    stats::{Latency, Progress, histogram, summarize},
    usage::{Cpu, Snapshot, Storage},
};

/// Timestamps of generated readings start here (2025-01-01) and never repeat per device.
const BASE_MS: u64 = 1_735_689_600_000;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestResult {
    pub accepted: u64,
    /// Readings in Postgres at the end (equal to `accepted` unless something was lost).
    pub stored: u64,
    /// Seconds every device took to connect before the clock started (MQTT only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_to_connect: Option<f64>,
    pub seconds_to_accept: f64,
    pub seconds_to_durable: f64,
    pub accepted_per_second: f64,
    pub durable_per_second: f64,
    pub latency: Latency,
    /// CPU of each process from the first request until everything was stored, per 1,000
    /// readings stored.
    pub cpu: Cpu,
    /// What the stored readings take on disk, and in the telemetry stream.
    pub storage: Storage,
}

/// HTTP ingest: `clients` devices each POSTing `per_request` readings in a loop for
/// `duration`; then waits until the writer has stored all of it.
pub async fn http_ingest(
    platform: &Platform,
    name: &str,
    clients: usize,
    per_request: usize,
    duration: Duration,
) -> anyhow::Result<IngestResult> {
    let tokens = platform
        .create_devices(&format!("{name}-"), clients)
        .await?;
    let urls = ingest_urls(platform);
    let before = Snapshot::take(platform).await;
    let started = Instant::now();
    let (accepted, latencies, accepted_after) =
        post_readings(platform, name, &urls, tokens, per_request, duration).await?;
    platform.wait_durable(Duration::from_secs(600)).await?;
    let durable_after = started.elapsed();
    let cpu = Cpu::of(Snapshot::take(platform).await.since(&before), accepted);
    Ok(IngestResult {
        cpu,
        storage: Storage::measure(platform).await?,
        accepted,
        stored: accepted,
        seconds_to_connect: None,
        seconds_to_accept: accepted_after.as_secs_f64(),
        seconds_to_durable: durable_after.as_secs_f64(),
        accepted_per_second: accepted as f64 / accepted_after.as_secs_f64(),
        durable_per_second: accepted as f64 / durable_after.as_secs_f64(),
        latency: summarize(&latencies),
    })
}

fn ingest_urls(platform: &Platform) -> Vec<String> {
    platform
        .urls("ingest-http")
        .into_iter()
        .map(|base| format!("{base}/api/v1/ingest"))
        .collect()
}

/// Turns of one client load against one server: readings accepted, latencies, time taken.
struct Turns {
    accepted: u64,
    latencies: hdrhistogram::Histogram<u64>,
    elapsed: Duration,
}

impl Turns {
    fn new() -> Self {
        Self {
            accepted: 0,
            latencies: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn add(
        &mut self,
        (accepted, latencies, elapsed): (u64, hdrhistogram::Histogram<u64>, Duration),
    ) -> anyhow::Result<()> {
        self.accepted += accepted;
        self.latencies.add(latencies)?;
        self.elapsed += elapsed;
        Ok(())
    }

    fn per_second(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// `http-single`'s target: one reading a request to ingest-http alone on the machine (as when
/// the rest of the platform runs on other machines), and the same clients against a minimal
/// actix-web server doing the same JetStream publish (`loadgen raw-ingest`), whose stream
/// nothing reads.
///
/// Each device's token is verified first (its first requests go through the registry); then
/// every other Fieldline process is stopped, and the two servers take `rounds` turns each of
/// `duration / rounds`, in the order ABBA ABBA…, so that the machine's drift (this VM's speed
/// moves by half within an hour) falls on both alike; then the platform is continued and
/// everything ingest-http accepted must be stored. The CPU of the minimal server's turns is
/// left out of the platform's (nats-server is busy in both).
pub async fn http_single_paired(
    platform: &Platform,
    clients: usize,
    duration: Duration,
    rounds: u32,
) -> anyhow::Result<(IngestResult, RawIngestResult)> {
    let name = "http-single-alone";
    let tokens = platform
        .create_devices(&format!("{name}-"), clients)
        .await?;
    let urls = ingest_urls(platform);
    let warming = format!("{name}, verifying the tokens");
    post_readings(
        platform,
        &warming,
        &urls,
        tokens.clone(),
        1,
        Duration::from_millis(500),
    )
    .await?;
    let server =
        crate::raw::RawIngestProcess::start(&platform.servers, &format!("{}raw", platform.id))
            .await?;
    let raw_urls = [format!("{}/api/v1/ingest", server.url)];
    let raw_tokens: Vec<String> = (0..clients)
        .map(|index| format!("raw-device-token-{index}"))
        .collect();
    let rounds = rounds.max(1);
    let turn = (duration / rounds).max(Duration::from_secs(1));
    let mut alone = Turns::new();
    let mut minimal = Turns::new();
    let mut minimal_cpu = 0.0;
    // What the platform's processes (and nats-server) used during the minimal server's turns.
    let mut during_minimal: std::collections::BTreeMap<String, f64> = Default::default();
    let before = Snapshot::take(platform).await;
    let started = Instant::now();
    platform.signal_all_but("ingest-http", true)?;
    let turns = async {
        for round in 0..rounds {
            for minimal_turn in [round % 2 == 1, round % 2 == 0] {
                if minimal_turn {
                    let others = Snapshot::take(platform).await;
                    let cpu = crate::usage::cpu_seconds(server.pid()).unwrap_or_default();
                    let label = format!("http-single, minimal actix-web, turn {}", round + 1);
                    minimal.add(
                        post_readings(platform, &label, &raw_urls, raw_tokens.clone(), 1, turn)
                            .await?,
                    )?;
                    minimal_cpu +=
                        crate::usage::cpu_seconds(server.pid()).unwrap_or_default() - cpu;
                    for (process, seconds) in Snapshot::take(platform).await.since(&others) {
                        *during_minimal.entry(process).or_default() += seconds;
                    }
                } else {
                    let label = format!("{name}, turn {}", round + 1);
                    alone.add(
                        post_readings(platform, &label, &urls, tokens.clone(), 1, turn).await?,
                    )?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    platform.signal_all_but("ingest-http", false)?;
    server.stop().await?;
    turns?;
    platform.wait_durable(Duration::from_secs(600)).await?;
    // From the first turn until stored, but for the minimal server's turns.
    let durable_after = started.elapsed().saturating_sub(minimal.elapsed);
    let mut used = Snapshot::take(platform).await.since(&before);
    for (process, seconds) in &during_minimal {
        if let Some(total) = used.get_mut(process) {
            *total = (*total - seconds).max(0.0);
        }
    }
    let accepted = alone.accepted;
    let alone = IngestResult {
        cpu: Cpu::of(used, accepted),
        storage: Storage::measure(platform).await?,
        accepted,
        stored: accepted,
        seconds_to_connect: None,
        seconds_to_accept: alone.elapsed.as_secs_f64(),
        seconds_to_durable: durable_after.as_secs_f64(),
        accepted_per_second: alone.per_second(),
        durable_per_second: accepted as f64 / durable_after.as_secs_f64(),
        latency: summarize(&alone.latencies),
    };
    let minimal = RawIngestResult {
        accepted: minimal.accepted,
        accepted_per_second: minimal.per_second(),
        latency: summarize(&minimal.latencies),
        cpu_seconds: minimal_cpu,
        cpu_ms_per_1000: if minimal.accepted == 0 {
            0.0
        } else {
            minimal_cpu * 1e6 / minimal.accepted as f64
        },
        turns: rounds * 2,
    };
    Ok((alone, minimal))
}

/// The client load of HTTP ingest: one loop per token, each POSTing `per_request` readings
/// for `duration` to `urls[i % urls.len()]` (several instances: the clients spread over
/// them, as behind a load balancer). Readings accepted, request latencies, and how long it
/// took.
pub async fn post_readings(
    platform: &Platform,
    name: &str,
    urls: &[String],
    tokens: Vec<String>,
    per_request: usize,
    duration: Duration,
) -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>, Duration)> {
    let progress = Progress::start(name, "readings accepted");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let http = platform.http.clone();
        let url = urls[index % urls.len()].clone();
        let counter = progress.counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            let mut sequence = 0u64;
            while started.elapsed() < duration {
                let messages: Vec<Value> = (0..per_request)
                    .map(|_| {
                        sequence += 1;
                        json!({"ts": BASE_MS + sequence, "temperature": (sequence % 400) as f64 / 10.0})
                    })
                    .collect();
                let body = if per_request == 1 { messages[0].clone() } else { Value::Array(messages) };
                let sent = Instant::now();
                let response = http.post(&url).bearer_auth(&token).json(&body).send().await;
                match response {
                    Ok(response) if response.status().as_u16() == 202 => {
                        let _ = latencies.record(sent.elapsed().as_micros() as u64);
                        counter.fetch_add(per_request as u64, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        anyhow::bail!("ingest answered {status}: {body}")
                    }
                    Err(error) => anyhow::bail!("ingest failed: {error}"),
                }
            }
            Ok(latencies)
        }));
    }
    let mut latencies = histogram();
    for task in tasks {
        latencies.add(task.await??)?;
    }
    let accepted_after = started.elapsed();
    let accepted = progress.counter.load(Ordering::Relaxed);
    drop(progress);
    Ok((accepted, latencies, accepted_after))
}

/// What the minimal ingest server (`loadgen raw-ingest`) did under `http-single`'s load.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RawIngestResult {
    pub accepted: u64,
    pub accepted_per_second: f64,
    pub latency: Latency,
    /// Its CPU seconds, and per 1,000 requests.
    pub cpu_seconds: f64,
    pub cpu_ms_per_1000: f64,
    /// Turns taken, alternating with ingest-http's ([`http_single_paired`]).
    pub turns: u32,
}

/// MQTT QoS 1 ingest from `devices` connections for `duration`, each with up to 20
/// unacknowledged messages: as fast as the broker acknowledges them, or `per_device_rate`
/// messages a second; then waits until everything is stored.
pub async fn mqtt_ingest(
    platform: &Platform,
    devices: usize,
    per_device_rate: Option<u64>,
    duration: Duration,
) -> anyhow::Result<IngestResult> {
    let tokens = platform.create_devices("mqtt-", devices).await?;
    // The clock starts once every device is connected, as it does for the raw fan-in it is
    // compared with: a thousand logins are not ingest throughput.
    let connecting = Instant::now();
    let all_up = Arc::new(tokio::sync::Barrier::new(devices + 1));
    let progress = Progress::start("mqtt-qos1", "messages acked by the broker");
    let mut tasks = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let servers = platform.servers.clone();
        // Each device logs in with its own broker account: its topic prefix and its token.
        let username = format!("{}/default/mqtt-{index}", platform.id);
        let topic = format!("{username}/telemetry");
        let client_id = format!("{}-dev-{index}", platform.id);
        let counter = progress.counter.clone();
        let open_broker = platform.open_broker;
        let all_up = all_up.clone();
        tasks.push(tokio::spawn(async move {
            let (client, mut eventloop) =
                servers.device_client(open_broker, client_id, &username, &token, 20, 64);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            all_up.wait().await;
            let started = Instant::now();
            let acked = Arc::new(AtomicU64::new(0));
            let publisher_acked = acked.clone();
            let publisher = tokio::spawn(async move {
                let mut sent = 0u64;
                let mut ticker = per_device_rate.map(|rate| {
                    tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)))
                });
                let end = tokio::time::Instant::from_std(started + duration);
                while started.elapsed() < duration {
                    if let Some(ticker) = &mut ticker {
                        ticker.tick().await;
                    }
                    let sequence = sent + 1;
                    let payload = format!(
                        "{{\"ts\": {}, \"temperature\": {}}}",
                        BASE_MS + sequence,
                        sequence % 400
                    );
                    // At full speed the client's queue is full: with the broker gone, the
                    // publish would wait for good.
                    let publish =
                        client.publish(&topic, QoS::AtLeastOnce, false, payload.into_bytes());
                    match tokio::time::timeout_at(end, publish).await {
                        Ok(Ok(())) => sent = sequence,
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
                // The last messages' PUBACKs count too: a disconnect now would leave them out.
                let deadline = Instant::now() + Duration::from_secs(10);
                while publisher_acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = client.disconnect().await;
            });
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) if publisher.is_finished() => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            acked.load(Ordering::Relaxed)
        }));
    }
    // A device that cannot log in would hold the start for good.
    tokio::time::timeout(Duration::from_secs(120), all_up.wait())
        .await
        .context("mqtt-qos1: the devices were not all connected within 120 s")?;
    let connected_after = connecting.elapsed();
    let before = Snapshot::take(platform).await;
    let started = Instant::now();
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await?;
    }
    let accepted_after = started.elapsed();
    drop(progress);
    // The broker acked on receipt; wait until ingest-mqtt published all to JetStream and the
    // writer stored it (or nothing moves any more: the broker dropped what it could not queue).
    let (stored, stored_after) = wait_rows(platform, "mqtt-", accepted, started).await?;
    let durable_after = stored_after;
    let cpu = Cpu::of(Snapshot::take(platform).await.since(&before), stored);
    Ok(IngestResult {
        cpu,
        storage: Storage::measure(platform).await?,
        stored,
        accepted,
        seconds_to_connect: Some(connected_after.as_secs_f64()),
        seconds_to_accept: accepted_after.as_secs_f64(),
        seconds_to_durable: durable_after.as_secs_f64(),
        accepted_per_second: accepted as f64 / accepted_after.as_secs_f64(),
        durable_per_second: stored as f64 / durable_after.as_secs_f64(),
        latency: summarize(&histogram()),
    })
}

/// How long the stored count may stand still before what is missing counts as lost.
const STALLED: Duration = Duration::from_secs(30);

/// Waits until `expected` readings of devices `{prefix}*` are in Postgres, or until the count
/// has not moved for 30 s; returns the count and when it last grew (since `started`).
async fn wait_rows(
    platform: &Platform,
    prefix: &str,
    expected: u64,
    started: Instant,
) -> anyhow::Result<(u64, Duration)> {
    let client = crate::platform::pg(&format!(
        "{}/{}",
        platform.servers.pg_url, platform.database
    ))
    .await?;
    let mut last = (0u64, started.elapsed());
    loop {
        let stored: i64 = client
            .query_one(
                "SELECT COALESCE(sum(count), 0)::int8 FROM telemetry.series WHERE project = 'default' AND device_id LIKE $1 || '%'",
                &[&prefix],
            )
            .await?
            .get(0);
        let stored = stored as u64;
        if stored > last.0 {
            last = (stored, started.elapsed());
        }
        if stored >= expected || started.elapsed() - last.1 > STALLED {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WebhookResult {
    pub events: u64,
    pub webhooks: usize,
    pub deliveries: u64,
    pub deliveries_per_second: f64,
    /// Send (the device's POST) to delivery at the receiver.
    pub latency: Latency,
    pub rate_per_second: Option<u64>,
    /// CPU of each process from the first event until the last delivery, per 1,000
    /// deliveries.
    pub cpu: Cpu,
}

/// Webhook delivery. With `rate`, one event per request at that rate for `duration`
/// (latency); without, `max_events` events as fast as `clients` can send them, and the
/// deliveries per second until the last one lands (throughput). Each event goes to
/// `webhooks` webhooks.
pub async fn webhooks(
    platform: &Platform,
    name: &str,
    webhooks: usize,
    clients: usize,
    rate: Option<u64>,
    duration: Duration,
    max_events: u64,
) -> anyhow::Result<WebhookResult> {
    webhooks_shaped(
        platform,
        name,
        webhooks,
        clients,
        rate,
        duration,
        max_events,
        json!({}),
    )
    .await
}

/// [`webhooks`] with shape options on every webhook (`batch`, `ordering`, …).
#[allow(clippy::too_many_arguments)]
pub async fn webhooks_shaped(
    platform: &Platform,
    name: &str,
    webhooks: usize,
    clients: usize,
    rate: Option<u64>,
    duration: Duration,
    max_events: u64,
    options: Value,
) -> anyhow::Result<WebhookResult> {
    let receiver = Receiver::start().await?;
    for index in 0..webhooks {
        let mut body =
            json!({"url": receiver.url(&format!("/{name}/{index}")), "events": ["device.data"]});
        if let (Some(body), Some(options)) = (body.as_object_mut(), options.as_object()) {
            body.extend(options.clone());
        }
        platform
            .post("webhook-dispatcher", "/api/v1/webhooks", &body)
            .await
            .context("registering a webhook")?;
    }
    let tokens = Arc::new(
        platform
            .create_devices(&format!("{name}-"), clients.max(1))
            .await?,
    );
    // Let every dispatcher's webhook cache see the new webhooks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = format!("{}/api/v1/ingest", platform.url("ingest-http"));
    let sent = Arc::new(AtomicU64::new(0));
    let before = Snapshot::take(platform).await;
    let started = Instant::now();
    let errors = Arc::new(Mutex::new(None::<String>));
    let progress = Progress::start(name, "deliveries");
    let counter = receiver.counter();
    let watcher = {
        let counter = counter.clone();
        let progress_counter = progress.counter.clone();
        tokio::spawn(async move {
            loop {
                progress_counter.store(counter.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let send_one = {
        let http = platform.http.clone();
        let sent = sent.clone();
        let errors = errors.clone();
        move |token: String, sequence: u64| {
            let http = http.clone();
            let url = url.clone();
            let sent = sent.clone();
            let errors = errors.clone();
            async move {
                // The value is the send time: the receiver computes the latency from it.
                let body = json!({"ts": BASE_MS + sequence, "sent_us": now_us() as f64});
                match http.post(&url).bearer_auth(&token).json(&body).send().await {
                    Ok(response) if response.status().as_u16() == 202 => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("ingest answered {status}: {body}"))
                    }
                    Err(error) => {
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string())
                    }
                }
            }
        }
    };
    match rate {
        Some(rate) => {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sequence = 0u64;
            let mut in_flight = tokio::task::JoinSet::new();
            while started.elapsed() < duration {
                ticker.tick().await;
                sequence += 1;
                let token = tokens[(sequence as usize) % tokens.len()].clone();
                in_flight.spawn(send_one(token, sequence));
                while in_flight.try_join_next().is_some() {}
            }
            while in_flight.join_next().await.is_some() {}
        }
        None => {
            let mut tasks = Vec::new();
            for (index, token) in tokens.iter().enumerate() {
                let send_one = send_one.clone();
                let token = token.clone();
                let per_client = max_events / clients.max(1) as u64;
                tasks.push(tokio::spawn(async move {
                    // Each client's own millisecond range, 11.6 days apart: in the past (from
                    // BASE_MS), inside the bench's live window, never ahead of now.
                    let mut sequence = index as u64 * 1_000_000_000;
                    for _ in 0..per_client {
                        sequence += 1;
                        send_one(token.clone(), sequence).await;
                    }
                }));
            }
            for task in tasks {
                task.await?;
            }
        }
    }
    if let Some(error) = errors.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!("{name}: {error}");
    }
    let events = sent.load(Ordering::Relaxed);
    let expected = events * webhooks as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while counter.load(Ordering::Relaxed) < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: {} of {expected} deliveries",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = receiver
        .last_delivery_since(started)
        .unwrap_or_else(|| started.elapsed());
    watcher.abort();
    drop(progress);
    let deliveries = counter.load(Ordering::Relaxed);
    let result = WebhookResult {
        cpu: Cpu::of(Snapshot::take(platform).await.since(&before), deliveries),
        events,
        webhooks,
        deliveries: counter.load(Ordering::Relaxed),
        deliveries_per_second: expected as f64 / elapsed.as_secs_f64(),
        latency: receiver.latency(),
        rate_per_second: rate,
    };
    receiver.stop().await;
    Ok(result)
}
