//! What new readings move forward besides their own rows: each series' statistics and latest
//! value, and the hourly and daily rollups. Gathered in memory from rows known to be new (a
//! `COPY` that went through, the rows an `INSERT … ON CONFLICT DO NOTHING` returned, or a
//! bulk load), then merged into the tables in four pipelined statements.

use std::sync::LazyLock;

use foldhash::HashMap;

use chrono::{DateTime, Utc};
use fieldline_common::time::from_us;
use tokio_postgres::{GenericClient, Statement, types::ToSql};

use crate::aggregate::Partial;

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;
/// Most rows of one rollup statement, so no statement carries millions of array elements.
const ROLLUP_SLICE: usize = 50_000;

/// How a rollup row takes in another partial aggregate of the same bucket (`excluded`).
const ROLLUP_MERGE: &str = "ON CONFLICT (series_id, bucket) DO UPDATE SET
    count = r.count + excluded.count,
    num_count = r.num_count + excluded.num_count,
    sum = CASE WHEN r.sum IS NULL THEN excluded.sum
               WHEN excluded.sum IS NULL THEN r.sum
               ELSE r.sum + excluded.sum END,
    min = LEAST(r.min, excluded.min),
    max = GREATEST(r.max, excluded.max),
    first_num = CASE WHEN r.first_ts IS NULL OR excluded.first_ts < r.first_ts
                     THEN excluded.first_num ELSE r.first_num END,
    first_ts = LEAST(r.first_ts, excluded.first_ts),
    last_num = CASE WHEN r.last_ts IS NULL OR excluded.last_ts > r.last_ts
                    THEN excluded.last_num ELSE r.last_num END,
    last_ts = GREATEST(r.last_ts, excluded.last_ts)";

/// A value as stored: one of number, boolean, text.
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a> {
    Number(f64),
    Boolean(bool),
    Text(&'a str),
}

/// What one series' new rows change in `telemetry.series`.
#[derive(Debug)]
struct SeriesMove {
    count: i64,
    first_us: i64,
    last_us: i64,
    last_num: Option<f64>,
    last_bool: Option<bool>,
    last_text: Option<String>,
}

#[derive(Default)]
pub struct Moves {
    series: HashMap<i32, SeriesMove>,
    hourly: HashMap<(i32, i64), Partial>,
    daily: HashMap<(i32, i64), Partial>,
}

impl Moves {
    /// Takes in one new row.
    pub fn add(&mut self, series_id: i32, ts_us: i64, value: Stored<'_>) {
        self.add_run(series_id, std::iter::once((ts_us, value)));
    }

    /// Takes in new rows of one series. In time order (as an import brings them), the rows
    /// of a bucket are summed apart and merged into its rollup row once, rather than a map
    /// lookup each.
    pub fn add_run<'v>(
        &mut self,
        series_id: i32,
        rows: impl IntoIterator<Item = (i64, Stored<'v>)>,
    ) {
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            return;
        }
        let Self {
            series,
            hourly,
            daily,
        } = self;
        let series = series.entry(series_id).or_insert(SeriesMove {
            count: 0,
            first_us: i64::MAX,
            last_us: i64::MIN,
            last_num: None,
            last_bool: None,
            last_text: None,
        });
        let mut hour: Option<(i64, Partial)> = None;
        let mut day: Option<(i64, Partial)> = None;
        for (ts_us, value) in rows {
            let (num, flag, text) = match value {
                Stored::Number(number) => (Some(number), None, None),
                Stored::Boolean(flag) => (None, Some(flag), None),
                Stored::Text(text) => (None, None, Some(text)),
            };
            series.count += 1;
            series.first_us = series.first_us.min(ts_us);
            if ts_us > series.last_us {
                series.last_us = ts_us;
                series.last_num = num;
                series.last_bool = flag;
                series.last_text = text.map(str::to_owned);
            }
            let reading = Partial {
                count: 1,
                num_count: i64::from(num.is_some()),
                sum: num,
                min: num,
                max: num,
                first: num.map(|n| (ts_us, n)),
                last: num.map(|n| (ts_us, n)),
            };
            take_into(
                hourly,
                series_id,
                &mut hour,
                ts_us.div_euclid(HOUR_US) * HOUR_US,
                &reading,
            );
            take_into(
                daily,
                series_id,
                &mut day,
                ts_us.div_euclid(DAY_US) * DAY_US,
                &reading,
            );
        }
        for (buckets, run) in [(hourly, hour), (daily, day)] {
            if let Some((bucket, partial)) = run {
                buckets
                    .entry((series_id, bucket))
                    .or_default()
                    .merge(&partial);
            }
        }
    }

    /// Takes in what `other` took in. The rows of a bucket must all have been in one of the
    /// two (true when each holds whole days of a series, as the writer's blocks do): a sum
    /// of floats in another order is another number.
    pub fn absorb(&mut self, other: Moves) {
        for (series_id, theirs) in other.series {
            match self.series.entry(series_id) {
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(theirs);
                }
                std::collections::hash_map::Entry::Occupied(mut entry) => {
                    let ours = entry.get_mut();
                    ours.count += theirs.count;
                    ours.first_us = ours.first_us.min(theirs.first_us);
                    // As `add_run`: at one time, what was taken in first stays the latest.
                    if theirs.last_us > ours.last_us {
                        ours.last_us = theirs.last_us;
                        ours.last_num = theirs.last_num;
                        ours.last_bool = theirs.last_bool;
                        ours.last_text = theirs.last_text;
                    }
                }
            }
        }
        for (ours, theirs) in [
            (&mut self.hourly, other.hourly),
            (&mut self.daily, other.daily),
        ] {
            for (key, partial) in theirs {
                ours.entry(key).or_default().merge(&partial);
            }
        }
    }

    /// Merges everything taken in into the series statistics and both rollups, taking every
    /// row lock in one global order: first the series rows, in id order, in one statement
    /// awaited alone; then the series update (rows already held); then the hourly, then the
    /// daily rollups, each in (series, bucket) order. A rollup row belongs to a series row
    /// this transaction holds, so no other writer holds it or waits for it in between.
    ///
    /// Each statement is sent once the one before it has answered. Issued together, each
    /// would go out when its future happened to be polled after its prepare, the lock as
    /// often after the update as before it, and two writers deadlocked (see
    /// `docs/decisions/2026-12-05-writer-lock-order.md`). One by one, the error returned is
    /// also the first, not the "current transaction is aborted" of a statement behind it.
    pub async fn apply(
        &self,
        client: &impl GenericClient,
        statements: &MoveStatements,
    ) -> Result<(), tokio_postgres::Error> {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut series: Vec<(&i32, &SeriesMove)> = self.series.iter().collect();
        series.sort_unstable_by_key(|(id, _)| **id);
        let ids: Vec<i32> = series.iter().map(|(id, _)| **id).collect();
        let counts: Vec<i64> = series.iter().map(|(_, s)| s.count).collect();
        let firsts: Vec<DateTime<Utc>> = series.iter().map(|(_, s)| from_us(s.first_us)).collect();
        let lasts: Vec<DateTime<Utc>> = series.iter().map(|(_, s)| from_us(s.last_us)).collect();
        let nums: Vec<Option<f64>> = series.iter().map(|(_, s)| s.last_num).collect();
        let flags: Vec<Option<bool>> = series.iter().map(|(_, s)| s.last_bool).collect();
        let texts: Vec<Option<&str>> = series.iter().map(|(_, s)| s.last_text.as_deref()).collect();
        let params: [&(dyn ToSql + Sync); 7] =
            [&ids, &counts, &firsts, &lasts, &nums, &flags, &texts];
        // The lock sits above the sort in the plan: rows are locked in id order. NO KEY
        // UPDATE is what the update itself takes, so it needs no stronger lock after.
        client.execute(&statements.lock, &[&ids]).await?;
        client.execute(&statements.series, &params).await?;
        merge_rollup(client, &statements.hourly, &self.hourly).await?;
        merge_rollup(client, &statements.daily, &self.daily).await?;
        Ok(())
    }
}

#[cfg(test)]
impl Moves {
    /// Everything taken in, in key order: comparable across maps.
    pub fn sorted(&self) -> String {
        fn in_order<K: Ord + std::fmt::Debug, V: std::fmt::Debug>(map: &HashMap<K, V>) -> String {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            format!("{entries:?}")
        }
        format!(
            "{} {} {}",
            in_order(&self.series),
            in_order(&self.hourly),
            in_order(&self.daily)
        )
    }
}

/// The statements of [`Moves::apply`].
pub struct MoveStatements {
    lock: Statement,
    series: Statement,
    hourly: Statement,
    daily: Statement,
}

impl MoveStatements {
    /// Prepared for one use.
    pub async fn prepare(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        Self::with(|sql| client.prepare(sql)).await
    }

    /// Kept by the pooled connection: parsed once, not once a batch (the writer's batches of
    /// one-reading messages spent as much PostgreSQL time parsing these as storing rows).
    /// None of these tables is partitioned, so a generic plan locks nothing a range spares.
    pub async fn cached(
        transaction: &deadpool_postgres::Transaction<'_>,
    ) -> Result<Self, tokio_postgres::Error> {
        Self::with(|sql| transaction.prepare_cached(sql)).await
    }

    /// Preparing takes no lock: the four together, in one round trip.
    async fn with<F>(prepare: impl Fn(&'static str) -> F) -> Result<Self, tokio_postgres::Error>
    where
        F: Future<Output = Result<Statement, tokio_postgres::Error>>,
    {
        let (lock, series, hourly, daily) = tokio::try_join!(
            prepare(LOCK_SERIES_SQL),
            prepare(UPDATE_SERIES_SQL),
            prepare(&HOURLY_SQL),
            prepare(&DAILY_SQL),
        )?;
        Ok(Self {
            lock,
            series,
            hourly,
            daily,
        })
    }
}

/// The series rows a transaction moves, locked in id order before anything is updated.
const LOCK_SERIES_SQL: &str = "SELECT series_id FROM telemetry.series WHERE series_id = ANY($1)
     ORDER BY series_id FOR NO KEY UPDATE";

/// Each series' count, first and last time, and latest value, moved by its new rows. The
/// join may visit rows in any order: they are locked already ([`LOCK_SERIES_SQL`]).
const UPDATE_SERIES_SQL: &str = "UPDATE telemetry.series s
    SET count = s.count + u.n,
        first_ts = LEAST(s.first_ts, u.first_ts),
        last_ts = GREATEST(s.last_ts, u.last_ts),
        last_num = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN u.last_num ELSE s.last_num END,
        last_bool = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN u.last_bool ELSE s.last_bool END,
        last_text = CASE WHEN s.last_ts IS NULL OR u.last_ts > s.last_ts THEN u.last_text ELSE s.last_text END
   FROM UNNEST($1::int4[], $2::int8[], $3::timestamptz[], $4::timestamptz[],
               $5::float8[], $6::bool[], $7::text[])
        AS u(series_id, n, first_ts, last_ts, last_num, last_bool, last_text)
  WHERE s.series_id = u.series_id";

/// Partials of `table`'s buckets merged into it, one array per column.
fn rollup_sql(table: &str) -> String {
    format!(
        "INSERT INTO telemetry.{table} AS r
         SELECT * FROM UNNEST($1::int4[], $2::timestamptz[], $3::int8[], $4::int8[],
                              $5::float8[], $6::float8[], $7::float8[],
                              $8::timestamptz[], $9::float8[], $10::timestamptz[], $11::float8[])
         {ROLLUP_MERGE}"
    )
}

/// Adds `reading` to the run of `bucket`; a run of another bucket is merged into `buckets`
/// first.
fn take_into(
    buckets: &mut HashMap<(i32, i64), Partial>,
    series_id: i32,
    run: &mut Option<(i64, Partial)>,
    bucket: i64,
    reading: &Partial,
) {
    match run {
        Some((current, partial)) if *current == bucket => partial.merge(reading),
        _ => {
            let mut partial = Partial::default();
            partial.merge(reading);
            if let Some((done, done_partial)) = run.replace((bucket, partial)) {
                buckets
                    .entry((series_id, done))
                    .or_default()
                    .merge(&done_partial);
            }
        }
    }
}

static HOURLY_SQL: LazyLock<String> = LazyLock::new(|| rollup_sql("rollup_1h"));
static DAILY_SQL: LazyLock<String> = LazyLock::new(|| rollup_sql("rollup_1d"));

/// Merges `buckets` into a rollup in (series, bucket) order: `INSERT … SELECT` takes its
/// input rows in order, and the arrays are sorted.
async fn merge_rollup(
    client: &impl GenericClient,
    statement: &Statement,
    buckets: &HashMap<(i32, i64), Partial>,
) -> Result<(), tokio_postgres::Error> {
    let mut rows: Vec<(&(i32, i64), &Partial)> = buckets.iter().collect();
    rows.sort_unstable_by_key(|(key, _)| **key);
    for slice in rows.chunks(ROLLUP_SLICE) {
        let series_id: Vec<i32> = slice.iter().map(|((id, _), _)| *id).collect();
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
        let first_num: Vec<Option<f64>> = slice.iter().map(|(_, p)| p.first.map(|f| f.1)).collect();
        let last_ts: Vec<Option<DateTime<Utc>>> = slice
            .iter()
            .map(|(_, p)| p.last.map(|l| from_us(l.0)))
            .collect();
        let last_num: Vec<Option<f64>> = slice.iter().map(|(_, p)| p.last.map(|l| l.1)).collect();
        client
            .execute(
                statement,
                &[
                    &series_id, &bucket, &count, &num_count, &sum, &min, &max, &first_ts,
                    &first_num, &last_ts, &last_num,
                ],
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A series move's fields, the number by its bits.
    type SeriesView = (
        i32,
        i64,
        i64,
        i64,
        Option<u64>,
        Option<bool>,
        Option<String>,
    );

    fn series_view(moves: &Moves) -> Vec<SeriesView> {
        let mut view: Vec<_> = moves
            .series
            .iter()
            .map(|(id, m)| {
                (
                    *id,
                    m.count,
                    m.first_us,
                    m.last_us,
                    m.last_num.map(f64::to_bits),
                    m.last_bool,
                    m.last_text.clone(),
                )
            })
            .collect();
        view.sort();
        view
    }

    proptest! {
        /// A run of rows in time order moves the series and both rollups exactly as the same
        /// rows taken one by one.
        #[test]
        fn a_run_moves_what_its_rows_move_one_by_one(
            steps in proptest::collection::vec(
                (0i64..2_000_000_000, 0u8..4, -1000i32..1000),
                0..300,
            ),
        ) {
            let mut ts = -5 * 3_600_000_000;
            let texts = ["a", "b"];
            let rows: Vec<(i64, Stored)> = steps
                .into_iter()
                .map(|(step, kind, n)| {
                    ts += step;
                    let value = match kind {
                        0 => Stored::Boolean(n > 0),
                        1 => Stored::Text(texts[(n & 1) as usize]),
                        _ => Stored::Number(f64::from(n) / 100.0),
                    };
                    (ts, value)
                })
                .collect();
            let mut one_by_one = Moves::default();
            for (ts_us, value) in &rows {
                one_by_one.add(3, *ts_us, *value);
            }
            let mut run = Moves::default();
            run.add_run(3, rows.iter().copied());
            prop_assert_eq!(series_view(&run), series_view(&one_by_one));
            prop_assert_eq!(&run.hourly, &one_by_one.hourly);
            prop_assert_eq!(&run.daily, &one_by_one.daily);
            prop_assert_eq!(run.series.is_empty(), rows.is_empty());
        }

        /// Whole days of a series taken in apart and absorbed, in any order, move what the
        /// same rows taken in at once move.
        #[test]
        fn days_taken_apart_and_absorbed_move_what_they_move_together(
            steps in proptest::collection::vec((0i64..20_000_000_000, -1000i32..1000, 0u8..3), 1..300),
            reverse in proptest::bool::ANY,
        ) {
            let mut ts = -3 * DAY_US;
            let rows: Vec<(i64, Stored)> = steps
                .into_iter()
                .map(|(step, n, kind)| {
                    ts += step;
                    let value = match kind {
                        0 => Stored::Boolean(n > 0),
                        1 => Stored::Text("t"),
                        _ => Stored::Number(f64::from(n) / 100.0),
                    };
                    (ts, value)
                })
                .collect();
            let mut together = Moves::default();
            together.add_run(7, rows.iter().copied());
            let mut days: Vec<Vec<(i64, Stored)>> = Vec::new();
            for row in &rows {
                match days.last_mut() {
                    Some(day) if day[0].0.div_euclid(DAY_US) == row.0.div_euclid(DAY_US) => day.push(*row),
                    _ => days.push(vec![*row]),
                }
            }
            if reverse {
                days.reverse();
            }
            let mut apart = Moves::default();
            for day in days {
                let mut part = Moves::default();
                part.add_run(7, day);
                apart.absorb(part);
            }
            prop_assert_eq!(series_view(&apart), series_view(&together));
            prop_assert_eq!(&apart.hourly, &together.hourly);
            prop_assert_eq!(&apart.daily, &together.daily);
        }
    }
}
