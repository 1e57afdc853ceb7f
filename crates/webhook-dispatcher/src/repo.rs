//! The dispatcher's SQL, and nothing else does SQL. The `deliveries` table is the durable
//! retry queue (see docs/decisions/2026-11-22-webhook-delivery.md).

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fieldline_common::ApiError;
use tokio_postgres::Row;

use crate::{
    domain::{AttemptOut, DISABLED_EVENT, DeliveryOut, NewWebhook, WebhookOut, rfc3339},
    shape::Options,
};

#[derive(Clone)]
pub struct Repo {
    pool: Pool,
}

/// The columns a claimed delivery is read with (`claimed` maps them): `d` the delivery, `w`
/// its webhook, `e` its event.
macro_rules! claimed_columns {
    () => {
        "d.id, d.webhook_id, d.project, d.attempts, w.url, w.headers, w.secret,
         CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END,
         e.id, e.body, w.options, e.traceparent"
    };
}

/// The claim. A skip scan of `deliveries_pending_by_webhook` finds each webhook with pending
/// deliveries and its oldest one (one index probe per webhook); webhooks with something due
/// are served oldest first, each up to its free slots, until `$1` rows are taken. Its cost
/// grows with the number of webhooks that have pending deliveries, not with their backlog: one
/// time order for all webhooks had each claim walk every due row of a webhook at its cap
/// (docs/decisions/2026-11-22-claim-by-webhook.md).
const CLAIM_SQL: &str = concat!(
    "
WITH RECURSIVE hooks (id, oldest) AS (
    (SELECT p.webhook_id, p.next_attempt_at FROM webhooks.deliveries p
     WHERE p.status = 'pending' ORDER BY p.webhook_id, p.next_attempt_at LIMIT 1)
    UNION ALL
    SELECT n.webhook_id, n.next_attempt_at FROM hooks h
    CROSS JOIN LATERAL (
        SELECT p.webhook_id, p.next_attempt_at FROM webhooks.deliveries p
        WHERE p.status = 'pending' AND p.webhook_id > h.id
        ORDER BY p.webhook_id, p.next_attempt_at LIMIT 1) n
),
chosen AS (
    -- A batched webhook takes up to a batch per free slot, and only once a batch is full or
    -- its oldest event has waited `max_wait_ms`.
    SELECT h.id, w.options -> 'batch' IS NOT NULL AS batched,
           coalesce((w.options -> 'batch' ->> 'max_events')::bigint, 1) AS batch,
           coalesce(w.options ->> 'ordering', 'none') = 'device' AS ordered,
           coalesce((SELECT u.free FROM UNNEST($5::text[], $6::bigint[]) AS u(id, free)
                     WHERE u.id = h.id), $4::bigint) AS free
    FROM hooks h JOIN webhooks.webhooks w ON w.id = h.id AND w.enabled
    WHERE h.oldest <= now() AND NOT (h.id = ANY($2))
      AND (w.options -> 'batch' IS NULL
           OR h.oldest <= now() - make_interval(secs => coalesce((w.options -> 'batch' ->> 'max_wait_ms')::float8, 1000) / 1000)
           OR (SELECT count(*) FROM (
                   SELECT 1 FROM webhooks.deliveries p
                   WHERE p.webhook_id = h.id AND p.status = 'pending' AND p.next_attempt_at <= now()
                     AND (p.locked_until IS NULL OR p.locked_until < now())
                   LIMIT (w.options -> 'batch' ->> 'max_events')::bigint) full_batch)
              >= (w.options -> 'batch' ->> 'max_events')::bigint)
    ORDER BY h.oldest
),
due AS (
    SELECT c.id, ch.batch FROM chosen ch
    CROSS JOIN LATERAL (
        SELECT p.id FROM webhooks.deliveries p
        WHERE p.webhook_id = ch.id AND p.status = 'pending' AND p.next_attempt_at <= now()
          AND (p.locked_until IS NULL OR p.locked_until < now())
          -- Ordered by device: only the head of each device's line, and none while the head
          -- is in flight (it is pending, so the line waits behind it).
          AND (NOT ch.ordered OR p.device_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM webhooks.deliveries q
                WHERE q.webhook_id = p.webhook_id AND q.device_id = p.device_id
                  AND q.status = 'pending' AND q.seq < p.seq))
        -- Time order alone: the index gives it, so a webhook's backlog costs a claim nothing
        -- (a tie-break on seq made every claim sort the whole backlog). Ordered webhooks need
        -- none: of each device's line only the head is eligible.
        ORDER BY p.next_attempt_at
        LIMIT ch.free * ch.batch
        FOR UPDATE SKIP LOCKED) c
),
-- `$1` is requests, not rows: a batch of n rows counts as one request.
capped AS (
    SELECT id FROM (SELECT id, sum(1.0 / batch) OVER (ROWS UNBOUNDED PRECEDING) AS requests FROM due) r
    WHERE requests <= $1::bigint
)
UPDATE webhooks.deliveries d
SET locked_until = now() + make_interval(secs => $3), attempts = d.attempts + 1, updated_at = now()
FROM capped, webhooks.webhooks w, webhooks.events e
WHERE d.id = capped.id AND w.id = d.webhook_id AND e.id = d.event_id
RETURNING ",
    claimed_columns!()
);

/// The claim's plan is made for each run, with sequential and bitmap scans off. A queue's
/// statistics are always out of date: a plan cached while the table was small walked the
/// whole table once it had a backlog, and a bitmap or sequential scan of every due row is
/// what the planner picks right after a burst.
const CLAIM_PLANNER: &str = "SET LOCAL plan_cache_mode = force_custom_plan; \
    SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off";

/// A webhook as fan-out matches events against it.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: String,
    pub events: Vec<String>,
    pub device_ids: Vec<String>,
    pub group: Option<String>,
    pub options: Options,
    /// False when the dispatcher disabled it (410, failing too long): its events are still
    /// queued, pending and not tried, and go out once it is enabled again. Webhooks their
    /// owner turned off are not targets at all.
    pub enabled: bool,
}

#[derive(Clone)]
pub struct NewEvent {
    pub id: String,
    pub project: String,
    pub event_type: String,
    pub device_id: Option<String>,
    pub body: String,
    pub traceparent: Option<String>,
}

#[derive(Clone)]
pub struct NewDelivery {
    pub id: String,
    pub webhook_id: String,
    pub project: String,
    pub event_id: String,
    pub event_type: String,
    pub device_id: Option<String>,
    /// Its webhook takes it as soon as it is stored (not batched, not ordered): fan-out may
    /// lease it and send it at once.
    pub immediate: bool,
    /// False for a webhook the dispatcher disabled: the delivery is queued all the same and
    /// waits, never leased, for `enable`.
    pub webhook_enabled: bool,
    /// Stored with a lease and its first attempt counted: this process sends it now.
    pub leased: bool,
}

/// A delivery this worker holds the lease of, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: String,
    pub webhook_id: String,
    pub project: String,
    /// Including this one.
    pub attempts: i32,
    pub url: String,
    pub headers: serde_json::Value,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub event_id: String,
    pub body: String,
    pub options: Options,
    /// The trace the event belongs to (its bus message's `traceparent`).
    pub traceparent: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Succeeded,
    RetryAt(DateTime<Utc>),
    /// Retries exhausted, or an answer not worth retrying.
    Failed,
    /// 410: fail it and disable the webhook.
    Gone,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub snippet: Option<String>,
    /// The batch it was sent in, if any.
    pub batch_id: Option<String>,
}

/// What `webhook.disabled` tells, and to which webhooks.
#[derive(Debug, Clone)]
pub struct DisabledNotice {
    pub name: Option<String>,
    pub reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    /// The project's other enabled webhooks subscribed to `webhook.disabled`.
    pub targets: Vec<String>,
}

/// Filters of `GET /api/v1/webhooks`.
#[derive(Default)]
pub struct WebhookFilter {
    pub device_id: Option<String>,
    pub group: Option<String>,
    pub event: Option<String>,
    pub enabled: Option<bool>,
}

const WEBHOOK_COLUMNS: &str = "id, project, name, url, events, device_ids, device_group, headers, \
                               metadata, enabled, disabled_reason, created_at, updated_at, options";

fn webhook_out(row: &Row) -> WebhookOut {
    WebhookOut {
        id: row.get("id"),
        project: row.get("project"),
        name: row.get("name"),
        url: row.get("url"),
        events: row.get("events"),
        device_ids: row.get("device_ids"),
        group: row.get("device_group"),
        headers: row.get("headers"),
        metadata: row.get("metadata"),
        enabled: row.get("enabled"),
        disabled_reason: row.get("disabled_reason"),
        created_at: rfc3339(row.get("created_at")),
        updated_at: rfc3339(row.get("updated_at")),
        options: Options::from_json(&row.get::<_, serde_json::Value>("options")),
    }
}

const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, status, attempts, next_attempt_at, \
                                last_status_code, last_error, created_at, completed_at";

fn delivery_out(row: &Row) -> DeliveryOut {
    DeliveryOut {
        id: row.get("id"),
        webhook_id: row.get("webhook_id"),
        event_id: row.get("event_id"),
        event: row.get("event_type"),
        status: row.get("status"),
        attempts: row.get("attempts"),
        next_attempt_at: row
            .get::<_, Option<DateTime<Utc>>>("next_attempt_at")
            .map(rfc3339),
        last_status_code: row.get("last_status_code"),
        last_error: row.get("last_error"),
        created_at: rfc3339(row.get("created_at")),
        completed_at: row
            .get::<_, Option<DateTime<Utc>>>("completed_at")
            .map(rfc3339),
        device_id: None,
        waiting_for: None,
        attempt_log: Vec::new(),
    }
}

impl Repo {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    pub async fn create_webhook(
        &self,
        project: &str,
        id: &str,
        webhook: &NewWebhook,
        secret: &str,
    ) -> Result<WebhookOut, ApiError> {
        let client = self.pool.get().await?;
        let headers = serde_json::to_value(&webhook.headers).unwrap_or_default();
        let options = webhook.options.to_json();
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO webhooks.webhooks
                       (id, project, name, url, events, device_ids, device_group, headers, metadata, secret, enabled, options)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {WEBHOOK_COLUMNS}"
                ),
                &[
                    &id, &project, &webhook.name, &webhook.url, &webhook.events, &webhook.device_ids,
                    &webhook.group, &headers, &webhook.metadata, &secret, &webhook.enabled, &options,
                ],
            )
            .await?;
        Ok(webhook_out(&row))
    }

    pub async fn get_webhook(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<WebhookOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks.webhooks WHERE project = $1 AND id = $2"
                ),
                &[&project, &id],
            )
            .await?;
        Ok(row.as_ref().map(webhook_out))
    }

    pub async fn list_webhooks(
        &self,
        project: &str,
        filter: &WebhookFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<(WebhookOut, DateTime<Utc>)>, ApiError> {
        let client = self.pool.get().await?;
        let (after_time, after_id) = after.unzip();
        let rows = client
            .query(
                &format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks.webhooks
                     WHERE project = $1
                       AND ($2::text IS NULL OR $2 = ANY(device_ids))
                       AND ($3::text IS NULL OR device_group = $3)
                       AND ($4::text IS NULL OR $4 = ANY(events))
                       AND ($5::bool IS NULL OR enabled = $5)
                       AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7))
                     ORDER BY created_at DESC, id DESC LIMIT $8"
                ),
                &[
                    &project,
                    &filter.device_id,
                    &filter.group,
                    &filter.event,
                    &filter.enabled,
                    &after_time,
                    &after_id,
                    &limit,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (webhook_out(row), row.get("created_at")))
            .collect())
    }

    /// PUT and PATCH: replaces the changeable fields; a given secret replaces the secret.
    /// Turning a webhook on clears its disabled state.
    pub async fn update_webhook(
        &self,
        project: &str,
        id: &str,
        webhook: &NewWebhook,
    ) -> Result<Option<WebhookOut>, ApiError> {
        let client = self.pool.get().await?;
        let headers = serde_json::to_value(&webhook.headers).unwrap_or_default();
        let options = webhook.options.to_json();
        let row = client
            .query_opt(
                &format!(
                    "UPDATE webhooks.webhooks SET
                       name = $3, url = $4, events = $5, device_ids = $6, device_group = $7,
                       headers = $8, metadata = $9, secret = coalesce($10, secret), enabled = $11,
                       options = $12,
                       disabled_reason = CASE WHEN $11 THEN NULL ELSE disabled_reason END,
                       disabled_at = CASE WHEN $11 THEN NULL ELSE disabled_at END,
                       failing_since = CASE WHEN $11 AND NOT enabled THEN NULL ELSE failing_since END,
                       updated_at = now()
                     WHERE project = $1 AND id = $2 RETURNING {WEBHOOK_COLUMNS}"
                ),
                &[
                    &project, &id, &webhook.name, &webhook.url, &webhook.events, &webhook.device_ids,
                    &webhook.group, &headers, &webhook.metadata, &webhook.secret, &webhook.enabled,
                    &options,
                ],
            )
            .await?;
        Ok(row.as_ref().map(webhook_out))
    }

    /// Deletes webhooks of `project` (their deliveries go with them); returns the ids deleted.
    pub async fn delete_webhooks(
        &self,
        project: &str,
        ids: &[String],
    ) -> Result<Vec<String>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Webhook rows are locked in id order first, as the recorder locks them
        // (`finish_attempts`); a DELETE alone would lock them in the order of its scan.
        tx.execute(
            "SELECT 1 FROM webhooks.webhooks WHERE project = $1 AND id = ANY($2)
             ORDER BY id COLLATE \"C\" FOR UPDATE",
            &[&project, &ids],
        )
        .await?;
        let deleted: Vec<String> = tx
            .query(
                "DELETE FROM webhooks.webhooks WHERE project = $1 AND id = ANY($2) RETURNING id",
                &[&project, &ids],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        // No foreign keys on the queue (migration V5): its rows go here. Separate statements,
        // so that attempts written by a recorder this one waited for are seen and deleted.
        let deliveries: Vec<String> = tx
            .query(
                "DELETE FROM webhooks.deliveries WHERE webhook_id = ANY($1) RETURNING id",
                &[&deleted],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        tx.execute(
            "DELETE FROM webhooks.attempts WHERE delivery_id = ANY($1)",
            &[&deliveries],
        )
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// The secret and, during a rotation's grace, the previous one.
    pub async fn secrets(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<(String, Option<String>, Option<DateTime<Utc>>)>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT secret,
                        CASE WHEN previous_secret_expires_at > now() THEN previous_secret END,
                        CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END
                 FROM webhooks.webhooks WHERE project = $1 AND id = $2",
                &[&project, &id],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1), row.get(2))))
    }

    pub async fn rotate_secret(
        &self,
        project: &str,
        id: &str,
        secret: &str,
        grace: Duration,
    ) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let grace_seconds = grace.as_secs_f64();
        let updated = client
            .execute(
                "UPDATE webhooks.webhooks SET previous_secret = secret, secret = $3,
                   previous_secret_expires_at = now() + make_interval(secs => $4), updated_at = now()
                 WHERE project = $1 AND id = $2",
                &[&project, &id, &secret, &grace_seconds],
            )
            .await?;
        Ok(updated == 1)
    }

    pub async fn enable(&self, project: &str, id: &str) -> Result<Option<WebhookOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE webhooks.webhooks SET enabled = true, disabled_reason = NULL, disabled_at = NULL,
                       failing_since = NULL, updated_at = now()
                     WHERE project = $1 AND id = $2 RETURNING {WEBHOOK_COLUMNS}"
                ),
                &[&project, &id],
            )
            .await?;
        Ok(row.as_ref().map(webhook_out))
    }

    /// Every webhook of a project that fan-out may deliver to.
    pub async fn targets(&self, project: &str) -> Result<Vec<Target>, ApiError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, events, device_ids, device_group, enabled, options
                 FROM webhooks.webhooks WHERE project = $1 AND (enabled OR disabled_reason IS NOT NULL)",
                &[&project],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Target {
                id: row.get(0),
                events: row.get(1),
                device_ids: row.get(2),
                group: row.get(3),
                enabled: row.get(4),
                options: Options::from_json(&row.get::<_, serde_json::Value>(5)),
            })
            .collect())
    }

    /// Stores events and their deliveries in one transaction. Idempotent: an event seen again
    /// (a redelivered bus message) adds nothing. Returns the deliveries stored with a lease
    /// (`leased`, pending, webhook enabled), ready to send.
    pub async fn enqueue(
        &self,
        events: &[NewEvent],
        deliveries: &[NewDelivery],
        lease: Duration,
    ) -> Result<Vec<Claimed>, ApiError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let projects: Vec<&str> = events.iter().map(|e| e.project.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let devices: Vec<Option<&str>> = events.iter().map(|e| e.device_id.as_deref()).collect();
        let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
        let traces: Vec<Option<&str>> = events.iter().map(|e| e.traceparent.as_deref()).collect();
        tx.execute(
            "INSERT INTO webhooks.events (id, project, event_type, device_id, body, traceparent)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             ON CONFLICT (id) DO NOTHING",
            &[&ids, &projects, &types, &devices, &bodies, &traces],
        )
        .await?;
        let ids: Vec<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
        let webhooks: Vec<&str> = deliveries.iter().map(|d| d.webhook_id.as_str()).collect();
        let projects: Vec<&str> = deliveries.iter().map(|d| d.project.as_str()).collect();
        let event_ids: Vec<&str> = deliveries.iter().map(|d| d.event_id.as_str()).collect();
        let types: Vec<&str> = deliveries.iter().map(|d| d.event_type.as_str()).collect();
        let leased: Vec<bool> = deliveries.iter().map(|d| d.leased).collect();
        let device_ids: Vec<Option<&str>> =
            deliveries.iter().map(|d| d.device_id.as_deref()).collect();
        let lease_seconds = lease.as_secs_f64();
        let rows = tx
            .query(
                concat!(
                    "WITH stored AS (
                   INSERT INTO webhooks.deliveries
                     (id, webhook_id, project, event_id, event_type, status, next_attempt_at,
                      attempts, locked_until, device_id, seq)
                   -- A disabled webhook's deliveries are queued too: the claim leaves them be
                   -- until it is enabled again. `seq` is taken in the order given (the order
                   -- the events were stored in), which per-device ordering follows.
                   SELECT d.id, d.webhook_id, d.project, d.event_id, d.event_type, 'pending', now(),
                          CASE WHEN d.leased AND d.enabled THEN 1 ELSE 0 END,
                          CASE WHEN d.leased AND d.enabled THEN now() + make_interval(secs => $7) END,
                          d.device_id, nextval('webhooks.deliveries_seq')
                   FROM (
                     SELECT u.*, w.enabled
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $8::text[])
                            WITH ORDINALITY AS u(id, webhook_id, project, event_id, event_type, leased, device_id, position)
                     JOIN webhooks.webhooks w ON w.id = u.webhook_id
                     ORDER BY u.position
                     -- In place of a foreign key: a webhook being deleted waits for this.
                     FOR KEY SHARE OF w
                   ) d
                   ON CONFLICT (webhook_id, event_id) DO NOTHING
                   RETURNING id, webhook_id, project, attempts, event_id, locked_until
                 )
                 SELECT ",
                    claimed_columns!(),
                    "
                 FROM stored d
                 JOIN webhooks.webhooks w ON w.id = d.webhook_id
                 JOIN webhooks.events e ON e.id = d.event_id
                 WHERE d.locked_until IS NOT NULL"
                ),
                &[&ids, &webhooks, &projects, &event_ids, &types, &leased, &lease_seconds, &device_ids],
            )
            .await?;
        tx.commit().await?;
        Ok(rows.iter().map(claimed).collect())
    }

    /// A `webhook.test` event and its delivery, not yet due (the caller sends it at once).
    pub async fn create_test_delivery(
        &self,
        project: &str,
        webhook_id: &str,
        event_id: &str,
        delivery_id: &str,
        body: &str,
    ) -> Result<(), ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO webhooks.events (id, project, event_type, body) VALUES ($1, $2, 'webhook.test', $3)",
            &[&event_id, &project, &body],
        )
        .await?;
        let stored = tx
            .execute(
                "INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status)
                 SELECT $1, w.id, $3, $4, 'webhook.test', 'pending'
                 FROM webhooks.webhooks w WHERE w.id = $2 FOR KEY SHARE",
                &[&delivery_id, &webhook_id, &project, &event_id],
            )
            .await?;
        if stored == 0 {
            // Deleted since the route looked it up.
            return Err(ApiError::not_found(
                "webhook_not_found",
                format!("webhook {webhook_id} not found"),
            ));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` due deliveries of enabled webhooks, skipping rows another worker
    /// holds and webhooks in `exclude` (saturated here); each gets a lease of `lease`.
    /// `busy` gives the free slots of webhooks that already have requests in flight; others
    /// may take `per_webhook` each.
    pub async fn claim(
        &self,
        limit: i64,
        per_webhook: i64,
        exclude: &[String],
        busy: &[(String, i64)],
        lease: Duration,
    ) -> Result<Vec<Claimed>, ApiError> {
        let busy_ids: Vec<&str> = busy.iter().map(|(id, _)| id.as_str()).collect();
        let busy_free: Vec<i64> = busy.iter().map(|(_, free)| *free).collect();
        let mut client = self.pool.get().await?;
        let statement = client.prepare_cached(CLAIM_SQL).await?;
        let tx = client.transaction().await?;
        tx.batch_execute(CLAIM_PLANNER).await?;
        let lease_seconds = lease.as_secs_f64();
        let rows = tx
            .query(
                &statement,
                &[
                    &limit,
                    &exclude,
                    &lease_seconds,
                    &per_webhook,
                    &busy_ids,
                    &busy_free,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(rows.iter().map(claimed).collect())
    }

    /// Gives back deliveries claimed but not sent (over a webhook's concurrency cap): they
    /// are due again at once and the claim does not count as an attempt.
    pub async fn release(&self, delivery_ids: &[String]) -> Result<(), ApiError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE webhooks.deliveries SET locked_until = NULL, attempts = greatest(attempts - 1, 0)
                 WHERE id = ANY($1) AND status = 'pending'",
                &[&delivery_ids],
            )
            .await?;
        Ok(())
    }

    /// Claims one delivery now, whatever its state (`POST …/test`).
    pub async fn claim_one(
        &self,
        delivery_id: &str,
        lease: Duration,
    ) -> Result<Option<Claimed>, ApiError> {
        let client = self.pool.get().await?;
        let lease_seconds = lease.as_secs_f64();
        let row = client
            .query_opt(
                concat!(
                    "UPDATE webhooks.deliveries d
                 SET locked_until = now() + make_interval(secs => $2), attempts = d.attempts + 1,
                     status = 'pending', updated_at = now()
                 FROM webhooks.webhooks w, webhooks.events e
                 WHERE d.id = $1 AND w.id = d.webhook_id AND e.id = d.event_id
                 RETURNING ",
                    claimed_columns!()
                ),
                &[&delivery_id, &lease_seconds],
            )
            .await?;
        Ok(row.as_ref().map(claimed))
    }

    /// Records attempts and moves their deliveries on, all in one transaction (one commit for
    /// many deliveries is what lets a dispatcher keep up). A failed attempt starts or extends
    /// its webhook's time spent failing (`failing_since`), any success ends it; a webhook
    /// failing for `disable_after_failing` is disabled, as is one answering 410. Returns the
    /// (project, webhook) pairs disabled here.
    pub async fn finish_attempts(
        &self,
        outcomes: &[(Claimed, AttemptRecord, Next)],
        disable_after_failing: Duration,
    ) -> Result<Vec<(String, String)>, ApiError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut runs = failing_runs(outcomes);
        // Webhook rows are locked first, in id order (bytes, as `delete_webhooks` sorts them
        // with `COLLATE "C"`), and only then their deliveries: the order in which deleting
        // webhooks takes them. Two recorders, or a recorder and a deletion, cannot then wait
        // on each other.
        runs.sort_by(|a, b| a.webhook_id.cmp(b.webhook_id));
        let mut disabled = Vec::new();
        let window_seconds = disable_after_failing.as_secs_f64();
        let reason = format!(
            "disabled after failing for {} without a success",
            humantime_serde::re::humantime::format_duration(disable_after_failing)
        );
        for run in runs {
            let Some((first_failure, last_failure)) = run.failures else {
                tx.execute(
                    "UPDATE webhooks.webhooks SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
                    &[&run.webhook_id],
                )
                .await?;
                continue;
            };
            // `since`: when this run of failures began (a success in the batch starts a new
            // one); the webhook goes once its last failure is `window` past that.
            let since = "CASE WHEN $2 THEN $3::timestamptz ELSE coalesce(failing_since, $3::timestamptz) END";
            let reached = format!("({since}) <= $4::timestamptz - make_interval(secs => $5)");
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE webhooks.webhooks SET
                           failing_since = {since},
                           enabled = enabled AND NOT {reached},
                           disabled_reason = CASE WHEN enabled AND {reached} THEN $6 ELSE disabled_reason END,
                           disabled_at = CASE WHEN enabled AND {reached} THEN now() ELSE disabled_at END,
                           updated_at = CASE WHEN enabled AND {reached} THEN now() ELSE updated_at END
                         WHERE id = $1 RETURNING NOT enabled AND disabled_at = now()"
                    ),
                    &[
                        &run.webhook_id,
                        &run.succeeded,
                        &first_failure,
                        &last_failure,
                        &window_seconds,
                        &reason,
                    ],
                )
                .await?;
            if row.is_some_and(|row| row.get::<_, Option<bool>>(0).unwrap_or(false)) {
                disabled.push((run.project.to_owned(), run.webhook_id.to_owned()));
            }
            if run.gone {
                let updated = tx
                    .execute(
                        "UPDATE webhooks.webhooks SET enabled = false, disabled_at = now(),
                           disabled_reason = 'endpoint answered 410 Gone', updated_at = now()
                         WHERE id = $1 AND enabled",
                        &[&run.webhook_id],
                    )
                    .await?;
                if updated == 1 {
                    disabled.push((run.project.to_owned(), run.webhook_id.to_owned()));
                }
            }
        }
        let ids: Vec<&str> = outcomes
            .iter()
            .map(|(c, _, _)| c.delivery_id.as_str())
            .collect();
        let attempted_at: Vec<DateTime<Utc>> =
            outcomes.iter().map(|(_, a, _)| a.attempted_at).collect();
        let codes: Vec<Option<i32>> = outcomes.iter().map(|(_, a, _)| a.status_code).collect();
        let latencies: Vec<i32> = outcomes.iter().map(|(_, a, _)| a.latency_ms).collect();
        let errors: Vec<Option<&str>> = outcomes
            .iter()
            .map(|(_, a, _)| a.error.as_deref())
            .collect();
        let snippets: Vec<Option<&str>> = outcomes
            .iter()
            .map(|(_, a, _)| a.snippet.as_deref())
            .collect();
        let batch_ids: Vec<Option<&str>> = outcomes
            .iter()
            .map(|(_, a, _)| a.batch_id.as_deref())
            .collect();
        tx.execute(
            // A delivery deleted with its webhook while in flight is skipped, not an error
            // that would roll back every other outcome of the batch.
            "INSERT INTO webhooks.attempts (delivery_id, attempted_at, status_code, latency_ms, error, response_snippet, batch_id)
             SELECT u.* FROM UNNEST($1::text[], $2::timestamptz[], $3::int4[], $4::int4[], $5::text[], $6::text[], $7::text[])
                  AS u(delivery_id, attempted_at, status_code, latency_ms, error, snippet, batch_id)
             JOIN webhooks.deliveries d ON d.id = u.delivery_id
             FOR KEY SHARE OF d",
            &[&ids, &attempted_at, &codes, &latencies, &errors, &snippets, &batch_ids],
        )
        .await?;
        let statuses: Vec<&str> = outcomes
            .iter()
            .map(|(_, _, next)| match next {
                Next::Succeeded => "succeeded",
                Next::RetryAt(_) => "pending",
                Next::Failed | Next::Gone => "failed",
            })
            .collect();
        let next_at: Vec<Option<DateTime<Utc>>> = outcomes
            .iter()
            .map(|(_, _, next)| match next {
                Next::RetryAt(at) => Some(*at),
                _ => None,
            })
            .collect();
        tx.execute(
            "UPDATE webhooks.deliveries d SET status = u.status, next_attempt_at = u.next_at, locked_until = NULL,
               last_status_code = u.code, last_error = u.error, updated_at = now(),
               completed_at = CASE WHEN u.status = 'pending' THEN NULL ELSE now() END
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[]) AS u(id, status, next_at, code, error)
             WHERE d.id = u.id",
            &[&ids, &statuses, &next_at, &codes, &errors],
        )
        .await?;

        tx.commit().await?;
        Ok(disabled)
    }

    /// A page of a webhook's deliveries, newest first, each with its attempts.
    pub async fn deliveries(
        &self,
        project: &str,
        webhook_id: &str,
        status: Option<&str>,
        after: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<(DeliveryOut, DateTime<Utc>)>, ApiError> {
        let client = self.pool.get().await?;
        let (after_time, after_id) = after.unzip();
        let rows = client
            .query(
                &format!(
                    // Of an ordered webhook's pending delivery: the delivery of the same device
                    // it waits behind, if any (the head of the device's line).
                    "SELECT {DELIVERY_COLUMNS}, device_id,
                       CASE WHEN status = 'pending' AND device_id IS NOT NULL THEN
                         (SELECT q.id FROM webhooks.deliveries q
                          WHERE q.webhook_id = d.webhook_id AND q.device_id = d.device_id
                            AND q.status = 'pending' AND q.seq < d.seq
                            AND EXISTS (SELECT 1 FROM webhooks.webhooks w
                                        WHERE w.id = d.webhook_id AND w.options ->> 'ordering' = 'device')
                          ORDER BY q.seq LIMIT 1)
                       END AS waiting_for
                     FROM webhooks.deliveries d
                     WHERE project = $1 AND webhook_id = $2 AND ($3::text IS NULL OR status = $3)
                       AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
                     ORDER BY created_at DESC, id DESC LIMIT $6"
                ),
                &[
                    &project,
                    &webhook_id,
                    &status,
                    &after_time,
                    &after_id,
                    &limit,
                ],
            )
            .await?;
        let mut deliveries: Vec<(DeliveryOut, DateTime<Utc>)> = rows
            .iter()
            .map(|row| {
                let mut delivery = delivery_out(row);
                delivery.device_id = row.get("device_id");
                delivery.waiting_for = row.get("waiting_for");
                (delivery, row.get("created_at"))
            })
            .collect();
        let ids: Vec<&str> = deliveries.iter().map(|(d, _)| d.id.as_str()).collect();
        let attempts = client
            .query(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error, response_snippet, batch_id
                 FROM webhooks.attempts WHERE delivery_id = ANY($1) ORDER BY id",
                &[&ids],
            )
            .await?;
        let mut by_delivery: HashMap<String, Vec<AttemptOut>> = HashMap::new();
        for row in &attempts {
            by_delivery.entry(row.get(0)).or_default().push(AttemptOut {
                attempted_at: rfc3339(row.get(1)),
                status_code: row.get(2),
                latency_ms: row.get(3),
                error: row.get(4),
                response: row.get(5),
                batch_id: row.get(6),
            });
        }
        for (delivery, _) in &mut deliveries {
            delivery.attempt_log = by_delivery.remove(&delivery.id).unwrap_or_default();
        }
        Ok(deliveries)
    }

    /// Queues a delivery of `project` to be sent again now.
    pub async fn retry_delivery(
        &self,
        project: &str,
        delivery_id: &str,
    ) -> Result<Option<DeliveryOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE webhooks.deliveries SET status = 'pending', next_attempt_at = now(), locked_until = NULL,
                       completed_at = NULL, updated_at = now()
                     WHERE project = $1 AND id = $2 RETURNING {DELIVERY_COLUMNS}"
                ),
                &[&project, &delivery_id],
            )
            .await?;
        Ok(row.as_ref().map(delivery_out))
    }

    /// Requeues the failed deliveries of a webhook created in `[since, until)`, with a fresh
    /// retry schedule. Returns how many.
    pub async fn recover(
        &self,
        project: &str,
        webhook_id: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Result<u64, ApiError> {
        let client = self.pool.get().await?;
        let count = client
            .execute(
                "UPDATE webhooks.deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),
                   locked_until = NULL, completed_at = NULL, updated_at = now()
                 WHERE project = $1 AND webhook_id = $2 AND status = 'failed'
                   AND created_at >= $3 AND ($4::timestamptz IS NULL OR created_at < $4)",
                &[&project, &webhook_id, &since, &until],
            )
            .await?;
        Ok(count)
    }

    /// A webhook the dispatcher just disabled, and the project's other enabled webhooks
    /// that subscribe to `webhook.disabled`. None when it is enabled again (or gone).
    pub async fn disabled_notice(
        &self,
        project: &str,
        webhook_id: &str,
    ) -> Result<Option<DisabledNotice>, ApiError> {
        let client = self.pool.get().await?;
        let Some(row) = client
            .query_opt(
                "SELECT name, disabled_reason, disabled_at, failing_since FROM webhooks.webhooks
                 WHERE project = $1 AND id = $2 AND NOT enabled",
                &[&project, &webhook_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let targets = client
            .query(
                "SELECT id FROM webhooks.webhooks
                 WHERE project = $1 AND id <> $2 AND enabled AND $3 = ANY(events)",
                &[&project, &webhook_id, &DISABLED_EVENT],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(Some(DisabledNotice {
            name: row.get(0),
            reason: row.get(1),
            disabled_at: row.get(2),
            failing_since: row.get(3),
            targets,
        }))
    }

    /// Retention, step 1: pending deliveries of webhooks not enabled, not tried since
    /// `cutoff`, end as failed (expired); a disabled webhook's queue is bounded by the
    /// window. Rows another worker holds, or still leased, are left. Returns how many.
    pub async fn expire_disabled(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, ApiError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "WITH due AS (
                    SELECT p.id FROM webhooks.webhooks w
                    CROSS JOIN LATERAL (
                        SELECT p.id FROM webhooks.deliveries p
                        WHERE p.webhook_id = w.id AND p.status = 'pending' AND p.next_attempt_at < $1
                          AND (p.locked_until IS NULL OR p.locked_until < now())
                        ORDER BY p.next_attempt_at
                        LIMIT $2
                        FOR UPDATE SKIP LOCKED) p
                    WHERE NOT w.enabled
                    LIMIT $2
                 )
                 UPDATE webhooks.deliveries d SET status = 'failed', next_attempt_at = NULL,
                   locked_until = NULL, completed_at = now(), updated_at = now(),
                   last_error = 'expired: the webhook stayed disabled past the retention window'
                 FROM due WHERE d.id = due.id AND d.status = 'pending'",
                &[&cutoff, &batch],
            )
            .await?)
    }

    /// Retention, step 2: up to `batch` deliveries finished before `cutoff`, oldest first,
    /// with their attempts, in one short statement. Pending deliveries are never touched, and
    /// rows another transaction holds are skipped. Returns (deliveries, attempts) deleted.
    pub async fn delete_finished(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<(u64, u64), ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "WITH batch AS (
                    SELECT id FROM webhooks.deliveries
                    WHERE status <> 'pending' AND completed_at < $1
                    ORDER BY completed_at LIMIT $2
                    FOR UPDATE SKIP LOCKED
                 ), gone AS (
                    DELETE FROM webhooks.deliveries d USING batch
                    WHERE d.id = batch.id AND d.status <> 'pending'
                    RETURNING d.id
                 ), attempts AS (
                    DELETE FROM webhooks.attempts a USING gone WHERE a.delivery_id = gone.id
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM attempts)",
                &[&cutoff, &batch],
            )
            .await?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    /// Retention, step 3: of the next `batch` events created before `cutoff` after `after`
    /// (keyset on created_at, id), deletes those no delivery refers to any more. Returns how
    /// many were looked at, how many deleted, and where the next batch starts.
    pub async fn delete_unreferenced_events(
        &self,
        cutoff: DateTime<Utc>,
        after: &(DateTime<Utc>, String),
        batch: i64,
    ) -> Result<(u64, u64, Option<(DateTime<Utc>, String)>), ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "WITH candidates AS (
                    SELECT e.id, e.created_at FROM webhooks.events e
                    WHERE e.created_at < $1 AND (e.created_at, e.id) > ($2::timestamptz, $3::text)
                    ORDER BY e.created_at, e.id LIMIT $4
                 ), gone AS (
                    DELETE FROM webhooks.events e USING candidates c
                    WHERE e.id = c.id
                      AND NOT EXISTS (SELECT 1 FROM webhooks.deliveries d WHERE d.event_id = e.id)
                    RETURNING e.id
                 ), last AS (
                    SELECT created_at, id FROM candidates ORDER BY created_at DESC, id DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM candidates), (SELECT count(*) FROM gone),
                        (SELECT created_at FROM last), (SELECT id FROM last)",
                &[&cutoff, &after.0, &after.1, &batch],
            )
            .await?;
        let last_time: Option<DateTime<Utc>> = row.get(2);
        let last_id: Option<String> = row.get(3);
        Ok((
            row.get::<_, i64>(0) as u64,
            row.get::<_, i64>(1) as u64,
            last_time.zip(last_id),
        ))
    }

    /// Deliveries waiting to be sent (the queue depth gauge).
    pub async fn pending_count(&self) -> Result<i64, ApiError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE status = 'pending'",
                &[],
            )
            .await?
            .get(0))
    }

    /// Webhooks the dispatcher disabled for failing (a webhook paused by its owner has no
    /// disabled reason).
    pub async fn disabled_count(&self) -> Result<i64, ApiError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one(
                "SELECT count(*) FROM webhooks.webhooks WHERE NOT enabled AND disabled_reason IS NOT NULL",
                &[],
            )
            .await?
            .get(0))
    }
}

/// What a batch of outcomes says about one webhook's time spent failing.
struct FailingRun<'a> {
    webhook_id: &'a str,
    project: &'a str,
    /// Some attempt succeeded: a failing run before it is over.
    succeeded: bool,
    /// First and last failed attempt after the last success.
    failures: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Answered 410.
    gone: bool,
}

/// Per webhook, in batch order: a success ends the run of failures, each failure after the
/// last success starts or extends it.
fn failing_runs(outcomes: &[(Claimed, AttemptRecord, Next)]) -> Vec<FailingRun<'_>> {
    let mut runs: Vec<FailingRun<'_>> = Vec::new();
    for (claimed, record, next) in outcomes {
        let index = match runs
            .iter()
            .position(|run| run.webhook_id == claimed.webhook_id)
        {
            Some(index) => index,
            None => {
                runs.push(FailingRun {
                    webhook_id: &claimed.webhook_id,
                    project: &claimed.project,
                    succeeded: false,
                    failures: None,
                    gone: false,
                });
                runs.len() - 1
            }
        };
        let run = &mut runs[index];
        let at = record.attempted_at;
        match next {
            Next::Succeeded => {
                run.succeeded = true;
                run.failures = None;
            }
            Next::Failed | Next::RetryAt(_) | Next::Gone => {
                run.gone |= *next == Next::Gone;
                run.failures = Some(match run.failures {
                    Some((first, last)) => (first.min(at), last.max(at)),
                    None => (at, at),
                });
            }
        }
    }
    runs
}

/// A row read with `claimed_columns!`.
fn claimed(row: &Row) -> Claimed {
    Claimed {
        delivery_id: row.get(0),
        webhook_id: row.get(1),
        project: row.get(2),
        attempts: row.get(3),
        url: row.get(4),
        headers: row.get(5),
        secret: row.get(6),
        previous_secret: row.get(7),
        event_id: row.get(8),
        body: row.get(9),
        options: Options::from_json(&row.get::<_, serde_json::Value>(10)),
        traceparent: row.get(11),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fieldline_testkit::TestEnv;

    use super::*;

    /// Webhook `a` has 40 due deliveries, the oldest; `b` has 3, and `c` one due only in
    /// an hour.
    async fn queue() -> (TestEnv, Repo) {
        let env = TestEnv::new().await;
        let pool = fieldline_common::db::connect(&env.config()).await.unwrap();
        fieldline_common::db::migrate(&pool, "webhooks", crate::embedded::migrations::runner())
            .await
            .unwrap();
        pool.get()
            .await
            .unwrap()
            .batch_execute(
                "INSERT INTO webhooks.webhooks (id, project, url, events, secret)
                 SELECT id, 'p', 'http://receiver/' || id, '{device.data}', 's'
                 FROM unnest('{a,b,c}'::text[]) AS id;
                 INSERT INTO webhooks.events (id, project, event_type, body)
                 SELECT 'e' || g, 'p', 'device.data', '{}' FROM generate_series(1, 44) g;
                 INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status, next_attempt_at)
                 SELECT 'a' || g, 'a', 'p', 'e' || g, 'device.data', 'pending', now() - interval '1 min' + g * interval '1 ms'
                 FROM generate_series(1, 40) g;
                 INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status, next_attempt_at)
                 SELECT 'b' || g, 'b', 'p', 'e' || (40 + g), 'device.data', 'pending', now() - interval '1 s' + g * interval '1 ms'
                 FROM generate_series(1, 3) g;
                 INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status, next_attempt_at)
                 VALUES ('c1', 'c', 'p', 'e44', 'device.data', 'pending', now() + interval '1 hour');",
            )
            .await
            .unwrap();
        (env, Repo::new(pool))
    }

    fn ids(claimed: &[Claimed]) -> Vec<&str> {
        let mut ids: Vec<&str> = claimed.iter().map(|c| c.delivery_id.as_str()).collect();
        ids.sort_unstable();
        ids
    }

    const LEASE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_claim_serves_each_webhook_up_to_its_free_slots_oldest_first() {
        let (env, repo) = queue().await;
        // `a` has 3 requests in flight of its 8, so 5 of its rows, then all 3 of `b`.
        let claimed = repo
            .claim(64, 8, &[], &[("a".into(), 5)], LEASE)
            .await
            .unwrap();
        assert_eq!(
            ids(&claimed),
            ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3"]
        );
        assert!(claimed.iter().all(|c| c.attempts == 1));
        assert_eq!(claimed[0].url, "http://receiver/a");
        // Leased rows are not claimed again; `a` at its cap is skipped, and its backlog
        // does not stand in the way of `b`'s next row.
        let pg = env.pg().await;
        pg.batch_execute(
            "INSERT INTO webhooks.events (id, project, event_type, body) VALUES ('e45', 'p', 'device.data', '{}');
             INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status, next_attempt_at)
             VALUES ('b4', 'b', 'p', 'e45', 'device.data', 'pending', now())",
        )
        .await
        .unwrap();
        let claimed = repo.claim(64, 8, &["a".into()], &[], LEASE).await.unwrap();
        assert_eq!(ids(&claimed), ["b4"]);
        // The limit holds across webhooks, oldest first: the next rows of `a`.
        let claimed = repo.claim(2, 8, &[], &[], LEASE).await.unwrap();
        assert_eq!(ids(&claimed), ["a6", "a7"]);
        // A disabled webhook's rows stay where they are; nothing is due for `c` yet.
        pg.batch_execute("UPDATE webhooks.webhooks SET enabled = false WHERE id = 'a'")
            .await
            .unwrap();
        assert!(repo.claim(64, 8, &[], &[], LEASE).await.unwrap().is_empty());
        env.cleanup().await;
    }

    #[tokio::test]
    async fn enqueue_returns_the_deliveries_it_stored_leased_and_only_once() {
        let (env, repo) = queue().await;
        let events = [NewEvent {
            id: "e_new".into(),
            project: "p".into(),
            event_type: "device.data".into(),
            device_id: Some("d1".into()),
            body: "{\"n\":1}".into(),
            traceparent: None,
        }];
        let delivery = |id: &str, webhook: &str, leased: bool| NewDelivery {
            id: id.into(),
            webhook_id: webhook.into(),
            project: "p".into(),
            event_id: "e_new".into(),
            event_type: "device.data".into(),
            device_id: None,
            immediate: true,
            webhook_enabled: true,
            leased,
        };
        let deliveries = [delivery("n_a", "a", true), delivery("n_b", "b", false)];
        let leased = repo.enqueue(&events, &deliveries, LEASE).await.unwrap();
        assert_eq!(ids(&leased), ["n_a"]);
        assert_eq!(leased[0].attempts, 1);
        assert_eq!(leased[0].body, "{\"n\":1}");
        assert_eq!(leased[0].url, "http://receiver/a");
        // The leased row is not claimed again; the unleased one is, as its first attempt.
        let claimed = repo.claim(64, 8, &["a".into()], &[], LEASE).await.unwrap();
        assert_eq!(ids(&claimed), ["b1", "b2", "b3", "n_b"]);
        assert!(claimed.iter().all(|c| c.attempts == 1));
        // The same message again (a redelivery) stores and leases nothing.
        let again = [delivery("n_a2", "a", true)];
        assert!(
            repo.enqueue(&events, &again, LEASE)
                .await
                .unwrap()
                .is_empty()
        );
        env.cleanup().await;
    }

    #[tokio::test]
    async fn deleting_a_webhook_deletes_its_deliveries_and_attempts() {
        let (env, repo) = queue().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "INSERT INTO webhooks.attempts (delivery_id, attempted_at, status_code, latency_ms)
             VALUES ('a1', now(), 500, 3), ('a2', now(), 500, 3), ('b1', now(), 500, 3)",
        )
        .await
        .unwrap();
        let deleted = repo.delete_webhooks("p", &["a".into()]).await.unwrap();
        assert_eq!(deleted, ["a"]);
        let count = |sql: &'static str| {
            let pg = &pg;
            async move { pg.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            count("SELECT count(*) FROM webhooks.deliveries WHERE webhook_id = 'a'").await,
            0
        );
        assert_eq!(count("SELECT count(*) FROM webhooks.deliveries").await, 4);
        assert_eq!(
            count("SELECT count(*) FROM webhooks.attempts WHERE delivery_id = 'b1'").await,
            1
        );
        assert_eq!(count("SELECT count(*) FROM webhooks.attempts").await, 1);
        env.cleanup().await;
    }

    /// Deletes webhooks `delete` while a recorder records `outcomes`, lined up by a third
    /// session: it holds webhook `held` until the deletion, then the recorder, wait on locks.
    async fn delete_while_recording(
        env: &TestEnv,
        repo: &Repo,
        held: &str,
        delete: &[&str],
        outcomes: Vec<(Claimed, AttemptRecord, Next)>,
    ) -> (
        Result<Vec<String>, ApiError>,
        Result<Vec<(String, String)>, ApiError>,
    ) {
        let mut holder = env.pg().await;
        let watcher = env.pg().await;
        let lock_waits = |n: i64| {
            let watcher = &watcher;
            async move {
                loop {
                    let row = watcher
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity
                             WHERE datname = current_database() AND wait_event_type = 'Lock'",
                            &[],
                        )
                        .await
                        .unwrap();
                    if row.get::<_, i64>(0) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let hold = holder.transaction().await.unwrap();
        hold.execute(
            "SELECT 1 FROM webhooks.webhooks WHERE id = $1 FOR NO KEY UPDATE",
            &[&held],
        )
        .await
        .unwrap();
        let deletion = tokio::spawn({
            let repo = repo.clone();
            let ids: Vec<String> = delete.iter().map(|id| (*id).to_owned()).collect();
            async move { repo.delete_webhooks("p", &ids).await }
        });
        lock_waits(1).await;
        let recorder = tokio::spawn({
            let repo = repo.clone();
            async move {
                repo.finish_attempts(&outcomes, Duration::from_secs(3600))
                    .await
            }
        });
        lock_waits(2).await;
        hold.commit().await.unwrap();
        (deletion.await.unwrap(), recorder.await.unwrap())
    }

    fn failed_attempt() -> AttemptRecord {
        AttemptRecord {
            attempted_at: Utc::now(),
            status_code: Some(500),
            latency_ms: 3,
            error: None,
            snippet: None,
            batch_id: None,
        }
    }

    /// Two webhooks: the deletion's scan meets `y` (stored first) before `x`, while the
    /// recorder counts failures of `x`, then `y`.
    #[tokio::test]
    async fn deleting_two_webhooks_and_failing_both_both_finish() {
        let (env, repo) = queue().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "INSERT INTO webhooks.webhooks (id, project, url, events, secret)
             VALUES ('y', 'p', 'http://receiver/y', '{device.data}', 's'),
                    ('x', 'p', 'http://receiver/x', '{device.data}', 's');
             INSERT INTO webhooks.events (id, project, event_type, body)
             VALUES ('ex', 'p', 'device.data', '{}'), ('ey', 'p', 'device.data', '{}');
             INSERT INTO webhooks.deliveries (id, webhook_id, project, event_id, event_type, status, next_attempt_at)
             VALUES ('x1', 'x', 'p', 'ex', 'device.data', 'pending', now() - interval '1 h'),
                    ('y1', 'y', 'p', 'ey', 'device.data', 'pending', now() - interval '1 h')",
        )
        .await
        .unwrap();
        let claimed = repo
            .claim(64, 8, &["a".into(), "b".into()], &[], LEASE)
            .await
            .unwrap();
        assert_eq!(ids(&claimed), ["x1", "y1"]);
        let outcomes: Vec<_> = claimed
            .iter()
            .map(|c| (c.clone(), failed_attempt(), Next::Failed))
            .collect();
        let (deletion, recorder) =
            delete_while_recording(&env, &repo, "y", &["x", "y"], outcomes).await;
        let mut deleted = deletion.unwrap();
        deleted.sort();
        assert_eq!(deleted, ["x", "y"]);
        assert!(recorder.unwrap().is_empty());
        let left = pg
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE webhook_id IN ('x', 'y')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(left.get::<_, i64>(0), 0);
        env.cleanup().await;
    }

    /// The order that used to deadlock: a deletion holds the webhook and wants the delivery
    /// a recorder holds, while the recorder wants the webhook to count a failure. A third
    /// session holding the webhook lines the two up.
    #[tokio::test]
    async fn a_deletion_and_a_failed_attempt_of_the_same_webhook_both_finish() {
        let (env, repo) = queue().await;
        let claimed = repo.claim(1, 8, &[], &[], LEASE).await.unwrap();
        assert_eq!(ids(&claimed), ["a1"]);
        let outcome = (claimed[0].clone(), failed_attempt(), Next::Failed);
        let (deletion, recorder) =
            delete_while_recording(&env, &repo, "a", &["a"], vec![outcome]).await;
        assert_eq!(deletion.unwrap(), ["a"]);
        assert!(recorder.unwrap().is_empty());
        let watcher = env.pg().await;
        let left = watcher
            .query_one(
                "SELECT (SELECT count(*) FROM webhooks.deliveries WHERE webhook_id = 'a')
                      + (SELECT count(*) FROM webhooks.attempts WHERE delivery_id = 'a1')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(left.get::<_, i64>(0), 0);
        env.cleanup().await;
    }

    #[test]
    fn a_success_ends_a_failing_run_and_later_failures_start_the_next() {
        let at = |seconds: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(seconds);
        let outcome = |webhook: &str, seconds: i64, next: Next| {
            (
                Claimed {
                    delivery_id: format!("{webhook}{seconds}"),
                    webhook_id: webhook.into(),
                    project: "p".into(),
                    attempts: 1,
                    url: String::new(),
                    headers: serde_json::Value::Null,
                    secret: String::new(),
                    previous_secret: None,
                    event_id: String::new(),
                    body: String::new(),
                    options: Options::default(),
                    traceparent: None,
                },
                AttemptRecord {
                    attempted_at: at(seconds),
                    status_code: None,
                    latency_ms: 0,
                    error: None,
                    snippet: None,
                    batch_id: None,
                },
                next,
            )
        };
        let outcomes = [
            outcome("a", 1, Next::Failed),
            outcome("b", 2, Next::RetryAt(at(9))),
            outcome("a", 3, Next::Succeeded),
            outcome("a", 4, Next::RetryAt(at(9))),
            outcome("b", 5, Next::Gone),
            outcome("a", 6, Next::Failed),
            outcome("c", 7, Next::Succeeded),
        ];
        let runs = failing_runs(&outcomes);
        let summary: Vec<_> = runs
            .iter()
            .map(|run| (run.webhook_id, run.succeeded, run.failures, run.gone))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", true, Some((at(4), at(6))), false),
                ("b", false, Some((at(2), at(5))), true),
                ("c", true, None, false),
            ]
        );
    }

    #[tokio::test]
    async fn a_lease_that_ran_out_is_claimed_again() {
        let (env, repo) = queue().await;
        let first = repo
            .claim(1, 8, &[], &[], Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(ids(&first), ["a1"]);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let again = repo.claim(1, 8, &[], &[], LEASE).await.unwrap();
        assert_eq!(ids(&again), ["a1"]);
        assert_eq!(again[0].attempts, 2);
        env.cleanup().await;
    }
}
