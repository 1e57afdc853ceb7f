//! One device's readings that arrive while its previous bus message is still on its way to
//! JetStream wait, and then go out together as its next one. A TelemetryBatch is one device's
//! readings, so under load each carries several MQTT messages instead of one, and everything
//! behind the bus (three consumers, the series and rollup rows) is paid once for them. The
//! process publishes at most `FIELDLINE_MQTT_PUBLISHES_IN_FLIGHT` bus messages at once, all
//! devices together: while every place is taken, what arrives gathers too. When a place is
//! free, a device with nothing in flight waits for nothing: its message goes out at once.
//!
//! Each MQTT message learns the outcome of the bus message that carried it, and is acked by
//! that alone, so a PUBACK still means its readings are in JetStream. A message with an
//! idempotency key (`msg_id`) goes out alone, under its own `Nats-Msg-Id`.

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

/// Publishes one device's readings, received at the given time (the latest of the messages
/// they came in), to JetStream.
pub type PublishFn = dyn Fn(Device, Arc<Parsed>, i64) -> BoxFuture<'static, Sent> + Send + Sync;

struct Waiting {
    parsed: Parsed,
    received_at_us: i64,
    done: oneshot::Sender<Sent>,
}

/// A device present here has a task publishing its messages; its queue holds those not yet
/// taken into a bus message.
type Queues = Arc<Mutex<HashMap<Device, VecDeque<Waiting>>>>;

#[derive(Clone)]
pub struct Coalescer {
    queues: Queues,
    publish: Arc<PublishFn>,
    tasks: TaskTracker,
    publishing: Arc<Semaphore>,
}

impl Coalescer {
    /// `publishes`: bus messages in flight at most, all devices together.
    pub fn new(tasks: TaskTracker, publish: Arc<PublishFn>, publishes: usize) -> Self {
        Self {
            queues: Arc::default(),
            publish,
            tasks,
            publishing: Arc::new(Semaphore::new(publishes)),
        }
    }

    /// Publishes `parsed` with whatever else of the device is waiting by then; what became
    /// of the bus message that carried it.
    pub async fn publish(&self, device: Device, parsed: Parsed, received_at_us: i64) -> Sent {
        let (done, outcome) = oneshot::channel();
        let waiting = Waiting {
            parsed,
            received_at_us,
            done,
        };
        let lead = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            match queues.get_mut(&device) {
                Some(queue) => {
                    queue.push_back(waiting);
                    false
                }
                None => {
                    queues.insert(device.clone(), VecDeque::from([waiting]));
                    true
                }
            }
        };
        if lead {
            // Its own task: the publish goes on for the others even if this caller is dropped.
            let release = Release {
                queues: self.queues.clone(),
                device: Some(device.clone()),
            };
            self.tasks.spawn(drive(
                release,
                self.publish.clone(),
                self.publishing.clone(),
                device,
            ));
        }
        // A sender dropped unanswered (shutdown, a panic) leaves the message to redelivery.
        outcome.await.unwrap_or(Sent::Abandoned)
    }

    #[cfg(test)]
    fn waiting(&self, device: &Device) -> usize {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.get(device).map_or(0, VecDeque::len)
    }
}

/// The device's place in the map, given back by `drive` when its queue is empty, or by this
/// guard if `drive` ends any other way (a panic): its waiting messages are dropped unanswered,
/// so their callers leave them to redelivery, and the device's next message starts afresh.
struct Release {
    queues: Queues,
    device: Option<Device>,
}

impl Release {
    /// Whether the device has nothing waiting; if so, its place in the map is given back under
    /// the same lock, so a message arriving next starts a task of its own.
    fn nothing_waiting(&mut self) -> bool {
        let Some(device) = &self.device else {
            return true;
        };
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if queues.get(device).is_some_and(|queue| !queue.is_empty()) {
            return false;
        }
        queues.remove(device);
        self.device = None;
        true
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(device) = self.device.take() {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            queues.remove(&device);
        }
    }
}

/// Publishes the device's messages one bus message at a time until none waits. Each bus
/// message waits for a place among the process's publishes in flight and only then takes
/// what waits: under load the places are taken, and a device's messages gather meanwhile.
async fn drive(
    mut release: Release,
    publish: Arc<PublishFn>,
    publishing: Arc<Semaphore>,
    device: Device,
) {
    loop {
        // With nothing waiting, the device leaves the map and takes no place in line.
        if release.nothing_waiting() {
            break;
        }
        // Never closed; an error would only mean no place is ever given, so go without.
        let _place = publishing.acquire().await.ok();
        // Only this task takes from the queue, so it still holds what was seen above.
        let taken = {
            let mut queues = release
                .queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queues.get_mut(&device).map(take_next)
        };
        let Some(mut batch) = taken.filter(|batch| !batch.is_empty()) else {
            continue;
        };
        if let [one] = batch.as_mut_slice() {
            let parsed = Arc::new(std::mem::take(&mut one.parsed));
            let sent = publish(device.clone(), parsed, one.received_at_us).await;
            answer(batch, sent);
        } else {
            let received_at_us = batch
                .iter()
                .map(|waiting| waiting.received_at_us)
                .max()
                .unwrap_or_default();
            let parsed = Arc::new(Parsed {
                readings: batch
                    .iter()
                    .flat_map(|waiting| waiting.parsed.readings.iter().cloned())
                    .collect(),
                message_id: None,
            });
            match publish(device.clone(), parsed, received_at_us).await {
                // The bus takes less than assumed: each message alone, in order.
                Sent::TooLarge => {
                    for mut waiting in batch {
                        let parsed = Arc::new(std::mem::take(&mut waiting.parsed));
                        let sent = publish(device.clone(), parsed, waiting.received_at_us).await;
                        answer(vec![waiting], sent);
                    }
                }
                sent => answer(batch, sent),
            }
        }
    }
}

fn answer(batch: Vec<Waiting>, sent: Sent) {
    for waiting in batch {
        // The caller may be gone (shutdown); its message stays unacked either way.
        let _ = waiting.done.send(sent);
    }
}

/// The next bus message's worth from the front of `queue`, in arrival order: messages without
/// an idempotency key, up to [`MAX_COMBINED_READINGS`] and [`MAX_COMBINED_BYTES`], or one
/// message alone.
fn take_next(queue: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut batch: Vec<Waiting> = Vec::new();
    let (mut readings, mut bytes) = (0, 0);
    while let Some(front) = queue.front() {
        let front_bytes: usize = front
            .parsed
            .readings
            .iter()
            .map(|reading| reading.encoded_len() + 6)
            .sum();
        let fits = match batch.first() {
            None => true,
            Some(first) => {
                first.parsed.message_id.is_none()
                    && front.parsed.message_id.is_none()
                    && readings + front.parsed.readings.len() <= MAX_COMBINED_READINGS
                    && bytes + front_bytes <= MAX_COMBINED_BYTES
            }
        };
        if !fits {
            break;
        }
        readings += front.parsed.readings.len();
        bytes += front_bytes;
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

    /// What the publish function was handed: the metrics of its readings, its message id and
    /// its received-at time.
    type Call = (Vec<String>, Option<String>, i64);

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
        let publish: Arc<PublishFn> =
            Arc::new(move |_device, parsed: Arc<Parsed>, received_at_us| {
                let calls = calls.clone();
                let gate = gate.clone();
                async move {
                    let metrics = parsed.readings.iter().map(|r| r.metric.clone()).collect();
                    let _ = calls.send((metrics, parsed.message_id.clone(), received_at_us));
                    gate.acquire().await.map(|permit| permit.forget()).ok();
                    outcome(&parsed)
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
        assert_eq!(calls.recv().await, Some((vec!["t".to_owned()], None, 7)));
        assert_eq!(coalescer.waiting(&device()), 0);
    }

    #[tokio::test]
    async fn messages_arriving_during_a_publish_go_out_together_in_order() {
        let gate = Arc::new(Semaphore::new(0));
        let (coalescer, mut calls) = gated(gate.clone(), published);
        let first = send(&coalescer, message(&["a"], None), 1);
        assert_eq!(calls.recv().await, Some((vec!["a".to_owned()], None, 1)));
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
            calls.recv().await,
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
            let (metrics, id, _) = calls.recv().await.unwrap();
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
}
