//! `POST /api/v1/ingest` and `POST /api/v1/ingest/heartbeat`.

use actix_web::{HttpRequest, HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::DeviceToken,
    envelope,
    extract::{is_json_content_type, read_body, unsupported_media_type},
    ingest::{self, MAX_MESSAGE_ID_LEN, Parsed, TimeWindow},
    time::now_us,
};

use crate::State;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/ingest").route(web::post().to(ingest)))
        .service(web::resource("/api/v1/ingest/heartbeat").route(web::post().to(heartbeat)));
}

/// The client's `Idempotency-Key`, if it sent a usable one.
pub(crate) fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    static IDEMPOTENCY_KEY: actix_web::http::header::HeaderName =
        actix_web::http::header::HeaderName::from_static("idempotency-key");
    let Some(value) = req.headers().get(&IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.len() <= MAX_MESSAGE_ID_LEN)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("Idempotency-Key: 1 to {MAX_MESSAGE_ID_LEN} visible ASCII characters"),
            )
        })?;
    Ok(Some(key.to_owned()))
}

fn is_senml(req: &HttpRequest) -> bool {
    const SENML: &[u8] = b"application/senml+json";
    req.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .map(|value| value.as_bytes())
        .is_some_and(|value| {
            value.len() >= SENML.len() && value[..SENML.len()].eq_ignore_ascii_case(SENML)
        })
}

async fn ingest(
    state: web::Data<State>,
    device: DeviceToken,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if !is_json_content_type(&req) {
        return Err(unsupported_media_type(
            "application/json or application/senml+json",
        ));
    }
    let config = &state.context.config;
    let key = idempotency_key(&req)?;
    let body = read_body(
        &req,
        &mut payload.into_inner(),
        config.ingest_max_body_bytes,
    )
    .await?;
    let received_at_us = now_us();
    // Live time only: a reading far from now answers 400 naming it, and nothing of the
    // request is published.
    let window = TimeWindow::live(config, received_at_us);
    let mut parsed: Parsed = if is_senml(&req) {
        ingest::parse_senml(&body, received_at_us, config.ingest_max_readings, window)?
    } else {
        ingest::parse_json_message(&body, received_at_us, config.ingest_max_readings, window)?
    };
    // The header wins over a msg_id inside the body.
    if key.is_some() {
        parsed.message_id = key;
    }
    let accepted = parsed.readings.len();
    let duplicate = state
        .publisher
        .readings(
            device.project(),
            device.device_id(),
            parsed,
            received_at_us,
            "http",
        )
        .await?;
    state.readings_counted.increment(accepted as u64);
    if duplicate {
        metrics::counter!("fieldline_ingest_duplicates_total", "source" => "http").increment(1);
    }
    Ok(envelope::accepted(&super::Ingested {
        accepted,
        duplicate,
    }))
}

async fn heartbeat(state: web::Data<State>, device: DeviceToken) -> Result<HttpResponse, ApiError> {
    state
        .publisher
        .heartbeat(device.project(), device.device_id(), now_us(), "http")
        .await?;
    Ok(envelope::no_content())
}
