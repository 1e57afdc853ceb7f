use std::time::{Duration, Instant};

use fieldline_proto::v1::DeviceEvent;
use fieldline_testkit::{
    TestApp, eventually,
    receiver::{Receiver, Reply},
};
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{ingest, register, spawn, spawn_with, wait_received};

pub async fn deliveries(app: &TestApp, webhook_id: &str, query: &str) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!("/api/v1/webhooks/{webhook_id}/deliveries{query}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().clone()
}

pub async fn webhook(app: &TestApp, id: &str) -> Value {
    let (status, body) = app
        .get(&format!("/api/v1/webhooks/{id}"), app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].clone()
}

#[tokio::test]
async fn three_500s_then_a_200_delivers_on_the_fourth_attempt_at_the_configured_gaps() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/flaky",
        vec![Reply::Status(500), Reply::Status(503), Reply::Status(500)],
    );
    let token = app.create_device("d1").await;
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/flaky"), "events": ["device.data"]}),
    )
    .await;
    ingest(&app, &token, json!({"a": 1})).await;

    let requests = wait_received(&receiver, "/flaky", 4, Duration::from_secs(15)).await;
    // The schedule is 1s,1s,1s with ±20 % jitter; polling and a loaded CI machine add a little.
    for pair in requests.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(750) && gap <= Duration::from_millis(2000),
            "gap {gap:?}"
        );
    }
    let ids: Vec<_> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the event id must be stable across retries"
    );

    let log = eventually("delivery succeeded", Duration::from_secs(5), || async {
        let log = deliveries(&app, &id, "?status=succeeded").await;
        (log.len() == 1).then_some(log)
    })
    .await;
    let attempts: Vec<_> = log[0]["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, vec![500, 503, 500, 200]);
    assert_eq!(log[0]["attempts"], 4);
    assert_eq!(log[0]["attempt_log"][0]["response"], "answer 500");
    assert!(log[0]["attempt_log"][0]["latency_ms"].is_i64());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.received("/flaky").len(),
        4,
        "delivered again after success"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_4xx_fails_at_once_and_410_disables_the_webhook() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    receiver.script("/bad", vec![Reply::Status(400)]);
    receiver.script("/gone", vec![Reply::Status(410)]);
    let token = app.create_device("d1").await;
    let (bad, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/bad"), "events": ["device.data"]}),
    )
    .await;
    let (gone, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/gone"), "events": ["device.data"]}),
    )
    .await;
    ingest(&app, &token, json!({"a": 1})).await;

    wait_received(&receiver, "/gone", 1, Duration::from_secs(10)).await;
    let disabled = eventually("410 disables", Duration::from_secs(5), || async {
        let webhook = webhook(&app, &gone).await;
        (webhook["enabled"] == false).then_some(webhook)
    })
    .await;
    assert!(
        disabled["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("410"),
        "{disabled}"
    );
    eventually("400 fails the delivery", Duration::from_secs(5), || async {
        (deliveries(&app, &bad, "?status=failed").await.len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.received("/bad").len(), 1, "a 400 was retried");
    assert_eq!(
        webhook(&app, &bad).await["enabled"],
        true,
        "one failure disabled the webhook"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    receiver.script("/busy", vec![Reply::RetryAfter(429, 3)]);
    let token = app.create_device("d1").await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/busy"), "events": ["device.data"]}),
    )
    .await;
    ingest(&app, &token, json!({"a": 1})).await;
    let requests = wait_received(&receiver, "/busy", 2, Duration::from_secs(10)).await;
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After: 3 ignored ({gap:?}; the schedule says 1s)"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn failed_deliveries_are_recovered_and_retried_on_demand() {
    let app = spawn_with(|config| fieldline_common::Config {
        webhook_retry_schedule: "200ms".into(),
        ..config
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.script("/down", (0..4).map(|_| Reply::Status(500)).collect());
    let token = app.create_device("d1").await;
    let since = fieldline_common::time::format_rfc3339(&chrono::Utc::now());
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/down"), "events": ["device.data"]}),
    )
    .await;

    ingest(&app, &token, json!({"ts": 1, "a": 1})).await;
    ingest(&app, &token, json!({"ts": 2, "a": 2})).await;
    eventually(
        "both deliveries failed after their two attempts",
        Duration::from_secs(10),
        || async { (deliveries(&app, &id, "?status=failed").await.len() == 2).then_some(()) },
    )
    .await;
    assert_eq!(receiver.received("/down").len(), 4);
    // Failing for less than `webhook_disable_after_failing` (5 days) keeps it enabled.
    assert_eq!(webhook(&app, &id).await["enabled"], true);

    let (status, body) = app
        .post(
            &format!("/api/v1/webhooks/{id}/recover"),
            app.admin_key(),
            &json!({"since": since}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["requeued"], 2);
    let requests = wait_received(&receiver, "/down", 6, Duration::from_secs(10)).await;
    let mut values: Vec<f64> = requests[4..]
        .iter()
        .map(|r| {
            r.json()["payload"]["readings"][0]["value"]
                .as_f64()
                .unwrap()
        })
        .collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![1.0, 2.0]);
    eventually("all succeeded", Duration::from_secs(5), || async {
        (deliveries(&app, &id, "?status=succeeded").await.len() == 2).then_some(())
    })
    .await;

    // A single delivery can be sent again on demand.
    let delivery_id = deliveries(&app, &id, "").await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = app
        .post(
            &format!("/api/v1/deliveries/{delivery_id}/retry"),
            app.admin_key(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_received(&receiver, "/down", 7, Duration::from_secs(5)).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_hanging_receiver_does_not_delay_another_webhook() {
    let app = spawn_with(|config| fieldline_common::Config {
        webhook_endpoint_concurrency: 2,
        webhook_timeout: Duration::from_secs(5),
        ..config
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/hang",
        (0..20)
            .map(|_| Reply::Hang(Duration::from_secs(4)))
            .collect(),
    );
    let token = app.create_device("d1").await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/hang"), "events": ["device.data"]}),
    )
    .await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/fast"), "events": ["device.data"]}),
    )
    .await;
    let started = Instant::now();
    for index in 0..10 {
        ingest(&app, &token, json!({"ts": index + 1, "a": index})).await;
    }
    wait_received(&receiver, "/fast", 10, Duration::from_secs(3)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // The hanging webhook holds at most its own two slots.
    assert!(
        receiver.received("/hang").len() <= 2,
        "{} requests to the hanging receiver",
        receiver.received("/hang").len()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn events_from_the_events_stream_are_delivered() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    app.create_device("d1").await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/status"), "events": ["device.status"]}),
    )
    .await;
    let event = DeviceEvent {
        id: "evt_status_1".into(),
        project: "default".into(),
        device_id: "d1".into(),
        event_type: "device.status".into(),
        occurred_at_us: 1_767_225_600_000_000,
        payload_json: r#"{"status":"offline","previous":"online"}"#.into(),
    };
    let subject = app.context.subjects.event("default", "status", "d1");
    app.context
        .jetstream
        .publish(subject, event.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let request = wait_received(&receiver, "/status", 1, Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(
        request.json(),
        json!({"id": "evt_status_1", "event": "device.status", "timestamp": "2026-01-01T00:00:00Z",
               "project": "default", "device_id": "d1", "payload": {"status": "offline", "previous": "online"}})
    );
    app.shutdown().await;
}

#[tokio::test]
async fn two_dispatchers_deliver_each_event_once() {
    let first = spawn().await;
    let second = TestApp::spawn_with(
        first.env.clone(),
        crate::test_config,
        |context| async move { Ok(vec![webhook_dispatcher::start(&context).await?]) },
    )
    .await;
    let receiver = Receiver::start().await;
    let token = first.create_device("d1").await;
    register(
        &first,
        first.admin_key(),
        json!({"url": receiver.url("/once"), "events": ["device.data"]}),
    )
    .await;
    for index in 0..40 {
        ingest(&first, &token, json!({"ts": index + 1, "a": index})).await;
    }
    wait_received(&receiver, "/once", 40, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = receiver.received("/once");
    let mut ids: Vec<_> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((requests.len(), ids.len()), (40, 40));
    second.stop().await;
    first.shutdown().await;
}

#[tokio::test]
async fn the_test_endpoint_sends_now_and_returns_the_attempt() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    receiver.script("/t", vec![Reply::Status(201)]);
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/t"), "events": ["device.data"]}),
    )
    .await;
    let (status, body) = app
        .post(
            &format!("/api/v1/webhooks/{id}/test"),
            app.admin_key(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["attempt"]["status_code"], 201);
    let request = receiver.received("/t").remove(0);
    assert_eq!(request.json()["event"], "webhook.test");
    app.shutdown().await;
}

#[tokio::test]
async fn events_beyond_a_webhooks_slots_wait_in_the_queue_and_each_is_delivered_once() {
    // Two slots: fan-out sends the first events itself with a lease; the rest are stored
    // unleased while the receiver holds both slots, and the claim delivers them after.
    let app = spawn_with(|config| fieldline_common::Config {
        webhook_endpoint_concurrency: 2,
        ..config
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.script("/slow", vec![Reply::Hang(Duration::from_millis(300)); 4]);
    let token = app.create_device("d1").await;
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/slow"), "events": ["device.data"]}),
    )
    .await;
    for n in 0..12 {
        ingest(&app, &token, json!({"n": n})).await;
    }
    let requests = wait_received(&receiver, "/slow", 12, Duration::from_secs(15)).await;
    let mut ids: Vec<_> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 12, "each event once");
    let log = eventually("all recorded", Duration::from_secs(5), || async {
        let log = deliveries(&app, &id, "?status=succeeded&limit=100").await;
        (log.len() == 12).then_some(log)
    })
    .await;
    assert!(
        log.iter().all(|d| d["attempts"] == 1),
        "one attempt each: {log:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received("/slow").len(), 12, "sent again");
    app.shutdown().await;
}
