//! Retention of webhook rows: events, deliveries and attempts are kept for
//! `webhook_retention` after a delivery finished, then deleted in batches of
//! `webhook_retention_batch`, each one short statement (docs/decisions/
//! 2026-12-04-retention-and-disabled-webhooks.md). Pending deliveries are never deleted.
//! Every dispatcher runs it: the batches lock with `SKIP LOCKED` and delete only what is
//! still there, so two instances at once only share the work.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fieldline_common::{ApiError, Context};

use crate::repo::Repo;

/// What one round removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Pending deliveries of webhooks disabled past the window, failed as expired.
    pub expired: u64,
    pub deliveries: u64,
    pub attempts: u64,
    pub events: u64,
}

/// Runs a round at start, then one every `webhook_retention_interval`, until shutdown.
pub async fn run(context: Context, repo: Repo) {
    let config = &context.config;
    let mut ticker = tokio::time::interval(config.webhook_retention_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = context.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let round = tokio::select! {
            _ = context.shutdown.cancelled() => break,
            round = run_once(&repo, config.webhook_retention, config.webhook_retention_batch) => round,
        };
        match round {
            Ok(round) if round != Round::default() => {
                for (table, count) in [
                    ("deliveries", round.deliveries),
                    ("attempts", round.attempts),
                    ("events", round.events),
                ] {
                    metrics::counter!("fieldline_webhook_retention_deleted_total", "table" => table)
                        .increment(count);
                }
                metrics::counter!("fieldline_webhook_retention_expired_total")
                    .increment(round.expired);
                tracing::info!(
                    expired = round.expired,
                    deliveries = round.deliveries,
                    attempts = round.attempts,
                    events = round.events,
                    "webhook retention applied"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "webhook retention failed"),
        }
    }
}

/// One round: expire, then delete finished deliveries with their attempts, then the events
/// no delivery refers to; each step in batches until a batch comes back short.
pub async fn run_once(repo: &Repo, window: Duration, batch: usize) -> Result<Round, ApiError> {
    let cutoff = chrono::Duration::from_std(window)
        .ok()
        .and_then(|window| Utc::now().checked_sub_signed(window))
        .unwrap_or(DateTime::UNIX_EPOCH);
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let full = |count: u64| i64::try_from(count).unwrap_or(i64::MAX) >= batch;
    let mut round = Round::default();
    loop {
        let expired = repo.expire_disabled(cutoff, batch).await?;
        round.expired += expired;
        if !full(expired) {
            break;
        }
    }
    loop {
        let (deliveries, attempts) = repo.delete_finished(cutoff, batch).await?;
        round.deliveries += deliveries;
        round.attempts += attempts;
        if !full(deliveries) {
            break;
        }
    }
    let mut after: (DateTime<Utc>, String) = (DateTime::UNIX_EPOCH, String::new());
    loop {
        let (examined, deleted, last) = repo
            .delete_unreferenced_events(cutoff, &after, batch)
            .await?;
        round.events += deleted;
        match last {
            Some(last) if full(examined) => after = last,
            _ => break,
        }
    }
    Ok(round)
}
