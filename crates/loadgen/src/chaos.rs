//! `loadgen chaos`: the fault suite. Each fault gets a platform of its own (one process per
//! service) on private PostgreSQL, NATS and Mosquitto servers the suite may kill, a fixed load
//! over HTTP and MQTT, and a webhook receiver; the fault is injected while the load runs, and
//! what was acknowledged is compared reading by reading with what was stored and delivered.
//! docs/decisions/2026-12-05-fault-suite.md says what is counted and why.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use fieldline_testkit::{
    secure::PrivatePostgres,
    servers::{NatsCluster, PrivateNats},
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    load::{Acknowledged, Attempt, Channel, Devices, Load, Outcome, Shape},
    platform::{Platform, Servers, pg},
    receiver::Receiver,
};

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Two faults (kill -9 of query-api, of NATS), a few seconds each: proves the harness works
    /// and that nothing acknowledged is lost; exits non-zero if anything is.
    #[arg(long)]
    quick: bool,
    /// The `fieldline` binary to run; by default the one built beside this loadgen.
    #[arg(long)]
    fieldline: Option<String>,
    /// Where `report.md` and `report.json` go.
    #[arg(long, default_value = "chaos")]
    out: PathBuf,
    /// Comma list of faults to run (default: all of the mode), by name as in the report.
    #[arg(long)]
    faults: Option<String>,
    /// Messages a second of each MQTT device at full rate (default 5).
    #[arg(long)]
    mqtt_rate: Option<f64>,
}

/// The servers a fault may kill: the suite's own, never the machine's.
pub struct PrivateServers {
    pub postgres: PrivatePostgres,
    pub nats: PrivateNats,
    /// A three-node JetStream cluster, started for the first fault that needs it.
    pub cluster: Option<NatsCluster>,
    /// The platform's view: URLs and the private broker.
    pub servers: Servers,
}

impl PrivateServers {
    pub async fn start() -> Self {
        let postgres = PrivatePostgres::start_plain().await;
        let nats = PrivateNats::start().await;
        let servers = Servers::start(postgres.server_url(), nats.url()).await;
        Self {
            postgres,
            nats,
            cluster: None,
            servers,
        }
    }
}

/// The platform's settings under the fault suite and the soak.
pub const ENV: [(&str, &str); 9] = [
    ("FIELDLINE_WEBHOOK_ALLOW_PRIVATE", "true"),
    // The suite's devices send more than a fleet's would; the limits are policy, not what
    // is measured here.
    ("FIELDLINE_RATE_KEY_REQUESTS", "1000000"),
    ("FIELDLINE_RATE_KEY_PERIOD", "1s"),
    ("FIELDLINE_RATE_DEVICE_REQUESTS", "1000000"),
    ("FIELDLINE_RATE_DEVICE_PERIOD", "1s"),
    ("FIELDLINE_WEBHOOK_RATE_PER_SECOND", "1000000"),
    ("FIELDLINE_WEBHOOK_ENDPOINT_CONCURRENCY", "64"),
    // The default schedule (5s,30s,2m,10m,30m) delivers after a minute's outage too, but up
    // to 2 minutes later; this one keeps a fault's drain short and still spans more than a
    // minute (at least 100 s with -20 % jitter) before the last attempt.
    (
        "FIELDLINE_WEBHOOK_RETRY_SCHEDULE",
        "1s,2s,5s,10s,20s,30s,30s,30s",
    ),
    ("FIELDLINE_WEBHOOK_POLL_INTERVAL", "500ms"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// No fault: the baseline the others compare with.
    Baseline,
    /// kill -9 of a service, restarted after the outage.
    Kill(&'static str),
    KillNats,
    /// On a three-node JetStream cluster with every stream at 3 replicas: kill -9 of the
    /// server that leads the telemetry stream, restarted after the outage.
    KillClusterLeader,
    /// kill -9 of the broker, restarted after the outage. `saved`: after an autosave (every
    /// 30 s, as deployed) that holds ingest-mqtt's session, as in steady operation; otherwise
    /// within 30 s of a broker start, before any autosave knew the session.
    KillBroker {
        saved: bool,
    },
    /// `pg_ctl stop -m immediate`, started again after the outage.
    PostgresImmediate,
    /// The receiver answers 503 for a minute, the load at full or low rate.
    Receiver503 {
        low: bool,
    },
    /// Two instances of a service from the start; one is killed and not restarted.
    OneOfTwo(&'static str),
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Self::Baseline => "baseline".into(),
            Self::Kill(service) => format!("kill-{service}"),
            Self::KillNats => "kill-nats".into(),
            Self::KillClusterLeader => "kill-nats-cluster-leader".into(),
            Self::KillBroker { saved: true } => "kill-mosquitto".into(),
            Self::KillBroker { saved: false } => "kill-mosquitto-before-autosave".into(),
            Self::PostgresImmediate => "postgres-immediate-stop".into(),
            Self::Receiver503 { low: false } => "receiver-503-full-rate".into(),
            Self::Receiver503 { low: true } => "receiver-503-low-rate".into(),
            Self::OneOfTwo(service) => format!("two-{service}-one-killed"),
        }
    }

    fn description(&self, timing: &Timing) -> String {
        let down = timing.down.as_secs();
        let outage = timing.receiver_outage.as_secs();
        match self {
            Self::Baseline => "no fault".into(),
            Self::Kill(service) => {
                format!("kill -9 of {service}, a new process {down} s later")
            }
            Self::KillNats => format!("kill -9 of nats-server, restarted {down} s later"),
            Self::KillClusterLeader => format!(
                "three nats-servers, streams at 3 replicas: kill -9 of the telemetry stream's leader, restarted {down} s later"
            ),
            Self::KillBroker { saved: true } => format!(
                "kill -9 of mosquitto after an autosave with ingest-mqtt's session, restarted {down} s later"
            ),
            Self::KillBroker { saved: false } => format!(
                "kill -9 of mosquitto before its first autosave (started anew with the platform), restarted {down} s later"
            ),
            Self::PostgresImmediate => {
                format!("PostgreSQL immediate stop, started {down} s later")
            }
            Self::Receiver503 { low } => format!(
                "the webhook receiver answers 503 for {outage} s, load at {} rate",
                if *low { "1/20th" } else { "full" }
            ),
            Self::OneOfTwo(service) => {
                format!("two {service} processes, one killed with -9 and not restarted")
            }
        }
    }

    fn all() -> Vec<Self> {
        let mut faults = vec![Self::Baseline];
        faults.extend(crate::platform::SERVICES.map(Self::Kill));
        faults.extend([
            Self::KillNats,
            Self::KillClusterLeader,
            Self::KillBroker { saved: true },
            Self::KillBroker { saved: false },
            Self::PostgresImmediate,
            Self::Receiver503 { low: false },
            Self::Receiver503 { low: true },
        ]);
        faults.extend(
            [
                "query-api",
                "webhook-dispatcher",
                "device-registry",
                "ingest-mqtt",
            ]
            .map(Self::OneOfTwo),
        );
        faults
    }

    /// What `make test` runs: faults the platform is expected to come through whole today.
    fn quick() -> Vec<Self> {
        vec![Self::Kill("query-api"), Self::KillNats]
    }
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Load before the fault.
    before: Duration,
    /// How long a killed process or server stays down.
    down: Duration,
    /// How long the receiver answers 503.
    receiver_outage: Duration,
    /// Load after the fault ended.
    after: Duration,
    /// After the load stopped, how long stored (delivered) counts may stand still before
    /// what is missing counts as lost; webhooks wait longer, for the retry schedule's gaps.
    storage_stall: Duration,
    webhook_stall: Duration,
}

/// The suite's load: full rate, and the low rate of the second 503 fault.
pub const FULL: Shape = Shape {
    http_devices: 4,
    http_rate: 20.0,
    readings_per_request: 10,
    mqtt_devices: 16,
    mqtt_rate: 5.0,
};

/// Counts of one channel, or of both.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Readings in a 202 or a PUBACK.
    pub acknowledged: u64,
    /// Of those, in PostgreSQL at the end.
    pub stored: u64,
    /// Acknowledged and not stored.
    pub lost: u64,
    /// Stored though never acknowledged (the answer was lost, the reading was not): harmless,
    /// the device sends it again and the natural key keeps one.
    pub stored_unacknowledged: u64,
    /// When the first and the last lost reading were sent, seconds into the load.
    pub lost_sent_between_seconds: Option<(f64, f64)>,
}

impl Counts {
    fn add(self, other: Self) -> Self {
        Self {
            acknowledged: self.acknowledged + other.acknowledged,
            stored: self.stored + other.stored,
            lost: self.lost + other.lost,
            stored_unacknowledged: self.stored_unacknowledged + other.stored_unacknowledged,
            lost_sent_between_seconds: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct FaultResult {
    fault: String,
    description: String,
    readings: Counts,
    http: Counts,
    mqtt: Counts,
    /// Rows sharing (series, time): impossible under the primary key, measured anyway.
    stored_twice: u64,
    /// HTTP answers from the fault until recovery (or the end of the load).
    during_fault: Answers,
    /// MQTT messages whose connection dropped before their PUBACK, over the whole run.
    mqtt_unacknowledged: u64,
    /// From the fault's end (restart, or the kill when nothing is restarted) until both
    /// channels were acknowledged and stored again; `None`: not within the load.
    seconds_to_recover: Option<f64>,
    /// Of which: until the restarted process answered ready.
    seconds_to_ready: Option<f64>,
    /// The longest time from the fault on (to the end of the load) in which no reading of a
    /// channel was acknowledged.
    seconds_without_acks: WithoutAcks,
    /// The NATS server killed, for the cluster fault (`n1`..`n3`).
    nats_killed: Option<String>,
    webhooks: Webhooks,
    seconds_before: f64,
    seconds_down: f64,
    seconds_after: f64,
}

/// Per channel: a 202 means JetStream has the readings; a PUBACK means the broker has the
/// message (ingest-mqtt takes it on once JetStream has it), so MQTT devices are acknowledged
/// through a NATS outage while HTTP devices are not.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct WithoutAcks {
    http: f64,
    mqtt: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Answers {
    http_503: u64,
    http_other_5xx: u64,
    http_4xx: u64,
    /// Connection refused or reset, timeouts.
    http_no_answer: u64,
    http_202: u64,
}

/// Webhook events, counted by the readings they carry: ingest-mqtt puts waiting messages in
/// one bus message (a device's, and under load several devices' of a project), and fan-out
/// makes one event per device of it, so one event may carry several MQTT readings.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Webhooks {
    /// Acknowledged readings: each should reach the receiver in some event.
    expected: u64,
    /// Of those, reached it (answered 2xx).
    delivered: u64,
    /// Deliveries of a reading beyond its first.
    duplicated: u64,
    /// Deliveries of an event (`webhook-id`) beyond its first.
    duplicated_events: u64,
    events_delivered: u64,
    /// From the fault's end until every reading acknowledged before it had reached the
    /// receiver; `None` if one never did.
    seconds_to_catch_up: Option<f64>,
}

/// Stored counts per channel, polled every 250 ms from the series dictionary.
struct Monitor {
    samples: std::sync::Arc<std::sync::Mutex<Vec<(Duration, i64, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    fn start(url: String, started: Instant) -> Self {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = samples.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            loop {
                if client.is_none() {
                    client = tokio::time::timeout(Duration::from_secs(2), pg(&url))
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                if let Some(connected) = &client {
                    match tokio::time::timeout(
                        Duration::from_secs(2),
                        crate::load::stored_counts(connected),
                    )
                    .await
                    {
                        Ok(Ok((http, mqtt))) => kept
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((started.elapsed(), http, mqtt)),
                        _ => client = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { samples, task }
    }

    fn samples(&self) -> Vec<(Duration, i64, i64)> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// From `ended`, how long until `channel` was acknowledged again and its stored count grew
/// again; `None` if either did not happen.
fn resumed(
    attempts: &[Attempt],
    samples: &[(Duration, i64, i64)],
    channel: Channel,
    ended: Duration,
) -> Option<f64> {
    let acknowledged = attempts
        .iter()
        .filter(|a| a.channel == channel && a.outcome == Outcome::Acknowledged && a.at >= ended)
        .map(|a| a.at)
        .min()?;
    let count = |sample: &(Duration, i64, i64)| match channel {
        Channel::Http => sample.1,
        Channel::Mqtt => sample.2,
    };
    let before = samples
        .iter()
        .rev()
        .find(|s| s.0 < ended)
        .map(count)
        .unwrap_or(0);
    let stored = samples
        .iter()
        .find(|s| s.0 >= ended && count(s) > before)?
        .0;
    Some((acknowledged.max(stored) - ended).as_secs_f64())
}

pub fn fieldline_binary(given: Option<&str>) -> anyhow::Result<String> {
    match given {
        Some(path) => Ok(path.to_owned()),
        None => crate::sibling_fieldline(),
    }
}

pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let fieldline = fieldline_binary(args.fieldline.as_deref())?;
    let timing = if args.quick {
        Timing {
            before: Duration::from_secs(4),
            down: Duration::from_secs(4),
            receiver_outage: Duration::from_secs(10),
            after: Duration::from_secs(8),
            storage_stall: Duration::from_secs(15),
            webhook_stall: Duration::from_secs(40),
        }
    } else {
        Timing {
            before: Duration::from_secs(10),
            down: Duration::from_secs(10),
            receiver_outage: Duration::from_secs(60),
            after: Duration::from_secs(20),
            storage_stall: Duration::from_secs(20),
            webhook_stall: Duration::from_secs(45),
        }
    };
    let faults: Vec<Fault> = if args.quick {
        Fault::quick()
    } else {
        Fault::all()
    };
    let faults: Vec<Fault> = match &args.faults {
        Some(list) => Fault::all()
            .into_iter()
            .filter(|fault| list.split(',').any(|name| name.trim() == fault.name()))
            .collect(),
        None => faults,
    };
    anyhow::ensure!(!faults.is_empty(), "no such fault: {:?}", args.faults);
    let full = Shape {
        mqtt_rate: args.mqtt_rate.unwrap_or(FULL.mqtt_rate),
        ..FULL
    };
    let started_at = chrono::Utc::now();
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    eprintln!("private PostgreSQL, NATS and Mosquitto for the suite");
    let mut servers = PrivateServers::start().await;
    let mut results = Vec::new();
    for fault in faults {
        eprintln!("[{}] {}", fault.name(), fault.description(&timing));
        let result = run_fault(&fieldline, &mut servers, fault, &timing, &full, &logs)
            .await
            .with_context(|| fault.name())?;
        eprintln!(
            "[{}] acknowledged {}, stored {}, lost {}, recovered in {}",
            result.fault,
            result.readings.acknowledged,
            result.readings.stored,
            result.readings.lost,
            seconds(result.seconds_to_recover)
        );
        results.push(result);
    }
    let report = json!({
        "date": started_at.to_rfc3339(),
        "mode": if args.quick { "quick" } else { "full" },
        "fieldline": fieldline,
        "machine": crate::machine(),
        "load": {"full": full, "low": full.scaled(1.0 / 20.0), "readings_per_second_full": full.readings_per_second()},
        "timing_seconds": {
            "before": timing.before.as_secs(),
            "down": timing.down.as_secs(),
            "receiver_outage": timing.receiver_outage.as_secs(),
            "after": timing.after.as_secs(),
        },
        "platform_env": ENV.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "faults": results,
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), markdown(&report))?;
    eprintln!("report: {}", args.out.join("report.md").display());
    if args.quick {
        // The check of `make test`: the harness ran, and nothing acknowledged was lost.
        for result in &results {
            anyhow::ensure!(
                result.readings.acknowledged > 0,
                "{}: nothing was acknowledged",
                result.fault
            );
            anyhow::ensure!(
                result.readings.lost == 0,
                "{}: {} acknowledged readings lost",
                result.fault,
                result.readings.lost
            );
            anyhow::ensure!(
                result.seconds_to_recover.is_some(),
                "{}: did not recover while the load ran",
                result.fault
            );
        }
    }
    Ok(())
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "never".to_owned(), |s| format!("{s:.1} s"))
}

async fn run_fault(
    fieldline: &str,
    private: &mut PrivateServers,
    fault: Fault,
    timing: &Timing,
    full: &Shape,
    logs: &Path,
) -> anyhow::Result<FaultResult> {
    if fault == (Fault::KillBroker { saved: false }) {
        // A graceful restart saves the broker's state and starts its autosave clock: the
        // next save is 30 s away, after the kill.
        private.servers.broker.restart().await;
    }
    let mut servers = private.servers.clone();
    let mut env: Vec<(&str, &str)> = ENV.to_vec();
    if fault == Fault::KillClusterLeader {
        if private.cluster.is_none() {
            eprintln!("a private three-node NATS cluster for {}", fault.name());
            private.cluster = Some(NatsCluster::start().await);
        }
        servers.nats_url = private
            .cluster
            .as_ref()
            .map(NatsCluster::url)
            .unwrap_or_default();
        env.push(("FIELDLINE_STREAM_REPLICAS", "3"));
    }
    let mut platform = Platform::start_logged(
        fieldline,
        servers,
        &env,
        Some(logs.join(format!("{}.log", fault.name()))),
    )
    .await?;
    if let Fault::OneOfTwo(service) = fault {
        platform.add_instance(service).await?;
    }
    let shape = match fault {
        Fault::Receiver503 { low: true } => full.scaled(1.0 / 20.0),
        _ => *full,
    };
    let receiver = Receiver::start_tracking().await?;
    platform
        .post(
            "webhook-dispatcher",
            "/api/v1/webhooks",
            &json!({"url": receiver.url("/chaos"), "events": ["device.data"]}),
        )
        .await
        .context("registering the webhook")?;
    let devices = Devices::create(&platform, &shape).await?;
    let database_url = format!("{}/{}", private.servers.pg_url, platform.database);
    let mut load = Load::start(&platform, &shape, &devices)?;
    let monitor = Monitor::start(database_url.clone(), load.started);
    let before = match fault {
        // Past the broker's 30 s autosave: ingest-mqtt's session and subscription are saved.
        Fault::KillBroker { saved: true } => timing.before.max(Duration::from_secs(35)),
        _ => timing.before,
    };
    tokio::time::sleep(before).await;

    let mut nats_killed = None;
    if let (Fault::KillClusterLeader, Some(cluster)) = (fault, private.cluster.as_ref()) {
        let telemetry = fieldline_proto::Subjects::new(&platform.id)?
            .stream_name(fieldline_proto::Stream::Telemetry);
        nats_killed = Some(cluster.wait_for_stream_leader(&telemetry).await);
    }
    let injected = load.elapsed();
    match fault {
        Fault::Baseline => {}
        Fault::KillClusterLeader => {
            if let (Some(cluster), Some(leader)) = (private.cluster.as_mut(), &nats_killed) {
                cluster.kill(leader);
            }
        }
        Fault::Kill(service) | Fault::OneOfTwo(service) => platform.kill(service)?,
        Fault::KillNats => private.nats.kill(),
        Fault::KillBroker { .. } => private.servers.broker.kill(),
        Fault::PostgresImmediate => private.postgres.stop_immediate(),
        Fault::Receiver503 { .. } => receiver.set_failing(true),
    }
    let outage = match fault {
        Fault::Baseline | Fault::OneOfTwo(_) => Duration::ZERO,
        Fault::Receiver503 { .. } => timing.receiver_outage,
        _ => timing.down,
    };
    tokio::time::sleep(outage).await;
    let ended = load.elapsed();
    let mut seconds_to_ready = None;
    match fault {
        Fault::Kill(service) => {
            platform.restart(service)?;
            platform.wait_ready(service).await?;
            seconds_to_ready = Some((load.elapsed() - ended).as_secs_f64());
        }
        Fault::KillNats => private.nats.restart().await,
        Fault::KillClusterLeader => {
            if let (Some(cluster), Some(leader)) = (private.cluster.as_mut(), &nats_killed) {
                cluster.restart(leader).await;
            }
        }
        Fault::KillBroker { .. } => private.servers.broker.restart().await,
        Fault::PostgresImmediate => {
            private.postgres.restart().await;
            seconds_to_ready = Some((load.elapsed() - ended).as_secs_f64());
        }
        Fault::Receiver503 { .. } => receiver.set_failing(false),
        Fault::Baseline | Fault::OneOfTwo(_) => {}
    }
    let since_end = load.elapsed() - ended;
    tokio::time::sleep(timing.after.saturating_sub(since_end)).await;
    let load_ended = load.elapsed();
    let acknowledged = load.stop().await?;
    let attempts = load.attempts();

    let client = pg(&database_url).await?;
    drain(&platform, &client, &receiver, &acknowledged, timing).await?;
    let samples = monitor.samples();
    drop(monitor);

    let stored = crate::load::stored_readings(&client).await?;
    let (http, mqtt) = compare(&acknowledged, &stored, &shape);
    let stored_twice: i64 = client
        .query_one(
            "SELECT (count(*) - count(DISTINCT (series_id, ts)))::int8 FROM telemetry.readings",
            &[],
        )
        .await?
        .get(0);
    let recovery = [Channel::Http, Channel::Mqtt]
        .into_iter()
        .map(|channel| resumed(&attempts, &samples, channel, ended))
        .try_fold(0.0f64, |most, resumed| resumed.map(|s| most.max(s)));
    let window_end = recovery.map_or(load_ended, |s| ended + Duration::from_secs_f64(s));
    let mut during_fault = Answers::default();
    for attempt in attempts
        .iter()
        .filter(|a| a.channel == Channel::Http && a.at >= injected && a.at <= window_end)
    {
        match attempt.outcome {
            Outcome::Acknowledged => during_fault.http_202 += 1,
            Outcome::Unavailable => during_fault.http_503 += 1,
            Outcome::ServerError => during_fault.http_other_5xx += 1,
            Outcome::Refused => during_fault.http_4xx += 1,
            Outcome::Failed => during_fault.http_no_answer += 1,
        }
    }
    let seconds_without_acks = WithoutAcks {
        http: longest_without_acks(&attempts, Channel::Http, injected, load_ended),
        mqtt: longest_without_acks(&attempts, Channel::Mqtt, injected, load_ended),
    };
    let mqtt_unacknowledged = attempts
        .iter()
        .filter(|a| a.channel == Channel::Mqtt && a.outcome != Outcome::Acknowledged)
        .count() as u64;
    let webhooks = receiver.tracking(|tracking| {
        let mut webhooks = Webhooks::default();
        // The last first arrival of a reading acknowledged before the fault ended; `None`
        // once one of them never arrived.
        let mut caught_up = Some(Duration::ZERO);
        for device in &acknowledged {
            for (ts, at) in device.times.iter().zip(&device.acknowledged_at) {
                webhooks.expected += 1;
                let arrived = tracking.readings.get(&(device.device.clone(), *ts));
                if arrived.is_some() {
                    webhooks.delivered += 1;
                }
                if *at < ended {
                    caught_up = match (caught_up, arrived) {
                        (Some(latest), Some((_, first))) => {
                            Some(latest.max(first.duration_since(load.started)))
                        }
                        _ => None,
                    };
                }
            }
        }
        webhooks.duplicated = tracking
            .readings
            .values()
            .map(|&(n, _)| u64::from(n.saturating_sub(1)))
            .sum();
        webhooks.duplicated_events = tracking
            .ids
            .values()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum();
        webhooks.events_delivered = tracking.ids.len() as u64;
        webhooks.seconds_to_catch_up =
            caught_up.map(|latest| latest.saturating_sub(ended).as_secs_f64());
        webhooks
    });
    receiver.stop().await;
    platform.stop().await?;
    Ok(FaultResult {
        fault: fault.name(),
        description: fault.description(timing),
        readings: http.add(mqtt),
        http,
        mqtt,
        stored_twice: stored_twice.max(0) as u64,
        during_fault,
        mqtt_unacknowledged,
        seconds_to_recover: recovery,
        seconds_to_ready,
        seconds_without_acks,
        nats_killed,
        webhooks,
        seconds_before: injected.as_secs_f64(),
        seconds_down: (ended - injected).as_secs_f64(),
        seconds_after: (load_ended - ended).as_secs_f64(),
    })
}

/// The longest stretch from `from` to `to` in which no attempt of `channel` was acknowledged.
fn longest_without_acks(
    attempts: &[Attempt],
    channel: Channel,
    from: Duration,
    to: Duration,
) -> f64 {
    let mut acknowledged: Vec<Duration> = attempts
        .iter()
        .filter(|a| {
            a.channel == channel && a.outcome == Outcome::Acknowledged && a.at > from && a.at < to
        })
        .map(|a| a.at)
        .collect();
    acknowledged.sort();
    std::iter::once(from)
        .chain(acknowledged)
        .chain(std::iter::once(to))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).as_secs_f64())
        .fold(0.0, f64::max)
}

/// Acknowledged against stored, per channel.
pub fn compare(
    acknowledged: &[Acknowledged],
    stored: &HashSet<(String, i64)>,
    shape: &Shape,
) -> (Counts, Counts) {
    let mut counts = [Counts::default(), Counts::default()];
    let mut acknowledged_keys = HashSet::new();
    for device in acknowledged {
        let counts = &mut counts[device.channel as usize];
        for &ts in &device.times {
            counts.acknowledged += 1;
            if stored.contains(&(device.device.clone(), ts)) {
                counts.stored += 1;
            } else {
                counts.lost += 1;
                // A device's readings step 1 ms from the load's first time: its sequence
                // number, and from it when it was sent.
                let per_second = match device.channel {
                    Channel::Http => shape.http_rate * shape.readings_per_request as f64,
                    Channel::Mqtt => shape.mqtt_rate,
                };
                let sent = (ts - device.first_ms) as f64 / per_second.max(0.01);
                counts.lost_sent_between_seconds = Some(match counts.lost_sent_between_seconds {
                    Some((first, last)) => (first.min(sent), last.max(sent)),
                    None => (sent, sent),
                });
            }
            acknowledged_keys.insert((device.device.as_str(), ts));
        }
    }
    for (device, ts) in stored {
        if !acknowledged_keys.contains(&(device.as_str(), *ts)) {
            let channel = if device.starts_with(crate::load::MQTT_PREFIX) {
                Channel::Mqtt
            } else {
                Channel::Http
            };
            counts[channel as usize].stored_unacknowledged += 1;
        }
    }
    (counts[0], counts[1])
}

/// Waits until everything acknowledged is stored and the writer is idle, and every
/// acknowledged reading reached the receiver, or until the counts stand still (storage and
/// webhooks each their own time), for 5 minutes at most.
async fn drain(
    platform: &Platform,
    client: &tokio_postgres::Client,
    receiver: &Receiver,
    acknowledged: &[Acknowledged],
    timing: &Timing,
) -> anyhow::Result<()> {
    let expected: i64 = acknowledged.iter().map(|d| d.times.len() as i64).sum();
    let mut last_stored = (-1i64, Instant::now());
    let mut last_delivered = (0usize, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (http, mqtt) = crate::load::stored_counts(client).await?;
        let stored = http + mqtt;
        if stored != last_stored.0 {
            last_stored = (stored, Instant::now());
        }
        let delivered = receiver.tracking(|tracking| tracking.readings.len());
        if delivered != last_delivered.0 {
            last_delivered = (delivered, Instant::now());
        }
        // A killed writer's unacknowledged messages come back after the consumer's ack wait
        // (30 s): until the writer is idle, a count standing still is not final.
        let storage_done = platform.writer_idle().await.unwrap_or(false)
            && (stored >= expected || last_stored.1.elapsed() > timing.storage_stall);
        let webhooks_done =
            delivered as i64 >= expected || last_delivered.1.elapsed() > timing.webhook_stall;
        if (storage_done && webhooks_done) || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn markdown(report: &Value) -> String {
    let machine = &report["machine"];
    let load = &report["load"];
    let timing = &report["timing_seconds"];
    let mut out = format!(
        "# Fieldline fault suite\n\n{} run of {}, on {} cores / {} GiB ({}); servers on the same machine.\n\n\
         Each fault gets a fresh platform (one process per service) on private PostgreSQL, NATS \
         and Mosquitto, {} HTTP devices ({} requests/s each, {} readings a request) and {} MQTT \
         devices ({} QoS 1 messages/s each): {:.0} readings/s. Load {} s before the fault, the \
         fault ({} s down; the receiver's 503 lasts {} s), load {} s after it ends; then the \
         suite waits until what was acknowledged is stored and delivered, or nothing moves.\n\n",
        report["mode"].as_str().unwrap_or_default(),
        report["date"].as_str().unwrap_or_default(),
        machine["cores"],
        machine["memory_gib"],
        machine["cpu"].as_str().unwrap_or_default(),
        load["full"]["http_devices"],
        load["full"]["http_rate"],
        load["full"]["readings_per_request"],
        load["full"]["mqtt_devices"],
        load["full"]["mqtt_rate"],
        load["readings_per_second_full"].as_f64().unwrap_or(0.0),
        timing["before"],
        timing["down"],
        timing["receiver_outage"],
        timing["after"],
    );
    out.push_str(&table(report));
    out.push_str(
        "\nReadings: acknowledged = in an HTTP 202 or a broker PUBACK; stored = of those, in \
         PostgreSQL at the end (device, metric, time); lost = acknowledged, not stored; stored \
         twice = rows sharing a series and time (the primary key forbids it: measured, not \
         assumed). HTTP answers are counted from the fault until recovery. Without 202 / PUBACK = the \
         longest stretch from the fault to the end of the load in which no HTTP reading, no MQTT \
         message was acknowledged (a 202 needs JetStream; a PUBACK is the broker's, which keeps \
         the message for ingest-mqtt through a NATS outage). Recover = from the \
         fault's end (restart; the kill when nothing is restarted) until both HTTP and MQTT \
         readings are acknowledged and stored again. Webhooks are counted by the readings the \
         events carry (ingest-mqtt puts a device's waiting messages in one event): expected = \
         acknowledged readings, delivered = of those, received in a 2xx-answered delivery, \
         duplicated = deliveries of a reading beyond its first (dup. events: of a `webhook-id`); \
         caught up = from the fault's end until every reading acknowledged before it had reached \
         the receiver (0: all had, when it ended).\n",
    );
    out
}

/// The fault table, as the report and the README show it.
pub fn table(report: &Value) -> String {
    let mut out = String::from(
        "| fault | acknowledged | stored | lost | stored twice | 503 | other 5xx | no answer | without 202 / PUBACK (s) | recover (s) | webhook expected | delivered | duplicated | dup. events | webhooks caught up (s) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for fault in report["faults"].as_array().into_iter().flatten() {
        let during = &fault["during_fault"];
        let webhooks = &fault["webhooks"];
        let readings = &fault["readings"];
        let recover = fault["seconds_to_recover"]
            .as_f64()
            .map_or_else(|| "never".to_owned(), |s| format!("{s:.1}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {} | {} | {} | {} | {} | {} |\n",
            fault["fault"].as_str().unwrap_or_default(),
            readings["acknowledged"],
            readings["stored"],
            readings["lost"],
            fault["stored_twice"],
            during["http_503"],
            during["http_other_5xx"],
            during["http_no_answer"],
            fault["seconds_without_acks"]["http"].as_f64().unwrap_or_default(),
            fault["seconds_without_acks"]["mqtt"].as_f64().unwrap_or_default(),
            recover,
            webhooks["expected"],
            webhooks["delivered"],
            webhooks["duplicated"],
            webhooks["duplicated_events"],
            webhooks["seconds_to_catch_up"]
                .as_f64()
                .map_or_else(|| "—".to_owned(), |s| format!("{s:.1}")),
        ));
    }
    out
}
