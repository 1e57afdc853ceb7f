//! MQTT topics: `{root}/{project}/{device}/{kind}`. The only place ingest-mqtt spells one.

use fieldline_common::ids::{DeviceId, ProjectSlug};

/// What a device published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    Telemetry,
    Heartbeat,
    /// `{root}/{project}/{device}/commands/ack`: the device's answer to a command.
    CommandAck,
}

impl Uplink {
    pub const ALL: [Uplink; 3] = [Uplink::Telemetry, Uplink::Heartbeat, Uplink::CommandAck];

    /// The levels after `{root}/{project}/{device}/`.
    pub fn as_str(self) -> &'static str {
        match self {
            Uplink::Telemetry => "telemetry",
            Uplink::Heartbeat => "heartbeat",
            Uplink::CommandAck => "commands/ack",
        }
    }
}

/// The shared subscription every ingest-mqtt instance joins for one kind of uplink.
pub fn shared_filter(group: &str, root: &str, uplink: Uplink) -> String {
    format!("$share/{group}/{root}/+/+/{}", uplink.as_str())
}

/// Where a device's configuration is published, retained.
pub fn config(root: &str, project: &str, device_id: &str) -> String {
    format!("{root}/{project}/{device_id}/config")
}

/// Where a device's commands are published.
pub fn commands(root: &str, project: &str, device_id: &str) -> String {
    format!("{root}/{project}/{device_id}/commands")
}

/// Parses a topic under `root`; `None` for anything that is not a valid uplink.
pub fn parse(root: &str, topic: &str) -> Option<(ProjectSlug, DeviceId, Uplink)> {
    let mut levels = topic.split('/');
    if levels.next()? != root {
        return None;
    }
    let project = ProjectSlug::parse(levels.next()?).ok()?;
    let device = DeviceId::parse(levels.next()?).ok()?;
    let uplink = match (levels.next()?, levels.next()) {
        ("telemetry", None) => Uplink::Telemetry,
        ("heartbeat", None) => Uplink::Heartbeat,
        ("commands", Some("ack")) => Uplink::CommandAck,
        _ => return None,
    };
    levels.next().is_none().then_some((project, device, uplink))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_or_are_refused() {
        let (project, device, uplink) = parse("fl", "fl/default/esp32-1/telemetry").unwrap();
        assert_eq!(
            (project.as_str(), device.as_str(), uplink),
            ("default", "esp32-1", Uplink::Telemetry)
        );
        let (_, _, uplink) = parse("fl", "fl/default/esp32-1/commands/ack").unwrap();
        assert_eq!(uplink, Uplink::CommandAck);
        for bad in [
            "fl/default/esp32-1",
            "xx/default/d/telemetry",
            "fl/default/d/telemetry/more",
            "fl/de fault/d/telemetry",
            "fl/p/d/config",
            "fl/p/d/commands",
            "fl/p/d/commands/ack/more",
            "fl/p/d/heartbeat/ack",
        ] {
            assert!(parse("fl", bad).is_none(), "{bad}");
        }
        assert_eq!(
            shared_filter("g", "fl", Uplink::Heartbeat),
            "$share/g/fl/+/+/heartbeat"
        );
        assert_eq!(
            shared_filter("g", "fl", Uplink::CommandAck),
            "$share/g/fl/+/+/commands/ack"
        );
        assert_eq!(config("fl", "p", "d"), "fl/p/d/config");
        assert_eq!(commands("fl", "p", "d"), "fl/p/d/commands");
    }
}
