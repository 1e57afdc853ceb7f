//! The test harness of every crate: each test gets its own database, bus prefix and MQTT topic
//! root on the real servers, its services on a random port, and typed HTTP helpers.
//!
//! Servers default to this machine's (`127.0.0.1`); `FIELDLINE_TEST_PG_URL`,
//! `FIELDLINE_TEST_NATS_URL` and `FIELDLINE_TEST_MQTT_URL` point elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod otlp;
pub mod receiver;
pub mod secure;
pub mod servers;

use std::{future::Future, time::Duration};

use fieldline_common::{
    Config, Context, Service,
    config::LogFormat,
    service::{HttpListener, serve_http},
};
use fieldline_proto::Stream;
use rand::{Rng, distr::Alphanumeric};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A lowercase random suffix, unique per test.
pub fn unique_suffix() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(10)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

fn pg_admin_url() -> String {
    std::env::var("FIELDLINE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn nats_url() -> String {
    std::env::var("FIELDLINE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn mqtt_url() -> String {
    std::env::var("FIELDLINE_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

async fn pg_admin(server_url: &str) -> tokio_postgres::Client {
    let url = format!("{server_url}/postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL at {url} is required for tests ({error}); run `make test`")
        });
    tokio::spawn(connection);
    client
}

/// One test's isolated slice of the real servers.
#[derive(Clone, Debug)]
pub struct TestEnv {
    /// Also the bus prefix and the MQTT topic root.
    pub id: String,
    pub database: String,
    pub database_url: String,
    pub admin_key: String,
    /// The PostgreSQL server of `database_url`, without a database.
    pub pg_server_url: String,
    /// The test's own broker, when it uses MQTT ([`TestEnv::with_broker`]).
    pub broker: Option<std::sync::Arc<servers::PrivateMosquitto>>,
}

/// Device tokens of tests are derived, as in production (`device_token_key`).
const TEST_DEVICE_TOKEN_KEY: &str = "fieldline-test-device-token-key-0123456789";

impl TestEnv {
    /// Creates an empty database `fl_test_<id>`.
    pub async fn new() -> Self {
        Self::new_on(&pg_admin_url()).await
    }

    /// Creates an empty database `fl_test_<id>` on the server of `server_url`
    /// (`postgres://user@host:port`, a private one).
    pub async fn new_on(server_url: &str) -> Self {
        let id = format!("t{}", unique_suffix());
        let database = format!("fl_test_{id}");
        pg_admin(server_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        Self {
            database_url: format!("{server_url}/{database}"),
            pg_server_url: server_url.to_owned(),
            database,
            admin_key: format!("flk_test_admin_{}", unique_suffix()),
            id,
            broker: None,
        }
    }

    /// Gives the test a broker of its own, run as Fieldline runs one (Dynamic Security,
    /// anonymous clients refused); its services log in to it and the registry manages its
    /// accounts.
    pub async fn with_broker(mut self) -> Self {
        self.broker = Some(std::sync::Arc::new(
            servers::PrivateMosquitto::start().await,
        ));
        self
    }

    /// The test's broker; panics when the test did not ask for one.
    pub fn broker(&self) -> &servers::PrivateMosquitto {
        self.broker
            .as_deref()
            .expect("this test has no broker: build its env with TestEnv::with_broker")
    }

    /// ingest-mqtt's login: the test's broker, or the machine's (`FIELDLINE_TEST_MQTT_URL`).
    fn mqtt_login_url(&self) -> String {
        self.broker
            .as_ref()
            .map_or_else(mqtt_url, |broker| broker.url())
    }

    /// The configuration a service of this test runs with; `FIELDLINE_*` variables name the
    /// same fields for the binary.
    pub fn config(&self) -> Config {
        Config {
            http_addr: "127.0.0.1:0".into(),
            http_workers: 1,
            database_url: SecretString::from(self.database_url.clone()),
            database_pool_size: 4,
            nats_url: SecretString::from(nats_url()),
            mqtt_url: SecretString::from(self.mqtt_login_url()),
            mqtt_admin_url: self
                .broker
                .as_ref()
                .map(|broker| SecretString::from(broker.admin_url())),
            device_token_key: Some(SecretString::from(TEST_DEVICE_TOKEN_KEY)),
            mqtt_topic_root: self.id.clone(),
            bus_prefix: self.id.clone(),
            log_format: LogFormat::Text,
            log_level: std::env::var("FIELDLINE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            bootstrap_admin_key: Some(SecretString::from(self.admin_key.clone())),
            stream_max_bytes: 64 << 20,
            dead_letter_max_bytes: 8 << 20,
            // Tests not about rate limits must not meet them (bursts of requests and wrong
            // keys); the rate-limit tests set their own.
            rate_key_requests: 1_000_000,
            rate_device_requests: 1_000_000,
            rate_auth_failures: 1_000_000,
            // Likewise live time: tests not about it send fixed times from 1970 on; the
            // live-time tests put the defaults back (`live_time_defaults`).
            ingest_max_age: TESTS_INGEST_MAX_AGE,
            readings_earliest: fieldline_common::time::from_us(0),
            // Likewise compression: tests not about it find their readings in rows where
            // the writer put them; the compression tests run it themselves.
            compress_after: Duration::from_secs(100 * 365 * 24 * 3600),
            ..Config::default()
        }
    }

    /// The same settings as environment variables, for starting the `fieldline` binary.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("FIELDLINE_DATABASE_URL".into(), self.database_url.clone()),
            ("FIELDLINE_NATS_URL".into(), nats_url()),
            ("FIELDLINE_MQTT_URL".into(), self.mqtt_login_url()),
            (
                "FIELDLINE_MQTT_ADMIN_URL".into(),
                self.broker
                    .as_ref()
                    .map(|broker| broker.admin_url())
                    .unwrap_or_default(),
            ),
            (
                "FIELDLINE_DEVICE_TOKEN_KEY".into(),
                TEST_DEVICE_TOKEN_KEY.into(),
            ),
            ("FIELDLINE_BUS_PREFIX".into(), self.id.clone()),
            ("FIELDLINE_MQTT_TOPIC_ROOT".into(), self.id.clone()),
            (
                "FIELDLINE_BOOTSTRAP_ADMIN_KEY".into(),
                self.admin_key.clone(),
            ),
            (
                "FIELDLINE_STREAM_MAX_BYTES".into(),
                (64u64 << 20).to_string(),
            ),
            (
                "FIELDLINE_DEAD_LETTER_MAX_BYTES".into(),
                (8u64 << 20).to_string(),
            ),
            ("FIELDLINE_HTTP_WORKERS".into(), "1".into()),
            ("FIELDLINE_RATE_KEY_REQUESTS".into(), "1000000".into()),
            ("FIELDLINE_RATE_DEVICE_REQUESTS".into(), "1000000".into()),
            ("FIELDLINE_RATE_AUTH_FAILURES".into(), "1000000".into()),
            ("FIELDLINE_INGEST_MAX_AGE".into(), "36500days".into()),
            // As in `config`: tests not about compression find readings where the writer
            // put them.
            ("FIELDLINE_COMPRESS_AFTER".into(), "36500days".into()),
            (
                "FIELDLINE_READINGS_EARLIEST".into(),
                "1970-01-01T00:00:00Z".into(),
            ),
            // Test receivers listen on loopback.
            ("FIELDLINE_WEBHOOK_ALLOW_PRIVATE".into(), "true".into()),
            ("FIELDLINE_WEBHOOK_POLL_INTERVAL".into(), "100ms".into()),
            ("FIELDLINE_LOG_FORMAT".into(), "text".into()),
            (
                "FIELDLINE_LOG_LEVEL".into(),
                std::env::var("FIELDLINE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
    }

    /// A plain NATS client on the same server, for asserting what is on the bus.
    pub async fn nats(&self) -> async_nats::Client {
        async_nats::connect(nats_url()).await.unwrap()
    }

    /// A direct connection to the test's database, for asserting what is stored.
    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Drops the database and the test's streams (its broker goes with the last clone).
    pub async fn cleanup(&self) {
        let jetstream = async_nats::jetstream::new(self.nats().await);
        let subjects = fieldline_proto::Subjects::new(&self.id).unwrap();
        for stream in Stream::ALL {
            let _ = jetstream.delete_stream(subjects.stream_name(stream)).await;
        }
        let _ = jetstream
            .delete_key_value(subjects.mqtt_slots_bucket())
            .await;
        let _ = pg_admin(&self.pg_server_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await;
    }
}

/// Services of one test, started in this process on a random port.
pub struct TestApp {
    pub env: TestEnv,
    pub context: Context,
    pub base_url: String,
    pub http: reqwest::Client,
    listener: Option<HttpListener>,
}

impl TestApp {
    /// Starts the services that `start` builds, sharing one listener, as `fieldline serve`
    /// does.
    pub async fn spawn<F, Fut>(env: TestEnv, start: F) -> Self
    where
        F: FnOnce(Context) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<Service>>>,
    {
        Self::spawn_with(env, |config| config, start).await
    }

    /// Like [`TestApp::spawn`] with a config tweak.
    pub async fn spawn_with<F, Fut>(
        env: TestEnv,
        tweak: impl FnOnce(Config) -> Config,
        start: F,
    ) -> Self
    where
        F: FnOnce(Context) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<Service>>>,
    {
        let config = tweak(env.config());
        fieldline_common::telemetry::init_tracing(&config);
        let context = Context::connect(config, CancellationToken::new())
            .await
            .unwrap();
        let services = start(context.clone()).await.unwrap();
        let listener = serve_http(&context, &services).unwrap();
        Self {
            base_url: format!("http://{}", listener.addr),
            env,
            context,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            listener: Some(listener),
        }
    }

    pub fn admin_key(&self) -> &str {
        &self.env.admin_key
    }

    /// This process's `/metrics`, as Prometheus scrapes it.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends a request with an optional bearer credential and JSON body; returns the status
    /// and the parsed body (`Value::Null` when empty or not JSON).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        credential: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        read(response).await
    }

    pub async fn get(&self, path: &str, credential: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, Some(credential), None)
            .await
    }

    pub async fn post(&self, path: &str, credential: &str, body: &Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(credential), Some(body))
            .await
    }

    /// POSTs raw bytes with a content type (malformed JSON, other media types).
    pub async fn post_raw(
        &self,
        path: &str,
        credential: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        self.post_with_headers(path, credential, &[("content-type", content_type)], body)
            .await
    }

    /// POSTs raw bytes with the given headers (a content type and encoding, an
    /// `Idempotency-Key`).
    pub async fn post_with_headers(
        &self,
        path: &str,
        credential: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(credential);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        read(request.body(body).send().await.unwrap()).await
    }

    pub async fn delete(&self, path: &str, credential: &str) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, Some(credential), None)
            .await
    }

    /// Creates a device with the admin key; returns its token.
    pub async fn create_device(&self, id: &str) -> String {
        let (status, body) = self
            .post("/api/v1/devices", self.admin_key(), &json!({"id": id}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["data"]["token"].as_str().unwrap().to_owned()
    }

    /// Creates an API key with the given scopes; returns (id, secret).
    pub async fn create_key(&self, scopes: &[&str]) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/v1/keys",
                self.admin_key(),
                &json!({"name": "test", "scopes": scopes}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["data"]["id"].as_str().unwrap().to_owned(),
            body["data"]["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Every device's telemetry now in the test's telemetry stream, as single-device batches
    /// (a multi-device bus message gives one per device, each with the message's subject).
    pub async fn telemetry_batches(&self) -> Vec<(String, fieldline_proto::v1::TelemetryBatch)> {
        self.telemetry_messages()
            .await
            .into_iter()
            .flat_map(|(subject, batch)| {
                let devices = batch.split().expect("a telemetry message consumers take");
                devices.into_iter().map(move |one| (subject.clone(), one))
            })
            .collect()
    }

    /// Every telemetry bus message now in the test's telemetry stream, as published (either
    /// shape), with its subject.
    pub async fn telemetry_messages(&self) -> Vec<(String, fieldline_proto::v1::TelemetryBatch)> {
        let filter = self.context.subjects.telemetry_all();
        self.stream_messages(Stream::Telemetry, filter.trim_end_matches('>'))
            .await
    }

    /// Publishes a telemetry message to the subject of its shape (a device's, or the
    /// project's `mqtt` batch subject for a multi-device one) as the ingest edges do, and
    /// waits for JetStream's ack; returns its stream sequence.
    pub async fn publish_telemetry(&self, batch: &fieldline_proto::v1::TelemetryBatch) -> u64 {
        let subjects = &self.context.subjects;
        let subject = if batch.is_multi_device() {
            subjects.telemetry_batch(&batch.project, "mqtt")
        } else {
            subjects.telemetry(&batch.project, &batch.device_id)
        };
        self.context
            .jetstream
            .publish(subject, prost::Message::encode_to_vec(batch).into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Every heartbeat now in the test's telemetry stream, with its subject.
    pub async fn heartbeats(&self) -> Vec<(String, fieldline_proto::v1::Heartbeat)> {
        let filter = self.context.subjects.heartbeat_all();
        self.stream_messages(Stream::Telemetry, filter.trim_end_matches('>'))
            .await
    }

    /// Every message now in one of the test's streams whose subject starts with
    /// `subject_prefix`, decoded as `T`, with its subject.
    pub async fn stream_messages<T: prost::Message + Default>(
        &self,
        stream: Stream,
        subject_prefix: &str,
    ) -> Vec<(String, T)> {
        let name = self.context.subjects.stream_name(stream);
        let mut handle = self.context.jetstream.get_stream(name).await.unwrap();
        let state = handle.info().await.unwrap().state.clone();
        let mut messages = Vec::new();
        if state.messages == 0 {
            return messages;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            if let Ok(message) = handle.get_raw_message(sequence).await {
                if !message.subject.starts_with(subject_prefix) {
                    continue;
                }
                let decoded = T::decode(message.payload.as_ref()).unwrap();
                messages.push((message.subject.to_string(), decoded));
            }
        }
        messages
    }

    /// Stops the services and drops the test's database and streams.
    pub async fn shutdown(self) {
        let env = self.stop().await;
        env.cleanup().await;
    }

    /// Stops the services, keeping the database and streams (to start them again).
    pub async fn stop(mut self) -> TestEnv {
        self.context.shutdown.cancel();
        if let Some(listener) = self.listener.take() {
            listener.stop().await;
        }
        self.context.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.context.tasks.wait()).await;
        self.env.clone()
    }
}

/// A multi-device telemetry batch of `project`, as ingest-mqtt publishes it under load: one
/// entry per device with its readings, each received at `received_at_us`.
pub fn multi_device_batch(
    project: &str,
    devices: Vec<(&str, Vec<fieldline_proto::v1::Reading>)>,
    received_at_us: i64,
) -> fieldline_proto::v1::TelemetryBatch {
    fieldline_proto::v1::TelemetryBatch {
        project: project.to_owned(),
        source: "mqtt".to_owned(),
        devices: devices
            .into_iter()
            .map(
                |(device_id, readings)| fieldline_proto::v1::DeviceReadings {
                    device_id: device_id.to_owned(),
                    readings,
                    received_at_us,
                    message_id: String::new(),
                },
            )
            .collect(),
        ..Default::default()
    }
}

/// Status and JSON body of a response.
pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// What [`TestEnv::config`] lets live ingest reach back (a hundred years, so 1970 too).
const TESTS_INGEST_MAX_AGE: Duration = Duration::from_secs(36_500 * 24 * 3600);

/// `config` with the live-time settings of production (`TestEnv::config` widens them).
pub fn live_time_defaults(config: Config) -> Config {
    let defaults = Config::default();
    Config {
        ingest_max_age: defaults.ingest_max_age,
        ingest_max_future: defaults.ingest_max_future,
        readings_earliest: defaults.readings_earliest,
        ..config
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the error envelope: status, `error.code` and `error.reason`.
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, reason: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(body["error"]["code"], expected.as_u16(), "{body}");
    assert_eq!(body["error"]["reason"], reason, "{body}");
}
