//! PostgreSQL: one pool per process, per-service schemas and migrations.

use std::{path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use secrecy::ExposeSecret;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::Config;

/// libpq's `sslmode`, all five that make sense without `allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it, its certificate unchecked; plain text otherwise.
    Prefer,
    /// TLS, its certificate unchecked (checked as `verify-ca` when a CA file is given).
    Require,
    /// TLS, the certificate signed by the CA, whatever host name it names.
    VerifyCa,
    /// TLS, the certificate signed by the CA and naming the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// `database_url` read once: the connection settings for tokio-postgres, and the `sslmode`
/// and CA that tokio-postgres does not read itself (it knows `disable`, `prefer` and
/// `require`, and checks no certificate).
pub struct DatabaseSettings {
    pg_config: tokio_postgres::Config,
    ssl_mode: SslMode,
    ca_file: Option<PathBuf>,
}

impl DatabaseSettings {
    /// Reads `database_url` and `database_ca_file`. The error never quotes the URL, which
    /// may hold a password.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Self::from_url(&config.database_url, config)
    }

    /// `url` (a replica's, say) with the TLS settings of `config`.
    pub fn from_url(url: &secrecy::SecretString, config: &Config) -> Result<Self, String> {
        let (url, ssl_mode, root_cert) = without_ssl_parameters(url.expose_secret())?;
        let mut pg_config = tokio_postgres::Config::from_str(&url)
            .map_err(|error| format!("is not a PostgreSQL URL ({error})"))?;
        // Without `sslmode`, plain text, as before TLS support: libpq would `prefer`, which
        // costs TLS on every loopback connection and checks nothing. Name the mode you want.
        let ssl_mode = ssl_mode.unwrap_or(SslMode::Disable);
        pg_config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let ca_file = root_cert.or_else(|| config.database_ca_file.clone());
        if let Some(path) = ca_file.as_ref().filter(|path| !path.is_file()) {
            return Err(format!(
                "its CA file {} is not a readable file",
                path.display()
            ));
        }
        Ok(Self {
            pg_config,
            ssl_mode,
            ca_file,
        })
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// `host:port`, comma-separated when the URL names several: a replica's name in metrics.
    pub fn hosts(&self) -> String {
        let hosts: Vec<String> = self
            .pg_config
            .get_hosts()
            .iter()
            .zip(
                self.pg_config
                    .get_ports()
                    .iter()
                    .chain(std::iter::repeat(&5432)),
            )
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
            })
            .collect();
        hosts.join(",")
    }

    /// Where the process connects, for the start-up log: never the password.
    pub fn shown(&self) -> String {
        format!(
            "postgres://{}@{}/{}?sslmode={}",
            self.pg_config.get_user().unwrap_or_default(),
            self.hosts(),
            self.pg_config.get_dbname().unwrap_or_default(),
            self.ssl_mode.as_str()
        )
    }

    /// A pool manager: every pool of the process (and the migrations, which run on one)
    /// connects through this, with the same TLS. `tweak` adds per-pool settings.
    pub fn manager(
        &self,
        tweak: impl FnOnce(&mut tokio_postgres::Config),
    ) -> anyhow::Result<Manager> {
        let mut pg_config = self.pg_config.clone();
        tweak(&mut pg_config);
        let tls = MakeRustlsConnect::new(self.tls_config()?);
        Ok(Manager::from_config(
            pg_config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        ))
    }

    fn tls_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (self.ssl_mode, &self.ca_file) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
                Arc::new(EncryptOnly(provider.clone()))
            }
            (SslMode::Require | SslMode::VerifyCa, _) => {
                Arc::new(AnyName(self.webpki_verifier(provider.clone())?))
            }
            (SslMode::VerifyFull, _) => self.webpki_verifier(provider.clone())?,
        };
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions for PostgreSQL")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    fn webpki_verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certificates = CertificateDer::pem_file_iter(path)
                    .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                    .with_context(|| {
                        format!(
                            "reading the PostgreSQL CA file {} (FIELDLINE_DATABASE_CA_FILE)",
                            path.display()
                        )
                    })?;
                let (added, _) = roots.add_parsable_certificates(certificates);
                anyhow::ensure!(
                    added > 0,
                    "the PostgreSQL CA file {} holds no certificate",
                    path.display()
                );
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("the PostgreSQL CA")
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a key/value
/// string (`host=… sslmode=…`): tokio-postgres refuses `verify-ca`, `verify-full` and
/// `sslrootcert`, and they are ours to apply.
fn without_ssl_parameters(url: &str) -> Result<(String, Option<SslMode>, Option<PathBuf>), String> {
    let mut ssl_mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                ssl_mode = Some(SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "has sslmode={value}; use disable, prefer, require, verify-ca or verify-full"
                    )
                })?);
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| "has a parameter that is not valid UTF-8".to_owned())?;
            if !take(key, &value)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for pair in url.split_whitespace() {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key.trim(), value.trim_matches('\''))? {
                kept.push(pair);
            }
        }
        kept.join(" ")
    };
    Ok((rest, ssl_mode, root_cert))
}

/// `prefer` and `require` without a CA, as libpq: the link is encrypted, the server's
/// certificate is not checked (its handshake signature still is).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name in the certificate may be any.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name, so a name error means a good chain.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Builds the pool and checks one connection, so a wrong URL fails at start, clearly.
pub async fn connect(config: &Config) -> anyhow::Result<Pool> {
    let settings = DatabaseSettings::from_config(config)
        .map_err(|message| anyhow::anyhow!("FIELDLINE_DATABASE_URL {message}"))?;
    let pool = Pool::builder(settings.manager(|_| {})?)
        .max_size(config.database_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the postgres pool")?;
    let client = pool.get().await.with_context(|| {
        format!(
            "connecting to PostgreSQL at {} (FIELDLINE_DATABASE_URL, FIELDLINE_DATABASE_CA_FILE)",
            settings.shown()
        )
    })?;
    client
        .simple_query("SELECT 1")
        .await
        .context("PostgreSQL did not answer")?;
    Ok(pool)
}

/// Creates `schema` and applies the service's embedded migrations to it, recording them in
/// `{schema}.refinery_schema_history`. An advisory lock makes concurrent starts (two
/// replicas) apply each migration once.
pub async fn migrate(pool: &Pool, schema: &str, runner: refinery::Runner) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("connecting to PostgreSQL for migrations")?;
    let lock_key = format!("fieldline-migrate-{schema}");
    client
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
        .await
        .context("taking the migration lock")?;
    let result = async {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        let mut runner = runner;
        runner.set_migration_table_name(format!("{schema}.refinery_schema_history"));
        let pg: &mut tokio_postgres::Client = &mut client;
        runner
            .run_async(pg)
            .await
            .with_context(|| format!("migrating schema {schema}"))?;
        anyhow::Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
        .await
        .context("releasing the migration lock")?;
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use secrecy::SecretString;

    use super::*;

    fn settings(url: &str) -> Result<DatabaseSettings, String> {
        DatabaseSettings::from_config(&Config {
            database_url: SecretString::from(url),
            ..Config::default()
        })
    }

    #[test]
    fn sslmode_is_read_from_urls_and_key_value_strings() {
        for (url, mode) in [
            ("postgres://u@h/db", SslMode::Disable),
            ("postgres://u@h/db?sslmode=disable", SslMode::Disable),
            ("postgres://u@h/db?sslmode=prefer", SslMode::Prefer),
            (
                "postgresql://u@h/db?application_name=x&sslmode=require",
                SslMode::Require,
            ),
            ("postgres://u@h/db?sslmode=verify-ca", SslMode::VerifyCa),
            (
                "postgres://u@h/db?sslmode=verify-full&connect_timeout=5",
                SslMode::VerifyFull,
            ),
            (
                "host=h user=u dbname=db sslmode=verify-full",
                SslMode::VerifyFull,
            ),
        ] {
            let settings = settings(url).unwrap();
            assert_eq!(settings.ssl_mode(), mode, "{url}");
            assert!(
                settings
                    .shown()
                    .ends_with(&format!("sslmode={}", mode.as_str()))
            );
        }
        let kept = settings("postgres://u@h/db?sslmode=require&application_name=kept").unwrap();
        assert_eq!(kept.pg_config.get_application_name(), Some("kept"));
        assert_eq!(
            kept.pg_config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn passwords_are_neither_shown_nor_quoted_in_errors() {
        let settings =
            settings("postgres://fieldline:hunter2@db.internal:6432/fl?sslmode=require").unwrap();
        assert_eq!(
            settings.shown(),
            "postgres://fieldline@db.internal:6432/fl?sslmode=require"
        );
        assert_eq!(settings.pg_config.get_password(), Some(&b"hunter2"[..]));
        let error = self::settings("postgres://fieldline:hunter2@h/fl?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(
            error.contains("sslmode=sometimes") && !error.contains("hunter2"),
            "{error}"
        );
        let error = self::settings("postgres://u:hunter2@h/db?sslrootcert=/nonexistent.pem")
            .err()
            .unwrap();
        assert!(
            error.contains("/nonexistent.pem") && !error.contains("hunter2"),
            "{error}"
        );
    }

    #[test]
    fn every_mode_builds_its_tls_configuration() {
        for mode in ["disable", "prefer", "require", "verify-full"] {
            let settings = settings(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            settings.tls_config().unwrap();
        }
    }
}
