pub mod readings;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    readings::configure(cfg);
}

use fieldline_common::openapi::{Access::Read, Method::Get, RouteDoc};

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
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/readings/latest",
        "The newest value of each metric",
        Read,
    )
    .query(&[("metric", "comma list of metric names")]),
];
