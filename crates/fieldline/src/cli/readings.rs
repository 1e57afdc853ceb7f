//! Readings: query history (raw pages or aggregated buckets), the latest values, export a
//! range as it streams, and import a CSV through the backfill route in batches, with a
//! progress bar.

use std::{io::Write as _, path::PathBuf, time::Duration};

use clap::Subcommand;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

use super::{
    Connection,
    client::{Client, Failure, Result, segment},
    output::{self, Output},
};

/// Rows per backfill request, and bytes (well under the route's 16 MiB default limit).
const IMPORT_BATCH_ROWS: usize = 20_000;
const IMPORT_BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, Subcommand)]
pub enum ReadingsCommand {
    /// A device's readings in a time range, oldest first; with --interval, aggregates in
    /// UTC-aligned buckets instead.
    Query {
        device: String,
        /// Metric name(s), comma-separated.
        #[arg(long)]
        metric: Option<String>,
        /// Start: RFC 3339, epoch milliseconds, or relative (`-24h`).
        #[arg(long, allow_hyphen_values = true)]
        start: Option<String>,
        /// End (exclusive), same forms.
        #[arg(long, allow_hyphen_values = true)]
        end: Option<String>,
        /// Bucket width (`1m`, `5m`, `1h`, `1d`, …): aggregate.
        #[arg(long)]
        interval: Option<String>,
        /// Aggregate functions, comma-separated (avg, min, max, sum, count, first, last).
        #[arg(long = "fn")]
        functions: Option<String>,
        /// Empty buckets: none, null, previous, linear or a number.
        #[arg(long)]
        fill: Option<String>,
        /// Readings per page (raw queries).
        #[arg(long)]
        limit: Option<u32>,
        /// Follow every page (raw queries).
        #[arg(long)]
        all: bool,
    },
    /// The newest value of each metric.
    Latest {
        device: String,
        #[arg(long)]
        metric: Option<String>,
    },
    /// Stream a range to a file or stdout as CSV (`ts,metric,value`) or NDJSON.
    Export {
        device: String,
        #[arg(long)]
        metric: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        start: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        end: Option<String>,
        /// csv or ndjson.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Where to write (stdout when absent).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Import a CSV with a header row, long (`ts,metric,value`) or wide (`ts,<metric>,…`),
    /// through the backfill route, in batches. Each batch is stored whole or not at all; a
    /// bad row stops the import, naming its line, with the earlier batches stored.
    Import {
        device: String,
        file: PathBuf,
        /// Rows per request.
        #[arg(long, default_value_t = IMPORT_BATCH_ROWS)]
        batch_rows: usize,
    },
}

impl ReadingsCommand {
    pub async fn run(self, connection: &Connection) -> Result<()> {
        let client = connection.client()?;
        let out = connection.output;
        match self {
            ReadingsCommand::Query {
                device,
                metric,
                start,
                end,
                interval,
                functions,
                fill,
                limit,
                all,
            } => {
                let base = format!("/api/v1/devices/{}/readings", segment(&device));
                let mut query: Vec<(&str, String)> =
                    [("metric", metric), ("start", start), ("end", end)]
                        .into_iter()
                        .filter_map(|(name, value)| value.map(|value| (name, value)))
                        .collect();
                if interval.is_some() {
                    for (name, value) in [("interval", interval), ("fn", functions), ("fill", fill)]
                    {
                        if let Some(value) = value {
                            query.push((name, value));
                        }
                    }
                    let request = client
                        .request(Method::GET, &format!("{base}/aggregate"))?
                        .query(&query);
                    let aggregate = client.data(request).await?;
                    print_aggregate(out, &aggregate)?;
                } else {
                    if functions.is_some() || fill.is_some() {
                        return Err(Failure("--fn and --fill need --interval".into()));
                    }
                    if let Some(limit) = limit {
                        query.push(("limit", limit.to_string()));
                    }
                    let items = client.list(&base, &query, all).await?;
                    output::list(out, &items, &["ts", "metric", "value"])?;
                }
            }
            ReadingsCommand::Latest { device, metric } => {
                let mut request = client.request(
                    Method::GET,
                    &format!("/api/v1/devices/{}/readings/latest", segment(&device)),
                )?;
                if let Some(metric) = metric {
                    request = request.query(&[("metric", metric)]);
                }
                let latest = client.data(request).await?;
                match latest {
                    Value::Array(items) => {
                        output::list(out, &items, &["metric", "ts", "value"])?;
                    }
                    other => output::object(out, &other)?,
                }
            }
            ReadingsCommand::Export {
                device,
                metric,
                start,
                end,
                format,
                file,
            } => export(&client, &device, metric, start, end, &format, file).await?,
            ReadingsCommand::Import {
                device,
                file,
                batch_rows,
            } => {
                let summary = import(&client, &device, &file, batch_rows.max(1)).await?;
                output::object(out, &summary)?;
            }
        }
        Ok(())
    }
}

/// Aggregates as a table: a row per bucket and metric, a column per function.
fn print_aggregate(out: Output, aggregate: &Value) -> std::io::Result<()> {
    if out == Output::Json {
        return output::json(aggregate);
    }
    let functions: Vec<String> = aggregate["fn"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|name| name.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    for series in aggregate["series"].as_array().into_iter().flatten() {
        for bucket in series["buckets"].as_array().into_iter().flatten() {
            let mut row = bucket.clone();
            row["metric"] = series["metric"].clone();
            rows.push(row);
        }
    }
    let mut columns = vec!["metric", "ts"];
    columns.extend(functions.iter().map(String::as_str));
    output::list(out, &rows, &columns)
}

async fn export(
    client: &Client,
    device: &str,
    metric: Option<String>,
    start: Option<String>,
    end: Option<String>,
    format: &str,
    file: Option<PathBuf>,
) -> Result<()> {
    let mut query = vec![("format", format.to_owned())];
    for (name, value) in [("metric", metric), ("start", start), ("end", end)] {
        if let Some(value) = value {
            query.push((name, value));
        }
    }
    // An export streams for as long as the range takes: no overall timeout but the
    // client's, which is per request; a big range wants a larger --timeout.
    let request = client
        .request(
            Method::GET,
            &format!("/api/v1/devices/{}/readings", segment(device)),
        )?
        .query(&query);
    let response = client.send(request).await?;
    let mut sink: Box<dyn std::io::Write> = match &file {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        sink.write_all(&chunk?)?;
    }
    sink.flush()?;
    Ok(())
}

/// Sends the CSV in batches of whole records, each with the header row, and answers what
/// was accepted.
/// Times one batch is sent when the server answers that it is busy (429, or 503 with
/// `Retry-After`), and the longest wait between two.
const IMPORT_ATTEMPTS: u32 = 10;
const IMPORT_MAX_WAIT: Duration = Duration::from_secs(30);

/// Sends one batch of an import. The batch's `Idempotency-Key` is a digest of its bytes, so
/// a batch sent again (after a 503 that came once part of it was published, say) is stored
/// once; a busy server's 429 or 503 is waited out for its `Retry-After` and the batch sent
/// again, at most [`IMPORT_ATTEMPTS`] times in all.
async fn send_batch(
    client: &Client,
    path: &str,
    body: Vec<u8>,
    bar: &ProgressBar,
) -> Result<reqwest::Response> {
    use sha2::Digest as _;
    let key = format!("import-{}", hex::encode(&sha2::Sha256::digest(&body)[..16]));
    let mut attempt = 1;
    loop {
        let request = client
            .request(Method::POST, path)?
            .header(header::CONTENT_TYPE, "text/csv")
            .header("idempotency-key", &key)
            .body(body.clone());
        let response = request.send().await.map_err(|error| {
            Failure(format!(
                "could not reach the server: {}",
                Failure::from(error)
            ))
        })?;
        let status = response.status();
        let busy = status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::SERVICE_UNAVAILABLE
                && response.headers().contains_key(header::RETRY_AFTER));
        if !busy || attempt >= IMPORT_ATTEMPTS {
            return if status.is_success() {
                Ok(response)
            } else {
                Err(super::client::failure_of(response).await)
            };
        }
        let wait = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
            .min(IMPORT_MAX_WAIT);
        let why = super::client::failure_of(response).await;
        bar.suspend(|| {
            output::note(&format!(
                "{why}: sending the batch again in {} s",
                wait.as_secs()
            ))
        });
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

async fn import(client: &Client, device: &str, file: &PathBuf, batch_rows: usize) -> Result<Value> {
    let size = std::fs::metadata(file)
        .map_err(|error| Failure(format!("{}: {error}", file.display())))?
        .len();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(file)
        .map_err(|error| Failure(format!("{}: {error}", file.display())))?;
    let header = reader.byte_headers()?.clone();
    if header.is_empty() {
        return Err(Failure(format!("{}: no header row", file.display())));
    }
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} importing [{bar:30}] {bytes}/{total_bytes} {msg} ({eta})",
        )
        .map_err(|error| Failure(error.to_string()))?
        .progress_chars("=> "),
    );
    let path = format!("/api/v1/devices/{}/readings", segment(device));
    let mut accepted = 0u64;
    let mut requests = 0u64;
    let mut rows = 0u64;
    // The file line each batch starts at, for an error to name the line of the file.
    let mut first_line = 2u64;
    let mut record = csv::ByteRecord::new();
    loop {
        let mut batch = csv::Writer::from_writer(Vec::new());
        batch.write_byte_record(&header)?;
        let mut in_batch = 0usize;
        while in_batch < batch_rows && batch.get_ref().len() < IMPORT_BATCH_BYTES {
            if !reader.read_byte_record(&mut record)? {
                break;
            }
            batch.write_byte_record(&record)?;
            in_batch += 1;
        }
        if in_batch == 0 {
            break;
        }
        let body = batch
            .into_inner()
            .map_err(|error| Failure(error.to_string()))?;
        let answer = match send_batch(client, &path, body, &bar).await {
            Ok(response) => super::client::json_of(response).await?,
            Err(Failure(message)) => {
                bar.abandon();
                return Err(Failure(format!(
                    "the batch from line {first_line} of {} was refused ({rows} rows before it are stored): {message}",
                    file.display()
                )));
            }
        };
        accepted += answer["data"]["accepted"].as_u64().unwrap_or(0);
        requests += 1;
        rows += in_batch as u64;
        first_line = reader.position().line();
        bar.set_position(reader.position().byte());
        bar.set_message(format!("{rows} rows"));
    }
    bar.finish_and_clear();
    output::note(&format!(
        "imported {accepted} readings ({rows} rows) into {device} in {requests} request(s)"
    ));
    Ok(json!({"device_id": device, "rows": rows, "accepted": accepted, "requests": requests}))
}
