//! Commands: created with their push in one transaction, handed over, acknowledged, expired.

use chrono::{DateTime, Utc};
use fieldline_common::{ApiError, time::format_rfc3339};
use fieldline_proto::v1::DeviceCommand;
use tokio_postgres::Row;

use super::{Repo, enqueue};
use crate::domain::{commands::CommandOut, rfc3339_opt};

const COMMAND_COLUMNS: &str = "id, project, device_id, name, params, status, created_at, \
                               expires_at, delivered_at, acked_at, detail";

fn command_out(row: &Row) -> CommandOut {
    CommandOut {
        id: row.get("id"),
        device_id: row.get("device_id"),
        name: row.get("name"),
        params: row.get("params"),
        status: row.get("status"),
        created_at: format_rfc3339(&row.get("created_at")),
        expires_at: format_rfc3339(&row.get("expires_at")),
        delivered_at: rfc3339_opt(row.get("delivered_at")),
        acked_at: rfc3339_opt(row.get("acked_at")),
        detail: row.get("detail"),
    }
}

fn command_proto(row: &Row) -> DeviceCommand {
    let params: serde_json::Value = row.get("params");
    let expires_at: DateTime<Utc> = row.get("expires_at");
    DeviceCommand {
        id: row.get("id"),
        project: row.get("project"),
        device_id: row.get("device_id"),
        kind: "command".to_owned(),
        name: row.get("name"),
        params_json: params.to_string(),
        expires_at_us: expires_at.timestamp_micros(),
        version: 0,
    }
}

/// A command fetched over HTTP but not acknowledged is offered again after this long: the
/// answer may have been lost on its way to the device (delivery is at least once).
pub const HTTP_REDELIVERY_AFTER_S: i64 = 30;

/// Filters and keyset position of a command listing.
pub struct CommandFilter<'a> {
    pub status: Option<&'a str>,
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

/// What a device's report did to its command.
pub enum Reported {
    NotFound,
    /// The command's status after the report.
    Status(String),
}

impl Repo {
    /// Stores a command for an existing device and queues its push; `None` when there is no
    /// such device.
    pub async fn create_command(
        &self,
        project: &str,
        device_id: &str,
        command_id: &str,
        name: &str,
        params: &serde_json::Value,
        ttl_s: i64,
    ) -> Result<Option<CommandOut>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "INSERT INTO registry.commands (id, project, device_id, name, params, expires_at)
                     SELECT $1, project, id, $3, $4, now() + make_interval(secs => $5)
                     FROM registry.devices WHERE project = $2 AND id = $6
                     RETURNING {COMMAND_COLUMNS}"
                ),
                &[&command_id, &project, &name, params, &(ttl_s as f64), &device_id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        enqueue(&tx, &[self.messages.command_push(&command_proto(&row))]).await?;
        tx.commit().await?;
        Ok(Some(command_out(&row)))
    }

    pub async fn list_commands(
        &self,
        project: &str,
        device_id: &str,
        filter: &CommandFilter<'_>,
    ) -> Result<Vec<(CommandOut, DateTime<Utc>)>, ApiError> {
        let client = self.pool.get().await?;
        let (after_time, after_id) = filter.after.clone().unzip();
        let rows = client
            .query(
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM registry.commands
                     WHERE project = $1 AND device_id = $2
                       AND ($3::text IS NULL OR status = $3)
                       AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
                     ORDER BY created_at DESC, id DESC LIMIT $6"
                ),
                &[
                    &project,
                    &device_id,
                    &filter.status,
                    &after_time,
                    &after_id,
                    &filter.limit,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (command_out(row), row.get("created_at")))
            .collect())
    }

    pub async fn get_command(
        &self,
        project: &str,
        device_id: &str,
        command_id: &str,
    ) -> Result<Option<CommandOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM registry.commands
                     WHERE project = $1 AND device_id = $2 AND id = $3"
                ),
                &[&project, &device_id, &command_id],
            )
            .await?;
        Ok(row.as_ref().map(command_out))
    }

    /// The live commands an HTTP device has not fetched yet, or fetched more than
    /// [`HTTP_REDELIVERY_AFTER_S`] ago without acknowledging them (the response may never have
    /// reached it), oldest first, marked fetched and delivered in the same statement.
    pub async fn fetch_commands_for_http(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Vec<DeviceCommand>, ApiError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "UPDATE registry.commands SET
                       http_fetched_at = now(),
                       status = CASE WHEN status = 'pending' THEN 'delivered' ELSE status END,
                       delivered_at = coalesce(delivered_at, now())
                     WHERE project = $1 AND device_id = $2
                       AND (http_fetched_at IS NULL
                            OR http_fetched_at < now() - make_interval(secs => $3))
                       AND status IN ('pending', 'delivered') AND expires_at > now()
                     RETURNING {COMMAND_COLUMNS}"
                ),
                &[&project, &device_id, &(HTTP_REDELIVERY_AFTER_S as f64)],
            )
            .await?;
        let mut commands: Vec<(DateTime<Utc>, DeviceCommand)> = rows
            .iter()
            .map(|row| (row.get("created_at"), command_proto(row)))
            .collect();
        commands.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(commands.into_iter().map(|(_, command)| command).collect())
    }

    /// Applies an edge's `delivered` or a device's `ok` / `error`. An expired command stays
    /// expired, an acknowledged one keeps its first acknowledgement (reports are retried).
    pub async fn report_command(
        &self,
        project: &str,
        device_id: &str,
        command_id: &str,
        status: &str,
        detail: Option<&str>,
    ) -> Result<Reported, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT status, expires_at <= now() FROM registry.commands
                 WHERE project = $1 AND device_id = $2 AND id = $3 FOR UPDATE",
                &[&project, &device_id, &command_id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Reported::NotFound);
        };
        let current: String = row.get(0);
        let past_ttl: bool = row.get(1);
        let live = matches!(current.as_str(), "pending" | "delivered");
        let next = match status {
            _ if !live => current,
            _ if past_ttl => "expired".to_owned(),
            "delivered" => "delivered".to_owned(),
            "ok" => "acked".to_owned(),
            _ => "failed".to_owned(),
        };
        tx.execute(
            "UPDATE registry.commands SET
               status = $4,
               delivered_at = CASE WHEN $4 IN ('delivered', 'acked', 'failed')
                                   THEN coalesce(delivered_at, now()) ELSE delivered_at END,
               acked_at = CASE WHEN $4 IN ('acked', 'failed') THEN coalesce(acked_at, now()) ELSE acked_at END,
               detail = CASE WHEN $4 IN ('acked', 'failed') AND acked_at IS NULL THEN $5 ELSE detail END
             WHERE project = $1 AND device_id = $2 AND id = $3",
            &[&project, &device_id, &command_id, &next, &detail],
        )
        .await?;
        tx.commit().await?;
        Ok(Reported::Status(next))
    }

    /// Marks commands past their TTL expired; returns how many.
    pub async fn expire_commands(&self) -> Result<u64, ApiError> {
        let client = self.pool.get().await?;
        let expired = client
            .execute(
                "UPDATE registry.commands SET status = 'expired'
                 WHERE status IN ('pending', 'delivered') AND expires_at <= now()",
                &[],
            )
            .await?;
        Ok(expired)
    }
}
