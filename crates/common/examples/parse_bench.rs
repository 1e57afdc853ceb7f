//! How long parsing a device message takes: the `http-batched` body (100 readings, flat
//! form), parsed many times on one core. `cargo run --release -p fieldline-common --example
//! parse_bench`.

#![allow(clippy::print_stdout)] // the figure is the output

use std::time::Instant;

use fieldline_common::ingest::{TimeWindow, parse_json_message};

fn main() {
    let messages: Vec<String> = (0..100)
        .map(|index| {
            let temperature = (index % 400) as f64 / 10.0;
            format!(
                r#"{{"ts":{},"temperature":{temperature}}}"#,
                1_700_000_000_000_u64 + index
            )
        })
        .collect();
    let body = format!("[{}]", messages.join(","));
    let rounds = 20_000;
    let started = Instant::now();
    let mut readings = 0;
    for _ in 0..rounds {
        readings += parse_json_message(body.as_bytes(), 0, 10_000, TimeWindow::ANY)
            .expect("the body parses")
            .readings
            .len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{:.1} µs per 100-reading body, {:.0} readings/s on one core",
        elapsed * 1e6 / f64::from(rounds),
        readings as f64 / elapsed
    );
}
