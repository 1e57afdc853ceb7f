//! `GET /api/v1/devices/{id}/readings` and `/readings/latest`.

use actix_web::{HttpResponse, web};
use chrono::Utc;
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self},
    extract::Query,
};

use crate::{
    State,
    domain::{LatestParams, ReadingsParams, parse_metrics},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/devices/{id}/readings").route(web::get().to(readings)))
        .service(
            web::resource("/api/v1/devices/{id}/readings/latest").route(web::get().to(latest)),
        );
}

async fn readings(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<ReadingsParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let query = params.parse(Utc::now())?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let rows = state
        .repo
        .readings(&principal.project, device_id.as_str(), &query)
        .await?;
    Ok(envelope::keyset_page(rows, query.limit))
}

async fn latest(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<LatestParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let metrics = parse_metrics(params.metric.as_deref())?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let latest = state
        .repo
        .latest(&principal.project, device_id.as_str(), metrics.as_deref())
        .await?;
    Ok(envelope::ok(&latest))
}
