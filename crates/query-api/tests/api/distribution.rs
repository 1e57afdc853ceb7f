//! Distributed PostgreSQL (Citus) on paper, checked in code (docs/distributed-postgres.md):
//! readings and rollups are to be distributed by `series_id`, so every statement of
//! query-api on them names that column (a router query on the shards of its series), and
//! their keys include it. A statement or a constraint that does not is a shard-wide query or
//! a table Citus refuses to distribute: these tests fail on it.

use std::path::{Path, PathBuf};

use regex::Regex;

use crate::spawn_query;

/// The distributed tables: raw readings (partitioned by day), compressed blocks and the two
/// rollups.
const DISTRIBUTED: [&str; 4] = ["readings", "rollup_1h", "rollup_1d", "blocks"];

/// Every string literal of the Rust files under `dir` (plain and raw), with its file.
fn literals(dir: &Path, found: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            literals(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for literal in string_literals(&text) {
                found.push((path.clone(), literal));
            }
        }
    }
}

/// The string literals of Rust source: comments, char literals and lifetimes skipped, so a
/// `'"'` starts no string.
fn string_literals(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut literals = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &text[at..];
        let after_ident =
            at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if rest.starts_with("//") {
            at += rest.find('\n').unwrap_or(rest.len());
        } else if !after_ident && (rest.starts_with("r#\"") || rest.starts_with("r\"")) {
            let hashes = rest[1..].find('"').unwrap();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = &rest[hashes + 2..];
            let end = body.find(&close).unwrap();
            literals.push(body[..end].to_owned());
            at += hashes + 2 + end + close.len();
        } else if bytes[at] == b'"' {
            let mut end = at + 1;
            let mut body = String::new();
            while bytes[end] != b'"' {
                if bytes[end] == b'\\' {
                    end += 1;
                    if bytes[end] == b'"' {
                        body.push('"');
                        end += 1;
                        continue;
                    }
                    body.push('\\');
                }
                let c = text[end..].chars().next().unwrap();
                body.push(c);
                end += c.len_utf8();
            }
            literals.push(body);
            at = end + 1;
        } else if bytes[at] == b'\'' {
            // A char literal ('x', '\n', '\'') or a lifetime ('a).
            let tail = &rest[1..];
            if tail.starts_with('\\') {
                at += 1 + tail[2..].find('\'').unwrap() + 3;
            } else if tail.chars().nth(1) == Some('\'') {
                at += 1 + tail.chars().next().unwrap().len_utf8() + 1;
            } else {
                at += 1;
            }
        } else {
            at += 1;
        }
    }
    literals
}

/// The statements of query-api that name a distributed table: in `telemetry.{name}` the
/// name is a rollup or a daily partition of readings.
fn statements() -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    literals(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut found,
    );
    let names =
        Regex::new(r"telemetry\.(?:(readings|rollup_1h|rollup_1d|blocks)\b|\{\w*\})").unwrap();
    found
        .into_iter()
        .filter(|(_, sql)| names.is_match(sql))
        .collect()
}

#[test]
fn every_statement_on_readings_and_rollups_names_series_id() {
    let statements = statements();
    // The reads (pages, aggregates over raw rows and rollups, exports, narrowing), the
    // writer (COPY, the skip-stored insert, rollup merges), bulk loads and retention.
    let files: std::collections::BTreeSet<String> = statements
        .iter()
        .map(|(file, _)| file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for file in [
        "repo.rs",
        "export.rs",
        "moves.rs",
        "bulk.rs",
        "maintenance.rs",
    ] {
        assert!(
            files.contains(file),
            "no statement found in {file}: {files:?}"
        );
    }
    assert!(statements.len() >= 12, "found only {statements:?}");
    let unfiltered = unfiltered(&statements);
    assert!(
        unfiltered.is_empty(),
        "statements on distributed tables without series_id:\n{}",
        unfiltered.join("\n\n")
    );
}

/// The statements that name a distributed table without naming `series_id` (in a predicate,
/// or in the columns they write).
fn unfiltered(statements: &[(PathBuf, String)]) -> Vec<String> {
    let reference = Regex::new(
        r"(?i)\b(FROM|JOIN|UPDATE|INTO|COPY|USING)\s+telemetry\.(?:(readings|rollup_1h|rollup_1d|blocks)\b|\{\w*\})",
    )
    .unwrap();
    let predicate = Regex::new(r"(?i)\bseries_id\s*(=|IN\s*\()").unwrap();
    let columns =
        Regex::new(r"(?i)^\s*(INSERT\s+INTO|COPY)\s+telemetry\.\S+(\s+AS\s+\w+)?\s*\(([^)]*)\)")
            .unwrap();
    let mut unfiltered = Vec::new();
    for (file, sql) in statements {
        let sql = sql.trim();
        let upper = sql.to_ascii_uppercase();
        if sql.contains("/* shard-wide:") {
            // Said so in the statement, with the reason.
            continue;
        }
        if upper.starts_with("BEGIN") && upper.contains("DROP TABLE") {
            // Dropping a whole daily partition: DDL, which Citus sends to every shard. The
            // statements after it in the same batch are checked below as any other.
        } else if upper.starts_with("CREATE") || upper.starts_with("DROP") {
            continue;
        }
        if let Some(insert) = columns.captures(sql) {
            // Rows written name their series: each goes to its series' shard.
            if !insert[3]
                .split(',')
                .any(|column| column.trim() == "series_id")
            {
                unfiltered.push(format!("{}: {sql}", file.display()));
            }
            continue;
        }
        if upper.starts_with("INSERT INTO") && upper.contains("SELECT") {
            // Every column, in the table's order: series_id first.
            continue;
        }
        let tables = reference.find_iter(sql).count();
        let filters = predicate.find_iter(sql).count();
        if tables > filters {
            unfiltered.push(format!(
                "{}: {tables} table(s), {filters} series_id predicate(s): {sql}",
                file.display()
            ));
        }
    }
    unfiltered
}

#[test]
fn the_check_fails_on_statements_without_series_id() {
    let file = PathBuf::from("example.rs");
    let bad = [
        "SELECT count(*) FROM telemetry.readings WHERE ts > $1",
        "SELECT * FROM telemetry.rollup_1h h JOIN telemetry.readings r ON r.ts = h.bucket WHERE h.series_id = $1",
        "COPY telemetry.readings (ts, value_num) FROM STDIN BINARY",
        "DELETE FROM telemetry.{} WHERE bucket < $1",
    ];
    let statements: Vec<(PathBuf, String)> = bad
        .iter()
        .map(|sql| (file.clone(), (*sql).to_owned()))
        .collect();
    assert_eq!(unfiltered(&statements).len(), bad.len());
    let good = [(
        file,
        "SELECT ts FROM telemetry.readings WHERE series_id = ANY($1) AND ts >= $2".to_owned(),
    )];
    assert!(unfiltered(&good).is_empty());
}

#[tokio::test]
async fn keys_of_the_distributed_tables_include_series_id_and_the_one_blocker_is_known() {
    let app = spawn_query().await;
    let pg = app.env.pg().await;
    // Primary keys and unique constraints of the partitioned parent and the rollups; and
    // foreign keys anywhere in the schema (Citus allows them between co-located tables on
    // the distribution column only).
    let rows = pg
        .query(
            "SELECT c.conrelid::regclass::text, c.contype::text, pg_get_constraintdef(c.oid)
               FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE n.nspname = 'telemetry' AND c.contype IN ('p', 'u', 'f', 'x')
                AND NOT t.relispartition
              ORDER BY 1, 3",
            &[],
        )
        .await
        .unwrap();
    let mut blockers = Vec::new();
    for row in &rows {
        let (table, kind, definition): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let name = table.trim_start_matches("telemetry.");
        if kind == "f" || kind == "x" {
            blockers.push(format!("{table}: {definition}"));
        } else if DISTRIBUTED.contains(&name) {
            assert!(definition.contains("series_id"), "{table}: {definition}");
        } else if name == "series" && !definition.contains("series_id") {
            blockers.push(format!("{table}: {definition}"));
        }
    }
    // The series dictionary, distributed by series_id beside the readings it describes,
    // cannot keep its unique (project, device_id, metric): the document's one migration is
    // to move that key to a reference table. Anything else here is a new blocker.
    assert_eq!(
        blockers,
        ["telemetry.series: UNIQUE (project, device_id, metric)"],
        "update docs/distributed-postgres.md"
    );
    // Partitioned by day on the time column, which Citus keeps as it is (each partition is
    // distributed and co-located with the parent).
    let partitioning: String = pg
        .query_one(
            "SELECT pg_get_partkeydef('telemetry.readings'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partitioning, "RANGE (ts)");
    drop(app);
}
