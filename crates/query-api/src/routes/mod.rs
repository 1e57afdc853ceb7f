pub mod query;
pub mod readings;
pub mod retention;
pub mod stream;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    readings::configure(cfg);
    query::configure(cfg);
    retention::configure(cfg);
    stream::configure(cfg);
}

use fieldline_common::openapi::{
    Access::{Admin, Read},
    CSV, Content, Kind,
    Method::{Get, Post, Put},
    NDJSON, Param, RouteDoc, Schemas, array, schema, text,
};
use utoipa::openapi::{OneOfBuilder, RefOr, Schema};

use crate::{
    aggregate::AggregateOut,
    domain::{MultiQueryIn, ReadingOut},
    repo::MetricOut,
    retention::{RetentionIn, RetentionOut},
};

/// Where a live stream resumes, for clients that cannot send the `Last-Event-ID` header.
const LAST_EVENT_ID: Param = Param::new(
    "last_event_id",
    "the `Last-Event-ID` header, for clients that cannot send it",
    Kind::Text,
);

/// Server-Sent Events: `id:`, `event:` and `data:` lines, a blank line after each event.
const EVENT_STREAM: Content = Content {
    media: "text/event-stream",
    schema: text,
};

const METRICS: Param = Param::new("metric", "comma list of metric names", Kind::Text);
const START: Param = Param::new(
    "start",
    "RFC 3339, epoch ms, `now` or relative (`-24h`); inclusive",
    Kind::Text,
);
const END: Param = Param::new("end", "same forms; exclusive", Kind::Text);

/// `POST /api/v1/query`: raw readings, or buckets with `interval`.
fn query_answer(schemas: &mut Schemas) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(schema::<query::QueryReadings>(schemas))
        .item(schema::<AggregateOut>(schemas))
        .into()
}

/// query-api's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings",
        "A device's readings in a time range, paged; or every row as CSV or NDJSON",
        Read,
    )
    .query(&[
        METRICS,
        START,
        END,
        Param::new("order", "by time", Kind::OneOf(&["asc", "desc"])),
        Param::new(
            "limit",
            "page size (default 100)",
            Kind::Integer { min: 1, max: 10000 },
        ),
        Param::new(
            "cursor",
            "`page.next_cursor` of the previous page",
            Kind::Text,
        ),
        Param::new(
            "format",
            "stream every row in range instead of a page (also `Accept: text/csv`); no limit or cursor",
            Kind::OneOf(&["csv", "ndjson"]),
        ),
    ])
    .page(schema::<ReadingOut>)
    .alternatives(&[CSV, NDJSON]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/latest",
        "The newest value of each metric",
        Read,
    )
    .query(&[METRICS])
    .data(200, array::<ReadingOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/aggregate",
        "Aggregates of a device's metrics in UTC-aligned buckets",
        Read,
    )
    .query(&[
        Param::new("metric", "comma list of metric names (required)", Kind::Text),
        Param::new(
            "start",
            "RFC 3339, epoch ms, `now` or relative; default `end` - 24h",
            Kind::Text,
        ),
        Param::new("end", "same forms; exclusive; default now", Kind::Text),
        Param::new(
            "interval",
            "bucket width: `30s`, `5m`, `1h`, `1d`, `1w` (at most 10000 buckets)",
            Kind::Text,
        ),
        Param::new(
            "fn",
            "comma list of avg, min, max, sum, count, first, last (default avg)",
            Kind::Text,
        ),
        Param::new(
            "fill",
            "empty buckets: left out (none), null, or the previous value",
            Kind::OneOf(&["none", "null", "previous"]),
        ),
        Param::new(
            "source",
            "auto (rollups for hourly and longer) or raw",
            Kind::OneOf(&["auto", "raw"]),
        ),
    ])
    .data(200, schema::<AggregateOut>)
    .errors(&[422]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/stream",
        "A device's new readings as Server-Sent Events (`event: readings`, `id:` to resume with `Last-Event-ID`)",
        Read,
    )
    .query(&[LAST_EVENT_ID])
    .raw(200, &[EVENT_STREAM])
    .errors(&[429]),
    RouteDoc::new(
        Get,
        "/api/v1/events/stream",
        "The project's device.status, device.alert and config.update events as Server-Sent Events (resume with `Last-Event-ID`)",
        Read,
    )
    .query(&[
        Param::new(
            "types",
            "comma list of device.status, device.alert, config.update (default all)",
            Kind::Text,
        ),
        LAST_EVENT_ID,
    ])
    .raw(200, &[EVENT_STREAM])
    .errors(&[429]),
    RouteDoc::new(
        Get,
        "/api/v1/stats/readings",
        "The project's readings per minute over the last five minutes, and how many devices sent them",
        Read,
    )
    .data(200, schema::<crate::routes::readings::ActivityOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/metrics",
        "A device's metrics with first and last time and count",
        Read,
    )
    .data(200, array::<MetricOut>),
    RouteDoc::new(
        Post,
        "/api/v1/query",
        "Readings or aggregates of up to 100 devices at once",
        Read,
    )
    .body(schema::<MultiQueryIn>)
    .data(200, query_answer)
    .errors(&[404, 422]),
    RouteDoc::new(
        Get,
        "/api/v1/retention",
        "How long the project keeps raw readings and rollups (its own, the defaults, the effective)",
        Admin,
    )
    .data(200, schema::<RetentionOut>),
    RouteDoc::new(
        Put,
        "/api/v1/retention",
        "Set the project's retention; null (or absent) for the default",
        Admin,
    )
    .body(schema::<RetentionIn>)
    .data(200, schema::<RetentionOut>),
];
