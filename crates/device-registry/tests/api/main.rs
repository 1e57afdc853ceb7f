//! device-registry against the real PostgreSQL and NATS: one database and bus prefix per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod auth;
mod commands;
mod config;
mod devices;
mod isolation;
mod keys;
mod limits;
mod presence;
mod projects;

use std::time::Duration;

use async_nats::HeaderMap;
use fieldline_common::Config;
use fieldline_proto::{
    Stream,
    v1::{DeviceEvent, Heartbeat, Reading, TelemetryBatch, reading},
};
use fieldline_testkit::{TestApp, TestEnv};
use prost::Message;
use reqwest::Method;
use serde_json::Value;

pub async fn spawn_registry() -> TestApp {
    spawn_registry_in(TestEnv::new().await, |config| config).await
}

/// A registry on `env` (a second one on the same env shares its database and bus).
pub async fn spawn_registry_in(env: TestEnv, tweak: impl FnOnce(Config) -> Config) -> TestApp {
    TestApp::spawn_with(
        env,
        |config| {
            tweak(Config {
                registry_sweep_interval: Duration::from_millis(200),
                ..config
            })
        },
        |context| async move { Ok(vec![device_registry::start(&context).await?]) },
    )
    .await
}

/// Publishes one reading as the ingest edges do (source `http`, received now).
pub async fn publish_reading(
    app: &TestApp,
    project: &str,
    device_id: &str,
    metric: &str,
    ts_us: i64,
    value: f64,
) {
    let batch = TelemetryBatch {
        project: project.into(),
        device_id: device_id.into(),
        readings: vec![Reading {
            metric: metric.into(),
            ts_us,
            value: Some(reading::Value::Number(value)),
        }],
        received_at_us: fieldline_common::time::now_us(),
        source: "http".into(),
        message_id: String::new(),
        devices: Vec::new(),
        series: Vec::new(),
    };
    publish(
        app,
        app.context.subjects.telemetry(project, device_id),
        batch.encode_to_vec(),
    )
    .await;
}

pub async fn publish_heartbeat(app: &TestApp, project: &str, device_id: &str) {
    publish_heartbeat_at(app, project, device_id, fieldline_common::time::now_us()).await;
}

/// A heartbeat the edge received at `received_at_us`.
pub async fn publish_heartbeat_at(
    app: &TestApp,
    project: &str,
    device_id: &str,
    received_at_us: i64,
) {
    let heartbeat = Heartbeat {
        project: project.into(),
        device_id: device_id.into(),
        received_at_us,
        source: "mqtt".into(),
    };
    publish(
        app,
        app.context.subjects.heartbeat(project, device_id),
        heartbeat.encode_to_vec(),
    )
    .await;
}

async fn publish(app: &TestApp, subject: String, payload: Vec<u8>) {
    app.context
        .jetstream
        .publish_with_headers(subject, HeaderMap::new(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The payloads of the events of `event_type` now on the events stream, oldest first.
pub async fn events(app: &TestApp, event_type: &str) -> Vec<(DeviceEvent, Value)> {
    let prefix = format!("{}.events.", app.context.subjects.prefix());
    app.stream_messages::<DeviceEvent>(Stream::Events, &prefix)
        .await
        .into_iter()
        .filter(|(_, event)| event.event_type == event_type)
        .map(|(_, event)| {
            let payload = serde_json::from_str(&event.payload_json).unwrap();
            (event, payload)
        })
        .collect()
}

pub async fn put(
    app: &TestApp,
    path: &str,
    credential: &str,
    body: &Value,
) -> (reqwest::StatusCode, Value) {
    app.request(Method::PUT, path, Some(credential), Some(body))
        .await
}

pub async fn patch(
    app: &TestApp,
    path: &str,
    credential: &str,
    body: &Value,
) -> (reqwest::StatusCode, Value) {
    app.request(Method::PATCH, path, Some(credential), Some(body))
        .await
}
