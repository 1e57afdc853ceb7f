//! The storage scenario: the measured case, one device with 10 metrics read every
//! 10 s for 11.5 days (1,000,000 readings, random walks with two decimals; 100,000 with
//! `--quick`), imported through the backfill route as a wide CSV; then bytes a reading on disk
//! as rows, compressed, and as the CSV itself; 1,000-row pages and the whole export over the
//! same days open and compressed.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::platform::{Platform, pg};

const T0_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const METRICS: usize = 10;
const STEP_MS: i64 = 10_000;
const DEVICE: &str = "storage-1";

#[derive(Debug, Clone, Serialize)]
pub struct StorageResult {
    pub readings: u64,
    pub csv_bytes: u64,
    pub backfill_seconds: f64,
    pub backfill_readings_per_second: f64,
    /// The same rows by binary COPY into a bare copy of the readings table, same run.
    pub copy_rows_per_second: f64,
    /// Partitions of the data's days (tables, indexes, toast) as rows.
    pub open_bytes: i64,
    /// Blocks (table, toast, index) and what is left of the emptied partitions.
    pub compressed_bytes: i64,
    pub compressed_blocks_bytes: i64,
    pub compress_seconds: f64,
    pub pages_per_second_open: f64,
    pub pages_per_second_compressed: f64,
    pub export_rows_per_second_open: f64,
    pub export_rows_per_second_compressed: f64,
}

impl StorageResult {
    pub fn bytes_per_reading(&self, bytes: i64) -> f64 {
        bytes as f64 / self.readings.max(1) as f64
    }
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
async fn pages(platform: &Platform, duration: Duration) -> anyhow::Result<f64> {
    let base = format!(
        "{}/api/v1/devices/{DEVICE}/readings?limit=1000",
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
async fn export(platform: &Platform, readings: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut response = platform
        .http
        .get(format!(
            "{}/api/v1/devices/{DEVICE}/readings",
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
    let stored: i64 = client
        .query_one(
            "SELECT COALESCE(sum(count), 0)::int8 FROM telemetry.series",
            &[],
        )
        .await
        .context("counting")?
        .get(0);
    anyhow::ensure!(stored as u64 == readings, "stored {stored} of {readings}");
    client
        .batch_execute("VACUUM ANALYZE telemetry.readings")
        .await
        .context("vacuum")?;
    let (open_bytes, _) = sizes(&client).await.context("sizes")?;
    let copy_rows_per_second =
        crate::raw::postgres_copy(&platform.servers, &platform.database, readings)
            .await
            .context("raw COPY")?;

    let page_time = duration.min(Duration::from_secs(10));
    let pages_per_second_open = pages(platform, page_time).await?;
    let export_rows_per_second_open = export(platform, readings).await?;

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
    let (partitions_after, compressed_blocks_bytes) = sizes(&client).await?;
    let pages_per_second_compressed = pages(platform, page_time).await?;
    let export_rows_per_second_compressed = export(platform, readings).await?;

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
    })
}
