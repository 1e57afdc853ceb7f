//! The writer: a durable pull consumer on the telemetry stream, shared by every query-api
//! instance. Each batch of messages is stored in one transaction, and only then acked; a
//! failure naks them for redelivery, which the idempotent insert makes harmless.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use fieldline_common::{Context, ErrorKind};
use fieldline_proto::{Stream, v1::TelemetryBatch};
use prost::Message;
use tokio::task::JoinSet;

use crate::repo::Repo;

/// Consumer name: one per service, shared by its instances (that is how it scales out).
pub use fieldline_proto::consumers::QUERY_WRITER as CONSUMER;

pub async fn start(context: &Context, repo: Repo) -> anyhow::Result<()> {
    let stream = context
        .jetstream
        .get_stream(context.subjects.stream_name(Stream::Telemetry))
        .await?;
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                description: Some("query-api: stores readings".to_owned()),
                filter_subject: context.subjects.telemetry_all(),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await?;
    let batch_size = context.config.writer_batch_size;
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                result = run(&consumer, &repo, batch_size) => {
                    if let Err(error) = result {
                        tracing::warn!(error = %error, "writer consumer failed; restarting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Batches stored at once by one process. With two, one batch is decoded and prepared while
/// Postgres copies the other, and the copies themselves can use two cores. Rows of different
/// batches are disjoint (or the later one falls back to skipping stored rows), and series and
/// rollup rows are locked in key order, so the overlap is safe.
const STORES_IN_FLIGHT: usize = 2;

async fn run(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    repo: &Repo,
    batch_size: usize,
) -> anyhow::Result<()> {
    let mut messages = fieldline_common::bus::pull_messages(consumer, batch_size).await?;
    let mut stores = JoinSet::new();
    let outcome = loop {
        if stores.len() >= STORES_IN_FLIGHT {
            log_failed(stores.join_next().await);
        }
        match fieldline_common::bus::next_batch(&mut messages, batch_size).await {
            Some(Ok(batch)) => {
                stores.spawn(store(repo.clone(), batch));
            }
            Some(Err(error)) => break Err(error.into()),
            None => break Ok(()),
        }
    };
    // After a consumer error, what is being stored finishes (and is acked) before the
    // consumer restarts. At shutdown this future is dropped instead, which aborts the stores:
    // nothing is acked before its commit, so those messages come back to the next writer.
    while let Some(joined) = stores.join_next().await {
        log_failed(Some(joined));
    }
    outcome
}

/// A store that panicked acked nothing; its messages come back after `ack_wait`. Say so.
fn log_failed(joined: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(error)) = joined {
        tracing::error!(error = %error, "a store task failed; its messages will be redelivered");
    }
}

async fn store(repo: Repo, messages: Vec<jetstream::Message>) {
    let mut decoded = Vec::with_capacity(messages.len());
    let mut keep = Vec::with_capacity(messages.len());
    for message in messages {
        match TelemetryBatch::decode(message.payload.as_ref()) {
            Ok(batch) => {
                decoded.push(batch);
                keep.push(message);
            }
            Err(error) => {
                // Not ours to fix by retrying: terminate it, count it, say so.
                tracing::error!(subject = %message.subject, error = %error, "undecodable telemetry message dropped");
                metrics::counter!("fieldline_writer_dropped_total", "reason" => "undecodable")
                    .increment(1);
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    if decoded.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    match repo.store(&decoded).await {
        Ok(readings) => {
            metrics::counter!("fieldline_writer_readings_total").increment(readings as u64);
            metrics::histogram!("fieldline_writer_batch_seconds")
                .record(started.elapsed().as_secs_f64());
            ack_all(&keep).await;
        }
        // A value Postgres refuses: find the message that carries it, so it does not hold
        // back the rest of the batch forever.
        Err(error) if error.kind == ErrorKind::BadRequest => {
            tracing::warn!(error = %error, "a batch was refused; storing its messages one by one");
            for (batch, message) in decoded.iter().zip(&keep) {
                match repo.store(std::slice::from_ref(batch)).await {
                    Ok(_) => ack_all(std::slice::from_ref(message)).await,
                    Err(error) if error.kind == ErrorKind::BadRequest => {
                        tracing::error!(subject = %message.subject, error = %error, "telemetry message Postgres cannot store dropped");
                        metrics::counter!("fieldline_writer_dropped_total", "reason" => "unstorable").increment(1);
                        let _ = message.ack_with(AckKind::Term).await;
                    }
                    Err(_) => nak_all(std::slice::from_ref(message)).await,
                }
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, messages = keep.len(), "storing readings failed; will redeliver");
            metrics::counter!("fieldline_writer_failures_total").increment(1);
            nak_all(&keep).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn ack_all(messages: &[jetstream::Message]) {
    for result in futures::future::join_all(messages.iter().map(|message| message.ack())).await {
        if let Err(error) = result {
            // Redelivered later and stored again as a no-op.
            tracing::warn!(error = %error, "ack after commit failed");
        }
    }
}

async fn nak_all(messages: &[jetstream::Message]) {
    let naks = messages
        .iter()
        .map(|message| message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))));
    futures::future::join_all(naks).await;
}
