//! Layered configuration: defaults, then an optional TOML file (`FIELDLINE_CONFIG`), then
//! `FIELDLINE_*` environment variables. Validated once at start with a message naming the field.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::{DateTime, Utc};
use fieldline_proto::{StreamLimits, Subjects};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::mqtt::BrokerLogin;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (local development).
    Text,
}

/// Every setting of every service. Each field is settable as `FIELDLINE_<FIELD>` (upper case).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the one HTTP listener of this process (`127.0.0.1:0` picks a free port).
    pub http_addr: String,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// PostgreSQL connection URL; every service keeps its own schema in this database.
    pub database_url: SecretString,
    /// Maximum connections in each process's Postgres pool. query-api splits its read
    /// connections among its HTTP workers, each worker reading through its own share (of at
    /// least 4; with fewer per worker, workers share pools), as many again on each replica of
    /// `database_read_url`.
    pub database_pool_size: usize,
    /// NATS server URL (JetStream must be enabled); several seeds comma-separated.
    /// `nats://user:pass@host:4222` logs in as `nats_user`/`nats_password` would
    /// (`nats://token@host` with a token); `tls://` requires TLS.
    pub nats_url: SecretString,
    // Credentials and TLS of the bus and the database: see
    // docs/decisions/2026-12-04-bus-and-database-credentials.md.
    /// NATS user name, with `nats_password`.
    pub nats_user: Option<String>,
    /// Password of `nats_user`.
    pub nats_password: Option<SecretString>,
    /// NATS token (`authorization { token: … }`), instead of a user and password.
    pub nats_token: Option<SecretString>,
    /// NKey seed (`SU…`) of this client's NATS user, instead of a password or token.
    pub nats_nkey_seed: Option<SecretString>,
    /// A NATS `.creds` file (user JWT and NKey seed, decentralized auth), instead of the above.
    pub nats_creds_file: Option<PathBuf>,
    /// PEM CA certificate(s) the NATS server's certificate is checked against; implies TLS.
    /// Unset with TLS: the system's roots.
    pub nats_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with NATS, with `nats_client_key_file`.
    pub nats_client_cert_file: Option<PathBuf>,
    /// PEM private key of `nats_client_cert_file`.
    pub nats_client_key_file: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS (implied by `tls://`, a CA file or a client
    /// certificate).
    pub nats_tls_required: bool,
    /// PEM CA certificate(s) PostgreSQL's certificate is checked against with
    /// `sslmode=verify-ca` or `verify-full` in `database_url` (`sslrootcert=` in the URL says
    /// the same); with `require`, a CA file makes it check as `verify-ca`, as libpq does.
    /// Unset: the system's roots.
    pub database_ca_file: Option<PathBuf>,
    // ---- Read replicas: see docs/decisions/2026-12-06-read-replicas.md.
    /// PostgreSQL streaming replicas query-api reads history from (pages, latest values,
    /// metrics, aggregates, exports), several comma-separated, each `postgres://…` (a URL
    /// may name several hosts itself). Same TLS settings as `database_url`. Unset: every
    /// read goes to the primary. Writes and the reads that must see them go to the primary.
    pub database_read_url: Option<SecretString>,
    /// A replica further behind the primary than this is skipped (reads go to the primary,
    /// or another replica) until it has caught up; so is one that does not answer.
    #[serde(with = "humantime_serde")]
    pub database_read_max_lag: Duration,
    /// How often query-api measures each replica's lag (`fieldline_db_replica_lag_seconds`)
    /// and whether it answers.
    #[serde(with = "humantime_serde")]
    pub database_read_probe_interval: Duration,
    /// MQTT broker URL and ingest-mqtt's own login: `mqtt://user:password@host:port`, or
    /// `mqtts://…` for TLS. Devices log in with their own accounts (see `mqtt_admin_url`).
    pub mqtt_url: SecretString,
    /// PEM file of the CA that signed the broker's certificate, for `mqtts://` URLs; the
    /// system's roots when unset.
    pub mqtt_ca_file: Option<String>,
    /// The device-registry's login to the broker's Dynamic Security plugin
    /// (`mqtt://fieldline-admin:password@host:port`): with it, every device is a broker account
    /// that may use only its own topics, and ingest-mqtt's account (from `mqtt_url`) is kept
    /// too. Unset: the registry manages no broker accounts.
    pub mqtt_admin_url: Option<SecretString>,
    /// Key from which device tokens are derived (with a random seed per token, kept in the
    /// registry), so the registry can restore every device's broker password to a broker that
    /// lost its state while storing only hashes. At least 32 characters; required with
    /// `mqtt_admin_url`. Keep it for good: the registry records a digest of the first key it
    /// ran with and refuses to start with another.
    pub device_token_key: Option<SecretString>,
    /// How often the registry compares the broker's accounts with its devices and repairs
    /// the difference (it also does on every reconnect to the broker).
    #[serde(with = "humantime_serde")]
    pub mqtt_reconcile_interval: Duration,
    /// Name of this ingest-mqtt instance: its downlink connection's client id (with
    /// `-downlink`) and what its slot leases name as their holder. Defaults to
    /// `{bus_prefix}-ingest-mqtt-{hostname}`. The uplink connects under slot ids instead
    /// (`mqtt_slots`).
    pub mqtt_client_id: Option<String>,
    /// First level of every MQTT topic: `{root}/{project}/{device}/telemetry`.
    pub mqtt_topic_root: String,
    /// Shared-subscription group that all ingest-mqtt instances join.
    pub mqtt_share_group: String,
    // ---- MQTT oversize and junk: see docs/decisions/2026-12-04-mqtt-oversize-and-junk.md.
    /// Largest MQTT packet, in bytes, whole (headers, topic and payload): what ingest-mqtt's
    /// connections read and send. The broker must refuse larger packets itself (Mosquitto
    /// `max_packet_size`, the same figure, as deploy/mosquitto/mosquitto.conf sets it): a
    /// packet over the client's limit ends its connection, so one the broker still sends (a
    /// broker without the limit, a session stored before it) is read once on a connection of
    /// its own and dropped as too large.
    pub mqtt_max_packet_bytes: usize,
    /// Largest MQTT message payload ingest-mqtt takes, in bytes (at most
    /// `mqtt_max_packet_bytes`). A larger one is acknowledged to the broker, dropped and
    /// counted (`fieldline_mqtt_dropped_total{reason="too_large"}`); the connection goes on.
    pub mqtt_max_message_bytes: usize,
    /// QoS 0 messages each ingest-mqtt connection holds waiting for its pipeline. The broker
    /// bounds QoS 1 by its in-flight window, but sends QoS 0 as fast as it comes: past this
    /// many, a QoS 0 message is dropped and counted (`reason="overload"`).
    pub mqtt_qos0_backlog: usize,
    // ---- MQTT scale-out: see docs/decisions/2026-12-05-mqtt-scale-out.md.
    /// Persistent broker sessions in the shared subscription, all instances together: client
    /// ids `{bus_prefix}-ingest-mqtt-slot-{k}`, k < this, leased by the live instances
    /// through NATS, each holding about slots ÷ instances. Every instance must have the same
    /// figure, and it should never shrink: a slot no longer leased keeps its share of the
    /// messages at the broker. The broker bounds the unacknowledged messages per session
    /// (Mosquitto: `max_inflight_messages`), and ingest-mqtt acks only once JetStream has a
    /// message, so throughput is at most slots × in-flight ÷ JetStream round trip.
    pub mqtt_slots: usize,
    /// How long a slot's lease lasts without being refreshed (refreshed every quarter of
    /// it): a killed instance's slots are taken over this long after its last refresh. The
    /// lease bucket is created with it (its `max_age`); a bucket that exists keeps its own.
    #[serde(with = "humantime_serde")]
    pub mqtt_slot_lease: Duration,
    /// Client ids, comma-separated, whose persistent sessions in the shared subscription no
    /// instance uses any more: those of ingest-mqtt before slots (`{bus_prefix}-ingest-mqtt-
    /// {hostname}` and `…_1`…), or slots past a shrunk `mqtt_slots`. The holder of slot 0
    /// connects under each, takes what its session holds and removes its subscription, so
    /// that it takes no more of the messages. Safe to leave set.
    pub mqtt_retired_client_ids: String,
    /// Bus messages ingest-mqtt publishes at once, all devices together. A device's messages
    /// that arrive while every place is taken go out together, so under load bus messages
    /// carry more readings; the ceiling is this ÷ the JetStream publish time, for devices
    /// that each send too rarely for their messages to be combined.
    pub mqtt_publishes_in_flight: usize,
    /// Prefix of every NATS subject and stream (`fl` gives `fl.telemetry.…` and `FL_TELEMETRY`).
    pub bus_prefix: String,
    /// `json` or `text`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax.
    pub log_level: String,
    /// Secret of the platform admin key created on first start; generated and printed once
    /// when unset.
    pub bootstrap_admin_key: Option<SecretString>,
    /// How long a verified credential stays cached; revocation clears caches at once over
    /// the bus, so this only bounds staleness if an invalidation message is lost.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// Timeout of a request to another service over the bus (auth RPC).
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    // ---- Rate limits (FIELDLINE_RATE_*), each held by every instance on its own: behind N
    // instances a client gets up to N times these. A project's override (PUT
    // /api/v1/projects/{slug}/limits) replaces the key and device limits for its keys and
    // devices. See docs/decisions/2026-12-04-rate-limits.md.
    /// Requests one API key may make in `rate_key_period`, all routes together; the whole
    /// allowance may come at once, then it refills evenly (GCRA). Over it answers 429.
    pub rate_key_requests: u32,
    /// The window of `rate_key_requests`.
    #[serde(with = "humantime_serde")]
    pub rate_key_period: Duration,
    /// Requests one device token may make to the HTTP ingest routes, and (counted apart)
    /// MQTT messages one device may publish, in `rate_device_period`. Over it HTTP answers
    /// 429 and MQTT drops the message (acknowledged to the broker, counted, never stored).
    pub rate_device_requests: u32,
    /// The window of `rate_device_requests`.
    #[serde(with = "humantime_serde")]
    pub rate_device_period: Duration,
    /// Failed authentications (wrong, revoked or expired credentials) one client address may
    /// make in `rate_auth_failures_period`; past them its unknown credentials answer 429
    /// without reaching the registry, while credentials already verified keep working.
    /// IPv6 addresses count by their /64.
    pub rate_auth_failures: u32,
    /// The window of `rate_auth_failures`.
    #[serde(with = "humantime_serde")]
    pub rate_auth_failures_period: Duration,
    /// Proxies whose `X-Forwarded-For` names the client, comma-separated addresses or CIDR
    /// blocks (the gateway's network). Empty: the peer address is the client.
    pub rate_trusted_proxies: String,
    /// Largest ingest request body, in bytes (after decompression); larger answers 413.
    pub ingest_max_body_bytes: usize,
    /// Most readings in one ingest request or MQTT message; more answers 413. Backfill
    /// splits its readings into batches of at most this many.
    pub ingest_max_readings: usize,
    /// Largest backfill body (`POST /api/v1/devices/{id}/readings`), in bytes after
    /// decompression; larger answers 413.
    pub backfill_max_body_bytes: usize,
    /// Backfills one ingest-http process parses and publishes at once. Each holds its body
    /// and every reading parsed from it (about 20 times a CSV body: ingest-http peaked at
    /// 170 MiB on a 7.2 MB import); the next waits up to `backfill_wait` for a place, then
    /// answers 503
    /// `too_many_backfills` with `Retry-After`.
    pub backfill_concurrency: usize,
    /// How long a backfill waits for a place before it is refused.
    #[serde(with = "humantime_serde")]
    pub backfill_wait: Duration,
    /// How long ingest waits for JetStream to acknowledge before answering 503.
    #[serde(with = "humantime_serde")]
    pub ingest_publish_timeout: Duration,
    /// Most long-polls (`GET /api/v1/ingest/commands?wait=N`) one ingest-http process holds
    /// at once, each with a bus subscription; past it a long-poll answers 503
    /// `too_many_long_polls` with `Retry-After`, at once.
    pub long_poll_max: usize,
    /// Most live streams (`…/readings/stream`, `/api/v1/events/stream`) one API key holds
    /// open at once on one query-api process; past it 429 `too_many_streams`.
    pub stream_max_per_key: usize,
    /// Most live streams one project holds open at once on one query-api process.
    pub stream_max_per_project: usize,
    /// Most live streams one query-api process holds open at once, all projects together
    /// (each is an ephemeral JetStream consumer); past it 503 `too_many_streams`.
    pub stream_max: usize,
    /// How often an idle live stream sends a comment line, so proxies keep it open.
    #[serde(with = "humantime_serde")]
    pub stream_heartbeat: Duration,
    /// How long one live stream stays open; then it ends and the client reconnects with
    /// `Last-Event-ID`, losing nothing (one caller cannot hold a stream for ever).
    #[serde(with = "humantime_serde")]
    pub stream_max_lifetime: Duration,
    // ---- Live time: which reading times are stored, so that no message can make
    // partitions without limit. See docs/decisions/2026-12-04-live-time-window.md.
    /// How far back a reading's time may lie when it arrives over `POST /api/v1/ingest` or
    /// MQTT (a device that buffered while offline); older answers 400 (MQTT: dropped and
    /// counted). Older history goes through backfill.
    #[serde(with = "humantime_serde")]
    pub ingest_max_age: Duration,
    /// How far ahead of the server's clock a reading's time may lie (device clock drift), over
    /// every path, backfill included; the writer allows a day more for skew between hosts.
    /// At most 7 days: the partitions made ahead.
    #[serde(with = "humantime_serde")]
    pub ingest_max_future: Duration,
    /// The earliest reading time stored at all (RFC 3339): backfill's lower bound (or now
    /// less `readings_retention`, when later), and the writer's for whatever reaches it over
    /// the bus.
    pub readings_earliest: DateTime<Utc>,
    /// Messages older than this are dropped from every stream.
    #[serde(with = "humantime_serde")]
    pub stream_max_age: Duration,
    /// Size bound of each stream, in bytes.
    pub stream_max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` (Idempotency-Key) is dropped.
    #[serde(with = "humantime_serde")]
    pub stream_duplicate_window: Duration,
    /// Dead letters older than this are dropped from the dead-letter stream.
    #[serde(with = "humantime_serde")]
    pub dead_letter_max_age: Duration,
    /// Size bound of the dead-letter stream, in bytes (the oldest go first).
    pub dead_letter_max_bytes: i64,
    /// Servers that keep a copy of every stream, and so of the durable consumers on them and
    /// of the KV buckets: 1 on a single nats-server, 3 in a JetStream cluster of three or
    /// more (one server may be lost). 1 to 5; existing streams are brought to it at start.
    pub stream_replicas: usize,
    /// The JetStream cluster the streams are placed in, when NATS is a super-cluster of
    /// several; unset: the cluster of the server the service is connected to.
    pub stream_placement_cluster: Option<String>,
    /// Comma-separated server tags (nats-server's `server_tags`, e.g. `ssd`) that every
    /// server keeping a stream must have; empty: any server.
    pub stream_placement_tags: String,
    /// Deliveries a message that keeps failing gets before it goes to the dead letters
    /// (failures because a server is down do not end its tries: it waits).
    pub consumer_max_deliveries: i64,
    /// Most telemetry messages the query-api writer stores in one transaction (it takes
    /// what is waiting, up to this, without delaying a lone message).
    pub writer_batch_size: usize,
    /// Most payload bytes of telemetry the writer takes into one transaction (at most one
    /// message past it): what one transaction holds in memory follows from it, about ten
    /// times this once decoded, so an import of millions of readings is stored in several.
    pub writer_batch_bytes: usize,
    /// How long the writer lets a batch of small messages gather before it stores it when
    /// nothing else is being stored (zero: at once). Readings become readable up to that
    /// much later, and each transaction carries more readings of each series: a series'
    /// statistics and rollup rows are written once per transaction, whatever its readings.
    #[serde(with = "humantime_serde")]
    pub writer_linger: Duration,
    /// Longest a query-api statement may run (a page, an aggregate, one chunk of an export)
    /// before Postgres cancels it; the client gets 503 `query_timeout`.
    #[serde(with = "humantime_serde")]
    pub query_statement_timeout: Duration,
    /// Connections of each query-api read pool that one-statement reads (pages, latest
    /// values, aggregates) share, their statements pipelined. The rest of the pool serves
    /// exports, and reads while every shared connection is stalled behind a long statement.
    /// At most the pool's size less one.
    pub query_shared_connections: usize,
    /// Raw readings older than this are dropped (whole daily partitions once every project's
    /// retention has passed); a project's row in `telemetry.retention` overrides it. Unset
    /// keeps raw readings forever.
    #[serde(with = "humantime_serde")]
    pub readings_retention: Option<Duration>,
    /// Hourly and daily rollups older than this are deleted; `telemetry.retention` overrides
    /// it per project. Unset keeps rollups forever.
    #[serde(with = "humantime_serde")]
    pub rollups_retention: Option<Duration>,
    /// Readings of a UTC day are compressed into per-series blocks this long after the day
    /// ends (`0s`: as soon as it ends), by query-api's maintenance round.
    /// (docs/decisions/2026-12-06-compressed-history.md)
    #[serde(with = "humantime_serde")]
    pub compress_after: Duration,
    /// How often query-api creates the coming days' partitions and applies retention (also
    /// once at start; one instance at a time does it, under an advisory lock).
    #[serde(with = "humantime_serde")]
    pub partition_maintenance_interval: Duration,
    /// Gaps between webhook delivery attempts after the first (immediate) one; each gets
    /// ±20 % jitter. Five gaps mean six attempts in all.
    pub webhook_retry_schedule: String,
    /// Timeout of one webhook POST.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// A webhook whose attempts have all failed (no success in between) for this long is
    /// disabled, as Svix does after 5 days; its pending deliveries wait for `enable`. A 410
    /// still disables at once. (docs/decisions/2026-12-04-retention-and-disabled-webhooks.md)
    #[serde(with = "humantime_serde")]
    pub webhook_disable_after_failing: Duration,
    /// Replaced by `webhook_disable_after_failing`: a count of failed deliveries disabled a
    /// busy webhook within seconds of an outage. Refused at start when set, so that an old
    /// setting is not silently ignored.
    pub webhook_disable_after: Option<u32>,
    /// Webhook events, deliveries and attempts are kept this long after a delivery finished
    /// (succeeded or failed), then deleted in batches. Pending deliveries are never deleted;
    /// those of a webhook disabled longer than this, not tried within it, are failed as
    /// expired (and deleted a window later).
    #[serde(with = "humantime_serde")]
    pub webhook_retention: Duration,
    /// How often each dispatcher applies `webhook_retention` (also once at start).
    #[serde(with = "humantime_serde")]
    pub webhook_retention_interval: Duration,
    /// Rows one retention statement deletes at most: each batch is its own short
    /// transaction, so delivery never waits long behind it.
    pub webhook_retention_batch: usize,
    /// Allow webhook URLs that resolve to private, loopback or link-local addresses (local
    /// development and tests only).
    pub webhook_allow_private: bool,
    /// Webhook requests in flight at once per dispatcher process.
    pub webhook_concurrency: usize,
    /// Requests in flight at once to one webhook, so a slow receiver never takes every slot.
    pub webhook_endpoint_concurrency: usize,
    /// Requests per second to one webhook.
    pub webhook_rate_per_second: u32,
    /// Longest `Retry-After` honoured; a longer one is cut to this.
    #[serde(with = "humantime_serde")]
    pub webhook_retry_after_max: Duration,
    /// How often an idle dispatcher looks for due retries (new events wake it at once).
    #[serde(with = "humantime_serde")]
    pub webhook_poll_interval: Duration,
    /// How long in-flight work may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Heartbeat interval of a device registered without `heartbeat_interval_s`; three missed
    /// intervals make a device offline.
    #[serde(with = "humantime_serde")]
    pub device_heartbeat_interval: Duration,
    /// How often the registry looks for devices gone silent and commands past their TTL.
    #[serde(with = "humantime_serde")]
    pub registry_sweep_interval: Duration,
    /// TTL of a command posted without `ttl_s`.
    #[serde(with = "humantime_serde")]
    pub command_default_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".into(),
            http_workers: 0,
            database_url: SecretString::from("postgres://postgres@127.0.0.1:5432/fieldline"),
            database_pool_size: 16,
            nats_url: SecretString::from("nats://127.0.0.1:4222"),
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_nkey_seed: None,
            nats_creds_file: None,
            nats_ca_file: None,
            nats_client_cert_file: None,
            nats_client_key_file: None,
            nats_tls_required: false,
            database_ca_file: None,
            database_read_url: None,
            database_read_max_lag: Duration::from_secs(5),
            database_read_probe_interval: Duration::from_secs(1),
            mqtt_url: SecretString::from("mqtt://127.0.0.1:1883"),
            mqtt_ca_file: None,
            mqtt_admin_url: None,
            device_token_key: None,
            mqtt_reconcile_interval: Duration::from_secs(300),
            mqtt_client_id: None,
            mqtt_topic_root: "fl".into(),
            mqtt_share_group: "fieldline-ingest".into(),
            mqtt_max_packet_bytes: 1024 * 1024,
            mqtt_max_message_bytes: 256 * 1024,
            mqtt_qos0_backlog: 1024,
            mqtt_slots: 8,
            mqtt_slot_lease: Duration::from_secs(12),
            mqtt_retired_client_ids: String::new(),
            mqtt_publishes_in_flight: 256,
            bus_prefix: "fl".into(),
            log_format: LogFormat::Json,
            log_level: "info".into(),
            bootstrap_admin_key: None,
            auth_cache_ttl: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(2),
            rate_key_requests: 600,
            rate_key_period: Duration::from_secs(60),
            rate_device_requests: 300,
            rate_device_period: Duration::from_secs(60),
            rate_auth_failures: 20,
            rate_auth_failures_period: Duration::from_secs(60),
            rate_trusted_proxies: String::new(),
            ingest_max_body_bytes: 1024 * 1024,
            ingest_max_readings: 10_000,
            backfill_max_body_bytes: 16 * 1024 * 1024,
            backfill_concurrency: 2,
            backfill_wait: Duration::from_secs(10),
            ingest_publish_timeout: Duration::from_secs(5),
            long_poll_max: 1000,
            stream_max_per_key: 16,
            stream_max_per_project: 64,
            stream_max: 1000,
            stream_heartbeat: Duration::from_secs(15),
            stream_max_lifetime: Duration::from_secs(3600),
            ingest_max_age: Duration::from_secs(30 * 24 * 3600),
            ingest_max_future: Duration::from_secs(3600),
            readings_earliest: DateTime::from_timestamp(946_684_800, 0).unwrap_or_default(),
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            stream_max_bytes: 1 << 30,
            stream_duplicate_window: Duration::from_secs(120),
            dead_letter_max_age: Duration::from_secs(14 * 24 * 3600),
            dead_letter_max_bytes: 256 << 20,
            stream_replicas: 1,
            stream_placement_cluster: None,
            stream_placement_tags: String::new(),
            consumer_max_deliveries: 5,
            writer_batch_size: 1000,
            writer_batch_bytes: 16 * 1024 * 1024,
            writer_linger: Duration::from_millis(250),
            query_statement_timeout: Duration::from_secs(10),
            query_shared_connections: 1,
            readings_retention: None,
            rollups_retention: None,
            compress_after: Duration::from_secs(2 * 3600),
            partition_maintenance_interval: Duration::from_secs(3600),
            webhook_retry_schedule: "5s,30s,2m,10m,30m".into(),
            webhook_timeout: Duration::from_secs(10),
            webhook_disable_after_failing: Duration::from_secs(5 * 24 * 3600),
            webhook_disable_after: None,
            webhook_retention: Duration::from_secs(30 * 24 * 3600),
            webhook_retention_interval: Duration::from_secs(60),
            webhook_retention_batch: 1000,
            webhook_allow_private: false,
            webhook_concurrency: 256,
            webhook_endpoint_concurrency: 8,
            webhook_rate_per_second: 50,
            webhook_retry_after_max: Duration::from_secs(3600),
            webhook_poll_interval: Duration::from_millis(250),
            shutdown_timeout: Duration::from_secs(10),
            device_heartbeat_interval: Duration::from_secs(60),
            registry_sweep_interval: Duration::from_secs(1),
            command_default_ttl: Duration::from_secs(3600),
        }
    }
}

/// Settings whose variables are taken as written: figment reads `123456` as a number and
/// `0123` as 123, which no password or URL survives.
const RAW_STRING_SETTINGS: [&str; 14] = [
    "database_url",
    "database_read_url",
    "bootstrap_admin_key",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_nkey_seed",
    "mqtt_url",
    "mqtt_admin_url",
    "device_token_key",
    "mqtt_ca_file",
    "mqtt_retired_client_ids",
    "stream_placement_cluster",
    "stream_placement_tags",
];

/// A configuration that cannot start a service.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration field `{field}` is invalid: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl Config {
    /// The HTTP worker threads to start: `http_workers`, or one per core.
    pub fn http_worker_count(&self) -> usize {
        match self.http_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// Defaults, then the TOML file named by `FIELDLINE_CONFIG` (if any), then `FIELDLINE_*`.
    pub fn load() -> Result<Self, ConfigError> {
        let file = std::env::var("FIELDLINE_CONFIG").ok();
        Self::figment(file.as_deref().map(Path::new))
    }

    fn figment(file: Option<&Path>) -> Result<Self, ConfigError> {
        // Missing fields take `Config::default()` (`#[serde(default)]`), so no secret default
        // ever has to be serialized.
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // FIELDLINE_URL and FIELDLINE_API_KEY are the admin commands' (`fieldline devices …`),
        // not a service's: a shell that sets them may still run `fieldline serve`.
        let mut ignored = vec!["config", "url", "api_key"];
        ignored.extend(RAW_STRING_SETTINGS);
        figment = figment.merge(Env::prefixed("FIELDLINE_").ignore(&ignored));
        for key in RAW_STRING_SETTINGS {
            if let Ok(value) = std::env::var(format!("FIELDLINE_{}", key.to_ascii_uppercase())) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        let config = config.without_empty_options();
        config.validate()?;
        Ok(config)
    }

    /// An empty variable (`FIELDLINE_BOOTSTRAP_ADMIN_KEY=` as compose passes an unset one)
    /// means unset.
    fn without_empty_options(mut self) -> Self {
        for secret in [
            &mut self.bootstrap_admin_key,
            &mut self.mqtt_admin_url,
            &mut self.device_token_key,
            &mut self.database_read_url,
        ] {
            if secret
                .as_ref()
                .is_some_and(|value| value.expose_secret().is_empty())
            {
                *secret = None;
            }
        }
        if self.mqtt_ca_file.as_deref().is_some_and(str::is_empty) {
            self.mqtt_ca_file = None;
        }
        if self.mqtt_client_id.as_deref().is_some_and(str::is_empty) {
            self.mqtt_client_id = None;
        }
        self.without_empty_transport_options()
    }

    /// Compose passes unset credentials and files as empty variables: unset.
    fn without_empty_transport_options(mut self) -> Self {
        use secrecy::ExposeSecret;
        fn empty_secret(value: &mut Option<SecretString>) {
            if value.as_ref().is_some_and(|v| v.expose_secret().is_empty()) {
                *value = None;
            }
        }
        fn empty_path(value: &mut Option<PathBuf>) {
            if value.as_ref().is_some_and(|v| v.as_os_str().is_empty()) {
                *value = None;
            }
        }
        if self.nats_user.as_deref().is_some_and(str::is_empty) {
            self.nats_user = None;
        }
        empty_secret(&mut self.nats_password);
        empty_secret(&mut self.nats_token);
        empty_secret(&mut self.nats_nkey_seed);
        empty_path(&mut self.nats_creds_file);
        empty_path(&mut self.nats_ca_file);
        empty_path(&mut self.nats_client_cert_file);
        empty_path(&mut self.nats_client_key_file);
        empty_path(&mut self.database_ca_file);
        self
    }

    /// Checks what serde cannot: addresses, URLs, names that end up in subjects and topics.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.http_addr.parse::<SocketAddr>().is_err() {
            return invalid(
                "http_addr",
                format!("{:?} is not host:port", self.http_addr),
            );
        }
        if let Err(error) = Subjects::new(&self.bus_prefix) {
            return invalid("bus_prefix", error.to_string());
        }
        if !valid_topic_level(&self.mqtt_topic_root) {
            return invalid("mqtt_topic_root", "use 1 to 64 of [A-Za-z0-9_-]".into());
        }
        if !valid_topic_level(&self.mqtt_share_group) {
            return invalid("mqtt_share_group", "use 1 to 64 of [A-Za-z0-9_-]".into());
        }
        if !(1..=64).contains(&self.mqtt_slots) {
            return invalid("mqtt_slots", "use 1 to 64".into());
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&self.mqtt_slot_lease) {
            return invalid("mqtt_slot_lease", "use 2s to 5m".into());
        }
        let slot_ids: Vec<String> = (0..self.mqtt_slots)
            .map(|slot| self.ingest_mqtt_slot_client_id(slot))
            .collect();
        if let Some(in_use) = self
            .ingest_mqtt_retired_client_ids()
            .into_iter()
            .find(|id| slot_ids.contains(id) || id.len() > 1024)
        {
            return invalid(
                "mqtt_retired_client_ids",
                format!("{in_use:?} is a slot in use (or over 1024 bytes)"),
            );
        }
        if !(1..=65_536).contains(&self.mqtt_publishes_in_flight) {
            return invalid("mqtt_publishes_in_flight", "use 1 to 65536".into());
        }
        if let Err((field, message)) = self.validate_mqtt_sizes() {
            return invalid(field, message);
        }
        if let Err(message) = BrokerLogin::parse(self.mqtt_url.expose_secret()) {
            return invalid("mqtt_url", message);
        }
        if let Some(admin_url) = &self.mqtt_admin_url {
            if let Err(message) = BrokerLogin::parse(admin_url.expose_secret()) {
                return invalid("mqtt_admin_url", message);
            }
            if self.device_token_key.is_none() {
                return invalid(
                    "device_token_key",
                    "required with mqtt_admin_url: the registry derives each device's broker password from it".into(),
                );
            }
        }
        if let Some(key) = &self.device_token_key
            && key.expose_secret().len() < 32
        {
            return invalid("device_token_key", "use at least 32 characters".into());
        }
        if self.mqtt_reconcile_interval < Duration::from_secs(1) {
            return invalid("mqtt_reconcile_interval", "must be at least 1s".into());
        }
        if let Err((field, message)) = crate::bus::NatsSettings::from_config(self) {
            return invalid(field, message);
        }
        if let Err(message) = crate::db::DatabaseSettings::from_config(self) {
            return invalid("database_url", message);
        }
        for url in self.database_read_urls() {
            if let Err(message) = crate::db::DatabaseSettings::from_url(&url, self) {
                return invalid("database_read_url", message);
            }
        }
        if self.database_read_max_lag < Duration::from_millis(100) {
            return invalid("database_read_max_lag", "must be at least 100ms".into());
        }
        if self.database_read_probe_interval < Duration::from_millis(50)
            || self.database_read_probe_interval > self.database_read_max_lag
        {
            return invalid(
                "database_read_probe_interval",
                "use 50ms up to database_read_max_lag".into(),
            );
        }
        if self.database_pool_size == 0 {
            return invalid("database_pool_size", "must be at least 1".into());
        }
        for (field, value) in [
            ("device_heartbeat_interval", self.device_heartbeat_interval),
            ("registry_sweep_interval", self.registry_sweep_interval),
            ("command_default_ttl", self.command_default_ttl),
        ] {
            if value < Duration::from_millis(100) {
                return invalid(field, "must be at least 100ms".into());
            }
        }
        if self.ingest_max_readings == 0 || self.ingest_max_body_bytes < 1024 {
            return invalid(
                "ingest_max_readings",
                "limits must allow one reading".into(),
            );
        }
        if self.backfill_concurrency == 0 {
            return invalid("backfill_concurrency", "must be at least 1".into());
        }
        if self.backfill_max_body_bytes < 1024 {
            return invalid("backfill_max_body_bytes", "must be at least 1024".into());
        }
        if let Err((field, message)) = self.validate_live_time() {
            return invalid(field, message);
        }
        if let Err(message) = parse_schedule(&self.webhook_retry_schedule) {
            return invalid("webhook_retry_schedule", message);
        }
        if self.webhook_concurrency == 0
            || self.webhook_endpoint_concurrency == 0
            || self.webhook_rate_per_second == 0
        {
            return invalid(
                "webhook_concurrency",
                "webhook concurrency and rate must be at least 1".into(),
            );
        }
        if self.webhook_timeout.is_zero() {
            return invalid("webhook_timeout", "must be more than 0".into());
        }
        if let Err((field, message)) = self.validate_webhook_lifetimes() {
            return invalid(field, message);
        }
        if self.query_statement_timeout.is_zero() {
            return invalid("query_statement_timeout", "must be more than 0".into());
        }
        if self.query_shared_connections == 0 {
            return invalid("query_shared_connections", "must be at least 1".into());
        }
        if self.partition_maintenance_interval.is_zero() {
            return invalid(
                "partition_maintenance_interval",
                "must be more than 0".into(),
            );
        }
        if !(1..=1000).contains(&self.consumer_max_deliveries) {
            return invalid("consumer_max_deliveries", "use 1 to 1000".into());
        }
        if self.dead_letter_max_bytes < 1 << 20 {
            return invalid("dead_letter_max_bytes", "must be at least 1 MiB".into());
        }
        if !(1..=5).contains(&self.stream_replicas) {
            return invalid(
                "stream_replicas",
                "use 1 to 5 (JetStream keeps at most 5 copies; 3 in a cluster of three)".into(),
            );
        }
        for (field, value) in [
            (
                "stream_placement_cluster",
                self.stream_placement_cluster.as_deref().unwrap_or_default(),
            ),
            ("stream_placement_tags", self.stream_placement_tags.as_str()),
        ] {
            let bad = value
                .split(',')
                .map(str::trim)
                .any(|name| name.chars().any(|c| c.is_whitespace() || c.is_control()));
            if bad {
                return invalid(field, "names may not hold spaces".into());
            }
        }
        if self.writer_batch_size == 0 {
            return invalid("writer_batch_size", "must be at least 1".into());
        }
        if self.writer_batch_bytes == 0 {
            return invalid("writer_batch_bytes", "must be at least 1".into());
        }
        if self.long_poll_max == 0 {
            return invalid("long_poll_max", "must be at least 1".into());
        }
        for (field, value) in [
            ("stream_max_per_key", self.stream_max_per_key),
            ("stream_max_per_project", self.stream_max_per_project),
            ("stream_max", self.stream_max),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.stream_heartbeat.is_zero() || self.stream_max_lifetime.is_zero() {
            return invalid(
                "stream_heartbeat",
                "stream_heartbeat and stream_max_lifetime must be above 0".into(),
            );
        }
        if let Err((field, message)) = self.validate_rate_limits() {
            return invalid(field, message);
        }
        Ok(())
    }

    fn validate_mqtt_sizes(&self) -> Result<(), (&'static str, String)> {
        // The MQTT protocol's own maximum (a remaining length of four bytes).
        const MQTT_MAX_PACKET: usize = 268_435_455;
        if !(4096..=MQTT_MAX_PACKET).contains(&self.mqtt_max_packet_bytes) {
            return Err((
                "mqtt_max_packet_bytes",
                format!("use 4096 to {MQTT_MAX_PACKET}"),
            ));
        }
        if !(1024..=self.mqtt_max_packet_bytes).contains(&self.mqtt_max_message_bytes) {
            return Err((
                "mqtt_max_message_bytes",
                "use 1024 up to mqtt_max_packet_bytes".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.mqtt_qos0_backlog) {
            return Err(("mqtt_qos0_backlog", "use 1 to 1000000".into()));
        }
        Ok(())
    }

    fn validate_webhook_lifetimes(&self) -> Result<(), (&'static str, String)> {
        if let Some(count) = self.webhook_disable_after {
            return Err((
                "webhook_disable_after",
                format!(
                    "no longer read (it was {count} failed deliveries): webhooks are disabled after \
                     failing for a time, set FIELDLINE_WEBHOOK_DISABLE_AFTER_FAILING (default 5d) \
                     and remove FIELDLINE_WEBHOOK_DISABLE_AFTER"
                ),
            ));
        }
        if self.webhook_disable_after_failing.is_zero() {
            return Err((
                "webhook_disable_after_failing",
                "must be more than 0".into(),
            ));
        }
        if self.webhook_retention < Duration::from_secs(1) {
            return Err(("webhook_retention", "must be at least 1s".into()));
        }
        if self.webhook_retention_interval < Duration::from_millis(10) {
            return Err(("webhook_retention_interval", "must be at least 10ms".into()));
        }
        if !(1..=100_000).contains(&self.webhook_retention_batch) {
            return Err(("webhook_retention_batch", "use 1 to 100000".into()));
        }
        Ok(())
    }

    fn validate_live_time(&self) -> Result<(), (&'static str, String)> {
        if self.ingest_max_age < Duration::from_secs(60) {
            return Err(("ingest_max_age", "must be at least 1m".into()));
        }
        if self.ingest_max_future > Duration::from_secs(7 * 24 * 3600) {
            return Err((
                "ingest_max_future",
                "must be at most 7d (the partitions created ahead)".into(),
            ));
        }
        if self.readings_earliest.timestamp_micros() < crate::time::MIN_TIME_US
            || self.readings_earliest >= Utc::now()
        {
            return Err((
                "readings_earliest",
                "must lie between 1970-01-01T00:00:00Z and now".into(),
            ));
        }
        Ok(())
    }

    fn validate_rate_limits(&self) -> Result<(), (&'static str, String)> {
        for (field, requests, period) in [
            (
                "rate_key_requests",
                self.rate_key_requests,
                self.rate_key_period,
            ),
            (
                "rate_device_requests",
                self.rate_device_requests,
                self.rate_device_period,
            ),
            (
                "rate_auth_failures",
                self.rate_auth_failures,
                self.rate_auth_failures_period,
            ),
        ] {
            crate::ratelimit::Limit::new(requests, period).map_err(|message| (field, message))?;
        }
        crate::ratelimit::parse_proxies(&self.rate_trusted_proxies)
            .map_err(|message| ("rate_trusted_proxies", message))?;
        Ok(())
    }

    /// `database_read_url` split into its replicas' URLs. A comma starts a new URL only where
    /// `postgres://` or `postgresql://` follows it: a multi-host URL keeps its commas.
    pub fn database_read_urls(&self) -> Vec<SecretString> {
        let Some(urls) = &self.database_read_url else {
            return Vec::new();
        };
        let mut split: Vec<String> = Vec::new();
        for piece in urls.expose_secret().split(',') {
            let trimmed = piece.trim();
            let starts_url =
                trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://");
            match split.last_mut() {
                Some(last) if !starts_url => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ => split.push(trimmed.to_owned()),
            }
        }
        split
            .into_iter()
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty())
            .map(SecretString::from)
            .collect()
    }

    /// The subject builder for `bus_prefix` (validated at load).
    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.bus_prefix).unwrap_or_else(|_| unreachable_prefix())
    }

    /// The webhook retry gaps (validated at load).
    pub fn webhook_retry_gaps(&self) -> Vec<Duration> {
        parse_schedule(&self.webhook_retry_schedule).unwrap_or_default()
    }

    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            max_age: self.stream_max_age,
            max_bytes: self.stream_max_bytes,
            duplicate_window: self.stream_duplicate_window,
            dead_max_age: self.dead_letter_max_age,
            dead_max_bytes: self.dead_letter_max_bytes,
        }
    }

    /// Copies and placement of every stream, durable consumer and KV bucket (validated at
    /// load).
    pub fn stream_replication(&self) -> fieldline_proto::Replication {
        let cluster = self
            .stream_placement_cluster
            .as_deref()
            .map(str::trim)
            .filter(|cluster| !cluster.is_empty());
        let tags: Vec<String> = self
            .stream_placement_tags
            .split(',')
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
            .map(str::to_owned)
            .collect();
        let placement = (cluster.is_some() || !tags.is_empty()).then(|| {
            async_nats::jetstream::stream::Placement {
                cluster: cluster.map(str::to_owned),
                tags,
            }
        });
        fieldline_proto::Replication {
            replicas: self.stream_replicas,
            placement,
        }
    }

    /// The name of this ingest-mqtt instance: `mqtt_client_id`, or
    /// `{bus_prefix}-ingest-mqtt-{hostname}` (distinct per pod or container; two instances
    /// on one host need `FIELDLINE_MQTT_CLIENT_ID` each, for their downlink connections).
    pub fn ingest_mqtt_client_id(&self) -> String {
        self.mqtt_client_id.clone().unwrap_or_else(|| {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "local".to_owned());
            format!("{}-ingest-mqtt-{hostname}", self.bus_prefix)
        })
    }

    /// The client id of uplink slot `slot` (`mqtt_slots`): the same in every instance, so
    /// whichever instance leases the slot resumes its broker session.
    pub fn ingest_mqtt_slot_client_id(&self, slot: usize) -> String {
        format!("{}-ingest-mqtt-slot-{slot}", self.bus_prefix)
    }

    /// `mqtt_retired_client_ids`, split and trimmed.
    pub fn ingest_mqtt_retired_client_ids(&self) -> Vec<String> {
        self.mqtt_retired_client_ids
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// ingest-mqtt's login to the broker (`mqtt_url`, validated at load).
    pub fn mqtt_login(&self) -> BrokerLogin {
        BrokerLogin::parse(self.mqtt_url.expose_secret()).unwrap_or_else(|_| unreachable_mqtt_url())
    }

    /// Client options for ingest-mqtt's login (`mqtt_url`, `mqtt_ca_file`).
    pub fn mqtt_options(
        &self,
        client_id: impl Into<String>,
    ) -> anyhow::Result<rumqttc::MqttOptions> {
        self.mqtt_login()
            .options(client_id, self.mqtt_ca_file.as_deref().map(Path::new))
    }

    /// The registry's login to the broker's Dynamic Security plugin, when configured.
    pub fn mqtt_admin_login(&self) -> Option<BrokerLogin> {
        let url = self.mqtt_admin_url.as_ref()?;
        BrokerLogin::parse(url.expose_secret()).ok()
    }

    /// Host and port of `mqtt_url`.
    pub fn mqtt_host_port(&self) -> (String, u16) {
        let login = self.mqtt_login();
        (login.host, login.port)
    }
}

#[cold]
fn unreachable_prefix() -> Subjects {
    // `validate` refuses a bad prefix before any service starts; fall back to the default
    // rather than panic if a caller skipped it.
    Subjects::new("fl").unwrap_or_else(|_| std::process::abort())
}

/// `5s,30s,2m`: comma-separated durations, at most 20; empty means no retries.
fn parse_schedule(schedule: &str) -> Result<Vec<Duration>, String> {
    let gaps: Vec<Duration> = schedule
        .split(',')
        .map(str::trim)
        .filter(|gap| !gap.is_empty())
        .map(|gap| {
            humantime_serde::re::humantime::parse_duration(gap).map_err(|e| format!("{gap:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if gaps.len() > 20 {
        return Err("at most 20 retries".into());
    }
    Ok(gaps)
}

fn valid_topic_level(level: &str) -> bool {
    !level.is_empty()
        && level.len() <= 64
        && level
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cold]
fn unreachable_mqtt_url() -> BrokerLogin {
    // `validate` refuses a bad URL before any service starts.
    BrokerLogin::parse("mqtt://127.0.0.1:1883").unwrap_or_else(|_| std::process::abort())
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "fieldline.toml",
                "bus_prefix = \"fromfile\"\nhttp_workers = 3\n",
            )?;
            jail.set_env("FIELDLINE_BUS_PREFIX", "fromenv");
            jail.set_env("FIELDLINE_AUTH_CACHE_TTL", "5s");
            jail.set_env("FIELDLINE_WEBHOOK_RETRY_SCHEDULE", "1s, 2s,500ms");
            let config = Config::figment(Some(Path::new("fieldline.toml"))).unwrap();
            assert_eq!(config.bus_prefix, "fromenv");
            assert_eq!(config.http_workers, 3);
            assert_eq!(config.auth_cache_ttl, Duration::from_secs(5));
            assert_eq!(
                config.webhook_retry_gaps(),
                [
                    Duration::from_secs(1),
                    Duration::from_secs(2),
                    Duration::from_millis(500)
                ]
            );
            assert_eq!(
                config.database_url.expose_secret(),
                "postgres://postgres@127.0.0.1:5432/fieldline"
            );
            Ok(())
        });
    }

    #[test]
    fn the_admin_commands_settings_are_not_refused_but_a_typo_is() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FIELDLINE_URL", "http://127.0.0.1:8080");
            jail.set_env("FIELDLINE_API_KEY", "flk_x");
            Config::figment(None).unwrap();
            jail.set_env("FIELDLINE_UR", "http://127.0.0.1:8080");
            assert!(Config::figment(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn webhooks_are_disabled_after_a_time_and_the_old_count_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FIELDLINE_WEBHOOK_DISABLE_AFTER", "5");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(
                error.contains("`webhook_disable_after`")
                    && error.contains("FIELDLINE_WEBHOOK_DISABLE_AFTER_FAILING"),
                "{error}"
            );
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("FIELDLINE_WEBHOOK_DISABLE_AFTER_FAILING", "0s");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("webhook_disable_after_failing"), "{error}");
            jail.set_env("FIELDLINE_WEBHOOK_DISABLE_AFTER_FAILING", "5d");
            jail.set_env("FIELDLINE_WEBHOOK_RETENTION", "90d");
            let config = Config::figment(None).unwrap();
            assert_eq!(
                config.webhook_disable_after_failing,
                Duration::from_secs(5 * 86_400)
            );
            assert_eq!(config.webhook_retention, Duration::from_secs(90 * 86_400));
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_their_field() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FIELDLINE_BUS_PREFIX", "has.dot");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("bus_prefix"), "{error}");
            jail.set_env("FIELDLINE_BUS_PREFIX", "ok");
            jail.set_env("FIELDLINE_MQTT_URL", "http://x");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("mqtt_url"), "{error}");
            jail.set_env("FIELDLINE_MQTT_URL", "mqtt://broker:1884");
            jail.set_env("FIELDLINE_MQTT_MAX_MESSAGE_BYTES", "2000000");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("mqtt_max_message_bytes"), "{error}");
            jail.set_env("FIELDLINE_MQTT_MAX_MESSAGE_BYTES", "262144");
            jail.set_env("FIELDLINE_MQTT_QOS0_BACKLOG", "0");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("mqtt_qos0_backlog"), "{error}");
            jail.set_env("FIELDLINE_MQTT_QOS0_BACKLOG", "1024");
            jail.set_env("FIELDLINE_WEBHOOK_RETRY_SCHEDULE", "5s,soon");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("webhook_retry_schedule"), "{error}");
            jail.set_env("FIELDLINE_WEBHOOK_RETRY_SCHEDULE", "5s");
            jail.set_env("FIELDLINE_BOOTSTRAP_ADMIN_KEY", "");
            jail.set_env("FIELDLINE_MQTT_ADMIN_URL", "mqtt://admin:pw@broker:1884");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("device_token_key"), "{error}");
            jail.set_env("FIELDLINE_DEVICE_TOKEN_KEY", "too-short");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("device_token_key"), "{error}");
            jail.set_env("FIELDLINE_DEVICE_TOKEN_KEY", "");
            jail.set_env("FIELDLINE_MQTT_ADMIN_URL", "");
            let config = Config::figment(None).unwrap();
            assert!(config.bootstrap_admin_key.is_none());
            assert_eq!(config.mqtt_host_port(), ("broker".to_owned(), 1884));
            Ok(())
        });
    }

    #[test]
    fn a_slot_in_use_cannot_be_retired_and_one_past_the_slots_can() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FIELDLINE_MQTT_SLOTS", "4");
            jail.set_env("FIELDLINE_MQTT_RETIRED_CLIENT_IDS", "fl-ingest-mqtt-slot-3");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("mqtt_retired_client_ids"), "{error}");
            jail.set_env(
                "FIELDLINE_MQTT_RETIRED_CLIENT_IDS",
                " fl-ingest-mqtt-pod-a, fl-ingest-mqtt-slot-4,,",
            );
            let config = Config::figment(None).unwrap();
            assert_eq!(
                config.ingest_mqtt_retired_client_ids(),
                ["fl-ingest-mqtt-pod-a", "fl-ingest-mqtt-slot-4"]
            );
            jail.set_env("FIELDLINE_MQTT_SLOT_LEASE", "1s");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("mqtt_slot_lease"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn nats_and_database_credentials_come_from_the_environment_and_never_print() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "FIELDLINE_NATS_URL",
                "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
            );
            jail.set_env("FIELDLINE_NATS_USER", "fieldline");
            // Digits only: still a string, not a number figment guessed.
            jail.set_env("FIELDLINE_NATS_PASSWORD", "0123456789");
            jail.set_env("FIELDLINE_NATS_TOKEN", "");
            jail.set_env("FIELDLINE_NATS_CA_FILE", "");
            jail.set_env(
                "FIELDLINE_DATABASE_URL",
                "postgres://fieldline:pgsecret@db:5432/fl?sslmode=require",
            );
            let config = Config::figment(None).unwrap();
            assert_eq!(config.nats_user.as_deref(), Some("fieldline"));
            assert_eq!(
                config.nats_password.as_ref().unwrap().expose_secret(),
                "0123456789"
            );
            assert!(config.nats_token.is_none() && config.nats_ca_file.is_none());
            let shown = format!("{config:?}");
            assert!(!shown.contains("0123456789"), "{shown}");
            assert!(!shown.contains("pgsecret"), "{shown}");
            let nats = crate::bus::NatsSettings::from_config(&config).unwrap();
            assert_eq!(
                nats.servers_shown(),
                "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
            );
            jail.set_env("FIELDLINE_NATS_TOKEN", "also");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(
                error.contains("nats_token") && !error.contains("also"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn stream_replicas_and_placement_load_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            let replication = Config::figment(None).unwrap().stream_replication();
            assert_eq!(replication.replicas, 1);
            assert!(replication.placement.is_none());
            jail.set_env("FIELDLINE_STREAM_REPLICAS", "3");
            jail.set_env("FIELDLINE_STREAM_PLACEMENT_TAGS", " ssd, 2024 ,,");
            // Digits only: still a name, not a number figment guessed.
            jail.set_env("FIELDLINE_STREAM_PLACEMENT_CLUSTER", "007");
            let replication = Config::figment(None).unwrap().stream_replication();
            assert_eq!(replication.replicas, 3);
            let placement = replication.placement.unwrap();
            assert_eq!(placement.cluster.as_deref(), Some("007"));
            assert_eq!(placement.tags, ["ssd", "2024"]);
            // Empty, as compose passes an unset variable: no placement.
            jail.set_env("FIELDLINE_STREAM_PLACEMENT_TAGS", "");
            jail.set_env("FIELDLINE_STREAM_PLACEMENT_CLUSTER", "");
            let replication = Config::figment(None).unwrap().stream_replication();
            assert!(replication.placement.is_none());
            for (variable, value, field) in [
                ("FIELDLINE_STREAM_REPLICAS", "0", "stream_replicas"),
                ("FIELDLINE_STREAM_REPLICAS", "6", "stream_replicas"),
                ("FIELDLINE_STREAM_REPLICAS", "three", "stream_replicas"),
                (
                    "FIELDLINE_STREAM_PLACEMENT_TAGS",
                    "ssd,fast disk",
                    "stream_placement_tags",
                ),
                (
                    "FIELDLINE_STREAM_PLACEMENT_CLUSTER",
                    "east 1",
                    "stream_placement_cluster",
                ),
            ] {
                jail.set_env(variable, value);
                let error = Config::figment(None).unwrap_err().to_string();
                assert!(error.to_lowercase().contains(field), "{value}: {error}");
                jail.set_env("FIELDLINE_STREAM_REPLICAS", "3");
                jail.set_env("FIELDLINE_STREAM_PLACEMENT_TAGS", "");
                jail.set_env("FIELDLINE_STREAM_PLACEMENT_CLUSTER", "");
            }
            Ok(())
        });
    }

    #[test]
    fn live_time_settings_load_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            let config = Config::figment(None).unwrap();
            assert_eq!(config.ingest_max_age, Duration::from_secs(30 * 24 * 3600));
            assert_eq!(config.ingest_max_future, Duration::from_secs(3600));
            assert_eq!(
                config.readings_earliest.to_rfc3339(),
                "2000-01-01T00:00:00+00:00"
            );
            jail.set_env("FIELDLINE_INGEST_MAX_AGE", "90days");
            jail.set_env("FIELDLINE_READINGS_EARLIEST", "2015-06-01T00:00:00Z");
            let config = Config::figment(None).unwrap();
            assert_eq!(config.ingest_max_age, Duration::from_secs(90 * 24 * 3600));
            assert_eq!(config.readings_earliest.timestamp(), 1_433_116_800);
            for (variable, value, field) in [
                ("FIELDLINE_INGEST_MAX_FUTURE", "8days", "ingest_max_future"),
                ("FIELDLINE_INGEST_MAX_AGE", "10s", "ingest_max_age"),
                (
                    "FIELDLINE_READINGS_EARLIEST",
                    "2999-01-01T00:00:00Z",
                    "readings_earliest",
                ),
                (
                    "FIELDLINE_READINGS_EARLIEST",
                    "last year",
                    "readings_earliest",
                ),
            ] {
                jail.set_env(variable, value);
                let error = Config::figment(None).unwrap_err().to_string();
                // figment names a key it could not parse as the variable spells it.
                assert!(error.to_lowercase().contains(field), "{value}: {error}");
                jail.set_env("FIELDLINE_INGEST_MAX_FUTURE", "1h");
                jail.set_env("FIELDLINE_INGEST_MAX_AGE", "30days");
                jail.set_env("FIELDLINE_READINGS_EARLIEST", "2000-01-01T00:00:00Z");
            }
            Ok(())
        });
    }

    #[test]
    fn read_replicas_split_on_urls_and_keep_multi_host_commas() {
        figment::Jail::expect_with(|jail| {
            let config = Config::figment(None).unwrap();
            assert!(config.database_read_urls().is_empty());
            assert_eq!(config.database_read_max_lag, Duration::from_secs(5));
            jail.set_env(
                "FIELDLINE_DATABASE_READ_URL",
                "postgres://ro:secret1@r1:5432/fl, postgresql://ro@r2a:5432,r2b:5433/fl?sslmode=require,postgres://r3/fl",
            );
            jail.set_env("FIELDLINE_DATABASE_READ_MAX_LAG", "2s");
            let config = Config::figment(None).unwrap();
            let urls: Vec<String> = config
                .database_read_urls()
                .iter()
                .map(|url| url.expose_secret().to_owned())
                .collect();
            assert_eq!(
                urls,
                [
                    "postgres://ro:secret1@r1:5432/fl",
                    "postgresql://ro@r2a:5432,r2b:5433/fl?sslmode=require",
                    "postgres://r3/fl"
                ]
            );
            assert_eq!(config.database_read_max_lag, Duration::from_secs(2));
            let shown = format!("{config:?}");
            assert!(!shown.contains("secret1"), "{shown}");
            jail.set_env(
                "FIELDLINE_DATABASE_READ_URL",
                "postgres://r1/fl?sslmode=sometimes",
            );
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("database_read_url"), "{error}");
            jail.set_env("FIELDLINE_DATABASE_READ_URL", "");
            jail.set_env("FIELDLINE_DATABASE_READ_PROBE_INTERVAL", "10s");
            let error = Config::figment(None).unwrap_err().to_string();
            assert!(error.contains("database_read_probe_interval"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let config = Config {
            bootstrap_admin_key: Some(SecretString::from("flk_topsecret")),
            mqtt_url: SecretString::from("mqtt://ingest:mqtt-topsecret@broker:1883"),
            mqtt_admin_url: Some(SecretString::from("mqtt://admin:admin-topsecret@broker")),
            device_token_key: Some(SecretString::from(
                "key-topsecret-key-topsecret-key-topsecret",
            )),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("postgres@"), "{shown}");
    }
}
