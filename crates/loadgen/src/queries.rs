//! The query scenario: 10 million readings of 1,000 devices (100,000 with `--quick`) seeded
//! into the product's own tables with binary COPY through query-api's series mapping, then
//! 32 HTTP clients asking for a 1,000-row page, latest values, and a 24-hour aggregate in
//! 5-minute buckets, one kind after the other, each for the scenario's duration.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    platform::{Platform, pg},
    stats::{Latency, Progress, histogram, summarize},
};

/// Shape of the seed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Seed {
    pub devices: usize,
    pub metrics: usize,
    pub readings_per_series: usize,
    /// Seconds between readings of one series.
    pub step_seconds: i64,
}

impl Seed {
    pub fn full() -> Self {
        // 1,000 × 10 × 1,000 = 10 million readings over 25 hours.
        Self {
            devices: 1_000,
            metrics: 10,
            readings_per_series: 1_000,
            step_seconds: 90,
        }
    }

    pub fn quick() -> Self {
        // 100 × 10 × 100 = 100,000 readings over the same 25 hours.
        Self {
            devices: 100,
            metrics: 10,
            readings_per_series: 100,
            step_seconds: 900,
        }
    }

    pub fn readings(&self) -> u64 {
        (self.devices * self.metrics * self.readings_per_series) as u64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryFigures {
    pub requests: u64,
    pub requests_per_second: f64,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueriesResult {
    /// With a read replica: reads it failed that the primary served (0: it took them all).
    pub replica_fallbacks: Option<f64>,
    pub seed: Seed,
    pub seeded_readings: u64,
    pub seed_seconds: f64,
    pub clients: usize,
    pub page: QueryFigures,
    pub latest: QueryFigures,
    pub aggregate: QueryFigures,
    /// The limits: the same SQL the service runs, straight to PostgreSQL from as many
    /// connections as there are clients (no HTTP, no auth, no JSON).
    pub raw_latest: QueryFigures,
    pub raw_aggregate: QueryFigures,
}

const RAW_LATEST_SQL: &str =
    "SELECT metric, last_ts, last_num, last_bool, last_text FROM telemetry.series
     WHERE project = 'default' AND device_id = $1 AND last_ts IS NOT NULL
     ORDER BY metric COLLATE \"C\"";

const RAW_AGGREGATE_SQL: &str = "SELECT series_id, date_bin(make_interval(secs => 300), ts, timestamptz '1970-01-01 00:00:00+00'),
        count(*), count(value_num), sum(value_num), min(value_num), max(value_num)
     FROM telemetry.readings
     WHERE series_id = (SELECT series_id FROM telemetry.series
                        WHERE project = 'default' AND device_id = $1 AND metric = $2)
       AND ts >= $3 AND ts < $4
     GROUP BY 1, 2";

/// `clients` connections each running `sql` for a random device until `duration` is over.
async fn measure_sql(
    platform: &Platform,
    name: &str,
    clients: usize,
    duration: Duration,
    devices: usize,
    sql: &'static str,
    window: Option<(i64, i64)>,
) -> anyhow::Result<QueryFigures> {
    let url = format!("{}/{}", platform.servers.pg_url, platform.database);
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = pg(&url).await?;
        let statement = client.prepare(sql).await?;
        connections.push((client, statement));
    }
    let progress = Progress::start(name, "queries");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (client, statement) in connections {
        let counter = progress.counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Histogram<u64> = histogram();
            let window = window.map(|(start, end)| {
                (
                    chrono::DateTime::from_timestamp_micros(start).unwrap_or_default(),
                    chrono::DateTime::from_timestamp_micros(end).unwrap_or_default(),
                )
            });
            while started.elapsed() < duration {
                let device = rand::random_range(0..devices);
                let device_id = format!("q-{device}");
                let metric = format!("m{}", device % 10);
                let sent = Instant::now();
                match &window {
                    Some((start, end)) => {
                        client
                            .query(&statement, &[&device_id, &metric, start, end])
                            .await?
                    }
                    None => client.query(&statement, &[&device_id]).await?,
                };
                let _ = latencies.record(sent.elapsed().as_micros() as u64);
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = histogram();
    for task in tasks {
        latencies.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(QueryFigures {
        requests: latencies.len(),
        requests_per_second: latencies.len() as f64 / elapsed,
        latency: summarize(&latencies),
    })
}

/// Waits until query-api reads from its replica: the probe found it caught up (after the
/// seed, whose WAL the replica replays first).
async fn replica_in_use(platform: &Platform) -> anyhow::Result<()> {
    let metrics = format!("{}/metrics", platform.url("query-api"));
    for _ in 0..1200 {
        let text = platform.http.get(&metrics).send().await?.text().await?;
        if text
            .lines()
            .any(|line| line.starts_with("fieldline_db_replica_usable{") && line.ends_with(" 1"))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("query-api never found its replica fit (fieldline_db_replica_usable)")
}

/// The fallbacks from the replica to the primary so far (0 when every read it took was
/// served by it).
async fn replica_fallbacks(platform: &Platform) -> anyhow::Result<f64> {
    let metrics = format!("{}/metrics", platform.url("query-api"));
    let text = platform.http.get(&metrics).send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("fieldline_db_replica_fallbacks_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, value| total + value))
}

/// `replica`: query-api has a read replica (`FIELDLINE_DATABASE_READ_URL`); the measures
/// start once it is in use (the raw SQL limits still go to the primary).
pub async fn run(
    platform: &Platform,
    seed: Seed,
    clients: usize,
    duration: Duration,
    replica: bool,
) -> anyhow::Result<QueriesResult> {
    let prefix = "q-";
    eprintln!("[queries] registering {} devices", seed.devices);
    platform.create_devices(prefix, seed.devices).await?;

    // The data ends at the last whole minute and spans readings_per_series steps back.
    let now_us = chrono::Utc::now().timestamp_micros();
    let end_us = now_us / 60_000_000 * 60_000_000;
    let step_us = seed.step_seconds * 1_000_000;
    let start_us = end_us - seed.readings_per_series as i64 * step_us;
    let series: Vec<(String, String, String)> = (0..seed.devices)
        .flat_map(|device| {
            (0..seed.metrics).map(move |metric| {
                (
                    "default".to_owned(),
                    format!("{prefix}{device}"),
                    format!("m{metric}"),
                )
            })
        })
        .collect();
    let series_count = series.len();
    let per_series = seed.readings_per_series;
    eprintln!(
        "[queries] seeding {} readings with binary COPY",
        seed.readings()
    );
    let client = pg(&format!(
        "{}/{}",
        platform.servers.pg_url, platform.database
    ))
    .await?;
    let seeding = Instant::now();
    // Time-major order, as readings arrive.
    let readings = (0..per_series).flat_map(move |step| {
        (0..series_count).map(move |index| {
            let ts = start_us + step as i64 * step_us;
            let value = ((index * 31 + step * 17) % 1000) as f64 / 10.0;
            (index, ts, value)
        })
    });
    let seeded = query_api::bulk::load_numbers(&client, &series, (start_us, end_us), readings)
        .await
        .context("seeding readings")?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    eprintln!("[queries] seeded {seeded} readings in {seed_seconds:.1} s");
    if replica {
        eprintln!("[queries] waiting for the replica to catch up");
        replica_in_use(platform).await?;
    }

    let base = platform.url("query-api");
    let rfc = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let day_start = rfc(end_us - 24 * 3_600_000_000);
    let day_end = rfc(end_us);
    let devices = seed.devices;
    // A page of 1,000 rows of one device, from the start of its last day (all metrics).
    let page = {
        let base = base.clone();
        let day_start = day_start.clone();
        move |device: usize| {
            format!("{base}/api/v1/devices/{prefix}{device}/readings?limit=1000&start={day_start}")
        }
    };
    let latest = {
        let base = base.clone();
        move |device: usize| format!("{base}/api/v1/devices/{prefix}{device}/readings/latest")
    };
    let aggregate = {
        let base = base.clone();
        move |device: usize| {
            format!(
                "{base}/api/v1/devices/{prefix}{device}/readings/aggregate?metric=m{}&start={day_start}&end={day_end}&interval=5m&fn=avg,min,max",
                device % 10
            )
        }
    };
    let page = measure(
        platform,
        "queries: 1,000-row page",
        clients,
        duration,
        devices,
        page,
    )
    .await?;
    let latest = measure(
        platform,
        "queries: latest",
        clients,
        duration,
        devices,
        latest,
    )
    .await?;
    let aggregate = measure(
        platform,
        "queries: 24h/5m aggregate",
        clients,
        duration,
        devices,
        aggregate,
    )
    .await?;
    let raw_latest = measure_sql(
        platform,
        "queries: latest, SQL only",
        clients,
        duration,
        devices,
        RAW_LATEST_SQL,
        None,
    )
    .await?;
    let raw_aggregate = measure_sql(
        platform,
        "queries: 24h/5m aggregate, SQL only",
        clients,
        duration,
        devices,
        RAW_AGGREGATE_SQL,
        Some((end_us - 24 * 3_600_000_000, end_us)),
    )
    .await?;
    let fallbacks = if replica {
        let fallbacks = replica_fallbacks(platform).await?;
        replica_in_use(platform).await?;
        Some(fallbacks)
    } else {
        None
    };
    Ok(QueriesResult {
        replica_fallbacks: fallbacks,
        seed,
        seeded_readings: seeded,
        seed_seconds,
        clients,
        page,
        latest,
        aggregate,
        raw_latest,
        raw_aggregate,
    })
}

/// `clients` loops each GETting `url(device)` for a random device until `duration` is over.
async fn measure(
    platform: &Platform,
    name: &str,
    clients: usize,
    duration: Duration,
    devices: usize,
    url: impl Fn(usize) -> String + Clone + Send + 'static,
) -> anyhow::Result<QueryFigures> {
    // One warm-up round per client: connections, auth and device caches, plans.
    for device in 0..clients.min(devices) {
        let response = platform
            .http
            .get(url(device))
            .bearer_auth(&platform.admin_key)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{name}: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let progress = Progress::start(name, "requests");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let http = platform.http.clone();
        let key = platform.admin_key.clone();
        let counter = progress.counter.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Histogram<u64> = histogram();
            while started.elapsed() < duration {
                let device = rand::random_range(0..devices);
                let sent = Instant::now();
                let response = http.get(url(device)).bearer_auth(&key).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                anyhow::ensure!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let _ = latencies.record(sent.elapsed().as_micros() as u64);
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = histogram();
    for task in tasks {
        latencies.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(QueryFigures {
        requests: latencies.len(),
        requests_per_second: latencies.len() as f64 / elapsed,
        latency: summarize(&latencies),
    })
}
