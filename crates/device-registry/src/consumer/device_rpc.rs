//! The RPCs the ingest edges ask on behalf of a device: its configuration, its commands, and
//! reports on those commands. A registry that cannot reach Postgres stays silent, so the edge
//! times out and answers 503 rather than a wrong "not found"; a report it cannot store (a
//! value Postgres refuses) is answered as invalid, so the edge answers 400 at once.

use std::future::Future;

use fieldline_common::{Context, error::ErrorKind};
use fieldline_proto::v1::{
    CommandReport, CommandReportResponse, CommandsFetchRequest, CommandsFetchResponse,
    ConfigRequest, ConfigResponse,
};
use futures::StreamExt;
use prost::Message;

use super::{CONCURRENCY, QUEUE_GROUP};
use crate::repo::{Repo, commands::Reported};

pub async fn start(context: &Context, repo: Repo) -> anyhow::Result<()> {
    let config_repo = repo.clone();
    respond(
        context,
        context.subjects.rpc_device_config(),
        move |request: ConfigRequest| {
            let repo = config_repo.clone();
            async move {
                let found = repo
                    .get_config(&request.project, &request.device_id)
                    .await
                    .ok()?;
                Some(match found {
                    Some((version, config, updated_at)) => ConfigResponse {
                        found: true,
                        version,
                        config_json: config.to_string(),
                        updated_at_us: updated_at.map(|t| t.timestamp_micros()).unwrap_or(0),
                    },
                    None => ConfigResponse::default(),
                })
            }
        },
    )
    .await?;

    let fetch_repo = repo.clone();
    respond(
        context,
        context.subjects.rpc_commands_fetch(),
        move |request: CommandsFetchRequest| {
            let repo = fetch_repo.clone();
            async move {
                let commands = repo
                    .fetch_commands_for_http(&request.project, &request.device_id)
                    .await
                    .ok()?;
                Some(CommandsFetchResponse { commands })
            }
        },
    )
    .await?;

    respond(
        context,
        context.subjects.rpc_commands_report(),
        move |report: CommandReport| {
            let repo = repo.clone();
            async move {
                if !matches!(report.status.as_str(), "delivered" | "ok" | "error") {
                    return Some(CommandReportResponse::default());
                }
                let detail: String = report.detail.chars().take(1024).collect();
                let reported = match repo
                    .report_command(
                        &report.project,
                        &report.device_id,
                        &report.command_id,
                        &report.status,
                        (!detail.is_empty()).then_some(detail.as_str()),
                    )
                    .await
                {
                    Ok(reported) => reported,
                    // A value Postgres refuses: the report is bad, not the database down.
                    Err(error) if error.kind == ErrorKind::BadRequest => {
                        return Some(CommandReportResponse {
                            invalid: error.message,
                            ..CommandReportResponse::default()
                        });
                    }
                    Err(_) => return None,
                };
                if report.status != "delivered" {
                    tracing::info!(
                        project = %report.project,
                        device_id = %report.device_id,
                        command_id = %report.command_id,
                        status = %report.status,
                        via = %report.via,
                        "command acknowledged by device"
                    );
                }
                Some(match reported {
                    Reported::NotFound => CommandReportResponse::default(),
                    Reported::Status(status) => CommandReportResponse {
                        found: true,
                        status,
                        ..CommandReportResponse::default()
                    },
                })
            }
        },
    )
    .await
}

/// Answers `subject` in the registry's queue group with `handle`; `None` means no answer.
async fn respond<Req, Resp, F, Fut>(
    context: &Context,
    subject: String,
    handle: F,
) -> anyhow::Result<()>
where
    Req: Message + Default + 'static,
    Resp: Message + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Resp>> + Send + 'static,
{
    let subscription = context
        .nats
        .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
        .await?;
    context.nats.flush().await?;
    let nats = context.nats.clone();
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        subscription
            .take_until(shutdown.cancelled_owned())
            .for_each_concurrent(CONCURRENCY, |message| {
                let nats = nats.clone();
                let handled = Req::decode(message.payload.as_ref()).ok().map(&handle);
                let subject = subject.clone();
                async move {
                    let (Some(reply), Some(handled)) = (message.reply, handled) else {
                        return;
                    };
                    let Some(response) = handled.await else {
                        return;
                    };
                    if let Err(error) = nats.publish(reply, response.encode_to_vec().into()).await {
                        tracing::warn!(error = %error, subject = %subject, "could not answer rpc");
                    }
                }
            })
            .await;
    });
    Ok(())
}
