//! ingest-http against the real NATS (JetStream) and PostgreSQL, with the real registry
//! answering the auth RPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backfill;
mod device;
mod encoding;
mod ingest;
mod limits;
mod livetime;
mod unavailable;

use fieldline_testkit::{TestApp, TestEnv};

pub async fn spawn_ingest(env: TestEnv) -> TestApp {
    spawn_ingest_with(env, |config| config).await
}

/// The registry (answering the auth RPC) and ingest-http, on the config `tweak` makes.
pub async fn spawn_ingest_with(
    env: TestEnv,
    tweak: impl FnOnce(fieldline_common::Config) -> fieldline_common::Config,
) -> TestApp {
    TestApp::spawn_with(env, tweak, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_http::start(&context).await?,
        ])
    })
    .await
}

/// The registry, ingest-http and query-api in one process, registered in the order of
/// `fieldline serve --services all` (ingest-http before query-api: they share
/// `/api/v1/devices/{id}/readings`, POST and GET).
pub async fn spawn_all(
    env: TestEnv,
    tweak: impl FnOnce(fieldline_common::Config) -> fieldline_common::Config,
) -> TestApp {
    TestApp::spawn_with(env, tweak, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_http::start(&context).await?,
            query_api::start(&context).await?,
        ])
    })
    .await
}

/// A counter or gauge of `/metrics` (`name` then `{labels}` or a space), 0 when absent.
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
