//! Readings of a closed day written straight into its blocks, when a transaction brings many
//! of them for each series (a backfill or an import): the day's blocks and late rows of those
//! series are read, the new readings merged in (what is there already wins, as the rows'
//! `ON CONFLICT DO NOTHING` does), and the blocks written again, under the day's lock taken
//! exclusive. A few readings of a closed day (a device catching up) are stored as rows
//! instead, and the next compression run merges them: rewriting a day's block for each small
//! batch would cost far more than the rows.

use std::collections::{BTreeMap, HashMap, HashSet};

use fieldline_proto::v1::reading::Value;
use tokio_postgres::GenericClient;

use crate::{
    blocks::{self, Point},
    compress::{DayBlocks, day_bounds, day_number_of},
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

/// Writes the readings of `direct` days into blocks (the caller holds those days' locks
/// exclusive) and adds what is new to `moves`; returns the rest, for the table. A series
/// whose blocks cannot be read keeps its readings as rows (logged; never lost).
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
    for (day, series) in by_day {
        let (start, end) = day_bounds(chrono::NaiveDate::default() + chrono::Days::new(day as u64));
        let ids: Vec<i32> = series.keys().copied().collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&ids, &start, &end];
        let (old_blocks, old_rows) = futures::try_join!(
            client.query(
                "SELECT series_id, data FROM telemetry.blocks
                 WHERE series_id = ANY($1) AND first_ts >= $2 AND first_ts < $3
                 ORDER BY series_id, first_ts",
                &params,
            ),
            client.query(
                "SELECT series_id, ts, value_num, value_bool, value_text FROM telemetry.readings
                 WHERE series_id = ANY($1) AND ts >= $2 AND ts < $3",
                &params,
            ),
        )?;
        let mut existing: HashMap<i32, Vec<Point>> = HashMap::new();
        let mut unreadable: HashSet<i32> = HashSet::new();
        for row in &old_blocks {
            let series_id: i32 = row.get(0);
            match blocks::decode(row.get(1)) {
                Ok(points) => existing.entry(series_id).or_default().extend(points),
                Err(error) => {
                    tracing::error!(
                        series_id,
                        error = format!("{error:#}"),
                        "a block cannot be decoded; its series' readings go to rows"
                    );
                    unreadable.insert(series_id);
                }
            }
        }
        let mut had_rows: HashSet<i32> = HashSet::new();
        for row in &old_rows {
            had_rows.insert(row.get(0));
            let fieldline_common::time::EpochMicros(ts_us) = row.get(1);
            if let Some(value) = blocks::row_value(row, 2) {
                existing.entry(row.get(0)).or_default().push((ts_us, value));
            }
        }
        let mut new_blocks = DayBlocks::default();
        let mut written: Vec<i32> = Vec::new();
        for (series_id, mut new) in series {
            if unreadable.contains(&series_id) {
                table.extend(new.iter().map(|(ts, value)| (series_id, *ts, *value)));
                continue;
            }
            let mut old = existing.remove(&series_id).unwrap_or_default();
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
            if fresh.is_empty() && !had_rows.contains(&series_id) {
                // All stored already, all in blocks (a redelivery): nothing to write.
                continue;
            }
            if let Err(error) = new_blocks.add(series_id, &merged) {
                // Not expected (pco refuses no sorted numbers); the new readings go to rows,
                // the old stay where they are.
                tracing::error!(
                    series_id,
                    error = format!("{error:#}"),
                    "a block cannot be encoded"
                );
                table.extend(fresh.iter().map(|(ts, value)| (series_id, *ts, *value)));
                continue;
            }
            moves.add_run(
                series_id,
                fresh.iter().map(|(ts, value)| (*ts, stored(value))),
            );
            written.push(series_id);
        }
        if written.is_empty() {
            continue;
        }
        let day = start.date_naive();
        new_blocks.replace(client, day, &written).await?;
        if !old_rows.is_empty() {
            client
                .execute(
                    "DELETE FROM telemetry.readings
                     WHERE series_id = ANY($1) AND ts >= $2 AND ts < $3",
                    &[&written, &start, &end],
                )
                .await?;
        }
    }
    Ok(table)
}
