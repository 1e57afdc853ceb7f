//! A webhook receiver that answers 204 at once and measures send-to-delivery latency from the
//! `sent_us` reading each event carries. For the fault suite it also answers 503 on demand and
//! keeps which readings each delivery carried, to count what arrived once, twice or never.

use std::{
    collections::HashMap,
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::ServerHandle, web};
use hdrhistogram::Histogram;

use crate::stats::{Latency, histogram, summarize};

struct Inner {
    count: Arc<AtomicU64>,
    latencies: Mutex<Histogram<u64>>,
    last: Mutex<Option<Instant>>,
    /// Answer 503 to everything while set (nothing is counted then).
    failing: AtomicBool,
    tracking: Option<Mutex<Tracking>>,
}

/// What the deliveries carried, answered 2xx.
#[derive(Default)]
pub struct Tracking {
    /// Times each reading (device, time in ms) arrived, and when it did first.
    pub readings: HashMap<(String, i64), (u32, Instant)>,
    /// Times each `webhook-id` arrived.
    pub ids: HashMap<String, u32>,
}

pub struct Receiver {
    base_url: String,
    inner: Arc<Inner>,
    handle: ServerHandle,
}

async fn receive(
    request: HttpRequest,
    body: web::Bytes,
    inner: web::Data<Arc<Inner>>,
) -> HttpResponse {
    if inner.failing.load(Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    if let Some(tracking) = &inner.tracking {
        track(tracking, &request, &body);
    }
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    // One event, or a batch of them (a JSON array): each event counts, with its latency.
    let mut events = 1;
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) {
        let batch = match body {
            serde_json::Value::Array(items) => items,
            single => vec![single],
        };
        events = batch.len().max(1) as u64;
        let mut latencies = inner.latencies.lock().unwrap_or_else(|p| p.into_inner());
        for event in &batch {
            let sent = event["payload"]["readings"]
                .as_array()
                .and_then(|readings| readings.iter().find(|r| r["metric"] == "sent_us"))
                .and_then(|reading| reading["value"].as_f64());
            if let Some(sent) = sent {
                let latency = now_us.saturating_sub(sent as u64).max(1);
                let _ = latencies.record(latency);
            }
        }
    }
    inner.count.fetch_add(events, Ordering::Relaxed);
    *inner.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    HttpResponse::NoContent().finish()
}

fn track(tracking: &Mutex<Tracking>, request: &HttpRequest, body: &[u8]) {
    let id = request
        .headers()
        .get("webhook-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let device = event["device_id"].as_str().unwrap_or_default().to_owned();
    let times: Vec<i64> = event["payload"]["readings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|reading| {
            chrono::DateTime::parse_from_rfc3339(reading["ts"].as_str()?)
                .ok()
                .map(|ts| ts.timestamp_millis())
        })
        .collect();
    let mut tracking = tracking.lock().unwrap_or_else(|p| p.into_inner());
    *tracking.ids.entry(id).or_default() += 1;
    let now = Instant::now();
    for ts in times {
        let seen = tracking
            .readings
            .entry((device.clone(), ts))
            .or_insert((0, now));
        seen.0 += 1;
    }
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// A receiver that keeps what each delivery carried ([`Receiver::tracking`]).
    pub async fn start_tracking() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(tracking: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner {
            count: Arc::default(),
            latencies: Mutex::new(histogram()),
            last: Mutex::new(None),
            failing: AtomicBool::new(false),
            tracking: tracking.then(|| Mutex::new(Tracking::default())),
        });
        let data = web::Data::new(inner.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)?
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Ok(Self {
            base_url,
            inner,
            handle,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn counter(&self) -> Arc<AtomicU64> {
        self.inner.count.clone()
    }

    pub fn latency(&self) -> Latency {
        summarize(
            &self
                .inner
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    pub fn last_delivery_since(&self, started: Instant) -> Option<Duration> {
        self.inner
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|last| last.duration_since(started))
    }

    /// Answers 503 to every delivery from now on while `failing`, 204 otherwise.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::Relaxed);
    }

    /// Runs `read` on what the deliveries carried (a tracking receiver's; empty otherwise).
    pub fn tracking<T>(&self, read: impl FnOnce(&Tracking) -> T) -> T {
        match &self.inner.tracking {
            Some(tracking) => read(&tracking.lock().unwrap_or_else(|p| p.into_inner())),
            None => read(&Tracking::default()),
        }
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
