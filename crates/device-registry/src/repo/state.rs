//! Device state from the telemetry stream: presence (online/offline) and alert rules. One
//! transaction per batch of bus messages, with the events it causes written to the outbox in
//! the same transaction, so a status change or an alert is announced exactly once even when
//! two registry instances share the stream.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use fieldline_common::{
    ApiError,
    time::{format_rfc3339, from_us},
};
use tokio_postgres::Row;

use super::{Repo, enqueue};
use crate::{
    domain::alerts::{AlertState, Condition, Op, Phase, Transition},
    outbox::{EventKind, OutboxMessage, status_payload},
};

/// A device heard from (a reading or a heartbeat), at the time its edge received it.
#[derive(Debug, Clone)]
pub struct SeenDevice {
    pub project: String,
    pub device_id: String,
    pub at: DateTime<Utc>,
}

/// A device a batch left online: when it was last seen, and how long it may then stay silent
/// before the sweep takes it offline (three heartbeat intervals).
#[derive(Debug, Clone)]
pub struct Online {
    pub project: String,
    pub device_id: String,
    pub last_seen_us: i64,
    pub window_us: i64,
}

/// What one offline sweep did: devices it looked at (due by `offline_after`), and those it
/// took offline.
#[derive(Debug, Clone, Copy)]
pub struct Swept {
    pub examined: usize,
    pub offline: usize,
}

/// What a batch did: the events it queued and the devices it left online.
#[derive(Debug, Default)]
pub struct Applied {
    pub events: usize,
    pub online: Vec<Online>,
}

/// A numeric reading, the only kind alert rules compare, borrowed from its bus message.
#[derive(Debug, Clone)]
pub struct NumericReading<'a> {
    pub project: &'a str,
    pub device_id: &'a str,
    pub metric: &'a str,
    pub ts_us: i64,
    pub value: f64,
}

/// Project, device, metric.
type SeriesKey<'a> = (&'a str, &'a str, &'a str);

struct RuleMatch {
    rule_id: String,
    project: String,
    device_id: String,
    name: String,
    metric: String,
    severity: String,
    condition: Condition,
}

impl Repo {
    /// Applies a batch: devices seen go online (and announce it when they were not), readings
    /// move the alert rules that watch them.
    pub async fn apply_telemetry(
        &self,
        seen: &[SeenDevice],
        readings: &[NumericReading<'_>],
        default_interval_s: i32,
    ) -> Result<Applied, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut messages = Vec::new();
        let online = if seen.is_empty() {
            Vec::new()
        } else {
            self.mark_seen(&tx, seen, default_interval_s, &mut messages)
                .await?
        };
        if !readings.is_empty() {
            self.evaluate_rules(&tx, readings, &mut messages).await?;
        }
        enqueue(&tx, &messages).await?;
        tx.commit().await?;
        Ok(Applied {
            events: messages.len(),
            online,
        })
    }

    async fn mark_seen(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        seen: &[SeenDevice],
        default_interval_s: i32,
        messages: &mut Vec<OutboxMessage>,
    ) -> Result<Vec<Online>, tokio_postgres::Error> {
        let projects: Vec<&str> = seen.iter().map(|s| s.project.as_str()).collect();
        let devices: Vec<&str> = seen.iter().map(|s| s.device_id.as_str()).collect();
        let times: Vec<DateTime<Utc>> = seen.iter().map(|s| s.at).collect();
        // Lock first, in one order, so two instances never deadlock, and read each status
        // as it is once locked (what the update below changes it from).
        let before: HashMap<(String, String), String> = tx
            .query(
                &tx.prepare_cached(
                    "SELECT d.project, d.id, d.status FROM registry.devices d
                 JOIN unnest($1::text[], $2::text[]) AS s(project, device_id)
                   ON d.project = s.project AND d.id = s.device_id
                 ORDER BY d.project, d.id FOR UPDATE OF d",
                )
                .await?,
                &[&projects, &devices],
            )
            .await?
            .iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect();
        if before.is_empty() {
            return Ok(Vec::new());
        }
        // `offline_after` is indexed, so a write that moves it rewrites the row and every
        // index of the table; one that leaves it can stay on the row's page (a HOT update).
        // It is moved only once the new deadline passes it by a tenth of the window: it may
        // stand that much early, and the sweep checks `last_seen` before it takes a device
        // offline ([`Repo::sweep_offline`]).
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "UPDATE registry.devices d SET
                       last_seen = greatest(d.last_seen, s.at),
                       offline_after = CASE
                         WHEN d.status <> 'online' OR d.offline_after IS NULL
                           OR greatest(d.last_seen, s.at)
                              + make_interval(secs => 3 * coalesce(d.heartbeat_interval_s, $4))
                              > d.offline_after
                                + make_interval(secs => 0.3 * coalesce(d.heartbeat_interval_s, $4))
                         THEN greatest(d.last_seen, s.at)
                              + make_interval(secs => 3 * coalesce(d.heartbeat_interval_s, $4))
                         ELSE d.offline_after END,
                       status = CASE
                         WHEN greatest(d.last_seen, s.at)
                              + make_interval(secs => 3 * coalesce(d.heartbeat_interval_s, $4)) > now()
                         THEN 'online' ELSE d.status END
                     FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS s(project, device_id, at)
                     WHERE d.project = s.project AND d.id = s.device_id
                     RETURNING d.project, d.id, d.status, d.last_seen,
                               3 * coalesce(d.heartbeat_interval_s, $4)",
                )
                .await?,
                &[&projects, &devices, &times, &default_interval_s],
            )
            .await?;
        let mut came_online = Vec::new();
        let mut online = Vec::new();
        for row in &rows {
            let project: String = row.get(0);
            let device_id: String = row.get(1);
            let status: String = row.get(2);
            let last_seen: Option<DateTime<Utc>> = row.get(3);
            let window_s: i32 = row.get(4);
            if status == "online"
                && let Some(seen) = last_seen
            {
                online.push(Online {
                    project: project.clone(),
                    device_id: device_id.clone(),
                    last_seen_us: seen.timestamp_micros(),
                    window_us: i64::from(window_s) * 1_000_000,
                });
            }
            let previous = before
                .get(&(project.clone(), device_id.clone()))
                .map(String::as_str)
                .unwrap_or("unknown");
            if status == "online" && previous != "online" {
                let at = last_seen.map(|t| t.timestamp_micros()).unwrap_or_default();
                messages.push(self.messages.event(
                    EventKind::Status,
                    &project,
                    &device_id,
                    at,
                    &status_payload("online", previous, last_seen.as_ref()),
                ));
                came_online.push((project, device_id));
            }
        }
        if !came_online.is_empty() {
            let (projects, devices): (Vec<String>, Vec<String>) = came_online.into_iter().unzip();
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE registry.devices d SET status_changed_at = now()
                 FROM unnest($1::text[], $2::text[]) AS s(project, device_id)
                 WHERE d.project = s.project AND d.id = s.device_id",
                )
                .await?,
                &[&projects, &devices],
            )
            .await?;
        }
        Ok(online)
    }

    async fn evaluate_rules(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        readings: &[NumericReading<'_>],
        messages: &mut Vec<OutboxMessage>,
    ) -> Result<(), tokio_postgres::Error> {
        // Most readings have no rule watching them: the metrics that have one in the batch's
        // projects (a few index entries, from the partial index on enabled rules) decide which
        // series are matched against devices and rules below, so a batch of readings nobody
        // watches costs one small query rather than a join of every series.
        let mut projects: Vec<&str> = readings.iter().map(|reading| reading.project).collect();
        projects.sort_unstable();
        projects.dedup();
        let mut metrics_of: HashMap<String, HashSet<String>> = HashMap::new();
        for row in tx
            .query(
                &tx.prepare_cached(
                    "SELECT DISTINCT project, metric FROM registry.alert_rules
                     WHERE enabled AND project = ANY($1)",
                )
                .await?,
                &[&projects],
            )
            .await?
        {
            metrics_of.entry(row.get(0)).or_default().insert(row.get(1));
        }
        if metrics_of.is_empty() {
            return Ok(());
        }
        // Readings by series, in time order.
        let mut series: BTreeMap<SeriesKey<'_>, Vec<(i64, f64)>> = BTreeMap::new();
        for reading in readings.iter().filter(|reading| {
            metrics_of
                .get(reading.project)
                .is_some_and(|metrics| metrics.contains(reading.metric))
        }) {
            series
                .entry((reading.project, reading.device_id, reading.metric))
                .or_default()
                .push((reading.ts_us, reading.value));
        }
        if series.is_empty() {
            return Ok(());
        }
        for values in series.values_mut() {
            values.sort_by_key(|(ts, _)| *ts);
        }
        let projects: Vec<&str> = series.keys().map(|k| k.0).collect();
        let devices: Vec<&str> = series.keys().map(|k| k.1).collect();
        let metrics: Vec<&str> = series.keys().map(|k| k.2).collect();
        let rules: Vec<RuleMatch> = tx
            .query(
                &tx.prepare_cached(
                    "SELECT r.id, d.project, d.id, r.name, r.metric, r.op, r.threshold,
                        r.clear_threshold, r.for_s, r.severity
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS k(project, device_id, metric)
                 JOIN registry.devices d ON d.project = k.project AND d.id = k.device_id
                 JOIN registry.alert_rules r
                   ON r.project = k.project AND r.metric = k.metric AND r.enabled
                  AND (r.device_id = d.id OR r.device_group = d.device_group)
                 FOR SHARE OF r",
                )
                .await?,
                &[&projects, &devices, &metrics],
            )
            .await?
            .iter()
            .map(rule_match)
            .collect();
        if rules.is_empty() {
            return Ok(());
        }
        let rule_ids: Vec<&str> = rules.iter().map(|r| r.rule_id.as_str()).collect();
        let rule_projects: Vec<&str> = rules.iter().map(|r| r.project.as_str()).collect();
        let rule_devices: Vec<&str> = rules.iter().map(|r| r.device_id.as_str()).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO registry.alert_states (rule_id, project, device_id, state)
             SELECT rule_id, project, device_id, 'ok'
             FROM unnest($1::text[], $2::text[], $3::text[]) AS s(rule_id, project, device_id)
             ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&rule_ids, &rule_projects, &rule_devices],
        )
        .await?;
        let mut states: HashMap<(String, String), AlertState> = tx
            .query(
                &tx.prepare_cached("SELECT a.rule_id, a.device_id, a.state, a.pending_since, a.last_ts, a.last_value
                 FROM registry.alert_states a
                 JOIN unnest($1::text[], $2::text[]) AS s(rule_id, device_id)
                   ON a.rule_id = s.rule_id AND a.device_id = s.device_id
                 ORDER BY a.rule_id, a.device_id FOR UPDATE OF a").await?,
                &[&rule_ids, &rule_devices],
            )
            .await?
            .iter()
            .map(|row| {
                let pending_since: Option<DateTime<Utc>> = row.get(3);
                let last_ts: Option<DateTime<Utc>> = row.get(4);
                (
                    (row.get(0), row.get(1)),
                    AlertState {
                        phase: Phase::from_db(row.get(2)),
                        pending_since_us: pending_since.map(|t| t.timestamp_micros()),
                        last_ts_us: last_ts.map_or(i64::MIN, |t| t.timestamp_micros()),
                        last_value: row.get(5),
                    },
                )
            })
            .collect();

        let mut changed = Vec::new();
        for rule in &rules {
            let key = (rule.rule_id.clone(), rule.device_id.clone());
            let Some(state) = states.get_mut(&key) else {
                continue;
            };
            let before = state.clone();
            let values = &series[&(
                rule.project.as_str(),
                rule.device_id.as_str(),
                rule.metric.as_str(),
            )];
            for (ts_us, value) in values {
                let Some(transition) = rule.condition.step(state, *ts_us, *value) else {
                    continue;
                };
                messages.push(self.messages.event(
                    EventKind::Alert,
                    &rule.project,
                    &rule.device_id,
                    *ts_us,
                    &alert_payload(rule, transition, *ts_us, *value),
                ));
            }
            if *state != before {
                changed.push((key, state.clone(), state.phase != before.phase));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = changed.iter().map(|c| c.0.0.as_str()).collect();
        let devices: Vec<&str> = changed.iter().map(|c| c.0.1.as_str()).collect();
        let phases: Vec<&str> = changed.iter().map(|c| c.1.phase.as_str()).collect();
        let pending: Vec<Option<DateTime<Utc>>> = changed
            .iter()
            .map(|c| c.1.pending_since_us.map(from_us))
            .collect();
        let last_ts: Vec<DateTime<Utc>> = changed.iter().map(|c| from_us(c.1.last_ts_us)).collect();
        let last_values: Vec<Option<f64>> = changed.iter().map(|c| c.1.last_value).collect();
        let phase_changed: Vec<bool> = changed.iter().map(|c| c.2).collect();
        tx.execute(
            &tx.prepare_cached(
                "UPDATE registry.alert_states a SET
               state = s.state, pending_since = s.pending_since, last_ts = s.last_ts,
               last_value = s.last_value,
               changed_at = CASE WHEN s.phase_changed THEN now() ELSE a.changed_at END
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                         $6::float8[], $7::bool[])
               AS s(rule_id, device_id, state, pending_since, last_ts, last_value, phase_changed)
             WHERE a.rule_id = s.rule_id AND a.device_id = s.device_id",
            )
            .await?,
            &[
                &ids,
                &devices,
                &phases,
                &pending,
                &last_ts,
                &last_values,
                &phase_changed,
            ],
        )
        .await?;
        Ok(())
    }

    /// Devices past three missed heartbeats go offline, each announced once; SKIP LOCKED lets
    /// two instances sweep side by side. `offline_after` may stand up to a tenth of the
    /// window early (see `mark_seen`): a device due by it whose `last_seen` says it is not
    /// stays online, its `offline_after` moved to the true deadline.
    pub async fn sweep_offline(
        &self,
        limit: i64,
        default_interval_s: i32,
    ) -> Result<Swept, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "WITH due AS (
                       SELECT project, id FROM registry.devices
                       WHERE status = 'online' AND offline_after <= now()
                       ORDER BY offline_after LIMIT $1 FOR UPDATE SKIP LOCKED
                     ), judged AS (
                       SELECT d.project, d.id,
                              d.last_seen + make_interval(secs => 3 * coalesce(d.heartbeat_interval_s, $2))
                                AS deadline
                       FROM registry.devices d JOIN due USING (project, id)
                     )
                     UPDATE registry.devices d SET
                       status = CASE WHEN j.deadline <= now() THEN 'offline' ELSE d.status END,
                       status_changed_at = CASE WHEN j.deadline <= now() THEN now()
                                                ELSE d.status_changed_at END,
                       offline_after = CASE WHEN j.deadline <= now() THEN d.offline_after
                                            ELSE j.deadline END
                     FROM judged j WHERE d.project = j.project AND d.id = j.id
                     RETURNING d.project, d.id, d.last_seen, d.status = 'offline'",
                )
                .await?,
                &[&limit, &default_interval_s],
            )
            .await?;
        let examined = rows.len();
        let rows: Vec<&Row> = rows.iter().filter(|row| row.get::<_, bool>(3)).collect();
        let now = fieldline_common::time::now_us();
        let messages: Vec<OutboxMessage> = rows
            .iter()
            .map(|row| {
                let project: String = row.get(0);
                let device_id: String = row.get(1);
                let last_seen: Option<DateTime<Utc>> = row.get(2);
                self.messages.event(
                    EventKind::Status,
                    &project,
                    &device_id,
                    now,
                    &status_payload("offline", "online", last_seen.as_ref()),
                )
            })
            .collect();
        enqueue(&tx, &messages).await?;
        tx.commit().await?;
        Ok(Swept {
            examined,
            offline: messages.len(),
        })
    }
    /// Pending alerts whose `for_s` has passed while no reading came to fire them (a device
    /// that went quiet while hot) fire now, each announced once. The wait runs from when the
    /// breach was first seen by the reading's clock or by ours, whichever is later: a backlog
    /// of old readings is judged on reading time alone, and a reading stamped far in the past
    /// does not fire the moment it lands. SKIP LOCKED lets several instances sweep side by side
    /// and skips a state the consumer is changing; the update's own `state = 'pending'` check
    /// makes a second sweep that reads it afterwards change nothing. Returns how many fired.
    pub async fn fire_due_alerts(&self, limit: i64) -> Result<usize, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "WITH due AS (
                   SELECT a.rule_id, a.device_id FROM registry.alert_states a
                   JOIN registry.alert_rules r ON r.id = a.rule_id
                   JOIN registry.devices d ON d.project = a.project AND d.id = a.device_id
                   WHERE a.state = 'pending' AND r.enabled
                     AND (r.device_id = d.id OR r.device_group = d.device_group)
                     AND greatest(a.pending_since, a.changed_at)
                         + make_interval(secs => r.for_s) <= now()
                   ORDER BY a.changed_at LIMIT $1 FOR UPDATE OF a SKIP LOCKED
                 )
                 UPDATE registry.alert_states a SET state = 'firing', changed_at = now()
                 FROM due, registry.alert_rules r
                 WHERE a.rule_id = due.rule_id AND a.device_id = due.device_id
                   AND a.state = 'pending' AND r.id = a.rule_id
                 RETURNING a.rule_id, a.project, a.device_id, r.name, r.metric, r.op,
                           r.threshold, r.clear_threshold, r.for_s, r.severity, a.last_value",
                )
                .await?,
                &[&limit],
            )
            .await?;
        let now = fieldline_common::time::now_us();
        let messages: Vec<OutboxMessage> = rows
            .iter()
            .map(|row| {
                let rule = rule_match(row);
                let value: Option<f64> = row.get(10);
                self.messages.event(
                    EventKind::Alert,
                    &rule.project,
                    &rule.device_id,
                    now,
                    &alert_payload(&rule, Transition::Firing, now, value.unwrap_or(f64::NAN)),
                )
            })
            .collect();
        enqueue(&tx, &messages).await?;
        tx.commit().await?;
        Ok(messages.len())
    }
}

/// A rule matched to a device, from a row of `rule_id, project, device_id, name, metric, op,
/// threshold, clear_threshold, for_s, severity` (the order both the evaluation and the sweep
/// select in).
fn rule_match(row: &Row) -> RuleMatch {
    RuleMatch {
        rule_id: row.get(0),
        project: row.get(1),
        device_id: row.get(2),
        name: row.get(3),
        metric: row.get(4),
        severity: row.get(9),
        condition: Condition {
            op: Op::from_db(row.get(5)),
            threshold: row.get(6),
            clear_threshold: row.get(7),
            for_us: i64::from(row.get::<_, i32>(8)) * 1_000_000,
        },
    }
}

fn alert_payload(
    rule: &RuleMatch,
    transition: Transition,
    ts_us: i64,
    value: f64,
) -> serde_json::Value {
    serde_json::json!({
        "rule_id": rule.rule_id,
        "rule_name": rule.name,
        "state": match transition {
            Transition::Firing => "firing",
            Transition::Resolved => "resolved",
        },
        "severity": rule.severity,
        "metric": rule.metric,
        "op": rule.condition.op.as_str(),
        "value": value,
        "threshold": rule.condition.threshold,
        "clear_threshold": rule.condition.clear_threshold,
        "for_s": rule.condition.for_us / 1_000_000,
        "ts": format_rfc3339(&from_us(ts_us)),
    })
}
