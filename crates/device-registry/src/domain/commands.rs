//! Commands toward a device, and device configuration.

use fieldline_common::ApiError;
use fieldline_common::openapi::LabelText;
use serde::{Deserialize, Serialize};

use super::check_label;

/// Longest command TTL: a week.
pub const MAX_TTL_S: i64 = 7 * 24 * 3600;
/// Largest `params` or config document, as JSON text.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// `POST /api/v1/devices/{id}/commands`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandIn {
    #[schema(value_type = LabelText, example = "reboot")]
    pub name: String,
    /// A JSON object of at most 64 KiB.
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds until an undelivered command expires (1 to 604800).
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_s: Option<i64>,
}

#[derive(Debug)]
pub struct NewCommand {
    pub name: String,
    pub params: serde_json::Value,
    /// `None`: the configured default.
    pub ttl_s: Option<i64>,
}

impl CommandIn {
    pub fn parse(self) -> Result<NewCommand, ApiError> {
        check_label("name", &self.name)?;
        let params = serde_json::Value::Object(self.params.unwrap_or_default());
        check_document_size("params", &params)?;
        if let Some(ttl) = self.ttl_s
            && !(1..=MAX_TTL_S).contains(&ttl)
        {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("ttl_s: between 1 and {MAX_TTL_S}"),
            ));
        }
        Ok(NewCommand {
            name: self.name,
            params,
            ttl_s: self.ttl_s,
        })
    }
}

pub fn check_document_size(field: &str, value: &serde_json::Value) -> Result<(), ApiError> {
    if value.to_string().len() > MAX_DOCUMENT_BYTES {
        return Err(ApiError::payload_too_large(format!(
            "{field}: at most {} KiB of JSON",
            MAX_DOCUMENT_BYTES / 1024
        )));
    }
    Ok(())
}

/// A command as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CommandOut {
    pub id: String,
    pub device_id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// pending, delivered, acked, failed or expired.
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub delivered_at: Option<String>,
    pub acked_at: Option<String>,
    pub detail: Option<String>,
}

/// Command statuses a listing may filter on.
pub fn parse_command_status(value: &str) -> Result<&'static str, ApiError> {
    ["pending", "delivered", "acked", "failed", "expired"]
        .into_iter()
        .find(|status| *status == value)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "status: {value:?} is not one of pending, delivered, acked, failed, expired"
                ),
            )
        })
}

/// A device's configuration, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConfigOut {
    pub device_id: String,
    pub version: i64,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub updated_at: Option<String>,
}

/// One version of a device's configuration, with who changed it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConfigVersionOut {
    pub version: i64,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// The key (its id) or the platform admin that set it.
    pub changed_by: String,
    pub created_at: String,
}

/// A new configuration document: a JSON object of bounded size.
pub fn parse_config(value: serde_json::Value) -> Result<serde_json::Value, ApiError> {
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "config: must be a JSON object",
        ));
    }
    check_document_size("config", &value)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_configs_are_checked() {
        let command = |json| serde_json::from_value::<CommandIn>(json).unwrap().parse();
        assert!(command(serde_json::json!({"name": "reboot"})).is_ok());
        assert!(
            command(serde_json::json!({"name": "re boot"}))
                .unwrap_err()
                .message
                .starts_with("name:")
        );
        assert!(
            command(serde_json::json!({"name": "x", "ttl_s": 0}))
                .unwrap_err()
                .message
                .starts_with("ttl_s:")
        );
        assert!(parse_config(serde_json::json!([1])).is_err());
        let big = serde_json::json!({"blob": "x".repeat(MAX_DOCUMENT_BYTES)});
        assert_eq!(parse_config(big).unwrap_err().reason, "payload_too_large");
    }
}
