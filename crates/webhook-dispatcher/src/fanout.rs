//! Fan-out: durable consumers on the telemetry stream (device.data) and the events stream
//! (device.alert, device.status, config.update) turn each bus message into an event and one
//! delivery per matching webhook, committed before the message is acked.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use fieldline_common::{
    ApiError, Context,
    cache::InvalidatingCache,
    ids::random_id,
    time::{format_rfc3339, from_us},
};
use fieldline_proto::{
    InvalidateKind, Stream,
    v1::{DeviceEvent, TelemetryBatch, reading},
};
use futures::StreamExt;
use prost::Message;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    dispatcher::Dispatcher,
    domain::EventBody,
    repo::{NewDelivery, NewEvent, Repo, Target},
};

/// Consumer names: one per stream, shared by every dispatcher instance.
pub use fieldline_proto::consumers::{
    WEBHOOK_DATA as DATA_CONSUMER, WEBHOOK_EVENTS as EVENTS_CONSUMER,
};
const BATCH: usize = 500;

/// Each project's webhooks, cached; cleared when `{prefix}.invalidate.webhooks` is broadcast.
#[derive(Clone)]
pub struct Targets {
    repo: Repo,
    cache: InvalidatingCache<String, Arc<Vec<Target>>>,
}

impl Targets {
    pub fn new(repo: Repo, ttl: Duration) -> Self {
        Self {
            repo,
            cache: InvalidatingCache::new(10_000, ttl),
        }
    }

    pub fn invalidate(&self) {
        self.cache.invalidate_all();
    }

    pub async fn of(&self, project: &str) -> Result<Arc<Vec<Target>>, ApiError> {
        let load = || async { self.repo.targets(project).await.map(Arc::new) };
        self.cache.get_or_load(project.to_owned(), load).await
    }

    /// Subscribes to invalidations before returning.
    pub async fn listen(&self, context: &Context) -> anyhow::Result<()> {
        let mut subscription = context
            .nats
            .subscribe(context.subjects.invalidate(InvalidateKind::Webhooks))
            .await?;
        context.nats.flush().await?;
        let targets = self.clone();
        let shutdown = context.shutdown.clone();
        context.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    message = subscription.next() => match message {
                        Some(_) => targets.invalidate(),
                        None => break,
                    },
                }
            }
        });
        Ok(())
    }
}

/// An event in the making: what fan-out matches against webhooks. Its id and JSON payload
/// are made only once some webhook wants it: most telemetry goes to no webhook at all.
struct Incoming {
    project: String,
    event_type: String,
    device_id: String,
    occurred_at_us: i64,
    body: Body,
}

enum Body {
    Telemetry(TelemetryBatch),
    /// A registry event: its id (if it has one) and its JSON payload.
    Device {
        id: String,
        payload_json: String,
    },
}

impl Incoming {
    /// The event id and payload.
    fn finish(self, message: &jetstream::Message) -> Option<(String, Incoming, Value)> {
        let (id, payload) = match &self.body {
            Body::Telemetry(batch) => {
                let readings: Vec<Value> = batch
                    .readings
                    .iter()
                    .map(|r| json!({"metric": r.metric, "ts": format_rfc3339(&from_us(r.ts_us)), "value": reading_json(&r.value)}))
                    .collect();
                (
                    event_id(message.info().ok()?.stream_sequence, &message.payload),
                    json!({"readings": readings, "source": batch.source}),
                )
            }
            Body::Device { id, payload_json } => {
                let id = if id.is_empty() {
                    event_id(message.info().ok()?.stream_sequence, &message.payload)
                } else {
                    id.clone()
                };
                let payload = serde_json::from_str(payload_json)
                    .unwrap_or_else(|_| Value::String(payload_json.clone()));
                (id, payload)
            }
        };
        Some((id, self, payload))
    }
}

/// Stable id of a bus message: the same message redelivered gives the same event id, so its
/// deliveries are not created twice.
fn event_id(stream_sequence: u64, payload: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(stream_sequence.to_be_bytes());
    hasher.update(payload);
    format!("evt_{}", &hex::encode(hasher.finalize())[..24])
}

fn reading_json(value: &Option<reading::Value>) -> Value {
    match value {
        Some(reading::Value::Number(number)) => json!(number),
        Some(reading::Value::Boolean(flag)) => json!(flag),
        Some(reading::Value::Text(text)) => json!(text),
        None => Value::Null,
    }
}

fn telemetry_event(message: &jetstream::Message) -> Option<Incoming> {
    let mut batch = TelemetryBatch::decode(message.payload.as_ref()).ok()?;
    Some(Incoming {
        project: std::mem::take(&mut batch.project),
        device_id: std::mem::take(&mut batch.device_id),
        event_type: "device.data".into(),
        occurred_at_us: batch.received_at_us,
        body: Body::Telemetry(batch),
    })
}

fn device_event(message: &jetstream::Message) -> Option<Incoming> {
    let event = DeviceEvent::decode(message.payload.as_ref()).ok()?;
    Some(Incoming {
        project: event.project,
        event_type: event.event_type,
        device_id: event.device_id,
        occurred_at_us: event.occurred_at_us,
        body: Body::Device {
            id: event.id,
            payload_json: event.payload_json,
        },
    })
}

pub async fn start(
    context: &Context,
    repo: Repo,
    targets: Targets,
    dispatcher: Arc<Dispatcher>,
) -> anyhow::Result<()> {
    let sources = [
        (
            Stream::Telemetry,
            DATA_CONSUMER,
            context.subjects.telemetry_all(),
            telemetry_event as fn(&jetstream::Message) -> Option<Incoming>,
        ),
        (
            Stream::Events,
            EVENTS_CONSUMER,
            context.subjects.events_all(),
            device_event,
        ),
    ];
    for (stream, name, filter, decode) in sources {
        let consumer = context
            .jetstream
            .get_stream(context.subjects.stream_name(stream))
            .await?
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    description: Some("webhook-dispatcher fan-out".to_owned()),
                    filter_subject: filter,
                    ack_policy: AckPolicy::Explicit,
                    // Webhooks see what happens from the moment the dispatcher first runs.
                    deliver_policy: DeliverPolicy::New,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        let fanout = Fanout {
            context: context.clone(),
            repo: repo.clone(),
            targets: targets.clone(),
            dispatcher: dispatcher.clone(),
            decode,
        };
        let shutdown = context.shutdown.clone();
        context.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    result = fanout.run(&consumer) => {
                        if let Err(error) = result {
                            tracing::warn!(error = %error, consumer = name, "fan-out consumer failed; restarting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

struct Fanout {
    context: Context,
    repo: Repo,
    targets: Targets,
    dispatcher: Arc<Dispatcher>,
    decode: fn(&jetstream::Message) -> Option<Incoming>,
}

impl Fanout {
    async fn run(
        &self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
    ) -> anyhow::Result<()> {
        let mut messages = fieldline_common::bus::pull_messages(consumer, BATCH).await?;
        while let Some(batch) = fieldline_common::bus::next_batch(&mut messages, BATCH).await {
            let batch = batch?;
            self.handle(batch).await;
        }
        Ok(())
    }

    async fn handle(&self, messages: Vec<jetstream::Message>) {
        match self.plan(&messages).await {
            Ok((events, mut deliveries)) => {
                // Deliveries whose webhook has a free slot here are stored with a lease and
                // sent as soon as they are committed: their first attempt needs no claim.
                let mut slots = HashMap::new();
                for delivery in deliveries.iter_mut().filter(|d| d.webhook_enabled) {
                    if let Some(slot) = self.dispatcher.try_slot(&delivery.webhook_id) {
                        delivery.leased = true;
                        slots.insert(delivery.id.clone(), slot);
                    }
                }
                let lease = self.dispatcher.lease();
                match self.repo.enqueue(&events, &deliveries, lease).await {
                    Ok(leased) => {
                        let unleased = deliveries.len() - leased.len();
                        for delivery in leased {
                            if let Some(slot) = slots.remove(&delivery.delivery_id) {
                                self.dispatcher.start(delivery, slot);
                            }
                        }
                        // Slots not used (a redelivered message, a webhook just disabled)
                        // are given back here.
                        drop(slots);
                        for message in &messages {
                            if let Err(error) = message.ack().await {
                                tracing::warn!(error = %error, "ack after enqueue failed; the redelivery is a no-op");
                            }
                        }
                        if !deliveries.is_empty() {
                            metrics::counter!("fieldline_webhook_enqueued_total")
                                .increment(deliveries.len() as u64);
                        }
                        if unleased > 0 {
                            self.dispatcher.wake();
                        }
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "enqueuing deliveries failed; will redeliver")
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "matching webhooks failed; will redeliver")
            }
        }
        for message in &messages {
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// The events and deliveries a set of bus messages make.
    async fn plan(
        &self,
        messages: &[jetstream::Message],
    ) -> Result<(Vec<NewEvent>, Vec<NewDelivery>), ApiError> {
        let mut events = Vec::new();
        let mut deliveries = Vec::new();
        for message in messages {
            let Some(incoming) = (self.decode)(message) else {
                tracing::error!(subject = %message.subject, "undecodable bus message skipped by fan-out");
                continue;
            };
            let targets = self.targets.of(&incoming.project).await?;
            let mut matched = Vec::new();
            for target in targets.iter() {
                if self.matches(target, &incoming).await? {
                    matched.push(target);
                }
            }
            if matched.is_empty() {
                continue;
            }
            let Some((id, incoming, payload)) = incoming.finish(message) else {
                tracing::error!(subject = %message.subject, "bus message without stream info skipped by fan-out");
                continue;
            };
            let body = EventBody {
                id: &id,
                event: &incoming.event_type,
                timestamp: format_rfc3339(&from_us(incoming.occurred_at_us)),
                project: &incoming.project,
                device_id: Some(&incoming.device_id)
                    .filter(|id| !id.is_empty())
                    .map(String::as_str),
                payload: &payload,
            }
            .to_json();
            for target in matched {
                deliveries.push(NewDelivery {
                    id: random_id("dlv_", 24),
                    webhook_id: target.id.clone(),
                    project: incoming.project.clone(),
                    event_id: id.clone(),
                    event_type: incoming.event_type.clone(),
                    webhook_enabled: target.enabled,
                    leased: false,
                });
            }
            events.push(NewEvent {
                id,
                project: incoming.project,
                event_type: incoming.event_type,
                device_id: Some(incoming.device_id).filter(|id| !id.is_empty()),
                body,
            });
        }
        Ok((events, deliveries))
    }

    async fn matches(&self, target: &Target, incoming: &Incoming) -> Result<bool, ApiError> {
        if !target.events.contains(&incoming.event_type) {
            return Ok(false);
        }
        if !target.device_ids.is_empty() && !target.device_ids.contains(&incoming.device_id) {
            return Ok(false);
        }
        if let Some(group) = &target.group {
            let device = self
                .context
                .auth
                .lookup_device(&incoming.project, &incoming.device_id)
                .await
                .map_err(ApiError::from)?;
            if device.is_none_or(|device| device.group != *group) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
