//! Partition upkeep: daily partitions created ahead, and retention applied (whole partitions
//! dropped once every project's retention has passed them, rows of projects with a shorter
//! retention deleted, old rollups deleted). One instance at a time does it, under a
//! session advisory lock; the others skip that round.

use std::time::Duration;

use chrono::{Days, Utc};
use fieldline_common::{Context, time::MIN_TIME_US};

use crate::{
    compress,
    repo::{Repo, ensure_partition},
};

/// Days of partitions created ahead of today, so the writer rarely creates one itself.
const DAYS_AHEAD: u64 = 7;
const LOCK_KEY: &str = "fieldline-telemetry-maintenance";
/// A series' first reading, in its rows or its blocks.
const FIRST_TS: &str = "LEAST(
    (SELECT min(ts) FROM telemetry.readings r WHERE r.series_id = s.series_id),
    (SELECT min(first_ts) FROM telemetry.blocks b WHERE b.series_id = s.series_id))";

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub skipped: bool,
    pub partitions_dropped: Vec<String>,
    pub readings_deleted: u64,
    pub rollups_deleted: u64,
    pub compressed: compress::Compressed,
}

/// Runs a round at start, then one every `partition_maintenance_interval`.
pub fn start(context: &Context, repo: Repo) {
    let config = context.config.clone();
    let shutdown = context.shutdown.clone();
    context.tasks.spawn(async move {
        let mut ticker = tokio::time::interval(config.partition_maintenance_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let compress_before = compress::closed_before(config.compress_after);
            match run_once(
                &repo,
                config.readings_retention,
                config.rollups_retention,
                Some(compress_before),
            )
            .await
            {
                Ok(round) if round.compressed.readings > 0 => {
                    tracing::info!(
                        days = ?round.compressed.days,
                        readings = round.compressed.readings,
                        blocks = round.compressed.blocks,
                        "closed days compressed"
                    );
                }
                Ok(round)
                    if !round.partitions_dropped.is_empty()
                        || round.readings_deleted > 0
                        || round.rollups_deleted > 0 =>
                {
                    tracing::info!(
                        dropped = ?round.partitions_dropped,
                        readings_deleted = round.readings_deleted,
                        rollups_deleted = round.rollups_deleted,
                        "retention applied"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "partition maintenance failed")
                }
            }
        }
    });
}

fn seconds(retention: Option<Duration>) -> Option<f64> {
    retention.map(|d| d.as_secs_f64())
}

/// One round of upkeep; with `compress_before`, the days before it are compressed after
/// retention is applied.
pub async fn run_once(
    repo: &Repo,
    readings_retention: Option<Duration>,
    rollups_retention: Option<Duration>,
    compress_before: Option<chrono::NaiveDate>,
) -> anyhow::Result<Round> {
    let client = repo.pool().get().await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&LOCK_KEY])
        .await?
        .get(0);
    if !locked {
        return Ok(Round {
            skipped: true,
            ..Round::default()
        });
    }
    let mut result = round(repo, &client, readings_retention, rollups_retention).await;
    if let (Ok(round), Some(before)) = (&mut result, compress_before) {
        match compress::compress_before(repo.pool(), before).await {
            Ok(compressed) => round.compressed = compressed,
            Err(error) => result = Err(error.context("compressing closed days")),
        }
    }
    client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&LOCK_KEY])
        .await?;
    result
}

async fn round(
    repo: &Repo,
    client: &tokio_postgres::Client,
    readings_retention: Option<Duration>,
    rollups_retention: Option<Duration>,
) -> anyhow::Result<Round> {
    let mut round = Round::default();
    let today = Utc::now().date_naive();
    let first = today.checked_sub_days(Days::new(1)).unwrap_or(today);
    for offset in 0..=DAYS_AHEAD + 1 {
        if let Some(day) = first.checked_add_days(Days::new(offset)) {
            ensure_partition(client, day).await?;
        }
    }

    // Horizon: the oldest time any project with data still keeps raw readings for; partitions
    // wholly before it go (NULL when some project keeps everything). The cutoffs are the
    // newest times any project drops before: rows and rollups older than them are candidates.
    let row = client
        .query_one(
            "SELECT CASE WHEN bool_or(raw IS NULL) THEN NULL ELSE now() - max(raw) END,
                    now() - min(raw), now() - min(rollups)
             FROM (SELECT COALESCE(r.readings, make_interval(secs => $1)) AS raw,
                          COALESCE(r.rollups, make_interval(secs => $2)) AS rollups
                   FROM (SELECT DISTINCT project FROM telemetry.series) p
                   LEFT JOIN telemetry.retention r USING (project)) k",
            &[&seconds(readings_retention), &seconds(rollups_retention)],
        )
        .await?;
    let horizon: Option<chrono::DateTime<Utc>> = row.get(0);
    let readings_cutoff: Option<chrono::DateTime<Utc>> = row.get(1);
    let rollups_cutoff: Option<chrono::DateTime<Utc>> = row.get(2);
    if let Some(horizon) = horizon {
        let partitions = compress::partitions(client).await?;
        let horizon_day = horizon.date_naive();
        for (name, day) in partitions {
            // The partition holds [day, day + 1); it goes when all of it is past the horizon.
            if day >= horizon_day {
                continue;
            }
            let day_start = day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
            // The dictionary's counts and first times lose what the partition held: the
            // daily rollup knows how many rows that was. The partition goes first: dropping
            // it locks `readings` whole, which waits for the writers' transactions to end and
            // holds off new ones, so no writer holds a series row updated after it. (Series
            // rows first and `readings` after is the writer's order reversed: a deadlock.)
            let sql = format!(
                "BEGIN;
                 DROP TABLE telemetry.{name};
                 UPDATE telemetry.series s SET count = s.count - d.count
                   FROM telemetry.rollup_1d d
                  WHERE d.series_id = s.series_id AND d.bucket = '{start}';
                 DELETE FROM telemetry.blocks b USING telemetry.series s
                  WHERE b.series_id = s.series_id AND b.first_ts >= '{start}' AND b.first_ts < '{end}';
                 DELETE FROM telemetry.compressed_days WHERE day = '{day}';
                 UPDATE telemetry.series s
                    SET first_ts = {FIRST_TS}
                  WHERE s.first_ts < '{end}';
                 COMMIT;",
                start = day_start.map(|t| t.to_rfc3339()).unwrap_or_default(),
                end = day
                    .succ_opt()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc().to_rfc3339())
                    .unwrap_or_default(),
            );
            if let Err(error) = client.batch_execute(&sql).await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(error.into());
            }
            round.partitions_dropped.push(name);
        }
        let expired_before = horizon_day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
            .unwrap_or(MIN_TIME_US);
        repo.set_expired_before(expired_before);
        if !round.partitions_dropped.is_empty() {
            repo.forget_partitions();
        }
    }

    // Projects whose retention is shorter than the horizon: their rows go one by one (only
    // partitions older than the newest cutoff are looked at).
    if let Some(cutoff) = readings_cutoff {
        client.batch_execute("BEGIN").await?;
        let deleted = async {
            // Rows first, then the series rows they counted in, locked in id order before
            // they are updated: the writer's order, so neither waits for the other in a
            // cycle. (An update joined to the deleted rows would lock series rows in the
            // join's order.)
            let gone = client
                .query(
                    "WITH gone AS (
                        DELETE FROM telemetry.readings r
                         USING telemetry.series s LEFT JOIN telemetry.retention t USING (project)
                         WHERE r.series_id = s.series_id AND r.ts < $2
                           AND r.ts < now() - COALESCE(t.readings, make_interval(secs => $1))
                        RETURNING r.series_id, 1::int8 AS n
                     ), gone_blocks AS (
                        DELETE FROM telemetry.blocks b
                         USING telemetry.series s LEFT JOIN telemetry.retention t USING (project)
                         WHERE b.series_id = s.series_id AND b.first_ts < $2
                           AND b.last_ts < now() - COALESCE(t.readings, make_interval(secs => $1))
                        RETURNING b.series_id, b.count::int8 AS n
                     )
                     SELECT series_id, sum(n)::int8 FROM (TABLE gone UNION ALL TABLE gone_blocks) g
                     GROUP BY series_id ORDER BY series_id",
                    &[&seconds(readings_retention), &cutoff],
                )
                .await?;
            let ids: Vec<i32> = gone.iter().map(|row| row.get(0)).collect();
            let counts: Vec<i64> = gone.iter().map(|row| row.get(1)).collect();
            if !ids.is_empty() {
                client
                    .execute(
                        "SELECT series_id FROM telemetry.series WHERE series_id = ANY($1)
                         ORDER BY series_id FOR NO KEY UPDATE",
                        &[&ids],
                    )
                    .await?;
                client
                    .execute(
                        &format!(
                            "UPDATE telemetry.series s
                            SET count = s.count - c.n,
                                first_ts = {FIRST_TS}
                           FROM UNNEST($1::int4[], $2::int8[]) AS c(series_id, n)
                          WHERE s.series_id = c.series_id"
                        ),
                        &[&ids, &counts],
                    )
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(counts.iter().sum::<i64>() as u64)
        }
        .await;
        match deleted {
            Ok(deleted) => {
                client.batch_execute("COMMIT").await?;
                round.readings_deleted = deleted;
            }
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(error.into());
            }
        }
    }

    let Some(rollups_cutoff) = rollups_cutoff else {
        return Ok(round);
    };
    for (table, width) in [("rollup_1h", "1 hour"), ("rollup_1d", "1 day")] {
        let deleted = client
            .execute(
                &format!(
                    "DELETE FROM telemetry.{table} r
                      USING telemetry.series s LEFT JOIN telemetry.retention t USING (project)
                      WHERE r.series_id = s.series_id
                        AND r.bucket < $2
                        AND r.bucket + interval '{width}' <= now() - COALESCE(t.rollups, make_interval(secs => $1))"
                ),
                &[&seconds(rollups_retention), &rollups_cutoff],
            )
            .await?;
        round.rollups_deleted += deleted;
    }
    Ok(round)
}
