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
    Content, Kind,
    Method::{Delete, Get, Patch, Post, Put},
    PAGING, Param, RouteDoc, array, object, schema,
};

use crate::domain::{DeliveryOut, WebhookCreated, WebhookIn, WebhookOut};

const EDGESENSE_STATUS: Content = Content::json(schema::<edgesense::EdgeSenseStatus>);

/// The dispatcher's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(Post, "/api/v1/webhooks", "Register a webhook", Admin)
        .body(schema::<WebhookIn>)
        .data(201, schema::<WebhookCreated>)
        .errors(&[422]),
    RouteDoc::new(Get, "/api/v1/webhooks", "List webhooks", Read)
        .query(&[
            Param::new(
                "device_id",
                "only webhooks that receive this device's events",
                Kind::Id,
            ),
            Param::new("group", "only webhooks of this group", Kind::Label),
            Param::new(
                "event",
                "only webhooks subscribed to this event type",
                Kind::OneOf(&crate::domain::EVENT_TYPES),
            ),
            Param::new("enabled", "enabled or disabled ones", Kind::Boolean),
            PAGING[0],
            PAGING[1],
        ])
        .page(schema::<WebhookOut>),
    RouteDoc::new(Delete, "/api/v1/webhooks", "Delete several webhooks", Admin)
        .body(schema::<webhooks::BulkDelete>)
        .data(200, schema::<webhooks::BulkDeleted>),
    RouteDoc::new(Get, "/api/v1/webhooks/{id}", "Get a webhook", Read)
        .data(200, schema::<WebhookOut>),
    RouteDoc::new(Put, "/api/v1/webhooks/{id}", "Replace a webhook", Admin)
        .body(schema::<WebhookIn>)
        .data(200, schema::<WebhookOut>)
        .errors(&[422]),
    RouteDoc::new(
        Patch,
        "/api/v1/webhooks/{id}",
        "Change a webhook (JSON merge patch of its writable fields)",
        Admin,
    )
    .body(object)
    .data(200, schema::<WebhookOut>)
    .errors(&[422]),
    RouteDoc::new(Delete, "/api/v1/webhooks/{id}", "Delete a webhook", Admin),
    RouteDoc::new(
        Get,
        "/api/v1/webhooks/{id}/secret",
        "Show a webhook's signing secret",
        Admin,
    )
    .data(200, schema::<webhooks::Secrets>),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/rotate-secret",
        "Rotate the signing secret; both sign during grace_seconds",
        Admin,
    )
    .body(schema::<webhooks::RotateIn>)
    .optional_body()
    .data(201, schema::<webhooks::SecretRotated>),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/enable",
        "Enable a webhook again after auto-disable; the deliveries queued meanwhile go out",
        Admin,
    )
    .data(200, schema::<WebhookOut>),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/test",
        "Send a webhook.test event now and return the attempt",
        Admin,
    )
    .data(200, schema::<deliveries::Tested>),
    RouteDoc::new(
        Get,
        "/api/v1/webhooks/{id}/deliveries",
        "List deliveries with their attempts",
        Read,
    )
    .query(&[
        Param::new(
            "status",
            "deliveries in this status",
            Kind::OneOf(&["pending", "succeeded", "failed"]),
        ),
        PAGING[0],
        PAGING[1],
    ])
    .page(schema::<DeliveryOut>),
    RouteDoc::new(
        Post,
        "/api/v1/webhooks/{id}/recover",
        "Requeue the failed deliveries of a time range",
        Admin,
    )
    .body(schema::<deliveries::RecoverIn>)
    .data(202, schema::<deliveries::Requeued>),
    RouteDoc::new(
        Post,
        "/api/v1/deliveries/{id}/retry",
        "Deliver one delivery again now",
        Admin,
    )
    .data(202, schema::<DeliveryOut>),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/webhooks",
        "Register webhooks for one device (an array)",
        Admin,
    )
    .body(array::<WebhookIn>)
    .data(201, array::<WebhookCreated>)
    .errors(&[422]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/webhooks",
        "List a device's webhooks",
        Read,
    )
    .query(&PAGING)
    .page(schema::<WebhookOut>),
    RouteDoc::new(
        Get,
        "/api/v1/groups/{group}/webhooks",
        "List a group's webhooks",
        Read,
    )
    .path_kinds(&[("group", Kind::Label)])
    .query(&PAGING)
    .page(schema::<WebhookOut>),
    RouteDoc::new(
        Post,
        "/api/webhooks/register",
        "EdgeSense alias: register a webhook (answered outside the envelope)",
        Admin,
    )
    .body(schema::<edgesense::RegisterIn>)
    .raw(201, &[EDGESENSE_STATUS])
    .errors(&[422]),
    RouteDoc::new(Get, "/api/webhooks", "EdgeSense alias: list webhooks", Read)
        .data(200, array::<edgesense::EdgeSenseWebhook>),
    RouteDoc::new(
        Delete,
        "/api/webhooks/{id}",
        "EdgeSense alias: delete a webhook",
        Admin,
    )
    .raw(200, &[EDGESENSE_STATUS]),
];
