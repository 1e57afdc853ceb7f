//! Devices, keys, webhooks and alerts: one API call (or a listing's pages) per command.

use clap::Subcommand;
use device_registry::domain::alerts::{Op, RuleIn, Severity};
use serde_json::{Value, json};

use super::{
    Connection,
    client::{Failure, Result, segment},
    output,
};

/// `--limit` and `--all` of a listing.
#[derive(Debug, Clone, clap::Args)]
pub struct Paging {
    /// Items per page (the API's default when absent).
    #[arg(long)]
    limit: Option<u32>,
    /// Follow every page, not just the first.
    #[arg(long)]
    all: bool,
}

impl Paging {
    fn query(&self, mut query: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        query
    }
}

/// Query parameters that are set.
fn present(pairs: &[(&'static str, &Option<String>)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|value| (*name, value.clone())))
        .collect()
}

const DEVICE_COLUMNS: &[&str] = &["id", "type", "group", "tags", "status", "last_seen"];

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices, filtered by status, group, type or tag.
    List {
        /// online, offline or unknown.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// sensor, actuator or gateway.
        #[arg(long = "type")]
        device_type: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// One device with its status and last_seen.
    Get { id: String },
    /// Register a device; the answer carries its token, shown this once.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// sensor (the default), actuator or gateway.
        #[arg(long = "type")]
        device_type: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// A tag; repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Expected seconds between heartbeats (three missed make it offline).
        #[arg(long)]
        heartbeat_interval_s: Option<i32>,
    },
    /// Delete a device; its token stops working at once.
    Delete { id: String },
    /// A new token for the device; the old one stops working at once.
    RotateToken { id: String },
}

impl DevicesCommand {
    pub async fn run(self, connection: &Connection) -> Result<()> {
        let client = connection.client()?;
        let out = connection.output;
        match self {
            DevicesCommand::List {
                status,
                group,
                device_type,
                tag,
                paging,
            } => {
                let query = paging.query(present(&[
                    ("status", &status),
                    ("group", &group),
                    ("type", &device_type),
                    ("tag", &tag),
                ]));
                let items = client.list("/api/v1/devices", &query, paging.all).await?;
                output::list(out, &items, DEVICE_COLUMNS)?;
            }
            DevicesCommand::Get { id } => {
                let device = client
                    .get(&format!("/api/v1/devices/{}", segment(&id)))
                    .await?;
                output::object(out, &device)?;
            }
            DevicesCommand::Create {
                id,
                name,
                device_type,
                group,
                tags,
                heartbeat_interval_s,
            } => {
                let mut body = json!({"id": id, "tags": tags});
                for (field, value) in [
                    ("name", name.map(Value::from)),
                    ("type", device_type.map(Value::from)),
                    ("group", group.map(Value::from)),
                    (
                        "heartbeat_interval_s",
                        heartbeat_interval_s.map(Value::from),
                    ),
                ] {
                    if let Some(value) = value {
                        body[field] = value;
                    }
                }
                let created = client.post("/api/v1/devices", &body).await?;
                output::object(out, &created)?;
            }
            DevicesCommand::Delete { id } => {
                client
                    .delete(&format!("/api/v1/devices/{}", segment(&id)))
                    .await?;
                deleted(out, "device", &id)?;
            }
            DevicesCommand::RotateToken { id } => {
                let rotated = client
                    .post(
                        &format!("/api/v1/devices/{}/token", segment(&id)),
                        &json!({}),
                    )
                    .await?;
                output::object(out, &rotated)?;
            }
        }
        Ok(())
    }
}

/// What a delete prints: `{"deleted": id}` for scripts, a line for people.
fn deleted(out: output::Output, kind: &str, id: &str) -> std::io::Result<()> {
    match out {
        output::Output::Json => output::json(&json!({"deleted": id})),
        output::Output::Table => {
            use std::io::Write as _;
            writeln!(std::io::stdout().lock(), "{kind} {id} deleted")
        }
    }
}

const KEY_COLUMNS: &[&str] = &[
    "id",
    "name",
    "prefix",
    "scopes",
    "expires_at",
    "revoked_at",
    "last_used_at",
];

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// The project's API keys (never their secrets).
    List,
    /// A new key; its secret is shown this once.
    Create {
        name: String,
        /// read, write or admin; repeat or separate with commas.
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// RFC 3339 time after which the key answers 401.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// A new secret for the key; the old one keeps working for the grace, then stops.
    Rotate {
        id: String,
        #[arg(long)]
        grace_seconds: Option<i64>,
    },
    /// Revoke a key, everywhere within a second.
    Revoke { id: String },
}

impl KeysCommand {
    pub async fn run(self, connection: &Connection) -> Result<()> {
        let client = connection.client()?;
        let out = connection.output;
        match self {
            KeysCommand::List => {
                let items = client.list("/api/v1/keys", &[], true).await?;
                output::list(out, &items, KEY_COLUMNS)?;
            }
            KeysCommand::Create {
                name,
                scopes,
                expires_at,
            } => {
                let mut body = json!({"name": name, "scopes": scopes});
                if let Some(expires_at) = expires_at {
                    body["expires_at"] = expires_at.into();
                }
                let created = client.post("/api/v1/keys", &body).await?;
                output::object(out, &created)?;
            }
            KeysCommand::Rotate { id, grace_seconds } => {
                let body = match grace_seconds {
                    Some(grace) => json!({"grace_seconds": grace}),
                    None => json!({}),
                };
                let rotated = client
                    .post(&format!("/api/v1/keys/{}/rotate", segment(&id)), &body)
                    .await?;
                output::object(out, &rotated)?;
            }
            KeysCommand::Revoke { id } => {
                client
                    .delete(&format!("/api/v1/keys/{}", segment(&id)))
                    .await?;
                deleted(out, "key", &id)?;
            }
        }
        Ok(())
    }
}

const WEBHOOK_COLUMNS: &[&str] = &["id", "url", "events", "enabled", "disabled_reason"];
const DELIVERY_COLUMNS: &[&str] = &[
    "id",
    "event",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "created_at",
    "next_attempt_at",
];

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// The project's webhooks.
    List {
        #[command(flatten)]
        paging: Paging,
    },
    /// One webhook.
    Get { id: String },
    /// Register a URL; the answer carries the signing secret (generated unless given).
    Create {
        /// Where events are POSTed (its own id: `--url` is the platform's).
        #[arg(id = "webhook_url", value_name = "WEBHOOK_URL")]
        url: String,
        /// An event type (device.data, device.alert, device.status, config.update, …);
        /// repeat or separate with commas. The API's default set when absent.
        #[arg(long = "event", value_delimiter = ',')]
        events: Vec<String>,
        /// Only these devices' events; repeat or separate with commas.
        #[arg(long = "device", value_delimiter = ',')]
        devices: Vec<String>,
        /// Only this group's devices.
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// A secret of your own instead of a generated `whsec_…`.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Delete a webhook.
    Delete { id: String },
    /// Send a webhook.test event now and show the attempt.
    Test { id: String },
    /// Enable a webhook disabled by failures; what queued meanwhile goes out.
    Enable { id: String },
    /// Requeue the deliveries that ran out of retries since a time (`-24h` or RFC 3339).
    Recover {
        id: String,
        #[arg(long, default_value = "-24h", allow_hyphen_values = true)]
        since: String,
        #[arg(long, allow_hyphen_values = true)]
        until: Option<String>,
    },
    /// The webhook's deliveries with their attempts, newest first.
    Deliveries {
        id: String,
        /// pending, succeeded or failed.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
}

impl WebhooksCommand {
    pub async fn run(self, connection: &Connection) -> Result<()> {
        let client = connection.client()?;
        let out = connection.output;
        match self {
            WebhooksCommand::List { paging } => {
                let items = client
                    .list("/api/v1/webhooks", &paging.query(Vec::new()), paging.all)
                    .await?;
                output::list(out, &items, WEBHOOK_COLUMNS)?;
            }
            WebhooksCommand::Get { id } => {
                let webhook = client
                    .get(&format!("/api/v1/webhooks/{}", segment(&id)))
                    .await?;
                output::object(out, &webhook)?;
            }
            WebhooksCommand::Create {
                url,
                events,
                devices,
                group,
                name,
                secret,
            } => {
                let mut body = json!({"url": url});
                if !events.is_empty() {
                    body["events"] = events.into();
                }
                if !devices.is_empty() {
                    body["device_ids"] = devices.into();
                }
                for (field, value) in [("group", group), ("name", name), ("secret", secret)] {
                    if let Some(value) = value {
                        body[field] = value.into();
                    }
                }
                let created = client.post("/api/v1/webhooks", &body).await?;
                output::object(out, &created)?;
            }
            WebhooksCommand::Delete { id } => {
                client
                    .delete(&format!("/api/v1/webhooks/{}", segment(&id)))
                    .await?;
                deleted(out, "webhook", &id)?;
            }
            WebhooksCommand::Test { id } => {
                let result = client
                    .post(
                        &format!("/api/v1/webhooks/{}/test", segment(&id)),
                        &json!({}),
                    )
                    .await?;
                output::object(out, &result)?;
            }
            WebhooksCommand::Enable { id } => {
                let result = client
                    .post(
                        &format!("/api/v1/webhooks/{}/enable", segment(&id)),
                        &json!({}),
                    )
                    .await?;
                output::object(out, &result)?;
            }
            WebhooksCommand::Recover { id, since, until } => {
                let mut body = json!({"since": since});
                if let Some(until) = until {
                    body["until"] = until.into();
                }
                let result = client
                    .post(&format!("/api/v1/webhooks/{}/recover", segment(&id)), &body)
                    .await?;
                output::object(out, &result)?;
            }
            WebhooksCommand::Deliveries { id, status, paging } => {
                let query = paging.query(present(&[("status", &status)]));
                let items = client
                    .list(
                        &format!("/api/v1/webhooks/{}/deliveries", segment(&id)),
                        &query,
                        paging.all,
                    )
                    .await?;
                output::list(out, &items, DELIVERY_COLUMNS)?;
            }
        }
        Ok(())
    }
}

const RULE_COLUMNS: &[&str] = &[
    "id",
    "name",
    "device_id",
    "group",
    "metric",
    "op",
    "threshold",
    "for_s",
    "severity",
    "enabled",
];
const ALERT_COLUMNS: &[&str] = &[
    "rule_id",
    "rule_name",
    "device_id",
    "severity",
    "metric",
    "value",
    "since",
];

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// The alert rules, filtered by device, group or metric.
    Rules {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        metric: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// A rule on one device (--device) or a group (--group).
    CreateRule {
        name: String,
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        metric: String,
        /// gt, gte, lt, lte, eq or ne.
        #[arg(long, value_parser = parse_op)]
        op: Op,
        #[arg(long, allow_negative_numbers = true)]
        threshold: f64,
        /// Resolve only once the value is back past this (hysteresis).
        #[arg(long, allow_negative_numbers = true)]
        clear_threshold: Option<f64>,
        /// Seconds the breach must last before it fires.
        #[arg(long)]
        for_s: Option<i32>,
        /// info, warning (the default) or critical.
        #[arg(long, value_parser = parse_severity)]
        severity: Option<Severity>,
    },
    /// Delete a rule.
    DeleteRule { id: String },
    /// The alerts firing now (`GET /api/v1/alerts`).
    List {
        #[command(flatten)]
        paging: Paging,
    },
}

fn parse_op(value: &str) -> std::result::Result<Op, String> {
    serde_json::from_value(Value::from(value))
        .map_err(|_| format!("{value:?} is not gt, gte, lt, lte, eq or ne"))
}

fn parse_severity(value: &str) -> std::result::Result<Severity, String> {
    serde_json::from_value(Value::from(value))
        .map_err(|_| format!("{value:?} is not info, warning or critical"))
}

impl AlertsCommand {
    pub async fn run(self, connection: &Connection) -> Result<()> {
        let client = connection.client()?;
        let out = connection.output;
        match self {
            AlertsCommand::Rules {
                device,
                group,
                metric,
                paging,
            } => {
                let query = paging.query(present(&[
                    ("device_id", &device),
                    ("group", &group),
                    ("metric", &metric),
                ]));
                let items = client
                    .list("/api/v1/alert-rules", &query, paging.all)
                    .await?;
                output::list(out, &items, RULE_COLUMNS)?;
            }
            AlertsCommand::CreateRule {
                name,
                device,
                group,
                metric,
                op,
                threshold,
                clear_threshold,
                for_s,
                severity,
            } => {
                let rule = RuleIn {
                    name,
                    device_id: device,
                    group,
                    metric,
                    op,
                    threshold,
                    clear_threshold,
                    for_s,
                    severity,
                    enabled: None,
                };
                let body = serde_json::to_value(&rule).map_err(Failure::from)?;
                let created = client.post("/api/v1/alert-rules", &body).await?;
                output::object(out, &created)?;
            }
            AlertsCommand::DeleteRule { id } => {
                client
                    .delete(&format!("/api/v1/alert-rules/{}", segment(&id)))
                    .await?;
                deleted(out, "rule", &id)?;
            }
            AlertsCommand::List { paging } => {
                let items = client
                    .list("/api/v1/alerts", &paging.query(Vec::new()), paging.all)
                    .await?;
                output::list(out, &items, ALERT_COLUMNS)?;
            }
        }
        Ok(())
    }
}
