//! EdgeSense-compatible aliases: `POST /api/webhooks/register`, `GET /api/webhooks`,
//! `DELETE /api/webhooks/{id}`. Same keys, scopes and project isolation as `/api/v1`.

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope,
    extract::Json,
};
use serde::Deserialize;

use crate::{
    State,
    domain::WebhookIn,
    repo::WebhookFilter,
    routes::webhooks::{create_webhook, delete_webhook},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/webhooks/register").route(web::post().to(register)))
        .service(web::resource("/api/webhooks").route(web::get().to(list)))
        .service(web::resource("/api/webhooks/{id}").route(web::delete().to(delete)));
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterIn {
    #[schema(
        pattern = "^https?://",
        example = "https://example.com/hooks/fieldline"
    )]
    url: String,
    #[schema(value_type = Option<Vec<crate::domain::EventType>>, min_items = 1)]
    events: Option<Vec<String>>,
    secret: Option<String>,
}

/// Answers EdgeSense's shape: `{"webhookId": "...", "status": "registered"}`.
async fn register(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<RegisterIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    let webhook = WebhookIn {
        url: body.url,
        events: body.events,
        secret: body.secret,
        ..WebhookIn::default()
    }
    .parse()?;
    let created = create_webhook(&state, &principal.project, webhook).await?;
    Ok(HttpResponse::Created().json(EdgeSenseStatus {
        webhook_id: created.webhook.id,
        status: "registered",
    }))
}

async fn list(state: web::Data<State>, key: ApiKey) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let rows = state
        .repo
        .list_webhooks(&principal.project, &WebhookFilter::default(), None, 1000)
        .await?;
    let webhooks: Vec<_> = rows
        .into_iter()
        .map(|(webhook, _)| EdgeSenseWebhook {
            webhook_id: webhook.id,
            url: webhook.url,
            events: webhook.events,
            enabled: webhook.enabled,
        })
        .collect();
    Ok(envelope::ok(&webhooks))
}

async fn delete(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Admin)?;
    delete_webhook(&state, &principal.project, &path).await?;
    Ok(HttpResponse::Ok().json(EdgeSenseStatus {
        webhook_id: path.into_inner(),
        status: "deleted",
    }))
}

/// EdgeSense's answer to a register or a delete (outside the envelope, as EdgeSense has it).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeSenseStatus {
    pub webhook_id: String,
    /// registered or deleted.
    #[schema(value_type = String)]
    pub status: &'static str,
}

/// A webhook as EdgeSense lists it.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeSenseWebhook {
    pub webhook_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub enabled: bool,
}
