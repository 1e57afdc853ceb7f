//! Bulk loading of numeric readings straight into the product's tables, for benchmarks and
//! tests that need millions of rows fast: the writer's series mapping and partitions, then
//! binary `COPY`, then the series statistics and rollups the writer would have maintained
//! ([`crate::moves`], as the writer's `COPY` path does). In production readings come in
//! through the bus and the writer.

use std::pin::pin;

use anyhow::Context as _;
use chrono::Days;
use fieldline_common::time::from_us;
use tokio_postgres::{Client, binary_copy::BinaryCopyInWriter, types::Type};

use crate::{
    moves::{MoveStatements, Moves, Stored},
    repo::{SeriesKey, day_of, ensure_partition, upsert_series},
};

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
    let mut moves = Moves::default();
    let mut copied = 0u64;
    for (index, ts_us, value) in readings {
        anyhow::ensure!(
            (start_us..end_us).contains(&ts_us),
            "reading at {ts_us} outside the declared range"
        );
        let ts = from_us(ts_us);
        writer.as_mut().write(&[&ids[index], &ts, &value]).await?;
        moves.add(ids[index], ts_us, Stored::Number(value));
        copied += 1;
    }
    writer.finish().await?;
    // Series statistics, latest values and rollups, merged as the writer merges them.
    let statements = MoveStatements::prepare(client).await?;
    moves
        .apply(client, &statements)
        .await
        .context("series statistics and rollups")?;
    // VACUUM sets the visibility map, so aggregates are index-only at once (autovacuum would
    // get there on its own after inserts, later).
    for table in ["readings", "series", "rollup_1h", "rollup_1d"] {
        client
            .batch_execute(&format!("VACUUM (ANALYZE) telemetry.{table}"))
            .await?;
    }
    Ok(copied)
}
