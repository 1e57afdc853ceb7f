//! The platform on a three-node JetStream cluster with every stream kept by three servers
//! (docs/decisions/2026-12-06-jetstream-cluster.md): the server that leads the telemetry
//! stream is killed with SIGKILL under load, and every reading acknowledged (202) must be in
//! PostgreSQL.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fieldline_common::bus;
use fieldline_proto::{Replication, Stream, Subjects, consumers};
use fieldline_testkit::{TestEnv, eventually, servers::NatsCluster};
use reqwest::StatusCode;
use serde_json::json;

use crate::platform::Platform;

const DEVICES: usize = 4;
/// Each device: one request of 5 readings every 100 ms, 200 readings/s in all.
const READINGS_PER_REQUEST: i64 = 5;
const REQUEST_EVERY: Duration = Duration::from_millis(100);
const BEFORE_KILL: Duration = Duration::from_secs(3);
const AFTER_KILL: Duration = Duration::from_secs(8);
/// How long past AFTER_KILL the load may wait for the first 202 after the kill.
const RECOVERY: Duration = Duration::from_secs(30);

/// What the load saw: each acknowledged reading (device, time in ms) and when each 202 came.
#[derive(Default)]
struct Seen {
    acknowledged: HashSet<(String, i64)>,
    acknowledged_at: Vec<Duration>,
    refused: u64,
}

pub async fn telemetry_leader_killed_under_load(platform: &Platform, cluster: &mut NatsCluster) {
    let subjects = Subjects::new(platform.topic_root()).unwrap();
    let telemetry = subjects.stream_name(Stream::Telemetry);
    let client = cluster.client().await;

    // Every stream, the writer's durable consumer and ingest-mqtt's KV bucket are kept by
    // all three servers.
    for stream in Stream::ALL {
        let name = subjects.stream_name(stream);
        let peers = cluster.stream_peers(&client, &name).await;
        assert_eq!(peers.len(), 3, "{name}: {peers:?}");
    }
    let bucket = format!("KV_{}", subjects.mqtt_slots_bucket());
    assert_eq!(cluster.stream_peers(&client, &bucket).await.len(), 3);
    let writer = cluster
        .consumer_peers(&client, &telemetry, consumers::QUERY_WRITER)
        .await;
    assert_eq!(writer.len(), 3, "the writer's consumer: {writer:?}");

    let mut tokens = Vec::new();
    for index in 0..DEVICES {
        let id = format!("cluster-{index}");
        tokens.push((
            id.clone(),
            crate::scenarios::create_device(platform, &id).await,
        ));
    }
    let started = Instant::now();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = platform.url("/api/v1/ingest");
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|(device, token)| {
            let (http, url, seen, stop) = (
                platform.http.clone(),
                url.clone(),
                seen.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(REQUEST_EVERY);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut sequence = 0i64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    ticks.tick().await;
                    let times: Vec<i64> = (1..=READINGS_PER_REQUEST)
                        .map(|n| 1_000_000 + sequence + n)
                        .collect();
                    sequence += READINGS_PER_REQUEST;
                    let body: Vec<_> = times.iter().map(|ts| json!({"ts": ts, "n": ts})).collect();
                    let answer = http.post(&url).bearer_auth(&token).json(&body).send().await;
                    let mut seen = seen.lock().unwrap();
                    match answer.map(|response| response.status()) {
                        Ok(StatusCode::ACCEPTED) => {
                            seen.acknowledged_at.push(started.elapsed());
                            seen.acknowledged
                                .extend(times.iter().map(|ts| (device.clone(), *ts)));
                        }
                        _ => seen.refused += 1,
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(BEFORE_KILL).await;
    let leader = cluster.wait_for_stream_leader(&telemetry).await;
    let killed_at = started.elapsed();
    cluster.kill(&leader);
    tokio::time::sleep(AFTER_KILL).await;
    // A loaded machine (the whole suite beside it) can take longer to elect a new leader and
    // reconnect: the load goes on until 202s come back, for at most RECOVERY.
    let recovery_deadline = Instant::now() + RECOVERY;
    while Instant::now() < recovery_deadline
        && !seen
            .lock()
            .unwrap()
            .acknowledged_at
            .iter()
            .any(|at| *at > killed_at)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let load_ended = started.elapsed();

    // Another server leads the stream now.
    let survivor = cluster.client().await;
    let new_leader = eventually(
        "a new leader of the telemetry stream",
        Duration::from_secs(20),
        || {
            let (cluster, survivor, telemetry) = (&*cluster, &survivor, &telemetry);
            async move { cluster.stream_leader(survivor, telemetry).await }
        },
    )
    .await;
    assert_ne!(new_leader, leader);

    let (acknowledged, mut acknowledged_at, refused) = {
        let seen = seen.lock().unwrap();
        (
            seen.acknowledged.clone(),
            seen.acknowledged_at.clone(),
            seen.refused,
        )
    };
    acknowledged_at.sort();
    let after_kill = acknowledged_at.iter().filter(|at| **at > killed_at).count();
    assert!(after_kill > 0, "no reading was acknowledged after the kill");
    // The longest time from the kill on without a single 202.
    let without_acks = std::iter::once(killed_at)
        .chain(acknowledged_at.iter().copied().filter(|at| *at > killed_at))
        .chain(std::iter::once(load_ended))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default();

    let pg = platform.env.pg().await;
    let missing = eventually(
        "every acknowledged reading in PostgreSQL",
        Duration::from_secs(60),
        || async {
            let rows = pg
                .query(
                    "SELECT s.device_id, (extract(epoch FROM r.ts) * 1000)::int8
                     FROM telemetry.readings r JOIN telemetry.series s USING (series_id)
                     WHERE s.metric = 'n'",
                    &[],
                )
                .await
                .ok()?;
            let stored: HashSet<(String, i64)> = rows
                .iter()
                .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
                .collect();
            let missing = acknowledged.difference(&stored).count();
            (missing == 0).then_some(missing)
        },
    )
    .await;
    eprintln!(
        "cluster of 3, R3: killed {leader} (telemetry leader) at {:.1} s; new leader {new_leader}; \
         {} readings acknowledged ({after_kill} requests after the kill), {refused} requests refused, \
         {missing} lost; {:.2} s without acknowledgements",
        killed_at.as_secs_f64(),
        acknowledged.len(),
        without_acks.as_secs_f64()
    );
    assert_eq!(missing, 0);
}

/// Streams made with one replica (as before the setting) are moved to three by the next
/// start, and their durable consumers with them.
#[tokio::test]
async fn cluster_existing_single_replica_streams_are_brought_to_three() {
    let cluster = NatsCluster::start().await;
    let env = TestEnv::new().await;
    let config = env.config();
    let subjects = config.subjects();
    let client = cluster.client().await;
    let jetstream = async_nats::jetstream::new(client.clone());
    bus::ensure_streams(
        &jetstream,
        &subjects,
        config.stream_limits(),
        &Replication::default(),
    )
    .await
    .unwrap();
    let telemetry = subjects.stream_name(Stream::Telemetry);
    jetstream
        .get_stream(&telemetry)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(consumers::QUERY_WRITER.to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cluster.stream_peers(&client, &telemetry).await.len(), 1);

    let three = Replication {
        replicas: 3,
        placement: Some(async_nats::jetstream::stream::Placement {
            cluster: Some("fieldline-test".into()),
            tags: Vec::new(),
        }),
    };
    bus::ensure_streams(&jetstream, &subjects, config.stream_limits(), &three)
        .await
        .unwrap();
    for stream in Stream::ALL {
        let name = subjects.stream_name(stream);
        eventually(
            &format!("{name} on three servers"),
            Duration::from_secs(30),
            || {
                let (cluster, client, name) = (&cluster, &client, &name);
                async move { (cluster.stream_peers(client, name).await.len() == 3).then_some(()) }
            },
        )
        .await;
    }
    eventually(
        "the consumer on three servers",
        Duration::from_secs(30),
        || async {
            (cluster
                .consumer_peers(&client, &telemetry, consumers::QUERY_WRITER)
                .await
                .len()
                == 3)
                .then_some(())
        },
    )
    .await;
    // Idempotent: a second start changes nothing and does not fail.
    bus::ensure_streams(&jetstream, &subjects, config.stream_limits(), &three)
        .await
        .unwrap();
    env.cleanup().await;
}
