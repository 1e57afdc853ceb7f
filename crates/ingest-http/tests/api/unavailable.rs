use fieldline_testkit::{TestEnv, assert_error, servers::PrivateNats};
use reqwest::StatusCode;
use serde_json::json;

/// With its own NATS server, so stopping it disturbs no other test.
#[tokio::test]
async fn nats_down_answers_503_and_recovers() {
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let app = crate::spawn_ingest_with(TestEnv::new().await, |config| fieldline_common::Config {
        nats_url: url.into(),
        // Long, so that "at once" below cannot be this timeout on a slow runner.
        rpc_timeout: std::time::Duration::from_secs(30),
        ..config
    })
    .await;
    let token = app.create_device("dev-1").await;
    let uncached = app.create_device("dev-2").await;
    let (status, _) = app.post("/api/v1/ingest", &token, &json!({"a": 1})).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    nats.kill();
    let (status, body) = app.post("/api/v1/ingest", &token, &json!({"a": 2})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
    );

    // A token no process has cached answers 503 at once too: no wait for the auth RPC's
    // timeout while the bus is down.
    app.context.auth.invalidate_all();
    fieldline_testkit::eventually(
        "the client to see the bus down",
        std::time::Duration::from_secs(10),
        || async {
            (app.context.nats.connection_state() != async_nats::connection::State::Connected)
                .then_some(())
        },
    )
    .await;
    let started = std::time::Instant::now();
    let (status, body) = app
        .post("/api/v1/ingest", &uncached, &json!({"a": 2}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "503 after {:?}, not at once",
        started.elapsed()
    );

    nats.restart().await;
    fieldline_testkit::eventually(
        "ingest to recover",
        std::time::Duration::from_secs(20),
        || async {
            let (status, _) = app.post("/api/v1/ingest", &token, &json!({"a": 3})).await;
            (status == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;
    app.shutdown().await;
}

/// A body within the HTTP limit whose batch is larger than NATS takes is a 413, not a 503 to
/// retry forever.
#[tokio::test]
async fn a_batch_larger_than_the_bus_takes_is_413() {
    let app = crate::spawn_ingest_with(TestEnv::new().await, |config| fieldline_common::Config {
        ingest_max_body_bytes: 8 << 20,
        ..config
    })
    .await;
    let token = app.create_device("dev-1").await;
    let text = "x".repeat(4000);
    let messages: Vec<_> = (0..600)
        .map(|i| json!({"ts": i + 1, "note": text}))
        .collect();
    let (status, body) = app.post("/api/v1/ingest", &token, &json!(messages)).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}
