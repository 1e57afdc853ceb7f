//! Device state from the telemetry stream (readings and heartbeats): a durable pull consumer
//! shared by every registry instance, and the sweep that finds devices gone silent, pending
//! alerts whose `for_s` has passed and commands past their TTL.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::DeliverPolicy;
use fieldline_common::{
    ApiError, Context,
    consume::{self, Delivery, Outcome},
    time::{from_us, now_us},
};
use fieldline_proto::{
    Stream, Subjects,
    consumers::REGISTRY_STATE,
    v1::{Heartbeat, TelemetryBatchHead, reading},
};
use prost::Message;
use tokio::sync::Notify;

use crate::repo::{Repo, SeenDevice, state::NumericReading};

/// Messages applied in one transaction at most.
const BATCH: usize = 500;
/// How far ahead of its arrival a reading may be stamped and still be evaluated by alerts.
const MAX_CLOCK_SKEW_US: i64 = 5 * 60 * 1_000_000;
/// Past this many undelivered or unacknowledged messages, the state consumer is behind and
/// `last_seen` may be stale: the offline sweep waits rather than flag busy devices.
const SWEEP_LAG_LIMIT: u64 = 2_000;
/// Devices turned offline per sweep transaction.
const SWEEP_BATCH: i64 = 500;
/// A device's `last_seen` is written at most once per second of its own sightings, or per
/// tenth of its offline window when that is shorter: a device sending 20 readings a second
/// costs one write a second, and the sweep sees it at most that much earlier. Most of those
/// writes leave `offline_after` (indexed) as it is, so they do not touch the indexes either
/// (`Repo::mark_seen`).
const PRESENCE_RESOLUTION_US: i64 = 1_000_000;
/// Devices whose last write each instance remembers; one forgotten is simply written again.
const PRESENCE_CAPACITY: u64 = 200_000;

pub async fn start(context: &Context, repo: Repo, wake: Arc<Notify>) -> anyhow::Result<()> {
    let stream = context
        .jetstream
        .get_stream(context.subjects.stream_name(Stream::Telemetry))
        .await?;
    let default_interval_s = context.config.device_heartbeat_interval.as_secs().max(1) as i32;
    let telemetry_all = context.subjects.telemetry_all();
    let telemetry_prefix = telemetry_all.trim_end_matches('>').to_owned();
    let apply = Apply {
        repo: repo.clone(),
        wake: wake.clone(),
        default_interval_s,
        telemetry_prefix,
        subjects: context.subjects.clone(),
        written: moka::future::Cache::builder()
            .max_capacity(PRESENCE_CAPACITY)
            .time_to_live(Duration::from_secs(10))
            .build(),
    };
    let spec = consume::Spec {
        stream: Stream::Telemetry,
        name: REGISTRY_STATE,
        description: "device-registry: presence and alert rules",
        filter_subject: String::new(),
        // Presence and alerts are about now: a new registry does not replay history.
        deliver_policy: DeliverPolicy::New,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        batch: BATCH,
        batch_bytes: consume::BATCH_BYTES,
        in_flight: 1,
        linger: Duration::ZERO,
    };
    consume::start(context, spec, apply).await?;

    let every = context.config.registry_sweep_interval;
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let lag = match stream.consumer_info(REGISTRY_STATE).await {
                Ok(info) => info.num_pending + info.num_ack_pending as u64,
                Err(error) => {
                    tracing::warn!(error = %error, "could not read the state consumer's lag");
                    u64::MAX
                }
            };
            metrics::gauge!("fieldline_registry_state_lag_messages").set(lag as f64);
            if lag > SWEEP_LAG_LIMIT {
                tracing::warn!(
                    lag,
                    "state consumer behind; offline and alert sweeps postponed"
                );
            } else {
                loop {
                    match repo.sweep_offline(SWEEP_BATCH, default_interval_s).await {
                        Ok(swept) => {
                            if swept.offline > 0 {
                                metrics::counter!("fieldline_registry_offline_total")
                                    .increment(swept.offline as u64);
                                wake.notify_one();
                            }
                            if (swept.examined as i64) < SWEEP_BATCH {
                                break;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "offline sweep failed");
                            break;
                        }
                    }
                }
                // Behind on readings, a pending alert may already have cooled in a message
                // not yet applied: it waits with the offline sweep.
                loop {
                    match repo.fire_due_alerts(SWEEP_BATCH).await {
                        Ok(0) => break,
                        Ok(count) => {
                            metrics::counter!("fieldline_registry_alerts_fired_by_sweep_total")
                                .increment(count as u64);
                            wake.notify_one();
                            if (count as i64) < SWEEP_BATCH {
                                break;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "alert sweep failed");
                            break;
                        }
                    }
                }
            }
            if let Err(error) = repo.expire_commands().await {
                tracing::warn!(error = %error, "command expiry sweep failed");
            }
        }
    });
    Ok(())
}

struct Apply {
    repo: Repo,
    wake: Arc<Notify>,
    default_interval_s: i32,
    telemetry_prefix: String,
    subjects: Subjects,
    /// Devices this instance left online, each with the sighting time before which it is not
    /// written again ([`PRESENCE_RESOLUTION_US`]), and the local time until which that holds.
    written: moka::future::Cache<(String, String), (i64, i64)>,
}

impl consume::Handler for Apply {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let all: Vec<&Delivery> = batch.iter().collect();
        let (mut outcomes, result) = self.apply(&all).await;
        let Err(error) = result else {
            return outcomes;
        };
        let outcome = Outcome::of_error(&error);
        let applied: Vec<usize> = (0..batch.len())
            .filter(|&position| outcomes[position] == Outcome::Done)
            .collect();
        if matches!(outcome, Outcome::Wait(_)) || applied.len() <= 1 {
            for position in applied {
                outcomes[position] = outcome.clone();
            }
            return outcomes;
        }
        // Find the message the database refuses, so it holds back nothing else.
        tracing::warn!(error = %error, messages = applied.len(), "applying device state failed; applying its messages one by one");
        for position in applied {
            if let (_, Err(error)) = self.apply(&[&batch[position]]).await {
                outcomes[position] = Outcome::of_error(&error);
            }
        }
        outcomes
    }
}

impl Apply {
    /// Applies what the messages say in one transaction. The outcomes name the messages
    /// that do not decode (poison); the others share the result.
    async fn apply(&self, messages: &[&Delivery]) -> (Vec<Outcome>, Result<(), ApiError>) {
        let mut outcomes = vec![Outcome::Done; messages.len()];
        let mut seen: HashMap<(String, String), i64> = HashMap::new();
        let mut batches = Vec::new();
        let mut sighted = |project: &str, device_id: &str, received_at_us: i64| {
            let latest = seen
                .entry((project.to_owned(), device_id.to_owned()))
                .or_insert(received_at_us);
            *latest = (*latest).max(received_at_us);
        };
        for (position, message) in messages.iter().enumerate() {
            if message.subject().starts_with(&self.telemetry_prefix) {
                // An import of the past says nothing about the device now: told by the head
                // alone, without decoding its readings (an import brings millions).
                if TelemetryBatchHead::decode(message.payload())
                    .is_ok_and(|head| head.source == "backfill")
                {
                    continue;
                }
                // Each device of a multi-device bus message is seen and evaluated as if it
                // had come alone.
                let devices = match message.telemetry(&self.subjects) {
                    Ok(devices) => devices,
                    Err(poison) => {
                        outcomes[position] = poison;
                        continue;
                    }
                };
                for batch in devices {
                    sighted(&batch.project, &batch.device_id, batch.received_at_us);
                    batches.push(batch);
                }
            } else {
                let Ok(heartbeat) = Heartbeat::decode(message.payload()) else {
                    outcomes[position] = Outcome::Poison("undecodable heartbeat".into());
                    continue;
                };
                sighted(
                    &heartbeat.project,
                    &heartbeat.device_id,
                    heartbeat.received_at_us,
                );
            }
        }
        let mut readings = Vec::new();
        for batch in &batches {
            for reading in &batch.readings {
                // A clock far ahead (an unset RTC) must not move the rule's "newest reading"
                // past every real one to come.
                if reading.ts_us > batch.received_at_us + MAX_CLOCK_SKEW_US {
                    continue;
                }
                if let Some(reading::Value::Number(value)) = reading.value {
                    readings.push(NumericReading {
                        project: &batch.project,
                        device_id: &batch.device_id,
                        metric: &reading.metric,
                        ts_us: reading.ts_us,
                        value,
                    });
                }
            }
        }
        let mut fresh = Vec::with_capacity(seen.len());
        let now = now_us();
        for (device, at_us) in seen {
            // Online and written moments ago, by both clocks: the device's row already says
            // what this sighting would, to within the resolution. A sighting that comes late
            // (a backlog, an edge clock behind) is written, so the status it implies is too.
            match self.written.get(&device).await {
                Some((until, until_local)) if at_us < until && now < until_local => {}
                _ => fresh.push(SeenDevice {
                    project: device.0,
                    device_id: device.1,
                    at: from_us(at_us),
                }),
            }
        }
        match self
            .repo
            .apply_telemetry(&fresh, &readings, self.default_interval_s)
            .await
        {
            Ok(applied) => {
                if applied.events > 0 {
                    self.wake.notify_one();
                }
                let now = now_us();
                for online in applied.online {
                    let resolution = PRESENCE_RESOLUTION_US.min(online.window_us / 10);
                    let until = online.last_seen_us.saturating_add(resolution);
                    self.written
                        .insert(
                            (online.project, online.device_id),
                            (until, now.saturating_add(resolution)),
                        )
                        .await;
                }
                (outcomes, Ok(()))
            }
            Err(error) => (outcomes, Err(error)),
        }
    }
}
