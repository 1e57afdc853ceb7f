//! The writer: a durable pull consumer on the telemetry stream, shared by every query-api
//! instance. Each batch of messages is stored in one transaction, and only then acked; a
//! failure naks them for redelivery, which the idempotent insert makes harmless. The loop,
//! the retries and the dead letters are [`fieldline_common::consume`]'s.

use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use fieldline_common::{
    Context,
    consume::{self, Delivery, Outcome},
    spread,
};
use fieldline_proto::{Stream, Subjects};

use crate::repo::Repo;

/// Consumer name: one per service, shared by its instances (that is how it scales out).
pub use fieldline_proto::consumers::QUERY_WRITER as CONSUMER;

/// Batches stored at once by one process. With two, one batch is decoded and prepared while
/// Postgres copies the other, and the copies themselves can use two cores. Rows of different
/// batches are disjoint (or the later one falls back to skipping stored rows), and series and
/// rollup rows are locked in key order, so the overlap is safe.
const STORES_IN_FLIGHT: usize = 2;

/// Payload bytes from which a batch's messages are decoded on several threads.
const PARALLEL_DECODE_FROM_BYTES: usize = 4 * 1024 * 1024;

pub async fn start(context: &Context, repo: Repo) -> anyhow::Result<()> {
    let spec = consume::Spec {
        stream: Stream::Telemetry,
        name: CONSUMER,
        description: "query-api: stores readings",
        filter_subject: context.subjects.telemetry_all(),
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        batch: context.config.writer_batch_size,
        batch_bytes: context.config.writer_batch_bytes,
        in_flight: STORES_IN_FLIGHT,
        linger: context.config.writer_linger,
    };
    let store = Store {
        repo,
        subjects: context.subjects.clone(),
    };
    consume::start(context, spec, store).await
}

struct Store {
    repo: Repo,
    subjects: Subjects,
}

impl consume::Handler for Store {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        // One single-device batch per device: a multi-device bus message gives several, all
        // at its position.
        let mut decoded = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        // An import's messages are decoded on every core (a batch of them is megabytes of
        // protobuf); a live batch of small messages, inline.
        let bytes: usize = batch.iter().map(|delivery| delivery.payload().len()).sum();
        let threads = if bytes < PARALLEL_DECODE_FROM_BYTES {
            1
        } else {
            spread::threads()
        };
        let telemetry = spread::map_in_order(
            batch.iter().collect(),
            threads,
            |delivery| delivery.payload().len(),
            |delivery| delivery.telemetry(&self.subjects),
        );
        for (position, telemetry) in telemetry.into_iter().enumerate() {
            match telemetry {
                Ok(devices) => {
                    positions.extend(std::iter::repeat_n(position, devices.len()));
                    decoded.extend(devices);
                }
                // Not ours to fix by retrying.
                Err(poison) => outcomes[position] = poison,
            }
        }
        if decoded.is_empty() {
            return outcomes;
        }
        let started = std::time::Instant::now();
        match self.repo.store(&decoded).await {
            Ok(readings) => {
                metrics::counter!("fieldline_writer_readings_total").increment(readings as u64);
                metrics::histogram!("fieldline_writer_batch_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(error) => {
                let outcome = Outcome::of_error(&error);
                metrics::counter!("fieldline_writer_failures_total").increment(1);
                let several = positions.first() != positions.last();
                if matches!(outcome, Outcome::Wait(_)) || !several {
                    for &position in &positions {
                        outcomes[position] = outcome.clone();
                    }
                    return outcomes;
                }
                // Something in the batch fails: find the message that does it, so it does
                // not hold back the rest. A bus message's devices are stored together.
                tracing::warn!(error = %error, messages = decoded.len(), "a batch failed; storing its messages one by one");
                let mut start = 0;
                while start < decoded.len() {
                    let position = positions[start];
                    let end = start
                        + positions[start..]
                            .iter()
                            .take_while(|&&other| other == position)
                            .count();
                    outcomes[position] = match self.repo.store(&decoded[start..end]).await {
                        Ok(count) => {
                            metrics::counter!("fieldline_writer_readings_total")
                                .increment(count as u64);
                            Outcome::Done
                        }
                        Err(error) => Outcome::of_error(&error),
                    };
                    start = end;
                }
            }
        }
        outcomes
    }
}
