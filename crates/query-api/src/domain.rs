//! Query parameters, parsed once: past here, a range, an order and a metric list are valid.

use chrono::{DateTime, Utc};
use fieldline_common::{ApiError, time::parse_time_param};
use serde::{Deserialize, Serialize};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;
const MAX_METRICS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// `GET /api/v1/devices/{id}/readings` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingsParams {
    pub metric: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub order: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `GET /api/v1/devices/{id}/readings/latest` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatestParams {
    pub metric: Option<String>,
}

/// A validated history query.
#[derive(Debug)]
pub struct ReadingsQuery {
    pub metrics: Option<Vec<String>>,
    /// Inclusive.
    pub start: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end: Option<DateTime<Utc>>,
    pub order: Order,
    pub limit: usize,
    pub after: Option<Position>,
}

/// Keyset position in a listing: the last row returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub ts_us: i64,
    pub metric: String,
}

fn bad(parameter: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_query", format!("{parameter}: {message}"))
}

/// `metric=a,b`: 1 to 50 names of `[A-Za-z0-9_.-]`.
pub fn parse_metrics(value: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let metrics: Vec<String> = value.split(',').map(|m| m.trim().to_owned()).collect();
    if metrics.len() > MAX_METRICS {
        return Err(bad("metric", format!("at most {MAX_METRICS} metrics")));
    }
    for metric in &metrics {
        let valid = !metric.is_empty()
            && metric.len() <= 128
            && metric
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(bad("metric", format!("{metric:?} is not a metric name")));
        }
    }
    Ok(Some(metrics))
}

impl ReadingsParams {
    pub fn parse(self, now: DateTime<Utc>) -> Result<ReadingsQuery, ApiError> {
        let start = self
            .start
            .as_deref()
            .map(|v| parse_time_param(v, now).map_err(|e| bad("start", e)))
            .transpose()?;
        let end = self
            .end
            .as_deref()
            .map(|v| parse_time_param(v, now).map_err(|e| bad("end", e)))
            .transpose()?;
        if let (Some(start), Some(end)) = (start, end)
            && start > end
        {
            return Err(bad("start", "must not be after end"));
        }
        let order = match self.order.as_deref() {
            None | Some("asc") => Order::Asc,
            Some("desc") => Order::Desc,
            Some(other) => return Err(bad("order", format!("{other:?} is not asc or desc"))),
        };
        let limit = fieldline_common::envelope::parse_limit(
            self.limit.as_deref(),
            DEFAULT_LIMIT,
            MAX_LIMIT,
        )?;
        let after = self
            .cursor
            .as_deref()
            .map(fieldline_common::envelope::decode_cursor::<Position>)
            .transpose()?;
        Ok(ReadingsQuery {
            metrics: parse_metrics(self.metric.as_deref())?,
            start,
            end,
            order,
            limit,
            after,
        })
    }
}

/// One stored reading as the API shows it.
#[derive(Debug, Serialize)]
pub struct ReadingOut {
    pub metric: String,
    pub ts: String,
    pub value: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Result<ReadingsQuery, ApiError> {
        let params: ReadingsParams = serde_urlencoded_like(query);
        params.parse(Utc::now())
    }

    fn serde_urlencoded_like(query: &str) -> ReadingsParams {
        let map: serde_json::Map<String, serde_json::Value> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap();
                (key.to_owned(), serde_json::Value::String(value.to_owned()))
            })
            .collect();
        serde_json::from_value(serde_json::Value::Object(map)).unwrap()
    }

    #[test]
    fn every_bad_parameter_is_named() {
        for (query, parameter) in [
            ("start=yesterday", "start:"),
            ("end=x", "end:"),
            ("order=up", "order:"),
            ("limit=0", "limit:"),
            ("limit=10001", "limit:"),
            ("limit=ten", "limit:"),
            ("metric=a,,b", "metric:"),
            ("metric=a b", "metric:"),
            (
                "start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
                "start:",
            ),
        ] {
            let error = params(query).unwrap_err();
            assert!(
                error.message.starts_with(parameter),
                "{query}: {}",
                error.message
            );
        }
        let error = params("cursor=zzz").unwrap_err();
        assert_eq!(error.reason, "invalid_cursor");
    }

    #[test]
    fn defaults() {
        let query = params("").unwrap();
        assert_eq!(query.limit, DEFAULT_LIMIT);
        assert_eq!(query.order, Order::Asc);
        assert!(query.metrics.is_none() && query.start.is_none() && query.end.is_none());
    }
}
