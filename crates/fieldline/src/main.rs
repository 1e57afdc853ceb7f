//! `fieldline serve --services all|<list>`: runs any set of the platform's services in one
//! process on one HTTP listener. Even in one process they talk over NATS only. The admin
//! commands (devices, keys, webhooks, alerts, readings, migrate, healthcheck) are in `cli`.

mod cli;

use std::{process::ExitCode, str::FromStr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fieldline_common::{
    Config, Context, Service,
    openapi::{self, ServiceDoc},
    service,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "fieldline", version, about = "Fieldline IoT data platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services. Configuration comes from FIELDLINE_* variables (and FIELDLINE_CONFIG, a
    /// TOML file).
    Serve {
        /// `all`, or a comma list of: device-registry, ingest-http, ingest-mqtt, query-api,
        /// webhook-dispatcher.
        #[arg(long, default_value = "all")]
        services: ServiceSet,
    },
    /// Print the OpenAPI document of the whole platform (as `GET /api/v1/openapi.json`).
    Openapi,
    #[command(flatten)]
    Admin(Box<cli::Admin>),
}

/// What every process serves, whatever its services.
const PLATFORM_ROUTES: &[openapi::RouteDoc] = {
    use openapi::{Access::Public, Content, Method::Get, RouteDoc, object, text};
    &[
        RouteDoc::new(Get, "/health/live", "The process is up", Public).data(200, object),
        RouteDoc::new(
            Get,
            "/health/ready",
            "NATS, Postgres and each service's own checks pass (503 otherwise)",
            Public,
        )
        .data(200, object)
        .errors(&[503]),
        RouteDoc::new(Get, "/metrics", "Prometheus metrics (text format)", Public).raw(
            200,
            &[Content {
                media: "text/plain",
                schema: text,
            }],
        ),
        RouteDoc::new(Get, "/api/v1/openapi.json", "This document", Public).raw(
            200,
            &[Content {
                media: "application/json",
                schema: object,
            }],
        ),
        RouteDoc::new(
            Get,
            "/docs",
            "The API reference, rendered from this document",
            Public,
        )
        .raw(
            200,
            &[Content {
                media: "text/html",
                schema: text,
            }],
        ),
        RouteDoc::new(
            Get,
            "/docs/redoc.standalone.js",
            "The reference's renderer (Redoc, served by the platform: no CDN)",
            Public,
        )
        .raw(
            200,
            &[Content {
                media: "application/javascript",
                schema: text,
            }],
        ),
    ]
};

/// Every service's routes. Whichever services a process runs, it serves the whole platform's
/// document, so the gateway may send `/api/v1/openapi.json` to any of them.
fn services() -> [ServiceDoc; 6] {
    [
        ServiceDoc {
            service: "platform",
            routes: PLATFORM_ROUTES,
        },
        ServiceDoc {
            service: "device-registry",
            routes: device_registry::ROUTES,
        },
        ServiceDoc {
            service: "query-api",
            routes: query_api::ROUTES,
        },
        ServiceDoc {
            service: "ingest-http",
            routes: ingest_http::ROUTES,
        },
        ServiceDoc {
            service: "webhook-dispatcher",
            routes: webhook_dispatcher::ROUTES,
        },
        ServiceDoc {
            service: "console",
            routes: fieldline_console::ROUTES,
        },
    ]
}

fn api_document() -> serde_json::Value {
    serde_json::to_value(openapi::document(&services())).unwrap_or_default()
}

/// Redoc's standalone bundle (npm `redoc`, MIT; assets/redoc.LICENSE), embedded so `/docs`
/// works offline.
const REDOC_JS: &[u8] = include_bytes!("../assets/redoc.standalone.js");

/// The reference page: Redoc reading the document this process serves.
const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fieldline API reference</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="/api/v1/openapi.json" hide-download-button="false"></redoc>
<script src="/docs/redoc.standalone.js"></script>
</body>
</html>
"#;

/// `GET /api/v1/openapi.json`, and the reference pages at `/docs`.
fn openapi_service() -> Service {
    use actix_web::{HttpResponse, web};
    let document = web::Data::new(api_document());
    let allowed = web::Data::new(openapi::AllowedMethods::new(&services()));
    Service {
        name: "openapi",
        routes: Some(Arc::new(move |cfg: &mut web::ServiceConfig| {
            let document = document.clone();
            cfg.app_data(allowed.clone())
                .service(
                    web::resource("/api/v1/openapi.json").route(web::get().to(move || {
                        let document = document.clone();
                        async move { HttpResponse::Ok().json(document.get_ref()) }
                    })),
                )
                .service(web::resource("/docs").route(web::get().to(|| async {
                    HttpResponse::Ok()
                        .content_type("text/html; charset=utf-8")
                        .body(DOCS_HTML)
                })))
                .service(
                    web::resource("/docs/redoc.standalone.js").route(web::get().to(|| async {
                        HttpResponse::Ok()
                            .content_type("application/javascript; charset=utf-8")
                            .insert_header(("Cache-Control", "public, max-age=86400"))
                            .body(REDOC_JS)
                    })),
                );
        })),
        ready: None,
    }
}

/// One role of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceKind {
    DeviceRegistry,
    IngestHttp,
    IngestMqtt,
    QueryApi,
    WebhookDispatcher,
}

impl ServiceKind {
    /// Every service this binary can run, in start order (the registry first: the others
    /// verify credentials through it). Routes are registered in this order too: ingest-http
    /// before query-api, because both serve `/api/v1/devices/{id}/readings` (POST backfill,
    /// GET history) and only ingest-http's resource is guarded to POST, so a GET falls
    /// through to query-api's while a POST would otherwise stop at query-api's with a 405.
    const ALL: [ServiceKind; 5] = [
        ServiceKind::DeviceRegistry,
        ServiceKind::IngestHttp,
        ServiceKind::QueryApi,
        ServiceKind::WebhookDispatcher,
        ServiceKind::IngestMqtt,
    ];

    fn name(self) -> &'static str {
        match self {
            ServiceKind::DeviceRegistry => "device-registry",
            ServiceKind::IngestHttp => "ingest-http",
            ServiceKind::IngestMqtt => "ingest-mqtt",
            ServiceKind::QueryApi => "query-api",
            ServiceKind::WebhookDispatcher => "webhook-dispatcher",
        }
    }

    async fn start(self, context: &Context) -> anyhow::Result<Service> {
        match self {
            ServiceKind::DeviceRegistry => device_registry::start(context).await,
            ServiceKind::IngestHttp => ingest_http::start(context).await,
            ServiceKind::IngestMqtt => ingest_mqtt::start(context).await,
            ServiceKind::QueryApi => query_api::start(context).await,
            ServiceKind::WebhookDispatcher => webhook_dispatcher::start(context).await,
        }
    }
}

impl FromStr for ServiceKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|kind| kind.name()).collect();
                format!("unknown service {name:?}; known: all, {}", known.join(", "))
            })
    }
}

#[derive(Debug, Clone)]
struct ServiceSet(Vec<ServiceKind>);

impl FromStr for ServiceSet {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, String> {
        if list.trim() == "all" {
            return Ok(ServiceSet(ServiceKind::ALL.to_vec()));
        }
        let mut kinds = Vec::new();
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            let kind: ServiceKind = name.parse()?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err("no service named".into());
        }
        // Start in the canonical order whatever order they were listed in.
        kinds.sort_by_key(|kind| ServiceKind::ALL.iter().position(|known| known == kind));
        Ok(ServiceSet(kinds))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { services } => serve(services).await.map(|()| ExitCode::SUCCESS),
        Command::Openapi => {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &api_document())?;
            writeln!(stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(admin) => Ok(cli::run(*admin).await),
    }
}

async fn serve(services: ServiceSet) -> anyhow::Result<()> {
    let config = Config::load()?;
    let names: Vec<_> = services.0.iter().map(|kind| kind.name()).collect();
    // A process of one service is that service in traces; one of several is "fieldline".
    let service_name = match names.as_slice() {
        [one] => *one,
        _ => "fieldline",
    };
    let tracer = fieldline_common::telemetry::init(&config, service_name)?;
    // The recorder before the services start: what they record while starting (counters
    // set to 0 for dashboards and alerts) would otherwise go nowhere.
    fieldline_common::telemetry::metrics_handle();
    // Where it connects and how, never with a credential (validated at load, so both read).
    let nats =
        fieldline_common::bus::NatsSettings::from_config(&config).map_err(|(field, message)| {
            anyhow::anyhow!("configuration field `{field}` is invalid: {message}")
        })?;
    let database = fieldline_common::db::DatabaseSettings::from_config(&config)
        .map_err(|message| anyhow::anyhow!("FIELDLINE_DATABASE_URL {message}"))?;
    tracing::info!(
        services = ?names,
        bus_prefix = %config.bus_prefix,
        nats = %nats.servers_shown(),
        nats_auth = nats.auth_shown(),
        nats_tls = nats.tls_shown(),
        database = %database.shown(),
        "starting"
    );
    let shutdown_timeout = config.shutdown_timeout;

    let shutdown = CancellationToken::new();
    let context = Context::connect(config, shutdown.clone()).await?;
    let mut started = Vec::new();
    for kind in &services.0 {
        let service = kind
            .start(&context)
            .await
            .with_context(|| format!("starting {}", kind.name()))?;
        started.push(service);
    }
    started.push(openapi_service());
    started.push(fieldline_console::service());
    let listener = service::serve_http(&context, &started)?;
    tracing::info!(addr = %listener.addr, services = ?names, "fieldline ready");

    service::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    listener.stop().await;
    context.tasks.close();
    if tokio::time::timeout(shutdown_timeout, context.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?shutdown_timeout, "background work did not finish in time");
    }
    // Publishes still buffered in the client reach the server before we exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), context.nats.flush()).await;
    tracing::info!("stopped");
    // The last spans go out before exit (the exporter blocks: off the runtime's threads).
    let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{collections::BTreeSet, path::Path};

    use super::*;

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    fn rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, files);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }

    /// Every (METHOD, path) the services register with actix, read from their source: each
    /// resource with the methods of its routes, and each bare route with a path.
    fn registered_routes() -> BTreeSet<(String, String)> {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&crates).unwrap() {
            let src = entry.unwrap().path().join("src");
            // loadgen and the test kit serve receivers of their own, not platform routes.
            let harness =
                src.starts_with(crates.join("loadgen")) || src.starts_with(crates.join("testkit"));
            if src.is_dir() && !harness {
                rust_files(&src, &mut files);
            }
        }
        let mut routes = BTreeSet::new();
        for file in files {
            let text: String = std::fs::read_to_string(&file)
                .unwrap()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            for chunk in text.split("web::resource(\"").skip(1) {
                let path = &chunk[..chunk.find('"').unwrap()];
                for method in METHODS {
                    if chunk.contains(&format!(".route(web::{method}()")) {
                        routes.insert((method.to_ascii_uppercase(), path.to_owned()));
                    }
                }
            }
            for chunk in text.split(".route(\"").skip(1) {
                let path = &chunk[..chunk.find('"').unwrap()];
                let after = &chunk[path.len() + 2..];
                for method in METHODS {
                    if after.starts_with(&format!("web::{method}()"))
                        || after.starts_with(&format!("actix_web::web::{method}()"))
                    {
                        routes.insert((method.to_ascii_uppercase(), path.to_owned()));
                    }
                }
            }
        }
        routes
    }

    /// No answer of the API is an untyped `data` any more: each JSON success names its schema.
    #[test]
    fn every_json_answer_and_body_of_the_api_names_its_type() {
        let document = api_document();
        let mut untyped = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            if !path.starts_with("/api/") || path == "/api/v1/openapi.json" {
                continue;
            }
            for (method, operation) in item.as_object().unwrap() {
                let typed = |schema: &serde_json::Value| {
                    schema.get("$ref").is_some()
                        || schema.get("oneOf").is_some()
                        || schema["type"] == "array"
                        || schema["type"] == "object"
                };
                for (status, response) in operation["responses"].as_object().unwrap() {
                    let Some(schema) = response["content"]["application/json"].get("schema") else {
                        continue;
                    };
                    let data = schema["properties"].get("data").unwrap_or(schema);
                    if !typed(data) {
                        untyped.push(format!("{method} {path} {status}"));
                    }
                }
                if let Some(body) =
                    operation["requestBody"]["content"]["application/json"].get("schema")
                    && !typed(body)
                {
                    untyped.push(format!("{method} {path} body"));
                }
            }
        }
        assert!(untyped.is_empty(), "untyped: {untyped:?}");
        let list = &document["paths"]["/api/v1/devices"]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"];
        assert_eq!(list["properties"]["data"]["type"], "array");
        let export = &document["paths"]["/api/v1/devices/{id}/readings"]["get"]["responses"]["200"]
            ["content"];
        assert!(export["text/csv"].is_object() && export["application/x-ndjson"].is_object());
        let create = &document["paths"]["/api/v1/devices"]["post"]["responses"];
        for status in [
            "201", "400", "401", "403", "409", "413", "415", "422", "429", "503",
        ] {
            assert!(create[status].is_object(), "POST /api/v1/devices {status}");
        }
    }

    #[test]
    fn no_two_types_share_a_schema_name() {
        assert_eq!(
            openapi::schema_name_clashes(&services()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_document_describes_every_registered_route_and_nothing_else() {
        let document = api_document();
        assert_eq!(document["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        let registered = registered_routes();
        assert!(
            registered.len() > 40,
            "the source scan found too little: {registered:?}"
        );
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let phantom: Vec<_> = documented.difference(&registered).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}"
        );
        assert!(
            phantom.is_empty(),
            "documented routes that are not registered: {phantom:?}"
        );
    }
}
