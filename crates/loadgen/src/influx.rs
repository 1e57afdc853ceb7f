//! InfluxDB 1.x (Debian's `influxdb`, the store of the Telegraf stack Fieldline replaces) fed
//! the storage scenario's readings over line protocol, for the import speed and the bytes a
//! reading beside Fieldline's, in the same run. Started as a private process on free ports
//! with its data in a temporary directory; skipped when `influxd` is not installed (`make
//! bench` installs it).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::fs::MetadataExt as _;

use anyhow::Context as _;
use serde::Serialize;

const INFLUXD: &str = "/usr/bin/influxd";

#[derive(Debug, Clone, Serialize)]
pub struct InfluxResult {
    pub readings: u64,
    pub line_protocol_bytes: u64,
    pub import_seconds: f64,
    pub readings_per_second: f64,
    /// Bytes on disk of TSM files and index once the write-ahead log has been snapshotted and
    /// compacted.
    pub data_bytes: u64,
}

struct Influxd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bytes_under(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                bytes_under(&path)
            } else {
                // On disk: InfluxDB preallocates its series files sparse (4 MiB apparent).
                entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
            }
        })
        .sum()
}

pub fn installed() -> bool {
    Path::new(INFLUXD).exists()
}

/// Imports `lines` (line protocol, millisecond times) holding `readings` field values.
pub async fn run(lines: String, readings: u64) -> anyhow::Result<InfluxResult> {
    let dir = std::env::temp_dir().join(format!("fieldline-bench-influx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (http_port, rpc_port) = (crate::platform::free_port()?, crate::platform::free_port()?);
    let config = format!(
        "reporting-disabled = true
bind-address = \"127.0.0.1:{rpc_port}\"
[meta]
  dir = \"{dir}/meta\"
[data]
  dir = \"{dir}/data\"
  wal-dir = \"{dir}/wal\"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = \"1s\"
  compact-full-write-cold-duration = \"2s\"
[http]
  bind-address = \"127.0.0.1:{http_port}\"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
",
        dir = dir.display()
    );
    std::fs::write(dir.join("influxdb.conf"), config)?;
    let child = Command::new(INFLUXD)
        .arg("-config")
        .arg(dir.join("influxdb.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting influxd")?;
    let server = Influxd { child, dir };
    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{base}/ping")).send().await
            && response.status().is_success()
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "influxd did not answer /ping");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    http.post(format!("{base}/query"))
        .form(&[("q", "CREATE DATABASE bench")])
        .send()
        .await?
        .error_for_status()?;
    let line_protocol_bytes = lines.len() as u64;
    let started = Instant::now();
    let response = http
        .post(format!("{base}/write?db=bench&precision=ms"))
        .body(lines)
        .timeout(Duration::from_secs(600))
        .send()
        .await?;
    let import_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        response.status().is_success(),
        "influx write: {} {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    // The WAL is snapshotted into TSM files after a second without writes, and those are
    // fully compacted after two: wait until the size settles.
    let (data, wal) = (server.dir.join("data"), server.dir.join("wal"));
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let size = bytes_under(&data);
        if (size == last && bytes_under(&wal) < 64 * 1024) || Instant::now() > deadline {
            break;
        }
        last = size;
    }
    Ok(InfluxResult {
        readings,
        line_protocol_bytes,
        import_seconds,
        readings_per_second: readings as f64 / import_seconds,
        data_bytes: bytes_under(&data),
    })
}
