//! `/api/v1/projects`: the platform admin creates and lists projects.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, hash_secret},
    envelope,
    extract::Json,
    ids::{ProjectSlug, random_id},
    names::Name,
};

use crate::{
    State,
    domain::{KeyCreated, ProjectCreated, ProjectIn, new_api_key_secret, secret_prefix},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/projects")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    );
}

async fn create(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<ProjectIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require_platform_admin()?;
    let slug = ProjectSlug::parse(&body.slug).map_err(|error| {
        ApiError::bad_request("invalid_field", format!("slug: {}", error.message))
    })?;
    let name = match &body.name {
        Some(name) => Name::parse("name", name)?,
        None => Name::parse("name", slug.as_str())?,
    };
    let secret = new_api_key_secret();
    let key_id = random_id("key_", 20);
    let (project, key) = state
        .repo
        .create_project(
            slug.as_str(),
            name.as_str(),
            &key_id,
            &hash_secret(&secret),
            &secret_prefix(&secret),
        )
        .await?
        .ok_or_else(|| {
            ApiError::conflict("project_exists", format!("project {slug} already exists"))
        })?;
    tracing::info!(project = %slug, by = %principal.id, "project created");
    Ok(envelope::created(&ProjectCreated {
        project,
        admin_key: KeyCreated { key, secret },
    }))
}

async fn list(state: web::Data<State>, key: ApiKey) -> Result<HttpResponse, ApiError> {
    key.require_platform_admin()?;
    Ok(envelope::ok(&state.repo.list_projects().await?))
}
