pub mod alert_rules;
pub mod commands;
pub mod config;
pub mod dead_letters;
pub mod devices;
pub mod keys;
pub mod limits;
pub mod projects;

use fieldline_common::ApiError;

/// The one answer for a device that is absent or in another project.
pub fn device_not_found(device_id: impl std::fmt::Display) -> ApiError {
    ApiError::not_found("device_not_found", format!("device {device_id} not found"))
}

use fieldline_common::openapi::{
    Access::{Admin, PlatformAdmin, Read, Write},
    Kind,
    Method::{Delete, Get, Patch, Post, Put},
    PAGING, Param, RouteDoc, array, object, schema,
};

use crate::domain::{
    DeviceCreated, DeviceIn, DeviceOut, KeyCreated, KeyIn, KeyOut, ProjectCreated, ProjectOut,
    alerts::{RuleIn, RuleOut},
    commands::{CommandIn, CommandOut, ConfigOut},
    limits::{ProjectLimitsIn, ProjectLimitsOut},
};

/// The registry's routes, for the OpenAPI document: each with the types of its body and its
/// answer, and the statuses only it answers.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Post,
        "/api/v1/projects",
        "Create a project and its first admin key",
        PlatformAdmin,
    )
    .body(schema::<crate::domain::ProjectIn>)
    .data(201, schema::<ProjectCreated>)
    .errors(&[409]),
    RouteDoc::new(Get, "/api/v1/projects", "List projects", PlatformAdmin)
        .data(200, array::<ProjectOut>),
    RouteDoc::new(
        Get,
        "/api/v1/admin/dead-letters",
        "Messages a consumer gave up on, with the reason, oldest first",
        PlatformAdmin,
    )
    .query(&[
        Param::new("consumer", "the consumer's name (query-writer...)", Kind::Id),
        PAGING[0],
        PAGING[1],
    ])
    .page(schema::<dead_letters::DeadLetter>),
    RouteDoc::new(
        Delete,
        "/api/v1/admin/dead-letters",
        "Purge the dead letters of one consumer (?consumer=) or all (?all=true)",
        PlatformAdmin,
    )
    .query(&[
        Param::new("consumer", "the consumer's name", Kind::Id),
        Param::new("all", "true: every consumer's", Kind::Boolean),
    ])
    .data(200, schema::<dead_letters::Purged>),
    RouteDoc::new(
        Get,
        "/api/v1/admin/dead-letters/{sequence}",
        "One dead letter: reason, headers, payload (base64) and the payload decoded",
        PlatformAdmin,
    )
    .path_kinds(&[("sequence", SEQUENCE)])
    .data(200, schema::<dead_letters::DeadLetterDetail>),
    RouteDoc::new(
        Delete,
        "/api/v1/admin/dead-letters/{sequence}",
        "Delete one dead letter",
        PlatformAdmin,
    )
    .path_kinds(&[("sequence", SEQUENCE)]),
    RouteDoc::new(
        Post,
        "/api/v1/admin/dead-letters/{sequence}/replay",
        "Publish a dead letter again, for the consumer that gave up on it only",
        PlatformAdmin,
    )
    .path_kinds(&[("sequence", SEQUENCE)])
    .data(200, schema::<dead_letters::Replayed>)
    .errors(&[422]),
    RouteDoc::new(
        Get,
        "/api/v1/projects/{slug}/limits",
        "A project's rate limits (per API key, per device), each its override or the default",
        PlatformAdmin,
    )
    .data(200, schema::<ProjectLimitsOut>),
    RouteDoc::new(
        Put,
        "/api/v1/projects/{slug}/limits",
        "Override a project's rate limits; null or absent keeps the default",
        PlatformAdmin,
    )
    .body(schema::<ProjectLimitsIn>)
    .data(200, schema::<ProjectLimitsOut>),
    RouteDoc::new(
        Get,
        "/api/v1/limits",
        "The calling key's project's rate limits",
        Read,
    )
    .data(200, schema::<ProjectLimitsOut>),
    RouteDoc::new(
        Post,
        "/api/v1/keys",
        "Create an API key; its secret is shown once",
        Admin,
    )
    .body(schema::<KeyIn>)
    .data(201, schema::<KeyCreated>)
    .errors(&[422]),
    RouteDoc::new(
        Get,
        "/api/v1/keys",
        "List the project's API keys (never their secrets)",
        Admin,
    )
    .query(&PAGING)
    .page(schema::<KeyOut>),
    RouteDoc::new(
        Delete,
        "/api/v1/keys/{id}",
        "Revoke a key, everywhere within a second",
        Admin,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/keys/{id}/rotate",
        "Rotate a key: a new secret, the old one expires after the grace",
        Admin,
    )
    .body(schema::<keys::RotateIn>)
    .optional_body()
    .data(201, schema::<keys::Rotated>),
    RouteDoc::new(
        Post,
        "/api/v1/devices",
        "Register a device; its token is shown once",
        Write,
    )
    .body(schema::<DeviceIn>)
    .data(201, schema::<DeviceCreated>)
    .errors(&[409, 422]),
    RouteDoc::new(Get, "/api/v1/devices", "List devices", Read)
        .query(&[
            Param::new(
                "type",
                "devices of this type",
                Kind::OneOf(&["sensor", "actuator", "gateway"]),
            ),
            Param::new(
                "status",
                "devices in this status",
                Kind::OneOf(&["online", "offline", "unknown"]),
            ),
            Param::new("group", "devices of this group", Kind::Label),
            Param::new("tag", "devices carrying this tag", Kind::Label),
            PAGING[0],
            PAGING[1],
        ])
        .page(schema::<DeviceOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}",
        "Get a device with its status and last_seen",
        Read,
    )
    .data(200, schema::<DeviceOut>),
    RouteDoc::new(
        Put,
        "/api/v1/devices/{id}",
        "Replace a device's writable fields (`id` may be left out; it must match the path)",
        Write,
    )
    .body(schema::<DeviceIn>)
    .data(200, schema::<DeviceOut>)
    .errors(&[422]),
    RouteDoc::new(
        Patch,
        "/api/v1/devices/{id}",
        "Change a device's writable fields",
        Write,
    )
    .body(object)
    .data(200, schema::<DeviceOut>)
    .errors(&[422]),
    RouteDoc::new(
        Delete,
        "/api/v1/devices/{id}",
        "Delete a device; its token stops working at once",
        Write,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/token",
        "Rotate the device token; the old one stops working at once",
        Write,
    )
    .data(201, schema::<devices::TokenRotated>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/config",
        "The device's configuration and its version",
        Read,
    )
    .data(200, schema::<ConfigOut>),
    RouteDoc::new(
        Put,
        "/api/v1/devices/{id}/config",
        "Replace the configuration (a JSON object of at most 64 KiB): a new version, pushed to the device",
        Write,
    )
    .body(object)
    .data(200, schema::<ConfigOut>),
    RouteDoc::new(
        Patch,
        "/api/v1/devices/{id}/config",
        "Change the configuration",
        Write,
    )
    .body(object)
    .data(200, schema::<ConfigOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/config/versions",
        "A device's last 100 configuration versions, newest first, with who changed each",
        Read,
    )
    .data(200, array::<crate::domain::commands::ConfigVersionOut>),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/commands",
        "Send a command; the device gets it over MQTT or polls for it",
        Write,
    )
    .body(schema::<CommandIn>)
    .data(202, schema::<CommandOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/commands",
        "List the device's commands, newest first",
        Read,
    )
    .query(&[
        Param::new(
            "status",
            "commands in this status",
            Kind::OneOf(&["pending", "delivered", "acked", "failed", "expired"]),
        ),
        PAGING[0],
        PAGING[1],
    ])
    .page(schema::<CommandOut>),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/commands/{command_id}",
        "Get one command and its status",
        Read,
    )
    .data(200, schema::<CommandOut>),
    RouteDoc::new(
        Post,
        "/api/v1/alert-rules",
        "Create an alert rule for a device or a group",
        Write,
    )
    .body(schema::<RuleIn>)
    .data(201, schema::<RuleOut>)
    // The device it names does not exist (in this project).
    .errors(&[404, 422]),
    RouteDoc::new(Get, "/api/v1/alert-rules", "List alert rules", Read)
        .query(&[
            Param::new("device_id", "rules of this device", Kind::Id),
            Param::new("group", "rules of this group", Kind::Label),
            Param::new("metric", "rules on this metric", Kind::Label),
            PAGING[0],
            PAGING[1],
        ])
        .page(schema::<RuleOut>),
    RouteDoc::new(Get, "/api/v1/alert-rules/{id}", "Get an alert rule", Read)
        .data(200, schema::<RuleOut>),
    RouteDoc::new(
        Get,
        "/api/v1/alerts",
        "Alerts firing now in the project: each rule and device with the reading that fired it",
        Read,
    )
    .query(&[
        Param::new("device_id", "alerts of this device", Kind::Id),
        Param::new(
            "severity",
            "alerts of this severity",
            Kind::OneOf(&["info", "warning", "critical"]),
        ),
        PAGING[0],
        PAGING[1],
    ])
    .page(schema::<crate::repo::FiringAlert>),
    RouteDoc::new(
        Put,
        "/api/v1/alert-rules/{id}",
        "Replace an alert rule",
        Write,
    )
    .body(schema::<RuleIn>)
    .data(200, schema::<RuleOut>)
    .errors(&[422]),
    RouteDoc::new(
        Patch,
        "/api/v1/alert-rules/{id}",
        "Change an alert rule",
        Write,
    )
    .body(object)
    .data(200, schema::<RuleOut>)
    .errors(&[422]),
    RouteDoc::new(
        Delete,
        "/api/v1/alert-rules/{id}",
        "Delete an alert rule",
        Write,
    ),
];

/// A dead letter's sequence in its stream.
const SEQUENCE: Kind = Kind::Integer {
    min: 1,
    max: i64::MAX,
};
