//! `POST /api/v1/query`: several devices, mixed metrics, raw and aggregated, bounded.

use std::time::Duration;

use fieldline_testkit::{assert_error, eventually};
use reqwest::StatusCode;
use serde_json::json;

use crate::{boolean, create_project, number, publish, spawn_query, stored_total, text};

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
const MINUTE: i64 = 60_000_000;

#[tokio::test]
async fn several_devices_with_mixed_metrics_raw_and_aggregated() {
    let app = spawn_query().await;
    for device in ["a", "b", "c"] {
        app.create_device(device).await;
    }
    publish(
        &app,
        "default",
        "a",
        vec![
            number("temp", T0 + MINUTE, 20.5),
            number("temp", T0, 20.0),
            boolean("door", T0, true),
            text("fw", T0, "1.2.0"),
        ],
    )
    .await;
    publish(
        &app,
        "default",
        "b",
        vec![
            number("temp", T0, 30.0),
            boolean("door", T0 + MINUTE, false),
        ],
    )
    .await;
    // c has no readings at all.
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored_total(&app).await == 6).then_some(())
    })
    .await;

    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["b", "a", "c"], "metrics": ["temp", "door", "fw"], "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({
            "readings": [
                {"device_id": "b", "metric": "temp", "ts": "2026-01-01T00:00:00Z", "value": 30.0},
                {"device_id": "b", "metric": "door", "ts": "2026-01-01T00:01:00Z", "value": false},
                {"device_id": "a", "metric": "temp", "ts": "2026-01-01T00:00:00Z", "value": 20.0},
                {"device_id": "a", "metric": "temp", "ts": "2026-01-01T00:01:00Z", "value": 20.5},
                {"device_id": "a", "metric": "door", "ts": "2026-01-01T00:00:00Z", "value": true},
                {"device_id": "a", "metric": "fw", "ts": "2026-01-01T00:00:00Z", "value": "1.2.0"},
            ],
            "limit": 1000,
            "truncated": false,
        })
    );

    // The bound: a limit cuts and says so.
    let (_, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["a", "b"], "metrics": ["temp"], "limit": 2}),
        )
        .await;
    assert_eq!(body["data"]["truncated"], true, "{body}");
    assert_eq!(body["data"]["readings"].as_array().unwrap().len(), 2);

    // Aggregated: count for every metric, avg for numbers.
    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["a", "b"], "metrics": ["temp", "door"], "start": 1767225600000u64, "end": "2026-01-01T00:10:00Z", "interval": "5m", "fn": ["count"], "fill": "null"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let counts: Vec<_> = body["data"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["device_id"].as_str().unwrap().to_owned(),
                s["metric"].as_str().unwrap().to_owned(),
                s["buckets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["count"].as_i64().unwrap())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("a".into(), "temp".into(), vec![2, 0]),
            ("a".into(), "door".into(), vec![1, 0]),
            ("b".into(), "temp".into(), vec![1, 0]),
            ("b".into(), "door".into(), vec![1, 0]),
        ]
    );
    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["a", "b"], "metrics": ["temp"], "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z", "interval": "1h", "fn": "avg,max"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["series"],
        json!([
            {"device_id": "a", "metric": "temp", "buckets": [{"ts": "2026-01-01T00:00:00Z", "avg": 20.25, "max": 20.5}]},
            {"device_id": "b", "metric": "temp", "buckets": [{"ts": "2026-01-01T00:00:00Z", "avg": 30.0, "max": 30.0}]},
        ])
    );
    assert_eq!(body["data"]["sources"], json!(["rollup_1h"]));
    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["a"], "metrics": ["fw"], "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z", "interval": "1h", "fn": "avg"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "non_numeric_metric",
    );
    app.shutdown().await;
}

#[tokio::test]
async fn another_projects_device_is_404_by_name_and_bad_bodies_are_400() {
    let app = spawn_query().await;
    app.create_device("mine").await;
    let other_admin = create_project(&app, "other").await;
    let (status, _) = app
        .post("/api/v1/devices", &other_admin, &json!({"id": "theirs"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    publish(&app, "other", "theirs", vec![number("temp", T0, 1.0)]).await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored_total(&app).await == 1).then_some(())
    })
    .await;
    for devices in [json!(["mine", "theirs"]), json!(["mine", "ghost"])] {
        let missing = devices[1].as_str().unwrap().to_owned();
        let (status, body) = app
            .post(
                "/api/v1/query",
                app.admin_key(),
                &json!({"devices": devices, "metrics": ["temp"]}),
            )
            .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
        assert_eq!(
            body["error"]["message"],
            format!("device {missing} not found")
        );
    }

    let many: Vec<String> = (0..101).map(|i| format!("d{i}")).collect();
    for (request, field) in [
        (json!({"devices": [], "metrics": ["t"]}), "devices"),
        (json!({"devices": many, "metrics": ["t"]}), "devices"),
        (json!({"devices": ["mine"], "metrics": []}), "metrics"),
        (json!({"devices": ["mine"], "metrics": ["a b"]}), "metrics"),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "limit": 0}),
            "limit",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "limit": 10001}),
            "limit",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "start": "soon"}),
            "start",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "end": true}),
            "end",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "fn": "avg"}),
            "interval",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "interval": "5q"}),
            "interval",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "interval": "1s", "start": "-30d"}),
            "interval",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "interval": "1h", "fn": ["avg", 3]}),
            "fn",
        ),
        (
            json!({"devices": ["mine"], "metrics": ["t"], "interval": "1h", "fill": "zero"}),
            "fill",
        ),
    ] {
        let (status, body) = app.post("/api/v1/query", app.admin_key(), &request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{request}: {body}"
        );
    }
    let (status, body) = app
        .post(
            "/api/v1/query",
            app.admin_key(),
            &json!({"devices": ["mine"], "metrics": ["t"], "bogus": 1}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    app.shutdown().await;
}
