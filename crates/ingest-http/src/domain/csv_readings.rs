//! Readings from CSV, for backfill: a header row, then either the long form
//! `ts,metric,value` or the wide form `ts,<metric>,<metric>…`. Times are RFC 3339 or epoch
//! milliseconds; values are numbers, `true`/`false`, or text; empty cells are skipped. Every
//! error names the line and column.

use fieldline_common::{
    ApiError,
    ingest::{MAX_TEXT_LEN, TimeWindow, valid_metric},
    spread,
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

/// A csv error (`line`: where it is, when it is in a record).
fn csv_error(error: &csv::Error, line: Option<u64>) -> ApiError {
    let what = match error.kind() {
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
    // Written only for an error: a body of a million rows asks this a million times.
    let where_ = || at(line, 0, "ts");
    if cell.is_empty() {
        return Err(invalid(format!("{}: required", where_())));
    }
    let value = match cell.parse::<f64>() {
        Ok(millis) => serde_json::Number::from_f64(millis)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::String(cell.to_owned()),
    };
    let ts_us = parse_reading_time(&value).ok_or_else(|| {
        invalid(format!(
            "{}: must be RFC 3339 or epoch milliseconds between 1970 and 9999",
            where_()
        ))
    })?;
    if !window.contains(ts_us) {
        return Err(window.refusal(&where_(), ts_us).into());
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

/// Bodies from this size on are parsed in pieces on several threads (see [`parse`]).
const PIECES_FROM_BYTES: usize = 1024 * 1024;

/// Every reading of a CSV body, in the body's order, or the first error (nothing is taken
/// from a body with one); a time outside `window` is one.
///
/// A large body without quotes is cut at line ends into one piece per core (at most 4,
/// [`spread::threads`]), and the pieces are parsed at once: the import waits on this parse
/// before anything is published. With a `"` anywhere, a line end may sit inside a quoted field, so
/// such a body is parsed in one piece. Either way the result, error included, is the same.
pub fn parse(body: &[u8], window: TimeWindow) -> Result<Vec<Reading>, ApiError> {
    let pieces = if body.len() >= PIECES_FROM_BYTES && memchr::memchr(b'"', body).is_none() {
        spread::threads()
    } else {
        1
    };
    parse_in_pieces(body, window, pieces)
}

fn reader(has_headers: bool, body: &[u8]) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(has_headers)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body)
}

/// [`parse`], the lines after the header cut into `pieces` (at line ends; the body must hold
/// no quote when `pieces` > 1).
fn parse_in_pieces(
    body: &[u8],
    window: TimeWindow,
    pieces: usize,
) -> Result<Vec<Reading>, ApiError> {
    let mut header = reader(true, body);
    let headers = header
        .headers()
        .map_err(|error| csv_error(&error, Some(1)))?
        .clone();
    if headers.is_empty() {
        return Err(invalid("body: no header row".into()));
    }
    let shape = shape(&headers)?;
    // Where the header's record ends: the records come after.
    let first = header.position().byte() as usize;
    let mut starts = vec![first];
    let rest = body.len() - first;
    for piece in 1..pieces {
        let from = (first + rest * piece / pieces).max(*starts.last().unwrap_or(&first));
        let Some(newline) = memchr::memchr(b'\n', &body[from..]) else {
            break;
        };
        let start = from + newline + 1;
        if start < body.len() && start > *starts.last().unwrap_or(&first) {
            starts.push(start);
        }
    }
    starts.push(body.len());
    // The line each piece starts on, in the whole body.
    let mut line = 1 + memchr::memchr_iter(b'\n', &body[..first]).count() as u64;
    let mut offsets = Vec::with_capacity(starts.len() - 1);
    for window in starts.windows(2) {
        offsets.push(line);
        line += memchr::memchr_iter(b'\n', &body[window[0]..window[1]]).count() as u64;
    }
    let parse_piece = |index: usize| {
        records(
            &body[starts[index]..starts[index + 1]],
            offsets[index],
            &headers,
            &shape,
            window,
        )
    };
    let indexes: Vec<usize> = (0..offsets.len()).collect();
    let parsed = spread::map_in_order(
        indexes,
        offsets.len(),
        |&index| starts[index + 1] - starts[index],
        parse_piece,
    );
    let mut readings = Vec::with_capacity(parsed.iter().flatten().map(Vec::len).sum());
    for piece in parsed {
        readings.extend(piece?);
    }
    if readings.is_empty() {
        return Err(invalid("body: no readings in the CSV".into()));
    }
    Ok(readings)
}

/// Counts lines in a piece of the body as its records come, so that an error names the line
/// a record is on in the whole body. (The csv crate's own line numbers count a record from the
/// line end before it: off by one after an empty line or a CRLF.)
struct Lines<'b> {
    piece: &'b [u8],
    counted_to: usize,
    line: u64,
}

impl Lines<'_> {
    /// The line of the record (or error) at `byte` of the piece, past any line ends before it.
    fn at(&mut self, byte: u64) -> u64 {
        let mut start = (byte as usize).clamp(self.counted_to, self.piece.len());
        while matches!(self.piece.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        self.line += memchr::memchr_iter(b'\n', &self.piece[self.counted_to..start]).count() as u64;
        self.counted_to = start;
        self.line
    }
}

/// The readings of the records of `body` (lines after the header; its first byte is on line
/// `first_line` of the whole body).
fn records(
    body: &[u8],
    first_line: u64,
    headers: &csv::StringRecord,
    shape: &Shape,
    window: TimeWindow,
) -> Result<Vec<Reading>, ApiError> {
    let mut reader = reader(false, body);
    let mut lines = Lines {
        piece: body,
        counted_to: 0,
        line: first_line,
    };
    let mut readings = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => {
                let line = error.position().map(|position| lines.at(position.byte()));
                return Err(csv_error(&error, line));
            }
        }
        let line = lines.at(record.position().map_or(0, csv::Position::byte));
        if record.len() != headers.len() {
            return Err(invalid(format!(
                "line {line}: {} fields where the header has {}",
                record.len(),
                headers.len()
            )));
        }
        let ts_us = parse_ts(record.get(0).unwrap_or_default(), line, window)?;
        match shape {
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
    /// A parse's readings, or its error's reason and message.
    type Outcome = Result<Vec<(String, i64, reading::Value)>, (String, String)>;

    /// The outcome of a parse, comparable.
    fn outcome(parsed: Result<Vec<Reading>, ApiError>) -> Outcome {
        parsed
            .map(|readings| values(&readings))
            .map_err(|error| (error.reason.to_string(), error.message))
    }

    #[test]
    fn a_body_in_pieces_names_the_lines_of_the_whole() {
        let mut body = String::from("ts,temp,hum\r\n");
        for row in 0..1000 {
            body.push_str(&format!("{},{row},1\r\n", 1000 + row));
            if row % 97 == 0 {
                body.push_str("\r\n");
            }
        }
        body.push_str("1000,oops\n");
        let error = parse_in_pieces(body.as_bytes(), TimeWindow::ANY, 3).unwrap_err();
        // 1 header, 1,000 rows, 11 empty lines: the bad row is line 1,013.
        assert_eq!(error.message, "line 1013: 2 fields where the header has 3");
        assert_eq!(
            outcome(Err(error)),
            outcome(parse_in_pieces(body.as_bytes(), TimeWindow::ANY, 1))
        );
    }

    proptest::proptest! {
        /// Cut into pieces or not, a body gives the same readings in the same order, or the
        /// same first error.
        #[test]
        fn pieces_parse_as_the_whole_body(
            rows in proptest::collection::vec((0u8..12, 0i64..5_000, -500i32..500), 0..80),
            crlf in proptest::bool::ANY,
            pieces in 2usize..5,
        ) {
            let end = if crlf { "\r\n" } else { "\n" };
            let mut body = format!("ts,a,b{end}");
            for (kind, ts, value) in rows {
                let value = f64::from(value) / 10.0;
                let row = match kind {
                    0 => String::new(),
                    1 => format!("{ts},,{value}"),
                    2 => format!("{ts},true,text{value}"),
                    3 => format!("{ts},{value}"),
                    4 => format!("yesterday,{value},1"),
                    5 => format!("{ts},{value},1,2"),
                    6 => format!(",{value},1"),
                    7 => format!("{ts},a\u{0}b,1"),
                    _ => format!("{ts},{value},{value}"),
                };
                body.push_str(&row);
                body.push_str(end);
            }
            let whole = outcome(parse_in_pieces(body.as_bytes(), TimeWindow::ANY, 1));
            let cut = outcome(parse_in_pieces(body.as_bytes(), TimeWindow::ANY, pieces));
            proptest::prop_assert_eq!(cut, whole);
        }
    }
}
