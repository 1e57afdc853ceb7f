//! What devices see of their configuration and commands, the same over both ingest edges:
//! the JSON of a config version and of a command (MQTT downlink and `GET /api/v1/ingest/…`),
//! and the acknowledgement a device sends back (MQTT `…/commands/ack` and
//! `POST /api/v1/ingest/commands/{id}/ack`).

use fieldline_proto::v1::DeviceCommand;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    error::ApiError,
    time::{format_rfc3339, from_us},
};

/// Longest `detail` a device may send with an acknowledgement.
pub const MAX_ACK_DETAIL_BYTES: usize = 1024;
/// Longest command id accepted in an acknowledgement (ids are `cmd_…`, far shorter).
pub const MAX_COMMAND_ID_LEN: usize = 64;

/// A device's verdict on a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Ok,
    Error,
}

impl AckStatus {
    /// As `CommandReport.status` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Ok => "ok",
            AckStatus::Error => "error",
        }
    }
}

/// The body of `POST /api/v1/ingest/commands/{id}/ack`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandAckIn {
    pub status: AckStatus,
    /// At most 1024 bytes.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub detail: Option<String>,
}

impl CommandAckIn {
    /// 400 naming `detail` when it is longer than [`MAX_ACK_DETAIL_BYTES`].
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_detail(self.detail.as_deref())
    }
}

/// The payload of MQTT `{root}/{project}/{device}/commands/ack`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttCommandAck {
    pub id: String,
    pub status: AckStatus,
    #[serde(default)]
    pub detail: Option<String>,
}

impl MqttCommandAck {
    /// Parses and checks the payload; the error names the field.
    pub fn parse(payload: &[u8]) -> Result<Self, ApiError> {
        let ack: Self = crate::extract::parse_json(payload)?;
        if ack.id.is_empty() || ack.id.len() > MAX_COMMAND_ID_LEN {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("id: 1 to {MAX_COMMAND_ID_LEN} bytes"),
            ));
        }
        validate_detail(ack.detail.as_deref())?;
        Ok(ack)
    }
}

fn validate_detail(detail: Option<&str>) -> Result<(), ApiError> {
    match detail {
        Some(detail) if detail.len() > MAX_ACK_DETAIL_BYTES => Err(ApiError::bad_request(
            "invalid_field",
            format!("detail: at most {MAX_ACK_DETAIL_BYTES} bytes"),
        )),
        _ => Ok(()),
    }
}

/// RFC 3339, or `null` for 0 (unset).
fn optional_time(us: i64) -> Value {
    if us == 0 {
        Value::Null
    } else {
        Value::String(format_rfc3339(&from_us(us)))
    }
}

/// A JSON document stored as text on the bus; `default` when empty or not JSON (the registry
/// only stores JSON, so this is a fallback, never a guess about a client's input).
fn embedded_json(text: &str, default: Value) -> Value {
    if text.is_empty() {
        return default;
    }
    serde_json::from_str(text).unwrap_or(default)
}

/// A command as a device receives it: `{"id","name","params","expires_at"}` (`expires_at`
/// RFC 3339, or `null` when the command never expires).
pub fn command_json(command: &DeviceCommand) -> Value {
    json!(DeviceCommandOut {
        id: command.id.clone(),
        name: command.name.clone(),
        params: embedded_json(&command.params_json, Value::Null),
        expires_at: optional_time(command.expires_at_us),
    })
}

/// A command as a device receives it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceCommandOut {
    pub id: String,
    pub name: String,
    /// The command's parameters (a JSON object), or null.
    #[schema(value_type = Option<Object>)]
    pub params: Value,
    /// RFC 3339, or null when it never expires.
    #[schema(value_type = Option<String>)]
    pub expires_at: Value,
}

/// A config version as a device receives it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceConfigOut {
    /// 0 when no config was ever set.
    pub version: i64,
    #[schema(value_type = Object)]
    pub config: Value,
    /// RFC 3339, or null when no config was ever set.
    #[schema(value_type = Option<String>)]
    pub updated_at: Value,
}

/// What an acknowledgement left the command as.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CommandAcked {
    pub id: String,
    /// acked or failed (or what it already was).
    pub status: String,
}

/// A config version as a device receives it: `{"version","config","updated_at"}` (version 0,
/// `{}` and `null` when no config was ever set).
pub fn config_json(version: i64, config_json: &str, updated_at_us: i64) -> Value {
    json!(DeviceConfigOut {
        version,
        config: embedded_json(config_json, json!({})),
        updated_at: optional_time(updated_at_us),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_parsed_with_the_field_named() {
        let ack = MqttCommandAck::parse(br#"{"id":"cmd_1","status":"ok"}"#).unwrap();
        assert_eq!((ack.id.as_str(), ack.status), ("cmd_1", AckStatus::Ok));
        let long = format!(
            r#"{{"id":"cmd_1","status":"error","detail":"{}"}}"#,
            "x".repeat(MAX_ACK_DETAIL_BYTES + 1)
        );
        for (payload, field) in [
            (r#"{"id":"cmd_1","status":"done"}"#, "status"),
            (r#"{"id":"","status":"ok"}"#, "id"),
            (r#"{"status":"ok"}"#, "body"),
            (long.as_str(), "detail"),
        ] {
            let error = MqttCommandAck::parse(payload.as_bytes()).unwrap_err();
            assert!(error.message.starts_with(field), "{payload}: {error}");
        }
        assert!(MqttCommandAck::parse(b"{nope").is_err());
    }

    #[test]
    fn commands_and_configs_render_for_devices() {
        let command = DeviceCommand {
            id: "cmd_1".into(),
            kind: "command".into(),
            name: "reboot".into(),
            params_json: r#"{"delay_s":5}"#.into(),
            expires_at_us: 2_000_000,
            ..Default::default()
        };
        assert_eq!(
            command_json(&command),
            json!({"id":"cmd_1","name":"reboot","params":{"delay_s":5},"expires_at":"1970-01-01T00:00:02Z"})
        );
        assert_eq!(
            config_json(0, "", 0),
            json!({"version":0,"config":{},"updated_at":null})
        );
        assert_eq!(
            config_json(3, r#"{"interval_s":10}"#, 1_000_000)["config"]["interval_s"],
            10
        );
    }
}
