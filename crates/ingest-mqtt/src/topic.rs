//! MQTT topics: `{root}/{project}/{device}/{kind}`.

use fieldline_common::ids::{DeviceId, ProjectSlug};

/// What a device published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    Telemetry,
    Heartbeat,
}

impl Uplink {
    pub const ALL: [Uplink; 2] = [Uplink::Telemetry, Uplink::Heartbeat];

    pub fn as_str(self) -> &'static str {
        match self {
            Uplink::Telemetry => "telemetry",
            Uplink::Heartbeat => "heartbeat",
        }
    }
}

/// The shared subscription every ingest-mqtt instance joins for one kind of uplink.
pub fn shared_filter(group: &str, root: &str, uplink: Uplink) -> String {
    format!("$share/{group}/{root}/+/+/{}", uplink.as_str())
}

/// Parses a topic under `root`; `None` for anything that is not a valid uplink.
pub fn parse(root: &str, topic: &str) -> Option<(ProjectSlug, DeviceId, Uplink)> {
    let mut levels = topic.split('/');
    if levels.next()? != root {
        return None;
    }
    let project = ProjectSlug::parse(levels.next()?).ok()?;
    let device = DeviceId::parse(levels.next()?).ok()?;
    let uplink = match levels.next()? {
        "telemetry" => Uplink::Telemetry,
        "heartbeat" => Uplink::Heartbeat,
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
        for bad in [
            "fl/default/esp32-1",
            "xx/default/d/telemetry",
            "fl/default/d/telemetry/more",
            "fl/de fault/d/telemetry",
            "fl/p/d/config",
        ] {
            assert!(parse("fl", bad).is_none(), "{bad}");
        }
        assert_eq!(
            shared_filter("g", "fl", Uplink::Heartbeat),
            "$share/g/fl/+/+/heartbeat"
        );
    }
}
