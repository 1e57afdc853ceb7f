//! Times as the API speaks them: RFC 3339 out; RFC 3339, epoch milliseconds or relative to now
//! (`-24h`, `-15m`, `now`) in.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Now, in epoch microseconds (the unit on the bus and in Postgres).
pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

pub fn from_us(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

/// A `timestamptz` column read straight as epoch microseconds: PostgreSQL sends microseconds
/// since 2000-01-01 UTC, so reading one is an addition, where a `DateTime` is built from a
/// date and a time of day and taken apart again (pages and exports read one a row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochMicros(pub i64);

/// 2000-01-01T00:00:00Z in epoch microseconds.
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

impl<'a> tokio_postgres::types::FromSql<'a> for EpochMicros {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("a timestamptz of {} bytes", raw.len()))?;
        Ok(Self(
            i64::from_be_bytes(bytes).saturating_add(POSTGRES_EPOCH_US),
        ))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }
}

/// RFC 3339 in UTC with a `Z`, microsecond precision where needed.
pub fn format_rfc3339(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Formats runs of nearby times exactly as [`format_rfc3339`] does, fast: chrono formats the
/// date and time of day once per second, the fraction and the `Z` are written here. A page
/// or an export formats thousands of times, most within the second of the one before.
#[derive(Debug, Default)]
pub struct Rfc3339Writer {
    second: Option<i64>,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`, then the fraction and `Z` of the last time.
    text: String,
    prefix: usize,
}

impl Rfc3339Writer {
    /// The time `ts_us` (epoch microseconds) in RFC 3339; valid until the next call.
    pub fn format(&mut self, ts_us: i64) -> &str {
        let (second, micros) = (ts_us.div_euclid(1_000_000), ts_us.rem_euclid(1_000_000));
        if self.second != Some(second) {
            self.text.clear();
            let time = Utc.timestamp_opt(second, 0).single().unwrap_or_default();
            self.text
                .push_str(&time.to_rfc3339_opts(SecondsFormat::Secs, true));
            // Without the `Z`, which comes after the fraction.
            self.text.pop();
            self.prefix = self.text.len();
            self.second = Some(second);
        }
        self.text.truncate(self.prefix);
        // chrono's `AutoSi`: no fraction, or 3 or 6 digits, whichever shows every non-zero one.
        if micros != 0 {
            let (value, digits) = if micros % 1_000 == 0 {
                (micros / 1_000, 3)
            } else {
                (micros, 6)
            };
            let mut fraction = [b'0'; 6];
            let mut rest = value;
            for slot in fraction[..digits].iter_mut().rev() {
                *slot += (rest % 10) as u8;
                rest /= 10;
            }
            self.text.push('.');
            // ASCII digits only.
            self.text
                .push_str(std::str::from_utf8(&fraction[..digits]).unwrap_or_default());
        }
        self.text.push('Z');
        &self.text
    }
}

/// Earliest and latest times the platform stores (years 1970 to 9999 keep every
/// representation exact and Postgres happy).
pub const MIN_TIME_US: i64 = 0;
pub const MAX_TIME_US: i64 = 253_402_300_799_000_000;

/// Parses a time given in a query parameter. The error says what forms are accepted.
pub fn parse_time_param(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let value = value.trim();
    let parsed = if value.eq_ignore_ascii_case("now") {
        Some(now)
    } else if let Some(relative) = value.strip_prefix('-') {
        parse_span(relative).and_then(|span| now.checked_sub_signed(span))
    } else if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value
            .parse::<i64>()
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
    } else {
        DateTime::parse_from_rfc3339(value)
            .ok()
            .map(|time| time.with_timezone(&Utc))
    };
    parsed
        .filter(|time| (MIN_TIME_US..=MAX_TIME_US).contains(&time.timestamp_micros()))
        .ok_or_else(|| {
            format!(
                "{value:?} is not a time: use RFC 3339, epoch milliseconds, now, or -15m/-24h/-7d"
            )
        })
}

/// A device timestamp in a message: RFC 3339 string or epoch milliseconds (a number). Returns
/// epoch microseconds.
pub fn parse_reading_time(value: &serde_json::Value) -> Option<i64> {
    let micros = match value {
        serde_json::Value::String(text) => DateTime::parse_from_rfc3339(text)
            .ok()?
            .with_timezone(&Utc)
            .timestamp_micros(),
        serde_json::Value::Number(number) => {
            let millis = number.as_f64()?;
            if !millis.is_finite() {
                return None;
            }
            (millis * 1000.0).round() as i64
        }
        _ => return None,
    };
    (MIN_TIME_US..=MAX_TIME_US)
        .contains(&micros)
        .then_some(micros)
}

/// `15m`, `24h`, `30s`, `7d`, `500ms`.
fn parse_span(span: &str) -> Option<chrono::Duration> {
    let digits_end = span.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = span.split_at(digits_end);
    let number: i64 = number.parse().ok()?;
    match unit {
        "ms" => chrono::Duration::try_milliseconds(number),
        "s" => chrono::Duration::try_seconds(number),
        "m" => chrono::Duration::try_minutes(number),
        "h" => chrono::Duration::try_hours(number),
        "d" => chrono::Duration::try_days(number),
        "w" => chrono::Duration::try_weeks(number),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn epoch_micros_read_what_chrono_reads(ts_us in MIN_TIME_US..=MAX_TIME_US) {
            use tokio_postgres::types::{FromSql, ToSql, Type};
            let mut raw = bytes::BytesMut::new();
            from_us(ts_us).to_sql(&Type::TIMESTAMPTZ, &mut raw).unwrap();
            let chrono = DateTime::<Utc>::from_sql(&Type::TIMESTAMPTZ, &raw).unwrap();
            let micros = EpochMicros::from_sql(&Type::TIMESTAMPTZ, &raw).unwrap();
            proptest::prop_assert_eq!(micros.0, chrono.timestamp_micros());
            proptest::prop_assert_eq!(micros.0, ts_us);
        }

        #[test]
        fn the_writer_formats_as_chrono_does(
            start in MIN_TIME_US..MAX_TIME_US - 10_000_000,
            steps in proptest::collection::vec(
                proptest::prop_oneof![0i64..2, 0i64..1_000, 0i64..3_000_000, proptest::strategy::Just(1_000i64)],
                1..50,
            ),
        ) {
            let mut writer = Rfc3339Writer::default();
            let mut ts = start;
            for step in steps {
                ts = (ts + step).min(MAX_TIME_US);
                proptest::prop_assert_eq!(writer.format(ts), format_rfc3339(&from_us(ts)));
            }
        }
    }

    #[test]
    fn the_writer_keeps_every_non_zero_digit() {
        let mut writer = Rfc3339Writer::default();
        let second = 1_767_322_800_000_000;
        for (ts, text) in [
            (second, "2026-01-02T03:00:00Z"),
            (second + 120_000, "2026-01-02T03:00:00.120Z"),
            (second + 1, "2026-01-02T03:00:00.000001Z"),
            (second + 999_999, "2026-01-02T03:00:00.999999Z"),
            (second + 1_000_000, "2026-01-02T03:00:01Z"),
            (0, "1970-01-01T00:00:00Z"),
            (MAX_TIME_US, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(writer.format(ts), text);
            assert_eq!(text, format_rfc3339(&from_us(ts)));
        }
    }

    #[test]
    fn accepts_the_three_forms() {
        let now = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(parse_time_param("now", now).unwrap(), now);
        assert_eq!(
            parse_time_param("-15m", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 2, 2, 49, 5).unwrap()
        );
        assert_eq!(
            parse_time_param("1000", now).unwrap(),
            Utc.timestamp_millis_opt(1000).unwrap()
        );
        assert_eq!(
            parse_time_param("2026-01-02T04:04:05+01:00", now).unwrap(),
            now
        );
        for bad in [
            "",
            "yesterday",
            "-15x",
            "-",
            "2026-13-01T00:00:00Z",
            "99999999999999999999",
        ] {
            assert!(parse_time_param(bad, now).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reading_times_in_ms_or_rfc3339() {
        assert_eq!(
            parse_reading_time(&serde_json::json!(1500)),
            Some(1_500_000)
        );
        assert_eq!(
            parse_reading_time(&serde_json::json!("1970-01-01T00:00:01.5Z")),
            Some(1_500_000)
        );
        assert_eq!(parse_reading_time(&serde_json::json!(true)), None);
        assert_eq!(parse_reading_time(&serde_json::json!(-5)), None);
    }

    #[test]
    fn formats_utc_with_z() {
        assert_eq!(
            format_rfc3339(&from_us(1_500_000)),
            "1970-01-01T00:00:01.500Z"
        );
        assert_eq!(format_rfc3339(&from_us(2_000_000)), "1970-01-01T00:00:02Z");
    }
}
