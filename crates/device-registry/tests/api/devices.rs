use fieldline_testkit::assert_error;
use reqwest::StatusCode;
use serde_json::json;

use crate::spawn_registry;

#[tokio::test]
async fn create_get_and_conflict() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "esp32-1", "name": "Greenhouse", "type": "sensor", "group": "greenhouse",
                    "tags": ["north"], "metadata": {"fw": "1.2.0"}, "heartbeat_interval_s": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let device = &body["data"];
    assert!(device["token"].as_str().unwrap().starts_with("fld_"));
    assert_eq!(device["group"], "greenhouse");

    let (status, body) = app.get("/api/v1/devices/esp32-1", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["name"], "Greenhouse");
    assert_eq!(body["data"]["metadata"]["fw"], "1.2.0");
    assert!(
        body["data"].get("token").is_none(),
        "token shown twice: {body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "esp32-1"}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "device_exists");

    let (status, body) = app.get("/api/v1/devices/esp32-404", app.admin_key()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    app.shutdown().await;
}

#[tokio::test]
async fn listing_is_paged_and_filtered_by_type() {
    let app = spawn_registry().await;
    for index in 0..5 {
        app.create_device(&format!("s{index}")).await;
    }
    let (status, _) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "a1", "type": "actuator"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let mut seen = Vec::new();
    let mut path = "/api/v1/devices?type=sensor&limit=2".to_owned();
    loop {
        let (status, body) = app.get(&path, app.admin_key()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["page"]["limit"], 2);
        for device in body["data"].as_array().unwrap() {
            seen.push(device["id"].as_str().unwrap().to_owned());
        }
        match body["page"]["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/devices?type=sensor&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4"]);

    let (status, body) = app
        .get("/api/v1/devices?type=toaster", app.admin_key())
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_device_type",
    );
    let (status, body) = app.get("/api/v1/devices?limit=0", app.admin_key()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
    let (status, body) = app
        .get("/api/v1/devices?cursor=garbage", app.admin_key())
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_cursor");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_get_400_or_415_naming_the_problem() {
    let app = spawn_registry().await;
    let (status, body) = app
        .post("/api/v1/devices", app.admin_key(), &json!({"id": "bad id"}))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("id:"),
        "{body}"
    );

    let (status, body) = app
        .post(
            "/api/v1/devices",
            app.admin_key(),
            &json!({"id": "x", "type": 5}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("type"),
        "{body}"
    );

    let (status, body) = app
        .post_raw(
            "/api/v1/devices",
            app.admin_key(),
            "application/json",
            "{\"id\": ",
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");

    let (status, body) = app
        .post_raw("/api/v1/devices", app.admin_key(), "text/plain", "id=x")
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let (status, body) = app.get("/api/v1/devices", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["data"].as_array().unwrap().len(),
        0,
        "a bad request stored something: {body}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_read_key_cannot_create_devices() {
    let app = spawn_registry().await;
    let (_, reader) = app.create_key(&["read"]).await;
    let (status, body) = app
        .post("/api/v1/devices", &reader, &json!({"id": "x"}))
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        app.get("/api/v1/devices/x", app.admin_key()).await.0,
        StatusCode::NOT_FOUND
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_wrong_method_and_a_nul_character_get_the_envelope() {
    let app = spawn_registry().await;
    let (status, body) = app
        .request(
            reqwest::Method::PUT,
            "/api/v1/keys",
            Some(app.admin_key()),
            Some(&json!({})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, body) = app.get("/api/v1/nothing-here", app.admin_key()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "route_not_found");
    // A NUL anywhere is refused at the edge, naming where: a name, a nested config or
    // metadata value, a key, a path or query parameter.
    for (device, field) in [
        (json!({"id": "x", "name": "a\u{0}b"}), "name"),
        (
            json!({"id": "x", "config": {"wifi": {"ssid": "home\u{0}"}}}),
            "config.wifi.ssid",
        ),
        (
            json!({"id": "x", "metadata": {"site": ["a", "\u{0}"]}}),
            "metadata.site[1]",
        ),
    ] {
        let (status, body) = app.post("/api/v1/devices", app.admin_key(), &device).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_character");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{field}:")), "{body}");
    }
    app.create_device("d1").await;
    let (status, body) = app
        .request(
            reqwest::Method::PATCH,
            "/api/v1/devices/d1/config",
            Some(app.admin_key()),
            Some(&json!({"mode\u{0}": 1})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_character");
    for path in [
        "/api/v1/devices/d1%00",
        "/api/v1/devices?group=%00",
        "/api/v1/devices/d1/commands?status=pending%00",
    ] {
        let (status, body) = app.get(path, app.admin_key()).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_character");
    }
    let (status, body) = app.get("/api/v1/devices", app.admin_key()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn put_patch_delete_and_token_rotation() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    let old_token = app.create_device("gw-1").await;

    let (status, body) = crate::put(
        &app,
        "/api/v1/devices/gw-1",
        &admin,
        &json!({"name": "Gateway", "type": "gateway", "group": "roof", "tags": ["a", "b"], "heartbeat_interval_s": 30}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["type"], "gateway");
    assert_eq!(body["data"]["group"], "roof");

    // A merge patch: absent fields stay, null clears, objects merge.
    let (status, body) = crate::patch(
        &app,
        "/api/v1/devices/gw-1",
        &admin,
        &json!({"group": null, "metadata": {"site": "lyon"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["group"], serde_json::Value::Null);
    assert_eq!(body["data"]["name"], "Gateway");
    assert_eq!(body["data"]["tags"], json!(["a", "b"]));
    assert_eq!(body["data"]["metadata"]["site"], "lyon");

    for (body, status, reason) in [
        (
            json!({"id": "other"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id_mismatch",
        ),
        (
            json!({"type": "toaster"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"config": {}}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"heartbeat_interval_s": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
    ] {
        let (got, response) = crate::patch(&app, "/api/v1/devices/gw-1", &admin, &body).await;
        assert_error(got, &response, status, reason);
    }
    let (got, response) = crate::put(&app, "/api/v1/devices/nope", &admin, &json!({})).await;
    assert_error(got, &response, StatusCode::NOT_FOUND, "device_not_found");

    // The old token works until rotated, then only the new one does.
    let verify = |token: String| {
        let app = &app;
        async move {
            let (status, _) = app.get("/api/v1/devices", &token).await;
            status
        }
    };
    assert_eq!(verify(old_token.clone()).await, StatusCode::FORBIDDEN);
    let (status, body) = app
        .post("/api/v1/devices/gw-1/token", &admin, &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new_token = body["data"]["token"].as_str().unwrap().to_owned();
    assert_eq!(verify(old_token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(verify(new_token.clone()).await, StatusCode::FORBIDDEN);

    let (status, _) = app.delete("/api/v1/devices/gw-1", &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(verify(new_token).await, StatusCode::UNAUTHORIZED);
    let (status, body) = app.get("/api/v1/devices/gw-1", &admin).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    let (status, body) = app.delete("/api/v1/devices/gw-1", &admin).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "device_not_found");
    app.shutdown().await;
}

#[tokio::test]
async fn listing_filters_by_group_tag_and_status() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    for (id, group, tags) in [
        ("a", "north", vec!["solar"]),
        ("b", "north", vec!["wind"]),
        ("c", "south", vec!["solar", "wind"]),
    ] {
        let (status, _) = app
            .post(
                "/api/v1/devices",
                &admin,
                &json!({"id": id, "group": group, "tags": tags}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let ids = |body: serde_json::Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, body) = app.get("/api/v1/devices?group=north", &admin).await;
    assert_eq!(ids(body), vec!["a", "b"]);
    let (_, body) = app.get("/api/v1/devices?tag=solar", &admin).await;
    assert_eq!(ids(body), vec!["a", "c"]);
    let (_, body) = app
        .get("/api/v1/devices?tag=wind&group=south", &admin)
        .await;
    assert_eq!(ids(body), vec!["c"]);
    let (_, body) = app
        .get("/api/v1/devices?status=unknown&limit=2", &admin)
        .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let cursor = body["page"]["next_cursor"].as_str().unwrap().to_owned();
    let (_, body) = app
        .get(
            &format!("/api/v1/devices?status=unknown&limit=2&cursor={cursor}"),
            &admin,
        )
        .await;
    assert_eq!(ids(body), vec!["c"]);
    let (_, body) = app.get("/api/v1/devices?status=online", &admin).await;
    assert!(body["data"].as_array().unwrap().is_empty());
    let (status, body) = app.get("/api/v1/devices?status=asleep", &admin).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_parameter");
    app.shutdown().await;
}

/// Names with CR, LF, ESC or another control character, and blank names, are refused with
/// 400 `invalid_name` naming the field, wherever a name is given; nothing is stored.
#[tokio::test]
async fn control_characters_and_blank_names_are_refused() {
    let app = spawn_registry().await;
    let admin = app.admin_key().to_owned();
    let bad_names = [
        "line\r\nInjected: yes",
        "bell\u{7}",
        "\u{1b}[2J\u{1b}[31mred",
        "del\u{7f}",
        "c1\u{85}",
        "   ",
        "",
        "\t",
    ];
    for name in bad_names {
        for (method, path, body) in [
            (
                reqwest::Method::POST,
                "/api/v1/devices",
                json!({"id": "d-new", "name": name}),
            ),
            (
                reqwest::Method::POST,
                "/api/v1/keys",
                json!({"name": name, "scopes": ["read"]}),
            ),
            (
                reqwest::Method::POST,
                "/api/v1/projects",
                json!({"slug": "acme", "name": name}),
            ),
            (
                reqwest::Method::POST,
                "/api/v1/alert-rules",
                json!({"name": name, "device_id": "d1", "metric": "t", "op": "gt", "threshold": 1}),
            ),
        ] {
            let (status, answer) = app.request(method, path, Some(&admin), Some(&body)).await;
            assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_name");
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("name:"),
                "{path} {name:?}: {answer}"
            );
        }
    }
    // An existing device cannot be renamed to one either.
    app.create_device("d1").await;
    for name in bad_names {
        let (status, answer) = app
            .request(
                reqwest::Method::PATCH,
                "/api/v1/devices/d1",
                Some(&admin),
                Some(&json!({"name": name})),
            )
            .await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_name");
    }
    // Labels were already a small alphabet; a control character there names its field.
    let (status, answer) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "d2", "tags": ["ok", "x\ny"]}),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tags[1]:")
    );

    // Names are trimmed; anything printable is fine.
    let (status, answer) = app
        .post(
            "/api/v1/devices",
            &admin,
            &json!({"id": "d3", "name": "  Küche – Fenster 🚪 "}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["data"]["name"], "Küche – Fenster 🚪");

    let (_, devices) = app.get("/api/v1/devices", &admin).await;
    let ids: Vec<_> = devices["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["d1", "d3"], "{devices}");
    assert_eq!(devices["data"][0]["name"], serde_json::Value::Null);
    let (_, keys) = app.get("/api/v1/keys", &admin).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 1, "{keys}");
    let (_, projects) = app.get("/api/v1/projects", &admin).await;
    assert_eq!(projects["data"].as_array().unwrap().len(), 1, "{projects}");
    let (_, rules) = app.get("/api/v1/alert-rules", &admin).await;
    assert_eq!(rules["data"].as_array().unwrap().len(), 0, "{rules}");
    app.shutdown().await;
}

/// Sends raw bytes on a new connection and reads until the server closes it: each response's
/// status and JSON body, in order.
async fn raw_exchange(
    app: &fieldline_testkit::TestApp,
    request: &[u8],
) -> Vec<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything: a write error is fine.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the server closes the connection")
    .ok();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let mut responses = Vec::new();
    let mut rest = text.as_str();
    while let Some(head_end) = rest.find("\r\n\r\n") {
        let head = &rest[..head_end];
        let status: u16 = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .map_or(0, |length| length.trim().parse().unwrap());
        let body = &rest[head_end + 4..head_end + 4 + length];
        responses.push((
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        ));
        rest = &rest[head_end + 4 + length..];
    }
    responses
}

/// Heads the HTTP codec refuses before any application code runs get the envelope, not an
/// empty 400 or 431.
#[tokio::test]
async fn an_over_long_uri_or_head_answers_the_envelope() {
    let app = spawn_registry().await;
    for length in [100_000, 200_000] {
        let request = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(length));
        let responses = raw_exchange(&app, request.as_bytes()).await;
        assert_eq!(responses.len(), 1, "{responses:?}");
        let (status, body) = &responses[0];
        assert_error(
            StatusCode::from_u16(*status).unwrap(),
            body,
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
        );
    }
    // On a connection already used for a request, too.
    let request = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/devices?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "b".repeat(70_000)
    );
    let responses = raw_exchange(&app, request.as_bytes()).await;
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert_eq!(responses[0].0, 200, "{responses:?}");
    assert_eq!(
        responses[1].1["error"]["reason"], "uri_too_long",
        "{responses:?}"
    );

    let request = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
        "c".repeat(140_000)
    );
    let responses = raw_exchange(&app, request.as_bytes()).await;
    let (status, body) = &responses[0];
    assert_error(
        StatusCode::from_u16(*status).unwrap(),
        body,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    );

    let responses = raw_exchange(&app, b"GET /health/live HTTP/1.1\r\n\r\n").await;
    let (status, body) = &responses[0];
    assert_error(
        StatusCode::from_u16(*status).unwrap(),
        body,
        StatusCode::BAD_REQUEST,
        "malformed_request",
    );

    // A long but parseable URI still reaches the application.
    let responses = raw_exchange(
        &app,
        format!(
            "GET /api/v1/devices/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "d".repeat(60_000)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(responses[0].0, 401, "{responses:?}");
    app.shutdown().await;
}
