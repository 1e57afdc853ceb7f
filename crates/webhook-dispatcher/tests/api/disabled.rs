//! A webhook is disabled after failing for a time; its queue waits, untried, and goes out on
//! `enable`; the project's other webhooks hear of it through `webhook.disabled`.

use std::{collections::BTreeMap, time::Duration};

use fieldline_common::Config;
use fieldline_testkit::{
    TestApp, eventually,
    receiver::{Receiver, Reply},
};
use reqwest::StatusCode;
use serde_json::json;

use crate::{
    delivery::{deliveries, webhook},
    ingest, register, spawn_with, wait_received,
};

/// Retries every 300 ms for 6 s (the most retries a schedule may have): a delivery is still retrying when its webhook has been
/// failing for `failing` and is disabled.
fn failing_for(failing: Duration) -> impl FnOnce(Config) -> Config {
    move |config| Config {
        webhook_retry_schedule: vec!["300ms"; 20].join(","),
        webhook_disable_after_failing: failing,
        ..config
    }
}

async fn event_ids(app: &TestApp, webhook_id: &str, status: &str) -> Vec<String> {
    let mut ids: Vec<String> = deliveries(app, webhook_id, &format!("?status={status}"))
        .await
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_webhook_disabled_for_failing_keeps_its_queue_and_delivers_it_once_on_enable() {
    let app = spawn_with(failing_for(Duration::from_secs(1))).await;
    let receiver = Receiver::start().await;
    receiver.script("/down", vec![Reply::Status(503); 100_000]);
    let token = app.create_device("d1").await;
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/down"), "events": ["device.data"]}),
    )
    .await;

    ingest(&app, &token, json!({"n": 1})).await;
    ingest(&app, &token, json!({"n": 2})).await;
    let disabled = eventually(
        "disabled after failing for 1s",
        Duration::from_secs(15),
        || async {
            let webhook = webhook(&app, &id).await;
            (webhook["enabled"] == false).then_some(webhook)
        },
    )
    .await;
    let reason = disabled["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("failing for 1s"), "{reason}");

    // Events that come while it is disabled are queued, not failed and not sent.
    for n in 3..=5 {
        ingest(&app, &token, json!({"n": n})).await;
    }
    let pending = eventually(
        "five deliveries pending",
        Duration::from_secs(10),
        || async {
            let pending = event_ids(&app, &id, "pending").await;
            (pending.len() == 5).then_some(pending)
        },
    )
    .await;
    assert_eq!(event_ids(&app, &id, "failed").await, Vec::<String>::new());
    let untried: Vec<String> = deliveries(&app, &id, "?status=pending")
        .await
        .iter()
        .filter(|d| d["attempts"] == 0)
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(untried.len(), 3, "the events of the outage were tried");
    assert!(
        receiver.received("/down").iter().all(|r| !untried
            .iter()
            .any(|id| r.header("webhook-id") == Some(id.as_str()))),
        "an event was sent to a disabled webhook"
    );

    // The receiver is back; enable sends every pending event, each once.
    receiver.script("/down", Vec::new());
    let healthy_from = receiver.received("/down").len();
    let (status, body) = app
        .post(
            &format!("/api/v1/webhooks/{id}/enable"),
            app.admin_key(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        "every pending event delivered",
        Duration::from_secs(10),
        || async { (event_ids(&app, &id, "succeeded").await == pending).then_some(()) },
    )
    .await;
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    for request in &receiver.received("/down")[healthy_from..] {
        *sent
            .entry(request.header("webhook-id").unwrap().to_owned())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = pending.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(sent, expected, "each pending event exactly once");
    app.shutdown().await;
}

#[tokio::test]
async fn webhook_disabled_reaches_the_other_webhooks_that_subscribe_to_it() {
    let app = spawn_with(failing_for(Duration::from_millis(500))).await;
    let receiver = Receiver::start().await;
    receiver.script("/down", vec![Reply::Status(503); 100_000]);
    let token = app.create_device("d1").await;
    let (down, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/down"), "name": "crm", "events": ["device.data"]}),
    )
    .await;
    let (ops, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/ops"), "events": ["webhook.disabled"]}),
    )
    .await;
    // Created without `events`: the device events only.
    let (plain, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/plain")}),
    )
    .await;
    assert!(
        !webhook(&app, &plain).await["events"]
            .as_array()
            .unwrap()
            .contains(&json!("webhook.disabled"))
    );

    ingest(&app, &token, json!({"n": 1})).await;
    let notice = wait_received(&receiver, "/ops", 1, Duration::from_secs(15))
        .await
        .remove(0);
    let body = notice.json();
    assert_eq!(body["event"], "webhook.disabled", "{body}");
    assert_eq!(body["project"], "default");
    assert_eq!(body["payload"]["webhook_id"], down.as_str());
    assert_eq!(body["payload"]["name"], "crm");
    assert!(
        body["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains("failing for"),
        "{body}"
    );
    assert_eq!(notice.header("webhook-id"), body["id"].as_str());
    assert!(notice.header("webhook-signature").is_some());
    assert_eq!(webhook(&app, &down).await["enabled"], false);
    eventually("the notice recorded", Duration::from_secs(5), || async {
        (event_ids(&app, &ops, "succeeded").await.len() == 1).then_some(())
    })
    .await;
    // The webhook with default subscriptions got the device events, not the notice.
    wait_received(&receiver, "/plain", 1, Duration::from_secs(10)).await;
    let notices: i64 = app
        .env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE webhook_id = $1 AND event_type = 'webhook.disabled'",
            &[&plain],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(notices, 0);
    assert!(
        receiver
            .received("/plain")
            .iter()
            .all(|r| r.json()["event"] != "webhook.disabled")
    );
    app.shutdown().await;
}
