use std::time::Duration;

use fieldline_testkit::{
    assert_error, eventually,
    receiver::{Receiver, Reply},
};
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};

use crate::platform::Platform;

pub async fn create_device(platform: &Platform, id: &str) -> String {
    let (status, body) = platform
        .post(
            "/api/v1/devices",
            platform.admin_key(),
            &json!({"id": id, "type": "sensor"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["data"]["token"].as_str().unwrap().to_owned()
}

async fn create_key(platform: &Platform, scopes: &[&str]) -> (String, String) {
    let (status, body) = platform
        .post(
            "/api/v1/keys",
            platform.admin_key(),
            &json!({"name": "e2e", "scopes": scopes}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        body["data"]["id"].as_str().unwrap().to_owned(),
        body["data"]["secret"].as_str().unwrap().to_owned(),
    )
}

/// Every reading of a device, in order, as (metric, ts, value).
async fn history(platform: &Platform, device: &str, key: &str) -> Vec<(String, String, Value)> {
    let (status, body) = platform
        .get(
            &format!("/api/v1/devices/{device}/readings?limit=1000"),
            key,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].as_str().unwrap().to_owned(),
                r["ts"].as_str().unwrap().to_owned(),
                r["value"].clone(),
            )
        })
        .collect()
}

async fn wait_for_history(
    platform: &Platform,
    device: &str,
    count: usize,
) -> Vec<(String, String, Value)> {
    eventually(
        &format!("{count} readings of {device}"),
        Duration::from_secs(30),
        || async {
            let readings = history(platform, device, platform.admin_key()).await;
            (readings.len() >= count).then_some(readings)
        },
    )
    .await
}

/// Registers a device, sends readings over HTTP and MQTT, reads exactly those back in order.
pub async fn devices_to_history(platform: &Platform) {
    let token = create_device(platform, "greenhouse-1").await;
    let (status, body) = platform
        .post(
            "/api/v1/ingest",
            &token,
            &json!([
                {"ts": "2026-03-01T10:00:00Z", "temperature": 21.5, "door_open": false},
                {"ts": "2026-03-01T10:00:01Z", "values": {"temperature": 21.75, "fw": "1.2.0"}}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"]["accepted"], 4);

    let client = mqtt_client(platform, "greenhouse-1", &token);
    let topic = format!("{}/default/greenhouse-1/telemetry", platform.topic_root());
    client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            br#"{"ts": 1772359202000, "temperature": 22.0, "door_open": true}"#.to_vec(),
        )
        .await
        .unwrap();

    let readings = wait_for_history(platform, "greenhouse-1", 6).await;
    let expected = vec![
        ("door_open", "2026-03-01T10:00:00Z", json!(false)),
        ("temperature", "2026-03-01T10:00:00Z", json!(21.5)),
        ("fw", "2026-03-01T10:00:01Z", json!("1.2.0")),
        ("temperature", "2026-03-01T10:00:01Z", json!(21.75)),
        ("door_open", "2026-03-01T10:00:02Z", json!(true)),
        ("temperature", "2026-03-01T10:00:02Z", json!(22.0)),
    ];
    let expected: Vec<(String, String, Value)> = expected
        .into_iter()
        .map(|(m, t, v)| (m.to_owned(), t.to_owned(), v))
        .collect();
    assert_eq!(readings, expected);

    let (status, body) = platform
        .get(
            "/api/v1/devices/greenhouse-1/readings/latest",
            platform.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"][2],
        json!({"metric": "temperature", "ts": "2026-03-01T10:00:02Z", "value": 22.0})
    );

    // Every service exposes Prometheus metrics; ingest-mqtt counted the message it published.
    let metrics = platform
        .http
        .get(format!("{}/metrics", platform.service_url("ingest-mqtt")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("fieldline_mqtt_messages_total{outcome=\"published\"}")),
        "{metrics}"
    );
}

/// The same Idempotency-Key twice stores once.
pub async fn idempotency(platform: &Platform) {
    let token = create_device(platform, "idem-1").await;
    // No `ts`: each request would get its own arrival time, so only the key can dedupe them.
    let mut duplicates = Vec::new();
    for _ in 0..2 {
        let response = platform
            .http
            .post(platform.url("/api/v1/ingest"))
            .bearer_auth(&token)
            .header("Idempotency-Key", "retry-me")
            .json(&json!({"temperature": 1.0}))
            .send()
            .await
            .unwrap();
        let (status, body) = fieldline_testkit::read(response).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        duplicates.push(body["data"]["duplicate"].as_bool().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(duplicates, [false, true]);
    // A later, different message proves the writer got past the duplicate.
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &json!({"temperature": 2.0}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let readings = wait_for_history(platform, "idem-1", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let values: Vec<Value> = history(platform, "idem-1", platform.admin_key())
        .await
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(values, vec![json!(1.0), json!(2.0)], "{readings:?}");
}

/// A read key cannot create devices; a revoked key gets 401 from every service.
pub async fn scopes_and_revocation(platform: &Platform) {
    let token = create_device(platform, "scoped-1").await;
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &json!({"ts": 1000, "a": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (key_id, reader) = create_key(platform, &["read"]).await;

    let (status, body) = platform
        .post("/api/v1/devices", &reader, &json!({"id": "not-allowed"}))
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    // Used (and cached) by each service before the revocation.
    assert_eq!(
        platform.get("/api/v1/devices", &reader).await.0,
        StatusCode::OK
    );
    assert_eq!(
        platform
            .get("/api/v1/devices/scoped-1/readings", &reader)
            .await
            .0,
        StatusCode::OK
    );
    let (status, _) = platform
        .post("/api/v1/ingest", &reader, &json!({"a": 1}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, _) = platform
        .request(
            Method::DELETE,
            &format!("/api/v1/keys/{key_id}"),
            platform.admin_key(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked_at = std::time::Instant::now();
    for (method, path) in [
        (Method::GET, "/api/v1/devices"),
        (Method::GET, "/api/v1/devices/scoped-1/readings"),
        (Method::GET, "/api/v1/devices/scoped-1/readings/latest"),
        (Method::POST, "/api/v1/ingest"),
    ] {
        let body = (method == Method::POST).then(|| json!({"a": 1}));
        eventually(
            &format!("401 from {path}"),
            Duration::from_secs(10),
            || async {
                let (status, body) = platform
                    .request(method.clone(), path, &reader, body.as_ref())
                    .await;
                (status == StatusCode::UNAUTHORIZED && body["error"]["reason"] == "unauthorized")
                    .then_some(())
            },
        )
        .await;
    }
    // Every service cached the key for the 30 s cache TTL: refusing it well before then is the
    // broadcast's doing (on a quiet machine within milliseconds; the bound leaves room for a
    // loaded CI runner).
    assert!(
        revoked_at.elapsed() < Duration::from_secs(15),
        "revocation took {:?}",
        revoked_at.elapsed()
    );
}

/// Malformed JSON, a wrong type and an oversized body are refused in the envelope, and
/// nothing of them is stored.
pub async fn bad_input_stores_nothing(platform: &Platform) {
    let token = create_device(platform, "bad-1").await;
    let raw = |body: Vec<u8>| {
        platform
            .http
            .post(platform.url("/api/v1/ingest"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (status, body) =
        fieldline_testkit::read(raw(b"{\"temperature\": 2".to_vec()).await.unwrap()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");
    let (status, body) = platform
        .post("/api/v1/ingest", &token, &json!({"temperature": [1, 2]}))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("temperature"),
        "{body}"
    );
    let oversized = format!("{{\"note\": \"{}\"}}", "x".repeat(3 << 20));
    let (status, body) = fieldline_testkit::read(raw(oversized.into_bytes()).await.unwrap()).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // A good message afterwards is the only thing stored.
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &json!({"ts": 5000, "ok": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let readings = wait_for_history(platform, "bad-1", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        history(platform, "bad-1", platform.admin_key()).await,
        readings
    );
    assert_eq!(readings.len(), 1, "{readings:?}");
}

fn body_signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A third party registers a webhook and gets every reading, from HTTP and MQTT, signed.
pub async fn webhooks_receive_signed_events(platform: &Platform) {
    let receiver = Receiver::start().await;
    let token = create_device(platform, "hooked-1").await;
    let (status, created) = platform
        .post(
            "/api/v1/webhooks",
            platform.admin_key(),
            &json!({"url": receiver.url("/hook"), "events": ["device.data"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["data"]["secret"].as_str().unwrap().to_owned();

    let (status, _) = platform
        .post(
            "/api/v1/ingest",
            &token,
            &json!({"ts": 1000, "temperature": 20.5}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mqtt = mqtt_client(platform, "hooked-1", &token);
    mqtt.publish(
        format!("{}/default/hooked-1/telemetry", platform.topic_root()),
        QoS::AtLeastOnce,
        false,
        br#"{"ts": 2000, "temperature": 21.5}"#.to_vec(),
    )
    .await
    .unwrap();

    let requests = eventually("two deliveries", Duration::from_secs(20), || async {
        let requests = receiver.received("/hook");
        (requests.len() >= 2).then_some(requests)
    })
    .await;
    let mut values = Vec::new();
    for request in &requests {
        assert_eq!(
            request.header("X-Webhook-Signature").unwrap(),
            body_signature(&secret, &request.body)
        );
        let body = request.json();
        assert_eq!(body["event"], "device.data");
        assert_eq!(body["device_id"], "hooked-1");
        values.push(body["payload"]["readings"][0]["value"].as_f64().unwrap());
    }
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![20.5, 21.5]);
}

/// A retry is durable: the dispatcher is killed with SIGKILL after a failed attempt, and the
/// one started after it delivers.
pub async fn dispatcher_killed_mid_retry(platform: &mut Platform) {
    let receiver = Receiver::start().await;
    receiver.script("/hook", vec![Reply::Status(503)]);
    let token = create_device(platform, "durable-1").await;
    let (status, created) = platform
        .post(
            "/api/v1/webhooks",
            platform.admin_key(),
            &json!({"url": receiver.url("/hook"), "events": ["device.data"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &json!({"ts": 1000, "a": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually(
        "the first, failing attempt",
        Duration::from_secs(10),
        || async { (receiver.received("/hook").len() == 1).then_some(()) },
    )
    .await;
    platform.kill("webhook-dispatcher");
    tokio::time::sleep(Duration::from_secs(1)).await;
    platform.restart("webhook-dispatcher").await;
    // The kill may land before the failed attempt was recorded: the delivery is then still
    // leased to the dead process, and is retried once the lease (webhook timeout + 15 s, so
    // 25 s) has run out, rather than 3 s after the attempt.
    let requests = eventually(
        "the retry after the restart",
        Duration::from_secs(45),
        || async {
            let requests = receiver.received("/hook");
            (requests.len() >= 2).then_some(requests)
        },
    )
    .await;
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.received("/hook").len(),
        2,
        "delivered more than once"
    );
}

/// A device's MQTT session: its account is `{root}/{project}/{device}`, its password its token.
pub fn mqtt_client(platform: &Platform, device: &str, token: &str) -> AsyncClient {
    let (host, port) = platform.mqtt_host_port();
    // A device's user name and client id are both its topic prefix.
    let username = format!("{}/default/{device}", platform.topic_root());
    let mut options = MqttOptions::new(username.clone(), host, port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_credentials(username, token);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

/// Readings ingested over HTTP come back as a dashboard asks for them: 15-minute aggregates,
/// an hourly multi-device query (from rollups) and a CSV export.
pub async fn history_for_dashboards(platform: &Platform) {
    let token = create_device(platform, "dash-1").await;
    // An hour of readings, one a minute: temperature i / 2, and a door flag.
    let messages: Vec<Value> = (0..60)
        .map(|i| {
            json!({"ts": format!("2026-03-02T10:{i:02}:00Z"), "temperature": i as f64 / 2.0, "door_open": i % 2 == 0})
        })
        .collect();
    let (status, body) = platform
        .post("/api/v1/ingest", &token, &Value::Array(messages))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for_history(platform, "dash-1", 120).await;

    let (status, body) = platform
        .get(
            "/api/v1/devices/dash-1/readings/aggregate?metric=temperature,door_open&start=2026-03-02T10:00:00Z&end=2026-03-02T11:00:00Z&interval=15m&fn=count",
            platform.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for series in body["data"]["series"].as_array().unwrap() {
        let counts: Vec<i64> = series["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_i64().unwrap())
            .collect();
        assert_eq!(counts, [15, 15, 15, 15], "{series}");
    }
    let (status, body) = platform
        .get(
            "/api/v1/devices/dash-1/readings/aggregate?metric=temperature&start=2026-03-02T10:00:00Z&end=2026-03-02T11:00:00Z&interval=15m&fn=avg,min,max,first,last",
            platform.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected: Vec<Value> = (0..4)
        .map(|q| {
            let values: Vec<f64> = (q * 15..q * 15 + 15).map(|i| i as f64 / 2.0).collect();
            json!({
                "ts": format!("2026-03-02T10:{:02}:00Z", q * 15),
                "avg": values.iter().sum::<f64>() / 15.0,
                "min": values[0],
                "max": values[14],
                "first": values[0],
                "last": values[14],
            })
        })
        .collect();
    assert_eq!(body["data"]["series"][0]["buckets"], json!(expected));

    // Hourly, across devices: answered from the hourly rollup.
    let (status, body) = platform
        .post(
            "/api/v1/query",
            platform.admin_key(),
            &json!({"devices": ["dash-1"], "metrics": ["temperature"], "start": "2026-03-02T10:00:00Z", "end": "2026-03-02T11:00:00Z", "interval": "1h", "fn": "count,sum"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["sources"], json!(["rollup_1h"]));
    assert_eq!(
        body["data"]["series"][0]["buckets"],
        json!([{"ts": "2026-03-02T10:00:00Z", "count": 60, "sum": 885.0}])
    );

    // CSV export of the whole range.
    let response = platform
        .http
        .get(platform.url(
            "/api/v1/devices/dash-1/readings?metric=temperature&start=2026-03-02T10:00:00Z&end=2026-03-02T11:00:00Z",
        ))
        .bearer_auth(platform.admin_key())
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let csv = response.text().await.unwrap();
    let mut expected = String::from("ts,metric,value\n");
    for i in 0..60 {
        expected.push_str(&format!(
            "2026-03-02T10:{i:02}:00Z,temperature,{:?}\n",
            i as f64 / 2.0
        ));
    }
    assert_eq!(csv, expected);
}

/// The registry's events reach a third party: a reading over HTTP fires an alert and brings
/// the device online, a config change is announced, and silence takes the device offline;
/// each arrives once, signed.
pub async fn registry_events_reach_webhooks(platform: &Platform) {
    let receiver = Receiver::start().await;
    let admin = platform.admin_key().to_owned();
    let (status, created) = platform
        .post(
            "/api/v1/webhooks",
            &admin,
            &json!({"url": receiver.url("/events"),
                    "events": ["device.alert", "device.status", "config.update"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["data"]["secret"].as_str().unwrap().to_owned();
    let (status, body) = platform
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "kiln-1", "group": "kilns", "heartbeat_interval_s": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["data"]["token"].as_str().unwrap().to_owned();
    let (status, body) = platform
        .post(
            "/api/v1/alert-rules",
            &admin,
            &json!({"name": "kiln too hot", "group": "kilns", "metric": "temp", "op": "gt",
                    "threshold": 1200, "severity": "critical"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let (status, _) = platform
        .post("/api/v1/ingest", &token, &json!({"temp": 1250.0}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = platform
        .request(
            Method::PUT,
            "/api/v1/devices/kiln-1/config",
            &admin,
            Some(&json!({"target_temp": 1100})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // firing, online, config v1, then offline after three missed seconds.
    eventually("four registry events", Duration::from_secs(30), || async {
        let requests = receiver.received("/events");
        (requests.len() >= 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = receiver.received("/events");
    let mut seen: Vec<String> = Vec::new();
    for request in &requests {
        assert_eq!(
            request.header("X-Webhook-Signature").unwrap(),
            body_signature(&secret, &request.body)
        );
        let body = request.json();
        assert_eq!(body["device_id"], "kiln-1");
        let payload = &body["payload"];
        seen.push(match body["event"].as_str().unwrap() {
            "device.alert" => format!("alert {}", payload["state"].as_str().unwrap()),
            "device.status" => format!("status {}", payload["status"].as_str().unwrap()),
            "config.update" => format!("config v{}", payload["version"]),
            other => panic!("unexpected event {other}"),
        });
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            "alert firing",
            "config v1",
            "status offline",
            "status online"
        ],
        "{seen:?}"
    );
    receiver.stop().await;
}

/// What reaches a device: a config change as a retained MQTT message (to a subscriber that
/// connects after it), a command over the HTTP long-poll and its acknowledgement; and an
/// import of the past, as CSV, that query-api then serves.
pub async fn config_commands_and_backfill(platform: &Platform) {
    let admin = platform.admin_key().to_owned();
    let token = create_device(platform, "vent-1").await;
    let (status, body) = platform
        .request(
            Method::PUT,
            "/api/v1/devices/vent-1/config",
            &admin,
            Some(&json!({"interval_s": 15})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A device connecting after the change still gets it: the message is retained. Each try
    // is a fresh connection, so what arrives on subscribing is the retained copy.
    let topic = format!("{}/default/vent-1/config", platform.topic_root());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let retained = loop {
        assert!(tokio::time::Instant::now() < deadline, "no retained config");
        let (host, port) = platform.mqtt_host_port();
        let username = format!("{}/default/vent-1", platform.topic_root());
        let mut options = MqttOptions::new(username.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_credentials(username, &token);
        let (device, mut eventloop) = AsyncClient::new(options, 10);
        device.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
        let window = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut found = None;
        while let Ok(Ok(event)) = tokio::time::timeout_at(window, eventloop.poll()).await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
                found = Some(publish);
                break;
            }
        }
        let _ = device.disconnect().await;
        if let Some(publish) = found.filter(|publish| publish.retain) {
            break publish;
        }
    };
    assert!(retained.retain);
    let message: Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(message["version"], 1);
    assert_eq!(message["config"]["interval_s"], 15);

    // The HTTP device long-polls; the command posted meanwhile wakes it.
    let poll = {
        let url = platform.url("/api/v1/ingest/commands?wait=20");
        let token = token.clone();
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            fieldline_testkit::read(response).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = platform
        .post(
            "/api/v1/devices/vent-1/commands",
            &admin,
            &json!({"name": "open", "params": {"percent": 30}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let command_id = body["data"]["id"].as_str().unwrap().to_owned();
    let (status, polled) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{polled}");
    assert_eq!(polled["data"][0]["id"], command_id.as_str());
    assert_eq!(polled["data"][0]["params"]["percent"], 30);
    let (status, body) = platform
        .post(
            &format!("/api/v1/ingest/commands/{command_id}/ack"),
            &token,
            &json!({"status": "ok", "detail": "opened"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = platform
        .get(
            &format!("/api/v1/devices/vent-1/commands/{command_id}"),
            &admin,
        )
        .await;
    assert_eq!(body["data"]["status"], "acked");

    // An import of last year, as CSV, read back from history.
    let (status, body) = platform
        .post_readings_raw(
            "vent-1",
            &admin,
            "text/csv",
            "ts,metric,value\n2025-01-01T00:00:00Z,airflow,1.5\n2025-01-01T00:01:00Z,airflow,1.75\n",
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let readings = eventually("the imported readings", Duration::from_secs(20), || async {
        let (_, body) = platform
            .get(
                "/api/v1/devices/vent-1/readings?metric=airflow&start=2025-01-01T00:00:00Z&end=2025-01-02T00:00:00Z",
                &admin,
            )
            .await;
        let readings = body["data"].as_array().cloned().unwrap_or_default();
        (readings.len() == 2).then_some(readings)
    })
    .await;
    assert_eq!(readings[0]["value"], 1.5);
    assert_eq!(readings[1]["ts"], "2025-01-01T00:01:00Z");
}
