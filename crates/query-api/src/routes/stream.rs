//! Live streams: `GET /api/v1/devices/{id}/readings/stream` (a device's new readings) and
//! `GET /api/v1/events/stream` (the project's device status, alert and config events), as
//! Server-Sent Events that resume with `Last-Event-ID` (see `live`).

use actix_web::{HttpRequest, HttpResponse, web};
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    extract::Query,
    time::{format_rfc3339, from_us},
};
use fieldline_proto::{
    Stream,
    v1::{DeviceEvent, TelemetryBatch, reading},
};
use prost::Message as _;
use serde::Deserialize;

use crate::{
    State,
    live::{self, Source},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/devices/{id}/readings/stream").route(web::get().to(readings)),
    )
    .service(web::resource("/api/v1/events/stream").route(web::get().to(events)));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<String>,
    /// Events stream only: comma list of `device.status`, `device.alert`, `config.update`.
    types: Option<String>,
}

async fn readings(
    state: web::Data<State>,
    request: HttpRequest,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<StreamParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    if params.types.is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "types: only the events stream takes it",
        ));
    }
    let after = live::last_event_id(&request, params.last_event_id.as_deref())?;
    let context = &state.context;
    let device_id = context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let slot = state.streams.acquire(context, principal)?;
    // The project's telemetry, not the device's subject alone: under load ingest-mqtt puts
    // several devices in one bus message, on a subject of its own, and one filter (NATS 2.9)
    // must see both. So each stream reads its project's traffic and keeps its device's: the
    // cost of one more stream of a busy project, bounded by `stream_max_per_project`.
    let subjects = context.subjects.clone();
    let own_subject = subjects.telemetry(&principal.project, device_id.as_str());
    let device_id = device_id.as_str().to_owned();
    let source = Source {
        stream: Stream::Telemetry,
        filter_subject: subjects.project_telemetry(&principal.project),
        render: Box::new(move |message| {
            let subject = message.subject.as_str();
            if subject == own_subject {
                // Single-device: `split` gives it back whole, an import's columns as readings.
                let batch = TelemetryBatch::decode(message.payload.as_ref())
                    .ok()?
                    .split()
                    .ok()?
                    .pop()?;
                render_readings(&batch)
            } else if subjects.telemetry_batch_project(subject).is_some() {
                let devices = subjects
                    .telemetry_devices(subject, message.payload.as_ref())
                    .ok()?;
                let mut own = devices
                    .into_iter()
                    .filter(|batch| batch.device_id == device_id);
                let mut batch = own.next()?;
                for more in own {
                    batch.readings.extend(more.readings);
                    batch.received_at_us = batch.received_at_us.max(more.received_at_us);
                }
                render_readings(&batch)
            } else {
                // Another device's own subject.
                None
            }
        }),
    };
    live::respond(context, slot, source, after).await
}

async fn events(
    state: web::Data<State>,
    request: HttpRequest,
    key: ApiKey,
    Query(params): Query<StreamParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let after = live::last_event_id(&request, params.last_event_id.as_deref())?;
    let context = &state.context;
    let types = match params.types.as_deref() {
        None => vec![
            ("device.status", "status"),
            ("device.alert", "alert"),
            ("config.update", "config"),
        ],
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| match name {
                "device.status" => Ok(("device.status", "status")),
                "device.alert" => Ok(("device.alert", "alert")),
                "config.update" => Ok(("config.update", "config")),
                other => Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "types: unknown event type {other:?}; known: device.status, device.alert, config.update"
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let tokens: Vec<&str> = types.iter().map(|(_, token)| *token).collect();
    let wanted: Vec<&'static str> = types.iter().map(|(name, _)| *name).collect();
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "types: name at least one event type",
        ));
    }
    let slot = state.streams.acquire(context, principal)?;
    let source = Source {
        stream: Stream::Events,
        // One type: its own subjects; several: all of the project's, the rest skipped.
        filter_subject: context.subjects.project_events(
            &principal.project,
            match tokens.as_slice() {
                [one] => one,
                _ => "*",
            },
        ),
        render: Box::new(move |message| {
            let (name, data) = render_event(message)?;
            wanted.contains(&name.as_str()).then_some((name, data))
        }),
    };
    live::respond(context, slot, source, after).await
}

/// `event: readings`, `data: {"device_id", "source", "received_at", "readings": [{metric, ts,
/// value}]}`.
fn render_readings(batch: &TelemetryBatch) -> Option<(String, String)> {
    let readings: Vec<_> = batch
        .readings
        .iter()
        .map(|reading| {
            let value = match &reading.value {
                Some(reading::Value::Number(number)) => serde_json::json!(number),
                Some(reading::Value::Boolean(flag)) => serde_json::json!(flag),
                Some(reading::Value::Text(text)) => serde_json::json!(text),
                None => serde_json::Value::Null,
            };
            serde_json::json!({
                "metric": reading.metric,
                "ts": format_rfc3339(&from_us(reading.ts_us)),
                "value": value,
            })
        })
        .collect();
    let data = serde_json::json!({
        "device_id": batch.device_id,
        "source": batch.source,
        "received_at": format_rfc3339(&from_us(batch.received_at_us)),
        "readings": readings,
    });
    Some(("readings".to_owned(), data.to_string()))
}

/// `event: device.status` (or `device.alert`, `config.update`), `data:` the event as webhooks
/// deliver it: `{"id", "type", "device_id", "occurred_at", "payload"}`.
fn render_event(message: &async_nats::jetstream::Message) -> Option<(String, String)> {
    let event = DeviceEvent::decode(message.payload.as_ref()).ok()?;
    let payload: serde_json::Value = serde_json::from_str(&event.payload_json).ok()?;
    let data = serde_json::json!({
        "id": event.id,
        "type": event.event_type,
        "device_id": event.device_id,
        "occurred_at": format_rfc3339(&from_us(event.occurred_at_us)),
        "payload": payload,
    });
    Some((event.event_type, data.to_string()))
}
