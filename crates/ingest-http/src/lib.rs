//! ingest-http: devices POST readings with their device token (the fallback when MQTT is
//! blocked or down), fetch their config and commands (long-poll) and acknowledge commands.
//! Write API keys backfill readings for any device of their project. A 202 means the batch
//! is in JetStream.

mod domain;
mod routes;

use std::sync::Arc;

use actix_web::web;
use fieldline_common::{Context, Service, ingest::Publisher};
use tokio::sync::Semaphore;

pub use crate::routes::ROUTES;

/// Shared by the handlers (of every HTTP worker: one per process).
pub(crate) struct State {
    pub context: Context,
    pub publisher: Publisher,
    /// Places for long-polls waiting at once (`long_poll_max`): each holds a bus
    /// subscription, a connection and a task for up to a minute.
    pub long_polls: Semaphore,
    /// Places for backfills parsed and published at once (`backfill_concurrency`).
    pub backfills: Semaphore,
    /// `fieldline_ingest_readings_total{source="http"}`, found in the recorder once: looked up
    /// by name and labels on each request it cost about a thousand instructions (callgrind).
    pub readings_counted: metrics::Counter,
}

pub async fn start(context: &Context) -> anyhow::Result<Service> {
    // The recorder first (the process has installed it already), so the handle counts.
    fieldline_common::telemetry::metrics_handle();
    let state = web::Data::new(State {
        context: context.clone(),
        publisher: Publisher::new(context),
        long_polls: Semaphore::new(context.config.long_poll_max),
        backfills: Semaphore::new(context.config.backfill_concurrency),
        readings_counted: metrics::counter!("fieldline_ingest_readings_total", "source" => "http"),
    });
    let routes = Arc::new(move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state.clone());
        routes::configure(cfg);
    });
    Ok(Service {
        name: "ingest-http",
        routes: Some(routes),
        ready: None,
    })
}
