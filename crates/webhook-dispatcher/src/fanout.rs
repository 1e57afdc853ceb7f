//! Fan-out: durable consumers on the telemetry stream (device.data) and the events stream
//! (device.alert, device.status, config.update) turn each bus message into an event and one
//! delivery per matching webhook, committed before the message is acked.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::DeliverPolicy;
use fieldline_common::{
    ApiError, Context,
    cache::InvalidatingCache,
    consume::{self, Delivery, Outcome},
    ids::random_id,
    time::{format_rfc3339, from_us},
};
use fieldline_proto::{
    InvalidateKind, Stream, Subjects,
    v1::{DeviceEvent, TelemetryBatch, TelemetryBatchHead, reading},
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
    /// One device's readings, and its place among the devices of a multi-device bus message
    /// (`None` in a single-device one).
    Telemetry(TelemetryBatch, Option<u32>),
    /// A registry event: its id (if it has one) and its JSON payload.
    Device { id: String, payload_json: String },
}

impl Incoming {
    /// What the filters look at: a registry event's payload, or a batch's metric names.
    fn filter_view(&self) -> Value {
        match &self.body {
            Body::Telemetry(batch, _) => json!({
                "readings": batch.readings.iter().map(|r| json!({"metric": r.metric})).collect::<Vec<_>>(),
            }),
            Body::Device { payload_json, .. } => {
                serde_json::from_str(payload_json).unwrap_or(Value::Null)
            }
        }
    }

    /// The event id and payload; `sequence` is the bus message's stream sequence.
    fn finish(self, sequence: u64, raw: &[u8]) -> (String, Incoming, Value) {
        let (id, payload) = match &self.body {
            Body::Telemetry(batch, part) => {
                let readings: Vec<Value> = batch
                    .readings
                    .iter()
                    .map(|r| json!({"metric": r.metric, "ts": format_rfc3339(&from_us(r.ts_us)), "value": reading_json(&r.value)}))
                    .collect();
                (
                    event_id(sequence, raw, *part),
                    json!({"readings": readings, "source": batch.source}),
                )
            }
            Body::Device { id, payload_json } => {
                let id = if id.is_empty() {
                    event_id(sequence, raw, None)
                } else {
                    id.clone()
                };
                let payload = serde_json::from_str(payload_json)
                    .unwrap_or_else(|_| Value::String(payload_json.clone()));
                (id, payload)
            }
        };
        (id, self, payload)
    }
}

/// Stable id of a bus message: the same message redelivered gives the same event id, so its
/// deliveries are not created twice. Each device of a multi-device bus message has its own
/// event, told apart by its place (`part`) among the message's devices; a single-device
/// message's id is what it always was.
fn event_id(stream_sequence: u64, payload: &[u8], part: Option<u32>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(stream_sequence.to_be_bytes());
    hasher.update(payload);
    if let Some(part) = part {
        hasher.update(b"/device/");
        hasher.update(part.to_be_bytes());
    }
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

/// A device.data event per device the telemetry message carries.
fn telemetry_events(subjects: &Subjects, delivery: &Delivery) -> Result<Vec<Incoming>, Outcome> {
    let devices = delivery.telemetry(subjects)?;
    let several = devices.len() > 1;
    Ok(devices
        .into_iter()
        .enumerate()
        .map(|(part, mut batch)| Incoming {
            project: std::mem::take(&mut batch.project),
            device_id: std::mem::take(&mut batch.device_id),
            event_type: "device.data".into(),
            occurred_at_us: batch.received_at_us,
            body: Body::Telemetry(batch, several.then_some(part as u32)),
        })
        .collect())
}

fn device_event(_: &Subjects, delivery: &Delivery) -> Result<Vec<Incoming>, Outcome> {
    let event = DeviceEvent::decode(delivery.payload()).map_err(|_| {
        Outcome::Poison(format!("undecodable bus message on {}", delivery.subject()))
    })?;
    Ok(vec![Incoming {
        project: event.project,
        event_type: event.event_type,
        device_id: event.device_id,
        occurred_at_us: event.occurred_at_us,
        body: Body::Device {
            id: event.id,
            payload_json: event.payload_json,
        },
    }])
}

/// The events one bus message makes, or why it can make none.
type Decode = fn(&Subjects, &Delivery) -> Result<Vec<Incoming>, Outcome>;

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
            telemetry_events as Decode,
        ),
        (
            Stream::Events,
            EVENTS_CONSUMER,
            context.subjects.events_all(),
            device_event,
        ),
    ];
    for (stream, name, filter, decode) in sources {
        let spec = consume::Spec {
            stream,
            name,
            description: "webhook-dispatcher fan-out",
            filter_subject: filter,
            // Webhooks see what happens from the moment the dispatcher first runs.
            deliver_policy: DeliverPolicy::New,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            batch: BATCH,
            batch_bytes: consume::BATCH_BYTES,
            in_flight: 1,
            linger: Duration::ZERO,
        };
        let fanout = Fanout {
            context: context.clone(),
            repo: repo.clone(),
            targets: targets.clone(),
            dispatcher: dispatcher.clone(),
            decode,
            telemetry: stream == Stream::Telemetry,
        };
        consume::start(context, spec, fanout).await?;
    }
    Ok(())
}

struct Fanout {
    context: Context,
    repo: Repo,
    targets: Targets,
    dispatcher: Arc<Dispatcher>,
    decode: Decode,
    /// Reading telemetry: a message is first read by its head ([`TelemetryBatchHead`]).
    telemetry: bool,
}

/// What one bus message makes: its event and a delivery per matching webhook.
struct Planned {
    position: usize,
    event: NewEvent,
    deliveries: Vec<NewDelivery>,
}

impl consume::Handler for Fanout {
    /// Each message is matched on its own: one whose webhooks or device cannot be looked up
    /// waits alone, and the rest of the batch (every other project's events) goes on.
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut planned = Vec::new();
        for (position, delivery) in batch.iter().enumerate() {
            match self.plan(delivery).await {
                Ok(events) => {
                    planned.extend(events.into_iter().map(|(event, deliveries)| Planned {
                        position,
                        event,
                        deliveries,
                    }))
                }
                Err(outcome) => outcomes[position] = outcome,
            }
        }
        if planned.is_empty() {
            return outcomes;
        }
        if let Err(error) = self.enqueue(&planned).await {
            let outcome = Outcome::of_error(&error);
            let several = planned.first().map(|plan| plan.position)
                != planned.last().map(|plan| plan.position);
            if matches!(outcome, Outcome::Wait(_)) || !several {
                for plan in &planned {
                    outcomes[plan.position] = outcome.clone();
                }
                return outcomes;
            }
            // Find the bus message that cannot be stored, so it holds back nothing else (a
            // multi-device one's events go together).
            for message in planned.chunk_by(|a, b| a.position == b.position) {
                if let Err(error) = self.enqueue(message).await {
                    outcomes[message[0].position] = Outcome::of_error(&error);
                }
            }
        }
        outcomes
    }
}

impl Fanout {
    /// Stores the events and their deliveries in one transaction, then starts at once the
    /// deliveries whose webhook has a free slot here: their first attempt needs no claim.
    async fn enqueue(&self, planned: &[Planned]) -> Result<(), ApiError> {
        let events: Vec<NewEvent> = planned.iter().map(|plan| plan.event.clone()).collect();
        let mut deliveries: Vec<NewDelivery> = planned
            .iter()
            .flat_map(|plan| plan.deliveries.iter().cloned())
            .collect();
        let mut slots = HashMap::new();
        for delivery in deliveries
            .iter_mut()
            .filter(|d| d.webhook_enabled && d.immediate)
        {
            if let Some(slot) = self.dispatcher.try_slot(&delivery.webhook_id) {
                delivery.leased = true;
                slots.insert(delivery.id.clone(), slot);
            }
        }
        let lease = self.dispatcher.lease();
        let leased = self.repo.enqueue(&events, &deliveries, lease).await?;
        let unleased = deliveries.len() - leased.len();
        for delivery in leased {
            if let Some(slot) = slots.remove(&delivery.delivery_id) {
                self.dispatcher.start(delivery, slot);
            }
        }
        // Slots not used (a redelivered message, a webhook just disabled) are given back here.
        drop(slots);
        if !deliveries.is_empty() {
            metrics::counter!("fieldline_webhook_enqueued_total")
                .increment(deliveries.len() as u64);
        }
        if unleased > 0 {
            self.dispatcher.wake();
        }
        Ok(())
    }

    /// The events and deliveries one bus message makes (one event per device it carries),
    /// leaving out those no webhook wants.
    async fn plan(
        &self,
        delivery: &Delivery,
    ) -> Result<Vec<(NewEvent, Vec<NewDelivery>)>, Outcome> {
        // Most telemetry goes to no webhook: a project none of whose webhooks takes
        // device.data is told from the head, without decoding the readings.
        if self.telemetry
            && let Ok(head) = TelemetryBatchHead::decode(delivery.payload())
        {
            let targets = self
                .targets
                .of(&head.project)
                .await
                .map_err(|error| Outcome::of_error(&error))?;
            if !targets
                .iter()
                .any(|target| target.events.iter().any(|event| event == "device.data"))
            {
                return Ok(Vec::new());
            }
        }
        let mut planned = Vec::new();
        for incoming in (self.decode)(&self.context.subjects, delivery)? {
            planned.extend(self.plan_one(delivery, incoming).await?);
        }
        Ok(planned)
    }

    /// The event and deliveries of one device's event, or none when no webhook wants it.
    async fn plan_one(
        &self,
        delivery: &Delivery,
        incoming: Incoming,
    ) -> Result<Option<(NewEvent, Vec<NewDelivery>)>, Outcome> {
        let targets = self
            .targets
            .of(&incoming.project)
            .await
            .map_err(|error| Outcome::of_error(&error))?;
        let mut matched = Vec::new();
        for target in targets.iter() {
            if self
                .matches(target, &incoming)
                .await
                .map_err(|error| Outcome::of_error(&error))?
            {
                matched.push(target);
            }
        }
        if matched.is_empty() {
            return Ok(None);
        }
        let (id, incoming, payload) = incoming.finish(delivery.sequence(), delivery.payload());
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
        let deliveries = matched
            .into_iter()
            .map(|target| NewDelivery {
                id: random_id("dlv_", 24),
                webhook_id: target.id.clone(),
                project: incoming.project.clone(),
                event_id: id.clone(),
                event_type: incoming.event_type.clone(),
                device_id: Some(incoming.device_id.clone()).filter(|id| !id.is_empty()),
                immediate: target.options.sends_at_once(),
                webhook_enabled: target.enabled,
                leased: false,
            })
            .collect();
        let event = NewEvent {
            id,
            project: incoming.project,
            event_type: incoming.event_type,
            device_id: Some(incoming.device_id).filter(|id| !id.is_empty()),
            body,
            traceparent: delivery.traceparent().map(str::to_owned),
        };
        Ok(Some((event, deliveries)))
    }

    async fn matches(&self, target: &Target, incoming: &Incoming) -> Result<bool, ApiError> {
        if !target.events.contains(&incoming.event_type) {
            return Ok(false);
        }
        if !target.device_ids.is_empty() && !target.device_ids.contains(&incoming.device_id) {
            return Ok(false);
        }
        let options = &target.options;
        let wants_tags = !options.tags.is_empty();
        let device = if target.group.is_some() || wants_tags {
            if incoming.device_id.is_empty() {
                return Ok(false);
            }
            self.context
                .auth
                .lookup_device(&incoming.project, &incoming.device_id)
                .await
                .map_err(ApiError::from)?
        } else {
            None
        };
        if let Some(group) = &target.group
            && device.as_ref().is_none_or(|device| device.group != *group)
        {
            return Ok(false);
        }
        if options.min_severity.is_some() || !options.metrics.is_empty() || wants_tags {
            let tags = device.as_ref().map(|device| device.tags.as_slice());
            if !options.passes(&incoming.event_type, &incoming.filter_view(), tags) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
