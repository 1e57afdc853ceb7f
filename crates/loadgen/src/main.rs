//! `loadgen bench`: starts the real platform (one process per service), drives the standard
//! scenarios against it, measures the machine's raw limits in the same run, and writes a
//! report (Markdown and JSON) with every figure beside its limit. `loadgen chaos` runs the
//! fault suite on the same platform, `loadgen soak` a steady load for many minutes.

mod chaos;
mod influx;
mod load;
mod platform;
mod queries;
mod raw;
mod receiver;
mod scenarios;
mod soak;
mod stats;
mod storage;
mod usage;

use std::{cell::RefCell, collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rumqttc::QoS;
use serde::Serialize;
use serde_json::{Value, json};

use crate::platform::{Broker, Platform, Servers};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Fieldline device simulator and benchmark driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the standard scenarios and write the report.
    Bench(BenchArgs),
    /// Inject faults under a fixed load and count what was lost, duplicated and how fast it
    /// recovered.
    Chaos(chaos::ChaosArgs),
    /// A steady mixed load for many minutes: memory and table sizes at the start and the end.
    Soak(soak::SoakArgs),
    /// The minimal ingest server `http-single` is judged against (started by the bench).
    #[command(hide = true)]
    RawIngest(raw::RawIngestArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A few seconds per scenario: proves the harness works, figures are not comparable.
    #[arg(long)]
    quick: bool,
    /// The `fieldline` binary to run; by default the one built beside this loadgen (same
    /// target directory and profile: build both with `--release` for real figures).
    #[arg(long)]
    fieldline: Option<String>,
    /// Where `report.md` and `report.json` go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Comma list of scenarios (default: all): http-batched, http-single, ingest-scaling,
    /// mqtt-qos1, webhooks-throughput, webhooks-latency, webhooks-batched, webhooks-ordered,
    /// tracing, queries, queries-replica.
    #[arg(long)]
    scenarios: Option<String>,
    /// Events per second of the webhook latency scenario (default 1000; 200 with --quick).
    #[arg(long)]
    webhook_rate: Option<u64>,
    /// Messages per second each simulated MQTT device sends. By default each sends as fast as
    /// the broker acknowledges (20 unacknowledged at most), like the raw limits it is judged
    /// against; 10 a second with --quick.
    #[arg(long)]
    mqtt_rate: Option<u64>,
    #[arg(
        long,
        env = "FIELDLINE_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pg_url: String,
    #[arg(
        long,
        env = "FIELDLINE_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Run a nats-server of the bench's own (in place of --nats-url), so that its CPU per
    /// reading is measured apart from anyone else's use of a shared one.
    #[arg(long)]
    private_nats: bool,
}

/// One figure of the report, beside the raw limit it is judged against.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    scenario: &'static str,
    figure: std::borrow::Cow<'static, str>,
    value: f64,
    unit: &'static str,
    limit: Option<&'static str>,
    limit_value: Option<f64>,
    ratio: Option<f64>,
    /// What the figure should reach (issue 19): a ratio to its limit, or a value not to pass.
    target: Option<Target>,
    /// Whether it did, in this run.
    met: Option<bool>,
}

/// A figure's target.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Target {
    /// At least this fraction of the raw limit.
    RatioAtLeast(f64),
    /// At most this value, in the figure's unit.
    AtMost(f64),
}

impl Figure {
    fn target(mut self, target: Target) -> Self {
        self.met = Some(match target {
            Target::RatioAtLeast(least) => self.ratio.is_some_and(|ratio| ratio >= least),
            Target::AtMost(most) => self.value <= most,
        });
        self.target = Some(target);
        self
    }

    fn target_text(&self) -> String {
        let Some(target) = self.target else {
            return String::new();
        };
        let verdict = if self.met == Some(true) {
            "met"
        } else {
            "missed"
        };
        match target {
            Target::RatioAtLeast(least) => format!("ratio ≥ {least:.2}: {verdict}"),
            Target::AtMost(most) => {
                // Two decimals at most: a limit computed from another figure (half of
                // InfluxDB's bytes) is not shown to the millionth.
                let most = format!("{most:.2}");
                let most = most.trim_end_matches('0').trim_end_matches('.');
                format!("≤ {most} {}: {verdict}", self.unit)
            }
        }
    }
}

/// The shared subscription's connections in the raw fan-in: ingest-mqtt's default
/// `FIELDLINE_MQTT_SLOTS`.
const INGEST_MQTT_CONNECTIONS: usize = 8;
/// The limit of `http-single`: `loadgen raw-ingest`, one handler that publishes the body.
const MINIMAL_INGEST: &str =
    "minimal actix-web handler, same JetStream publish with ack, same process layout";
/// `http-single`'s figure against that limit: ingest-http alone on the machine, as the
/// minimal server is.
const HTTP_SINGLE_ALONE: &str = "requests accepted (1 reading each), ingest-http alone (the rest of the platform stopped), in turns with the minimal server";
/// Devices of `http-single`, each with one request in flight.
const HTTP_SINGLE_CLIENTS: usize = 32;
/// Rounds of `http-single`'s paired measurement: ingest-http alone and the minimal server
/// each post for a quarter of the scenario's duration per round, in the order ABBA ABBA.
const HTTP_SINGLE_ROUNDS: u32 = 4;
/// Devices of `ingest-scaling` (100 readings a request), spread over the ingest processes.
const SCALING_CLIENTS: usize = 16;

const FAN_IN: &str = "Mosquitto QoS 1, the scenario's devices → 8 shared subscribers";
/// Raw QoS 1 on a broker without Dynamic Security: the figures above are with it, as the
/// platform runs.
const QOS1_OPEN: &str = "Mosquitto QoS 1 pub→sub, no access checks";

fn figure(
    scenario: &'static str,
    figure: impl Into<std::borrow::Cow<'static, str>>,
    value: f64,
    unit: &'static str,
    limit: Option<(&'static str, f64)>,
) -> Figure {
    Figure {
        scenario,
        figure: figure.into(),
        value,
        unit,
        limit: limit.map(|(name, _)| name),
        limit_value: limit.map(|(_, value)| value),
        ratio: limit.map(|(_, limit)| if limit > 0.0 { value / limit } else { 0.0 }),
        target: None,
        met: None,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench(args).await,
        Command::Chaos(args) => chaos::chaos(args).await,
        Command::Soak(args) => soak::soak(args).await,
        Command::RawIngest(args) => raw::serve_raw_ingest(args).await,
    }
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))?
                .split(':')
                .nth(1)
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    json!({"cores": cores, "memory_gib": memory_gib, "cpu": cpu})
}

/// Starts a fresh platform for each scenario and keeps the peak memory of each service.
struct Runner<'a> {
    fieldline: &'a str,
    servers: &'a Servers,
    env: &'a [(&'a str, &'a str)],
    /// Highest resident memory (VmHWM) of each service over every platform started, MiB.
    peaks: RefCell<BTreeMap<String, f64>>,
}

impl Runner<'_> {
    /// Runs `run` on a platform of its own, then stops the platform (dropping its database
    /// and streams) whether `run` succeeded or not.
    async fn scenario<T>(
        &self,
        run: impl AsyncFnOnce(&Platform) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.scenario_on(false, run).await
    }

    /// A scenario on the broker without access checks when `open_broker`.
    async fn scenario_on<T>(
        &self,
        open_broker: bool,
        run: impl AsyncFnOnce(&Platform) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.scenario_with(open_broker, &[], run).await
    }

    /// A scenario whose processes get `extra` settings too.
    async fn scenario_with<T>(
        &self,
        open_broker: bool,
        extra: &[(&str, &str)],
        run: impl AsyncFnOnce(&Platform) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.scenario_on_servers(self.servers.clone(), open_broker, extra, 1, run)
            .await
    }

    /// A scenario with `processes` processes of ingest-http and of query-api (the others
    /// one each).
    async fn scenario_scaled<T>(
        &self,
        processes: usize,
        run: impl AsyncFnOnce(&Platform) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.scenario_on_servers(self.servers.clone(), false, &[], processes, run)
            .await
    }

    /// A scenario on other servers (a private PostgreSQL with a replica).
    async fn scenario_on_servers<T>(
        &self,
        servers: Servers,
        open_broker: bool,
        extra: &[(&str, &str)],
        processes: usize,
        run: impl AsyncFnOnce(&Platform) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        let mut platform = Platform::start_on(self.fieldline, servers, &env, open_broker).await?;
        let mut outcome = Ok(());
        for _ in 1..processes {
            for service in ["ingest-http", "query-api"] {
                if outcome.is_ok() {
                    outcome = platform.add_instance(service).await;
                }
            }
        }
        let outcome = match outcome {
            Ok(()) => run(&platform).await,
            Err(error) => Err(error.context("starting more processes")),
        };
        {
            let mut peaks = self.peaks.borrow_mut();
            for (service, (_, peak)) in platform.memory() {
                let entry = peaks.entry(service).or_default();
                *entry = entry.max(peak);
            }
        }
        platform.stop().await?;
        outcome
    }
}

/// Latest values asked for at a steady 1,000 requests a second (`queries::measure_paced`).
const LATEST_PACED_P50: &str = "latest values p50 at 1,000 req/s";
const LATEST_PACED_P99: &str = "latest values p99 at 1,000 req/s";
const LATEST_PACED_P999: &str = "latest values p99.9 at 1,000 req/s";

/// The figures of a query scenario (`queries`, or `queries-replica` with reads on a replica).
fn query_figures(
    figures: &mut Vec<Figure>,
    scenario: &'static str,
    result: &queries::QueriesResult,
) {
    let limits = [
        Some((
            "same SQL straight to PostgreSQL, 32 connections",
            result.raw_page.requests_per_second,
        )),
        Some((
            "same SQL straight to PostgreSQL, 32 connections",
            result.raw_latest.requests_per_second,
        )),
        Some((
            "same SQL straight to PostgreSQL, 32 connections",
            result.raw_aggregate.requests_per_second,
        )),
    ];
    for ((labels, result), limit) in [
        (
            [
                "1,000-row page p50",
                "1,000-row page p99",
                "1,000-row page p99.9",
                "1,000-row pages per second",
            ],
            &result.page,
        ),
        (
            [
                "latest values p50",
                "latest values p99",
                "latest values p99.9",
                "latest values per second",
            ],
            &result.latest,
        ),
        (
            [
                "24h aggregate, 5-min buckets p50",
                "24h aggregate, 5-min buckets p99",
                "24h aggregate, 5-min buckets p99.9",
                "24h aggregates per second",
            ],
            &result.aggregate,
        ),
    ]
    .into_iter()
    .zip(limits)
    {
        let latency = &result.latency;
        for (label, value) in labels
            .iter()
            .zip([latency.p50_ms, latency.p99_ms, latency.p999_ms])
        {
            figures.push(figure(scenario, *label, value, "ms", None));
        }
        let throughput = figure(
            scenario,
            labels[3],
            result.requests_per_second,
            "req/s",
            limit,
        );
        // The targets: pages (and exports, below) at 0.8 of their SQL; latest and
        // aggregates show their ratio without one.
        figures.push(if labels[3].starts_with("1,000-row") {
            throughput.target(Target::RatioAtLeast(0.8))
        } else {
            throughput
        });
    }
    let paced = &result.latest_paced;
    for (label, value) in [
        (LATEST_PACED_P50, paced.latency.p50_ms),
        (LATEST_PACED_P99, paced.latency.p99_ms),
        (LATEST_PACED_P999, paced.latency.p999_ms),
    ] {
        let latency = figure(scenario, label, value, "ms", None);
        figures.push(if label == LATEST_PACED_P99 {
            latency.target(Target::AtMost(5.0))
        } else {
            latency
        });
    }
    figures.push(figure(
        scenario,
        "1,000-row page p99, same SQL straight to PostgreSQL",
        result.raw_page.latency.p99_ms,
        "ms",
        None,
    ));
    figures.push(
        figure(
            scenario,
            "CSV export of a device's day (Accept: text/csv), rows",
            result.export.rows_per_second,
            "rows/s",
            Some((
                "same SQL straight to PostgreSQL, rows streamed, 8 connections",
                result.raw_export.rows_per_second,
            )),
        )
        .target(Target::RatioAtLeast(0.8)),
    );
    figures.push(figure(
        scenario,
        "CSV export of a device's day p99",
        result.export.latency.p99_ms,
        "ms",
        None,
    ));
    figures.push(figure(
        scenario,
        "latest values p99, same SQL straight to PostgreSQL",
        result.raw_latest.latency.p99_ms,
        "ms",
        None,
    ));
    figures.push(figure(
        scenario,
        "24h aggregate p99, same SQL straight to PostgreSQL",
        result.raw_aggregate.latency.p99_ms,
        "ms",
        None,
    ));
    figures.push(figure(
        scenario,
        "readings seeded (binary COPY, series stats and rollups)",
        result.seeded_readings as f64 / result.seed_seconds,
        "readings/s",
        None,
    ));
    let storage = &result.storage;
    figures.push(figure(
        scenario,
        "bytes per reading on disk, open (readings partitions, indexes, TOAST)",
        storage.open_bytes_per_reading,
        "bytes",
        None,
    ));
    // Only where the schema has compressed day blocks (telemetry.blocks).
    if let Some(compressed) = storage.compressed_bytes_per_reading {
        figures.push(figure(
            scenario,
            "bytes per reading on disk, compressed (telemetry.blocks)",
            compressed,
            "bytes",
            None,
        ));
    }
    figures.push(figure(
        scenario,
        "bytes per reading as CSV (the export's body)",
        result.export.csv_bytes as f64 / result.export.rows.max(1) as f64,
        "bytes",
        None,
    ));
}

/// Nanoseconds per check of the per-key and per-device limiters, as the services run them
/// (keyed GCRA state, fleet-sized key sets, nothing over its limit).
fn limiter_cost() -> (f64, f64) {
    let config = fieldline_common::Config {
        rate_key_requests: 1_000_000,
        rate_device_requests: 1_000_000,
        ..fieldline_common::Config::default()
    };
    let limits = fieldline_common::ratelimit::RateLimits::new(&config);
    let keys: Vec<String> = (0..10_000)
        .map(|index| format!("key_{index:020}"))
        .collect();
    let checks = 1_000_000usize;
    let started = std::time::Instant::now();
    for index in 0..checks {
        std::hint::black_box(limits.check_key(&keys[index % keys.len()], None));
    }
    let key_ns = started.elapsed().as_nanos() as f64 / checks as f64;
    let started = std::time::Instant::now();
    for index in 0..checks {
        std::hint::black_box(limits.check_device(
            fieldline_common::ratelimit::Channel::Mqtt,
            "default",
            &keys[index % keys.len()],
            None,
        ));
    }
    let device_ns = started.elapsed().as_nanos() as f64 / checks as f64;
    (key_ns, device_ns)
}

fn sibling_fieldline() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("fieldline");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it (`cargo build --bin fieldline`) or pass --fieldline",
        path.display()
    );
    Ok(path.display().to_string())
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let fieldline = match &args.fieldline {
        Some(path) => path.clone(),
        None => sibling_fieldline()?,
    };
    let private_nats = if args.private_nats {
        Some(fieldline_testkit::servers::PrivateNats::start().await)
    } else {
        None
    };
    let nats_url = private_nats
        .as_ref()
        .map_or_else(|| args.nats_url.clone(), |nats| nats.url());
    let mut servers = Servers::start(args.pg_url.clone(), nats_url).await;
    servers.nats_pid = private_nats.as_ref().and_then(|nats| nats.pid());
    let wanted = |name: &str| {
        args.scenarios
            .as_deref()
            .is_none_or(|list| list.split(',').any(|s| s.trim() == name))
    };
    let (seconds, mqtt_devices, webhook_rate, raw_messages) = if args.quick {
        (2, 50, 200, 5_000)
    } else {
        (20, 1000, 1000, 100_000)
    };
    let mqtt_rate = args.mqtt_rate.or(args.quick.then_some(10));
    let webhook_rate = args.webhook_rate.unwrap_or(webhook_rate);
    let duration = Duration::from_secs(seconds);
    let started_at = chrono::Utc::now();

    let env = [
        // The bench measures the engine; the per-webhook rate limit is a policy. So is the
        // per-webhook concurrency: a receiver taking 1,000 events/s gets more than the
        // default 8 requests at a time (docs/decisions/2026-11-22-speed-findings.md).
        ("FIELDLINE_WEBHOOK_RATE_PER_SECOND", "1000000"),
        ("FIELDLINE_WEBHOOK_ENDPOINT_CONCURRENCY", "64"),
        ("FIELDLINE_WEBHOOK_ALLOW_PRIVATE", "true"),
        // Likewise the per-key and per-device limits: a scenario's device or key sends far
        // more than a fleet's would. Still checked on every request and message, so their
        // cost is in the figures.
        ("FIELDLINE_RATE_KEY_REQUESTS", "1000000"),
        ("FIELDLINE_RATE_KEY_PERIOD", "1s"),
        ("FIELDLINE_RATE_DEVICE_REQUESTS", "1000000"),
        ("FIELDLINE_RATE_DEVICE_PERIOD", "1s"),
        // The scenarios send fixed times from 2025 on (BASE_MS), older than live ingest's
        // default window.
        ("FIELDLINE_INGEST_MAX_AGE", "3650days"),
        // `http-single` stops the registry while ingest-http and the minimal server take
        // turns (twice the scenario's duration): a cached token must not expire meanwhile,
        // which would send its device to a registry that cannot answer.
        ("FIELDLINE_AUTH_CACHE_TTL", "10min"),
    ];
    let runner = Runner {
        fieldline: &fieldline,
        servers: &servers,
        env: &env,
        peaks: RefCell::new(BTreeMap::new()),
    };

    // Idle memory, then the raw limits, on a platform of their own.
    eprintln!("starting the platform ({fieldline}), one process per service");
    let (idle_memory, raw_jetstream, raw_mqtt_qos0, raw_mqtt_qos1, raw_mqtt_qos1_open, raw_mqtt_fan_in, raw_http) = runner
        .scenario(async |platform: &Platform| {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let idle = platform.memory();
            eprintln!("raw limits: JetStream publish with acks, Mosquitto QoS 0 and 1 (and QoS 1 fan-in), HTTP POST");
            let jetstream = raw::jetstream(&servers, &platform.id, raw_messages)
                .await
                .context("raw jetstream")?;
            let qos0 = raw::mosquitto(&servers, Broker::Checked, &platform.id, QoS::AtMostOnce, raw_messages)
                .await
                .context("raw mosquitto qos0")?;
            let qos1 = raw::mosquitto(&servers, Broker::Checked, &platform.id, QoS::AtLeastOnce, raw_messages)
                .await
                .context("raw mosquitto qos1")?;
            // The same on a broker without access checks: what device identity costs.
            let qos1_open = raw::mosquitto(&servers, Broker::Open, &platform.id, QoS::AtLeastOnce, raw_messages)
                .await
                .context("raw mosquitto qos1 without access checks")?;
            let fan_in = raw::mosquitto_fan_in(
                &servers,
                &platform.id,
                mqtt_devices,
                INGEST_MQTT_CONNECTIONS,
                raw_messages / mqtt_devices as u64,
            )
            .await
            .context("raw mosquitto qos1 fan-in")?;
            let http = raw::http_posts(raw_messages / 2)
                .await
                .context("raw http")?;
            anyhow::Ok((idle, jetstream, qos0, qos1, qos1_open, fan_in, http))
        })
        .await?;
    let mut figures = Vec::new();
    let mut details = serde_json::Map::new();
    for (name, value, unit) in [
        ("JetStream publish, acked", raw_jetstream, "msg/s"),
        ("Mosquitto QoS 0 pub→sub", raw_mqtt_qos0, "msg/s"),
        ("Mosquitto QoS 1 pub→sub", raw_mqtt_qos1, "msg/s"),
        (QOS1_OPEN, raw_mqtt_qos1_open, "msg/s"),
        (FAN_IN, raw_mqtt_fan_in, "msg/s"),
        ("HTTP POST to a local receiver", raw_http, "req/s"),
    ] {
        figures.push(figure("raw", name, value, unit, None));
    }

    // Each scenario gets a platform of its own (database, streams, processes), so none
    // inherits another's backlog, dead tuples or stream contents.
    if wanted("webhooks-throughput") {
        let events = if args.quick { 500 } else { 20_000 };
        let result = runner
            .scenario(async |platform: &Platform| {
                scenarios::webhooks(
                    platform,
                    "webhooks-throughput",
                    10,
                    32,
                    None,
                    duration,
                    events,
                )
                .await
            })
            .await?;
        figures.push(figure(
            "webhooks-throughput",
            "deliveries to a receiver answering at once",
            result.deliveries_per_second,
            "deliveries/s",
            Some(("HTTP POST to a local receiver", raw_http)),
        ));
        let dispatcher_seconds = result
            .cpu
            .seconds
            .get("webhook-dispatcher")
            .copied()
            .unwrap_or_default();
        if dispatcher_seconds > 0.0 {
            figures.push(figure(
                "webhooks-throughput",
                "deliveries per CPU second of webhook-dispatcher",
                result.cpu.units as f64 / dispatcher_seconds,
                "deliveries/core-s",
                None,
            ));
        }
        details.insert("webhooks-throughput".into(), serde_json::to_value(&result)?);
    }
    if wanted("webhooks-latency") {
        let result = runner
            .scenario(async |platform: &Platform| {
                scenarios::webhooks(
                    platform,
                    "webhooks-latency",
                    1,
                    8,
                    Some(webhook_rate),
                    duration,
                    u64::MAX,
                )
                .await
            })
            .await?;
        figures.push(figure(
            "webhooks-latency",
            "send→delivery p50",
            result.latency.p50_ms,
            "ms",
            None,
        ));
        figures.push(
            figure(
                "webhooks-latency",
                "send→delivery p99",
                result.latency.p99_ms,
                "ms",
                None,
            )
            .target(Target::AtMost(50.0)),
        );
        details.insert("webhooks-latency".into(), serde_json::to_value(&result)?);
    }
    if wanted("webhooks-batched") {
        let events = if args.quick { 500 } else { 20_000 };
        let result = runner
            .scenario(async |platform: &Platform| {
                scenarios::webhooks_shaped(
                    platform,
                    "webhooks-batched",
                    10,
                    32,
                    None,
                    duration,
                    events,
                    json!({"batch": {"max_events": 100, "max_wait_ms": 100}}),
                )
                .await
            })
            .await?;
        figures.push(figure(
            "webhooks-batched",
            "events delivered in batches of up to 100",
            result.deliveries_per_second,
            "events/s",
            Some(("HTTP POST to a local receiver", raw_http)),
        ));
        details.insert("webhooks-batched".into(), serde_json::to_value(&result)?);
    }
    if wanted("webhooks-ordered") {
        let result = runner
            .scenario(async |platform: &Platform| {
                // One in flight per device: the rate is spread over many devices, as a fleet's is.
                scenarios::webhooks_shaped(
                    platform,
                    "webhooks-ordered",
                    1,
                    200,
                    Some(webhook_rate),
                    duration,
                    u64::MAX,
                    json!({"ordering": "device"}),
                )
                .await
            })
            .await?;
        figures.push(figure(
            "webhooks-ordered",
            "send→delivery p50, ordered by device",
            result.latency.p50_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            "webhooks-ordered",
            "send→delivery p99, ordered by device",
            result.latency.p99_ms,
            "ms",
            None,
        ));
        details.insert("webhooks-ordered".into(), serde_json::to_value(&result)?);
    }
    if wanted("tracing") {
        // The same two scenarios with traces off, sampled at 1 % and at 100 %, exported over
        // OTLP/HTTP to a receiver in this process (a collector on the same machine).
        let otlp = fieldline_testkit::otlp::OtlpReceiver::start().await;
        for (http_name, mqtt_name, ratio) in [
            (
                "http-batched readings durable, traces off",
                "mqtt-qos1 messages durable, traces off",
                None,
            ),
            (
                "http-batched readings durable, traces at 1 %",
                "mqtt-qos1 messages durable, traces at 1 %",
                Some("0.01"),
            ),
            (
                "http-batched readings durable, traces at 100 %",
                "mqtt-qos1 messages durable, traces at 100 %",
                Some("1.0"),
            ),
        ] {
            let mut extra: Vec<(&str, &str)> = Vec::new();
            if let Some(ratio) = ratio {
                extra.extend([
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.as_str()),
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", ratio),
                ]);
            }
            let http = runner
                .scenario_with(false, &extra, async |platform: &Platform| {
                    scenarios::http_ingest(platform, "tracing-http-batched", 8, 100, duration).await
                })
                .await?;
            figures.push(figure(
                "tracing",
                http_name,
                http.durable_per_second,
                "readings/s",
                None,
            ));
            let mqtt = runner
                .scenario_with(false, &extra, async |platform: &Platform| {
                    scenarios::mqtt_ingest(platform, mqtt_devices, mqtt_rate, duration).await
                })
                .await?;
            figures.push(figure(
                "tracing",
                mqtt_name,
                mqtt.durable_per_second,
                "msg/s",
                None,
            ));
        }
        details.insert("tracing-spans-received".into(), json!(otlp.spans().len()));
        otlp.stop().await;
    }
    if wanted("http-batched") {
        let (result, raw_copy) = runner
            .scenario(async |platform: &Platform| {
                let result =
                    scenarios::http_ingest(platform, "http-batched", 8, 100, duration).await?;
                // The limit: as many rows as the product stored, through binary COPY.
                let copy_rows = result.accepted.clamp(10_000, 5_000_000);
                let raw_copy = raw::postgres_copy(&servers, &platform.database, copy_rows)
                    .await
                    .context("raw copy")?;
                anyhow::Ok((result, raw_copy))
            })
            .await?;
        figures.push(figure(
            "raw",
            "PostgreSQL binary COPY",
            raw_copy,
            "rows/s",
            None,
        ));
        figures.push(figure(
            "http-batched",
            "readings durable in Postgres (100/request)",
            result.durable_per_second,
            "readings/s",
            Some(("PostgreSQL binary COPY", raw_copy)),
        ));
        figures.push(figure(
            "http-batched",
            "request latency p99",
            result.latency.p99_ms,
            "ms",
            None,
        ));
        details.insert("http-batched".into(), serde_json::to_value(&result)?);
    }
    if wanted("http-single") {
        let (result, alone, baseline) = runner
            .scenario(async |platform: &Platform| {
                let result = scenarios::http_ingest(
                    platform,
                    "http-single",
                    HTTP_SINGLE_CLIENTS,
                    1,
                    duration,
                )
                .await?;
                // The target: ingest-http alone on the machine, in turns with the same
                // clients against a minimal server doing the same publish (its limit).
                let (alone, baseline) = scenarios::http_single_paired(
                    platform,
                    HTTP_SINGLE_CLIENTS,
                    duration,
                    HTTP_SINGLE_ROUNDS,
                )
                .await
                .context("ingest-http alone, in turns with a minimal actix-web ingest")?;
                anyhow::Ok((result, alone, baseline))
            })
            .await?;
        figures.push(figure(
            "raw",
            MINIMAL_INGEST,
            baseline.accepted_per_second,
            "req/s",
            None,
        ));
        figures.push(figure(
            "raw",
            "minimal actix-web ingest: CPU per 1,000 requests",
            baseline.cpu_ms_per_1000,
            "ms",
            None,
        ));
        // The minimal server's stream has no consumer: nothing else runs while it is
        // measured. The target is on ingest-http measured the same way and in turns with it,
        // the rest of the platform stopped meanwhile (it catches up after, and everything is
        // stored); the figure with the whole pipeline on the same two cores comes next.
        figures.push(
            figure(
                "http-single",
                HTTP_SINGLE_ALONE,
                alone.accepted_per_second,
                "req/s",
                Some((MINIMAL_INGEST, baseline.accepted_per_second)),
            )
            .target(Target::RatioAtLeast(0.8)),
        );
        figures.push(figure(
            "http-single",
            "requests accepted (1 reading each), the whole pipeline on the same cores",
            result.accepted_per_second,
            "req/s",
            Some((MINIMAL_INGEST, baseline.accepted_per_second)),
        ));
        figures.push(figure(
            "http-single",
            "requests accepted, beside JetStream alone",
            result.accepted_per_second,
            "req/s",
            Some(("JetStream publish, acked", raw_jetstream)),
        ));
        // The same comparison in CPU: on a 2-core machine the rest of the platform (the writer,
        // PostgreSQL, presence, fan-out) takes cores from ingest-http, which the minimal
        // server's stream (no consumer) does not; requests per CPU second compare the two
        // handlers' own work.
        let ingest_ms = result
            .cpu
            .ms_per_1000
            .get("ingest-http")
            .copied()
            .unwrap_or_default();
        figures.push(figure(
            "http-single",
            "ingest-http CPU per 1,000 requests",
            ingest_ms,
            "ms",
            None,
        ));
        let per_cpu_second = |ms_per_1000: f64| {
            if ms_per_1000 > 0.0 {
                1_000_000.0 / ms_per_1000
            } else {
                0.0
            }
        };
        figures.push(figure(
            "http-single",
            "requests per CPU second of ingest-http",
            per_cpu_second(ingest_ms),
            "req/core-s",
            Some((
                "minimal actix-web handler, requests per CPU second",
                per_cpu_second(baseline.cpu_ms_per_1000),
            )),
        ));
        details.insert(
            "http-single-minimal-actix".into(),
            serde_json::to_value(&baseline)?,
        );
        details.insert("http-single-alone".into(), serde_json::to_value(&alone)?);
        figures.push(figure(
            "http-single",
            "request latency p50",
            result.latency.p50_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            "http-single",
            "request latency p99",
            result.latency.p99_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            "http-single",
            "request latency p99.9",
            result.latency.p999_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            "http-single",
            "PostgreSQL bytes per reading (partitions with indexes)",
            result.storage.bytes_per_reading,
            "bytes",
            None,
        ));
        figures.push(figure(
            "http-single",
            "JetStream bytes per message (1 reading each)",
            result.storage.stream_bytes_per_message,
            "bytes",
            None,
        ));
        details.insert("http-single".into(), serde_json::to_value(&result)?);
    }
    if wanted("ingest-scaling") {
        // HTTP batches: ingest-http scales out behind a load balancer with nothing shared,
        // so the curve is the product's and not the broker's (MQTT's fixed slot sessions
        // spread over the processes, through one Mosquitto). --quick: 1 and 2 processes.
        let steps: &[usize] = if args.quick { &[1, 2] } else { &[1, 2, 4] };
        let mut curve = Vec::new();
        let mut single = None;
        for &processes in steps {
            let result = runner
                .scenario_scaled(processes, async |platform: &Platform| {
                    scenarios::http_ingest(
                        platform,
                        "ingest-scaling",
                        SCALING_CLIENTS,
                        100,
                        duration,
                    )
                    .await
                })
                .await?;
            let per_1000 = |prefix: &str| -> f64 {
                result
                    .cpu
                    .ms_per_1000
                    .iter()
                    .filter(|(process, _)| {
                        *process == prefix || process.starts_with(&format!("{prefix}#"))
                    })
                    .map(|(_, ms)| ms)
                    .sum()
            };
            let (ingest, query, backends) = (
                per_1000("ingest-http"),
                per_1000("query-api"),
                per_1000("postgres backends"),
            );
            let nats = result.cpu.ms_per_1000.get("nats-server").copied();
            let label =
                |what: &str| format!("{what}, {processes} ingest-http + {processes} query-api");
            figures.push(figure(
                "ingest-scaling",
                label("readings durable (100/request)"),
                result.durable_per_second,
                "readings/s",
                single.map(|one| ("the same with 1 process of each", one)),
            ));
            figures.push(figure(
                "ingest-scaling",
                label("ingest-http CPU per 1,000 readings, all processes"),
                ingest,
                "ms",
                None,
            ));
            figures.push(figure(
                "ingest-scaling",
                label("query-api CPU per 1,000 readings, all processes"),
                query,
                "ms",
                None,
            ));
            figures.push(figure(
                "ingest-scaling",
                label("PostgreSQL backends CPU per 1,000 readings"),
                backends,
                "ms",
                None,
            ));
            single.get_or_insert(result.durable_per_second);
            curve.push(json!({
                "processes": processes,
                "durable_per_second": result.durable_per_second,
                "accepted_per_second": result.accepted_per_second,
                "scale": result.durable_per_second / single.unwrap_or(1.0),
                "ms_per_1000": {
                    "ingest-http": ingest,
                    "query-api": query,
                    "postgres backends": backends,
                    "nats-server": nats,
                },
                "latency_p99_ms": result.latency.p99_ms,
            }));
            details.insert(
                format!("ingest-scaling-{processes}"),
                serde_json::to_value(&result)?,
            );
        }
        details.insert("ingest-scaling".into(), json!(curve));
    }
    if wanted("mqtt-qos1") {
        let result = runner
            .scenario(async |platform: &Platform| {
                scenarios::mqtt_ingest(platform, mqtt_devices, mqtt_rate, duration).await
            })
            .await?;
        figures.push(figure(
            "mqtt-qos1",
            "messages durable in Postgres",
            result.durable_per_second,
            "msg/s",
            Some(("Mosquitto QoS 1 pub→sub", raw_mqtt_qos1)),
        ));
        // The same figure beside the broker alone in the scenario's own shape: what the
        // device connections and the broker hop cost, before anything of ours.
        figures.push(figure(
            "mqtt-qos1",
            "messages durable in Postgres, against the same fan-in",
            result.durable_per_second,
            "msg/s",
            Some((FAN_IN, raw_mqtt_fan_in)),
        ));
        // Not in the rates: the clock starts once every device is up, as for the raw fan-in.
        figures.push(figure(
            "mqtt-qos1",
            "seconds for every device to connect (before the clock starts)",
            result.seconds_to_connect.unwrap_or_default(),
            "s",
            None,
        ));
        figures.push(figure(
            "mqtt-qos1",
            "messages offered (broker PUBACKs)",
            result.accepted_per_second,
            "msg/s",
            None,
        ));
        // Lost = the broker acknowledged them to the device but dropped them before
        // ingest-mqtt took them (Mosquitto's per-session queue limit). Reported, never hidden.
        figures.push(figure(
            "mqtt-qos1",
            "messages lost at the broker",
            result.accepted.saturating_sub(result.stored) as f64,
            "msg",
            None,
        ));
        details.insert("mqtt-qos1".into(), serde_json::to_value(&result)?);
        // The same load on a broker without access checks (anonymous devices, no accounts):
        // what device identity on the broker costs, in this run.
        let open = runner
            .scenario_on(true, async |platform: &Platform| {
                scenarios::mqtt_ingest(platform, mqtt_devices, mqtt_rate, duration).await
            })
            .await?;
        figures.push(figure(
            "mqtt-qos1",
            "messages durable in Postgres, broker without access checks",
            open.durable_per_second,
            "msg/s",
            Some((QOS1_OPEN, raw_mqtt_qos1_open)),
        ));
        details.insert("mqtt-qos1-open-broker".into(), serde_json::to_value(&open)?);
    }
    // What one rate-limit check costs, beside a request's time in http-single.
    let (key_check_ns, device_check_ns) = limiter_cost();
    figures.push(figure(
        "rate-limits",
        "one API-key check (10,000 keys)",
        key_check_ns,
        "ns",
        None,
    ));
    figures.push(figure(
        "rate-limits",
        "one device check (10,000 devices)",
        device_check_ns,
        "ns",
        None,
    ));
    if wanted("queries") {
        let seed = if args.quick {
            queries::Seed::quick()
        } else {
            queries::Seed::full()
        };
        let result = runner
            .scenario(async |platform: &Platform| {
                queries::run(platform, seed, 32, duration, false).await
            })
            .await?;
        query_figures(&mut figures, "queries", &result);
        details.insert("queries".into(), serde_json::to_value(&result)?);
    }
    // The same queries with history read from a streaming replica: a private primary and a
    // `pg_basebackup -R` replica of it on this machine, query-api given the replica in
    // FIELDLINE_DATABASE_READ_URL. Beside the primary's figures above (one machine: the
    // replica takes the reads, not more CPU).
    if wanted("queries-replica") {
        let seed = if args.quick {
            queries::Seed::quick()
        } else {
            queries::Seed::full()
        };
        let primary = fieldline_testkit::secure::PrivatePostgres::start_plain().await;
        let replica = primary.start_replica().await;
        let read_url = format!("{}/{{database}}", replica.server_url());
        let result = runner
            .scenario_on_servers(
                runner.servers.with_pg_url(primary.server_url()),
                false,
                &[("FIELDLINE_DATABASE_READ_URL", read_url.as_str())],
                1,
                async |platform: &Platform| queries::run(platform, seed, 32, duration, true).await,
            )
            .await?;
        query_figures(&mut figures, "queries-replica", &result);
        details.insert("queries-replica".into(), serde_json::to_value(&result)?);
    }
    if wanted("storage") {
        let result = runner
            .scenario(async |platform: &Platform| {
                storage::run(platform, args.quick, duration).await
            })
            .await?;
        let per = |bytes: i64| result.bytes_per_reading(bytes);
        let csv = result.csv_bytes as f64 / result.readings as f64;
        figures.extend([
            figure(
                "storage",
                "backfill of the measured case (one device, 10 metrics, 10 s), durable",
                result.backfill_readings_per_second,
                "readings/s",
                Some((
                    "PostgreSQL binary COPY of as many rows",
                    result.copy_rows_per_second,
                )),
            ),
            figure(
                "storage",
                "bytes a reading as rows (table and index)",
                per(result.open_bytes),
                "B",
                Some(("the same readings as CSV", csv)),
            ),
            figure(
                "storage",
                "bytes a reading compressed (blocks, toast, index, emptied partitions)",
                per(result.compressed_bytes),
                "B",
                Some(("the same readings as rows", per(result.open_bytes))),
            )
            .target(Target::AtMost(3.0)),
            figure(
                "storage",
                "compression",
                result.readings as f64 / result.compress_seconds,
                "readings/s",
                None,
            ),
            figure(
                "storage",
                "1,000-row pages per second over compressed days",
                result.pages_per_second_compressed,
                "req/s",
                Some((
                    "the same pages over the days open",
                    result.pages_per_second_open,
                )),
            ),
            figure(
                "storage",
                "export rows per second over compressed days",
                result.export_rows_per_second_compressed,
                "rows/s",
                Some((
                    "the same export over the days open",
                    result.export_rows_per_second_open,
                )),
            ),
        ]);
        if let Some(influx) = &result.influx {
            figures.extend([
                figure(
                    "storage",
                    "backfill of the measured case, durable, beside InfluxDB",
                    result.backfill_readings_per_second,
                    "readings/s",
                    Some((
                        "InfluxDB 1.6 line protocol, same readings",
                        influx.readings_per_second,
                    )),
                ),
                figure(
                    "storage",
                    "bytes a reading compressed, beside InfluxDB",
                    per(result.compressed_bytes),
                    "B",
                    Some((
                        "InfluxDB 1.6 after compaction",
                        influx.data_bytes as f64 / influx.readings as f64,
                    )),
                )
                // Half of InfluxDB's bytes: a ratio of at most 0.5.
                .target(Target::AtMost(
                    0.5 * influx.data_bytes as f64 / influx.readings as f64,
                )),
            ]);
        }
        details.insert("storage".into(), serde_json::to_value(&result)?);
    }
    let peak_memory = runner.peaks.into_inner();
    let memory: Vec<Value> = idle_memory
        .iter()
        .map(|(service, (idle, _))| json!({"service": service, "idle_rss_mib": idle, "peak_rss_mib": peak_memory.get(service)}))
        .collect();
    let report = json!({
        "date": started_at.to_rfc3339(),
        "mode": if args.quick { "quick" } else { "full" },
        "seconds_per_scenario": seconds,
        "fieldline": fieldline,
        "machine": machine(),
        "private_nats": args.private_nats,
        "figures": figures,
        "memory": memory,
        "details": details,
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), markdown(&report, &figures))?;
    eprintln!("report: {}", args.out.join("report.md").display());

    // The harness check of `make test`: every figure was produced.
    let missing: Vec<_> = figures
        .iter()
        .filter(|f| f.unit != "msg" && !(f.value.is_finite() && f.value > 0.0))
        .map(|f| f.figure.clone())
        .collect();
    anyhow::ensure!(
        !missing.is_empty() || !figures.is_empty(),
        "no figures produced"
    );
    anyhow::ensure!(missing.is_empty(), "figures not produced: {missing:?}");
    // And the figures issue 19 asks for are there at all, with their limits.
    let absent: Vec<String> = required_figures(&figures, &wanted);
    anyhow::ensure!(absent.is_empty(), "figures missing: {absent:?}");
    Ok(())
}

/// The figures each wanted scenario must produce (each with its limit where it has one), and
/// at least two points of the scaling curve; what is missing, by name.
fn required_figures(figures: &[Figure], wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let required: [(&str, &str, bool); 10] = [
        ("http-single", HTTP_SINGLE_ALONE, true),
        (
            "http-single",
            "requests per CPU second of ingest-http",
            true,
        ),
        ("queries", "1,000-row pages per second", true),
        ("queries", "latest values p99", false),
        ("queries", LATEST_PACED_P99, false),
        (
            "queries",
            "CSV export of a device's day (Accept: text/csv), rows",
            true,
        ),
        (
            "queries",
            "bytes per reading on disk, open (readings partitions, indexes, TOAST)",
            false,
        ),
        (
            "queries",
            "bytes per reading as CSV (the export's body)",
            false,
        ),
        ("webhooks-latency", "send→delivery p99", false),
        (
            "ingest-scaling",
            "readings durable (100/request), 2 ingest-http + 2 query-api",
            true,
        ),
    ];
    let mut absent = Vec::new();
    for (scenario, label, limited) in required {
        if !wanted(scenario) {
            continue;
        }
        let found = figures.iter().any(|f| {
            f.scenario == scenario
                && f.figure == label
                && (!limited
                    || f.ratio
                        .is_some_and(|ratio| ratio.is_finite() && ratio > 0.0))
        });
        if !found {
            absent.push(format!("{scenario}: {label}"));
        }
    }
    if wanted("ingest-scaling")
        && figures
            .iter()
            .filter(|f| f.scenario == "ingest-scaling" && f.figure.starts_with("readings durable"))
            .count()
            < 2
    {
        absent.push("ingest-scaling: two points of the curve".into());
    }
    absent
}

/// The `ingest-scaling` curve: durable readings a second and CPU per 1,000 readings (every
/// process of a kind together) at each process count.
fn scaling_table(report: &Value) -> String {
    let Some(curve) = report["details"]["ingest-scaling"].as_array() else {
        return String::new();
    };
    let mut out = String::from(
        "\nScaling (`ingest-scaling`: 16 devices posting 100 readings a request, spread over N \
         ingest-http processes, N query-api processes sharing the writer consumer; CPU ms per \
         1,000 readings stored, the N processes of a kind together):\n\n\
         | N | readings durable/s | × N=1 | ingest-http | query-api | postgres backends | nats-server |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for step in curve {
        let ms = &step["ms_per_1000"];
        let cell = |value: &Value| {
            value
                .as_f64()
                .map(|ms| format!("{ms:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} |\n",
            step["processes"],
            step["durable_per_second"].as_f64().unwrap_or_default(),
            step["scale"].as_f64().unwrap_or_default(),
            cell(&ms["ingest-http"]),
            cell(&ms["query-api"]),
            cell(&ms["postgres backends"]),
            cell(&ms["nats-server"]),
        ));
    }
    out
}

/// CPU of each process per scenario (from /proc; the NATS server's with --private-nats only),
/// per 1,000 readings stored or deliveries made: the inputs of docs/sizing.md.
fn cpu_table(report: &Value) -> String {
    let mut out = String::from(
        "\nCPU per scenario, user + system from /proc/<pid>/stat, from the first request until \
         everything was stored (delivered); per 1,000 readings stored (deliveries made). \
         `postgres backends` = the backends connected to the scenario's database (PostgreSQL's \
         WAL writer and checkpointer are not counted).\n\n\
         | scenario | process | CPU (s) | CPU ms per 1,000 |\n| --- | --- | ---: | ---: |\n",
    );
    for (scenario, details) in report["details"].as_object().into_iter().flatten() {
        let Some(seconds) = details["cpu"]["seconds"].as_object() else {
            continue;
        };
        for (process, used) in seconds {
            out.push_str(&format!(
                "| {scenario} | {process} | {:.2} | {:.1} |\n",
                used.as_f64().unwrap_or_default(),
                details["cpu"]["ms_per_1000"][process]
                    .as_f64()
                    .unwrap_or_default()
            ));
        }
    }
    out
}

fn markdown(report: &Value, figures: &[Figure]) -> String {
    let machine = &report["machine"];
    let mut out = format!(
        "# Fieldline benchmark\n\n{} run of {}, {} s per scenario, on {} cores / {} GiB ({}); servers on the same machine.\n\n",
        report["mode"].as_str().unwrap_or_default(),
        report["date"].as_str().unwrap_or_default(),
        report["seconds_per_scenario"],
        machine["cores"],
        machine["memory_gib"],
        machine["cpu"].as_str().unwrap_or_default(),
    );
    out.push_str("| scenario | figure | value | raw limit | limit | ratio | target |\n| --- | --- | ---: | --- | ---: | ---: | --- |\n");
    for f in figures {
        // Milliseconds and bytes a reading are small numbers: two decimals.
        let precision = if matches!(f.unit, "ms" | "B") { 2 } else { 0 };
        let limit_value = f
            .limit_value
            .map(|v| format!("{v:.precision$} {}", f.unit))
            .unwrap_or_default();
        let ratio = f.ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
        out.push_str(&format!(
            "| {} | {} | {:.*} {} | {} | {} | {} | {} |\n",
            f.scenario,
            f.figure,
            precision,
            f.value,
            f.unit,
            f.limit.unwrap_or(""),
            limit_value,
            ratio,
            f.target_text()
        ));
    }
    out.push_str(&scaling_table(report));
    out.push_str(&cpu_table(report));
    out.push_str("\n| service | idle RSS (MiB) | peak RSS (MiB) |\n| --- | ---: | ---: |\n");
    for m in report["memory"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} |\n",
            m["service"].as_str().unwrap_or_default(),
            m["idle_rss_mib"].as_f64().unwrap_or(0.0),
            m["peak_rss_mib"].as_f64().unwrap_or(0.0)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_figure_or_limit_is_named() {
        let only = |name: &str| name == "queries";
        let absent = required_figures(&[], &only);
        assert!(absent.contains(&"queries: 1,000-row pages per second".to_owned()));
        assert!(absent.iter().all(|name| name.starts_with("queries: ")));

        let labels = [
            "1,000-row pages per second",
            "latest values p99",
            LATEST_PACED_P99,
            "CSV export of a device's day (Accept: text/csv), rows",
            "bytes per reading on disk, open (readings partitions, indexes, TOAST)",
            "bytes per reading as CSV (the export's body)",
        ];
        let mut figures: Vec<Figure> = labels
            .iter()
            .map(|label| figure("queries", *label, 1.0, "x", Some(("limit", 2.0))))
            .collect();
        assert!(required_figures(&figures, &only).is_empty());
        // A limited figure without its limit is as good as missing.
        figures[0].ratio = None;
        assert_eq!(
            required_figures(&figures, &only),
            vec!["queries: 1,000-row pages per second".to_owned()]
        );
    }

    #[test]
    fn targets_say_whether_they_were_met() {
        let fast =
            figure("queries", "latest values p99", 4.0, "ms", None).target(Target::AtMost(5.0));
        assert_eq!(fast.target_text(), "≤ 5 ms: met");
        let computed = figure("x", "y", 1.14, "B", None).target(Target::AtMost(3.248128));
        assert_eq!(computed.target_text(), "≤ 3.25 B: met");
        let slow =
            figure("x", "y", 1.0, "req/s", Some(("l", 2.0))).target(Target::RatioAtLeast(0.8));
        assert_eq!(slow.met, Some(false));
        assert_eq!(slow.target_text(), "ratio ≥ 0.80: missed");
    }
}
