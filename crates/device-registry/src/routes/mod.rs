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
    JSON,
    Method::{Delete, Get, Patch, Post, Put},
    PAGING, RouteDoc,
};

/// The registry's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(
        Post,
        "/api/v1/projects",
        "Create a project and its first admin key",
        PlatformAdmin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(Get, "/api/v1/projects", "List projects", PlatformAdmin),
    RouteDoc::new(
        Get,
        "/api/v1/admin/dead-letters",
        "Messages a consumer gave up on, with the reason, oldest first (?consumer=query-writer)",
        PlatformAdmin,
    )
    .query(&PAGING),
    RouteDoc::new(
        Delete,
        "/api/v1/admin/dead-letters",
        "Purge the dead letters of one consumer (?consumer=) or all (?all=true)",
        PlatformAdmin,
    ),
    RouteDoc::new(
        Get,
        "/api/v1/admin/dead-letters/{sequence}",
        "One dead letter: reason, headers, payload (base64) and the payload decoded",
        PlatformAdmin,
    ),
    RouteDoc::new(
        Delete,
        "/api/v1/admin/dead-letters/{sequence}",
        "Delete one dead letter",
        PlatformAdmin,
    )
    .success(204),
    RouteDoc::new(
        Post,
        "/api/v1/admin/dead-letters/{sequence}/replay",
        "Publish a dead letter again, for the consumer that gave up on it only",
        PlatformAdmin,
    ),
    RouteDoc::new(
        Get,
        "/api/v1/projects/{slug}/limits",
        "A project's rate limits (per API key, per device), each its override or the default",
        PlatformAdmin,
    ),
    RouteDoc::new(
        Put,
        "/api/v1/projects/{slug}/limits",
        "Override a project's rate limits {api_key?: {requests, period_s}, device?: {…}}; null keeps the default",
        PlatformAdmin,
    )
    .body(JSON),
    RouteDoc::new(
        Get,
        "/api/v1/limits",
        "The calling key's project's rate limits",
        Read,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/keys",
        "Create an API key {name, scopes, expires_at?}; its secret is shown once",
        Admin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(
        Get,
        "/api/v1/keys",
        "List the project's API keys (never their secrets)",
        Admin,
    )
    .query(&PAGING),
    RouteDoc::new(
        Delete,
        "/api/v1/keys/{id}",
        "Revoke a key, everywhere within a second",
        Admin,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/keys/{id}/rotate",
        "Rotate a key {grace_seconds?}: a new secret, the old one expires after the grace",
        Admin,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(
        Post,
        "/api/v1/devices",
        "Register a device; its token is shown once",
        Write,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(Get, "/api/v1/devices", "List devices", Read).query(&[
        ("type", "sensor, actuator or gateway"),
        ("status", "online, offline or unknown"),
        ("group", "devices of this group"),
        ("tag", "devices carrying this tag"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}",
        "Get a device with its status and last_seen",
        Read,
    ),
    RouteDoc::new(
        Put,
        "/api/v1/devices/{id}",
        "Replace a device's writable fields",
        Write,
    )
    .body(JSON),
    RouteDoc::new(
        Patch,
        "/api/v1/devices/{id}",
        "Change a device (JSON merge patch)",
        Write,
    )
    .body(JSON),
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
    .success(201),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/config",
        "The device's configuration and its version",
        Read,
    ),
    RouteDoc::new(
        Put,
        "/api/v1/devices/{id}/config",
        "Replace the configuration: a new version, config.update, pushed to the device",
        Write,
    )
    .body(JSON),
    RouteDoc::new(
        Patch,
        "/api/v1/devices/{id}/config",
        "Change the configuration (JSON merge patch)",
        Write,
    )
    .body(JSON),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/config/versions",
        "A device's last 100 configuration versions, newest first, with who changed each",
        Read,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/devices/{id}/commands",
        "Send a command {name, params?, ttl_s?}",
        Write,
    )
    .body(JSON)
    .success(202),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/commands",
        "List the device's commands, newest first",
        Read,
    )
    .query(&[
        ("status", "pending, delivered, acked, failed or expired"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(
        Get,
        "/api/v1/devices/{id}/commands/{command_id}",
        "Get one command and its status",
        Read,
    ),
    RouteDoc::new(
        Post,
        "/api/v1/alert-rules",
        "Create an alert rule for a device or a group",
        Write,
    )
    .body(JSON)
    .success(201),
    RouteDoc::new(Get, "/api/v1/alert-rules", "List alert rules", Read).query(&[
        ("device_id", "rules of this device"),
        ("group", "rules of this group"),
        ("metric", "rules on this metric"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(Get, "/api/v1/alert-rules/{id}", "Get an alert rule", Read),
    RouteDoc::new(
        Get,
        "/api/v1/alerts",
        "Alerts firing now in the project: each rule and device with the reading that fired it",
        Read,
    )
    .query(&[
        ("device_id", "alerts of this device"),
        ("severity", "info, warning or critical"),
        PAGING[0],
        PAGING[1],
    ]),
    RouteDoc::new(
        Put,
        "/api/v1/alert-rules/{id}",
        "Replace an alert rule",
        Write,
    )
    .body(JSON),
    RouteDoc::new(
        Patch,
        "/api/v1/alert-rules/{id}",
        "Change an alert rule (JSON merge patch)",
        Write,
    )
    .body(JSON),
    RouteDoc::new(
        Delete,
        "/api/v1/alert-rules/{id}",
        "Delete an alert rule",
        Write,
    ),
];
