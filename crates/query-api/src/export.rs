//! Export: every reading of a device in a range, as CSV or NDJSON, in constant memory.
//!
//! One transaction holds one portal per series (each an index range scan in time order); the
//! rows are merged by (time, metric) here, fetched a chunk at a time, and written into a
//! bounded channel that the response body drains. A slow client slows the fetching; a gone
//! client ends it. Memory is (series × chunk) rows plus a few buffers, whatever the range.

use std::{cmp::Reverse, collections::BinaryHeap, collections::VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::Pool;
use fieldline_common::time::{format_rfc3339, from_us};
use futures::{SinkExt, channel::mpsc};
use tokio_postgres::Row;

use crate::{
    domain::{ExportFormat, Order},
    repo::{DeviceSeries, json_value},
};

/// Rows fetched per series per round trip (divided among series, at least 256).
const FETCH_ROWS: usize = 8_192;
/// Bytes of output gathered before a chunk goes to the client.
const CHUNK_BYTES: usize = 64 * 1024;

/// What to export.
pub struct Export {
    pub series: Vec<DeviceSeries>,
    pub start_us: i64,
    pub end_us: i64,
    pub order: Order,
    pub format: ExportFormat,
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(out: &mut BytesMut, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.put_u8(b'"');
        out.put_slice(field.replace('"', "\"\"").as_bytes());
        out.put_u8(b'"');
    } else {
        out.put_slice(field.as_bytes());
    }
}

fn write_row(out: &mut BytesMut, format: ExportFormat, metric: &str, row: &Row) {
    let ts: chrono::DateTime<chrono::Utc> = row.get(0);
    let ts = format_rfc3339(&ts);
    let value = json_value(row, 1);
    match format {
        ExportFormat::Csv => {
            out.put_slice(ts.as_bytes());
            out.put_u8(b',');
            csv_field(out, metric);
            out.put_u8(b',');
            match &value {
                serde_json::Value::String(text) => csv_field(out, text),
                serde_json::Value::Null => {}
                other => out.put_slice(other.to_string().as_bytes()),
            }
            out.put_u8(b'\n');
        }
        ExportFormat::Ndjson => {
            let line = serde_json::json!({"metric": metric, "ts": ts, "value": value});
            out.put_slice(line.to_string().as_bytes());
            out.put_u8(b'\n');
        }
    }
}

/// One series being read: its buffered rows and whether the portal has more.
struct Cursor {
    metric: String,
    portal: tokio_postgres::Portal,
    rows: VecDeque<Row>,
    exhausted: bool,
}

/// Starts the export; the receiver is the response body. Errors after the first byte can only
/// end the body early (the status is already sent): they are logged and the stream stops.
pub fn start(pool: Pool, export: Export) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (mut sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(error) = run(pool, export, &mut sender).await {
            tracing::warn!(error = %error, "export ended early");
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
    if export.format == ExportFormat::Csv {
        out.put_slice(b"ts,metric,value\n");
    }
    let mut client = pool.get().await?;
    let transaction = client.build_transaction().read_only(true).start().await?;
    let sql = match export.order {
        Order::Asc => {
            "SELECT ts, value_num, value_bool, value_text FROM telemetry.readings
             WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts ASC"
        }
        Order::Desc => {
            "SELECT ts, value_num, value_bool, value_text FROM telemetry.readings
             WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts DESC"
        }
    };
    let statement = transaction.prepare(sql).await?;
    let fetch = (FETCH_ROWS / export.series.len().max(1)).max(256) as i32;
    let (start, end) = (from_us(export.start_us), from_us(export.end_us));
    let mut cursors = Vec::with_capacity(export.series.len());
    for series in &export.series {
        let portal = transaction
            .bind(&statement, &[&series.series_id, &start, &end])
            .await?;
        cursors.push(Cursor {
            metric: series.metric.clone(),
            portal,
            rows: VecDeque::new(),
            exhausted: false,
        });
    }
    // Heap of (time, metric index) of each cursor's next row; metrics are sorted, so the
    // index orders like the name.
    let mut heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let key = |ts_us: i64, index: usize| match export.order {
        Order::Asc => Reverse((ts_us, index)),
        Order::Desc => Reverse((-ts_us, usize::MAX - index)),
    };
    for (index, cursor) in cursors.iter_mut().enumerate() {
        refill(&transaction, cursor, fetch).await?;
        if let Some(row) = cursor.rows.front() {
            heap.push(key(ts_us(row), index));
        }
    }
    while let Some(Reverse((_, raw_index))) = heap.pop() {
        let index = match export.order {
            Order::Asc => raw_index,
            Order::Desc => usize::MAX - raw_index,
        };
        let cursor = &mut cursors[index];
        let Some(row) = cursor.rows.pop_front() else {
            continue;
        };
        write_row(&mut out, export.format, &cursor.metric, &row);
        if cursor.rows.is_empty() {
            refill(&transaction, cursor, fetch).await?;
        }
        if let Some(next) = cursor.rows.front() {
            heap.push(key(ts_us(next), index));
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

fn ts_us(row: &Row) -> i64 {
    row.get::<_, chrono::DateTime<chrono::Utc>>(0)
        .timestamp_micros()
}

async fn refill(
    transaction: &deadpool_postgres::Transaction<'_>,
    cursor: &mut Cursor,
    fetch: i32,
) -> Result<(), tokio_postgres::Error> {
    if cursor.exhausted {
        return Ok(());
    }
    let rows = transaction.query_portal(&cursor.portal, fetch).await?;
    cursor.exhausted = rows.len() < fetch as usize;
    cursor.rows.extend(rows);
    Ok(())
}
