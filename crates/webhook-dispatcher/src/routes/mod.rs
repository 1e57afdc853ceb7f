pub mod deliveries;
pub mod edgesense;
pub mod webhooks;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    webhooks::configure(cfg);
    deliveries::configure(cfg);
    edgesense::configure(cfg);
}

use fieldline_common::openapi::{
    Access::{Admin, Read},
    JSON,
    Method::{Delete, Get, Patch, Post, Put},
    PAGING, RouteDoc,
};

/// The dispatcher's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(Post, "/api/v1/webhooks", "Register a webhook", Admin)
        .body(JSON)
        .success(201),
    RouteDoc::new(Get, "/api/v1/webhooks", "List webhooks", Read).query(&[
        (
            "device_id",
            "only webhooks that receive this device's events",
        ),
        ("group", "only webhooks of this group"),
        ("event", "only webhooks subscribed to this event type"),
        ("enabled", "true or false"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(
        Delete,
        "/api/v1/webhooks",
        "Delete several webhooks: {\"webhook_ids\": [...]}",
        Admin,
    )
    .body(JSON)
    .success(200),
    RouteDoc::new(Get, "/api/v1/webhooks/{id}", "Get a webhook", Read),
    RouteDoc::new(Put, "/api/v1/webhooks/{id}", "Replace a webhook", Admin).body(JSON),
    RouteDoc::new(
        Patch,
        "/api/v1/webhooks/{id}",
        "Change a webhook (JSON merge patch)",
        Admin,
    )
    .body(JSON),
    RouteDoc::new(Delete, "/api/v1/webhooks/{id}", "Delete a webhook", Admin),
    RouteDoc::new(
        Get,
        "/api/v1/webhooks/{id}/secret",
        "Show a webhook's signing secret",
        Admin,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/rotate-secret",
        "Rotate the signing secret; both sign during grace_seconds",
        Admin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/enable",
        "Enable a webhook again after auto-disable; the deliveries queued meanwhile go out",
        Admin,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/test",
        "Send a webhook.test event now and return the attempt",
        Admin,
    ),
    RouteDoc::new(
        Get,
        "/api/v1/webhooks/{id}/deliveries",
        "List deliveries with their attempts",
        Read,
    )
    .query(&[
        ("status", "pending, succeeded or failed"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/recover",
        "Requeue the failed deliveries of {since, until?}",
        Admin,
    )
    .body(JSON)
    .success(202),
    RouteDoc::new(
        Post,
        "/api/v1/deliveries/{id}/retry",
        "Deliver one delivery again now",
        Admin,
    )
    .success(202),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/webhooks",
        "Register webhooks for one device (an array)",
        Admin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/webhooks",
        "List a device's webhooks",
        Read,
    )
    .query(&PAGING),
    RouteDoc::new(
        Get,
        "/api/v1/groups/{group}/webhooks",
        "List a group's webhooks",
        Read,
    )
    .query(&PAGING),
    RouteDoc::new(
        Post,
        "/api/webhooks/register",
        "EdgeSense alias: register {url, events, secret}",
        Admin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(Get, "/api/webhooks", "EdgeSense alias: list webhooks", Read),
    RouteDoc::new(
        Delete,
        "/api/webhooks/{id}",
        "EdgeSense alias: delete a webhook",
        Admin,
    )
    .success(200),
];
