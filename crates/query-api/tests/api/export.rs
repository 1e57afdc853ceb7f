//! Export of a large range: a million rows as CSV and as NDJSON, read incrementally, while the
//! memory of this process (which runs the service) stays far below the size of the body.

use fieldline_testkit::{TestApp, assert_error};
use reqwest::StatusCode;

use crate::spawn_query;

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
const ROWS_PER_METRIC: i64 = 500_000;
/// Both metrics read every 100 ms: 1,000,000 rows over about 14 hours.
const STEP_US: i64 = 100_000;

fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// Seeds the rows with binary COPY through query-api's own series mapping.
async fn seed(app: &TestApp) {
    let client = app.env.pg().await;
    let series = vec![
        ("default".to_owned(), "big".to_owned(), "hum".to_owned()),
        ("default".to_owned(), "big".to_owned(), "temp".to_owned()),
    ];
    let readings = (0..ROWS_PER_METRIC).flat_map(|i| {
        [
            (0, T0 + i * STEP_US, (i % 1000) as f64 / 4.0),
            (1, T0 + i * STEP_US, -((i % 977) as f64) / 8.0),
        ]
    });
    let copied = query_api::bulk::load_numbers(
        &client,
        &series,
        (T0, T0 + ROWS_PER_METRIC * STEP_US),
        readings,
    )
    .await
    .unwrap();
    assert_eq!(copied, 2 * ROWS_PER_METRIC as u64);
}

struct Streamed {
    lines: u64,
    bytes: u64,
    peak_growth_mib: f64,
}

/// Reads the body chunk by chunk, checking each line with `check` (line index, line), and
/// tracking this process's resident memory.
async fn stream(
    app: &TestApp,
    path: &str,
    accept: Option<&str>,
    content_type: &str,
    mut check: impl FnMut(u64, &str),
) -> Streamed {
    let before = resident_mib();
    let mut request = app
        .http
        .get(format!("{}{path}", app.base_url))
        .bearer_auth(app.admin_key())
        .timeout(std::time::Duration::from_secs(600));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        content_type
    );
    let mut streamed = Streamed {
        lines: 0,
        bytes: 0,
        peak_growth_mib: 0.0,
    };
    let mut partial = Vec::new();
    let mut chunks = 0u64;
    while let Some(chunk) = response.chunk().await.unwrap() {
        streamed.bytes += chunk.len() as u64;
        partial.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(newline) = partial[start..].iter().position(|b| *b == b'\n') {
            let line = std::str::from_utf8(&partial[start..start + newline]).unwrap();
            check(streamed.lines, line);
            streamed.lines += 1;
            start += newline + 1;
        }
        partial.drain(..start);
        chunks += 1;
        // Every 64 chunks: /proc is cheap, but not free.
        if chunks & 63 == 0 {
            streamed.peak_growth_mib = streamed.peak_growth_mib.max(resident_mib() - before);
        }
    }
    assert!(partial.is_empty(), "body ends with a newline");
    streamed.peak_growth_mib = streamed.peak_growth_mib.max(resident_mib() - before);
    streamed
}

#[tokio::test]
async fn a_million_rows_export_as_csv_and_ndjson_in_constant_memory() {
    let app = spawn_query().await;
    app.create_device("big").await;
    seed(&app).await;
    let total = 2 * ROWS_PER_METRIC as u64;
    // The bulk loader kept the dictionary as the writer would.
    let (_, body) = app
        .get("/api/v1/devices/big/metrics", app.admin_key())
        .await;
    assert_eq!(
        body["data"][1],
        serde_json::json!({"metric": "temp", "first_ts": "2026-01-01T00:00:00Z", "last_ts": "2026-01-01T13:53:19.900Z", "count": ROWS_PER_METRIC})
    );

    // CSV by Accept header: header line, then every row in (time, metric) order.
    let mut previous = (String::new(), String::new());
    let csv = stream(
        &app,
        "/api/v1/devices/big/readings",
        Some("text/csv"),
        "text/csv; charset=utf-8",
        |index, line| {
            if index == 0 {
                assert_eq!(line, "ts,metric,value");
                return;
            }
            let mut fields = line.split(',');
            let (ts, metric) = (fields.next().unwrap(), fields.next().unwrap());
            fields.next().unwrap().parse::<f64>().unwrap();
            if index == 1 {
                assert_eq!(line, "2026-01-01T00:00:00Z,hum,0.0");
            }
            // RFC 3339 in UTC with fixed-width fractions sorts as text only within equal
            // widths; compare as times.
            let key = (ts.to_owned(), metric.to_owned());
            if index > 1 {
                let before = chrono::DateTime::parse_from_rfc3339(&previous.0).unwrap();
                let now = chrono::DateTime::parse_from_rfc3339(&key.0).unwrap();
                assert!(
                    (before, previous.1.as_str()) < (now, key.1.as_str()),
                    "row {index} out of order"
                );
            }
            previous = key;
        },
    )
    .await;
    assert_eq!(csv.lines, total + 1);
    // The service in this process streamed ~40 MB without holding it: a buffered answer
    // (rows, then text) would take several times the body.
    let body_mib = csv.bytes as f64 / 1024.0 / 1024.0;
    assert!(body_mib > 30.0, "{body_mib} MiB");
    eprintln!(
        "csv: {} lines, {body_mib:.1} MiB, resident memory grew at most {:.1} MiB",
        csv.lines, csv.peak_growth_mib
    );
    assert!(
        csv.peak_growth_mib < body_mib / 2.0,
        "memory grew {:.1} MiB while streaming {body_mib:.1} MiB",
        csv.peak_growth_mib
    );

    // NDJSON by format=, newest first, one metric only.
    let ndjson = stream(
        &app,
        "/api/v1/devices/big/readings?format=ndjson&order=desc",
        None,
        "application/x-ndjson",
        |index, line| {
            if index == 0 {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(row["metric"], "temp");
                assert_eq!(row["ts"], "2026-01-01T13:53:19.900Z");
            }
        },
    )
    .await;
    assert_eq!(ndjson.lines, total);
    let body_mib = ndjson.bytes as f64 / 1024.0 / 1024.0;
    eprintln!(
        "ndjson: {} lines, {body_mib:.1} MiB, resident memory grew at most {:.1} MiB",
        ndjson.lines, ndjson.peak_growth_mib
    );
    assert!(
        ndjson.peak_growth_mib < body_mib / 2.0,
        "memory grew {:.1} MiB while streaming {body_mib:.1} MiB",
        ndjson.peak_growth_mib
    );

    // A range and a metric: exactly the rows inside.
    let ranged = stream(
        &app,
        "/api/v1/devices/big/readings?format=csv&metric=temp&start=2026-01-01T01:00:00Z&end=2026-01-01T02:00:00Z",
        None,
        "text/csv; charset=utf-8",
        |_, _| {},
    )
    .await;
    assert_eq!(ranged.lines, 36_000 + 1);
    app.shutdown().await;
}

#[tokio::test]
async fn export_parameters_are_checked() {
    let app = spawn_query().await;
    app.create_device("d1").await;
    for (query, parameter) in [
        ("format=xml", "format"),
        ("format=csv&limit=10", "limit"),
        ("format=ndjson&cursor=abc", "cursor"),
        ("format=csv&start=whenever", "start"),
    ] {
        let (status, body) = app
            .get(
                &format!("/api/v1/devices/d1/readings?{query}"),
                app.admin_key(),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{parameter}:")),
            "{query}: {body}"
        );
    }
    // An empty export is a header line.
    let response = app
        .http
        .get(format!(
            "{}/api/v1/devices/d1/readings?format=csv",
            app.base_url
        ))
        .bearer_auth(app.admin_key())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ts,metric,value\n");
    app.shutdown().await;
}

/// The plan of one series' rows in the export's transaction, for the range `[start, end)`.
async fn export_plan(
    client: &mut tokio_postgres::Client,
    settings: &str,
    series_id: i32,
    (start_us, end_us): (i64, i64),
) -> String {
    let at = |us: i64| {
        format!(
            "'{}'::timestamptz",
            fieldline_common::time::from_us(us).to_rfc3339()
        )
    };
    let sql = query_api::export::ROWS_ASC_SQL
        .replace("$1", &series_id.to_string())
        .replace("$2", &at(start_us))
        .replace("$3", &at(end_us));
    let transaction = client.transaction().await.unwrap();
    transaction.batch_execute(settings).await.unwrap();
    let plan = crate::explain(&transaction, &sql).await;
    transaction.rollback().await.unwrap();
    plan
}

/// A series' rows lie one a page when many series arrive together, and PostgreSQL then reads
/// them with a bitmap scan and sorts them. The export's transaction turns bitmap scans off:
/// its rows come by the index, in time order, streamed, and nothing sorts, on any range.
#[tokio::test]
async fn the_export_reads_a_series_by_its_index_and_never_sorts() {
    let app = spawn_query().await;
    let mut client = app.env.pg().await;
    // 200 metrics of one device, every 4 minutes for 3 days, in time order as they arrive.
    let metrics = 200;
    let steps = 1_080i64;
    let step_us = 240_000_000;
    let series: Vec<_> = (0..metrics)
        .map(|m| ("default".to_owned(), "many".to_owned(), format!("m{m:03}")))
        .collect();
    let readings = (0..steps)
        .flat_map(|step| (0..metrics).map(move |m| (m, T0 + step * step_us, (step % 97) as f64)));
    let range = (T0, T0 + steps * step_us);
    query_api::bulk::load_numbers(&client, &series, range, readings)
        .await
        .unwrap();
    client
        .batch_execute("ANALYZE telemetry.readings")
        .await
        .unwrap();
    let series_id: i32 = client
        .query_one(
            "SELECT series_id FROM telemetry.series WHERE device_id = 'many' AND metric = 'm100'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // What PostgreSQL does unless told: the premise of the setting.
    let default = export_plan(&mut client, "SELECT 1", series_id, range).await;
    assert!(
        default.contains("Bitmap Heap Scan") && default.contains("Sort"),
        "{default}"
    );
    for range in [range, (T0 + 3_600_000_000, T0 + 7_200_000_000)] {
        let plan = export_plan(
            &mut client,
            query_api::export::PLANNER_SETTINGS,
            series_id,
            range,
        )
        .await;
        assert!(plan.contains("Index Scan"), "{plan}");
        assert!(!plan.contains("Bitmap") && !plan.contains("Sort"), "{plan}");
    }
}
