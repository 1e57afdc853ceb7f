//! What a scenario cost: CPU seconds of each process of the platform (and of the NATS server
//! and the PostgreSQL backends serving the platform's database, when they can be told apart
//! from everyone else's), and what the readings take on disk. The fleet sizing
//! (docs/sizing.md) is computed from these.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::platform::Platform;

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// User plus system CPU time of process `pid` so far, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis
    // (state is field 3; utime and stime are fields 14 and 15).
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// CPU seconds used so far by each process that can be attributed to the platform.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    processes: BTreeMap<String, f64>,
    /// PostgreSQL backends connected to the platform's database, by pid.
    backends: BTreeMap<i32, f64>,
}

impl Snapshot {
    pub async fn take(platform: &Platform) -> Self {
        let mut processes = platform.cpu_seconds();
        if let Some(seconds) = platform.servers.nats_pid.and_then(cpu_seconds) {
            processes.insert("nats-server".into(), seconds);
        }
        let mut backends = BTreeMap::new();
        if let Ok(client) =
            crate::platform::pg(&format!("{}/{}", platform.servers.pg_url, platform.database))
                .await
            && let Ok(rows) = client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
        {
            for row in rows {
                let pid: i32 = row.get(0);
                if let Some(seconds) = u32::try_from(pid).ok().and_then(cpu_seconds) {
                    backends.insert(pid, seconds);
                }
            }
        }
        Self {
            processes,
            backends,
        }
    }

    /// CPU seconds each process used since `before`; the backends of the platform's database
    /// as one (`postgres backends`: a backend that is new counts from its start, one that
    /// ended is missed, so the pool's long-lived connections are what it sees).
    pub fn since(&self, before: &Snapshot) -> BTreeMap<String, f64> {
        let mut used: BTreeMap<String, f64> = self
            .processes
            .iter()
            .map(|(name, now)| {
                let then = before.processes.get(name).copied().unwrap_or(0.0);
                (name.clone(), (now - then).max(0.0))
            })
            .collect();
        let backends: f64 = self
            .backends
            .iter()
            .map(|(pid, now)| (now - before.backends.get(pid).copied().unwrap_or(0.0)).max(0.0))
            .sum();
        used.insert("postgres backends".into(), backends);
        used
    }
}

/// CPU of a scenario, per process, also per 1,000 units of work (readings, deliveries).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub seconds: BTreeMap<String, f64>,
    /// CPU milliseconds per 1,000 units (readings stored; deliveries).
    pub ms_per_1000: BTreeMap<String, f64>,
    pub units: u64,
}

impl Cpu {
    pub fn of(seconds: BTreeMap<String, f64>, units: u64) -> Self {
        let ms_per_1000 = seconds
            .iter()
            .map(|(name, seconds)| {
                (
                    name.clone(),
                    if units == 0 {
                        0.0
                    } else {
                        seconds * 1000.0 * 1000.0 / units as f64
                    },
                )
            })
            .collect();
        Self {
            seconds,
            ms_per_1000,
            units,
        }
    }
}

/// What the readings take: PostgreSQL (every partition of `telemetry.readings` with its
/// indexes and TOAST, and the compressed blocks; the rollups, the series dictionary) and the
/// telemetry stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Storage {
    pub readings: i64,
    pub readings_bytes: i64,
    pub rollup_bytes: i64,
    pub series_bytes: i64,
    pub bytes_per_reading: f64,
    /// Readings, rollups and series together, per reading.
    pub all_bytes_per_reading: f64,
    pub stream_messages: u64,
    pub stream_bytes: u64,
    pub stream_bytes_per_message: f64,
}

impl Storage {
    pub async fn measure(platform: &Platform) -> anyhow::Result<Self> {
        let client = crate::platform::pg(&format!(
            "{}/{}",
            platform.servers.pg_url, platform.database
        ))
        .await?;
        let row = client
            .query_one(
                "SELECT ((SELECT count(*) FROM telemetry.readings)
                          + (SELECT COALESCE(sum(count), 0) FROM telemetry.blocks))::int8,
                        ((SELECT COALESCE(sum(pg_total_relation_size(inhrelid)), 0)
                           FROM pg_inherits WHERE inhparent = 'telemetry.readings'::regclass)
                          + pg_total_relation_size('telemetry.blocks'))::int8,
                        (pg_total_relation_size('telemetry.rollup_1h')
                           + pg_total_relation_size('telemetry.rollup_1d'))::int8,
                        pg_total_relation_size('telemetry.series')::int8",
                &[],
            )
            .await?;
        let (readings, readings_bytes, rollup_bytes, series_bytes): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let jetstream = async_nats::jetstream::new(platform.servers.nats().await?);
        let subjects = fieldline_proto::Subjects::new(&platform.id)?;
        let mut stream = jetstream
            .get_stream(subjects.stream_name(fieldline_proto::Stream::Telemetry))
            .await?;
        let state = stream.info().await?.state.clone();
        let per = |bytes: i64| {
            if readings > 0 {
                bytes as f64 / readings as f64
            } else {
                0.0
            }
        };
        Ok(Self {
            readings,
            readings_bytes,
            rollup_bytes,
            series_bytes,
            bytes_per_reading: per(readings_bytes),
            all_bytes_per_reading: per(readings_bytes + rollup_bytes + series_bytes),
            stream_messages: state.messages,
            stream_bytes: state.bytes,
            stream_bytes_per_message: if state.messages > 0 {
                state.bytes as f64 / state.messages as f64
            } else {
                0.0
            },
        })
    }
}
