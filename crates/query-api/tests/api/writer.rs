use std::time::Duration;

use fieldline_common::Config;
use fieldline_proto::{
    Stream,
    v1::{Reading, TelemetryBatch},
};
use fieldline_testkit::{TestApp, TestEnv, eventually};
use prost::Message;

use crate::{number, publish, spawn_query, stored, stored_total};

const T0: i64 = 1_767_225_600_000_000;

#[tokio::test]
async fn redelivered_batches_are_stored_once() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    let batch = vec![number("temp", T0, 1.0), number("temp", T0 + 1, 2.0)];
    // The same batch twice on the stream, as after a redelivery or a retried publish.
    publish(&app, "default", "d1", batch.clone()).await;
    publish(&app, "default", "d1", batch.clone()).await;
    publish(&app, "default", "d1", vec![number("temp", T0 + 2, 3.0)]).await;
    eventually("third batch stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await >= 3).then_some(())
    })
    .await;
    // Once more after it was committed: this batch's COPY meets rows already stored, and
    // the statement that skips them must move nothing.
    publish(&app, "default", "d1", batch).await;
    publish(&app, "default", "d1", vec![number("temp", T0 + 3, 4.0)]).await;
    eventually("fifth batch stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await >= 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored(&app, "d1").await, 4);
    // Statistics, latest value and both rollups count each reading once.
    let pg = app.env.pg().await;
    let series = pg
        .query_one(
            "SELECT count, last_num FROM telemetry.series WHERE device_id = 'd1' AND metric = 'temp'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(series.get::<_, i64>(0), 4);
    assert_eq!(series.get::<_, Option<f64>>(1), Some(4.0));
    for table in ["rollup_1h", "rollup_1d"] {
        let rollup = pg
            .query_one(
                &format!(
                    "SELECT sum(count)::int8, sum(sum), min(min), max(max) FROM telemetry.{table}"
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rollup.get::<_, i64>(0), 4, "{table} count");
        assert_eq!(rollup.get::<_, f64>(1), 10.0, "{table} sum");
        assert_eq!(rollup.get::<_, f64>(2), 1.0, "{table} min");
        assert_eq!(rollup.get::<_, f64>(3), 4.0, "{table} max");
    }
    app.shutdown().await;
}

/// The writer acks only after commit: while Postgres cannot take the rows, the message stays
/// unacknowledged, and it is stored once Postgres can.
#[tokio::test]
async fn nothing_is_acked_before_it_is_committed() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    let mut blocker = app.env.pg().await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE telemetry.readings IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    publish(&app, "default", "d1", vec![number("temp", T0, 1.0)]).await;
    let stream_name = app.context.subjects.stream_name(Stream::Telemetry);
    let mut consumer = app
        .context
        .jetstream
        .get_stream(&stream_name)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(query_api::WRITER_CONSUMER)
        .await
        .unwrap();
    eventually(
        "the writer to hold the message",
        Duration::from_secs(10),
        || {
            let mut consumer = consumer.clone();
            async move { (consumer.info().await.unwrap().num_ack_pending == 1).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        consumer.info().await.unwrap().num_ack_pending,
        1,
        "acked before commit"
    );

    tx.rollback().await.unwrap();
    eventually("stored after the lock", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 1).then_some(())
    })
    .await;
    eventually("acked after commit", Duration::from_secs(10), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        }
    })
    .await;
    app.shutdown().await;
}

/// Deadlocks PostgreSQL has broken in `database` since its statistics were last reset. The
/// count is per database, so other tests running at the same time do not move it.
async fn deadlocks(pg: &tokio_postgres::Client, database: &str) -> i64 {
    pg.query_one(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
        &[&database],
    )
    .await
    .unwrap()
    .get(0)
}

/// A query-api process of `env` with small writer batches: many short transactions.
async fn spawn_writer(env: &TestEnv) -> TestApp {
    TestApp::spawn_with(
        env.clone(),
        |config| Config {
            writer_batch_size: 10,
            ..config
        },
        |context| async move { Ok(vec![query_api::start(&context).await?]) },
    )
    .await
}

/// Two query-api processes share the writer consumer, each with two stores in flight: four
/// transactions at once, every one over many of the same series (and some over the same
/// readings, redelivered). None may wait on another in a cycle: PostgreSQL would break it
/// (after `deadlock_timeout`) and count it in `pg_stat_database.deadlocks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_the_same_series_never_deadlock() {
    const DEVICES: usize = 10;
    const METRICS: usize = 20;
    const MESSAGES: usize = 8_000;
    const MINUTE_US: i64 = 60_000_000;
    let env = TestEnv::new().await;
    // Streams and schema first, with every message on the stream before the writers start:
    // they then store as fast as they can.
    let publisher = TestApp::spawn(env.clone(), |_| async { Ok(Vec::new()) }).await;
    let subjects = &publisher.context.subjects;
    let messages: Vec<(String, Vec<u8>)> = (0..MESSAGES)
        .map(|index| {
            let device_id = format!("d{}", index % DEVICES);
            // A day and a half of readings (two partitions), each message a new time of its
            // device.
            let ts_us = T0 + (index / DEVICES) as i64 * MINUTE_US;
            let readings: Vec<Reading> = (0..METRICS)
                .map(|metric| number(&format!("m{metric}"), ts_us, index as f64))
                .collect();
            let batch = TelemetryBatch {
                project: "default".into(),
                device_id: device_id.clone(),
                readings,
                received_at_us: 0,
                source: "test".into(),
                message_id: String::new(),
                devices: Vec::new(),
                series: Vec::new(),
            };
            (
                subjects.telemetry("default", &device_id),
                batch.encode_to_vec(),
            )
        })
        .collect();
    // Every tenth message once more, as after a retried publish.
    let again = messages.iter().step_by(10).cloned();
    let acks = futures::future::join_all(messages.iter().cloned().chain(again).map(
        |(subject, payload)| async {
            publisher
                .context
                .jetstream
                .publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
        },
    ))
    .await;
    assert_eq!(acks.len(), MESSAGES + MESSAGES / 10);

    let pg = env.pg().await;
    let before = deadlocks(&pg, &env.database).await;
    let first = spawn_writer(&env).await;
    let second = spawn_writer(&env).await;
    let expected = (MESSAGES * METRICS) as i64;
    eventually("every reading stored", Duration::from_secs(120), || async {
        (stored_total(&first).await == expected).then_some(())
    })
    .await;
    first.stop().await;
    second.stop().await;
    publisher.stop().await;
    // A backend reports its deadlocks to the statistics when it goes idle or exits: wait
    // for the writers' connections to close.
    eventually("the writers disconnected", Duration::from_secs(30), || async {
        let others: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&env.database],
            )
            .await
            .unwrap()
            .get(0);
        (others == 0).then_some(())
    })
    .await;
    let deadlocks_seen = deadlocks(&pg, &env.database).await - before;

    // Each reading once, and counted once by the series and both rollups.
    let stored: i64 = pg
        .query_one("SELECT count(*) FROM telemetry.readings", &[])
        .await
        .unwrap()
        .get(0);
    let counted: i64 = pg
        .query_one("SELECT sum(count)::int8 FROM telemetry.series", &[])
        .await
        .unwrap()
        .get(0);
    let mut rollups = Vec::new();
    for table in ["rollup_1h", "rollup_1d"] {
        let rollup: i64 = pg
            .query_one(
                &format!("SELECT sum(count)::int8 FROM telemetry.{table}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        rollups.push(rollup);
    }
    env.cleanup().await;
    assert_eq!(deadlocks_seen, 0, "deadlocks between the writers");
    assert_eq!(stored, expected, "readings stored");
    assert_eq!(counted, expected, "readings counted by the series");
    assert_eq!(
        rollups,
        [expected, expected],
        "readings counted by the rollups"
    );
}

/// Holds the first batch it is handed until its gate opens; records every batch's length.
struct HoldsFirst {
    sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

impl fieldline_common::consume::Handler for HoldsFirst {
    async fn handle(
        &self,
        batch: &[fieldline_common::consume::Delivery],
    ) -> Vec<fieldline_common::consume::Outcome> {
        let first = {
            let mut sizes = self.sizes.lock().unwrap();
            sizes.push(batch.len());
            sizes.len() == 1
        };
        if first {
            let _held = self.gate.acquire().await;
        }
        vec![fieldline_common::consume::Outcome::Done; batch.len()]
    }
}

/// Batch lengths as the handler is handed them.
type Lengths = std::sync::Arc<std::sync::Mutex<Vec<usize>>>;

/// A consumer of the test's commands with two batches in flight, as the writer has, whose
/// handler holds the first batch ([`HoldsFirst`]); one message is published and its batch
/// taken in hand. Returns the batch lengths as they come, and the gate that lets the first go.
async fn hold_a_first_batch(
    app: &TestApp,
    name: &'static str,
    batch_bytes: usize,
) -> (Lengths, std::sync::Arc<tokio::sync::Semaphore>) {
    use fieldline_common::consume;

    let sizes = Lengths::default();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let spec = consume::Spec {
        stream: Stream::Commands,
        name,
        description: "test: batch sizes",
        filter_subject: app.context.subjects.commands_all(),
        deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1_000,
        batch: 100,
        batch_bytes,
        in_flight: 2,
        linger: Duration::ZERO,
    };
    let handler = HoldsFirst {
        sizes: sizes.clone(),
        gate: gate.clone(),
    };
    consume::start(&app.context, spec, handler).await.unwrap();
    publish_command(app, vec![b'0']).await;
    eventually(
        "the first batch in hand",
        Duration::from_secs(10),
        || async { (!sizes.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;
    (sizes, gate)
}

/// Publishes `payload` on the test's commands subject and waits for JetStream's ack.
async fn publish_command(app: &TestApp, payload: Vec<u8>) {
    app.context
        .jetstream
        .publish(
            app.context.subjects.commands("default", "d1"),
            payload.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The consumer loop every durable consumer runs (`fieldline_common::consume`), with two
/// batches in flight as the writer has: while one is in hand, what arrives is gathered into
/// one batch that goes when the first is done, instead of small batches that queue behind it.
#[tokio::test]
async fn beside_a_batch_in_hand_a_part_batch_keeps_filling() {
    let app = spawn_query().await;
    let (sizes, gate) = hold_a_first_batch(
        &app,
        "batching-test",
        fieldline_common::consume::BATCH_BYTES,
    )
    .await;
    for n in 1..=20u32 {
        publish_command(&app, n.to_string().into_bytes()).await;
    }
    // Delivered to the loop meanwhile; none may start beside the batch in hand.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*sizes.lock().unwrap(), vec![1]);
    gate.add_permits(1);
    eventually("every message handled", Duration::from_secs(10), || async {
        (sizes.lock().unwrap().iter().sum::<usize>() == 21).then_some(())
    })
    .await;
    assert_eq!(*sizes.lock().unwrap(), vec![1, 20]);
    app.shutdown().await;
}

/// Large messages (an import's, 64 KiB and more) make batches full at an eighth of
/// `batch_bytes`, so they go beside a batch in hand instead of waiting behind it.
#[tokio::test]
async fn large_messages_make_batches_full_at_an_eighth_of_the_bytes() {
    let app = spawn_query().await;
    // A batch of large messages is full at 131,072 bytes: two of 70,000.
    let (sizes, gate) = hold_a_first_batch(&app, "large-batching-test", 1024 * 1024).await;
    for _ in 0..20 {
        publish_command(&app, vec![b'x'; 70_000]).await;
    }
    // Beside the batch held, full batches of two go one after the other.
    eventually(
        "the large messages handled beside the batch held",
        Duration::from_secs(10),
        || async { (sizes.lock().unwrap().iter().sum::<usize>() == 21).then_some(()) },
    )
    .await;
    assert_eq!(*sizes.lock().unwrap(), [vec![1], vec![2; 10]].concat());
    gate.add_permits(1);
    app.shutdown().await;
}

/// Records each batch it is handed: its messages' payload sizes.
struct SizeRecorder(std::sync::Arc<std::sync::Mutex<Vec<Vec<usize>>>>);

impl fieldline_common::consume::Handler for SizeRecorder {
    async fn handle(
        &self,
        batch: &[fieldline_common::consume::Delivery],
    ) -> Vec<fieldline_common::consume::Outcome> {
        let sizes = batch.iter().map(|d| d.payload().len()).collect();
        self.0.lock().unwrap().push(sizes);
        vec![fieldline_common::consume::Outcome::Done; batch.len()]
    }
}

/// With nothing in hand, a part batch of small messages gathers for `linger` (so the writer
/// stores more readings of each series per transaction); one that holds a sixteenth of
/// `batch_bytes` (an import's large messages) starts at once, and so does the one after it.
#[tokio::test]
async fn a_part_batch_of_small_messages_lingers_and_large_ones_go_at_once() {
    use std::sync::{Arc, Mutex};

    use fieldline_common::consume;

    let app = spawn_query().await;
    let subjects = &app.context.subjects;
    let batches = Arc::new(Mutex::new(Vec::new()));
    let linger = Duration::from_secs(5);
    let spec = consume::Spec {
        stream: Stream::Commands,
        name: "linger-test",
        description: "test: linger",
        filter_subject: subjects.commands_all(),
        deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1_000,
        batch: 100,
        batch_bytes: 16_000,
        in_flight: 1,
        linger,
    };
    consume::start(&app.context, spec, SizeRecorder(batches.clone()))
        .await
        .unwrap();
    let publish = |size: usize| publish_command(&app, vec![b'x'; size]);
    let first = std::time::Instant::now();
    for _ in 0..5 {
        publish(10).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        batches.lock().unwrap().is_empty(),
        "started before its linger"
    );
    eventually(
        "the small messages handled",
        Duration::from_secs(15),
        || async { (!batches.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;
    assert!(
        first.elapsed() >= linger,
        "started after {:?}",
        first.elapsed()
    );
    assert_eq!(*batches.lock().unwrap(), vec![vec![10; 5]], "one batch");

    // 1,000 bytes of 16,000: no lingering.
    let sent = std::time::Instant::now();
    publish(1_000).await;
    eventually(
        "the large message handled",
        Duration::from_secs(15),
        || async { (batches.lock().unwrap().len() == 2).then_some(()) },
    )
    .await;
    assert!(
        sent.elapsed() < linger,
        "a large message lingered: {:?}",
        sent.elapsed()
    );
    assert_eq!(batches.lock().unwrap()[1], vec![1_000]);

    // After a heavy batch (an import's), what is left of it does not linger either.
    let sent = std::time::Instant::now();
    publish(10).await;
    eventually("the rest handled", Duration::from_secs(15), || async {
        (batches.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    assert!(
        sent.elapsed() < linger,
        "the rest lingered: {:?}",
        sent.elapsed()
    );
    app.shutdown().await;
}

/// A batch is full at `batch_bytes` of payload as well as at `batch` messages: at most one
/// message goes past the bytes, and a message larger than them goes alone. What a writer
/// transaction holds in memory follows from it, however large an import.
#[tokio::test]
async fn a_batch_is_full_at_its_bytes() {
    use std::sync::{Arc, Mutex};

    use fieldline_common::consume;

    let app = spawn_query().await;
    let subjects = &app.context.subjects;
    // Waiting before the consumer starts, so that batches can fill: 100-byte messages, and
    // one of 1,000 bytes among them.
    let mut sent = Vec::new();
    for n in 0..30 {
        let size = if n == 12 { 1_000 } else { 100 };
        publish_command(&app, vec![b'x'; size]).await;
        sent.push(size);
    }
    let batches = Arc::new(Mutex::new(Vec::new()));
    let spec = consume::Spec {
        stream: Stream::Commands,
        name: "batch-bytes-test",
        description: "test: batch bytes",
        filter_subject: subjects.commands_all(),
        deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1_000,
        batch: 100,
        batch_bytes: 250,
        in_flight: 1,
        linger: Duration::ZERO,
    };
    consume::start(&app.context, spec, SizeRecorder(batches.clone()))
        .await
        .unwrap();
    eventually("every message handled", Duration::from_secs(10), || async {
        let handled: usize = batches.lock().unwrap().iter().map(Vec::len).sum();
        (handled == sent.len()).then_some(())
    })
    .await;
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.concat(), sent, "every message once, in order");
    for batch in &batches {
        let before_last: usize = batch[..batch.len() - 1].iter().sum();
        assert!(
            before_last < 250,
            "a batch went on past its bytes: {batch:?}"
        );
    }
    // Filled to the bytes, not to the 100 messages: three of 100 bytes at most.
    assert!(batches.iter().all(|batch| batch.len() <= 3), "{batches:?}");
    assert!(batches.iter().any(|batch| batch.len() == 3), "{batches:?}");
    app.shutdown().await;
}
