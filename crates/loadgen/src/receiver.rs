//! A webhook receiver that answers 204 at once and measures send-to-delivery latency from the
//! `sent_us` reading each event carries.

use std::{
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use actix_web::{App, HttpResponse, HttpServer, dev::ServerHandle, web};
use hdrhistogram::Histogram;

use crate::stats::{Latency, histogram, summarize};

struct Inner {
    count: Arc<AtomicU64>,
    latencies: Mutex<Histogram<u64>>,
    last: Mutex<Option<Instant>>,
}

pub struct Receiver {
    base_url: String,
    inner: Arc<Inner>,
    handle: ServerHandle,
}

async fn receive(body: web::Bytes, inner: web::Data<Arc<Inner>>) -> HttpResponse {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) {
        let sent = event["payload"]["readings"]
            .as_array()
            .and_then(|readings| readings.iter().find(|r| r["metric"] == "sent_us"))
            .and_then(|reading| reading["value"].as_f64());
        if let Some(sent) = sent {
            let latency = now_us.saturating_sub(sent as u64).max(1);
            let _ = inner
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(latency);
        }
    }
    inner.count.fetch_add(1, Ordering::Relaxed);
    *inner.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    HttpResponse::NoContent().finish()
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner {
            count: Arc::default(),
            latencies: Mutex::new(histogram()),
            last: Mutex::new(None),
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

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
