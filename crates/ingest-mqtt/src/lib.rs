//! ingest-mqtt: reads device messages from the broker (a shared subscription, QoS 1, manual
//! acks) and publishes them to JetStream. The broker gets its PUBACK only after JetStream
//! acknowledged the batch, so a PUBACK means the readings are durable. Command acks from
//! devices are forwarded to the registry the same way (PUBACK once it answered), and the
//! [`downlink`] takes config and commands from the bus to the devices.

mod coalesce;
mod downlink;
mod handover;
mod poison;
mod slots;
mod topic;

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fieldline_common::{
    ApiError, Context, ErrorKind, Service,
    auth::{AuthError, DeviceInfo},
    bus::rpc,
    commands::MqttCommandAck,
    ids::random_id,
    ingest::{self, DevicePart, Parsed, PublishError, Publisher, TimeWindow},
    logthrottle::LogThrottle,
    ratelimit::Decision,
    service::ReadyCheck,
    time::now_us,
};
use fieldline_proto::v1::{CommandReport, CommandReportResponse};
use futures::{FutureExt, StreamExt, future::join_all, stream::FuturesOrdered};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    coalesce::{Coalescer, Outgoing, PublishFn, Sent},
    poison::Remedy,
    topic::Uplink,
};

/// Warnings that come once per message (drops, retries while a server is down) are written
/// once per reason every 10 s with the count left out: a NATS outage wrote 1,700 lines a
/// second. Per process, as the log is.
static WARNINGS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// Tries to hand a device's command ack to the registry before leaving it to the broker's
/// redelivery.
const ACK_REPORT_ATTEMPTS: u32 = 3;

/// Messages of one connection being published to JetStream at once; acks still go back in
/// arrival order. Above the broker's window (`max_inflight_messages 1000` in
/// deploy/mosquitto/mosquitto.conf), so the broker, not this, bounds what is held: the more a
/// device has waiting, the more of it the [`coalesce`] puts in one bus message.
const IN_FLIGHT: usize = 1024;

/// Every reason a message is dropped for (`fieldline_mqtt_dropped_total{reason}`), counted
/// from 0 at start so that dashboards and alerts see the first drop of each as an increase.
const DROP_REASONS: [&str; 10] = [
    "too_large",
    "invalid_topic",
    "unknown_device",
    "rate_limited",
    "malformed",
    "too_many_readings",
    "out_of_window",
    "unknown_command",
    "refused",
    "poison",
];

/// Starts the MQTT loops. Returns at once: the broker may be down at start, and each slot's
/// connection connects (and reconnects) by itself; readiness reports whether this instance
/// holds its slots and all are connected.
pub async fn start(context: &Context) -> anyhow::Result<Service> {
    let config = &context.config;
    let name = config.ingest_mqtt_client_id();
    for reason in DROP_REASONS {
        metrics::counter!("fieldline_mqtt_dropped_total", "reason" => reason).increment(0);
    }
    let filters: Vec<String> = Uplink::ALL
        .iter()
        .map(|uplink| {
            topic::shared_filter(&config.mqtt_share_group, &config.mqtt_topic_root, *uplink)
        })
        .collect();
    // Built here, so that a login or CA file that cannot be used stops the start rather
    // than the first lease.
    let slot_options: Vec<MqttOptions> = (0..config.mqtt_slots)
        .map(|slot| config.mqtt_options(config.ingest_mqtt_slot_client_id(slot)))
        .collect::<anyhow::Result<_>>()?;
    let retired_options: Vec<MqttOptions> = config
        .ingest_mqtt_retired_client_ids()
        .into_iter()
        .map(|client_id| config.mqtt_options(client_id))
        .collect::<anyhow::Result<_>>()?;
    tracing::info!(name = %name, filters = ?filters, slots = config.mqtt_slots, "mqtt ingest starting");
    // One for all the connections: the broker spreads a device's messages over them.
    let coalescer = telemetry_coalescer(context);
    // The uplink connects under the slots this instance leases ([`slots`]), each slot a
    // persistent session into the shared subscription with its own window of unacknowledged
    // messages.
    let slot_context = context.clone();
    let connect: Box<slots::Connect> = Box::new(move |slot, stop, lease_end| {
        let context = &slot_context;
        let started = connect(
            context,
            Session::Slot(slot_options[slot].clone()),
            filters.clone(),
            coalescer.clone(),
            stop.clone(),
            lease_end.clone(),
        );
        // The holder of slot 0 drains the retired client ids' sessions too, under the
        // same lease, so that one instance at a time is connected under each.
        if slot != 0 || retired_options.is_empty() {
            return started;
        }
        let mut done = vec![started.done];
        for options in &retired_options {
            let drain = connect(
                context,
                Session::Retired(options.clone()),
                filters.clone(),
                coalescer.clone(),
                stop.child_token(),
                lease_end.clone(),
            );
            done.push(drain.done);
        }
        slots::Started {
            connected: started.connected,
            done: tokio::spawn(async move {
                join_all(done).await;
            }),
        }
    });
    let slots = slots::Slots::start(context, &name, connect).await?;
    let downlink_connected = downlink::start(context, &name).await?;

    let ready: ReadyCheck = Arc::new(move || {
        let uplink = slots
            .lock()
            .map_err(|_| "uplink status unreadable".to_owned())
            .and_then(|status| status.check());
        let downlink_connected = *downlink_connected.borrow();
        async move {
            uplink?;
            if downlink_connected {
                Ok(())
            } else {
                Err("downlink not connected to the broker".to_owned())
            }
        }
        .boxed()
    });
    Ok(Service {
        name: "ingest-mqtt",
        routes: None,
        ready: Some(ready),
    })
}

/// The broker session an uplink connection resumes, with the options (client id) of its
/// login.
enum Session {
    /// A slot of `mqtt_slots`: subscribed into the shared subscription.
    Slot(MqttOptions),
    /// A client id of `mqtt_retired_client_ids`: what its session holds is taken, and its
    /// subscription removed.
    Retired(MqttOptions),
}

/// One uplink connection: its event loop and the pipeline that publishes and acks what it
/// receives. It ends when `stop` is cancelled, and does not reconnect once `lease_end` (the
/// lease of the slot it is under) has passed.
fn connect(
    context: &Context,
    session_of: Session,
    filters: Vec<String>,
    coalescer: Coalescer,
    stop: CancellationToken,
    lease_end: watch::Receiver<tokio::time::Instant>,
) -> slots::Started {
    let config = &context.config;
    let (mut options, retired) = match session_of {
        Session::Slot(options) => (options, false),
        Session::Retired(options) => (options, true),
    };
    options
        // A persistent session: while no instance holds the slot the broker keeps its
        // subscription and the messages not acknowledged, and sends them to the next holder.
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(config.mqtt_max_packet_bytes, config.mqtt_max_packet_bytes)
        .set_inflight(IN_FLIGHT as u16);
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let connected = Arc::new(AtomicBool::new(false));
    let session = Arc::new(AtomicU64::new(0));
    // Never waits (`process` acks through the event loop `poll_broker` drives): QoS 1 is
    // bounded by the broker's in-flight window, QoS 0 by the backlog.
    let (incoming_tx, incoming_rx) = handover::channel(config.mqtt_qos0_backlog);
    let done = context.tasks.spawn(poll_broker(
        eventloop,
        Connection {
            client: client.clone(),
            filters,
            connected: connected.clone(),
            session: session.clone(),
            max_message_bytes: config.mqtt_max_message_bytes,
            lease_end,
            retired,
        },
        incoming_tx,
        stop,
    ));
    context.tasks.spawn(process(
        context.clone(),
        client,
        coalescer,
        incoming_rx,
        session,
    ));
    slots::Started { connected, done }
}

/// Telemetry goes to JetStream through a [`Coalescer`]: retried until it is there or the
/// service shuts down; a bus message larger than NATS takes is never retried.
fn telemetry_coalescer(context: &Context) -> Coalescer {
    // One Arc for both: cloning the publisher and the token themselves allocated, once per
    // bus message.
    let shared = Arc::new((Publisher::new(context), context.shutdown.clone()));
    let publish: Arc<PublishFn> = Arc::new(move |outgoing: Arc<Outgoing>| {
        let shared = shared.clone();
        async move {
            let (publisher, shutdown) = &*shared;
            // What waits after shutdown stays with the broker for the next start.
            if shutdown.is_cancelled() {
                return Sent::Abandoned;
            }
            // A multi-device bus message's own id, the same on each try: JetStream keeps one
            // copy if a try was stored but its ack lost. A device id holds no `.`, so no
            // client's scoped key can meet it.
            let bus_id = (outgoing.parts.len() > 1)
                .then(|| format!("{}/.batch/{}", outgoing.project, random_id("", 22)));
            retry(shutdown, "publish to jetstream", || async {
                let published = match outgoing.parts.as_slice() {
                    [one] => publisher
                        .readings(
                            &outgoing.project,
                            &one.device_id,
                            Parsed::clone(&one.parsed),
                            one.received_at_us,
                            "mqtt",
                        )
                        .await
                        .map(|_| ()),
                    parts => {
                        let devices: Vec<DevicePart<'_>> = parts
                            .iter()
                            .map(|part| DevicePart {
                                device_id: &part.device_id,
                                readings: &part.parsed.readings,
                                received_at_us: part.received_at_us,
                            })
                            .collect();
                        let bus_id = bus_id.as_deref().unwrap_or_default();
                        publisher
                            .devices(&outgoing.project, &devices, "mqtt", bus_id)
                            .await
                    }
                };
                match published {
                    Ok(()) => Ok(Sent::Published),
                    Err(PublishError::TooLarge { .. }) => Ok(Sent::TooLarge),
                    Err(error) => Err(error),
                }
            })
            .await
            .unwrap_or(Sent::Abandoned)
        }
        .boxed()
    });
    Coalescer::new(
        context.tasks.clone(),
        publish,
        context.config.mqtt_publishes_in_flight,
    )
}

/// A message as it arrived, with its arrival time (the default timestamp of its readings).
struct Arrival {
    publish: Publish,
    received_at_us: i64,
    /// The payload's size when over `mqtt_max_message_bytes`; the payload itself is let go
    /// at once, and the message is acked and dropped in its turn.
    too_large: Option<usize>,
    /// The broker session it came in: acked only in that one, as a packet id of another
    /// session may name another message.
    session: u64,
}

/// What `poll_broker` shares with the rest of its connection.
struct Connection {
    client: AsyncClient,
    filters: Vec<String>,
    /// Connected and subscribed (readiness).
    connected: Arc<AtomicBool>,
    /// Counts the sessions the broker started afresh (CONNACK without a session present).
    session: Arc<AtomicU64>,
    max_message_bytes: usize,
    /// The slot's lease: past it another instance may hold the slot, so no reconnect.
    lease_end: watch::Receiver<tokio::time::Instant>,
    /// A retired client id's session, drained: unsubscribed instead of subscribed.
    retired: bool,
}

/// Drives the connection: subscribes on every (re)connect, hands publishes to `process`
/// (dropping QoS 0 ones it has no room for), and breaks a loop of connections ended by the
/// same message ([`poison`]).
async fn poll_broker(
    mut eventloop: EventLoop,
    connection: Connection,
    incoming: handover::Sender<Arrival>,
    stop: CancellationToken,
) {
    let Connection {
        client,
        filters,
        connected,
        session,
        max_message_bytes,
        lease_end,
        retired,
    } = connection;
    // A remedy changes the options of the next connection only; these come back after it.
    let max_packet_bytes = eventloop.mqtt_options.max_packet_size();
    let mut breaker = poison::Breaker::default();
    let mut discarding_session = false;
    let mut backoff = Duration::from_millis(200);
    // Whether the event loop has a connection: polling one without would connect again.
    let mut linked = false;
    // UNSUBACKs of this connection (a retired session's filters).
    let mut unsubscribed = 0;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                linked = true;
                unsubscribed = 0;
                metrics::counter!("fieldline_mqtt_connects_total").increment(1);
                breaker.connected(Instant::now());
                backoff = Duration::from_millis(200);
                eventloop
                    .mqtt_options
                    .set_max_packet_size(max_packet_bytes, max_packet_bytes);
                if !ack.session_present {
                    session.fetch_add(1, Ordering::Relaxed);
                }
                if discarding_session {
                    // The clean connect discarded the session. Leave at once and come back
                    // with a persistent one, rather than run on one that dies with the
                    // connection.
                    discarding_session = false;
                    eventloop.mqtt_options.set_clean_session(false);
                    eventloop.clean();
                    linked = false;
                    continue;
                }
                tracing::info!(
                    session_present = ack.session_present,
                    retired,
                    "mqtt connected"
                );
                let client = client.clone();
                let filters = filters.clone();
                // Not awaited here: the request goes through the event loop this task polls.
                tokio::spawn(async move {
                    for filter in filters {
                        // A retired session gets what it holds on connect; without its
                        // subscription it is given no more.
                        let sent = if retired {
                            client.unsubscribe(filter).await
                        } else {
                            client.subscribe(filter, QoS::AtLeastOnce).await
                        };
                        if let Err(error) = sent {
                            tracing::warn!(error = %error, retired, "mqtt subscribe failed");
                        }
                    }
                });
            }
            // Ready once subscribed: from here on, nothing published is missed.
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                connected.store(true, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) => unsubscribed += 1,
            Ok(Event::Incoming(Packet::Publish(mut publish))) => {
                let size = publish.payload.len();
                let too_large = (size > max_message_bytes).then(|| {
                    drop(std::mem::take(&mut publish.payload));
                    size
                });
                let qos = publish.qos;
                let arrival = Arrival {
                    publish,
                    received_at_us: now_us(),
                    too_large,
                    session: session.load(Ordering::Relaxed),
                };
                let handed = match qos {
                    QoS::AtMostOnce => incoming.offer(arrival),
                    QoS::AtLeastOnce | QoS::ExactlyOnce => incoming.send(arrival),
                };
                match handed {
                    Ok(()) => {}
                    Err(handover::Refused::Full) => {
                        count_dropped("overload");
                        if let Some(left_out) = WARNINGS.admit("overload") {
                            tracing::warn!(
                                left_out,
                                "qos 0 message dropped: the pipeline is behind and its backlog full"
                            );
                        }
                    }
                    Err(handover::Refused::Closed) => break,
                }
            }
            Ok(_) => {}
            Err(error) => {
                linked = false;
                match breaker.failed(&error, Instant::now()) {
                    Remedy::None => {}
                    Remedy::ReadLarger(size) => {
                        tracing::warn!(
                            size,
                            max = max_packet_bytes,
                            "mqtt packet over mqtt_max_packet_bytes (the broker's max_packet_size should be the same); reading it on a connection of its own to drop it"
                        );
                        eventloop
                            .mqtt_options
                            .set_max_packet_size(poison::LARGEST_READ_ONCE, max_packet_bytes);
                    }
                    Remedy::DiscardSession => {
                        count_dropped("poison");
                        tracing::error!(
                            error = %error,
                            connections = poison::STRIKES,
                            "mqtt connections keep failing on a message that cannot be read; discarding this client's broker session, and with it every message the broker held for it"
                        );
                        eventloop.mqtt_options.set_clean_session(true);
                        discarding_session = true;
                    }
                }
                let was_connected = connected.swap(false, Ordering::Relaxed);
                // Another instance may hold the slot now: connecting under its id would take
                // the session from it.
                if *lease_end.borrow() <= tokio::time::Instant::now() {
                    tracing::warn!(error = %error, "mqtt connection lost past the slot's lease; not reconnecting");
                    break;
                }
                if was_connected {
                    tracing::warn!(error = %error, "mqtt connection lost; reconnecting");
                } else {
                    tracing::debug!(error = %error, "mqtt connect failed; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // A retired session left before its unsubscribe was through would keep taking a share of
    // the telemetry until the next drain: the UNSUBACKs are waited for, briefly.
    if linked && retired {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while unsubscribed < filters.len() {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::UnsubAck(_))) => unsubscribed += 1,
                    Ok(_) => {}
                    Err(_) => {
                        linked = false;
                        break;
                    }
                }
            }
        })
        .await;
    }
    // Unacknowledged messages stay with the broker (persistent session) for the slot's next
    // holder.
    if linked {
        let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    connected.store(false, Ordering::Relaxed);
}

/// What became of a message.
enum Outcome {
    /// In JetStream: acknowledge it.
    Published,
    /// A command ack the registry took: acknowledge it.
    Forwarded,
    /// Dropped for good (unknown device, malformed): acknowledge it so it is not resent.
    Dropped(&'static str),
    /// Shutting down before it was durable: leave it unacknowledged for the broker to resend.
    Abandoned,
}

async fn process(
    context: Context,
    client: AsyncClient,
    coalescer: Coalescer,
    mut incoming: handover::Receiver<Arrival>,
    session: Arc<AtomicU64>,
) {
    let publisher = Publisher::new(&context);
    let shared = Arc::new((context, publisher, coalescer));
    let mut pending = FuturesOrdered::new();
    loop {
        tokio::select! {
            arrival = incoming.recv(), if pending.len() < IN_FLIGHT => match arrival {
                Some(arrival) => {
                    let shared = shared.clone();
                    pending.push_back(async move {
                        let (context, publisher, coalescer) = &*shared;
                        // A message that makes the handler panic would do it again when the
                        // broker resends it: it is dropped, and the rest go on.
                        let handled = AssertUnwindSafe(handle(context, publisher, coalescer, &arrival))
                            .catch_unwind()
                            .await;
                        let outcome = handled.unwrap_or_else(|_| {
                            if let Some(left_out) = WARNINGS.admit("poison") {
                                tracing::error!(topic = %arrival.publish.topic, left_out, "mqtt message dropped: handling it panicked");
                            }
                            Outcome::Dropped("poison")
                        });
                        (arrival, outcome)
                    });
                }
                None => break,
            },
            Some((arrival, outcome)) = pending.next(), if !pending.is_empty() => {
                let ack = match outcome {
                    Outcome::Published => {
                        metrics::counter!("fieldline_mqtt_messages_total", "outcome" => "published").increment(1);
                        true
                    }
                    Outcome::Forwarded => {
                        metrics::counter!("fieldline_mqtt_messages_total", "outcome" => "forwarded").increment(1);
                        true
                    }
                    Outcome::Dropped(reason) => {
                        count_dropped(reason);
                        true
                    }
                    Outcome::Abandoned => false,
                };
                // A session started afresh since (the broker lost it, or it was discarded)
                // does not have this message, and its packet id may name another.
                if ack
                    && arrival.session == session.load(Ordering::Relaxed)
                    && let Err(error) = client.ack(&arrival.publish).await
                    && let Some(left_out) = WARNINGS.admit("mqtt ack")
                {
                    tracing::warn!(error = %error, left_out, "mqtt ack failed; the broker will resend");
                }
            }
        }
    }
}

fn count_dropped(reason: &'static str) {
    metrics::counter!("fieldline_mqtt_messages_total", "outcome" => "dropped").increment(1);
    metrics::counter!("fieldline_mqtt_dropped_total", "reason" => reason).increment(1);
}

fn drop_message(topic: &str, reason: &'static str, detail: &str) -> Outcome {
    if let Some(left_out) = WARNINGS.admit(reason) {
        tracing::warn!(topic = %topic, reason, detail, left_out, "mqtt message dropped");
    }
    Outcome::Dropped(reason)
}

/// The first wait of [`retry`], doubled after each failure up to 5 s.
const RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Retries `attempt` with backoff until it succeeds or the service shuts down.
async fn retry<T, E: std::fmt::Display, F, Fut>(
    shutdown: &CancellationToken,
    what: &'static str,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = RETRY_FIRST_BACKOFF;
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => {
                if let Some(left_out) = WARNINGS.admit(what) {
                    tracing::warn!(error = %error, left_out, "{what} failed; retrying");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn handle(
    context: &Context,
    publisher: &Publisher,
    coalescer: &Coalescer,
    arrival: &Arrival,
) -> Outcome {
    let publish = &arrival.publish;
    let config = &context.config;
    if let Some(size) = arrival.too_large {
        let detail = format!(
            "{size} bytes, over mqtt_max_message_bytes ({})",
            config.mqtt_max_message_bytes
        );
        return drop_message(&publish.topic, "too_large", &detail);
    }
    let Some((project, device_id, uplink)) = topic::parse(&config.mqtt_topic_root, &publish.topic)
    else {
        return drop_message(
            &publish.topic,
            "invalid_topic",
            "not {root}/{project}/{device}/{telemetry|heartbeat|commands/ack}",
        );
    };
    let device = match device_known(context, project.as_str(), device_id.as_str()).await {
        None => return Outcome::Abandoned,
        Some(None) => {
            return drop_message(
                &publish.topic,
                "unknown_device",
                "no such device in that project",
            );
        }
        Some(Some(device)) => device,
    };
    // Every uplink message counts; one over the device's limit is acknowledged (so the
    // device's session does not stall) and dropped, never published.
    let decision = context.limits.check_device(
        fieldline_common::ratelimit::Channel::Mqtt,
        project.as_str(),
        device_id.as_str(),
        device.rate_limit,
    );
    if !decision.allowed {
        return rate_limited(
            context,
            &publish.topic,
            project.as_str(),
            device_id.as_str(),
            &decision,
        );
    }

    let published = match uplink {
        Uplink::Telemetry => {
            // Live time only, as over HTTP: a reading far from now drops the message
            // (`out_of_window`), acknowledged so that the broker does not resend it.
            let parsed = match ingest::parse_json_message(
                &publish.payload,
                arrival.received_at_us,
                config.ingest_max_readings,
                TimeWindow::live(config, arrival.received_at_us),
            ) {
                Ok(parsed) => parsed,
                Err(error) => {
                    return drop_message(&publish.topic, error.reason(), &error.to_string());
                }
            };
            let readings = parsed.readings.len() as u64;
            let device = (project.as_str().to_owned(), device_id.as_str().to_owned());
            match coalescer
                .publish(device, parsed, arrival.received_at_us)
                .await
            {
                Sent::Published => {
                    metrics::counter!("fieldline_ingest_readings_total", "source" => "mqtt")
                        .increment(readings);
                    true
                }
                Sent::TooLarge => {
                    return drop_message(
                        &publish.topic,
                        "too_large",
                        "more than the bus takes in one message",
                    );
                }
                Sent::Abandoned => false,
            }
        }
        // The rarer uplinks' futures are boxed, so that telemetry's, one per message held in
        // the pipeline, stays small.
        Uplink::CommandAck => {
            return Box::pin(forward_ack(
                context,
                arrival,
                project.as_str(),
                device_id.as_str(),
            ))
            .await;
        }
        Uplink::Heartbeat => Box::pin(retry(&context.shutdown, "publish heartbeat", || {
            publisher.heartbeat(
                project.as_str(),
                device_id.as_str(),
                arrival.received_at_us,
                "mqtt",
            )
        }))
        .await
        .is_some(),
    };
    if published {
        Outcome::Published
    } else {
        Outcome::Abandoned
    }
}

/// A device over its rate limit: its message is dropped and counted, and a warning logged at
/// most once per device every few seconds (a flood of drops is a counter, not of lines).
fn rate_limited(
    context: &Context,
    topic: &str,
    project: &str,
    device_id: &str,
    decision: &Decision,
) -> Outcome {
    if context.limits.should_log_drop(project, device_id) {
        tracing::warn!(
            topic = %topic,
            project,
            device_id,
            limit = decision.limit.requests(),
            period_s = decision.limit.period().as_secs_f64(),
            "device over its mqtt rate limit; its messages are dropped"
        );
    }
    Outcome::Dropped("rate_limited")
}

/// One of `project`'s devices, or `Some(None)` when it has no such device. The registry
/// answers (cached); while it cannot, the message waits rather than being dropped as
/// unknown. `None`: shut down first.
async fn device_known(
    context: &Context,
    project: &str,
    device_id: &str,
) -> Option<Option<Arc<DeviceInfo>>> {
    let lookup = || async {
        match context.auth.lookup_device(project, device_id).await {
            Err(AuthError::Unavailable) => Err(AuthError::Unavailable),
            other => Ok(other.ok().flatten()),
        }
    };
    match lookup().await {
        Ok(known) => Some(known),
        // Boxed: only a registry that cannot answer needs the retry loop and its timers.
        Err(error) => {
            Box::pin(async {
                if let Some(left_out) = WARNINGS.admit("device lookup") {
                    tracing::warn!(error = %error, left_out, "device lookup failed; retrying");
                }
                tokio::select! {
                    _ = context.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(RETRY_FIRST_BACKOFF) => {}
                }
                retry(&context.shutdown, "device lookup", lookup).await
            })
            .await
        }
    }
}

/// A device's `{"id","status","detail"?}` on `…/commands/ack`, forwarded to the registry.
/// A registry that does not answer after a few tries leaves the message unacknowledged (the
/// broker resends it when this persistent session reconnects) rather than dropped, and does
/// not hold up the telemetry behind it in the pipeline.
async fn forward_ack(
    context: &Context,
    arrival: &Arrival,
    project: &str,
    device_id: &str,
) -> Outcome {
    let topic = &arrival.publish.topic;
    let ack = match MqttCommandAck::parse(&arrival.publish.payload) {
        Ok(ack) => ack,
        Err(error) => return drop_message(topic, "malformed", &error.message),
    };
    let report = CommandReport {
        project: project.to_owned(),
        device_id: device_id.to_owned(),
        command_id: ack.id,
        status: ack.status.as_str().to_owned(),
        detail: ack.detail.unwrap_or_default(),
        via: "mqtt".to_owned(),
    };
    let mut answer = None;
    for attempt in 0..ACK_REPORT_ATTEMPTS {
        let result: Result<CommandReportResponse, ApiError> = rpc(
            &context.nats,
            context.subjects.rpc_commands_report(),
            &report,
            context.config.rpc_timeout,
        )
        .await;
        match result {
            Err(error) if error.kind == ErrorKind::Unavailable => {
                if let Some(left_out) = WARNINGS.admit("command ack report") {
                    tracing::warn!(error = %error, attempt, left_out, "command ack report failed");
                }
                tokio::select! {
                    _ = context.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200 << attempt)) => {}
                }
            }
            other => {
                answer = Some(other);
                break;
            }
        }
    }
    match answer {
        None => Outcome::Abandoned,
        Some(Ok(response)) if response.found => {
            if response.status == "expired" {
                tracing::info!(command_id = %report.command_id, "ack for an expired command");
            }
            Outcome::Forwarded
        }
        // The registry could not store it (a NUL in the detail, say): a data error that no
        // retry would pass.
        Some(Ok(response)) if !response.invalid.is_empty() => {
            drop_message(topic, "malformed", &response.invalid)
        }
        Some(Ok(_)) => drop_message(topic, "unknown_command", "the device has no such command"),
        Some(Err(error)) => drop_message(topic, "refused", &error.message),
    }
}

#[cfg(test)]
mod tests {
    use fieldline_common::ingest::ParseError;

    use super::DROP_REASONS;

    /// A reason left out of [`DROP_REASONS`] would be missing from dashboards and alerts until
    /// its first drop.
    #[test]
    fn every_drop_reason_is_counted_from_zero() {
        let source = include_str!("lib.rs");
        let mut reasons: Vec<String> = [
            ParseError::Malformed(String::new()),
            ParseError::Invalid(String::new()),
            ParseError::TooMany { count: 2, limit: 1 },
            ParseError::OutOfWindow(String::new()),
        ]
        .iter()
        .map(|error| error.reason().to_owned())
        .collect();
        for (at, _) in source.match_indices("Dropped(\"") {
            let rest = &source[at + "Dropped(\"".len()..];
            reasons.push(rest.chars().take_while(|c| *c != '"').collect());
        }
        for (at, _) in source.match_indices("drop_message(") {
            let rest = &source[at + "drop_message(".len()..];
            let Some(comma) = rest.find(',') else {
                continue;
            };
            let argument = rest[comma + 1..].trim_start();
            if let Some(literal) = argument.strip_prefix('"') {
                reasons.push(literal.chars().take_while(|c| *c != '"').collect());
            }
        }
        assert!(reasons.len() > 8, "{reasons:?}");
        for reason in reasons {
            assert!(DROP_REASONS.contains(&reason.as_str()), "{reason}");
        }
    }
}
