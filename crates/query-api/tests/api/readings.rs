use std::time::Duration;

use fieldline_proto::v1::{Reading, reading};
use fieldline_testkit::{assert_error, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{number, publish, spawn_query, stored};

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

#[tokio::test]
async fn history_comes_back_in_order_with_its_types_and_pages() {
    let app = spawn_query().await;
    app.create_device("esp32-1").await;
    let mut readings: Vec<Reading> = (0..25)
        .map(|i| number("temp", T0 + i * 1_000_000, i as f64 + 0.5))
        .collect();
    readings.push(Reading {
        metric: "door".into(),
        ts_us: T0,
        value: Some(reading::Value::Boolean(true)),
    });
    readings.push(Reading {
        metric: "fw".into(),
        ts_us: T0 + 1,
        value: Some(reading::Value::Text("1.2.0".into())),
    });
    publish(&app, "default", "esp32-1", readings).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "esp32-1").await == 27).then_some(())
    })
    .await;

    let (status, body) = app
        .get("/api/v1/devices/esp32-1/readings?limit=3", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!([
            {"metric": "door", "ts": "2026-01-01T00:00:00Z", "value": true},
            {"metric": "temp", "ts": "2026-01-01T00:00:00Z", "value": 0.5},
            {"metric": "fw", "ts": "2026-01-01T00:00:00.000001Z", "value": "1.2.0"},
        ])
    );

    // Every page, following cursors, gives every temp reading once and in order.
    let mut values = Vec::new();
    let mut path = "/api/v1/devices/esp32-1/readings?metric=temp&limit=10".to_owned();
    loop {
        let (status, body) = app.get(&path, app.admin_key()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        values.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["value"].as_f64().unwrap()),
        );
        match body["page"]["next_cursor"].as_str() {
            Some(cursor) => {
                path =
                    format!("/api/v1/devices/esp32-1/readings?metric=temp&limit=10&cursor={cursor}")
            }
            None => break,
        }
    }
    let expected: Vec<f64> = (0..25).map(|i| i as f64 + 0.5).collect();
    assert_eq!(values, expected);

    let (_, body) = app
        .get("/api/v1/devices/esp32-1/readings?metric=temp&order=desc&limit=2&start=2026-01-01T00:00:10Z&end=2026-01-01T00:00:20Z", app.admin_key())
        .await;
    let values: Vec<f64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, vec![19.5, 18.5]);
    app.shutdown().await;
}

#[tokio::test]
async fn latest_is_the_newest_value_whatever_the_arrival_order() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    publish(
        &app,
        "default",
        "d1",
        vec![number("temp", T0 + 5_000_000, 5.0), number("hum", T0, 40.0)],
    )
    .await;
    publish(
        &app,
        "default",
        "d1",
        vec![number("temp", T0 + 1_000_000, 1.0)],
    )
    .await;
    publish(
        &app,
        "default",
        "d1",
        vec![
            number("temp", T0 + 9_000_000, 9.0),
            number("temp", T0 + 7_000_000, 7.0),
        ],
    )
    .await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 5).then_some(())
    })
    .await;

    let (status, body) = app
        .get("/api/v1/devices/d1/readings/latest", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!([
            {"metric": "hum", "ts": "2026-01-01T00:00:00Z", "value": 40.0},
            {"metric": "temp", "ts": "2026-01-01T00:00:09Z", "value": 9.0},
        ])
    );
    let (_, body) = app
        .get(
            "/api/v1/devices/d1/readings/latest?metric=hum",
            app.admin_key(),
        )
        .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn another_projects_device_is_not_found() {
    let app = spawn_query().await;
    app.create_device("mine").await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other_admin = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same device id in the other project, with readings of its own: a query must be
    // scoped by project, not just by device id.
    let (status, _) = app
        .post("/api/v1/devices", &other_admin, &json!({"id": "twin"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    app.create_device("twin").await;
    publish(&app, "other", "twin", vec![number("theirs", T0, 7.0)]).await;
    publish(&app, "default", "twin", vec![number("ours", T0, 8.0)]).await;
    publish(&app, "default", "mine", vec![number("temp", T0, 1.0)]).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "mine").await == 1 && stored(&app, "twin").await == 2).then_some(())
    })
    .await;
    let (status, body) = app.get("/api/v1/devices/twin/readings", &other_admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!([{"metric": "theirs", "ts": "2026-01-01T00:00:00Z", "value": 7.0}])
    );
    let (_, body) = app
        .get("/api/v1/devices/twin/readings/latest", app.admin_key())
        .await;
    assert_eq!(
        body["data"],
        json!([{"metric": "ours", "ts": "2026-01-01T00:00:00Z", "value": 8.0}])
    );

    for path in [
        "/api/v1/devices/mine/readings",
        "/api/v1/devices/mine/readings/latest",
        "/api/v1/devices/ghost/readings",
    ] {
        let (status, body) = app.get(path, &other_admin).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
        assert!(!body.to_string().contains("temp"), "{body}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_parameters_get_400_naming_them() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    for (query, parameter) in [
        ("start=soon", "start"),
        ("limit=0", "limit"),
        ("order=sideways", "order"),
        ("metric=a%20b", "metric"),
        ("bogus=1", "query"),
    ] {
        let (status, body) = app
            .get(
                &format!("/api/v1/devices/d1/readings?{query}"),
                app.admin_key(),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(parameter),
            "{body}"
        );
    }
    let (status, body) = app
        .get("/api/v1/devices/d1/readings?cursor=nope", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_cursor");
    let (status, body) = app
        .get("/api/v1/devices/bad.id/readings", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_device_id");
    let _: Value = body;
    app.shutdown().await;
}

#[tokio::test]
async fn latest_and_metrics_after_backfill_and_out_of_order_readings() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    // Live readings first, then a backfill of older history (a gateway uploading its buffer),
    // then one straggler between them, and a redelivery.
    let live = vec![
        number("temp", T0 + 100_000_000, 10.0),
        number("hum", T0 + 50_000_000, 40.0),
    ];
    publish(&app, "default", "d1", live.clone()).await;
    let backfill: Vec<Reading> = (0..50)
        .map(|i| number("temp", T0 - 3_600_000_000 + i * 1_000_000, i as f64))
        .collect();
    publish(&app, "default", "d1", backfill).await;
    publish(
        &app,
        "default",
        "d1",
        vec![number("temp", T0 + 99_000_000, 9.0)],
    )
    .await;
    publish(&app, "default", "d1", live).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 53).then_some(())
    })
    .await;

    let (status, body) = app
        .get("/api/v1/devices/d1/readings/latest", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!([
            {"metric": "hum", "ts": "2026-01-01T00:00:50Z", "value": 40.0},
            {"metric": "temp", "ts": "2026-01-01T00:01:40Z", "value": 10.0},
        ])
    );
    let (status, body) = app.get("/api/v1/devices/d1/metrics", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!([
            {"metric": "hum", "first_ts": "2026-01-01T00:00:50Z", "last_ts": "2026-01-01T00:00:50Z", "count": 1},
            {"metric": "temp", "first_ts": "2025-12-31T23:00:00Z", "last_ts": "2026-01-01T00:01:40Z", "count": 52},
        ])
    );
    // Both answer from the dictionary: one index lookup whatever the history's size.
    let plan = crate::explain(
        &app.env.pg().await,
        "SELECT metric, last_ts FROM telemetry.series WHERE project = 'default' AND device_id = 'd1'",
    )
    .await;
    assert!(!plan.contains("readings"), "{plan}");
    app.shutdown().await;
}

#[tokio::test]
async fn every_route_answers_404_for_another_projects_device() {
    let app = spawn_query().await;
    app.create_device("mine").await;
    publish(&app, "default", "mine", vec![number("temp", T0, 1.0)]).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "mine").await == 1).then_some(())
    })
    .await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other_admin = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        "/api/v1/devices/mine/readings?format=csv",
        "/api/v1/devices/mine/readings/aggregate?metric=temp&interval=1h",
        "/api/v1/devices/mine/metrics",
    ] {
        let (status, body) = app.get(path, &other_admin).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
        assert_eq!(body["error"]["message"], "device mine not found");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn recent_activity_counts_the_projects_readings_of_the_last_five_minutes() {
    let app = crate::spawn_query().await;
    app.create_device("meter").await;
    let other_key = crate::create_project(&app, "elsewhere").await;
    let now = fieldline_common::time::now_us();
    let minute = 60_000_000;
    crate::publish(
        &app,
        "default",
        "meter",
        vec![
            crate::number("kwh", now - minute, 1.0),
            crate::number("kwh", now - 2 * minute, 2.0),
            crate::number("volts", now - minute, 230.0),
            // Older than the window: not counted.
            crate::number("kwh", now - 20 * minute, 0.5),
        ],
    )
    .await;
    let body =
        fieldline_testkit::eventually("stored", std::time::Duration::from_secs(10), || async {
            let (status, body) = app.get("/api/v1/stats/readings", app.admin_key()).await;
            assert_eq!(status, reqwest::StatusCode::OK, "{body}");
            (body["data"]["readings"] == 3).then_some(body)
        })
        .await;
    assert_eq!(body["data"]["readings_per_minute"], 0.6);
    assert_eq!(body["data"]["devices_reporting"], 1);
    let (_, body) = app.get("/api/v1/stats/readings", &other_key).await;
    assert_eq!(body["data"]["readings"], 0, "{body}");
}
