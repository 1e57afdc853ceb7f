//! Messages that arrive while the process's publishes are busy wait, and then go out together
//! as one bus message: a device's own messages, and under load the waiting messages of other
//! devices of its project too (the multi-device shape of TelemetryBatch). Everything behind
//! the bus (a JetStream publish and its ack, three consumers, the writer's transaction) is
//! then paid once for many MQTT messages.
//!
//! The process publishes at most `FIELDLINE_MQTT_PUBLISHES_IN_FLIGHT` bus messages at once, all
//! devices together. When a place is free, a device with nothing in flight waits for nothing:
//! its message goes out at once, alone, in the single-device shape (light traffic is as it
//! was). While every place is taken, what arrives gathers; the next place freed takes the
//! project's longest-waiting device and, up to [`MAX_COMBINED_READINGS`] and
//! [`MAX_COMBINED_BYTES`], the waiting messages of the project's other devices.
//!
//! A device has at most one bus message in flight: its messages reach JetStream in the order
//! they came. Each MQTT message learns the outcome of the bus message that carried it, and is
//! acked by that alone, so a PUBACK still means its readings are in JetStream. A message with
//! an idempotency key (`msg_id`) goes out alone, under its own `Nats-Msg-Id`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use fieldline_common::ingest::Parsed;
use futures::future::BoxFuture;
use prost::Message;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::task::TaskTracker;

/// Readings one combined bus message carries at most (a lone message may carry more, as it
/// always could).
pub const MAX_COMBINED_READINGS: usize = 500;
/// Encoded readings one combined bus message carries at most: a quarter of NATS's default
/// 1 MB payload limit, whatever the readings hold (a text value may take 4 KiB).
pub const MAX_COMBINED_BYTES: usize = 256 * 1024;
/// Devices looked at past the first for one bus message, at most: those whose next message
/// has an idempotency key are passed over, and the look stays short however many wait.
const MAX_DEVICES_LOOKED_AT: usize = 1_000;

/// Project and device id.
pub type Device = (String, String);

/// What became of a bus message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// In JetStream.
    Published,
    /// More than the bus takes: it never will be.
    TooLarge,
    /// Not published, and not for good (shutting down): leave it to the broker's redelivery.
    Abandoned,
}

/// One device's readings in a bus message, received at the given time (the latest of the
/// MQTT messages they came in).
#[derive(Debug)]
pub struct Part {
    pub device_id: String,
    pub parsed: Parsed,
    pub received_at_us: i64,
}

/// A bus message: one part is the single-device shape (with the message's idempotency key,
/// if it has one), several the multi-device shape.
#[derive(Debug)]
pub struct Outgoing {
    pub project: String,
    pub parts: Vec<Part>,
}

/// Publishes a bus message to JetStream.
pub type PublishFn = dyn Fn(Arc<Outgoing>) -> BoxFuture<'static, Sent> + Send + Sync;

struct Waiting {
    /// Its readings until they are moved into a bus message's [`Part`].
    parsed: Parsed,
    /// How many readings it came with.
    count: usize,
    received_at_us: i64,
    done: oneshot::Sender<Sent>,
}

/// A device present here has messages waiting or a bus message in flight.
#[derive(Default)]
struct Entry {
    /// Messages not yet taken into a bus message, in arrival order.
    queue: VecDeque<Waiting>,
    /// A bus message carrying this device is on its way: the device is in no ready list.
    in_flight: bool,
}

#[derive(Default)]
struct State {
    devices: HashMap<Device, Entry>,
    /// Per project, its devices with messages waiting and nothing in flight, in the order
    /// they became so. Each has a `drive` task spawned for it (or for one taken before it).
    ready: HashMap<String, VecDeque<String>>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone)]
pub struct Coalescer {
    state: Shared,
    publish: Arc<PublishFn>,
    tasks: TaskTracker,
    publishing: Arc<Semaphore>,
}

impl Coalescer {
    /// `publishes`: bus messages in flight at most, all devices together.
    pub fn new(tasks: TaskTracker, publish: Arc<PublishFn>, publishes: usize) -> Self {
        Self {
            state: Arc::default(),
            publish,
            tasks,
            publishing: Arc::new(Semaphore::new(publishes)),
        }
    }

    /// Publishes `parsed` with whatever else is waiting by then; what became of the bus
    /// message that carried it.
    pub async fn publish(&self, device: Device, parsed: Parsed, received_at_us: i64) -> Sent {
        let (done, outcome) = oneshot::channel();
        let waiting = Waiting {
            count: parsed.readings.len(),
            parsed,
            received_at_us,
            done,
        };
        let project = {
            let mut state = lock(&self.state);
            let entry = state.devices.entry(device.clone()).or_default();
            entry.queue.push_back(waiting);
            // Its first message with nothing in flight: it joins its project's ready list.
            if !entry.in_flight && entry.queue.len() == 1 {
                let (project, device_id) = device;
                state
                    .ready
                    .entry(project.clone())
                    .or_default()
                    .push_back(device_id);
                Some(project)
            } else {
                None
            }
        };
        if let Some(project) = project {
            self.spawn_drive(project, 1);
        }
        // A sender dropped unanswered (shutdown, a panic) leaves the message to redelivery.
        outcome.await.unwrap_or(Sent::Abandoned)
    }

    /// `count` tasks publishing the project's ready devices: one per device that became
    /// ready. Its own task, so the publish goes on even if the caller is dropped.
    fn spawn_drive(&self, project: String, count: usize) {
        for _ in 0..count {
            self.tasks.spawn(drive(self.clone(), project.clone()));
        }
    }

    #[cfg(test)]
    fn waiting(&self, device: &Device) -> usize {
        let state = lock(&self.state);
        state
            .devices
            .get(device)
            .map_or(0, |entry| entry.queue.len())
    }
}

/// The devices a bus message carries, marked in flight until `finish`; if the publish ends
/// any other way (a panic), this guard takes them out of the map: their waiting messages are
/// dropped unanswered, so their callers leave them to redelivery, and each device's next
/// message starts afresh.
struct Carried {
    state: Shared,
    project: String,
    devices: Vec<String>,
}

impl Carried {
    /// The bus message is settled: each device is free again; one with messages waiting
    /// rejoins the ready list. Returns how many did.
    fn finish(mut self) -> usize {
        let devices = std::mem::take(&mut self.devices);
        let mut state = lock(&self.state);
        let mut ready = 0;
        for device_id in devices {
            let key = (self.project.clone(), device_id);
            let Some(entry) = state.devices.get_mut(&key) else {
                continue;
            };
            entry.in_flight = false;
            if entry.queue.is_empty() {
                state.devices.remove(&key);
            } else {
                ready += 1;
                state
                    .ready
                    .entry(self.project.clone())
                    .or_default()
                    .push_back(key.1);
            }
        }
        ready
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        if self.devices.is_empty() {
            return;
        }
        let mut state = lock(&self.state);
        for device_id in self.devices.drain(..) {
            state.devices.remove(&(self.project.clone(), device_id));
        }
    }
}

/// Waits for a place among the process's publishes in flight, and only then takes what
/// waits in the project: under load the places are taken, and messages gather meanwhile.
/// Finds nothing when an earlier task took the devices it was spawned for.
async fn drive(coalescer: Coalescer, project: String) {
    // Never closed; an error would only mean no place is ever given, so go without.
    let place = coalescer.publishing.acquire().await.ok();
    let taken = {
        let mut state = lock(&coalescer.state);
        take_next(&mut state, &project)
    };
    if taken.is_empty() {
        return;
    }
    let carried = Carried {
        state: coalescer.state.clone(),
        project: project.clone(),
        devices: taken
            .iter()
            .map(|(device_id, _)| device_id.clone())
            .collect(),
    };
    let publish = &coalescer.publish;
    let mut taken = taken;
    let lone = taken.len() == 1 && taken[0].1.len() == 1;
    let outgoing = Arc::new(Outgoing {
        project: project.clone(),
        parts: taken
            .iter_mut()
            .map(|(device_id, batch)| part(device_id, batch))
            .collect(),
    });
    match publish(outgoing.clone()).await {
        // The bus takes less than assumed: each message alone, in order (none of them has an
        // idempotency key: a message with one is always alone).
        Sent::TooLarge if !lone => {
            for (part, (device_id, batch)) in outgoing.parts.iter().zip(taken) {
                let mut readings = part.parsed.readings.iter().cloned();
                for waiting in batch {
                    let alone = Outgoing {
                        project: project.clone(),
                        parts: vec![Part {
                            device_id: device_id.clone(),
                            parsed: Parsed {
                                readings: readings.by_ref().take(waiting.count).collect(),
                                message_id: None,
                            },
                            received_at_us: waiting.received_at_us,
                        }],
                    };
                    let sent = publish(Arc::new(alone)).await;
                    answer(vec![waiting], sent);
                }
            }
        }
        sent => {
            for (_, batch) in taken {
                answer(batch, sent);
            }
        }
    }
    let ready = carried.finish();
    drop(place);
    coalescer.spawn_drive(project, ready);
}

/// One device's waiting messages as one part: their readings in order (moved, not copied),
/// received at the latest of their times; a message alone keeps its idempotency key.
fn part(device_id: &str, batch: &mut [Waiting]) -> Part {
    let parsed = match batch {
        [one] => std::mem::take(&mut one.parsed),
        _ => {
            let mut readings = Vec::with_capacity(batch.iter().map(|w| w.count).sum());
            for waiting in batch.iter_mut() {
                readings.append(&mut waiting.parsed.readings);
            }
            Parsed {
                readings,
                message_id: None,
            }
        }
    };
    Part {
        device_id: device_id.to_owned(),
        parsed,
        received_at_us: batch
            .iter()
            .map(|waiting| waiting.received_at_us)
            .max()
            .unwrap_or_default(),
    }
}

fn answer(batch: Vec<Waiting>, sent: Sent) {
    for waiting in batch {
        // The caller may be gone (shutdown); its message stays unacked either way.
        let _ = waiting.done.send(sent);
    }
}

/// How much room is left in a bus message.
struct Room {
    readings: usize,
    bytes: usize,
}

fn encoded_bytes(parsed: &Parsed) -> usize {
    parsed
        .readings
        .iter()
        .map(|reading| reading.encoded_len() + 6)
        .sum()
}

/// The next bus message's worth of the project's ready devices, each marked in flight: the
/// longest-waiting device's messages from the front of its queue (one with an idempotency key
/// alone), then, while there is room, the waiting messages of the devices behind it. Messages
/// with an idempotency key are never combined; a device whose next message has one is passed
/// over and keeps its place.
fn take_next(state: &mut State, project: &str) -> Vec<(String, Vec<Waiting>)> {
    let State { devices, ready } = state;
    let Some(line) = ready.get_mut(project) else {
        return Vec::new();
    };
    let mut taken: Vec<(String, Vec<Waiting>)> = Vec::new();
    let mut passed_over = Vec::new();
    let mut room = Room {
        readings: MAX_COMBINED_READINGS,
        bytes: MAX_COMBINED_BYTES,
    };
    let mut looked_at = 0;
    while let Some(device_id) = line.pop_front() {
        let key = (project.to_owned(), device_id);
        let Some(entry) = devices
            .get_mut(&key)
            .filter(|entry| !entry.queue.is_empty())
        else {
            // Not expected (a ready device has messages waiting); nothing to take.
            continue;
        };
        let batch = if taken.is_empty() {
            let keyed = entry
                .queue
                .front()
                .is_some_and(|front| front.parsed.message_id.is_some());
            if keyed {
                let alone: Vec<Waiting> = entry.queue.pop_front().into_iter().collect();
                entry.in_flight = true;
                taken.push((key.1, alone));
                break;
            }
            // The first message goes whatever its size.
            let first = entry.queue.pop_front().into_iter().collect();
            fill(first, &mut entry.queue, &mut room)
        } else {
            looked_at += 1;
            let keyed = entry
                .queue
                .front()
                .is_some_and(|front| front.parsed.message_id.is_some());
            if keyed {
                passed_over.push(key.1);
                if looked_at >= MAX_DEVICES_LOOKED_AT {
                    break;
                }
                continue;
            }
            let batch = fill(Vec::new(), &mut entry.queue, &mut room);
            if batch.is_empty() {
                // Full: it keeps its place at the front.
                line.push_front(key.1);
                break;
            }
            batch
        };
        entry.in_flight = true;
        taken.push((key.1, batch));
        if room.readings == 0 || looked_at >= MAX_DEVICES_LOOKED_AT {
            break;
        }
    }
    for device_id in passed_over.into_iter().rev() {
        line.push_front(device_id);
    }
    if line.is_empty() {
        ready.remove(project);
    }
    taken
}

/// `batch` with the messages from the front of `queue` that fit in `room`, in order, up to
/// the first with an idempotency key; `room` shrinks by what was taken (the messages already
/// in `batch` included, even past it).
fn fill(mut batch: Vec<Waiting>, queue: &mut VecDeque<Waiting>, room: &mut Room) -> Vec<Waiting> {
    for waiting in &batch {
        room.readings = room.readings.saturating_sub(waiting.parsed.readings.len());
        room.bytes = room.bytes.saturating_sub(encoded_bytes(&waiting.parsed));
    }
    if batch
        .first()
        .is_some_and(|first| first.parsed.message_id.is_some())
    {
        return batch;
    }
    while let Some(front) = queue.front() {
        let (readings, bytes) = (front.parsed.readings.len(), encoded_bytes(&front.parsed));
        if front.parsed.message_id.is_some() || readings > room.readings || bytes > room.bytes {
            break;
        }
        room.readings -= readings;
        room.bytes -= bytes;
        batch.extend(queue.pop_front());
    }
    batch
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fieldline_proto::v1::{Reading, reading};
    use futures::FutureExt;
    use tokio::sync::mpsc;

    use super::*;

    /// What the publish function was handed: the metrics of its readings (all devices), its
    /// message id (of a single-device message), its latest received-at time, and its devices.
    type Call = (Vec<String>, Option<String>, i64, Vec<String>);

    /// A call without its devices.
    fn without_devices(call: Call) -> (Vec<String>, Option<String>, i64) {
        (call.0, call.1, call.2)
    }

    /// A coalescer whose publishes are recorded and each wait for a permit of `gate`; each
    /// answers what `outcome` says of its readings.
    fn gated(
        gate: Arc<Semaphore>,
        outcome: fn(&Parsed) -> Sent,
    ) -> (Coalescer, mpsc::UnboundedReceiver<Call>) {
        gated_with_places(gate, outcome, 256)
    }

    /// [`gated`], with `places` publishes in flight at most.
    fn gated_with_places(
        gate: Arc<Semaphore>,
        outcome: fn(&Parsed) -> Sent,
        places: usize,
    ) -> (Coalescer, mpsc::UnboundedReceiver<Call>) {
        let (calls, recorded) = mpsc::unbounded_channel();
        let publish: Arc<PublishFn> = Arc::new(move |outgoing: Arc<Outgoing>| {
            let calls = calls.clone();
            let gate = gate.clone();
            async move {
                let parts = &outgoing.parts;
                let merged = Parsed {
                    readings: parts
                        .iter()
                        .flat_map(|part| part.parsed.readings.iter().cloned())
                        .collect(),
                    message_id: match parts.as_slice() {
                        [one] => one.parsed.message_id.clone(),
                        _ => None,
                    },
                };
                let metrics = merged.readings.iter().map(|r| r.metric.clone()).collect();
                let received_at_us = parts.iter().map(|part| part.received_at_us).max();
                let devices = parts.iter().map(|part| part.device_id.clone()).collect();
                let _ = calls.send((
                    metrics,
                    merged.message_id.clone(),
                    received_at_us.unwrap_or_default(),
                    devices,
                ));
                gate.acquire().await.map(|permit| permit.forget()).ok();
                outcome(&merged)
            }
            .boxed()
        });
        (
            Coalescer::new(TaskTracker::new(), publish, places),
            recorded,
        )
    }

    fn published(_: &Parsed) -> Sent {
        Sent::Published
    }

    fn device() -> Device {
        ("default".to_owned(), "pump-1".to_owned())
    }

    fn message(metrics: &[&str], message_id: Option<&str>) -> Parsed {
        Parsed {
            readings: metrics
                .iter()
                .map(|metric| Reading {
                    metric: (*metric).to_owned(),
                    ts_us: 1,
                    value: Some(reading::Value::Number(1.0)),
                })
                .collect(),
            message_id: message_id.map(str::to_owned),
        }
    }

    /// Sends `parsed` through `coalescer` in a task of its own; its outcome comes back.
    fn send(
        coalescer: &Coalescer,
        parsed: Parsed,
        received_at_us: i64,
    ) -> tokio::task::JoinHandle<Sent> {
        send_as(coalescer, device(), parsed, received_at_us)
    }

    /// [`send`] for another device.
    fn send_as(
        coalescer: &Coalescer,
        device: Device,
        parsed: Parsed,
        received_at_us: i64,
    ) -> tokio::task::JoinHandle<Sent> {
        let coalescer = coalescer.clone();
        tokio::spawn(async move { coalescer.publish(device, parsed, received_at_us).await })
    }

    async fn until_waiting(coalescer: &Coalescer, count: usize) {
        until_waiting_as(coalescer, &device(), count).await
    }

    async fn until_waiting_as(coalescer: &Coalescer, device: &Device, count: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while coalescer.waiting(device) < count {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("messages queued");
    }

    /// Holds the device's first publish at the gate, then queues `rest` behind it one by one.
    async fn queued_behind_one(
        coalescer: &Coalescer,
        calls: &mut mpsc::UnboundedReceiver<Call>,
        rest: Vec<Parsed>,
    ) -> Vec<tokio::task::JoinHandle<Sent>> {
        let mut sent = vec![send(coalescer, message(&["first"], None), 1)];
        assert_eq!(calls.recv().await.unwrap().0, vec!["first".to_owned()]);
        for (index, parsed) in rest.into_iter().enumerate() {
            sent.push(send(coalescer, parsed, 2));
            until_waiting(coalescer, index + 1).await;
        }
        sent
    }

    #[tokio::test]
    async fn a_lone_message_goes_out_at_once() {
        let (coalescer, mut calls) = gated(Arc::new(Semaphore::new(100)), published);
        let sent = coalescer.publish(device(), message(&["t"], None), 7).await;
        assert_eq!(sent, Sent::Published);
        assert_eq!(
            calls.recv().await.map(without_devices),
            Some((vec!["t".to_owned()], None, 7))
        );
        assert_eq!(coalescer.waiting(&device()), 0);
    }

    #[tokio::test]
    async fn messages_arriving_during_a_publish_go_out_together_in_order() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), published);
        let first = send(&coalescer, message(&["a"], None), 1);
        assert_eq!(
            calls.recv().await.map(without_devices),
            Some((vec!["a".to_owned()], None, 1))
        );
        let second = send(&coalescer, message(&["b", "c"], None), 3);
        until_waiting(&coalescer, 1).await;
        let third = send(&coalescer, message(&["d"], None), 2);
        until_waiting(&coalescer, 2).await;
        // Nothing is answered before its bus message is.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!first.is_finished() && !second.is_finished() && !third.is_finished());

        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Sent::Published);
        assert_eq!(
            calls.recv().await.map(without_devices),
            Some((vec!["b".into(), "c".into(), "d".into()], None, 3)),
            "the two waiting messages in one bus message, received at the later time"
        );
        assert_eq!(second.await.unwrap(), Sent::Published);
        assert_eq!(third.await.unwrap(), Sent::Published);
        assert_eq!(coalescer.waiting(&device()), 0);
    }

    #[tokio::test]
    async fn while_every_place_is_taken_another_devices_messages_gather() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated_with_places(gate.clone(), published, 1);
        let first = send(&coalescer, message(&["a"], None), 1);
        assert_eq!(calls.recv().await.unwrap().0, vec!["a".to_owned()]);
        // The one place is taken: the other device's messages wait, none goes out alone.
        let other = ("default".to_owned(), "pump-2".to_owned());
        let mut others = Vec::new();
        for (index, metric) in ["b", "c", "d"].into_iter().enumerate() {
            others.push(send_as(
                &coalescer,
                other.clone(),
                message(&[metric], None),
                2,
            ));
            until_waiting_as(&coalescer, &other, index + 1).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(calls.is_empty(), "a publish started with no place free");

        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Sent::Published);
        assert_eq!(
            calls.recv().await.unwrap().0,
            vec!["b".to_owned(), "c".to_owned(), "d".to_owned()],
            "what gathered goes out as one bus message"
        );
        for outcome in others {
            assert_eq!(outcome.await.unwrap(), Sent::Published);
        }
        assert_eq!(coalescer.waiting(&other), 0);
    }

    #[tokio::test]
    async fn a_message_with_an_idempotency_key_goes_alone() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), published);
        let rest = [None, Some("k1"), None, None]
            .into_iter()
            .map(|id| message(&["m"], id))
            .collect();
        let sent = queued_behind_one(&coalescer, &mut calls, rest).await;
        gate.add_permits(10);
        let mut shapes = Vec::new();
        for _ in 0..3 {
            let (metrics, id, _, _) = calls.recv().await.unwrap();
            shapes.push((metrics.len(), id));
        }
        assert_eq!(shapes, vec![(1, None), (1, Some("k1".into())), (2, None)]);
        for outcome in sent {
            assert_eq!(outcome.await.unwrap(), Sent::Published);
        }
    }

    /// A message of `count` text readings of `len` bytes each.
    fn texts(count: usize, len: usize) -> Parsed {
        Parsed {
            readings: (0..count)
                .map(|_| Reading {
                    metric: "note".to_owned(),
                    ts_us: 1,
                    value: Some(reading::Value::Text("x".repeat(len))),
                })
                .collect(),
            message_id: None,
        }
    }

    #[tokio::test]
    async fn a_combined_message_stays_under_the_reading_and_byte_caps() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), published);
        let rest = vec![
            message(&vec!["x"; MAX_COMBINED_READINGS - 10], None),
            // 20 more would pass the reading cap: the next bus message.
            message(&["y"; 20], None),
            message(&["z"], None),
            // About 200 KiB: fits with the two before it.
            texts(100, 2000),
            // About 60 KiB more would pass the byte cap: the next bus message.
            texts(30, 2000),
            message(&["w"], None),
            // About 400 KiB: over the byte cap alone, so it goes alone.
            texts(200, 2000),
        ];
        let sent = queued_behind_one(&coalescer, &mut calls, rest).await;
        gate.add_permits(10);
        let mut lengths = Vec::new();
        for _ in 0..4 {
            lengths.push(calls.recv().await.unwrap().0.len());
        }
        assert_eq!(lengths, vec![MAX_COMBINED_READINGS - 10, 121, 31, 200]);
        for outcome in sent {
            assert_eq!(outcome.await.unwrap(), Sent::Published);
        }
    }

    #[tokio::test]
    async fn a_combined_message_the_bus_refuses_goes_again_one_message_at_a_time() {
        let gate = Arc::new(Semaphore::new(0));
        // The bus takes at most two readings per message.
        let (coalescer, mut calls) = gated(gate.clone(), |parsed| {
            if parsed.readings.len() > 2 {
                Sent::TooLarge
            } else {
                Sent::Published
            }
        });
        let rest = vec![
            message(&["a", "b"], None),
            message(&["c", "d", "e"], None),
            message(&["f"], None),
        ];
        let sent = queued_behind_one(&coalescer, &mut calls, rest).await;
        gate.add_permits(10);
        let mut shapes = Vec::new();
        for _ in 0..4 {
            shapes.push(calls.recv().await.unwrap().0.concat());
        }
        assert_eq!(shapes, vec!["abcdef", "ab", "cde", "f"]);
        let outcomes: Vec<Sent> = futures::future::join_all(sent)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            outcomes,
            vec![
                Sent::Published,
                Sent::Published,
                Sent::TooLarge,
                Sent::Published
            ]
        );
    }

    #[tokio::test]
    async fn every_message_of_an_abandoned_publish_learns_it() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), |_| Sent::Abandoned);
        let rest = vec![message(&["b"], None), message(&["c"], None)];
        let sent = queued_behind_one(&coalescer, &mut calls, rest).await;
        gate.add_permits(2);
        for outcome in sent {
            assert_eq!(outcome.await.unwrap(), Sent::Abandoned);
        }
        // The device is free again: the next message goes out at once, alone.
        gate.add_permits(1);
        let next = coalescer.publish(device(), message(&["d"], None), 1).await;
        assert_eq!(next, Sent::Abandoned);
        assert_eq!(calls.recv().await.unwrap().0.len(), 2);
        assert_eq!(calls.recv().await.unwrap().0, vec!["d".to_owned()]);
    }

    #[tokio::test]
    async fn a_publish_that_panics_frees_the_device_and_its_waiting_messages() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), |parsed| {
            assert_ne!(parsed.readings[0].metric, "boom", "publish panicked");
            Sent::Published
        });
        let mut sent = vec![send(&coalescer, message(&["boom"], None), 1)];
        calls.recv().await.unwrap();
        sent.push(send(&coalescer, message(&["b"], None), 2));
        until_waiting(&coalescer, 1).await;
        gate.add_permits(10);
        for outcome in sent {
            assert_eq!(outcome.await.unwrap(), Sent::Abandoned);
        }
        assert_eq!(coalescer.waiting(&device()), 0);
        let next = coalescer.publish(device(), message(&["c"], None), 3).await;
        assert_eq!(next, Sent::Published);
    }

    fn pump(number: usize) -> Device {
        ("default".to_owned(), format!("pump-{number}"))
    }

    #[tokio::test]
    async fn while_every_place_is_taken_several_devices_go_out_in_one_bus_message() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated_with_places(gate.clone(), published, 1);
        let first = send_as(&coalescer, pump(1), message(&["a"], None), 1);
        assert_eq!(calls.recv().await.unwrap().0, vec!["a".to_owned()]);
        // The one place is taken: three other devices' messages gather, one of them with an
        // idempotency key, and one of another project.
        let mut others = Vec::new();
        for (number, metrics, key) in [
            (2, vec!["b"], None),
            (3, vec!["c"], Some("k")),
            (4, vec!["d", "e"], None),
            (2, vec!["f"], None),
        ] {
            let before = coalescer.waiting(&pump(number));
            others.push(send_as(
                &coalescer,
                pump(number),
                message(&metrics, key),
                number as i64,
            ));
            until_waiting_as(&coalescer, &pump(number), before + 1).await;
        }
        let elsewhere = ("other".to_owned(), "pump-9".to_owned());
        others.push(send_as(
            &coalescer,
            elsewhere.clone(),
            message(&["z"], None),
            9,
        ));
        until_waiting_as(&coalescer, &elsewhere, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(calls.is_empty(), "a publish started with no place free");

        gate.add_permits(10);
        assert_eq!(first.await.unwrap(), Sent::Published);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (metrics, id, _, devices) = calls.recv().await.unwrap();
            seen.push((devices, metrics, id));
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    vec!["pump-2".to_owned(), "pump-4".to_owned()],
                    vec!["b".into(), "f".into(), "d".into(), "e".into()],
                    None
                ),
                (
                    vec!["pump-3".to_owned()],
                    vec!["c".into()],
                    Some("k".into())
                ),
                (vec!["pump-9".to_owned()], vec!["z".into()], None),
            ],
            "the project's key-less messages in one bus message, a device's in order; the keyed one alone; another project's apart"
        );
        for outcome in others {
            assert_eq!(outcome.await.unwrap(), Sent::Published);
        }
        for number in 1..=4 {
            assert_eq!(coalescer.waiting(&pump(number)), 0);
        }
    }

    #[tokio::test]
    async fn a_device_in_flight_is_never_in_a_second_bus_message() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated_with_places(gate.clone(), published, 2);
        let first = send_as(&coalescer, pump(1), message(&["a"], None), 1);
        assert_eq!(calls.recv().await.unwrap().0, vec!["a".to_owned()]);
        let behind = send_as(&coalescer, pump(1), message(&["b"], None), 2);
        until_waiting_as(&coalescer, &pump(1), 1).await;
        // A place is free: another device goes out at once, alone, without pump-1's waiting
        // message, which waits for pump-1's bus message in flight.
        let other = send_as(&coalescer, pump(2), message(&["c"], None), 3);
        let (metrics, _, _, devices) = calls.recv().await.unwrap();
        assert_eq!(
            (metrics, devices),
            (vec!["c".to_owned()], vec!["pump-2".to_owned()])
        );
        assert_eq!(coalescer.waiting(&pump(1)), 1);
        // pump-1's waiting message goes out once its first is back.
        gate.add_permits(10);
        assert_eq!(first.await.unwrap(), Sent::Published);
        assert_eq!(other.await.unwrap(), Sent::Published);
        assert_eq!(behind.await.unwrap(), Sent::Published);
        let (metrics, _, _, devices) = calls.recv().await.unwrap();
        assert_eq!(
            (metrics, devices),
            (vec!["b".to_owned()], vec!["pump-1".to_owned()])
        );
    }

    #[tokio::test]
    async fn a_multi_device_message_the_bus_refuses_goes_again_one_message_at_a_time() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated_with_places(
            gate.clone(),
            |parsed| {
                if parsed.readings.len() > 2 {
                    Sent::TooLarge
                } else {
                    Sent::Published
                }
            },
            1,
        );
        let first = send_as(&coalescer, pump(1), message(&["a"], None), 1);
        calls.recv().await.unwrap();
        let mut sent = Vec::new();
        for (number, metric) in [(2, "b"), (3, "c"), (2, "d")] {
            let before = coalescer.waiting(&pump(number));
            sent.push(send_as(
                &coalescer,
                pump(number),
                message(&[metric], None),
                2,
            ));
            until_waiting_as(&coalescer, &pump(number), before + 1).await;
        }
        gate.add_permits(10);
        assert_eq!(first.await.unwrap(), Sent::Published);
        let mut shapes = Vec::new();
        for _ in 0..4 {
            let (metrics, _, _, devices) = calls.recv().await.unwrap();
            shapes.push((metrics.concat(), devices.len()));
        }
        assert_eq!(
            shapes,
            vec![
                ("bdc".to_owned(), 2),
                ("b".to_owned(), 1),
                ("d".to_owned(), 1),
                ("c".to_owned(), 1)
            ]
        );
        for outcome in sent {
            assert_eq!(outcome.await.unwrap(), Sent::Published);
        }
    }
}
