//! The real `fieldline` binary, started as one process or as one process per service, on the
//! real servers, with the test's own database, bus prefix and topic root.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fieldline_testkit::{TestEnv, eventually, servers::free_port};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const SERVICES: [&str; 5] = [
    "device-registry",
    "query-api",
    "webhook-dispatcher",
    "ingest-http",
    "ingest-mqtt",
];

pub struct Platform {
    pub env: TestEnv,
    pub http: reqwest::Client,
    /// Base URL of each service (all the same in one-process mode).
    base: HashMap<&'static str, String>,
    children: Vec<(String, Child)>,
    extra_env: Vec<(String, String)>,
}

fn spawn(env: &TestEnv, extra_env: &[(String, String)], services: &str, port: u16) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fieldline"));
    command
        .args(["serve", "--services", services])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FIELDLINE_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (key, value) in env.env_vars().into_iter().chain(extra_env.iter().cloned()) {
        command.env(key, value);
    }
    if std::env::var_os("FIELDLINE_TEST_LOG").is_none() {
        command.stderr(Stdio::null());
    }
    command.spawn().expect("the fieldline binary starts")
}

impl Platform {
    /// `fieldline serve --services all`.
    pub async fn one_process() -> Self {
        Self::one_process_with(&[]).await
    }

    /// One process, with extra `FIELDLINE_*` settings.
    pub async fn one_process_with(extra_env: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await.with_broker().await;
        let extra_env = owned(extra_env);
        let port = free_port();
        let child = spawn(&env, &extra_env, "all", port);
        let base_url = format!("http://127.0.0.1:{port}");
        let base = SERVICES
            .iter()
            .map(|service| (*service, base_url.clone()))
            .collect();
        Self::ready(env, base, vec![("all".into(), child)], extra_env).await
    }

    /// One process per service, each on its own port; requests go to the owner of the path
    /// as the gateway would route them.
    pub async fn split() -> Self {
        Self::split_with(&[]).await
    }

    /// Split, with extra `FIELDLINE_*` settings.
    pub async fn split_with(extra_env: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await.with_broker().await;
        let extra_env = owned(extra_env);
        let mut base = HashMap::new();
        let mut children = Vec::new();
        for service in SERVICES {
            let port = free_port();
            children.push((service.to_owned(), spawn(&env, &extra_env, service, port)));
            base.insert(service, format!("http://127.0.0.1:{port}"));
        }
        Self::ready(env, base, children, extra_env).await
    }

    async fn ready(
        env: TestEnv,
        base: HashMap<&'static str, String>,
        children: Vec<(String, Child)>,
        extra_env: Vec<(String, String)>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut platform = Self {
            env,
            http,
            base,
            children,
            extra_env,
        };
        for service in SERVICES {
            platform.wait_ready(service).await;
        }
        platform.assert_running();
        platform
    }

    /// Waits for `service` to answer ready. A process that exited meanwhile (its free port
    /// taken by a neighbour's process between the pick and the bind) is started again on
    /// another port.
    async fn wait_ready(&mut self, service: &'static str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut restarts = 0;
        loop {
            let url = format!("{}/health/ready", self.base[service]);
            if let Ok(response) = self.http.get(url).send().await
                && response.status().is_success()
            {
                return;
            }
            let extra_env = self.extra_env.clone();
            let env = &self.env;
            let owner = self
                .children
                .iter_mut()
                .find(|(name, _)| name == service || name == "all");
            if let Some((name, child)) = owner
                && child.try_wait().unwrap().is_some()
            {
                assert!(restarts < 3, "{name} exited early, {restarts} times");
                restarts += 1;
                let port = free_port();
                *child = spawn(env, &extra_env, name, port);
                let owned: Vec<&'static str> = if name == "all" {
                    SERVICES.to_vec()
                } else {
                    vec![service]
                };
                for owned in owned {
                    self.base.insert(owned, format!("http://127.0.0.1:{port}"));
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {service} ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to one service's process (split mode): no graceful anything.
    pub fn kill(&mut self, service: &str) {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(name, _)| name == service)
            .expect("a process of that service");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts another process of `service` named `name`, with its own port and extra
    /// settings, and waits until it is ready; [`Platform::kill`] and `stop` know it by `name`.
    pub async fn spawn_another(&mut self, service: &str, name: &str, extra_env: &[(&str, &str)]) {
        let port = free_port();
        let extra_env: Vec<(String, String)> = self
            .extra_env
            .iter()
            .cloned()
            .chain(owned(extra_env))
            .collect();
        let child = spawn(&self.env, &extra_env, service, port);
        self.children.push((name.to_owned(), child));
        let url = format!("http://127.0.0.1:{port}/health/ready");
        let http = self.http.clone();
        eventually(&format!("{name} ready"), Duration::from_secs(60), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.get(url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// SIGKILL to a process for good: it is not started again, nor stopped at the end.
    pub fn kill_for_good(&mut self, name: &str) {
        self.kill(name);
        self.children.retain(|(child, _)| child != name);
    }

    /// Starts a killed service again on its port and waits until it is ready.
    pub async fn restart(&mut self, service: &'static str) {
        let port: u16 = self.base[service]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let child = spawn(&self.env, &self.extra_env, service, port);
        let slot = self
            .children
            .iter_mut()
            .find(|(name, _)| name == service)
            .unwrap();
        slot.1 = child;
        let url = format!("{}/health/ready", self.base[service]);
        let http = self.http.clone();
        eventually(
            &format!("{service} ready again"),
            Duration::from_secs(60),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    http.get(url)
                        .send()
                        .await
                        .ok()?
                        .status()
                        .is_success()
                        .then_some(())
                }
            },
        )
        .await;
    }

    fn assert_running(&mut self) {
        for (name, child) in &mut self.children {
            assert!(child.try_wait().unwrap().is_none(), "{name} exited early");
        }
    }

    /// The service that owns a path, as deploy/gateway/nginx.conf routes it.
    pub fn owner(path: &str) -> &'static str {
        let path = path.split('?').next().unwrap_or_default();
        if path.starts_with("/api/v1/ingest") {
            "ingest-http"
        } else if path.starts_with("/api/v1/webhooks")
            || path.starts_with("/api/v1/deliveries")
            || path.starts_with("/api/webhooks")
            || path.starts_with("/api/v1/groups/")
            || (path.starts_with("/api/v1/devices/") && path.ends_with("/webhooks"))
        {
            "webhook-dispatcher"
        } else if (path.starts_with("/api/v1/devices/")
            && (path.contains("/readings") || path.ends_with("/metrics")))
            || path == "/api/v1/query"
            || path == "/api/v1/retention"
            || path.starts_with("/api/v1/events/")
            || path.starts_with("/api/v1/stats/")
        {
            "query-api"
        } else {
            "device-registry"
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base[Self::owner(path)])
    }

    /// Base URL of one service (for its /metrics and health).
    pub fn service_url(&self, service: &str) -> &str {
        &self.base[service]
    }

    /// One service's `/metrics`, as Prometheus scrapes it.
    pub async fn metrics(&self, service: &str) -> String {
        self.http
            .get(format!("{}/metrics", self.service_url(service)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        credential: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        // POST on a device's readings is a backfill (ingest-http); GET is history (query-api),
        // as deploy/gateway/nginx.conf routes them.
        let path_only = path.split('?').next().unwrap_or_default();
        let url = if method == Method::POST
            && path_only.starts_with("/api/v1/devices/")
            && path_only.ends_with("/readings")
        {
            format!("{}{path}", self.base["ingest-http"])
        } else {
            self.url(path)
        };
        let mut request = self.http.request(method, url).bearer_auth(credential);
        if let Some(body) = body {
            request = request.json(body);
        }
        fieldline_testkit::read(request.send().await.unwrap()).await
    }

    /// POSTs a raw body (CSV) to a device's readings: a backfill, owned by ingest-http.
    pub async fn post_readings_raw(
        &self,
        device: &str,
        credential: &str,
        content_type: &str,
        body: &'static str,
    ) -> (StatusCode, Value) {
        let url = format!(
            "{}/api/v1/devices/{device}/readings",
            self.base["ingest-http"]
        );
        let response = self
            .http
            .post(url)
            .bearer_auth(credential)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        fieldline_testkit::read(response).await
    }

    pub async fn get(&self, path: &str, credential: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, credential, None).await
    }

    pub async fn post(&self, path: &str, credential: &str, body: &Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, credential, Some(body))
            .await
    }

    pub fn admin_key(&self) -> &str {
        &self.env.admin_key
    }

    /// The broker the platform uses (`FIELDLINE_TEST_MQTT_URL`).
    pub fn mqtt_host_port(&self) -> (String, u16) {
        self.env.config().mqtt_host_port()
    }

    pub fn topic_root(&self) -> &str {
        &self.env.id
    }

    /// SIGTERM to every process; each must exit 0 within the shutdown timeout.
    pub async fn stop(mut self) {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in &mut self.children {
            let mut exited = None;
            for _ in 0..300 {
                if let Some(status) = child.try_wait().unwrap() {
                    exited = Some(status);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let status = exited.unwrap_or_else(|| panic!("{name} did not stop on SIGTERM"));
            assert!(status.success(), "{name} exited with {status}");
        }
        self.children.clear();
        self.env.cleanup().await;
    }
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

impl Drop for Platform {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
