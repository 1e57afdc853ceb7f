//! `/api/v1/webhooks` and the device- and group-scoped listings.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self, decode_cursor},
    extract::{Json, MergePatch, OptionalJson, Query},
    ids::{DeviceId, random_id},
};
use serde::Deserialize;

use crate::{
    State,
    domain::{NewWebhook, WebhookCreated, WebhookIn, parse_group},
    repo::WebhookFilter,
    signing, ssrf,
};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/webhooks")
            .route(web::post().to(create))
            .route(web::get().to(list))
            .route(web::delete().to(delete_many)),
    )
    .service(
        web::resource("/api/v1/webhooks/{id}")
            .route(web::get().to(get))
            .route(web::put().to(replace))
            .route(web::patch().to(patch))
            .route(web::delete().to(delete_one)),
    )
    .service(web::resource("/api/v1/webhooks/{id}/secret").route(web::get().to(secret)))
    .service(
        web::resource("/api/v1/webhooks/{id}/rotate-secret").route(web::post().to(rotate_secret)),
    )
    .service(web::resource("/api/v1/webhooks/{id}/enable").route(web::post().to(enable)))
    .service(
        web::resource("/api/v1/devices/{id}/webhooks")
            .route(web::post().to(create_for_device))
            .route(web::get().to(list_for_device)),
    )
    .service(web::resource("/api/v1/groups/{group}/webhooks").route(web::get().to(list_for_group)));
}

pub fn parse_limit(value: Option<&str>) -> Result<usize, ApiError> {
    envelope::parse_limit(value, DEFAULT_LIMIT, MAX_LIMIT)
}

pub fn not_found(id: &str) -> ApiError {
    ApiError::not_found("webhook_not_found", format!("webhook {id} not found"))
}

/// The URL check that needs DNS: 400 for a malformed URL, 422 for one that is refused.
async fn check_url(state: &State, url: &str) -> Result<(), ApiError> {
    match ssrf::check_url(url, state.context.config.webhook_allow_private).await {
        Ok(_) => Ok(()),
        Err(message) if message.contains("private") => Err(ApiError::unprocessable(
            "url_not_allowed",
            format!("url: {message}"),
        )),
        Err(message) => Err(ApiError::bad_request(
            "invalid_field",
            format!("url: {message}"),
        )),
    }
}

/// Creates one webhook of the caller's project.
pub async fn create_webhook(
    state: &State,
    project: &str,
    webhook: NewWebhook,
) -> Result<WebhookCreated, ApiError> {
    check_url(state, &webhook.url).await?;
    let secret = webhook
        .secret
        .clone()
        .unwrap_or_else(signing::generate_secret);
    let id = random_id("wh_", 20);
    let created = state
        .repo
        .create_webhook(project, &id, &webhook, &secret)
        .await?;
    tracing::info!(webhook_id = %id, project = %project, "webhook created");
    state.changed(project, &id).await;
    Ok(WebhookCreated {
        webhook: created,
        secret,
    })
}

async fn create(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<WebhookIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let created = create_webhook(&state, &principal.project, body.parse()?).await?;
    Ok(envelope::created(&created))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    device_id: Option<String>,
    group: Option<String>,
    event: Option<String>,
    enabled: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_page(
    state: &State,
    project: &str,
    filter: WebhookFilter,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let limit = parse_limit(limit)?;
    let after = cursor
        .map(decode_cursor::<(DateTime<Utc>, String)>)
        .transpose()?;
    let rows = state
        .repo
        .list_webhooks(project, &filter, after, limit as i64 + 1)
        .await?;
    let rows: Vec<_> = rows
        .into_iter()
        .map(|(webhook, created_at)| {
            let position = (created_at, webhook.id.clone());
            (webhook, position)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    Query(params): Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let enabled = match params.enabled.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "enabled: true or false",
            ));
        }
    };
    if let Some(event) = &params.event {
        crate::domain::parse_events(Some(vec![event.clone()])).map_err(|error| {
            ApiError::bad_request(
                "invalid_query",
                error.message.replacen("events[0]", "event", 1),
            )
        })?;
    }
    let filter = WebhookFilter {
        device_id: params
            .device_id
            .as_deref()
            .map(DeviceId::parse)
            .transpose()?
            .map(|id| id.to_string()),
        group: parse_group(params.group)?,
        event: params.event,
        enabled,
    };
    list_page(
        &state,
        &principal.project,
        filter,
        params.limit.as_deref(),
        params.cursor.as_deref(),
    )
    .await
}

async fn get(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let webhook = state
        .repo
        .get_webhook(&principal.project, &path)
        .await?
        .ok_or_else(|| not_found(&path))?;
    Ok(envelope::ok(&webhook))
}

async fn update(
    state: &State,
    project: &str,
    id: &str,
    webhook: NewWebhook,
) -> Result<HttpResponse, ApiError> {
    check_url(state, &webhook.url).await?;
    let updated = state
        .repo
        .update_webhook(project, id, &webhook)
        .await?
        .ok_or_else(|| not_found(id))?;
    state.changed(project, id).await;
    Ok(envelope::ok(&updated))
}

async fn replace(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<WebhookIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    update(&state, &principal.project, &path, body.parse()?).await
}

/// PATCH is a JSON merge patch (RFC 7386) of the webhook as GET shows it; `secret` may be
/// patched too.
async fn patch(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    patch: MergePatch,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let current = state
        .repo
        .get_webhook(&principal.project, &path)
        .await?
        .ok_or_else(|| not_found(&path))?;
    let body: WebhookIn =
        fieldline_common::extract::parse_json_value(patch.apply(current.as_patchable()))?;
    update(&state, &principal.project, &path, body.parse()?).await
}

/// Deletes one webhook of `project` (404 when it has none of that id) and tells every
/// dispatcher.
pub async fn delete_webhook(state: &State, project: &str, id: &str) -> Result<(), ApiError> {
    let deleted = state
        .repo
        .delete_webhooks(project, &[id.to_owned()])
        .await?;
    if deleted.is_empty() {
        return Err(not_found(id));
    }
    state.changed(project, id).await;
    Ok(())
}

async fn delete_one(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    delete_webhook(&state, &principal.project, &path).await?;
    Ok(envelope::no_content())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDelete {
    #[schema(min_items = 1, max_items = 100)]
    webhook_ids: Vec<String>,
}

async fn delete_many(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<BulkDelete>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    if body.webhook_ids.is_empty() || body.webhook_ids.len() > 1000 {
        return Err(ApiError::bad_request(
            "invalid_field",
            "webhook_ids: 1 to 1000 ids",
        ));
    }
    let deleted = state
        .repo
        .delete_webhooks(&principal.project, &body.webhook_ids)
        .await?;
    if !deleted.is_empty() {
        state.changed(&principal.project, "").await;
    }
    // Ids of other projects are reported as not found, like absent ones.
    let not_found: Vec<&String> = body
        .webhook_ids
        .iter()
        .filter(|id| !deleted.contains(id))
        .collect();
    Ok(envelope::ok(&BulkDeleted { deleted, not_found }))
}

async fn secret(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let (secret, previous, previous_expires_at) = state
        .repo
        .secrets(&principal.project, &path)
        .await?
        .ok_or_else(|| not_found(&path))?;
    Ok(envelope::ok(&Secrets {
        secret,
        previous_secret: previous,
        previous_secret_expires_at: previous_expires_at.map(crate::domain::rfc3339),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SecretRotateIn)]
pub struct RotateIn {
    /// Seconds the old secret still signs beside the new one (at most 30 days; a day by
    /// default).
    #[schema(maximum = 2592000)]
    grace_seconds: Option<u64>,
    /// The new secret (16 to 256 characters, or `whsec_…`); generated when left out.
    #[schema(min_length = 16, max_length = 256)]
    secret: Option<String>,
}

async fn rotate_secret(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    OptionalJson(body): OptionalJson<RotateIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let body = body.unwrap_or(RotateIn {
        grace_seconds: None,
        secret: None,
    });
    let grace = body.grace_seconds.unwrap_or(86_400);
    if grace > 30 * 86_400 {
        return Err(ApiError::bad_request(
            "invalid_field",
            "grace_seconds: at most 30 days",
        ));
    }
    let secret = crate::domain::parse_secret(body.secret)?.unwrap_or_else(signing::generate_secret);
    if !state
        .repo
        .rotate_secret(
            &principal.project,
            &path,
            &secret,
            Duration::from_secs(grace),
        )
        .await?
    {
        return Err(not_found(&path));
    }
    tracing::info!(webhook_id = %path, project = %principal.project, grace_seconds = grace, "webhook secret rotated");
    Ok(envelope::created(&SecretRotated {
        secret,
        previous_secret_valid_for_seconds: grace,
    }))
}

async fn enable(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let webhook = state
        .repo
        .enable(&principal.project, &path)
        .await?
        .ok_or_else(|| not_found(&path))?;
    state.changed(&principal.project, &path).await;
    state.dispatcher.wake();
    Ok(envelope::ok(&webhook))
}

/// `POST /api/v1/devices/{id}/webhooks` takes an array, as the Mainflux docs do; each webhook
/// is limited to that device.
async fn create_for_device(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<Vec<WebhookIn>>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    if body.is_empty() || body.len() > 100 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "body: an array of 1 to 100 webhooks",
        ));
    }
    let mut parsed = Vec::with_capacity(body.len());
    for (index, webhook) in body.into_iter().enumerate() {
        let mut webhook = webhook.parse().map_err(|error| ApiError {
            message: format!("[{index}].{}", error.message),
            ..error
        })?;
        webhook.device_ids = vec![device_id.to_string()];
        check_url(&state, &webhook.url)
            .await
            .map_err(|error| ApiError {
                message: format!("[{index}].{}", error.message),
                ..error
            })?;
        parsed.push(webhook);
    }
    let mut created = Vec::with_capacity(parsed.len());
    for webhook in parsed {
        created.push(create_webhook(&state, &principal.project, webhook).await?);
    }
    Ok(envelope::created(&created))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageParams {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_for_device(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let filter = WebhookFilter {
        device_id: Some(device_id.to_string()),
        ..Default::default()
    };
    list_page(
        &state,
        &principal.project,
        filter,
        params.limit.as_deref(),
        params.cursor.as_deref(),
    )
    .await
}

async fn list_for_group(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let group = parse_group(Some(path.into_inner()))?;
    let filter = WebhookFilter {
        group,
        ..Default::default()
    };
    list_page(
        &state,
        &principal.project,
        filter,
        params.limit.as_deref(),
        params.cursor.as_deref(),
    )
    .await
}

/// What a bulk delete removed; ids of other projects count as not found.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct BulkDeleted<'a> {
    #[schema(value_type = Vec<String>)]
    pub deleted: Vec<String>,
    #[schema(value_type = Vec<String>)]
    pub not_found: Vec<&'a String>,
}

/// A webhook's signing secrets: the current one and, during a rotation's grace, the old.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Secrets {
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<String>,
}

/// The new signing secret, shown once; the old one still signs for the grace.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SecretRotated {
    pub secret: String,
    pub previous_secret_valid_for_seconds: u64,
}
