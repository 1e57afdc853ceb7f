//! The operator console: the web app built from `console/` (TypeScript, Vite) into
//! `console/dist`, embedded in the binary and served at `/` by every process, like
//! `/api/v1/openapi.json`. It talks to the platform only through the public HTTP API, with the
//! API key the operator signs in with (held in the browser's session storage).
//!
//! `index.html` is never cached (it names the current assets); the assets carry a content
//! hash in their names, so they are cached for good.

use std::sync::Arc;

use actix_web::{
    HttpResponse,
    http::header::{self, CacheControl, CacheDirective},
    middleware::Compress,
    web,
};
use fieldline_common::{
    ApiError, Service,
    openapi::{Access::Public, Method::Get, RouteDoc},
};
use rust_embed::Embed;

#[derive(Embed)]
#[folder = "../../console/dist"]
#[exclude = "*.map"]
struct Bundle;

/// The console's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(Get, "/", "The operator console (HTML)", Public),
    RouteDoc::new(
        Get,
        "/assets/{file}",
        "The console's scripts and styles",
        Public,
    ),
];

/// `GET /` and `GET /assets/{file}`.
pub fn service() -> Service {
    Service {
        name: "console",
        routes: Some(Arc::new(|cfg: &mut web::ServiceConfig| {
            cfg.service(
                web::resource("/")
                    .wrap(Compress::default())
                    .route(web::get().to(index)),
            )
            .service(
                web::resource("/assets/{file}")
                    .wrap(Compress::default())
                    .route(web::get().to(asset)),
            );
        })),
        ready: None,
    }
}

async fn index() -> Result<HttpResponse, ApiError> {
    let file = Bundle::get("index.html").ok_or_else(|| {
        ApiError::not_found(
            "console_not_built",
            "the console bundle is missing: run `make console`",
        )
    })?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header(security_headers())
        .body(file.data.into_owned()))
}

async fn asset(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = format!("assets/{path}");
    let file = Bundle::get(&name).ok_or_else(|| {
        ApiError::not_found("asset_not_found", format!("no console asset {path}"))
    })?;
    Ok(HttpResponse::Ok()
        .content_type(file.metadata.mimetype())
        .insert_header(CacheControl(vec![
            CacheDirective::Public,
            CacheDirective::MaxAge(365 * 24 * 3600),
            CacheDirective::Extension("immutable".into(), None),
        ]))
        .body(file.data.into_owned()))
}

/// The page loads only its own scripts and styles and talks only to its own origin.
fn security_headers() -> (header::HeaderName, &'static str) {
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    )
}
