//! The compression task: readings of closed days move from their daily partition into
//! per-series blocks ([`crate::blocks`]), a slice of series at a time, each slice in one
//! transaction that writes its blocks and deletes the rows they hold, so a read sees every
//! reading exactly once whenever it looks, and an interrupted run leaves nothing half done.
//!
//! A day is guarded by an advisory lock: writers hold it shared while they store readings of
//! that day (and look at its blocks first when it has any), the compression task holds it
//! exclusive while it moves a slice. Several instances may run the task at once: they take
//! turns on each day, and a slice already moved is found empty. Readings that arrive late for
//! a compressed day are stored as rows, and the next run merges them into the day's blocks.

use chrono::{Days, NaiveDate};
use deadpool_postgres::Pool;
use fieldline_common::time::from_us;
use tokio_postgres::{GenericClient, Row, error::SqlState};

use crate::blocks::{self, MAX_BLOCK_READINGS, Point};

/// Rows one transaction moves at most (a series with more in one day moves alone).
const SLICE_ROWS: i64 = 200_000;
/// Series looked at together (a day of 10-second readings of these is 276,480 rows).
const SLICE_SERIES: i64 = 32;
/// The advisory lock class of a day (its second key is the day's number since 1970).
pub const DAY_LOCK: &str = "fieldline-telemetry-day";
/// How long the final `TRUNCATE` of an emptied partition waits for readers (and for an
/// autovacuum of it, which gives way after `deadlock_timeout`, 1 s by default) before it
/// gives up until the next run.
const TRUNCATE_LOCK_TIMEOUT: &str = "3s";

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compressed {
    pub days: Vec<NaiveDate>,
    pub readings: u64,
    pub blocks: u64,
}

/// The number of a day in the day lock.
pub fn day_number(day: NaiveDate) -> i32 {
    (day - NaiveDate::default()).num_days() as i32
}

/// The [`day_number`] of the UTC day of `ts_us`, exactly `day_number(day_of(ts_us))`, without
/// building a date: the writer asks it several times for each reading it stores.
pub fn day_number_of(ts_us: i64) -> i32 {
    const DAY_US: i64 = 86_400_000_000;
    // chrono's dates reach about 262,000 years either side of year 0: inside 200,000 years
    // of 1970 the division is the day; beyond, `from_us` falls back to the epoch, and so does
    // this (no reading there is ever stored; the window refuses it).
    const WITHIN_DAYS: i64 = 200_000 * 366;
    let day = ts_us.div_euclid(DAY_US);
    if day.abs() <= WITHIN_DAYS {
        day as i32
    } else {
        day_number(crate::repo::day_of(ts_us))
    }
}

/// The daily partitions of `telemetry.readings`: (table name, day), oldest first.
pub async fn partitions(
    client: &impl GenericClient,
) -> Result<Vec<(String, NaiveDate)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
             WHERE n.nspname = 'telemetry' AND p.relname = 'readings'
             ORDER BY c.relname",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let day = name
                .strip_prefix("readings_")
                .and_then(|day| NaiveDate::parse_from_str(day, "%Y%m%d").ok())?;
            Some((name, day))
        })
        .collect())
}

/// [start, end) of a UTC day.
pub fn day_bounds(
    day: NaiveDate,
) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let start = day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let end = day
        .checked_add_days(Days::new(1))
        .and_then(|next| next.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(start);
    (start, end)
}

/// Takes a day's lock exclusive for the rest of the transaction.
pub async fn lock_day(
    client: &impl GenericClient,
    day: NaiveDate,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), $2)",
            &[&DAY_LOCK, &day_number(day)],
        )
        .await
        .map(|_| ())
}

/// The blocks of some series ($1) that start in a day ($2 to $3), in series and time order.
pub const DAY_BLOCKS_SQL: &str = "SELECT series_id, data FROM telemetry.blocks
     WHERE series_id = ANY($1) AND first_ts >= $2 AND first_ts < $3
     ORDER BY series_id, first_ts";

/// Deletes the blocks of some series ($1) that start in a day ($2 to $3).
pub const DELETE_DAY_BLOCKS_SQL: &str = "DELETE FROM telemetry.blocks
     WHERE series_id = ANY($1) AND first_ts >= $2 AND first_ts < $3";

/// Marks `days` as holding blocks (the reads look there for them).
pub async fn mark_compressed(
    client: &impl GenericClient,
    days: &[NaiveDate],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO telemetry.compressed_days (day) SELECT * FROM UNNEST($1::date[])
             ON CONFLICT DO NOTHING",
            &[&days],
        )
        .await
        .map(|_| ())
}

/// The new blocks of some series for one day, as columns for one statement.
#[derive(Default)]
pub struct DayBlocks {
    series_ids: Vec<i32>,
    first: Vec<chrono::DateTime<chrono::Utc>>,
    last: Vec<chrono::DateTime<chrono::Utc>>,
    count: Vec<i32>,
    data: Vec<Vec<u8>>,
}

/// A series' points of one day encoded as blocks: (first time, last time, count, data) each.
pub type EncodedSeries = Vec<(i64, i64, i32, Vec<u8>)>;

impl DayBlocks {
    /// Encodes a series' `points` (in time order) into blocks of at most
    /// [`MAX_BLOCK_READINGS`]; nothing is added when one fails.
    pub fn add(&mut self, series_id: i32, points: &[Point]) -> anyhow::Result<()> {
        let encoded = Self::encode(points)?;
        self.push(series_id, encoded);
        Ok(())
    }

    /// The blocks of a series' `points` (in time order), not yet added: pure work, which
    /// may run on any thread.
    pub fn encode(points: &[Point]) -> anyhow::Result<EncodedSeries> {
        points
            .chunks(MAX_BLOCK_READINGS)
            .map(|chunk| {
                let data = blocks::encode(chunk)?;
                Ok((
                    chunk[0].0,
                    chunk[chunk.len() - 1].0,
                    chunk.len() as i32,
                    data,
                ))
            })
            .collect()
    }

    /// Adds a series' blocks made by [`DayBlocks::encode`].
    pub fn push(&mut self, series_id: i32, encoded: EncodedSeries) {
        for (first, last, count, data) in encoded {
            self.series_ids.push(series_id);
            self.first.push(from_us(first));
            self.last.push(from_us(last));
            self.count.push(count);
            self.data.push(data);
        }
    }

    /// Inserts the blocks held (the caller has deleted what they replace, under the days'
    /// locks taken exclusive).
    pub async fn insert(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "INSERT INTO telemetry.blocks (series_id, first_ts, last_ts, count, data)
                 SELECT * FROM UNNEST($1::int4[], $2::timestamptz[], $3::timestamptz[], $4::int4[], $5::bytea[])",
                &[&self.series_ids, &self.first, &self.last, &self.count, &self.data],
            )
            .await
            .map(|_| ())
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.series_ids.len()
    }

    /// Replaces the blocks of `series_ids` on `day` with these, and marks the day as holding
    /// blocks. The caller holds the day's lock exclusive.
    pub async fn replace(
        &self,
        client: &impl GenericClient,
        day: NaiveDate,
        series_ids: &[i32],
    ) -> Result<(), tokio_postgres::Error> {
        let (start, end) = day_bounds(day);
        client
            .execute(DELETE_DAY_BLOCKS_SQL, &[&series_ids, &start, &end])
            .await?;
        self.insert(client).await?;
        mark_compressed(client, &[day]).await
    }
}

/// A row of a partition (series id, time, the three value columns) as a block point.
fn point(row: &Row) -> Option<Point> {
    let fieldline_common::time::EpochMicros(ts_us) = row.get(1);
    Some((ts_us, blocks::row_value(row, 2)?))
}

/// The first day not yet closed for `compress_after`: days before it are compressed.
pub fn closed_before(compress_after: std::time::Duration) -> NaiveDate {
    let now = chrono::Utc::now();
    let after = chrono::Duration::from_std(compress_after).unwrap_or(chrono::Duration::MAX);
    now.checked_sub_signed(after)
        .map_or(NaiveDate::MIN, |t| t.date_naive())
}

/// [`compress_before`] on the database at `url` (tools and benchmarks; the service runs it in
/// its maintenance round).
pub async fn compress_database(url: &str, before: NaiveDate) -> anyhow::Result<Compressed> {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url.to_owned());
    let pool = config.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?;
    compress_before(&pool, before).await
}

/// Compresses every day before `before` that still has rows.
pub async fn compress_before(pool: &Pool, before: NaiveDate) -> anyhow::Result<Compressed> {
    let mut done = Compressed::default();
    let days = {
        let client = pool.get().await?;
        partitions(&**client).await?
    };
    for (name, day) in days {
        if day >= before {
            break;
        }
        let (readings, blocks) = compress_day(pool, &name, day).await?;
        if readings > 0 {
            done.days.push(day);
            done.readings += readings;
            done.blocks += blocks;
        }
    }
    if done.readings > 0 {
        metrics::counter!("fieldline_compressed_readings_total").increment(done.readings);
    }
    Ok(done)
}

/// Moves the rows of one day's partition into blocks; returns (readings moved, blocks written).
/// Series are taken from the dictionary [`SLICE_SERIES`] at a time (each statement names
/// its series: on a distributed database, a router query to their shards).
async fn compress_day(pool: &Pool, name: &str, day: NaiveDate) -> anyhow::Result<(u64, u64)> {
    let (mut moved, mut written) = (0u64, 0u64);
    let mut after = i32::MIN;
    let select = format!(
        "SELECT series_id, ts, value_num, value_bool, value_text FROM telemetry.{name}
         WHERE series_id = ANY($1) ORDER BY series_id, ts LIMIT $2"
    );
    let delete = format!("DELETE FROM telemetry.{name} WHERE series_id = ANY($1)");
    if is_empty(&**pool.get().await?, name).await? {
        return Ok((0, 0));
    }
    loop {
        let client = pool.get().await?;
        let candidates: Vec<i32> = client
            .query(
                "SELECT series_id FROM telemetry.series WHERE series_id > $1
                 ORDER BY series_id LIMIT $2",
                &[&after, &SLICE_SERIES],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        drop(client);
        let Some(&last_candidate) = candidates.last() else {
            break;
        };
        let mut slice = candidates;
        // A slice holds at most SLICE_ROWS rows, or one series whatever its rows: cut
        // before the series the limit fell in, and go on from there.
        while !slice.is_empty() {
            let (rows, taken) = compress_slice(pool, &select, &delete, day, &slice).await?;
            moved += rows;
            written += taken.1;
            match taken.0 {
                None => break,
                Some(rest_from) => slice.retain(|id| *id >= rest_from),
            }
        }
        after = last_candidate;
    }
    if moved > 0 {
        truncate_if_empty(pool, name, day).await?;
    }
    Ok((moved, written))
}

/// One transaction: the rows of `slice`'s series (those that fit in [`SLICE_ROWS`]) merged
/// into their blocks of the day and deleted. Returns the rows moved and (the first series
/// left for another transaction, blocks written).
async fn compress_slice(
    pool: &Pool,
    select: &str,
    delete: &str,
    day: NaiveDate,
    slice: &[i32],
) -> anyhow::Result<(u64, (Option<i32>, u64))> {
    let (day_start, day_end) = day_bounds(day);
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    lock_day(&*transaction, day).await?;
    let mut rows = transaction
        .query(select, &[&slice, &(SLICE_ROWS + 1)])
        .await?;
    if rows.is_empty() {
        return Ok((0, (None, 0)));
    }
    let mut rest_from = None;
    if rows.len() as i64 > SLICE_ROWS {
        let first: i32 = rows[0].get(0);
        let last: i32 = rows[rows.len() - 1].get(0);
        if first == last {
            // One series over the limit: that series alone, whole.
            rows = transaction
                .query(select, &[&vec![first], &i64::MAX])
                .await?;
            rest_from = Some(first + 1);
        } else {
            rows.retain(|row| row.get::<_, i32>(0) < last);
            rest_from = Some(last);
        }
    }
    let mut series: Vec<(i32, Vec<Point>)> = Vec::new();
    for row in &rows {
        let id: i32 = row.get(0);
        let Some(point) = point(row) else { continue };
        match series.last_mut() {
            Some((last, points)) if *last == id => points.push(point),
            _ => series.push((id, vec![point])),
        }
    }
    let ids: Vec<i32> = series.iter().map(|(id, _)| *id).collect();
    // Blocks this day already has for these series (rows that came in late): merged.
    let existing = transaction
        .query(DAY_BLOCKS_SQL, &[&ids, &day_start, &day_end])
        .await?;
    let mut earlier: std::collections::HashMap<i32, Vec<Point>> = Default::default();
    for row in &existing {
        earlier
            .entry(row.get(0))
            .or_default()
            .extend(blocks::decode(row.get(1))?);
    }
    let mut new_blocks = DayBlocks::default();
    for (id, points) in series {
        let points = match earlier.remove(&id) {
            Some(mut old) => {
                old.extend(points);
                // Stable: of two readings at one time (never stored twice by the writer),
                // the block's comes first.
                old.sort_by_key(|(ts, _)| *ts);
                old
            }
            None => points,
        };
        new_blocks.add(id, &points)?;
    }
    new_blocks.replace(&*transaction, day, &ids).await?;
    // Exactly the rows read: the day lock keeps writers of this day out until commit.
    let deleted = transaction.execute(delete, &[&ids]).await?;
    transaction.commit().await?;
    Ok((deleted, (rest_from, new_blocks.blocks() as u64)))
}

/// Whether a day's partition has no rows: asked once a day each run, before the series are
/// walked, and before the emptied partition is truncated.
async fn is_empty(client: &impl GenericClient, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            &format!(
                "SELECT NOT EXISTS (SELECT 1 FROM telemetry.{name}) /* shard-wide: once a day and run */"
            ),
            &[],
        )
        .await?
        .get(0))
}

/// Gives an emptied partition's space back (its index too, which `DELETE` and `VACUUM`
/// would keep). Waits at most [`TRUNCATE_LOCK_TIMEOUT`] for readers; else the next run
/// tries again, and the empty rows are vacuumed meanwhile.
async fn truncate_if_empty(pool: &Pool, name: &str, day: NaiveDate) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), $2)",
            &[&DAY_LOCK, &day_number(day)],
        )
        .await?;
    transaction
        .batch_execute(&format!(
            "SET LOCAL lock_timeout = '{TRUNCATE_LOCK_TIMEOUT}'"
        ))
        .await?;
    if !is_empty(&*transaction, name).await? {
        return Ok(());
    }
    match transaction
        .batch_execute(&format!("TRUNCATE telemetry.{name}"))
        .await
    {
        Ok(()) => {
            transaction.commit().await?;
            Ok(())
        }
        Err(error) if error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
            tracing::info!(
                partition = name,
                "readers kept an emptied partition; truncating it later"
            );
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::repo::day_of;

    proptest! {
        #[test]
        fn the_day_number_of_a_time_is_that_of_its_date(ts_us in any::<i64>()) {
            prop_assert_eq!(day_number_of(ts_us), day_number(day_of(ts_us)));
        }

        #[test]
        fn around_midnight_too(day in -100_000i64..100_000, offset in -2i64..=2) {
            let ts_us = day * 86_400_000_000 + offset;
            prop_assert_eq!(day_number_of(ts_us), day_number(day_of(ts_us)));
        }
    }

    #[test]
    fn at_the_ends_of_chronos_range() {
        for ts_us in [i64::MIN, i64::MAX, 0, -1, 1] {
            assert_eq!(day_number_of(ts_us), day_number(day_of(ts_us)), "{ts_us}");
        }
    }
}
