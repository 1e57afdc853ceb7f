//! Export: every reading of a device in a range, as CSV or NDJSON, in constant memory.
//!
//! One transaction holds one portal per series (its rows in time order), and one for its
//! compressed blocks when it has some in range; the rows are merged by (time, metric) here,
//! fetched a chunk at a time, and written into a bounded channel that the response body
//! drains. A slow client slows the fetching; a gone client ends it. Memory here is about
//! [`FETCH_ROWS`] points (at least 256 a series) plus a few buffers, whatever the range.
//! PostgreSQL plans each portal for its range (a custom plan: a generic plan locks every
//! partition, so a partition being dropped would stall the export,
//! `livetime::reads_touch_only_the_partitions_of_their_range`), with bitmap scans off
//! ([`PLANNER_SETTINGS`]): a series' rows come by its index in time order, streamed, where a
//! bitmap scan would sort them, on a long range in temporary files.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet, VecDeque},
};

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::Pool;
use fieldline_common::time::{EpochMicros, Rfc3339Writer, from_us};
use fieldline_proto::v1::reading::Value;
use futures::{SinkExt, channel::mpsc};
use tokio_postgres::{IsolationLevel, Row, types::ToSql};

use crate::{
    blocks::{self, JsonValue, Point},
    domain::{ExportFormat, Order},
    repo::DeviceSeries,
};

/// Rows fetched per round trip, divided among the series (at least 256 each): a device's day
/// of ten metrics (9,600 rows in the bench) comes in the first, pipelined, round of fetches,
/// and the merge never waits on PostgreSQL. A numeric point is 40 bytes, about 650 KB an
/// export; text of the longest kind (4 KiB a value) would hold up to 64 MiB.
const FETCH_ROWS: usize = 16_384;
/// Bytes of output gathered before a chunk goes to the client.
const CHUNK_BYTES: usize = 64 * 1024;

/// The export's statement for one series' rows, oldest first (the newest first is the same
/// with `DESC`).
pub const ROWS_ASC_SQL: &str =
    "SELECT ts, value_num, value_bool, value_text FROM telemetry.readings
             WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts ASC";

/// What the export's transaction plans with: a series' rows by its index, in time order, and
/// not by a bitmap scan and a sort. The index scan streams a range of any length in constant
/// memory and never sorts in temporary files; on a day of a device it takes about a seventh
/// less of PostgreSQL's time than the bitmap scan, which PostgreSQL prefers for a series'
/// rows spread over a page each.
pub const PLANNER_SETTINGS: &str = "SET LOCAL enable_bitmapscan = off";

/// What to export.
pub struct Export {
    pub series: Vec<DeviceSeries>,
    pub start_us: i64,
    pub end_us: i64,
    pub order: Order,
    pub format: ExportFormat,
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(out: &mut impl BufMut, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.put_u8(b'"');
        out.put_slice(field.replace('"', "\"\"").as_bytes());
        out.put_u8(b'"');
    } else {
        out.put_slice(field.as_bytes());
    }
}

/// One NDJSON line.
#[derive(serde::Serialize)]
struct Line<'a> {
    metric: &'a str,
    ts: &'a str,
    value: JsonValue<'a>,
}

fn write_row(
    out: &mut BytesMut,
    format: ExportFormat,
    times: &mut Rfc3339Writer,
    metric: &Metric,
    (ts_us, value): &Point,
) -> serde_json::Result<()> {
    let ts = times.format(*ts_us);
    match format {
        ExportFormat::Csv => {
            out.put_slice(ts.as_bytes());
            out.put_u8(b',');
            out.put_slice(&metric.csv);
            out.put_u8(b',');
            match value {
                Value::Text(text) => csv_field(out, text),
                other => serde_json::to_writer((&mut *out).writer(), &JsonValue(other))?,
            }
        }
        ExportFormat::Ndjson => {
            let line = Line {
                metric: &metric.name,
                ts,
                value: JsonValue(value),
            };
            serde_json::to_writer((&mut *out).writer(), &line)?;
        }
    }
    out.put_u8(b'\n');
    Ok(())
}

/// One of a series' two sources: its rows (open days, and late readings of compressed ones)
/// or its blocks (compressed days), each a portal read in the export's order.
struct Source {
    /// None for a series without blocks in range.
    portal: Option<tokio_postgres::Portal>,
    points: VecDeque<Point>,
    exhausted: bool,
    blocks: bool,
}

impl Source {
    async fn bind(
        transaction: &deadpool_postgres::Transaction<'_>,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn ToSql + Sync)],
        blocks: bool,
    ) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            portal: Some(transaction.bind(statement, params).await?),
            points: VecDeque::new(),
            exhausted: false,
            blocks,
        })
    }

    /// A source with nothing in it.
    fn none() -> Self {
        Self {
            portal: None,
            points: VecDeque::new(),
            exhausted: true,
            blocks: true,
        }
    }
}

/// A series' metric: its name, and its CSV field (quoted once, written on every row).
struct Metric {
    name: String,
    csv: Vec<u8>,
}

impl Metric {
    fn new(name: &str) -> Self {
        let mut csv = Vec::with_capacity(name.len());
        csv_field(&mut csv, name);
        Self {
            name: name.to_owned(),
            csv,
        }
    }
}

/// One series being read: the next points of its rows and of its blocks, merged by time.
struct Cursor {
    metric: Metric,
    rows: Source,
    blocks: Source,
}

impl Cursor {
    /// Whether the next point comes from the blocks (else the rows), or None at the end.
    fn next_from_blocks(&self, order: Order) -> Option<bool> {
        match (self.rows.points.front(), self.blocks.points.front()) {
            (None, None) => None,
            (Some(_), None) => Some(false),
            (None, Some(_)) => Some(true),
            (Some(row), Some(block)) => Some(match order {
                Order::Asc => block.0 < row.0,
                Order::Desc => block.0 > row.0,
            }),
        }
    }

    fn front(&self, order: Order) -> Option<i64> {
        let blocks = self.next_from_blocks(order)?;
        let source = if blocks { &self.blocks } else { &self.rows };
        source.points.front().map(|(ts, _)| *ts)
    }

    fn pop(&mut self, order: Order) -> Option<(Point, bool)> {
        let blocks = self.next_from_blocks(order)?;
        let source = if blocks {
            &mut self.blocks
        } else {
            &mut self.rows
        };
        source.points.pop_front().map(|point| (point, blocks))
    }
}

/// Starts the export; the receiver is the response body. Errors after the first byte can only
/// end the body early (the status is already sent): they are logged and the stream stops.
pub fn start(pool: Pool, export: Export) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (mut sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(error) = run(pool, export, &mut sender).await {
            tracing::warn!(error = format!("{error:#}"), "export ended early");
            let _ = sender
                .send(Err(std::io::Error::other("export failed")))
                .await;
        }
    });
    receiver
}

async fn run(
    pool: Pool,
    export: Export,
    sender: &mut mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> anyhow::Result<()> {
    let mut out = BytesMut::with_capacity(CHUNK_BYTES * 2);
    let mut times = Rfc3339Writer::default();
    if export.format == ExportFormat::Csv {
        out.put_slice(b"ts,metric,value\n");
    }
    let mut client = pool.get().await?;
    // One snapshot for both portals of every series: a slice the compression task moves
    // meanwhile is seen once, as rows or as blocks.
    let transaction = client
        .build_transaction()
        .read_only(true)
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let (rows_sql, blocks_sql) = match export.order {
        Order::Asc => (
            ROWS_ASC_SQL,
            "SELECT data FROM telemetry.blocks
             WHERE series_id = $1 AND first_ts < $3 AND first_ts > $2::timestamptz - interval '1 day'
               AND last_ts >= $2 ORDER BY first_ts ASC",
        ),
        Order::Desc => (
            "SELECT ts, value_num, value_bool, value_text FROM telemetry.readings
             WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts DESC",
            "SELECT data FROM telemetry.blocks
             WHERE series_id = $1 AND first_ts < $3 AND first_ts > $2::timestamptz - interval '1 day'
               AND last_ts >= $2 ORDER BY first_ts DESC",
        ),
    };
    let ids: Vec<i32> = export
        .series
        .iter()
        .map(|series| series.series_id)
        .collect();
    let (start, end) = (from_us(export.start_us), from_us(export.end_us));
    // Pipelined, like the binds and first fetches below: an export is a few dozen round
    // trips, and on a day of a device they cost as much as its rows.
    let block_series = [&ids as &(dyn ToSql + Sync), &start, &end];
    let ((), rows_statement, blocks_statement, with_blocks) = futures::try_join!(
        transaction.batch_execute(PLANNER_SETTINGS),
        transaction.prepare_cached(rows_sql),
        transaction.prepare_cached(blocks_sql),
        // Only the series with blocks in range get a blocks portal.
        transaction.query(
            "SELECT DISTINCT series_id FROM telemetry.blocks
             WHERE series_id = ANY($1) AND first_ts < $3
               AND first_ts > $2::timestamptz - interval '1 day' AND last_ts >= $2",
            &block_series,
        ),
    )?;
    let with_blocks: HashSet<i32> = with_blocks.iter().map(|row| row.get(0)).collect();
    let fetch = (FETCH_ROWS / export.series.len().max(1)).max(256) as i32;
    let range = (export.start_us, export.end_us);
    let params: Vec<[&(dyn ToSql + Sync); 3]> = export
        .series
        .iter()
        .map(|series| [&series.series_id as &(dyn ToSql + Sync), &start, &end])
        .collect();
    let (rows, blocks) = futures::try_join!(
        futures::future::try_join_all(params.iter().map(|params| Source::bind(
            &transaction,
            &rows_statement,
            params,
            false
        )),),
        futures::future::try_join_all(export.series.iter().zip(&params).map(
            |(series, params)| async {
                if with_blocks.contains(&series.series_id) {
                    Source::bind(&transaction, &blocks_statement, params, true).await
                } else {
                    Ok(Source::none())
                }
            }
        )),
    )?;
    let mut cursors: Vec<Cursor> = export
        .series
        .iter()
        .zip(rows.into_iter().zip(blocks))
        .map(|(series, (rows, blocks))| Cursor {
            metric: Metric::new(&series.metric),
            rows,
            blocks,
        })
        .collect();
    futures::future::try_join_all(cursors.iter_mut().map(|cursor| async {
        refill(&transaction, &mut cursor.rows, fetch, range, export.order).await?;
        refill(&transaction, &mut cursor.blocks, fetch, range, export.order).await
    }))
    .await?;
    // Heap of (time, metric index) of each cursor's next point; metrics are sorted, so the
    // index orders like the name.
    let mut heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let key = |ts_us: i64, index: usize| match export.order {
        Order::Asc => Reverse((ts_us, index)),
        Order::Desc => Reverse((-ts_us, usize::MAX - index)),
    };
    for (index, cursor) in cursors.iter().enumerate() {
        if let Some(ts) = cursor.front(export.order) {
            heap.push(key(ts, index));
        }
    }
    while let Some(Reverse((_, raw_index))) = heap.pop() {
        let index = match export.order {
            Order::Asc => raw_index,
            Order::Desc => usize::MAX - raw_index,
        };
        let cursor = &mut cursors[index];
        let Some((point, from_blocks)) = cursor.pop(export.order) else {
            continue;
        };
        write_row(&mut out, export.format, &mut times, &cursor.metric, &point)?;
        let source = if from_blocks {
            &mut cursor.blocks
        } else {
            &mut cursor.rows
        };
        if source.points.is_empty() {
            refill(&transaction, source, fetch, range, export.order).await?;
        }
        if let Some(ts) = cursor.front(export.order) {
            heap.push(key(ts, index));
        }
        if out.len() >= CHUNK_BYTES {
            let chunk = out.split().freeze();
            if sender.send(Ok(chunk)).await.is_err() {
                // The client went away.
                return Ok(());
            }
        }
    }
    if !out.is_empty() {
        let _ = sender.send(Ok(out.freeze())).await;
    }
    transaction.commit().await?;
    Ok(())
}

/// Reads a source's next points: `fetch` rows, or blocks one at a time until one has points
/// in the range (a block that overlaps it may hold none inside it).
async fn refill(
    transaction: &deadpool_postgres::Transaction<'_>,
    source: &mut Source,
    fetch: i32,
    (start_us, end_us): (i64, i64),
    order: Order,
) -> anyhow::Result<()> {
    while source.points.is_empty() && !source.exhausted {
        let Some(portal) = &source.portal else {
            source.exhausted = true;
            continue;
        };
        if !source.blocks {
            let rows = transaction.query_portal(portal, fetch).await?;
            source.exhausted = rows.len() < fetch as usize;
            source.points.extend(rows.iter().filter_map(point));
            continue;
        }
        let rows = transaction.query_portal(portal, 1).await?;
        let Some(row) = rows.first() else {
            source.exhausted = true;
            continue;
        };
        let points = blocks::decode(row.get(0))?;
        let in_range = points
            .into_iter()
            .filter(|(ts, _)| (start_us..end_us).contains(ts));
        match order {
            Order::Asc => source.points.extend(in_range),
            Order::Desc => source.points.extend(in_range.rev()),
        }
    }
    Ok(())
}

/// A row of `telemetry.readings` (time and the three value columns) as a point.
fn point(row: &Row) -> Option<Point> {
    let EpochMicros(ts_us) = row.get(0);
    Some((ts_us, blocks::row_value(row, 1)?))
}
