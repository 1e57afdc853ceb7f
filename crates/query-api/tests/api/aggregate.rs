//! Aggregates against values computed here, independently of the service: every function,
//! bucket edges, empty buckets, each fill mode; and rollups against raw rows.

use std::{collections::BTreeMap, time::Duration};

use fieldline_proto::v1::Reading;
use fieldline_testkit::{TestApp, assert_error, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{boolean, number, publish, spawn_query, stored, text};

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;

fn rfc3339(ts_us: i64) -> String {
    fieldline_common::time::format_rfc3339(&fieldline_common::time::from_us(ts_us))
}

/// The expected buckets, computed the plain way: readings in [start, end) grouped by
/// floor(ts / width), each function by its definition.
fn expected(readings: &[(i64, f64)], start: i64, end: i64, width: i64, fill: &str) -> Vec<Value> {
    let mut groups: BTreeMap<i64, Vec<(i64, f64)>> = BTreeMap::new();
    for &(ts, value) in readings {
        if ts >= start && ts < end {
            groups
                .entry(ts.div_euclid(width) * width)
                .or_default()
                .push((ts, value));
        }
    }
    let bucket = |ts: i64, values: &mut Vec<(i64, f64)>| {
        values.sort_by_key(|(ts, _)| *ts);
        let sum: f64 = values.iter().map(|(_, v)| v).sum();
        json!({
            "ts": rfc3339(ts),
            "avg": sum / values.len() as f64,
            "min": values.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min),
            "max": values.iter().map(|(_, v)| *v).fold(f64::NEG_INFINITY, f64::max),
            "sum": sum,
            "count": values.len(),
            "first": values[0].1,
            "last": values[values.len() - 1].1,
        })
    };
    let mut out = Vec::new();
    let mut previous: Option<Value> = None;
    let mut ts = start.div_euclid(width) * width;
    while ts < end {
        match groups.get_mut(&ts) {
            Some(values) => {
                let value = bucket(ts, values);
                previous = Some(value.clone());
                out.push(value);
            }
            None => match fill {
                "none" => {}
                "null" => out.push(json!({"ts": rfc3339(ts), "avg": null, "min": null, "max": null, "sum": null, "count": 0, "first": null, "last": null})),
                _ => {
                    let mut value = previous.clone().unwrap_or_else(|| json!({"avg": null, "min": null, "max": null, "sum": null, "first": null, "last": null}));
                    value["ts"] = json!(rfc3339(ts));
                    value["count"] = json!(0);
                    out.push(value);
                }
            },
        }
        ts += width;
    }
    out
}

async fn aggregate(app: &TestApp, device: &str, query: &str) -> Value {
    let (status, body) = app
        .get(
            &format!("/api/v1/devices/{device}/readings/aggregate?{query}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body["data"].clone()
}

/// Deterministic values that are exact in binary (multiples of 1/4), so sums do not depend on
/// the order of addition and equality can be exact.
fn value_of(index: i64) -> f64 {
    ((index * 37) % 101 - 50) as f64 / 4.0
}

#[tokio::test]
async fn aggregates_equal_values_computed_independently() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    // temp: readings on bucket edges (exactly at 5m and 10m, 1 µs before 10m), before the
    // range's start, none in [15m, 20m), several in later buckets.
    let offsets = [
        0,
        MINUTE,
        3 * MINUTE,
        4 * MINUTE + 59_999_999,
        5 * MINUTE,
        7 * MINUTE,
        10 * MINUTE - 1,
        10 * MINUTE,
        12 * MINUTE,
        14 * MINUTE,
        20 * MINUTE,
        21 * MINUTE + 1,
        26 * MINUTE,
        29 * MINUTE,
        30 * MINUTE,
        31 * MINUTE,
    ];
    let temp: Vec<(i64, f64)> = offsets
        .iter()
        .enumerate()
        .map(|(i, offset)| (T0 + offset, value_of(i as i64)))
        .collect();
    let hum: Vec<(i64, f64)> = (0..12)
        .map(|i| (T0 + i * 150_000_000, value_of(i + 7) + 40.0))
        .collect();
    // Published out of order, in two batches.
    let mut readings: Vec<Reading> = temp
        .iter()
        .rev()
        .map(|(ts, v)| number("temp", *ts, *v))
        .collect();
    readings.extend(hum.iter().map(|(ts, v)| number("hum", *ts, *v)));
    let second = readings.split_off(9);
    publish(&app, "default", "d1", readings).await;
    publish(&app, "default", "d1", second).await;
    let total = (temp.len() + hum.len()) as i64;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == total).then_some(())
    })
    .await;

    let start = T0 + 2 * MINUTE;
    let end = T0 + 30 * MINUTE;
    for fill in ["none", "null", "previous"] {
        let data = aggregate(
            &app,
            "d1",
            &format!(
                "metric=temp,hum&start={}&end={}&interval=5m&fn=avg,min,max,sum,count,first,last&fill={fill}",
                rfc3339(start),
                rfc3339(end)
            ),
        )
        .await;
        assert_eq!(data["interval"], "5m");
        assert_eq!(data["fill"], fill);
        assert_eq!(data["sources"], json!(["raw"]));
        assert_eq!(data["series"][0]["metric"], "temp");
        assert_eq!(
            data["series"][0]["buckets"],
            json!(expected(&temp, start, end, 5 * MINUTE, fill)),
            "temp, fill={fill}"
        );
        assert_eq!(data["series"][1]["metric"], "hum");
        assert_eq!(
            data["series"][1]["buckets"],
            json!(expected(&hum, start, end, 5 * MINUTE, fill)),
            "hum, fill={fill}"
        );
    }
    // The empty bucket is really there (and only) under fill=null.
    let data = aggregate(
        &app,
        "d1",
        &format!(
            "metric=temp&start={}&end={}&interval=5m&fn=count&fill=null",
            rfc3339(T0 + 15 * MINUTE),
            rfc3339(T0 + 20 * MINUTE)
        ),
    )
    .await;
    assert_eq!(
        data["series"][0]["buckets"],
        json!([{"ts": "2026-01-01T00:15:00Z", "count": 0}])
    );
    // Default fn is avg; a 1-minute interval and a 7-minute one (buckets aligned to the
    // epoch, not to the start).
    for width in [MINUTE, 7 * MINUTE] {
        let label = format!("{}m", width / MINUTE);
        let data = aggregate(
            &app,
            "d1",
            &format!(
                "metric=temp&start={}&end={}&interval={label}",
                rfc3339(start),
                rfc3339(end)
            ),
        )
        .await;
        let want: Vec<Value> = expected(&temp, start, end, width, "none")
            .into_iter()
            .map(|b| json!({"ts": b["ts"], "avg": b["avg"]}))
            .collect();
        assert_eq!(data["series"][0]["buckets"], json!(want), "{label}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn booleans_and_text_only_count() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    publish(
        &app,
        "default",
        "d1",
        vec![
            boolean("door", T0, true),
            boolean("door", T0 + MINUTE, false),
            text("fw", T0, "1.0"),
            number("mixed", T0, 2.0),
            text("mixed", T0 + MINUTE, "err"),
            number("mixed", T0 + 2 * MINUTE, 4.0),
        ],
    )
    .await;
    eventually("readings stored", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 6).then_some(())
    })
    .await;
    let range = format!("start={}&end={}", rfc3339(T0), rfc3339(T0 + HOUR));
    let data = aggregate(
        &app,
        "d1",
        &format!("metric=door,fw&{range}&interval=1h&fn=count"),
    )
    .await;
    assert_eq!(
        data["series"][0]["buckets"],
        json!([{"ts": "2026-01-01T00:00:00Z", "count": 2}])
    );
    assert_eq!(
        data["series"][1]["buckets"],
        json!([{"ts": "2026-01-01T00:00:00Z", "count": 1}])
    );
    // A metric with some numbers: the numeric functions use the numbers, count counts all.
    let data = aggregate(
        &app,
        "d1",
        &format!("metric=mixed&{range}&interval=1h&fn=avg,count,last"),
    )
    .await;
    assert_eq!(
        data["series"][0]["buckets"],
        json!([{"ts": "2026-01-01T00:00:00Z", "avg": 3.0, "count": 3, "last": 4.0}])
    );
    for fns in ["avg", "min", "max", "sum", "first", "last"] {
        let (status, body) = app
            .get(
                &format!(
                    "/api/v1/devices/d1/readings/aggregate?metric=door&{range}&interval=1h&fn={fns}"
                ),
                app.admin_key(),
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "non_numeric_metric",
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains("door"),
            "{body}"
        );
    }
    app.shutdown().await;
}

/// Hourly and daily intervals answer from rollups (whole hours and days) plus raw rows for
/// the ragged edges, and equal the aggregate over raw rows alone, after redeliveries and
/// batches that land in the same rollup bucket at different times.
#[tokio::test]
async fn rollup_answers_equal_the_raw_aggregate() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    let mut all: Vec<Reading> = Vec::new();
    // Three days and a bit, every 7 minutes, plus a few stragglers.
    let mut index = 0;
    let mut ts = T0 - 3 * HOUR;
    while ts < T0 + 3 * 24 * HOUR + 2 * HOUR {
        all.push(number("temp", ts, value_of(index)));
        index += 1;
        ts += 7 * MINUTE;
    }
    let count = all.len() as i64;
    // Batches interleaved in time (each touches many rollup buckets), one sent twice.
    let mut batches: Vec<Vec<Reading>> = vec![Vec::new(); 5];
    for (i, reading) in all.into_iter().enumerate() {
        batches[i % 5].push(reading);
    }
    for batch in &batches {
        publish(&app, "default", "d1", batch.clone()).await;
    }
    publish(&app, "default", "d1", batches[2].clone()).await;
    eventually("readings stored", Duration::from_secs(20), || async {
        (stored(&app, "d1").await == count).then_some(())
    })
    .await;
    // The writer has also processed the duplicate once it is acked.
    let consumer = app
        .context
        .jetstream
        .get_stream(
            app.context
                .subjects
                .stream_name(fieldline_proto::Stream::Telemetry),
        )
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(query_api::WRITER_CONSUMER)
        .await
        .unwrap();
    eventually("every batch acked", Duration::from_secs(10), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        }
    })
    .await;

    let fns = "fn=avg,min,max,sum,count,first,last";
    for (interval, start, end, sources) in [
        (
            "1h",
            T0 - 2 * HOUR - 30 * MINUTE,
            T0 + 3 * 24 * HOUR + 10 * MINUTE,
            json!(["raw", "rollup_1h"]),
        ),
        ("3h", T0, T0 + 2 * 24 * HOUR, json!(["rollup_1h"])),
        (
            "1d",
            T0 - 3 * HOUR + 1,
            T0 + 3 * 24 * HOUR + HOUR,
            json!(["raw", "rollup_1h", "rollup_1d"]),
        ),
    ] {
        let range = format!(
            "metric=temp&start={}&end={}&interval={interval}&{fns}",
            rfc3339(start),
            rfc3339(end)
        );
        let auto = aggregate(&app, "d1", &range).await;
        let raw = aggregate(&app, "d1", &format!("{range}&source=raw")).await;
        assert_eq!(auto["sources"], sources, "{interval}");
        assert_eq!(raw["sources"], json!(["raw"]));
        assert_eq!(auto["series"], raw["series"], "{interval}");
        assert!(
            !auto["series"][0]["buckets"].as_array().unwrap().is_empty(),
            "{interval}"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_aggregate_parameters_get_400_naming_them() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    for (query, parameter) in [
        ("interval=5m", "metric"),
        ("metric=t", "interval"),
        ("metric=t&interval=5x", "interval"),
        ("metric=t&interval=0s", "interval"),
        ("metric=t&interval=m", "interval"),
        ("metric=t&interval=400d", "interval"),
        ("metric=t&interval=1s&start=-1y", "start"),
        ("metric=t&interval=1s&start=-30d", "interval"),
        ("metric=t&interval=5m&fn=median", "fn"),
        ("metric=t&interval=5m&fn=avg,", "fn"),
        ("metric=t&interval=5m&fill=zero", "fill"),
        ("metric=t&interval=5m&source=cache", "source"),
        ("metric=t&interval=5m&end=later", "end"),
        ("metric=t&interval=5m&start=now&end=-1h", "start"),
        ("metric=a%20b&interval=5m", "metric"),
        ("metric=t&interval=5m&limit=3", "query"),
    ] {
        let (status, body) = app
            .get(
                &format!("/api/v1/devices/d1/readings/aggregate?{query}"),
                app.admin_key(),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{parameter}:")),
            "{query}: {body}"
        );
    }
    app.shutdown().await;
}

/// A read that runs past `query_statement_timeout` is cancelled by Postgres and answers 503
/// `query_timeout`; the writer, on its own pool, is not subject to it.
#[tokio::test]
async fn a_query_past_the_statement_timeout_is_503_and_the_writer_goes_on() {
    let app = crate::spawn_query_with(|mut config| {
        config.query_statement_timeout = Duration::from_millis(1);
        config
    })
    .await;
    app.create_device("d1").await;
    let client = app.env.pg().await;
    let series = vec![("default".to_owned(), "d1".to_owned(), "temp".to_owned())];
    // 200,000 readings a second apart: aggregating them takes far longer than 1 ms.
    query_api::bulk::load_numbers(
        &client,
        &series,
        (T0, T0 + 200_000 * 1_000_000),
        (0..200_000).map(|i| (0, T0 + i * 1_000_000, i as f64)),
    )
    .await
    .unwrap();
    let (status, body) = app
        .get(
            &format!(
                "/api/v1/devices/d1/readings/aggregate?metric=temp&start={}&end={}&interval=1m&fn=avg,first,last&source=raw",
                rfc3339(T0),
                rfc3339(T0 + 200_000 * 1_000_000)
            ),
            app.admin_key(),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "query_timeout",
    );
    publish(&app, "default", "d1", vec![number("hum", T0, 1.0)]).await;
    eventually("the writer stores", Duration::from_secs(10), || async {
        (stored(&app, "d1").await == 200_001).then_some(())
    })
    .await;
    app.shutdown().await;
}
