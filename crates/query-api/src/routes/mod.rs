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
    JSON,
    Method::{Get, Post, Put},
    RouteDoc,
};

/// query-api's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings",
        "A device's readings in a time range, paged",
        Read,
    )
    .query(&[
        ("metric", "comma list of metric names"),
        (
            "start",
            "RFC 3339, epoch ms, `now` or relative (`-24h`); inclusive",
        ),
        ("end", "same forms; exclusive"),
        ("order", "asc or desc"),
        ("limit", "1 to 10000 (default 100)"),
        ("cursor", "`page.next_cursor` of the previous page"),
        (
            "format",
            "`csv` or `ndjson`: stream every row in range instead of a page (also `Accept: text/csv`); no limit or cursor",
        ),
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/latest",
        "The newest value of each metric",
        Read,
    )
    .query(&[("metric", "comma list of metric names")]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/aggregate",
        "Aggregates of a device's metrics in UTC-aligned buckets",
        Read,
    )
    .query(&[
        ("metric", "comma list of metric names (required)"),
        ("start", "RFC 3339, epoch ms, `now` or relative; default `end` - 24h"),
        ("end", "same forms; exclusive; default now"),
        (
            "interval",
            "bucket width: `30s`, `5m`, `1h`, `1d`, `1w` (at most 10000 buckets)",
        ),
        (
            "fn",
            "comma list of avg, min, max, sum, count, first, last (default avg)",
        ),
        ("fill", "none (default), null or previous"),
        ("source", "auto (rollups for hourly and longer) or raw"),
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/stream",
        "A device's new readings as Server-Sent Events (`event: readings`, `id:` to resume with `Last-Event-ID`)",
        Read,
    )
    .query(&[(
        "last_event_id",
        "the `Last-Event-ID` header, for clients that cannot send it",
    )]),
    RouteDoc::new(
        Get,
        "/api/v1/events/stream",
        "The project's device.status, device.alert and config.update events as Server-Sent Events (resume with `Last-Event-ID`)",
        Read,
    )
    .query(&[
        (
            "types",
            "comma list of device.status, device.alert, config.update (default all)",
        ),
        (
            "last_event_id",
            "the `Last-Event-ID` header, for clients that cannot send it",
        ),
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/stats/readings",
        "The project's readings per minute over the last five minutes, and how many devices sent them",
        Read,
    ),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/metrics",
        "A device's metrics with first and last time and count",
        Read,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/query",
        "Readings or aggregates of up to 100 devices at once",
        Read,
    )
    .body(JSON),
    RouteDoc::new(
        Get,
        "/api/v1/retention",
        "How long the project keeps raw readings and rollups (its own, the defaults, the effective)",
        Admin,
    ),
    RouteDoc::new(
        Put,
        "/api/v1/retention",
        "Set the project's retention: {readings, rollups}, each a period (`90d`, `36h`, `4w`, `2y`) or null for the default",
        Admin,
    )
    .body(JSON),
];
