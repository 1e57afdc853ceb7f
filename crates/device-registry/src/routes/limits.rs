//! Rate limits of a project: the platform admin overrides the defaults per project (like a
//! ThingsBoard tenant profile); any key reads its own project's.

use actix_web::{HttpResponse, web};
use fieldline_common::{ApiError, auth::ApiKey, envelope, extract::JsonObject, ids::ProjectSlug};
use fieldline_proto::InvalidateKind;

use crate::{
    State,
    domain::limits::{LimitOut, ProjectLimits, ProjectLimitsIn, ProjectLimitsOut},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/projects/{slug}/limits")
            .route(web::get().to(get))
            .route(web::put().to(put)),
    )
    .service(web::resource("/api/v1/limits").route(web::get().to(own)));
}

fn project_not_found(slug: &str) -> ApiError {
    ApiError::not_found("project_not_found", format!("project {slug} not found"))
}

fn limits_out(state: &State, project: &str, limits: ProjectLimits) -> ProjectLimitsOut {
    let defaults = &state.context.limits;
    ProjectLimitsOut {
        project: project.to_owned(),
        api_key: LimitOut::new(defaults.key_limit(limits.api_key), limits.api_key),
        device: LimitOut::new(defaults.device_limit(limits.device), limits.device),
    }
}

async fn get(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    key.require_platform_admin()?;
    let slug = ProjectSlug::parse(&path)?;
    let limits = state
        .repo
        .project_limits(slug.as_str())
        .await?
        .ok_or_else(|| project_not_found(slug.as_str()))?;
    Ok(envelope::ok(&limits_out(&state, slug.as_str(), limits)))
}

async fn put(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    JsonObject(body): JsonObject<ProjectLimitsIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require_platform_admin()?;
    let slug = ProjectSlug::parse(&path)?;
    let limits = body.parse()?;
    if !state.repo.set_project_limits(slug.as_str(), limits).await? {
        return Err(project_not_found(slug.as_str()));
    }
    // Limits travel with the cached principals and device lookups: drop them everywhere.
    state
        .broadcast_invalidation(InvalidateKind::Keys, slug.as_str(), "")
        .await;
    tracing::info!(project = %slug, by = %principal.id, ?limits, "project rate limits set");
    Ok(envelope::ok(&limits_out(&state, slug.as_str(), limits)))
}

async fn own(state: web::Data<State>, key: ApiKey) -> Result<HttpResponse, ApiError> {
    let project = key.project();
    let limits = state
        .repo
        .project_limits(project)
        .await?
        .ok_or_else(|| project_not_found(project))?;
    Ok(envelope::ok(&limits_out(&state, project, limits)))
}
