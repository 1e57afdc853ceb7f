use std::time::Duration;

use fieldline_testkit::{TestApp, assert_error, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{events, patch, publish_reading, spawn_registry};

const SECOND: i64 = 1_000_000;

/// Publishes readings in order, one message each, as a device sending them over time would.
async fn feed(app: &TestApp, device_id: &str, metric: &str, readings: &[(i64, f64)]) {
    for (ts, value) in readings {
        publish_reading(app, "default", device_id, metric, *ts, *value).await;
    }
}

async fn alerts_of(app: &TestApp, rule_id: &str, at_least: usize) -> Vec<Value> {
    eventually(
        &format!("{at_least} alerts of {rule_id}"),
        Duration::from_secs(10),
        || async {
            let alerts: Vec<Value> = events(app, "device.alert")
                .await
                .into_iter()
                .map(|(_, payload)| payload)
                .filter(|payload| payload["rule_id"] == rule_id)
                .collect();
            (alerts.len() >= at_least).then_some(alerts)
        },
    )
    .await
}

async fn create_rule(app: &TestApp, rule: Value) -> String {
    let (status, body) = app
        .post("/api/v1/alert-rules", app.admin_key(), &rule)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["data"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_alert_fires_once_stays_quiet_and_resolves_once_with_hysteresis() {
    let app = spawn_registry().await;
    app.create_device("oven").await;
    let rule_id = create_rule(
        &app,
        json!({"name": "too hot", "device_id": "oven", "metric": "temp", "op": "gt",
               "threshold": 30, "clear_threshold": 25, "severity": "critical"}),
    )
    .await;
    let t0 = fieldline_common::time::now_us();
    // Fires at 31; quiet at 35 and at 29 (above the clear threshold); resolves at 24.
    feed(
        &app,
        "oven",
        "temp",
        &[
            (t0, 20.0),
            (t0 + SECOND, 31.0),
            (t0 + 2 * SECOND, 35.0),
            (t0 + 3 * SECOND, 29.0),
            (t0 + 4 * SECOND, 24.0),
            (t0 + 5 * SECOND, 22.0),
        ],
    )
    .await;
    // Another metric, and a non-numeric reading, leave it alone.
    feed(&app, "oven", "humidity", &[(t0 + 6 * SECOND, 99.0)]).await;
    let alerts = alerts_of(&app, &rule_id, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts_after = alerts_of(&app, &rule_id, 2).await;
    assert_eq!(alerts_after.len(), 2, "{alerts_after:?}");
    assert_eq!(alerts[0]["state"], "firing");
    assert_eq!(alerts[0]["value"], 31.0);
    assert_eq!(alerts[0]["threshold"], 30.0);
    assert_eq!(alerts[0]["severity"], "critical");
    assert_eq!(alerts[1]["state"], "resolved");
    assert_eq!(alerts[1]["value"], 24.0);
    app.shutdown().await;
}

#[tokio::test]
async fn for_s_waits_for_the_breach_to_last_and_group_rules_watch_every_member() {
    let app = spawn_registry().await;
    for id in ["cold-1", "cold-2"] {
        let (status, _) = app
            .post(
                "/api/v1/devices",
                app.admin_key(),
                &json!({"id": id, "group": "freezers"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let rule_id = create_rule(
        &app,
        json!({"name": "thawing", "group": "freezers", "metric": "temp", "op": "gte",
               "threshold": -10, "for_s": 60}),
    )
    .await;
    let t0 = fieldline_common::time::now_us() - 600 * SECOND;
    // cold-1: a 30 s excursion, then one of 60 s that fires at its 60th second.
    feed(
        &app,
        "cold-1",
        "temp",
        &[
            (t0, -18.0),
            (t0 + 10 * SECOND, -5.0),
            (t0 + 40 * SECOND, -6.0),
            (t0 + 50 * SECOND, -15.0),
            (t0 + 100 * SECOND, -8.0),
            (t0 + 130 * SECOND, -7.0),
            (t0 + 160 * SECOND, -9.0),
        ],
    )
    .await;
    // cold-2 breaches once, briefly: nothing.
    feed(
        &app,
        "cold-2",
        "temp",
        &[(t0, -3.0), (t0 + 20 * SECOND, -20.0)],
    )
    .await;
    let alerts = alerts_of(&app, &rule_id, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts = alerts_of(&app, &rule_id, alerts.len()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["state"], "firing");
    assert_eq!(alerts[0]["value"], -9.0);
    let events = events(&app, "device.alert").await;
    assert_eq!(events[0].0.device_id, "cold-1");
    app.shutdown().await;
}

#[tokio::test]
async fn backfilled_readings_neither_fire_alerts_nor_mark_devices_seen() {
    let app = spawn_registry().await;
    app.create_device("d1").await;
    let rule_id = create_rule(
        &app,
        json!({"name": "high", "device_id": "d1", "metric": "v", "op": "gt", "threshold": 1}),
    )
    .await;
    let batch = fieldline_proto::v1::TelemetryBatch {
        project: "default".into(),
        device_id: "d1".into(),
        readings: vec![fieldline_proto::v1::Reading {
            metric: "v".into(),
            ts_us: fieldline_common::time::now_us() - 3600 * SECOND,
            value: Some(fieldline_proto::v1::reading::Value::Number(5.0)),
        }],
        received_at_us: fieldline_common::time::now_us(),
        source: "backfill".into(),
        message_id: String::new(),
        devices: Vec::new(),
        series: Vec::new(),
    };
    app.context
        .jetstream
        .publish(
            app.context.subjects.telemetry("default", "d1"),
            prost::Message::encode_to_vec(&batch).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // A live reading after it, below the threshold, is applied: so the backfill was seen too.
    publish_reading(
        &app,
        "default",
        "d1",
        "v",
        fieldline_common::time::now_us(),
        0.0,
    )
    .await;
    eventually(
        "the live reading to mark the device online",
        Duration::from_secs(10),
        || async {
            let (_, body) = app.get("/api/v1/devices/d1", app.admin_key()).await;
            (body["data"]["status"] == "online").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alerts: Vec<_> = events(&app, "device.alert")
        .await
        .into_iter()
        .filter(|(_, payload)| payload["rule_id"] == rule_id.as_str())
        .collect();
    assert!(alerts.is_empty(), "{alerts:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn rules_have_crud_and_refuse_bad_input() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    app.create_device("d1").await;
    let rule_id = create_rule(
        &app,
        json!({"name": "low battery", "device_id": "d1", "metric": "battery", "op": "lt", "threshold": 20}),
    )
    .await;
    let (status, body) = app
        .get(&format!("/api/v1/alert-rules/{rule_id}"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["severity"], "warning");
    assert_eq!(body["data"]["for_s"], 0);
    assert_eq!(body["data"]["enabled"], true);

    let (status, body) = patch(
        &app,
        &format!("/api/v1/alert-rules/{rule_id}"),
        &admin,
        &json!({"threshold": 15, "clear_threshold": 25, "enabled": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["threshold"], 15.0);
    assert_eq!(body["data"]["clear_threshold"], 25.0);
    assert_eq!(body["data"]["name"], "low battery");

    let (_, body) = app.get("/api/v1/alert-rules?device_id=d1", &admin).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    let (_, body) = app.get("/api/v1/alert-rules?metric=temp", &admin).await;
    assert!(body["data"].as_array().unwrap().is_empty());

    for (rule, status, reason) in [
        (
            json!({"name": "x", "metric": "m", "op": "gt", "threshold": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_rule_target",
        ),
        (
            json!({"name": "x", "device_id": "d1", "group": "g", "metric": "m", "op": "gt", "threshold": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_rule_target",
        ),
        (
            json!({"name": "x", "device_id": "d1", "metric": "m", "op": "gt", "threshold": 1, "clear_threshold": 2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_clear_threshold",
        ),
        (
            json!({"name": "x", "device_id": "d1", "metric": "m", "op": "between", "threshold": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"name": "x", "device_id": "d1", "metric": "m", "op": "gt", "threshold": "high"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"name": "x", "device_id": "d1", "metric": "m", "op": "gt", "threshold": 1, "severity": "fatal"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"name": "x", "device_id": "d1", "metric": "m", "op": "gt", "threshold": 1, "for_s": -1}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"name": "x", "device_id": "ghost", "metric": "m", "op": "gt", "threshold": 1}),
            StatusCode::NOT_FOUND,
            "device_not_found",
        ),
    ] {
        let (got, body) = app.post("/api/v1/alert-rules", &admin, &rule).await;
        assert_error(got, &body, status, reason);
    }

    let (status, _) = app
        .delete(&format!("/api/v1/alert-rules/{rule_id}"), &admin)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app
        .get(&format!("/api/v1/alert-rules/{rule_id}"), &admin)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "rule_not_found");
    app.shutdown().await;
}

/// A device that sends one hot reading and goes quiet still fires once `for_s` has passed,
/// fired by the sweep rather than by a next reading. Two registry instances sweep the same
/// database, and each of a dozen such devices fires exactly once; a cool reading afterwards
/// resolves it once.
#[tokio::test]
async fn a_quiet_device_fires_when_for_s_passes_once_across_two_registries() {
    let env = fieldline_testkit::TestEnv::new().await;
    let app = crate::spawn_registry_in(env.clone(), |config| config).await;
    let second = crate::spawn_registry_in(env, |config| config).await;
    let devices: Vec<String> = (0..12).map(|n| format!("boiler-{n}")).collect();
    for id in &devices {
        let (status, body) = app
            .post(
                "/api/v1/devices",
                app.admin_key(),
                &json!({"id": id, "group": "boilers"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let rule_id = create_rule(
        &app,
        json!({"name": "boiling", "group": "boilers", "metric": "temp", "op": "gt",
               "threshold": 90, "for_s": 2, "severity": "critical"}),
    )
    .await;
    let sent = std::time::Instant::now();
    for id in &devices {
        publish_reading(
            &app,
            "default",
            id,
            "temp",
            fieldline_common::time::now_us(),
            95.0,
        )
        .await;
    }
    // Pending, not firing, before for_s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early: Vec<Value> = events(&app, "device.alert")
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert!(early.is_empty(), "fired before for_s: {early:?}");

    let alerts = alerts_of(&app, &rule_id, devices.len()).await;
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "fired after {:?}, before for_s",
        sent.elapsed()
    );
    // Several more sweeps of both instances: still one event per device.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = events(&app, "device.alert").await;
    let mut fired: Vec<String> = all
        .iter()
        .map(|(event, _)| event.device_id.clone())
        .collect();
    fired.sort();
    let mut expected = devices.clone();
    expected.sort();
    assert_eq!(fired, expected, "one firing per device: {alerts:?}");
    for (_, payload) in &all {
        assert_eq!(payload["state"], "firing");
        assert_eq!(payload["value"], 95.0);
        assert_eq!(payload["for_s"], 2);
        assert_eq!(payload["severity"], "critical");
    }

    // The next reading finds it firing: a cool one resolves it, once.
    publish_reading(
        &app,
        "default",
        "boiler-0",
        "temp",
        fieldline_common::time::now_us(),
        70.0,
    )
    .await;
    let alerts = alerts_of(&app, &rule_id, devices.len() + 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts_after = alerts_of(&app, &rule_id, alerts.len()).await;
    assert_eq!(alerts_after.len(), devices.len() + 1, "{alerts_after:?}");
    assert_eq!(alerts_after.last().unwrap()["state"], "resolved");
    second.shutdown().await;
    app.shutdown().await;
}

/// A reading that breached long ago (stamped 10 minutes back, arriving now) does not fire the
/// moment it lands: the sweep waits `for_s` from when the breach was seen.
#[tokio::test]
async fn an_old_breach_arriving_late_waits_for_s_from_its_arrival() {
    let app = spawn_registry().await;
    app.create_device("still").await;
    let rule_id = create_rule(
        &app,
        json!({"name": "hot", "device_id": "still", "metric": "temp", "op": "gt",
               "threshold": 50, "for_s": 2}),
    )
    .await;
    let sent = std::time::Instant::now();
    publish_reading(
        &app,
        "default",
        "still",
        "temp",
        fieldline_common::time::now_us() - 600 * SECOND,
        60.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(events(&app, "device.alert").await.is_empty());
    let alerts = alerts_of(&app, &rule_id, 1).await;
    assert!(sent.elapsed() >= Duration::from_secs(2));
    assert_eq!(alerts[0]["state"], "firing");
    app.shutdown().await;
}

#[tokio::test]
async fn alerts_firing_now_are_listed_for_their_project_only() {
    let app = spawn_registry().await;
    app.create_device("kiln").await;
    app.create_device("cellar").await;
    let hot = create_rule(
        &app,
        json!({"name": "kiln hot", "device_id": "kiln", "metric": "temp", "op": "gt",
               "threshold": 100, "severity": "critical"}),
    )
    .await;
    create_rule(
        &app,
        json!({"name": "cellar cold", "device_id": "cellar", "metric": "temp", "op": "lt",
               "threshold": 0, "severity": "warning"}),
    )
    .await;
    let (status, body) = app.get("/api/v1/alerts", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!([]));

    let t0 = fieldline_common::time::now_us();
    // The kiln fires; the cellar stays above 0.
    feed(&app, "kiln", "temp", &[(t0, 120.0)]).await;
    feed(&app, "cellar", "temp", &[(t0, 5.0)]).await;
    alerts_of(&app, &hot, 1).await;
    let (status, body) = app.get("/api/v1/alerts", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let firing = body["data"].as_array().unwrap();
    assert_eq!(firing.len(), 1, "{body}");
    assert_eq!(firing[0]["rule_id"], hot.as_str());
    assert_eq!(firing[0]["device_id"], "kiln");
    assert_eq!(firing[0]["severity"], "critical");
    assert_eq!(firing[0]["value"], 120.0);
    assert!(firing[0]["since"].is_string(), "{body}");

    // Filters, and a read key is enough.
    let (_, read_key) = app.create_key(&["read"]).await;
    let (status, body) = app.get("/api/v1/alerts?severity=warning", &read_key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!([]));
    let (status, body) = app.get("/api/v1/alerts?severity=loud", &read_key).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");

    // Another project sees none of them.
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other_key = body["data"]["admin_key"]["secret"].as_str().unwrap();
    let (status, body) = app.get("/api/v1/alerts", other_key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!([]));

    // Resolved, it leaves the list.
    feed(&app, "kiln", "temp", &[(t0 + SECOND, 20.0)]).await;
    alerts_of(&app, &hot, 2).await;
    let (_, body) = app.get("/api/v1/alerts", app.admin_key()).await;
    assert_eq!(body["data"], json!([]), "{body}");
}

/// Under load ingest-mqtt puts several devices in one bus message: each is seen (online) and
/// its readings evaluated against its own rules, as if it had come alone.
#[tokio::test]
async fn each_device_of_a_batch_of_several_is_seen_and_evaluated() {
    let app = spawn_registry().await;
    let mut rules = Vec::new();
    for device_id in ["d1", "d2", "d3"] {
        app.create_device(device_id).await;
        rules.push(
            create_rule(
                &app,
                json!({"name": "hot", "device_id": device_id, "metric": "temp", "op": "gt", "threshold": 30}),
            )
            .await,
        );
    }
    let now = fieldline_common::time::now_us();
    let temp = |ago_s: i64, value: f64| fieldline_proto::v1::Reading {
        metric: "temp".into(),
        ts_us: now - ago_s * SECOND,
        value: Some(fieldline_proto::v1::reading::Value::Number(value)),
    };
    // d1 and d2 hot, d3 not.
    let batch = fieldline_testkit::multi_device_batch(
        "default",
        vec![
            ("d1", vec![temp(0, 41.0)]),
            ("d2", vec![temp(1, 20.0), temp(0, 42.0)]),
            ("d3", vec![temp(0, 20.0)]),
        ],
        now,
    );
    app.publish_telemetry(&batch).await;
    for (rule_id, value) in [(&rules[0], 41.0), (&rules[1], 42.0)] {
        let alerts = alerts_of(&app, rule_id, 1).await;
        assert_eq!(alerts[0]["state"], "firing");
        assert_eq!(alerts[0]["value"], value);
    }
    for device_id in ["d1", "d2", "d3"] {
        eventually(
            &format!("{device_id} online"),
            Duration::from_secs(10),
            || async {
                let (_, body) = app
                    .get(&format!("/api/v1/devices/{device_id}"), app.admin_key())
                    .await;
                (body["data"]["status"] == "online" && body["data"]["last_seen"].is_string())
                    .then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired: Vec<String> = events(&app, "device.alert")
        .await
        .into_iter()
        .map(|(event, _)| event.device_id)
        .collect();
    let mut fired_sorted = fired.clone();
    fired_sorted.sort();
    assert_eq!(fired_sorted, vec!["d1", "d2"], "d3 stayed below: {fired:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn only_watched_metrics_are_matched_and_a_disabled_rule_watches_nothing() {
    let app = spawn_registry().await;
    for device_id in ["w1", "w2"] {
        app.create_device(device_id).await;
    }
    let watched = create_rule(
        &app,
        json!({"name": "hot", "device_id": "w1", "metric": "temp", "op": "gt", "threshold": 30}),
    )
    .await;
    let disabled = create_rule(
        &app,
        json!({"name": "wet", "device_id": "w2", "metric": "humidity", "op": "gt", "threshold": 50}),
    )
    .await;
    let (status, body) = patch(
        &app,
        &format!("/api/v1/alert-rules/{disabled}"),
        app.admin_key(),
        &json!({"enabled": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let now = fieldline_common::time::now_us();
    let reading = |metric: &str, value: f64| fieldline_proto::v1::Reading {
        metric: metric.into(),
        ts_us: now,
        value: Some(fieldline_proto::v1::reading::Value::Number(value)),
    };
    // One bus message: the watched series beside series no enabled rule watches.
    let batch = fieldline_testkit::multi_device_batch(
        "default",
        vec![
            ("w1", vec![reading("humidity", 99.0), reading("temp", 41.0)]),
            ("w2", vec![reading("humidity", 99.0), reading("temp", 45.0)]),
        ],
        now,
    );
    app.publish_telemetry(&batch).await;
    let alerts = alerts_of(&app, &watched, 1).await;
    assert_eq!(alerts[0]["value"], 41.0);
    // Then a message of unwatched series alone: nothing to match, nothing fires.
    let batch = fieldline_testkit::multi_device_batch(
        "default",
        vec![("w2", vec![reading("humidity", 98.0)])],
        now + SECOND,
    );
    app.publish_telemetry(&batch).await;
    eventually("w2 seen", Duration::from_secs(10), || async {
        let (_, body) = app.get("/api/v1/devices/w2", app.admin_key()).await;
        (body["data"]["status"] == "online").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired: Vec<(String, Value)> = events(&app, "device.alert")
        .await
        .into_iter()
        .map(|(event, payload)| (event.device_id, payload["rule_id"].clone()))
        .collect();
    assert_eq!(fired, vec![("w1".to_owned(), json!(watched))], "{fired:?}");
    app.shutdown().await;
}
