//! What a command prints: JSON (the API's `data`, for scripts and `jq`) or a table.

use std::io::Write as _;

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A cell: text as it is, `null` empty, arrays of text joined, anything else as JSON.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn table() -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table
}

/// Prints a list: one row per item with `columns` (JSON: the array).
pub fn list(output: Output, items: &[Value], columns: &[&str]) -> std::io::Result<()> {
    match output {
        Output::Json => json(&Value::Array(items.to_vec())),
        Output::Table => {
            let mut table = table();
            table.set_header(columns.iter().copied());
            for item in items {
                table.add_row(columns.iter().map(|column| cell(item.get(*column))));
            }
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{table}")?;
            if items.is_empty() {
                writeln!(stdout, "(none)")?;
            }
            Ok(())
        }
    }
}

/// Prints one object: a field per row (JSON: the object).
pub fn object(output: Output, value: &Value) -> std::io::Result<()> {
    match (output, value) {
        (Output::Json, _) => json(value),
        (Output::Table, Value::Object(fields)) => {
            let mut table = table();
            for (name, field) in fields {
                table.add_row([name.clone(), cell(Some(field))]);
            }
            writeln!(std::io::stdout().lock(), "{table}")
        }
        (Output::Table, Value::Null) => Ok(()),
        (Output::Table, other) => writeln!(std::io::stdout().lock(), "{}", cell(Some(other))),
    }
}

pub fn json(value: &Value) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)
}

/// A line for the user (not data): on stderr, so stdout stays parseable.
pub fn note(text: &str) {
    eprintln!("{text}");
}
