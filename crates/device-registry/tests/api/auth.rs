use std::time::Duration;

use fieldline_proto::v1::{
    DeviceLookupRequest, DeviceLookupResponse, VerifyRequest, VerifyResponse, verify_response,
};
use fieldline_testkit::assert_error;
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
        async move {
            let reply = nats
                .request(subject, VerifyRequest { secret }.encode_to_vec().into())
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
