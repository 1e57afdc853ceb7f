//! A project's retention as the API reads and writes it (`GET`/`PUT /api/v1/retention`): raw
//! readings and rollups each kept for a period, or the platform default
//! (`readings_retention`, `rollups_retention`). The maintenance task applies it.

use std::time::Duration;

use fieldline_common::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;
const YEAR: i64 = 365 * DAY;
/// Longest period accepted: beyond it, leave the project on "keep forever" instead.
const MAX: i64 = 1000 * YEAR;

/// A whole number of hours, days, weeks or 365-day years: `36h`, `90d`, `4w`, `2y`.
/// Minutes and months are refused: `m` reads as either, and a month has no fixed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    seconds: i64,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_field", format!("{field}: {message}"))
}

impl Period {
    /// `null` (or absent) is None: the platform default.
    pub fn parse(field: &str, value: Option<&Value>) -> Result<Option<Self>, ApiError> {
        let text = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(text)) => text,
            Some(_) => {
                return Err(invalid(
                    field,
                    "a period such as \"90d\", \"36h\", \"4w\" or \"2y\", or null for the default",
                ));
            }
        };
        let unit_at = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(unit_at);
        let unit_seconds = match unit {
            "h" => HOUR,
            "d" => DAY,
            "w" => WEEK,
            "y" => YEAR,
            _ => {
                return Err(invalid(
                    field,
                    format!("{text:?}: use a whole number of h, d, w or y (\"90d\")"),
                ));
            }
        };
        let seconds = number
            .parse::<i64>()
            .ok()
            .and_then(|number| number.checked_mul(unit_seconds))
            .filter(|seconds| (1..=MAX).contains(seconds))
            .ok_or_else(|| invalid(field, format!("{text:?}: from 1h to 1000y")))?;
        Ok(Some(Self { seconds }))
    }

    pub fn from_seconds(seconds: i64) -> Self {
        Self { seconds }
    }

    pub fn from_duration(duration: Duration) -> Self {
        Self::from_seconds(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
    }

    pub fn seconds(self) -> i64 {
        self.seconds
    }

    /// The largest unit that divides it: `2y`, `90d`, `36h`, else seconds.
    pub fn to_text(self) -> String {
        for (unit, size) in [("y", YEAR), ("d", DAY), ("h", HOUR)] {
            if self.seconds % size == 0 {
                return format!("{}{unit}", self.seconds / size);
            }
        }
        format!("{}s", self.seconds)
    }
}

/// `PUT /api/v1/retention`: each field a period or null (absent is null: PUT replaces).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionIn {
    /// How long raw readings are kept (`90d`, `36h`, `4w`, `2y`); null for the default.
    #[schema(value_type = Option<String>, example = "90d")]
    readings: Option<Value>,
    /// How long hourly and daily rollups are kept; null for the default.
    #[schema(value_type = Option<String>, example = "2y")]
    rollups: Option<Value>,
}

impl RetentionIn {
    pub fn parse(&self) -> Result<(Option<Period>, Option<Period>), ApiError> {
        Ok((
            Period::parse("readings", self.readings.as_ref())?,
            Period::parse("rollups", self.rollups.as_ref())?,
        ))
    }
}

/// Two periods: null means "the default" in `readings`/`rollups`, "kept forever" in
/// `defaults` and `effective`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Periods {
    pub readings: Option<String>,
    pub rollups: Option<String>,
}

impl Periods {
    fn of(readings: Option<Period>, rollups: Option<Period>) -> Self {
        Self {
            readings: readings.map(Period::to_text),
            rollups: rollups.map(Period::to_text),
        }
    }
}

/// A project's retention: its own periods, the platform's, and the ones that apply.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetentionOut {
    pub project: String,
    #[serde(flatten)]
    pub own: Periods,
    pub defaults: Periods,
    pub effective: Periods,
}

impl RetentionOut {
    pub fn new(
        project: &str,
        own: (Option<Period>, Option<Period>),
        defaults: (Option<Duration>, Option<Duration>),
    ) -> Self {
        let defaults = (
            defaults.0.map(Period::from_duration),
            defaults.1.map(Period::from_duration),
        );
        Self {
            project: project.to_owned(),
            own: Periods::of(own.0, own.1),
            defaults: Periods::of(defaults.0, defaults.1),
            effective: Periods::of(own.0.or(defaults.0), own.1.or(defaults.1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn periods_parse_and_print_in_whole_units() {
        for (given, printed) in [
            ("90d", "90d"),
            ("36h", "36h"),
            ("48h", "2d"),
            ("4w", "28d"),
            ("2y", "2y"),
            ("365d", "1y"),
        ] {
            let period = Period::parse("readings", Some(&json!(given)))
                .unwrap()
                .unwrap();
            assert_eq!(period.to_text(), printed, "{given}");
        }
        assert_eq!(Period::parse("readings", Some(&Value::Null)).unwrap(), None);
        assert_eq!(Period::parse("readings", None).unwrap(), None);
        for bad in [
            json!("90"),
            json!("d"),
            json!("0d"),
            json!("5m"),
            json!("1.5d"),
            json!("-3d"),
            json!(" 3d"),
            json!("1001y"),
            json!("99999999999999999999d"),
            json!(90),
            json!(true),
        ] {
            let error = Period::parse("rollups", Some(&bad)).unwrap_err();
            assert!(
                error.message.starts_with("rollups:"),
                "{bad}: {}",
                error.message
            );
        }
    }
}
