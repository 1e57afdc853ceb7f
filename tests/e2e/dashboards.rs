//! Dashboards and alerts that cannot rot. Every metric the Grafana dashboards
//! (deploy/grafana/dashboards) and the alerting rules (deploy/prometheus/rules.yml) name, with
//! the exact label values they match on, is on a running split platform's `/metrics`; every
//! SQL panel and variable runs, as the read-only role Grafana logs in as, against the
//! platform's own database after it stored readings; and the rules pass `promtool check` and
//! their unit tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use fieldline_testkit::{eventually, receiver::Receiver};
use reqwest::StatusCode;
use rumqttc::QoS;
use serde_json::{Value, json};

use crate::{
    platform::{Platform, SERVICES},
    scenarios,
};

const PROMETHEUS_UID: &str = "fieldline-prometheus";
const POSTGRES_UID: &str = "fieldline-postgres";
/// Series Prometheus makes itself rather than scrapes.
const SYNTHETIC: [&str; 1] = ["up"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
async fn dashboards_and_rules_use_only_what_a_running_platform_has() {
    let platform = Platform::split().await;
    let receiver = Receiver::start().await;
    drive_traffic(&platform, &receiver).await;

    let mut queries = Vec::new();
    let mut sql_panels = Vec::new();
    let mut sql_variables = Vec::new();
    for (file, dashboard) in dashboards() {
        collect(
            &file,
            &dashboard,
            &mut queries,
            &mut sql_panels,
            &mut sql_variables,
        );
    }
    let rules = rule_expressions();
    assert!(queries.len() > 20 && sql_panels.len() > 5, "{queries:?}");
    queries.extend(rules.into_iter().map(|expr| ("rules.yml".to_owned(), expr)));
    let wanted: Vec<(String, Selector)> = queries
        .iter()
        .flat_map(|(place, expr)| {
            selectors(expr)
                .into_iter()
                .map(move |selector| (place.clone(), selector))
        })
        .filter(|(_, selector)| !SYNTHETIC.contains(&selector.metric.as_str()))
        .collect();

    // Families recorded on an event (an attempt, a stored batch) show up shortly after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let exposed = scrape(&platform).await;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(_, selector)| !selector.matches(&exposed))
            .map(|(place, selector)| format!("{place}: {selector:?}"))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queries name metrics no service exposes:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    run_sql_as_dashboards_role(&platform, &sql_variables, &sql_panels).await;
    receiver.stop().await;
    platform.stop().await;
}

#[test]
fn alerting_rules_pass_promtool_and_their_unit_tests_and_k8s_carries_the_same() {
    let prometheus = repo().join("deploy/prometheus");
    for args in [
        &["check", "rules", "rules.yml"][..],
        &["test", "rules", "rules.test.yml"],
        &["check", "config", "prometheus.yml"],
        &["check", "config", "prometheus-local.yml"],
    ] {
        let output = Command::new(crate::observability::which("promtool"))
            .args(args)
            .current_dir(&prometheus)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The PrometheusRule is rules.yml's groups, indented under `spec:`.
    let rules = std::fs::read_to_string(prometheus.join("rules.yml")).unwrap();
    let groups = &rules[rules.find("\ngroups:").unwrap() + 1..];
    let indented: String = groups
        .split_inclusive('\n')
        .map(|line| {
            if line.trim().is_empty() {
                line.to_owned()
            } else {
                format!("  {line}")
            }
        })
        .collect();
    let k8s =
        std::fs::read_to_string(repo().join("deploy/k8s/monitoring/prometheus-rule.yaml")).unwrap();
    assert!(
        k8s.ends_with(&format!("spec:\n{indented}")),
        "deploy/k8s/monitoring/prometheus-rule.yaml differs from deploy/prometheus/rules.yml"
    );
}

/// HTTP ingest, an MQTT publish and a webhook delivery; returns once the readings are stored
/// and the webhook has been delivered.
async fn drive_traffic(platform: &Platform, receiver: &Receiver) {
    let token = scenarios::create_device(platform, "dash-1").await;
    // Registered and never heard from.
    scenarios::create_device(platform, "dash-2").await;
    let (status, created) = platform
        .post(
            "/api/v1/webhooks",
            platform.admin_key(),
            &json!({"url": receiver.url("/hook"), "events": ["device.data"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // No times: stored at arrival, inside the dashboards' time range.
    for body in [
        json!({"temperature": 21.5, "humidity": 40}),
        json!({"temperature": 22.0, "door_open": true}),
    ] {
        let (status, body) = platform.post("/api/v1/ingest", &token, &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let mqtt = scenarios::mqtt_client(platform, "dash-1", &token);
    mqtt.publish(
        format!("{}/default/dash-1/telemetry", platform.topic_root()),
        QoS::AtLeastOnce,
        false,
        br#"{"temperature": 22.5}"#.to_vec(),
    )
    .await
    .unwrap();
    eventually(
        "the HTTP and MQTT readings stored",
        Duration::from_secs(30),
        || async {
            let (status, body) = platform
                .get(
                    "/api/v1/devices/dash-1/readings?limit=100",
                    platform.admin_key(),
                )
                .await;
            (status == StatusCode::OK && body["data"].as_array()?.len() >= 5).then_some(())
        },
    )
    .await;
    eventually("a webhook delivery", Duration::from_secs(30), || async {
        (!receiver.received("/hook").is_empty()).then_some(())
    })
    .await;
}

/// The sample lines of every service's `/metrics`, by sample name (`_bucket` etc. included).
async fn scrape(platform: &Platform) -> BTreeMap<String, Vec<String>> {
    let mut exposed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for service in SERVICES {
        let text = platform.metrics(service).await;
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let name: String = line
                .chars()
                .take_while(|c| *c != '{' && *c != ' ')
                .collect();
            if !name.is_empty() {
                exposed.entry(name).or_default().push(line.to_owned());
            }
        }
    }
    exposed
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/grafana/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let dashboard: Value = serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            found.push((file, dashboard));
        }
    }
    assert!(found.len() >= 2, "dashboards in {}", dir.display());
    found
}

/// A panel or variable's datasource uid, from the target or, failing that, the panel.
fn datasource_uid<'a>(item: &'a Value, panel: &'a Value) -> &'a str {
    item["datasource"]["uid"]
        .as_str()
        .or_else(|| panel["datasource"]["uid"].as_str())
        .unwrap_or_default()
}

/// Sorts a dashboard's queries by datasource; each must be one the provisioning defines.
fn collect(
    file: &str,
    dashboard: &Value,
    promql: &mut Vec<(String, String)>,
    sql_panels: &mut Vec<SqlPanel>,
    sql_variables: &mut Vec<(String, String)>,
) {
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        let place = format!("{file} \"{title}\"");
        assert!(
            !title.is_empty() && panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{place}: every panel has a title and a description"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{place}: no query");
        for target in targets {
            match datasource_uid(target, panel) {
                PROMETHEUS_UID => {
                    promql.push((place.clone(), target["expr"].as_str().unwrap().to_owned()))
                }
                POSTGRES_UID => sql_panels.push(SqlPanel {
                    place: place.clone(),
                    sql: target["rawSql"].as_str().unwrap().to_owned(),
                    time_series: panel["type"] == "timeseries",
                }),
                other => panic!("{place}: unknown datasource {other:?}"),
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let name = variable["name"].as_str().unwrap().to_owned();
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap()
            .to_owned();
        match datasource_uid(variable, variable) {
            PROMETHEUS_UID => {
                // label_values(metric, label): only the metric is a selector.
                let inner = query
                    .strip_prefix("label_values(")
                    .and_then(|rest| rest.split(',').next())
                    .unwrap_or_else(|| panic!("{file} ${name}: {query}"));
                promql.push((format!("{file} ${name}"), inner.to_owned()));
            }
            POSTGRES_UID => sql_variables.push((name, query)),
            other => panic!("{file} ${name}: unknown datasource {other:?}"),
        }
    }
}

struct SqlPanel {
    place: String,
    sql: String,
    time_series: bool,
}

/// Every `expr` of deploy/prometheus/rules.yml (a line, or a `|` block under it).
fn rule_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/rules.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut expressions = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let value = value.trim();
        if value == "|" || value == ">" {
            let block: Vec<&str> = lines[at + 1..]
                .iter()
                .take_while(|next| {
                    next.trim().is_empty() || next.len() - next.trim_start().len() > indent
                })
                .map(|next| next.trim())
                .collect();
            expressions.push(block.join("\n"));
        } else {
            expressions.push(value.to_owned());
        }
    }
    let alerts = text.matches("- alert:").count();
    assert_eq!(expressions.len(), alerts, "one expr per alert");
    expressions
}

/// A series selector of a PromQL expression: the metric and its `label="value"` matchers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    metric: String,
    equal: Vec<(String, String)>,
}

impl Selector {
    /// Some sample of the metric carries every exact label value the query matches on.
    fn matches(&self, exposed: &BTreeMap<String, Vec<String>>) -> bool {
        exposed.get(&self.metric).is_some_and(|samples| {
            samples.iter().any(|sample| {
                self.equal
                    .iter()
                    .all(|(label, value)| sample.contains(&format!("{label}=\"{value}\"")))
            })
        })
    }
}

const KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
];

/// Aggregations: `sum by (job) (...)` has its grouping before the parenthesis.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

/// The selectors of a PromQL expression (Grafana's `$variables` left out): every name that is
/// neither a function, a keyword, a label list, a string, a range nor a number.
fn selectors(expr: &str) -> BTreeSet<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = BTreeSet::new();
    let mut at = 0;
    let skip_to = |from: usize, close: char| -> usize {
        chars[from..]
            .iter()
            .position(|c| *c == close)
            .map_or(chars.len(), |offset| from + offset + 1)
    };
    while at < chars.len() {
        let c = chars[at];
        if c == '"' || c == '\'' || c == '`' {
            at = skip_to(at + 1, c);
        } else if c == '[' {
            at = skip_to(at + 1, ']');
        } else if c == '{' {
            at = skip_to(at + 1, '}');
        } else if c.is_ascii_digit() || c == '$' {
            at += 1;
            while at < chars.len()
                && (chars[at].is_ascii_alphanumeric() || "._".contains(chars[at]))
            {
                at += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = at;
            while at < chars.len()
                && (chars[at].is_ascii_alphanumeric() || "_:".contains(chars[at]))
            {
                at += 1;
            }
            let name: String = chars[start..at].iter().collect();
            let mut next = at;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let following = chars.get(next).copied();
            if KEYWORDS.contains(&name.as_str()) {
                // by (job, le): label names, not metrics.
                if following == Some('(') {
                    at = skip_to(next, ')');
                }
            } else if following == Some('(') || AGGREGATIONS.contains(&name.as_str()) {
                // A function; its arguments are scanned as they come.
            } else if following == Some('{') {
                let end = skip_to(next, '}');
                let block: String = chars[next + 1..end - 1].iter().collect();
                found.insert(Selector {
                    metric: name,
                    equal: equal_matchers(&block),
                });
                at = end;
            } else {
                found.insert(Selector {
                    metric: name,
                    equal: Vec::new(),
                });
            }
        } else {
            at += 1;
        }
    }
    found
}

/// `label="value"` matchers of a selector's braces; regex and negative matchers, and values
/// that are Grafana variables, are not checked.
fn equal_matchers(block: &str) -> Vec<(String, String)> {
    block
        .split(',')
        .filter_map(|matcher| {
            let (label, value) = matcher.split_once('=')?;
            let label = label.trim();
            if label.ends_with('!') || value.starts_with('~') {
                return None;
            }
            let value = value.trim().trim_matches('"');
            (!value.contains('$')).then(|| (label.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Grants the read-only role on the platform's database (deploy/grafana/dashboards-role.sql),
/// then, logged in as that role, resolves the variables in order from their own queries and
/// runs every panel's query with them.
async fn run_sql_as_dashboards_role(
    platform: &Platform,
    variables: &[(String, String)],
    panels: &[SqlPanel],
) {
    let script = repo().join("deploy/grafana/dashboards-role.sql");
    // The role is the cluster's: a provisioning run at the same moment may race to create it.
    let mut granted = false;
    for _ in 0..3 {
        let output = Command::new("psql")
            .arg(&platform.env.database_url)
            .args(["-qX", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&script)
            .output()
            .unwrap();
        if output.status.success() {
            granted = true;
            break;
        }
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(granted, "{} failed", script.display());
    let (_, host_and_database) = platform.env.database_url.split_once('@').unwrap();
    let (client, connection) = tokio_postgres::connect(
        &format!("postgres://fieldline_dashboards@{host_and_database}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);

    let mut values: Vec<(String, String)> = Vec::new();
    for (name, query) in variables {
        let sql = substitute(query, &values);
        let rows = text_rows(&client, &sql)
            .await
            .unwrap_or_else(|error| panic!("variable ${name}: {error}\n{sql}"));
        let first = rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .unwrap_or_else(|| panic!("variable ${name} has no values\n{sql}"));
        values.push((name.clone(), first));
    }
    for panel in panels {
        let sql = substitute(&panel.sql, &values);
        let rows = text_rows(&client, &sql)
            .await
            .unwrap_or_else(|error| panic!("{}: {error}\n{sql}", panel.place));
        assert!(
            !panel.time_series || !rows.is_empty(),
            "{}: no rows over readings just stored ({values:?})\n{sql}",
            panel.place
        );
    }
    // Read-only: the role cannot write even where a grant would allow it.
    let refused = client
        .batch_execute("CREATE TABLE telemetry.not_allowed (x int)")
        .await;
    assert!(refused.is_err());
}

/// Grafana's part: variables as their values, time macros as the last six hours. A macro or
/// variable it does not know is left, and then fails the query.
fn substitute(sql: &str, values: &[(String, String)]) -> String {
    let mut sql = sql.to_owned();
    for (name, value) in values {
        sql = sql
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    while let Some(at) = sql.find("$__timeFilter(") {
        let rest = &sql[at + "$__timeFilter(".len()..];
        let close = rest.find(')').unwrap();
        let column = rest[..close].trim().to_owned();
        sql.replace_range(
            at..at + "$__timeFilter(".len() + close + 1,
            &format!(
                "{column} BETWEEN now() - interval '6 hours' AND now() + interval '5 minutes'"
            ),
        );
    }
    sql = sql
        .replace("$__timeFrom()", "(now() - interval '6 hours')")
        .replace("$__timeTo()", "(now() + interval '5 minutes')");
    assert!(!sql.contains('$'), "a macro or variable left over:\n{sql}");
    sql
}

/// The rows as text, or the database's own message.
async fn text_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let messages = client.simple_query(sql).await.map_err(|error| {
        error
            .as_db_error()
            .map_or_else(|| error.to_string(), |db| db.message().to_owned())
    })?;
    Ok(messages
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|index| row.get(index).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

#[test]
fn selectors_are_the_metrics_a_query_names() {
    let names = |expr: &str| -> Vec<String> {
        selectors(expr)
            .into_iter()
            .map(|selector| format!("{}{:?}", selector.metric, selector.equal))
            .collect()
    };
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (job, route, le) (rate(fieldline_http_request_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))"#
        ),
        ["fieldline_http_request_duration_seconds_bucket[]"]
    );
    assert_eq!(
        names(
            "max by (consumer) (fieldline_consumer_lag_seconds) > 60\nand\nmax by (consumer) (delta(fieldline_consumer_lag_seconds{consumer=\"query-writer\", job!=\"x\"}[15m])) > 0"
        ),
        [
            "fieldline_consumer_lag_seconds[]",
            "fieldline_consumer_lag_seconds[(\"consumer\", \"query-writer\")]"
        ]
    );
    assert_eq!(
        names(r#"sum(up{job="a"}) == 0 or absent(up{job="b"}) offset 5m"#),
        ["up[(\"job\", \"a\")]", "up[(\"job\", \"b\")]"]
    );
}
