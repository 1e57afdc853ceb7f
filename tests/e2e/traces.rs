//! One trace from device to webhook: the split platform exports spans over OTLP/HTTP to a
//! receiver in the test, and a reading's spans, from every service it crosses, share one trace
//! id with the webhook receiver's `traceparent`.

use std::time::Duration;

use fieldline_testkit::{
    eventually,
    otlp::{OtlpReceiver, ReceivedSpan},
    receiver::Receiver,
};
use rumqttc::QoS;
use serde_json::json;

use crate::{platform::Platform, scenarios::mqtt_client};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

/// The trace id of a W3C `traceparent` (`00-{trace}-{span}-{flags}`).
fn trace_of(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap_or_default().to_owned()
}

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|span| span.service == service && span.name == name)
}

/// Waits until the trace of the webhook receiver's `traceparent` holds every span the path
/// makes, and checks how they hang together.
async fn the_path_is_one_trace(
    otlp: &OtlpReceiver,
    traceparent: &str,
    first_service: &str,
    first_span: &str,
) {
    let trace = trace_of(traceparent);
    let spans = eventually(
        "the whole path's spans",
        Duration::from_secs(20),
        || async {
            let spans: Vec<ReceivedSpan> = otlp
                .spans()
                .into_iter()
                .filter(|span| span.trace_id == trace)
                .collect();
            let complete = find(&spans, first_service, first_span).is_some()
                && find(&spans, "query-api", "query-writer process").is_some()
                && find(&spans, "webhook-dispatcher", "webhook-data process").is_some()
                && find(&spans, "webhook-dispatcher", "webhook attempt").is_some();
            complete.then_some(spans)
        },
    )
    .await;
    let publish = find(&spans, first_service, "telemetry publish").expect("the publish span");
    assert_eq!(publish.kind, PRODUCER);
    let writer = find(&spans, "query-api", "query-writer process").unwrap();
    assert_eq!(writer.kind, CONSUMER);
    // The batch continues its first message's trace and links every message it stores.
    assert_eq!(writer.parent_span_id, publish.span_id);
    assert!(
        writer
            .links
            .contains(&(trace.clone(), publish.span_id.clone())),
        "{writer:?}"
    );
    let fanout = find(&spans, "webhook-dispatcher", "webhook-data process").unwrap();
    assert_eq!(fanout.parent_span_id, publish.span_id);
    let attempt = find(&spans, "webhook-dispatcher", "webhook attempt").unwrap();
    assert_eq!(attempt.kind, CLIENT);
    assert_eq!(
        attempt.parent_span_id, publish.span_id,
        "an attempt joins its event's trace"
    );
    assert_eq!(attempt.attribute("http.response.status_code"), Some("200"));
    // The receiver can continue the trace from the attempt's span.
    assert_eq!(
        traceparent.split('-').nth(2),
        Some(attempt.span_id.as_str())
    );
    eprintln!("trace {trace}:\n{}", tree(&spans));
}

/// The trace as an indented tree (`service: span name (links)`), for the eye.
fn tree(spans: &[ReceivedSpan]) -> String {
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent_span_id == parent) {
            let links = if span.links.is_empty() {
                String::new()
            } else {
                format!(" (links: {})", span.links.len())
            };
            out.push_str(&format!(
                "{}{}: {}{links}\n",
                "  ".repeat(depth),
                span.service,
                span.name
            ));
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, "", 0, &mut out);
    out
}

#[tokio::test]
async fn one_reading_is_one_trace_from_device_to_webhook_over_http_and_mqtt() {
    let otlp = OtlpReceiver::start().await;
    let webhooks = Receiver::start().await;
    let env = otlp.env_vars();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let platform = Platform::split_with(&pairs).await;
    let (status, device) = platform
        .post(
            "/api/v1/devices",
            platform.admin_key(),
            &json!({"id": "traced-1"}),
        )
        .await;
    assert!(status.is_success(), "{device}");
    let token = device["data"]["token"].as_str().unwrap().to_owned();
    let (status, body) = platform
        .post(
            "/api/v1/webhooks",
            platform.admin_key(),
            &json!({"url": webhooks.url("/traced"), "events": ["device.data"]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Over HTTP: the device's request is the root.
    let (status, body) = platform
        .post("/api/v1/ingest", &token, &json!({"temp": 21.5}))
        .await;
    assert!(status.is_success(), "{body}");
    let received = eventually("the webhook", Duration::from_secs(15), || async {
        webhooks.received("/traced").first().cloned()
    })
    .await;
    let traceparent = received
        .header("traceparent")
        .expect("a traceparent")
        .to_owned();
    the_path_is_one_trace(&otlp, &traceparent, "ingest-http", "POST /api/v1/ingest").await;
    let trace = trace_of(&traceparent);
    let spans: Vec<ReceivedSpan> = otlp
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .collect();
    let request = find(&spans, "ingest-http", "POST /api/v1/ingest").unwrap();
    assert_eq!(request.kind, SERVER);
    assert!(
        request.parent_span_id.is_empty(),
        "the device's request is the root"
    );
    let publish = find(&spans, "ingest-http", "telemetry publish").unwrap();
    assert_eq!(publish.parent_span_id, request.span_id);
    // The token was not cached yet: ingest-http asked the registry, inside the request.
    let auth = spans
        .iter()
        .find(|s| s.service == "ingest-http" && s.name.ends_with("rpc.auth.verify request"))
        .unwrap_or_else(|| panic!("no auth rpc span: {spans:?}"));
    assert_eq!(auth.kind, CLIENT);
    assert_eq!(auth.parent_span_id, request.span_id);

    // Over MQTT: ingest-mqtt's publish is the root (MQTT 3.1.1 carries no trace context).
    let client = mqtt_client(&platform, "traced-1", &token);
    let topic = format!("{}/default/traced-1/telemetry", platform.topic_root());
    client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 22.5}"#.to_vec(),
        )
        .await
        .unwrap();
    let received = eventually(
        "the MQTT reading's webhook",
        Duration::from_secs(15),
        || async { webhooks.received("/traced").get(1).cloned() },
    )
    .await;
    let traceparent = received
        .header("traceparent")
        .expect("a traceparent")
        .to_owned();
    assert_ne!(trace_of(&traceparent), trace);
    the_path_is_one_trace(&otlp, &traceparent, "ingest-mqtt", "telemetry publish").await;
    platform.stop().await;
    otlp.stop().await;
}
