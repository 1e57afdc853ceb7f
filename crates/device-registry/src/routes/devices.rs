//! `/api/v1/devices`: create (with its token, shown once), list, get, replace, merge-patch,
//! delete, token rotation.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel, hash_secret},
    envelope::{self, decode_cursor},
    extract::{Json, MergePatch, Query},
    ids::DeviceId,
};
use fieldline_proto::InvalidateKind;
use serde::Deserialize;

use crate::{
    State,
    broker::BrokerAccounts,
    domain::{DeviceCreated, DeviceIn, DeviceType},
    repo::DeviceFilter,
    routes::device_not_found,
};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/devices")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        web::resource("/api/v1/devices/{id}")
            .route(web::get().to(get))
            .route(web::put().to(replace))
            .route(web::patch().to(patch))
            .route(web::delete().to(delete)),
    )
    .service(web::resource("/api/v1/devices/{id}/token").route(web::post().to(rotate_token)));
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
    let issued = state.tokens.issue();
    let created = state
        .repo
        .create_device(
            &principal.project,
            &device,
            &hash_secret(&issued.token),
            issued.seed.as_deref(),
        )
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
    state
        .broker
        .put_device(&principal.project, device.id.as_str(), &issued.token)
        .await;
    Ok(envelope::created(&DeviceCreated {
        mqtt_username: mqtt_username(&state, &principal.project, &device.id),
        device: created,
        token: issued.token,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(rename = "type")]
    device_type: Option<String>,
    status: Option<String>,
    group: Option<String>,
    tag: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn parse_status(value: &str) -> Result<&'static str, ApiError> {
    ["online", "offline", "unknown"]
        .into_iter()
        .find(|status| *status == value)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_parameter",
                format!("status: {value:?} is not one of online, offline, unknown"),
            )
        })
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
    let status = params.status.as_deref().map(parse_status).transpose()?;
    // A filter that no device could match is a mistake in the query, not an empty page.
    for (name, value) in [("group", &params.group), ("tag", &params.tag)] {
        if let Some(value) = value {
            crate::domain::check_label(name, value)?;
        }
    }
    let filter = DeviceFilter {
        device_type: device_type.map(DeviceType::as_str),
        status,
        group: params.group.as_deref(),
        tag: params.tag.as_deref(),
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
        .ok_or_else(|| device_not_found(&device_id))?;
    Ok(envelope::ok(&device))
}

/// `PUT`: the whole writable representation; `id` may be left out, and must match if given.
async fn replace(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    save(&state, &principal.project, &device_id, body).await
}

/// `PATCH`: a JSON merge patch (RFC 7396) of the writable representation.
async fn patch(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    patch: MergePatch,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    let current = state
        .repo
        .get_device(&principal.project, device_id.as_str())
        .await?
        .ok_or_else(|| device_not_found(&device_id))?;
    let merged = patch.apply(current.to_input_json());
    save(&state, &principal.project, &device_id, merged).await
}

async fn save(
    state: &State,
    project: &str,
    device_id: &DeviceId,
    mut body: serde_json::Value,
) -> Result<HttpResponse, ApiError> {
    let Some(fields) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "a device is a JSON object",
        ));
    };
    match fields.get("id") {
        None | Some(serde_json::Value::Null) => {
            fields.insert("id".into(), device_id.as_str().into());
        }
        Some(id) if id == device_id.as_str() => {}
        Some(_) => {
            return Err(ApiError::unprocessable(
                "id_mismatch",
                "id: a device's id cannot change; it must match the path",
            ));
        }
    }
    if fields.contains_key("config") {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("config: change it with PUT or PATCH /api/v1/devices/{device_id}/config"),
        ));
    }
    let input: DeviceIn = fieldline_common::extract::parse_json_value(body)?;
    let device = input.parse()?;
    let default_interval = state
        .context
        .config
        .device_heartbeat_interval
        .as_secs()
        .max(1) as i32;
    let updated = state
        .repo
        .update_device(project, &device, default_interval)
        .await?
        .ok_or_else(|| device_not_found(device_id))?;
    // Services cache a device's type and group (webhook filters): drop them.
    state
        .broadcast_invalidation(InvalidateKind::Devices, project, device_id.as_str())
        .await;
    Ok(envelope::ok(&updated))
}

async fn delete(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    if !state
        .repo
        .delete_device(&principal.project, device_id.as_str())
        .await?
    {
        return Err(device_not_found(&device_id));
    }
    // Its token must stop working at once in every service, and on the broker.
    state
        .broadcast_invalidation(
            InvalidateKind::Devices,
            &principal.project,
            device_id.as_str(),
        )
        .await;
    state
        .broker
        .remove_device(&principal.project, device_id.as_str())
        .await;
    tracing::info!(device_id = %device_id, project = %principal.project, by = %principal.id, "device deleted");
    Ok(envelope::no_content())
}

/// A new token; the old one stops working at once (there is no grace: a device holds one).
async fn rotate_token(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    let issued = state.tokens.issue();
    if !state
        .repo
        .rotate_device_token(
            &principal.project,
            device_id.as_str(),
            &hash_secret(&issued.token),
            issued.seed.as_deref(),
        )
        .await?
    {
        return Err(device_not_found(&device_id));
    }
    state
        .broadcast_invalidation(
            InvalidateKind::Devices,
            &principal.project,
            device_id.as_str(),
        )
        .await;
    // The broker cuts the session that logged in with the old token.
    state
        .broker
        .put_device(&principal.project, device_id.as_str(), &issued.token)
        .await;
    tracing::info!(device_id = %device_id, project = %principal.project, by = %principal.id, "device token rotated");
    Ok(envelope::created(&TokenRotated {
        mqtt_username: mqtt_username(&state, &principal.project, &device_id),
        device_id: device_id.as_str().to_owned(),
        token: issued.token,
    }))
}

/// A device's new token, shown once.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TokenRotated {
    pub device_id: String,
    #[schema(example = "fld_3kX9...")]
    pub token: String,
    /// The device's MQTT username (its password is `token`).
    pub mqtt_username: String,
}

/// The device's broker account: its topic prefix, `{root}/{project}/{device}`.
fn mqtt_username(state: &State, project: &str, device_id: &DeviceId) -> String {
    BrokerAccounts::username(
        &state.context.config.mqtt_topic_root,
        project,
        device_id.as_str(),
    )
}
