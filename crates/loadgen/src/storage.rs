//! The storage scenario: the measured case, one device with 10 metrics read every
//! 10 s for 11.5 days (1,000,000 readings, random walks with two decimals; 100,000 with
//! `--quick`), imported through the backfill route as a wide CSV; then bytes a reading on disk
//! written by the import (closed days go straight into compressed blocks), as rows (the same
//! readings bulk-loaded for a second device), and as the CSV itself; 1,000-row pages and the
//! whole export over the second device's days open, then compressed.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::platform::{Platform, pg};

const T0_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const METRICS: usize = 10;
const STEP_MS: i64 = 10_000;
/// Imported through the backfill route (closed days: straight into blocks).
const DEVICE: &str = "storage-1";
/// The same readings loaded as rows, for reads over the days open, then compressed.
const ROWS_DEVICE: &str = "storage-0";

#[derive(Debug, Clone, Serialize)]
pub struct StorageResult {
    pub readings: u64,
    pub csv_bytes: u64,
    pub backfill_seconds: f64,
    pub backfill_readings_per_second: f64,
    /// The same rows by binary COPY into a bare copy of the readings table, same run.
    pub copy_rows_per_second: f64,
    /// Partitions of the data's days (tables, indexes, toast) holding the readings as rows.
    pub open_bytes: i64,
    /// What the import wrote: blocks (table, toast, index) and the partitions of its days
    /// (empty).
    pub compressed_bytes: i64,
    pub compressed_blocks_bytes: i64,
    pub compress_seconds: f64,
    pub pages_per_second_open: f64,
    pub pages_per_second_compressed: f64,
    pub export_rows_per_second_open: f64,
    pub export_rows_per_second_compressed: f64,
    /// The same readings into InfluxDB 1.x over line protocol, when `influxd` is installed.
    pub influx: Option<crate::influx::InfluxResult>,
}

impl StorageResult {
    pub fn bytes_per_reading(&self, bytes: i64) -> f64 {
        bytes as f64 / self.readings.max(1) as f64
    }
}

/// The measured case as line protocol, one line a timestamp with the ten fields (as Telegraf
/// writes a device's JSON), from the CSV.
fn line_protocol(csv: &str) -> String {
    let mut out = String::with_capacity(csv.len() * 2);
    for line in csv.lines().skip(1) {
        let mut fields = line.split(',');
        let ts = fields.next().unwrap_or_default();
        out.push_str(&format!("readings,device={DEVICE} "));
        for (metric, value) in fields.enumerate() {
            if metric > 0 {
                out.push(',');
            }
            out.push_str(&format!("m{metric}={value}"));
        }
        out.push(' ');
        out.push_str(ts);
        out.push('\n');
    }
    out
}

/// The wide CSV of the measured case: `ts,m0,…,m9`, epoch milliseconds, two decimals.
fn csv(rows: usize) -> String {
    let mut out = String::from("ts");
    for metric in 0..METRICS {
        out.push_str(&format!(",m{metric}"));
    }
    out.push('\n');
    let mut levels = [2000i64; METRICS];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for row in 0..rows {
        out.push_str(&(T0_MS + row as i64 * STEP_MS).to_string());
        for level in &mut levels {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *level += (state % 21) as i64 - 10;
            out.push_str(&format!(",{:.2}", *level as f64 / 100.0));
        }
        out.push('\n');
    }
    out
}

async fn sizes(client: &tokio_postgres::Client) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one(
            "SELECT (SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8
                       FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                      WHERE i.inhparent = 'telemetry.readings'::regclass
                        AND c.relname < 'readings_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')),
                    pg_total_relation_size('telemetry.blocks')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// 1,000-row pages walked with the cursor from the first reading, one after the other, for
/// `duration` (or to the end): pages a second.
async fn pages(platform: &Platform, device: &str, duration: Duration) -> anyhow::Result<f64> {
    let base = format!(
        "{}/api/v1/devices/{device}/readings?limit=1000",
        platform.url("query-api")
    );
    let started = Instant::now();
    let mut count = 0u64;
    let mut cursor: Option<String> = None;
    while started.elapsed() < duration {
        let url = match &cursor {
            Some(cursor) => format!("{base}&cursor={cursor}"),
            None => base.clone(),
        };
        let body: serde_json::Value = platform
            .http
            .get(&url)
            .bearer_auth(&platform.admin_key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(
            body["data"]
                .as_array()
                .is_some_and(|page| page.len() == 1000),
            "a short page: {}",
            body["page"]
        );
        count += 1;
        // At the end, from the start again.
        cursor = body["page"]["next_cursor"].as_str().map(str::to_owned);
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The whole history as CSV: rows a second.
async fn export(platform: &Platform, device: &str, readings: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut response = platform
        .http
        .get(format!(
            "{}/api/v1/devices/{device}/readings",
            platform.url("query-api")
        ))
        .bearer_auth(&platform.admin_key)
        .header("accept", "text/csv")
        .timeout(Duration::from_secs(600))
        .send()
        .await?
        .error_for_status()?;
    let mut lines = 0u64;
    while let Some(chunk) = response.chunk().await? {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    anyhow::ensure!(lines == readings + 1, "export gave {lines} lines");
    Ok(readings as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(
    platform: &Platform,
    quick: bool,
    duration: Duration,
) -> anyhow::Result<StorageResult> {
    let rows = if quick { 10_000 } else { 100_000 };
    let readings = (rows * METRICS) as u64;
    let body = csv(rows);
    platform.create_devices("storage-", 2).await?;
    let url = format!("{}/{}", platform.servers.pg_url, platform.database);
    let client = pg(&url).await?;

    eprintln!(
        "[storage] backfill of {readings} readings ({} bytes of CSV)",
        body.len()
    );
    let started = Instant::now();
    let response = platform
        .http
        .post(format!(
            "{}/api/v1/devices/{DEVICE}/readings",
            platform.url("ingest-http")
        ))
        .bearer_auth(&platform.admin_key)
        .header("content-type", "text/csv")
        .body(body.clone())
        .timeout(Duration::from_secs(600))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "backfill: {} {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    platform.wait_durable(Duration::from_secs(600)).await?;
    let backfill_seconds = started.elapsed().as_secs_f64();
    let stored = |device: &'static str| {
        let client = &client;
        async move {
            let stored: i64 = client
                .query_one(
                    "SELECT COALESCE(sum(count), 0)::int8 FROM telemetry.series WHERE device_id = $1",
                    &[&device],
                )
                .await
                .context("counting")?
                .get(0);
            anyhow::ensure!(
                stored as u64 == readings,
                "{device}: stored {stored} of {readings}"
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    stored(DEVICE).await?;
    // What the import wrote: blocks, and the (empty) partitions of its days.
    let (partitions_after, compressed_blocks_bytes) = sizes(&client).await.context("sizes")?;

    // The same readings as rows of another device (binary COPY through query-api's own
    // loader), for the reads over open days, then compressed by the task's code.
    let series: Vec<(String, String, String)> = (0..METRICS)
        .map(|m| {
            (
                "default".to_owned(),
                ROWS_DEVICE.to_owned(),
                format!("m{m}"),
            )
        })
        .collect();
    let points = body.lines().skip(1).flat_map(|line| {
        let mut fields = line.split(',');
        let ts_ms: i64 = fields
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_default();
        fields
            .enumerate()
            .map(move |(m, v)| (m, ts_ms * 1000, v.parse::<f64>().unwrap_or_default()))
            .collect::<Vec<_>>()
    });
    let end_us = (T0_MS + rows as i64 * STEP_MS) * 1000;
    query_api::bulk::load_numbers(&client, &series, (T0_MS * 1000, end_us), points)
        .await
        .context("loading rows")?;
    stored(ROWS_DEVICE).await?;
    let (with_rows, _) = sizes(&client).await?;
    let open_bytes = with_rows - partitions_after;
    let copy_rows_per_second =
        crate::raw::postgres_copy(&platform.servers, &platform.database, readings)
            .await
            .context("raw COPY")?;

    let page_time = duration.min(Duration::from_secs(10));
    let pages_per_second_open = pages(platform, ROWS_DEVICE, page_time).await?;
    let export_rows_per_second_open = export(platform, ROWS_DEVICE, readings).await?;

    eprintln!("[storage] compressing");
    let started = Instant::now();
    let today = chrono::Utc::now().date_naive();
    let compressed = query_api::compress::compress_database(&url, today)
        .await
        .context("compressing")?;
    let compress_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        compressed.readings == readings,
        "compressed {} of {readings}",
        compressed.readings
    );
    let pages_per_second_compressed = pages(platform, ROWS_DEVICE, page_time).await?;
    let export_rows_per_second_compressed = export(platform, ROWS_DEVICE, readings).await?;

    let influx = if crate::influx::installed() {
        eprintln!("[storage] the same readings into InfluxDB over line protocol");
        Some(crate::influx::run(line_protocol(&body), readings).await?)
    } else {
        eprintln!("[storage] influxd not installed: no InfluxDB figures (make bench installs it)");
        None
    };

    Ok(StorageResult {
        readings,
        csv_bytes: body.len() as u64,
        backfill_seconds,
        backfill_readings_per_second: readings as f64 / backfill_seconds,
        copy_rows_per_second,
        open_bytes,
        compressed_bytes: compressed_blocks_bytes + partitions_after,
        compressed_blocks_bytes,
        compress_seconds,
        pages_per_second_open,
        pages_per_second_compressed,
        export_rows_per_second_open,
        export_rows_per_second_compressed,
        influx,
    })
}
