//! A project's rate limits: what the platform admin writes, and what a project sees.

use std::time::Duration;

use fieldline_common::{ApiError, ratelimit::Limit};
use serde::{Deserialize, Serialize};

/// Most requests one override allows in its window.
const MAX_REQUESTS: u32 = 1_000_000;
/// Longest window of an override: a day.
const MAX_PERIOD_S: u32 = 86_400;

/// `{"requests": 600, "period_s": 60}`.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitIn {
    #[schema(minimum = 1, maximum = 1000000)]
    pub requests: u32,
    #[schema(minimum = 1, maximum = 86400)]
    pub period_s: u32,
}

/// `PUT /api/v1/projects/{slug}/limits`: each limit, or `null` (or absent) for the platform
/// default.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectLimitsIn {
    #[serde(default)]
    pub api_key: Option<LimitIn>,
    #[serde(default)]
    pub device: Option<LimitIn>,
}

/// A project's overrides; `None` keeps the platform default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectLimits {
    pub api_key: Option<Limit>,
    pub device: Option<Limit>,
}

impl ProjectLimitsIn {
    pub fn parse(self) -> Result<ProjectLimits, ApiError> {
        let parse = |field: &str, limit: Option<LimitIn>| {
            let Some(limit) = limit else {
                return Ok(None);
            };
            if !(1..=MAX_REQUESTS).contains(&limit.requests) {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    format!("{field}.requests: use 1 to {MAX_REQUESTS}"),
                ));
            }
            if !(1..=MAX_PERIOD_S).contains(&limit.period_s) {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    format!("{field}.period_s: use 1 to {MAX_PERIOD_S}"),
                ));
            }
            Limit::new(limit.requests, Duration::from_secs(limit.period_s.into()))
                .map(Some)
                .map_err(|message| {
                    ApiError::bad_request("invalid_field", format!("{field}: {message}"))
                })
        };
        Ok(ProjectLimits {
            api_key: parse("api_key", self.api_key)?,
            device: parse("device", self.device)?,
        })
    }
}

/// One limit as a project sees it, and where it comes from.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitOut {
    pub requests: u32,
    pub period_s: u64,
    /// `project` (its override) or `default` (the platform's FIELDLINE_RATE_*).
    #[schema(value_type = String)]
    pub source: &'static str,
}

/// `GET /api/v1/projects/{slug}/limits` and `GET /api/v1/limits`. Limits hold per instance of
/// a service.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectLimitsOut {
    pub project: String,
    pub api_key: LimitOut,
    pub device: LimitOut,
}

impl LimitOut {
    pub fn new(effective: Limit, project_override: Option<Limit>) -> Self {
        Self {
            requests: effective.requests(),
            period_s: effective.period().as_secs(),
            source: if project_override.is_some() {
                "project"
            } else {
                "default"
            },
        }
    }
}
