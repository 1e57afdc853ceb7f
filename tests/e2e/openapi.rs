//! The OpenAPI document against the live platform: schemathesis fuzzes every operation from
//! it, and a client generated from it by openapi-python-client runs the README quickstart.
//! Both tools come from the venv `deploy/local/provision.sh` makes
//! (`$FIELDLINE_PYTOOLS`, default `${XDG_CACHE_HOME:-~/.cache}/fieldline/pytools`); without
//! it the tests fail and say how to make it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};

use crate::platform::Platform;

/// Cases schemathesis generates per operation and phase: enough to reach every status of
/// every route, bounded so that `make test` stays short.
const MAX_EXAMPLES: &str = "12";

fn pytools() -> PathBuf {
    let venv = std::env::var_os("FIELDLINE_PYTOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                    Path::new(&home).join(".cache")
                });
            cache.join("fieldline/pytools")
        });
    let bin = venv.join("bin");
    assert!(
        bin.join("schemathesis").exists() && bin.join("openapi-python-client").exists(),
        "schemathesis and openapi-python-client are not in {}: run `make provision` \
         (deploy/local/provision.sh makes the venv)",
        venv.display()
    );
    bin
}

fn scratch(name: &str, platform: &Platform) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", platform.env.id));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A project with an admin key, and one device with its token.
async fn project(platform: &Platform, slug: &str) -> (String, String) {
    let (status, body) = platform
        .post(
            "/api/v1/projects",
            platform.admin_key(),
            &json!({"slug": slug}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let key = body["data"]["admin_key"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = platform
        .post(
            "/api/v1/devices",
            &key,
            &json!({"id": "fuzz-device", "name": "Fuzz"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let token = body["data"]["token"].as_str().unwrap().to_owned();
    (key, token)
}

/// PATH with the venv first (the generator formats with its ruff).
fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn output(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("the tool starts");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The operations that revoke or replace the credential they are called with (schemathesis
/// learns ids from listings, so it finds its own key and device): run apart, on a project of
/// their own, so that the rest of the API is fuzzed with credentials that keep working.
const SELF_DESTRUCTIVE: [&str; 4] = [
    "delete_api_v1_keys_id",
    "post_api_v1_keys_id_rotate",
    "delete_api_v1_devices_id",
    "post_api_v1_devices_id_token",
];

/// The Server-Sent Events streams answer and then stay open (an hour, with a comment every
/// 15 s): schemathesis reads a whole body, so each case would last its request timeout. Their
/// answers, caps, resume and isolation are tested in query-api's `stream` tests.
const LIVE_STREAMS: [&str; 2] = [
    "get_api_v1_devices_id_readings_stream",
    "get_api_v1_events_stream",
];

/// Runs schemathesis with `--checks all` on the operations `selection` picks; the output if
/// anything failed.
fn schemathesis(
    platform: &Platform,
    bin: &Path,
    name: &str,
    key: &str,
    token: &str,
    selection: &[String],
) -> Result<String, String> {
    let dir = scratch(name, platform);
    // Each security scheme of the document with its credential. Positive cases may still be
    // refused for what a schema cannot say (a reading's time must be near now, a cursor must
    // be one the API issued, a rule names a device or a group, never both), so 400 and 422
    // count as accepting there, and 429 (the fuzzer sets the project's own rate limits
    // through PUT /api/v1/projects/{slug}/limits); a 5xx never does.
    let config = format!(
        r#"
[auth.openapi.apiKey]
bearer = "{key}"

[auth.openapi.deviceToken]
bearer = "{token}"

[auth.openapi.platformAdmin]
bearer = "{admin}"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "422", "429"]

# A long-poll holds the answer up to `wait` seconds by design: keep it short here.
[[operations]]
include-path = "/api/v1/ingest/commands"
parameters = {{ "query.wait" = 0 }}
"#,
        admin = platform.admin_key()
    );
    std::fs::write(dir.join("schemathesis.toml"), config).unwrap();
    let url = platform.url("/api/v1/openapi.json");
    let mut args = vec![
        "--no-color",
        "--config-file",
        "schemathesis.toml",
        "run",
        &url,
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        "18",
        // One worker: Python's regex parser is not safe across schemathesis' threads
        // ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "junit,har",
        "--report-dir",
        ".",
    ];
    args.extend(selection.iter().map(String::as_str));
    let (passed, text) = output(
        Command::new(bin.join("schemathesis"))
            .current_dir(&dir)
            .args(args),
    );
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(text)
    } else {
        Err(format!(
            "schemathesis found failures (reports in {}):\n{text}",
            dir.display()
        ))
    }
}

pub async fn schemathesis_finds_nothing(platform: &Platform) {
    let bin = pytools();
    let (key, token) = project(platform, "fuzz").await;
    let (other_key, other_token) = project(platform, "fuzz-keys").await;
    let mut rest = Vec::new();
    let mut destructive = Vec::new();
    for operation in SELF_DESTRUCTIVE {
        rest.extend(["--exclude-operation-id".to_owned(), operation.to_owned()]);
        destructive.extend(["--include-operation-id".to_owned(), operation.to_owned()]);
    }
    for operation in LIVE_STREAMS {
        rest.extend(["--exclude-operation-id".to_owned(), operation.to_owned()]);
    }
    let text = schemathesis(platform, &bin, "fl-schemathesis", &key, &token, &rest)
        .unwrap_or_else(|failures| panic!("{failures}"));
    // It really exercised the API: creates went through with its generated bodies. (A new
    // connection: the pooled one may have idled out while schemathesis ran.)
    let http = reqwest::Client::new();
    for listing in ["/api/v1/devices", "/api/v1/alert-rules", "/api/v1/webhooks"] {
        let answer: Value = http
            .get(platform.url(&format!("{listing}?limit=1000")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let created = answer["data"].as_array().map_or(0, Vec::len);
        // The project's own device is one of the devices.
        let before = usize::from(listing == "/api/v1/devices");
        assert!(
            created > before,
            "schemathesis created nothing under {listing}:\n{answer}\n{text}"
        );
    }
    schemathesis(
        platform,
        &bin,
        "fl-schemathesis-keys",
        &other_key,
        &other_token,
        &destructive,
    )
    .unwrap_or_else(|failures| panic!("{failures}"));
}

/// The README quickstart (steps 1 to 5 but MQTT) through the generated client: register a
/// device, send readings over HTTP with its token, read the history and the latest values,
/// a chart's aggregate, and the CSV export.
const QUICKSTART: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
from fieldline_client import AuthenticatedClient
from fieldline_client.api.device_registry import post_api_v1_devices, get_api_v1_devices_id
from fieldline_client.api.ingest_http import post_api_v1_ingest
from fieldline_client.api.query_api import (
    get_api_v1_devices_id_readings, get_api_v1_devices_id_readings_latest,
    get_api_v1_devices_id_readings_aggregate,
)
from fieldline_client.models import DeviceIn, DeviceType, Message, GetApiV1DevicesIdReadingsAggregateFill

base, key = sys.argv[2], sys.argv[3]
client = AuthenticatedClient(base_url=base, token=key)

# 1. Register a device; its token comes once.
created = post_api_v1_devices.sync(
    client=client, body=DeviceIn(id="greenhouse-1", type_=DeviceType.SENSOR, group="greenhouse"))
device = created.data
assert device.id == "greenhouse-1" and device.group == "greenhouse", created
assert device.token.startswith("fld_"), device.token

# 2. The device sends readings over HTTP.
as_device = AuthenticatedClient(base_url=base, token=device.token)
sent = post_api_v1_ingest.sync(
    client=as_device, body=Message.from_dict({"temperature": 21.5, "door_open": False, "fw": "1.2.0"}))
assert sent.data.accepted == 3 and sent.data.duplicate is False, sent

# 3. History and the latest values.
for _ in range(100):
    history = get_api_v1_devices_id_readings.sync(id="greenhouse-1", client=client, metric="temperature")
    if history.data:
        break
    time.sleep(0.1)
assert [r.to_dict()["value"] for r in history.data] == [21.5], history
assert history.page.next_cursor is None, history
latest = get_api_v1_devices_id_readings_latest.sync(id="greenhouse-1", client=client)
values = {r.metric: r.to_dict()["value"] for r in latest.data}
assert values == {"temperature": 21.5, "door_open": False, "fw": "1.2.0"}, values

# 4. A chart: the last 24 hours in 5-minute buckets.
chart = get_api_v1_devices_id_readings_aggregate.sync(
    id="greenhouse-1", client=client, metric="temperature", start="-24h", interval="5m",
    fn="avg,min,max", fill=GetApiV1DevicesIdReadingsAggregateFill.PREVIOUS)
series = chart.data.series
assert [s.metric for s in series] == ["temperature"], chart
filled = [b.to_dict() for b in series[0].buckets if b.to_dict().get("avg") is not None]
assert filled and filled[-1]["max"] == 21.5, filled[-3:]

# 5. The CSV export (a text answer: through the client's own HTTP session).
csv = client.get_httpx_client().get(
    "/api/v1/devices/greenhouse-1/readings", params={"start": "-7d"}, headers={"Accept": "text/csv"})
assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv"), csv
assert len(csv.text.strip().splitlines()) == 4, csv.text

fetched = get_api_v1_devices_id.sync(id="greenhouse-1", client=client)
assert fetched.data.status == "online", fetched
print("quickstart ok")
"#;

pub async fn generated_client_runs_the_quickstart(platform: &Platform) {
    let bin = pytools();
    let (key, _) = project(platform, "quickstart").await;
    let dir = scratch("fl-pyclient", platform);
    let (status, document) = platform.get("/api/v1/openapi.json", "").await;
    assert_eq!(status, 200);
    std::fs::write(dir.join("openapi.json"), document.to_string()).unwrap();
    let (generated, text) = output(
        Command::new(bin.join("openapi-python-client"))
            .current_dir(&dir)
            .args([
                "generate",
                "--path",
                "openapi.json",
                "--meta",
                "none",
                "--output-path",
                "fieldline_client",
            ])
            .env("PATH", path_with(&bin)),
    );
    assert!(generated, "openapi-python-client failed:\n{text}");
    std::fs::write(dir.join("quickstart.py"), QUICKSTART).unwrap();
    let (ran, text) = output(Command::new(bin.join("python")).current_dir(&dir).args([
        "quickstart.py",
        ".",
        &platform.url(""),
        &key,
    ]));
    assert!(ran && text.contains("quickstart ok"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/docs` renders the same document with the embedded Redoc: no CDN.
pub async fn docs_are_served_offline(platform: &Platform) {
    // A client of its own: the platform's pooled connection may have idled out meanwhile.
    let http = reqwest::Client::new();
    let page = http.get(platform.url("/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"spec-url="/api/v1/openapi.json""#),
        "{html}"
    );
    assert!(
        !html.contains("https://"),
        "the page loads nothing from outside: {html}"
    );
    let script = http
        .get(platform.url("/docs/redoc.standalone.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/javascript")
    );
    assert!(script.bytes().await.unwrap().len() > 500_000);
    // Another method on a documented path: 405 in the envelope, with the path's methods.
    let refused = http.delete(platform.url("/docs")).send().await.unwrap();
    assert_eq!(refused.status(), 405);
    assert_eq!(refused.headers()["allow"], "GET");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "method_not_allowed");
}
