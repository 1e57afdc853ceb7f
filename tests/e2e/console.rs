//! The console in a real headless Chromium against the real binary: `console/tests/
//! console.e2e.mjs` (playwright-core driving Debian's chromium) signs in, creates a device,
//! watches a reading reach the chart live, runs a webhook through delivery, disable, enable
//! and recover, rotates a key, and sees an alert fire on the overview.
//! `make console-shots` runs it with `SHOTS_DIR=docs/console` to refresh the README's images.

use std::{path::PathBuf, process::Command};

use crate::platform::Platform;

fn console_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../console")
}

#[tokio::test]
async fn the_console_runs_every_operator_flow_in_a_real_browser() {
    let dir = console_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "console/node_modules is missing: `make provision` (or `npm ci --prefix console`) installs it"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: `make provision` installs Debian's chromium"
    );
    let platform = Platform::one_process().await;
    let base = platform.url("/").trim_end_matches('/').to_owned();
    // The page and its assets, gzipped when asked, the page never cached.
    let page = platform
        .http
        .get(format!("{base}/"))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-encoding"], "gzip");
    assert_eq!(page.headers()["cache-control"], "no-cache");
    assert!(page.headers().contains_key("content-security-policy"));
    let (status, body) = platform.get("/assets/nothing-here.js", "").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["reason"], "asset_not_found");
    let admin = platform.admin_key().to_owned();
    let mut command = Command::new("node");
    command
        .arg("tests/console.e2e.mjs")
        .current_dir(&dir)
        .env("CONSOLE_URL", &base)
        .env("ADMIN_KEY", &admin);
    for name in ["SHOTS_DIR", "MEASURE"] {
        if let Some(value) = std::env::var_os(format!("FL_CONSOLE_{name}")) {
            command.env(name, value);
        }
    }
    let output = tokio::task::spawn_blocking(move || command.output().expect("node runs"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    platform.stop().await;
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("every flow passed"), "{stdout}");
}
