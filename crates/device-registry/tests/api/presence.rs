use std::time::Duration;

use fieldline_testkit::eventually;
use reqwest::StatusCode;
use serde_json::json;

use crate::{events, publish_heartbeat, publish_heartbeat_at, publish_reading, spawn_registry_in};

/// Two registry instances share the stream and the database, as two processes would: each
/// change of status is still announced exactly once.
#[tokio::test]
async fn silent_devices_go_offline_and_come_back_once_each() {
    let env = fieldline_testkit::TestEnv::new().await;
    let app = spawn_registry_in(env.clone(), |config| config).await;
    let second = spawn_registry_in(env, |config| config).await;
    let admin = app.admin_key().to_owned();
    let (status, _) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "beacon", "heartbeat_interval_s": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, body) = app.get("/api/v1/devices/beacon", &admin).await;
    assert_eq!(body["data"]["status"], "unknown");

    // Heartbeats every 300 ms keep it online, however many arrive.
    for _ in 0..5 {
        publish_heartbeat(&app, "default", "beacon").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, body) = app.get("/api/v1/devices/beacon", &admin).await;
    assert_eq!(body["data"]["status"], "online", "{body}");
    assert!(body["data"]["last_seen"].is_string());

    // Silent for three intervals: offline.
    eventually(
        "the device to go offline",
        Duration::from_secs(10),
        || async {
            let (_, body) = app.get("/api/v1/devices/beacon", &admin).await;
            (body["data"]["status"] == "offline").then_some(())
        },
    )
    .await;
    let (_, body) = app.get("/api/v1/devices?status=offline", &admin).await;
    assert_eq!(body["data"][0]["id"], "beacon");

    // Any reading counts as a heartbeat.
    publish_reading(
        &app,
        "default",
        "beacon",
        "rssi",
        fieldline_common::time::now_us(),
        -70.0,
    )
    .await;
    eventually(
        "the device back online",
        Duration::from_secs(10),
        || async {
            let (_, body) = app.get("/api/v1/devices/beacon", &admin).await;
            (body["data"]["status"] == "online").then_some(())
        },
    )
    .await;

    let statuses = eventually(
        "three device.status events",
        Duration::from_secs(10),
        || async {
            let statuses = events(&app, "device.status").await;
            (statuses.len() >= 3).then_some(statuses)
        },
    )
    .await;
    // Give a duplicate the time to show up, if there were one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let statuses_after = events(&app, "device.status").await;
    assert_eq!(statuses_after.len(), 3, "{statuses_after:?}");
    let sequence: Vec<(String, String)> = statuses
        .iter()
        .map(|(_, payload)| {
            (
                payload["previous_status"].as_str().unwrap().to_owned(),
                payload["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        sequence,
        vec![
            ("unknown".to_owned(), "online".to_owned()),
            ("online".to_owned(), "offline".to_owned()),
            ("offline".to_owned(), "online".to_owned()),
        ]
    );
    let ids: std::collections::HashSet<_> =
        statuses.iter().map(|(event, _)| event.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    second.stop().await;
    app.shutdown().await;
}

/// A device heard from many times a second has its row written about once a second: a
/// sighting within a second of the last write leaves `last_seen` as it was, the next one
/// past that second moves it.
#[tokio::test]
async fn last_seen_is_written_at_most_once_a_second() {
    let env = fieldline_testkit::TestEnv::new().await;
    let app = spawn_registry_in(env, |config| config).await;
    let admin = app.admin_key().to_owned();
    for id in ["chatty", "marker"] {
        let (status, _) = app
            .post(
                "/api/v1/devices",
                &admin,
                &json!({"id": id, "heartbeat_interval_s": 60}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let last_seen = |id: &'static str| {
        let app = &app;
        let admin = &admin;
        async move {
            let (_, body) = app.get(&format!("/api/v1/devices/{id}"), admin).await;
            body["data"]["last_seen"].as_str().map(str::to_owned)
        }
    };
    // Whole seconds, so the RFC 3339 form is predictable.
    let t0 = fieldline_common::time::now_us() / 1_000_000 * 1_000_000;
    let rfc =
        |us: i64| fieldline_common::time::format_rfc3339(&fieldline_common::time::from_us(us));

    publish_heartbeat_at(&app, "default", "chatty", t0).await;
    eventually(
        "the first sighting written",
        Duration::from_secs(10),
        || async { (last_seen("chatty").await == Some(rfc(t0))).then_some(()) },
    )
    .await;

    // Half a second later: skipped. The marker, published after it, shows it was applied.
    publish_heartbeat_at(&app, "default", "chatty", t0 + 500_000).await;
    publish_heartbeat_at(&app, "default", "marker", t0).await;
    eventually("the marker written", Duration::from_secs(10), || async {
        last_seen("marker").await.map(|_| ())
    })
    .await;
    assert_eq!(last_seen("chatty").await, Some(rfc(t0)));

    // A second and a half later: written.
    publish_heartbeat_at(&app, "default", "chatty", t0 + 1_500_000).await;
    eventually(
        "the later sighting written",
        Duration::from_secs(10),
        || async { (last_seen("chatty").await == Some(rfc(t0 + 1_500_000))).then_some(()) },
    )
    .await;
    let (_, body) = app.get("/api/v1/devices/chatty", &admin).await;
    assert_eq!(body["data"]["status"], "online", "{body}");
    app.shutdown().await;
}

/// A sighting that moves `offline_after` by less than a tenth of the offline window leaves
/// it (and with it the row's indexes) as it was; the sweep, finding the device due by that
/// early deadline, reads `last_seen`, keeps the device online and moves the deadline. The
/// device goes offline at its true deadline.
#[tokio::test]
async fn an_early_deadline_does_not_take_a_device_offline_early() {
    let env = fieldline_testkit::TestEnv::new().await;
    let app = spawn_registry_in(env, |config| config).await;
    let admin = app.admin_key().to_owned();
    // Offline window 30 s: the deadline moves once a sighting is 3 s past the last move.
    let (status, _) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "steady", "heartbeat_interval_s": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let pg = app.env.pg().await;
    let stored = || async {
        let row = pg
            .query_one(
                "SELECT status, (extract(epoch FROM last_seen) * 1e6)::int8,
                        (extract(epoch FROM offline_after) * 1e6)::int8
                 FROM registry.devices WHERE id = 'steady'",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<i64>>(2),
        )
    };
    const WINDOW_US: i64 = 30_000_000;
    // Seen 25 s ago: due in 5 s by that sighting, time enough for the next to be applied.
    let t0 = fieldline_common::time::now_us() - 25_000_000;
    publish_heartbeat_at(&app, "default", "steady", t0).await;
    eventually(
        "the first sighting written",
        Duration::from_secs(10),
        || async { (stored().await.1 == Some(t0)).then_some(()) },
    )
    .await;
    assert_eq!(
        stored().await,
        ("online".to_owned(), Some(t0), Some(t0 + WINDOW_US))
    );
    // Two seconds later by the device's clock: last_seen moves, the deadline stays.
    publish_heartbeat_at(&app, "default", "steady", t0 + 2_000_000).await;
    eventually(
        "the second sighting written",
        Duration::from_secs(10),
        || async { (stored().await.1 == Some(t0 + 2_000_000)).then_some(()) },
    )
    .await;
    assert_eq!(stored().await.2, Some(t0 + WINDOW_US));

    // Past the early deadline (t0 + 30 s), before the true one (t0 + 32 s): the sweep (every
    // 200 ms) has looked at the device and kept it online, with the true deadline.
    let early = t0 + WINDOW_US;
    let wait = early + 700_000 - fieldline_common::time::now_us();
    tokio::time::sleep(Duration::from_micros(wait.max(0) as u64)).await;
    assert_eq!(
        stored().await,
        (
            "online".to_owned(),
            Some(t0 + 2_000_000),
            Some(t0 + 2_000_000 + WINDOW_US)
        ),
        "due by the early deadline, kept online by last_seen"
    );
    eventually(
        "offline at the true deadline",
        Duration::from_secs(10),
        || async { (stored().await.0 == "offline").then_some(()) },
    )
    .await;
    assert!(
        fieldline_common::time::now_us() >= t0 + 2_000_000 + WINDOW_US,
        "offline before its true deadline"
    );
    app.shutdown().await;
}
