//! Servers that demand credentials and TLS, for the tests of what crosses the wire: a CA made
//! for the test (rcgen), and a private nats-server with `authorization` and `tls` blocks.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::servers::{find_binary, free_port, wait_for_port};

/// A certificate authority of one test, its files in a directory of its own (removed on
/// drop).
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate, PEM: what clients trust.
    pub ca_file: PathBuf,
    certificate: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("fl-ca-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Fieldline test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certificate = params.self_signed(&key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, certificate.pem()).unwrap();
        Self {
            dir,
            ca_file,
            certificate,
            key,
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, name: &str) -> Issued {
        self.issue(
            name,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A server certificate for exactly `names` (host names or IP addresses).
    pub fn server_for(&self, name: &str, names: &[&str]) -> Issued {
        self.issue(name, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mutual TLS).
    pub fn client(&self, name: &str) -> Issued {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .unwrap();
        let issued = Issued {
            cert_file: self.dir.join(format!("{name}.pem")),
            key_file: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert_file, certificate.pem()).unwrap();
        std::fs::write(&issued.key_file, key.serialize_pem()).unwrap();
        issued
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a [`SecureNats`] demands of its clients.
#[derive(Clone, Debug, Default)]
pub struct NatsSecurity {
    /// One user and password (`authorization { user, password }`).
    pub user_password: Option<(String, String)>,
    /// A token (`authorization { token }`), instead of a user.
    pub token: Option<String>,
    /// TLS with a certificate of the test's CA (`tls { … }`); the server then refuses plain
    /// text.
    pub tls: bool,
    /// Clients must show a certificate of the CA too (`verify: true`).
    pub verify_clients: bool,
    /// JetStream's file storage limit (`max_file_store`), to run out of it on purpose.
    pub max_file_store: Option<u64>,
}

/// A nats-server with JetStream on its own port and store, that demands what `security`
/// says. Stopped and its files removed on drop.
pub struct SecureNats {
    pub port: u16,
    pub ca: TestCa,
    pub security: NatsSecurity,
    /// A client certificate of the CA, for mutual TLS.
    pub client: Issued,
    dir: PathBuf,
    child: Child,
}

impl SecureNats {
    pub async fn start(security: NatsSecurity) -> Self {
        let port = free_port();
        let ca = TestCa::new();
        let server = ca.server("nats-server");
        let client = ca.client("fieldline");
        let dir = std::env::temp_dir().join(format!("fl-nats-tls-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let max_file_store = security
            .max_file_store
            .map(|bytes| format!(", max_file_store: {bytes}"))
            .unwrap_or_default();
        let mut config = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?}{max_file_store} }}\n",
            dir.join("js")
        );
        if let Some((user, password)) = &security.user_password {
            config.push_str(&format!(
                "authorization {{ user: {user:?}, password: {password:?} }}\n"
            ));
        } else if let Some(token) = &security.token {
            config.push_str(&format!("authorization {{ token: {token:?} }}\n"));
        }
        if security.tls {
            config.push_str(&format!(
                "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {}, timeout: 5 }}\n",
                server.cert_file, server.key_file, ca.ca_file, security.verify_clients
            ));
        }
        let config_file = dir.join("nats.conf");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.join("nats.log")).unwrap();
        let binary = find_binary(
            "nats-server",
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
        );
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let nats = Self {
            port,
            ca,
            security,
            client,
            dir,
            child,
        };
        wait_for_port(port, "nats-server with auth and TLS").await;
        nats
    }

    /// `nats://127.0.0.1:{port}`, without credentials (TLS is negotiated, as the server
    /// requires it).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The `FIELDLINE_NATS_*` settings a platform process needs for this server: the URL, the
    /// credentials, the CA, and a client certificate when the server verifies clients.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![("FIELDLINE_NATS_URL".to_owned(), self.url())];
        if let Some((user, password)) = &self.security.user_password {
            vars.push(("FIELDLINE_NATS_USER".into(), user.clone()));
            vars.push(("FIELDLINE_NATS_PASSWORD".into(), password.clone()));
        }
        if let Some(token) = &self.security.token {
            vars.push(("FIELDLINE_NATS_TOKEN".into(), token.clone()));
        }
        if self.security.tls {
            vars.push((
                "FIELDLINE_NATS_CA_FILE".into(),
                self.ca.ca_file.display().to_string(),
            ));
        }
        if self.security.verify_clients {
            vars.push((
                "FIELDLINE_NATS_CLIENT_CERT_FILE".into(),
                self.client.cert_file.display().to_string(),
            ));
            vars.push((
                "FIELDLINE_NATS_CLIENT_KEY_FILE".into(),
                self.client.key_file.display().to_string(),
            ));
        }
        vars
    }

    /// The same settings on a [`fieldline_common::Config`].
    pub fn configure(&self, mut config: fieldline_common::Config) -> fieldline_common::Config {
        use secrecy::SecretString;
        config.nats_url = SecretString::from(self.url());
        if let Some((user, password)) = &self.security.user_password {
            config.nats_user = Some(user.clone());
            config.nats_password = Some(SecretString::from(password.clone()));
        }
        if let Some(token) = &self.security.token {
            config.nats_token = Some(SecretString::from(token.clone()));
        }
        if self.security.tls {
            config.nats_ca_file = Some(self.ca.ca_file.clone());
        }
        if self.security.verify_clients {
            config.nats_client_cert_file = Some(self.client.cert_file.clone());
            config.nats_client_key_file = Some(self.client.key_file.clone());
        }
        config
    }

    /// What the server logged (authorization and TLS errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL cluster of its own (initdb into a temporary directory, a random port). From
/// [`PrivatePostgres::start`]: a password for `postgres` (scram-sha-256 over TCP) and TLS with
/// a certificate of `ca` for `localhost` only, so `verify-full` to `127.0.0.1` is a name
/// mismatch and to `localhost` is not. From [`PrivatePostgres::start_plain`]: trust, no TLS, for
/// a harness that stops and restarts it. Stopped and removed on drop.
pub struct PrivatePostgres {
    pub port: u16,
    /// Empty on a plain cluster (trust).
    pub password: String,
    dir: PathBuf,
    /// `-c` settings beyond the port and socket (TLS files), kept for a restart.
    settings: Vec<String>,
    child: Option<Child>,
}

impl PrivatePostgres {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    pub async fn start(ca: &TestCa) -> Self {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = std::env::temp_dir().join(format!("fl-pg-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = format!("pg-{}", crate::unique_suffix());
        let certificate = ca.server_for("postgres", &["localhost"]);
        std::fs::copy(&certificate.cert_file, dir.join("server.crt")).unwrap();
        std::fs::copy(&certificate.key_file, dir.join("server.key")).unwrap();
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(dir.join("password"), &password).unwrap();
        let settings = vec![
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", dir.join("server.crt").display()),
            format!("ssl_key_file={}", dir.join("server.key").display()),
        ];
        Self::init(dir, password, settings).await
    }

    /// A cluster that trusts every local connection, without TLS: what a harness that kills
    /// the database needs, and nothing more.
    pub async fn start_plain() -> Self {
        let dir = std::env::temp_dir().join(format!("fl-pg-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::init(dir, String::new(), Vec::new()).await
    }

    async fn init(dir: PathBuf, password: String, settings: Vec<String>) -> Self {
        // initdb and postgres refuse to run as root: as root, they run as `postgres`.
        if let Some((uid, gid)) = run_as() {
            for path in ["", "server.crt", "server.key", "password"] {
                if dir.join(path).exists() {
                    std::os::unix::fs::chown(dir.join(path), Some(uid), Some(gid)).unwrap();
                }
            }
        }
        let mut initdb = Self::command(&dir, "initdb");
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth-local=trust"]);
        if password.is_empty() {
            initdb.arg("--auth-host=trust");
        } else {
            initdb
                .arg("--auth-host=scram-sha-256")
                .arg(format!("--pwfile={}", dir.join("password").display()));
        }
        let status = initdb
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("initdb is required for this test: {error}"));
        assert!(status.success(), "initdb failed");
        let mut postgres = Self {
            port: free_port(),
            password,
            dir,
            settings,
            child: None,
        };
        postgres.restart().await;
        postgres
    }

    /// A streaming replica of this cluster: `pg_basebackup -R` of it into a directory of its
    /// own, started on a port of its own (hot standby, so it answers reads). The cluster
    /// needs nothing more: initdb's defaults stream WAL (`wal_level=replica`, WAL senders)
    /// and its `pg_hba.conf` lets loopback replicate. Stopped and removed on drop.
    pub async fn start_replica(&self) -> Self {
        let dir = std::env::temp_dir().join(format!("fl-pg-replica-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let output = Self::command(&dir, "pg_basebackup")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast"])
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap_or_else(|error| panic!("pg_basebackup is required for this test: {error}"));
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut replica = Self {
            port: free_port(),
            password: self.password.clone(),
            dir,
            settings: Vec::new(),
            child: None,
        };
        replica.restart().await;
        replica
    }

    /// A command of the cluster's binaries, as its owner.
    fn command(dir: &std::path::Path, binary: &str) -> Command {
        use std::os::unix::process::CommandExt as _;

        let mut command = Command::new(format!("{}/{binary}", Self::BIN));
        if let Some((uid, gid)) = run_as() {
            command.uid(uid).gid(gid);
        }
        command.current_dir(dir);
        command
    }

    /// Starts the server (again) on the same port and data, and waits until it takes
    /// connections (after crash recovery, when it was stopped abruptly).
    pub async fn restart(&mut self) {
        self.stop_immediate();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .unwrap();
        let mut command = Self::command(&self.dir, "postgres");
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(&self.dir)
            .args(["-c", "fsync=off"]);
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        wait_for_port(self.port, "postgres").await;
        for _ in 0..600 {
            let ready = Command::new(format!("{}/pg_isready", Self::BIN))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("postgres did not become ready: {}", self.log());
    }

    /// PostgreSQL's immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends): every
    /// backend ends at once, no checkpoint; the next start recovers from the WAL.
    pub fn stop_immediate(&mut self) {
        self.signal_and_wait("-QUIT");
    }

    fn signal_and_wait(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        for _ in 0..500 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `postgres://postgres:{password}@{host}:{port}/postgres` plus `query` (`?sslmode=…`).
    pub fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{}@{host}:{}/postgres{query}",
            self.password, self.port
        )
    }

    /// `postgres://postgres@127.0.0.1:{port}`, without a database: a plain cluster's.
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

/// The `postgres` user's ids when running as root, `None` otherwise.
fn run_as() -> Option<(u32, u32)> {
    let id = |flag: &str, user: Option<&str>| {
        let output = Command::new("id").arg(flag).args(user).output().ok()?;
        String::from_utf8(output.stdout)
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
    };
    if id("-u", None)? != 0 {
        return None;
    }
    Some((id("-u", Some("postgres"))?, id("-g", Some("postgres"))?))
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        self.signal_and_wait("-INT");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
