//! Read replicas: history reads go to a PostgreSQL streaming replica that is close enough
//! behind the primary, and to the primary when none is.
//!
//! A probe measures each replica's lag every `database_read_probe_interval` by WAL position,
//! not by replay time: it samples the primary's flushed WAL position (`pg_current_wal_flush_lsn`)
//! with the time it was taken, and asks each replica how far it has replayed
//! (`pg_last_wal_replay_lsn`). A replica that has replayed what the primary had flushed is 0
//! behind, however long ago the last transaction was; one that has not is as far behind as
//! the moment the primary was where the replica is now (interpolated between samples).
//! `now() - pg_last_xact_replay_timestamp()` on the replica alone would grow while the primary
//! is idle and skip a replica that is fully caught up (see
//! docs/decisions/2026-12-06-read-replicas.md).
//!
//! A replica further behind than `database_read_max_lag`, one that does not answer, and one
//! that is not in recovery (promoted: no longer following this primary) is skipped until a
//! probe finds it fit. A read that fails on a replica because the connection is lost or the
//! replay cancelled it is done again on the primary at once.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_postgres::{Pool, Runtime};
use fieldline_common::{ApiError, Context, ErrorKind};

use crate::reads::Reads;

/// Longest a probe waits for the primary or a replica to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One configured replica, as every HTTP worker and the probe see it.
pub struct Replica {
    /// `host:port`: its `replica` label.
    pub name: String,
    usable: AtomicBool,
}

impl Replica {
    pub fn new(name: String) -> Self {
        Self {
            name,
            // Not until the first probe has found it fit.
            usable: AtomicBool::new(false),
        }
    }

    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    fn set_usable(&self, usable: bool) -> bool {
        let was = self.usable.swap(usable, Ordering::Relaxed);
        metrics::gauge!("fieldline_db_replica_usable", "replica" => self.name.clone())
            .set(f64::from(u8::from(usable)));
        was
    }

    /// A read failed on it: skipped until the next probe finds it fit.
    pub fn failed(&self, error: &ApiError) {
        metrics::counter!("fieldline_db_replica_fallbacks_total", "replica" => self.name.clone())
            .increment(1);
        if self.set_usable(false) {
            tracing::warn!(replica = %self.name, error = %error, "a read failed on a replica; reading from the primary");
        }
    }
}

/// One HTTP worker's read connections: the primary's and each replica's.
pub struct Targets {
    pub primary: Arc<Reads>,
    pub replicas: Vec<(Arc<Reads>, Arc<Replica>)>,
    next: AtomicUsize,
}

impl Targets {
    pub fn new(primary: Arc<Reads>, replicas: Vec<(Arc<Reads>, Arc<Replica>)>) -> Self {
        Self {
            primary,
            replicas,
            next: AtomicUsize::new(0),
        }
    }

    /// A usable replica, in turn; `None` when there is none (reads go to the primary).
    pub fn replica(&self) -> Option<(&Reads, &Replica)> {
        if self.replicas.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.replicas.len())
            .map(|offset| &self.replicas[(start + offset) % self.replicas.len()])
            .find(|(_, replica)| replica.usable())
            .map(|(reads, replica)| (&**reads, &**replica))
    }
}

/// Whether a read that failed on a replica is done again on the primary: the replica is
/// gone or going (503 `service_unavailable`, which also covers a statement cancelled by a
/// conflict with recovery), not the request's own fault nor a statement timeout.
pub fn falls_back(error: &ApiError) -> bool {
    error.kind == ErrorKind::Unavailable && error.reason == "service_unavailable"
}

/// The primary's flushed WAL position over the last while: (when, position).
#[derive(Debug)]
pub struct WalSamples {
    samples: VecDeque<(Instant, i64)>,
    keep: Duration,
}

impl WalSamples {
    pub fn new(keep: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            keep,
        }
    }

    pub fn push(&mut self, at: Instant, position: i64) {
        self.samples.push_back((at, position));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(when, _)| at.saturating_duration_since(*when) > self.keep)
        {
            self.samples.pop_front();
        }
    }

    /// How far behind a replica that has replayed up to `replayed` is at `now`; `None`
    /// before the first sample.
    pub fn lag(&self, replayed: i64, now: Instant) -> Option<Duration> {
        let (_, newest) = *self.samples.back()?;
        if replayed >= newest {
            return Some(Duration::ZERO);
        }
        let mut caught_up_at = None;
        for index in (1..self.samples.len()).rev() {
            let (before_at, before) = self.samples[index - 1];
            let (after_at, after) = self.samples[index];
            if before <= replayed && replayed < after {
                // Where between the two samples the primary was at `replayed`.
                let share = (replayed - before) as f64 / (after - before) as f64;
                caught_up_at = Some(before_at + (after_at - before_at).mul_f64(share));
                break;
            }
        }
        // Behind every sample: at least as far behind as the oldest.
        let caught_up_at = caught_up_at.unwrap_or(self.samples[0].0);
        Some(now.saturating_duration_since(caught_up_at))
    }
}

/// The probe's connection to one replica: one connection, every wait bounded by the probe's
/// timeout.
pub fn probe_pool(settings: &fieldline_common::db::DatabaseSettings) -> anyhow::Result<Pool> {
    let manager = settings.manager(|pg_config| {
        pg_config.connect_timeout(PROBE_TIMEOUT);
        pg_config.options(format!(
            "-c statement_timeout={}",
            PROBE_TIMEOUT.as_millis()
        ));
    })?;
    Ok(Pool::builder(manager)
        .max_size(1)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(PROBE_TIMEOUT))
        .create_timeout(Some(PROBE_TIMEOUT))
        .recycle_timeout(Some(PROBE_TIMEOUT))
        .build()?)
}

/// Probes the replicas every `database_read_probe_interval` until shutdown.
pub fn start_probe(context: &Context, primary: Pool, replicas: Vec<(Arc<Replica>, Pool)>) {
    if replicas.is_empty() {
        return;
    }
    let config = context.config.clone();
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        let max_lag = config.database_read_max_lag;
        let mut samples = WalSamples::new((max_lag * 4).max(Duration::from_secs(60)));
        let mut ticker = tokio::time::interval(config.database_read_probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut primary_failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            // The primary first: a replica at or past this position is caught up. When the
            // primary does not answer, the replicas are measured against what it last had
            // (they keep serving history through its outage).
            let taken = Instant::now();
            match tokio::time::timeout(PROBE_TIMEOUT, flushed_position(&primary)).await {
                Ok(Ok(position)) => {
                    samples.push(taken, position);
                    primary_failing = false;
                }
                Ok(Err(error)) if !primary_failing => {
                    primary_failing = true;
                    tracing::warn!(error = format!("{error:#}"), "replica probe: the primary's WAL position is unknown");
                }
                Err(_) if !primary_failing => {
                    primary_failing = true;
                    tracing::warn!("replica probe: the primary did not answer");
                }
                _ => {}
            }
            let probes = replicas.iter().map(|(replica, pool)| async move {
                let asked = Instant::now();
                let answer = tokio::time::timeout(PROBE_TIMEOUT, replayed_position(pool)).await;
                (replica, asked, answer)
            });
            for (replica, asked, answer) in futures::future::join_all(probes).await {
                let fit = match answer {
                    Ok(Ok(Some(replayed))) => match samples.lag(replayed, asked) {
                        Some(lag) => {
                            metrics::gauge!("fieldline_db_replica_lag_seconds", "replica" => replica.name.clone())
                                .set(lag.as_secs_f64());
                            Fitness::Lag(lag)
                        }
                        None => Fitness::Unknown,
                    },
                    Ok(Ok(None)) => Fitness::NotInRecovery,
                    Ok(Err(error)) => Fitness::Failed(format!("{error:#}")),
                    Err(_) => Fitness::Failed("no answer".into()),
                };
                let usable = matches!(fit, Fitness::Lag(lag) if lag <= max_lag);
                let was = replica.set_usable(usable);
                if was != usable {
                    if usable {
                        tracing::info!(replica = %replica.name, "reading history from the replica");
                    } else {
                        tracing::warn!(replica = %replica.name, reason = ?fit, max_lag = ?max_lag, "skipping the replica; reading from the primary");
                    }
                }
            }
        }
    });
}

#[derive(Debug)]
enum Fitness {
    Lag(#[allow(dead_code)] Duration),
    Unknown,
    NotInRecovery,
    Failed(#[allow(dead_code)] String),
}

async fn flushed_position(pool: &Pool) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// How far the replica has replayed; `None` when it is not in recovery.
async fn replayed_position(pool: &Pool) -> anyhow::Result<Option<i64>> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await?;
    let in_recovery: bool = row.get(0);
    Ok(if in_recovery { row.get(1) } else { None })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_even_with_an_idle_primary() {
        let start = Instant::now();
        let mut samples = WalSamples::new(Duration::from_secs(60));
        assert_eq!(samples.lag(0, start), None);
        // Idle: the position does not move for 30 s.
        for second in 0..30 {
            samples.push(start + Duration::from_secs(second), 1000);
        }
        assert_eq!(
            samples.lag(1000, start + Duration::from_secs(30)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn lag_grows_from_where_the_primary_was_at_the_replayed_position() {
        let start = Instant::now();
        let mut samples = WalSamples::new(Duration::from_secs(60));
        samples.push(start, 1000);
        samples.push(start + Duration::from_secs(1), 1000);
        samples.push(start + Duration::from_secs(2), 2000);
        samples.push(start + Duration::from_secs(3), 4000);
        // Replayed up to 1000: the primary was there until 1 s (the last sample before it
        // moved), so at 10 s the replica is 9 s behind.
        assert_eq!(
            samples.lag(1000, start + Duration::from_secs(10)),
            Some(Duration::from_secs(9))
        );
        // Half-way from 2000 to 4000: the primary was there at 2.5 s.
        assert_eq!(
            samples.lag(3000, start + Duration::from_secs(4)),
            Some(Duration::from_millis(1500))
        );
        // Behind every sample: at least as old as the oldest.
        assert_eq!(
            samples.lag(10, start + Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn old_samples_are_dropped() {
        let start = Instant::now();
        let mut samples = WalSamples::new(Duration::from_secs(10));
        for second in 0..100 {
            samples.push(start + Duration::from_secs(second), second as i64);
        }
        assert!(samples.samples.len() <= 12, "{}", samples.samples.len());
    }
}
