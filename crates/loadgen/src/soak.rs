//! `loadgen soak`: the fault suite's platform and load, steady for many minutes, sampling each
//! process's resident memory and every table's size as it goes: what grows without bound
//! shows up as a slope between the first sample and the last.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Serialize;
use serde_json::json;

use crate::{
    chaos::{ENV, PrivateServers, compare},
    load::{Devices, Load, Shape},
    platform::{Platform, pg},
    receiver::Receiver,
};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Minutes between samples (the first is taken after one minute).
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// The `fieldline` binary to run; by default the one built beside this loadgen.
    #[arg(long)]
    fieldline: Option<String>,
    /// Where `soak.md` and `soak.json` go.
    #[arg(long, default_value = "chaos")]
    out: PathBuf,
}

/// A steady mixed load, lighter than the fault suite's so that it can run for hours.
const SOAK: Shape = Shape {
    http_devices: 4,
    http_rate: 10.0,
    readings_per_request: 10,
    mqtt_devices: 16,
    mqtt_rate: 2.0,
};

/// Webhook rows are kept this long after their delivery finished (production keeps 30 days):
/// short, so that the soak sees their retention at work.
const WEBHOOK_RETENTION: &str = "2m";

#[derive(Debug, Clone, Serialize)]
struct Sample {
    minute: f64,
    /// Resident memory (VmRSS) of each process, MiB.
    rss_mib: BTreeMap<String, f64>,
    /// `pg_total_relation_size` of each table (partitions summed per parent), bytes.
    table_bytes: BTreeMap<String, i64>,
    database_bytes: i64,
    readings_stored: i64,
    webhook_deliveries: u64,
}

/// Each table's size with its indexes and TOAST, partitions counted under their parent.
const TABLE_SIZES: &str = "
    SELECT n.nspname || '.' || COALESCE(parent.relname, c.relname),
           sum(pg_total_relation_size(c.oid))::int8
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
    LEFT JOIN pg_class parent ON parent.oid = i.inhparent
    WHERE c.relkind IN ('r', 'p')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%'
    GROUP BY 1 ORDER BY 1";

async fn sample(
    platform: &Platform,
    client: &tokio_postgres::Client,
    receiver: &Receiver,
    minute: f64,
) -> anyhow::Result<Sample> {
    let table_bytes = client
        .query(TABLE_SIZES, &[])
        .await?
        .into_iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect();
    let database_bytes: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let (http, mqtt) = crate::load::stored_counts(client).await?;
    Ok(Sample {
        minute,
        rss_mib: platform
            .memory()
            .into_iter()
            .map(|(service, (rss, _))| (service, rss))
            .collect(),
        table_bytes,
        database_bytes,
        readings_stored: http + mqtt,
        webhook_deliveries: receiver
            .counter()
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

pub async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let fieldline = crate::chaos::fieldline_binary(args.fieldline.as_deref())?;
    let started_at = chrono::Utc::now();
    std::fs::create_dir_all(&args.out)?;
    eprintln!("private PostgreSQL, NATS and Mosquitto for the soak");
    let servers = PrivateServers::start().await;
    let mut env = ENV.to_vec();
    env.push(("FIELDLINE_WEBHOOK_RETENTION", WEBHOOK_RETENTION));
    env.push(("FIELDLINE_WEBHOOK_RETENTION_INTERVAL", "20s"));
    let platform = Platform::start_logged(
        &fieldline,
        servers.servers.clone(),
        &env,
        Some(args.out.join("soak.log")),
    )
    .await?;
    let receiver = Receiver::start().await?;
    platform
        .post(
            "webhook-dispatcher",
            "/api/v1/webhooks",
            &json!({"url": receiver.url("/soak"), "events": ["device.data"]}),
        )
        .await?;
    let devices = Devices::create(&platform, &SOAK).await?;
    let client = pg(&format!("{}/{}", servers.servers.pg_url, platform.database)).await?;
    let mut load = Load::start(&platform, &SOAK, &devices)?;
    // After a minute (warmed up), every `every` minutes, and at the end.
    let mut marks = vec![1.min(args.minutes)];
    marks.extend(
        (1..)
            .map(|n| n * args.every.max(1))
            .take_while(|&m| m < args.minutes),
    );
    marks.push(args.minutes);
    marks.dedup();
    let mut samples = Vec::new();
    for mark in marks {
        let due = Duration::from_secs(mark * 60);
        tokio::time::sleep(due.saturating_sub(load.elapsed())).await;
        let minute = load.elapsed().as_secs_f64() / 60.0;
        let taken = sample(&platform, &client, &receiver, minute).await?;
        eprintln!(
            "[soak] {minute:.1} min: {} readings stored, database {:.1} MiB, RSS {:?}",
            taken.readings_stored,
            taken.database_bytes as f64 / 1_048_576.0,
            taken.rss_mib
        );
        samples.push(taken);
    }
    let acknowledged = load.stop().await?;
    platform.wait_durable(Duration::from_secs(300)).await?;
    let stored = crate::load::stored_readings(&client).await?;
    let (http, mqtt) = compare(&acknowledged, &stored, &SOAK);
    let report = json!({
        "date": started_at.to_rfc3339(),
        "minutes": args.minutes,
        "fieldline": fieldline,
        "machine": crate::machine(),
        "load": SOAK,
        "readings_per_second": SOAK.readings_per_second(),
        "webhook_retention": WEBHOOK_RETENTION,
        "readings": {"http": http, "mqtt": mqtt},
        "samples": samples,
    });
    std::fs::write(
        args.out.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("soak.md"), markdown(&report, &samples))?;
    eprintln!("report: {}", args.out.join("soak.md").display());
    platform.stop().await?;
    let lost = http.lost + mqtt.lost;
    anyhow::ensure!(lost == 0, "{lost} acknowledged readings lost");
    Ok(())
}

fn markdown(report: &serde_json::Value, samples: &[Sample]) -> String {
    let machine = &report["machine"];
    let readings = &report["readings"];
    let count = |field: &str| {
        readings["http"][field].as_u64().unwrap_or(0)
            + readings["mqtt"][field].as_u64().unwrap_or(0)
    };
    let mut out = format!(
        "# Fieldline soak\n\n{} minutes from {}, on {} cores / {} GiB ({}); servers on the same \
         machine. Load: {} HTTP devices ({} requests/s of {} readings) and {} MQTT devices ({} \
         QoS 1 messages/s), {:.0} readings/s, one webhook taking every `device.data` event; \
         webhook rows kept {} after delivery.\n\n\
         Readings acknowledged {}, stored {}, lost {}.\n\n",
        report["minutes"],
        report["date"].as_str().unwrap_or_default(),
        machine["cores"],
        machine["memory_gib"],
        machine["cpu"].as_str().unwrap_or_default(),
        SOAK.http_devices,
        SOAK.http_rate,
        SOAK.readings_per_request,
        SOAK.mqtt_devices,
        SOAK.mqtt_rate,
        SOAK.readings_per_second(),
        WEBHOOK_RETENTION,
        count("acknowledged"),
        count("stored"),
        count("lost"),
    );
    let header = |first: &str| {
        let mut line = format!("| {first} |");
        let mut rule = String::from("| --- |");
        for sample in samples {
            line.push_str(&format!(" {:.0} min |", sample.minute));
            rule.push_str(" ---: |");
        }
        format!("{line}\n{rule}\n")
    };
    out.push_str(&header("process RSS (MiB)"));
    let processes = samples
        .first()
        .map(|s| s.rss_mib.keys().cloned().collect::<Vec<_>>());
    for process in processes.into_iter().flatten() {
        out.push_str(&format!("| {process} |"));
        for sample in samples {
            let rss = sample.rss_mib.get(&process).copied().unwrap_or(0.0);
            out.push_str(&format!(" {rss:.1} |"));
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&header("table (MiB, with indexes)"));
    let tables = samples
        .last()
        .map(|s| s.table_bytes.keys().cloned().collect::<Vec<_>>());
    for table in tables.into_iter().flatten() {
        out.push_str(&format!("| {table} |"));
        for sample in samples {
            let bytes = sample.table_bytes.get(&table).copied().unwrap_or(0);
            out.push_str(&format!(" {:.2} |", bytes as f64 / 1_048_576.0));
        }
        out.push('\n');
    }
    out.push_str("| **database** |");
    for sample in samples {
        out.push_str(&format!(
            " {:.1} |",
            sample.database_bytes as f64 / 1_048_576.0
        ));
    }
    out.push_str("\n| readings stored |");
    for sample in samples {
        out.push_str(&format!(" {} |", sample.readings_stored));
    }
    out.push_str("\n| webhook deliveries |");
    for sample in samples {
        out.push_str(&format!(" {} |", sample.webhook_deliveries));
    }
    out.push('\n');
    out
}
