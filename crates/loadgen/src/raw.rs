//! The machine's raw limits, measured in the same run as the product: what PostgreSQL `COPY`,
//! Mosquitto and JetStream do with nothing of ours in between.

use std::{
    pin::pin,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use rumqttc::{Event, Packet, QoS};
use tokio_postgres::{binary_copy::BinaryCopyInWriter, types::Type};

use crate::{
    platform::{Broker, Servers, pg},
    receiver::Receiver,
};

/// Binary `COPY` of `rows` readings (the writer's row shape: series id, time, value) into a
/// scratch table with the readings table's columns and primary key; rows per second.
pub async fn postgres_copy(servers: &Servers, database: &str, rows: u64) -> anyhow::Result<f64> {
    let client = pg(&format!("{}/{database}", servers.pg_url)).await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS public.raw_copy;
             CREATE TABLE public.raw_copy (LIKE telemetry.readings INCLUDING ALL);",
        )
        .await?;
    let started = Instant::now();
    let sink = client
        .copy_in("COPY public.raw_copy (series_id, ts, value_num, value_bool, value_text) FROM STDIN BINARY")
        .await?;
    let types = [
        Type::INT4,
        Type::TIMESTAMPTZ,
        Type::FLOAT8,
        Type::BOOL,
        Type::TEXT,
    ];
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
    let base: DateTime<Utc> = Utc
        .timestamp_opt(1_735_689_600, 0)
        .single()
        .unwrap_or_default();
    let none_bool: Option<bool> = None;
    let none_text: Option<String> = None;
    for index in 0..rows {
        let series_id = (index % 8) as i32;
        let ts = base + chrono::Duration::milliseconds((index / 8) as i64);
        let value = Some((index % 400) as f64 / 10.0);
        writer
            .as_mut()
            .write(&[&series_id, &ts, &value, &none_bool, &none_text])
            .await?;
    }
    writer.finish().await?;
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    client.batch_execute("DROP TABLE public.raw_copy").await?;
    Ok(rate)
}

/// Mosquitto publish-to-subscribe: one publisher, one subscriber, `messages` at `qos`;
/// messages per second received.
pub async fn mosquitto(
    servers: &Servers,
    broker: Broker,
    id: &str,
    qos: QoS,
    messages: u64,
) -> anyhow::Result<f64> {
    let topic = format!("{id}/raw/{qos:?}");
    let (subscriber, mut sub_loop) =
        servers.mqtt_client(broker, format!("{id}-raw-sub"), 100, 1000);
    subscriber.subscribe(&topic, qos).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await? {
            break;
        }
    }
    let (publisher, mut pub_loop) = servers.mqtt_client(broker, format!("{id}-raw-pub"), 100, 1000);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let started = Instant::now();
    let payload = br#"{"ts": 1735689600000, "temperature": 21.5}"#.to_vec();
    // At most WINDOW messages between publisher and subscriber: beyond its per-session queue
    // (1000 by default) the broker drops, and a drop is not a rate.
    const WINDOW: u64 = 500;
    let received_counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = received_counter.clone();
    let sender = tokio::spawn(async move {
        for sent in 0..messages {
            while sent - seen.load(std::sync::atomic::Ordering::Relaxed) >= WINDOW {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            if publisher
                .publish(&topic, qos, false, payload.clone())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut received = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while received < messages && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::Publish(_)))) =
            tokio::time::timeout(Duration::from_secs(5), sub_loop.poll()).await
        {
            received += 1;
            received_counter.store(received, std::sync::atomic::Ordering::Relaxed);
        }
    }
    sender.abort();
    anyhow::ensure!(
        received == messages,
        "raw mosquitto: {received} of {messages} received"
    );
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

/// Mosquitto QoS 1 in the shape of the `mqtt-qos1` scenario, with nothing behind the broker:
/// `devices` publisher connections, each with up to 20 messages in flight (as the simulated
/// devices have), into a shared subscription of `subscribers` connections (as ingest-mqtt
/// opens), `per_device` messages each at full speed. Messages per second received, from the
/// moment every connection is up. What the broker and the device connections cost alone.
pub async fn mosquitto_fan_in(
    servers: &Servers,
    id: &str,
    devices: usize,
    subscribers: usize,
    per_device: u64,
) -> anyhow::Result<f64> {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use anyhow::Context;
    let total = devices as u64 * per_device;
    // At most this many sent and not yet received: the broker's queue of each subscriber
    // stays far under Mosquitto's default of 1,000, and a drop is not a rate.
    let window = Arc::new(tokio::sync::Semaphore::new(400 * subscribers));
    let received = Arc::new(AtomicU64::new(0));
    let all_received = Arc::new(tokio::sync::Notify::new());
    let filter = format!("$share/{id}-raw/{id}/rawfan/+");
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..subscribers {
        let (client, mut eventloop) = servers.mqtt_client(
            Broker::Checked,
            format!("{id}-rawfan-sub-{index}"),
            200,
            1000,
        );
        client.subscribe(&filter, QoS::AtLeastOnce).await?;
        let subscribed = async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                    break anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), subscribed)
            .await
            .context("raw mosquitto fan-in: no SUBACK within 60 s")??;
        let (window, received, all_received) =
            (window.clone(), received.clone(), all_received.clone());
        tasks.spawn(async move {
            let _client = client;
            loop {
                if let Event::Incoming(Packet::Publish(_)) = eventloop.poll().await? {
                    window.add_permits(1);
                    if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                        all_received.notify_one();
                    }
                }
            }
        });
    }
    let start = Arc::new(tokio::sync::Barrier::new(devices + 1));
    let payload = bytes::Bytes::from_static(br#"{"ts": 1735689600000, "temperature": 21.5}"#);
    for index in 0..devices {
        let (client, mut eventloop) =
            servers.mqtt_client(Broker::Checked, format!("{id}-rawfan-{index}"), 20, 64);
        let topic = format!("{id}/rawfan/{index}");
        let (window, start, payload) = (window.clone(), start.clone(), payload.clone());
        tasks.spawn(async move {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                    break;
                }
            }
            start.wait().await;
            let sender = tokio::spawn(async move {
                for _ in 0..per_device {
                    let Ok(permit) = window.acquire().await else {
                        break;
                    };
                    permit.forget();
                    if client
                        .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                client
            });
            let mut acked = 0;
            while acked < per_device {
                if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
                    acked += 1;
                }
            }
            let client = sender.await?;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            anyhow::Ok(())
        });
    }
    // Every connection up, or the first that failed, or a minute: no waiting forever on a
    // device that could not connect.
    let connected = async {
        let mut up = pin!(start.wait());
        loop {
            tokio::select! {
                _ = &mut up => break Ok(()),
                Some(joined) = tasks.join_next() => match joined {
                    Ok(Err(error)) => break Err(error),
                    Err(error) => break Err(error.into()),
                    Ok(Ok(())) => {}
                },
            }
        }
    };
    let connected = match tokio::time::timeout(Duration::from_secs(60), connected).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("connections not up within 60 s")),
    };
    if let Err(error) = connected {
        window.close();
        tasks.abort_all();
        return Err(error.context("raw mosquitto fan-in: connecting"));
    }
    let started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_secs(300));
    let mut deadline = pin!(deadline);
    let mut done = pin!(all_received.notified());
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut done => break Ok(()),
            _ = &mut deadline => break Err(anyhow::anyhow!("timed out")),
            Some(joined) = tasks.join_next() => match joined {
                // A device with all its messages acked by the broker.
                Ok(Ok(())) => {}
                Ok(Err(error)) => break Err(error),
                Err(error) => break Err(error.into()),
            },
        }
    };
    let elapsed = started.elapsed();
    // Senders still waiting for room (after a failure) give up, and the rest stop.
    window.close();
    tasks.abort_all();
    outcome.context("raw mosquitto fan-in")?;
    let received = received.load(Ordering::Relaxed);
    anyhow::ensure!(
        received == total,
        "raw mosquitto fan-in: {received} of {total} received"
    );
    Ok(received as f64 / elapsed.as_secs_f64())
}

/// JetStream publish with acks, pipelined (as ingest does): messages per second acked.
pub async fn jetstream(servers: &Servers, id: &str, messages: u64) -> anyhow::Result<f64> {
    let nats = async_nats::connect(&servers.nats_url).await?;
    let jetstream = async_nats::jetstream::new(nats);
    let name = format!("{}_RAW", id.to_ascii_uppercase());
    let subject = format!("{id}.raw");
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            max_bytes: 512 << 20,
            ..Default::default()
        })
        .await?;
    // A typical telemetry batch of one reading, encoded.
    let payload = bytes::Bytes::from(vec![7u8; 60]);
    let started = Instant::now();
    let acks = futures::stream::iter(0..messages)
        .map(|_| {
            let jetstream = jetstream.clone();
            let subject = subject.clone();
            let payload = payload.clone();
            async move {
                jetstream
                    .publish(subject, payload)
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(256);
    let results: Vec<anyhow::Result<()>> = acks.collect().await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    jetstream.delete_stream(&name).await?;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(rate)
}

/// HTTP POSTs of an event-sized body to a local receiver that answers at once, 64 at a time:
/// what one process can deliver with nothing else in the way.
pub async fn http_posts(requests: u64) -> anyhow::Result<f64> {
    let receiver = Receiver::start().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let url = receiver.url("/raw");
    let body = r#"{"id":"evt_x","event":"device.data","timestamp":"2026-01-01T00:00:00Z","project":"default","device_id":"d","payload":{"readings":[{"metric":"t","ts":"2026-01-01T00:00:00Z","value":1.0}]}}"#;
    let started = Instant::now();
    let posts = futures::stream::iter(0..requests)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(64);
    let results: Vec<_> = posts.collect().await;
    let rate = requests as f64 / started.elapsed().as_secs_f64();
    receiver.stop().await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(rate)
}

/// `loadgen raw-ingest`: the limit of `http-single`, a process laid out as ingest-http is (a
/// multi-threaded tokio runtime holding the NATS client, an actix-web server with one worker
/// per core) whose one handler does only what a 202 needs: read the body and publish it to
/// the device's telemetry subject of a stream defined as Fieldline's, waiting for the
/// JetStream ack. No token check, no parsing, no protobuf, no rate limits.
#[derive(clap::Args)]
pub struct RawIngestArgs {
    #[arg(long)]
    pub nats_url: String,
    /// The bus prefix of its stream and subjects (one of its own: no consumer reads it).
    #[arg(long)]
    pub prefix: String,
    #[arg(long)]
    pub port: u16,
}

struct RawIngest {
    jetstream: async_nats::jetstream::Context,
    subjects: fieldline_proto::Subjects,
}

/// The device a request is from: a digest of its bearer token (the same token always
/// publishes to the same subject, as a device's readings do).
fn token_device(request: &actix_web::HttpRequest) -> String {
    let token = request
        .headers()
        .get("authorization")
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    // FNV-1a.
    let digest = token.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("d{digest:016x}")
}

async fn raw_ingest(
    request: actix_web::HttpRequest,
    body: actix_web::web::Bytes,
    state: actix_web::web::Data<RawIngest>,
) -> actix_web::HttpResponse {
    let subject = state.subjects.telemetry("default", &token_device(&request));
    let acked = async {
        state
            .jetstream
            .publish(subject, bytes::Bytes::copy_from_slice(&body))
            .await?
            .await
            .map_err(anyhow::Error::from)
    };
    match tokio::time::timeout(Duration::from_secs(5), acked).await {
        Ok(Ok(_)) => actix_web::HttpResponse::Accepted()
            .content_type("application/json")
            .body(r#"{"data":{"accepted":1,"duplicate":false}}"#),
        _ => actix_web::HttpResponse::ServiceUnavailable().finish(),
    }
}

/// Serves the minimal ingest until killed.
pub async fn serve_raw_ingest(args: RawIngestArgs) -> anyhow::Result<()> {
    let nats = async_nats::connect(&args.nats_url).await?;
    let jetstream = async_nats::jetstream::new(nats);
    let subjects = fieldline_proto::Subjects::new(&args.prefix)?;
    jetstream
        .get_or_create_stream(subjects.stream_config(
            fieldline_proto::Stream::Telemetry,
            fieldline_proto::StreamLimits::default(),
            &fieldline_proto::Replication::default(),
        ))
        .await?;
    let state = actix_web::web::Data::new(RawIngest {
        jetstream,
        subjects,
    });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .route("/api/v1/ingest", actix_web::web::post().to(raw_ingest))
            .route(
                "/health/ready",
                actix_web::web::get().to(actix_web::HttpResponse::Ok),
            )
    })
    .workers(workers)
    .disable_signals()
    .bind(("127.0.0.1", args.port))?
    .run()
    .await?;
    Ok(())
}

/// A `loadgen raw-ingest` process on `servers`' NATS, on a prefix of its own; stopped (and
/// its stream deleted) by [`RawIngestProcess::stop`].
pub struct RawIngestProcess {
    child: std::process::Child,
    pub url: String,
    prefix: String,
    nats_url: String,
}

impl RawIngestProcess {
    pub async fn start(servers: &Servers, prefix: &str) -> anyhow::Result<Self> {
        let port = crate::platform::free_port()?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "raw-ingest",
                "--nats-url",
                &servers.nats_url,
                "--prefix",
                prefix,
                "--port",
                &port.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let process = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            prefix: prefix.to_owned(),
            nats_url: servers.nats_url.clone(),
        };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(response) = http
                .get(format!("{}/health/ready", process.url))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(process);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("raw-ingest did not answer within 30 s")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let jetstream = async_nats::jetstream::new(async_nats::connect(&self.nats_url).await?);
        let subjects = fieldline_proto::Subjects::new(&self.prefix)?;
        let _ = jetstream
            .delete_stream(subjects.stream_name(fieldline_proto::Stream::Telemetry))
            .await;
        Ok(())
    }
}

impl Drop for RawIngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
