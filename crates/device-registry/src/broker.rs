//! Device identity on the MQTT broker, through Mosquitto's Dynamic Security plugin.
//!
//! Every device is a broker account `{root}/{project}/{device}` whose password is its device
//! token, with a role of its own that lets it publish only its telemetry, heartbeats and
//! command acks, and subscribe only to its config and commands. ingest-mqtt's account (the
//! login of `mqtt_url`) may join the ingest share group and publish config and commands;
//! nobody else may. The registry changes an account as soon as the device is created, has its
//! token rotated or is deleted (the broker cuts a changed or deleted account's live session),
//! and repairs every difference on each (re)connect to the broker and every
//! `mqtt_reconcile_interval`: a broker that starts empty is given every account again, since
//! each token can be derived from its seed (see `domain::tokens`).
//!
//! Commands go to `$CONTROL/dynamic-security/v1` as JSON; answers come back on
//! `…/v1/response`, matched by `correlationData`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fieldline_common::{Context, mqtt::BrokerLogin};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{domain::tokens::DeviceTokens, repo::Repo};

const COMMAND_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// How long the broker has to answer one message of commands.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Devices read, and accounts listed, per page.
const BATCH: usize = 200;
/// The largest control message sent: a page's commands go out in several of these.
const MAX_COMMAND_BYTES: usize = 64 << 10;
/// How long a create, rotation or deletion waits for the broker before it answers; the
/// change goes on in the background, and the repair loop catches a failure.
const REQUEST_WAIT: Duration = Duration::from_secs(3);
/// The largest answer taken from the broker: a page of accounts is far smaller.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The version of a device account's rules (its role's ACLs and its client id binding),
/// kept beside its password's fingerprint: an account made by an older Fieldline is brought
/// to today's rules by the next repair.
const DEVICE_RULES: &str = "rules-2";

/// What the broker answered to one command.
#[derive(Debug)]
struct Answer {
    error: Option<String>,
    data: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker is not connected")]
    NotConnected,
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("the broker refused {command}: {error}")]
    Refused { command: String, error: String },
}

/// The registry's handle on the broker's accounts; does nothing when `mqtt_admin_url` is
/// unset.
#[derive(Clone)]
pub struct BrokerAccounts {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: AsyncClient,
    connected: AtomicBool,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    tokens: DeviceTokens,
    root: String,
    share_group: String,
    /// ingest-mqtt's account: the user and password of `mqtt_url`, when it has them.
    ingest: Option<(String, SecretString)>,
    repo: Repo,
    /// Asks the repair loop for a full comparison now.
    repair: Notify,
    /// Held by a change (create, rotation, deletion) and by the repair of one page of devices
    /// from reading them to the broker's answer: a rotation cannot land between a page's read
    /// and its repair, which would set the old password again.
    changes: tokio::sync::Mutex<()>,
}

impl BrokerAccounts {
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Connects to the broker as its Dynamic Security admin and starts the repair loop; the
    /// connection is made (and remade) in the background.
    pub fn start(context: &Context, repo: Repo) -> anyhow::Result<Self> {
        let config = &context.config;
        let Some(login) = config.mqtt_admin_login() else {
            tracing::warn!(
                "FIELDLINE_MQTT_ADMIN_URL is unset: the registry manages no broker accounts, so the broker must authenticate devices by other means"
            );
            return Ok(Self::disabled());
        };
        let client_id = format!("{}-registry-{}", config.bus_prefix, random_suffix());
        let mut options = login.options(
            client_id,
            config.mqtt_ca_file.as_deref().map(std::path::Path::new),
        )?;
        options
            .set_clean_session(true)
            .set_max_packet_size(MAX_ANSWER_BYTES, MAX_COMMAND_BYTES * 2);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let ingest_login = config.mqtt_login();
        let ingest = match (&ingest_login.username, ingest_login.password()) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            _ => None,
        };
        let inner = Arc::new(Inner {
            client,
            connected: AtomicBool::new(false),
            waiting: Mutex::default(),
            tokens: DeviceTokens::new(config.device_token_key.clone()),
            root: config.mqtt_topic_root.clone(),
            share_group: config.mqtt_share_group.clone(),
            ingest,
            repo,
            repair: Notify::new(),
            changes: tokio::sync::Mutex::new(()),
        });
        context.tasks.spawn(poll_broker(
            inner.clone(),
            eventloop,
            login,
            context.shutdown.clone(),
        ));
        context.tasks.spawn(repair_loop(
            inner.clone(),
            config.mqtt_reconcile_interval,
            context.shutdown.clone(),
        ));
        Ok(Self { inner: Some(inner) })
    }

    /// The broker account name of a device.
    pub fn username(root: &str, project: &str, device_id: &str) -> String {
        format!("{root}/{project}/{device_id}")
    }

    /// Gives the device an account whose password is `token` (a new device, or a rotated
    /// token: the broker then cuts the session that used the old one). Waits for the broker
    /// at most [`REQUEST_WAIT`]; the change runs in a task of its own, so a caller that goes
    /// away (an HTTP client hanging up) does not cancel it. A failure is logged and left to
    /// the repair loop: the device exists, and gets its account once the broker is back.
    pub async fn put_device(&self, project: &str, device_id: &str, token: &str) {
        let Some(inner) = &self.inner else { return };
        let (inner, project, device_id, token) = (
            inner.clone(),
            project.to_owned(),
            device_id.to_owned(),
            token.to_owned(),
        );
        Self::in_background(tokio::spawn(async move {
            let _change = inner.changes.lock().await;
            if let Err(error) = inner.put_device(&project, &device_id, &token).await {
                tracing::warn!(error = %error, project, device_id, "broker account not updated; repairing later");
                inner.repair.notify_one();
            }
        }))
        .await;
    }

    /// Removes the device's account (the broker cuts its session at once), as
    /// [`BrokerAccounts::put_device`] does its change.
    pub async fn remove_device(&self, project: &str, device_id: &str) {
        let Some(inner) = &self.inner else { return };
        let inner = inner.clone();
        let username = Self::username(&inner.root, project, device_id);
        Self::in_background(tokio::spawn(async move {
            let _change = inner.changes.lock().await;
            if let Err(error) = inner.remove_accounts(std::slice::from_ref(&username)).await {
                tracing::warn!(error = %error, username, "broker account not removed; repairing later");
                inner.repair.notify_one();
            }
        }))
        .await;
    }

    async fn in_background(change: tokio::task::JoinHandle<()>) {
        if tokio::time::timeout(REQUEST_WAIT, change).await.is_err() {
            tracing::info!("the broker has not answered yet; the change goes on in the background");
        }
    }
}

fn random_suffix() -> String {
    fieldline_common::ids::random_id("", 8)
}

/// Keeps the admin connection and its subscription to the answers; every new connection asks
/// for a repair, since the broker may have restarted without its state.
async fn poll_broker(
    inner: Arc<Inner>,
    mut eventloop: EventLoop,
    login: BrokerLogin,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(error) = inner.client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
                    tracing::warn!(error = %error, "could not subscribe to the broker's answers");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::error!(
                    "the broker refused the answers' topic to the admin account: it needs the Dynamic Security admin role"
                );
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                failures = 0;
                inner.connected.store(true, Ordering::Relaxed);
                metrics::gauge!("fieldline_mqtt_admin_connected").set(1.0);
                tracing::info!(host = %login.host, port = login.port, "connected to the broker's account control");
                inner.repair.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == RESPONSE_TOPIC => {
                inner.take_answers(&publish.payload);
            }
            Ok(_) => {}
            Err(error) => {
                inner.connected.store(false, Ordering::Relaxed);
                metrics::gauge!("fieldline_mqtt_admin_connected").set(0.0);
                // Once per outage, then every 60th retry: a broker down for hours is one line
                // a minute, not one a second.
                if failures.is_multiple_of(60) {
                    tracing::warn!(error = %error, host = %login.host, port = login.port, "broker account control not connected; retrying");
                }
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Compares the broker's accounts with the registry on request and every `interval`.
async fn repair_loop(inner: Arc<Inner>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = inner.repair.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        if !inner.connected.load(Ordering::Relaxed) {
            continue;
        }
        match inner.reconcile().await {
            Ok(repairs) => {
                if repairs.total() > 0 {
                    tracing::info!(
                        created = repairs.created,
                        updated = repairs.updated,
                        removed = repairs.removed,
                        not_derivable = repairs.not_derivable,
                        "broker accounts repaired"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "broker accounts not compared; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                inner.repair.notify_one();
            }
        }
    }
}

/// What one comparison changed.
#[derive(Debug, Default)]
struct Repairs {
    created: usize,
    updated: usize,
    removed: usize,
    /// Devices whose token was made without a key: they have no broker account until rotated.
    not_derivable: usize,
}

impl Repairs {
    fn total(&self) -> usize {
        self.created + self.updated + self.removed
    }
}

/// One account as the broker lists it.
struct Listed {
    fingerprint: Option<String>,
    clientid: Option<String>,
}

impl Inner {
    /// Sends `commands` in one control message and waits for every answer, in order.
    async fn run(&self, mut commands: Vec<Value>) -> Result<Vec<Answer>, BrokerError> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err(BrokerError::NotConnected);
        }
        let mut receivers = Vec::with_capacity(commands.len());
        let mut ids = Vec::with_capacity(commands.len());
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            for command in &mut commands {
                let id = random_suffix() + &random_suffix();
                let (tx, rx) = oneshot::channel();
                waiting.insert(id.clone(), tx);
                command["correlationData"] = Value::String(id.clone());
                receivers.push(rx);
                ids.push(id);
            }
        }
        let payload = json!({ "commands": commands }).to_string();
        let answers = async {
            self.client
                .publish(COMMAND_TOPIC, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|_| BrokerError::NotConnected)?;
            let mut answers = Vec::with_capacity(receivers.len());
            for receiver in receivers {
                answers.push(receiver.await.map_err(|_| BrokerError::NotConnected)?);
            }
            Ok(answers)
        };
        let result = tokio::time::timeout(ANSWER_TIMEOUT, answers)
            .await
            .unwrap_or(Err(BrokerError::Timeout));
        if result.is_err() {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            for id in &ids {
                waiting.remove(id);
            }
        }
        result
    }

    /// Runs `commands` and fails on the first refusal that `tolerated` does not accept.
    async fn run_checked(
        &self,
        commands: Vec<Value>,
        tolerated: impl Fn(&str) -> bool,
    ) -> Result<Vec<Answer>, BrokerError> {
        let names: Vec<String> = commands
            .iter()
            .map(|command| command["command"].as_str().unwrap_or_default().to_owned())
            .collect();
        let answers = self.run(commands).await?;
        for (answer, command) in answers.iter().zip(names) {
            if let Some(error) = &answer.error
                && !tolerated(error)
            {
                return Err(BrokerError::Refused {
                    command,
                    error: error.clone(),
                });
            }
        }
        Ok(answers)
    }

    fn take_answers(&self, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let Some(responses) = message["responses"].as_array() else {
            return;
        };
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for response in responses {
            let Some(id) = response["correlationData"].as_str() else {
                continue;
            };
            if let Some(sender) = waiting.remove(id) {
                let _ = sender.send(Answer {
                    error: response["error"].as_str().map(str::to_owned),
                    data: response["data"].clone(),
                });
            }
        }
    }

    fn device_role_acls(&self, username: &str) -> Value {
        // The username is the device's topic prefix.
        json!([
            {"acltype": "publishClientSend", "topic": format!("{username}/telemetry"), "allow": true},
            {"acltype": "publishClientSend", "topic": format!("{username}/heartbeat"), "allow": true},
            {"acltype": "publishClientSend", "topic": format!("{username}/commands/ack"), "allow": true},
            {"acltype": "subscribeLiteral", "topic": format!("{username}/config"), "allow": true},
            {"acltype": "subscribeLiteral", "topic": format!("{username}/commands"), "allow": true},
            {"acltype": "publishClientReceive", "topic": format!("{username}/config"), "allow": true},
            {"acltype": "publishClientReceive", "topic": format!("{username}/commands"), "allow": true},
        ])
    }

    /// The commands that create a device's role and account.
    fn create_device_commands(&self, username: &str, token: &str) -> Vec<Value> {
        vec![
            json!({
                "command": "createRole",
                "rolename": username,
                "textname": "fieldline device",
                "acls": self.device_role_acls(username),
            }),
            json!({
                "command": "createClient",
                "username": username,
                // The account connects with this client id only: no device can take over
                // another's session (or ingest-mqtt's) by connecting with its client id.
                "clientid": username,
                "password": token,
                "textname": "fieldline device",
                "textdescription": self.device_description(token),
                "roles": [{"rolename": username}],
            }),
        ]
    }

    /// What a device account carries in its description: its password's fingerprint and the
    /// version of its rules.
    fn device_description(&self, token: &str) -> Option<String> {
        self.tokens
            .fingerprint(token)
            .map(|fingerprint| format!("{fingerprint} {DEVICE_RULES}"))
    }

    /// The commands that make an existing device account today's: its role's rules made
    /// again (the role is dropped and created, then given back to the account), its client
    /// id, its password (which cuts its session).
    fn renew_device_commands(&self, username: &str, token: &str) -> Vec<Value> {
        let mut commands = vec![
            json!({"command": "deleteRole", "rolename": username}),
            json!({
                "command": "createRole",
                "rolename": username,
                "textname": "fieldline device",
                "acls": self.device_role_acls(username),
            }),
            json!({"command": "addClientRole", "username": username, "rolename": username}),
        ];
        commands.extend(self.set_password_commands(username, token));
        commands
    }

    /// The commands that give an existing device account a new password (cutting its
    /// session), and its client id.
    fn set_password_commands(&self, username: &str, token: &str) -> Vec<Value> {
        let mut commands = self.set_service_password_commands(username, token);
        commands[1]["clientid"] = json!(username);
        commands[1]["textdescription"] = json!(self.device_description(token));
        commands
    }

    /// The commands that give ingest-mqtt's account a new password: it connects with several
    /// client ids, so none is bound to it.
    fn set_service_password_commands(&self, username: &str, password: &str) -> Vec<Value> {
        vec![
            json!({"command": "setClientPassword", "username": username, "password": password}),
            json!({
                "command": "modifyClient",
                "username": username,
                "textdescription": self.tokens.fingerprint(password),
            }),
        ]
    }

    async fn put_device(
        &self,
        project: &str,
        device_id: &str,
        token: &str,
    ) -> Result<(), BrokerError> {
        let username = BrokerAccounts::username(&self.root, project, device_id);
        let answers = self
            .run_checked(
                self.create_device_commands(&username, token),
                already_exists,
            )
            .await?;
        // An account left from an earlier device of the same id, or a rotation: same role,
        // new password.
        if answers.get(1).is_some_and(|answer| answer.error.is_some()) {
            self.run_checked(self.set_password_commands(&username, token), |_| false)
                .await?;
        }
        Ok(())
    }

    async fn remove_accounts(&self, usernames: &[String]) -> Result<(), BrokerError> {
        let commands = usernames
            .iter()
            .flat_map(|username| {
                [
                    json!({"command": "deleteClient", "username": username}),
                    json!({"command": "deleteRole", "rolename": username}),
                ]
            })
            .collect();
        self.run_chunked(commands, not_found).await?;
        Ok(())
    }

    /// Fieldline's own part of the broker: what nobody may do by default, and the role and
    /// account of ingest-mqtt.
    async fn ensure_service_accounts(&self) -> Result<(), BrokerError> {
        let service_role = format!("{}/ingest", self.root);
        let acls = json!([
            {"acltype": "subscribePattern", "topic": format!("$share/{}/{}/+/+/#", self.share_group, self.root), "allow": true},
            {"acltype": "unsubscribePattern", "topic": format!("$share/{}/{}/+/+/#", self.share_group, self.root), "allow": true},
            {"acltype": "publishClientSend", "topic": format!("{}/+/+/config", self.root), "allow": true},
            {"acltype": "publishClientSend", "topic": format!("{}/+/+/commands", self.root), "allow": true},
            {"acltype": "publishClientReceive", "topic": format!("{}/#", self.root), "allow": true},
        ]);
        let mut commands = vec![
            json!({
                "command": "setDefaultACLAccess",
                "acls": [
                    {"acltype": "publishClientSend", "allow": false},
                    {"acltype": "publishClientReceive", "allow": false},
                    {"acltype": "subscribe", "allow": false},
                    {"acltype": "unsubscribe", "allow": true},
                ],
            }),
            json!({
                "command": "createRole",
                "rolename": service_role,
                "textname": "fieldline ingest-mqtt",
                "acls": acls,
            }),
            json!({"command": "getRole", "rolename": service_role}),
        ];
        if let Some((username, password)) = &self.ingest {
            commands.push(json!({
                "command": "createClient",
                "username": username,
                "password": password.expose_secret(),
                "textname": "fieldline ingest-mqtt",
                "textdescription": self.tokens.fingerprint(password.expose_secret()),
                "roles": [{"rolename": service_role}],
            }));
            commands.push(json!({"command": "getClient", "username": username}));
        }
        let answers = self.run_checked(commands, already_exists).await?;
        // A role made by an older Fieldline keeps exactly today's rules.
        let current = answers[2].data["role"]["acls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut fixes = Vec::new();
        for acl in current.iter() {
            if !acls
                .as_array()
                .is_some_and(|wanted| wanted.iter().any(|w| same_acl(w, acl)))
            {
                fixes.push(json!({"command": "removeRoleACL", "rolename": service_role, "acltype": acl["acltype"], "topic": acl["topic"]}));
            }
        }
        for wanted in acls.as_array().into_iter().flatten() {
            if !current.iter().any(|acl| same_acl(wanted, acl)) {
                let mut add = wanted.clone();
                add["command"] = json!("addRoleACL");
                add["rolename"] = json!(service_role);
                fixes.push(add);
            }
        }
        if let Some((username, password)) = &self.ingest {
            let client = &answers[4].data["client"];
            if client["textdescription"].as_str()
                != self.tokens.fingerprint(password.expose_secret()).as_deref()
            {
                fixes
                    .extend(self.set_service_password_commands(username, password.expose_secret()));
            }
            let has_role = client["roles"].as_array().is_some_and(|roles| {
                roles
                    .iter()
                    .any(|role| role["rolename"] == json!(service_role))
            });
            if !has_role {
                fixes.push(json!({"command": "addClientRole", "username": username, "rolename": service_role}));
            }
        }
        if !fixes.is_empty() {
            self.run_checked(fixes, |_| false).await?;
        }
        Ok(())
    }

    /// Device accounts the broker has under this root: `{root}/{project}/{device}`.
    async fn listed_device_accounts(&self) -> Result<HashMap<String, Listed>, BrokerError> {
        let prefix = format!("{}/", self.root);
        let mut listed = HashMap::new();
        let mut offset = 0usize;
        loop {
            let answers = self
                .run_checked(
                    vec![json!({"command": "listClients", "verbose": true, "count": BATCH, "offset": offset})],
                    |_| false,
                )
                .await?;
            let data = &answers[0].data;
            let clients = data["clients"].as_array().cloned().unwrap_or_default();
            for client in &clients {
                let Some(username) = client["username"].as_str() else {
                    continue;
                };
                let is_device = username
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| rest.split('/').count() == 2);
                if is_device {
                    listed.insert(
                        username.to_owned(),
                        Listed {
                            fingerprint: client["textdescription"].as_str().map(str::to_owned),
                            clientid: client["clientid"].as_str().map(str::to_owned),
                        },
                    );
                }
            }
            offset += clients.len();
            let total = data["totalCount"].as_u64().unwrap_or(0) as usize;
            if clients.is_empty() || offset >= total {
                return Ok(listed);
            }
        }
    }

    /// Runs `commands` in as many control messages as their size needs (a message stays
    /// under [`MAX_COMMAND_BYTES`]); answers in order.
    async fn run_chunked(
        &self,
        commands: Vec<Value>,
        tolerated: impl Fn(&str) -> bool + Copy,
    ) -> Result<Vec<Answer>, BrokerError> {
        let mut answers = Vec::with_capacity(commands.len());
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        for command in commands {
            let size = command.to_string().len() + 64;
            if !chunk.is_empty() && chunk_bytes + size > MAX_COMMAND_BYTES {
                answers.extend(
                    self.run_checked(std::mem::take(&mut chunk), tolerated)
                        .await?,
                );
                chunk_bytes = 0;
            }
            chunk_bytes += size;
            chunk.push(command);
        }
        if !chunk.is_empty() {
            answers.extend(self.run_checked(chunk, tolerated).await?);
        }
        Ok(answers)
    }

    /// Makes the broker's accounts what the registry says: service accounts first, then every
    /// device's (created, or given its current password and client id), then accounts of
    /// devices that no longer exist removed. The broker is listed before the devices are read,
    /// so a device created meanwhile is never taken for one that is gone; each page is
    /// repaired under [`Inner::changes`], so a rotation never lands between a page's read and
    /// its repair; accounts that look gone are checked against the database once more, under
    /// the same lock, before they are removed. A page the broker refuses is counted and the
    /// rest goes on; the pass then fails, and is tried again.
    async fn reconcile(&self) -> Result<Repairs, anyhow::Error> {
        self.ensure_service_accounts().await?;
        let mut listed = self.listed_device_accounts().await?;
        let mut repairs = Repairs::default();
        let mut failed_pages = 0usize;
        let mut after: Option<(String, String)> = None;
        loop {
            let _change = self.changes.lock().await;
            let page = self.repo.device_seeds(after.as_ref(), BATCH as i64).await?;
            let Some(last) = page.last() else { break };
            after = Some((last.project.clone(), last.device_id.clone()));
            let mut creates = Vec::new();
            let mut updates = Vec::new();
            for device in &page {
                let username =
                    BrokerAccounts::username(&self.root, &device.project, &device.device_id);
                let on_broker = listed.remove(&username);
                let Some(token) = device
                    .seed
                    .as_deref()
                    .and_then(|seed| self.tokens.derive(seed))
                else {
                    repairs.not_derivable += 1;
                    continue;
                };
                match on_broker {
                    None => creates.push((username, token)),
                    Some(account)
                        if account.fingerprint != self.device_description(&token)
                            || account.clientid.as_deref() != Some(username.as_str()) =>
                    {
                        updates.extend(self.renew_device_commands(&username, &token));
                        repairs.updated += 1;
                    }
                    Some(_) => {}
                }
            }
            if let Err(error) = self.repair_page(creates, updates, &mut repairs).await {
                tracing::warn!(error = %error, "broker accounts of one page of devices not repaired");
                failed_pages += 1;
            }
        }
        if !listed.is_empty() {
            let _change = self.changes.lock().await;
            let candidates: Vec<String> = listed.into_keys().collect();
            let still_there = self.repo.existing_devices(&self.root, &candidates).await?;
            let gone: Vec<String> = candidates
                .into_iter()
                .filter(|username| !still_there.contains(username))
                .collect();
            repairs.removed = gone.len();
            if let Err(error) = self.remove_accounts(&gone).await {
                tracing::warn!(error = %error, "broker accounts of deleted devices not removed");
                failed_pages += 1;
            }
        }
        for (action, count) in [
            ("created", repairs.created),
            ("updated", repairs.updated),
            ("removed", repairs.removed),
        ] {
            metrics::counter!("fieldline_mqtt_accounts_repaired_total", "action" => action)
                .increment(count as u64);
        }
        anyhow::ensure!(
            failed_pages == 0,
            "{failed_pages} pages of broker accounts not repaired"
        );
        Ok(repairs)
    }

    /// Creates the missing accounts of one page and updates the stale ones. An account that
    /// turns out to exist (the listing moved while accounts changed) is given its current
    /// password as well.
    async fn repair_page(
        &self,
        creates: Vec<(String, String)>,
        updates: Vec<Value>,
        repairs: &mut Repairs,
    ) -> Result<(), BrokerError> {
        let commands: Vec<Value> = creates
            .iter()
            .flat_map(|(username, token)| self.create_device_commands(username, token))
            .collect();
        let answers = self.run_chunked(commands, already_exists).await?;
        let mut follow_up = updates;
        for ((username, token), pair) in creates.iter().zip(answers.chunks(2)) {
            match pair.get(1).and_then(|answer| answer.error.as_deref()) {
                Some(_) => follow_up.extend(self.set_password_commands(username, token)),
                None => repairs.created += 1,
            }
        }
        if !follow_up.is_empty() {
            self.run_chunked(follow_up, not_found).await?;
        }
        Ok(())
    }
}

fn already_exists(error: &str) -> bool {
    error.ends_with("already exists")
}

fn not_found(error: &str) -> bool {
    error.ends_with("not found")
}

fn same_acl(a: &Value, b: &Value) -> bool {
    a["acltype"] == b["acltype"] && a["topic"] == b["topic"] && a["allow"] == b["allow"]
}
