//! The query scenario: 10 million readings of 1,000 devices (100,000 with `--quick`) seeded
//! into the product's own tables with binary COPY through query-api's series mapping, then
//! 32 HTTP clients asking for a 1,000-row page, latest values, and a 24-hour aggregate in
//! 5-minute buckets, then 8 clients exporting a device's last day as CSV, one kind after the
//! other, each for the scenario's duration. Each kind is judged against the same SQL sent
//! straight to PostgreSQL from as many connections; what the seeded readings take on disk
//! (and as CSV) is measured too.

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
    /// Latest values asked for at a steady [`LATEST_PACED_RATE`] (a fleet of dashboards),
    /// each timed from when it was due: latency at a stated load. At saturation (`latest`)
    /// latency is only clients ÷ throughput.
    pub latest_paced: QueryFigures,
    pub aggregate: QueryFigures,
    /// The limits: the same SQL the service runs, straight to PostgreSQL from as many
    /// connections as there are clients (no HTTP, no auth, no JSON).
    pub raw_latest: QueryFigures,
    pub raw_aggregate: QueryFigures,
    pub raw_page: QueryFigures,
    /// CSV exports of one device's last day (`Accept: text/csv`), by `export_clients`.
    pub export: ExportFigures,
    /// The export's SQL (the device's series, then one SELECT per series in a read-only
    /// transaction), its rows streamed straight from PostgreSQL.
    pub raw_export: ExportFigures,
    pub export_clients: usize,
    pub storage: SeedStorage,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportFigures {
    pub exports: u64,
    pub exports_per_second: f64,
    pub rows: u64,
    pub rows_per_second: f64,
    /// CSV bytes of the rows (header lines left out); 0 for the raw rows.
    pub csv_bytes: u64,
    pub latency: Latency,
}

impl ExportFigures {
    /// The figures of exports (or their raw limit) that took `elapsed` seconds in all.
    fn new(latencies: &Histogram<u64>, rows: u64, csv_bytes: u64, elapsed: f64) -> Self {
        Self {
            exports: latencies.len(),
            exports_per_second: latencies.len() as f64 / elapsed,
            rows,
            rows_per_second: rows as f64 / elapsed,
            csv_bytes,
            latency: summarize(latencies),
        }
    }
}

/// What the seeded readings take, measured right after the seed.
#[derive(Debug, Clone, Serialize)]
pub struct SeedStorage {
    pub readings: i64,
    /// Every partition of `telemetry.readings` with its indexes and TOAST.
    pub open_bytes: i64,
    pub open_bytes_per_reading: f64,
    /// `telemetry.blocks` (compressed day blocks), when the schema has it: its total size
    /// and the readings its blocks hold.
    pub compressed_bytes: Option<i64>,
    pub compressed_readings: Option<i64>,
    pub compressed_bytes_per_reading: Option<f64>,
}

impl SeedStorage {
    pub async fn measure(client: &tokio_postgres::Client) -> anyhow::Result<Self> {
        // pg_partition_tree lists a partitioned table and every partition (of any depth), and
        // nothing for a plain table: then the table's own size.
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM telemetry.readings)::int8,
                        COALESCE(NULLIF((SELECT sum(pg_total_relation_size(relid))
                                           FROM pg_partition_tree('telemetry.readings')), 0),
                                 pg_total_relation_size('telemetry.readings'))::int8,
                        to_regclass('telemetry.blocks') IS NOT NULL",
                &[],
            )
            .await?;
        let (readings, open_bytes, blocks): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
        let per = |bytes: i64, readings: i64| {
            if readings > 0 {
                bytes as f64 / readings as f64
            } else {
                0.0
            }
        };
        let (compressed_bytes, compressed_readings) = if blocks {
            let row = client
                .query_one(
                    "SELECT COALESCE(NULLIF((SELECT sum(pg_total_relation_size(relid))
                                               FROM pg_partition_tree('telemetry.blocks')), 0),
                                     pg_total_relation_size('telemetry.blocks'))::int8,
                            (SELECT COALESCE(sum(count), 0) FROM telemetry.blocks)::int8",
                    &[],
                )
                .await?;
            // Blocks that hold nothing yet (closed days are compressed by the maintenance
            // round, later): no compressed figure; the storage scenario has one.
            let held: i64 = row.get(1);
            if held > 0 {
                (Some(row.get::<_, i64>(0)), Some(held))
            } else {
                (None, None)
            }
        } else {
            (None, None)
        };
        Ok(Self {
            readings,
            open_bytes,
            open_bytes_per_reading: per(open_bytes, readings),
            compressed_bytes,
            compressed_readings,
            compressed_bytes_per_reading: compressed_bytes
                .zip(compressed_readings)
                .map(|(bytes, readings)| per(bytes, readings)),
        })
    }
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

/// query-api's statements for a page of a device's history from a start time on (no end):
/// its series, what they hold of the range (`narrow_range`, for a range over 8 days), then
/// the page itself (`Repo::readings`, ascending, no cursor, no metric list).
const RAW_DEVICE_SERIES_SQL: &str = "SELECT series_id, metric FROM telemetry.series
     WHERE project = $1 AND device_id = $2 AND ($3::text[] IS NULL OR metric = ANY($3))";

const RAW_NARROW_SQL: &str = "SELECT min(first_ts), max(last_ts) FROM telemetry.series
     WHERE series_id = ANY($1) AND count > 0";

/// A device's series, as query-api asks for them.
async fn raw_series(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    device_id: &str,
) -> anyhow::Result<Vec<i32>> {
    let none: Option<Vec<String>> = None;
    Ok(client
        .query(statement, &[&"default", &device_id, &none])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// One page request's statements on `client`, as query-api runs them; rows of the page.
async fn raw_page(
    client: &tokio_postgres::Client,
    statements: &[tokio_postgres::Statement],
    device_id: &str,
    start: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<u64> {
    let series = raw_series(client, &statements[0], device_id).await?;
    let row = client.query_one(&statements[1], &[&series]).await?;
    let first: Option<chrono::DateTime<chrono::Utc>> = row.get(0);
    let last: Option<chrono::DateTime<chrono::Utc>> = row.get(1);
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(0);
    };
    let start = start.max(first);
    let end = last + chrono::Duration::microseconds(1);
    let none_ts: Option<chrono::DateTime<chrono::Utc>> = None;
    let none_text: Option<String> = None;
    let none_metrics: Option<Vec<String>> = None;
    let limit = 1_001i64;
    let rows = client
        .query(
            &statements[2],
            &[
                &"default",
                &device_id,
                &start,
                &end,
                &none_ts,
                &none_text,
                &limit,
                &none_metrics,
            ],
        )
        .await?;
    Ok(rows.len() as u64)
}

/// One export's statements on `client`: the device's series, then each series' rows in
/// the range in one read-only transaction, streamed (nothing formatted); rows read.
async fn raw_export(
    client: &mut tokio_postgres::Client,
    statements: &[tokio_postgres::Statement],
    device_id: &str,
    (start, end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
) -> anyhow::Result<u64> {
    use futures::TryStreamExt as _;
    let series = raw_series(client, &statements[0], device_id).await?;
    let transaction = client.build_transaction().read_only(true).start().await?;
    // Planned as the export's transaction is.
    transaction
        .batch_execute(query_api::export::PLANNER_SETTINGS)
        .await?;
    let mut rows = 0u64;
    for series_id in series {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&series_id, &start, &end];
        let stream = transaction.query_raw(&statements[1], params).await?;
        let mut stream = std::pin::pin!(stream);
        while let Some(row) = stream.try_next().await? {
            std::hint::black_box(&row);
            rows += 1;
        }
    }
    transaction.commit().await?;
    Ok(rows)
}

/// A connection that plans as query-api's read connections do
/// (`query_api::READ_PLAN_CACHE_MODE`: a generic plan would lock every daily partition), so a
/// limit runs the same statements with the same plans.
async fn pg_planned_as_reads(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let client = pg(url).await?;
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = {}",
            query_api::READ_PLAN_CACHE_MODE
        ))
        .await?;
    Ok(client)
}

/// `clients` connections each running a page's or an export's statements for a random
/// device until `duration` is over.
async fn measure_raw_rows(
    platform: &Platform,
    name: &str,
    clients: usize,
    duration: Duration,
    devices: usize,
    export: bool,
    window: (i64, i64),
) -> anyhow::Result<ExportFigures> {
    let url = format!("{}/{}", platform.servers.pg_url, platform.database);
    // The page's statement is query-api's own (`query_api::ascending_page_sql`).
    let page_sql = query_api::ascending_page_sql();
    let sqls: Vec<&str> = if export {
        vec![RAW_DEVICE_SERIES_SQL, query_api::export::ROWS_ASC_SQL]
    } else {
        vec![RAW_DEVICE_SERIES_SQL, RAW_NARROW_SQL, page_sql.as_str()]
    };
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = pg_planned_as_reads(&url).await?;
        let mut statements = Vec::new();
        for sql in &sqls {
            statements.push(client.prepare(sql).await?);
        }
        connections.push((client, statements));
    }
    let at = |us: i64| chrono::DateTime::from_timestamp_micros(us).unwrap_or_default();
    let (start, end) = (at(window.0), at(window.1));
    let progress = Progress::start(name, "requests");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (mut client, statements) in connections {
        let counter = progress.counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Histogram<u64> = histogram();
            let mut rows = 0u64;
            while started.elapsed() < duration {
                let device_id = format!("q-{}", rand::random_range(0..devices));
                let sent = Instant::now();
                rows += if export {
                    raw_export(&mut client, &statements, &device_id, (start, end)).await?
                } else {
                    raw_page(&client, &statements, &device_id, start).await?
                };
                let _ = latencies.record(sent.elapsed().as_micros() as u64);
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok((latencies, rows))
        }));
    }
    let mut latencies = histogram();
    let mut rows = 0;
    for task in tasks {
        let (task_latencies, task_rows) = task.await??;
        latencies.add(task_latencies)?;
        rows += task_rows;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(ExportFigures::new(&latencies, rows, 0, elapsed))
}

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
        let client = pg_planned_as_reads(&url).await?;
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

/// Clients exporting at once (each export streams a device's day: 9,600 rows in the full
/// seed), and connections of its SQL-only limit.
const EXPORT_CLIENTS: usize = 8;

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
    let storage = SeedStorage::measure(&client)
        .await
        .context("measuring the seed's size")?;
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
    let latest_url = {
        let base = base.clone();
        move |device: usize| format!("{base}/api/v1/devices/{prefix}{device}/readings/latest")
    };
    let aggregate = {
        let base = base.clone();
        let (day_start, day_end) = (day_start.clone(), day_end.clone());
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
        latest_url.clone(),
    )
    .await?;
    let latest_paced = measure_paced(
        platform,
        "queries: latest, paced",
        LATEST_PACED_RATE,
        duration,
        devices,
        latest_url,
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
    let raw_page = measure_raw_rows(
        platform,
        "queries: 1,000-row page, SQL only",
        clients,
        duration,
        devices,
        false,
        (end_us - 24 * 3_600_000_000, end_us),
    )
    .await?;
    let export = measure_export(
        platform,
        "queries: CSV export of a day",
        EXPORT_CLIENTS,
        duration,
        devices,
        (day_start.clone(), day_end.clone()),
    )
    .await?;
    let raw_export = measure_raw_rows(
        platform,
        "queries: export, SQL rows only",
        EXPORT_CLIENTS,
        duration,
        devices,
        true,
        (end_us - 24 * 3_600_000_000, end_us),
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
        latest_paced,
        aggregate,
        raw_latest,
        raw_aggregate,
        raw_page: QueryFigures {
            requests: raw_page.exports,
            requests_per_second: raw_page.exports_per_second,
            latency: raw_page.latency,
        },
        export,
        raw_export,
        export_clients: EXPORT_CLIENTS,
        storage,
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
        let request = platform
            .http
            .get(url(device))
            .bearer_auth(&platform.admin_key);
        get_ok(request).await.with_context(|| name.to_owned())?;
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
                get_ok(http.get(url(device)).bearer_auth(&key)).await?;
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

/// Requests a second of the paced latest values, `--quick` too, so that the figure keeps its
/// name ("latest values p99 at 1,000 req/s").
const LATEST_PACED_RATE: f64 = 1_000.0;

/// Sends the request and reads the whole body; an error unless the status is a success.
async fn get_ok(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// GETs `url(device)` for a random device `rate` times a second until `duration` is over, each
/// on its own schedule whether or not the ones before have answered (an open loop), and each
/// timed from when it was due, so that a stall counts against every request it delayed.
async fn measure_paced(
    platform: &Platform,
    name: &str,
    rate: f64,
    duration: Duration,
    devices: usize,
    url: impl Fn(usize) -> String + Clone + Send + 'static,
) -> anyhow::Result<QueryFigures> {
    let progress = Progress::start(name, "requests");
    let started = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut requests = Vec::with_capacity(total as usize);
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due).await;
        let (http, key, counter) = (
            platform.http.clone(),
            platform.admin_key.clone(),
            progress.counter.clone(),
        );
        let request = http
            .get(url(rand::random_range(0..devices)))
            .bearer_auth(key);
        requests.push(tokio::spawn(async move {
            get_ok(request).await?;
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            anyhow::Ok(due.elapsed().as_micros() as u64)
        }));
    }
    let mut latencies = histogram();
    for request in requests {
        let _ = latencies.record(request.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(QueryFigures {
        requests: latencies.len(),
        requests_per_second: latencies.len() as f64 / elapsed,
        latency: summarize(&latencies),
    })
}

const CSV_HEADER: &[u8] = b"ts,metric,value\n";

/// One CSV export: rows and bytes of the body past the header line.
async fn export_csv(http: &reqwest::Client, key: &str, url: String) -> anyhow::Result<(u64, u64)> {
    let response = http
        .get(url)
        .bearer_auth(key)
        .header("accept", "text/csv")
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status.is_success() && body.starts_with(CSV_HEADER),
        "{status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    let lines = body.iter().filter(|byte| **byte == b'\n').count() as u64;
    Ok((lines - 1, (body.len() - CSV_HEADER.len()) as u64))
}

/// `clients` loops each exporting a random device's `[start, end)` as CSV (`Accept:
/// text/csv`) until `duration` is over; rows and CSV bytes received (header lines left out).
async fn measure_export(
    platform: &Platform,
    name: &str,
    clients: usize,
    duration: Duration,
    devices: usize,
    (start, end): (String, String),
) -> anyhow::Result<ExportFigures> {
    let base = platform.url("query-api");
    let url = move |device: usize| {
        format!("{base}/api/v1/devices/q-{device}/readings?start={start}&end={end}")
    };
    // A warm-up export per client (connections, caches, plans).
    for device in 0..clients.min(devices) {
        export_csv(&platform.http, &platform.admin_key, url(device)).await?;
    }
    let progress = Progress::start(name, "exports");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let http = platform.http.clone();
        let key = platform.admin_key.clone();
        let counter = progress.counter.clone();
        let urls: Vec<String> = (0..devices).map(&url).collect();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Histogram<u64> = histogram();
            let (mut rows, mut bytes) = (0u64, 0u64);
            while started.elapsed() < duration {
                let url = urls[rand::random_range(0..urls.len())].clone();
                let sent = Instant::now();
                let (more_rows, more_bytes) = export_csv(&http, &key, url).await?;
                let _ = latencies.record(sent.elapsed().as_micros() as u64);
                rows += more_rows;
                bytes += more_bytes;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok((latencies, rows, bytes))
        }));
    }
    let mut latencies = histogram();
    let (mut rows, mut csv_bytes) = (0, 0);
    for task in tasks {
        let (task_latencies, task_rows, task_bytes) = task.await??;
        latencies.add(task_latencies)?;
        rows += task_rows;
        csv_bytes += task_bytes;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(ExportFigures::new(&latencies, rows, csv_bytes, elapsed))
}
