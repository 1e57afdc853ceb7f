//! Compressed bodies: inflated as they stream in, bounded by the body limit while they do,
//! and a coding the platform does not know is refused rather than read as plain bytes.

use std::io::Write as _;

use fieldline_testkit::{TestApp, TestEnv, assert_error};
use flate2::{Compress, Compression, FlushCompress, write::GzEncoder, write::ZlibEncoder};
use reqwest::StatusCode;
use serde_json::Value;

use crate::spawn_all;

const MIB: usize = 1024 * 1024;

/// A gzip stream that inflates to `inflated_mib` MiB of zeros, about 1 KiB per MiB: built
/// from one fully flushed deflate segment of 1 MiB of zeros repeated (a full flush resets the
/// compressor, so each segment is the same bytes), so it costs nothing to make. The trailer's
/// checksum is left wrong: a server that inflates it all has already lost.
fn gzip_bomb(inflated_mib: usize) -> Vec<u8> {
    let zeros = vec![0u8; MIB];
    let mut compress = Compress::new(Compression::best(), false);
    let mut segment = || {
        let mut out = Vec::with_capacity(64 * 1024);
        let before = compress.total_in();
        compress
            .compress_vec(&zeros, &mut out, FlushCompress::Full)
            .unwrap();
        assert_eq!(
            compress.total_in() - before,
            MIB as u64,
            "segment not consumed"
        );
        out
    };
    let first = segment();
    let repeated = segment();
    assert_eq!(repeated, segment(), "flushed segments differ");
    let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    bomb.extend_from_slice(&first);
    for _ in 1..inflated_mib {
        bomb.extend_from_slice(&repeated);
    }
    let mut end = Vec::with_capacity(64);
    compress
        .compress_vec(&[], &mut end, FlushCompress::Finish)
        .unwrap();
    bomb.extend_from_slice(&end);
    bomb.extend_from_slice(&[0; 8]);
    bomb
}

async fn post_encoded(
    app: &TestApp,
    path: &str,
    credential: &str,
    encoding: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    app.post_with_headers(
        path,
        credential,
        &[
            ("content-type", "application/json"),
            ("content-encoding", encoding),
        ],
        body,
    )
    .await
}

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_with_413_on_ingest_and_backfill() {
    let app = spawn_all(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    let bomb = gzip_bomb(1024);
    assert!(bomb.len() < 2 * MIB, "{} bytes", bomb.len());
    let (status, body) = post_encoded(&app, "/api/v1/ingest", &token, "gzip", bomb.clone()).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = post_encoded(
        &app,
        "/api/v1/devices/d1/readings",
        app.admin_key(),
        "gzip",
        bomb,
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert!(app.telemetry_batches().await.is_empty());
    app.shutdown().await;
}

/// Eight 1 GiB bombs at once on backfill with a 1 MiB limit: each request holds about its
/// limit while it inflates (it held a whole inflated input chunk, 120-150 MiB, before).
#[tokio::test]
async fn concurrent_gzip_bombs_cost_about_the_body_limit_in_memory() {
    let app = spawn_all(TestEnv::new().await, |config| fieldline_common::Config {
        backfill_max_body_bytes: MIB,
        ..config
    })
    .await;
    app.create_device("d1").await;
    let bombs: Vec<Vec<u8>> = (0..8).map(|_| gzip_bomb(1024)).collect();
    let before = peak_rss();
    let requests = bombs.into_iter().map(|bomb| {
        post_encoded(
            &app,
            "/api/v1/devices/d1/readings",
            app.admin_key(),
            "gzip",
            bomb,
        )
    });
    for (status, body) in futures::future::join_all(requests).await {
        assert_error(
            status,
            &body,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        );
    }
    let growth = peak_rss().saturating_sub(before);
    eprintln!(
        "peak memory growth for 8 concurrent bombs: {} KiB",
        growth / 1024
    );
    assert!(
        growth < 64 * MIB,
        "peak memory grew by {} MiB for 8 bombs",
        growth / MIB
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_unknown_content_encoding_is_refused_with_415() {
    let app = spawn_all(TestEnv::new().await, |config| config).await;
    let token = app.create_device("d1").await;
    let plain = br#"{"ts": 1000, "temp": 7}"#.to_vec();
    for encoding in [
        "x-bogus",
        "br",
        "zstd",
        "compress",
        "gzip, gzip",
        "gzip, br",
    ] {
        let (status, body) =
            post_encoded(&app, "/api/v1/ingest", &token, encoding, plain.clone()).await;
        assert_error(
            status,
            &body,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
        );
    }
    let (status, body) = post_encoded(
        &app,
        "/api/v1/devices/d1/readings",
        app.admin_key(),
        "x-bogus",
        plain.clone(),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_content_encoding",
    );
    assert!(app.telemetry_batches().await.is_empty());

    // What is supported keeps working: identity, gzip (also x-gzip), deflate (zlib).
    let mut gzip = GzEncoder::new(Vec::new(), Compression::fast());
    gzip.write_all(&plain).unwrap();
    let gzip = gzip.finish().unwrap();
    let mut zlib = ZlibEncoder::new(Vec::new(), Compression::fast());
    zlib.write_all(&plain).unwrap();
    let zlib = zlib.finish().unwrap();
    for (encoding, body) in [
        ("identity", plain.clone()),
        ("gzip", gzip.clone()),
        ("x-gzip", gzip.clone()),
        ("GZIP", gzip.clone()),
        ("deflate", zlib),
    ] {
        let (status, answer) = post_encoded(&app, "/api/v1/ingest", &token, encoding, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{encoding}: {answer}");
    }
    // A body that is not what its coding says is a 400, not a 500.
    let (status, body) = post_encoded(&app, "/api/v1/ingest", &token, "gzip", plain).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_body");
    let (status, body) = post_encoded(
        &app,
        "/api/v1/ingest",
        &token,
        "gzip",
        gzip[..gzip.len() - 4].to_vec(),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_body");
    app.shutdown().await;
}
