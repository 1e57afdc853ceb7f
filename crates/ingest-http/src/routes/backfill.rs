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
    ingest::{self, Parsed, TimeWindow},
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

/// Splits readings into batches of at most `max_readings` whose encoding stays within
/// `max_bytes`.
fn batches(readings: Vec<Reading>, max_readings: usize, max_bytes: usize) -> Vec<Vec<Reading>> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for reading in readings {
        // The reading, its field tag and its length prefix.
        let size = reading.encoded_len() + 6;
        if !current.is_empty() && (current.len() >= max_readings || bytes + size > max_bytes) {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(reading);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The readings of a whole body (`csv` or JSON, every message with its own `ts`), parsed in
/// one pass, put in time order and cut into bus batches; and how many there are. CPU-bound:
/// run it off the async threads.
fn parse_into_batches(
    body: &[u8],
    csv: bool,
    window: TimeWindow,
    max_readings: usize,
    max_bytes: usize,
) -> Result<(usize, Vec<Vec<Reading>>), ApiError> {
    let mut readings = if csv {
        csv_readings::parse(body, window)?
    } else {
        ingest::parse_backfill_json(body, window)?.readings
    };
    // In time order, each batch spans as few days (partitions) as its readings allow. Stable,
    // so a retried body makes the same batches under the same ids.
    readings.sort_by_key(|reading| reading.ts_us);
    Ok((readings.len(), batches(readings, max_readings, max_bytes)))
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
    // Parsing 16 MiB takes a core for a second or more: on the blocking pool, not on the
    // HTTP worker, whose other requests would wait for it.
    let (accepted, batches) = tokio::task::spawn_blocking(move || {
        parse_into_batches(&body, csv, window, max_readings, max_bytes)
    })
    .await
    .map_err(ApiError::internal)??;
    // Several batches on their way at once: each publish waits for JetStream to store and
    // acknowledge it, and one at a time the import waited on a round trip per batch while
    // the writer had nothing to do. Sent in order (a batch is handed to the connection when
    // first polled, and `buffered` polls in order); acknowledged in any order, all of them
    // before the 202.
    let project = principal.project.as_str();
    let publisher = &state.publisher;
    let publishes = batches.into_iter().enumerate().map(|(index, batch)| {
        // A retry with the same key republishes the same batches under the same ids, which
        // JetStream drops as duplicates: a backfill cut short by a 503 is safe to resend.
        let parsed = Parsed {
            readings: batch,
            message_id: idempotency
                .as_ref()
                .map(|key| format!("backfill:{key}:{index}")),
        };
        publisher.readings(
            project,
            device_id.as_str(),
            parsed,
            received_at_us,
            "backfill",
        )
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
        let sizes: Vec<_> = batches(small, 10, 1 << 20).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
        let big: Vec<_> = (0..10).map(|_| reading(&"x".repeat(1000))).collect();
        let sizes: Vec<_> = batches(big, 100, 3500).iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
    }

    #[test]
    fn a_json_body_becomes_batches_in_time_order_or_names_a_message_without_ts() {
        let body = br#"[{"ts": 3000, "a": 3}, {"ts": 1000, "a": 1, "b": 1}, {"ts": 2000, "a": 2}]"#;
        let (count, batches) =
            parse_into_batches(body, false, TimeWindow::ANY, 2, 1 << 20).unwrap();
        assert_eq!(count, 4);
        let times: Vec<Vec<i64>> = batches
            .iter()
            .map(|batch| batch.iter().map(|reading| reading.ts_us).collect())
            .collect();
        assert_eq!(
            times,
            [vec![1_000_000, 1_000_000], vec![2_000_000, 3_000_000]]
        );
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
