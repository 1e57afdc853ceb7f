//! `GET` and `PUT /api/v1/retention`: how long the caller's project keeps raw readings and
//! rollups. The maintenance task applies it at its next round.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope,
    extract::JsonObject,
};

use crate::{
    State,
    retention::{RetentionIn, RetentionOut},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/retention")
            .route(web::get().to(get))
            .route(web::put().to(put)),
    );
}

async fn answer(state: &State, project: &str) -> Result<HttpResponse, ApiError> {
    let own = state.repo.retention(project).await?;
    let config = &state.context.config;
    Ok(envelope::ok(&RetentionOut::new(
        project,
        own,
        (config.readings_retention, config.rollups_retention),
    )))
}

async fn get(state: web::Data<State>, key: ApiKey) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    answer(&state, &principal.project).await
}

async fn put(
    state: web::Data<State>,
    key: ApiKey,
    JsonObject(body): JsonObject<RetentionIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let (readings, rollups) = body.parse()?;
    state
        .repo
        .set_retention(&principal.project, readings, rollups)
        .await?;
    answer(&state, &principal.project).await
}
