//! The admin CLI: the real `fieldline` binary's subcommands against the real platform, as a
//! script would run them (FIELDLINE_URL and FIELDLINE_API_KEY, JSON output parsed).

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use fieldline_testkit::{TestEnv, eventually, receiver::Receiver, servers::free_port};
use serde_json::Value;

use crate::platform::Platform;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.stdout))
    }
}

fn finished(output: Output) -> Run {
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `fieldline <args>` with only the given environment.
async fn run_with(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fieldline"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    finished(output)
}

/// `fieldline <args>` against the platform with its admin key.
async fn cli(platform: &Platform, args: &[&str]) -> Run {
    cli_as(platform, platform.admin_key(), args).await
}

async fn cli_as(platform: &Platform, key: &str, args: &[&str]) -> Run {
    let url = platform.url("");
    run_with(&[("FIELDLINE_URL", &url), ("FIELDLINE_API_KEY", key)], args).await
}

fn ids(items: &Value) -> Vec<&str> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect()
}

/// Devices and keys: create, list, get, rotate, revoke, delete; a wrong key and a missing
/// device exit 1 with the API's message; table output names what it lists.
#[tokio::test]
async fn cli_devices_and_keys() {
    let platform = Platform::one_process().await;

    let created = cli(
        &platform,
        &[
            "devices", "create", "pump-1", "--group", "pumps", "--tag", "roof", "--tag", "north",
            "-o", "json",
        ],
    )
    .await
    .json();
    assert_eq!(created["id"], "pump-1");
    assert_eq!(created["tags"], serde_json::json!(["roof", "north"]));
    let token = created["token"].as_str().unwrap().to_owned();
    cli(&platform, &["devices", "create", "pump-2", "-o", "json"])
        .await
        .json();

    let listed = cli(
        &platform,
        &["devices", "list", "--group", "pumps", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(ids(&listed), ["pump-1"]);
    // Pages of one, followed to the end.
    let all = cli(
        &platform,
        &["devices", "list", "--limit", "1", "--all", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(ids(&all), ["pump-1", "pump-2"]);
    let first_page = cli(
        &platform,
        &["devices", "list", "--limit", "1", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(ids(&first_page), ["pump-1"]);
    let table = cli(&platform, &["devices", "list"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("pump-2") && table.stdout.contains("status"));

    let rotated = cli(
        &platform,
        &["devices", "rotate-token", "pump-1", "-o", "json"],
    )
    .await
    .json();
    let new_token = rotated["token"].as_str().unwrap();
    assert_ne!(new_token, token);
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &serde_json::json!({"t": 1}))
        .await;
    assert_eq!(status, 401, "the old token is refused");

    // A wrong key: exit 1 and the envelope's message on stderr, nothing on stdout.
    let refused = cli_as(&platform, "flk_not_a_key", &["devices", "list"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stdout.is_empty());
    assert!(
        refused.stderr.starts_with("error: ") && refused.stderr.contains("(401 "),
        "{}",
        refused.stderr
    );
    let (_, body) = platform.get("/api/v1/devices", "flk_not_a_key").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(refused.stderr.contains(message), "{}", refused.stderr);
    // No key at all: said before anything is sent.
    let url = platform.url("");
    let keyless = run_with(&[("FIELDLINE_URL", &url)], &["devices", "list"]).await;
    assert_eq!(keyless.code, 1);
    assert!(
        keyless.stderr.contains("FIELDLINE_API_KEY"),
        "{}",
        keyless.stderr
    );

    let deleted = cli(&platform, &["devices", "delete", "pump-2", "-o", "json"])
        .await
        .json();
    assert_eq!(deleted["deleted"], "pump-2");
    let missing = cli(&platform, &["devices", "get", "pump-2"]).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("404 device_not_found"),
        "{}",
        missing.stderr
    );
    let got = cli(&platform, &["devices", "get", "pump-1"]).await;
    assert_eq!(got.code, 0);
    assert!(got.stdout.contains("pump-1") && got.stdout.contains("pumps"));

    // Keys: a read key lists but cannot create; rotated with no grace, the old secret stops;
    // revoked, the new one too.
    let key = cli(
        &platform,
        &[
            "keys",
            "create",
            "ci-reader",
            "--scope",
            "read",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let key_id = key["id"].as_str().unwrap().to_owned();
    let secret = key["secret"].as_str().unwrap().to_owned();
    assert_eq!(key["scopes"], serde_json::json!(["read"]));
    let keys = cli(&platform, &["keys", "list", "-o", "json"]).await.json();
    assert!(ids(&keys).contains(&key_id.as_str()));
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|key| key.get("secret").is_none())
    );
    cli_as(&platform, &secret, &["devices", "list", "-o", "json"])
        .await
        .json();
    let forbidden = cli_as(&platform, &secret, &["devices", "create", "nope"]).await;
    assert_eq!(forbidden.code, 1);
    assert!(forbidden.stderr.contains("(403 "), "{}", forbidden.stderr);
    let rotated = cli(
        &platform,
        &[
            "keys",
            "rotate",
            &key_id,
            "--grace-seconds",
            "0",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let new_id = rotated["id"].as_str().unwrap().to_owned();
    eventually(
        "the old secret refused",
        Duration::from_secs(10),
        || async {
            let run = cli_as(&platform, &secret, &["devices", "list"]).await;
            (run.code == 1).then_some(())
        },
    )
    .await;
    cli_as(&platform, &new_secret, &["devices", "list", "-o", "json"])
        .await
        .json();
    let revoked = cli(&platform, &["keys", "revoke", &new_id, "-o", "json"])
        .await
        .json();
    assert_eq!(revoked["deleted"], new_id.as_str());
    eventually(
        "the revoked key refused",
        Duration::from_secs(10),
        || async {
            let run = cli_as(&platform, &new_secret, &["devices", "list"]).await;
            (run.code == 1 && run.stderr.contains("(401 ")).then_some(())
        },
    )
    .await;
    platform.stop().await;
}

/// Webhooks: create (a generated whsec_ secret), test against a receiver, the delivery log,
/// recover; alerts: a rule made by the CLI fires and is listed.
#[tokio::test]
async fn cli_webhooks_and_alerts() {
    let platform = Platform::one_process().await;
    let receiver = Receiver::start().await;
    let url = receiver.url("/hook");
    let webhook = cli(
        &platform,
        &[
            "webhooks",
            "create",
            &url,
            "--event",
            "device.alert,device.data",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let webhook_id = webhook["id"].as_str().unwrap().to_owned();
    assert!(webhook["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(
        webhook["events"],
        serde_json::json!(["device.alert", "device.data"])
    );
    let listed = cli(&platform, &["webhooks", "list", "-o", "json"])
        .await
        .json();
    assert_eq!(ids(&listed), [webhook_id.as_str()]);

    let tested = cli(&platform, &["webhooks", "test", &webhook_id, "-o", "json"])
        .await
        .json();
    assert_eq!(tested["attempt"]["status_code"], 200, "{tested}");
    assert_eq!(receiver.received("/hook").len(), 1);
    let deliveries = cli(
        &platform,
        &["webhooks", "deliveries", &webhook_id, "-o", "json"],
    )
    .await
    .json();
    let deliveries = deliveries.as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0]["event"], "webhook.test");
    assert_eq!(deliveries[0]["status"], "succeeded");
    let table = cli(&platform, &["webhooks", "deliveries", &webhook_id]).await;
    assert!(table.stdout.contains("webhook.test"), "{}", table.stdout);
    let recovered = cli(
        &platform,
        &[
            "webhooks",
            "recover",
            &webhook_id,
            "--since",
            "-1h",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(recovered["requeued"], 0);
    let bad = cli(
        &platform,
        &[
            "webhooks",
            "recover",
            &webhook_id,
            "--since",
            "yesterday-ish",
        ],
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("(400 "), "{}", bad.stderr);

    // An alert rule made by the CLI fires on a reading and reaches the webhook.
    let device = cli(&platform, &["devices", "create", "tank-1", "-o", "json"])
        .await
        .json();
    let token = device["token"].as_str().unwrap().to_owned();
    let rule = cli(
        &platform,
        &[
            "alerts",
            "create-rule",
            "overflow",
            "--device",
            "tank-1",
            "--metric",
            "level",
            "--op",
            "gt",
            "--threshold",
            "-5",
            "--severity",
            "critical",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let rule_id = rule["id"].as_str().unwrap().to_owned();
    assert_eq!(rule["threshold"], -5.0);
    let rules = cli(
        &platform,
        &["alerts", "rules", "--device", "tank-1", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(ids(&rules), [rule_id.as_str()]);
    let wrong_op = cli(
        &platform,
        &[
            "alerts",
            "create-rule",
            "x",
            "--device",
            "tank-1",
            "--metric",
            "m",
            "--op",
            "bigger",
            "--threshold",
            "1",
        ],
    )
    .await;
    assert_eq!(wrong_op.code, 2, "clap refuses it: {}", wrong_op.stderr);
    let (status, _) = platform
        .post("/api/v1/ingest", &token, &serde_json::json!({"level": 3.5}))
        .await;
    assert_eq!(status, 202);
    eventually("the alert delivered", Duration::from_secs(20), || async {
        receiver
            .received("/hook")
            .iter()
            .any(|request| request.json()["event"] == "device.alert")
            .then_some(())
    })
    .await;
    // The alerts firing now: `GET /api/v1/alerts` (the console's route). Where this branch
    // does not have it yet, the command fails with the API's 404 instead.
    let firing = cli(&platform, &["alerts", "list", "-o", "json"]).await;
    if firing.code == 0 {
        let firing = firing.json();
        assert!(
            firing
                .as_array()
                .unwrap()
                .iter()
                .any(|alert| alert["device_id"] == "tank-1" && alert["rule_id"] == rule_id.as_str()),
            "{firing}"
        );
    } else {
        assert!(
            firing.stderr.contains("(404 route_not_found)"),
            "{}",
            firing.stderr
        );
    }
    let removed = cli(
        &platform,
        &["alerts", "delete-rule", &rule_id, "-o", "json"],
    )
    .await
    .json();
    assert_eq!(removed["deleted"], rule_id.as_str());
    let deleted = cli(
        &platform,
        &["webhooks", "delete", &webhook_id, "-o", "json"],
    )
    .await
    .json();
    assert_eq!(deleted["deleted"], webhook_id.as_str());
    receiver.stop().await;
    platform.stop().await;
}

/// An import that meets a busy backfill route (one place, no wait for it, kept busy for 3 s)
/// waits out each 503 for its `Retry-After` and sends the batch again: the whole file is
/// stored.
#[tokio::test]
async fn cli_import_waits_out_a_busy_backfill_route() {
    let platform = Platform::one_process_with(&[
        ("FIELDLINE_BACKFILL_CONCURRENCY", "1"),
        ("FIELDLINE_BACKFILL_WAIT", "0s"),
    ])
    .await;
    for device in ["meter-1", "busy-1"] {
        cli(&platform, &["devices", "create", device, "-o", "json"])
            .await
            .json();
    }
    // One day of one reading a minute: 1,440 rows, in 15 batches.
    let start = 1_700_000_000_000i64 - 1_700_000_000_000 % 86_400_000;
    let mut csv = String::from("ts,power\n");
    for step in 0..1440i64 {
        csv.push_str(&format!("{},{}\n", start + step * 60_000, step % 89));
    }
    let dir = std::env::temp_dir().join(format!("fieldline-cli-busy-{}", platform.env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("meter.csv");
    std::fs::write(&file, csv).unwrap();
    // Two clients keep the only place busy with 2 MB imports of another device, whose last
    // row is bad: the whole body is parsed, holding the place, then refused, storing nothing.
    let mut busy_csv = String::from("ts,a,b,c\n");
    let mut step = 0i64;
    while busy_csv.len() < 2 << 20 {
        let ts = start + step * 1_000;
        busy_csv.push_str(&format!("{ts},{step}.25,{}.5,{}\n", step % 1000, step % 7));
        step += 1;
    }
    busy_csv.push_str("not a time,1,2,3\n");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (http, url, key) = (
            platform.http.clone(),
            platform.url("/api/v1/devices/busy-1/readings"),
            platform.admin_key().to_owned(),
        );
        let (body, stop) = (busy_csv.clone(), stop.clone());
        busy.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _ = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "text/csv")
                    .body(body.clone())
                    .send()
                    .await;
            }
        }));
    }
    // The import starts while the place is taken, and the busy clients stop 3 s later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (url, key) = (platform.url(""), platform.admin_key().to_owned());
    let file_path = file.to_str().unwrap().to_owned();
    let import = tokio::spawn(async move {
        run_with(
            &[("FIELDLINE_URL", &url), ("FIELDLINE_API_KEY", &key)],
            &[
                "readings",
                "import",
                "meter-1",
                &file_path,
                "--batch-rows",
                "100",
                "-o",
                "json",
            ],
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for task in busy {
        task.await.unwrap();
    }
    let imported = import.await.unwrap();
    let summary = imported.json();
    assert_eq!(summary["rows"], 1440, "{}", imported.stderr);
    assert_eq!(summary["accepted"], 1440, "{}", imported.stderr);
    assert!(
        imported.stderr.contains("too_many_backfills")
            && imported.stderr.contains("sending the batch again in 1 s"),
        "no batch met the busy route: {}",
        imported.stderr
    );
    let (from, until) = (start.to_string(), (start + 86_400_000).to_string());
    eventually("the import stored", Duration::from_secs(60), || async {
        let run = cli(
            &platform,
            &[
                "readings", "query", "meter-1", "--start", &from, "--end", &until, "--limit",
                "1000", "--all", "-o", "json",
            ],
        )
        .await;
        (run.json().as_array().unwrap().len() == 1440).then_some(())
    })
    .await;
    platform.stop().await;
}

/// A CSV of three days imported in batches through the backfill route, read back raw and
/// aggregated, and exported as the same rows.
#[tokio::test]
async fn cli_readings_import_query_and_export() {
    let platform = Platform::one_process().await;
    cli(&platform, &["devices", "create", "meter-1", "-o", "json"])
        .await
        .json();
    // 3 days of one reading every 4 minutes, two metrics (wide form): 2,160 readings.
    let start = 1_700_000_000_000i64 - 1_700_000_000_000 % 86_400_000;
    let mut csv = String::from("ts,power,voltage\n");
    let mut expected = Vec::new();
    for step in 0..1080i64 {
        let ts = start + step * 240_000;
        let power = (step % 97) as f64 + 0.5;
        let voltage = 230.0 + (step % 7) as f64;
        csv.push_str(&format!("{ts},{power},{voltage}\n"));
        expected.push((ts, "power", power));
        expected.push((ts, "voltage", voltage));
    }
    let dir = std::env::temp_dir().join(format!("fieldline-cli-{}", platform.env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("meter.csv");
    std::fs::write(&file, csv).unwrap();

    let imported = cli(
        &platform,
        &[
            "readings",
            "import",
            "meter-1",
            file.to_str().unwrap(),
            "--batch-rows",
            "250",
            "-o",
            "json",
        ],
    )
    .await;
    let summary = imported.json();
    assert_eq!(summary["rows"], 1080);
    assert_eq!(summary["accepted"], 2160);
    assert_eq!(summary["requests"], 5);
    assert!(
        imported.stderr.contains("imported 2160 readings"),
        "{}",
        imported.stderr
    );

    // Epoch milliseconds, as the API takes them.
    let from = start.to_string();
    let until = (start + 3 * 86_400_000).to_string();
    let readings = eventually("the import stored", Duration::from_secs(30), || async {
        let run = cli(
            &platform,
            &[
                "readings", "query", "meter-1", "--start", &from, "--end", &until, "--limit",
                "1000", "--all", "-o", "json",
            ],
        )
        .await;
        let readings = run.json();
        (readings.as_array().unwrap().len() == expected.len()).then_some(readings)
    })
    .await;
    let power: Vec<f64> = readings
        .as_array()
        .unwrap()
        .iter()
        .filter(|reading| reading["metric"] == "power")
        .map(|reading| reading["value"].as_f64().unwrap())
        .collect();
    let expected_power: Vec<f64> = expected
        .iter()
        .filter(|(_, metric, _)| *metric == "power")
        .map(|(_, _, value)| *value)
        .collect();
    assert_eq!(power, expected_power);

    // Daily aggregates: three buckets of 360 each.
    let aggregate = cli(
        &platform,
        &[
            "readings",
            "query",
            "meter-1",
            "--metric",
            "voltage",
            "--start",
            &from,
            "--end",
            &until,
            "--interval",
            "1d",
            "--fn",
            "count,max",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let buckets = aggregate["series"][0]["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 3, "{aggregate}");
    for bucket in buckets {
        assert_eq!(bucket["count"], 360, "{aggregate}");
        assert_eq!(bucket["max"], 236.0);
    }
    let table = cli(
        &platform,
        &[
            "readings",
            "query",
            "meter-1",
            "--metric",
            "voltage",
            "--start",
            &from,
            "--end",
            &until,
            "--interval",
            "1d",
            "--fn",
            "count",
        ],
    )
    .await;
    assert!(
        table.stdout.contains("360") && table.stdout.contains("voltage"),
        "{}",
        table.stdout
    );

    // Exported as CSV: every imported reading, in the long form, which imports again.
    let exported = dir.join("export.csv");
    let run = cli(
        &platform,
        &[
            "readings",
            "export",
            "meter-1",
            "--metric",
            "power",
            "--start",
            &from,
            "--end",
            &until,
            "--file",
            exported.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = std::fs::read_to_string(&exported).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ts,metric,value"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 1080);
    assert!(rows[0].ends_with(",power,0.5"), "{}", rows[0]);
    let again = cli(
        &platform,
        &[
            "readings",
            "import",
            "meter-1",
            exported.to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(again["accepted"], 1080);

    // A bad row: exit 1, naming its line, with the batches before it stored.
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, format!("ts,power\n{start},1\n{start}x,2\n")).unwrap();
    let refused = cli(
        &platform,
        &["readings", "import", "meter-1", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("(400 "), "{}", refused.stderr);
    let latest = cli(&platform, &["readings", "latest", "meter-1", "-o", "json"])
        .await
        .json();
    assert!(latest.to_string().contains("power"), "{latest}");
    let _ = std::fs::remove_dir_all(&dir);
    platform.stop().await;
}

/// `healthcheck` exits 0 while the platform is ready and 1 once it is gone (or was never
/// there); `migrate` makes every service's tables in an empty database and is idempotent.
#[tokio::test]
async fn cli_healthcheck_and_migrate() {
    let platform = Platform::one_process().await;
    let url = platform.url("");
    let up = run_with(&[], &["healthcheck", "--url", &url]).await;
    assert_eq!(up.code, 0, "{}", up.stderr);
    let by_env = run_with(&[("FIELDLINE_URL", &url)], &["healthcheck"]).await;
    assert_eq!(by_env.code, 0, "{}", by_env.stderr);
    let port = url.rsplit(':').next().unwrap().to_owned();
    let by_addr = run_with(
        &[("FIELDLINE_HTTP_ADDR", &format!("0.0.0.0:{port}"))],
        &["healthcheck"],
    )
    .await;
    assert_eq!(by_addr.code, 0, "{}", by_addr.stderr);
    platform.stop().await;
    let down = run_with(&[], &["healthcheck", "--url", &url, "--timeout", "2"]).await;
    assert_eq!(down.code, 1);
    assert!(down.stderr.contains("/health/ready"), "{}", down.stderr);
    let nobody = format!("http://127.0.0.1:{}", free_port());
    assert_eq!(
        run_with(&[], &["healthcheck", "--url", &nobody]).await.code,
        1
    );

    let env = TestEnv::new().await;
    let vars = env.env_vars();
    let database = vars
        .iter()
        .find(|(key, _)| key == "FIELDLINE_DATABASE_URL")
        .map(|(_, value)| value.as_str())
        .unwrap();
    for _ in 0..2 {
        let migrated = run_with(&[("FIELDLINE_DATABASE_URL", database)], &["migrate"]).await;
        assert_eq!(migrated.code, 0, "{}", migrated.stderr);
        assert!(
            migrated.stderr.contains("schema webhooks: migrated"),
            "{}",
            migrated.stderr
        );
    }
    let pg = env.pg().await;
    for table in [
        "registry.devices",
        "registry.alert_states",
        "telemetry.series",
        "webhooks.webhooks",
    ] {
        let row = pg
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(table));
    }
    let unreachable = run_with(
        &[(
            "FIELDLINE_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/fieldline",
        )],
        &["migrate"],
    )
    .await;
    assert_eq!(unreachable.code, 1);
    assert!(
        unreachable.stderr.starts_with("error: "),
        "{}",
        unreachable.stderr
    );
    env.cleanup().await;
}
