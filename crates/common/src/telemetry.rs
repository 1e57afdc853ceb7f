//! Logs (tracing, JSON or text) and Prometheus metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{Config, LogFormat};

/// Installs the global subscriber once; later calls (tests) are no-ops. No traces are
/// exported (see [`init`]).
pub fn init_tracing(config: &Config) {
    install(config, None);
}

/// Logs, and traces when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`, see
/// [`crate::trace`]); `service` is the default `service.name`. Keep the guard until exit: it
/// flushes the last spans.
pub fn init(config: &Config, service: &str) -> anyhow::Result<crate::trace::TracerGuard> {
    if !crate::trace::configured() {
        install(config, None);
        return Ok(crate::trace::no_tracer());
    }
    let (provider, guard) = crate::trace::provider(service)?;
    install(config, Some(provider));
    Ok(guard)
}

/// The crates whose spans are exported: Fieldline's own, not its dependencies'.
const TRACED: [&str; 7] = [
    "fieldline",
    "fieldline_common",
    "device_registry",
    "ingest_http",
    "ingest_mqtt",
    "query_api",
    "webhook_dispatcher",
];

fn install(config: &Config, traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::{Layer, filter::Targets};
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let traced = traces.is_some();
    let logs: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match config.log_format {
        // With traces, each line carries the current span's fields: its trace_id and span_id.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(traced)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt::layer().compact().with_filter(filter).boxed(),
    };
    let otel = traces.map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("fieldline");
        opentelemetry::global::set_tracer_provider(provider);
        let targets = TRACED.iter().fold(Targets::new(), |targets, crate_name| {
            targets.with_target(*crate_name, tracing::Level::INFO)
        });
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(targets)
    });
    let result = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init();
    // Already installed by an earlier call in this process: keep that one.
    let _ = result;
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Every metric family Fieldline records, with its kind and HELP text. A test reads the
/// sources and fails on a family missing here, so none goes out without HELP.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "fieldline_build_info",
        Kind::Gauge,
        "Always 1; the labels say which release and commit this process runs",
    ),
    (
        "fieldline_http_requests_total",
        Kind::Counter,
        "HTTP requests answered, by method (_OTHER for an extension method), route template and status",
    ),
    (
        "fieldline_http_request_duration_seconds",
        Kind::Histogram,
        "HTTP request duration in seconds, by method (_OTHER for an extension method), route template and status",
    ),
    (
        "fieldline_ingest_readings_total",
        Kind::Counter,
        "Readings accepted by ingest (acknowledged once in JetStream), by source",
    ),
    (
        "fieldline_ingest_duplicates_total",
        Kind::Counter,
        "Ingest requests or messages dropped as repeats of an Idempotency-Key or msg_id, by source",
    ),
    (
        "fieldline_ingest_long_polls_waiting",
        Kind::Gauge,
        "Command long-polls waiting in this process",
    ),
    (
        "fieldline_ingest_long_polls_refused_total",
        Kind::Counter,
        "Command long-polls refused with 503 because this process held its maximum",
    ),
    (
        "fieldline_ingest_backfills_refused_total",
        Kind::Counter,
        "Backfills refused with 503 because this process was parsing its maximum at once",
    ),
    (
        "fieldline_query_streams_open",
        Kind::Gauge,
        "Live streams (Server-Sent Events) open in this process",
    ),
    (
        "fieldline_query_streams_refused_total",
        Kind::Counter,
        "Live streams refused because a key, a project or this process held its maximum",
    ),
    (
        "fieldline_mqtt_messages_total",
        Kind::Counter,
        "MQTT messages handled by ingest-mqtt, by outcome",
    ),
    (
        "fieldline_mqtt_dropped_total",
        Kind::Counter,
        "MQTT messages acknowledged to the broker and dropped, by reason",
    ),
    (
        "fieldline_mqtt_connects_total",
        Kind::Counter,
        "MQTT connections ingest-mqtt established (first connects and reconnects)",
    ),
    (
        "fieldline_mqtt_downlink_total",
        Kind::Counter,
        "Config and command messages handled by the MQTT downlink, by outcome",
    ),
    (
        "fieldline_mqtt_admin_connected",
        Kind::Gauge,
        "1 while the registry's broker admin session is connected",
    ),
    (
        "fieldline_mqtt_accounts_repaired_total",
        Kind::Counter,
        "Broker device accounts created, updated or removed by the registry's repair, by action",
    ),
    (
        "fieldline_rate_limited_total",
        Kind::Counter,
        "Requests or messages refused by a rate limit, by limit",
    ),
    (
        "fieldline_rate_limit_tracked",
        Kind::Gauge,
        "Keys, devices and addresses whose rate-limit state this process holds, by kind",
    ),
    (
        "fieldline_registry_offline_total",
        Kind::Counter,
        "Devices the registry's sweep turned offline",
    ),
    (
        "fieldline_registry_alerts_fired_by_sweep_total",
        Kind::Counter,
        "Pending alerts the registry's sweep fired once their for_s passed with no new reading",
    ),
    (
        "fieldline_registry_outbox_published_total",
        Kind::Counter,
        "Registry events published from the outbox to the bus",
    ),
    (
        "fieldline_registry_outbox_failures_total",
        Kind::Counter,
        "Failed attempts to publish the registry's outbox",
    ),
    (
        "fieldline_registry_state_lag_messages",
        Kind::Gauge,
        "Telemetry messages the registry's state consumer has not yet applied",
    ),
    (
        "fieldline_writer_readings_total",
        Kind::Counter,
        "Readings stored by the query-api writer",
    ),
    (
        "fieldline_writer_batch_seconds",
        Kind::Histogram,
        "Time to store one batch of telemetry messages, in seconds",
    ),
    (
        "fieldline_writer_failures_total",
        Kind::Counter,
        "Writer batches that failed and were tried again",
    ),
    (
        "fieldline_writer_dropped_total",
        Kind::Counter,
        "Readings the writer did not store, by reason (out of the stored time range, expired)",
    ),
    (
        "fieldline_writer_redelivered_batches_total",
        Kind::Counter,
        "Writer batches that met rows already stored (a redelivery) and skipped them",
    ),
    (
        "fieldline_compressed_readings_total",
        Kind::Counter,
        "Readings of closed days moved from rows into compressed blocks by the compression task",
    ),
    (
        "fieldline_writer_transactions_total",
        Kind::Counter,
        "Writer transactions, by outcome",
    ),
    (
        "fieldline_writer_transaction_errors_total",
        Kind::Counter,
        "Writer transactions that failed, by PostgreSQL error code",
    ),
    (
        "fieldline_consumer_messages_total",
        Kind::Counter,
        "Bus messages settled by each JetStream consumer, by outcome (done, wait, failed, poison)",
    ),
    (
        "fieldline_consumer_pending_messages",
        Kind::Gauge,
        "Messages of a JetStream consumer's stream not yet delivered to it, by consumer",
    ),
    (
        "fieldline_consumer_ack_pending_messages",
        Kind::Gauge,
        "Messages delivered to a JetStream consumer and not yet acknowledged, by consumer",
    ),
    (
        "fieldline_consumer_lag_seconds",
        Kind::Gauge,
        "Age of the oldest message a JetStream consumer has not acknowledged (0 when caught up), by consumer; query-writer's is the writer's lag",
    ),
    (
        "fieldline_db_pool_connections",
        Kind::Gauge,
        "PostgreSQL pool connections, by state (in_use, idle)",
    ),
    (
        "fieldline_db_pool_max_connections",
        Kind::Gauge,
        "PostgreSQL pool size limit",
    ),
    (
        "fieldline_db_replica_lag_seconds",
        Kind::Gauge,
        "How far a PostgreSQL read replica's replay is behind the primary, by replica (host:port): 0 when it has replayed what the primary had written at the last probe, also when the primary is idle",
    ),
    (
        "fieldline_db_replica_usable",
        Kind::Gauge,
        "1 when query-api reads history from this replica, 0 when it is skipped (behind FIELDLINE_DATABASE_READ_MAX_LAG, not answering, or not in recovery)",
    ),
    (
        "fieldline_db_replica_fallbacks_total",
        Kind::Counter,
        "Reads that failed on a replica (connection lost, conflict with recovery) and were served by the primary, by replica",
    ),
    (
        "fieldline_db_pool_waiting",
        Kind::Gauge,
        "Requests waiting for a PostgreSQL pool connection",
    ),
    (
        "fieldline_mqtt_slots_held",
        Kind::Gauge,
        "Uplink slots (shared-subscription sessions) this ingest-mqtt instance holds",
    ),
    (
        "fieldline_mqtt_connections_up",
        Kind::Gauge,
        "Uplink slot connections of this instance connected and subscribed to the broker",
    ),
    (
        "fieldline_dead_letters_total",
        Kind::Counter,
        "Messages a consumer gave up on and moved to the dead-letter stream, by consumer",
    ),
    (
        "fieldline_webhook_enqueued_total",
        Kind::Counter,
        "Webhook deliveries queued by fan-out",
    ),
    (
        "fieldline_webhook_attempts_total",
        Kind::Counter,
        "Webhook delivery attempts, by outcome",
    ),
    (
        "fieldline_webhook_attempt_seconds",
        Kind::Histogram,
        "Webhook attempt duration in seconds (request to answer)",
    ),
    (
        "fieldline_webhook_deliveries_total",
        Kind::Counter,
        "Webhook deliveries finished, by result",
    ),
    (
        "fieldline_webhook_batch_events",
        Kind::Histogram,
        "Events per batched webhook request",
    ),
    (
        "fieldline_webhook_queue_depth",
        Kind::Gauge,
        "Webhook deliveries pending (queued or waiting for a retry)",
    ),
    (
        "fieldline_webhooks_disabled",
        Kind::Gauge,
        "Webhooks the dispatcher disabled for failing, until enabled again (their events stay queued)",
    ),
    (
        "fieldline_webhook_retention_deleted_total",
        Kind::Counter,
        "Webhook rows removed by retention, by table",
    ),
    (
        "fieldline_webhook_retention_expired_total",
        Kind::Counter,
        "Untried deliveries of disabled webhooks expired by retention",
    ),
];

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Registers the HELP text of every family, the build info, and the process collector.
fn describe() {
    for &(name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    metrics::gauge!(
        "fieldline_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => option_env!("FL_BUILD_COMMIT").unwrap_or("unknown"),
    )
    .set(1.0);
    process_collector().describe();
}

/// CPU, memory, file descriptors and threads of this process (`process_*`, the names every
/// Prometheus client library uses), read at each scrape.
pub fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .map(|builder| builder.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours renders empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `fieldline_*` name the sources record is described here (with HELP), and every
    /// name described is still recorded somewhere.
    #[test]
    fn every_metric_the_code_records_has_help() {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut recorded = std::collections::BTreeSet::new();
        let mut stack = vec![crates];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                if path.is_dir() && name != "tests" && name != "target" && name != "loadgen" {
                    stack.push(path);
                } else if name.ends_with(".rs") && !path.ends_with("telemetry.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for macro_call in ["counter!(", "gauge!(", "histogram!("] {
                        for (at, _) in text.match_indices(macro_call) {
                            let rest = &text[at + macro_call.len()..];
                            let Some(open) = rest.find('"') else { continue };
                            let name: String =
                                rest[open + 1..].chars().take_while(|c| *c != '"').collect();
                            if name.starts_with("fieldline_") {
                                recorded.insert(name);
                            }
                        }
                    }
                }
            }
        }
        assert!(recorded.len() > 30, "found only {recorded:?}");
        let described: std::collections::BTreeSet<String> = FAMILIES
            .iter()
            .map(|(name, _, _)| (*name).to_owned())
            .collect();
        let missing: Vec<_> = recorded.difference(&described).collect();
        assert!(missing.is_empty(), "recorded without HELP: {missing:?}");
        for (name, _, help) in FAMILIES {
            assert!(!help.is_empty() && !help.ends_with('.'), "{name}");
        }
    }
}
