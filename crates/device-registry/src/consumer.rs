//! The registry's bus loops: the auth RPC (`{prefix}.rpc.auth.verify`) and the device lookup
//! RPC (`{prefix}.rpc.auth.device`), answered by every registry instance in one queue group;
//! the device RPCs of the ingest edges ([`device_rpc`]); device state from telemetry
//! ([`state`]).

pub mod device_rpc;
pub mod state;

use fieldline_common::{Context, ratelimit::Limit, time::now_us};
use fieldline_proto::v1::{
    AuthError, DeviceLookupRequest, DeviceLookupResponse, Principal, PrincipalKind, VerifyRequest,
    VerifyResponse, verify_response,
};
use futures::StreamExt;
use prost::Message;

use crate::repo::{Credential, Repo};

pub(crate) const QUEUE_GROUP: &str = "device-registry";
/// Requests answered at once per instance; more wait in the subscription's buffer.
pub(crate) const CONCURRENCY: usize = 64;

/// Subscribes both RPCs; returns once the server has the subscriptions, so a caller that
/// starts after this never sees "no responders" from a registry that is up.
pub async fn start_rpc(context: &Context, repo: Repo) -> anyhow::Result<()> {
    let verify_subscription = context
        .nats
        .queue_subscribe(context.subjects.rpc_auth_verify(), QUEUE_GROUP.into())
        .await?;
    let lookup = context
        .nats
        .queue_subscribe(context.subjects.rpc_auth_device(), QUEUE_GROUP.into())
        .await?;
    context.nats.flush().await?;

    let nats = context.nats.clone();
    let verify_repo = repo.clone();
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        verify_subscription
            .take_until(shutdown.cancelled_owned())
            .for_each_concurrent(CONCURRENCY, |message| {
                let nats = nats.clone();
                let repo = verify_repo.clone();
                async move {
                    let Some(reply) = message.reply else { return };
                    let response = match VerifyRequest::decode(message.payload.as_ref()) {
                        Ok(request) => verify(&repo, &request).await,
                        Err(_) => error_response("unknown"),
                    };
                    if let Err(error) = nats.publish(reply, response.encode_to_vec().into()).await {
                        tracing::warn!(error = %error, "could not answer auth rpc");
                    }
                }
            })
            .await;
    });

    let nats = context.nats.clone();
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        lookup
            .take_until(shutdown.cancelled_owned())
            .for_each_concurrent(CONCURRENCY, |message| {
                let nats = nats.clone();
                let repo = repo.clone();
                async move {
                    let Some(reply) = message.reply else { return };
                    let Ok(request) = DeviceLookupRequest::decode(message.payload.as_ref()) else {
                        return;
                    };
                    let found = repo
                        .device_summary(&request.project, &request.device_id)
                        .await;
                    let response = match found {
                        Ok(Some((device_type, group, tags))) => {
                            let Ok(limits) = repo.project_limits(&request.project).await else {
                                return;
                            };
                            DeviceLookupResponse {
                                found: true,
                                device_type,
                                group: group.unwrap_or_default(),
                                rate_limit: limits
                                    .and_then(|limits| limits.device)
                                    .map(Limit::to_proto),
                                tags,
                            }
                        }
                        Ok(None) => DeviceLookupResponse::default(),
                        // No answer: the caller times out and answers 503, rather than
                        // wrongly treating the device as unknown.
                        Err(_) => return,
                    };
                    if let Err(error) = nats.publish(reply, response.encode_to_vec().into()).await {
                        tracing::warn!(error = %error, "could not answer device lookup rpc");
                    }
                }
            })
            .await;
    });
    Ok(())
}

fn error_response(reason: &str) -> VerifyResponse {
    VerifyResponse {
        result: Some(verify_response::Result::Error(AuthError {
            reason: reason.to_owned(),
        })),
    }
}

/// The decision of the auth RPC, from the secret's SHA-256 (as stored): the secret itself
/// never reaches the registry over the bus.
async fn verify(repo: &Repo, request: &VerifyRequest) -> VerifyResponse {
    if request.secret_sha256.len() != 32 {
        return error_response("unknown");
    }
    let is_device_token = match request.kind() {
        PrincipalKind::Device => true,
        PrincipalKind::ApiKey => false,
        PrincipalKind::Unspecified => return error_response("unknown"),
    };
    let credential = match repo
        .find_credential(&request.secret_sha256, is_device_token)
        .await
    {
        Ok(Some(credential)) => credential,
        Ok(None) => return error_response("unknown"),
        Err(_) => return error_response("internal"),
    };
    let principal = match credential {
        Credential::Device { id, project } => {
            let Ok(limits) = repo.project_limits(&project).await else {
                return error_response("internal");
            };
            Principal {
                kind: PrincipalKind::Device.into(),
                rate_limit: limits.and_then(|limits| limits.device).map(Limit::to_proto),
                project,
                id,
                ..Default::default()
            }
        }
        Credential::ApiKey {
            id,
            project,
            scope,
            platform_admin,
            expires_at,
            revoked,
        } => {
            if revoked {
                tracing::info!(key_id = %id, project = %project, "revoked key refused");
                return error_response("revoked");
            }
            let expires_at_us = expires_at.map(|time| time.timestamp_micros()).unwrap_or(0);
            if expires_at_us != 0 && expires_at_us <= now_us() {
                return error_response("expired");
            }
            let Ok(limits) = repo.project_limits(&project).await else {
                return error_response("internal");
            };
            tracing::info!(key_id = %id, project = %project, "key used");
            let touch_repo = repo.clone();
            let touch_id = id.clone();
            tokio::spawn(async move {
                let _ = touch_repo.touch_key(&touch_id).await;
            });
            Principal {
                kind: PrincipalKind::ApiKey.into(),
                project,
                id,
                scope: scope.to_proto().into(),
                platform_admin,
                expires_at_us,
                rate_limit: limits
                    .and_then(|limits| limits.api_key)
                    .map(Limit::to_proto),
            }
        }
    };
    VerifyResponse {
        result: Some(verify_response::Result::Principal(principal)),
    }
}
