//! Rate limits on the registry's routes: per API key, per address for failed authentication,
//! and a project's override (docs/decisions/2026-12-04-rate-limits.md).

use std::time::Duration;

use fieldline_common::Config;
use fieldline_testkit::{TestApp, TestEnv, eventually, read};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Value, json};

use crate::{put, spawn_registry_in};

/// GET `path` with `key`, from `forwarded_for` when given (the registry trusts loopback as a
/// proxy in the tests that set it).
async fn get_from(
    app: &TestApp,
    path: &str,
    key: &str,
    forwarded_for: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = app
        .http
        .get(format!("{}{path}", app.base_url))
        .bearer_auth(key);
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let (status, body) = read(response).await;
    (status, headers, body)
}

fn header(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Lifts the default project's key limit, so the admin key can set a test up.
async fn lift_admin_limit(app: &TestApp) {
    let (status, body) = put(
        app,
        "/api/v1/projects/default/limits",
        app.admin_key(),
        &json!({"api_key": {"requests": 100000, "period_s": 60}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_key_over_its_limit_gets_429_with_the_headers_then_recovers() {
    let app = spawn_registry_in(TestEnv::new().await, |config| Config {
        rate_key_requests: 3,
        rate_key_period: Duration::from_secs(6),
        ..config
    })
    .await;
    // The admin key has its own allowance: one request for this.
    let (_, key) = app.create_key(&["read"]).await;

    for remaining in [2, 1, 0] {
        let (status, headers, body) = get_from(&app, "/api/v1/devices", &key, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(header(&headers, "ratelimit-limit"), 3);
        assert_eq!(header(&headers, "ratelimit-remaining"), remaining);
        assert!(header(&headers, "ratelimit-reset") <= 6, "{headers:?}");
    }
    let (status, headers, body) = get_from(&app, "/api/v1/devices", &key, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["status"], "error");
    assert_eq!(body["error"]["code"], 429);
    assert_eq!(body["error"]["reason"], "rate_limited");
    // One request comes back every 6 s / 3: the client is told to wait that, rounded up.
    assert_eq!(header(&headers, "retry-after"), 2);
    assert_eq!(header(&headers, "ratelimit-limit"), 3);
    assert_eq!(header(&headers, "ratelimit-remaining"), 0);
    assert_eq!(header(&headers, "ratelimit-reset"), 2);
    // Another key is not held back by this one.
    let (status, _, body) = get_from(&app, "/api/v1/devices", app.admin_key(), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Not before its time (2 s away)...
    let (status, _, _) = get_from(&app, "/api/v1/devices", &key, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // ...but then: refused requests do not count, so asking until it works recovers as soon
    // as a request is back.
    eventually("the key recovers", Duration::from_secs(10), || async {
        let (status, _, _) = get_from(&app, "/api/v1/devices", &key, None).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_wrong_keys_is_throttled_per_address_while_good_keys_keep_working() {
    const FAILURES: u32 = 5;
    let app = spawn_registry_in(TestEnv::new().await, |config| Config {
        rate_auth_failures: FAILURES,
        rate_auth_failures_period: Duration::from_secs(600),
        rate_trusted_proxies: "127.0.0.1".into(),
        ..config
    })
    .await;
    let attacker = Some("203.0.113.7");
    let neighbour = Some("198.51.100.9");
    let (_, good) = app.create_key(&["read"]).await;
    // Used once from the attacker's address (a shared NAT): verified and cached.
    let (status, _, _) = get_from(&app, "/api/v1/devices", &good, attacker).await;
    assert_eq!(status, StatusCode::OK);

    for n in 0..FAILURES {
        let wrong = format!("flk_wrong_{n}_{}", fieldline_testkit::unique_suffix());
        let (status, _, body) = get_from(&app, "/api/v1/devices", &wrong, attacker).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "failure {n}: {body}");
    }
    for n in 0..20 {
        let wrong = format!("flk_flood_{n}_{}", fieldline_testkit::unique_suffix());
        let (status, headers, body) = get_from(&app, "/api/v1/devices", &wrong, attacker).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"]["reason"], "rate_limited");
        // One failure comes back every 600 s / 5 = 120 s.
        let retry_after = header(&headers, "retry-after");
        assert!((100..=120).contains(&retry_after), "{retry_after}");
        assert_eq!(header(&headers, "ratelimit-limit"), u64::from(FAILURES));
    }

    // The good key keeps working from the throttled address, and from another one.
    let (status, _, body) = get_from(&app, "/api/v1/devices", &good, attacker).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = get_from(&app, "/api/v1/devices", &good, neighbour).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The neighbour's own wrong key is a plain 401: the count is per address.
    let (status, _, body) = get_from(&app, "/api/v1/devices", "flk_typo", neighbour).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A key never verified from the throttled address waits there too: nothing from that
    // address reaches the registry until its window has room.
    let (_, fresh) = app.create_key(&["read"]).await;
    let (status, _, body) = get_from(&app, "/api/v1/devices", &fresh, attacker).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, _, body) = get_from(&app, "/api/v1/devices", &fresh, neighbour).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_untrusted_peer_cannot_dodge_the_failure_limit_with_x_forwarded_for() {
    let app = spawn_registry_in(TestEnv::new().await, |config| Config {
        rate_auth_failures: 3,
        rate_auth_failures_period: Duration::from_secs(600),
        ..config
    })
    .await;
    let mut statuses = Vec::new();
    for n in 0..6 {
        let forged = format!("192.0.2.{n}");
        let (status, _, _) = get_from(&app, "/api/v1/devices", "flk_wrong", Some(&forged)).await;
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429, 429]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_project_override_changes_the_limit_its_keys_see() {
    let app = spawn_registry_in(TestEnv::new().await, |config| Config {
        rate_key_requests: 2,
        rate_key_period: Duration::from_secs(600),
        ..config
    })
    .await;
    lift_admin_limit(&app).await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            app.admin_key(),
            &json!({"slug": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let acme = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, headers, body) = get_from(&app, "/api/v1/limits", &acme, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&headers, "ratelimit-limit"), 2);
    assert_eq!(
        body["data"],
        json!({
            "project": "acme",
            "api_key": {"requests": 2, "period_s": 600, "source": "default"},
            // The testkit lifts the device default out of the way.
            "device": {"requests": 1_000_000, "period_s": 60, "source": "default"},
        })
    );
    let (status, _, _) = get_from(&app, "/api/v1/devices", &acme, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get_from(&app, "/api/v1/devices", &acme, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // Only the platform admin sets limits, and only valid ones.
    let (status, _) = put(
        &app,
        "/api/v1/projects/acme/limits",
        &acme,
        &json!({"api_key": {"requests": 1000, "period_s": 1}}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "over its limit before its scope"
    );
    for (body, field) in [
        (
            json!({"api_key": {"requests": 0, "period_s": 60}}),
            "api_key.requests",
        ),
        (
            json!({"device": {"requests": 5, "period_s": 0}}),
            "device.period_s",
        ),
        (json!({"device": {"requests": 5}}), "device"),
        (
            json!({"api_key": {"requests": -1, "period_s": 60}}),
            "api_key.requests",
        ),
        (json!({"burst": 5}), "burst"),
    ] {
        let (status, answer) =
            put(&app, "/api/v1/projects/acme/limits", app.admin_key(), &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    let (status, _) = put(
        &app,
        "/api/v1/projects/nope/limits",
        app.admin_key(),
        &json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = put(
        &app,
        "/api/v1/projects/acme/limits",
        app.admin_key(),
        &json!({"api_key": {"requests": 5, "period_s": 600}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["api_key"],
        json!({"requests": 5, "period_s": 600, "source": "project"})
    );
    // The cached principal was dropped with the change: the key now has 5 (a fresh window).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, headers, _) = get_from(&app, "/api/v1/devices", &acme, None).await;
        assert_eq!(header(&headers, "ratelimit-limit"), 5);
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let (status, body) = app
        .get("/api/v1/projects/acme/limits", app.admin_key())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["api_key"]["source"], "project");
    assert_eq!(body["data"]["device"]["source"], "default");

    // Back to the default.
    let (status, body) = put(
        &app,
        "/api/v1/projects/acme/limits",
        app.admin_key(),
        &json!({"api_key": null}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["api_key"]["source"], "default");
    let (_, headers, _) = get_from(&app, "/api/v1/devices", &acme, None).await;
    assert_eq!(header(&headers, "ratelimit-limit"), 2);
    app.shutdown().await;
}
