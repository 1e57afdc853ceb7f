//! Readings from CSV, for backfill: a header row, then either the long form
//! `ts,metric,value` or the wide form `ts,<metric>,<metric>…`. Times are RFC 3339 or epoch
//! milliseconds; values are numbers, `true`/`false`, or text; empty cells are skipped. Every
//! error names the line and column.

use fieldline_common::{
    ApiError,
    ingest::{MAX_TEXT_LEN, TimeWindow, valid_metric},
    time::parse_reading_time,
};
use fieldline_proto::v1::{Reading, reading};

fn invalid(message: String) -> ApiError {
    ApiError::bad_request("invalid_csv", message)
}

/// Where a cell is, as the error names it: `line 3, column 2 (temp)`.
fn at(line: u64, column: usize, name: &str) -> String {
    format!("line {line}, column {} ({name})", column + 1)
}

fn csv_error(error: &csv::Error) -> ApiError {
    let line = error.position().map(|position| position.line());
    let what = match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields where the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
        _ => error.to_string(),
    };
    match line {
        Some(line) => invalid(format!("line {line}: {what}")),
        None => invalid(format!("body: {what}")),
    }
}

enum Shape {
    /// `ts,metric,value`
    Long,
    /// `ts,<metric>,…`: the metric names, by column (column 0 is `ts`).
    Wide(Vec<String>),
}

fn shape(headers: &csv::StringRecord) -> Result<Shape, ApiError> {
    let names: Vec<&str> = headers.iter().collect();
    let lower: Vec<String> = names.iter().map(|name| name.to_ascii_lowercase()).collect();
    if lower.first().map(String::as_str) != Some("ts") || names.len() < 2 {
        return Err(invalid(
            "line 1: the header must be ts,metric,value or ts,<metric>,<metric>…".into(),
        ));
    }
    if lower == ["ts", "metric", "value"] {
        return Ok(Shape::Long);
    }
    let mut metrics = Vec::with_capacity(names.len());
    for (column, name) in names.iter().enumerate() {
        if column == 0 {
            metrics.push(String::new());
            continue;
        }
        if !valid_metric(name) {
            return Err(invalid(format!(
                "{}: metric names are 1 to 128 of [A-Za-z0-9_.-]",
                at(1, column, name)
            )));
        }
        if metrics.iter().any(|seen| seen == name) {
            return Err(invalid(format!("{}: repeated metric", at(1, column, name))));
        }
        metrics.push((*name).to_owned());
    }
    Ok(Shape::Wide(metrics))
}

fn parse_ts(cell: &str, line: u64, window: TimeWindow) -> Result<i64, ApiError> {
    let where_ = at(line, 0, "ts");
    if cell.is_empty() {
        return Err(invalid(format!("{where_}: required")));
    }
    let value = match cell.parse::<f64>() {
        Ok(millis) => serde_json::Number::from_f64(millis)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::String(cell.to_owned()),
    };
    let ts_us = parse_reading_time(&value).ok_or_else(|| {
        invalid(format!(
            "{where_}: must be RFC 3339 or epoch milliseconds between 1970 and 9999"
        ))
    })?;
    if !window.contains(ts_us) {
        return Err(window.refusal(&where_, ts_us).into());
    }
    Ok(ts_us)
}

fn parse_value(cell: &str, where_: impl Fn() -> String) -> Result<reading::Value, ApiError> {
    match cell {
        "true" => return Ok(reading::Value::Boolean(true)),
        "false" => return Ok(reading::Value::Boolean(false)),
        _ => {}
    }
    if let Ok(number) = cell.parse::<f64>()
        && number.is_finite()
    {
        return Ok(reading::Value::Number(number));
    }
    if cell.contains('\0') {
        return Err(invalid(format!(
            "{}: text must not contain NUL characters",
            where_()
        )));
    }
    if cell.len() > MAX_TEXT_LEN {
        return Err(invalid(format!(
            "{}: text longer than {MAX_TEXT_LEN} bytes",
            where_()
        )));
    }
    Ok(reading::Value::Text(cell.to_owned()))
}

/// Every reading of a CSV body, or the first error (nothing is taken from a body with one);
/// a time outside `window` is one.
pub fn parse(body: &[u8], window: TimeWindow) -> Result<Vec<Reading>, ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let headers = reader.headers().map_err(|error| csv_error(&error))?.clone();
    if headers.is_empty() {
        return Err(invalid("body: no header row".into()));
    }
    let shape = shape(&headers)?;
    let mut readings = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => return Err(csv_error(&error)),
        }
        let line = record.position().map_or(0, |position| position.line());
        let ts_us = parse_ts(record.get(0).unwrap_or_default(), line, window)?;
        match &shape {
            Shape::Long => {
                let metric = record.get(1).unwrap_or_default();
                let value = record.get(2).unwrap_or_default();
                if value.is_empty() {
                    continue;
                }
                if !valid_metric(metric) {
                    return Err(invalid(format!(
                        "{}: metric names are 1 to 128 of [A-Za-z0-9_.-]",
                        at(line, 1, "metric")
                    )));
                }
                let value = parse_value(value, || at(line, 2, "value"))?;
                readings.push(Reading {
                    metric: metric.to_owned(),
                    ts_us,
                    value: Some(value),
                });
            }
            Shape::Wide(metrics) => {
                for (column, cell) in record.iter().enumerate().skip(1) {
                    if cell.is_empty() {
                        continue;
                    }
                    let metric = &metrics[column];
                    let value = parse_value(cell, || at(line, column, metric))?;
                    readings.push(Reading {
                        metric: metric.clone(),
                        ts_us,
                        value: Some(value),
                    });
                }
            }
        }
    }
    if readings.is_empty() {
        return Err(invalid("body: no readings in the CSV".into()));
    }
    Ok(readings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_any(body: &[u8]) -> Result<Vec<Reading>, ApiError> {
        parse(body, TimeWindow::ANY)
    }

    #[test]
    fn a_time_outside_the_window_names_its_cell() {
        let window =
            TimeWindow::backfill(&fieldline_common::Config::default(), 1_700_000_000_000_000);
        let error = parse(b"ts,temp\n1600000000000,1\n1000,2\n", window).unwrap_err();
        assert_eq!(error.reason, "out_of_window");
        assert!(
            error
                .message
                .starts_with("line 3, column 1 (ts): 1970-01-01T00:00:01Z"),
            "{}",
            error.message
        );
    }

    fn values(readings: &[Reading]) -> Vec<(String, i64, reading::Value)> {
        readings
            .iter()
            .map(|r| (r.metric.clone(), r.ts_us, r.value.clone().unwrap()))
            .collect()
    }

    #[test]
    fn long_and_wide_forms_give_readings() {
        let long = parse_any(
            b"ts,metric,value\n2026-01-01T00:00:00Z,temp,21.5\n1000,door,true\n1000,fw,1.2.0\n1000,empty,\n",
        )
        .unwrap();
        assert_eq!(
            values(&long),
            [
                (
                    "temp".into(),
                    1_767_225_600_000_000,
                    reading::Value::Number(21.5)
                ),
                ("door".into(), 1_000_000, reading::Value::Boolean(true)),
                ("fw".into(), 1_000_000, reading::Value::Text("1.2.0".into())),
            ]
        );
        let wide = parse_any(b"ts,temp,hum\n1000,21.5,40\n2000,,41\n").unwrap();
        assert_eq!(
            values(&wide),
            [
                ("temp".into(), 1_000_000, reading::Value::Number(21.5)),
                ("hum".into(), 1_000_000, reading::Value::Number(40.0)),
                ("hum".into(), 2_000_000, reading::Value::Number(41.0)),
            ]
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases: [(&[u8], &str); 8] = [
            (b"ts,temp\n1000,1\nyesterday,2\n", "line 3, column 1 (ts):"),
            (b"ts,temp\n,1\n", "line 2, column 1 (ts):"),
            (b"ts,temp\n1000,1,2\n", "line 2:"),
            (b"ts,bad name\n1000,1\n", "line 1, column 2 (bad name):"),
            (b"ts,a,a\n1000,1,2\n", "line 1, column 3 (a):"),
            (b"time,temp\n1000,1\n", "line 1:"),
            (
                b"ts,metric,value\n1000,bad metric,1\n",
                "line 2, column 2 (metric):",
            ),
            (b"ts,temp\n", "body:"),
        ];
        for (body, expected) in cases {
            let error = parse_any(body).unwrap_err();
            assert!(
                error.message.starts_with(expected),
                "{}: {}",
                String::from_utf8_lossy(body),
                error.message
            );
        }
        let error = parse_any(b"ts,temp\n1000,a\xffb\n").unwrap_err();
        assert!(error.message.starts_with("line 2:"), "{}", error.message);
    }
}
