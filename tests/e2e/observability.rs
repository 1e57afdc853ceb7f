//! What an operator scrapes: every service's `/metrics` passes `promtool check metrics`
//! (HELP and TYPE on every family, names and units as Prometheus lints them), and carries the
//! build and process families.

use std::{io::Write as _, process::Stdio};

use serde_json::json;

use crate::platform::{Platform, SERVICES};

#[tokio::test]
async fn every_services_metrics_pass_promtool_and_carry_build_and_process_families() {
    let platform = Platform::split().await;
    // A little traffic, so that the request, ingest and writer families have samples.
    let (status, device) = platform
        .post(
            "/api/v1/devices",
            platform.admin_key(),
            &json!({"id": "m1"}),
        )
        .await;
    assert!(status.is_success(), "{device}");
    let token = device["data"]["token"].as_str().unwrap().to_owned();
    let (status, body) = platform
        .post("/api/v1/ingest", &token, &json!({"temp": 20.5}))
        .await;
    assert!(status.is_success(), "{body}");
    let promtool = which("promtool");
    for service in SERVICES {
        let text = platform.metrics(service).await;
        for family in [
            "# HELP fieldline_build_info ",
            "fieldline_build_info{",
            "# HELP process_resident_memory_bytes ",
            "# HELP process_open_fds ",
            "# HELP process_cpu_seconds_total ",
        ] {
            assert!(text.contains(family), "{service}: no {family}\n{text}");
        }
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool check metrics failed for {service}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    platform.stop().await;
}

/// promtool comes with Debian's `prometheus` package, which `make test` provisions.
pub fn which(binary: &str) -> String {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
    {
        let path = std::path::Path::new(dir).join(binary);
        if path.is_file() {
            return path.display().to_string();
        }
    }
    panic!("{binary} not found: `make test` provisions it (Debian package prometheus)");
}
