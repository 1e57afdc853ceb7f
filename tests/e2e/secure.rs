//! What crosses the wire: NATS with credentials and TLS (a private server and a CA made by
//! the test), PostgreSQL URLs with credentials and `sslmode`, and what the processes log.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use fieldline_common::{Config, bus, db};
use fieldline_testkit::{
    TestApp, TestEnv, eventually,
    secure::{NatsSecurity, PrivatePostgres, SecureNats, TestCa},
    servers::free_port,
};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::json;

use crate::platform::Platform;

const NATS_PASSWORD: &str = "n4ts-pass-0f-the-test";

async fn nats_with_password_and_tls() -> SecureNats {
    SecureNats::start(NatsSecurity {
        user_password: Some(("fieldline".into(), NATS_PASSWORD.into())),
        tls: true,
        ..NatsSecurity::default()
    })
    .await
}

fn pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}

#[tokio::test]
async fn the_platform_works_through_nats_with_a_password_and_tls() {
    let nats = nats_with_password_and_tls().await;
    // The server itself refuses what the platform must not do: no credentials, no TLS.
    assert!(async_nats::connect(nats.url()).await.is_err());

    let vars = nats.env_vars();
    let platform = Platform::split_with(&pairs(&vars)).await;
    let (status, body) = platform
        .post(
            "/api/v1/devices",
            platform.admin_key(),
            &json!({"id": "vault-1", "type": "sensor"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["data"]["token"].as_str().unwrap().to_owned();
    // ingest-http asks the registry about the token over the bus, then publishes to JetStream.
    let (status, body) = platform
        .post(
            "/api/v1/ingest",
            &token,
            &json!({"ts": "2026-12-04T10:00:00Z", "temperature": 4.5}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let history = eventually("the reading read back", Duration::from_secs(30), || async {
        let (status, body) = platform
            .get("/api/v1/devices/vault-1/readings", platform.admin_key())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let readings = body["data"].as_array().cloned().unwrap_or_default();
        (!readings.is_empty()).then_some(readings)
    })
    .await;
    assert_eq!(
        history,
        vec![json!({"metric": "temperature", "ts": "2026-12-04T10:00:00Z", "value": 4.5})]
    );
    platform.stop().await;
}

/// Runs `fieldline serve` until it exits or `/health/ready` answers 200, then stops it;
/// returns whether it exited (and how) and everything it logged.
async fn run_briefly(
    extra_env: impl FnOnce(&TestEnv) -> Vec<(String, String)>,
) -> (Option<std::process::ExitStatus>, String) {
    let env = TestEnv::new().await;
    let extra_env = extra_env(&env);
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!("fl-log-{}", env.id));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fieldline"));
    command
        .args([
            "serve",
            "--services",
            "device-registry,ingest-http,query-api",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        // Logs go to stdout, a failed start's error to stderr: both into one file.
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    for (key, value) in env.env_vars().into_iter().chain(extra_env.iter().cloned()) {
        command.env(key, value);
    }
    command
        .env("FIELDLINE_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("FIELDLINE_LOG_LEVEL", "info")
        .env("FIELDLINE_LOG_FORMAT", "json");
    let mut child = command.spawn().unwrap();
    let http = reqwest::Client::new();
    let ready_url = format!("http://127.0.0.1:{port}/health/ready");
    let mut exited = None;
    let mut ready = false;
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        if let Ok(response) = http.get(&ready_url).send().await
            && response.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if exited.is_none() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    env.cleanup().await;
    assert!(
        ready || exited.is_some(),
        "neither ready nor exited in 30 s (a hang):\n{log}"
    );
    (exited, log)
}

#[tokio::test]
async fn the_start_up_log_says_how_it_connects_and_never_a_secret() {
    let nats = nats_with_password_and_tls().await;
    let database_password = "pg-pass-0f-the-test";
    let (exited, log) = run_briefly(|env| {
        let mut vars = nats.env_vars();
        // Trust authentication ignores the password; the URL still has to parse with it.
        let url = with_password(&env.database_url, database_password);
        vars.push((
            "FIELDLINE_DATABASE_URL".into(),
            format!("{url}?sslmode=prefer"),
        ));
        vars
    })
    .await;
    assert!(exited.is_none(), "did not start:\n{log}");
    assert!(log.contains(r#""nats_auth":"user_password""#), "{log}");
    assert!(log.contains(r#""nats_tls":"required""#), "{log}");
    assert!(log.contains("sslmode=prefer"), "{log}");
    assert!(
        !log.contains(NATS_PASSWORD),
        "the NATS password was logged:\n{log}"
    );
    assert!(
        !log.contains(database_password),
        "the database password was logged:\n{log}"
    );
}

#[tokio::test]
async fn a_wrong_nats_password_stops_the_start_with_a_message_naming_nats() {
    let nats = nats_with_password_and_tls().await;
    let wrong = "not-the-n4ts-password";
    let mut vars = nats.env_vars();
    for (key, value) in &mut vars {
        if key == "FIELDLINE_NATS_PASSWORD" {
            *value = wrong.into();
        }
    }
    let (exited, log) = run_briefly(|_| vars).await;
    let status = exited.unwrap_or_else(|| panic!("started with a wrong password:\n{log}"));
    assert!(!status.success());
    assert!(
        log.contains("connecting to NATS at nats://127.0.0.1:")
            && log.contains("NATS refused this client's credentials"),
        "{log}"
    );
    assert!(!log.contains(wrong), "the password was logged:\n{log}");
}

/// JetStream reserves each stream's bytes up front: a server without room for them stops the
/// start with a message that says so and what to change, not "is JetStream enabled?".
#[tokio::test]
async fn a_jetstream_without_room_for_the_streams_stops_the_start_saying_so() {
    let nats = SecureNats::start(NatsSecurity {
        max_file_store: Some(100 << 20),
        ..NatsSecurity::default()
    })
    .await;
    // The tests' streams take 64 MiB each: the second does not fit in 100 MiB.
    let (exited, log) = run_briefly(|_| nats.env_vars()).await;
    let status = exited.unwrap_or_else(|| panic!("started without room for its streams:\n{log}"));
    assert!(!status.success());
    assert!(
        log.contains("JetStream has no room for stream")
            && log.contains("FIELDLINE_STREAM_MAX_BYTES")
            && !log.contains("is JetStream enabled"),
        "{log}"
    );
}

#[tokio::test]
async fn a_nats_server_certificate_of_another_ca_is_refused_clearly() {
    let nats = nats_with_password_and_tls().await;
    let stranger = TestCa::new();
    let mut vars = nats.env_vars();
    for (key, value) in &mut vars {
        if key == "FIELDLINE_NATS_CA_FILE" {
            *value = stranger.ca_file.display().to_string();
        }
    }
    let (exited, log) = run_briefly(|_| vars).await;
    let status = exited.unwrap_or_else(|| panic!("trusted a certificate of another CA:\n{log}"));
    assert!(!status.success());
    assert!(
        log.contains("connecting to NATS at") && log.contains("TLS with NATS failed"),
        "{log}"
    );
    assert!(!log.contains(NATS_PASSWORD), "{log}");
}

#[tokio::test]
async fn mutual_tls_and_a_token_in_the_url_connect_and_nothing_less_does() {
    let nats = SecureNats::start(NatsSecurity {
        token: Some("t0ken-0f-the-test".into()),
        tls: true,
        verify_clients: true,
        ..NatsSecurity::default()
    })
    .await;
    let config = Config {
        nats_url: SecretString::from(format!(
            "nats://t0ken-0f-the-test@127.0.0.1:{0}, nats://t0ken-0f-the-test@localhost:{0}",
            nats.port
        )),
        nats_ca_file: Some(nats.ca.ca_file.clone()),
        nats_client_cert_file: Some(nats.client.cert_file.clone()),
        nats_client_key_file: Some(nats.client.key_file.clone()),
        ..Config::default()
    };
    config.validate().unwrap();
    let client = bus::connect(&config, "test", || {}).await.unwrap();
    let mut subscription = client.subscribe("secure.echo").await.unwrap();
    client
        .publish("secure.echo", "over tls".into())
        .await
        .unwrap();
    let message = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut subscription),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(message.payload.as_ref(), b"over tls");

    // Without the client certificate the server hangs up during the handshake.
    let without_certificate = Config {
        nats_client_cert_file: None,
        nats_client_key_file: None,
        ..config.clone()
    };
    let error = bus::connect(&without_certificate, "test", || {})
        .await
        .err()
        .unwrap();
    let shown = format!("{error:#}");
    assert!(
        shown.contains("connecting to NATS at nats://127.0.0.1:"),
        "{shown}"
    );
    assert!(!shown.contains("t0ken-0f-the-test"), "{shown}");
    // And with a wrong token, the server says so.
    let wrong_token = Config {
        nats_url: SecretString::from(format!("nats://wrong@127.0.0.1:{}", nats.port)),
        ..config
    };
    let error = bus::connect(&wrong_token, "test", || {})
        .await
        .err()
        .unwrap();
    let shown = format!("{error:#}");
    assert!(
        shown.contains("NATS refused this client's credentials"),
        "{shown}"
    );
}

fn with_password(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) if !user.contains(':') => {
                format!("{scheme}://{user}:{password}@{host}")
            }
            _ => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Whether the session of `client` runs over TLS, as the server sees it.
async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn database_urls_with_credentials_and_each_sslmode_connect_as_asked() {
    let env = TestEnv::new().await;
    let url = with_password(&env.database_url, "ignored-by-trust");
    // This machine's server offers TLS (Debian's default, a self-signed certificate):
    // `prefer` and `require` take it without checking the certificate, as libpq does.
    for (mode, tls) in [
        ("", false),
        ("?sslmode=disable", false),
        ("?sslmode=prefer", true),
        ("?sslmode=require", true),
    ] {
        let config = Config {
            database_url: SecretString::from(format!("{url}{mode}")),
            database_pool_size: 1,
            ..Config::default()
        };
        config.validate().unwrap();
        let pool = db::connect(&config).await.unwrap();
        let client = pool.get().await.unwrap();
        assert_eq!(uses_tls(&client).await, tls, "{mode}");
    }
    // `verify-full` against a CA that did not sign the server's certificate: refused, with a
    // message that names PostgreSQL and not the password.
    let stranger = TestCa::new();
    let config = Config {
        database_url: SecretString::from(format!("{url}?sslmode=verify-full")),
        database_ca_file: Some(stranger.ca_file.clone()),
        database_pool_size: 1,
        ..Config::default()
    };
    let error = db::connect(&config).await.err().unwrap();
    let shown = format!("{error:#}");
    assert!(
        shown.contains("connecting to PostgreSQL at postgres://"),
        "{shown}"
    );
    assert!(shown.contains("sslmode=verify-full"), "{shown}");
    assert!(!shown.contains("ignored-by-trust"), "{shown}");
    env.cleanup().await;
}

#[tokio::test]
async fn every_pool_and_the_migrations_of_the_services_run_over_tls() {
    let env = TestEnv::new().await;
    let url = format!("{}?sslmode=require", env.database_url);
    let database = env.database.clone();
    let app = TestApp::spawn_with(
        env,
        |config| Config {
            database_url: SecretString::from(url),
            ..config
        },
        |context| async move {
            Ok(vec![
                device_registry::start(&context).await?,
                query_api::start(&context).await?,
            ])
        },
    )
    .await;
    // A read, so query-api's read pool has opened a connection too.
    let (status, body) = app
        .get("/api/v1/devices/none/readings", app.admin_key())
        .await;
    assert!(
        status == StatusCode::NOT_FOUND || status == StatusCode::OK,
        "{body}"
    );
    let observer = app.env.pg().await;
    let row = observer
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap();
    let (over_tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(over_tls >= 2, "{over_tls} connections over TLS");
    assert_eq!(plain, 0, "a service connection without TLS");
    app.shutdown().await;
}

#[tokio::test]
async fn a_private_tls_postgres_with_a_password_checks_as_each_sslmode_says() {
    let ca = TestCa::new();
    let postgres = PrivatePostgres::start(&ca).await;
    let connect = |url: String, ca_file: Option<std::path::PathBuf>| async move {
        let config = Config {
            database_url: SecretString::from(url),
            database_ca_file: ca_file,
            database_pool_size: 1,
            ..Config::default()
        };
        config.validate().unwrap();
        let pool = db::connect(&config)
            .await
            .map_err(|error| format!("{error:#}"))?;
        let client = pool.get().await.unwrap();
        Ok::<bool, String>(uses_tls(&client).await)
    };
    let ca_file = Some(ca.ca_file.clone());
    // The certificate names `localhost` only.
    assert_eq!(
        connect(
            postgres.url("localhost", "?sslmode=verify-full"),
            ca_file.clone()
        )
        .await,
        Ok(true)
    );
    assert_eq!(
        connect(
            postgres.url("127.0.0.1", "?sslmode=verify-ca"),
            ca_file.clone()
        )
        .await,
        Ok(true)
    );
    // sslrootcert in the URL says the same as the setting.
    let with_root = format!("?sslmode=verify-ca&sslrootcert={}", ca.ca_file.display());
    assert_eq!(
        connect(postgres.url("127.0.0.1", &with_root), None).await,
        Ok(true)
    );
    assert_eq!(
        connect(postgres.url("127.0.0.1", "?sslmode=require"), None).await,
        Ok(true)
    );
    assert_eq!(
        connect(postgres.url("127.0.0.1", "?sslmode=disable"), None).await,
        Ok(false)
    );

    let refused = connect(
        postgres.url("127.0.0.1", "?sslmode=verify-full"),
        ca_file.clone(),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("connecting to PostgreSQL at"), "{refused}");
    assert!(!refused.contains(&postgres.password), "{refused}");
    let stranger = TestCa::new();
    let refused = connect(
        postgres.url("localhost", "?sslmode=verify-ca"),
        Some(stranger.ca_file.clone()),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("connecting to PostgreSQL at"), "{refused}");
    // `require` with a CA file checks the chain, as libpq does.
    assert!(
        connect(
            postgres.url("localhost", "?sslmode=require"),
            Some(stranger.ca_file.clone())
        )
        .await
        .is_err()
    );

    let wrong = format!(
        "postgres://postgres:not-the-password@localhost:{}/postgres?sslmode=verify-full",
        postgres.port
    );
    let refused = connect(wrong, ca_file).await.unwrap_err();
    assert!(
        refused.contains("password authentication failed") && !refused.contains("not-the-password"),
        "{refused}"
    );
}
