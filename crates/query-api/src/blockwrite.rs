//! Readings of a closed day written straight into its blocks, when a transaction brings many
//! of them for each series (a backfill or an import): the day's blocks and late rows of those
//! series are read, the new readings merged in (what is there already wins, as the rows'
//! `ON CONFLICT DO NOTHING` does), and the blocks written again, under the day's lock taken
//! exclusive. A few readings of a closed day (a device catching up) are stored as rows
//! instead, and the next compression run merges them: rewriting a day's block for each small
//! batch would cost far more than the rows.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use fieldline_common::spread;
use fieldline_proto::v1::reading::Value;
use tokio_postgres::{GenericClient, types::ToSql};

use crate::{
    blocks::{self, Point},
    compress::{self, DayBlocks, EncodedSeries, day_bounds, day_number_of},
    moves::{Moves, Stored},
    repo::SeriesRow,
};

/// Fewest readings a series, on average, for a closed day of a transaction to be written into
/// blocks rather than rows.
pub const MIN_READINGS_PER_SERIES: usize = 100;

/// Day numbers ([`crate::compress::day_number`]), hashed fast: asked once for each reading of
/// a transaction.
pub type Days = foldhash::HashSet<i32>;

/// The days of `rows` (by [`day_number_of`]) to write into blocks: closed (before
/// `closed_before`) and with at least [`MIN_READINGS_PER_SERIES`] readings a series.
pub fn direct_days(rows: &[SeriesRow<'_>], closed_before: i32) -> Days {
    // Readings and series of each closed day, taken in runs of one (day, series): the
    // writer's rows come in day, series and time order, so most rows only count.
    let mut days: foldhash::HashMap<i32, (usize, Days)> = Default::default();
    let mut add = |(day, series_id, count): (i32, i32, usize)| {
        let entry = days.entry(day).or_default();
        entry.0 += count;
        entry.1.insert(series_id);
    };
    let mut run: Option<(i32, i32, usize)> = None;
    for (series_id, ts_us, _) in rows {
        let day = day_number_of(*ts_us);
        if day >= closed_before {
            continue;
        }
        match &mut run {
            Some((run_day, run_series, count)) if *run_day == day && run_series == series_id => {
                *count += 1;
            }
            _ => {
                if let Some(done) = run.replace((day, *series_id, 1)) {
                    add(done);
                }
            }
        }
    }
    if let Some(done) = run {
        add(done);
    }
    days.into_iter()
        .filter(|(_, (count, series))| *count >= MIN_READINGS_PER_SERIES * series.len())
        .map(|(day, _)| day)
        .collect()
}

/// A reading of the transaction: time and value.
type NewPoint<'v> = (i64, &'v Value);

fn stored(value: &Value) -> Stored<'_> {
    match value {
        Value::Number(number) => Stored::Number(*number),
        Value::Boolean(flag) => Stored::Boolean(*flag),
        Value::Text(text) => Stored::Text(text),
    }
}

/// Fewest points (new and stored) of a transaction's direct days for their merging and
/// encoding to be spread over several threads.
const PARALLEL_FROM_POINTS: usize = 20_000;

/// One series' part of one direct day: what it holds already, and what comes.
struct Unit<'r, 'v> {
    day: i32,
    series_id: i32,
    new: Vec<NewPoint<'v>>,
    old_blocks: Vec<&'r [u8]>,
    old_rows: Vec<Point>,
}

/// A day (its number, start and end) and some of its series.
type DaySeries = (i32, DateTime<Utc>, DateTime<Utc>, Vec<i32>);

/// What becomes of a [`Unit`].
enum Merged<'v> {
    /// Everything new is stored already, all in blocks (a redelivery): nothing to write.
    Unchanged,
    /// The series' new blocks for the day, and what the readings new to it move.
    Write(EncodedSeries, Moves),
    /// Readings that go to rows instead: the day's blocks cannot be read, or the new ones
    /// cannot be made (logged; never lost).
    Rows(Vec<NewPoint<'v>>),
}

/// Merges a unit's new readings into what the day holds (what is there already wins),
/// encodes the result, and takes in what the new readings move. Pure work: it may run on any
/// thread.
fn merge<'v>(unit: Unit<'_, 'v>) -> Merged<'v> {
    let Unit {
        series_id,
        mut new,
        old_blocks,
        old_rows,
        ..
    } = unit;
    let had_rows = !old_rows.is_empty();
    let mut old: Vec<Point> = Vec::new();
    for data in old_blocks {
        match blocks::decode(data) {
            Ok(points) => old.extend(points),
            Err(error) => {
                tracing::error!(
                    series_id,
                    error = format!("{error:#}"),
                    "a block cannot be decoded; its series' readings go to rows"
                );
                return Merged::Rows(new);
            }
        }
    }
    old.extend(old_rows);
    old.sort_by_key(|(ts, _)| *ts);
    // Of readings at one time, the first (stored before, or first in the batch) wins.
    new.sort_by_key(|(ts, _)| *ts);
    new.dedup_by_key(|(ts, _)| *ts);
    let mut merged: Vec<Point> = Vec::with_capacity(old.len() + new.len());
    let mut fresh: Vec<NewPoint<'v>> = Vec::with_capacity(new.len());
    let mut old = old.into_iter().peekable();
    for (ts, value) in new {
        while let Some(point) = old.next_if(|(old_ts, _)| *old_ts < ts) {
            merged.push(point);
        }
        if old.peek().is_some_and(|(old_ts, _)| *old_ts == ts) {
            continue;
        }
        fresh.push((ts, value));
        merged.push((ts, value.clone()));
    }
    merged.extend(old);
    if fresh.is_empty() && !had_rows {
        return Merged::Unchanged;
    }
    match DayBlocks::encode(&merged) {
        Ok(encoded) => {
            let mut moves = Moves::default();
            moves.add_run(
                series_id,
                fresh.iter().map(|(ts, value)| (*ts, stored(value))),
            );
            Merged::Write(encoded, moves)
        }
        Err(error) => {
            // Not expected (pco refuses no sorted numbers); the new readings go to rows, the
            // old stay where they are.
            tracing::error!(
                series_id,
                error = format!("{error:#}"),
                "a block cannot be encoded"
            );
            Merged::Rows(fresh)
        }
    }
}

/// [`merge`] of every unit, in order; spread over the cores when there is enough of them
/// ([`fieldline_common::spread`]).
fn merge_all<'v>(units: Vec<Unit<'_, 'v>>) -> Vec<Merged<'v>> {
    let total: usize = units.iter().map(unit_size).sum();
    let threads = if total < PARALLEL_FROM_POINTS {
        1
    } else {
        spread::threads()
    };
    spread::map_in_order(units, threads, unit_size, merge)
}

/// About how much work a unit is: its points (a stored block counts as a thousand).
fn unit_size(unit: &Unit<'_, '_>) -> usize {
    unit.new.len() + unit.old_rows.len() + unit.old_blocks.len() * 1024
}

/// Writes the readings of `direct` days into blocks (the caller holds those days' locks
/// exclusive) and adds what is new to `moves`; returns the rest, for the table. A series
/// whose blocks cannot be read keeps its readings as rows (logged; never lost).
///
/// Every day's blocks and late rows are read in one pipelined round, the days merged and
/// encoded at once ([`merge_all`]), and the new blocks written in three rounds, whatever the
/// number of days.
pub async fn store<'v>(
    client: &impl GenericClient,
    rows: &[SeriesRow<'v>],
    direct: &Days,
    moves: &mut Moves,
) -> Result<Vec<SeriesRow<'v>>, tokio_postgres::Error> {
    if direct.is_empty() {
        return Ok(rows.to_vec());
    }
    let mut table = Vec::new();
    let mut by_day: BTreeMap<i32, BTreeMap<i32, Vec<NewPoint<'v>>>> = BTreeMap::new();
    // Taken in runs of one (day, series), as the writer's rows come, so that a run costs
    // one lookup rather than each of its readings.
    let mut run: Option<(i32, i32, Vec<NewPoint<'v>>)> = None;
    let mut add = |(day, series_id, points): (i32, i32, Vec<NewPoint<'v>>)| {
        by_day
            .entry(day)
            .or_default()
            .entry(series_id)
            .or_default()
            .extend(points);
    };
    for row in rows {
        let day = day_number_of(row.1);
        if !direct.contains(&day) {
            table.push(*row);
            continue;
        }
        match &mut run {
            Some((run_day, run_series, points)) if *run_day == day && *run_series == row.0 => {
                points.push((row.1, row.2));
            }
            _ => {
                if let Some(done) = run.replace((day, row.0, vec![(row.1, row.2)])) {
                    add(done);
                }
            }
        }
    }
    if let Some(done) = run {
        add(done);
    }
    // Each day's bounds and series, then what those hold: one round for every day.
    let days: Vec<DaySeries> = by_day
        .iter()
        .map(|(day, series)| {
            let (start, end) =
                day_bounds(chrono::NaiveDate::default() + chrono::Days::new(*day as u64));
            (*day, start, end, series.keys().copied().collect())
        })
        .collect();
    let held = futures::future::try_join_all(days.iter().map(|(_, start, end, ids)| async move {
        let params: [&(dyn ToSql + Sync); 3] = [ids, start, end];
        futures::try_join!(
            client.query(compress::DAY_BLOCKS_SQL, &params),
            client.query(
                "SELECT series_id, ts, value_num, value_bool, value_text FROM telemetry.readings
                 WHERE series_id = ANY($1) AND ts >= $2 AND ts < $3",
                &params,
            ),
        )
    }))
    .await?;
    let mut units = Vec::new();
    let mut days_with_rows: HashSet<i32> = HashSet::new();
    for ((day, series), (old_blocks, old_rows)) in by_day.into_iter().zip(&held) {
        let mut blocks_of: HashMap<i32, Vec<&[u8]>> = HashMap::new();
        for row in old_blocks {
            blocks_of.entry(row.get(0)).or_default().push(row.get(1));
        }
        let mut rows_of: HashMap<i32, Vec<Point>> = HashMap::new();
        for row in old_rows {
            days_with_rows.insert(day);
            let fieldline_common::time::EpochMicros(ts_us) = row.get(1);
            if let Some(value) = blocks::row_value(row, 2) {
                rows_of.entry(row.get(0)).or_default().push((ts_us, value));
            }
        }
        for (series_id, new) in series {
            units.push(Unit {
                day,
                series_id,
                new,
                old_blocks: blocks_of.remove(&series_id).unwrap_or_default(),
                old_rows: rows_of.remove(&series_id).unwrap_or_default(),
            });
        }
    }
    let keys: Vec<(i32, i32)> = units
        .iter()
        .map(|unit| (unit.day, unit.series_id))
        .collect();
    let mut new_blocks = DayBlocks::default();
    let mut written: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for ((day, series_id), merged) in keys.into_iter().zip(merge_all(units)) {
        match merged {
            Merged::Unchanged => {}
            Merged::Rows(points) => {
                table.extend(points.iter().map(|(ts, value)| (series_id, *ts, *value)));
            }
            Merged::Write(encoded, unit_moves) => {
                new_blocks.push(series_id, encoded);
                // A unit is a whole day of its series: its buckets are its own.
                moves.absorb(unit_moves);
                written.entry(day).or_default().push(series_id);
            }
        }
    }
    if written.is_empty() {
        return Ok(table);
    }
    // In three rounds: the blocks replaced, then the new ones, then the days marked and the
    // rows now in blocks deleted. Exactly the rows read: the day locks keep writers out.
    let bounds: HashMap<i32, (DateTime<Utc>, DateTime<Utc>)> = days
        .iter()
        .map(|(day, start, end, _)| (*day, (*start, *end)))
        .collect();
    let written: Vec<DaySeries> = written
        .into_iter()
        .map(|(day, ids)| (day, bounds[&day].0, bounds[&day].1, ids))
        .collect();
    for_each_day(client, compress::DELETE_DAY_BLOCKS_SQL, written.iter()).await?;
    new_blocks.insert(client).await?;
    let dates: Vec<chrono::NaiveDate> = written
        .iter()
        .map(|(_, start, _, _)| start.date_naive())
        .collect();
    let mark = compress::mark_compressed(client, &dates);
    let moved = for_each_day(
        client,
        "DELETE FROM telemetry.readings WHERE series_id = ANY($1) AND ts >= $2 AND ts < $3",
        written
            .iter()
            .filter(|(day, ..)| days_with_rows.contains(day)),
    );
    futures::try_join!(mark, moved)?;
    Ok(table)
}

/// `sql` (the series as $1, the day's start and end as $2 and $3) for each of `days`,
/// pipelined.
async fn for_each_day<'d>(
    client: &impl GenericClient,
    sql: &str,
    days: impl Iterator<Item = &'d DaySeries>,
) -> Result<(), tokio_postgres::Error> {
    futures::future::try_join_all(days.map(|(_, start, end, ids)| async move {
        let params: [&(dyn ToSql + Sync); 3] = [ids, start, end];
        client.execute(sql, &params).await
    }))
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`Merged`], comparable.
    #[derive(Debug, PartialEq)]
    enum View {
        Unchanged,
        Write(EncodedSeries, String),
        Rows(Vec<(i64, Value)>),
    }

    fn view(merged: Merged<'_>) -> View {
        let owned = |points: Vec<NewPoint<'_>>| {
            points
                .into_iter()
                .map(|(ts, value)| (ts, value.clone()))
                .collect()
        };
        match merged {
            Merged::Unchanged => View::Unchanged,
            Merged::Write(encoded, moves) => View::Write(encoded, moves.sorted()),
            Merged::Rows(points) => View::Rows(owned(points)),
        }
    }

    /// Spread over threads, the units merge exactly as one by one, in the same order: new
    /// readings alone, over stored blocks and late rows (some at the same times), all stored
    /// already, and a block that cannot be read.
    #[test]
    fn units_merged_on_several_threads_come_back_as_merged_one_by_one() {
        let values: Vec<Value> = (0..3000)
            .map(|i| match i % 5 {
                0 => Value::Text(format!("t{i}")),
                1 => Value::Boolean(i % 2 == 0),
                _ => Value::Number(f64::from(i) / 7.0),
            })
            .collect();
        let stored: Vec<Point> = (0..800i64)
            .map(|i| (i * 3_000_000, Value::Number(i as f64)))
            .collect();
        let block = blocks::encode(&stored).unwrap();
        let junk = b"not a block".to_vec();
        let units = || {
            (0..40)
                .map(|series| {
                    let new: Vec<NewPoint<'_>> = values
                        .iter()
                        .enumerate()
                        .map(|(i, value)| (((i * 7919) % 3000) as i64 * 1_000_000, value))
                        .collect();
                    let (new, old_blocks, old_rows): (_, Vec<&[u8]>, Vec<Point>) = match series % 4
                    {
                        0 => (new, Vec::new(), Vec::new()),
                        1 => (new, vec![block.as_slice()], stored[..10].to_vec()),
                        2 => (
                            stored
                                .iter()
                                .take(50)
                                .map(|(ts, value)| (*ts, value))
                                .collect(),
                            vec![block.as_slice()],
                            Vec::new(),
                        ),
                        _ => (new, vec![junk.as_slice()], Vec::new()),
                    };
                    Unit {
                        day: series / 10,
                        series_id: series,
                        new,
                        old_blocks,
                        old_rows,
                    }
                })
                .collect::<Vec<_>>()
        };
        let one_by_one: Vec<View> = units().into_iter().map(merge).map(view).collect();
        assert!(matches!(one_by_one[0], View::Write(..)));
        assert!(matches!(one_by_one[2], View::Unchanged));
        assert!(matches!(one_by_one[3], View::Rows(..)));
        for threads in [2, 3, 4] {
            let spread: Vec<View> = spread::map_in_order(units(), threads, unit_size, merge)
                .into_iter()
                .map(view)
                .collect();
            assert_eq!(spread, one_by_one, "{threads} threads");
        }
        let all: Vec<View> = merge_all(units()).into_iter().map(view).collect();
        assert_eq!(all, one_by_one);
    }
}
