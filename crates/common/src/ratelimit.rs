//! Rate limits, held in each process with governor's GCRA: per API key, per device, and per
//! client address for failed authentication. Why in-process and keyed this way:
//! docs/decisions/2026-12-04-rate-limits.md.
//!
//! Memory stays bounded: limiter state is keyed by a 64-bit hash (never the caller's strings),
//! key and device state exists only for credentials the registry accepted, a sweep drops every
//! key whose allowance has refilled, and the per-address state is cut back when a flood of
//! addresses pushes it past [`MAX_TRACKED_ADDRESSES`].

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use actix_web::{
    HttpRequest,
    http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER},
};
use governor::{
    Quota, RateLimiter, clock::Clock, middleware::StateInformationMiddleware,
    state::keyed::DashMapStateStore,
};
use ipnet::IpNet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    error::{ApiError, ErrorKind},
};

/// Addresses with failed authentications tracked at once; past this (a flood from many
/// addresses) the settled ones are swept at once, and if that is not enough the state starts
/// afresh rather than grow.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// How often limiter state whose allowance has refilled is dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// One warning per device in this long, however many of its messages are dropped.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `requests` per `period`; the whole allowance may be used at once, then it refills evenly
/// (one request every `period / requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    requests: u32,
    period: Duration,
}

impl Limit {
    /// `RateLimit-Policy`: `{requests};w={seconds}`. Kept per worker thread for the last limit
    /// written, which on one route is nearly always the same one.
    fn policy(self) -> Option<HeaderValue> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<(Limit, HeaderValue)>> =
                const { std::cell::RefCell::new(None) };
        }
        LAST.with_borrow_mut(|last| {
            if let Some((limit, value)) = last
                && *limit == self
            {
                return Some(value.clone());
            }
            let policy = format!("{};w={}", self.requests, self.period.as_secs().max(1));
            let value = HeaderValue::from_str(&policy).ok()?;
            *last = Some((self, value.clone()));
            Some(value)
        })
    }

    /// A limit of at least one request in a period of at least 1 ms and at most a day.
    pub fn new(requests: u32, period: Duration) -> Result<Self, String> {
        if requests == 0 || requests > 1_000_000 {
            return Err(format!("{requests} requests: use 1 to 1000000"));
        }
        if period < Duration::from_millis(1) || period > Duration::from_secs(86_400) {
            return Err(format!("period {period:?}: use 1ms to 24h"));
        }
        Ok(Self { requests, period })
    }

    pub fn requests(&self) -> u32 {
        self.requests
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.requests).unwrap_or(NonZeroU32::MIN);
        // `new` keeps the interval at 1 ns or more (1 ms / 10^6), so `with_period` cannot
        // refuse it.
        let interval = (self.period / self.requests).max(Duration::from_nanos(1));
        Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst)
    }

    /// The bus form of an override.
    pub fn to_proto(self) -> fieldline_proto::v1::RateLimit {
        fieldline_proto::v1::RateLimit {
            requests: self.requests,
            period_ms: self.period.as_millis() as u64,
        }
    }

    /// An override from the bus; `None` (the platform default) when absent or invalid.
    pub fn from_proto(limit: Option<&fieldline_proto::v1::RateLimit>) -> Option<Self> {
        let limit = limit?;
        Self::new(limit.requests, Duration::from_millis(limit.period_ms)).ok()
    }
}

/// What a limit said of one request, and what the `RateLimit-*` headers tell the client
/// (draft-ietf-httpapi-ratelimit-headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub limit: Limit,
    /// Requests left right now.
    pub remaining: u32,
    /// Until the whole allowance is back (allowed), or until the next request may come
    /// (refused).
    pub reset: Duration,
    /// Whether the request may go on.
    pub allowed: bool,
}

impl Decision {
    /// Whole seconds, rounded up, so a client that waits this long is let in.
    fn reset_seconds(&self) -> u64 {
        let nanos = self.reset.as_nanos();
        nanos.div_ceil(1_000_000_000) as u64
    }

    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and `RateLimit-Policy`,
    /// and `Retry-After` when refused. On every response of a limited route: the numbers go
    /// in without a `String` each.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
        const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
        let reset = self.reset_seconds();
        headers.insert(LIMIT, HeaderValue::from(self.limit.requests));
        headers.insert(REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RESET, HeaderValue::from(reset));
        if let Some(policy) = self.limit.policy() {
            headers.insert(POLICY, policy);
        }
        if !self.allowed {
            headers.insert(RETRY_AFTER, HeaderValue::from(reset.max(1)));
        }
    }

    /// The 429 of a refused decision; `whose` names the limit ("this API key").
    pub fn error(&self, whose: &str) -> ApiError {
        let retry_in = self.reset_seconds().max(1);
        ApiError::new(
            ErrorKind::RateLimited,
            "rate_limited",
            format!(
                "rate limit of {} requests per {} for {whose} exceeded; retry in {retry_in} s",
                self.limit.requests,
                humantime_serde::re::humantime::format_duration(self.limit.period),
            ),
        )
        .with_retry_after(retry_in)
    }
}

type KeyedLimiter = RateLimiter<
    u64,
    DashMapStateStore<u64>,
    governor::clock::DefaultClock,
    StateInformationMiddleware,
>;

/// The keyed limiters of one kind, one per distinct limit in use (the default and each
/// project override): governor holds one quota per limiter.
#[derive(Default)]
struct Limiters {
    by_limit: RwLock<HashMap<Limit, Arc<KeyedLimiter>>>,
}

impl Limiters {
    fn limiter(&self, limit: Limit) -> Arc<KeyedLimiter> {
        if let Some(limiter) = self
            .by_limit
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&limit)
        {
            return limiter.clone();
        }
        self.by_limit
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(limit)
            .or_insert_with(|| {
                Arc::new(
                    RateLimiter::dashmap(limit.quota())
                        .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone()
    }

    fn check(&self, key: u64, limit: Limit) -> Decision {
        let limiter = self.limiter(limit);
        let interval = limit.quota().replenish_interval();
        match limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(limit.requests);
                Decision {
                    limit,
                    remaining,
                    reset: interval * (limit.requests - remaining),
                    allowed: true,
                }
            }
            Err(not_until) => Decision {
                limit,
                remaining: 0,
                reset: not_until.wait_time_from(limiter.clock().now()),
                allowed: false,
            },
        }
    }

    /// Drops the state of keys whose allowance has refilled, and the limiters of overrides
    /// nobody uses any more. Returns the keys still tracked. Checks go on meanwhile: the lock
    /// is held only to list and to remove.
    fn sweep(&self) -> usize {
        let limiters: Vec<(Limit, Arc<KeyedLimiter>)> = self
            .by_limit
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(limit, limiter)| (*limit, limiter.clone()))
            .collect();
        let mut tracked = 0;
        let mut unused = Vec::new();
        for (limit, limiter) in limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            match limiter.len() {
                0 => unused.push(limit),
                keys => tracked += keys,
            }
        }
        if !unused.is_empty() {
            let mut map = self
                .by_limit
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for limit in unused {
                // A key counted since is lost with its limiter: it starts afresh, no worse.
                map.remove(&limit);
            }
        }
        tracked
    }

    fn clear(&self) {
        self.by_limit
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Where a device's traffic is counted: its HTTP requests and its MQTT messages each have
/// the device limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Http,
    Mqtt,
}

/// The limits of one process, shared by its services. Cheap to clone.
#[derive(Clone)]
pub struct RateLimits {
    inner: Arc<Inner>,
}

struct Inner {
    key_default: Limit,
    device_default: Limit,
    failure_limit: Limit,
    keys: Limiters,
    devices: Limiters,
    failures: Limiters,
    /// Addresses refused for failed authentications, until when: checked before a credential
    /// is sent to the registry (governor cannot look without counting).
    blocked: moka::sync::Cache<u64, Instant>,
    failures_counted: AtomicU64,
    drop_logs: Limiters,
    trusted_proxies: Vec<IpNet>,
    /// Keys are hashed with a per-process random key, so nobody can choose ids that collide.
    hasher: RandomState,
}

/// `10.0.0.0/8, 172.16.0.5`: CIDR blocks or single addresses.
pub fn parse_proxies(proxies: &str) -> Result<Vec<IpNet>, String> {
    proxies
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{entry:?} is not an address or CIDR block"))
        })
        .collect()
}

/// The key of an address: IPv4 (also when mapped into IPv6) whole, IPv6 by its /64, the
/// block one host is usually given.
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl RateLimits {
    /// The limits of `config` (validated at load).
    pub fn new(config: &Config) -> Self {
        let limit = |requests, period| {
            Limit::new(requests, period).unwrap_or(Limit {
                requests: 1,
                period: Duration::from_secs(1),
            })
        };
        let failure_limit = limit(config.rate_auth_failures, config.rate_auth_failures_period);
        Self {
            inner: Arc::new(Inner {
                key_default: limit(config.rate_key_requests, config.rate_key_period),
                device_default: limit(config.rate_device_requests, config.rate_device_period),
                failure_limit,
                keys: Limiters::default(),
                devices: Limiters::default(),
                failures: Limiters::default(),
                blocked: moka::sync::Cache::builder()
                    .max_capacity(MAX_TRACKED_ADDRESSES as u64)
                    .time_to_live(failure_limit.period)
                    .build(),
                failures_counted: AtomicU64::new(0),
                drop_logs: Limiters::default(),
                trusted_proxies: parse_proxies(&config.rate_trusted_proxies).unwrap_or_default(),
                hasher: RandomState::new(),
            }),
        }
    }

    fn hash(&self, value: impl Hash) -> u64 {
        self.inner.hasher.hash_one(value)
    }

    /// The limit of an API key: its project's override, or the default.
    pub fn key_limit(&self, project_override: Option<Limit>) -> Limit {
        project_override.unwrap_or(self.inner.key_default)
    }

    /// The limit of a device: its project's override, or the default.
    pub fn device_limit(&self, project_override: Option<Limit>) -> Limit {
        project_override.unwrap_or(self.inner.device_default)
    }

    /// Counts one request of API key `key_id`.
    pub fn check_key(&self, key_id: &str, project_override: Option<Limit>) -> Decision {
        let limit = self.key_limit(project_override);
        self.inner.keys.check(self.hash(key_id), limit)
    }

    /// Counts one request of a device on the HTTP ingest routes, or (`channel`
    /// [`Channel::Mqtt`]) one of its MQTT messages: the two are counted apart, also when one
    /// process runs both edges.
    pub fn check_device(
        &self,
        channel: Channel,
        project: &str,
        device_id: &str,
        project_override: Option<Limit>,
    ) -> Decision {
        let limit = self.device_limit(project_override);
        self.inner
            .devices
            .check(self.hash((channel, project, device_id)), limit)
    }

    /// Whether a drop of this device's message should be logged: once per
    /// [`DROP_LOG_INTERVAL`], so a flood of drops is a counter, not a flood of lines.
    pub fn should_log_drop(&self, project: &str, device_id: &str) -> bool {
        let once = Limit {
            requests: 1,
            period: DROP_LOG_INTERVAL,
        };
        self.inner
            .drop_logs
            .check(self.hash((project, device_id)), once)
            .allowed
    }

    /// The refusal of an address that failed authentication too often, while it lasts.
    pub fn blocked(&self, address: IpAddr) -> Option<Decision> {
        let key = self.hash(address_key(address));
        let until = self.inner.blocked.get(&key)?;
        let wait = until.checked_duration_since(Instant::now())?;
        Some(Decision {
            limit: self.inner.failure_limit,
            remaining: 0,
            reset: wait,
            allowed: false,
        })
    }

    /// Counts one failed authentication of `address`; a refusal blocks the address until its
    /// allowance has room again.
    pub fn record_failure(&self, address: IpAddr) -> Decision {
        let inner = &self.inner;
        let key = self.hash(address_key(address));
        if inner.failures_counted.fetch_add(1, Ordering::Relaxed) % 1024 == 1023
            && inner.failures.sweep() > MAX_TRACKED_ADDRESSES
        {
            tracing::warn!(
                max = MAX_TRACKED_ADDRESSES,
                "failed authentications from too many addresses to track; starting afresh"
            );
            inner.failures.clear();
        }
        let decision = inner.failures.check(key, inner.failure_limit);
        if !decision.allowed {
            inner.blocked.insert(key, Instant::now() + decision.reset);
        }
        decision
    }

    /// The client's address: the peer, or when the peer is a trusted proxy, the nearest
    /// address in `X-Forwarded-For` that is not one.
    pub fn client_address(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        let trusted = |address: &IpAddr| {
            self.inner
                .trusted_proxies
                .iter()
                .any(|net| net.contains(address))
        };
        if !trusted(&peer) {
            return Some(peer);
        }
        let forwarded: Vec<&str> = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        let mut client = peer;
        for entry in forwarded.iter().rev() {
            let Ok(address) = entry.trim().parse::<IpAddr>() else {
                break;
            };
            client = address;
            if !trusted(&address) {
                break;
            }
        }
        Some(client)
    }

    /// Drops state whose allowance has refilled.
    pub fn sweep(&self) {
        let inner = &self.inner;
        let keys = inner.keys.sweep();
        let devices = inner.devices.sweep();
        let addresses = inner.failures.sweep();
        inner.drop_logs.sweep();
        inner.blocked.run_pending_tasks();
        metrics::gauge!("fieldline_rate_limit_tracked", "kind" => "key").set(keys as f64);
        metrics::gauge!("fieldline_rate_limit_tracked", "kind" => "device").set(devices as f64);
        metrics::gauge!("fieldline_rate_limit_tracked", "kind" => "address").set(addresses as f64);
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until shutdown.
    pub fn spawn_sweeper(&self, tasks: &TaskTracker, shutdown: CancellationToken) {
        let limits = self.clone();
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticks.tick() => limits.sweep(),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tweak: impl FnOnce(&mut Config)) -> RateLimits {
        let mut config = Config::default();
        tweak(&mut config);
        RateLimits::new(&config)
    }

    #[test]
    fn a_key_gets_its_allowance_then_429_with_the_wait() {
        let limits = limits(|config| {
            config.rate_key_requests = 3;
            config.rate_key_period = Duration::from_secs(30);
        });
        let decisions: Vec<Decision> = (0..4).map(|_| limits.check_key("key_a", None)).collect();
        assert_eq!(
            decisions.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert!(decisions[..3].iter().all(|d| d.allowed));
        let refused = decisions[3];
        assert!(!refused.allowed);
        assert!(refused.reset > Duration::from_secs(9), "{refused:?}");
        assert!(refused.reset <= Duration::from_secs(10), "{refused:?}");
        // Another key has its own allowance; an override is a limit of its own.
        assert!(limits.check_key("key_b", None).allowed);
        let wider = Limit::new(10, Duration::from_secs(30)).unwrap();
        assert_eq!(limits.check_key("key_a", Some(wider)).remaining, 9);

        let mut headers = HeaderMap::new();
        refused.write_headers(&mut headers);
        assert_eq!(headers.get("ratelimit-limit").unwrap(), "3");
        assert_eq!(headers.get("ratelimit-remaining").unwrap(), "0");
        assert_eq!(headers.get("ratelimit-reset").unwrap(), "10");
        assert_eq!(headers.get("retry-after").unwrap(), "10");
        assert_eq!(headers.get("ratelimit-policy").unwrap(), "3;w=30");
    }

    #[test]
    fn a_blocked_address_stays_blocked_until_its_allowance_has_room() {
        let limits = limits(|config| {
            config.rate_auth_failures = 2;
            config.rate_auth_failures_period = Duration::from_secs(60);
        });
        let address: IpAddr = "2001:db8::1".parse().unwrap();
        let neighbour: IpAddr = "2001:db8::2:1".parse().unwrap();
        assert!(limits.blocked(address).is_none());
        assert!(limits.record_failure(address).allowed);
        assert!(limits.record_failure(neighbour).allowed, "same /64");
        assert!(!limits.record_failure(address).allowed);
        let blocked = limits.blocked(neighbour).expect("blocked");
        assert!(blocked.reset > Duration::from_secs(29), "{blocked:?}");
        assert!(limits.blocked("2001:db8:0:1::1".parse().unwrap()).is_none());
        assert!(limits.blocked("192.0.2.1".parse().unwrap()).is_none());
    }

    #[test]
    fn state_of_refilled_keys_is_swept() {
        let limits = limits(|config| {
            // Refilled after 500 ms; governor forgets a key one interval later.
            config.rate_device_requests = 2;
            config.rate_device_period = Duration::from_secs(1);
        });
        for device in 0..1000 {
            limits.check_device(Channel::Http, "p", &device.to_string(), None);
        }
        assert_eq!(limits.inner.devices.sweep(), 1000);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(limits.inner.devices.sweep(), 0);
        assert!(limits.inner.devices.by_limit.read().unwrap().is_empty());
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_address() {
        use actix_web::test::TestRequest;
        let limits = limits(|config| config.rate_trusted_proxies = "10.0.0.0/8".into());
        let request = |peer: &str, forwarded: Option<&str>| {
            let mut request = TestRequest::default().peer_addr(peer.parse().unwrap());
            if let Some(forwarded) = forwarded {
                request = request.insert_header(("x-forwarded-for", forwarded));
            }
            limits.client_address(&request.to_http_request()).unwrap()
        };
        let ip = |address: &str| address.parse::<IpAddr>().unwrap();
        // A peer that is not a proxy speaks for itself, whatever it forwards.
        assert_eq!(
            request("192.0.2.1:5000", Some("203.0.113.9")),
            ip("192.0.2.1")
        );
        // Through the gateway (and a second proxy), the first untrusted hop from the right;
        // what the client wrote further left is not believed.
        assert_eq!(
            request("10.0.0.2:5000", Some("1.1.1.1, 203.0.113.9, 10.0.0.3")),
            ip("203.0.113.9")
        );
        assert_eq!(request("10.0.0.2:5000", None), ip("10.0.0.2"));
        assert_eq!(request("10.0.0.2:5000", Some("garbage")), ip("10.0.0.2"));
    }

    #[test]
    fn proxies_parse_and_address_keys_group_ipv6_by_64() {
        assert_eq!(parse_proxies(" 10.0.0.0/8, 127.0.0.1 ,").unwrap().len(), 2);
        assert!(parse_proxies("10.0.0.0/33").is_err());
        assert_eq!(
            address_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            address_key("2001:db8::dead:beef".parse().unwrap()),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
    }
}
