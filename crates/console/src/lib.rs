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
    openapi::{Access::Public, Content, Method::Get, RouteDoc, text},
};
use rust_embed::Embed;

#[derive(Embed)]
#[folder = "../../console/dist"]
struct Bundle;

/// The console's routes, for the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc::new(Get, "/", "The operator console (HTML)", Public).raw(
        200,
        &[Content {
            media: "text/html",
            schema: text,
        }],
    ),
    RouteDoc::new(
        Get,
        "/assets/{file}",
        "The console's scripts and styles",
        Public,
    )
    .raw(
        200,
        &[
            Content {
                media: "text/javascript",
                schema: text,
            },
            Content {
                media: "text/css",
                schema: text,
            },
        ],
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::{Path, PathBuf};

    use sha2::{Digest, Sha256};

    use super::*;

    fn files(root: &Path, path: &str, out: &mut Vec<String>) {
        let full = root.join(path);
        if full.is_dir() {
            for entry in std::fs::read_dir(&full).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                files(root, &format!("{path}/{name}"), out);
            }
        } else {
            out.push(path.to_owned());
        }
    }

    /// The committed bundle was built from the sources as they are (the hash
    /// `console/scripts/stamp.mjs` records): a source change without `make console` fails here.
    #[test]
    fn bundle_matches_sources() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../console");
        let mut inputs = Vec::new();
        for input in [
            "index.html",
            "package-lock.json",
            "tsconfig.json",
            "vite.config.ts",
            "src",
        ] {
            files(&root, input, &mut inputs);
        }
        inputs.sort();
        let mut hash = Sha256::new();
        for file in &inputs {
            hash.update(format!("{file}\n"));
            hash.update(std::fs::read(root.join(file)).unwrap());
            hash.update("\n");
        }
        let digest = hex::encode(hash.finalize());
        let recorded = std::fs::read_to_string(root.join("dist/SOURCES.sha256")).unwrap();
        assert_eq!(
            recorded.trim(),
            digest,
            "console/dist was built from other sources: run `make console` and commit dist"
        );
    }

    #[test]
    fn the_bundle_has_its_page_and_the_assets_it_names() {
        let index = Bundle::get("index.html").expect("console/dist/index.html");
        let html = std::str::from_utf8(&index.data).unwrap();
        for chunk in html.split("/assets/").skip(1) {
            let name = &chunk[..chunk.find('"').unwrap()];
            assert!(
                Bundle::get(&format!("assets/{name}")).is_some(),
                "index.html names a missing asset {name}"
            );
        }
        assert!(html.contains("/assets/"), "{html}");
    }
}
