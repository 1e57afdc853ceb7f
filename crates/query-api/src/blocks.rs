//! Compressed history: the readings of one series over part of one closed UTC day, as one
//! value (`telemetry.blocks.data`). Times and numbers go through pco (Pcodec), which finds
//! the regular step of timestamps and the decimal grid of sensor values by itself and keeps
//! every bit; booleans and the kinds of a mixed series are small integers, also through
//! pco; text is a dictionary of the distinct strings plus pco-coded indices.
//! docs/decisions/2026-12-06-compressed-history.md says why this shape.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! u8 version (1) · u32 count · section times(i64)
//! u8 kinds: 0 all numbers, 1 all booleans, 2 all text, 3 mixed (then section kinds(u32))
//! section numbers(f64)      when any
//! section booleans(u32)     when any
//! u32 strings, each u32 length + UTF-8 · section indices(u32)   when any text
//! ```
//!
//! A section is `u32 length` and that many bytes of pco's standalone format.

use anyhow::{Context as _, bail, ensure};
use fieldline_proto::v1::reading::Value;
use pco::{
    ChunkConfig,
    standalone::{simple_compress, simple_decompress},
};

const VERSION: u8 = 1;
/// Readings one block holds at most: a day of a series sampled every 1.3 s or slower is one
/// block; a faster one is cut into several, so no read decodes more than this at once.
pub const MAX_BLOCK_READINGS: usize = 65_536;

const NUMBER: u8 = 0;
const BOOLEAN: u8 = 1;
const TEXT: u8 = 2;
const MIXED: u8 = 3;

/// A reading of a block: time (epoch µs) and value.
pub type Point = (i64, Value);

fn kind(value: &Value) -> u8 {
    match value {
        Value::Number(_) => NUMBER,
        Value::Boolean(_) => BOOLEAN,
        Value::Text(_) => TEXT,
    }
}

fn put_u32(out: &mut Vec<u8>, value: usize) -> anyhow::Result<()> {
    let value = u32::try_from(value).context("a block section over 4 GiB")?;
    out.extend_from_slice(&value.to_le_bytes());
    Ok(())
}

/// pco's compression level (0 to 12, 8 by default). On a day of sensor readings (random walks
/// with two decimals, every 10 s) level 4 made blocks 0.5 % larger than level 8 in half the
/// time; below it they grow fast (level 0: three times the bytes). Reading does not depend on
/// it. An import and the compression task both encode at this level.
const COMPRESSION_LEVEL: usize = 4;

fn put_section<T: pco::data_types::Number>(out: &mut Vec<u8>, values: &[T]) -> anyhow::Result<()> {
    let config = ChunkConfig::default().with_compression_level(COMPRESSION_LEVEL);
    let bytes = simple_compress(values, &config)?;
    put_u32(out, bytes.len())?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Encodes `points`, in time order (equal times allowed), into one block.
pub fn encode(points: &[Point]) -> anyhow::Result<Vec<u8>> {
    ensure!(!points.is_empty(), "an empty block");
    ensure!(
        points.windows(2).all(|pair| pair[0].0 <= pair[1].0),
        "block points out of time order"
    );
    let mut out = Vec::with_capacity(64 + points.len() * 2);
    out.push(VERSION);
    put_u32(&mut out, points.len())?;
    let times: Vec<i64> = points.iter().map(|(ts, _)| *ts).collect();
    put_section(&mut out, &times)?;

    let kinds: Vec<u32> = points.iter().map(|(_, v)| u32::from(kind(v))).collect();
    let first = kinds[0];
    if kinds.iter().all(|k| *k == first) {
        out.push(first as u8);
    } else {
        out.push(MIXED);
        put_section(&mut out, &kinds)?;
    }
    let numbers: Vec<f64> = points
        .iter()
        .filter_map(|(_, v)| match v {
            Value::Number(number) => Some(*number),
            _ => None,
        })
        .collect();
    if !numbers.is_empty() {
        put_section(&mut out, &numbers)?;
    }
    let booleans: Vec<u32> = points
        .iter()
        .filter_map(|(_, v)| match v {
            Value::Boolean(flag) => Some(u32::from(*flag)),
            _ => None,
        })
        .collect();
    if !booleans.is_empty() {
        put_section(&mut out, &booleans)?;
    }
    let mut strings: Vec<&str> = Vec::new();
    let mut index_of: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut indices: Vec<u32> = Vec::new();
    for (_, value) in points {
        if let Value::Text(text) = value {
            let next = strings.len() as u32;
            let index = *index_of.entry(text.as_str()).or_insert_with(|| {
                strings.push(text.as_str());
                next
            });
            indices.push(index);
        }
    }
    if !indices.is_empty() {
        put_u32(&mut out, strings.len())?;
        for text in &strings {
            put_u32(&mut out, text.len())?;
            out.extend_from_slice(text.as_bytes());
        }
        put_section(&mut out, &indices)?;
    }
    Ok(out)
}

/// The value of a `telemetry.readings` row whose three value columns start at `first`.
pub fn row_value(row: &tokio_postgres::Row, first: usize) -> Option<Value> {
    if let Some(number) = row.get::<_, Option<f64>>(first) {
        return Some(Value::Number(number));
    }
    if let Some(flag) = row.get::<_, Option<bool>>(first + 1) {
        return Some(Value::Boolean(flag));
    }
    row.get::<_, Option<String>>(first + 2).map(Value::Text)
}

/// A value as the API shows it, serialized straight from the point (what [`json`] gives,
/// without building it).
pub struct JsonValue<'a>(pub &'a Value);

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Number(number) => serializer.serialize_f64(*number),
            Value::Boolean(flag) => serializer.serialize_bool(*flag),
            Value::Text(text) => serializer.serialize_str(text),
        }
    }
}

/// A value as the API shows it.
pub fn json(value: &Value) -> serde_json::Value {
    match value {
        Value::Number(number) => serde_json::json!(number),
        Value::Boolean(flag) => serde_json::Value::Bool(*flag),
        Value::Text(text) => serde_json::Value::String(text.clone()),
    }
}

/// Partial aggregates of one series' `points` in `[start_us, end_us)`, per bucket of
/// `width_us` (aligned to the epoch, as `date_bin` aligns them), in the shape the SQL of raw
/// rows gives: `first`/`last` only when `edges`.
pub fn partials(
    series_id: i32,
    points: &[Point],
    (start_us, end_us): (i64, i64),
    width_us: i64,
    edges: bool,
) -> Vec<(i32, i64, crate::aggregate::Partial)> {
    let mut out: Vec<(i32, i64, crate::aggregate::Partial)> = Vec::new();
    let low = points.partition_point(|(ts, _)| *ts < start_us);
    let high = points.partition_point(|(ts, _)| *ts < end_us);
    for (ts, value) in &points[low..high] {
        let bucket = ts.div_euclid(width_us) * width_us;
        if out.last().is_none_or(|(_, last, _)| *last != bucket) {
            out.push((series_id, bucket, crate::aggregate::Partial::default()));
        }
        let Some((_, _, partial)) = out.last_mut() else {
            continue;
        };
        partial.count += 1;
        if let Value::Number(number) = value {
            let number = *number;
            partial.num_count += 1;
            partial.sum = Some(partial.sum.map_or(number, |sum| sum + number));
            partial.min = Some(partial.min.map_or(number, |min| min.min(number)));
            partial.max = Some(partial.max.map_or(number, |max| max.max(number)));
            if edges {
                if partial.first.is_none() {
                    partial.first = Some((*ts, number));
                }
                partial.last = Some((*ts, number));
            }
        }
    }
    out
}

/// Reads a block back, byte for byte as it went in.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        ensure!(self.bytes.len() >= n, "a block cut short");
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> anyhow::Result<usize> {
        let bytes: [u8; 4] = self.take(4)?.try_into()?;
        Ok(u32::from_le_bytes(bytes) as usize)
    }

    fn section<T: pco::data_types::Number>(&mut self, expected: usize) -> anyhow::Result<Vec<T>> {
        let length = self.u32()?;
        let values: Vec<T> = simple_decompress(self.take(length)?)?;
        ensure!(
            values.len() == expected,
            "a block section holds {} values, not {expected}",
            values.len()
        );
        Ok(values)
    }
}

/// Decodes a block written by [`encode`].
pub fn decode(bytes: &[u8]) -> anyhow::Result<Vec<Point>> {
    let mut reader = Reader { bytes };
    let version = reader.u8()?;
    ensure!(version == VERSION, "block version {version} is not known");
    let count = reader.u32()?;
    let times: Vec<i64> = reader.section(count)?;
    let kinds: Vec<u32> = match reader.u8()? {
        MIXED => reader.section(count)?,
        single @ (NUMBER | BOOLEAN | TEXT) => vec![u32::from(single); count],
        other => bail!("block kind {other} is not known"),
    };
    let of_kind = |wanted: u8| kinds.iter().filter(|k| **k == u32::from(wanted)).count();
    let (n_numbers, n_booleans, n_texts) = (of_kind(NUMBER), of_kind(BOOLEAN), of_kind(TEXT));
    ensure!(
        n_numbers + n_booleans + n_texts == count,
        "a block with an unknown value kind"
    );
    let numbers: Vec<f64> = if n_numbers > 0 {
        reader.section(n_numbers)?
    } else {
        Vec::new()
    };
    let booleans: Vec<u32> = if n_booleans > 0 {
        reader.section(n_booleans)?
    } else {
        Vec::new()
    };
    let (strings, indices) = if n_texts > 0 {
        let n = reader.u32()?;
        let mut strings = Vec::with_capacity(n.min(count));
        for _ in 0..n {
            let length = reader.u32()?;
            strings.push(std::str::from_utf8(reader.take(length)?)?.to_owned());
        }
        let indices: Vec<u32> = reader.section(n_texts)?;
        ensure!(
            indices.iter().all(|i| (*i as usize) < strings.len()),
            "a block's text index out of its dictionary"
        );
        (strings, indices)
    } else {
        (Vec::new(), Vec::new())
    };
    ensure!(reader.bytes.is_empty(), "bytes after a block's end");
    let (mut numbers, mut booleans, mut indices) = (
        numbers.into_iter(),
        booleans.into_iter(),
        indices.into_iter(),
    );
    let mut points = Vec::with_capacity(count);
    for (ts, kind) in times.into_iter().zip(kinds) {
        let value = match kind as u8 {
            NUMBER => Value::Number(numbers.next().context("numbers")?),
            BOOLEAN => Value::Boolean(booleans.next().context("booleans")? != 0),
            _ => Value::Text(strings[indices.next().context("texts")? as usize].clone()),
        };
        points.push((ts, value));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            // Every finite double, at full precision (NaN is never stored: JSON has none).
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(Value::Number),
            // Sensor-like: two decimals.
            (-100_000i64..100_000).prop_map(|c| Value::Number(c as f64 / 100.0)),
            any::<bool>().prop_map(Value::Boolean),
            "[a-z0-9. ]{0,12}".prop_map(Value::Text),
            any::<String>().prop_map(Value::Text),
        ]
    }

    fn points() -> impl Strategy<Value = Vec<Point>> {
        prop::collection::vec((0i64..86_400_000_000, value()), 1..400).prop_map(|mut points| {
            points.sort_by_key(|(ts, _)| *ts);
            points
        })
    }

    proptest! {
        #[test]
        fn any_series_round_trips_exactly(points in points()) {
            let decoded = decode(&encode(&points).unwrap()).unwrap();
            prop_assert_eq!(decoded.len(), points.len());
            for (got, want) in decoded.iter().zip(&points) {
                prop_assert_eq!(got.0, want.0);
                match (&got.1, &want.1) {
                    // Bit for bit: -0.0 stays -0.0.
                    (Value::Number(a), Value::Number(b)) => prop_assert_eq!(a.to_bits(), b.to_bits()),
                    (a, b) => prop_assert_eq!(a, b),
                }
            }
        }

        #[test]
        fn one_kind_series_round_trip(
            start in 0i64..1_000_000_000_000_000,
            step in 1i64..100_000_000,
            walk in prop::collection::vec(-50i64..50, 1..2000),
        ) {
            let mut level = 2000i64;
            let points: Vec<Point> = walk.iter().enumerate().map(|(i, delta)| {
                level += delta;
                (start + i as i64 * step, Value::Number(level as f64 / 100.0))
            }).collect();
            prop_assert_eq!(decode(&encode(&points).unwrap()).unwrap(), points);
        }
    }

    #[test]
    fn a_sensor_day_takes_about_a_byte_a_reading() {
        // 8,640 readings 10 s apart, a random walk with two decimals (xorshift, fixed seed).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut level = 2150i64;
        let points: Vec<Point> = (0..8640)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                level += (state % 21) as i64 - 10;
                (
                    1_700_000_000_000_000 + i * 10_000_000,
                    Value::Number(level as f64 / 100.0),
                )
            })
            .collect();
        let block = encode(&points).unwrap();
        assert!(block.len() < 8640 * 2, "{} bytes", block.len());
        assert_eq!(decode(&block).unwrap(), points);
        // Booleans and repeated text compress too.
        let flags: Vec<Point> = (0..8640)
            .map(|i| (i * 10_000_000, Value::Boolean(i % 97 == 0)))
            .collect();
        assert!(encode(&flags).unwrap().len() < 8640 / 4);
        let texts: Vec<Point> = (0..8640)
            .map(|i| (i * 10_000_000, Value::Text(format!("fw-1.{}", i / 3000))))
            .collect();
        assert!(encode(&texts).unwrap().len() < 8640 / 4);
        assert_eq!(decode(&encode(&texts).unwrap()).unwrap(), texts);
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let points: Vec<Point> = (0..100)
            .map(|i| (i, Value::Text(format!("t{}", i % 3))))
            .collect();
        let block = encode(&points).unwrap();
        for cut in 0..block.len() {
            assert!(decode(&block[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = block.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(&[9]).is_err());
        assert!(encode(&[]).is_err());
    }
}
