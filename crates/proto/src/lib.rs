//! The bus contract of Fieldline.
//!
//! This crate owns the protobuf types carried on NATS ([`v1`]), the subject builders
//! ([`Subjects`]) and the JetStream stream definitions ([`Stream`]). No other crate spells a
//! subject: they all ask a [`Subjects`] built from the configured prefix, which is how parallel
//! test runs (and several deployments on one NATS) stay apart.

use std::time::Duration;

use async_nats::jetstream::stream;

/// Generated from `proto/fieldline/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fieldline.v1.rs"));
}

/// A telemetry message no consumer can take: it does not decode, mixes the single-device and
/// multi-device shapes, or names no device. Consumers make it a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBatch(pub String);

impl std::fmt::Display for InvalidBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidBatch {}

/// The longest metric of a [`v1::Series`] a consumer takes: the edges' limit on metric names.
/// A series' metric is copied into each of its readings, so a long one would make a small
/// message cost far more memory decoded than its bytes.
pub const MAX_SERIES_METRIC_LEN: usize = 128;

impl v1::TelemetryBatch {
    /// Whether this is the multi-device shape (`devices` set).
    pub fn is_multi_device(&self) -> bool {
        !self.devices.is_empty()
    }

    /// The readings of each device as a single-device batch, in order: a single-device
    /// batch is itself; a multi-device one gives one per entry of `devices`, each with the
    /// batch's project and source. Every consumer calls this right after decoding, so the
    /// rest of it sees single-device batches only.
    ///
    /// A single-device batch's `series` become readings, after its own, series by series.
    ///
    /// Refused: both shapes at once (`devices` beside a `device_id`, `readings`,
    /// `received_at_us`, `message_id` or `series` of the batch), an entry of `devices` without
    /// a device id, and a series whose times and numbers differ in count or whose metric is
    /// longer than [`MAX_SERIES_METRIC_LEN`].
    pub fn split(mut self) -> Result<Vec<v1::TelemetryBatch>, InvalidBatch> {
        if self.devices.is_empty() {
            self.expand_series()?;
            return Ok(vec![self]);
        }
        if !self.device_id.is_empty()
            || !self.readings.is_empty()
            || self.received_at_us != 0
            || !self.message_id.is_empty()
            || !self.series.is_empty()
        {
            return Err(InvalidBatch(
                "a telemetry batch with both a device of its own and `devices`".into(),
            ));
        }
        if let Some(position) = self.devices.iter().position(|d| d.device_id.is_empty()) {
            return Err(InvalidBatch(format!(
                "devices[{position}] of a telemetry batch has no device id"
            )));
        }
        let v1::TelemetryBatch {
            project,
            source,
            devices,
            ..
        } = self;
        Ok(devices
            .into_iter()
            .map(|device| v1::TelemetryBatch {
                project: project.clone(),
                device_id: device.device_id,
                readings: device.readings,
                received_at_us: device.received_at_us,
                source: source.clone(),
                message_id: device.message_id,
                devices: Vec::new(),
                series: Vec::new(),
            })
            .collect())
    }

    /// Moves the readings of `series` to the end of `readings`.
    fn expand_series(&mut self) -> Result<(), InvalidBatch> {
        if self.series.is_empty() {
            return Ok(());
        }
        let count: usize = self.series.iter().map(|series| series.numbers.len()).sum();
        self.readings.reserve(count);
        for (position, series) in std::mem::take(&mut self.series).into_iter().enumerate() {
            if series.ts_delta_us.len() != series.numbers.len() {
                return Err(InvalidBatch(format!(
                    "series[{position}] of a telemetry batch has {} times for {} numbers",
                    series.ts_delta_us.len(),
                    series.numbers.len()
                )));
            }
            if series.metric.len() > MAX_SERIES_METRIC_LEN {
                return Err(InvalidBatch(format!(
                    "series[{position}] of a telemetry batch has a metric of {} bytes (at most {MAX_SERIES_METRIC_LEN})",
                    series.metric.len()
                )));
            }
            let mut ts_us = 0i64;
            for (delta, number) in series.ts_delta_us.into_iter().zip(series.numbers) {
                // Wrapping, as the encoder's differences are: any run of times comes back.
                ts_us = ts_us.wrapping_add(delta);
                self.readings.push(v1::Reading {
                    metric: series.metric.clone(),
                    ts_us,
                    value: Some(v1::reading::Value::Number(number)),
                });
            }
        }
        Ok(())
    }
}

/// The JetStream streams of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `{prefix}.telemetry.>` and `{prefix}.heartbeat.>`.
    Telemetry,
    /// `{prefix}.events.>`: device.status, device.alert, config.update.
    Events,
    /// `{prefix}.commands.>`: commands and config pushed toward devices.
    Commands,
    /// `{prefix}.dead.{consumer}`: messages a consumer gave up on, with the reason, kept to
    /// be inspected, replayed or purged.
    DeadLetters,
}

impl Stream {
    /// Every stream, in the order services create them.
    pub const ALL: [Stream; 4] = [
        Stream::Telemetry,
        Stream::Events,
        Stream::Commands,
        Stream::DeadLetters,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Stream::Telemetry => "TELEMETRY",
            Stream::Events => "EVENTS",
            Stream::Commands => "COMMANDS",
            Stream::DeadLetters => "DEAD",
        }
    }
}

/// Bounds applied to every stream (config, so tests can keep them small).
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    /// The dead-letter stream's own bounds: kept longer (someone has to look), far smaller.
    pub dead_max_age: Duration,
    pub dead_max_bytes: i64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            dead_max_age: Duration::from_secs(14 * 24 * 3600),
            dead_max_bytes: 256 << 20,
        }
    }
}

/// How many servers of a JetStream cluster keep each stream (and, through it, each durable
/// consumer and KV bucket), and on which servers. One replica on a single server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// 1 to 5: 3 in a cluster of three keeps every stream through the loss of one server.
    pub replicas: usize,
    /// Where the streams go: a cluster's name, servers' tags; `None` lets JetStream choose.
    pub placement: Option<stream::Placement>,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            replicas: 1,
            placement: None,
        }
    }
}

impl Replication {
    /// A stream definition with this replication.
    pub fn apply(&self, config: stream::Config) -> stream::Config {
        stream::Config {
            num_replicas: self.replicas,
            placement: self.placement.clone(),
            ..config
        }
    }

    /// Whether a stream as JetStream reports it has this many copies (0 is 1).
    pub fn same_replicas(&self, current: &stream::Config) -> bool {
        current.num_replicas.max(1) == self.replicas.max(1)
    }

    /// Whether a stream as JetStream reports it has this placement (an empty one is none).
    pub fn same_placement(&self, current: &stream::Config) -> bool {
        let named = |placement: &Option<stream::Placement>| {
            placement
                .as_ref()
                .map(|p| (p.cluster.clone().unwrap_or_default(), p.tags.clone()))
                .unwrap_or_default()
        };
        named(&current.placement) == named(&self.placement)
    }
}

/// Durable consumer names: one per consuming service, shared by all its instances (that is
/// how a service scales out). Spelled here so tools (loadgen) name the same consumer.
pub mod consumers {
    /// query-api's writer, on the telemetry stream.
    pub const QUERY_WRITER: &str = "query-writer";
    /// webhook-dispatcher's fan-out of telemetry (device.data).
    pub const WEBHOOK_DATA: &str = "webhook-data";
    /// webhook-dispatcher's fan-out of device events.
    pub const WEBHOOK_EVENTS: &str = "webhook-events";
    /// device-registry's presence (online/offline) and alert evaluation, on the telemetry
    /// stream (readings and heartbeats).
    pub const REGISTRY_STATE: &str = "registry-state";
    /// ingest-mqtt's downlink: config and commands from the commands stream to MQTT.
    pub const MQTT_DOWNLINK: &str = "mqtt-downlink";
}

/// Kinds of cache invalidation broadcast on `{prefix}.invalidate.{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateKind {
    Keys,
    Devices,
    Webhooks,
}

impl InvalidateKind {
    fn token(self) -> &'static str {
        match self {
            InvalidateKind::Keys => "keys",
            InvalidateKind::Devices => "devices",
            InvalidateKind::Webhooks => "webhooks",
        }
    }

    /// The kind an invalidation subject names (its last token), if any.
    pub fn of_subject(subject: &str) -> Option<Self> {
        match subject.rsplit('.').next()? {
            "keys" => Some(InvalidateKind::Keys),
            "devices" => Some(InvalidateKind::Devices),
            "webhooks" => Some(InvalidateKind::Webhooks),
            _ => None,
        }
    }
}

/// An invalid bus prefix.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPrefix(pub String);

impl std::fmt::Display for InvalidPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bus prefix {:?} is invalid: use 1 to 32 characters of [a-z0-9_]",
            self.0
        )
    }
}

impl std::error::Error for InvalidPrefix {}

/// Builds every subject and stream name from one prefix (default `fl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// The prefix is one subject token: lowercase letters, digits and `_`.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Self {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(InvalidPrefix(prefix.to_owned()))
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}.telemetry.{project}.{device}`
    pub fn telemetry(&self, project: &str, device_id: &str) -> String {
        // Built by hand: one per reading message, where `format!` showed in profiles.
        let mut subject = String::with_capacity(
            self.prefix.len() + ".telemetry..".len() + project.len() + device_id.len(),
        );
        for part in [&self.prefix, ".telemetry.", project, ".", device_id] {
            subject.push_str(part);
        }
        subject
    }

    /// `{prefix}.telemetry.{project}.{source}.batch`: readings of several devices of one
    /// project in one bus message (the multi-device shape of [`v1::TelemetryBatch`]). Five
    /// tokens where a device's subject has four (ids hold no `.`), so no filter on a device's
    /// subject matches it, and `{prefix}.telemetry.>` matches both.
    pub fn telemetry_batch(&self, project: &str, source: &str) -> String {
        format!("{}.telemetry.{project}.{source}.batch", self.prefix)
    }

    /// Every telemetry subject of one project, devices' and batches' alike:
    /// `{prefix}.telemetry.{project}.>`.
    pub fn project_telemetry(&self, project: &str) -> String {
        format!("{}.telemetry.{project}.>", self.prefix)
    }

    /// The project of a multi-device batch's subject, or `None` for any other subject.
    pub fn telemetry_batch_project<'s>(&self, subject: &'s str) -> Option<&'s str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".telemetry.")?;
        let mut tokens = rest.split('.');
        let (project, _source, last) = (tokens.next()?, tokens.next()?, tokens.next()?);
        (last == "batch" && tokens.next().is_none() && !project.is_empty()).then_some(project)
    }

    /// Decodes a telemetry message published on `subject` and gives one single-device batch
    /// per device it carries ([`v1::TelemetryBatch::split`]). A multi-device batch must be on
    /// a batch subject of its own project, and a single-device one on no batch subject.
    pub fn telemetry_devices(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<Vec<v1::TelemetryBatch>, InvalidBatch> {
        use prost::Message as _;
        let batch = v1::TelemetryBatch::decode(payload)
            .map_err(|error| InvalidBatch(format!("undecodable telemetry message: {error}")))?;
        match (
            self.telemetry_batch_project(subject),
            batch.devices.is_empty(),
        ) {
            (Some(project), false) if project != batch.project => Err(InvalidBatch(format!(
                "a batch of project {:?} on the subject of project {project:?}",
                batch.project
            ))),
            (Some(_), true) => Err(InvalidBatch(
                "a single-device batch on a multi-device batch subject".into(),
            )),
            (None, false) => Err(InvalidBatch(
                "a multi-device batch on a subject that is not a batch subject".into(),
            )),
            _ => batch.split(),
        }
    }

    /// Every telemetry subject: the filter of the telemetry consumers.
    pub fn telemetry_all(&self) -> String {
        format!("{}.telemetry.>", self.prefix)
    }

    /// `{prefix}.heartbeat.{project}.{device}`
    pub fn heartbeat(&self, project: &str, device_id: &str) -> String {
        format!("{}.heartbeat.{project}.{device_id}", self.prefix)
    }

    pub fn heartbeat_all(&self) -> String {
        format!("{}.heartbeat.>", self.prefix)
    }

    /// `{prefix}.events.{project}.{type}.{device}`, type one of `alert`, `status`, `config`.
    pub fn event(&self, project: &str, event_type: &str, device_id: &str) -> String {
        format!("{}.events.{project}.{event_type}.{device_id}", self.prefix)
    }

    /// Every event of one project (`type` one of `alert`, `status`, `config`, or `*`).
    pub fn project_events(&self, project: &str, event_type: &str) -> String {
        format!("{}.events.{project}.{event_type}.*", self.prefix)
    }

    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `{prefix}.commands.{project}.{device}`
    pub fn commands(&self, project: &str, device_id: &str) -> String {
        format!("{}.commands.{project}.{device_id}", self.prefix)
    }

    pub fn commands_all(&self) -> String {
        format!("{}.commands.>", self.prefix)
    }

    /// Where a consumer's dead letters go: `fl.dead.query-writer`.
    pub fn dead_letter(&self, consumer: &str) -> String {
        format!("{}.dead.{consumer}", self.prefix)
    }

    pub fn dead_letters_all(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    /// Request/reply: API key or device token to principal.
    pub fn rpc_auth_verify(&self) -> String {
        format!("{}.rpc.auth.verify", self.prefix)
    }

    /// Request/reply: does this device exist in this project.
    pub fn rpc_auth_device(&self) -> String {
        format!("{}.rpc.auth.device", self.prefix)
    }

    /// Request/reply: a device's current configuration.
    pub fn rpc_device_config(&self) -> String {
        format!("{}.rpc.device.config", self.prefix)
    }

    /// Request/reply: hand a device its live commands over HTTP.
    pub fn rpc_commands_fetch(&self) -> String {
        format!("{}.rpc.commands.fetch", self.prefix)
    }

    /// Request/reply: a command was delivered, or acknowledged by its device.
    pub fn rpc_commands_report(&self) -> String {
        format!("{}.rpc.commands.report", self.prefix)
    }

    /// Broadcast cache invalidation.
    pub fn invalidate(&self, kind: InvalidateKind) -> String {
        format!("{}.invalidate.{}", self.prefix, kind.token())
    }

    /// `fl.invalidate.*`: every kind on one subscription, so they arrive in publish order.
    pub fn invalidate_any(&self) -> String {
        format!("{}.invalidate.*", self.prefix)
    }

    /// `FL_TELEMETRY` for the prefix `fl`.
    pub fn stream_name(&self, stream: Stream) -> String {
        format!("{}_{}", self.prefix.to_ascii_uppercase(), stream.suffix())
    }

    /// `FL_MQTT_SLOTS`: the KV bucket in which ingest-mqtt instances lease the uplink slots.
    pub fn mqtt_slots_bucket(&self) -> String {
        format!("{}_MQTT_SLOTS", self.prefix.to_ascii_uppercase())
    }

    /// The full definition of a stream: file storage, bounded by age and bytes, with a
    /// duplicate window on `Nats-Msg-Id`.
    pub fn stream_config(
        &self,
        stream: Stream,
        limits: StreamLimits,
        replication: &Replication,
    ) -> stream::Config {
        let subjects = match stream {
            Stream::Telemetry => vec![self.telemetry_all(), self.heartbeat_all()],
            Stream::Events => vec![self.events_all()],
            Stream::Commands => vec![self.commands_all()],
            Stream::DeadLetters => vec![self.dead_letters_all()],
        };
        let (max_age, max_bytes) = match stream {
            Stream::DeadLetters => (limits.dead_max_age, limits.dead_max_bytes),
            _ => (limits.max_age, limits.max_bytes),
        };
        replication.apply(stream::Config {
            name: self.stream_name(stream),
            subjects,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age,
            max_bytes,
            duplicate_window: limits.duplicate_window,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_contract() {
        let subjects = Subjects::new("fl").unwrap();
        assert_eq!(
            subjects.telemetry("default", "esp32-1"),
            "fl.telemetry.default.esp32-1"
        );
        assert_eq!(subjects.event("p", "status", "d"), "fl.events.p.status.d");
        assert_eq!(subjects.rpc_auth_verify(), "fl.rpc.auth.verify");
        assert_eq!(
            subjects.invalidate(InvalidateKind::Keys),
            "fl.invalidate.keys"
        );
        for kind in [
            InvalidateKind::Keys,
            InvalidateKind::Devices,
            InvalidateKind::Webhooks,
        ] {
            assert_eq!(
                InvalidateKind::of_subject(&subjects.invalidate(kind)),
                Some(kind)
            );
        }
        assert_eq!(InvalidateKind::of_subject("fl.invalidate.other"), None);
        assert_eq!(subjects.stream_name(Stream::Telemetry), "FL_TELEMETRY");
        assert_eq!(
            Subjects::new("t_1").unwrap().stream_name(Stream::Events),
            "T_1_EVENTS"
        );
    }

    #[test]
    fn replication_is_applied_and_compared_as_jetstream_reports_it() {
        let subjects = Subjects::new("fl").unwrap();
        let three = Replication {
            replicas: 3,
            placement: Some(stream::Placement {
                cluster: Some("east".into()),
                tags: vec!["ssd".into()],
            }),
        };
        let config = subjects.stream_config(Stream::Telemetry, StreamLimits::default(), &three);
        assert_eq!(config.num_replicas, 3);
        assert!(three.same_replicas(&config) && three.same_placement(&config));
        // A stream made before replication was configurable: JetStream reports 1 replica
        // (or 0), no placement.
        let single = stream::Config {
            num_replicas: 0,
            ..Default::default()
        };
        assert!(Replication::default().same_replicas(&single));
        assert!(Replication::default().same_placement(&single));
        assert!(!three.same_replicas(&single) && !three.same_placement(&single));
        let moved = stream::Config {
            placement: Some(stream::Placement {
                cluster: Some("west".into()),
                tags: vec!["ssd".into()],
            }),
            ..config.clone()
        };
        assert!(three.same_replicas(&moved) && !three.same_placement(&moved));
        let empty_placement = stream::Config {
            num_replicas: 1,
            placement: Some(stream::Placement::default()),
            ..Default::default()
        };
        assert!(Replication::default().same_placement(&empty_placement));
    }

    use prost::Message as _;
    use v1::{DeviceReadings, Reading, TelemetryBatch, reading};

    fn reading(metric: &str) -> Reading {
        Reading {
            metric: metric.to_owned(),
            ts_us: 5,
            value: Some(reading::Value::Number(1.0)),
        }
    }

    fn single(device_id: &str) -> TelemetryBatch {
        TelemetryBatch {
            project: "p".into(),
            device_id: device_id.into(),
            readings: vec![reading("t")],
            received_at_us: 9,
            source: "http".into(),
            message_id: "p/d/k".into(),
            devices: Vec::new(),
            series: Vec::new(),
        }
    }

    fn several() -> TelemetryBatch {
        TelemetryBatch {
            project: "p".into(),
            source: "mqtt".into(),
            devices: vec![
                DeviceReadings {
                    device_id: "a".into(),
                    readings: vec![reading("t"), reading("h")],
                    received_at_us: 7,
                    message_id: String::new(),
                },
                DeviceReadings {
                    device_id: "b".into(),
                    readings: vec![reading("v")],
                    received_at_us: 8,
                    message_id: String::new(),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_single_device_batch_splits_into_itself() {
        assert_eq!(single("d").split().unwrap(), vec![single("d")]);
        // No readings at all is still one device's (empty) batch, as it always was.
        let empty = TelemetryBatch {
            readings: Vec::new(),
            ..single("d")
        };
        assert_eq!(empty.clone().split().unwrap(), vec![empty]);
    }

    #[test]
    fn series_split_into_readings_after_the_batchs_own() {
        let number = |metric: &str, ts_us: i64, number: f64| Reading {
            metric: metric.to_owned(),
            ts_us,
            value: Some(reading::Value::Number(number)),
        };
        let columns = TelemetryBatch {
            series: vec![
                v1::Series {
                    metric: "t".into(),
                    ts_delta_us: vec![1_700_000_000_000_000, 10_000_000, -5, 0],
                    numbers: vec![20.5, -0.0, f64::MAX, 1e-300],
                },
                v1::Series {
                    metric: "h".into(),
                    ts_delta_us: vec![-3],
                    numbers: vec![0.1],
                },
            ],
            ..single("d")
        };
        let mut expected = single("d");
        expected.readings.extend([
            number("t", 1_700_000_000_000_000, 20.5),
            number("t", 1_700_000_010_000_000, -0.0),
            number("t", 1_700_000_009_999_995, f64::MAX),
            number("t", 1_700_000_009_999_995, 1e-300),
            number("h", -3, 0.1),
        ]);
        assert_eq!(columns.split().unwrap(), vec![expected]);

        let uneven = TelemetryBatch {
            series: vec![v1::Series {
                metric: "t".into(),
                ts_delta_us: vec![1, 2],
                numbers: vec![1.0],
            }],
            ..single("d")
        };
        assert_eq!(
            uneven.split().unwrap_err().0,
            "series[0] of a telemetry batch has 2 times for 1 numbers"
        );
        // A metric past the edges' limit would be copied into every reading: refused.
        let long = |len: usize| TelemetryBatch {
            series: vec![v1::Series {
                metric: "m".repeat(len),
                ts_delta_us: vec![1; 1000],
                numbers: vec![1.0; 1000],
            }],
            ..single("d")
        };
        assert_eq!(
            long(MAX_SERIES_METRIC_LEN).split().unwrap()[0]
                .readings
                .len(),
            1001
        );
        assert_eq!(
            long(MAX_SERIES_METRIC_LEN + 1).split().unwrap_err().0,
            "series[0] of a telemetry batch has a metric of 129 bytes (at most 128)"
        );
    }

    #[test]
    fn a_multi_device_batch_splits_into_one_batch_per_device() {
        let parts = several().split().unwrap();
        let shapes: Vec<_> = parts
            .iter()
            .map(|part| {
                (
                    part.project.as_str(),
                    part.device_id.as_str(),
                    part.readings.len(),
                    part.received_at_us,
                    part.source.as_str(),
                    part.devices.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            shapes,
            vec![
                ("p", "a", 2, 7, "mqtt", true),
                ("p", "b", 1, 8, "mqtt", true)
            ]
        );
        assert!(several().is_multi_device() && !single("d").is_multi_device());
    }

    #[test]
    fn a_batch_mixing_both_shapes_or_naming_no_device_is_refused() {
        let mixes = [
            TelemetryBatch {
                device_id: "c".into(),
                ..several()
            },
            TelemetryBatch {
                readings: vec![reading("x")],
                ..several()
            },
            TelemetryBatch {
                received_at_us: 1,
                ..several()
            },
            TelemetryBatch {
                message_id: "k".into(),
                ..several()
            },
            TelemetryBatch {
                series: vec![v1::Series {
                    metric: "x".into(),
                    ts_delta_us: vec![1],
                    numbers: vec![1.0],
                }],
                ..several()
            },
        ];
        for mixed in mixes {
            let error = mixed.split().unwrap_err();
            assert!(error.0.contains("both"), "{error}");
        }
        let mut nameless = several();
        nameless.devices[1].device_id.clear();
        assert_eq!(
            nameless.split().unwrap_err().0,
            "devices[1] of a telemetry batch has no device id"
        );
    }

    #[test]
    fn a_batch_subject_is_never_a_devices_and_carries_only_batches_of_its_project() {
        let subjects = Subjects::new("fl").unwrap();
        let batch_subject = subjects.telemetry_batch("p", "mqtt");
        assert_eq!(batch_subject, "fl.telemetry.p.mqtt.batch");
        assert_eq!(subjects.telemetry_batch_project(&batch_subject), Some("p"));
        for other in [
            subjects.telemetry("p", "batch"),
            subjects.telemetry("p", "mqtt"),
            "fl.telemetry.p.mqtt.batch.x".to_owned(),
            "fx.telemetry.p.mqtt.batch".to_owned(),
        ] {
            assert_eq!(subjects.telemetry_batch_project(&other), None, "{other}");
        }
        assert_eq!(subjects.project_telemetry("p"), "fl.telemetry.p.>");

        let bytes = several().encode_to_vec();
        assert_eq!(
            subjects
                .telemetry_devices(&batch_subject, &bytes)
                .unwrap()
                .len(),
            2
        );
        let device_subject = subjects.telemetry("p", "a");
        assert!(subjects.telemetry_devices(&device_subject, &bytes).is_err());
        let elsewhere = subjects.telemetry_batch("q", "mqtt");
        assert!(subjects.telemetry_devices(&elsewhere, &bytes).is_err());
        let one = single("d").encode_to_vec();
        assert_eq!(
            subjects.telemetry_devices(&device_subject, &one).unwrap(),
            vec![single("d")]
        );
        assert!(subjects.telemetry_devices(&batch_subject, &one).is_err());
        assert!(
            subjects
                .telemetry_devices(&device_subject, b"\xff\xff")
                .unwrap_err()
                .0
                .starts_with("undecodable")
        );
    }

    #[test]
    fn prefixes_that_would_break_subjects_are_refused() {
        for bad in ["", "a.b", "a-b", "A", "x>", "a b", &"x".repeat(33)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
