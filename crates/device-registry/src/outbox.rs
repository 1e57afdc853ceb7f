//! Bus messages born of registry changes. Each is written to `registry.outbox` in the same
//! transaction as the change it announces, then a relay publishes it to JetStream and deletes
//! it: a committed change always reaches the bus, and a relay that dies between the ack and
//! the delete is harmless because the row's `Nats-Msg-Id` dedupes the second publish.

use std::{sync::Arc, time::Duration};

use async_nats::HeaderMap;
use fieldline_common::{Context, ids::random_id, time::format_rfc3339};
use fieldline_proto::{
    Subjects,
    v1::{DeviceCommand, DeviceEvent},
};
use futures::future::join_all;
use prost::Message;
use tokio::sync::Notify;

use crate::repo::Repo;

/// A row of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub subject: String,
    pub msg_id: String,
    pub payload: Vec<u8>,
}

/// The kinds of device event the registry emits, with their subject token.
#[derive(Debug, Clone, Copy)]
pub enum EventKind {
    Status,
    Alert,
    Config,
}

impl EventKind {
    fn event_type(self) -> &'static str {
        match self {
            EventKind::Status => "device.status",
            EventKind::Alert => "device.alert",
            EventKind::Config => "config.update",
        }
    }

    fn subject_token(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Alert => "alert",
            EventKind::Config => "config",
        }
    }
}

/// Builds outbox messages; the only place the registry spells what it publishes.
#[derive(Clone)]
pub struct Messages {
    subjects: Subjects,
}

impl Messages {
    pub fn new(subjects: Subjects) -> Self {
        Self { subjects }
    }

    /// A `device.status`, `device.alert` or `config.update` on the events stream.
    pub fn event(
        &self,
        kind: EventKind,
        project: &str,
        device_id: &str,
        occurred_at_us: i64,
        payload: &serde_json::Value,
    ) -> OutboxMessage {
        let id = random_id("evt_", 24);
        let event = DeviceEvent {
            id: id.clone(),
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            event_type: kind.event_type().to_owned(),
            occurred_at_us,
            payload_json: payload.to_string(),
        };
        OutboxMessage {
            subject: self
                .subjects
                .event(project, kind.subject_token(), device_id),
            msg_id: id,
            payload: event.encode_to_vec(),
        }
    }

    /// A new configuration version, toward the device (ingest-mqtt retains it on the broker).
    pub fn config_push(
        &self,
        project: &str,
        device_id: &str,
        version: i64,
        config: &serde_json::Value,
    ) -> OutboxMessage {
        let id = random_id("cfg_", 24);
        let push = DeviceCommand {
            id: id.clone(),
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            kind: "config".to_owned(),
            name: String::new(),
            params_json: config.to_string(),
            expires_at_us: 0,
            version,
        };
        OutboxMessage {
            subject: self.subjects.commands(project, device_id),
            msg_id: id,
            payload: push.encode_to_vec(),
        }
    }

    /// The device is gone: its retained config must go too.
    pub fn config_clear(&self, project: &str, device_id: &str) -> OutboxMessage {
        let id = random_id("cfg_", 24);
        let push = DeviceCommand {
            id: id.clone(),
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            kind: "config_clear".to_owned(),
            ..Default::default()
        };
        OutboxMessage {
            subject: self.subjects.commands(project, device_id),
            msg_id: id,
            payload: push.encode_to_vec(),
        }
    }

    /// A command toward the device.
    pub fn command_push(&self, command: &DeviceCommand) -> OutboxMessage {
        OutboxMessage {
            subject: self.subjects.commands(&command.project, &command.device_id),
            msg_id: command.id.clone(),
            payload: command.encode_to_vec(),
        }
    }
}

/// The payload of a `device.status` event.
pub fn status_payload(
    status: &str,
    previous: &str,
    last_seen: Option<&chrono::DateTime<chrono::Utc>>,
) -> serde_json::Value {
    serde_json::json!({
        "status": status,
        "previous_status": previous,
        "last_seen": last_seen.map(format_rfc3339),
    })
}

/// Rows published per round; a round is one transaction.
const ROUND: i64 = 256;

/// Starts the relay. `wake` is notified after every commit that wrote to the outbox; the relay
/// also looks every `poll` in case a change came from another instance or a notify was missed.
pub fn start_relay(context: &Context, repo: Repo, wake: Arc<Notify>) {
    let jetstream = context.jetstream.clone();
    let shutdown = context.shutdown.clone();
    let poll = Duration::from_millis(500);
    context.tasks.spawn(async move {
        loop {
            let published = repo
                .drain_outbox(ROUND, |rows| publish_all(&jetstream, rows))
                .await;
            match published {
                // A full round: there may be more.
                Ok(count) if count as i64 == ROUND => continue,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "outbox relay round failed; will retry");
                    metrics::counter!("fieldline_registry_outbox_failures_total").increment(1);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    });
}

async fn publish_all(
    jetstream: &async_nats::jetstream::Context,
    rows: Vec<OutboxMessage>,
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", row.msg_id.as_str());
        acks.push(
            jetstream
                .publish_with_headers(row.subject, headers, row.payload.into())
                .await?
                .into_future(),
        );
    }
    let count = acks.len();
    for ack in join_all(acks).await {
        ack?;
    }
    metrics::counter!("fieldline_registry_outbox_published_total").increment(count as u64);
    Ok(())
}
