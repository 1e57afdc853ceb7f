//! Alert rules: create, list, read, replace, delete.

use fieldline_common::{ApiError, time::format_rfc3339};
use tokio_postgres::Row;

use super::Repo;
use crate::domain::alerts::{NewRule, Op, RuleOut, Severity};

const RULE_COLUMNS: &str = "id, name, device_id, device_group, metric, op, threshold, \
                            clear_threshold, for_s, severity, enabled, created_at, updated_at";

fn severity_from_db(value: &str) -> Severity {
    match value {
        "info" => Severity::Info,
        "critical" => Severity::Critical,
        _ => Severity::Warning,
    }
}

fn rule_out(row: &Row) -> RuleOut {
    RuleOut {
        id: row.get("id"),
        name: row.get("name"),
        device_id: row.get("device_id"),
        group: row.get("device_group"),
        metric: row.get("metric"),
        op: Op::from_db(row.get("op")),
        threshold: row.get("threshold"),
        clear_threshold: row.get("clear_threshold"),
        for_s: row.get("for_s"),
        severity: severity_from_db(row.get("severity")),
        enabled: row.get("enabled"),
        created_at: format_rfc3339(&row.get("created_at")),
        updated_at: format_rfc3339(&row.get("updated_at")),
    }
}

/// An alert firing now: one rule's state for one device.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct FiringAlert {
    pub rule_id: String,
    pub rule_name: String,
    pub severity: String,
    pub device_id: String,
    pub metric: String,
    pub op: String,
    pub threshold: f64,
    pub clear_threshold: Option<f64>,
    /// The reading that last evaluated the rule.
    pub value: Option<f64>,
    pub ts: Option<String>,
    /// When it started firing.
    pub since: String,
}

/// Filters and keyset position of the alerts firing now.
pub struct FiringFilter<'a> {
    pub device_id: Option<&'a str>,
    pub severity: Option<&'a str>,
    pub after: Option<&'a (String, String)>,
    pub limit: i64,
}

/// Filters and keyset position of a rule listing.
pub struct RuleFilter<'a> {
    pub device_id: Option<&'a str>,
    pub group: Option<&'a str>,
    pub metric: Option<&'a str>,
    pub after_id: Option<&'a str>,
    pub limit: i64,
}

impl Repo {
    /// Does the project have this device (rules may only watch devices of their project).
    pub async fn device_exists(&self, project: &str, device_id: &str) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM registry.devices WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        Ok(row.is_some())
    }

    pub async fn create_rule(
        &self,
        project: &str,
        rule_id: &str,
        rule: &NewRule,
    ) -> Result<RuleOut, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO registry.alert_rules
                       (id, project, name, device_id, device_group, metric, op, threshold,
                        clear_threshold, for_s, severity, enabled)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     RETURNING {RULE_COLUMNS}"
                ),
                &[
                    &rule_id,
                    &project,
                    &rule.name,
                    &rule.device_id,
                    &rule.group,
                    &rule.metric,
                    &rule.op.as_str(),
                    &rule.threshold,
                    &rule.clear_threshold,
                    &rule.for_s,
                    &rule.severity.as_str(),
                    &rule.enabled,
                ],
            )
            .await?;
        Ok(rule_out(&row))
    }

    /// Replaces a rule. Its per-device states are kept when only its name, severity or
    /// enabled flag changed, and reset otherwise (a new condition starts from `ok`).
    pub async fn update_rule(
        &self,
        project: &str,
        rule_id: &str,
        rule: &NewRule,
    ) -> Result<Option<RuleOut>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "WITH old AS (
                       SELECT device_id, device_group, metric, op, threshold, clear_threshold, for_s
                       FROM registry.alert_rules WHERE project = $2 AND id = $1 FOR UPDATE
                     )
                     UPDATE registry.alert_rules r SET
                       name = $3, device_id = $4, device_group = $5, metric = $6, op = $7,
                       threshold = $8, clear_threshold = $9, for_s = $10, severity = $11,
                       enabled = $12, updated_at = now()
                     FROM old
                     WHERE r.project = $2 AND r.id = $1
                     RETURNING {cols},
                       (old.device_id, old.device_group, old.metric, old.op, old.threshold,
                        old.clear_threshold, old.for_s)
                       IS DISTINCT FROM
                       (r.device_id, r.device_group, r.metric, r.op, r.threshold,
                        r.clear_threshold, r.for_s) AS condition_changed",
                    cols = RULE_COLUMNS
                        .split(", ")
                        .map(|column| format!("r.{column}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &[
                    &rule_id,
                    &project,
                    &rule.name,
                    &rule.device_id,
                    &rule.group,
                    &rule.metric,
                    &rule.op.as_str(),
                    &rule.threshold,
                    &rule.clear_threshold,
                    &rule.for_s,
                    &rule.severity.as_str(),
                    &rule.enabled,
                ],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if row.get::<_, bool>("condition_changed") {
            tx.execute(
                "DELETE FROM registry.alert_states WHERE rule_id = $1",
                &[&rule_id],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(rule_out(&row)))
    }

    pub async fn get_rule(
        &self,
        project: &str,
        rule_id: &str,
    ) -> Result<Option<RuleOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {RULE_COLUMNS} FROM registry.alert_rules WHERE project = $1 AND id = $2"
                ),
                &[&project, &rule_id],
            )
            .await?;
        Ok(row.as_ref().map(rule_out))
    }

    pub async fn list_rules(
        &self,
        project: &str,
        filter: &RuleFilter<'_>,
    ) -> Result<Vec<RuleOut>, ApiError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {RULE_COLUMNS} FROM registry.alert_rules
                     WHERE project = $1
                       AND ($2::text IS NULL OR device_id = $2)
                       AND ($3::text IS NULL OR device_group = $3)
                       AND ($4::text IS NULL OR metric = $4)
                       AND ($5::text IS NULL OR id > $5)
                     ORDER BY id LIMIT $6"
                ),
                &[
                    &project,
                    &filter.device_id,
                    &filter.group,
                    &filter.metric,
                    &filter.after_id,
                    &filter.limit,
                ],
            )
            .await?;
        Ok(rows.iter().map(rule_out).collect())
    }

    pub async fn delete_rule(&self, project: &str, rule_id: &str) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let deleted = client
            .execute(
                "DELETE FROM registry.alert_rules WHERE project = $1 AND id = $2",
                &[&project, &rule_id],
            )
            .await?;
        Ok(deleted == 1)
    }

    /// The project's alerts firing now, by rule then device.
    pub async fn firing_alerts(
        &self,
        project: &str,
        filter: &FiringFilter<'_>,
    ) -> Result<Vec<FiringAlert>, ApiError> {
        let client = self.pool.get().await?;
        let (after_rule, after_device) = filter
            .after
            .map(|(rule, device)| (Some(rule.as_str()), Some(device.as_str())))
            .unwrap_or((None, None));
        let rows = client
            .query(
                "SELECT s.rule_id, r.name, r.severity, s.device_id, r.metric, r.op, r.threshold,
                        r.clear_threshold, s.last_value, s.last_ts, s.changed_at
                 FROM registry.alert_states s
                 JOIN registry.alert_rules r ON r.id = s.rule_id
                 WHERE s.project = $1 AND r.project = $1 AND s.state = 'firing' AND r.enabled
                   AND ($2::text IS NULL OR s.device_id = $2)
                   AND ($3::text IS NULL OR r.severity = $3)
                   AND ($4::text IS NULL OR (s.rule_id, s.device_id) > ($4, $5::text))
                 ORDER BY s.rule_id, s.device_id LIMIT $6",
                &[
                    &project,
                    &filter.device_id,
                    &filter.severity,
                    &after_rule,
                    &after_device,
                    &filter.limit,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| FiringAlert {
                rule_id: row.get(0),
                rule_name: row.get(1),
                severity: row.get(2),
                device_id: row.get(3),
                metric: row.get(4),
                op: row.get(5),
                threshold: row.get(6),
                clear_threshold: row.get(7),
                value: row.get(8),
                ts: row
                    .get::<_, Option<chrono::DateTime<chrono::Utc>>>(9)
                    .as_ref()
                    .map(format_rfc3339),
                since: format_rfc3339(&row.get(10)),
            })
            .collect())
    }
}
