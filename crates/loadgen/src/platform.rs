//! The platform under test: the real `fieldline` binary, one process per service, on its own
//! database, bus prefix and topic root, so a bench never touches anyone's data.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use fieldline_testkit::servers::PrivateMosquitto;
use serde_json::{Value, json};

pub const SERVICES: [&str; 5] = [
    "device-registry",
    "query-api",
    "webhook-dispatcher",
    "ingest-http",
    "ingest-mqtt",
];

/// Where the servers are. The bench runs its own brokers, configured as Fieldline's
/// (`deploy/mosquitto/mosquitto.conf`), so it needs no account on this machine's.
#[derive(Debug, Clone)]
pub struct Servers {
    /// Without a database name: `postgres://postgres@127.0.0.1:5432`.
    pub pg_url: String,
    pub nats_url: String,
    /// The platform's broker: Dynamic Security on, anonymous clients refused.
    pub broker: Arc<PrivateMosquitto>,
    /// The same broker settings without access checks, for the raw limit without them.
    pub open_broker: Arc<PrivateMosquitto>,
    /// An account of `broker` that may publish and subscribe anywhere (the raw limits').
    raw_login: (String, String),
    /// The NATS server's process, when it is the bench's own (its CPU is then measured).
    pub nats_pid: Option<u32>,
}

/// Which broker a raw client goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// The platform's, with access checks.
    Checked,
    /// Without them.
    Open,
}

impl Servers {
    pub async fn start(pg_url: String, nats_url: String) -> Self {
        let broker = Arc::new(PrivateMosquitto::start().await);
        let raw_login = broker.unrestricted_login();
        Self {
            pg_url,
            nats_url,
            broker,
            open_broker: Arc::new(PrivateMosquitto::start_open().await),
            raw_login,
            nats_pid: None,
        }
    }

    /// The same servers with another PostgreSQL (`postgres://user@host:port`).
    pub fn with_pg_url(&self, pg_url: String) -> Self {
        Self {
            pg_url,
            ..self.clone()
        }
    }

    /// A client of NATS: `nats_url` may name several servers of a cluster, comma-separated.
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        let servers = self
            .nats_url
            .split(',')
            .map(|url| url.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("NATS URL {}", self.nats_url))?;
        Ok(async_nats::ConnectOptions::new().connect(servers).await?)
    }

    /// A raw MQTT client of `broker`, with up to `inflight` QoS 1 messages of its own
    /// unacknowledged, and its event loop.
    pub fn mqtt_client(
        &self,
        broker: Broker,
        client_id: String,
        inflight: u16,
        capacity: usize,
    ) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        match broker {
            Broker::Checked => {
                let (user, password) = &self.raw_login;
                self.client_of(
                    self.broker.port,
                    Some((user, password)),
                    client_id,
                    inflight,
                    capacity,
                )
            }
            Broker::Open => {
                self.client_of(self.open_broker.port, None, client_id, inflight, capacity)
            }
        }
    }

    /// A device's client: its account and token on the platform's broker.
    pub fn device_client(
        &self,
        open_broker: bool,
        client_id: String,
        username: &str,
        token: &str,
        inflight: u16,
        capacity: usize,
    ) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        if open_broker {
            return self.client_of(self.open_broker.port, None, client_id, inflight, capacity);
        }
        // On the platform's broker a device connects with its user name as client id.
        let client_id = username.to_owned();
        self.client_of(
            self.broker.port,
            Some((username, token)),
            client_id,
            inflight,
            capacity,
        )
    }

    fn client_of(
        &self,
        port: u16,
        login: Option<(&str, &str)>,
        client_id: String,
        inflight: u16,
        capacity: usize,
    ) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_keep_alive(std::time::Duration::from_secs(30))
            .set_inflight(inflight);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        rumqttc::AsyncClient::new(options, capacity)
    }
}

pub struct Platform {
    pub id: String,
    pub database: String,
    pub admin_key: String,
    /// Device tokens derive from it (`FIELDLINE_DEVICE_TOKEN_KEY`).
    token_key: String,
    /// On the broker without access checks: no device accounts, devices anonymous (what
    /// Fieldline ran on before device identity, to measure what the checks cost).
    pub open_broker: bool,
    pub servers: Servers,
    pub http: reqwest::Client,
    /// The port `url(service)` answers on: the first instance's, or a survivor's.
    ports: BTreeMap<&'static str, u16>,
    instances: Vec<Instance>,
    /// What a restarted or added instance is started with.
    binary: String,
    /// Where the processes' logs go (the terminal when unset).
    log: Option<PathBuf>,
    extra_env: Vec<(String, String)>,
}

/// One process of the platform.
struct Instance {
    service: &'static str,
    port: u16,
    child: Child,
}

/// Below the kernel's ephemeral range, so that no outbound connection of this machine can
/// take it between this check and the server's own bind (`bind(:0)` could hand out a port a
/// client of PostgreSQL or NATS is then given, and the service fails to start).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(fieldline_testkit::servers::free_port())
}

pub async fn pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

impl Platform {
    /// Creates the database and starts every service as its own process, on the broker
    /// without access checks when `open_broker`.
    pub async fn start_on(
        binary: &str,
        servers: Servers,
        extra_env: &[(&str, &str)],
        open_broker: bool,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, servers, extra_env, open_broker, None).await
    }

    /// Every service on the checked broker, their logs appended to `log` (the fault suite's
    /// kills make more log than a terminal wants).
    pub async fn start_logged(
        binary: &str,
        servers: Servers,
        extra_env: &[(&str, &str)],
        log: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, servers, extra_env, false, log).await
    }

    async fn start_with(
        binary: &str,
        servers: Servers,
        extra_env: &[(&str, &str)],
        open_broker: bool,
        log: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let suffix: String = (0..8)
            .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
            .collect();
        let id = format!("b{suffix}");
        let database = format!("fl_bench_{suffix}");
        pg(&format!("{}/postgres", servers.pg_url))
            .await?
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await?;
        let admin_key = format!("flk_bench_admin_{suffix}_0000");
        let mut platform = Self {
            id,
            database,
            admin_key,
            token_key: format!("bench-device-token-key-{suffix}-0123456789"),
            open_broker,
            servers,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(30))
                .build()?,
            ports: BTreeMap::new(),
            instances: Vec::new(),
            binary: binary.to_owned(),
            log,
            extra_env: extra_env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        };
        for service in SERVICES {
            let port = free_port()?;
            let child = platform.spawn(service, port)?;
            platform.ports.insert(service, port);
            platform.instances.push(Instance {
                service,
                port,
                child,
            });
            // The registry first: the others ask it about keys as soon as they serve.
            if service == "device-registry" {
                platform.wait_ready(service).await?;
            }
        }
        for service in SERVICES {
            platform.wait_ready(service).await?;
        }
        Ok(platform)
    }

    fn spawn(&self, service: &str, port: u16) -> anyhow::Result<Child> {
        let binary = &self.binary;
        let mut command = Command::new(binary);
        // The load generator's own settings are not the platform's: its configuration
        // refuses FIELDLINE_ variables it does not know.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FIELDLINE_BENCH_") {
                command.env_remove(key);
            }
        }
        command
            .args(["serve", "--services", service])
            .env("FIELDLINE_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "FIELDLINE_DATABASE_URL",
                format!("{}/{}", self.servers.pg_url, self.database),
            )
            .env("FIELDLINE_NATS_URL", &self.servers.nats_url)
            .env("FIELDLINE_DEVICE_TOKEN_KEY", &self.token_key)
            .env("FIELDLINE_BUS_PREFIX", &self.id)
            .env("FIELDLINE_MQTT_TOPIC_ROOT", &self.id)
            .env("FIELDLINE_BOOTSTRAP_ADMIN_KEY", &self.admin_key)
            .env("FIELDLINE_LOG_LEVEL", "warn")
            .env("FIELDLINE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if self.open_broker {
            command.env(
                "FIELDLINE_MQTT_URL",
                format!("mqtt://127.0.0.1:{}", self.servers.open_broker.port),
            );
        } else {
            // An ingest-mqtt account of this platform's own: the platforms of one bench
            // share the broker, one after the other.
            let ingest_url = self
                .servers
                .broker
                .login_url(&format!("{}-ingest", self.id), &self.token_key);
            command
                .env("FIELDLINE_MQTT_URL", ingest_url)
                .env("FIELDLINE_MQTT_ADMIN_URL", self.servers.broker.admin_url());
        }
        // `{database}` in a setting is this platform's database (a replica's URL names it).
        for (key, value) in &self.extra_env {
            command.env(key, value.replace("{database}", &self.database));
        }
        if let Some(log) = &self.log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("opening {}", log.display()))?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        command
            .spawn()
            .with_context(|| format!("starting {binary} (build it with `cargo build --release`)"))
    }

    pub async fn wait_ready(&self, service: &str) -> anyhow::Result<()> {
        self.wait_ready_on(service, self.ports[service]).await
    }

    async fn wait_ready_on(&self, service: &str, port: u16) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{port}/health/ready");
        for _ in 0..600 {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(exited) = self.exited() {
                bail!("{exited} exited before {service} was ready (its log is above)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{service} did not become ready")
    }

    pub fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[service])
    }

    /// The base URL of every process of `service`, the first first.
    pub fn urls(&self, service: &str) -> Vec<String> {
        self.instances
            .iter()
            .filter(|instance| instance.service == service)
            .map(|instance| format!("http://127.0.0.1:{}", instance.port))
            .collect()
    }

    /// Starts one more process of `service` (beside the first, on a port of its own) and
    /// waits until it is ready.
    pub async fn add_instance(&mut self, service: &'static str) -> anyhow::Result<()> {
        let port = free_port()?;
        let child = self.spawn(service, port)?;
        self.instances.push(Instance {
            service,
            port,
            child,
        });
        self.wait_ready_on(service, port).await
    }

    /// Kills the oldest process of `service` with SIGKILL. `url(service)` moves to a surviving
    /// instance if there is one.
    pub fn kill(&mut self, service: &str) -> anyhow::Result<()> {
        let index = self
            .instances
            .iter()
            .position(|instance| instance.service == service)
            .with_context(|| format!("no {service} process to kill"))?;
        let mut instance = self.instances.remove(index);
        instance.child.kill()?;
        instance.child.wait()?;
        if let Some(survivor) = self.instances.iter().find(|i| i.service == service) {
            self.ports.insert(survivor.service, survivor.port);
        }
        Ok(())
    }

    /// Starts a new process of `service` on its port (after [`Platform::kill`]) without
    /// waiting for it.
    pub fn restart(&mut self, service: &'static str) -> anyhow::Result<()> {
        let port = self.ports[service];
        let child = self.spawn(service, port)?;
        self.instances.push(Instance {
            service,
            port,
            child,
        });
        Ok(())
    }

    /// Each process with its name: the service, `service#2` for a second instance.
    fn named_processes(&self) -> Vec<(String, u32)> {
        let mut seen = BTreeMap::<&str, usize>::new();
        self.instances
            .iter()
            .map(|instance| {
                let count = seen.entry(instance.service).or_default();
                *count += 1;
                let name = if *count == 1 {
                    instance.service.to_owned()
                } else {
                    format!("{}#{count}", instance.service)
                };
                (name, instance.child.id())
            })
            .collect()
    }

    /// Stops (`SIGSTOP`) every process of the platform but `keep`'s, or continues them
    /// (`SIGCONT`): a stopped consumer reads nothing, as if it ran on another machine, and
    /// its stream keeps what it missed until it is continued.
    pub fn signal_all_but(&self, keep: &str, pause: bool) -> anyhow::Result<()> {
        let signal = if pause { "-STOP" } else { "-CONT" };
        for instance in self.instances.iter().filter(|i| i.service != keep) {
            let status = Command::new("kill")
                .args([signal, &instance.child.id().to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "kill {signal} {}", instance.service);
        }
        Ok(())
    }

    /// CPU seconds (user and system) each service process has used so far, from /proc.
    pub fn cpu_seconds(&self) -> BTreeMap<String, f64> {
        self.named_processes()
            .into_iter()
            .filter_map(|(name, pid)| Some((name, crate::usage::cpu_seconds(pid)?)))
            .collect()
    }

    /// Resident and peak memory of each service process, in MiB (from /proc); a second
    /// instance of a service is `service#2`.
    pub fn memory(&self) -> BTreeMap<String, (f64, f64)> {
        self.named_processes()
            .into_iter()
            .filter_map(|(name, pid)| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let field = |name: &str| {
                    status
                        .lines()
                        .find(|line| line.starts_with(name))
                        .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
                        .map(|kib| kib / 1024.0)
                        .unwrap_or(0.0)
                };
                Some((name, (field("VmRSS:"), field("VmHWM:"))))
            })
            .collect()
    }

    pub async fn post(&self, service: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.url(service)))
            .bearer_auth(&self.admin_key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok(body)
    }

    /// Registers devices `{prefix}{0..count}`; returns their tokens.
    pub async fn create_devices(&self, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
        let mut tokens = Vec::with_capacity(count);
        for index in 0..count {
            let body = self
                .post(
                    "device-registry",
                    "/api/v1/devices",
                    &json!({"id": format!("{prefix}{index}")}),
                )
                .await?;
            tokens.push(
                body["data"]["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        Ok(tokens)
    }

    /// Waits until the query-api writer has stored everything published so far.
    ///
    /// Asked every 2 % of the wait so far (20 to 250 ms): a consumer's info makes nats-server
    /// 2.9 count what is pending under the writer's filter, which takes it tens of
    /// milliseconds when the writer is far behind on a stream of many subjects. Asked every
    /// 20 ms, those counts held the writer back: the catch-up after `http-single-alone` took
    /// 107 s instead of 10.
    pub async fn wait_durable(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut consumer = self.writer_consumer().await?;
        let waiting = tokio::time::Instant::now();
        let deadline = waiting + timeout;
        loop {
            let info = consumer.info().await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the writer did not catch up within {timeout:?}");
            }
            if let Some(service) = self.exited() {
                bail!("{service} exited while the writer was catching up (its log is above)");
            }
            let interval = (waiting.elapsed() / 50)
                .clamp(Duration::from_millis(20), Duration::from_millis(250));
            tokio::time::sleep(interval).await;
        }
    }

    /// A process of the platform that has exited on its own (it is not reaped until the
    /// platform stops, so its state is `Z`). Killed ones are no longer among the instances.
    pub fn exited(&self) -> Option<&'static str> {
        self.instances.iter().find_map(|instance| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", instance.child.id()));
            // The state follows the command name in parentheses.
            let state = stat.ok()?.rsplit_once(") ")?.1.chars().next()?;
            (state == 'Z').then_some(instance.service)
        })
    }

    /// Whether the query-api writer has nothing waiting and nothing unacknowledged.
    pub async fn writer_idle(&self) -> anyhow::Result<bool> {
        let mut consumer = self.writer_consumer().await?;
        let info = consumer.info().await?;
        Ok(info.num_pending == 0 && info.num_ack_pending == 0)
    }

    async fn writer_consumer(
        &self,
    ) -> anyhow::Result<
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    > {
        let jetstream = async_nats::jetstream::new(self.servers.nats().await?);
        let subjects = fieldline_proto::Subjects::new(&self.id)?;
        jetstream
            .get_stream(subjects.stream_name(fieldline_proto::Stream::Telemetry))
            .await?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                fieldline_proto::consumers::QUERY_WRITER,
            )
            .await
            .map_err(|error| anyhow::anyhow!("query-writer consumer: {error}"))
    }

    /// Stops every process (SIGTERM), drops the database and the streams.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for instance in &self.instances {
            let _ = Command::new("kill")
                .args(["-TERM", &instance.child.id().to_string()])
                .status();
        }
        for instance in &mut self.instances {
            let _ = instance.child.wait();
        }
        self.instances.clear();
        let jetstream = async_nats::jetstream::new(self.servers.nats().await?);
        let subjects = fieldline_proto::Subjects::new(&self.id)?;
        for stream in fieldline_proto::Stream::ALL {
            let _ = jetstream.delete_stream(subjects.stream_name(stream)).await;
        }
        let _ = jetstream
            .delete_key_value(subjects.mqtt_slots_bucket())
            .await;
        pg(&format!("{}/postgres", self.servers.pg_url))
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await?;
        Ok(())
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for instance in &mut self.instances {
            let _ = instance.child.kill();
            let _ = instance.child.wait();
        }
    }
}
