use std::time::Duration;

use fieldline_proto::Stream;
use fieldline_testkit::eventually;

use crate::{number, publish, spawn_query, stored};

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
