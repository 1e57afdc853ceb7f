//! query-api's SQL, and nothing else does SQL.
//!
//! Two kinds of pool: the process's shared pool for the writer and maintenance, and read pools
//! (one per HTTP worker, see [`Reads`]) whose connections carry `statement_timeout`, so one
//! heavy query cannot hold a connection (or the database) for long. One-statement reads share
//! a few of a read pool's connections, pipelined. History reads go to a fit replica's read
//! pool when there is one (see [`crate::replicas`]), to the primary's otherwise.

use std::{
    collections::{HashMap, HashSet},
    pin::pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use fieldline_common::{
    ApiError, Config, ErrorKind,
    ingest::TimeWindow,
    time::{EpochMicros, MAX_TIME_US, MIN_TIME_US, Rfc3339Writer, format_rfc3339, from_us, now_us},
};
use fieldline_proto::v1::{TelemetryBatch, reading};
use serde::Serialize;
use tokio_postgres::{
    Row,
    binary_copy::BinaryCopyInWriter,
    error::SqlState,
    types::{ToSql, Type},
};

use crate::{
    aggregate::{Partial, Segment, Source},
    blocks, blockwrite, compress,
    domain::{Interval, Order, Position, ReadingOut, ReadingsQuery},
    moves::{MoveStatements, Moves, Stored},
    reads::Reads,
    replicas::{Targets, falls_back},
    retention::Period,
};

/// Series ids cached by the writer; past this many the cache starts again (ids never change,
/// so a miss only costs one lookup).
const SERIES_CACHE_MAX: usize = 1_000_000;

/// (project, device id, metric).
pub type SeriesKey = (String, String, String);

#[derive(Clone)]
pub struct Repo {
    /// Writer and maintenance.
    pool: Pool,
    /// Reads, with `statement_timeout`: this HTTP worker's, on the primary and the replicas.
    targets: Arc<Targets>,
    series: Arc<Mutex<HashMap<SeriesKey, i32>>>,
    partitions: Arc<Mutex<HashSet<NaiveDate>>>,
    /// Raw readings before this (epoch µs) have been dropped by retention; the writer does
    /// not bring them back.
    expired_before_us: Arc<AtomicI64>,
    /// The live-time settings: what the writer stores at all ([`TimeWindow::stored`]).
    config: Arc<Config>,
}

/// Most daily partitions one writer transaction writes into. A batch whose readings span
/// more days is stored in several transactions, each of at most this many days (acked once
/// all have committed; a redelivery after a partial store inserts only what is missing).
/// Each partition written costs a transaction two locks (the partition and its key), so
/// this keeps a batch far below `max_locks_per_transaction` (64) whatever it holds.
pub const MAX_DAYS_PER_TRANSACTION: usize = 8;

/// Wider than this, a read's range is first narrowed to what its series hold
/// ([`Repo::narrow_range`]).
const NARROW_RANGES_OVER_US: i64 = 8 * 86_400_000_000;

/// A day in µs: the readings partitions' width.
const DAY_US: i64 = 86_400_000_000;

/// Seconds between two warnings about refused readings: a flood is a counter, not lines.
const REFUSED_LOG_INTERVAL_S: i64 = 10;

/// A query error: a statement cancelled by `statement_timeout` is 503 `query_timeout`, the
/// rest as the common table says.
pub fn read_error(error: tokio_postgres::Error) -> ApiError {
    if error.code() == Some(&SqlState::QUERY_CANCELED) {
        let mut api_error = ApiError::unavailable(
            "the query took longer than the statement timeout: narrow the range or use a longer interval",
        );
        api_error.reason = "query_timeout".into();
        return api_error;
    }
    ApiError::from(error)
}

pub fn json_value(row: &Row, first_value_column: usize) -> serde_json::Value {
    if let Some(number) = row.get::<_, Option<f64>>(first_value_column) {
        return serde_json::json!(number);
    }
    if let Some(flag) = row.get::<_, Option<bool>>(first_value_column + 1) {
        return serde_json::Value::Bool(flag);
    }
    row.get::<_, Option<String>>(first_value_column + 2)
        .map(serde_json::Value::String)
        .unwrap_or(serde_json::Value::Null)
}

/// Day (UTC) of a time in epoch µs: the partition it belongs to.
pub fn day_of(ts_us: i64) -> NaiveDate {
    from_us(ts_us).date_naive()
}

/// Creates the daily partition of `day` if it does not exist (idempotent, safe concurrently).
pub async fn ensure_partition(
    client: &tokio_postgres::Client,
    day: NaiveDate,
) -> Result<(), tokio_postgres::Error> {
    match client
        .execute("SELECT telemetry.ensure_readings_partition($1)", &[&day])
        .await
    {
        // Another writer created it between this one's check and its `CREATE`: the
        // function's second look after the advisory lock can miss a table just committed
        // (its catalog cache is not refreshed by an advisory lock).
        Err(error) if error.code() == Some(&SqlState::DUPLICATE_TABLE) => Ok(()),
        Err(error) => Err(error),
        Ok(_) => Ok(()),
    }
}

/// The series ids of `keys`, in order, creating the series that do not exist yet.
pub async fn upsert_series(
    client: &tokio_postgres::Client,
    keys: &[SeriesKey],
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let projects: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let devices: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let metrics: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    client
        .execute(
            "INSERT INTO telemetry.series (project, device_id, metric)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) ORDER BY 1, 2, 3
             ON CONFLICT DO NOTHING",
            &[&projects, &devices, &metrics],
        )
        .await?;
    let rows = client
        .query(
            "SELECT s.series_id FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(project, device_id, metric, n)
             JOIN telemetry.series s USING (project, device_id, metric)
             ORDER BY k.n",
            &[&projects, &devices, &metrics],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// A writer transaction's failure, logged as Postgres reported it: its SQLSTATE, message and
/// detail (which, for a deadlock, names the statements of both sides), and counted by code.
/// The messages are redelivered, so a failure the next attempt gets past is a warning.
fn transaction_error(error: tokio_postgres::Error) -> ApiError {
    let Some(db) = error.as_db_error() else {
        return ApiError::from(error);
    };
    tracing::warn!(
        code = db.code().code(),
        message = db.message(),
        detail = db.detail().unwrap_or_default(),
        "a writer transaction failed"
    );
    metrics::counter!("fieldline_writer_transaction_errors_total", "code" => db.code().code().to_owned())
        .increment(1);
    // A value Postgres refuses (class 22) is the batch's, and the writer looks for it.
    if db.code().code().starts_with("22") {
        return ApiError::from(error);
    }
    ApiError::new(ErrorKind::Internal, "internal_error", "internal error")
}

/// Readings as columns, for the one `UNNEST` statement that stores a batch.
#[derive(Default)]
struct Columns {
    series_id: Vec<i32>,
    ts: Vec<DateTime<Utc>>,
    value_num: Vec<Option<f64>>,
    value_bool: Vec<Option<bool>>,
    value_text: Vec<Option<String>>,
}

/// The rows of a batch that holds stored ones: inserts what is new and returns exactly that,
/// so the series and rollups move by the new rows only (a redelivery moves nothing).
const INSERT_NEW_SQL: &str =
    "INSERT INTO telemetry.readings (series_id, ts, value_num, value_bool, value_text)
     SELECT * FROM UNNEST($1::int4[], $2::timestamptz[], $3::float8[], $4::bool[], $5::text[])
     ON CONFLICT DO NOTHING
     RETURNING series_id, ts, value_num, value_bool, value_text";

const COPY_TYPES: [Type; 5] = [
    Type::INT4,
    Type::TIMESTAMPTZ,
    Type::FLOAT8,
    Type::BOOL,
    Type::TEXT,
];

/// Binary `COPY` of rows that must all be new, and the series and rollup moves they make, in
/// one transaction. A row already stored fails it with `unique_violation`, changing nothing.
async fn copy_new(
    client: &mut deadpool_postgres::Client,
    rows: &[SeriesRow<'_>],
    direct: &blockwrite::Days,
) -> Result<(), tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    let in_blocks = lock_days(&transaction, rows, direct).await?;
    let mut moves = Moves::default();
    let rows = blockwrite::store(&*transaction, rows, direct, &mut moves).await?;
    let columns = columns(&rows, &in_blocks, &mut moves);
    let sink = transaction
        .copy_in(
            "COPY telemetry.readings (series_id, ts, value_num, value_bool, value_text) FROM STDIN BINARY",
        )
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &COPY_TYPES));
    for row in 0..columns.series_id.len() {
        writer
            .as_mut()
            .write(&[
                &columns.series_id[row],
                &columns.ts[row],
                &columns.value_num[row],
                &columns.value_bool[row],
                &columns.value_text[row],
            ])
            .await?;
    }
    writer.finish().await?;
    moves
        .apply(&*transaction, &MoveStatements::cached(&transaction).await?)
        .await?;
    transaction.commit().await
}

/// The same rows when some are stored already: insert only the new ones ([`INSERT_NEW_SQL`]),
/// and move the series and rollups by what was inserted, through the same [`Moves`] as the
/// `COPY` path (one set of merge rules, one lock order).
async fn store_skipping_stored(
    client: &mut deadpool_postgres::Client,
    rows: &[SeriesRow<'_>],
    direct: &blockwrite::Days,
) -> Result<(), tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    let in_blocks = lock_days(&transaction, rows, direct).await?;
    let mut moves = Moves::default();
    let rows = blockwrite::store(&*transaction, rows, direct, &mut moves).await?;
    // The moves of these rows are those the insert returns.
    let columns = columns(&rows, &in_blocks, &mut Moves::default());
    let statement = transaction.prepare_cached(INSERT_NEW_SQL).await?;
    let inserted = transaction
        .query(
            &statement,
            &[
                &columns.series_id,
                &columns.ts,
                &columns.value_num,
                &columns.value_bool,
                &columns.value_text,
            ],
        )
        .await?;
    for row in &inserted {
        let ts: DateTime<Utc> = row.get(1);
        // The table's check constraint holds exactly one of the three.
        let value = match (
            row.get::<_, Option<f64>>(2),
            row.get::<_, Option<bool>>(3),
            row.get::<_, Option<&str>>(4),
        ) {
            (Some(number), _, _) => Stored::Number(number),
            (None, Some(flag), _) => Stored::Boolean(flag),
            (None, None, Some(text)) => Stored::Text(text),
            (None, None, None) => continue,
        };
        moves.add(row.get(0), ts.timestamp_micros(), value);
    }
    moves
        .apply(&*transaction, &MoveStatements::cached(&transaction).await?)
        .await?;
    transaction.commit().await
}

/// A reading on its way into a transaction: series id, time, value.
pub type SeriesRow<'v> = (i32, i64, &'v reading::Value);

/// Takes the day locks of `rows`' days in day order, shared (exclusive for the `direct` days,
/// written into blocks by [`blockwrite`]), and returns the (series, time) pairs of `rows` that
/// the blocks of the other days hold already (compressed days only; most transactions have
/// none). While a writer holds a day shared, the compression task cannot move that day's rows
/// into blocks (it takes the lock exclusive), so what this sees of the blocks stays true
/// until commit ([`crate::compress`]).
async fn lock_days(
    transaction: &deadpool_postgres::Transaction<'_>,
    rows: &[SeriesRow<'_>],
    direct: &blockwrite::Days,
) -> Result<HashSet<(i32, i64)>, tokio_postgres::Error> {
    let mut days: Vec<i32> = Vec::new();
    for (_, ts_us, _) in rows {
        let day = compress::day_number_of(*ts_us);
        // Rows come in runs of a day: only a change of day is kept, then sorted.
        if days.last() != Some(&day) {
            days.push(day);
        }
    }
    days.sort_unstable();
    days.dedup();
    let (lock, compressed) = futures::try_join!(
        transaction.prepare_cached(
            "SELECT CASE WHEN exclusive THEN pg_advisory_xact_lock(hashtext($1), day)
                         ELSE pg_advisory_xact_lock_shared(hashtext($1), day) END
             FROM UNNEST($2::int4[], $3::bool[]) AS d(day, exclusive)",
        ),
        transaction.prepare_cached(
            "SELECT day - date '1970-01-01' FROM telemetry.compressed_days
             WHERE day - date '1970-01-01' = ANY($1) ORDER BY 1",
        ),
    )?;
    // Pipelined: the server runs the second once the first has every lock, so it sees the
    // days as they are while held.
    let exclusive: Vec<bool> = days.iter().map(|day| direct.contains(day)).collect();
    let lock_params: [&(dyn ToSql + Sync); 3] = [&compress::DAY_LOCK, &days, &exclusive];
    let check_params: [&(dyn ToSql + Sync); 1] = [&days];
    let (_, compressed) = futures::try_join!(
        transaction.execute(&lock, &lock_params),
        transaction.query(&compressed, &check_params),
    )?;
    let compressed: Vec<i32> = compressed
        .iter()
        .map(|row| row.get(0))
        .filter(|day| !direct.contains(day))
        .collect();
    let mut stored = HashSet::new();
    for day in compressed {
        let ids: Vec<i32> = rows
            .iter()
            .filter(|(_, ts_us, _)| compress::day_number_of(*ts_us) == day)
            .map(|(id, _, _)| *id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let (start, end) =
            compress::day_bounds(NaiveDate::default() + chrono::Days::new(day as u64));
        let blocks = transaction
            .query(compress::DAY_BLOCKS_SQL, &[&ids, &start, &end])
            .await?;
        for block in &blocks {
            let series_id: i32 = block.get(0);
            match blocks::decode(block.get(1)) {
                Ok(points) => stored.extend(points.into_iter().map(|(ts, _)| (series_id, ts))),
                // A block that cannot be read is reported by every read of it; the writer
                // stores the rows (a duplicate at worst, never a loss).
                Err(error) => tracing::error!(
                    series_id,
                    error = format!("{error:#}"),
                    "a block cannot be decoded"
                ),
            }
        }
    }
    Ok(stored)
}

/// `rows` as columns for one statement, without those in `in_blocks`; the moves they make go
/// into `moves`.
fn columns(rows: &[SeriesRow<'_>], in_blocks: &HashSet<(i32, i64)>, moves: &mut Moves) -> Columns {
    let mut columns = Columns::default();
    for (series_id, ts_us, value) in rows {
        if !in_blocks.is_empty() && in_blocks.contains(&(*series_id, *ts_us)) {
            continue;
        }
        columns.series_id.push(*series_id);
        columns.ts.push(from_us(*ts_us));
        let (num, flag, text, stored) = match value {
            reading::Value::Number(number) => (Some(*number), None, None, Stored::Number(*number)),
            reading::Value::Boolean(flag) => (None, Some(*flag), None, Stored::Boolean(*flag)),
            reading::Value::Text(text) => {
                (None, None, Some(text.clone()), Stored::Text(text.as_str()))
            }
        };
        moves.add(*series_id, *ts_us, stored);
        columns.value_num.push(num);
        columns.value_bool.push(flag);
        columns.value_text.push(text);
    }
    columns
}

/// A reading the writer stores: the index of its series key, its time, its value.
type WriteRow<'v> = (usize, i64, &'v reading::Value);

/// `rows` with their series ids, in (day, series, time) order. They are grouped by (day,
/// series) in one pass, which keeps each group in arrival order, and a group is sorted by time
/// only if it is not already: a device's readings mostly come in time order, and a sort of a
/// million rows was a sixth of what the writer spent on an import.
fn in_write_order<'v>(rows: &[WriteRow<'v>], ids: &[i32]) -> Vec<SeriesRow<'v>> {
    let mut group_index: foldhash::HashMap<(i64, i32), usize> = Default::default();
    let mut groups: Vec<((i64, i32), usize)> = Vec::new();
    let mut group_of: Vec<usize> = Vec::with_capacity(rows.len());
    for (index, ts_us, _) in rows {
        let key = (ts_us.div_euclid(DAY_US), ids[*index]);
        let group = *group_index.entry(key).or_insert_with(|| {
            groups.push((key, 0));
            groups.len() - 1
        });
        groups[group].1 += 1;
        group_of.push(group);
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_unstable_by_key(|group| groups[*group].0);
    // Where each group starts in the result, then the row each place of the result takes.
    let mut next = vec![0; groups.len()];
    let mut offset = 0;
    for group in &order {
        next[*group] = offset;
        offset += groups[*group].1;
    }
    let mut source = vec![0; rows.len()];
    for (row, group) in group_of.iter().enumerate() {
        source[next[*group]] = row;
        next[*group] += 1;
    }
    let mut ordered: Vec<SeriesRow<'v>> = source
        .into_iter()
        .map(|row| {
            let (index, ts_us, value) = rows[row];
            (ids[index], ts_us, value)
        })
        .collect();
    let mut start = 0;
    for group in order {
        let run = &mut ordered[start..start + groups[group].1];
        // Stable: of readings at one time, the first to arrive stays first (and wins).
        if !run.is_sorted_by_key(|(_, ts_us, _)| *ts_us) {
            run.sort_by_key(|(_, ts_us, _)| *ts_us);
        }
        start += run.len();
    }
    ordered
}

/// `rows` (in day, series and time order) cut into runs of at most `max_days` days each,
/// the earliest days first: slices of `rows`, so each keeps its order.
fn by_days<'a, 'v>(rows: &'a [SeriesRow<'v>], max_days: usize) -> Vec<&'a [SeriesRow<'v>]> {
    let mut groups = Vec::new();
    let (mut start, mut days, mut current) = (0, 0, None);
    for (index, (_, ts_us, _)) in rows.iter().enumerate() {
        let day = ts_us.div_euclid(DAY_US);
        if current == Some(day) {
            continue;
        }
        if days == max_days.max(1) {
            groups.push(&rows[start..index]);
            (start, days) = (index, 0);
        }
        current = Some(day);
        days += 1;
    }
    if start < rows.len() {
        groups.push(&rows[start..]);
    }
    groups
}

/// Warns about readings the writer refused, at most once every [`REFUSED_LOG_INTERVAL_S`]
/// (the counter has them all).
fn log_refused(batch: &TelemetryBatch, ts_us: i64, refused: u64, window: &TimeWindow) {
    static LAST_LOGGED_S: AtomicI64 = AtomicI64::new(i64::MIN);
    let now_s = now_us() / 1_000_000;
    let last = LAST_LOGGED_S.load(Ordering::Relaxed);
    if now_s.saturating_sub(last) < REFUSED_LOG_INTERVAL_S
        || LAST_LOGGED_S
            .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    tracing::warn!(
        project = %batch.project,
        device_id = %batch.device_id,
        source = %batch.source,
        ts = %format_rfc3339(&from_us(ts_us)),
        refused,
        earliest = %format_rfc3339(&from_us(window.earliest_us)),
        latest = %format_rfc3339(&from_us(window.latest_us)),
        "readings outside the stored time window refused"
    );
}

/// The statement of a page of history ([`Repo::readings`]): two phases, the page's keys from
/// the index alone (index-only scans, each series' next rows), then the values of just those
/// rows; both name the range, so that planning prunes both to its partitions. Compressed
/// days come in the same statement (one snapshot: a slice being compressed is seen once, in
/// rows or in blocks): of each series, the blocks that can hold its next `limit + 1`
/// readings (the first one the range meets, then as many as their counts say are needed).
/// Parameters: project, device, start, end, cursor time and metric, `limit + 1`, metrics.
fn page_sql(order: Order) -> String {
    let (keyset, inner_order, keys_order, page_order, block_order) = match order {
        Order::Asc => (
            "(r.ts > $5 OR (r.ts = $5 AND s.metric COLLATE \"C\" > $6))",
            "r.ts ASC",
            "k.ts ASC, s.metric COLLATE \"C\" ASC",
            "keys.ts ASC, keys.metric COLLATE \"C\" ASC",
            "b.first_ts ASC",
        ),
        Order::Desc => (
            "(r.ts < $5 OR (r.ts = $5 AND s.metric COLLATE \"C\" < $6))",
            "r.ts DESC",
            "k.ts DESC, s.metric COLLATE \"C\" DESC",
            "keys.ts DESC, keys.metric COLLATE \"C\" DESC",
            "b.first_ts DESC",
        ),
    };
    format!(
        "WITH keys AS (
             SELECT s.series_id, s.metric, k.ts
             FROM telemetry.series s
             CROSS JOIN LATERAL (
                 SELECT r.ts FROM telemetry.readings r
                 WHERE r.series_id = s.series_id AND r.ts >= $3 AND r.ts < $4
                   AND ($5::timestamptz IS NULL OR {keyset})
                 ORDER BY {inner_order} LIMIT $7) k
             WHERE s.project = $1 AND s.device_id = $2
               AND ($8::text[] IS NULL OR s.metric = ANY($8))
             ORDER BY {keys_order} LIMIT $7
         )
         (SELECT keys.metric, keys.ts, r.value_num, r.value_bool, r.value_text, NULL::bytea
          FROM keys JOIN telemetry.readings r
            ON r.series_id = keys.series_id AND r.ts = keys.ts AND r.ts >= $3 AND r.ts < $4
          ORDER BY {page_order})
         UNION ALL
         SELECT s.metric, x.first_ts, NULL, NULL, NULL, x.data
         FROM telemetry.series s
         CROSS JOIN LATERAL (
             SELECT b.first_ts, b.data, row_number() OVER w AS n,
                    sum(b.count) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                      - first_value(b.count) OVER w AS before
             FROM telemetry.blocks b
             WHERE b.series_id = s.series_id AND b.first_ts < $4
               AND b.first_ts > $3 - interval '1 day' AND b.last_ts >= $3
             WINDOW w AS (ORDER BY {block_order})) x
         WHERE s.project = $1 AND s.device_id = $2
           AND ($8::text[] IS NULL OR s.metric = ANY($8))
           AND (x.n = 1 OR x.before < $7)"
    )
}

/// The statement of an ascending page, for the benchmark's "same SQL straight to
/// PostgreSQL".
pub fn ascending_page_sql() -> String {
    page_sql(Order::Asc)
}

/// A series of a device: its id and metric name.
#[derive(Debug, Clone)]
pub struct DeviceSeries {
    pub series_id: i32,
    pub metric: String,
}

/// `/devices/{id}/metrics`: one metric of a device.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MetricOut {
    pub metric: String,
    pub first_ts: String,
    pub last_ts: String,
    pub count: i64,
}

impl Repo {
    pub fn new(pool: Pool, targets: Arc<Targets>, config: Arc<Config>) -> Self {
        Self {
            pool,
            targets,
            series: Arc::default(),
            partitions: Arc::default(),
            expired_before_us: Arc::new(AtomicI64::new(MIN_TIME_US)),
            config,
        }
    }

    /// The same repository reading through `targets`.
    pub fn with_targets(&self, targets: Arc<Targets>) -> Self {
        Self {
            targets,
            ..self.clone()
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The pool an export streams from: a usable replica's, or the primary's.
    pub fn history_pool(&self) -> &Pool {
        match self.targets.replica() {
            Some((reads, _)) => reads.pool(),
            None => self.targets.primary.pool(),
        }
    }

    /// The rows of one history statement: on a usable replica, or the primary when none is;
    /// a read the replica failed for going away is done again on the primary. History is what
    /// the writer stores from the bus, which no client waits on (ingest answers once the bus
    /// has a reading, not once it is stored), so a replica's bounded lag is what any reader
    /// may see; what a client writes and then reads (retention) stays on the primary.
    async fn history(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ApiError> {
        if let Some((reads, replica)) = self.targets.replica() {
            match query_on(reads, sql, params).await {
                Err(error) if falls_back(&error) => replica.failed(&error),
                other => return other,
            }
        }
        query_on(&self.targets.primary, sql, params).await
    }

    pub fn set_expired_before(&self, ts_us: i64) {
        self.expired_before_us.store(ts_us, Ordering::Relaxed);
    }

    /// Forgets which partitions exist (after retention dropped some, or an insert found one
    /// missing).
    pub fn forget_partitions(&self) {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    async fn series_ids(&self, keys: &[SeriesKey]) -> Result<Vec<i32>, ApiError> {
        let mut ids = vec![0; keys.len()];
        let mut missing = Vec::new();
        {
            let cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
            for (index, key) in keys.iter().enumerate() {
                match cache.get(key) {
                    Some(id) => ids[index] = *id,
                    None => missing.push(index),
                }
            }
        }
        if missing.is_empty() {
            return Ok(ids);
        }
        let missing_keys: Vec<SeriesKey> = missing.iter().map(|i| keys[*i].clone()).collect();
        let client = self.pool.get().await?;
        let found = upsert_series(&client, &missing_keys).await?;
        if found.len() != missing_keys.len() {
            return Err(ApiError::internal(anyhow::anyhow!(
                "series lookup returned {} ids for {} keys",
                found.len(),
                missing_keys.len()
            )));
        }
        let mut cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() + found.len() > SERIES_CACHE_MAX {
            cache.clear();
        }
        for (index, id) in missing.into_iter().zip(found) {
            ids[index] = id;
            cache.insert(keys[index].clone(), id);
        }
        Ok(ids)
    }

    async fn ensure_partitions(&self, days: HashSet<NaiveDate>) -> Result<(), ApiError> {
        let unknown: Vec<NaiveDate> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            days.into_iter()
                .filter(|day| !known.contains(day))
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        for day in &unknown {
            ensure_partition(&client, *day).await?;
        }
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(unknown);
        Ok(())
    }

    /// Stores the readings of `batches` and moves each series' statistics, latest value and
    /// rollups forward, in one transaction per [`MAX_DAYS_PER_TRANSACTION`] days of
    /// readings. Idempotent: a batch stored twice changes nothing the second time. Returns
    /// the number of readings stored; readings older than retention, or outside
    /// [`TimeWindow::stored`] (sent by an edge that does not check live time), are refused,
    /// counted in `fieldline_writer_dropped_total{reason}` and logged, never stored.
    pub async fn store(&self, batches: &[TelemetryBatch]) -> Result<usize, ApiError> {
        let expired_before = self.expired_before_us.load(Ordering::Relaxed);
        let window = TimeWindow::stored(&self.config, now_us());
        let mut keys: Vec<SeriesKey> = Vec::new();
        // Asked once for each reading: hashed fast.
        let mut key_index: foldhash::HashMap<(&str, &str, &str), usize> = Default::default();
        let mut rows: Vec<WriteRow> = Vec::new();
        let mut expired = 0u64;
        let mut refused = 0u64;
        let mut first_refused = None;
        for batch in batches {
            for reading in &batch.readings {
                let Some(value) = &reading.value else {
                    continue;
                };
                if reading.ts_us < expired_before {
                    expired += 1;
                    continue;
                }
                if !window.contains(reading.ts_us) {
                    refused += 1;
                    first_refused.get_or_insert((batch, reading.ts_us));
                    continue;
                }
                let key = (
                    batch.project.as_str(),
                    batch.device_id.as_str(),
                    reading.metric.as_str(),
                );
                let index = *key_index.entry(key).or_insert_with(|| {
                    keys.push((key.0.to_owned(), key.1.to_owned(), key.2.to_owned()));
                    keys.len() - 1
                });
                rows.push((index, reading.ts_us, value));
            }
        }
        if expired > 0 {
            metrics::counter!("fieldline_writer_dropped_total", "reason" => "expired")
                .increment(expired);
        }
        if let Some((batch, ts_us)) = first_refused {
            metrics::counter!("fieldline_writer_dropped_total", "reason" => "out_of_window")
                .increment(refused);
            log_refused(batch, ts_us, refused, &window);
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let ids = self.series_ids(&keys).await?;
        // In (day, series, time) order, the one order every writer inserts in: a partition's
        // index takes its rows in order, and a row another running transaction has stored (a
        // redelivery) is waited for in that order too. `COPY` buffers rows per partition and
        // flushes the partitions in the order it first met them: day by day, sorted so.
        let rows = in_write_order(&rows, &ids);
        for chunk in by_days(&rows, MAX_DAYS_PER_TRANSACTION) {
            self.store_rows(chunk).await?;
        }
        Ok(rows.len())
    }

    /// One transaction: `rows` (of at most [`MAX_DAYS_PER_TRANSACTION`] days, in series and
    /// time order) and the moves they make.
    async fn store_rows(&self, rows: &[SeriesRow<'_>]) -> Result<(), ApiError> {
        // A date is built once a day of the rows (they come in day order), not once a row.
        let mut days: HashSet<NaiveDate> = HashSet::new();
        let mut last_day = None;
        for (_, ts_us, _) in rows {
            let day = compress::day_number_of(*ts_us);
            if last_day.replace(day) != Some(day) {
                days.insert(day_of(*ts_us));
            }
        }
        let direct = blockwrite::direct_days(
            rows,
            compress::day_number(compress::closed_before(self.config.compress_after)),
        );
        for attempt in 0..2 {
            self.ensure_partitions(days.clone()).await?;
            let mut client = self.pool.get().await?;
            // The common case: every row is new, and binary COPY stores them at the speed of
            // the table; the series and rollups move by what was computed here. A row that is
            // there already (a redelivery) fails the COPY, and the statement that skips
            // stored rows does the batch instead.
            let result = match copy_new(&mut client, rows, &direct).await {
                Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    metrics::counter!("fieldline_writer_redelivered_batches_total").increment(1);
                    store_skipping_stored(&mut client, rows, &direct).await
                }
                other => other,
            };
            match result {
                Ok(()) => {
                    metrics::counter!("fieldline_writer_transactions_total").increment(1);
                    return Ok(());
                }
                // "no partition of relation found for row": retention (of another instance)
                // dropped a partition this process thought it had.
                Err(error) if attempt == 0 && error.code() == Some(&SqlState::CHECK_VIOLATION) => {
                    tracing::info!(error = %error, "a partition was missing; creating it");
                    self.forget_partitions();
                }
                Err(error) => return Err(transaction_error(error)),
            }
        }
        Err(ApiError::internal(anyhow::anyhow!(
            "storing readings: partitions kept disappearing"
        )))
    }

    /// The series of a device (all, or those of `metrics`), ordered by metric name (bytes).
    /// Named metrics that this process has seen are answered from the id cache: a series id
    /// never changes, so a hit is exact; a metric not in the cache asks the database.
    pub async fn device_series(
        &self,
        project: &str,
        device_id: &str,
        metrics: Option<&[String]>,
    ) -> Result<Vec<DeviceSeries>, ApiError> {
        if let Some(metrics) = metrics {
            let cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
            let cached: Option<Vec<DeviceSeries>> = metrics
                .iter()
                .map(|metric| {
                    cache
                        .get(&(project.to_owned(), device_id.to_owned(), metric.clone()))
                        .map(|id| DeviceSeries {
                            series_id: *id,
                            metric: metric.clone(),
                        })
                })
                .collect();
            if let Some(mut series) = cached {
                series.sort_by(|a, b| a.metric.cmp(&b.metric));
                series.dedup_by_key(|s| s.series_id);
                return Ok(series);
            }
        }
        let metrics: Option<Vec<String>> = metrics.map(<[String]>::to_vec);
        let rows = self
            .history(
                "SELECT series_id, metric FROM telemetry.series
                 WHERE project = $1 AND device_id = $2 AND ($3::text[] IS NULL OR metric = ANY($3))",
                &[&project, &device_id, &metrics],
            )
            .await?;
        let mut series: Vec<DeviceSeries> = rows
            .iter()
            .map(|row| DeviceSeries {
                series_id: row.get(0),
                metric: row.get(1),
            })
            .collect();
        series.sort_by(|a, b| a.metric.cmp(&b.metric));
        let mut cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() + series.len() > SERIES_CACHE_MAX {
            cache.clear();
        }
        for found in &series {
            cache.insert(
                (
                    project.to_owned(),
                    device_id.to_owned(),
                    found.metric.clone(),
                ),
                found.series_id,
            );
        }
        Ok(series)
    }

    /// A page of history ordered by time then metric; returns one row more than
    /// `query.limit` when there is a next page. Each series is read from its own index range
    /// (at most `limit + 1` rows each), and the pieces merged: a page costs the same on the
    /// first day of history and on the millionth.
    pub async fn readings(
        &self,
        project: &str,
        device_id: &str,
        query: &ReadingsQuery,
    ) -> Result<Vec<(ReadingOut, Position)>, ApiError> {
        let mut start = query.start.unwrap_or_else(|| from_us(MIN_TIME_US));
        let mut end = query.end.unwrap_or_else(|| from_us(MAX_TIME_US));
        let (after_ts, after_metric) = match &query.after {
            Some(position) => (Some(from_us(position.ts_us)), Some(position.metric.clone())),
            None => (None, None),
        };
        // The cursor narrows the index range itself; the filter only settles equal times.
        if let Some(after) = after_ts {
            match query.order {
                Order::Asc => start = start.max(after),
                Order::Desc => end = end.min(after + chrono::Duration::microseconds(1)),
            }
        }
        let (start_us, end_us) = (start.timestamp_micros(), end.timestamp_micros());
        if end_us.saturating_sub(start_us) > NARROW_RANGES_OVER_US {
            let series = self
                .device_series(project, device_id, query.metrics.as_deref())
                .await?;
            let series: Vec<i32> = series.iter().map(|series| series.series_id).collect();
            let Some((narrow_start, narrow_end)) =
                self.narrow_range(&series, start_us, end_us).await?
            else {
                return Ok(Vec::new());
            };
            (start, end) = (from_us(narrow_start), from_us(narrow_end));
        }
        let sql = page_sql(query.order);
        let limit = query.limit as i64 + 1;
        let rows = self
            .history(
                &sql,
                &[
                    &project,
                    &device_id,
                    &start,
                    &end,
                    &after_ts,
                    &after_metric,
                    &limit,
                    &query.metrics,
                ],
            )
            .await?;
        // Positions and values first; times are formatted once the page is settled (the
        // blocks' candidates can be ten times the page).
        let mut page: Vec<(Position, serde_json::Value)> = Vec::with_capacity(rows.len());
        // Blocks of each metric, in the order they came (the window's).
        let mut compressed: Vec<(String, Vec<blocks::Point>)> = Vec::new();
        for row in &rows {
            let metric: String = row.get(0);
            if let Some(data) = row.get::<_, Option<&[u8]>>(5) {
                let points = blocks::decode(data).map_err(ApiError::internal)?;
                match compressed.last_mut() {
                    Some((last, all)) if *last == metric => all.extend(points),
                    _ => compressed.push((metric, points)),
                }
                continue;
            }
            let EpochMicros(ts_us) = row.get(1);
            page.push((Position { ts_us, metric }, json_value(row, 2)));
        }
        if !compressed.is_empty() {
            let (start_us, end_us) = (start.timestamp_micros(), end.timestamp_micros());
            for (metric, mut points) in compressed {
                points.sort_by_key(|(ts, _)| *ts);
                // The readings in range and past the cursor: a time slice of the sorted points.
                let after = |ts: i64| match (&query.after, query.order) {
                    (None, _) => true,
                    (Some(at), Order::Asc) => {
                        ts > at.ts_us || (ts == at.ts_us && metric > at.metric)
                    }
                    (Some(at), Order::Desc) => {
                        ts < at.ts_us || (ts == at.ts_us && metric < at.metric)
                    }
                };
                let low = points.partition_point(|(ts, _)| *ts < start_us);
                let high = points.partition_point(|(ts, _)| *ts < end_us);
                let in_range = &points[low..high];
                let taken: Box<dyn Iterator<Item = &blocks::Point>> = match query.order {
                    Order::Asc => Box::new(in_range.iter()),
                    Order::Desc => Box::new(in_range.iter().rev()),
                };
                for (ts_us, value) in taken.filter(|(ts, _)| after(*ts)).take(limit as usize) {
                    let position = Position {
                        ts_us: *ts_us,
                        metric: metric.clone(),
                    };
                    page.push((position, blocks::json(value)));
                }
            }
            page.sort_by(|(a, _), (b, _)| match query.order {
                Order::Asc => (a.ts_us, &a.metric).cmp(&(b.ts_us, &b.metric)),
                Order::Desc => (b.ts_us, &b.metric).cmp(&(a.ts_us, &a.metric)),
            });
            page.truncate(limit as usize);
        }
        let mut times = Rfc3339Writer::default();
        Ok(page
            .into_iter()
            .map(|(position, value)| {
                let reading = ReadingOut {
                    metric: position.metric.clone(),
                    ts: times.format(position.ts_us).to_owned(),
                    value,
                };
                (reading, position)
            })
            .collect())
    }

    /// The newest value of each metric (or of the given ones): one index range over the
    /// series dictionary, whatever the history's size.
    pub async fn latest(
        &self,
        project: &str,
        device_id: &str,
        metrics: Option<&[String]>,
    ) -> Result<Vec<ReadingOut>, ApiError> {
        let metrics: Option<Vec<String>> = metrics.map(<[String]>::to_vec);
        let rows = self
            .history(
                "SELECT metric, last_ts, last_num, last_bool, last_text FROM telemetry.series
                 WHERE project = $1 AND device_id = $2 AND last_ts IS NOT NULL
                   AND ($3::text[] IS NULL OR metric = ANY($3))
                 ORDER BY metric COLLATE \"C\"",
                &[&project, &device_id, &metrics],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| ReadingOut {
                metric: row.get(0),
                ts: format_rfc3339(&row.get(1)),
                value: json_value(row, 2),
            })
            .collect())
    }

    /// Readings of the project timed in the last five minutes (and of how many devices), for
    /// the console's overview: only series that reported in that window are read.
    pub async fn recent_activity(&self, project: &str) -> Result<(i64, i64), ApiError> {
        let rows = self
            .history(
                "WITH recent AS (
                   SELECT series_id, device_id FROM telemetry.series
                   WHERE project = $1 AND last_ts >= now() - interval '5 minutes'
                 )
                 SELECT (SELECT count(*) FROM telemetry.readings r
                         WHERE r.series_id IN (SELECT series_id FROM recent)
                           AND r.ts >= now() - interval '5 minutes' AND r.ts <= now()),
                        (SELECT count(DISTINCT device_id) FROM recent)",
                &[&project],
            )
            .await?;
        let row = rows.first().ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("the readings count answered no row"))
        })?;
        Ok((row.get(0), row.get(1)))
    }

    /// Metric names of a device with first and last time and count, from the dictionary.
    pub async fn metrics(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Vec<MetricOut>, ApiError> {
        let rows = self
            .history(
                "SELECT metric, first_ts, last_ts, count FROM telemetry.series
                 WHERE project = $1 AND device_id = $2 AND count > 0
                 ORDER BY metric COLLATE \"C\"",
                &[&project, &device_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| MetricOut {
                metric: row.get(0),
                first_ts: format_rfc3339(&row.get(1)),
                last_ts: format_rfc3339(&row.get(2)),
                count: row.get(3),
            })
            .collect())
    }

    /// Partial aggregates of `series` over one segment, per series and bucket of `interval`.
    /// `edges`: whether `first`/`last` are wanted (over raw rows they cost more than the
    /// rest of the aggregate together).
    pub async fn partials(
        &self,
        series: &[i32],
        segment: Segment,
        interval: Interval,
        edges: bool,
    ) -> Result<Vec<(i32, i64, Partial)>, ApiError> {
        let raw_edges = if edges {
            "min(ts) FILTER (WHERE value_num IS NOT NULL),
             (min(ARRAY[telemetry.epoch_us(ts), value_num]) FILTER (WHERE value_num IS NOT NULL))[2],
             max(ts) FILTER (WHERE value_num IS NOT NULL),
             (max(ARRAY[telemetry.epoch_us(ts), value_num]) FILTER (WHERE value_num IS NOT NULL))[2]"
        } else {
            "NULL::timestamptz, NULL::float8, NULL::timestamptz, NULL::float8"
        };
        let sql = match segment.source {
            Source::Raw => format!(
                "SELECT series_id, date_bin(make_interval(secs => $4), ts, timestamptz '1970-01-01 00:00:00+00'),
                        count(*), count(value_num), sum(value_num), min(value_num), max(value_num),
                        {raw_edges}
                        , NULL::bytea
                 FROM telemetry.readings
                 WHERE series_id = ANY($1) AND ts >= $2 AND ts < $3
                 GROUP BY 1, 2
                 UNION ALL
                 SELECT series_id, NULL, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, data
                 FROM telemetry.blocks
                 WHERE series_id = ANY($1) AND first_ts < $3
                   AND first_ts > $2 - interval '1 day' AND last_ts >= $2"
            ),
            Source::Rollup1h | Source::Rollup1d => format!(
                "SELECT series_id, date_bin(make_interval(secs => $4), bucket, timestamptz '1970-01-01 00:00:00+00'),
                        sum(count)::int8, sum(num_count)::int8, sum(sum), min(min), max(max),
                        min(first_ts),
                        (min(ARRAY[telemetry.epoch_us(first_ts), first_num]) FILTER (WHERE first_ts IS NOT NULL))[2],
                        max(last_ts),
                        (max(ARRAY[telemetry.epoch_us(last_ts), last_num]) FILTER (WHERE last_ts IS NOT NULL))[2],
                        NULL::bytea
                 FROM telemetry.{}
                 WHERE series_id = ANY($1) AND bucket >= $2 AND bucket < $3
                 GROUP BY 1, 2",
                segment.source.name()
            ),
        };
        let seconds = interval.seconds as f64;
        let rows = self
            .history(
                &sql,
                &[
                    &series,
                    &from_us(segment.start_us),
                    &from_us(segment.end_us),
                    &seconds,
                ],
            )
            .await?;
        let mut partials = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(data) = row.get::<_, Option<&[u8]>>(11) else {
                continue;
            };
            let points = blocks::decode(data).map_err(ApiError::internal)?;
            partials.extend(blocks::partials(
                row.get(0),
                &points,
                (segment.start_us, segment.end_us),
                interval.seconds * 1_000_000,
                edges,
            ));
        }
        partials.extend(
            rows.iter()
                .filter(|row| row.get::<_, Option<&[u8]>>(11).is_none())
                .map(|row| {
                    let bucket: DateTime<Utc> = row.get(1);
                    let point = |ts: usize, value: usize| {
                        row.get::<_, Option<DateTime<Utc>>>(ts)
                            .zip(row.get::<_, Option<f64>>(value))
                            .map(|(ts, value)| (ts.timestamp_micros(), value))
                    };
                    (
                        row.get(0),
                        bucket.timestamp_micros(),
                        Partial {
                            count: row.get(2),
                            num_count: row.get(3),
                            sum: row.get(4),
                            min: row.get(5),
                            max: row.get(6),
                            first: point(7, 8),
                            last: point(9, 10),
                        },
                    )
                }),
        );
        Ok(partials)
    }

    /// `[start_us, end_us)` narrowed to the times `series` hold (their first and last
    /// reading, from the dictionary), or `None` when they hold none in it. A read names its
    /// range so that planning keeps only the partitions that can hold its rows; an open or
    /// wide range (a page without `start`, an export of everything) would otherwise plan and
    /// lock every daily partition there is. Ranges of a few days are taken as they are.
    pub async fn narrow_range(
        &self,
        series: &[i32],
        start_us: i64,
        end_us: i64,
    ) -> Result<Option<(i64, i64)>, ApiError> {
        if end_us.saturating_sub(start_us) <= NARROW_RANGES_OVER_US {
            return Ok(Some((start_us, end_us)));
        }
        let row = self
            .history(
                "SELECT min(first_ts), max(last_ts) FROM telemetry.series
                 WHERE series_id = ANY($1) AND count > 0",
                &[&series],
            )
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("an aggregate returned no row")))?;
        let first: Option<DateTime<Utc>> = row.get(0);
        let last: Option<DateTime<Utc>> = row.get(1);
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(None);
        };
        let start_us = start_us.max(first.timestamp_micros());
        let end_us = end_us.min(last.timestamp_micros().saturating_add(1));
        Ok((start_us < end_us).then_some((start_us, end_us)))
    }

    /// Up to `limit` raw readings of one series in `[start, end)`, in time order.
    pub async fn series_readings(
        &self,
        series_id: i32,
        start_us: i64,
        end_us: i64,
        limit: i64,
    ) -> Result<Vec<(String, serde_json::Value)>, ApiError> {
        let Some((start_us, end_us)) = self.narrow_range(&[series_id], start_us, end_us).await?
        else {
            return Ok(Vec::new());
        };
        // Rows and, in the same snapshot, the blocks that can hold the first `limit`
        // readings (as a page picks them, see `readings`).
        let rows = self
            .history(
                "(SELECT ts, value_num, value_bool, value_text, NULL::bytea FROM telemetry.readings
                  WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4)
                 UNION ALL
                 SELECT NULL, NULL, NULL, NULL, x.data FROM (
                     SELECT b.data, row_number() OVER w AS n,
                            sum(b.count) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                              - first_value(b.count) OVER w AS before
                     FROM telemetry.blocks b
                     WHERE b.series_id = $1 AND b.first_ts < $3
                       AND b.first_ts > $2 - interval '1 day' AND b.last_ts >= $2
                     WINDOW w AS (ORDER BY b.first_ts)) x
                 WHERE x.n = 1 OR x.before < $4",
                &[&series_id, &from_us(start_us), &from_us(end_us), &limit],
            )
            .await?;
        let mut points: Vec<blocks::Point> = Vec::with_capacity(rows.len());
        for row in &rows {
            match row.get::<_, Option<&[u8]>>(4) {
                Some(data) => points.extend(
                    blocks::decode(data)
                        .map_err(ApiError::internal)?
                        .into_iter()
                        .filter(|(ts, _)| (start_us..end_us).contains(ts)),
                ),
                None => {
                    let EpochMicros(ts_us) = row.get(0);
                    if let Some(value) = blocks::row_value(row, 1) {
                        points.push((ts_us, value));
                    }
                }
            }
        }
        points.sort_by_key(|(ts, _)| *ts);
        points.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(points
            .iter()
            .map(|(ts, value)| (format_rfc3339(&from_us(*ts)), blocks::json(value)))
            .collect())
    }

    /// Series ids of several devices' metrics: `(device, metric) -> id` for those that exist.
    pub async fn series_of_devices(
        &self,
        project: &str,
        devices: &[String],
        metrics: &[String],
    ) -> Result<HashMap<(String, String), i32>, ApiError> {
        let rows = self
            .history(
                "SELECT device_id, metric, series_id FROM telemetry.series
                 WHERE project = $1 AND device_id = ANY($2) AND metric = ANY($3)",
                &[&project, &devices, &metrics],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect())
    }
}

/// One statement on one of a worker's read pools.
async fn query_on(
    reads: &Reads,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, ApiError> {
    let client = reads.client().await?;
    let statement = client.prepare_cached(sql).await.map_err(read_error)?;
    client.query(&statement, params).await.map_err(read_error)
}

/// A project's retention row (`telemetry.retention`), which the maintenance task reads.
impl Repo {
    /// The project's own periods (None: the default).
    pub async fn retention(
        &self,
        project: &str,
    ) -> Result<(Option<Period>, Option<Period>), ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT extract(epoch FROM readings)::int8, extract(epoch FROM rollups)::int8
                 FROM telemetry.retention WHERE project = $1",
                &[&project],
            )
            .await?;
        Ok(row.map_or((None, None), |row| {
            (
                row.get::<_, Option<i64>>(0).map(Period::from_seconds),
                row.get::<_, Option<i64>>(1).map(Period::from_seconds),
            )
        }))
    }

    /// Replaces the project's periods; both None removes its row (the defaults apply).
    pub async fn set_retention(
        &self,
        project: &str,
        readings: Option<Period>,
        rollups: Option<Period>,
    ) -> Result<(), ApiError> {
        let client = self.pool.get().await?;
        if readings.is_none() && rollups.is_none() {
            client
                .execute(
                    "DELETE FROM telemetry.retention WHERE project = $1",
                    &[&project],
                )
                .await?;
            return Ok(());
        }
        client
            .execute(
                "INSERT INTO telemetry.retention (project, readings, rollups)
                 VALUES ($1, $2::int8 * interval '1 second', $3::int8 * interval '1 second')
                 ON CONFLICT (project) DO UPDATE SET readings = EXCLUDED.readings, rollups = EXCLUDED.rollups",
                &[
                    &project,
                    &readings.map(Period::seconds),
                    &rollups.map(Period::seconds),
                ],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn rows_are_put_in_day_series_and_time_order(
            rows in proptest::collection::vec((0usize..4, -3i64..3, 0i64..50), 0..200),
        ) {
            let ids = [7, 3, 9, 1];
            let day_us = 86_400_000_000;
            // Each reading's value is its place in the batch.
            let values: Vec<reading::Value> =
                (0..rows.len()).map(|n| reading::Value::Number(n as f64)).collect();
            // Days either side of the epoch, and several readings at one time.
            let rows: Vec<WriteRow> = rows
                .into_iter()
                .zip(&values)
                .map(|((index, day, ts), value)| (index, day * day_us + ts * 1_000_000_000, value))
                .collect();
            let ordered = in_write_order(&rows, &ids);
            let place = |value: &reading::Value| match value {
                reading::Value::Number(n) => *n as usize,
                _ => unreachable!(),
            };
            // In (day, series, time) order, and of readings at one time, in arrival order.
            let mut expected: Vec<(i64, i32, i64, usize)> = rows
                .iter()
                .map(|(index, ts_us, value)| {
                    (ts_us.div_euclid(day_us), ids[*index], *ts_us, place(value))
                })
                .collect();
            expected.sort_unstable();
            let got: Vec<(i64, i32, i64, usize)> = ordered
                .iter()
                .map(|(id, ts_us, value)| (ts_us.div_euclid(day_us), *id, *ts_us, place(value)))
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn a_batch_of_many_days_is_cut_into_groups_of_few() {
        let number = reading::Value::Number(1.0);
        let value = &number;
        let day_us = 86_400_000_000;
        // Two series, 20 days each, in (day, series, time) order as the writer sorts them.
        let rows: Vec<SeriesRow> = (0..20)
            .flat_map(|day| (0..2).map(move |series| (series, day * day_us + 5, value)))
            .collect();
        let groups = by_days(&rows, 8);
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [16, 16, 8]
        );
        for group in &groups {
            let days: HashSet<NaiveDate> = group.iter().map(|row| day_of(row.1)).collect();
            assert!(days.len() <= 8);
            assert!(
                group
                    .windows(2)
                    .all(|pair| (day_of(pair[0].1), pair[0].0) < (day_of(pair[1].1), pair[1].0))
            );
        }
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), rows.len());
        assert_eq!(by_days(&rows[..16], 8), [&rows[..16]]);
        assert!(by_days(&[], 8).is_empty());
    }
}
