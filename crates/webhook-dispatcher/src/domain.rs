//! Webhook types that parse and validate at the edge.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use fieldline_common::openapi::{IdText, LabelText, NameText};
use fieldline_common::{
    ApiError,
    ids::DeviceId,
    names::{Label, Name},
    time::format_rfc3339,
};
use serde::{Deserialize, Serialize};

use crate::shape::{self, Options};

/// Events a webhook can subscribe to.
pub const EVENT_TYPES: [&str; 5] = [
    "device.data",
    "device.alert",
    "device.status",
    "config.update",
    DISABLED_EVENT,
];
/// An event type, in the OpenAPI document: one of [`EVENT_TYPES`].
pub struct EventType;

impl utoipa::PartialSchema for EventType {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(EVENT_TYPES))
            .into()
    }
}

impl utoipa::ToSchema for EventType {}

/// What a webhook created without `events` gets: the device events only. `webhook.disabled`
/// is asked for by name, so that no receiver written before it meets an event it does not
/// know.
pub const DEFAULT_EVENT_TYPES: [&str; 4] = [
    "device.data",
    "device.alert",
    "device.status",
    "config.update",
];
/// Sent to a project's other webhooks when the dispatcher disables one (failing too long,
/// or 410).
pub const DISABLED_EVENT: &str = "webhook.disabled";
/// The event `POST …/test` sends.
pub const TEST_EVENT: &str = "webhook.test";
const MAX_HEADERS: usize = 20;
const MAX_DEVICE_IDS: usize = 1000;
/// Headers a webhook cannot set: ours, or the transport's.
const RESERVED_HEADERS: [&str; 11] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-webhook-signature",
    "traceparent",
    "tracestate",
];

/// `POST /api/v1/webhooks` (and each element of the device-scoped array).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookIn {
    #[schema(value_type = Option<NameText>)]
    pub name: Option<String>,
    /// http(s), resolving to a public address (422 for a private one).
    #[schema(
        pattern = "^https?://",
        example = "https://example.com/hooks/fieldline"
    )]
    pub url: String,
    /// The events it receives; the four device events when left out (`webhook.disabled` only
    /// when named).
    #[schema(value_type = Option<Vec<EventType>>, min_items = 1)]
    pub events: Option<Vec<String>>,
    /// Only these devices' events.
    #[schema(value_type = Option<Vec<IdText>>)]
    pub device_ids: Option<Vec<String>>,
    /// Only this group's devices' events.
    #[schema(value_type = Option<LabelText>)]
    pub group: Option<String>,
    /// Extra headers sent with each delivery.
    pub headers: Option<BTreeMap<String, String>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The signing secret (16 to 256 characters, or `whsec_…`); generated when left out.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: Option<String>,
    pub enabled: Option<bool>,
    // The shape of deliveries (`shape::Options`), each absent the default.
    pub batch: Option<shape::Batch>,
    pub ordering: Option<shape::Ordering>,
    pub min_severity: Option<shape::Severity>,
    pub tags: Option<Vec<String>>,
    pub metrics: Option<Vec<String>>,
    pub format: Option<shape::Format>,
    pub cloudevents_mode: Option<shape::CloudEventsMode>,
    pub template: Option<String>,
    pub template_content_type: Option<String>,
}

/// A webhook ready to store (its URL is checked separately, it needs DNS).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub name: Option<String>,
    pub url: String,
    pub events: Vec<String>,
    pub device_ids: Vec<String>,
    pub group: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub metadata: serde_json::Value,
    pub secret: Option<String>,
    pub enabled: bool,
    pub options: Options,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_field", format!("{field}: {message}"))
}

pub fn parse_events(events: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let Some(events) = events else {
        return Ok(DEFAULT_EVENT_TYPES
            .iter()
            .map(|event| (*event).to_owned())
            .collect());
    };
    if events.is_empty() {
        return Err(invalid("events", "at least one event"));
    }
    let mut unique = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        if !EVENT_TYPES.contains(&event.as_str()) {
            return Err(invalid(
                &format!("events[{index}]"),
                format!("{event:?} is not one of {}", EVENT_TYPES.join(", ")),
            ));
        }
        if !unique.contains(&event) {
            unique.push(event);
        }
    }
    Ok(unique)
}

fn parse_headers(headers: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ApiError> {
    if headers.len() > MAX_HEADERS {
        return Err(invalid("headers", format!("at most {MAX_HEADERS}")));
    }
    for (name, value) in &headers {
        let field = format!("headers.{name}");
        if actix_web::http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(&field, "not a valid header name"));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
            || name.to_ascii_lowercase().starts_with("webhook-")
        {
            return Err(invalid(&field, "is set by Fieldline"));
        }
        if actix_web::http::header::HeaderValue::from_str(value).is_err() || value.len() > 4096 {
            return Err(invalid(&field, "not a valid header value"));
        }
    }
    Ok(headers)
}

pub fn parse_secret(secret: Option<String>) -> Result<Option<String>, ApiError> {
    match secret {
        Some(secret) if secret.len() < 16 || secret.len() > 256 => {
            Err(invalid("secret", "16 to 256 characters"))
        }
        Some(secret) if secret.chars().any(char::is_control) => {
            Err(invalid("secret", "no control characters"))
        }
        other => Ok(other),
    }
}

pub fn parse_group(group: Option<String>) -> Result<Option<String>, ApiError> {
    group
        .map(|group| Label::parse("group", &group).map(Label::into_string))
        .transpose()
}

impl WebhookIn {
    pub fn parse(self) -> Result<NewWebhook, ApiError> {
        let name = Name::parse_optional("name", self.name.as_deref())?;
        let device_ids = self.device_ids.unwrap_or_default();
        if device_ids.len() > MAX_DEVICE_IDS {
            return Err(invalid("device_ids", format!("at most {MAX_DEVICE_IDS}")));
        }
        for (index, id) in device_ids.iter().enumerate() {
            DeviceId::parse(id)
                .map_err(|error| invalid(&format!("device_ids[{index}]"), error.message))?;
        }
        let metadata = serde_json::Value::Object(self.metadata.unwrap_or_default());
        if metadata.to_string().len() > 16 * 1024 {
            return Err(invalid("metadata", "at most 16 KiB of JSON"));
        }
        Ok(NewWebhook {
            name: name.map(Name::into_string),
            url: self.url,
            events: parse_events(self.events)?,
            device_ids,
            group: parse_group(self.group)?,
            headers: parse_headers(self.headers.unwrap_or_default())?,
            metadata,
            secret: parse_secret(self.secret)?,
            enabled: self.enabled.unwrap_or(true),
            options: Options {
                batch: self.batch,
                ordering: self.ordering.unwrap_or_default(),
                min_severity: self.min_severity,
                tags: self.tags.unwrap_or_default(),
                metrics: self.metrics.unwrap_or_default(),
                format: self.format.unwrap_or_default(),
                cloudevents_mode: self.cloudevents_mode,
                template: self.template,
                template_content_type: self.template_content_type,
            }
            .validate()?,
        })
    }
}

/// A webhook as the API shows it (no secret, but on create).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WebhookOut {
    pub id: String,
    pub project: String,
    pub name: Option<String>,
    pub url: String,
    pub events: Vec<String>,
    pub device_ids: Vec<String>,
    pub group: Option<String>,
    #[schema(value_type = Object)]
    pub headers: serde_json::Value,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(flatten)]
    pub options: Options,
}

impl WebhookOut {
    /// The JSON merge patch base: the fields PATCH may change.
    pub fn as_patchable(&self) -> serde_json::Value {
        let mut patchable = serde_json::json!({
            "name": self.name, "url": self.url, "events": self.events,
            "device_ids": self.device_ids, "group": self.group, "headers": self.headers,
            "metadata": self.metadata, "enabled": self.enabled,
        });
        if let (Some(fields), serde_json::Value::Object(options)) =
            (patchable.as_object_mut(), self.options.to_json())
        {
            fields.extend(options);
        }
        patchable
    }
}

/// `POST /api/v1/webhooks` answers the webhook and its secret, once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: WebhookOut,
    pub secret: String,
}

/// The body every delivery POSTs.
#[derive(Debug, Serialize)]
pub struct EventBody<'a> {
    pub id: &'a str,
    pub event: &'a str,
    pub timestamp: String,
    pub project: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<&'a str>,
    pub payload: &'a serde_json::Value,
}

impl EventBody<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub fn rfc3339(time: DateTime<Utc>) -> String {
    format_rfc3339(&time)
}

/// What a delivery attempt came to.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptOut {
    pub attempted_at: String,
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub response: Option<String>,
    /// The batch it was part of (the `webhook-id` the receiver saw for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryOut {
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<String>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// With `ordering: "device"`: the earlier delivery of the same device this one waits
    /// behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    pub attempt_log: Vec<AttemptOut>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<NewWebhook, ApiError> {
        serde_json::from_value::<WebhookIn>(json).unwrap().parse()
    }

    #[test]
    fn defaults_and_errors_name_the_field() {
        let webhook = parse(serde_json::json!({"url": "https://example.com/hook"})).unwrap();
        assert_eq!(webhook.events.len(), 4);
        assert!(webhook.enabled);
        for (body, field) in [
            (
                serde_json::json!({"url": "x", "events": ["device.data", "nope"]}),
                "events[1]",
            ),
            (serde_json::json!({"url": "x", "events": []}), "events"),
            (
                serde_json::json!({"url": "x", "device_ids": ["ok", "n o"]}),
                "device_ids[1]",
            ),
            (
                serde_json::json!({"url": "x", "headers": {"webhook-id": "x"}}),
                "headers.webhook-id",
            ),
            (
                serde_json::json!({"url": "x", "headers": {"Bad Name": "x"}}),
                "headers.Bad Name",
            ),
            (serde_json::json!({"url": "x", "secret": "short"}), "secret"),
            (serde_json::json!({"url": "x", "group": "a b"}), "group"),
        ] {
            let error = parse(body.clone()).unwrap_err();
            assert!(
                error.message.starts_with(&format!("{field}:")),
                "{body}: {}",
                error.message
            );
        }
    }
}
