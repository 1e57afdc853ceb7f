//! query-api's SQL, and nothing else does SQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fieldline_common::{
    ApiError,
    time::{format_rfc3339, from_us},
};
use fieldline_proto::v1::{TelemetryBatch, reading};
use tokio_postgres::Row;

use crate::domain::{Order, Position, ReadingOut, ReadingsQuery};

#[derive(Clone)]
pub struct Repo {
    pool: Pool,
}

/// Readings as columns, for one `UNNEST` insert.
#[derive(Default)]
struct Columns {
    project: Vec<String>,
    device_id: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    metric: Vec<String>,
    value_num: Vec<Option<f64>>,
    value_bool: Vec<Option<bool>>,
    value_text: Vec<Option<String>>,
}

impl Columns {
    fn push(
        &mut self,
        project: &str,
        device_id: &str,
        ts_us: i64,
        metric: &str,
        value: &reading::Value,
    ) {
        self.project.push(project.to_owned());
        self.device_id.push(device_id.to_owned());
        self.ts.push(from_us(ts_us));
        self.metric.push(metric.to_owned());
        let (num, flag, text) = match value {
            reading::Value::Number(number) => (Some(*number), None, None),
            reading::Value::Boolean(flag) => (None, Some(*flag), None),
            reading::Value::Text(text) => (None, None, Some(text.clone())),
        };
        self.value_num.push(num);
        self.value_bool.push(flag);
        self.value_text.push(text);
    }

    fn len(&self) -> usize {
        self.ts.len()
    }
}

fn json_value(row: &Row, first_value_column: usize) -> serde_json::Value {
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

impl Repo {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Stores the readings of `batches` in one transaction and moves each metric's latest
    /// value forward. Idempotent: a batch stored twice changes nothing the second time.
    /// Returns the number of readings given.
    pub async fn store(&self, batches: &[TelemetryBatch]) -> Result<usize, ApiError> {
        let mut rows = Columns::default();
        // Newest reading per (project, device, metric) in this set; ties keep the first, as
        // the readings table does.
        let mut newest: HashMap<(&str, &str, &str), (i64, &reading::Value)> = HashMap::new();
        for batch in batches {
            for reading in &batch.readings {
                let Some(value) = &reading.value else {
                    continue;
                };
                rows.push(
                    &batch.project,
                    &batch.device_id,
                    reading.ts_us,
                    &reading.metric,
                    value,
                );
                let key = (
                    batch.project.as_str(),
                    batch.device_id.as_str(),
                    reading.metric.as_str(),
                );
                match newest.get(&key) {
                    Some((ts_us, _)) if *ts_us >= reading.ts_us => {}
                    _ => {
                        newest.insert(key, (reading.ts_us, value));
                    }
                }
            }
        }
        if rows.len() == 0 {
            return Ok(0);
        }
        let mut latest = Columns::default();
        for ((project, device_id, metric), (ts_us, value)) in newest {
            latest.push(project, device_id, ts_us, metric, value);
        }

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO telemetry.readings (project, device_id, ts, metric, value_num, value_bool, value_text)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[],
                                  $5::float8[], $6::bool[], $7::text[])
             ON CONFLICT DO NOTHING",
            &[&rows.project, &rows.device_id, &rows.ts, &rows.metric, &rows.value_num, &rows.value_bool, &rows.value_text],
        )
        .await?;
        tx.execute(
            "INSERT INTO telemetry.latest AS l (project, device_id, metric, ts, value_num, value_bool, value_text)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                  $5::float8[], $6::bool[], $7::text[])
             ON CONFLICT (project, device_id, metric) DO UPDATE
               SET ts = excluded.ts, value_num = excluded.value_num,
                   value_bool = excluded.value_bool, value_text = excluded.value_text
               WHERE excluded.ts > l.ts",
            &[&latest.project, &latest.device_id, &latest.metric, &latest.ts, &latest.value_num, &latest.value_bool, &latest.value_text],
        )
        .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// A page of history; returns one row more than `query.limit` when there is a next page.
    pub async fn readings(
        &self,
        project: &str,
        device_id: &str,
        query: &ReadingsQuery,
    ) -> Result<Vec<(ReadingOut, Position)>, ApiError> {
        let client = self.pool.get().await?;
        let (after_ts, after_metric) = match &query.after {
            Some(position) => (Some(from_us(position.ts_us)), Some(position.metric.clone())),
            None => (None, None),
        };
        let (keyset, order) = match query.order {
            Order::Asc => ("(ts, metric) > ($6, $7)", "ts ASC, metric ASC"),
            Order::Desc => ("(ts, metric) < ($6, $7)", "ts DESC, metric DESC"),
        };
        let sql = format!(
            "SELECT metric, ts, value_num, value_bool, value_text FROM telemetry.readings
             WHERE project = $1 AND device_id = $2
               AND ($3::timestamptz IS NULL OR ts >= $3)
               AND ($4::timestamptz IS NULL OR ts < $4)
               AND ($5::text[] IS NULL OR metric = ANY($5))
               AND ($6::timestamptz IS NULL OR {keyset})
             ORDER BY {order} LIMIT $8"
        );
        let limit = query.limit as i64 + 1;
        let rows = client
            .query(
                &sql,
                &[
                    &project,
                    &device_id,
                    &query.start,
                    &query.end,
                    &query.metrics,
                    &after_ts,
                    &after_metric,
                    &limit,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let ts: DateTime<Utc> = row.get(1);
                let metric: String = row.get(0);
                let position = Position {
                    ts_us: ts.timestamp_micros(),
                    metric: metric.clone(),
                };
                (
                    ReadingOut {
                        metric,
                        ts: format_rfc3339(&ts),
                        value: json_value(row, 2),
                    },
                    position,
                )
            })
            .collect())
    }

    /// The newest value of each metric (or of the given ones).
    pub async fn latest(
        &self,
        project: &str,
        device_id: &str,
        metrics: Option<&[String]>,
    ) -> Result<Vec<ReadingOut>, ApiError> {
        let client = self.pool.get().await?;
        let metrics: Option<Vec<String>> = metrics.map(<[String]>::to_vec);
        let rows = client
            .query(
                "SELECT metric, ts, value_num, value_bool, value_text FROM telemetry.latest
                 WHERE project = $1 AND device_id = $2 AND ($3::text[] IS NULL OR metric = ANY($3))
                 ORDER BY metric",
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
}
