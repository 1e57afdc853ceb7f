//! Private instances of the real servers, for tests that stop or restart one (NATS down,
//! broker restart) without disturbing the shared ones other tests use.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A free TCP port on loopback (free when this returns; the caller binds it at once).
/// A port free now for a server a test starts. It is taken below the kernel's ephemeral
/// range, so the outbound connections of the tests running beside it (clients of PostgreSQL,
/// NATS, HTTP) cannot take it in the time between this check and the server's own bind: a
/// port from `bind(:0)` could be given to one of them and the server then fails to start.
pub fn free_port() -> u16 {
    let lowest_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, lowest_ephemeral.max(11_000));
    for _ in 0..1_000 {
        let port = rand::random_range(low..high);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) async fn wait_for_port(port: u16, what: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not start on port {port}");
}

pub(crate) fn find_binary(name: &str, candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!("{name} is required for this test; run `make test` (it installs it)")
        })
}

/// A nats-server with JetStream on its own port and store directory.
pub struct PrivateNats {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    pub async fn start() -> Self {
        let port = free_port();
        let store = std::env::temp_dir().join(format!("fl-nats-{}", crate::unique_suffix()));
        let mut nats = Self {
            port,
            store,
            child: None,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs (for measuring its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server abruptly, keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        let binary = find_binary(
            "nats-server",
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
        );
        let child = Command::new(binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for_port(self.port, "nats-server").await;
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The Dynamic Security plugin of Debian's (and the eclipse-mosquitto image's) Mosquitto.
const DYNSEC_PLUGIN: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
];
/// The admin account `mosquitto_ctrl dynsec init` makes, as provisioning does.
pub const MQTT_ADMIN_USER: &str = "fieldline-admin";
/// ingest-mqtt's account, which the registry creates from `mqtt_url`.
pub const MQTT_INGEST_USER: &str = "fieldline-ingest";

/// A Mosquitto broker on its own port as Fieldline runs it: Dynamic Security on, anonymous
/// clients refused, persistence so a restart keeps sessions and accounts. Only the admin
/// account exists at first; the registry (given [`PrivateMosquitto::admin_url`]) creates the
/// rest.
pub struct PrivateMosquitto {
    pub port: u16,
    dir: PathBuf,
    admin_password: String,
    ingest_password: String,
    child: std::sync::Mutex<Option<Child>>,
}

impl std::fmt::Debug for PrivateMosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMosquitto")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PrivateMosquitto {
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// A broker without access checks (anonymous clients, no plugin): what Fieldline ran on
    /// before device identity, for measuring what the checks cost.
    pub async fn start_open() -> Self {
        Self::start_with(false).await
    }

    async fn start_with(secured: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fl-mqtt-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let access = if secured {
            let plugin = find_binary("the Mosquitto Dynamic Security plugin", DYNSEC_PLUGIN);
            format!(
                "allow_anonymous false\nplugin {}\nplugin_opt_config_file {}/dynamic-security.json\n",
                plugin.display(),
                dir.display()
            )
        } else {
            "allow_anonymous true\n".to_owned()
        };
        // `user root`: when tests run as root, the broker keeps root's access to its files
        // (it ignores the option otherwise). The persistence, queue and size settings are
        // deploy/mosquitto's (the packet limit is ingest-mqtt's default `mqtt_max_packet_bytes`):
        // a broker killed with SIGKILL comes back with its last autosave.
        let config = format!(
            "listener {port} 127.0.0.1\nuser root\n{access}\
             persistence true\npersistence_location {}/\nautosave_interval 30\n\
             max_queued_messages 1000000\nmax_inflight_messages 1000\n\
             max_packet_size {}\n",
            dir.display(),
            fieldline_common::Config::default().mqtt_max_packet_bytes,
        );
        std::fs::write(dir.join("mosquitto.conf"), config).unwrap();
        let broker = Self {
            port,
            dir,
            admin_password: format!("admin-{}", crate::unique_suffix()),
            ingest_password: format!("ingest-{}", crate::unique_suffix()),
            child: std::sync::Mutex::new(None),
        };
        if secured {
            broker.init_accounts();
        }
        broker.restart().await;
        broker
    }

    /// A fresh account file with only the admin, as `mosquitto_ctrl dynsec init` writes it.
    fn init_accounts(&self) {
        let file = self.dir.join("dynamic-security.json");
        let _ = std::fs::remove_file(&file);
        let ctrl = find_binary(
            "mosquitto_ctrl",
            &["/usr/bin/mosquitto_ctrl", "/usr/sbin/mosquitto_ctrl"],
        );
        let status = Command::new(ctrl)
            .args(["dynsec", "init"])
            .arg(&file)
            .args([MQTT_ADMIN_USER, &self.admin_password])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_ctrl dynsec init failed");
    }

    /// ingest-mqtt's login (`mqtt_url`).
    pub fn url(&self) -> String {
        format!(
            "mqtt://{MQTT_INGEST_USER}:{}@127.0.0.1:{}",
            self.ingest_password, self.port
        )
    }

    /// Another ingest-mqtt login (`mqtt_url`), for several platforms on one broker: the
    /// registry creates the account.
    pub fn login_url(&self, user: &str, password: &str) -> String {
        format!("mqtt://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The registry's login to the Dynamic Security plugin (`mqtt_admin_url`).
    pub fn admin_url(&self) -> String {
        format!(
            "mqtt://{MQTT_ADMIN_USER}:{}@127.0.0.1:{}",
            self.admin_password, self.port
        )
    }

    /// Stops the broker with SIGTERM (so it writes its persistence file) or SIGKILL.
    pub fn stop(&self) {
        let taken = self.child.lock().unwrap().take();
        if let Some(mut child) = taken {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker with SIGKILL: it saves nothing, so what it held in memory (sessions,
    /// queued messages) is gone unless an earlier save kept it.
    pub fn kill(&self) {
        let taken = self.child.lock().unwrap().take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&self) {
        self.stop();
        let binary = find_binary("mosquitto", &["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]);
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        wait_for_port(self.port, "mosquitto").await;
    }

    /// An account that may publish and subscribe anywhere, as on a broker whose access rules
    /// let everything through: for tests of ingest-mqtt's own checks behind the broker's.
    /// Returns its user and password.
    pub fn unrestricted_login(&self) -> (String, String) {
        let (user, password) = ("fieldline-test-unrestricted", "unrestricted-test-password");
        let ctrl = find_binary(
            "mosquitto_ctrl",
            &["/usr/bin/mosquitto_ctrl", "/usr/sbin/mosquitto_ctrl"],
        );
        let port = self.port.to_string();
        let steps: [&[&str]; 6] = [
            &["createRole", user],
            &["addRoleACL", user, "publishClientSend", "#", "allow"],
            &["addRoleACL", user, "publishClientReceive", "#", "allow"],
            &["addRoleACL", user, "subscribePattern", "#", "allow"],
            &["createClient", user, "-p", password],
            &["addClientRole", user, user],
        ];
        for step in steps {
            // "already exists" on a second call is fine; the login below proves the rest.
            let _ = Command::new(&ctrl)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-u",
                    MQTT_ADMIN_USER,
                    "-P",
                    &self.admin_password,
                    "dynsec",
                ])
                .args(step)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        (user.to_owned(), password.to_owned())
    }

    /// The admin's user and password (the Dynamic Security admin may subscribe anywhere).
    pub fn admin_login(&self) -> (String, String) {
        (MQTT_ADMIN_USER.to_owned(), self.admin_password.clone())
    }

    /// Adds a TLS listener with `certificate` (made for `127.0.0.1`/`localhost`) beside the
    /// plain one, and restarts the broker; returns its port. Accounts and access rules are
    /// the same on both listeners.
    pub async fn add_tls_listener(&self, certificate: &crate::secure::Issued) -> u16 {
        let port = free_port();
        let config_file = self.dir.join("mosquitto.conf");
        let mut config = std::fs::read_to_string(&config_file).unwrap();
        config.push_str(&format!(
            "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            certificate.cert_file.display(),
            certificate.key_file.display()
        ));
        std::fs::write(&config_file, config).unwrap();
        self.restart().await;
        wait_for_port(port, "mosquitto's TLS listener").await;
        port
    }

    /// ingest-mqtt's login over TLS on `tls_port` ([`PrivateMosquitto::add_tls_listener`]).
    pub fn tls_url(&self, tls_port: u16) -> String {
        format!(
            "mqtts://{MQTT_INGEST_USER}:{}@localhost:{tls_port}",
            self.ingest_password
        )
    }

    /// Restarts the broker with an account file that has only the admin in it, as a broker
    /// that lost its state (sessions and retained messages are kept).
    pub async fn restart_without_accounts(&self) {
        self.stop();
        self.init_accounts();
        self.restart().await;
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JetStream cluster of three nats-servers on loopback, as a production cluster is laid out:
/// each server with its own client port, route port and store, routes to the other two. A
/// node can be killed with SIGKILL and started again on its port and store.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// One server of a [`NatsCluster`].
pub struct ClusterNode {
    /// Its `server_name`, as JetStream names a stream's leader (`n1`, `n2`, `n3`).
    pub name: String,
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) {
        self.kill();
        let binary = find_binary(
            "nats-server",
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }
}

impl NatsCluster {
    /// Starts three servers and waits until the cluster has elected a meta leader and can
    /// place a stream of three replicas.
    pub async fn start() -> Self {
        Self::start_named("fieldline-test").await
    }

    /// The same, with the cluster's name (what `FIELDLINE_STREAM_PLACEMENT_CLUSTER` names).
    pub async fn start_named(cluster_name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fl-nats-cluster-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(index, (port, route))| {
                let name = format!("n{}", index + 1);
                let store = dir.join(&name);
                let config = dir.join(format!("{name}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
                         jetstream {{\n  store_dir: \"{}\"\n}}\n\
                         cluster {{\n  name: {cluster_name}\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                        store.display(),
                        routes.join(", ")
                    ),
                )
                .unwrap();
                ClusterNode {
                    log: dir.join(format!("{name}.log")),
                    name,
                    port: *port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { nodes, dir };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for node in &cluster.nodes {
            wait_for_port(node.port, "a nats-server of the cluster").await;
        }
        cluster.wait_for_replicas(3).await;
        cluster
    }

    /// Every server's URL, comma-separated: `FIELDLINE_NATS_URL` for the cluster.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(ClusterNode::url).collect();
        urls.join(",")
    }

    /// A client of the cluster (any server that is up).
    pub async fn client(&self) -> async_nats::Client {
        let addresses: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|node| node.url().parse().unwrap())
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addresses)
            .await
            .unwrap()
    }

    /// Waits (up to 60 s) until a meta leader is elected and JetStream can place a stream
    /// of `replicas` copies: a probe stream is made and deleted.
    pub async fn wait_for_replicas(&self, replicas: usize) {
        let jetstream = async_nats::jetstream::new(self.client().await);
        let name = format!("FL_CLUSTER_PROBE_{}", crate::unique_suffix().to_uppercase());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let made = jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{}.probe", name.to_lowercase())],
                    num_replicas: replicas,
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await;
            if made.is_ok() {
                let _ = jetstream.delete_stream(&name).await;
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the NATS cluster placed no stream of {replicas} replicas within 60 s: {made:?} (logs in {})",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The server that leads `stream` now (`cluster.leader` of `$JS.API.STREAM.INFO.<stream>`),
    /// or `None` while none does.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> Option<String> {
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()),
        )
        .await
        .ok()?
        .ok()?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        info["cluster"]["leader"].as_str().map(str::to_owned)
    }

    /// The peers of `stream` (leader and replicas) as `$JS.API.STREAM.INFO` reports them.
    pub async fn stream_peers(&self, client: &async_nats::Client, stream: &str) -> Vec<String> {
        let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()),
        )
        .await
        else {
            return Vec::new();
        };
        peers(&reply.payload)
    }

    /// The peers of durable `consumer` on `stream`.
    pub async fn consumer_peers(
        &self,
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
    ) -> Vec<String> {
        let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(
                format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
                "".into(),
            ),
        )
        .await
        else {
            return Vec::new();
        };
        peers(&reply.payload)
    }

    /// Waits (up to 30 s) until `stream` has a leader, and returns it.
    pub async fn wait_for_stream_leader(&self, stream: &str) -> String {
        let client = self.client().await;
        crate::eventually(
            &format!("a leader of {stream}"),
            Duration::from_secs(30),
            || self.stream_leader(&client, stream),
        )
        .await
    }

    /// The node named `name` (`n1`..`n3`).
    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no cluster node named {name}"))
    }

    /// SIGKILL to the server named `name`: no graceful anything; its store stays.
    pub fn kill(&mut self, name: &str) {
        self.node_mut(name).kill();
    }

    /// Starts a killed server again on its port and store.
    pub async fn restart(&mut self, name: &str) {
        let node = self.node_mut(name);
        node.spawn();
        let port = node.port;
        wait_for_port(port, "the restarted nats-server").await;
    }

    fn node_mut(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no cluster node named {name}"))
    }

    /// Where the servers' stores, configurations and logs are.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

/// `cluster.leader` and `cluster.replicas[].name` of a JetStream info answer.
fn peers(payload: &[u8]) -> Vec<String> {
    let Ok(info) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    let cluster = &info["cluster"];
    cluster["leader"]
        .as_str()
        .into_iter()
        .chain(
            cluster["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|peer| peer["name"].as_str()),
        )
        .map(str::to_owned)
        .collect()
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
