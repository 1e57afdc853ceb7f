//! Device identity on the broker: every device logs in with its own account and may use only
//! its own topics; the registry keeps the broker's accounts in line with its devices.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fieldline_testkit::{TestApp, TestEnv, eventually};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::json;

use crate::{Device, Listener, batches_in_jetstream, mqtt_port, spawn_mqtt, topic, wait_ready};

fn username(app: &TestApp, device: &str) -> String {
    format!("{}/default/{device}", app.context.config.mqtt_topic_root)
}

/// How a login ends: accepted, or the CONNACK's refusal. A device's client id is its user
/// name.
async fn login(app: &TestApp, user: Option<(&str, &str)>) -> Result<(), ConnectReturnCode> {
    let client_id = user.map_or_else(
        || format!("probe-{}", fieldline_testkit::unique_suffix()),
        |(user, _)| user.to_owned(),
    );
    login_as(app, &client_id, user).await
}

async fn login_as(
    app: &TestApp,
    client_id: &str,
    user: Option<(&str, &str)>,
) -> Result<(), ConnectReturnCode> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", mqtt_port(app));
    if let Some((user, password)) = user {
        options.set_credentials(user, password);
    }
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(error) => panic!("login neither accepted nor refused: {error}"),
            }
        }
    })
    .await;
    outcome.expect("the broker answered the login")
}

/// A logged-in session that records what the broker does to it.
struct Session {
    client: AsyncClient,
    suback: Arc<std::sync::Mutex<Option<Vec<SubscribeReasonCode>>>>,
    up: Arc<AtomicBool>,
    cut: Arc<AtomicUsize>,
}

impl Session {
    async fn open(app: &TestApp, user: &str, password: &str) -> Self {
        let mut options = MqttOptions::new(user, "127.0.0.1", mqtt_port(app));
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_credentials(user, password);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let session = Self {
            client,
            suback: Arc::default(),
            up: Arc::default(),
            cut: Arc::default(),
        };
        let (suback, up, cut) = (
            session.suback.clone(),
            session.up.clone(),
            session.cut.clone(),
        );
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => up.store(true, Ordering::SeqCst),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        *suback.lock().unwrap() = Some(ack.return_codes);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if up.swap(false, Ordering::SeqCst) {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        eventually("session up", Duration::from_secs(5), || async {
            session.up.load(Ordering::SeqCst).then_some(())
        })
        .await;
        session
    }

    /// What the broker answered to a subscription.
    async fn subscribe(&self, filter: &str) -> Vec<SubscribeReasonCode> {
        *self.suback.lock().unwrap() = None;
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        eventually("suback", Duration::from_secs(5), || async {
            self.suback.lock().unwrap().clone()
        })
        .await
    }

    fn was_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst) > 0
    }
}

fn refused(codes: &[SubscribeReasonCode]) -> bool {
    codes
        .iter()
        .all(|code| matches!(code, SubscribeReasonCode::Failure))
}

#[tokio::test]
async fn a_device_speaks_only_for_itself() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    let other_token = app.create_device("d2").await;
    wait_ready(&app).await;
    let watcher_d2 = Listener::subscribe(&app, &format!("{}/#", username(&app, "d2"))).await;
    let watcher_d1_downlink = Listener::subscribe(&app, &topic(&app, "d1", "commands")).await;

    // Its own topics: accepted and into JetStream.
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    batches_in_jetstream(&app, 1, "own telemetry").await;

    // As another device, and onto its own downlink: the broker drops them (MQTT 3.1.1 still
    // PUBACKs), so neither reaches anyone.
    device
        .publish(&topic(&app, "d2", "telemetry"), r#"{"ts": 2, "a": 2}"#)
        .await;
    device.publish(&topic(&app, "d2", "heartbeat"), "").await;
    device
        .publish(
            &topic(&app, "d2", "commands/ack"),
            r#"{"id": "cmd_x", "status": "ok"}"#,
        )
        .await;
    device
        .publish(
            &topic(&app, "d1", "commands"),
            &json!({"id": "cmd_forged", "name": "unlock_door"}).to_string(),
        )
        .await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 3, "a": 3}"#)
        .await;
    batches_in_jetstream(&app, 2, "the later own message").await;
    eventually(
        "every publish answered",
        Duration::from_secs(10),
        || async { (device.pubacks() >= 6).then_some(()) },
    )
    .await;
    assert!(
        watcher_d2.messages().is_empty(),
        "{:?}",
        watcher_d2.messages()
    );
    assert!(watcher_d1_downlink.messages().is_empty());
    let batches = app.telemetry_batches().await;
    assert!(batches.iter().all(|(_, batch)| batch.device_id == "d1"));
    assert!(app.heartbeats().await.is_empty());

    // Reading: its own config and commands only; never another's, never the ingest share.
    // (One connection per device: its client id is its user name.)
    device.close().await;
    let session = Session::open(&app, &username(&app, "d1"), &token).await;
    assert!(!refused(
        &session.subscribe(&topic(&app, "d1", "config")).await
    ));
    assert!(!refused(
        &session.subscribe(&topic(&app, "d1", "commands")).await
    ));
    let root = &app.context.config.mqtt_topic_root;
    for filter in [
        topic(&app, "d2", "config"),
        topic(&app, "d2", "commands"),
        format!("{root}/#"),
        format!("{root}/default/+/config"),
        format!(
            "$share/{}/{root}/+/+/telemetry",
            app.context.config.mqtt_share_group
        ),
        format!("$share/other/{root}/+/+/telemetry"),
        "$SYS/#".to_owned(),
        "$CONTROL/dynamic-security/v1/response".to_owned(),
    ] {
        assert!(
            refused(&session.subscribe(&filter).await),
            "{filter} was granted"
        );
    }
    let _ = other_token;
    app.shutdown().await;
}

#[tokio::test]
async fn anonymous_and_wrong_logins_are_refused() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    assert!(login(&app, None).await.is_err(), "anonymous login accepted");
    let user = username(&app, "d1");
    assert!(login(&app, Some((&user, "fld_wrong"))).await.is_err());
    // A token is good for its own device only.
    let other = app.create_device("d2").await;
    assert!(login(&app, Some((&user, &other))).await.is_err());
    assert!(login(&app, Some((&user, &token))).await.is_ok());
    // A device connects with its own client id only: not another device's, not ingest-mqtt's
    // (whose persistent session holds the share of everybody's readings).
    let other_user = username(&app, "d2");
    let ingest_id = app.context.config.ingest_mqtt_client_id();
    let slot_id = app.context.config.ingest_mqtt_slot_client_id(0);
    for client_id in [
        other_user.as_str(),
        ingest_id.as_str(),
        slot_id.as_str(),
        "any-id",
    ] {
        assert!(
            login_as(&app, client_id, Some((&user, &token)))
                .await
                .is_err(),
            "{client_id} accepted for {user}"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn rotation_cuts_the_old_session_and_the_new_token_logs_in() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let old = app.create_device("d1").await;
    wait_ready(&app).await;
    let user = username(&app, "d1");
    let session = Session::open(&app, &user, &old).await;

    let (status, body) = app
        .post("/api/v1/devices/d1/token", app.admin_key(), &json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["mqtt_username"], user.as_str());
    let new = body["data"]["token"].as_str().unwrap().to_owned();
    // Cut by the time the rotation answered: the broker was changed before the response.
    eventually("old session cut", Duration::from_secs(10), || async {
        session.was_cut().then_some(())
    })
    .await;
    assert!(login(&app, Some((&user, &old))).await.is_err());
    assert!(login(&app, Some((&user, &new))).await.is_ok());
    let device = Device::connect(&app, "d1", &new).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    batches_in_jetstream(&app, 1, "telemetry with the new token").await;
    app.shutdown().await;
}

#[tokio::test]
async fn deletion_cuts_the_session_at_once() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let user = username(&app, "d1");
    let session = Session::open(&app, &user, &token).await;
    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/devices/d1",
            Some(app.admin_key()),
            None,
        )
        .await;
    assert_eq!(status, 204);
    eventually("session cut", Duration::from_secs(10), || async {
        session.was_cut().then_some(())
    })
    .await;
    assert!(login(&app, Some((&user, &token))).await.is_err());
    app.shutdown().await;
}

/// A broker that comes back with only its admin account gets every device's account again
/// from the registry, with the same passwords: no device is provisioned again by hand.
#[tokio::test]
async fn a_broker_that_lost_its_accounts_is_reconciled() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let first = app.create_device("d1").await;
    let second = app.create_device("d2").await;
    let deleted = app.create_device("gone").await;
    wait_ready(&app).await;
    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/devices/gone",
            Some(app.admin_key()),
            None,
        )
        .await;
    assert_eq!(status, 204);

    app.env.broker().restart_without_accounts().await;
    assert!(
        login(&app, Some((&username(&app, "d1"), "anything")))
            .await
            .is_err()
    );
    for (device, token) in [("d1", &first), ("d2", &second)] {
        eventually("account restored", Duration::from_secs(20), || async {
            login(&app, Some((&username(&app, device), token)))
                .await
                .ok()
        })
        .await;
    }
    assert!(
        login(&app, Some((&username(&app, "gone"), &deleted)))
            .await
            .is_err()
    );
    // ingest-mqtt's own account came back too: a message goes all the way.
    wait_ready(&app).await;
    let device = Device::connect(&app, "d2", &second).await;
    device
        .publish(&topic(&app, "d2", "telemetry"), r#"{"ts": 7, "a": 7}"#)
        .await;
    batches_in_jetstream(&app, 1, "telemetry after the repair").await;
    app.shutdown().await;
}

/// Accounts the registry does not know (a device deleted while the broker was away) are
/// removed by the next comparison.
#[tokio::test]
async fn an_account_of_a_device_deleted_while_the_broker_was_down_is_removed() {
    let app = spawn_mqtt(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let broker = app.env.broker();
    broker.stop();
    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/devices/d1",
            Some(app.admin_key()),
            None,
        )
        .await;
    assert_eq!(status, 204, "deletion does not wait for the broker");
    broker.restart().await;
    let user = username(&app, "d1");
    eventually("stale account removed", Duration::from_secs(20), || async {
        login(&app, Some((&user, &token)))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    app.shutdown().await;
}

/// The registry and ingest-mqtt on a broker of their own with a TLS listener whose certificate
/// `broker_ca` signed; ingest-mqtt logs in over `mqtts://` trusting `trusted_ca`'s file.
async fn spawn_over_tls(
    broker_ca: &fieldline_testkit::secure::TestCa,
    trusted_ca: &fieldline_testkit::secure::TestCa,
) -> TestApp {
    let env = TestEnv::new().await.with_broker().await;
    let tls_port = env
        .broker()
        .add_tls_listener(&broker_ca.server("broker"))
        .await;
    let tls_url = env.broker().tls_url(tls_port);
    let ca_file = trusted_ca.ca_file.display().to_string();
    spawn_mqtt(env, |config| fieldline_common::Config {
        mqtt_url: tls_url.into(),
        mqtt_ca_file: Some(ca_file),
        ..config
    })
    .await
}

/// ingest-mqtt logs in over `mqtts://`, trusting the CA file it is given; with a CA that did
/// not sign the broker's certificate it does not connect.
#[tokio::test]
async fn ingest_mqtt_logs_in_over_tls_with_a_ca_file() {
    let ca = fieldline_testkit::secure::TestCa::new();
    let app = spawn_over_tls(&ca, &ca).await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    batches_in_jetstream(&app, 1, "telemetry through the TLS login").await;
    app.shutdown().await;

    // Another CA: the broker's certificate is refused and ingest-mqtt never becomes ready.
    let stranger = fieldline_testkit::secure::TestCa::new();
    let app = spawn_over_tls(&ca, &stranger).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = app
        .http
        .get(format!("{}/health/ready", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        503,
        "connected to a broker it should not trust"
    );
    app.shutdown().await;
}

/// An account made under older rules (its description says so) is made today's by the next
/// repair: here its role lost the right to publish telemetry, as under a rule since added.
#[tokio::test]
async fn an_account_under_older_rules_is_brought_to_todays() {
    let app = spawn_mqtt(TestEnv::new().await, |config| fieldline_common::Config {
        mqtt_reconcile_interval: Duration::from_secs(3600),
        ..config
    })
    .await;
    let token = app.create_device("d1").await;
    wait_ready(&app).await;
    let user = username(&app, "d1");
    let (admin, password) = app.env.broker().admin_login();
    let older = serde_json::json!({"commands": [
        {"command": "removeRoleACL", "rolename": user, "acltype": "publishClientSend",
         "topic": format!("{user}/telemetry")},
        {"command": "modifyClient", "username": user, "textdescription": "0000 rules-1"},
    ]});
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port(&app).to_string()])
        .args(["-u", &admin, "-P", &password, "-q", "1"])
        .args([
            "-t",
            "$CONTROL/dynamic-security/v1",
            "-m",
            &older.to_string(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // Under the older rules its telemetry goes nowhere.
    let device = Device::connect(&app, "d1", &token).await;
    device
        .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 1, "a": 1}"#)
        .await;
    eventually("the publish answered", Duration::from_secs(5), || async {
        (device.pubacks() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.telemetry_batches().await.is_empty());
    device.close().await;

    // A reconnect of the registry to the broker repairs it.
    app.env.broker().restart().await;
    wait_ready(&app).await;
    eventually(
        "telemetry under today's rules",
        Duration::from_secs(20),
        || async {
            let device = Device::connect(&app, "d1", &token).await;
            device
                .publish(&topic(&app, "d1", "telemetry"), r#"{"ts": 2, "a": 2}"#)
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            device.close().await;
            (!app.telemetry_batches().await.is_empty()).then_some(())
        },
    )
    .await;
    app.shutdown().await;
}
