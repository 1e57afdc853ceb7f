//! device-registry against the real PostgreSQL and NATS: one database and bus prefix per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod devices;
mod keys;
mod projects;

use fieldline_testkit::{TestApp, TestEnv};

pub async fn spawn_registry() -> TestApp {
    TestApp::spawn(TestEnv::new().await, |context| async move {
        Ok(vec![device_registry::start(&context).await?])
    })
    .await
}
