//! query-api against the real PostgreSQL and NATS: batches are published to JetStream the way
//! the ingest services publish them, and read back over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod aggregate;
mod batches;
mod compressed;
mod dead_letters;
mod distribution;
mod export;
mod livetime;
mod query;
mod readings;
mod replicas;
mod retention;
mod stream;
mod writer;

use fieldline_common::Config;
use fieldline_proto::v1::{Reading, TelemetryBatch, reading};
use fieldline_testkit::{TestApp, TestEnv};
use prost::Message;

pub async fn spawn_query() -> TestApp {
    spawn_query_with(|config| config).await
}

pub async fn spawn_query_with(tweak: impl FnOnce(Config) -> Config) -> TestApp {
    TestApp::spawn_with(TestEnv::new().await, tweak, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            query_api::start(&context).await?,
        ])
    })
    .await
}

/// Creates project `slug`; returns its admin key.
/// PostgreSQL's plan of `sql` (`EXPLAIN`), as text.
pub async fn explain(client: &impl tokio_postgres::GenericClient, sql: &str) -> String {
    client
        .query(&format!("EXPLAIN {sql}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn create_project(app: &TestApp, slug: &str) -> String {
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &serde_json::json!({"slug": slug}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub fn boolean(metric: &str, ts_us: i64, value: bool) -> Reading {
    Reading {
        metric: metric.into(),
        ts_us,
        value: Some(reading::Value::Boolean(value)),
    }
}

pub fn text(metric: &str, ts_us: i64, value: &str) -> Reading {
    Reading {
        metric: metric.into(),
        ts_us,
        value: Some(reading::Value::Text(value.into())),
    }
}

/// Rows stored in the whole test database.
pub async fn stored_total(app: &TestApp) -> i64 {
    app.env
        .pg()
        .await
        .query_one("SELECT count(*) FROM telemetry.readings", &[])
        .await
        .unwrap()
        .get(0)
}

pub fn number(metric: &str, ts_us: i64, value: f64) -> Reading {
    Reading {
        metric: metric.into(),
        ts_us,
        value: Some(reading::Value::Number(value)),
    }
}

/// Publishes a batch to the test's telemetry subject and waits for JetStream's ack.
pub async fn publish(app: &TestApp, project: &str, device_id: &str, readings: Vec<Reading>) {
    let batch = TelemetryBatch {
        project: project.into(),
        device_id: device_id.into(),
        readings,
        received_at_us: 0,
        source: "test".into(),
        message_id: String::new(),
        devices: Vec::new(),
        series: Vec::new(),
    };
    let subject = app.context.subjects.telemetry(project, device_id);
    app.context
        .jetstream
        .publish(subject, batch.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Rows stored for a device.
pub async fn stored(app: &TestApp, device_id: &str) -> i64 {
    app.env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM telemetry.readings r JOIN telemetry.series s USING (series_id)
             WHERE s.device_id = $1",
            &[&device_id],
        )
        .await
        .unwrap()
        .get(0)
}
