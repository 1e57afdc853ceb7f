use std::{collections::HashSet, time::Duration};

use fieldline_common::auth::{credential_kind, hash_secret};
use fieldline_proto::v1::{
    DeviceLookupRequest, DeviceLookupResponse, PrincipalKind, VerifyRequest, VerifyResponse,
    verify_response,
};
use fieldline_testkit::assert_error;
use futures::StreamExt;
use prost::Message;
use reqwest::{Method, StatusCode};

use crate::spawn_registry;

#[tokio::test]
async fn missing_and_unknown_credentials_get_401_in_the_envelope() {
    let app = spawn_registry().await;
    let (status, body) = app
        .request(Method::GET, "/api/v1/devices", None, None)
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = app
        .get("/api/v1/devices", "flk_not_a_real_key_at_all")
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    // X-API-Key works as well as Bearer.
    let response = app
        .http
        .get(format!("{}/api/v1/devices", app.base_url))
        .header("X-API-Key", app.admin_key())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test]
async fn device_tokens_are_not_api_keys() {
    let app = spawn_registry().await;
    let token = app.create_device("esp32-1").await;
    let (status, body) = app.get("/api/v1/devices", &token).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    app.shutdown().await;
}

#[tokio::test]
async fn the_auth_rpc_answers_on_the_bus() {
    let app = spawn_registry().await;
    let token = app.create_device("gw-7").await;
    let nats = app.env.nats().await;
    let subjects = &app.context.subjects;

    let ask = |secret: String| {
        let nats = nats.clone();
        let subject = subjects.rpc_auth_verify();
        let request = VerifyRequest {
            secret_sha256: hash_secret(&secret).to_vec(),
            kind: credential_kind(&secret).to_proto().into(),
        };
        async move {
            let reply = nats
                .request(subject, request.encode_to_vec().into())
                .await
                .unwrap();
            VerifyResponse::decode(reply.payload.as_ref())
                .unwrap()
                .result
                .unwrap()
        }
    };
    match ask(token).await {
        verify_response::Result::Principal(principal) => {
            assert_eq!(principal.id, "gw-7");
            assert_eq!(principal.project, "default");
        }
        other => panic!("device token refused: {other:?}"),
    }
    match ask(app.admin_key().to_owned()).await {
        verify_response::Result::Principal(principal) => assert!(principal.platform_admin),
        other => panic!("admin key refused: {other:?}"),
    }
    match ask("fld_nope".into()).await {
        verify_response::Result::Error(error) => assert_eq!(error.reason, "unknown"),
        other => panic!("unknown token accepted: {other:?}"),
    }
    // A digest is looked up only among its kind: the admin key's digest is no device token.
    let as_device = VerifyRequest {
        secret_sha256: hash_secret(app.admin_key()).to_vec(),
        kind: PrincipalKind::Device.into(),
    };
    let reply = nats
        .request(subjects.rpc_auth_verify(), as_device.encode_to_vec().into())
        .await
        .unwrap();
    assert!(matches!(
        VerifyResponse::decode(reply.payload.as_ref())
            .unwrap()
            .result,
        Some(verify_response::Result::Error(_))
    ));

    let lookup = |device_id: &str| {
        let request = DeviceLookupRequest {
            project: "default".into(),
            device_id: device_id.into(),
        };
        let nats = nats.clone();
        let subject = subjects.rpc_auth_device();
        async move {
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                nats.request(subject, request.encode_to_vec().into()),
            )
            .await
            .unwrap()
            .unwrap();
            DeviceLookupResponse::decode(reply.payload.as_ref()).unwrap()
        }
    };
    let found = lookup("gw-7").await;
    assert!(found.found);
    assert_eq!(found.device_type, "sensor");
    assert!(!lookup("nope").await.found);
    app.shutdown().await;
}

/// Everything on the bus while keys and tokens are verified (requests, replies, invalidations,
/// whatever else): the auth RPC carries SHA-256 digests, never a secret's bytes.
#[tokio::test]
async fn no_secret_crosses_the_bus_in_clear() {
    let app = spawn_registry().await;
    let token = app.create_device("bus-watch").await;
    let (_, key) = app.create_key(&["read"]).await;
    let secrets = [token.clone(), key.clone(), app.admin_key().to_owned()];
    // Verified anew, not from the cache that creating them may have filled.
    app.context.auth.invalidate_all();

    let nats = app.env.nats().await;
    // The test's own subjects and its services' reply inboxes (not `>` nor `_INBOX.>`: other
    // tests' streams and publish acks on the shared server could overflow the subscription
    // and drop what this test must see).
    let mut everything = futures::stream::select(
        nats.subscribe(format!("{}.>", app.env.id)).await.unwrap(),
        nats.subscribe(format!("_INBOX.{}.>", app.env.id))
            .await
            .unwrap(),
    );
    nats.flush().await.unwrap();

    let (status, _) = app.get("/api/v1/devices", &key).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.get("/api/v1/devices", &token).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "verified, then refused as no key"
    );
    let (status, _) = app.get("/api/v1/devices/bus-watch", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    let principal = app.context.auth.verify(&token).await.unwrap();
    assert_eq!(principal.id, "bus-watch");

    let verify_subject = app.context.subjects.rpc_auth_verify();
    let mut digests_seen = Vec::new();
    // The reply subjects the verify requests named, and the inbox subjects seen.
    let mut asked: HashSet<String> = HashSet::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut messages = 0;
    // Whatever has been published by now has reached this subscriber after a round trip.
    nats.flush().await.unwrap();
    // Until every secret's request and its reply were seen, or 20 s in all (the consumers'
    // idle heartbeats keep the inboxes from ever going quiet).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let all_seen = |digests: &Vec<Vec<u8>>| {
        secrets
            .iter()
            .all(|secret| digests.contains(&hash_secret(secret).to_vec()))
    };
    while !(all_seen(&digests_seen) && asked.is_subset(&answered)) {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, everything.next()).await else {
            break;
        };
        messages += 1;
        let mut seen = message.payload.to_vec();
        seen.extend_from_slice(message.subject.as_bytes());
        if let Some(headers) = &message.headers {
            for (name, values) in headers.iter() {
                seen.extend_from_slice(name.to_string().as_bytes());
                for value in values {
                    seen.extend_from_slice(value.as_str().as_bytes());
                }
            }
        }
        for secret in &secrets {
            // The random part alone, so a prefix match cannot hide a partial leak.
            let body = &secret.as_bytes()[4..];
            assert!(
                !seen.windows(body.len()).any(|window| window == body),
                "a secret crossed the bus on {}",
                message.subject
            );
        }
        if message.subject.as_str() == verify_subject {
            let request = VerifyRequest::decode(message.payload.as_ref()).unwrap();
            digests_seen.push(request.secret_sha256);
            asked.extend(message.reply.map(|reply| reply.to_string()));
        } else {
            answered.insert(message.subject.to_string());
        }
    }
    assert!(
        asked.is_subset(&answered),
        "{} of {} verify replies seen",
        asked.intersection(&answered).count(),
        asked.len()
    );
    assert!(messages > 0);
    // The watch saw the RPC itself: each secret was asked about, by digest.
    for secret in &secrets {
        assert!(
            digests_seen.contains(&hash_secret(secret).to_vec()),
            "no verify request seen for a secret ({} requests in {messages} messages)",
            digests_seen.len()
        );
    }
    app.shutdown().await;
}

/// A change drops what it names from every cache and nothing else: creating a device does not
/// send every other cached key and token back to the registry, while a revoked key is
/// refused at once.
#[tokio::test]
async fn a_change_drops_only_what_it_names_from_the_caches() {
    let app = spawn_registry().await;
    let (key_id, key) = app.create_key(&["read"]).await;
    let token = app.create_device("d1").await;
    // Cached now.
    // The registry clears its own cache at once and hears its broadcast again a moment later
    // (d1's names the token just issued): let that pass before anything is cached.
    let project = app
        .context
        .auth
        .verify(&token)
        .await
        .unwrap()
        .project
        .clone();
    invalidations_handled(&app, &project).await;
    let (status, _) = app.get("/api/v1/devices", &key).await;
    assert_eq!(status, StatusCode::OK);
    app.context.auth.verify(&token).await.unwrap();

    let nats = app.env.nats().await;
    let mut requests = nats
        .subscribe(app.context.subjects.rpc_auth_verify())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    app.create_device("d2").await;
    let (status, _) = app.get("/api/v1/devices", &key).await;
    assert_eq!(status, StatusCode::OK);
    app.context.auth.verify(&token).await.unwrap();
    let cached = [hash_secret(&key).to_vec(), hash_secret(&token).to_vec()];
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), requests.next()).await
    {
        let request = VerifyRequest::decode(message.payload.as_ref()).unwrap();
        assert!(
            !cached.contains(&request.secret_sha256),
            "a credential the new device has nothing to do with was asked for again"
        );
    }

    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/keys/{key_id}"),
            Some(app.admin_key()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get("/api/v1/devices", &key).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.context.auth.verify(&token).await.unwrap();
    app.shutdown().await;
}

/// Returns once the registry under test has handled every device invalidation broadcast so
/// far. They reach it in order on one subscription, so a barrier broadcast after them is
/// handled last: it drops a cached "no such device" that is then asked for again.
async fn invalidations_handled(app: &fieldline_testkit::TestApp, project: &str) {
    let nats = app.env.nats().await;
    let mut lookups = nats
        .subscribe(app.context.subjects.rpc_auth_device())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let auth = &app.context.auth;
    assert!(
        auth.lookup_device(project, "barrier")
            .await
            .unwrap()
            .is_none()
    );
    lookups.next().await.unwrap();
    let barrier = fieldline_proto::v1::Invalidate {
        project: project.to_owned(),
        id: "barrier".to_owned(),
    };
    nats.publish(
        app.context
            .subjects
            .invalidate(fieldline_proto::InvalidateKind::Devices),
        barrier.encode_to_vec().into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        auth.lookup_device(project, "barrier").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(20), lookups.next())
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry never handled the barrier invalidation"
        );
    }
}
