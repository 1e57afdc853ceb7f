//! A batch of several devices (what ingest-mqtt publishes under load) is stored like the
//! single-device batches it stands for, and once: a redelivered one stores nothing more.

use std::time::Duration;

use fieldline_proto::v1::TelemetryBatch;
use fieldline_testkit::{TestApp, eventually, multi_device_batch};
use reqwest::StatusCode;

use crate::{number, publish, spawn_query, spawn_query_with, stored};

const T0: i64 = 1_767_225_600_000_000;

/// Each device's series statistics and rollup sums, in device and metric order.
async fn figures(app: &TestApp) -> Vec<(String, i64, Option<f64>, i64, f64, i64, f64)> {
    let pg = app.env.pg().await;
    pg.query(
        "SELECT s.device_id, s.count, s.last_num,
                (SELECT sum(count)::int8 FROM telemetry.rollup_1h h WHERE h.series_id = s.series_id),
                (SELECT sum(sum) FROM telemetry.rollup_1h h WHERE h.series_id = s.series_id),
                (SELECT sum(count)::int8 FROM telemetry.rollup_1d d WHERE d.series_id = s.series_id),
                (SELECT sum(sum) FROM telemetry.rollup_1d d WHERE d.series_id = s.series_id)
         FROM telemetry.series s ORDER BY s.device_id, s.metric",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| {
        (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
            row.get(6),
        )
    })
    .collect()
}

fn two_devices() -> TelemetryBatch {
    multi_device_batch(
        "default",
        vec![
            (
                "d1",
                vec![number("temp", T0, 1.0), number("temp", T0 + 1, 2.0)],
            ),
            ("d2", vec![number("temp", T0, 10.0)]),
        ],
        T0,
    )
}

#[tokio::test]
async fn a_batch_of_several_devices_is_stored_for_each_and_a_redelivered_one_stores_nothing() {
    let app = spawn_query().await;
    for device in ["d1", "d2", "marker"] {
        app.create_device(device).await;
    }
    app.publish_telemetry(&two_devices()).await;
    eventually("both devices stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 2 && stored(&app, "d2").await == 1).then_some(())
    })
    .await;
    let before = figures(&app).await;
    assert_eq!(
        before,
        vec![
            ("d1".to_owned(), 2, Some(2.0), 2, 3.0, 2, 3.0),
            ("d2".to_owned(), 1, Some(10.0), 1, 10.0, 1, 10.0),
        ]
    );
    // Each device reads back over HTTP like one sent alone.
    let (status, body) = app
        .get("/api/v1/devices/d2/readings/latest", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["value"], 10.0, "{body}");

    // The same bus message again (a redelivery, a retried publish), then a marker behind it:
    // once the marker is stored, the writer has been past the repeat.
    app.publish_telemetry(&two_devices()).await;
    publish(&app, "default", "marker", vec![number("temp", T0, 5.0)]).await;
    eventually("the marker stored", Duration::from_secs(10), || async {
        (stored(&app, "marker").await == 1).then_some(())
    })
    .await;
    let after: Vec<_> = figures(&app)
        .await
        .into_iter()
        .filter(|row| row.0 != "marker")
        .collect();
    assert_eq!(after, before, "a repeated batch changed counts or rollups");
    assert_eq!(stored(&app, "d1").await, 2);
    assert_eq!(stored(&app, "d2").await, 1);
    app.shutdown().await;
}

/// A batch that mixes both shapes is no consumer's to guess at: a dead letter at once, with
/// its reason, and the message behind it is stored.
#[tokio::test]
async fn a_batch_mixing_both_shapes_is_a_dead_letter_and_holds_back_nothing() {
    let app = spawn_query_with(|mut config| {
        config.consumer_max_deliveries = 3;
        config
    })
    .await;
    app.create_device("d1").await;
    let mixed = TelemetryBatch {
        device_id: "d1".into(),
        readings: vec![number("temp", T0, 1.0)],
        ..two_devices()
    };
    app.publish_telemetry(&mixed).await;
    publish(&app, "default", "d1", vec![number("temp", T0 + 5, 2.0)]).await;
    let letters = eventually("the dead letter", Duration::from_secs(20), || async {
        let (status, body) = app
            .get(
                "/api/v1/admin/dead-letters?consumer=query-writer",
                app.admin_key(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let letters = body["data"].as_array().unwrap().clone();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("both"), "{reason}");
    assert_eq!(letters[0]["deliveries"], 1, "poison is not retried");
    assert!(
        letters[0]["subject"].as_str().unwrap().ends_with(".batch"),
        "{}",
        letters[0]
    );
    eventually(
        "the next message stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 1).then_some(()) },
    )
    .await;
    app.shutdown().await;
}
