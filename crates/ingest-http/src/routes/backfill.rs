//! `POST /api/v1/devices/{id}/readings`: backfill or import with a write API key, for any
//! device of the key's project. JSON (the /ingest message shapes, `ts` required) or
//! `text/csv`, times from now less `readings_retention` (or from `readings_earliest`) to
//! `ingest_max_future` ahead. Nothing is published unless the whole body parses; the readings
//! then go out in time order, in batches (at most `ingest_max_readings` each, and small enough
//! for the bus) with source `backfill`, and the 202 comes once JetStream has every batch.

use actix_web::{HttpRequest, HttpResponse, guard, http::header, web};
use fieldline_common::{
    ApiError, ErrorKind,
    auth::{ApiKey, ScopeLevel},
    envelope,
    extract::{is_json_content_type, read_body, unsupported_media_type},
    ingest::{self, EncodedBatch, TimeWindow},
    spread,
    time::now_us,
};
use fieldline_proto::v1::Reading;
use futures::{StreamExt as _, TryStreamExt as _};
use prost::Message as _;

use crate::{State, domain::csv_readings, routes::ingest::idempotency_key};

/// The `Retry-After` of a backfill refused for want of a place.
const BACKFILL_RETRY_AFTER_S: u64 = 1;

/// Batches of one backfill published and not yet acknowledged, at most: up to this many bus
/// messages (of up to `max_payload` each) in flight beside the parsed readings.
const BACKFILL_PUBLISHES_IN_FLIGHT: usize = 8;

/// Room left in a bus message for the batch's other fields, headers and subject.
const BATCH_OVERHEAD_BYTES: usize = 4096;

pub fn configure(cfg: &mut web::ServiceConfig) {
    // query-api serves GET on the same path: the resource-level guard lets any other method
    // fall through to its resource when both run in one process (whichever is registered
    // first).
    cfg.service(
        web::resource("/api/v1/devices/{id}/readings")
            .guard(guard::Post())
            .route(web::post().to(backfill)),
    );
}

fn is_csv(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/csv"))
}

/// Cuts readings into batches of at most `max_readings` whose encoding stays within
/// `max_bytes`: the end of each, in order.
fn batch_ends(readings: &[Reading], max_readings: usize, max_bytes: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, reading) in readings.iter().enumerate() {
        // The reading, its field tag and its length prefix, with room to spare. Numbers go
        // in columns (`EncodedBatch::of_slice`), where a reading costs less: its time
        // difference and number, and at most once its metric and a column's framing.
        let size = reading.encoded_len() + 6;
        if index > start && (index - start >= max_readings || bytes + size > max_bytes) {
            ends.push(index);
            start = index;
            bytes = 0;
        }
        bytes += size;
    }
    if start < readings.len() {
        ends.push(readings.len());
    }
    ends
}

/// The readings of a whole body (`csv` or JSON, every message with its own `ts`), parsed in
/// one pass and put in time order, and where its bus batches end. CPU-bound: run it off the
/// async threads.
fn parse_into_batches(
    body: &[u8],
    csv: bool,
    window: TimeWindow,
    max_readings: usize,
    max_bytes: usize,
) -> Result<(Vec<Reading>, Vec<usize>), ApiError> {
    let mut readings = if csv {
        csv_readings::parse(body, window)?
    } else {
        ingest::parse_backfill_json(body, window)?.readings
    };
    // In time order, each batch spans as few days (partitions) as its readings allow. Stable,
    // so a retried body makes the same batches under the same ids. Most imports come in
    // order already: checked first, as sorting asks for scratch memory the size of the list.
    if !readings.is_sorted_by_key(|reading| reading.ts_us) {
        readings.sort_by_key(|reading| reading.ts_us);
    }
    let ends = batch_ends(&readings, max_readings, max_bytes);
    Ok((readings, ends))
}

async fn backfill(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Write)?;
    let context = &state.context;
    let device_id = context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let csv = is_csv(&req);
    if !csv && !is_json_content_type(&req) {
        return Err(unsupported_media_type("application/json or text/csv"));
    }
    let idempotency = idempotency_key(&req)?;
    let config = &context.config;
    let body = read_body(
        &req,
        &mut payload.into_inner(),
        config.backfill_max_body_bytes,
    )
    .await?;
    // What a backfill costs in memory is its parse: every reading of the body at once. Only
    // `backfill_concurrency` go on at a time in this process; the next waits a little for a
    // place, then is told to come back. Taken once the body is in, so a slow upload holds no
    // place.
    let Ok(Ok(_place)) =
        tokio::time::timeout(config.backfill_wait, state.backfills.acquire()).await
    else {
        metrics::counter!("fieldline_ingest_backfills_refused_total").increment(1);
        return Err(too_many_backfills(config.backfill_concurrency));
    };
    let received_at_us = now_us();
    let window = TimeWindow::backfill(config, received_at_us);
    let max_payload = match context.nats.server_info().max_payload {
        0 => 1024 * 1024,
        max => max,
    };
    let max_bytes = max_payload.saturating_sub(BATCH_OVERHEAD_BYTES).max(1024);
    let max_readings = config.ingest_max_readings;
    let project = principal.project.clone();
    let device = device_id.as_str().to_owned();
    // Parsing 16 MiB and encoding its batches takes a core for a second or more: on the
    // blocking pool, not on the HTTP worker, whose other requests would wait for it; and
    // spread over the cores, since the import waits on it before anything is published.
    let (accepted, batches) = tokio::task::spawn_blocking(move || {
        let (readings, ends) = parse_into_batches(&body, csv, window, max_readings, max_bytes)?;
        let batches: Vec<(usize, usize, usize)> = ends
            .iter()
            .enumerate()
            .map(|(index, &end)| (index, if index == 0 { 0 } else { ends[index - 1] }, end))
            .collect();
        let encoded = spread::map_in_order(
            batches,
            spread::threads(),
            |(_, start, end)| end - start,
            |(index, start, end)| {
                // A retry with the same key republishes the same batches under the same ids,
                // which JetStream drops as duplicates: a backfill cut short by a 503 is safe
                // to resend.
                let key = idempotency
                    .as_ref()
                    .map(|key| format!("backfill:{key}:{index}"));
                EncodedBatch::of_slice(
                    &project,
                    &device,
                    &readings[start..end],
                    key.as_deref(),
                    received_at_us,
                    "backfill",
                )
            },
        );
        Ok::<_, ApiError>((readings.len(), encoded))
    })
    .await
    .map_err(ApiError::internal)??;
    // Several batches on their way at once: each publish waits for JetStream to store and
    // acknowledge it, and one at a time the import waited on a round trip per batch while
    // the writer had nothing to do. Sent in order (a batch is handed to the connection when
    // first polled, and `buffered` polls in order); acknowledged in any order, all of them
    // before the 202.
    let publishes = batches.into_iter().map(|batch| {
        state
            .publisher
            .encoded(&principal.project, device_id.as_str(), batch)
    });
    futures::stream::iter(publishes)
        .buffered(BACKFILL_PUBLISHES_IN_FLIGHT)
        .try_for_each(|_duplicate| async { Ok(()) })
        .await?;
    metrics::counter!("fieldline_ingest_readings_total", "source" => "backfill")
        .increment(accepted as u64);
    tracing::info!(device_id = %device_id, project = %principal.project, readings = accepted, by = %principal.id, "backfill accepted");
    Ok(envelope::accepted(&super::Backfilled { accepted }))
}

fn too_many_backfills(max: usize) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "too_many_backfills",
        format!("this server is storing {max} backfills already; retry shortly"),
    )
    .with_retry_after(BACKFILL_RETRY_AFTER_S)
}

#[cfg(test)]
mod tests {
    use fieldline_proto::v1::reading;

    use super::*;

    #[test]
    fn batches_respect_count_and_size() {
        let reading = |text: &str| Reading {
            metric: "m".into(),
            ts_us: 1,
            value: Some(reading::Value::Text(text.into())),
        };
        let small: Vec<_> = (0..25).map(|_| reading("x")).collect();
        assert_eq!(batch_ends(&small, 10, 1 << 20), [10, 20, 25]);
        let big: Vec<_> = (0..10).map(|_| reading(&"x".repeat(1000))).collect();
        assert_eq!(batch_ends(&big, 100, 3500), [3, 6, 9, 10]);
        assert!(batch_ends(&[], 10, 1 << 20).is_empty());
    }

    #[test]
    fn a_json_body_becomes_batches_in_time_order_or_names_a_message_without_ts() {
        let body = br#"[{"ts": 3000, "a": 3}, {"ts": 1000, "a": 1, "b": 1}, {"ts": 2000, "a": 2}]"#;
        let (readings, ends) =
            parse_into_batches(body, false, TimeWindow::ANY, 2, 1 << 20).unwrap();
        assert_eq!(readings.len(), 4);
        let times: Vec<i64> = readings.iter().map(|reading| reading.ts_us).collect();
        assert_eq!(times, [1_000_000, 1_000_000, 2_000_000, 3_000_000]);
        assert_eq!(ends, [2, 4]);
        let error = parse_into_batches(
            br#"[{"ts": 1, "a": 1}, {"a": 2}]"#,
            false,
            TimeWindow::ANY,
            2,
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(error.reason, "invalid_field");
        assert!(error.message.starts_with("[1].ts:"), "{error}");
    }
}
