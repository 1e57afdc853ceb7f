//! NATS: a connection that logs in, speaks TLS when asked and reconnects by itself, and the
//! JetStream streams.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr, jetstream};
use fieldline_proto::{Replication, Stream, StreamLimits, Subjects};
use secrecy::{ExposeSecret, SecretString};

use crate::config::Config;

/// How this process reaches NATS: its seed servers (with any credentials taken out of the
/// URLs, so no URL that is shown or logged carries one), how it logs in, and its TLS.
pub struct NatsSettings {
    servers: Vec<ServerAddr>,
    auth: NatsAuth,
    ca_file: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    tls_required: bool,
}

enum NatsAuth {
    None,
    UserPassword(String, SecretString),
    Token(SecretString),
    NKey(SecretString),
    CredsFile(PathBuf),
}

impl NatsSettings {
    /// Reads the `nats_*` settings; an error names the field at fault. Never echoes a URL,
    /// which may hold a password.
    pub fn from_config(config: &Config) -> Result<Self, (&'static str, String)> {
        let mut servers = Vec::new();
        let mut url_credentials: Option<UrlCredentials> = None;
        let seeds = config.nats_url.expose_secret();
        for (index, seed) in seeds.split(',').map(str::trim).enumerate() {
            if seed.is_empty() {
                continue;
            }
            let invalid = |why: String| ("nats_url", format!("seed {} {why}", index + 1));
            let address: ServerAddr = seed
                .parse()
                .map_err(|_| invalid("is not nats://host:port or tls://host:port".into()))?;
            if !matches!(address.scheme(), "nats" | "tls") {
                return Err(invalid("is not nats://host:port or tls://host:port".into()));
            }
            let (address, credentials) =
                without_credentials(address).map_err(|why| invalid(why.into()))?;
            if let Some(credentials) = credentials {
                match &url_credentials {
                    Some(seen) if *seen != credentials => {
                        return Err(invalid("logs in differently from another seed".into()));
                    }
                    _ => url_credentials = Some(credentials),
                }
            }
            servers.push(address);
        }
        if servers.is_empty() {
            return Err(("nats_url", "names no server".into()));
        }

        let mut ways: Vec<(&'static str, NatsAuth)> = Vec::new();
        if let Some((user, password)) = url_credentials {
            ways.push((
                "nats_url",
                match password {
                    Some(password) => NatsAuth::UserPassword(user, SecretString::from(password)),
                    // `nats://token@host`, as the NATS tools read it.
                    None => NatsAuth::Token(SecretString::from(user)),
                },
            ));
        }
        match (&config.nats_user, &config.nats_password) {
            (Some(user), Some(password)) => ways.push((
                "nats_user",
                NatsAuth::UserPassword(user.clone(), password.clone()),
            )),
            (Some(_), None) => return Err(("nats_password", "is needed with nats_user".into())),
            (None, Some(_)) => return Err(("nats_user", "is needed with nats_password".into())),
            (None, None) => {}
        }
        if let Some(token) = &config.nats_token {
            ways.push(("nats_token", NatsAuth::Token(token.clone())));
        }
        if let Some(seed) = &config.nats_nkey_seed {
            ways.push(("nats_nkey_seed", NatsAuth::NKey(seed.clone())));
        }
        if let Some(path) = &config.nats_creds_file {
            ways.push(("nats_creds_file", NatsAuth::CredsFile(path.clone())));
        }
        if ways.len() > 1 {
            let named: Vec<&str> = ways.iter().map(|(field, _)| *field).collect();
            return Err((
                ways[1].0,
                format!(
                    "choose one way to log in to NATS, not {}",
                    named.join(" and ")
                ),
            ));
        }
        let auth = ways.pop().map_or(NatsAuth::None, |(_, auth)| auth);

        let client_certificate = match (&config.nats_client_cert_file, &config.nats_client_key_file)
        {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (Some(_), None) => {
                return Err((
                    "nats_client_key_file",
                    "is needed with nats_client_cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "nats_client_cert_file",
                    "is needed with nats_client_key_file".into(),
                ));
            }
            (None, None) => None,
        };
        for (field, path) in [
            ("nats_creds_file", config.nats_creds_file.as_ref()),
            ("nats_ca_file", config.nats_ca_file.as_ref()),
            (
                "nats_client_cert_file",
                config.nats_client_cert_file.as_ref(),
            ),
            ("nats_client_key_file", config.nats_client_key_file.as_ref()),
        ] {
            if let Some(path) = path.filter(|path| !path.is_file()) {
                return Err((field, format!("{} is not a readable file", path.display())));
            }
        }
        // A CA or a client certificate means TLS is wanted: never fall back to plain text
        // because the server did not ask for it.
        let tls_required = config.nats_tls_required
            || config.nats_ca_file.is_some()
            || client_certificate.is_some()
            || servers.iter().any(ServerAddr::tls_required);
        Ok(Self {
            servers,
            auth,
            ca_file: config.nats_ca_file.clone(),
            client_certificate,
            tls_required,
        })
    }

    /// The seed servers, without credentials: what logs and errors show.
    pub fn servers_shown(&self) -> String {
        let shown: Vec<&str> = self.servers.iter().map(ServerAddr::as_url_str).collect();
        shown.join(",")
    }

    /// How this process logs in, for the start-up log: never the secret.
    pub fn auth_shown(&self) -> &'static str {
        match self.auth {
            NatsAuth::None => "none",
            NatsAuth::UserPassword(..) => "user_password",
            NatsAuth::Token(_) => "token",
            NatsAuth::NKey(_) => "nkey",
            NatsAuth::CredsFile(_) => "creds_file",
        }
    }

    /// `required`, `mutual` (with a client certificate), or `if_offered` by the server.
    pub fn tls_shown(&self) -> &'static str {
        match (self.tls_required, self.client_certificate.is_some()) {
            (_, true) => "mutual",
            (true, false) => "required",
            (false, false) => "if_offered",
        }
    }

    async fn options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::new();
        match &self.auth {
            NatsAuth::None => {}
            NatsAuth::UserPassword(user, password) => {
                options = options.user_and_password(user.clone(), password.expose_secret().into());
            }
            NatsAuth::Token(token) => options = options.token(token.expose_secret().into()),
            NatsAuth::NKey(seed) => options = options.nkey(seed.expose_secret().into()),
            NatsAuth::CredsFile(path) => {
                options = options.credentials_file(path).await.with_context(|| {
                    format!(
                        "reading the NATS credentials file {} (FIELDLINE_NATS_CREDS_FILE)",
                        path.display()
                    )
                })?;
            }
        }
        if let Some(ca_file) = &self.ca_file {
            options = options.add_root_certificates(ca_file.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.tls_required))
    }
}

/// A seed's `user:password@` (percent-decoded; the password absent for a token).
type UrlCredentials = (String, Option<String>);

/// The address without its `user:password@`, and those. The error never quotes the URL.
fn without_credentials(
    address: ServerAddr,
) -> Result<(ServerAddr, Option<UrlCredentials>), &'static str> {
    let Some(user) = address.username() else {
        return Ok((address, None));
    };
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| "has credentials that are not valid UTF-8")
    };
    let user = decode(user)?;
    let password = address.password().map(decode).transpose()?;
    let mut url = address.into_inner();
    url.set_username("")
        .and_then(|()| url.set_password(None))
        .map_err(|()| "has credentials but no host")?;
    let address = ServerAddr::from_url(url).map_err(|_| "is not a NATS URL")?;
    Ok((address, Some((user, password))))
}

/// Connects to NATS. Fails at start when the server is unreachable or refuses this client,
/// with a message that says which; once connected the client reconnects forever, and
/// `on_reconnect` runs after each reconnection (caches that may have missed an invalidation
/// while disconnected are cleared there).
pub async fn connect(
    config: &Config,
    name: &str,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) -> anyhow::Result<async_nats::Client> {
    let settings = NatsSettings::from_config(config).map_err(|(field, message)| {
        anyhow::anyhow!("configuration field `{field}` is invalid: {message}")
    })?;
    let on_reconnect = std::sync::Arc::new(on_reconnect);
    let options = settings
        .options()
        .await?
        .name(name)
        // Replies come to `_INBOX.{bus_prefix}.…`: still under `_INBOX.>` for permissions,
        // and one deployment's replies can be told apart on a server several share.
        .custom_inbox_prefix(format!("_INBOX.{}", config.bus_prefix))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(move |event| {
            let on_reconnect = on_reconnect.clone();
            async move {
                match event {
                    Event::Connected => {
                        tracing::info!("nats connected");
                        on_reconnect();
                    }
                    Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::info!(event = %other, "nats event"),
                }
            }
        });
    options
        .connect(settings.servers.clone())
        .await
        .map_err(|error| {
            let kind = if is_tls_failure(&error) {
                ConnectErrorKind::Tls
            } else {
                error.kind()
            };
            let why = match kind {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    "NATS refused this client's credentials (FIELDLINE_NATS_USER and \
                     FIELDLINE_NATS_PASSWORD, _TOKEN, _NKEY_SEED, _CREDS_FILE, or the URL's)"
                }
                ConnectErrorKind::Tls => {
                    "TLS with NATS failed (FIELDLINE_NATS_CA_FILE, FIELDLINE_NATS_CLIENT_CERT_FILE \
                     and _KEY_FILE, FIELDLINE_NATS_TLS_REQUIRED)"
                }
                _ => "NATS did not answer (FIELDLINE_NATS_URL)",
            };
            anyhow::Error::new(error).context(format!(
                "connecting to NATS at {}: {why}",
                settings.servers_shown()
            ))
        })
}

/// async-nats reports a refused certificate as an IO error; rustls's error is inside.
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// Creates the platform's streams if they do not exist yet, and brings those that do to the
/// configured bounds (age, bytes, duplicate window) and replicas (idempotent; every
/// service calls it at start, so start order does not matter).
pub async fn ensure_streams(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: StreamLimits,
    replication: &Replication,
) -> anyhow::Result<()> {
    for stream in Stream::ALL {
        let config = subjects.stream_config(stream, limits, replication);
        ensure_stream(jetstream, config, Reconcile::BoundsAndReplicas).await?;
    }
    Ok(())
}

/// What [`ensure_stream`] brings an existing stream to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// Bounds, subjects and replicas: the platform's streams.
    BoundsAndReplicas,
    /// Replicas only: a KV bucket whose first maker's bounds stand.
    Replicas,
}

/// Creates one stream (or KV bucket's stream) if it does not exist, or brings it to `config`
/// where they differ in what `reconcile` names. A JetStream cluster (2.9) adds or drops copies
/// of a stream (and of the durable consumers on it) on such an update; a single server
/// refuses more than one, and the error says so. Placement is applied when a stream is made;
/// an existing stream placed elsewhere is left where it is, with a warning: moving it copies
/// the whole stream, which an operator starts deliberately (`nats stream edit`), not every
/// start of a service.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: jetstream::stream::Config,
    reconcile: Reconcile,
) -> anyhow::Result<jetstream::stream::Stream> {
    let name = config.name.clone();
    let wanted = Replication {
        replicas: config.num_replicas,
        placement: config.placement.clone(),
    };
    let existing = jetstream
        .get_or_create_stream(config.clone())
        .await
        .map_err(|error| explain_stream_error(&name, &config, error))?;
    let current = &existing.cached_info().config;
    if !wanted.same_placement(current) {
        tracing::warn!(
            stream = %name,
            placed = ?current.placement,
            wanted = ?wanted.placement,
            "stream placed elsewhere than FIELDLINE_STREAM_PLACEMENT_CLUSTER/_TAGS say; left there (move it with `nats stream edit`)"
        );
    }
    let bounds_drifted = current.max_age != config.max_age
        || current.max_bytes != config.max_bytes
        || current.duplicate_window != config.duplicate_window
        || current.subjects != config.subjects;
    let replicas_drifted = !wanted.same_replicas(current);
    let update = match reconcile {
        Reconcile::BoundsAndReplicas if bounds_drifted || replicas_drifted => {
            jetstream::stream::Config {
                placement: current.placement.clone(),
                ..config
            }
        }
        Reconcile::Replicas if replicas_drifted => jetstream::stream::Config {
            num_replicas: config.num_replicas,
            ..current.clone()
        },
        _ => return Ok(existing),
    };
    let from_replicas = current.num_replicas.max(1);
    jetstream
        .update_stream(&update)
        .await
        .map_err(|error| explain_stream_error(&name, &update, error))?;
    tracing::info!(
        stream = %name,
        max_age = ?update.max_age,
        max_bytes = update.max_bytes,
        from_replicas,
        replicas = update.num_replicas,
        "stream brought to the configured bounds and replicas"
    );
    jetstream
        .get_stream(&name)
        .await
        .with_context(|| format!("reading stream {name} after updating it"))
}

/// What an operator should read when a stream cannot be made: JetStream reserves each
/// stream's `max_bytes` of its storage up front, so a server with many platforms (or test
/// prefixes) on it runs out of room long before its disk does.
fn explain_stream_error(
    name: &str,
    config: &jetstream::stream::Config,
    error: jetstream::context::CreateStreamError,
) -> anyhow::Error {
    use async_nats::jetstream::{ErrorCode, context::CreateStreamErrorKind};
    let replicas = config.num_replicas.max(1);
    let hint = match error.kind() {
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
                || inner.error_code() == ErrorCode::STREAM_REPLICAS_NOT_UPDATABLE
                || inner.error_code() == ErrorCode::CLUSTER_REQUIRED =>
        {
            format!(
                "stream {name} cannot have {replicas} replicas (FIELDLINE_STREAM_REPLICAS) on this \
                 NATS: more than one needs a JetStream cluster (nats-server 2.9 or later, with \
                 `cluster` routes); on a single server use FIELDLINE_STREAM_REPLICAS=1"
            )
        }
        CreateStreamErrorKind::JetStream(inner)
            if replicas > 1
                && (inner.error_code() == ErrorCode::INSUFFICIENT_RESOURCES
                    || inner.error_code() == ErrorCode::CLUSTER_NO_PEERS
                    || inner.error_code() == ErrorCode::CLUSTER_TAGS
                    || inner.error_code() == ErrorCode::CLUSTER_INCOMPLETE
                    || inner.error_code() == ErrorCode::PEER_REMAP) =>
        {
            format!(
                "JetStream found no {replicas} servers for stream {name} \
                 (FIELDLINE_STREAM_REPLICAS={replicas}, placement {:?}): the cluster needs at least \
                 {replicas} servers up with JetStream, the placement's cluster and tags \
                 (FIELDLINE_STREAM_PLACEMENT_CLUSTER, _TAGS), and room for max_bytes ({} MiB) on each",
                config.placement,
                config.max_bytes >> 20
            )
        }
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED
                || inner.error_code() == ErrorCode::INSUFFICIENT_RESOURCES
                || inner.error_code() == ErrorCode::ACCOUNT_RESOURCES_EXCEEDED =>
        {
            format!(
                "JetStream has no room for stream {name}: it reserves max_bytes ({} MiB) up front. \
                 Lower FIELDLINE_STREAM_MAX_BYTES / FIELDLINE_DEAD_LETTER_MAX_BYTES, raise the server's \
                 max_file_store, or delete streams no longer used",
                config.max_bytes >> 20
            )
        }
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED
                || inner.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
        {
            format!(
                "creating JetStream stream {name}: JetStream is not enabled (start nats-server with -js)"
            )
        }
        CreateStreamErrorKind::JetStreamUnavailable | CreateStreamErrorKind::TimedOut => {
            format!(
                "creating JetStream stream {name}: no JetStream answered (is JetStream enabled, -js?)"
            )
        }
        _ => format!("creating JetStream stream {name}"),
    };
    anyhow::Error::new(error).context(hint)
}

/// Is the client connected right now? Ingest answers 503 at once rather than queueing
/// publishes it cannot get acknowledged.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// A pull consumer's messages, fetched `batch` at a time. async-nats asks for 200 per pull
/// by default; a consumer that stores what it takes in one transaction per batch wants its
/// batches as large as it can take when it falls behind (the writer's averaged 65 messages).
pub async fn pull_messages(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    batch: usize,
) -> Result<
    async_nats::jetstream::consumer::pull::Stream,
    async_nats::jetstream::consumer::StreamError,
> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(std::time::Duration::from_secs(15))
        .messages()
        .await
}

/// Request/reply with a protobuf on each side. No answer within `timeout` (the responder is
/// down, or chose not to answer because its database is) is a 503, never a guess.
pub async fn rpc<Req, Resp>(
    client: &async_nats::Client,
    subject: String,
    request: &Req,
    timeout: std::time::Duration,
) -> Result<Resp, crate::ApiError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let unavailable = || crate::ApiError::unavailable("device-registry did not answer in time");
    let reply = match tokio::time::timeout(
        timeout,
        client.request(subject.clone(), request.encode_to_vec().into()),
    )
    .await
    {
        Ok(Ok(reply)) => reply,
        Ok(Err(error)) => {
            tracing::warn!(error = %error, subject = %subject, "rpc failed");
            return Err(unavailable());
        }
        Err(_) => {
            tracing::warn!(subject = %subject, "rpc timed out");
            return Err(unavailable());
        }
    };
    Resp::decode(reply.payload.as_ref()).map_err(|error| {
        tracing::warn!(error = %error, subject = %subject, "rpc answered garbage");
        unavailable()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn settings(tweak: impl FnOnce(&mut Config)) -> Result<NatsSettings, (&'static str, String)> {
        let mut config = Config::default();
        tweak(&mut config);
        NatsSettings::from_config(&config)
    }

    #[test]
    fn credentials_in_the_urls_log_in_and_are_never_shown() {
        let nats = settings(|config| {
            config.nats_url =
                "nats://fieldline:p%40ss%3Aword@10.0.0.1:4222, tls://fieldline:p%40ss%3Aword@10.0.0.2"
                    .into();
        })
        .unwrap();
        assert_eq!(nats.servers_shown(), "nats://10.0.0.1:4222,tls://10.0.0.2");
        assert_eq!(nats.auth_shown(), "user_password");
        match &nats.auth {
            NatsAuth::UserPassword(user, password) => {
                assert_eq!(user, "fieldline");
                assert_eq!(password.expose_secret(), "p@ss:word");
            }
            _ => panic!("not a user and password"),
        }
        // A `tls://` seed means TLS, to every seed.
        assert_eq!(nats.tls_shown(), "required");

        let token =
            settings(|config| config.nats_url = "nats://s3cret@127.0.0.1:4222".into()).unwrap();
        assert_eq!(token.auth_shown(), "token");
        assert_eq!(token.servers_shown(), "nats://127.0.0.1:4222");
        assert_eq!(token.tls_shown(), "if_offered");
    }

    #[test]
    fn one_way_to_log_in_and_errors_name_the_field_not_the_secret() {
        let error = settings(|config| {
            config.nats_url = "nats://u:hunter2@127.0.0.1:4222".into();
            config.nats_token = Some("t".into());
        })
        .err()
        .unwrap();
        assert_eq!(error.0, "nats_token");
        assert!(!error.1.contains("hunter2"), "{}", error.1);

        let error = settings(|config| config.nats_password = Some("hunter2".into()))
            .err()
            .unwrap();
        assert_eq!(error.0, "nats_user");

        let error = settings(|config| {
            config.nats_url = "nats://127.0.0.1:4222,http://u:hunter2@x".into();
        })
        .err()
        .unwrap();
        assert_eq!(error.0, "nats_url");
        assert!(
            error.1.contains("seed 2") && !error.1.contains("hunter2"),
            "{}",
            error.1
        );

        let error = settings(|config| {
            config.nats_url = "nats://a:one@h1:4222,nats://a:two@h2:4222".into();
        })
        .err()
        .unwrap();
        assert!(
            !error.1.contains("one") && !error.1.contains("two"),
            "{}",
            error.1
        );

        let error = settings(|config| {
            config.nats_client_cert_file = Some("/etc/hostname".into());
        })
        .err()
        .unwrap();
        assert_eq!(error.0, "nats_client_key_file");

        let error = settings(|config| config.nats_ca_file = Some("/nonexistent.pem".into()))
            .err()
            .unwrap();
        assert_eq!(error.0, "nats_ca_file");
    }

    #[test]
    fn a_ca_or_a_client_certificate_requires_tls() {
        let nats = settings(|config| config.nats_ca_file = Some("/etc/hostname".into())).unwrap();
        assert_eq!(nats.tls_shown(), "required");
        let nats = settings(|config| {
            config.nats_client_cert_file = Some("/etc/hostname".into());
            config.nats_client_key_file = Some("/etc/hostname".into());
        })
        .unwrap();
        assert_eq!(nats.tls_shown(), "mutual");
        let nats = settings(|config| config.nats_tls_required = true).unwrap();
        assert_eq!(nats.tls_shown(), "required");
    }
}
