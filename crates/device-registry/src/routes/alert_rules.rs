//! `/api/v1/alert-rules`: rules that turn readings into `device.alert` events.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self, decode_cursor},
    extract::{Json, MergePatch, Query, parse_json_value},
    ids::random_id,
};
use serde::Deserialize;

use crate::{
    State,
    domain::alerts::{NewRule, RuleIn, Severity},
    repo::{FiringFilter, RuleFilter},
    routes::device_not_found,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/alert-rules")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(web::resource("/api/v1/alerts").route(web::get().to(firing)))
    .service(
        web::resource("/api/v1/alert-rules/{id}")
            .route(web::get().to(get))
            .route(web::put().to(replace))
            .route(web::patch().to(patch))
            .route(web::delete().to(delete)),
    );
}

fn rule_not_found(rule_id: &str) -> ApiError {
    ApiError::not_found("rule_not_found", format!("alert rule {rule_id} not found"))
}

/// A rule may only watch a device of its own project (another project's is "not found").
async fn check_target(state: &State, project: &str, rule: &NewRule) -> Result<(), ApiError> {
    if let Some(device_id) = &rule.device_id
        && !state.repo.device_exists(project, device_id).await?
    {
        return Err(device_not_found(device_id));
    }
    Ok(())
}

async fn create(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<RuleIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let rule = body.parse()?;
    check_target(&state, &principal.project, &rule).await?;
    let rule_id = random_id("rule_", 20);
    let created = state
        .repo
        .create_rule(&principal.project, &rule_id, &rule)
        .await?;
    tracing::info!(rule_id = %rule_id, project = %principal.project, by = %principal.id, "alert rule created");
    Ok(envelope::created(&created))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    device_id: Option<String>,
    group: Option<String>,
    metric: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    Query(params): Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let limit = crate::routes::devices::parse_limit(params.limit.as_deref())?;
    // A filter that no rule could match is a mistake in the query, not an empty page.
    if let Some(device_id) = &params.device_id {
        fieldline_common::ids::DeviceId::parse(device_id)?;
    }
    for (name, value) in [("group", &params.group), ("metric", &params.metric)] {
        if let Some(value) = value {
            crate::domain::check_label(name, value)?;
        }
    }
    let after_id = params
        .cursor
        .as_deref()
        .map(decode_cursor::<String>)
        .transpose()?;
    let filter = RuleFilter {
        device_id: params.device_id.as_deref(),
        group: params.group.as_deref(),
        metric: params.metric.as_deref(),
        after_id: after_id.as_deref(),
        limit: limit as i64 + 1,
    };
    let rows: Vec<_> = state
        .repo
        .list_rules(&principal.project, &filter)
        .await?
        .into_iter()
        .map(|rule| {
            let id = rule.id.clone();
            (rule, id)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FiringParams {
    device_id: Option<String>,
    severity: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /api/v1/alerts`: what fires now in the key's project.
async fn firing(
    state: web::Data<State>,
    key: ApiKey,
    Query(params): Query<FiringParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let limit = crate::routes::devices::parse_limit(params.limit.as_deref())?;
    // An id no device can have is a bad query, not an empty list.
    if let Some(device_id) = params.device_id.as_deref() {
        fieldline_common::ids::DeviceId::parse(device_id)?;
    }
    let severity = params
        .severity
        .as_deref()
        .map(|name| {
            Severity::from_name(name).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "severity: one of info, warning, critical")
            })
        })
        .transpose()?;
    let after = params
        .cursor
        .as_deref()
        .map(decode_cursor::<(String, String)>)
        .transpose()?;
    let filter = FiringFilter {
        device_id: params.device_id.as_deref(),
        severity: severity.map(Severity::as_str),
        after: after.as_ref(),
        limit: limit as i64 + 1,
    };
    let rows: Vec<_> = state
        .repo
        .firing_alerts(&principal.project, &filter)
        .await?
        .into_iter()
        .map(|alert| {
            let position = (alert.rule_id.clone(), alert.device_id.clone());
            (alert, position)
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
    let rule = state
        .repo
        .get_rule(&principal.project, &path)
        .await?
        .ok_or_else(|| rule_not_found(&path))?;
    Ok(envelope::ok(&rule))
}

async fn replace(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<RuleIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    save(&state, &principal.project, &path, body).await
}

/// A JSON merge patch (RFC 7396) of the rule.
async fn patch(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    patch: MergePatch,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let current = state
        .repo
        .get_rule(&principal.project, &path)
        .await?
        .ok_or_else(|| rule_not_found(&path))?;
    let current = serde_json::to_value(current.to_input()).map_err(ApiError::internal)?;
    let input: RuleIn = parse_json_value(patch.apply(current))?;
    save(&state, &principal.project, &path, input).await
}

async fn save(
    state: &State,
    project: &str,
    rule_id: &str,
    body: RuleIn,
) -> Result<HttpResponse, ApiError> {
    let rule = body.parse()?;
    check_target(state, project, &rule).await?;
    let updated = state
        .repo
        .update_rule(project, rule_id, &rule)
        .await?
        .ok_or_else(|| rule_not_found(rule_id))?;
    Ok(envelope::ok(&updated))
}

async fn delete(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    if !state.repo.delete_rule(&principal.project, &path).await? {
        return Err(rule_not_found(&path));
    }
    tracing::info!(rule_id = %path.as_str(), project = %principal.project, by = %principal.id, "alert rule deleted");
    Ok(envelope::no_content())
}
