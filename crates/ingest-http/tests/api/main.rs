//! ingest-http against the real NATS (JetStream) and PostgreSQL, with the real registry
//! answering the auth RPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ingest;
mod unavailable;

use fieldline_testkit::{TestApp, TestEnv};

pub async fn spawn_ingest(env: TestEnv) -> TestApp {
    TestApp::spawn(env, |context| async move {
        Ok(vec![
            device_registry::start(&context).await?,
            ingest_http::start(&context).await?,
        ])
    })
    .await
}
