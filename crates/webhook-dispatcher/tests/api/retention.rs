//! Webhook rows past `webhook_retention` go, in batches, while deliveries go on; nothing
//! pending is removed.

use std::{collections::BTreeSet, time::Duration};

use fieldline_common::Config;
use fieldline_testkit::{TestApp, eventually, receiver::Receiver};
use serde_json::json;

use crate::{ingest, register, spawn_with, wait_received};

/// Rows two hours old, against a window of one: 30 succeeded deliveries with two attempts
/// each, 10 failed ones, an event no delivery refers to (`old_e44`); and what must stay: a
/// delivery waiting for its retry, a disabled webhook's queue tried within the window. `$1`
/// is the live webhook.
const OLD_ROWS: &str = "
INSERT INTO webhooks.webhooks (id, project, url, events, secret, enabled, disabled_reason, disabled_at)
VALUES ('wh_parked', 'default', 'http://127.0.0.1:9/parked', '{device.alert}', 's', false, 'test', now());
INSERT INTO webhooks.events (id, project, event_type, body, created_at)
SELECT 'old_e' || g, 'default', 'device.data', '{}', now() - interval '2 hours'
FROM generate_series(1, 44) g;
INSERT INTO webhooks.deliveries
  (id, webhook_id, project, event_id, event_type, status, attempts, created_at, updated_at, completed_at)
SELECT 'old_d' || g, $1, 'default', 'old_e' || g, 'device.data',
       CASE WHEN g <= 30 THEN 'succeeded' ELSE 'failed' END, 2,
       now() - interval '2 hours', now() - interval '2 hours', now() - interval '2 hours'
FROM generate_series(1, 40) g;
INSERT INTO webhooks.attempts (delivery_id, attempted_at, status_code, latency_ms)
SELECT 'old_d' || g, now() - interval '2 hours', 200, 1
FROM generate_series(1, 40) g, generate_series(1, 2) n;
-- Waiting for a retry an hour from now: old, but pending.
INSERT INTO webhooks.deliveries
  (id, webhook_id, project, event_id, event_type, status, attempts, next_attempt_at, created_at)
VALUES ('old_pending', $1, 'default', 'old_e41', 'device.data', 'pending', 1,
        now() + interval '1 hour', now() - interval '2 hours');
INSERT INTO webhooks.attempts (delivery_id, attempted_at, status_code, latency_ms)
VALUES ('old_pending', now() - interval '2 hours', 503, 1);
-- A disabled webhook's queue: tried ten minutes ago (kept), or not since two hours (expired).
INSERT INTO webhooks.deliveries
  (id, webhook_id, project, event_id, event_type, status, attempts, next_attempt_at, created_at)
VALUES ('old_parked_recent', 'wh_parked', 'default', 'old_e42', 'device.alert', 'pending', 1,
        now() - interval '10 minutes', now() - interval '2 hours'),
       ('old_parked_stale', 'wh_parked', 'default', 'old_e43', 'device.alert', 'pending', 1,
        now() - interval '2 hours', now() - interval '2 hours');
";

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.env.pg().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn rows_older_than_the_window_are_removed_in_batches_while_deliveries_go_on() {
    let app = spawn_with(|config| Config {
        webhook_retention: Duration::from_secs(3600),
        webhook_retention_interval: Duration::from_millis(100),
        webhook_retention_batch: 7,
        ..config
    })
    .await;
    let receiver = Receiver::start().await;
    let token = app.create_device("d1").await;
    let (live, _) = register(
        &app,
        app.admin_key(),
        json!({"url": receiver.url("/live"), "events": ["device.data"]}),
    )
    .await;

    const EVENTS: usize = 150;
    let stream = async {
        for n in 0..EVENTS {
            ingest(&app, &token, json!({"n": n})).await;
        }
    };
    let retention = async {
        // Seeded once some deliveries are flowing.
        wait_received(&receiver, "/live", 5, Duration::from_secs(10)).await;
        // Several statements in one text take no parameters: the id goes in as a literal.
        app.env
            .pg()
            .await
            .batch_execute(&OLD_ROWS.replace("$1", &format!("'{live}'")))
            .await
            .unwrap();
        eventually(
            "old finished deliveries, their attempts and their events removed",
            Duration::from_secs(20),
            || async {
                let left = count(
                    &app,
                    "SELECT (SELECT count(*) FROM webhooks.deliveries WHERE id LIKE 'old_d%')
                          + (SELECT count(*) FROM webhooks.attempts WHERE delivery_id LIKE 'old_d%')
                          + (SELECT count(*) FROM webhooks.events
                             WHERE id LIKE 'old_e%' AND id NOT IN ('old_e41', 'old_e42', 'old_e43'))",
                )
                .await;
                (left == 0).then_some(())
            },
        )
        .await;
    };
    tokio::join!(stream, retention);

    // What is pending stays, with its event and attempts.
    let pg = app.env.pg().await;
    let row = pg
        .query_one(
            "SELECT status, attempts, (SELECT count(*) FROM webhooks.attempts WHERE delivery_id = d.id),
                    EXISTS (SELECT 1 FROM webhooks.events e WHERE e.id = d.event_id)
             FROM webhooks.deliveries d WHERE id = 'old_pending'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, i64>(2),
            row.get::<_, bool>(3)
        ),
        ("pending".to_owned(), 1, 1, true)
    );
    let row = pg
        .query_one(
            "SELECT status FROM webhooks.deliveries WHERE id = 'old_parked_recent'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    // A disabled webhook's queue is bounded by the window: untried past it, it expires (and
    // is kept as failed for another window).
    let row = pg
        .query_one(
            "SELECT status, last_error, EXISTS (SELECT 1 FROM webhooks.events WHERE id = 'old_e43')
             FROM webhooks.deliveries WHERE id = 'old_parked_stale'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert!(row.get::<_, String>(1).starts_with("expired"));
    assert!(row.get::<_, bool>(2));

    // Every event of the stream was delivered, once, and its rows are all kept.
    let requests = wait_received(&receiver, "/live", EVENTS, Duration::from_secs(20)).await;
    let ids: BTreeSet<&str> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    assert_eq!((requests.len(), ids.len()), (EVENTS, EVENTS));
    let kept = eventually(
        "every delivery recorded",
        Duration::from_secs(10),
        || async {
            let kept = count(
                &app,
                "SELECT count(*) FROM webhooks.deliveries d
             WHERE status = 'succeeded' AND id NOT LIKE 'old_%'
               AND EXISTS (SELECT 1 FROM webhooks.events e WHERE e.id = d.event_id)
               AND EXISTS (SELECT 1 FROM webhooks.attempts a WHERE a.delivery_id = d.id)",
            )
            .await;
            (kept == EVENTS as i64).then_some(kept)
        },
    )
    .await;
    assert_eq!(kept, EVENTS as i64);
    app.shutdown().await;
}
