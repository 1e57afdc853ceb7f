//! A project's rate limit overrides.

use std::time::Duration;

use fieldline_common::{ApiError, ratelimit::Limit};

use super::Repo;
use crate::domain::limits::ProjectLimits;

fn limit_from_db(requests: Option<i32>, period_ms: Option<i64>) -> Option<Limit> {
    let requests = u32::try_from(requests?).ok()?;
    let period = Duration::from_millis(u64::try_from(period_ms?).ok()?);
    Limit::new(requests, period).ok()
}

fn limit_to_db(limit: Option<Limit>) -> (Option<i32>, Option<i64>) {
    match limit {
        Some(limit) => (
            i32::try_from(limit.requests()).ok(),
            i64::try_from(limit.period().as_millis()).ok(),
        ),
        None => (None, None),
    }
}

impl Repo {
    /// The overrides of `project`; `None` when there is no such project.
    pub async fn project_limits(&self, project: &str) -> Result<Option<ProjectLimits>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT l.key_requests, l.key_period_ms, l.device_requests, l.device_period_ms
                 FROM registry.projects p
                 LEFT JOIN registry.project_limits l ON l.project = p.slug
                 WHERE p.slug = $1",
                &[&project],
            )
            .await?;
        Ok(row.map(|row| ProjectLimits {
            api_key: limit_from_db(row.get(0), row.get(1)),
            device: limit_from_db(row.get(2), row.get(3)),
        }))
    }

    /// Replaces the overrides of `project`; false when there is no such project.
    pub async fn set_project_limits(
        &self,
        project: &str,
        limits: ProjectLimits,
    ) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let (key_requests, key_period_ms) = limit_to_db(limits.api_key);
        let (device_requests, device_period_ms) = limit_to_db(limits.device);
        let row = client
            .query_opt(
                "INSERT INTO registry.project_limits
                     (project, key_requests, key_period_ms, device_requests, device_period_ms)
                 SELECT slug, $2, $3, $4, $5 FROM registry.projects WHERE slug = $1
                 ON CONFLICT (project) DO UPDATE SET
                     key_requests = excluded.key_requests,
                     key_period_ms = excluded.key_period_ms,
                     device_requests = excluded.device_requests,
                     device_period_ms = excluded.device_period_ms,
                     updated_at = now()
                 RETURNING project",
                &[
                    &project,
                    &key_requests,
                    &key_period_ms,
                    &device_requests,
                    &device_period_ms,
                ],
            )
            .await?;
        Ok(row.is_some())
    }
}
