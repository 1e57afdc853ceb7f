//! `/api/v1/keys`: create, list, revoke, rotate (admin scope).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel, hash_secret},
    envelope::{self, decode_cursor},
    extract::{Json, OptionalJson, Query},
    ids::random_id,
};
use fieldline_proto::InvalidateKind;
use serde::Deserialize;

use crate::{
    State,
    domain::{KeyCreated, KeyIn, new_api_key_secret, secret_prefix},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/keys")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(web::resource("/api/v1/keys/{id}").route(web::delete().to(revoke)))
    .service(web::resource("/api/v1/keys/{id}/rotate").route(web::post().to(rotate)));
}

/// Longest grace of a rotation: 30 days.
const MAX_GRACE_SECONDS: i64 = 30 * 24 * 3600;
/// Grace when none is given: an hour to roll the new secret out.
const DEFAULT_GRACE_SECONDS: i64 = 3600;

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = KeyRotateIn)]
pub struct RotateIn {
    /// Seconds the old secret keeps working (0 to 2592000, default 3600).
    #[schema(minimum = 0, maximum = 2592000)]
    grace_seconds: Option<i64>,
}

/// A new secret for the same name, scopes and expiry; the old secret keeps working for the
/// grace period, then answers 401 everywhere.
async fn rotate(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    OptionalJson(body): OptionalJson<RotateIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let key_id = path.into_inner();
    let grace = body
        .unwrap_or_default()
        .grace_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    if !(0..=MAX_GRACE_SECONDS).contains(&grace) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("grace_seconds: between 0 and {MAX_GRACE_SECONDS}"),
        ));
    }
    let secret = new_api_key_secret();
    let new_key_id = random_id("key_", 20);
    let (new_key, old_key) = state
        .repo
        .rotate_key(
            &principal.project,
            &key_id,
            &new_key_id,
            &hash_secret(&secret),
            &secret_prefix(&secret),
            grace,
            principal.platform_admin,
        )
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "key_not_found",
                format!("key {key_id} not found, revoked or expired"),
            )
        })?;
    // Cached principals carry the old expiry: drop them so the grace period holds everywhere.
    state
        .broadcast_invalidation(InvalidateKind::Keys, &principal.project, &key_id)
        .await;
    tracing::info!(key_id = %key_id, new_key_id = %new_key_id, grace_seconds = grace, project = %principal.project, by = %principal.id, "api key rotated");
    Ok(envelope::created(&Rotated {
        key: KeyCreated {
            key: new_key,
            secret,
        },
        previous: old_key,
    }))
}

/// The new key (its secret shown once) and the old one with its new expiry.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Rotated {
    #[serde(flatten)]
    key: KeyCreated,
    previous: crate::domain::KeyOut,
}

async fn create(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<KeyIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let new_key = body.parse(Utc::now())?;
    let secret = new_api_key_secret();
    let key_id = random_id("key_", 20);
    let created = state
        .repo
        .create_key(
            &principal.project,
            &key_id,
            &new_key,
            &hash_secret(&secret),
            &secret_prefix(&secret),
        )
        .await?;
    tracing::info!(key_id = %key_id, project = %principal.project, by = %principal.id, "api key created");
    Ok(envelope::created(&KeyCreated {
        key: created,
        secret,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    Query(params): Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let limit = crate::routes::devices::parse_limit(params.limit.as_deref())?;
    let after = params
        .cursor
        .as_deref()
        .map(decode_cursor::<(DateTime<Utc>, String)>)
        .transpose()?;
    let rows = state
        .repo
        .list_keys(&principal.project, after, limit as i64 + 1)
        .await?;
    let rows: Vec<_> = rows
        .into_iter()
        .map(|(key, created_at)| {
            let position = (created_at, key.id.clone());
            (key, position)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

async fn revoke(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let key_id = path.into_inner();
    if !state
        .repo
        .revoke_key(&principal.project, &key_id, principal.platform_admin)
        .await?
    {
        return Err(ApiError::not_found(
            "key_not_found",
            format!("key {key_id} not found"),
        ));
    }
    // Every service drops its cached credentials now; the revocation is already durable, so
    // a lost broadcast only delays it to the cache TTL.
    state
        .broadcast_invalidation(InvalidateKind::Keys, &principal.project, &key_id)
        .await;
    tracing::info!(key_id = %key_id, project = %principal.project, by = %principal.id, "api key revoked");
    Ok(envelope::no_content())
}
