//! `/api/v1/devices`: create (with its token, shown once), list, get.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel, hash_secret},
    envelope::{self, decode_cursor},
    extract::{Json, Query},
    ids::DeviceId,
};
use fieldline_proto::InvalidateKind;
use serde::Deserialize;

use crate::{
    State,
    domain::{DeviceCreated, DeviceIn, DeviceType, new_device_token},
    repo::DeviceFilter,
};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/devices")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(web::resource("/api/v1/devices/{id}").route(web::get().to(get)));
}

/// `limit` of a listing: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub fn parse_limit(value: Option<&str>) -> Result<usize, ApiError> {
    envelope::parse_limit(value, DEFAULT_LIMIT, MAX_LIMIT)
}

async fn create(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<DeviceIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device = body.parse()?;
    let token = new_device_token();
    let created = state
        .repo
        .create_device(&principal.project, &device, &hash_secret(&token))
        .await?
        .ok_or_else(|| {
            ApiError::conflict(
                "device_exists",
                format!("device {} already exists", device.id),
            )
        })?;
    tracing::info!(device_id = %device.id, project = %principal.project, by = %principal.id, "device created");
    // Services may have cached "no such device" (an MQTT device that published before it
    // was registered): drop that now.
    state
        .broadcast_invalidation(
            InvalidateKind::Devices,
            &principal.project,
            device.id.as_str(),
        )
        .await;
    Ok(envelope::created(&DeviceCreated {
        device: created,
        token,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(rename = "type")]
    device_type: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    Query(params): Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let limit = parse_limit(params.limit.as_deref())?;
    let device_type = params
        .device_type
        .as_deref()
        .map(DeviceType::parse)
        .transpose()?;
    let after_id = params
        .cursor
        .as_deref()
        .map(decode_cursor::<String>)
        .transpose()?;
    let filter = DeviceFilter {
        device_type: device_type.map(DeviceType::as_str),
        after_id: after_id.as_deref(),
        limit: limit as i64 + 1,
    };
    let devices = state.repo.list_devices(&principal.project, &filter).await?;
    let rows: Vec<_> = devices
        .into_iter()
        .map(|device| {
            let id = device.id.clone();
            (device, id)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

async fn get(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = DeviceId::parse(&path)?;
    let device = state
        .repo
        .get_device(&principal.project, device_id.as_str())
        .await?
        .ok_or_else(|| {
            ApiError::not_found("device_not_found", format!("device {device_id} not found"))
        })?;
    Ok(envelope::ok(&device))
}
