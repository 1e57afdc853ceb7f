//! Webhooks that fit the receiver: batches, per-device order, severity and metric filters,
//! CloudEvents, Slack, Discord and template bodies.

use std::time::Duration;

use fieldline_testkit::{TestApp, assert_error, eventually, receiver::Receiver};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    ingest, register,
    signatures::{seed_receiver_accepts, standard_verifier_accepts},
    spawn, wait_received,
};

/// Event ids of a batch body (a JSON array of events).
fn ids(body: &Value) -> Vec<String> {
    body.as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"))
        .iter()
        .map(|event| event["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_batch_is_one_signed_post_and_a_failed_batch_is_retried_whole() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("d1").await;
    let secret = "a-plain-secret-for-the-batch-test";
    let (webhook, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/batch"), "events": ["device.data"], "secret": secret,
               "batch": {"max_events": 5, "max_wait_ms": 60000}}),
    )
    .await;
    receiver.script(
        "/batch",
        vec![fieldline_testkit::receiver::Reply::Status(500)],
    );
    for value in 0..5 {
        ingest(&app, &token, json!({"temp": value})).await;
    }
    let received = wait_received(&receiver, "/batch", 2, Duration::from_secs(15)).await;
    let (first, second) = (&received[0], &received[1]);
    let first_ids = ids(&first.json());
    assert_eq!(first_ids.len(), 5, "{}", first.json());
    // Retried whole: the same five events, signed again for the new attempt.
    assert_eq!(ids(&second.json()), first_ids);
    for attempt in [first, second] {
        assert!(attempt.header("webhook-id").unwrap().starts_with("bat_"));
        assert!(
            standard_verifier_accepts(secret, attempt),
            "Standard Webhooks signature"
        );
        assert!(
            seed_receiver_accepts(secret, attempt),
            "X-Webhook-Signature"
        );
    }
    // The log shows each event's delivery with the batch it went in.
    let deliveries = eventually("both attempts logged", Duration::from_secs(10), || async {
        let (_, log) = app
            .get(
                &format!("/api/v1/webhooks/{webhook}/deliveries"),
                app.admin_key(),
            )
            .await;
        let deliveries = log["data"].as_array().cloned().unwrap_or_default();
        deliveries
            .iter()
            .all(|d| d["status"] == "succeeded")
            .then_some(deliveries)
    })
    .await;
    assert_eq!(deliveries.len(), 5);
    for delivery in deliveries {
        let attempts = delivery["attempt_log"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{delivery}");
        assert_eq!(attempts[0]["batch_id"], first.header("webhook-id").unwrap());
        assert_eq!(
            attempts[1]["batch_id"],
            second.header("webhook-id").unwrap()
        );
        assert_eq!(attempts[0]["status_code"], 500);
        assert_eq!(attempts[1]["status_code"], 200);
    }
    // A batch that does not fill goes when its oldest event has waited max_wait_ms.
    let (_, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/wait"), "events": ["device.data"],
               "batch": {"max_events": 100, "max_wait_ms": 300}}),
    )
    .await;
    ingest(&app, &token, json!({"temp": 7})).await;
    ingest(&app, &token, json!({"temp": 8})).await;
    let received = wait_received(&receiver, "/wait", 1, Duration::from_secs(10)).await;
    let total: usize = receiver
        .received("/wait")
        .iter()
        .map(|r| r.json().as_array().map_or(0, Vec::len))
        .sum();
    assert!(received[0].json().is_array());
    eventually("both events delivered", Duration::from_secs(5), || async {
        let total: usize = receiver
            .received("/wait")
            .iter()
            .map(|r| r.json().as_array().map_or(0, Vec::len))
            .sum();
        (total == 2).then_some(())
    })
    .await;
    assert!(total >= 1);
    app.shutdown().await;
}

async fn create_device(app: &TestApp, id: &str) -> String {
    app.create_device(id).await
}

/// A receiver fails device a's third event three times: a's events still arrive in order,
/// a's fourth and fifth wait (the log says behind what), and b's do not wait at all.
#[tokio::test]
async fn ordered_by_device_a_failing_event_holds_only_its_devices_later_events() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let a = create_device(&app, "a").await;
    let b = create_device(&app, "b").await;
    let (webhook, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/ordered"), "events": ["device.data"], "ordering": "device"}),
    )
    .await;
    receiver.fail_matching("/ordered", "\"metric\":\"a3\"", 3, 503);
    for n in 1..=5 {
        ingest(&app, &a, json!({ format!("a{n}"): n })).await;
    }
    for n in 1..=5 {
        ingest(&app, &b, json!({ format!("b{n}"): n })).await;
    }
    // While a3 fails, the log says what waits behind it.
    eventually(
        "a4 and a5 waiting behind a3",
        Duration::from_secs(10),
        || async {
            let (_, log) = app
                .get(
                    &format!("/api/v1/webhooks/{webhook}/deliveries?status=pending"),
                    app.admin_key(),
                )
                .await;
            let pending = log["data"].as_array().cloned().unwrap_or_default();
            let failing = pending
                .iter()
                .find(|d| d["device_id"] == "a" && d["last_status_code"] == 503)?;
            let behind = pending
                .iter()
                .filter(|d| d["waiting_for"] == failing["id"] && d["device_id"] == "a")
                .count();
            (behind == 2).then_some(())
        },
    )
    .await;
    // Every event arrives: a3 on its fourth attempt.
    let metric = |r: &fieldline_testkit::receiver::Received| {
        r.json()["payload"]["readings"][0]["metric"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    eventually("all ten delivered", Duration::from_secs(20), || async {
        let mut delivered: Vec<String> = receiver.received("/ordered").iter().map(metric).collect();
        delivered.sort();
        delivered.dedup();
        (delivered.len() == 10).then_some(())
    })
    .await;
    let received = receiver.received("/ordered");
    let order_of = |device: &str| -> Vec<String> {
        let mut order: Vec<String> = received
            .iter()
            .map(metric)
            .filter(|m| m.starts_with(device))
            .collect();
        order.dedup();
        order
    };
    assert_eq!(order_of("a"), ["a1", "a2", "a3", "a4", "a5"]);
    assert_eq!(order_of("b"), ["b1", "b2", "b3", "b4", "b5"]);
    let a3_tries = received.iter().filter(|r| metric(r) == "a3").count();
    assert_eq!(a3_tries, 4, "three failures, then the success");
    // b did not wait for a3: all of b arrived before a3 finally went through.
    let a3_done = received.iter().rposition(|r| metric(r) == "a3").unwrap();
    let b_last = received
        .iter()
        .rposition(|r| metric(r).starts_with('b'))
        .unwrap();
    assert!(
        b_last < a3_done,
        "b waited behind a: {:?}",
        received.iter().map(metric).collect::<Vec<_>>()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn min_severity_critical_passes_a_critical_alert_and_not_a_warning_one() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("boiler").await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/critical"), "events": ["device.alert"], "min_severity": "critical"}),
    )
    .await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/all"), "events": ["device.alert"]}),
    )
    .await;
    for (name, threshold, severity) in [("hot", 80, "warning"), ("boiling", 99, "critical")] {
        let (status, body) = app
            .post(
                "/api/v1/alert-rules",
                app.admin_key(),
                &json!({"name": name, "device_id": "boiler", "metric": "temp", "op": "gt",
                        "threshold": threshold, "severity": severity}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    ingest(&app, &token, json!({"temp": 85})).await;
    ingest(&app, &token, json!({"temp": 120})).await;
    wait_received(&receiver, "/all", 2, Duration::from_secs(15)).await;
    let critical = wait_received(&receiver, "/critical", 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let critical = if receiver.received("/critical").len() == 1 {
        critical
    } else {
        receiver.received("/critical")
    };
    assert_eq!(
        critical.len(),
        1,
        "{:?}",
        critical.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    assert_eq!(critical[0].json()["payload"]["severity"], "critical");
    assert_eq!(critical[0].json()["payload"]["rule_name"], "boiling");
    app.shutdown().await;
}

#[tokio::test]
async fn a_metric_filter_passes_only_readings_of_its_metrics() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("d1").await;
    register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/temp"), "events": ["device.data"], "metrics": ["temp"]}),
    )
    .await;
    ingest(&app, &token, json!({"humidity": 40})).await;
    ingest(&app, &token, json!({"temp": 21, "humidity": 41})).await;
    let received = wait_received(&receiver, "/temp", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received("/temp").len(), 1);
    assert_eq!(
        received[0].json()["payload"]["readings"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    app.shutdown().await;
}

/// Parses a request with the CloudEvents SDK for Python, as a receiver would; returns what
/// it read (id, type, source, subject, data).
fn parse_cloudevent(received: &fieldline_testkit::receiver::Received) -> Value {
    let headers: serde_json::Map<String, Value> = received
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    let script = r#"
import json, sys
from cloudevents.v1.http import from_http
message = json.load(sys.stdin)
event = from_http(message["headers"], message["body"])
print(json.dumps({"id": event["id"], "type": event["type"], "source": event["source"],
                  "subject": event.get("subject"), "specversion": event["specversion"], "data": event.data}))
"#;
    let input = json!({"headers": headers, "body": String::from_utf8_lossy(&received.body)});
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (make test provisions it)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the CloudEvents SDK refused it (provision installs cloudevents==2.2.0):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn cloudevents_slack_discord_and_template_bodies() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let token = app.create_device("greenhouse-1").await;
    for (path, options) in [
        ("/structured", json!({"format": "cloudevents"})),
        (
            "/binary",
            json!({"format": "cloudevents", "cloudevents_mode": "binary"}),
        ),
        ("/slack", json!({"format": "slack"})),
        ("/discord", json!({"format": "discord"})),
        (
            "/template",
            json!({"format": "template",
            "template": "{\"device\": {{ device_id | tojson }}, \"temp\": {{ payload.readings[0].value }}}"}),
        ),
    ] {
        let mut body = json!({"url": receiver.url(path), "events": ["device.data"]});
        body.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        register(&app, app.admin_key(), body).await;
    }
    ingest(&app, &token, json!({"temp": 21.5})).await;

    for (path, content_type) in [
        ("/structured", "application/cloudevents+json"),
        ("/binary", "application/json"),
    ] {
        let received = wait_received(&receiver, path, 1, Duration::from_secs(10)).await;
        assert_eq!(received[0].header("content-type"), Some(content_type));
        let event = parse_cloudevent(&received[0]);
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "io.fieldline.device.data");
        assert_eq!(
            event["source"],
            "/fieldline/projects/default/devices/greenhouse-1"
        );
        assert_eq!(event["subject"], "greenhouse-1");
        assert!(event["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(event["data"]["readings"][0]["value"], 21.5, "{event}");
    }
    let slack = wait_received(&receiver, "/slack", 1, Duration::from_secs(10)).await[0].json();
    // Slack's incoming webhooks need `text` (or blocks).
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.contains("greenhouse-1") && text.contains("temp=21.5"),
        "{text}"
    );
    let discord = wait_received(&receiver, "/discord", 1, Duration::from_secs(10)).await[0].json();
    // Discord's need `content` (or embeds), at most 2,000 characters.
    let content = discord["content"].as_str().unwrap();
    assert!(
        content.contains("greenhouse-1") && content.chars().count() <= 2000,
        "{content}"
    );
    let template =
        wait_received(&receiver, "/template", 1, Duration::from_secs(10)).await[0].json();
    assert_eq!(template, json!({"device": "greenhouse-1", "temp": 21.5}));
    app.shutdown().await;
}

#[tokio::test]
async fn a_bad_template_or_a_batch_in_a_chat_format_is_refused_with_a_clear_400() {
    let app = spawn().await;
    let receiver = Receiver::start().await;
    let (status, body) = app
        .post(
            "/api/v1/webhooks",
            app.admin_key(),
            &json!({"url": receiver.url("/t"), "format": "template",
                    "template": "{\n  \"a\": {{ payload.readings[0].value }},\n  \"b\": {% if %}\n}"}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_template");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("template: line 3, column"), "{message}");
    let (status, body) = app
        .post(
            "/api/v1/webhooks",
            app.admin_key(),
            &json!({"url": receiver.url("/t"), "format": "slack", "batch": {"max_events": 10}}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("batch:")
    );
    let (status, body) = app
        .post(
            "/api/v1/webhooks",
            app.admin_key(),
            &json!({"url": receiver.url("/t"), "min_severity": "urgent"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // What was set is shown, and PATCH changes it.
    let (id, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/t"), "ordering": "device", "min_severity": "warning", "tags": ["roof"]}),
    )
    .await;
    let (_, shown) = app
        .get(&format!("/api/v1/webhooks/{id}"), app.admin_key())
        .await;
    assert_eq!(shown["data"]["ordering"], "device");
    assert_eq!(shown["data"]["min_severity"], "warning");
    assert_eq!(shown["data"]["tags"], json!(["roof"]));
    assert_eq!(shown["data"]["format"], "fieldline");
    let (status, patched) = app
        .request(
            reqwest::Method::PATCH,
            &format!("/api/v1/webhooks/{id}"),
            Some(app.admin_key()),
            Some(&json!({"ordering": "none", "format": "discord"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["data"]["ordering"], "none");
    assert_eq!(patched["data"]["format"], "discord");
    assert_eq!(patched["data"]["min_severity"], "warning");
    app.shutdown().await;
}
