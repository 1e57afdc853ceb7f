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
        format!("{}.telemetry.{project}.{device_id}", self.prefix)
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

    #[test]
    fn prefixes_that_would_break_subjects_are_refused() {
        for bad in ["", "a.b", "a-b", "A", "x>", "a b", &"x".repeat(33)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
