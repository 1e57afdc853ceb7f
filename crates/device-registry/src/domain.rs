//! Registry types that parse and validate at the edge: past here, they are valid.

pub mod alerts;
pub mod commands;
pub mod limits;
pub mod tokens;

use chrono::{DateTime, Utc};
use fieldline_common::openapi::{IdText, LabelText, NameText};
use fieldline_common::{
    ApiError,
    auth::ScopeLevel,
    ids::{DeviceId, random_id},
    names::{Label, Name},
    time::format_rfc3339,
};
use serde::{Deserialize, Serialize};

/// Prefix and length of generated secrets: 40 alphanumerics are ~238 bits.
pub const API_KEY_PREFIX: &str = "flk_";
pub const DEVICE_TOKEN_PREFIX: &str = fieldline_common::auth::DEVICE_TOKEN_PREFIX;
const SECRET_LEN: usize = 40;
/// How much of a secret a listing shows.
const SECRET_SHOWN: usize = 8;

pub fn new_api_key_secret() -> String {
    random_id(API_KEY_PREFIX, SECRET_LEN)
}

pub fn new_device_token() -> String {
    random_id(DEVICE_TOKEN_PREFIX, SECRET_LEN)
}

pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(SECRET_SHOWN).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Sensor,
    Actuator,
    Gateway,
}

impl DeviceType {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Sensor => "sensor",
            DeviceType::Actuator => "actuator",
            DeviceType::Gateway => "gateway",
        }
    }

    pub fn parse(value: &str) -> Result<Self, ApiError> {
        match value {
            "sensor" => Ok(DeviceType::Sensor),
            "actuator" => Ok(DeviceType::Actuator),
            "gateway" => Ok(DeviceType::Gateway),
            other => Err(ApiError::bad_request(
                "invalid_device_type",
                format!("type: {other:?} is not one of sensor, actuator, gateway"),
            )),
        }
    }
}

/// `POST /api/v1/devices`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceIn {
    /// Unique in the project: 1 to 64 of `A-Z a-z 0-9 _ -`.
    #[schema(value_type = IdText)]
    pub id: String,
    #[schema(value_type = Option<NameText>)]
    pub name: Option<String>,
    /// `sensor` when left out.
    #[serde(rename = "type")]
    pub device_type: Option<DeviceType>,
    #[schema(value_type = Option<LabelText>)]
    pub group: Option<String>,
    /// At most 32, each like a group.
    #[serde(default)]
    #[schema(value_type = Vec<LabelText>, max_items = 32)]
    pub tags: Vec<String>,
    /// Free JSON, at most 16 KiB.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds without news after which the device is offline (1 to 86400).
    #[schema(minimum = 1, maximum = 86400)]
    pub heartbeat_interval_s: Option<i32>,
    /// The first configuration (version 1, a JSON object); later ones go through `/config`.
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
}

/// A device ready to insert.
#[derive(Debug)]
pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub device_type: DeviceType,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub heartbeat_interval_s: Option<i32>,
    pub config: Option<serde_json::Value>,
}

pub(crate) fn check_label(field: &str, value: &str) -> Result<(), ApiError> {
    Label::parse(field, value).map(drop)
}

impl DeviceIn {
    pub fn parse(self) -> Result<NewDevice, ApiError> {
        let id = DeviceId::parse(&self.id).map_err(|error| {
            ApiError::bad_request("invalid_field", format!("id: {}", error.message))
        })?;
        let name = Name::parse_optional("name", self.name.as_deref())?;
        if let Some(group) = &self.group {
            check_label("group", group)?;
        }
        if self.tags.len() > 32 {
            return Err(ApiError::bad_request(
                "invalid_field",
                "tags: at most 32 tags",
            ));
        }
        for (index, tag) in self.tags.iter().enumerate() {
            check_label(&format!("tags[{index}]"), tag)?;
        }
        let metadata = serde_json::Value::Object(self.metadata.unwrap_or_default());
        if metadata.to_string().len() > 16 * 1024 {
            return Err(ApiError::bad_request(
                "invalid_field",
                "metadata: at most 16 KiB of JSON",
            ));
        }
        if let Some(interval) = self.heartbeat_interval_s
            && !(1..=86_400).contains(&interval)
        {
            return Err(ApiError::bad_request(
                "invalid_field",
                "heartbeat_interval_s: between 1 and 86400",
            ));
        }
        let config = self.config.map(commands::parse_config).transpose()?;
        Ok(NewDevice {
            config,
            id,
            name: name.map(Name::into_string),
            device_type: self.device_type.unwrap_or(DeviceType::Sensor),
            group: self.group,
            tags: self.tags,
            metadata,
            heartbeat_interval_s: self.heartbeat_interval_s,
        })
    }
}

/// A device as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceOut {
    pub id: String,
    pub project: String,
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub device_type: String,
    pub group: Option<String>,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub heartbeat_interval_s: Option<i32>,
    /// `online`, `offline`, or `unknown` until the device is first heard from.
    pub status: String,
    pub last_seen: Option<String>,
    pub config_version: i64,
    pub created_at: String,
    pub updated_at: String,
}

impl DeviceOut {
    /// The writable fields, as a PUT body gives them: what a merge patch applies to.
    pub fn to_input_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "type": self.device_type,
            "group": self.group,
            "tags": self.tags,
            "metadata": self.metadata,
            "heartbeat_interval_s": self.heartbeat_interval_s,
        })
    }
}

/// `POST /api/v1/devices` answers the device and, once, its token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceCreated {
    #[serde(flatten)]
    pub device: DeviceOut,
    pub token: String,
    /// The device's MQTT username (its password is `token`).
    pub mqtt_username: String,
}

/// `POST /api/v1/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyIn {
    #[schema(value_type = NameText)]
    pub name: String,
    /// Cumulative: `write` can also read; the highest given counts.
    #[schema(min_items = 1)]
    pub scopes: Vec<ScopeLevel>,
    /// In the future; never when left out.
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub struct NewKey {
    pub name: String,
    pub scope: ScopeLevel,
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeyIn {
    pub fn parse(self, now: DateTime<Utc>) -> Result<NewKey, ApiError> {
        let name = Name::parse("name", &self.name)?;
        let scope = self.scopes.iter().copied().max().ok_or_else(|| {
            ApiError::bad_request(
                "invalid_field",
                "scopes: at least one of read, write, admin",
            )
        })?;
        if let Some(expires_at) = self.expires_at
            && expires_at <= now
        {
            return Err(ApiError::unprocessable(
                "invalid_expiry",
                "expires_at: must be in the future",
            ));
        }
        Ok(NewKey {
            name: name.into_string(),
            scope,
            expires_at: self.expires_at,
        })
    }
}

/// Scopes are cumulative: a `write` key can also read.
pub fn scopes_of(scope: ScopeLevel) -> Vec<&'static str> {
    [ScopeLevel::Read, ScopeLevel::Write, ScopeLevel::Admin]
        .into_iter()
        .filter(|held| *held <= scope)
        .map(ScopeLevel::as_str)
        .collect()
}

/// A key as listings show it: never its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyOut {
    pub id: String,
    pub name: String,
    pub prefix: String,
    #[schema(value_type = Vec<ScopeLevel>)]
    pub scopes: Vec<&'static str>,
    pub platform_admin: bool,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

/// `POST /api/v1/keys` answers the key and, once, its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyCreated {
    #[serde(flatten)]
    pub key: KeyOut,
    pub secret: String,
}

pub fn rfc3339_opt(time: Option<DateTime<Utc>>) -> Option<String> {
    time.as_ref().map(format_rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(json: serde_json::Value) -> Result<NewDevice, ApiError> {
        serde_json::from_value::<DeviceIn>(json).unwrap().parse()
    }

    #[test]
    fn device_fields_are_checked_and_named() {
        assert!(device(serde_json::json!({"id": "esp32-1"})).is_ok());
        let error = device(serde_json::json!({"id": "a.b"})).unwrap_err();
        assert!(error.message.starts_with("id:"), "{}", error.message);
        let error = device(serde_json::json!({"id": "a", "tags": ["ok", "not ok"]})).unwrap_err();
        assert!(error.message.starts_with("tags[1]:"), "{}", error.message);
        let error = device(serde_json::json!({"id": "a", "heartbeat_interval_s": 0})).unwrap_err();
        assert!(
            error.message.starts_with("heartbeat_interval_s:"),
            "{}",
            error.message
        );
    }

    #[test]
    fn scopes_are_cumulative() {
        assert_eq!(scopes_of(ScopeLevel::Write), vec!["read", "write"]);
        let key = KeyIn {
            name: "k".into(),
            scopes: vec![ScopeLevel::Read, ScopeLevel::Admin],
            expires_at: None,
        };
        assert_eq!(key.parse(Utc::now()).unwrap().scope, ScopeLevel::Admin);
        let key = KeyIn {
            name: "k".into(),
            scopes: vec![],
            expires_at: None,
        };
        assert!(key.parse(Utc::now()).is_err());
    }
}

/// `POST /api/v1/projects`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectIn {
    #[schema(value_type = IdText)]
    pub slug: String,
    /// The slug when left out.
    #[schema(value_type = Option<NameText>)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectOut {
    pub slug: String,
    pub name: String,
    pub created_at: String,
}

/// A new project answers its first admin key, shown once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectCreated {
    #[serde(flatten)]
    pub project: ProjectOut,
    pub admin_key: KeyCreated,
}
