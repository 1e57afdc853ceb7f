//! Authentication for every service: credentials are verified by the device-registry over
//! `{prefix}.rpc.auth.verify`, cached briefly, and the cache is cleared at once when
//! `{prefix}.invalidate.keys` or `{prefix}.invalidate.devices` is broadcast (one subscription
//! on `{prefix}.invalidate.*`, so both kinds are handled in the order they were published).

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, http::header, web};
use fieldline_proto::{
    InvalidateKind, Subjects,
    v1::{
        DeviceLookupRequest, DeviceLookupResponse, Invalidate, PrincipalKind, Scope, VerifyRequest,
        VerifyResponse, verify_response,
    },
};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    cache::InvalidatingCache,
    error::ApiError,
    logthrottle::LogThrottle,
    ratelimit::{Decision, Limit, RateLimits},
    time::now_us,
};

/// While the registry cannot answer, every request that misses the cache fails alike: one
/// line per reason every 10 s, with the count left out (1,700 a second in a NATS outage).
static AUTH_RPC_WARNINGS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// Who is calling: an API key of a project, or one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: CredentialKind,
    pub project: String,
    /// `key_…` for an API key, the device id for a device token.
    pub id: String,
    pub scope: Option<ScopeLevel>,
    pub platform_admin: bool,
    /// Epoch microseconds, 0 when it never expires.
    pub expires_at_us: i64,
    /// The project's override of this principal's rate limit (its key or device limit);
    /// `None` keeps the platform default.
    pub rate_limit: Option<Limit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    Device,
}

/// Scopes are ordered: `read` < `write` < `admin`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ScopeLevel {
    Read,
    Write,
    Admin,
}

impl ScopeLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeLevel::Read => "read",
            ScopeLevel::Write => "write",
            ScopeLevel::Admin => "admin",
        }
    }

    pub fn to_proto(self) -> Scope {
        match self {
            ScopeLevel::Read => Scope::Read,
            ScopeLevel::Write => Scope::Write,
            ScopeLevel::Admin => Scope::Admin,
        }
    }

    fn from_proto(scope: Scope) -> Option<Self> {
        match scope {
            Scope::Read => Some(ScopeLevel::Read),
            Scope::Write => Some(ScopeLevel::Write),
            Scope::Admin => Some(ScopeLevel::Admin),
            Scope::Unspecified => None,
        }
    }
}

impl Principal {
    fn from_proto(principal: fieldline_proto::v1::Principal) -> Option<Self> {
        let kind = match principal.kind() {
            PrincipalKind::ApiKey => CredentialKind::ApiKey,
            PrincipalKind::Device => CredentialKind::Device,
            PrincipalKind::Unspecified => return None,
        };
        Some(Self {
            kind,
            rate_limit: Limit::from_proto(principal.rate_limit.as_ref()),
            scope: ScopeLevel::from_proto(principal.scope()),
            project: principal.project,
            id: principal.id,
            platform_admin: principal.platform_admin,
            expires_at_us: principal.expires_at_us,
        })
    }

    fn is_expired(&self, now_us: i64) -> bool {
        self.expires_at_us != 0 && self.expires_at_us <= now_us
    }
}

/// Why a credential was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing credentials: send Authorization: Bearer <key> or X-API-Key")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
    #[error("credentials expired")]
    Expired,
    #[error("credentials revoked")]
    Revoked,
    #[error("authentication service unavailable")]
    Unavailable,
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable => ApiError::unavailable(error.to_string()),
            other => ApiError::unauthorized(other.to_string()),
        }
    }
}

/// What the registry says of a device, cached like credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_type: String,
    pub group: String,
    pub tags: Vec<String>,
    /// The project's override of its devices' rate limit; `None` keeps the default.
    pub rate_limit: Option<Limit>,
}

/// The verifying side of auth, shared by every service in a process.
#[derive(Clone)]
pub struct AuthClient {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
    /// Keyed by SHA-256 of the secret, so no secret is held in memory after the request.
    /// Shared, so that a hit (once per request) clones a pointer, not the strings.
    credentials: InvalidatingCache<[u8; 32], Arc<Principal>>,
    /// Shared, so that a hit (once per device message) clones a pointer, not the strings.
    devices: InvalidatingCache<(String, String), Option<Arc<DeviceInfo>>>,
}

/// SHA-256 of a secret: how API keys and device tokens are stored, cached and asked about
/// over the bus.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Every device token starts with this; anything else is taken for an API key.
pub const DEVICE_TOKEN_PREFIX: &str = "fld_";

/// Which credential a secret is, from its prefix (which is not secret).
pub fn credential_kind(secret: &str) -> CredentialKind {
    if secret.starts_with(DEVICE_TOKEN_PREFIX) {
        CredentialKind::Device
    } else {
        CredentialKind::ApiKey
    }
}

impl CredentialKind {
    pub fn to_proto(self) -> PrincipalKind {
        match self {
            CredentialKind::ApiKey => PrincipalKind::ApiKey,
            CredentialKind::Device => PrincipalKind::Device,
        }
    }
}

impl AuthClient {
    pub fn new(
        nats: async_nats::Client,
        subjects: Subjects,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> Self {
        let credentials = InvalidatingCache::new(100_000, cache_ttl);
        let devices = InvalidatingCache::new(100_000, cache_ttl);
        Self {
            inner: Arc::new(Inner {
                nats,
                subjects,
                timeout,
                credentials,
                devices,
            }),
        }
    }

    /// Subscribes to invalidations; returns once the subscriptions are registered with the
    /// server, so a revocation published after this call is seen.
    pub async fn listen_for_invalidations(
        &self,
        shutdown: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let inner = &self.inner;
        // One subscription for every kind: NATS keeps one subscription's messages in publish
        // order, so a key's broadcast and a later device's are handled in that order.
        let mut invalidations = inner
            .nats
            .subscribe(inner.subjects.invalidate_any())
            .await?;
        inner.nats.flush().await?;
        let client = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    message = invalidations.next() => match message {
                        Some(message) => {
                            let kind = InvalidateKind::of_subject(message.subject.as_str());
                            match (kind, Invalidate::decode(message.payload.as_ref())) {
                                (Some(InvalidateKind::Webhooks), _) => {}
                                (Some(kind), Ok(what)) => {
                                    client.invalidate(kind, &what.project, &what.id)
                                }
                                _ => client.invalidate_all(),
                            }
                        }
                        None => break,
                    },
                }
            }
        }))
    }

    /// Drops what an invalidation names, and only that: a device (its lookup and its token's
    /// principal), an API key (its principal), or with an empty id everything of the project
    /// (its limits changed, say). Without a project, everything.
    pub fn invalidate(&self, kind: InvalidateKind, project: &str, id: &str) {
        let (project, id) = (project.to_owned(), id.to_owned());
        if project.is_empty() {
            return self.invalidate_all();
        }
        let inner = &self.inner;
        match kind {
            InvalidateKind::Devices if !id.is_empty() => {
                let (lookup_project, lookup_id) = (project.clone(), id.clone());
                inner
                    .devices
                    .invalidate_if(move |(p, d), _| *p == lookup_project && *d == lookup_id);
                inner.credentials.invalidate_if(move |_, principal| {
                    principal.kind == CredentialKind::Device
                        && principal.project == project
                        && principal.id == id
                });
            }
            InvalidateKind::Keys if !id.is_empty() => {
                inner.credentials.invalidate_if(move |_, principal| {
                    principal.kind == CredentialKind::ApiKey
                        && principal.project == project
                        && principal.id == id
                });
            }
            _ => {
                let lookup_project = project.clone();
                inner
                    .devices
                    .invalidate_if(move |(p, _), _| *p == lookup_project);
                inner
                    .credentials
                    .invalidate_if(move |_, principal| principal.project == project);
            }
        }
    }

    /// Drops every cached credential and device.
    pub fn invalidate_all(&self) {
        self.inner.credentials.invalidate_all();
        self.inner.devices.invalidate_all();
    }

    /// Verifies an API key or device token. Only its digest is kept, and only the digest
    /// goes to the registry.
    pub async fn verify(&self, secret: &str) -> Result<Arc<Principal>, AuthError> {
        let inner = &self.inner;
        let digest = hash_secret(secret);
        let kind = credential_kind(secret);
        let principal = inner
            .credentials
            .get_or_load(digest, || self.ask_registry(digest, kind))
            .await?;
        // Expiry is checked at use, so a cached key stops working on time.
        if principal.is_expired(now_us()) {
            inner.credentials.invalidate(&digest);
            return Err(AuthError::Expired);
        }
        Ok(principal)
    }

    /// The principal of a credential verified recently (in the cache), without asking the
    /// registry: what an address throttled for failed authentications may still use.
    pub fn verified(&self, secret: &str) -> Option<Arc<Principal>> {
        let principal = self.inner.credentials.get(&hash_secret(secret))?;
        (!principal.is_expired(now_us())).then_some(principal)
    }

    async fn ask_registry(
        &self,
        digest: [u8; 32],
        kind: CredentialKind,
    ) -> Result<Arc<Principal>, AuthError> {
        let request = VerifyRequest {
            secret_sha256: digest.to_vec(),
            kind: kind.to_proto().into(),
        }
        .encode_to_vec();
        let reply = self
            .request(self.inner.subjects.rpc_auth_verify(), request)
            .await?;
        let response =
            VerifyResponse::decode(reply.as_ref()).map_err(|_| AuthError::Unavailable)?;
        match response.result {
            Some(verify_response::Result::Principal(principal)) => {
                let principal = Principal::from_proto(principal).ok_or(AuthError::Unavailable)?;
                if principal.is_expired(now_us()) {
                    return Err(AuthError::Expired);
                }
                Ok(Arc::new(principal))
            }
            Some(verify_response::Result::Error(error)) => Err(match error.reason.as_str() {
                "expired" => AuthError::Expired,
                "revoked" => AuthError::Revoked,
                "internal" => AuthError::Unavailable,
                _ => AuthError::Invalid,
            }),
            None => Err(AuthError::Unavailable),
        }
    }

    /// Does `device_id` exist in `project`? `None` when it does not.
    pub async fn lookup_device(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Option<Arc<DeviceInfo>>, AuthError> {
        let key = (project.to_owned(), device_id.to_owned());
        let lookup = || async {
            let request = DeviceLookupRequest {
                project: project.to_owned(),
                device_id: device_id.to_owned(),
            };
            let reply = self
                .request(
                    self.inner.subjects.rpc_auth_device(),
                    request.encode_to_vec(),
                )
                .await?;
            let response =
                DeviceLookupResponse::decode(reply.as_ref()).map_err(|_| AuthError::Unavailable)?;
            Ok(response.found.then(|| {
                Arc::new(DeviceInfo {
                    rate_limit: Limit::from_proto(response.rate_limit.as_ref()),
                    device_type: response.device_type,
                    group: response.group,
                    tags: response.tags,
                })
            }))
        };
        self.inner.devices.get_or_load(key, lookup).await
    }

    /// The device, if it exists in `project`; otherwise 404, whether it is absent or another
    /// project's (never reveal another project's ids). 503 when the registry cannot be asked.
    pub async fn require_device(
        &self,
        project: &str,
        raw_id: &str,
    ) -> Result<crate::ids::DeviceId, ApiError> {
        let device_id = crate::ids::DeviceId::parse(raw_id)?;
        match self.lookup_device(project, device_id.as_str()).await? {
            Some(_) => Ok(device_id),
            None => Err(ApiError::not_found(
                "device_not_found",
                format!("device {device_id} not found"),
            )),
        }
    }

    async fn request(&self, subject: String, payload: Vec<u8>) -> Result<bytes::Bytes, AuthError> {
        // With the bus down no answer can come: 503 at once, not after the RPC timeout.
        if self.inner.nats.connection_state() != async_nats::connection::State::Connected {
            if let Some(left_out) = AUTH_RPC_WARNINGS.admit("auth rpc: bus not connected") {
                tracing::warn!(left_out, "auth rpc not sent: the bus is not connected");
            }
            return Err(AuthError::Unavailable);
        }
        let span = tracing::info_span!(
            "auth rpc",
            otel.name = tracing::field::Empty,
            otel.kind = "client",
            messaging.system = "nats",
            messaging.destination.name = %subject,
        );
        crate::trace::name(&span, || format!("{subject} request"));
        let mut headers = async_nats::HeaderMap::new();
        crate::trace::inject_nats(&span, &mut headers);
        let request = self
            .inner
            .nats
            .request_with_headers(subject, headers, payload.into())
            .instrument(span);
        match tokio::time::timeout(self.inner.timeout, request).await {
            Ok(Ok(message)) => Ok(message.payload),
            Ok(Err(error)) => {
                if let Some(left_out) = AUTH_RPC_WARNINGS.admit("auth rpc failed") {
                    tracing::warn!(error = %error, left_out, "auth rpc failed");
                }
                Err(AuthError::Unavailable)
            }
            Err(_) => {
                if let Some(left_out) = AUTH_RPC_WARNINGS.admit("auth rpc timed out") {
                    tracing::warn!(left_out, "auth rpc timed out");
                }
                Err(AuthError::Unavailable)
            }
        }
    }
}

/// The secret of a request: `Authorization: Bearer <secret>` or `X-API-Key: <secret>`.
pub fn credential_from(req: &HttpRequest) -> Option<String> {
    let headers = req.headers();
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = value.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
            return Some(token.trim().to_owned());
        }
        return None;
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The principal a request was authenticated as, kept so that a second extractor on the same
/// request neither asks again nor counts against a limit twice.
#[derive(Clone)]
struct Authenticated(Arc<Principal>);

/// Verifies the request's credential as a `kind` and counts it against its rate limit. With
/// [`RateLimits`] in the app data, an address that failed authentication too often gets 429
/// for credentials not verified recently (nothing of it reaches the registry), and the
/// [`Decision`] is left in the request's extensions for the `RateLimit-*` headers.
async fn authenticate(req: &HttpRequest, kind: CredentialKind) -> Result<Arc<Principal>, ApiError> {
    let earlier = req.extensions().get::<Authenticated>().cloned();
    if let Some(Authenticated(principal)) = earlier {
        return require_kind(principal, kind);
    }
    let client = req
        .app_data::<web::Data<AuthClient>>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("AuthClient missing from app data")))?
        .clone();
    let limits = req.app_data::<web::Data<RateLimits>>().cloned();
    let secret = credential_from(req).ok_or(AuthError::Missing)?;
    let principal = match &limits {
        Some(limits) => verify_limited(req, &client, limits, &secret).await?,
        None => client.verify(&secret).await?,
    };
    let principal = require_kind(principal, kind)?;
    if let Some(limits) = &limits {
        let (decision, whose, limit) = match kind {
            CredentialKind::ApiKey => (
                limits.check_key(&principal.id, principal.rate_limit),
                "this API key",
                "key",
            ),
            CredentialKind::Device => (
                limits.check_device(
                    crate::ratelimit::Channel::Http,
                    &principal.project,
                    &principal.id,
                    principal.rate_limit,
                ),
                "this device",
                "device",
            ),
        };
        req.extensions_mut().insert(decision);
        if !decision.allowed {
            metrics::counter!("fieldline_rate_limited_total", "limit" => limit).increment(1);
            return Err(decision.error(whose));
        }
    }
    req.extensions_mut()
        .insert(Authenticated(principal.clone()));
    Ok(principal)
}

/// 403 for a valid credential of the other kind.
fn require_kind(
    principal: Arc<Principal>,
    kind: CredentialKind,
) -> Result<Arc<Principal>, ApiError> {
    if principal.kind == kind {
        return Ok(principal);
    }
    Err(ApiError::forbidden(match kind {
        CredentialKind::ApiKey => "device tokens may only be used on ingest routes",
        CredentialKind::Device => "ingest routes take a device token (fld_…)",
    }))
}

async fn verify_limited(
    req: &HttpRequest,
    client: &AuthClient,
    limits: &RateLimits,
    secret: &str,
) -> Result<Arc<Principal>, ApiError> {
    let address = limits.client_address(req);
    let refuse = |decision: Decision| {
        metrics::counter!("fieldline_rate_limited_total", "limit" => "auth_failures").increment(1);
        req.extensions_mut().insert(decision);
        decision.error("failed authentications from this address")
    };
    if let Some(blocked) = address.and_then(|address| limits.blocked(address)) {
        // A credential verified recently still works from here (a shared NAT or gateway must
        // not lock its honest clients out); anything else waits, without costing the registry.
        return client.verified(secret).ok_or_else(|| refuse(blocked));
    }
    match client.verify(secret).await {
        Ok(principal) => Ok(principal),
        Err(AuthError::Unavailable) => Err(AuthError::Unavailable.into()),
        Err(error) => {
            if let Some(address) = address {
                let decision = limits.record_failure(address);
                if !decision.allowed {
                    tracing::warn!(%address, "failed authentications over the limit; address throttled");
                    return Err(refuse(decision));
                }
            }
            Err(error.into())
        }
    }
}

/// An API key, checked on extraction. Handlers call [`ApiKey::require`] for the scope a route
/// needs.
#[derive(Debug, Clone)]
pub struct ApiKey(pub Arc<Principal>);

impl ApiKey {
    /// 403 unless the key holds `scope` (or more).
    pub fn require(&self, scope: ScopeLevel) -> Result<&Principal, ApiError> {
        match self.0.scope {
            Some(held) if held >= scope => Ok(&*self.0),
            _ => Err(ApiError::forbidden(format!(
                "this route needs the {} scope",
                scope.as_str()
            ))),
        }
    }

    /// 403 unless the key is the platform admin's.
    pub fn require_platform_admin(&self) -> Result<&Principal, ApiError> {
        if self.0.platform_admin {
            Ok(&*self.0)
        } else {
            Err(ApiError::forbidden(
                "this route needs the platform admin key",
            ))
        }
    }

    pub fn project(&self) -> &str {
        &self.0.project
    }
}

impl FromRequest for ApiKey {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let principal = authenticate(&req, CredentialKind::ApiKey).await?;
            Ok(ApiKey(principal))
        })
    }
}

/// A device token, checked on extraction: the calling device and its project.
#[derive(Debug, Clone)]
pub struct DeviceToken(pub Arc<Principal>);

impl DeviceToken {
    pub fn project(&self) -> &str {
        &self.0.project
    }

    pub fn device_id(&self) -> &str {
        &self.0.id
    }
}

impl FromRequest for DeviceToken {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let principal = authenticate(&req, CredentialKind::Device).await?;
            Ok(DeviceToken(principal))
        })
    }
}
