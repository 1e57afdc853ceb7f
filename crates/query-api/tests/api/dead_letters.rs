//! Poison never blocks: a message the writer cannot store goes to the dead letters after its
//! tries while the messages behind it are stored, and the platform admin can inspect, replay
//! and purge it.

use std::time::Duration;

use fieldline_proto::{
    Stream,
    v1::{Reading, reading},
};
use fieldline_testkit::{TestApp, assert_error, eventually};
use reqwest::StatusCode;
use serde_json::Value;

use crate::{number, publish, spawn_query_with, stored};

const T0: i64 = 1_767_225_600_000_000;
const TRIES: i64 = 3;

async fn spawn() -> TestApp {
    spawn_query_with(|mut config| {
        config.consumer_max_deliveries = TRIES;
        config
    })
    .await
}

async fn dead_letters(app: &TestApp, query: &str) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!("/api/v1/admin/dead-letters{query}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().clone()
}

async fn wait_for_dead_letters(app: &TestApp, count: usize) -> Vec<Value> {
    eventually("the dead letters", Duration::from_secs(20), || async {
        let letters = dead_letters(app, "?consumer=query-writer").await;
        (letters.len() >= count).then_some(letters)
    })
    .await
}

async fn writer_idle(app: &TestApp) {
    let consumer = app
        .context
        .jetstream
        .get_stream(app.context.subjects.stream_name(Stream::Telemetry))
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(query_api::WRITER_CONSUMER)
        .await
        .unwrap();
    eventually("nothing left pending", Duration::from_secs(20), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        }
    })
    .await;
}

/// A NUL in text: Postgres refuses it (the ingest parsers already do; this one came over the
/// bus). It is tried `TRIES` times, then kept with its reason; the message behind it, and
/// one sent after, are stored meanwhile.
#[tokio::test]
async fn a_poison_message_reaches_the_dead_letters_after_its_tries_while_the_next_are_stored() {
    let app = spawn().await;
    app.create_device("d1").await;
    let poison = Reading {
        metric: "fw".into(),
        ts_us: T0,
        value: Some(reading::Value::Text("a\0b".into())),
    };
    publish(&app, "default", "d1", vec![poison]).await;
    publish(&app, "default", "d1", vec![number("temp", T0 + 1, 1.0)]).await;
    eventually(
        "the good message stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 1).then_some(()) },
    )
    .await;
    let letters = wait_for_dead_letters(&app, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["consumer"], "query-writer");
    assert_eq!(letter["deliveries"], TRIES, "{letter}");
    assert_eq!(
        letter["subject"],
        app.context.subjects.telemetry("default", "d1")
    );
    assert_eq!(
        letter["stream"],
        app.context.subjects.stream_name(Stream::Telemetry)
    );
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("invalid_value"), "{reason}");
    writer_idle(&app).await;
    publish(&app, "default", "d1", vec![number("temp", T0 + 2, 2.0)]).await;
    eventually(
        "a later message stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 2).then_some(()) },
    )
    .await;

    // Inspect: the payload, decoded.
    let sequence = letter["sequence"].as_u64().unwrap();
    let (status, body) = app
        .get(
            &format!("/api/v1/admin/dead-letters/{sequence}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let decoded = body["data"]["decoded"].as_str().unwrap();
    assert!(
        decoded.contains("\"fw\"") && decoded.contains("d1"),
        "{decoded}"
    );
    assert!(!body["data"]["payload_base64"].as_str().unwrap().is_empty());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("fieldline_dead_letters_total{consumer=\"query-writer\"} 1"),
        "{metrics}"
    );
    app.shutdown().await;
}

/// A message that does not decode can never be stored: a dead letter on its first delivery.
#[tokio::test]
async fn an_undecodable_message_is_a_dead_letter_at_once() {
    let app = spawn().await;
    app.create_device("d1").await;
    let subject = app.context.subjects.telemetry("default", "d1");
    app.context
        .jetstream
        .publish(subject, vec![0xff, 0xff, 0xff].into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&app, "default", "d1", vec![number("temp", T0, 1.0)]).await;
    let letters = wait_for_dead_letters(&app, 1).await;
    assert_eq!(letters[0]["deliveries"], 1, "{letters:?}");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("undecodable")
    );
    eventually(
        "the good message stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 1).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

/// A failure an operator can fix (here a constraint added by hand, then dropped): the dead
/// letter, replayed, is stored; replayed for the writer only, it makes no second webhook
/// event or state change elsewhere. Delete and purge remove the others.
#[tokio::test]
async fn a_dead_letter_replayed_after_the_fix_is_stored_and_purge_clears_the_rest() {
    let app = spawn().await;
    app.create_device("d1").await;
    let pg = app.env.pg().await;
    pg.batch_execute(
        "ALTER TABLE telemetry.series ADD CONSTRAINT no_blocked CHECK (metric <> 'blocked') NOT VALID",
    )
    .await
    .unwrap();
    for offset in 0..3 {
        publish(
            &app,
            "default",
            "d1",
            vec![number("blocked", T0 + offset, 1.0)],
        )
        .await;
    }
    publish(&app, "default", "d1", vec![number("temp", T0, 1.0)]).await;
    let letters = wait_for_dead_letters(&app, 3).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(stored(&app, "d1").await, 1);

    // Paging: one at a time, in order.
    let (status, first) = app
        .get("/api/v1/admin/dead-letters?limit=1", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK);
    let cursor = first["page"]["next_cursor"].as_str().unwrap().to_owned();
    let (_, second) = app
        .get(
            &format!("/api/v1/admin/dead-letters?limit=1&cursor={cursor}"),
            app.admin_key(),
        )
        .await;
    assert!(first["data"][0]["sequence"].as_u64() < second["data"][0]["sequence"].as_u64());

    pg.batch_execute("ALTER TABLE telemetry.series DROP CONSTRAINT no_blocked")
        .await
        .unwrap();
    let sequence = letters[0]["sequence"].as_u64().unwrap();
    let (status, body) = app
        .post(
            &format!("/api/v1/admin/dead-letters/{sequence}/replay"),
            app.admin_key(),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        "the replayed reading stored",
        Duration::from_secs(10),
        || async { (stored(&app, "d1").await == 2).then_some(()) },
    )
    .await;
    let (status, body) = app
        .get(
            &format!("/api/v1/admin/dead-letters/{sequence}"),
            app.admin_key(),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::NOT_FOUND,
        "dead_letter_not_found",
    );

    let other = letters[1]["sequence"].as_u64().unwrap();
    let (status, _) = app
        .delete(
            &format!("/api/v1/admin/dead-letters/{other}"),
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(dead_letters(&app, "").await.len(), 1);
    let (status, body) = app
        .delete("/api/v1/admin/dead-letters", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
    let (status, body) = app
        .delete(
            "/api/v1/admin/dead-letters?consumer=query-writer",
            app.admin_key(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["purged"], 1);
    assert!(dead_letters(&app, "").await.is_empty());
    app.shutdown().await;
}

/// Dead letters cross projects: only the platform admin sees them; bad ids are 400s.
#[tokio::test]
async fn only_the_platform_admin_reaches_the_dead_letters_and_bad_input_is_400() {
    let app = spawn().await;
    let (_, project_admin) = app.create_key(&["admin"]).await;
    let (status, body) = app.get("/api/v1/admin/dead-letters", &project_admin).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .get("/api/v1/admin/dead-letters/abc", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_path");
    let (status, body) = app
        .get(
            "/api/v1/admin/dead-letters?consumer=Bad.Name",
            app.admin_key(),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
    let (status, body) = app
        .get("/api/v1/admin/dead-letters/99", app.admin_key())
        .await;
    assert_error(
        status,
        &body,
        StatusCode::NOT_FOUND,
        "dead_letter_not_found",
    );
    app.shutdown().await;
}
