//! What a receiver asks of the shape of what it gets: batches, per-device order, filters that
//! match how alerts and readings are used, and the body's format (Fieldline's own,
//! CloudEvents 1.0, Slack, Discord, or a user template).
//!
//! A webhook's options are stored as one JSON document (`webhooks.options`), validated here
//! at registration; the claim reads the two it needs in SQL (`batch`, `ordering`).

use std::{fmt::Write as _, io};

use fieldline_common::{ApiError, names::Label};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Most events in one batch, and the longest a batch may wait to fill.
const MAX_BATCH_EVENTS: u32 = 1000;
const MAX_BATCH_WAIT_MS: u64 = 60_000;
const DEFAULT_BATCH_WAIT_MS: u64 = 1000;
const MAX_FILTER_VALUES: usize = 100;
const MAX_TEMPLATE_BYTES: usize = 16 * 1024;
/// What a template may produce, and the work it may do (minijinja's fuel: roughly one unit
/// per instruction), so that no template can make a delivery costly.
const MAX_RENDERED_BYTES: usize = 256 * 1024;
const TEMPLATE_FUEL: u64 = 50_000;
/// Discord refuses `content` over 2,000 characters; Slack shortens past 40,000.
const DISCORD_MAX_CHARS: usize = 2000;
const SLACK_MAX_CHARS: usize = 40_000;
/// Readings named in a chat message before "and N more".
const CHAT_READINGS: usize = 10;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// As fast as the webhook's concurrency allows, in no promised order.
    #[default]
    None,
    /// One device's events in the order they were stored, one in flight per device.
    Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Fieldline,
    Cloudevents,
    Slack,
    Discord,
    Template,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudEventsMode {
    /// The whole event in the body, `application/cloudevents+json`.
    #[default]
    Structured,
    /// The event's data in the body, its attributes in `ce-*` headers.
    Binary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub max_events: u32,
    #[serde(default = "default_batch_wait")]
    pub max_wait_ms: u64,
}

fn default_batch_wait() -> u64 {
    DEFAULT_BATCH_WAIT_MS
}

/// A webhook's shape options, as the API takes and shows them (each absent is the default).
/// Unknown fields are refused by `WebhookIn`, which names each; here they are let through, so
/// that options stored by a newer version still read, and so that the schema of a webhook
/// (which flattens these) allows the webhook's other members.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    #[serde(default)]
    pub ordering: Ordering,
    /// `device.alert` events below this severity are not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_severity: Option<Severity>,
    /// Events of devices carrying at least one of these tags (any event with a device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `device.data` events with a reading of at least one of these metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudevents_mode: Option<CloudEventsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The `Content-Type` a template's output is sent with (default `application/json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_content_type: Option<String>,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_field", format!("{field}: {message}"))
}

impl Options {
    /// Checks the options together; a template is compiled and tried on a sample event.
    pub fn validate(mut self) -> Result<Self, ApiError> {
        if let Some(batch) = &self.batch {
            if !(1..=MAX_BATCH_EVENTS).contains(&batch.max_events) {
                return Err(invalid(
                    "batch.max_events",
                    format!("1 to {MAX_BATCH_EVENTS}"),
                ));
            }
            if batch.max_wait_ms > MAX_BATCH_WAIT_MS {
                return Err(invalid(
                    "batch.max_wait_ms",
                    format!("0 to {MAX_BATCH_WAIT_MS}"),
                ));
            }
            if !matches!(self.format, Format::Fieldline | Format::Cloudevents)
                || self.cloudevents_mode == Some(CloudEventsMode::Binary)
            {
                return Err(invalid(
                    "batch",
                    "batches are JSON arrays: only with format fieldline or structured cloudevents",
                ));
            }
            if self.ordering == Ordering::Device {
                return Err(invalid(
                    "ordering",
                    "\"device\" sends one event per device at a time, which a batch cannot",
                ));
            }
        }
        for (field, values) in [("tags", &self.tags), ("metrics", &self.metrics)] {
            if values.len() > MAX_FILTER_VALUES {
                return Err(invalid(field, format!("at most {MAX_FILTER_VALUES}")));
            }
            for (index, value) in values.iter().enumerate() {
                Label::parse(&format!("{field}[{index}]"), value)?;
            }
        }
        if self.cloudevents_mode.is_some() && self.format != Format::Cloudevents {
            return Err(invalid("cloudevents_mode", "only with format cloudevents"));
        }
        match (&self.format, &self.template) {
            (Format::Template, None) => {
                return Err(invalid("template", "required with format template"));
            }
            (Format::Template, Some(source)) => {
                if source.len() > MAX_TEMPLATE_BYTES {
                    return Err(invalid(
                        "template",
                        format!("at most {MAX_TEMPLATE_BYTES} bytes"),
                    ));
                }
                check_template(source)?;
            }
            (_, Some(_)) => return Err(invalid("template", "only with format template")),
            (_, None) => {}
        }
        if let Some(content_type) = &self.template_content_type {
            if self.format != Format::Template {
                return Err(invalid(
                    "template_content_type",
                    "only with format template",
                ));
            }
            let media_type = content_type.split(';').next().unwrap_or_default().trim();
            let looks_like = media_type.split('/').count() == 2
                && media_type.split('/').all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                });
            if !looks_like
                || content_type.len() > 200
                || actix_web::http::header::HeaderValue::from_str(content_type).is_err()
            {
                return Err(invalid("template_content_type", "not a media type"));
            }
        }
        self.tags.dedup();
        self.metrics.dedup();
        Ok(self)
    }

    /// The options as stored (`webhooks.options`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({}))
    }

    /// The options stored; a document this release cannot read is the default (it was
    /// validated when stored, so that means a newer release wrote it).
    pub fn from_json(value: &Value) -> Self {
        serde_json::from_value(value.clone()).unwrap_or_default()
    }

    /// Whether fan-out may send a delivery at once: not when it must wait for a batch or
    /// behind its device's earlier events.
    pub fn sends_at_once(&self) -> bool {
        self.batch.is_none() && self.ordering == Ordering::None
    }

    /// Does an event pass the filters? `payload` is the event's payload, `tags` the device's
    /// (looked up only when the webhook filters on them).
    pub fn passes(&self, event_type: &str, payload: &Value, tags: Option<&[String]>) -> bool {
        if let (Some(minimum), "device.alert") = (self.min_severity, event_type) {
            let severity = payload["severity"]
                .as_str()
                .and_then(|s| serde_json::from_value::<Severity>(json!(s)).ok())
                .unwrap_or(Severity::Warning);
            if severity < minimum {
                return false;
            }
        }
        if !self.metrics.is_empty() && event_type == "device.data" {
            let any = payload["readings"].as_array().is_some_and(|readings| {
                readings.iter().any(|r| {
                    r["metric"]
                        .as_str()
                        .is_some_and(|m| self.metrics.iter().any(|x| x == m))
                })
            });
            if !any {
                return false;
            }
        }
        if !self.tags.is_empty() {
            let Some(tags) = tags else { return false };
            if !tags.iter().any(|tag| self.tags.contains(tag)) {
                return false;
            }
        }
        true
    }
}

/// A request body and what goes with it.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: String,
    pub content_type: String,
    /// `ce-*` headers of a binary CloudEvent.
    pub headers: Vec<(String, String)>,
}

/// One event in the webhook's format. `event` is Fieldline's body of it.
pub fn render(options: &Options, event: &str) -> Result<Rendered, String> {
    let json = || {
        serde_json::from_str::<Value>(event).map_err(|e| format!("stored event is not JSON: {e}"))
    };
    Ok(match options.format {
        Format::Fieldline => Rendered {
            body: event.to_owned(),
            content_type: "application/json".into(),
            headers: Vec::new(),
        },
        Format::Cloudevents => {
            let event = json()?;
            match options.cloudevents_mode.unwrap_or_default() {
                CloudEventsMode::Structured => Rendered {
                    body: cloudevent(&event).to_string(),
                    content_type: "application/cloudevents+json".into(),
                    headers: Vec::new(),
                },
                CloudEventsMode::Binary => {
                    let structured = cloudevent(&event);
                    let mut headers = Vec::new();
                    for name in ["specversion", "id", "source", "type", "time", "subject"] {
                        if let Some(value) = structured[name].as_str() {
                            headers.push((format!("ce-{name}"), value.to_owned()));
                        }
                    }
                    Rendered {
                        body: structured["data"].to_string(),
                        content_type: "application/json".into(),
                        headers,
                    }
                }
            }
        }
        Format::Slack => Rendered {
            body: json!({ "text": truncate(&chat_text(&json()?, "*"), SLACK_MAX_CHARS) })
                .to_string(),
            content_type: "application/json".into(),
            headers: Vec::new(),
        },
        Format::Discord => Rendered {
            body: json!({ "content": truncate(&chat_text(&json()?, "**"), DISCORD_MAX_CHARS) })
                .to_string(),
            content_type: "application/json".into(),
            headers: Vec::new(),
        },
        Format::Template => {
            let source = options.template.as_deref().unwrap_or_default();
            Rendered {
                body: render_template(source, &json()?).map_err(|e| format!("template: {e}"))?,
                content_type: options
                    .template_content_type
                    .clone()
                    .unwrap_or_else(|| "application/json".into()),
                headers: Vec::new(),
            }
        }
    })
}

/// Several events in one body: a JSON array of Fieldline events, or a CloudEvents batch.
pub fn render_batch(options: &Options, events: &[&str]) -> Result<Rendered, String> {
    match options.format {
        Format::Cloudevents => {
            let mut items = Vec::with_capacity(events.len());
            for event in events {
                let event: Value = serde_json::from_str(event).map_err(|e| e.to_string())?;
                items.push(cloudevent(&event));
            }
            Ok(Rendered {
                body: Value::Array(items).to_string(),
                content_type: "application/cloudevents-batch+json".into(),
                headers: Vec::new(),
            })
        }
        _ => {
            let mut body =
                String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
            body.push('[');
            for (index, event) in events.iter().enumerate() {
                if index > 0 {
                    body.push(',');
                }
                body.push_str(event);
            }
            body.push(']');
            Ok(Rendered {
                body,
                content_type: "application/json".into(),
                headers: Vec::new(),
            })
        }
    }
}

/// CloudEvents 1.0 attributes of a Fieldline event: `type` is reverse-DNS
/// (`io.fieldline.device.data`), `source` the project (and device), `subject` the device.
fn cloudevent(event: &Value) -> Value {
    let project = event["project"].as_str().unwrap_or_default();
    let source = match event["device_id"].as_str() {
        Some(device) => format!("/fieldline/projects/{project}/devices/{device}"),
        None => format!("/fieldline/projects/{project}"),
    };
    let mut attributes = json!({
        "specversion": "1.0",
        "id": event["id"],
        "source": source,
        "type": format!("io.fieldline.{}", event["event"].as_str().unwrap_or("event")),
        "time": event["timestamp"],
        "datacontenttype": "application/json",
        "data": event["payload"],
    });
    if let Some(device) = event["device_id"].as_str() {
        attributes["subject"] = json!(device);
    }
    attributes
}

/// The default text of a chat message for each event type. `bold` is the chat's own mark.
fn chat_text(event: &Value, bold: &str) -> String {
    let device = event["device_id"].as_str().unwrap_or("-");
    let project = event["project"].as_str().unwrap_or("-");
    let payload = &event["payload"];
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match event["event"].as_str().unwrap_or_default() {
        "device.alert" => {
            let severity = payload["severity"].as_str().unwrap_or("warning");
            let mark = match severity {
                "critical" => "🔴",
                "info" => "🔵",
                _ => "🟠",
            };
            format!(
                "{mark} {bold}[{}] {}{bold} {} on {device} ({project}): {} = {} ({} {})",
                severity.to_uppercase(),
                text(&payload["rule_name"]),
                text(&payload["state"]),
                text(&payload["metric"]),
                text(&payload["value"]),
                text(&payload["op"]),
                text(&payload["threshold"]),
            )
        }
        "device.status" => format!(
            "{bold}{device}{bold} ({project}) is {} (was {})",
            text(&payload["status"]),
            text(&payload["previous_status"])
        ),
        "config.update" => format!(
            "{bold}{device}{bold} ({project}): config version {}",
            text(&payload["version"])
        ),
        "device.data" => {
            let readings = payload["readings"].as_array().cloned().unwrap_or_default();
            let mut line = format!("{bold}{device}{bold} ({project}):");
            for reading in readings.iter().take(CHAT_READINGS) {
                let _ = write!(
                    line,
                    " {}={}",
                    text(&reading["metric"]),
                    text(&reading["value"])
                );
            }
            if readings.len() > CHAT_READINGS {
                let _ = write!(line, " and {} more", readings.len() - CHAT_READINGS);
            }
            line
        }
        "webhook.disabled" => format!(
            "Webhook {bold}{}{bold} ({project}) was disabled: {}",
            text(&payload["name"]),
            text(&payload["reason"])
        ),
        other => format!("Fieldline {other} ({project})"),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max_chars - 1).collect();
    cut.push('…');
    cut
}

/// The sandbox: no loader (no file or include reaches outside the template), no functions
/// beyond minijinja's built-in filters and tests, bounded work (fuel) and recursion, and an
/// output that stops at [`MAX_RENDERED_BYTES`].
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(20);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env
}

/// A writer that refuses to grow past a bound.
struct Bounded(Vec<u8>);

impl io::Write for Bounded {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.0.len() + bytes.len() > MAX_RENDERED_BYTES {
            return Err(io::Error::other(format!(
                "output over {} KiB",
                MAX_RENDERED_BYTES / 1024
            )));
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The template's context: the event's fields (`id`, `event`, `timestamp`, `project`,
/// `device_id`, `payload`) at the top level, and the whole event as `event_json`.
fn render_template(source: &str, event: &Value) -> Result<String, TemplateError> {
    let env = environment();
    let template = env
        .template_from_str(source)
        .map_err(|e| TemplateError::new(source, &e))?;
    let mut context = event.clone();
    if let Value::Object(map) = &mut context {
        map.insert("event_json".into(), json!(event.to_string()));
    }
    let mut out = Bounded(Vec::new());
    template
        .render_captured_to(&context, &mut out)
        .map_err(|e| TemplateError::new(source, &e))?;
    String::from_utf8(out.0).map_err(|_| TemplateError {
        message: "output is not UTF-8".into(),
        position: None,
    })
}

#[derive(Debug)]
struct TemplateError {
    message: String,
    /// Line and column, from 1.
    position: Option<(usize, usize)>,
}

impl TemplateError {
    fn new(source: &str, error: &minijinja::Error) -> Self {
        let column = |offset: usize| {
            let before = &source[..offset.min(source.len())];
            before.chars().rev().take_while(|c| *c != '\n').count() + 1
        };
        let position = match (error.line(), error.range()) {
            (Some(line), Some(range)) => Some((line, column(range.start))),
            (Some(line), None) => Some((line, 1)),
            _ => None,
        };
        let mut message = error
            .detail()
            .map(str::to_owned)
            .unwrap_or_else(|| error.kind().to_string());
        if let Some(source) = std::error::Error::source(error) {
            let _ = write!(message, " ({source})");
        }
        Self { message, position }
    }
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "line {line}, column {column}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A template compiles, and renders a sample event of each type within its bounds.
fn check_template(source: &str) -> Result<(), ApiError> {
    let refuse = |error: TemplateError| {
        ApiError::bad_request("invalid_template", format!("template: {error}"))
    };
    let env = environment();
    env.template_from_str(source)
        .map_err(|e| refuse(TemplateError::new(source, &e)))?;
    for sample in samples() {
        render_template(source, &sample).map_err(refuse)?;
    }
    Ok(())
}

/// One event of each kind, as fan-out makes them.
fn samples() -> Vec<Value> {
    let event = |event: &str, payload: Value| {
        json!({"id": "evt_sample", "event": event, "timestamp": "2026-01-01T00:00:00Z",
               "project": "default", "device_id": "sample-device", "payload": payload})
    };
    vec![
        event(
            "device.data",
            json!({"readings": [{"metric": "temperature", "ts": "2026-01-01T00:00:00Z", "value": 21.5}], "source": "http"}),
        ),
        event(
            "device.alert",
            json!({"rule_id": "rul_sample", "rule_name": "too hot", "state": "firing", "severity": "critical",
                   "metric": "temperature", "op": "gt", "value": 41.0, "threshold": 40.0,
                   "clear_threshold": null, "for_s": 0, "ts": "2026-01-01T00:00:00Z"}),
        ),
        event(
            "device.status",
            json!({"status": "offline", "previous_status": "online", "last_seen": "2026-01-01T00:00:00Z"}),
        ),
        event(
            "config.update",
            json!({"version": 2, "previous_version": 1, "config": {}, "changed_by": "key_sample"}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: Value) -> Result<Options, ApiError> {
        serde_json::from_value::<Options>(json).unwrap().validate()
    }

    fn alert(severity: &str) -> Value {
        json!({"severity": severity, "rule_name": "r"})
    }

    #[test]
    fn min_severity_orders_info_warning_critical() {
        let critical_only = options(json!({"min_severity": "critical"})).unwrap();
        assert!(critical_only.passes("device.alert", &alert("critical"), None));
        assert!(!critical_only.passes("device.alert", &alert("warning"), None));
        assert!(!critical_only.passes("device.alert", &alert("info"), None));
        // Other events are not alerts: the severity filter does not apply.
        assert!(critical_only.passes("device.status", &json!({}), None));
        let warning = options(json!({"min_severity": "warning"})).unwrap();
        assert!(warning.passes("device.alert", &alert("warning"), None));
        assert!(!warning.passes("device.alert", &alert("info"), None));
    }

    #[test]
    fn metric_and_tag_filters() {
        let filtered = options(json!({"metrics": ["temp"], "tags": ["roof"]})).unwrap();
        let data = |metric: &str| json!({"readings": [{"metric": metric, "value": 1}]});
        let roof = vec!["roof".to_owned()];
        assert!(filtered.passes("device.data", &data("temp"), Some(&roof)));
        assert!(!filtered.passes("device.data", &data("hum"), Some(&roof)));
        assert!(!filtered.passes("device.data", &data("temp"), Some(&["cellar".to_owned()])));
        assert!(!filtered.passes("device.data", &data("temp"), None));
    }

    #[test]
    fn bad_options_name_their_field() {
        for (body, field) in [
            (json!({"batch": {"max_events": 0}}), "batch.max_events"),
            (
                json!({"batch": {"max_events": 10, "max_wait_ms": 600000}}),
                "batch.max_wait_ms",
            ),
            (
                json!({"batch": {"max_events": 10}, "format": "slack"}),
                "batch",
            ),
            (
                json!({"batch": {"max_events": 10}, "ordering": "device"}),
                "ordering",
            ),
            (json!({"tags": ["a b"]}), "tags[0]"),
            (json!({"format": "template"}), "template"),
            (json!({"template": "x"}), "template"),
            (json!({"cloudevents_mode": "binary"}), "cloudevents_mode"),
        ] {
            let error = options(body.clone()).unwrap_err();
            assert!(
                error.message.starts_with(&format!("{field}:")),
                "{body}: {}",
                error.message
            );
        }
    }

    #[test]
    fn a_bad_template_is_refused_with_its_line_and_column() {
        let error = options(
            json!({"format": "template", "template": "{\"a\": 1,\n \"b\": {{ payload. }}\n}"}),
        )
        .unwrap_err();
        assert_eq!(error.reason, "invalid_template");
        assert!(
            error.message.starts_with("template: line 2, column"),
            "{}",
            error.message
        );
        let error =
            options(json!({"format": "template", "template": "{{ payload | nosuchfilter }}"}))
                .unwrap_err();
        assert!(error.message.contains("line 1"), "{}", error.message);
    }

    #[test]
    fn a_template_cannot_loop_or_grow_without_bound() {
        let forever =
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
        let error = options(json!({"format": "template", "template": forever})).unwrap_err();
        assert_eq!(error.reason, "invalid_template", "{}", error.message);
        let huge = "{% for a in range(9000) %}{{ event_json }}{% endfor %}";
        let error = options(json!({"format": "template", "template": huge})).unwrap_err();
        assert_eq!(error.reason, "invalid_template", "{}", error.message);
    }

    #[test]
    fn a_template_renders_the_event() {
        let options = options(json!({"format": "template",
            "template": "{\"device\": \"{{ device_id }}\", \"first\": {{ payload.readings[0].value }}}"}))
        .unwrap();
        let event = samples()[0].to_string();
        let rendered = render(&options, &event).unwrap();
        let body: Value = serde_json::from_str(&rendered.body).unwrap();
        assert_eq!(body, json!({"device": "sample-device", "first": 21.5}));
    }

    #[test]
    fn chat_bodies_have_the_fields_the_services_require() {
        let alert = samples()[1].to_string();
        let slack = render(&options(json!({"format": "slack"})).unwrap(), &alert).unwrap();
        let body: Value = serde_json::from_str(&slack.body).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(
            text.contains("CRITICAL") && text.contains("too hot") && text.contains("sample-device"),
            "{text}"
        );
        let discord = render(&options(json!({"format": "discord"})).unwrap(), &alert).unwrap();
        let body: Value = serde_json::from_str(&discord.body).unwrap();
        assert!(body["content"].as_str().unwrap().chars().count() <= DISCORD_MAX_CHARS);
    }
}
