//! How a Fieldline service logs in to the MQTT broker: `mqtt://user:password@host:port`, or
//! `mqtts://…` for TLS (rustls, trusting the CA file of `mqtt_ca_file` or the system's roots).
//! ingest-mqtt logs in with `mqtt_url`, the registry's broker account manager with
//! `mqtt_admin_url`; both go through [`BrokerLogin::options`].

use std::{fmt, path::Path, sync::Arc, time::Duration};

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use secrecy::{ExposeSecret, SecretString};

/// A parsed broker URL: where, how, and as whom.
#[derive(Clone)]
pub struct BrokerLogin {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    password: Option<SecretString>,
}

impl fmt::Debug for BrokerLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerLogin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl BrokerLogin {
    /// Parses `mqtt://[user[:password]@]host[:port]` (also `tcp://`), or `mqtts://` (also
    /// `ssl://`) for TLS. User and password are percent-decoded. The error never repeats the
    /// URL, which may carry a password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|error| format!("not a URL ({error})"))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => {
                return Err(format!(
                    "scheme {other:?} is not one of mqtt, tcp, mqtts, ssl"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err("a broker URL has no path or query".into());
        }
        let decode = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|decoded| decoded.into_owned())
                .map_err(|_| "user or password is not UTF-8 once decoded".to_owned())
        };
        let username = match url.username() {
            "" => None,
            user => Some(decode(user)?),
        };
        let password = url
            .password()
            .map(decode)
            .transpose()?
            .map(SecretString::from);
        if password.is_some() && username.is_none() {
            return Err("a password needs a user".into());
        }
        Ok(Self {
            port: url.port().unwrap_or(default_port),
            host,
            tls,
            username,
            password,
        })
    }

    pub fn password(&self) -> Option<&SecretString> {
        self.password.as_ref()
    }

    /// Client options for this login: credentials, and TLS for `mqtts://`, trusting the PEM
    /// certificates of `ca_file` (the system's roots when `None`).
    pub fn options(
        &self,
        client_id: impl Into<String>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<MqttOptions> {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(username) = &self.username {
            let password = self
                .password
                .as_ref()
                .map(|password| password.expose_secret().to_owned())
                .unwrap_or_default();
            options.set_credentials(username.clone(), password);
        }
        if self.tls {
            options.set_transport(Transport::Tls(tls_config(ca_file)?));
        }
        Ok(options)
    }
}

fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<TlsConfiguration> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|error| {
                anyhow::anyhow!("cannot read the MQTT CA file {}: {error}", path.display())
            })?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| {
                    anyhow::anyhow!("the MQTT CA file {} is not PEM: {error}", path.display())
                })?;
                roots.add(certificate)?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "the MQTT CA file {} holds no certificate",
                path.display()
            );
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                // A system root that rustls cannot use is skipped, as browsers do.
                let _ = roots.add(certificate);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::from(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_credentials_and_tls() {
        let login = BrokerLogin::parse("mqtt://fieldline-ingest:p%40ss@broker:1884").unwrap();
        assert_eq!(login.host, "broker");
        assert_eq!(login.port, 1884);
        assert!(!login.tls);
        assert_eq!(login.username.as_deref(), Some("fieldline-ingest"));
        assert_eq!(login.password().unwrap().expose_secret(), "p@ss");

        let tls = BrokerLogin::parse("mqtts://u:p@broker.example.com").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.port, 8883);

        let anonymous = BrokerLogin::parse("mqtt://127.0.0.1").unwrap();
        assert_eq!(anonymous.port, 1883);
        assert!(anonymous.username.is_none());

        for bad in [
            "http://host:1883",
            "mqtt://",
            "mqtt://host:1883/topic",
            "mqtt://:secret@host",
            "broker:1883",
        ] {
            let error = BrokerLogin::parse(bad).err().unwrap();
            assert!(!error.contains("secret"), "{bad}: {error}");
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let login = BrokerLogin::parse("mqtt://u:hunter2-secret@host").unwrap();
        assert!(!format!("{login:?}").contains("hunter2"));
    }
}
