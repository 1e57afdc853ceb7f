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

use fieldline_common::{
    commands::{CommandAckIn, CommandAcked, DeviceCommandOut, DeviceConfigOut},
    openapi::{
        Access::{Device, Write},
        CSV, Kind,
        Method::{Get, Post},
        Param, RouteDoc, array, schema,
    },
};
use serde::Serialize;
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ArrayBuilder, ObjectBuilder, OneOfBuilder, RefOr, Schema, Type,
        schema::{AdditionalProperties, SchemaFormat},
    },
};

/// What a device message may hold: a number, a boolean or a text of at most 4096 bytes.
fn reading_value() -> Schema {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(4096)),
        )
        .into()
}

/// A metric name: 1 to 128 of `A-Z a-z 0-9 _ - .`.
fn metric_name() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_.-]{1,128}$"))
}

/// One device message (documentation of what `common::ingest` parses by hand, without a
/// JSON tree): `{"ts"?, "msg_id"?, "temp": 21.5, ...}` or `{"ts"?, "values": {...}}`.
pub struct Message;

impl PartialSchema for Message {
    fn schema() -> RefOr<Schema> {
        let ts = OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String).format(Some(
                SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::DateTime),
            )))
            .item(ObjectBuilder::new().schema_type(Type::Integer))
            .description(Some(
                "RFC 3339 or epoch milliseconds; arrival time when left out. Live ingest \
                 takes times near now only (FIELDLINE_INGEST_MAX_PAST / _FUTURE).",
            ));
        ObjectBuilder::new()
            .description(Some(
                "Each other member is a metric and its value; or put them under `values`.",
            ))
            .property("ts", ts)
            .property(
                "msg_id",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(128))
                    .description(Some("idempotency key; the Idempotency-Key header wins")),
            )
            .property(
                "values",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property_names(Some(metric_name()))
                    .additional_properties(Some(AdditionalProperties::RefOr(
                        reading_value().into(),
                    ))),
            )
            .property_names(Some(metric_name()))
            .additional_properties(Some(AdditionalProperties::RefOr(reading_value().into())))
            .examples([serde_json::json!({"temp": 21.5, "humidity": 40})])
            .into()
    }
}

impl ToSchema for Message {
    fn name() -> std::borrow::Cow<'static, str> {
        "Message".into()
    }
}

/// A body of `POST /api/v1/ingest`: one message or an array of them.
fn messages(schemas: &mut fieldline_common::openapi::Schemas) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(schema::<Message>(schemas))
        .item(ArrayBuilder::new().items(schema::<Message>(schemas)))
        .into()
}

/// What a live ingest took.
#[derive(Serialize, ToSchema)]
pub struct Ingested {
    /// Readings published.
    pub accepted: usize,
    /// The Idempotency-Key (or msg_id) was seen before: nothing was published again.
    pub duplicate: bool,
}

/// What a backfill took.
#[derive(Serialize, ToSchema)]
pub struct Backfilled {
    pub accepted: usize,
}

/// ingest-http's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Post,
        "/api/v1/ingest",
        "Send readings: one message or an array (or SenML, RFC 8428, as application/senml+json); 202 once in JetStream",
        Device,
    )
    .body(messages)
    .data(202, schema::<Ingested>),
    RouteDoc::new(
        Post,
        "/api/v1/ingest/heartbeat",
        "The device is alive",
        Device,
    )
    .empty(204),
    RouteDoc::new(
        Get,
        "/api/v1/ingest/config",
        "The device's current configuration",
        Device,
    )
    .data(200, schema::<DeviceConfigOut>)
    .errors(&[404]),
    RouteDoc::new(
        Get,
        "/api/v1/ingest/commands",
        "Live commands not yet handed over HTTP (each once); long-polls with wait",
        Device,
    )
    .query(&[Param::new(
        "wait",
        "seconds to wait for a command (default 0)",
        Kind::Integer { min: 0, max: 60 },
    )])
    .data(200, array::<DeviceCommandOut>),
    RouteDoc::new(
        Post,
        "/api/v1/ingest/commands/{id}/ack",
        "Acknowledge a command",
        Device,
    )
    .body(schema::<CommandAckIn>)
    .data(200, schema::<CommandAcked>)
    .errors(&[409]),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/readings",
        "Backfill past readings (JSON messages each with its ts, or CSV long/wide); 202 once in JetStream",
        Write,
    )
    .body(messages)
    .other_bodies(&[CSV])
    .data(202, schema::<Backfilled>),
];
