//! `/api/v1/devices/{id}/config`: read, replace, merge-patch. Every change is a new version,
//! announced as `config.update` and pushed toward the device, in the same transaction.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope,
    extract::{Json, MergePatch},
    ids::DeviceId,
};

use crate::{
    State,
    domain::{
        commands::{ConfigOut, parse_config},
        rfc3339_opt,
    },
    routes::device_not_found,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/devices/{id}/config")
            .route(web::get().to(get))
            .route(web::put().to(replace))
            .route(web::patch().to(patch)),
    )
    .service(web::resource("/api/v1/devices/{id}/config/versions").route(web::get().to(versions)));
}

/// Versions listed at most: a device's history, newest first.
const MAX_VERSIONS: i64 = 100;

/// `GET /api/v1/devices/{id}/config/versions`: the last 100 versions, newest first, each with
/// who changed it.
async fn versions(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = DeviceId::parse(&path)?;
    let versions = state
        .repo
        .config_versions(&principal.project, device_id.as_str(), MAX_VERSIONS)
        .await?
        .ok_or_else(|| device_not_found(&device_id))?;
    Ok(envelope::ok(&versions))
}

fn config_out(
    device_id: &DeviceId,
    version: i64,
    config: serde_json::Value,
    updated_at: Option<DateTime<Utc>>,
) -> ConfigOut {
    ConfigOut {
        device_id: device_id.as_str().to_owned(),
        version,
        config,
        updated_at: rfc3339_opt(updated_at),
    }
}

async fn get(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = DeviceId::parse(&path)?;
    let (version, config, updated_at) = state
        .repo
        .get_config(&principal.project, device_id.as_str())
        .await?
        .ok_or_else(|| device_not_found(&device_id))?;
    Ok(envelope::ok(&config_out(
        &device_id, version, config, updated_at,
    )))
}

/// The body is the whole new configuration (a JSON object).
async fn replace(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    let next = parse_config(body)?;
    change(
        &state,
        &principal.project,
        &principal.id,
        &device_id,
        move |_| Ok(next),
    )
    .await
}

/// The body is a JSON merge patch (RFC 7396) of the current configuration.
async fn patch(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    patch: MergePatch,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    change(
        &state,
        &principal.project,
        &principal.id,
        &device_id,
        move |current| parse_config(patch.apply(current.clone())),
    )
    .await
}

async fn change(
    state: &State,
    project: &str,
    changed_by: &str,
    device_id: &DeviceId,
    next: impl FnOnce(&serde_json::Value) -> Result<serde_json::Value, ApiError>,
) -> Result<HttpResponse, ApiError> {
    let (version, config, updated_at, changed) = state
        .repo
        .change_config(project, device_id.as_str(), changed_by, next)
        .await?
        .ok_or_else(|| device_not_found(device_id))?;
    if changed {
        state.outbox_wake.notify_one();
        tracing::info!(device_id = %device_id, project = %project, version, by = %changed_by, "device config changed");
    }
    Ok(envelope::ok(&config_out(
        device_id, version, config, updated_at,
    )))
}
