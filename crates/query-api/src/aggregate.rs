//! Aggregates: which table answers which part of a range, how partial aggregates combine, and
//! how buckets become the response (fill modes). No SQL here; `repo` fetches the partials.

use std::collections::BTreeMap;

use fieldline_common::{
    ApiError,
    time::{format_rfc3339, from_us},
};
use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::Value;

use crate::domain::{AggFn, AggregateSpec, Fill, Interval, SourceChoice};

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;

/// A table that holds aggregates of readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Raw,
    Rollup1h,
    Rollup1d,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Rollup1h => "rollup_1h",
            Source::Rollup1d => "rollup_1d",
        }
    }
}

/// Part of a query's range, answered by one table: `[start_us, end_us)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub source: Source,
    pub start_us: i64,
    pub end_us: i64,
}

fn ceil_to(ts_us: i64, width: i64) -> i64 {
    -((-ts_us).div_euclid(width) * width)
}

fn floor_to(ts_us: i64, width: i64) -> i64 {
    ts_us.div_euclid(width) * width
}

/// Splits `[start, end)` among the tables: whole days from the daily rollup when the interval is
/// a multiple of a day, whole hours from the hourly rollup when it is a multiple of an hour,
/// raw readings for the rest (the ragged edges, or everything for shorter intervals). Each
/// rollup bucket then lies inside exactly one bucket of the answer.
pub fn plan(start_us: i64, end_us: i64, interval: Interval, choice: SourceChoice) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut push = |source, start_us: i64, end_us: i64| {
        if start_us < end_us {
            segments.push(Segment {
                source,
                start_us,
                end_us,
            });
        }
    };
    let hours_from = ceil_to(start_us, HOUR_US);
    let hours_to = floor_to(end_us, HOUR_US);
    if choice == SourceChoice::Raw || interval.micros() % HOUR_US != 0 || hours_from >= hours_to {
        push(Source::Raw, start_us, end_us);
        return segments;
    }
    push(Source::Raw, start_us, hours_from);
    let days_from = ceil_to(hours_from, DAY_US);
    let days_to = floor_to(hours_to, DAY_US);
    if interval.micros() % DAY_US == 0 && days_from < days_to {
        push(Source::Rollup1h, hours_from, days_from);
        push(Source::Rollup1d, days_from, days_to);
        push(Source::Rollup1h, days_to, hours_to);
    } else {
        push(Source::Rollup1h, hours_from, hours_to);
    }
    push(Source::Raw, hours_to, end_us);
    segments
}

/// What one source knows of one bucket of one series; partials of the same bucket combine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Partial {
    /// Readings of any type.
    pub count: i64,
    /// Numeric readings; the fields below are over those only.
    pub num_count: i64,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// (epoch µs, value) of the earliest and latest numeric reading.
    pub first: Option<(i64, f64)>,
    pub last: Option<(i64, f64)>,
}

fn combine(a: Option<f64>, b: Option<f64>, f: impl Fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, b) => a.or(b),
    }
}

impl Partial {
    pub fn merge(&mut self, other: &Partial) {
        self.count += other.count;
        self.num_count += other.num_count;
        self.sum = combine(self.sum, other.sum, |a, b| a + b);
        self.min = combine(self.min, other.min, f64::min);
        self.max = combine(self.max, other.max, f64::max);
        self.first = match (self.first, other.first) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        self.last = match (self.last, other.last) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
    }

    fn value(&self, function: AggFn) -> Value {
        let number = |value: Option<f64>| value.map_or(Value::Null, |v| serde_json::json!(v));
        match function {
            AggFn::Count => Value::from(self.count),
            AggFn::Avg => number(
                self.sum
                    .filter(|_| self.num_count > 0)
                    .map(|sum| sum / self.num_count as f64),
            ),
            AggFn::Sum => number(self.sum),
            AggFn::Min => number(self.min),
            AggFn::Max => number(self.max),
            AggFn::First => number(self.first.map(|(_, v)| v)),
            AggFn::Last => number(self.last.map(|(_, v)| v)),
        }
    }
}

/// Partials of one series, by bucket start (epoch µs).
pub type Buckets = BTreeMap<i64, Partial>;

/// Refuses numeric functions over a metric that has readings in the range but no number
/// among them (booleans and text only count).
pub fn check_numeric(
    metric: &str,
    buckets: &Buckets,
    spec: &AggregateSpec,
) -> Result<(), ApiError> {
    let wants_numbers = spec.fns.iter().any(|f| f.is_numeric());
    let count: i64 = buckets.values().map(|p| p.count).sum();
    let numbers: i64 = buckets.values().map(|p| p.num_count).sum();
    if wants_numbers && count > 0 && numbers == 0 {
        return Err(ApiError::unprocessable(
            "non_numeric_metric",
            format!(
                "metric {metric} holds no numbers in this range: only fn=count applies to booleans and text"
            ),
        ));
    }
    Ok(())
}

/// No readings: what a filled bucket shows when there is nothing before it to repeat.
const NOTHING: Partial = Partial {
    count: 0,
    num_count: 0,
    sum: None,
    min: None,
    max: None,
    first: None,
    last: None,
};

/// One bucket as the API shows it, `{"ts": …, "avg": …}`, serialized straight into the
/// response without a JSON tree in between.
pub struct BucketOut<'a> {
    ts_us: i64,
    /// Where the values come from: the bucket's own partial, or for a filled bucket the last
    /// one before it (`fill=previous`) or nothing.
    partial: &'a Partial,
    /// A bucket without readings: its count is 0, whatever it repeats.
    filled: bool,
    fns: &'a [AggFn],
}

impl Serialize for BucketOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + self.fns.len()))?;
        map.serialize_entry("ts", &format_rfc3339(&from_us(self.ts_us)))?;
        for function in self.fns {
            match function {
                AggFn::Count if self.filled => map.serialize_entry("count", &0)?,
                _ => map.serialize_entry(function.name(), &self.partial.value(*function))?,
            }
        }
        map.end()
    }
}

/// The buckets of one series as the API shows them: every bucket of the range when `fill`
/// is `null` or `previous`, only those with readings when `none`. Returns at most `max`
/// buckets (and whether more were cut).
pub fn render<'a>(
    buckets: &'a Buckets,
    spec: &'a AggregateSpec,
    max: usize,
) -> (Vec<BucketOut<'a>>, bool) {
    let bucket = |ts_us: i64, partial: &'a Partial, filled: bool| BucketOut {
        ts_us,
        partial,
        filled,
        fns: &spec.fns,
    };
    let mut out = Vec::new();
    if spec.end_us <= spec.start_us {
        return (out, false);
    }
    if spec.fill == Fill::None {
        for (ts_us, partial) in buckets {
            if out.len() == max {
                return (out, true);
            }
            out.push(bucket(*ts_us, partial, false));
        }
        return (out, false);
    }
    let width = spec.interval.micros();
    let mut previous: Option<&Partial> = None;
    let mut ts_us = spec.interval.floor(spec.start_us);
    while ts_us < spec.end_us {
        if out.len() == max {
            return (out, true);
        }
        out.push(match buckets.get(&ts_us) {
            Some(partial) => {
                previous = Some(partial);
                bucket(ts_us, partial, false)
            }
            None => match (previous, spec.fill) {
                (Some(previous), Fill::Previous) => bucket(ts_us, previous, true),
                _ => bucket(ts_us, &NOTHING, true),
            },
        });
        ts_us += width;
    }
    (out, false)
}

/// The series of an aggregate answer: `{"metric": …, "buckets": […]}`, with `device_id` in
/// answers that span devices.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SeriesOut<'a> {
    /// On `POST /api/v1/query` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<&'a str>,
    pub metric: &'a str,
    /// `{"ts": RFC 3339, "<fn>": value...}`, one member a function asked for.
    #[schema(value_type = Vec<Object>)]
    pub buckets: Vec<BucketOut<'a>>,
}

/// An aggregate answer. `device_id` is there for one device's route; `limit` and
/// `truncated` for the query route.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AggregateOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<&'a str>,
    pub start: String,
    pub end: String,
    pub interval: String,
    #[serde(rename = "fn")]
    #[schema(value_type = Vec<String>)]
    pub fns: Vec<&'static str>,
    #[schema(value_type = String)]
    pub fill: &'static str,
    /// Where the buckets come from: raw, hourly, daily.
    #[schema(value_type = Vec<String>)]
    pub sources: Vec<&'static str>,
    pub series: Vec<SeriesOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
}

impl<'a> AggregateOut<'a> {
    /// The answer's header for `spec`, with the tables read; no series yet.
    pub fn new(spec: &AggregateSpec, sources: &[Source]) -> Self {
        Self {
            device_id: None,
            start: format_rfc3339(&from_us(spec.start_us)),
            end: format_rfc3339(&from_us(spec.end_us)),
            interval: spec.interval.label(),
            fns: spec.fns.iter().map(|f| f.name()).collect(),
            fill: fill_name(spec.fill),
            sources: sources.iter().map(|s| s.name()).collect(),
            series: Vec::new(),
            limit: None,
            truncated: None,
        }
    }
}

pub fn fill_name(fill: Fill) -> &'static str {
    match fill {
        Fill::None => "none",
        Fill::Null => "null",
        Fill::Previous => "previous",
    }
}

/// Partials of every series in `series_ids` over the spec's range, each bucket combined from
/// every table that holds part of it; and the tables read.
pub async fn fetch(
    repo: &crate::repo::Repo,
    series_ids: &[i32],
    spec: &AggregateSpec,
) -> Result<(std::collections::HashMap<i32, Buckets>, Vec<Source>), ApiError> {
    let mut by_series: std::collections::HashMap<i32, Buckets> = std::collections::HashMap::new();
    let segments = plan(spec.start_us, spec.end_us, spec.interval, spec.source);
    let mut sources: Vec<Source> = Vec::new();
    for segment in &segments {
        if !sources.contains(&segment.source) {
            sources.push(segment.source);
        }
    }
    if series_ids.is_empty() {
        return Ok((by_series, sources));
    }
    let edges = spec
        .fns
        .iter()
        .any(|f| matches!(f, AggFn::First | AggFn::Last));
    let fetched = futures::future::try_join_all(
        segments
            .iter()
            .map(|segment| repo.partials(series_ids, *segment, spec.interval, edges)),
    )
    .await?;
    for (series_id, bucket, partial) in fetched.into_iter().flatten() {
        by_series
            .entry(series_id)
            .or_default()
            .entry(bucket)
            .or_default()
            .merge(&partial);
    }
    Ok((by_series, sources))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Interval;

    const T: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z, a day boundary

    fn interval(text: &str) -> Interval {
        Interval::parse(text).unwrap()
    }

    #[test]
    fn short_intervals_read_raw_rows_only() {
        let segments = plan(T, T + DAY_US, interval("5m"), SourceChoice::Auto);
        assert_eq!(
            segments,
            [Segment {
                source: Source::Raw,
                start_us: T,
                end_us: T + DAY_US
            }]
        );
    }

    #[test]
    fn hourly_intervals_read_rollups_with_raw_edges() {
        let start = T + 90 * 60_000_000; // 01:30
        let end = T + 5 * HOUR_US + 1; // just past 05:00
        let segments = plan(start, end, interval("2h"), SourceChoice::Auto);
        let parts: Vec<_> = segments
            .iter()
            .map(|s| (s.source, s.start_us - T, s.end_us - T))
            .collect();
        assert_eq!(
            parts,
            [
                (Source::Raw, 90 * 60_000_000, 2 * HOUR_US),
                (Source::Rollup1h, 2 * HOUR_US, 5 * HOUR_US),
                (Source::Raw, 5 * HOUR_US, 5 * HOUR_US + 1),
            ]
        );
        let raw = plan(start, end, interval("2h"), SourceChoice::Raw);
        assert_eq!(raw.len(), 1);
    }

    #[test]
    fn daily_intervals_use_daily_rollups_for_whole_days() {
        let start = T - 2 * HOUR_US;
        let end = T + 3 * DAY_US + HOUR_US;
        let sources: Vec<_> = plan(start, end, interval("1d"), SourceChoice::Auto)
            .iter()
            .map(|s| (s.source, s.start_us - T, s.end_us - T))
            .collect();
        assert_eq!(
            sources,
            [
                (Source::Rollup1h, -2 * HOUR_US, 0),
                (Source::Rollup1d, 0, 3 * DAY_US),
                (Source::Rollup1h, 3 * DAY_US, 3 * DAY_US + HOUR_US),
            ]
        );
    }

    #[test]
    fn partials_merge_like_one_aggregate() {
        let mut a = Partial {
            count: 2,
            num_count: 2,
            sum: Some(3.0),
            min: Some(1.0),
            max: Some(2.0),
            first: Some((10, 1.0)),
            last: Some((20, 2.0)),
        };
        let b = Partial {
            count: 2,
            num_count: 1,
            sum: Some(-4.0),
            min: Some(-4.0),
            max: Some(-4.0),
            first: Some((5, -4.0)),
            last: Some((5, -4.0)),
        };
        a.merge(&b);
        assert_eq!(a.count, 4);
        assert_eq!(a.value(AggFn::Avg), serde_json::json!(-1.0 / 3.0));
        assert_eq!(a.value(AggFn::Min), serde_json::json!(-4.0));
        assert_eq!(a.value(AggFn::First), serde_json::json!(-4.0));
        assert_eq!(a.value(AggFn::Last), serde_json::json!(2.0));
        assert_eq!(Partial::default().value(AggFn::Avg), Value::Null);
    }

    #[test]
    fn fill_modes_render_every_bucket_or_only_those_with_readings() {
        let spec = |fill: &str| {
            AggregateSpec::new(
                Some("2026-01-01T00:00:00Z"),
                Some("2026-01-01T00:04:00Z"),
                Some("1m"),
                Some("count,avg"),
                Some(fill),
                None,
                chrono::Utc::now(),
            )
            .unwrap()
        };
        let mut buckets = Buckets::new();
        buckets.insert(
            T + 60_000_000,
            Partial {
                count: 2,
                num_count: 2,
                sum: Some(5.0),
                ..Partial::default()
            },
        );
        let rendered = |fill: &str, max: usize| {
            let spec = spec(fill);
            let (out, cut) = render(&buckets, &spec, max);
            (serde_json::to_value(&out).unwrap(), cut)
        };
        let bucket = |minute: i64, count: i64, avg: Value| {
            serde_json::json!({
                "ts": format_rfc3339(&from_us(T + minute * 60_000_000)),
                "count": count,
                "avg": avg,
            })
        };
        let (none, cut) = rendered("none", 10);
        assert_eq!(none, serde_json::json!([bucket(1, 2, 2.5.into())]));
        assert!(!cut);
        let (null, _) = rendered("null", 10);
        assert_eq!(
            null,
            serde_json::json!([
                bucket(0, 0, Value::Null),
                bucket(1, 2, 2.5.into()),
                bucket(2, 0, Value::Null),
                bucket(3, 0, Value::Null),
            ])
        );
        // A filled bucket repeats the values before it, but holds no readings of its own.
        let (previous, _) = rendered("previous", 10);
        assert_eq!(
            previous,
            serde_json::json!([
                bucket(0, 0, Value::Null),
                bucket(1, 2, 2.5.into()),
                bucket(2, 0, 2.5.into()),
                bucket(3, 0, 2.5.into()),
            ])
        );
        let (first_two, cut) = rendered("null", 2);
        assert_eq!(first_two.as_array().unwrap().len(), 2);
        assert!(cut);
    }
}
