//! `migrate` and `healthcheck`: the commands a deployment runs around the services.

use std::time::Duration;

use fieldline_common::Config;

use super::client::{Failure, Result, failure_of};

/// Every service's migrations, in the order the services start; each takes the same
/// advisory lock as a starting service, so running it beside live services is safe.
pub async fn migrate() -> Result<()> {
    let config = Config::load().map_err(|error| Failure(format!("configuration: {error}")))?;
    let pool = fieldline_common::db::connect(&config)
        .await
        .map_err(|error| Failure(format!("{error:#}")))?;
    for (schema, result) in [
        ("registry", device_registry::migrate(&pool).await),
        ("telemetry", query_api::migrate(&pool).await),
        ("webhooks", webhook_dispatcher::migrate(&pool).await),
    ] {
        result.map_err(|error| Failure(format!("{error:#}")))?;
        eprintln!("schema {schema}: migrated");
    }
    Ok(())
}

/// 0 when `/health/ready` answers 2xx within `timeout` seconds.
pub async fn healthcheck(url: Option<String>, timeout: u64) -> Result<()> {
    let base = url
        .or_else(|| std::env::var("FIELDLINE_URL").ok())
        .filter(|url| !url.is_empty())
        .unwrap_or_else(local_url);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(timeout.max(1)))
        .build()?;
    let url = format!("{}/health/ready", base.trim_end_matches('/'));
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|error| Failure(format!("{url}: {}", Failure::from(error))))?;
    if response.status().is_success() {
        return Ok(());
    }
    Err(Failure(format!("{url}: {}", failure_of(response).await)))
}

/// This host's own listener (FIELDLINE_HTTP_ADDR, a wildcard address as loopback), as a
/// container's HEALTHCHECK runs beside the server it checks.
fn local_url() -> String {
    let addr = std::env::var("FIELDLINE_HTTP_ADDR").unwrap_or_default();
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        return "http://127.0.0.1:8080".into();
    };
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{ip}:{}", addr.port())
}
