//! The SSRF guard: webhook URLs must not reach private, loopback or link-local addresses
//! (unless the operator allows it). Checked when a webhook is saved, and again before every
//! attempt: a host name by the HTTP client's resolver at each connection (every address it
//! resolves to, so a DNS answer that changes later, rebinding, is caught too), an IP literal
//! (which the client connects to without resolving) by [`check_target`]. The `url` crate
//! reads hosts as browsers do (WHATWG), so `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1`
//! are all 127.0.0.1 by the time they are checked.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Addresses a webhook may not reach.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 address stands for, where the network would carry it to that
/// IPv4 host: mapped (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`, deprecated but still
/// routed by some stacks) and 6to4 (`2002:aabb:ccdd::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = ip.segments();
    if segments[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return ip.to_ipv4();
    }
    if segments[0] == 0x2002 {
        let [a, b] = segments[1].to_be_bytes();
        let [c, d] = segments[2].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || (first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64 (and its local /48) to anywhere, incl. private v4
        || (first == 0x2001 && ip.segments()[1] == 0) // Teredo: a tunnel to an IPv4 host
        || (first == 0x0100 && ip.segments()[1..4] == [0; 3]) // discard-only
}

/// Checks a URL's host before an attempt when it is an IP literal (the resolver never sees
/// those); host names are checked by [`GuardedResolver`] at connection time. The error says
/// why the attempt is refused.
pub fn check_target(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err("the URL has no host".into()),
    };
    if is_forbidden(ip) {
        return Err(format!(
            "refused: {ip} is a private, loopback, link-local or reserved address \
             (FIELDLINE_WEBHOOK_ALLOW_PRIVATE is off)"
        ));
    }
    Ok(())
}

/// Resolves like the system, then keeps only allowed addresses; none left is an error.
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|addr| allow_private || !is_forbidden(addr.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(
                    format!("{host} resolves only to private or reserved addresses").into(),
                );
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

pub fn resolver(allow_private: bool) -> Arc<GuardedResolver> {
    Arc::new(GuardedResolver { allow_private })
}

/// Checks a URL when a webhook is saved: scheme, host, and (unless allowed) every address it
/// resolves to. The message names what is wrong.
pub async fn check_url(raw: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|error| format!("not a URL ({error})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be http or https".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use custom headers".into());
    }
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or("has no host")?;
    if raw.len() > 2048 {
        return Err("longer than 2048 characters".into());
    }
    if allow_private {
        return Ok(url);
    }
    let addrs: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        _ => tokio::net::lookup_host((host, 0))
            .await
            .map_err(|error| format!("host {host} does not resolve ({error})"))?
            .map(|addr| addr.ip())
            .collect(),
    };
    if addrs.iter().any(|ip| is_forbidden(*ip)) {
        return Err(format!(
            "host {host} resolves to a private, loopback or link-local address"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001:0:4136:e378::1",
            "fec0::1",
            "::",
            "100::1",
        ] {
            assert!(is_forbidden(ip.parse().unwrap()), "{ip} allowed");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "2002:5db8:d822::1",
        ] {
            assert!(!is_forbidden(ip.parse().unwrap()), "{ip} refused");
        }
    }

    #[test]
    fn ip_literals_are_checked_in_every_spelling_before_an_attempt() {
        for url in [
            "http://127.0.0.1:9/",
            "http://2130706433:9/",
            "http://0x7f.1:9/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://0.0.0.0/",
            "http://0/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]:9/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[2002:7f00:1::]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[fd12:3456::1]/",
            "http://[fe80::1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://0xa9fea9fe/",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            let error = check_target(&parsed, false).unwrap_err();
            assert!(error.starts_with("refused:"), "{url}: {error}");
            assert!(check_target(&parsed, true).is_ok(), "{url}");
        }
        for url in [
            "https://1.1.1.1/",
            "http://example.com/",
            "http://[2606:4700::1111]/",
        ] {
            assert!(
                check_target(&reqwest::Url::parse(url).unwrap(), false).is_ok(),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn urls_are_checked_when_saved() {
        assert!(check_url("http://2130706433:9/hook", false).await.is_err());
        assert!(check_url("http://0x7f.1:9/hook", false).await.is_err());
        assert!(
            check_url("http://[::ffff:127.0.0.1]:9/", false)
                .await
                .is_err()
        );
        assert!(check_url("ftp://example.com/", false).await.is_err());
        assert!(check_url("http://127.0.0.1:9/hook", false).await.is_err());
        assert!(check_url("http://[::1]/hook", false).await.is_err());
        assert!(check_url("http://localhost/hook", false).await.is_err());
        assert!(check_url("http://user:pw@1.1.1.1/", false).await.is_err());
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
        assert!(check_url("https://1.1.1.1/hook", false).await.is_ok());
    }
}
