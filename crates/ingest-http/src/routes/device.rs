//! What a device asks for with its token: `GET /api/v1/ingest/config`,
//! `GET /api/v1/ingest/commands?wait=N` (long-poll) and
//! `POST /api/v1/ingest/commands/{id}/ack`. The registry answers over the bus; no answer in
//! time is a 503. A process holds at most `long_poll_max` long-polls; past them a long-poll
//! is a 503 at once.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use fieldline_common::{
    ApiError, ErrorKind,
    auth::DeviceToken,
    bus::rpc,
    commands::{CommandAckIn, MAX_COMMAND_ID_LEN, command_json, config_json},
    envelope,
    extract::{Json, Query},
};
use fieldline_proto::v1::{
    CommandReport, CommandReportResponse, CommandsFetchRequest, CommandsFetchResponse,
    ConfigRequest, ConfigResponse,
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use crate::State;

/// Longest long-poll, in seconds (the gateway's read timeout is longer).
pub const MAX_WAIT_S: u64 = 60;

/// `Retry-After` of a long-poll refused because the process holds `long_poll_max` already:
/// long enough that refused devices do not come straight back as a crowd.
const LONG_POLL_RETRY_AFTER_S: u64 = 5;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/ingest/config").route(web::get().to(config)))
        .service(web::resource("/api/v1/ingest/commands").route(web::get().to(commands)))
        .service(web::resource("/api/v1/ingest/commands/{id}/ack").route(web::post().to(ack)));
}

fn device_gone(device: &DeviceToken) -> ApiError {
    ApiError::not_found(
        "device_not_found",
        format!("device {} not found", device.device_id()),
    )
}

async fn config(state: web::Data<State>, device: DeviceToken) -> Result<HttpResponse, ApiError> {
    let context = &state.context;
    let request = ConfigRequest {
        project: device.project().to_owned(),
        device_id: device.device_id().to_owned(),
    };
    let response: ConfigResponse = rpc(
        &context.nats,
        context.subjects.rpc_device_config(),
        &request,
        context.config.rpc_timeout,
    )
    .await?;
    if !response.found {
        return Err(device_gone(&device));
    }
    Ok(envelope::ok(&config_json(
        response.version,
        &response.config_json,
        response.updated_at_us,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandsParams {
    wait: Option<String>,
}

/// `wait`: whole seconds, 0 to [`MAX_WAIT_S`]; 0 when absent.
fn parse_wait(wait: Option<&str>) -> Result<u64, ApiError> {
    match wait {
        None => Ok(0),
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|seconds| *seconds <= MAX_WAIT_S)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("wait: whole seconds from 0 to {MAX_WAIT_S}"),
                )
            }),
    }
}

/// Asks the registry for the device's live commands not yet handed over HTTP; it marks them
/// delivered before answering.
async fn fetch(state: &State, device: &DeviceToken) -> Result<Vec<Value>, ApiError> {
    let context = &state.context;
    let request = CommandsFetchRequest {
        project: device.project().to_owned(),
        device_id: device.device_id().to_owned(),
    };
    let response: CommandsFetchResponse = rpc(
        &context.nats,
        context.subjects.rpc_commands_fetch(),
        &request,
        context.config.rpc_timeout,
    )
    .await?;
    Ok(response.commands.iter().map(command_json).collect())
}

async fn commands(
    state: web::Data<State>,
    device: DeviceToken,
    Query(params): Query<CommandsParams>,
) -> Result<HttpResponse, ApiError> {
    let wait = parse_wait(params.wait.as_deref())?;
    if wait == 0 {
        return Ok(envelope::ok(&fetch(&state, &device).await?));
    }
    let context = &state.context;
    // Held until the answer: a long-poll past the cap waits for nothing, not even a place.
    let Ok(_place) = state.long_polls.try_acquire() else {
        metrics::counter!("fieldline_ingest_long_polls_refused_total").increment(1);
        return Err(too_many_long_polls(context.config.long_poll_max));
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    // Subscribe before the first fetch, and make sure the server has the subscription: a
    // command stored after that fetch is pushed on this subject after it, so it wakes us.
    let unavailable = |error: &dyn std::fmt::Display| {
        tracing::warn!(error = %error, "long-poll subscription failed");
        ApiError::unavailable("the bus is unavailable; retry")
    };
    let mut pushes = context
        .nats
        .subscribe(
            context
                .subjects
                .commands(device.project(), device.device_id()),
        )
        .await
        .map_err(|error| unavailable(&error))?;
    tokio::time::timeout(context.config.rpc_timeout, context.nats.flush())
        .await
        .map_err(|error| unavailable(&error))?
        .map_err(|error| unavailable(&error))?;
    loop {
        let commands = fetch(&state, &device).await?;
        if !commands.is_empty() {
            return Ok(envelope::ok(&commands));
        }
        let _waiting = Waiting::start();
        // Any push for this device (a config too) is a reason to look again.
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => false,
            _ = context.shutdown.cancelled() => false,
            push = pushes.next() => push.is_some(),
        };
        if !woken {
            return Ok(envelope::ok(&commands));
        }
    }
}

fn too_many_long_polls(max: usize) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "too_many_long_polls",
        format!("this server holds {max} long-polls already; retry later, or ask without wait"),
    )
    .with_retry_after(LONG_POLL_RETRY_AFTER_S)
}

/// Counts long-polls waiting right now (`fieldline_ingest_long_polls_waiting`), also when the
/// client goes away mid-wait (the future is dropped).
struct Waiting;

impl Waiting {
    fn start() -> Self {
        metrics::gauge!("fieldline_ingest_long_polls_waiting").increment(1.0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("fieldline_ingest_long_polls_waiting").decrement(1.0);
    }
}

async fn ack(
    state: web::Data<State>,
    device: DeviceToken,
    path: web::Path<String>,
    Json(body): Json<CommandAckIn>,
) -> Result<HttpResponse, ApiError> {
    let command_id = path.into_inner();
    if command_id.is_empty() || command_id.len() > MAX_COMMAND_ID_LEN {
        return Err(ApiError::bad_request(
            "invalid_path",
            format!("id: 1 to {MAX_COMMAND_ID_LEN} bytes"),
        ));
    }
    body.validate()?;
    let context = &state.context;
    let report = CommandReport {
        project: device.project().to_owned(),
        device_id: device.device_id().to_owned(),
        command_id: command_id.clone(),
        status: body.status.as_str().to_owned(),
        detail: body.detail.unwrap_or_default(),
        via: "http".to_owned(),
    };
    let response: CommandReportResponse = rpc(
        &context.nats,
        context.subjects.rpc_commands_report(),
        &report,
        context.config.rpc_timeout,
    )
    .await?;
    if !response.invalid.is_empty() {
        return Err(ApiError::bad_request("invalid_value", response.invalid));
    }
    if !response.found {
        return Err(ApiError::not_found(
            "command_not_found",
            format!("command {command_id} not found"),
        ));
    }
    if response.status == "expired" {
        return Err(ApiError::conflict(
            "command_expired",
            format!("command {command_id} expired before it was acknowledged"),
        ));
    }
    Ok(envelope::ok(&fieldline_common::commands::CommandAcked {
        id: command_id,
        status: response.status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_0_to_60_seconds() {
        assert_eq!(parse_wait(None).unwrap(), 0);
        assert_eq!(parse_wait(Some("30")).unwrap(), 30);
        for bad in ["61", "-1", "1.5", "soon", ""] {
            let error = parse_wait(Some(bad)).unwrap_err();
            assert!(error.message.starts_with("wait:"), "{bad}: {error}");
        }
    }
}
