//! What both ingest edges (HTTP and MQTT) share: parsing a device message into readings, and
//! publishing the batch to JetStream, answering only once JetStream has it.

use std::{cell::Cell, collections::HashSet, fmt, time::Duration};

use async_nats::{HeaderMap, jetstream};
use fieldline_proto::{
    Subjects,
    v1::{Heartbeat, Reading, Series, TelemetryBatch, reading},
};
use prost::Message;
use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;

use crate::{
    bus,
    config::Config,
    error::ApiError,
    service::Context,
    time::{MAX_TIME_US, MIN_TIME_US, format_rfc3339, from_us, parse_reading_time},
};

/// Longest text value stored.
pub const MAX_TEXT_LEN: usize = 4096;
/// Longest Idempotency-Key / msg_id.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// A message that cannot become readings; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{count} readings exceed the limit of {limit} per message")]
    TooMany { count: usize, limit: usize },
    /// A reading's time outside the [`TimeWindow`] of the path it came by.
    #[error("{0}")]
    OutOfWindow(String),
}

impl ParseError {
    /// Why a message is dropped, as the edges count it
    /// (`fieldline_mqtt_dropped_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Malformed(_) | ParseError::Invalid(_) => "malformed",
            ParseError::TooMany { .. } => "too_many_readings",
            ParseError::OutOfWindow(_) => "out_of_window",
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(error: ParseError) -> Self {
        match error {
            ParseError::Malformed(_) => ApiError::bad_request("malformed_json", error.to_string()),
            ParseError::Invalid(_) => ApiError::bad_request("invalid_field", error.to_string()),
            ParseError::TooMany { .. } => ApiError::payload_too_large(error.to_string()),
            ParseError::OutOfWindow(_) => ApiError::bad_request("out_of_window", error.to_string()),
        }
    }
}

/// The reading times one path stores, `[earliest_us, latest_us]` in epoch µs. Every time
/// outside it is refused, so that no message can make daily partitions without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub earliest_us: i64,
    pub latest_us: i64,
    /// What a refusal adds, for the sender.
    hint: &'static str,
}

/// The writer's allowance, past `ingest_max_future`, for clocks of different hosts.
const WRITER_CLOCK_SKEW_US: i64 = 24 * 3600 * 1_000_000;

fn duration_us(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl TimeWindow {
    /// Every time the platform can represent (1970 to 9999).
    pub const ANY: TimeWindow = TimeWindow {
        earliest_us: MIN_TIME_US,
        latest_us: MAX_TIME_US,
        hint: "",
    };

    fn new(earliest_us: i64, latest_us: i64, hint: &'static str) -> Self {
        Self {
            earliest_us: earliest_us.clamp(MIN_TIME_US, MAX_TIME_US),
            latest_us: latest_us.clamp(MIN_TIME_US, MAX_TIME_US),
            hint,
        }
    }

    fn earliest_stored_us(config: &Config) -> i64 {
        config.readings_earliest.timestamp_micros()
    }

    /// Live ingest (`POST /api/v1/ingest`, MQTT): `ingest_max_age` back to
    /// `ingest_max_future` ahead of `now_us`.
    pub fn live(config: &Config, now_us: i64) -> Self {
        let earliest = now_us
            .saturating_sub(duration_us(config.ingest_max_age))
            .max(Self::earliest_stored_us(config));
        Self::new(
            earliest,
            now_us.saturating_add(duration_us(config.ingest_max_future)),
            "; older readings go through backfill (POST /api/v1/devices/{id}/readings)",
        )
    }

    /// Backfill: down to `readings_retention` (when set) or `readings_earliest`, and no
    /// further ahead than live ingest.
    pub fn backfill(config: &Config, now_us: i64) -> Self {
        let retained = config.readings_retention.map_or(MIN_TIME_US, |retention| {
            now_us.saturating_sub(duration_us(retention))
        });
        Self::new(
            retained.max(Self::earliest_stored_us(config)),
            now_us.saturating_add(duration_us(config.ingest_max_future)),
            "",
        )
    }

    /// What the query-api writer stores, whatever sent it over the bus (an older edge, a
    /// message that waited in the stream): `readings_earliest` to a day past
    /// `ingest_max_future`. Retention's horizon is the writer's own business.
    pub fn stored(config: &Config, now_us: i64) -> Self {
        Self::new(
            Self::earliest_stored_us(config),
            now_us
                .saturating_add(duration_us(config.ingest_max_future))
                .saturating_add(WRITER_CLOCK_SKEW_US),
            "",
        )
    }

    pub fn contains(&self, ts_us: i64) -> bool {
        (self.earliest_us..=self.latest_us).contains(&ts_us)
    }

    /// The refusal of `ts_us` at `path` (`[3].ts`).
    pub fn refusal(&self, path: &str, ts_us: i64) -> ParseError {
        ParseError::OutOfWindow(format!(
            "{path}: {} is outside the times accepted here, {} to {}{}",
            format_rfc3339(&from_us(ts_us)),
            format_rfc3339(&from_us(self.earliest_us)),
            format_rfc3339(&from_us(self.latest_us)),
            self.hint
        ))
    }
}

/// The readings of one message, and the `msg_id` it carried (MQTT's idempotency key).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub readings: Vec<Reading>,
    pub message_id: Option<String>,
}

/// A metric name: 1 to 128 of `[A-Za-z0-9_.-]`.
pub fn valid_metric(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn invalid(message: String) -> ParseError {
    ParseError::Invalid(message)
}

/// `prefix` plus `key`, the way a client would write the path: `[2].values.temp`.
fn field_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A reading's value; `path` names it in an error (made only then: this runs per reading).
fn reading_value(path: impl Fn() -> String, value: Value) -> Result<reading::Value, ParseError> {
    match value {
        Value::Number(number) => number
            .as_f64()
            .filter(|number| number.is_finite())
            .map(reading::Value::Number)
            .ok_or_else(|| invalid(format!("{}: number out of range", path()))),
        Value::Bool(flag) => Ok(reading::Value::Boolean(flag)),
        // Postgres text cannot hold NUL: refuse it here, not in the writer.
        Value::String(text) if text.contains('\0') => Err(invalid(format!(
            "{}: text must not contain NUL characters",
            path()
        ))),
        Value::String(text) if text.len() <= MAX_TEXT_LEN => Ok(reading::Value::Text(text)),
        Value::String(_) => Err(invalid(format!(
            "{}: text longer than {MAX_TEXT_LEN} bytes",
            path()
        ))),
        _ => Err(invalid(format!(
            "{}: must be a number, boolean or string",
            path()
        ))),
    }
}

/// Where a message sits in the body: `[2]` in an array, nothing for a lone object.
fn message_prefix(index: Option<usize>) -> String {
    index.map(|index| format!("[{index}]")).unwrap_or_default()
}

/// What a visitor found wrong with the body. serde's own error only stops the parse; this
/// keeps the message that names the field, and tells it apart from malformed JSON.
type Failure = Cell<Option<ParseError>>;

fn fail<E: de::Error>(failure: &Failure, error: ParseError) -> E {
    let message = error.to_string();
    failure.set(Some(error));
    E::custom(message)
}

/// The visitor methods for the JSON kinds that a place does not take; each fails with the
/// visitor's `wrong_kind`.
macro_rules! refuse_scalars {
    () => {
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(self.wrong_kind())
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(self.wrong_kind())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(self.wrong_kind())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(self.wrong_kind())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(self.wrong_kind())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(self.wrong_kind())
        }
    };
}

/// A map key, borrowed from the body when it holds no escapes: `ts` and `msg_id` cost no
/// allocation, and a metric name is copied once, into its reading.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(key) => key,
            Key::Owned(key) => key,
        }
    }

    fn into_owned(self) -> String {
        match self {
            Key::Borrowed(key) => key.to_owned(),
            Key::Owned(key) => key,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(key))
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(key.to_owned()))
            }
            fn visit_string<E: de::Error>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(key))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Where the readings of a body go while it is read.
struct Sink<'a> {
    out: &'a mut Parsed,
    failure: &'a Failure,
    received_at_us: i64,
    limit: usize,
    window: TimeWindow,
    /// Every message must carry its own `ts` (backfill: arrival time means nothing there).
    ts_required: bool,
}

impl Sink<'_> {
    fn fail<E: de::Error>(&self, error: ParseError) -> E {
        fail(self.failure, error)
    }

    /// One reading, its time set when its message ends; `path` names a metric in an error.
    fn push<E: de::Error>(
        &mut self,
        metric: String,
        value: Value,
        path: impl Fn(&str) -> String,
    ) -> Result<(), E> {
        if !valid_metric(&metric) {
            return Err(self.fail(invalid(format!(
                "{}: metric names are 1 to 128 of [A-Za-z0-9_.-]",
                path(&metric)
            ))));
        }
        let value = reading_value(|| path(&metric), value).map_err(|error| self.fail(error))?;
        self.out.readings.push(Reading {
            metric,
            ts_us: 0,
            value: Some(value),
        });
        if self.out.readings.len() > self.limit {
            return Err(self.fail(ParseError::TooMany {
                count: self.out.readings.len(),
                limit: self.limit,
            }));
        }
        Ok(())
    }
}

/// A metric given twice in one message, which would make two readings at one time.
fn repeated_metric(readings: &[Reading]) -> Option<&str> {
    if readings.len() <= 16 {
        return readings.iter().enumerate().find_map(|(index, reading)| {
            readings[..index]
                .iter()
                .any(|earlier| earlier.metric == reading.metric)
                .then_some(reading.metric.as_str())
        });
    }
    let mut seen = HashSet::with_capacity(readings.len());
    readings
        .iter()
        .map(|reading| reading.metric.as_str())
        .find(|metric| !seen.insert(*metric))
}

/// The whole body: one message, or an array of them.
struct Body<'s, 'a>(&'s mut Sink<'a>);

impl<'de> Visitor<'de> for Body<'_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object or an array of objects")
    }

    refuse_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        OneMessage {
            sink: self.0,
            index: None,
            values: false,
        }
        .visit_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while seq
            .next_element_seed(OneMessage {
                sink: &mut *self.0,
                index: Some(index),
                values: false,
            })?
            .is_some()
        {
            index += 1;
        }
        if index == 0 {
            return Err(self.0.fail(invalid("body: empty array".into())));
        }
        Ok(())
    }
}

impl Body<'_, '_> {
    fn wrong_kind<E: de::Error>(self) -> E {
        self.0.fail(invalid(
            "body: must be an object or an array of objects".into(),
        ))
    }
}

/// One message: flat `{"ts"?, "temp": 1}` or `{"ts"?, "values": {...}}`, its keys in any
/// order. Metric names and texts move into the readings; error paths are made only for an
/// error.
struct OneMessage<'s, 'a> {
    sink: &'s mut Sink<'a>,
    /// Where the message sits in an array; `None` for a lone object.
    index: Option<usize>,
    /// The message's `values` object rather than the message: every key is a metric.
    values: bool,
}

impl<'de> DeserializeSeed<'de> for OneMessage<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OneMessage<'_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object")
    }

    refuse_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong_kind())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.values {
            return self.visit_values(map);
        }
        let OneMessage { sink, index, .. } = self;
        let prefix = || message_prefix(index);
        let before = sink.out.readings.len();
        let mut ts_us = None;
        let mut nested = false;
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "ts" => {
                    let value: Value = map.next_value()?;
                    if value.is_null() {
                        // `"ts": null` means what no ts means: arrival time.
                        ts_us = None;
                        continue;
                    }
                    let parsed = parse_reading_time(&value).ok_or_else(|| {
                        sink.fail(invalid(format!(
                            "{}: must be RFC 3339 or epoch milliseconds between 1970 and 9999",
                            field_path(&prefix(), "ts")
                        )))
                    })?;
                    if !sink.window.contains(parsed) {
                        let path = field_path(&prefix(), "ts");
                        return Err(sink.fail(sink.window.refusal(&path, parsed)));
                    }
                    ts_us = Some(parsed);
                }
                "msg_id" => match map.next_value()? {
                    // It becomes a bus header value: no NUL, CR, LF or other control.
                    Value::String(id)
                        if !id.is_empty()
                            && id.len() <= MAX_MESSAGE_ID_LEN
                            && !id.contains(char::is_control) =>
                    {
                        sink.out.message_id = Some(id);
                    }
                    _ => {
                        return Err(sink.fail(invalid(format!(
                            "{}: must be a string of 1 to {MAX_MESSAGE_ID_LEN} bytes without control characters",
                            field_path(&prefix(), "msg_id")
                        ))));
                    }
                },
                "values" if nested => {
                    return Err(sink.fail(invalid(format!(
                        "{}: given twice in one message",
                        field_path(&prefix(), "values")
                    ))));
                }
                "values" => {
                    if let Some(flat) = sink.out.readings.get(before) {
                        return Err(sink.fail(invalid(format!(
                            "{}: unexpected beside \"values\"",
                            field_path(&prefix(), &flat.metric)
                        ))));
                    }
                    nested = true;
                    map.next_value_seed(OneMessage {
                        sink: &mut *sink,
                        index,
                        values: true,
                    })?;
                }
                other if nested => {
                    return Err(sink.fail(invalid(format!(
                        "{}: unexpected beside \"values\"",
                        field_path(&prefix(), other)
                    ))));
                }
                _ => {
                    let metric = key.into_owned();
                    let value = map.next_value()?;
                    sink.push(metric, value, |metric| field_path(&prefix(), metric))?;
                }
            }
        }
        if ts_us.is_none() && sink.ts_required {
            let path = field_path(&prefix(), "ts");
            return Err(sink.fail(invalid(format!("{path}: required for backfill"))));
        }
        let readings = &mut sink.out.readings[before..];
        if readings.is_empty() {
            let at = match index {
                Some(_) => prefix(),
                None => "body".to_owned(),
            };
            return Err(sink.fail(invalid(format!("{at}: no readings in the message"))));
        }
        if let Some(metric) = repeated_metric(readings) {
            let at = if nested {
                field_path(&prefix(), "values")
            } else {
                prefix()
            };
            let message = format!("{}: given twice in one message", field_path(&at, metric));
            return Err(sink.fail(invalid(message)));
        }
        let ts_us = ts_us.unwrap_or(sink.received_at_us);
        for reading in readings {
            reading.ts_us = ts_us;
        }
        Ok(())
    }
}

impl OneMessage<'_, '_> {
    /// The metrics of a `values` object.
    fn visit_values<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let values_prefix = || field_path(&message_prefix(self.index), "values");
        while let Some(key) = map.next_key::<Key>()? {
            let metric = key.into_owned();
            let value = map.next_value()?;
            self.sink
                .push(metric, value, |metric| field_path(&values_prefix(), metric))?;
        }
        Ok(())
    }

    fn wrong_kind<E: de::Error>(self) -> E {
        let at = match (self.index, self.values) {
            (index, true) => field_path(&message_prefix(index), "values"),
            (Some(index), false) => format!("[{index}]"),
            (None, false) => "body".to_owned(),
        };
        self.sink.fail(invalid(format!("{at}: must be an object")))
    }
}

/// Parses a device message (one JSON object or an array of them) into readings. The body
/// is read once, straight into readings, without a JSON tree in between. A `ts` outside
/// `window` refuses the whole message, naming it; a message without one takes
/// `received_at_us`.
pub fn parse_json_message(
    body: &[u8],
    received_at_us: i64,
    limit: usize,
    window: TimeWindow,
) -> Result<Parsed, ParseError> {
    parse_messages(body, received_at_us, limit, window, false)
}

/// Parses a backfill body: the messages of [`parse_json_message`], each with its own `ts` (a
/// message without one is refused, naming it: `[3].ts`), as many as the body holds. One
/// pass, like the live path: no JSON tree to check `ts` first.
pub fn parse_backfill_json(body: &[u8], window: TimeWindow) -> Result<Parsed, ParseError> {
    parse_messages(body, 0, usize::MAX, window, true)
}

fn parse_messages(
    body: &[u8],
    received_at_us: i64,
    limit: usize,
    window: TimeWindow,
    ts_required: bool,
) -> Result<Parsed, ParseError> {
    let failure = Failure::default();
    let mut parsed = Parsed::default();
    let mut sink = Sink {
        out: &mut parsed,
        failure: &failure,
        received_at_us,
        limit,
        window,
        ts_required,
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = deserializer
        .deserialize_any(Body(&mut sink))
        .and_then(|()| deserializer.end());
    match read {
        Ok(()) => Ok(parsed),
        Err(error) => Err(failure
            .take()
            .unwrap_or_else(|| ParseError::Malformed(error.to_string()))),
    }
}

/// Parses SenML JSON (RFC 8428): base name and base time apply to the records that follow;
/// times are seconds (absolute, or relative to now when small, as the RFC says), and must lie
/// in `window`.
pub fn parse_senml(
    body: &[u8],
    received_at_us: i64,
    limit: usize,
    window: TimeWindow,
) -> Result<Parsed, ParseError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|error| ParseError::Malformed(error.to_string()))?;
    let Value::Array(records) = value else {
        return Err(invalid("body: SenML is an array of records".into()));
    };
    let mut parsed = Parsed::default();
    let mut base_name = String::new();
    let mut base_time = 0.0_f64;
    for (index, record) in records.iter().enumerate() {
        let path = |key: &str| format!("[{index}].{key}");
        let Value::Object(record) = record else {
            return Err(invalid(format!("[{index}]: must be an object")));
        };
        if let Some(bn) = record.get("bn") {
            base_name = bn
                .as_str()
                .ok_or_else(|| invalid(format!("{}: must be a string", path("bn"))))?
                .to_owned();
        }
        if let Some(bt) = record.get("bt") {
            base_time = bt
                .as_f64()
                .ok_or_else(|| invalid(format!("{}: must be a number", path("bt"))))?;
        }
        let name = match record.get("n") {
            Some(Value::String(name)) => format!("{base_name}{name}"),
            Some(_) => return Err(invalid(format!("{}: must be a string", path("n")))),
            None => base_name.clone(),
        };
        let value = match (record.get("v"), record.get("vb"), record.get("vs")) {
            (Some(v), None, None) if v.is_number() => reading_value(|| path("v"), v.clone())?,
            (None, Some(Value::Bool(flag)), None) => reading::Value::Boolean(*flag),
            (None, None, Some(v)) if v.is_string() => reading_value(|| path("vs"), v.clone())?,
            (None, None, None) if record.contains_key("bn") || record.contains_key("bt") => {
                continue;
            }
            _ => {
                return Err(invalid(format!(
                    "[{index}]: exactly one of v (number), vb (boolean), vs (string)"
                )));
            }
        };
        if !valid_metric(&name) {
            return Err(invalid(format!(
                "{}: metric names are 1 to 128 of [A-Za-z0-9_.-]",
                path("n")
            )));
        }
        let relative = match record.get("t") {
            None => 0.0,
            Some(t) => t
                .as_f64()
                .ok_or_else(|| invalid(format!("{}: must be a number", path("t"))))?,
        };
        let seconds = base_time + relative;
        // RFC 8428 §4.5.3: values below 2**28 are relative to now.
        let micros = if seconds.abs() < 268_435_456.0 {
            received_at_us as f64 + seconds * 1e6
        } else {
            seconds * 1e6
        };
        if !micros.is_finite() || !(MIN_TIME_US as f64..=MAX_TIME_US as f64).contains(&micros) {
            return Err(invalid(format!(
                "{}: time must be between 1970 and 9999",
                path("t")
            )));
        }
        let ts_us = micros as i64;
        if !window.contains(ts_us) {
            return Err(window.refusal(&path("t"), ts_us));
        }
        parsed.readings.push(Reading {
            metric: name,
            ts_us,
            value: Some(value),
        });
        if parsed.readings.len() > limit {
            return Err(ParseError::TooMany {
                count: parsed.readings.len(),
                limit,
            });
        }
    }
    if parsed.readings.is_empty() {
        return Err(invalid("body: no readings in the message".into()));
    }
    Ok(parsed)
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the message is {size} bytes encoded, more than the bus takes ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("NATS is not connected")]
    Disconnected,
    #[error("JetStream did not acknowledge in time")]
    Timeout,
    #[error("JetStream refused the message: {0}")]
    Refused(String),
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        if let PublishError::TooLarge { .. } = error {
            return ApiError::payload_too_large(format!(
                "{error}; send fewer readings per request"
            ));
        }
        tracing::warn!(error = %error, "publish to jetstream failed");
        ApiError::unavailable(format!("message not accepted: {error}; retry"))
    }
}

/// Payloads this small are taken as under the server's `max_payload` (1 MB by default) without
/// asking it. A NATS server set below 32 KiB is not supported: it would refuse them at
/// publish time, and the ingest edges would retry that refusal as if it were an outage.
const SMALL_PAYLOAD_BYTES: usize = 32 * 1024;

/// Publishes `payload` to `subject` and waits for JetStream's acknowledgement. With a
/// `message_id`, JetStream drops repeats inside the duplicate window; returns whether this
/// one was such a duplicate.
pub async fn publish_durable(
    jetstream: &jetstream::Context,
    nats: &async_nats::Client,
    subject: String,
    payload: Vec<u8>,
    message_id: Option<&str>,
    timeout: Duration,
) -> Result<bool, PublishError> {
    if !bus::is_connected(nats) {
        return Err(PublishError::Disconnected);
    }
    // Headers and subject count against max_payload too; keep a margin for them. Asked only
    // of a payload that could be near it: `server_info` clones a dozen strings, once per
    // publish, which showed in ingest-mqtt's profile.
    if payload.len() + 512 > SMALL_PAYLOAD_BYTES {
        let max = nats.server_info().max_payload;
        if max > 0 && payload.len() + 512 > max {
            return Err(PublishError::TooLarge {
                size: payload.len(),
                max,
            });
        }
    }
    let mut headers = HeaderMap::new();
    if let Some(id) = message_id {
        headers.insert("Nats-Msg-Id", id);
    }
    // The message's own span (a producer), whose context it carries to its consumers.
    let span = tracing::info_span!(
        "publish",
        otel.name = tracing::field::Empty,
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = %subject,
    );
    crate::trace::name(&span, || {
        format!("{} publish", subject.split('.').nth(1).unwrap_or("bus"))
    });
    crate::trace::inject_nats(&span, &mut headers);
    let acked = async {
        let ack_future = jetstream
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|error| PublishError::Refused(error.to_string()))?;
        ack_future
            .await
            .map_err(|error| PublishError::Refused(error.to_string()))
    };
    match tokio::time::timeout(timeout, tracing::Instrument::instrument(acked, span)).await {
        Ok(Ok(ack)) => Ok(ack.duplicate),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(PublishError::Timeout),
    }
}

/// A single-device TelemetryBatch, encoded, and its scoped message id.
pub struct EncodedBatch {
    payload: Vec<u8>,
    message_id: Option<String>,
}

impl EncodedBatch {
    /// The batch of `parsed`'s readings of one device; its message id (a client's key) is
    /// scoped to the device ([`scoped_message_id`]).
    pub fn new(
        project: &str,
        device_id: &str,
        parsed: Parsed,
        received_at_us: i64,
        source: &str,
    ) -> Self {
        let message_id = parsed
            .message_id
            .map(|key| scoped_message_id(project, device_id, &key));
        let batch = TelemetryBatch {
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            readings: parsed.readings,
            received_at_us,
            source: source.to_owned(),
            message_id: message_id.clone().unwrap_or_default(),
            devices: Vec::new(),
            series: Vec::new(),
        };
        Self {
            payload: batch.encode_to_vec(),
            message_id,
        }
    }

    /// A batch of readings borrowed (an import's run of them, cut from one sorted list), in
    /// the compact form: numbers in columns, one [`Series`] a metric in order of first
    /// appearance (times as differences), the other readings as they are. About half the
    /// bytes of [`EncodedBatch::new`]'s for an import's steady series, and every consumer
    /// gets the same readings back from `split` (numbers after the rest, series by series:
    /// the order within a batch is not part of the contract). Live ingest keeps `new`.
    pub fn of_slice(
        project: &str,
        device_id: &str,
        readings: &[Reading],
        key: Option<&str>,
        received_at_us: i64,
        source: &str,
    ) -> Self {
        let message_id = key.map(|key| scoped_message_id(project, device_id, key));
        let mut series: Vec<Series> = Vec::new();
        // Each series' index and last time, by metric; most imports cycle through a few
        // metrics, so the one after the last found is tried first.
        let mut found: std::collections::HashMap<&str, usize> = Default::default();
        let mut last_us: Vec<i64> = Vec::new();
        let mut others: Vec<&Reading> = Vec::new();
        let mut next = 0;
        for reading in readings {
            let Some(reading::Value::Number(number)) = reading.value else {
                others.push(reading);
                continue;
            };
            let index = if series.get(next).is_some_and(|s| s.metric == reading.metric) {
                next
            } else {
                *found.entry(&reading.metric).or_insert_with(|| {
                    series.push(Series {
                        metric: reading.metric.clone(),
                        ..Default::default()
                    });
                    last_us.push(0);
                    series.len() - 1
                })
            };
            let column = &mut series[index];
            column
                .ts_delta_us
                .push(reading.ts_us.wrapping_sub(last_us[index]));
            column.numbers.push(number);
            last_us[index] = reading.ts_us;
            next = if index + 1 == series.len() {
                0
            } else {
                index + 1
            };
        }
        let head = TelemetryBatch {
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            readings: Vec::new(),
            received_at_us,
            source: source.to_owned(),
            message_id: message_id.clone().unwrap_or_default(),
            devices: Vec::new(),
            series,
        };
        let others_len: usize = others
            .iter()
            .map(|reading| prost::encoding::message::encoded_len(3, *reading))
            .sum();
        let mut payload = Vec::with_capacity(head.encoded_len() + others_len);
        // A message's fields may come in any order: the head and its series, then the other
        // readings as field 3.
        head.encode_raw(&mut payload);
        for reading in others {
            prost::encoding::message::encode(3, reading, &mut payload);
        }
        Self {
            payload,
            message_id,
        }
    }
}

/// The Nats-Msg-Id of a client's idempotency key: scoped to the device, so two devices'
/// keys never collide.
pub fn scoped_message_id(project: &str, device_id: &str, key: &str) -> String {
    format!("{project}/{device_id}/{key}")
}

/// One device's part of a multi-device batch, borrowed from where its readings wait.
#[derive(Debug, Clone, Copy)]
pub struct DevicePart<'a> {
    pub device_id: &'a str,
    pub readings: &'a [Reading],
    pub received_at_us: i64,
}

/// The multi-device TelemetryBatch of `parts`, encoded: the bytes
/// `TelemetryBatch { project, source, devices, .. }.encode_to_vec()` gives, without copying
/// every reading into a `DeviceReadings` first (a bus message holds up to 500 of them).
pub fn encode_devices(project: &str, source: &str, parts: &[DevicePart<'_>]) -> Vec<u8> {
    use prost::encoding::{
        WireType, encode_key, encode_varint, encoded_len_varint, key_len, message,
    };
    fn str_len(tag: u32, value: &str) -> usize {
        if value.is_empty() {
            return 0;
        }
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
    fn put_str(tag: u32, value: &str, buf: &mut Vec<u8>) {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.extend_from_slice(value.as_bytes());
        }
    }
    fn part_len(part: &DevicePart<'_>) -> usize {
        let received = match part.received_at_us {
            0 => 0,
            value => key_len(3) + encoded_len_varint(value as u64),
        };
        str_len(1, part.device_id) + message::encoded_len_repeated(2, part.readings) + received
    }
    let total = str_len(1, project)
        + str_len(5, source)
        + parts
            .iter()
            .map(|part| {
                let len = part_len(part);
                key_len(7) + encoded_len_varint(len as u64) + len
            })
            .sum::<usize>();
    let mut buf = Vec::with_capacity(total);
    // In the order of the tags, as prost writes them.
    put_str(1, project, &mut buf);
    put_str(5, source, &mut buf);
    for part in parts {
        encode_key(7, WireType::LengthDelimited, &mut buf);
        encode_varint(part_len(part) as u64, &mut buf);
        put_str(1, part.device_id, &mut buf);
        message::encode_repeated(2, part.readings, &mut buf);
        if part.received_at_us != 0 {
            encode_key(3, WireType::Varint, &mut buf);
            encode_varint(part.received_at_us as u64, &mut buf);
        }
    }
    buf
}

/// Publishes what devices send, for both ingest edges.
#[derive(Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
}

impl Publisher {
    pub fn new(context: &Context) -> Self {
        Self {
            jetstream: context.jetstream.clone(),
            nats: context.nats.clone(),
            subjects: context.subjects.clone(),
            timeout: context.config.ingest_publish_timeout,
        }
    }

    /// Builds the batch and publishes it to `{prefix}.telemetry.{project}.{device}`; returns
    /// whether JetStream dropped it as a duplicate of an earlier message id.
    pub async fn readings(
        &self,
        project: &str,
        device_id: &str,
        parsed: Parsed,
        received_at_us: i64,
        source: &str,
    ) -> Result<bool, PublishError> {
        let encoded = EncodedBatch::new(project, device_id, parsed, received_at_us, source);
        self.encoded(project, device_id, encoded).await
    }

    /// Publishes a batch encoded beforehand ([`EncodedBatch::new`], which may run on any
    /// thread) to `{prefix}.telemetry.{project}.{device}`; returns whether JetStream dropped
    /// it as a duplicate of an earlier message id.
    pub async fn encoded(
        &self,
        project: &str,
        device_id: &str,
        batch: EncodedBatch,
    ) -> Result<bool, PublishError> {
        let subject = self.subjects.telemetry(project, device_id);
        publish_durable(
            &self.jetstream,
            &self.nats,
            subject,
            batch.payload,
            batch.message_id.as_deref(),
            self.timeout,
        )
        .await
    }

    /// Publishes the readings of several devices of one project as one multi-device batch to
    /// `{prefix}.telemetry.{project}.{source}.batch`. `bus_id` is the bus message's own
    /// `Nats-Msg-Id`, the same on every try of it, so that a try whose ack was lost (NATS
    /// killed after storing it) is not stored twice (a client's idempotency key never rides
    /// here: a message with one goes alone through [`Publisher::readings`]).
    pub async fn devices(
        &self,
        project: &str,
        parts: &[DevicePart<'_>],
        source: &str,
        bus_id: &str,
    ) -> Result<(), PublishError> {
        let subject = self.subjects.telemetry_batch(project, source);
        publish_durable(
            &self.jetstream,
            &self.nats,
            subject,
            encode_devices(project, source, parts),
            Some(bus_id),
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    /// Publishes a heartbeat to `{prefix}.heartbeat.{project}.{device}`.
    pub async fn heartbeat(
        &self,
        project: &str,
        device_id: &str,
        received_at_us: i64,
        source: &str,
    ) -> Result<(), PublishError> {
        let heartbeat = Heartbeat {
            project: project.to_owned(),
            device_id: device_id.to_owned(),
            received_at_us,
            source: source.to_owned(),
        };
        let subject = self.subjects.heartbeat(project, device_id);
        publish_durable(
            &self.jetstream,
            &self.nats,
            subject,
            heartbeat.encode_to_vec(),
            None,
            self.timeout,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    /// A batch encoded from a borrowed slice, numbers in columns, splits into the readings of
    /// the batch encoded whole (in another order), in about half the bytes.
    #[test]
    fn a_batch_encoded_from_a_slice_splits_into_the_same_readings_in_fewer_bytes() {
        use fieldline_proto::v1::reading::Value;
        // Rows of an import: ten metrics every 10 s, some of them not numbers; metrics that
        // come and go, times out of order and at the ends of the range.
        let mut readings: Vec<Reading> = (0..1000i64)
            .flat_map(|row| {
                (0..10).map(move |column| Reading {
                    metric: format!("m{column}"),
                    ts_us: 1_700_000_000_000_000 + row * 10_000_000,
                    value: Some(match (row + column) % 20 {
                        0 => Value::Boolean(row % 2 == 0),
                        1 => Value::Text(format!("t{row}")),
                        _ => Value::Number(row as f64 / 3.0 - column as f64),
                    }),
                })
            })
            .filter(|reading| !(reading.metric == "m7" && reading.ts_us % 3 == 0))
            .collect();
        for (metric, ts_us) in [("late", 5), ("m0", i64::MIN), ("m0", i64::MAX), ("m1", -1)] {
            readings.push(Reading {
                metric: metric.into(),
                ts_us,
                value: Some(Value::Number(-0.0)),
            });
        }
        let sorted = |batch: &[u8]| {
            let mut split = TelemetryBatch::decode(batch).unwrap().split().unwrap();
            assert_eq!(split.len(), 1);
            let mut batch = split.remove(0);
            assert!(batch.series.is_empty());
            batch
                .readings
                .sort_by(|a, b| (&a.metric, a.ts_us).cmp(&(&b.metric, b.ts_us)));
            batch
        };
        for key in [None, Some("k1")] {
            let parsed = Parsed {
                readings: readings.clone(),
                message_id: key.map(str::to_owned),
            };
            let whole = EncodedBatch::new("p", "d", parsed, 42, "backfill");
            let sliced = EncodedBatch::of_slice("p", "d", &readings, key, 42, "backfill");
            assert_eq!(sliced.message_id, whole.message_id);
            assert_eq!(sorted(&sliced.payload), sorted(&whole.payload));
            // Bit for bit: -0.0 stays negative.
            let zeros = sorted(&sliced.payload)
                .readings
                .iter()
                .filter(|r| matches!(r.value, Some(Value::Number(n)) if n == 0.0 && n.is_sign_negative()))
                .count();
            assert_eq!(zeros, 4);
            assert!(
                sliced.payload.len() * 10 < whole.payload.len() * 6,
                "{} bytes in columns, {} as readings",
                sliced.payload.len(),
                whole.payload.len()
            );
        }
    }

    use super::*;

    #[test]
    fn multi_device_batches_encode_as_prost_would_and_split_back() {
        use fieldline_proto::v1::DeviceReadings;
        let reading = |metric: &str, ts_us: i64, value| Reading {
            metric: metric.to_owned(),
            ts_us,
            value: Some(value),
        };
        let a = vec![
            reading("t", 1, reading::Value::Number(-1.5)),
            reading("on", 2, reading::Value::Boolean(true)),
        ];
        let b = vec![reading("fw", -3, reading::Value::Text("1.2.3".into()))];
        let parts = [
            DevicePart {
                device_id: "a",
                readings: &a,
                received_at_us: 1_700_000_000_000_000,
            },
            DevicePart {
                device_id: "b",
                readings: &b,
                received_at_us: -5,
            },
            DevicePart {
                device_id: "c",
                readings: &[],
                received_at_us: 0,
            },
        ];
        let expected = TelemetryBatch {
            project: "p".into(),
            source: "mqtt".into(),
            devices: parts
                .iter()
                .map(|part| DeviceReadings {
                    device_id: part.device_id.into(),
                    readings: part.readings.to_vec(),
                    received_at_us: part.received_at_us,
                    message_id: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        let encoded = encode_devices("p", "mqtt", &parts);
        assert_eq!(encoded, expected.encode_to_vec());
        let split = TelemetryBatch::decode(encoded.as_slice())
            .unwrap()
            .split()
            .unwrap();
        assert_eq!(split.len(), 3);
        assert_eq!(split[1].readings, b);
        assert_eq!(split[1].received_at_us, -5);
    }

    const NOW: i64 = 1_700_000_000_000_000;

    fn parse(body: &str) -> Result<Parsed, ParseError> {
        parse_json_message(body.as_bytes(), NOW, 100, TimeWindow::ANY)
    }

    fn value(reading: &Reading) -> reading::Value {
        reading.value.clone().unwrap()
    }

    #[test]
    fn flat_and_values_forms_give_the_same_readings() {
        let flat = parse(r#"{"ts": 1000, "temp": 23.5, "door": true, "fw": "1.2"}"#).unwrap();
        let nested = parse(r#"{"ts": "1970-01-01T00:00:01Z", "values": {"temp": 23.5, "door": true, "fw": "1.2"}}"#).unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.readings.len(), 3);
        assert!(
            flat.readings
                .iter()
                .all(|reading| reading.ts_us == 1_000_000)
        );
        let temp = flat.readings.iter().find(|r| r.metric == "temp").unwrap();
        assert_eq!(value(temp), reading::Value::Number(23.5));
    }

    #[test]
    fn missing_ts_is_arrival_time_and_arrays_keep_each_ts() {
        let parsed = parse(r#"[{"a": 1}, {"ts": 5, "a": 2}, {"ts": null, "a": 3}]"#).unwrap();
        assert_eq!(parsed.readings[0].ts_us, NOW);
        assert_eq!(parsed.readings[1].ts_us, 5_000);
        assert_eq!(parsed.readings[2].ts_us, NOW);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"temp": null}"#, "temp:"),
            (r#"{"temp": {"x": 1}}"#, "temp:"),
            (r#"[{"a": 1}, {"b": [1]}]"#, "[1].b:"),
            (r#"{"values": {"x y": 1}}"#, "values.x y:"),
            (r#"{"values": 3}"#, "values:"),
            (r#"{"ts": "yesterday", "a": 1}"#, "ts:"),
            (r#"{"ts": 1}"#, "body: no readings"),
            (r#"[]"#, "body: empty array"),
            (r#"[1]"#, "[0]:"),
            (r#""text""#, "body:"),
            (r#"{"values": {"a": 1}, "b": 2}"#, "b:"),
            (
                r#"[{"a": 1}, {"values": {"t": "a\u0000b"}}]"#,
                "[1].values.t:",
            ),
            (r#"[{"a": 1}, {"values": {"a": 1}, "b": 2}]"#, "[1].b:"),
            (r#"[{"a": 1}, {"ts": 1}]"#, "[1]: no readings"),
            (r#"[{"a": 1}, {"msg_id": 7, "a": 1}]"#, "[1].msg_id:"),
            (r#"{"msg_id": "a\u0000b", "a": 1}"#, "msg_id:"),
            (r#"{"msg_id": "a\r\nb", "a": 1}"#, "msg_id:"),
            (r#"{"b": 2, "values": {"a": 1}}"#, "b:"),
            (r#"{"a": 1, "a": 2}"#, "a: given twice"),
            (
                r#"[{"a": 1}, {"values": {"b": 1, "b": 2}}]"#,
                "[1].values.b: given twice",
            ),
            (r#"{"values": [1]}"#, "values:"),
            (
                r#"{"values": {"a": 1}, "values": {"b": 2}}"#,
                "values: given twice",
            ),
            (r#"[{"a": 1}, null]"#, "[1]:"),
            (r#"{"\u0074emp": 1, "x\u0020y": 2}"#, "x y:"),
        ];
        for (body, expected) in cases {
            match parse(body) {
                Err(ParseError::Invalid(message)) => {
                    assert!(message.starts_with(expected), "{body}: {message}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(parse("{not json"), Err(ParseError::Malformed(_))));
    }

    #[test]
    fn keys_come_in_any_order_and_escaped_names_are_decoded() {
        let parsed = parse(r#"{"temp": 1, "msg_id": "k", "ts": 5}"#).unwrap();
        assert_eq!(parsed.readings[0].ts_us, 5_000);
        assert_eq!(parsed.message_id.as_deref(), Some("k"));
        let parsed = parse(r#"{"values": {"\u0074emp": 1}, "ts": 5}"#).unwrap();
        assert_eq!(parsed.readings[0].metric, "temp");
        assert_eq!(parsed.readings[0].ts_us, 5_000);
        // A repeat is found in a message of many metrics too.
        let many: Vec<String> = (0..40).map(|index| format!(r#""m{index}": 1"#)).collect();
        let body = format!(r#"{{{}, "m7": 2}}"#, many.join(","));
        match parse_json_message(body.as_bytes(), NOW, 1000, TimeWindow::ANY) {
            Err(ParseError::Invalid(message)) => assert!(message.starts_with("m7:"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_first_fault_in_the_body_is_the_one_reported() {
        assert!(matches!(
            parse(r#"{"a": 1,"#),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse(r#"{"a": 1} x"#),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse(r#"{"a": null,"#),
            Err(ParseError::Invalid(_))
        ));
    }

    #[test]
    fn too_many_readings_is_its_own_error() {
        let body = format!("[{}]", vec![r#"{"a": 1, "b": 2}"#; 60].join(","));
        assert!(matches!(
            parse(&body),
            Err(ParseError::TooMany { limit: 100, .. })
        ));
    }

    #[test]
    fn nul_in_text_is_refused() {
        match parse(r#"{"fw": "a\u0000b"}"#) {
            Err(ParseError::Invalid(message)) => assert!(message.starts_with("fw:"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn msg_id_is_taken_not_stored() {
        let parsed = parse(r#"{"msg_id": "abc", "t": 1}"#).unwrap();
        assert_eq!(parsed.message_id.as_deref(), Some("abc"));
        assert_eq!(parsed.readings.len(), 1);
    }

    #[test]
    fn senml_records_resolve_base_name_and_time() {
        let body = r#"[{"bn": "dev1.", "bt": 1700000000, "n": "temp", "v": 21.5},
                       {"n": "door", "vb": true, "t": 2}, {"n": "fw", "vs": "1.0", "t": -1000000000}]"#;
        let parsed = parse_senml(body.as_bytes(), NOW, 100, TimeWindow::ANY).unwrap();
        assert_eq!(parsed.readings.len(), 3);
        assert_eq!(parsed.readings[0].metric, "dev1.temp");
        assert_eq!(parsed.readings[0].ts_us, 1_700_000_000_000_000);
        assert_eq!(parsed.readings[1].ts_us, 1_700_000_002_000_000);
        assert!(parse_senml(br#"[{"n": "x"}]"#, NOW, 100, TimeWindow::ANY).is_err());
        for bad in [
            r#"[{"n": "x", "v": 1, "bt": 1e300}]"#,
            r#"[{"n": "x", "v": 1, "t": "soon"}]"#,
            r#"[{"n": "x", "v": 1, "bt": 1e12}]"#,
        ] {
            assert!(
                parse_senml(bad.as_bytes(), NOW, 100, TimeWindow::ANY).is_err(),
                "{bad}"
            );
        }
        let relative = parse_senml(
            br#"[{"n": "x", "v": 1, "t": -10}]"#,
            NOW,
            100,
            TimeWindow::ANY,
        )
        .unwrap();
        assert_eq!(relative.readings[0].ts_us, NOW - 10_000_000);
    }

    #[test]
    fn a_backfill_message_without_its_own_ts_is_refused_by_name() {
        let parse = |body: &str| parse_backfill_json(body.as_bytes(), TimeWindow::ANY);
        let parsed = parse(r#"[{"ts": 1, "a": 1}, {"ts": 2, "values": {"a": 2}}]"#).unwrap();
        assert_eq!(parsed.readings.len(), 2);
        assert_eq!(parsed.readings[1].ts_us, 2000);
        for (body, path) in [
            (r#"{"a": 1}"#, "ts"),
            ("{}", "ts"),
            (r#"[{"ts": 1, "a": 1}, {"ts": null, "a": 2}]"#, "[1].ts"),
            (r#"[{"ts": 1, "a": 1}, {"values": {"a": 2}}]"#, "[1].ts"),
        ] {
            assert_eq!(
                parse(body).unwrap_err(),
                ParseError::Invalid(format!("{path}: required for backfill")),
                "{body}"
            );
        }
        // The live path still takes arrival time.
        let live = parse_json_message(br#"{"a": 1}"#, NOW, 100, TimeWindow::ANY).unwrap();
        assert_eq!(live.readings[0].ts_us, NOW);
    }

    #[test]
    fn the_live_window_refuses_what_lies_outside_naming_the_field() {
        let config = Config::default();
        let live = TimeWindow::live(&config, NOW);
        let ms = |us: i64| us / 1000;
        let minute_us = 60_000_000;
        let day_us = 24 * 60 * minute_us;
        let accepted = format!(
            r#"[{{"ts": {}, "a": 1}}, {{"ts": {}, "a": 2}}]"#,
            ms(NOW - minute_us),
            ms(NOW + 30 * minute_us)
        );
        let parsed = parse_json_message(accepted.as_bytes(), NOW, 100, live).unwrap();
        assert_eq!(parsed.readings.len(), 2);
        for (body, expected) in [
            (
                format!(
                    r#"[{{"a": 1}}, {{"ts": {}, "a": 2}}]"#,
                    ms(NOW + 2 * day_us)
                ),
                "[1].ts: ",
            ),
            (
                format!(r#"{{"ts": {}, "a": 1}}"#, ms(NOW - 31 * day_us)),
                "ts: ",
            ),
            (
                r#"{"ts": 1000, "a": 1}"#.to_owned(),
                "ts: 1970-01-01T00:00:01Z",
            ),
            (
                r#"[{"a": 1}, {"a": 1}, {"a": 1}, {"ts": "2300-01-01T12:00:00Z", "a": 1}]"#
                    .to_owned(),
                "[3].ts: 2300-01-01T12:00:00Z is outside",
            ),
        ] {
            match parse_json_message(body.as_bytes(), NOW, 100, live) {
                Err(error @ ParseError::OutOfWindow(_)) => {
                    assert!(error.to_string().starts_with(expected), "{body}: {error}");
                    assert_eq!(error.reason(), "out_of_window");
                    let api = ApiError::from(error);
                    assert_eq!(api.reason, "out_of_window");
                    assert_eq!(api.kind, crate::ErrorKind::BadRequest);
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // A message without ts takes its arrival time, inside any live window.
        assert!(parse_json_message(br#"{"a": 1}"#, NOW, 100, live).is_ok());
        let senml = format!(
            r#"[{{"n": "x", "v": 1, "bt": {}}}]"#,
            (NOW + 2 * day_us) / 1_000_000
        );
        match parse_senml(senml.as_bytes(), NOW, 100, live) {
            Err(ParseError::OutOfWindow(message)) => {
                assert!(message.starts_with("[0].t:"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backfill_reaches_back_to_retention_or_the_floor_and_never_far_ahead() {
        let day = Duration::from_secs(24 * 3600);
        let day_us = 86_400_000_000;
        let config = Config::default();
        let backfill = TimeWindow::backfill(&config, NOW);
        assert_eq!(
            backfill.earliest_us,
            config.readings_earliest.timestamp_micros()
        );
        assert!(backfill.contains(NOW - 365 * day_us));
        assert!(!backfill.contains(NOW + 2 * day_us));
        let retained = Config {
            readings_retention: Some(90 * day),
            ..Config::default()
        };
        let backfill = TimeWindow::backfill(&retained, NOW);
        assert!(backfill.contains(NOW - 89 * day_us) && !backfill.contains(NOW - 91 * day_us));
        let stored = TimeWindow::stored(&config, NOW);
        assert!(stored.contains(NOW + 2 * day_us - 3_600_000_000 * 24));
        assert!(!stored.contains(NOW + 2 * day_us));
        assert!(!stored.contains(0));
    }
}
