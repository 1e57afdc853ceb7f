//! Query parameters, parsed once: past here, a range, an order and a metric list are valid.

use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    time::{MAX_TIME_US, MIN_TIME_US, parse_time_param},
};
use serde::{Deserialize, Serialize};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;
const MAX_METRICS: usize = 50;
/// Most buckets one series of an aggregate may have (no 1-second buckets over a year).
pub const MAX_BUCKETS: i64 = 10_000;
/// Most devices in one `POST /api/v1/query`.
pub const MAX_DEVICES: usize = 100;
/// Default and largest number of rows (raw readings, or buckets of all series together) that
/// one `POST /api/v1/query` returns; more sets `truncated`.
pub const DEFAULT_QUERY_LIMIT: usize = 1_000;
pub const MAX_QUERY_LIMIT: usize = 10_000;

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
    /// `csv` or `ndjson`: stream every row in range instead of a page.
    pub format: Option<String>,
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    Ndjson,
}

impl ExportFormat {
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        match value {
            "csv" => Ok(Self::Csv),
            "ndjson" => Ok(Self::Ndjson),
            "json" => Err(bad("format", "json is the default: leave format out")),
            other => Err(bad("format", format!("{other:?} is not csv or ndjson"))),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Ndjson => "application/x-ndjson",
        }
    }
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

/// A time range as given: either end may be open.
type Range = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

fn parse_range(
    start: Option<&str>,
    end: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Range, ApiError> {
    let start = start
        .map(|v| parse_time_param(v, now).map_err(|e| bad("start", e)))
        .transpose()?;
    let end = end
        .map(|v| parse_time_param(v, now).map_err(|e| bad("end", e)))
        .transpose()?;
    if let (Some(start), Some(end)) = (start, end)
        && start > end
    {
        return Err(bad("start", "must not be after end"));
    }
    Ok((start, end))
}

impl ReadingsParams {
    /// The export format this request asks for, by `format=` or by `Accept`, if any.
    pub fn export_format(&self, accept: Option<&str>) -> Result<Option<ExportFormat>, ApiError> {
        if let Some(format) = self.format.as_deref() {
            return ExportFormat::parse(format).map(Some);
        }
        let accept = accept.unwrap_or_default().to_ascii_lowercase();
        Ok(if accept.contains("text/csv") {
            Some(ExportFormat::Csv)
        } else if accept.contains("application/x-ndjson") {
            Some(ExportFormat::Ndjson)
        } else {
            None
        })
    }

    pub fn parse(self, now: DateTime<Utc>) -> Result<ReadingsQuery, ApiError> {
        let (start, end) = parse_range(self.start.as_deref(), self.end.as_deref(), now)?;
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

/// An aggregate function of `fn=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggFn {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    First,
    Last,
}

impl AggFn {
    pub const ALL: [AggFn; 7] = [
        AggFn::Avg,
        AggFn::Min,
        AggFn::Max,
        AggFn::Sum,
        AggFn::Count,
        AggFn::First,
        AggFn::Last,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AggFn::Avg => "avg",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Sum => "sum",
            AggFn::Count => "count",
            AggFn::First => "first",
            AggFn::Last => "last",
        }
    }

    /// Every function but `count` reads numbers only.
    pub fn is_numeric(self) -> bool {
        self != AggFn::Count
    }
}

/// `fn=avg,max`: one or more distinct functions; `avg` when absent.
pub fn parse_fns(value: Option<&str>) -> Result<Vec<AggFn>, ApiError> {
    let Some(value) = value else {
        return Ok(vec![AggFn::Avg]);
    };
    let mut fns = Vec::new();
    for name in value.split(',').map(str::trim) {
        let Some(function) = AggFn::ALL.into_iter().find(|f| f.name() == name) else {
            return Err(bad(
                "fn",
                format!("{name:?} is not one of avg, min, max, sum, count, first, last"),
            ));
        };
        if !fns.contains(&function) {
            fns.push(function);
        }
    }
    Ok(fns)
}

/// What an empty bucket becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Left out.
    None,
    /// Present, every function null (count 0).
    Null,
    /// Present, with the values of the last bucket that had readings (count 0).
    Previous,
}

pub fn parse_fill(value: Option<&str>) -> Result<Fill, ApiError> {
    match value {
        None | Some("none") => Ok(Fill::None),
        Some("null") => Ok(Fill::Null),
        Some("previous") => Ok(Fill::Previous),
        Some(other) => Err(bad(
            "fill",
            format!("{other:?} is not none, null or previous"),
        )),
    }
}

/// Where an aggregate reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceChoice {
    /// Rollups for whole hours (days) when the interval is a multiple of an hour, raw
    /// readings for the rest.
    Auto,
    /// Raw readings only (to compare, or when rollups are not wanted).
    Raw,
}

pub fn parse_source(value: Option<&str>) -> Result<SourceChoice, ApiError> {
    match value {
        None | Some("auto") => Ok(SourceChoice::Auto),
        Some("raw") => Ok(SourceChoice::Raw),
        Some(other) => Err(bad("source", format!("{other:?} is not auto or raw"))),
    }
}

/// A bucket width in whole seconds, 1 s to 366 days: `30s`, `5m`, `1h`, `1d`, `1w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub seconds: i64,
}

impl Interval {
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        let invalid = || {
            bad(
                "interval",
                format!(
                    "{value:?} is not an interval: use a whole number of s, m, h, d or w (30s, 5m, 1h, 1d)"
                ),
            )
        };
        let digits_end = value
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let (number, unit) = value.split_at(digits_end);
        let number: i64 = number.parse().map_err(|_| invalid())?;
        let unit_seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(invalid()),
        };
        let seconds = number.checked_mul(unit_seconds).ok_or_else(invalid)?;
        if !(1..=366 * 86_400).contains(&seconds) {
            return Err(bad("interval", "must be 1s to 366d"));
        }
        Ok(Self { seconds })
    }

    pub fn micros(self) -> i64 {
        self.seconds * 1_000_000
    }

    /// Start of the bucket holding `ts_us` (buckets are aligned to the UTC epoch).
    pub fn floor(self, ts_us: i64) -> i64 {
        ts_us.div_euclid(self.micros()) * self.micros()
    }

    /// The canonical spelling: the largest unit that divides it.
    pub fn label(self) -> String {
        for (unit, seconds) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
            if self.seconds % seconds == 0 {
                return format!("{}{unit}", self.seconds / seconds);
            }
        }
        format!("{}s", self.seconds)
    }
}

/// `GET /api/v1/devices/{id}/readings/aggregate` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateParams {
    pub metric: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub interval: Option<String>,
    #[serde(rename = "fn")]
    pub fns: Option<String>,
    pub fill: Option<String>,
    pub source: Option<String>,
}

/// A validated aggregate over a time range.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    /// Inclusive, epoch microseconds.
    pub start_us: i64,
    /// Exclusive, epoch microseconds.
    pub end_us: i64,
    pub interval: Interval,
    pub fns: Vec<AggFn>,
    pub fill: Fill,
    pub source: SourceChoice,
}

impl AggregateSpec {
    /// `start` defaults to 24 hours before `end`, `end` to now; the range may hold at most
    /// [`MAX_BUCKETS`] buckets.
    pub fn new(
        start: Option<&str>,
        end: Option<&str>,
        interval: Option<&str>,
        fns: Option<&str>,
        fill: Option<&str>,
        source: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Self, ApiError> {
        let (start, end) = parse_range(start, end, now)?;
        let interval = Interval::parse(interval.ok_or_else(|| bad("interval", "required"))?)?;
        let end_us = end.unwrap_or(now).timestamp_micros();
        let start_us = start
            .map(|start| start.timestamp_micros())
            .unwrap_or(end_us - 86_400_000_000);
        if start_us > end_us {
            return Err(bad("start", "must not be after end"));
        }
        let buckets = if end_us > start_us {
            (interval.floor(end_us - 1) - interval.floor(start_us)) / interval.micros() + 1
        } else {
            0
        };
        if buckets > MAX_BUCKETS {
            return Err(bad(
                "interval",
                format!(
                    "{} over this range makes {buckets} buckets; at most {MAX_BUCKETS}: use a longer interval or a shorter range",
                    interval.label()
                ),
            ));
        }
        Ok(Self {
            start_us,
            end_us,
            interval,
            fns: parse_fns(fns)?,
            fill: parse_fill(fill)?,
            source: parse_source(source)?,
        })
    }
}

impl AggregateParams {
    pub fn parse(self, now: DateTime<Utc>) -> Result<(Vec<String>, AggregateSpec), ApiError> {
        let metrics = parse_metrics(self.metric.as_deref())?
            .ok_or_else(|| bad("metric", "required: one or more metric names"))?;
        let spec = AggregateSpec::new(
            self.start.as_deref(),
            self.end.as_deref(),
            self.interval.as_deref(),
            self.fns.as_deref(),
            self.fill.as_deref(),
            self.source.as_deref(),
            now,
        )?;
        Ok((metrics, spec))
    }
}

/// `POST /api/v1/query` as sent: several devices at once, raw or (with `interval`) aggregated.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MultiQueryIn {
    /// 1 to 100 device ids.
    #[schema(value_type = Vec<fieldline_common::openapi::IdText>, min_items = 1, max_items = 100)]
    pub devices: Vec<String>,
    #[schema(value_type = Vec<fieldline_common::openapi::LabelText>, min_items = 1)]
    pub metrics: Vec<String>,
    /// RFC 3339, epoch milliseconds, `now` or relative (`-24h`); inclusive.
    #[schema(value_type = Option<String>, example = "-24h")]
    pub start: Option<serde_json::Value>,
    /// Same forms; exclusive.
    #[schema(value_type = Option<String>, example = "now")]
    pub end: Option<serde_json::Value>,
    /// Aggregate into buckets this wide (`30s`, `5m`, `1h`, `1d`, `1w`); raw readings when
    /// left out.
    #[schema(example = "1h")]
    pub interval: Option<String>,
    /// `"avg,max"` or `["avg", "max"]`: avg, min, max, sum, count, first, last.
    #[serde(rename = "fn")]
    #[schema(value_type = Option<String>)]
    pub fns: Option<serde_json::Value>,
    /// none, null or previous.
    pub fill: Option<String>,
    /// Most rows answered (1 to 10000).
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// A validated multi-device query.
#[derive(Debug)]
pub struct MultiQuery {
    pub devices: Vec<String>,
    pub metrics: Vec<String>,
    pub limit: usize,
    /// Raw when `None`.
    pub aggregate: Option<AggregateSpec>,
    /// Raw range (inclusive start, exclusive end), epoch microseconds.
    pub start_us: i64,
    pub end_us: i64,
}

fn time_value(field: &str, value: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
        Some(serde_json::Value::Number(number)) if number.is_u64() => Ok(Some(number.to_string())),
        Some(other) => Err(bad(field, format!("{other} is not a time"))),
    }
}

impl MultiQueryIn {
    pub fn parse(self, now: DateTime<Utc>) -> Result<MultiQuery, ApiError> {
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICES {
            return Err(bad(
                "devices",
                format!("give 1 to {MAX_DEVICES} device ids"),
            ));
        }
        let mut devices: Vec<String> = Vec::with_capacity(self.devices.len());
        for device in self.devices {
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
        if self.metrics.is_empty() {
            return Err(bad("metrics", "give 1 or more metric names"));
        }
        let metrics = parse_metrics(Some(&self.metrics.join(",")))
            .map_err(|error| ApiError {
                message: error.message.replacen("metric:", "metrics:", 1),
                ..error
            })?
            .unwrap_or_default();
        let limit = match self.limit {
            None => DEFAULT_QUERY_LIMIT,
            Some(limit) if (1..=MAX_QUERY_LIMIT).contains(&limit) => limit,
            Some(_) => return Err(bad("limit", format!("must be 1 to {MAX_QUERY_LIMIT}"))),
        };
        let start = time_value("start", self.start.as_ref())?;
        let end = time_value("end", self.end.as_ref())?;
        let fns = match &self.fns {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(text)) => Some(text.clone()),
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()
                    .ok_or_else(|| bad("fn", "give names as strings"))?
                    .join(","),
            ),
            Some(other) => return Err(bad("fn", format!("{other} is not a list of functions"))),
        };
        let aggregate = match &self.interval {
            Some(interval) => Some(AggregateSpec::new(
                start.as_deref(),
                end.as_deref(),
                Some(interval),
                fns.as_deref(),
                self.fill.as_deref(),
                None,
                now,
            )?),
            None => {
                if fns.is_some() || self.fill.is_some() {
                    return Err(bad("interval", "required with fn or fill"));
                }
                None
            }
        };
        let (start, end) = parse_range(start.as_deref(), end.as_deref(), now)?;
        Ok(MultiQuery {
            devices,
            metrics,
            limit,
            start_us: start.map_or(MIN_TIME_US, |t| t.timestamp_micros()),
            end_us: end.map_or(MAX_TIME_US, |t| t.timestamp_micros()),
            aggregate,
        })
    }
}

/// One stored reading as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadingOut {
    pub metric: String,
    /// RFC 3339, microseconds.
    pub ts: String,
    /// A number, a boolean or a text.
    #[schema(value_type = fieldline_common::openapi::ReadingValue)]
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
