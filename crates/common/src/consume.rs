//! One loop for every JetStream consumer (the writer, the registry's state, fan-out, the
//! MQTT downlink): it pulls batches, hands them to a [`Handler`], and settles each message by
//! the [`Outcome`] the handler gives it. Keeping this in one place is what makes "poison never
//! blocks" hold everywhere:
//!
//! - a message that fails for a reason that will not pass is tried a bounded number of times
//!   ([`Config::consumer_max_deliveries`]) and then moved to the dead-letter stream with its
//!   reason, where an operator can inspect, replay or purge it;
//! - a message that cannot be handled because a server is down ([`Outcome::Wait`]) waits, as
//!   long as it takes, and never becomes a dead letter;
//! - long work reports progress (`+WPI`) every third of the ack wait, so JetStream does not
//!   hand the same messages to another instance while they are still being worked on.
//!
//! JetStream's own `max_deliver` is not used: past it the server stops delivering a message
//! without telling anyone but an advisory, and it counts a wait through an outage the same as
//! a failure.
//!
//! [`Config::consumer_max_deliveries`]: crate::Config::consumer_max_deliveries

use std::{future::Future, sync::Arc, time::Duration};

use futures::{FutureExt as _, StreamExt as _};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, AckKind,
        consumer::{AckPolicy, DeliverPolicy, pull},
    },
};
use fieldline_proto::{Stream, Subjects, v1::TelemetryBatch};
use tokio::task::JoinSet;

use crate::{ApiError, Context, ErrorKind, logthrottle::LogThrottle, time::format_rfc3339};

/// Headers a dead letter carries beside the original message's own.
pub mod headers {
    /// The consumer that gave up on it.
    pub const CONSUMER: &str = "Fieldline-Dead-Consumer";
    /// The subject it was published to (a replay goes back there).
    pub const SUBJECT: &str = "Fieldline-Dead-Subject";
    /// Its stream and sequence there.
    pub const STREAM: &str = "Fieldline-Dead-Stream";
    pub const SEQUENCE: &str = "Fieldline-Dead-Sequence";
    /// Why, in the handler's words.
    pub const REASON: &str = "Fieldline-Dead-Reason";
    /// How many times it had been delivered.
    pub const DELIVERIES: &str = "Fieldline-Dead-Deliveries";
    /// When it was given up on (RFC 3339).
    pub const AT: &str = "Fieldline-Dead-At";
    /// The original's `Nats-Msg-Id`, kept aside (the dead letter has its own).
    pub const MSG_ID: &str = "Fieldline-Dead-Msg-Id";
    /// On a replayed message: the one consumer it is for; every other consumer of the stream
    /// acknowledges it untouched.
    pub const REPLAY_FOR: &str = "Fieldline-Replay-For";
    /// On a replayed message: its original stream sequence, so a handler that derives ids
    /// from it (fan-out's event ids) derives the same ones.
    pub const REPLAY_SEQUENCE: &str = "Fieldline-Replay-Sequence";

    /// A message's own headers (a `traceparent`, say): all but its `Nats-Msg-Id` and the
    /// dead-letter and replay headers above, which each copy sets anew.
    pub fn own(from: &async_nats::HeaderMap) -> async_nats::HeaderMap {
        let mut own = async_nats::HeaderMap::new();
        for (name, values) in from.iter() {
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case("Nats-Msg-Id")
                || name.starts_with("Fieldline-Dead-")
                || name.starts_with("Fieldline-Replay-")
            {
                continue;
            }
            for value in values {
                own.append(name, value.as_str());
            }
        }
        own
    }
}

/// The [`Spec::batch_bytes`] of the consumers that have no setting of their own: 16 MiB.
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// How a consumer is set up. The consumer is durable and shared by every instance of the
/// service: that is how the service scales out.
pub struct Spec {
    pub stream: Stream,
    pub name: &'static str,
    pub description: &'static str,
    /// Empty for the whole stream.
    pub filter_subject: String,
    pub deliver_policy: DeliverPolicy,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    /// Most messages handed to the handler at once.
    pub batch: usize,
    /// Most payload bytes handed to the handler at once: a batch is full at `batch`
    /// messages or at this many bytes, whichever comes first, so at most one message past
    /// it (a message larger than this goes alone); a batch of large messages (64 KiB each,
    /// on average) is full at an eighth of it. What a batch costs in memory, decoded,
    /// follows from it.
    pub batch_bytes: usize,
    /// Batches handled at once by one process; beside one in hand, only full ones start (a
    /// part batch waits, filling, for the one in hand to be done).
    pub in_flight: usize,
    /// How long a part batch of small messages gathers before it starts when nothing is in
    /// hand (zero: at once); one that holds a sixteenth of `batch_bytes`, or follows one that
    /// did (the end of an import), starts at once. Beside a batch in hand, a part batch waits
    /// for it whatever this says.
    pub linger: Duration,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (or deliberately skipped): acknowledged.
    Done,
    /// Something it needs is down or busy (a database, the broker): tried again after a
    /// pause, for as long as it takes; never a dead letter.
    Wait(String),
    /// Failed in a way that may not pass (a value the database refuses, a lock table too
    /// small for it): tried again until its deliveries are used, then a dead letter.
    Failed(String),
    /// Can never succeed (it does not decode): a dead letter at once.
    Poison(String),
}

impl Outcome {
    /// A database or bus error: waits when a server is unavailable, fails otherwise.
    pub fn of_error(error: &ApiError) -> Self {
        let reason = match &error.cause {
            Some(cause) => format!("{error} ({cause})"),
            None => error.to_string(),
        };
        match error.kind {
            ErrorKind::Unavailable => Outcome::Wait(reason),
            _ => Outcome::Failed(reason),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Wait(_) => "wait",
            Outcome::Failed(_) => "failed",
            Outcome::Poison(_) => "poison",
        }
    }
}

/// One message as a handler sees it.
pub struct Delivery {
    message: jetstream::Message,
    sequence: u64,
    delivered: i64,
}

impl Delivery {
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    pub fn payload(&self) -> &[u8] {
        self.message.payload.as_ref()
    }

    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }

    /// Its sequence in the stream; for a replayed dead letter, the original's.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// How many times JetStream has delivered it (1 the first time).
    pub fn delivered(&self) -> i64 {
        self.delivered
    }

    /// The telemetry it carries, one single-device batch per device, whichever shape it was
    /// published in ([`Subjects::telemetry_devices`]); one no consumer can take (undecodable,
    /// both shapes at once, a batch on another project's subject) is poison.
    pub fn telemetry(&self, subjects: &Subjects) -> Result<Vec<TelemetryBatch>, Outcome> {
        subjects
            .telemetry_devices(self.subject(), self.payload())
            .map_err(|error| Outcome::Poison(error.to_string()))
    }

    /// The W3C `traceparent` it carries, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers()
            .and_then(|headers| headers.get("traceparent"))
            .map(|value| value.as_str())
    }

    /// When JetStream stored it, in microseconds since the epoch.
    pub fn published_us(&self) -> Option<i64> {
        self.message
            .info()
            .ok()
            .map(|info| (info.published.unix_timestamp_nanos() / 1000) as i64)
    }
}

/// What a consumer does with its messages: one outcome per delivery, in order.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, batch: &[Delivery]) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// Creates the consumer and starts its loop; the loop restarts after a consumer error and
/// stops at shutdown (whatever is being handled then is not acknowledged and comes back).
pub async fn start<H: Handler>(context: &Context, spec: Spec, handler: H) -> anyhow::Result<()> {
    let consumer = context
        .jetstream
        .get_stream(context.subjects.stream_name(spec.stream))
        .await?
        .get_or_create_consumer(
            spec.name,
            pull::Config {
                durable_name: Some(spec.name.to_owned()),
                description: Some(spec.description.to_owned()),
                filter_subject: spec.filter_subject.clone(),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: spec.deliver_policy,
                ack_wait: spec.ack_wait,
                max_ack_pending: spec.max_ack_pending,
                // 0: as many copies as its stream, on the stream's servers
                // (`FIELDLINE_STREAM_REPLICAS`). JetStream moves a durable consumer with its
                // stream when the stream's replicas change; a number here would not follow.
                num_replicas: 0,
                ..Default::default()
            },
        )
        .await?;
    watch_lag(context, &spec, consumer.clone());
    // From 0, so that the first dead letter is an increase an alert sees.
    metrics::counter!("fieldline_dead_letters_total", "consumer" => spec.name).increment(0);
    let looped = Arc::new(Loop {
        context: context.clone(),
        spec,
        handler,
        warnings: LogThrottle::new(Duration::from_secs(10)),
    });
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                result = looped.clone().run(&consumer) => {
                    if let Err(error) = result {
                        tracing::warn!(error = %error, consumer = looped.spec.name, "consumer failed; restarting");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    Ok(())
}

/// Every 10 s, the consumer's backlog as JetStream counts it (shared by every instance, so
/// each reports the same): messages not yet delivered, delivered and not yet acknowledged,
/// and the age of the oldest message not yet acknowledged (the writer's lag is its lag).
fn watch_lag(
    context: &Context,
    spec: &Spec,
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
) {
    let name = spec.name;
    let filter = if spec.filter_subject.is_empty() {
        ">".to_owned()
    } else {
        spec.filter_subject.clone()
    };
    let jetstream = context.jetstream.clone();
    let stream_name = context.subjects.stream_name(spec.stream);
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let Ok(info) = consumer.info().await.cloned() else {
                continue;
            };
            metrics::gauge!("fieldline_consumer_pending_messages", "consumer" => name)
                .set(info.num_pending as f64);
            metrics::gauge!("fieldline_consumer_ack_pending_messages", "consumer" => name)
                .set(info.num_ack_pending as f64);
            let lag = if info.num_pending == 0 && info.num_ack_pending == 0 {
                Some(0.0)
            } else {
                oldest_unacknowledged_age(
                    &jetstream,
                    &stream_name,
                    &filter,
                    info.ack_floor.stream_sequence + 1,
                )
                .await
            };
            if let Some(lag) = lag {
                metrics::gauge!("fieldline_consumer_lag_seconds", "consumer" => name).set(lag);
            }
        }
    });
}

async fn oldest_unacknowledged_age(
    jetstream: &jetstream::Context,
    stream: &str,
    filter: &str,
    from: u64,
) -> Option<f64> {
    let stream = jetstream.get_stream_no_info(stream).await.ok()?;
    let message = stream
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(filter.to_owned())
        .send()
        .await
        .ok()?;
    let published_us = (message.time.unix_timestamp_nanos() / 1000) as i64;
    Some(((crate::time::now_us() - published_us) as f64 / 1e6).max(0.0))
}

/// A part batch lingers until it holds this fraction of `batch_bytes` (1 MiB of the default
/// 16 MiB).
const LINGER_UNTIL_FRACTION: usize = 16;

/// A message is large from this size on: an import's (thousands of readings, many of each
/// series); a live message is one to a few hundred readings, and ingest-mqtt's combined ones
/// 256 KiB at most, mostly far less.
const LARGE_MESSAGE_BYTES: usize = 64 * 1024;

/// A batch of large messages (their mean) is full at this fraction of `batch_bytes` (2 MiB of
/// 16 MiB). Beside a batch in hand only a full one starts: at `batch_bytes`, the first batch
/// of an import went alone and the next waited for it holding all the rest, so the handler
/// ended on one long batch after the bus was done. Full at an eighth, two are in hand while
/// the rest arrives. Small messages still gather up to `batch_bytes`, where many readings of
/// each series in one transaction is what saves work.
const LARGE_FULL_FRACTION: usize = 8;

/// The next batch while it fills: its messages and their payload bytes.
#[derive(Default)]
struct Filling {
    messages: Vec<jetstream::Message>,
    bytes: usize,
    /// When its first message came.
    since: Option<tokio::time::Instant>,
}

impl Filling {
    fn push(&mut self, message: jetstream::Message) {
        self.bytes += message.payload.len();
        self.since.get_or_insert_with(tokio::time::Instant::now);
        self.messages.push(message);
    }

    /// Holds a sixteenth of `batch_bytes` or more: large messages (an import's), which carry
    /// many readings of each series already.
    fn is_heavy(&self, spec: &Spec) -> bool {
        self.bytes >= spec.batch_bytes / LINGER_UNTIL_FRACTION
    }

    /// When it may start with nothing in hand: `linger` after its first message, or at once
    /// when it is heavy or follows a heavy batch (the rest of an import).
    fn due(&self, spec: &Spec, after_heavy: bool) -> tokio::time::Instant {
        let since = self.since.unwrap_or_else(tokio::time::Instant::now);
        if after_heavy || self.is_heavy(spec) {
            since
        } else {
            since + spec.linger
        }
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// At `batch` messages or `batch_bytes` bytes; a batch of large messages at an eighth of
    /// `batch_bytes` ([`LARGE_FULL_FRACTION`]).
    fn is_full(&self, spec: &Spec) -> bool {
        self.messages.len() >= spec.batch
            || self.bytes >= spec.batch_bytes
            || (self.bytes >= spec.batch_bytes / LARGE_FULL_FRACTION
                && self.bytes >= self.messages.len() * LARGE_MESSAGE_BYTES)
    }

    fn take(&mut self) -> Vec<jetstream::Message> {
        self.bytes = 0;
        self.since = None;
        std::mem::take(&mut self.messages)
    }
}

struct Loop<H> {
    context: Context,
    spec: Spec,
    handler: H,
    warnings: LogThrottle,
}

impl<H: Handler> Loop<H> {
    async fn run(
        self: Arc<Self>,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
    ) -> anyhow::Result<()> {
        let in_flight = self.spec.in_flight.max(1);
        let mut messages = crate::bus::pull_messages(consumer, self.spec.batch).await?;
        let mut running = JoinSet::new();
        // The next batch, filling.
        let mut next = Filling::default();
        // Whether the last batch started was heavy: what follows it does not linger.
        let mut after_heavy = false;
        let outcome = loop {
            if running.len() >= in_flight {
                self.log_panic(running.join_next().await);
            }
            // Whatever has been delivered, up to a batch.
            let mut ended = false;
            while !next.is_full(&self.spec) {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => next.push(message),
                    Some(Some(Err(error))) => return self.finish(running, Err(error.into())).await,
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            // With nothing in hand, a part batch goes once it has lingered (at once when
            // `linger` is zero); beside a batch in hand, only a full one does. A part batch
            // keeps filling until the one in hand is done: under a load of small messages,
            // the batches grow instead of queueing behind each other's locks.
            let lingered = next.due(&self.spec, after_heavy) <= tokio::time::Instant::now();
            if !next.is_empty()
                && ((running.is_empty() && lingered) || next.is_full(&self.spec) || ended)
            {
                after_heavy = next.is_heavy(&self.spec);
                running.spawn(self.clone().settle_batch(next.take()));
            }
            if ended {
                break Ok(());
            }
            if running.len() >= in_flight || next.is_full(&self.spec) {
                continue;
            }
            tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(message)) => next.push(message),
                    Some(Err(error)) => break Err(error.into()),
                    None => {
                        if !next.is_empty() {
                            running.spawn(self.clone().settle_batch(next.take()));
                        }
                        break Ok(());
                    }
                },
                joined = running.join_next(), if !running.is_empty() => self.log_panic(joined),
                () = tokio::time::sleep_until(next.due(&self.spec, after_heavy)),
                    if running.is_empty() && !next.is_empty() => {}
            }
        };
        self.finish(running, outcome).await
    }

    /// After a consumer error, what is being handled finishes (and is settled) before the
    /// consumer restarts. At shutdown this future is dropped instead, which aborts the work:
    /// nothing is acknowledged before it is done, so it comes back.
    async fn finish(
        &self,
        mut running: JoinSet<()>,
        outcome: anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        while let Some(joined) = running.join_next().await {
            self.log_panic(Some(joined));
        }
        outcome
    }

    fn log_panic(&self, joined: Option<Result<(), tokio::task::JoinError>>) {
        if let Some(Err(error)) = joined {
            tracing::error!(error = %error, consumer = self.spec.name, "a handler failed; its messages will be delivered again");
        }
    }

    async fn settle_batch(self: Arc<Self>, messages: Vec<jetstream::Message>) {
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            let replay = message.headers.as_ref().and_then(|headers| {
                let consumer = headers.get(headers::REPLAY_FOR)?.as_str().to_owned();
                let sequence = headers
                    .get(headers::REPLAY_SEQUENCE)
                    .and_then(|value| value.as_str().parse().ok());
                Some((consumer, sequence))
            });
            let info = message
                .info()
                .map(|info| (info.stream_sequence, info.delivered));
            let (stream_sequence, delivered) = info.unwrap_or((0, 1));
            let sequence = match replay {
                // Another consumer's replay: nothing for this one to do.
                Some((consumer, _)) if consumer != self.spec.name => {
                    self.ack(&message, AckKind::Ack).await;
                    continue;
                }
                Some((_, Some(original))) => original,
                _ => stream_sequence,
            };
            deliveries.push(Delivery {
                message,
                sequence,
                delivered,
            });
        }
        if deliveries.is_empty() {
            return;
        }
        // One span for the batch: child of its first message's context (so that a message
        // handled alone continues its trace) and linked to every message's.
        let span = tracing::info_span!(
            "process",
            otel.name = tracing::field::Empty,
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.consumer.group.name = self.spec.name,
            messaging.batch.message_count = deliveries.len(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::trace::name(&span, || format!("{} process", self.spec.name));
        if crate::trace::enabled() {
            let contexts: Vec<_> = deliveries
                .iter()
                .map(|delivery| crate::trace::extract_nats(delivery.headers()))
                .collect();
            if let Some(first) = contexts.first() {
                crate::trace::set_parent(&span, first.clone());
            }
            for context in &contexts {
                crate::trace::add_link(&span, context);
            }
            crate::trace::record_ids(&span);
        }
        let mut outcomes =
            tracing::Instrument::instrument(self.with_progress(&deliveries), span).await;
        if outcomes.len() != deliveries.len() {
            tracing::error!(
                consumer = self.spec.name,
                given = outcomes.len(),
                expected = deliveries.len(),
                "a handler gave the wrong number of outcomes; the batch waits"
            );
            outcomes = vec![Outcome::Wait("handler outcome count".into()); deliveries.len()];
        }
        let mut waited = false;
        for (delivery, outcome) in deliveries.iter().zip(outcomes) {
            metrics::counter!("fieldline_consumer_messages_total", "consumer" => self.spec.name, "outcome" => outcome.label()).increment(1);
            match outcome {
                Outcome::Done => self.ack(&delivery.message, AckKind::Ack).await,
                Outcome::Wait(reason) => {
                    waited = true;
                    if let Some(suppressed) = self.warnings.admit("wait") {
                        tracing::warn!(consumer = self.spec.name, reason = %reason, suppressed, "a message waits for a server; it will be tried again");
                    }
                    self.ack(
                        &delivery.message,
                        AckKind::Nak(Some(backoff(delivery.delivered, Duration::from_secs(10)))),
                    )
                    .await;
                }
                Outcome::Failed(reason) if delivery.delivered < self.max_deliveries() => {
                    if let Some(suppressed) = self.warnings.admit("failed") {
                        tracing::warn!(consumer = self.spec.name, subject = delivery.subject(), deliveries = delivery.delivered, reason = %reason, suppressed, "a message failed; it will be tried again");
                    }
                    self.ack(
                        &delivery.message,
                        AckKind::Nak(Some(backoff(delivery.delivered, Duration::from_secs(30)))),
                    )
                    .await;
                }
                Outcome::Failed(reason) | Outcome::Poison(reason) => {
                    self.dead_letter(delivery, &reason).await;
                }
            }
        }
        // A server is down: pause this slot rather than spin through the backlog.
        if waited {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn max_deliveries(&self) -> i64 {
        self.context.config.consumer_max_deliveries
    }

    /// Runs the handler, telling JetStream every third of the ack wait that the messages
    /// are still being worked on.
    async fn with_progress(&self, deliveries: &[Delivery]) -> Vec<Outcome> {
        let work = self.handler.handle(deliveries);
        tokio::pin!(work);
        let every = (self.spec.ack_wait / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                outcomes = &mut work => return outcomes,
                _ = ticker.tick() => {
                    let progress = deliveries.iter().map(|delivery| delivery.message.ack_with(AckKind::Progress));
                    futures::future::join_all(progress).await;
                }
            }
        }
    }

    async fn ack(&self, message: &jetstream::Message, kind: AckKind) {
        if let Err(error) = message.ack_with(kind).await
            && let Some(suppressed) = self.warnings.admit("ack")
        {
            tracing::warn!(consumer = self.spec.name, error = %error, suppressed, "acknowledgement failed; the message will be delivered again");
        }
    }

    /// Copies the message to the dead-letter stream, and only once JetStream has it there,
    /// terminates the original. If the copy fails, the original is tried again later.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) {
        let message = &delivery.message;
        let stream = self.context.subjects.stream_name(self.spec.stream);
        let mut headers = HeaderMap::new();
        if let Some(original) = &message.headers {
            headers = headers::own(original);
            if let Some(id) = original.get("Nats-Msg-Id") {
                headers.insert(headers::MSG_ID, id.as_str());
            }
        }
        // The same message given up on twice (two instances, a lost ack) is one dead letter.
        headers.insert(
            "Nats-Msg-Id",
            format!("dead-{}-{stream}-{}", self.spec.name, delivery.sequence).as_str(),
        );
        headers.insert(headers::CONSUMER, self.spec.name);
        headers.insert(headers::SUBJECT, message.subject.as_str());
        headers.insert(headers::STREAM, stream.as_str());
        headers.insert(headers::SEQUENCE, delivery.sequence.to_string().as_str());
        headers.insert(headers::REASON, header_text(reason).as_str());
        headers.insert(headers::DELIVERIES, delivery.delivered.to_string().as_str());
        headers.insert(headers::AT, format_rfc3339(&chrono::Utc::now()).as_str());
        let subject = self.context.subjects.dead_letter(self.spec.name);
        let stored = match self
            .context
            .jetstream
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
            Err(error) => Err(error.into()),
        };
        match stored {
            Ok(()) => {
                tracing::error!(consumer = self.spec.name, subject = %message.subject, sequence = delivery.sequence, deliveries = delivery.delivered, reason, "message moved to the dead letters");
                metrics::counter!("fieldline_dead_letters_total", "consumer" => self.spec.name)
                    .increment(1);
                self.ack(message, AckKind::Term).await;
            }
            Err(error) => {
                tracing::warn!(consumer = self.spec.name, error = %error, "could not store a dead letter; the message will be tried again");
                self.ack(message, AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
            }
        }
    }
}

/// 1 s after the first delivery, doubling, at most `cap`.
fn backoff(delivered: i64, cap: Duration) -> Duration {
    let doublings = (delivered.max(1) - 1).min(10) as u32;
    (Duration::from_secs(1) * 2u32.pow(doublings)).min(cap)
}

/// A reason as a header value: one line, bounded.
fn header_text(reason: &str) -> String {
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect();
    if line.trim().is_empty() {
        "unspecified".to_owned()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_up_to_its_cap() {
        let cap = Duration::from_secs(30);
        let gaps: Vec<u64> = (1..=7).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(0, cap), Duration::from_secs(1));
    }

    #[test]
    fn a_reason_becomes_one_bounded_header_line() {
        assert_eq!(header_text("bad\r\nvalue\0"), "bad  value ");
        assert_eq!(header_text(&"x".repeat(2000)).len(), 500);
        assert_eq!(header_text(" \n"), "unspecified");
    }
}
