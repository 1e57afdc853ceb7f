//! Uplink slots: the fixed set of broker sessions that the ingest-mqtt instances share.
//!
//! The broker queues a persistent session's share of the shared subscription while nobody
//! is connected under its client id, so an instance killed for good, whose client id no
//! instance ever uses again, strands that share (issue 16: half the messages after a kill).
//! Clean sessions would not: Mosquitto drops a clean session's unacknowledged messages with
//! it, already PUBACKed to their devices. So the uplink joins under `mqtt_slots` client ids
//! that do not depend on which instances run (`{bus_prefix}-ingest-mqtt-slot-{k}`), and the
//! live instances lease them in a NATS KV bucket whose `max_age` is the lease:
//! - a holder refreshes each lease every quarter lease by a revision-checked `update`; an
//!   instance that dies stops refreshing, its leases expire, and a live instance `create`s
//!   the key again and connects under that slot's id, getting what the broker queued for it
//!   and what the dead one had not acknowledged;
//! - each instance refreshes a member key too, holds at most ceil(slots ÷ members), and
//!   gives back extras (disconnected first), so that a new instance gets its share;
//! - a holder whose lease is not confirmed in time stops that connection a quarter lease
//!   before the lease can expire (a watchdog per connection, apart from the loop that
//!   refreshes, so a stuck refresh cannot keep it up), and never reconnects past it.
//!
//! Two connections under one slot id at once need a holder stalled past its own lease (a
//! frozen process): Mosquitto then closes the older connection and hands the session with
//! its unacknowledged messages to the newer. What the older had published but not acked is
//! published again: a duplicate that the JetStream msg id window and the readings' natural
//! key (`ON CONFLICT DO NOTHING`) store once.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use fieldline_common::Context;
use futures::{TryStreamExt, future::join_all};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// Slot `k`'s key in the bucket.
fn slot_key(slot: usize) -> String {
    format!("slot.{slot}")
}

const MEMBER_PREFIX: &str = "member.";

/// A connection under a slot's client id, started by [`Slots::start`]'s caller.
pub struct Started {
    /// Connected and subscribed.
    pub connected: Arc<AtomicBool>,
    /// Ends once the connection is closed (after its DISCONNECT, or at once when the broker
    /// is gone).
    pub done: JoinHandle<()>,
}

/// Starts the uplink connection of a slot: `(slot, stop, lease_end)`. It stops when `stop` is
/// cancelled, and must not connect again once `lease_end` has passed.
pub type Connect =
    dyn Fn(usize, CancellationToken, watch::Receiver<Instant>) -> Started + Send + Sync;

/// What readiness reports.
#[derive(Default)]
pub struct Status {
    /// A round of leasing went through since start.
    joined: bool,
    /// Live instances (their member keys), this one included.
    members: usize,
    slots: usize,
    held: Vec<Arc<AtomicBool>>,
}

impl Status {
    /// Ready once this instance holds its slots (none only when there are as many
    /// instances as slots) and each is connected and subscribed.
    pub fn check(&self) -> Result<(), String> {
        let down = self
            .held
            .iter()
            .filter(|connected| !connected.load(Ordering::Relaxed))
            .count();
        if !self.joined {
            Err("no uplink slot leased yet (NATS KV)".to_owned())
        } else if self.held.is_empty() && self.members < self.slots {
            Err(format!(
                "holds none of the {} uplink slots ({} instances)",
                self.slots, self.members
            ))
        } else if down > 0 {
            Err(format!(
                "{down} of its {} uplink slots not connected to the broker",
                self.held.len()
            ))
        } else {
            Ok(())
        }
    }
}

/// A slot this instance holds.
struct Held {
    revision: u64,
    /// When the connection must be closed unless the lease is confirmed again.
    lease_end: watch::Sender<Instant>,
    stop: CancellationToken,
    connected: Arc<AtomicBool>,
    done: JoinHandle<()>,
}

/// The leasing loop of one instance.
pub struct Slots {
    store: kv::Store,
    jetstream: jetstream::Context,
    /// The bucket's stream, made again if it is gone (a NATS that lost its store).
    bucket_stream: stream::Config,
    /// Written as the holder of every lease: the instance's name and its member id.
    holder: bytes::Bytes,
    member_key: String,
    slots: usize,
    lease: Duration,
    connect: Box<Connect>,
    status: Arc<Mutex<Status>>,
}

impl Slots {
    /// Opens (or creates) the lease bucket and starts leasing; returns the readiness status.
    pub async fn start(
        context: &Context,
        name: &str,
        connect: Box<Connect>,
    ) -> anyhow::Result<Arc<Mutex<Status>>> {
        let config = &context.config;
        let bucket = context.subjects.mqtt_slots_bucket();
        let bucket_stream = config
            .stream_replication()
            .apply(bucket_stream(&bucket, config.mqtt_slot_lease));
        // A bucket made with another lease keeps it (below); its copies follow the setting.
        fieldline_common::bus::ensure_stream(
            &context.jetstream,
            bucket_stream.clone(),
            fieldline_common::bus::Reconcile::Replicas,
        )
        .await
        .with_context(|| format!("creating the KV bucket {bucket}"))?;
        let store = context
            .jetstream
            .get_key_value(&bucket)
            .await
            .with_context(|| format!("opening the KV bucket {bucket}"))?;
        // A bucket made by an instance with another setting keeps its own: the lease is
        // whatever the bucket expires entries after.
        let lease = store
            .status()
            .await
            .map(|status| status.max_age())
            .unwrap_or(config.mqtt_slot_lease);
        let member_id = fieldline_common::ids::random_id("", 12);
        let status = Arc::new(Mutex::new(Status {
            slots: config.mqtt_slots,
            ..Status::default()
        }));
        let slots = Self {
            store,
            jetstream: context.jetstream.clone(),
            bucket_stream,
            holder: format!("{name} {member_id}").into(),
            member_key: format!("{MEMBER_PREFIX}{member_id}"),
            slots: config.mqtt_slots,
            lease,
            connect,
            status: status.clone(),
        };
        tracing::info!(slots = slots.slots, lease = ?lease, member = %member_id, "mqtt uplink slots leasing");
        context.tasks.spawn(slots.run(context.shutdown.clone()));
        Ok(status)
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut held: BTreeMap<usize, Held> = BTreeMap::new();
        let mut ticks = tokio::time::interval(self.lease / 4);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.round(&mut held, &shutdown).await;
            metrics::gauge!("fieldline_mqtt_slots_held").set(held.len() as f64);
            let up = held
                .values()
                .filter(|held| held.connected.load(Ordering::Relaxed))
                .count();
            metrics::gauge!("fieldline_mqtt_connections_up").set(up as f64);
        }
        // Given back at once, so that the other instances need not wait for the leases to
        // expire. The connections stop with the shutdown; each lease goes once its
        // connection is closed.
        let released = held
            .into_iter()
            .map(|(slot, held)| self.release(slot, held));
        join_all(released).await;
        let _ = tokio::time::timeout(self.bound(), self.store.delete(&self.member_key)).await;
    }

    /// The longest one request to the bucket may take: a round must end in time to refresh.
    fn bound(&self) -> Duration {
        self.lease / 8
    }

    /// When a lease written at `sent` must be let go of unless confirmed again.
    fn lease_end(&self, sent: Instant) -> Instant {
        sent + self.lease - self.lease / 4
    }

    /// Refreshes this instance's leases and membership, then gives back or takes slots
    /// towards its share.
    async fn round(&self, held: &mut BTreeMap<usize, Held>, shutdown: &CancellationToken) {
        let bound = self.bound();
        // Only this instance writes its member key: no revision to check.
        let member =
            tokio::time::timeout(bound, self.store.put(&self.member_key, self.holder.clone()))
                .await;
        let refreshes = held.iter().map(|(slot, held)| async move {
            let sent = Instant::now();
            let result = tokio::time::timeout(
                bound,
                self.store
                    .update(slot_key(*slot), self.holder.clone(), held.revision),
            )
            .await;
            (*slot, sent, result)
        });
        for (slot, sent, result) in join_all(refreshes).await {
            let Some(slot_held) = held.get_mut(&slot) else {
                continue;
            };
            match result {
                Ok(Ok(revision)) => {
                    slot_held.revision = revision;
                    slot_held.lease_end.send_replace(self.lease_end(sent));
                }
                // Expired, and perhaps taken: stop now.
                Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(slot, "mqtt slot lease lost; disconnecting");
                    slot_held.stop.cancel();
                }
                Ok(Err(error)) => {
                    tracing::warn!(slot, error = %error, "mqtt slot lease not refreshed");
                }
                Err(_) => tracing::warn!(slot, "mqtt slot lease not refreshed in time"),
            }
        }
        // Stopped: lost above, or by the watchdog when refreshes failed for too long. A
        // lease refreshed since (NATS was slow, not gone) is given back rather than left to
        // expire with no connection under it; one another instance holds is not touched (the
        // delete checks the revision).
        let stopped: Vec<usize> = held
            .iter()
            .filter(|(_, held)| held.stop.is_cancelled())
            .map(|(slot, _)| *slot)
            .collect();
        let lost = stopped
            .into_iter()
            .filter_map(|slot| Some((slot, held.remove(&slot)?)));
        // All at once: the leases still held wait for the next round to be refreshed.
        join_all(lost.map(|(slot, lost)| self.release(slot, lost))).await;
        if shutdown.is_cancelled() {
            return;
        }
        let view = match member {
            Ok(Ok(_)) => tokio::time::timeout(bound, self.view()).await.ok(),
            _ => None,
        };
        let Some(Ok((members, taken))) = view else {
            self.publish_status(held, None);
            // A NATS that lost its store lost the bucket too (not found, or the requests
            // time out); a failure in passing costs one lookup.
            let _ = tokio::time::timeout(
                bound,
                self.jetstream
                    .get_or_create_stream(self.bucket_stream.clone()),
            )
            .await;
            return;
        };
        let share = self.slots.div_ceil(members.max(1));
        // Extras go highest first, so that the instances agree on which to take.
        let mut extras = Vec::new();
        while held.len() > share {
            let Some((slot, extra)) = held.pop_last() else {
                break;
            };
            tracing::info!(slot, share, members, "giving back an mqtt slot");
            extras.push(self.release(slot, extra));
        }
        join_all(extras).await;
        for slot in 0..self.slots {
            if held.len() >= share {
                break;
            }
            if taken.contains(&slot) || held.contains_key(&slot) {
                continue;
            }
            let sent = Instant::now();
            let created = tokio::time::timeout(
                bound,
                self.store.create(slot_key(slot), self.holder.clone()),
            )
            .await;
            let revision = match created {
                Ok(Ok(revision)) => revision,
                // Another instance was first.
                Ok(Err(_)) => continue,
                // The bucket does not answer: the next round, rather than hold up the
                // refreshes behind more of these.
                Err(_) => break,
            };
            tracing::info!(slot, share, members, "mqtt slot leased; connecting");
            held.insert(slot, self.take(slot, revision, sent, shutdown));
        }
        self.publish_status(held, Some(members));
    }

    /// The live instances and the slots leased now (by any instance).
    async fn view(&self) -> anyhow::Result<(usize, BTreeSet<usize>)> {
        let keys: Vec<String> = self.store.keys().await?.try_collect().await?;
        let members = keys
            .iter()
            .filter(|key| key.starts_with(MEMBER_PREFIX))
            .count();
        let taken = keys
            .iter()
            .filter_map(|key| key.strip_prefix("slot.")?.parse().ok())
            .collect();
        Ok((members, taken))
    }

    /// Connects under a slot just leased, with a watchdog that stops the connection when the
    /// lease runs out unconfirmed.
    fn take(
        &self,
        slot: usize,
        revision: u64,
        sent: Instant,
        shutdown: &CancellationToken,
    ) -> Held {
        let stop = shutdown.child_token();
        let (lease_end, lease_end_rx) = watch::channel(self.lease_end(sent));
        let started = (self.connect)(slot, stop.clone(), lease_end_rx.clone());
        tokio::spawn(watchdog(slot, stop.clone(), lease_end_rx));
        Held {
            revision,
            lease_end,
            stop,
            connected: started.connected,
            done: started.done,
        }
    }

    /// Closes the slot's connection, then gives the lease back: the next holder connects
    /// only after this one has left.
    async fn release(&self, slot: usize, held: Held) {
        held.stop.cancel();
        let _ = held.done.await;
        let _ = tokio::time::timeout(
            self.bound(),
            self.store
                .delete_expect_revision(slot_key(slot), Some(held.revision)),
        )
        .await;
    }

    fn publish_status(&self, held: &BTreeMap<usize, Held>, members: Option<usize>) {
        let Ok(mut status) = self.status.lock() else {
            return;
        };
        if let Some(members) = members {
            status.joined = true;
            status.members = members;
        }
        status.held = held.values().map(|held| held.connected.clone()).collect();
    }
}

/// The stream of the lease bucket, as `create_key_value` defines a bucket's (which asks for
/// account details that nats-server 2.9 answers in a form async-nats does not read), with
/// `max_age` the lease.
fn bucket_stream(bucket: &str, lease: Duration) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("ingest-mqtt: leases of the uplink slots".to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        max_age: lease,
        // On file, as the streams are: a NATS restart shorter than a lease keeps every
        // holder's leases, so nothing moves.
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Stops a slot's connection once its lease end passes unconfirmed.
async fn watchdog(slot: usize, stop: CancellationToken, mut lease_end: watch::Receiver<Instant>) {
    loop {
        let end = *lease_end.borrow_and_update();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(end) => {
                if *lease_end.borrow() <= Instant::now() {
                    tracing::warn!(slot, "mqtt slot lease not confirmed in time; disconnecting before it can expire");
                    stop.cancel();
                    return;
                }
            }
            changed = lease_end.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(joined: bool, members: usize, held: &[bool]) -> Status {
        Status {
            joined,
            members,
            slots: 8,
            held: held
                .iter()
                .map(|connected| Arc::new(AtomicBool::new(*connected)))
                .collect(),
        }
    }

    #[test]
    fn ready_once_it_holds_slots_all_connected_or_there_are_more_instances_than_slots() {
        assert!(status(false, 0, &[]).check().is_err());
        assert!(status(true, 2, &[]).check().is_err());
        assert!(status(true, 2, &[true, false]).check().is_err());
        assert!(status(true, 2, &[true, true, true, true]).check().is_ok());
        // A ninth instance of eight slots holds none and serves the downlink.
        assert!(status(true, 9, &[]).check().is_ok());
    }
}
