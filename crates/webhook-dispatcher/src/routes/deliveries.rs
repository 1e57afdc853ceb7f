//! Delivery logs, retry, recover and test.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self, decode_cursor},
    extract::{Json, Query},
    ids::random_id,
    time::{format_rfc3339, parse_time_param},
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    State,
    domain::{EventBody, TEST_EVENT},
    routes::webhooks::{not_found, parse_limit},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/webhooks/{id}/deliveries").route(web::get().to(list)))
        .service(web::resource("/api/v1/webhooks/{id}/recover").route(web::post().to(recover)))
        .service(web::resource("/api/v1/webhooks/{id}/test").route(web::post().to(test)))
        .service(web::resource("/api/v1/deliveries/{id}/retry").route(web::post().to(retry)));
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
    let status = match params.status.as_deref() {
        None => None,
        Some(status @ ("pending" | "succeeded" | "failed")) => Some(status),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("status: {other:?} is not pending, succeeded or failed"),
            ));
        }
    };
    let limit = parse_limit(params.limit.as_deref())?;
    let after = params
        .cursor
        .as_deref()
        .map(decode_cursor::<(DateTime<Utc>, String)>)
        .transpose()?;
    if state
        .repo
        .get_webhook(&principal.project, &path)
        .await?
        .is_none()
    {
        return Err(not_found(&path));
    }
    let rows = state
        .repo
        .deliveries(&principal.project, &path, status, after, limit as i64 + 1)
        .await?;
    let rows: Vec<_> = rows
        .into_iter()
        .map(|(delivery, created_at)| {
            let position = (created_at, delivery.id.clone());
            (delivery, position)
        })
        .collect();
    Ok(envelope::keyset_page(rows, limit))
}

async fn retry(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let delivery = state
        .repo
        .retry_delivery(&principal.project, &path)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("delivery_not_found", format!("delivery {path} not found"))
        })?;
    state.dispatcher.wake();
    Ok(envelope::accepted(&delivery))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverIn {
    /// The failed deliveries created from then on: RFC 3339, epoch ms, `now` or relative.
    #[schema(example = "-24h")]
    since: String,
    /// Up to then (exclusive); now when left out.
    until: Option<String>,
}

async fn recover(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Json(body): Json<RecoverIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let now = Utc::now();
    let since = parse_time_param(&body.since, now)
        .map_err(|e| ApiError::bad_request("invalid_field", format!("since: {e}")))?;
    let until = body
        .until
        .as_deref()
        .map(|until| {
            parse_time_param(until, now)
                .map_err(|e| ApiError::bad_request("invalid_field", format!("until: {e}")))
        })
        .transpose()?;
    if until.is_some_and(|until| until <= since) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "until: must be after since",
        ));
    }
    if state
        .repo
        .get_webhook(&principal.project, &path)
        .await?
        .is_none()
    {
        return Err(not_found(&path));
    }
    let requeued = state
        .repo
        .recover(&principal.project, &path, since, until)
        .await?;
    state.dispatcher.wake();
    tracing::info!(webhook_id = %path.as_str(), requeued, "failed deliveries requeued");
    Ok(envelope::accepted(&Requeued { requeued }))
}

/// Sends a `webhook.test` event now and answers with the attempt.
async fn test(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    if state
        .repo
        .get_webhook(&principal.project, &path)
        .await?
        .is_none()
    {
        return Err(not_found(&path));
    }
    let event_id = random_id("evt_", 24);
    let delivery_id = random_id("dlv_", 24);
    let payload = json!({"message": "test event from Fieldline"});
    let body = EventBody {
        id: &event_id,
        event: TEST_EVENT,
        timestamp: format_rfc3339(&Utc::now()),
        project: &principal.project,
        device_id: None,
        payload: &payload,
    }
    .to_json();
    state
        .repo
        .create_test_delivery(&principal.project, &path, &event_id, &delivery_id, &body)
        .await?;
    let claimed = state
        .repo
        .claim_one(&delivery_id, state.context.config.webhook_timeout * 2)
        .await?
        .ok_or_else(|| not_found(&path))?;
    let attempt = state.dispatcher.attempt(&claimed).await?;
    Ok(envelope::ok(&Tested {
        delivery_id,
        event_id,
        attempt: TestAttempt {
            attempted_at: format_rfc3339(&attempt.attempted_at),
            status_code: attempt.status_code,
            latency_ms: attempt.latency_ms,
            error: attempt.error,
            response: attempt.snippet,
        },
    }))
}

/// How many failed deliveries went back to the queue.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Requeued {
    pub requeued: u64,
}

/// A test delivery and its one attempt.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Tested {
    pub delivery_id: String,
    pub event_id: String,
    pub attempt: TestAttempt,
}

/// What the receiver made of a test event.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TestAttempt {
    pub attempted_at: String,
    /// The receiver's status; null when it could not be reached.
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    /// The first bytes of the receiver's answer.
    pub response: Option<String>,
}
