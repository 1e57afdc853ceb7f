//! Several ingest-mqtt instances on one broker, one of them killed for good
//! (docs/decisions/2026-12-05-mqtt-scale-out.md).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use fieldline_common::service::ReadyCheck;
use fieldline_testkit::{TestApp, TestEnv, eventually};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::{Device, topic};

/// Devices publishing at once, and the gap between one device's messages: 200 msg/s in all.
const DEVICES: usize = 10;
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// One of two instances killed under load: every message the broker acknowledged to its
/// device reaches JetStream, the killed instance's share included.
#[tokio::test]
async fn one_of_two_ingest_mqtt_instances_killed_for_good_leaves_0_acknowledged_messages_unstored()
{
    let app = spawn_registry().await;
    let devices = Devices::connect(&app).await;
    let first = Instance::start(&app.env, "first").await;
    let second = Instance::start(&app.env, "second").await;
    first.wait_ready().await;
    second.wait_ready().await;
    wait_for_slots(&app, "second").await;

    let load = devices.publish(&app);
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.kill();
    let killed = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sent = load.stop().await;

    let lost = unstored(&app, &devices, &sent, Duration::from_secs(45)).await;
    let total: i64 = sent.values().sum();
    eprintln!(
        "{total} messages acknowledged by the broker, {lost} not stored; all in {:.1?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        lost, 0,
        "{lost} of {total} acknowledged messages never stored"
    );
    first.stop().await;
    app.shutdown().await;
}

/// The killed instance's slots go to an instance started after it under another name, which
/// then holds its share of them; nothing is lost while they move.
#[tokio::test]
async fn a_replacement_under_a_new_name_takes_over_a_killed_instances_share() {
    let app = spawn_registry().await;
    let devices = Devices::connect(&app).await;
    let first = Instance::start(&app.env, "first").await;
    let second = Instance::start(&app.env, "second").await;
    first.wait_ready().await;
    second.wait_ready().await;
    wait_for_slots(&app, "second").await;

    let load = devices.publish(&app);
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.kill();
    let replacement = Instance::start(&app.env, "replacement").await;
    replacement.wait_ready().await;
    let slots = app.context.config.mqtt_slots;
    let holders = eventually(
        "the replacement holding half the slots",
        Duration::from_secs(30),
        || async {
            let holders = slot_holders(&app).await;
            let count = |name: &str| holders.values().filter(|h| h.starts_with(name)).count();
            (count("replacement") == slots / 2 && count("first") == slots / 2).then_some(holders)
        },
    )
    .await;
    assert!(
        !holders.values().any(|holder| holder.starts_with("second")),
        "{holders:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = load.stop().await;

    let lost = unstored(&app, &devices, &sent, Duration::from_secs(30)).await;
    assert_eq!(lost, 0);
    first.stop().await;
    replacement.stop().await;
    app.shutdown().await;
}

/// A rolling update: an instance stopped as SIGTERM stops it closes its slots' connections
/// and gives the leases back, so the other takes them within a round instead of a lease, and
/// nothing is lost on the way.
#[tokio::test]
async fn a_stopped_instance_hands_its_slots_over_within_a_round() {
    let app = spawn_registry().await;
    let devices = Devices::connect(&app).await;
    let first = Instance::start(&app.env, "first").await;
    let second = Instance::start(&app.env, "second").await;
    first.wait_ready().await;
    second.wait_ready().await;
    wait_for_slots(&app, "second").await;

    let load = devices.publish(&app);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = tokio::time::Instant::now();
    second.stop().await;
    let slots = app.context.config.mqtt_slots;
    eventually(
        "the first holding every slot",
        Duration::from_secs(30),
        || async {
            let holders = slot_holders(&app).await;
            (holders.len() == slots && holders.values().all(|holder| holder.starts_with("first")))
                .then_some(())
        },
    )
    .await;
    let handed_over = stopped.elapsed();
    // A round is a quarter lease (3 s); a lease (12 s) would mean the leases expired.
    assert!(
        handed_over < app.context.config.mqtt_slot_lease / 2,
        "slots taken after {handed_over:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = load.stop().await;
    assert_eq!(
        unstored(&app, &devices, &sent, Duration::from_secs(20)).await,
        0
    );
    eprintln!("slots handed over {handed_over:.1?} after the stop");
    first.stop().await;
    app.shutdown().await;
}

/// A session left by ingest-mqtt before slots (its client id was its host's): named in
/// `mqtt_retired_client_ids`, what it queued is stored, and it is given no more.
#[tokio::test]
async fn a_retired_client_ids_session_is_drained_and_takes_no_more() {
    let app = spawn_registry().await;
    let devices = Devices::connect(&app).await;
    let (id, device) = &devices.devices[0];
    let telemetry = topic(&app, id, "telemetry");
    let old_id = format!("{}-ingest-mqtt-old-host", app.env.id);
    let old = OldSession::subscribe(&app, &old_id).await;
    old.leave().await;
    for n in 1..=20 {
        device
            .publish(&telemetry, &format!(r#"{{"ts": {n}, "n": {n}}}"#))
            .await;
    }
    eventually("pubacks", Duration::from_secs(10), || async {
        (device.pubacks() == 20).then_some(())
    })
    .await;

    let instance = Instance::start_with(&app.env, "new", |config| fieldline_common::Config {
        mqtt_retired_client_ids: format!("someone-else, {old_id}"),
        ..config
    })
    .await;
    instance.wait_ready().await;
    let sent = HashMap::from([(id.clone(), 20)]);
    let single = Devices {
        devices: vec![devices.devices[0].clone()],
    };
    assert_eq!(
        unstored(&app, &single, &sent, Duration::from_secs(20)).await,
        0
    );
    instance.stop().await;

    // Back under its id, the old session is no longer in the share group: of 20 messages
    // the slots' sessions (offline) take all.
    let old = OldSession::resume(&app, &old_id).await;
    for n in 21..=40 {
        device
            .publish(&telemetry, &format!(r#"{{"ts": {n}, "n": {n}}}"#))
            .await;
    }
    eventually("pubacks", Duration::from_secs(10), || async {
        (device.pubacks() == 40).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(old.received(), 0);
    old.leave().await;
    app.shutdown().await;
}

/// A persistent session under ingest-mqtt's account, as ingest-mqtt before slots left one.
struct OldSession {
    client: rumqttc::AsyncClient,
    received: Arc<AtomicI64>,
    events: tokio::task::JoinHandle<()>,
}

impl OldSession {
    /// Joins the telemetry share group under `client_id` and waits for the SUBACK.
    async fn subscribe(app: &TestApp, client_id: &str) -> Self {
        let session = Self::resume(app, client_id).await;
        let config = &app.context.config;
        let filter = format!(
            "$share/{}/{}/+/+/telemetry",
            config.mqtt_share_group, config.mqtt_topic_root
        );
        session
            .client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        session
    }

    /// Connects under `client_id` with a persistent session (once the registry made
    /// ingest-mqtt's account), counting what it is sent.
    async fn resume(app: &TestApp, client_id: &str) -> Self {
        let mut options = app.context.config.mqtt_options(client_id).unwrap();
        options.set_clean_session(false);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let received = Arc::new(AtomicI64::new(0));
        let counter = received.clone();
        let (connected_tx, connected) = tokio::sync::watch::channel(false);
        let events = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = connected_tx.send(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        eventually("ingest account login", Duration::from_secs(10), || async {
            (*connected.borrow()).then_some(())
        })
        .await;
        Self {
            client,
            received,
            events,
        }
    }

    fn received(&self) -> i64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Disconnects, leaving the session at the broker.
    async fn leave(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.events.abort();
    }
}

/// The registry alone (devices and their broker accounts); ingest-mqtt runs in [`Instance`]s.
async fn spawn_registry() -> TestApp {
    let env = TestEnv::new().await.with_broker().await;
    TestApp::spawn(env, |context| async move {
        Ok(vec![device_registry::start(&context).await?])
    })
    .await
}

/// One ingest-mqtt instance on a runtime of its own, as a process of its own would be: killing
/// it drops its connections to the broker and to NATS without a word, as `kill -9` does.
struct Instance {
    runtime: Option<Runtime>,
    ready: ReadyCheck,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Instance {
    /// Starts ingest-mqtt named `name` (its `mqtt_client_id`, as a pod's name would be).
    async fn start(env: &TestEnv, name: &str) -> Self {
        Self::start_with(env, name, |config| config).await
    }

    async fn start_with(
        env: &TestEnv,
        name: &str,
        tweak: impl FnOnce(fieldline_common::Config) -> fieldline_common::Config,
    ) -> Self {
        let config = tweak(fieldline_common::Config {
            mqtt_client_id: Some(format!("{name}-{}", env.id)),
            ..env.config()
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (ready, tasks) = runtime
            .spawn(async move {
                let context = fieldline_common::Context::connect(config, token)
                    .await
                    .unwrap();
                let service = ingest_mqtt::start(&context).await.unwrap();
                (service.ready.unwrap(), context.tasks.clone())
            })
            .await
            .unwrap();
        Self {
            runtime: Some(runtime),
            ready,
            shutdown,
            tasks,
        }
    }

    async fn wait_ready(&self) {
        eventually("ingest-mqtt ready", Duration::from_secs(30), || async {
            (self.ready)().await.ok()
        })
        .await;
    }

    /// Ends the instance at once: no DISCONNECT to the broker, no lease given back.
    fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Shuts the instance down as SIGTERM does.
    async fn stop(mut self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The slot leases now in the bucket: slot key → holder (its instance's name first).
async fn slot_holders(app: &TestApp) -> HashMap<String, String> {
    use futures::TryStreamExt;
    let Ok(store) = app
        .context
        .jetstream
        .get_key_value(app.context.subjects.mqtt_slots_bucket())
        .await
    else {
        return HashMap::new();
    };
    let Ok(keys) = store.keys().await else {
        return HashMap::new();
    };
    let keys: Vec<String> = keys.try_collect().await.unwrap_or_default();
    let mut holders = HashMap::new();
    for key in keys.into_iter().filter(|key| key.starts_with("slot.")) {
        if let Ok(Some(value)) = store.get(&key).await {
            holders.insert(key, String::from_utf8_lossy(&value).into_owned());
        }
    }
    holders
}

/// Waits until the instance named `name` holds a slot (the first to start holds them all
/// until the second joins).
async fn wait_for_slots(app: &TestApp, name: &str) {
    eventually(
        &format!("{name} holding slots"),
        Duration::from_secs(30),
        || async {
            slot_holders(app)
                .await
                .values()
                .any(|holder| holder.starts_with(name))
                .then_some(())
        },
    )
    .await;
}

/// The test's devices, each logged in with its own account.
struct Devices {
    devices: Vec<(String, Arc<Device>)>,
}

impl Devices {
    async fn connect(app: &TestApp) -> Self {
        let mut devices = Vec::new();
        for index in 0..DEVICES {
            let id = format!("d{index}");
            let token = app.create_device(&id).await;
            devices.push((
                id.clone(),
                Arc::new(Device::connect(app, &id, &token).await),
            ));
        }
        Self { devices }
    }

    /// Every device publishes `{"ts": n}` with n = 1, 2, … every [`PUBLISH_EVERY`] at QoS 1
    /// until the load is stopped.
    fn publish(&self, app: &TestApp) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = self
            .devices
            .iter()
            .map(|(id, device)| {
                let (publisher, stop) = (device.clone(), stop.clone());
                let telemetry = topic(app, id, "telemetry");
                let sent = Arc::new(AtomicI64::new(0));
                let counter = sent.clone();
                let task = tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(PUBLISH_EVERY);
                    while !stop.load(Ordering::SeqCst) {
                        ticks.tick().await;
                        let n = counter.load(Ordering::SeqCst) + 1;
                        publisher
                            .publish(&telemetry, &format!(r#"{{"ts": {n}, "n": {n}}}"#))
                            .await;
                        counter.store(n, Ordering::SeqCst);
                    }
                });
                (id.clone(), device.clone(), sent, task)
            })
            .collect();
        Load { stop, tasks }
    }
}

/// One device's publisher: its id, its client, how many it sent, and the task.
type Publisher = (
    String,
    Arc<Device>,
    Arc<AtomicI64>,
    tokio::task::JoinHandle<()>,
);

/// Devices publishing ([`Devices::publish`]).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<Publisher>,
}

impl Load {
    /// Stops publishing and waits until the broker acknowledged every message sent; returns
    /// how many each device sent (its messages are `ts` 1 to that).
    async fn stop(self) -> HashMap<String, i64> {
        self.stop.store(true, Ordering::SeqCst);
        let mut sent = HashMap::new();
        for (id, device, count, task) in self.tasks {
            task.await.unwrap();
            let count = count.load(Ordering::SeqCst);
            eventually(
                "the broker's PUBACK for every message",
                Duration::from_secs(20),
                || async { (device.pubacks() as i64 == count).then_some(()) },
            )
            .await;
            sent.insert(id, count);
        }
        sent
    }
}

/// Waits up to `patience` for every message `sent` to be in JetStream; returns how many are
/// still missing then.
async fn unstored(
    app: &TestApp,
    devices: &Devices,
    sent: &HashMap<String, i64>,
    patience: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut stored: HashMap<String, BTreeSet<i64>> = HashMap::new();
        for (_, batch) in app.telemetry_batches().await {
            let seen = stored.entry(batch.device_id.clone()).or_default();
            seen.extend(batch.readings.iter().map(|reading| reading.ts_us / 1_000));
        }
        let missing: usize = devices
            .devices
            .iter()
            .map(|(id, _)| {
                let seen = stored.get(id);
                (1..=sent[id])
                    .filter(|n| !seen.is_some_and(|seen| seen.contains(n)))
                    .count()
            })
            .sum();
        if missing == 0 || tokio::time::Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
