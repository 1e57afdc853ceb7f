//! The routes of ingest-http.

mod backfill;
mod device;
mod ingest;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    ingest::configure(cfg);
    device::configure(cfg);
    backfill::configure(cfg);
}

use fieldline_common::openapi::{
    Access::{Device, Write},
    JSON,
    Method::{Get, Post},
    RouteDoc,
};

/// ingest-http's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Post,
        "/api/v1/ingest",
        "Send readings: one message or an array; 202 once in JetStream",
        Device,
    )
    .body(&["application/json", "application/senml+json"])
    .success(202),
    RouteDoc::new(
        Post,
        "/api/v1/ingest/heartbeat",
        "The device is alive",
        Device,
    )
    .success(204),
    RouteDoc::new(
        Get,
        "/api/v1/ingest/config",
        "The device's current config: {version, config, updated_at}",
        Device,
    ),
    RouteDoc::new(
        Get,
        "/api/v1/ingest/commands",
        "Live commands not yet handed over HTTP (each once); long-polls with wait",
        Device,
    )
    .query(&[("wait", "seconds to wait for a command, 0 to 60 (default 0)")]),
    RouteDoc::new(
        Post,
        "/api/v1/ingest/commands/{id}/ack",
        "Acknowledge a command: {status: ok|error, detail?}",
        Device,
    )
    .body(JSON),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/readings",
        "Backfill past readings (JSON with ts, or CSV long/wide); 202 once in JetStream",
        Write,
    )
    .body(&["application/json", "text/csv"])
    .success(202),
];
