//! The downlink: config versions and commands from the commands stream to the broker.
//!
//! A durable pull consumer ([`CONSUMER`]) shared by every ingest-mqtt instance takes each
//! `DeviceCommand` in turn. A config becomes a retained QoS 1 message on
//! `{root}/{project}/{device}/config`; a live command a QoS 1 message on
//! `{root}/{project}/{device}/commands`, then reported `delivered` to the registry. The
//! JetStream message is acked only after the broker's PUBACK for that publish, so an ack
//! means the broker has it; without a PUBACK in time it is nak'ed and delivered again
//! (at least once: a device may see a command id twice and should ignore the repeat).
//!
//! Downlink publishes use their own MQTT connection (client id `{client_id}-downlink`,
//! clean session), one publish in flight at a time: the PUBACK that answers it is then
//! unambiguous, and the uplink's manual acks never share its packet ids.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream::consumer::DeliverPolicy;
use fieldline_common::{
    Context,
    bus::rpc,
    commands::{command_json, config_json},
    consume::{self, Delivery},
    ids::{DeviceId, ProjectSlug},
    time::now_us,
};
use fieldline_proto::{
    Stream,
    v1::{CommandReport, CommandReportResponse, DeviceCommand},
};
use prost::Message as _;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::topic;

/// Consumer name: one per service, shared by its instances.
pub use fieldline_proto::consumers::MQTT_DOWNLINK as CONSUMER;

/// How long a downlink publish may wait for the broker's PUBACK before it is retried.
const PUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// `delivered` reports in flight at once; past that the loop waits for one to finish.
const REPORTS_IN_FLIGHT: usize = 64;

/// Starts the downlink connection and consumer loop. Returns a receiver that says whether the
/// downlink connection is up (part of readiness).
pub async fn start(context: &Context, client_id: &str) -> anyhow::Result<watch::Receiver<bool>> {
    let config = &context.config;
    let mut options = config.mqtt_options(format!("{client_id}-downlink"))?;
    options
        // Nothing to resume: an unacknowledged downlink message is still in JetStream.
        .set_clean_session(true)
        .set_max_packet_size(config.mqtt_max_packet_bytes, config.mqtt_max_packet_bytes);
    let (client, eventloop) = AsyncClient::new(options, 16);
    let (connected_tx, connected_rx) = watch::channel(false);
    let awaiting: Arc<Mutex<Option<Awaiting>>> = Arc::default();
    context.tasks.spawn(poll_broker(
        eventloop,
        client.clone(),
        awaiting.clone(),
        connected_tx,
        context.shutdown.clone(),
    ));

    let downlink = Downlink {
        context: context.clone(),
        broker: Broker {
            client,
            awaiting,
            connected: connected_rx.clone(),
        },
        versions: Mutex::new(HashMap::new()),
        reports: Arc::new(Semaphore::new(REPORTS_IN_FLIGHT)),
    };
    let spec = consume::Spec {
        stream: Stream::Commands,
        name: CONSUMER,
        description: "ingest-mqtt: config and commands to the broker",
        filter_subject: context.subjects.commands_all(),
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1_000,
        // Small batches, handled one message at a time (one publish in flight).
        batch: 16,
        batch_bytes: consume::BATCH_BYTES,
        in_flight: 1,
        linger: Duration::ZERO,
    };
    consume::start(context, spec, downlink).await?;
    Ok(connected_rx)
}

/// The one downlink publish waiting for its PUBACK.
struct Awaiting {
    /// Set when the event loop writes the publish (`Outgoing::Publish`).
    pkid: Option<u16>,
    done: oneshot::Sender<()>,
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("the mqtt client is closed")]
    Closed,
    #[error("the connection dropped before the broker acknowledged")]
    ConnectionLost,
    #[error("no PUBACK within {0:?}")]
    Timeout(Duration),
}

struct Broker {
    client: AsyncClient,
    awaiting: Arc<Mutex<Option<Awaiting>>>,
    connected: watch::Receiver<bool>,
}

impl Broker {
    /// Publishes at QoS 1 and returns once the broker sent its PUBACK for it. Callers publish
    /// one message at a time.
    async fn publish_confirmed(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), PublishError> {
        let (done, acked) = oneshot::channel();
        set(&self.awaiting, Some(Awaiting { pkid: None, done }));
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .is_err()
        {
            set(&self.awaiting, None);
            return Err(PublishError::Closed);
        }
        match tokio::time::timeout(PUBACK_TIMEOUT, acked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(PublishError::ConnectionLost),
            Err(_) => {
                set(&self.awaiting, None);
                Err(PublishError::Timeout(PUBACK_TIMEOUT))
            }
        }
    }
}

fn set(slot: &Mutex<Option<Awaiting>>, value: Option<Awaiting>) {
    // Never held across an await; a poisoned lock only means a panic elsewhere.
    match slot.lock() {
        Ok(mut guard) => *guard = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

fn with_awaiting(slot: &Mutex<Option<Awaiting>>, f: impl FnOnce(&mut Option<Awaiting>)) {
    match slot.lock() {
        Ok(mut guard) => f(&mut guard),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// Drives the downlink connection and matches PUBACKs to the publish awaiting one.
async fn poll_broker(
    mut eventloop: EventLoop,
    client: AsyncClient,
    awaiting: Arc<Mutex<Option<Awaiting>>>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("mqtt downlink connected");
                backoff = Duration::from_millis(200);
                connected.send_replace(true);
            }
            // A publish written again after a retry has a new packet id: the latest one
            // written is the one whose PUBACK counts (both carry the same message).
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                with_awaiting(&awaiting, |slot| {
                    if let Some(awaiting) = slot.as_mut() {
                        awaiting.pkid = Some(pkid);
                    }
                });
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                with_awaiting(&awaiting, |slot| {
                    if slot.as_ref().and_then(|a| a.pkid) == Some(ack.pkid)
                        && let Some(awaiting) = slot.take()
                    {
                        let _ = awaiting.done.send(());
                    }
                });
            }
            Ok(_) => {}
            Err(error) => {
                if connected.send_replace(false) {
                    tracing::warn!(error = %error, "mqtt downlink connection lost; reconnecting");
                } else {
                    tracing::debug!(error = %error, "mqtt downlink connect failed; retrying");
                }
                // A clean session drops what was in flight: the publisher retries it.
                set(&awaiting, None);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    connected.send_replace(false);
}

/// What became of one message of the commands stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The broker has it: ack.
    Published,
    /// Not to be sent (expired command, stale config): ack.
    Skipped(&'static str),
    /// Cannot ever be sent (undecodable, unknown kind): terminate.
    Dropped(&'static str),
    /// Not sent this time (broker down, no PUBACK): nak for redelivery.
    Retry,
    /// Shutting down: leave it unacked for redelivery.
    Abandoned,
}

struct Downlink {
    context: Context,
    broker: Broker,
    /// Highest config version published per (project, device) by this instance, so a stale
    /// version delivered late (after a nak or redelivery) never replaces a newer retained
    /// one. In memory only: two instances sharing the consumer, or a restart, can still let
    /// an old version through in the rare case where it is redelivered after a newer one was
    /// published by another instance (or before the restart).
    versions: Mutex<HashMap<(String, String), i64>>,
    reports: Arc<Semaphore>,
}

impl consume::Handler for Downlink {
    async fn handle(&self, batch: &[Delivery]) -> Vec<consume::Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for delivery in batch {
            let outcome = self.send(delivery).await;
            let label = match outcome {
                Outcome::Published => "published",
                Outcome::Skipped(reason) | Outcome::Dropped(reason) => reason,
                Outcome::Retry => "retry",
                Outcome::Abandoned => "abandoned",
            };
            metrics::counter!("fieldline_mqtt_downlink_total", "outcome" => label).increment(1);
            outcomes.push(match outcome {
                Outcome::Published | Outcome::Skipped(_) => consume::Outcome::Done,
                Outcome::Dropped(reason) => consume::Outcome::Poison(reason.to_owned()),
                Outcome::Retry => {
                    consume::Outcome::Wait("broker did not acknowledge the publish".into())
                }
                Outcome::Abandoned => consume::Outcome::Wait("shutting down".into()),
            });
        }
        outcomes
    }
}

impl Downlink {
    async fn send(&self, message: &Delivery) -> Outcome {
        let Ok(command) = DeviceCommand::decode(message.payload()) else {
            tracing::error!(subject = %message.subject(), "undecodable downlink message dropped");
            return Outcome::Dropped("undecodable");
        };
        // The registry made these; they become topic levels, so check them anyway.
        let (Ok(project), Ok(device_id)) = (
            ProjectSlug::parse(&command.project),
            DeviceId::parse(&command.device_id),
        ) else {
            tracing::error!(subject = %message.subject(), "downlink message with invalid ids dropped");
            return Outcome::Dropped("invalid_ids");
        };
        let root = &self.context.config.mqtt_topic_root;
        let shutdown = self.context.shutdown.clone();
        let mut connected = self.broker.connected.clone();
        // While the broker is away, hold this message rather than fail it over and over.
        tokio::select! {
            _ = shutdown.cancelled() => return Outcome::Abandoned,
            up = connected.wait_for(|up| *up) => if up.is_err() { return Outcome::Abandoned },
        }
        match command.kind.as_str() {
            "config" => {
                let key = (project.to_string(), device_id.to_string());
                if self
                    .published_version(&key)
                    .is_some_and(|published| published >= command.version)
                {
                    return Outcome::Skipped("stale_config");
                }
                let updated_at_us = message.published_us().unwrap_or_else(now_us);
                let payload =
                    config_json(command.version, &command.params_json, updated_at_us).to_string();
                let topic = topic::config(root, project.as_str(), device_id.as_str());
                match self
                    .broker
                    .publish_confirmed(topic, payload.into_bytes(), true)
                    .await
                {
                    Ok(()) => {
                        self.versions
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(key, command.version);
                        Outcome::Published
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, device_id = %device_id, "config publish failed; retrying");
                        Outcome::Retry
                    }
                }
            }
            "command" => {
                if command.expires_at_us != 0 && command.expires_at_us <= now_us() {
                    return Outcome::Skipped("expired");
                }
                let payload = command_json(&command).to_string();
                let topic = topic::commands(root, project.as_str(), device_id.as_str());
                match self
                    .broker
                    .publish_confirmed(topic, payload.into_bytes(), false)
                    .await
                {
                    Ok(()) => {
                        self.report_delivered(command).await;
                        Outcome::Published
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, device_id = %device_id, "command publish failed; retrying");
                        Outcome::Retry
                    }
                }
            }
            // The device was deleted: its retained config goes (an empty retained message
            // deletes it), and a device created again with the same id starts from version 1.
            "config_clear" => {
                let topic = topic::config(root, project.as_str(), device_id.as_str());
                match self.broker.publish_confirmed(topic, Vec::new(), true).await {
                    Ok(()) => {
                        self.versions
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&(project.to_string(), device_id.to_string()));
                        Outcome::Published
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, device_id = %device_id, "config clear failed; retrying");
                        Outcome::Retry
                    }
                }
            }
            other => {
                tracing::error!(kind = other, "downlink message of unknown kind dropped");
                Outcome::Dropped("unknown_kind")
            }
        }
    }

    fn published_version(&self, key: &(String, String)) -> Option<i64> {
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Tells the registry the command reached the broker; best effort, in the background (a
    /// lost report leaves the command `pending` until the device acks it).
    async fn report_delivered(&self, command: DeviceCommand) {
        let Ok(permit) = self.reports.clone().acquire_owned().await else {
            return;
        };
        let context = self.context.clone();
        self.context.tasks.spawn(async move {
            let report = CommandReport {
                project: command.project,
                device_id: command.device_id,
                command_id: command.id,
                status: "delivered".to_owned(),
                detail: String::new(),
                via: "mqtt".to_owned(),
            };
            let result: Result<CommandReportResponse, _> = rpc(
                &context.nats,
                context.subjects.rpc_commands_report(),
                &report,
                context.config.rpc_timeout,
            )
            .await;
            if let Err(error) = result {
                tracing::warn!(error = %error, command_id = %report.command_id, "delivered report not answered");
            }
            drop(permit);
        });
    }
}
