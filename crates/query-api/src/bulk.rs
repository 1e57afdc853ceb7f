//! Bulk loading of numeric readings straight into the product's tables, for benchmarks and
//! tests that need millions of rows fast: the writer's series mapping and partitions, then
//! binary `COPY`, then the series statistics and rollups the writer would have maintained
//! (computed here while the rows stream, and merged exactly as the writer merges them). In
//! production readings come in through the bus and the writer.

use std::{collections::HashMap, pin::pin};

use anyhow::Context as _;
use chrono::{DateTime, Days, Utc};
use fieldline_common::time::from_us;
use tokio_postgres::{Client, binary_copy::BinaryCopyInWriter, types::Type};

use crate::{
    aggregate::Partial,
    repo::{ROLLUP_MERGE, SeriesKey, day_of, ensure_partition, upsert_series},
};

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;

fn one(ts_us: i64, value: f64) -> Partial {
    Partial {
        count: 1,
        num_count: 1,
        sum: Some(value),
        min: Some(value),
        max: Some(value),
        first: Some((ts_us, value)),
        last: Some((ts_us, value)),
    }
}

/// Loads `readings` — (index into `series`, epoch µs, value) with every time inside
/// `[start_us, end_us)` — into a database migrated by query-api. Returns the rows copied.
/// The (series, time) pairs must be new: `COPY` has no `ON CONFLICT`.
pub async fn load_numbers(
    client: &Client,
    series: &[SeriesKey],
    (start_us, end_us): (i64, i64),
    readings: impl IntoIterator<Item = (usize, i64, f64)>,
) -> anyhow::Result<u64> {
    let ids = upsert_series(client, series)
        .await
        .context("mapping series")?;
    anyhow::ensure!(ids.len() == series.len(), "series mapping incomplete");
    let mut day = day_of(start_us);
    let last_day = day_of(end_us.saturating_sub(1));
    while day <= last_day {
        ensure_partition(client, day).await?;
        day = day
            .checked_add_days(Days::new(1))
            .context("date overflow")?;
    }
    let sink = client
        .copy_in("COPY telemetry.readings (series_id, ts, value_num) FROM STDIN BINARY")
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[Type::INT4, Type::TIMESTAMPTZ, Type::FLOAT8]
    ));
    let mut totals: Vec<Partial> = vec![Partial::default(); series.len()];
    let mut hourly: HashMap<(usize, i64), Partial> = HashMap::new();
    let mut daily: HashMap<(usize, i64), Partial> = HashMap::new();
    let mut copied = 0u64;
    for (index, ts_us, value) in readings {
        anyhow::ensure!(
            (start_us..end_us).contains(&ts_us),
            "reading at {ts_us} outside the declared range"
        );
        let ts = from_us(ts_us);
        writer.as_mut().write(&[&ids[index], &ts, &value]).await?;
        let reading = one(ts_us, value);
        totals[index].merge(&reading);
        hourly
            .entry((index, ts_us.div_euclid(HOUR_US) * HOUR_US))
            .or_default()
            .merge(&reading);
        daily
            .entry((index, ts_us.div_euclid(DAY_US) * DAY_US))
            .or_default()
            .merge(&reading);
        copied += 1;
    }
    writer.finish().await?;

    // Series statistics and latest values, merged as the writer merges them.
    let mut series_ids: Vec<i32> = Vec::new();
    let mut counts: Vec<i64> = Vec::new();
    let mut firsts: Vec<DateTime<Utc>> = Vec::new();
    let mut lasts: Vec<DateTime<Utc>> = Vec::new();
    let mut last_values: Vec<f64> = Vec::new();
    for (index, total) in totals.iter().enumerate() {
        let (Some(first), Some(last)) = (total.first, total.last) else {
            continue;
        };
        series_ids.push(ids[index]);
        counts.push(total.count);
        firsts.push(from_us(first.0));
        lasts.push(from_us(last.0));
        last_values.push(last.1);
    }
    client
        .execute(
            "UPDATE telemetry.series s
                SET count = s.count + u.n,
                    first_ts = LEAST(s.first_ts, u.first_ts),
                    last_ts = GREATEST(s.last_ts, u.last_ts),
                    last_num = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN u.last_num ELSE s.last_num END,
                    last_bool = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN NULL ELSE s.last_bool END,
                    last_text = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN NULL ELSE s.last_text END
               FROM UNNEST($1::int4[], $2::int8[], $3::timestamptz[], $4::timestamptz[], $5::float8[])
                    AS u(series_id, n, first_ts, last_ts, last_num)
              WHERE s.series_id = u.series_id",
            &[&series_ids, &counts, &firsts, &lasts, &last_values],
        )
        .await
        .context("series statistics")?;

    for (table, buckets) in [("rollup_1h", hourly), ("rollup_1d", daily)] {
        let mut rows: Vec<((usize, i64), Partial)> = buckets.into_iter().collect();
        rows.sort_by_key(|(key, _)| *key);
        // In slices, so no one statement carries millions of array elements.
        for slice in rows.chunks(50_000) {
            let series_id: Vec<i32> = slice.iter().map(|((i, _), _)| ids[*i]).collect();
            let bucket: Vec<DateTime<Utc>> = slice.iter().map(|((_, b), _)| from_us(*b)).collect();
            let count: Vec<i64> = slice.iter().map(|(_, p)| p.count).collect();
            let num_count: Vec<i64> = slice.iter().map(|(_, p)| p.num_count).collect();
            let sum: Vec<Option<f64>> = slice.iter().map(|(_, p)| p.sum).collect();
            let min: Vec<Option<f64>> = slice.iter().map(|(_, p)| p.min).collect();
            let max: Vec<Option<f64>> = slice.iter().map(|(_, p)| p.max).collect();
            let first_ts: Vec<Option<DateTime<Utc>>> = slice
                .iter()
                .map(|(_, p)| p.first.map(|f| from_us(f.0)))
                .collect();
            let first_num: Vec<Option<f64>> =
                slice.iter().map(|(_, p)| p.first.map(|f| f.1)).collect();
            let last_ts: Vec<Option<DateTime<Utc>>> = slice
                .iter()
                .map(|(_, p)| p.last.map(|l| from_us(l.0)))
                .collect();
            let last_num: Vec<Option<f64>> =
                slice.iter().map(|(_, p)| p.last.map(|l| l.1)).collect();
            client
                .execute(
                    &format!(
                        "INSERT INTO telemetry.{table} AS r
                         SELECT * FROM UNNEST($1::int4[], $2::timestamptz[], $3::int8[], $4::int8[],
                                              $5::float8[], $6::float8[], $7::float8[],
                                              $8::timestamptz[], $9::float8[], $10::timestamptz[], $11::float8[])
                         {ROLLUP_MERGE}"
                    ),
                    &[
                        &series_id, &bucket, &count, &num_count, &sum, &min, &max, &first_ts,
                        &first_num, &last_ts, &last_num,
                    ],
                )
                .await
                .context(table)?;
        }
    }
    // VACUUM sets the visibility map, so aggregates are index-only at once (autovacuum would
    // get there on its own after inserts, later).
    for table in ["readings", "series", "rollup_1h", "rollup_1d"] {
        client
            .batch_execute(&format!("VACUUM (ANALYZE) telemetry.{table}"))
            .await?;
    }
    Ok(copied)
}
