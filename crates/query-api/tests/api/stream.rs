//! The live streams: a device's readings and the project's events as Server-Sent Events,
//! resumed with `Last-Event-ID`, bounded per key and per project.

use std::time::Duration;

use fieldline_common::Config;
use fieldline_proto::v1::DeviceEvent;
use fieldline_testkit::{TestApp, assert_error, read};
use prost::Message as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::{create_project, number, publish, spawn_query, spawn_query_with};

/// One event of a stream: its id, name and data (parsed JSON).
#[derive(Debug)]
struct Event {
    id: Option<String>,
    name: String,
    data: Value,
}

/// A stream being read: events or comment lines.
struct Sse {
    response: reqwest::Response,
    buffer: String,
}

#[derive(Debug)]
enum Frame {
    Event(Event),
    Comment(String),
}

impl Sse {
    async fn open(app: &TestApp, path: &str, key: &str, last_event_id: Option<&str>) -> Self {
        let response = Self::request(app, path, key, last_event_id).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    async fn request(
        app: &TestApp,
        path: &str,
        key: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut request = app
            .http
            .get(format!("{}{path}", app.base_url))
            .bearer_auth(key);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.unwrap()
    }

    /// The next frame within `wait`, or `None` (the stream ended or nothing came).
    async fn frame(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut name = "message".to_owned();
                let mut data = String::new();
                let mut comment = None;
                for line in block.lines() {
                    if let Some(text) = line.strip_prefix(':') {
                        comment = Some(text.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("id: ") {
                        id = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("event: ") {
                        name = value.to_owned();
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                if data.is_empty() {
                    if let Some(comment) = comment {
                        return Some(Frame::Comment(comment));
                    }
                    continue; // `retry:` alone
                }
                return Some(Frame::Event(Event {
                    id,
                    name,
                    data: serde_json::from_str(&data).unwrap(),
                }));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event (comments skipped) within `wait`.
    async fn event(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.frame(left).await? {
                Frame::Event(event) => return Some(event),
                Frame::Comment(_) => {}
            }
        }
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn value_of(event: &Event) -> f64 {
    event.data["readings"][0]["value"].as_f64().unwrap()
}

#[tokio::test]
async fn a_device_stream_sends_new_readings_and_resumes_after_the_last_event_id() {
    let app = spawn_query().await;
    app.create_device("pump").await;
    app.create_device("fan").await;
    let (_, read_key) = app.create_key(&["read"]).await;
    let now = fieldline_common::time::now_us();
    // Before the stream opens: not sent to a new stream.
    publish(
        &app,
        "default",
        "pump",
        vec![number("flow", now - 1000, 0.5)],
    )
    .await;

    let path = "/api/v1/devices/pump/readings/stream";
    let mut stream = Sse::open(&app, path, &read_key, None).await;
    publish(&app, "default", "fan", vec![number("flow", now, 9.0)]).await;
    publish(&app, "default", "pump", vec![number("flow", now, 1.0)]).await;
    let first = stream.event(WAIT).await.expect("the first reading");
    assert_eq!(first.name, "readings");
    assert_eq!(first.data["device_id"], "pump");
    assert_eq!(first.data["readings"][0]["metric"], "flow");
    assert_eq!(value_of(&first), 1.0, "the fan's reading is not the pump's");
    let first_id = first.id.clone().expect("an id to resume from");
    drop(stream);

    // Missed while away, then resumed: each once, in order, the one already seen not again.
    for value in [2.0, 3.0] {
        publish(&app, "default", "pump", vec![number("flow", now, value)]).await;
    }
    let mut resumed = Sse::open(&app, path, &read_key, Some(&first_id)).await;
    let mut values = Vec::new();
    for _ in 0..2 {
        values.push(value_of(
            &resumed.event(WAIT).await.expect("a missed reading"),
        ));
    }
    assert_eq!(values, vec![2.0, 3.0]);
    // Then live, and the ids grow.
    publish(&app, "default", "pump", vec![number("flow", now, 4.0)]).await;
    let live = resumed.event(WAIT).await.expect("a live reading");
    assert_eq!(value_of(&live), 4.0);
    let live_id: u64 = live.id.unwrap().parse().unwrap();
    assert!(live_id > first_id.parse::<u64>().unwrap());
    assert!(
        resumed.event(Duration::from_millis(500)).await.is_none(),
        "nothing more was published"
    );
}

/// Under load ingest-mqtt puts several devices in one bus message: a device's stream sends its
/// own readings from it (and none of the others'), in one order with its single-device
/// messages, and resumes across both shapes.
#[tokio::test]
async fn a_device_stream_sends_its_readings_from_a_batch_of_several_devices() {
    let app = spawn_query().await;
    for device in ["pump", "fan"] {
        app.create_device(device).await;
    }
    let (_, read_key) = app.create_key(&["read"]).await;
    let now = fieldline_common::time::now_us();
    let path = "/api/v1/devices/pump/readings/stream";
    let mut stream = Sse::open(&app, path, &read_key, None).await;
    publish(&app, "default", "pump", vec![number("flow", now, 1.0)]).await;
    // Only the fan in this one: nothing for the pump's stream.
    app.publish_telemetry(&fieldline_testkit::multi_device_batch(
        "default",
        vec![("fan", vec![number("flow", now, 8.0)])],
        now,
    ))
    .await;
    app.publish_telemetry(&fieldline_testkit::multi_device_batch(
        "default",
        vec![
            ("fan", vec![number("flow", now, 9.0)]),
            (
                "pump",
                vec![number("flow", now, 2.0), number("temp", now, 40.0)],
            ),
        ],
        now,
    ))
    .await;
    publish(&app, "default", "pump", vec![number("flow", now, 3.0)]).await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(stream.event(WAIT).await.expect("a reading of the pump"));
    }
    let values: Vec<f64> = events.iter().map(value_of).collect();
    assert_eq!(values, vec![1.0, 2.0, 3.0], "{events:?}");
    let batched = &events[1];
    assert_eq!(batched.data["device_id"], "pump");
    assert_eq!(batched.data["source"], "mqtt");
    assert_eq!(
        batched.data["readings"].as_array().unwrap().len(),
        2,
        "{batched:?}"
    );
    assert!(
        stream.event(Duration::from_millis(500)).await.is_none(),
        "the fan's readings are not the pump's"
    );
    drop(stream);
    // Resumed after the first: the batch's part again, then the next.
    let first_id = events[0].id.clone().unwrap();
    let mut resumed = Sse::open(&app, path, &read_key, Some(&first_id)).await;
    let mut values = Vec::new();
    for _ in 0..2 {
        values.push(value_of(
            &resumed.event(WAIT).await.expect("a missed reading"),
        ));
    }
    assert_eq!(values, vec![2.0, 3.0]);
}

#[tokio::test]
async fn a_stream_refuses_other_projects_devices_missing_keys_and_bad_ids() {
    let app = spawn_query().await;
    app.create_device("pump").await;
    let other_key = create_project(&app, "other").await;
    let path = "/api/v1/devices/pump/readings/stream";
    let (status, body) = read(Sse::request(&app, path, &other_key, None).await).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    let (status, _) = read(
        app.http
            .get(format!("{}{path}", app.base_url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) =
        read(Sse::request(&app, path, app.admin_key(), Some("yesterday")).await).await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_last_event_id",
    );
    let (status, body) = read(
        Sse::request(
            &app,
            "/api/v1/events/stream?types=device.weather",
            app.admin_key(),
            None,
        )
        .await,
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
}

#[tokio::test]
async fn streams_are_capped_per_key_and_per_project_and_released_when_closed() {
    let app = spawn_query_with(|config| Config {
        stream_max_per_key: 2,
        stream_max_per_project: 3,
        stream_heartbeat: Duration::from_millis(100),
        ..config
    })
    .await;
    app.create_device("pump").await;
    let (_, first_key) = app.create_key(&["read"]).await;
    let (_, second_key) = app.create_key(&["read"]).await;
    let path = "/api/v1/devices/pump/readings/stream";
    let one = Sse::open(&app, path, &first_key, None).await;
    let _two = Sse::open(&app, "/api/v1/events/stream", &first_key, None).await;
    let refused = Sse::request(&app, path, &first_key, None).await;
    assert_eq!(refused.headers()["retry-after"], "5");
    let (status, body) = read(refused).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_streams",
    );
    // Another key of the project may, up to the project's cap.
    let _three = Sse::open(&app, path, &second_key, None).await;
    let (status, body) = read(Sse::request(&app, path, &second_key, None).await).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_streams",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("project"),
        "{body}"
    );
    // A closed stream gives its place back (noticed at the next heartbeat at the latest).
    drop(one);
    fieldline_testkit::eventually("a slot given back", WAIT, || async {
        let response = Sse::request(&app, path, &first_key, None).await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

fn event(project: &str, device_id: &str, event_type: &str, payload: Value) -> DeviceEvent {
    DeviceEvent {
        id: format!("evt_{}", fieldline_testkit::unique_suffix()),
        project: project.into(),
        device_id: device_id.into(),
        event_type: event_type.into(),
        occurred_at_us: fieldline_common::time::now_us(),
        payload_json: payload.to_string(),
    }
}

async fn publish_event(app: &TestApp, token: &str, event: DeviceEvent) {
    let subject = app
        .context
        .subjects
        .event(&event.project, token, &event.device_id);
    app.context
        .jetstream
        .publish(subject, event.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_events_stream_sends_the_projects_events_with_heartbeats_and_ends_after_its_lifetime() {
    let app = spawn_query_with(|config| Config {
        stream_heartbeat: Duration::from_millis(200),
        stream_max_lifetime: Duration::from_secs(3),
        ..config
    })
    .await;
    create_project(&app, "other").await;
    let (_, read_key) = app.create_key(&["read"]).await;
    let mut all = Sse::open(&app, "/api/v1/events/stream", &read_key, None).await;
    let mut alerts = Sse::open(
        &app,
        "/api/v1/events/stream?types=device.alert",
        &read_key,
        None,
    )
    .await;
    publish_event(
        &app,
        "status",
        event(
            "other",
            "pump",
            "device.status",
            serde_json::json!({"status": "online"}),
        ),
    )
    .await;
    publish_event(
        &app,
        "status",
        event(
            "default",
            "pump",
            "device.status",
            serde_json::json!({"status": "online"}),
        ),
    )
    .await;
    publish_event(
        &app,
        "alert",
        event(
            "default",
            "pump",
            "device.alert",
            serde_json::json!({"state": "firing"}),
        ),
    )
    .await;
    let status = all.event(WAIT).await.expect("the status event");
    assert_eq!(status.name, "device.status");
    assert_eq!(status.data["device_id"], "pump");
    assert_eq!(status.data["payload"]["status"], "online");
    let alert = all.event(WAIT).await.expect("the alert event");
    assert_eq!(alert.name, "device.alert");
    let only_alert = alerts.event(WAIT).await.expect("the alert, filtered");
    assert_eq!(only_alert.name, "device.alert");
    assert_eq!(only_alert.id, alert.id);
    // Idle: comment lines keep proxies from closing it.
    assert!(matches!(
        all.frame(Duration::from_secs(1)).await,
        Some(Frame::Comment(text)) if text == "keep-alive"
    ));
    // After its lifetime: `end`, then the body closes.
    let end = all.event(Duration::from_secs(5)).await.expect("end");
    assert_eq!(end.name, "end");
    assert_eq!(end.data["reason"], "lifetime");
    assert!(all.frame(Duration::from_secs(2)).await.is_none());
}

#[tokio::test]
async fn a_resume_past_what_the_stream_still_holds_starts_with_reset() {
    let app = spawn_query().await;
    app.create_device("pump").await;
    let path = "/api/v1/devices/pump/readings/stream";
    let mut stream = Sse::open(&app, path, app.admin_key(), None).await;
    let now = fieldline_common::time::now_us();
    publish(&app, "default", "pump", vec![number("flow", now, 1.0)]).await;
    let seen = stream.event(WAIT).await.expect("a reading");
    drop(stream);
    publish(&app, "default", "pump", vec![number("flow", now, 2.0)]).await;
    // What came after the client's last event ages out (here: purged).
    let name = app
        .context
        .subjects
        .stream_name(fieldline_proto::Stream::Telemetry);
    app.context
        .jetstream
        .get_stream(&name)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    publish(&app, "default", "pump", vec![number("flow", now, 3.0)]).await;
    let mut resumed = Sse::open(&app, path, app.admin_key(), seen.id.as_deref()).await;
    let reset = resumed.event(WAIT).await.expect("reset");
    assert_eq!(reset.name, "reset");
    let next = resumed
        .event(WAIT)
        .await
        .expect("what the stream still holds");
    assert_eq!(value_of(&next), 3.0);
}

#[tokio::test]
async fn past_the_process_cap_a_stream_is_refused_with_503() {
    let app = spawn_query_with(|config| Config {
        stream_max: 1,
        ..config
    })
    .await;
    let _only = Sse::open(&app, "/api/v1/events/stream", app.admin_key(), None).await;
    let other_key = create_project(&app, "other").await;
    let refused = Sse::request(&app, "/api/v1/events/stream", &other_key, None).await;
    assert_eq!(refused.headers()["retry-after"], "5");
    let (status, body) = read(refused).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_streams",
    );
}
