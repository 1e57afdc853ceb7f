//! `/api/v1/devices/{id}/commands`: send (202, pending), list, read.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self, decode_cursor},
    extract::{Json, Query},
    ids::{DeviceId, random_id},
};
use serde::Deserialize;

use crate::{
    State,
    domain::commands::{CommandIn, parse_command_status},
    repo::CommandFilter,
    routes::device_not_found,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/devices/{id}/commands")
            .route(web::post().to(send))
            .route(web::get().to(list)),
    )
    .service(web::resource("/api/v1/devices/{id}/commands/{command_id}").route(web::get().to(get)));
}

async fn send(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<CommandIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let device_id = DeviceId::parse(&path)?;
    let command = body.parse()?;
    let ttl_s = command
        .ttl_s
        .unwrap_or(state.context.config.command_default_ttl.as_secs().max(1) as i64);
    let command_id = random_id("cmd_", 24);
    let created = state
        .repo
        .create_command(
            &principal.project,
            device_id.as_str(),
            &command_id,
            &command.name,
            &command.params,
            ttl_s,
        )
        .await?
        .ok_or_else(|| device_not_found(&device_id))?;
    state.outbox_wake.notify_one();
    tracing::info!(device_id = %device_id, project = %principal.project, command_id = %command_id, name = %command.name, by = %principal.id, "command sent");
    Ok(envelope::accepted(&created))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = DeviceId::parse(&path)?;
    let limit = crate::routes::devices::parse_limit(params.limit.as_deref())?;
    let status = params
        .status
        .as_deref()
        .map(parse_command_status)
        .transpose()?;
    let after = params
        .cursor
        .as_deref()
        .map(decode_cursor::<(DateTime<Utc>, String)>)
        .transpose()?;
    if !state
        .repo
        .device_exists(&principal.project, device_id.as_str())
        .await?
    {
        return Err(device_not_found(&device_id));
    }
    let filter = CommandFilter {
        status,
        after,
        limit: limit as i64 + 1,
    };
    let rows: Vec<_> = state
        .repo
        .list_commands(&principal.project, device_id.as_str(), &filter)
        .await?
        .into_iter()
        .map(|(command, created_at)| {
            let position = (created_at, command.id.clone());
            (command, position)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

async fn get(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let (device_id, command_id) = path.into_inner();
    let device_id = DeviceId::parse(&device_id)?;
    let command = state
        .repo
        .get_command(&principal.project, device_id.as_str(), &command_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "command_not_found",
                format!("command {command_id} of device {device_id} not found"),
            )
        })?;
    Ok(envelope::ok(&command))
}
