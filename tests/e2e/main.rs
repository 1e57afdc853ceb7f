//! End-to-end: the real `fieldline` binary on the real servers, once as one process and once
//! as one process per service. The same scenarios run against both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod cluster;
mod console;
mod dashboards;
mod k8s;
mod observability;
mod openapi;
mod platform;
mod provision;
mod scale_out;
mod scenarios;
mod secure;
mod streams;
mod traces;

use platform::Platform;

#[tokio::test]
async fn one_process_devices_to_history_over_http_and_mqtt() {
    let platform = Platform::one_process().await;
    scenarios::devices_to_history(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_devices_to_history_over_http_and_mqtt() {
    let platform = Platform::split().await;
    scenarios::devices_to_history(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_keys_scopes_idempotency_and_bad_input() {
    let platform = Platform::one_process().await;
    scenarios::idempotency(&platform).await;
    scenarios::scopes_and_revocation(&platform).await;
    scenarios::bad_input_stores_nothing(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_keys_scopes_idempotency_and_bad_input() {
    let platform = Platform::split().await;
    scenarios::idempotency(&platform).await;
    scenarios::scopes_and_revocation(&platform).await;
    scenarios::bad_input_stores_nothing(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_webhooks_receive_signed_events_from_http_and_mqtt() {
    let platform = Platform::one_process().await;
    scenarios::webhooks_receive_signed_events(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_webhooks_receive_signed_events_from_http_and_mqtt() {
    let platform = Platform::split().await;
    scenarios::webhooks_receive_signed_events(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_a_dispatcher_killed_mid_retry_still_delivers() {
    let mut platform = Platform::split_with(&[("FIELDLINE_WEBHOOK_RETRY_SCHEDULE", "3s")]).await;
    scenarios::dispatcher_killed_mid_retry(&mut platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_history_for_dashboards_aggregate_and_csv() {
    let platform = Platform::one_process().await;
    scenarios::history_for_dashboards(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_registry_events_reach_webhooks() {
    let platform = Platform::one_process().await;
    scenarios::registry_events_reach_webhooks(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_history_for_dashboards_aggregate_and_csv() {
    let platform = Platform::split().await;
    scenarios::history_for_dashboards(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_registry_events_reach_webhooks() {
    let platform = Platform::split().await;
    scenarios::registry_events_reach_webhooks(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_config_commands_and_backfill() {
    let platform = Platform::one_process().await;
    scenarios::config_commands_and_backfill(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_config_commands_and_backfill() {
    let platform = Platform::split().await;
    scenarios::config_commands_and_backfill(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn split_one_of_two_ingest_mqtt_processes_killed_for_good_leaves_0_acknowledged_readings_unstored()
 {
    let mut platform = Platform::split().await;
    scale_out::one_of_two_ingest_mqtt_killed_for_good(&mut platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn cluster_of_three_nats_the_telemetry_leader_killed_leaves_0_acknowledged_readings_unstored()
{
    let mut nats = fieldline_testkit::servers::NatsCluster::start().await;
    let url = nats.url();
    let platform = Platform::one_process_with(&[
        ("FIELDLINE_NATS_URL", url.as_str()),
        ("FIELDLINE_STREAM_REPLICAS", "3"),
    ])
    .await;
    cluster::telemetry_leader_killed_under_load(&platform, &mut nats).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_schemathesis_finds_no_failure_in_the_openapi_document() {
    let platform = Platform::one_process().await;
    openapi::schemathesis_finds_nothing(&platform).await;
    platform.stop().await;
}

#[tokio::test]
async fn one_process_a_generated_python_client_runs_the_quickstart() {
    let platform = Platform::one_process().await;
    openapi::generated_client_runs_the_quickstart(&platform).await;
    openapi::docs_are_served_offline(&platform).await;
    platform.stop().await;
}
