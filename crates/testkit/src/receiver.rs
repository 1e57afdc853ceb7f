//! A real webhook receiver on loopback: answers each path from a script (a status, a
//! `Retry-After`, or hanging) and records every request it gets.

use std::{
    collections::{HashMap, VecDeque},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::ServerHandle, web};

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: seconds`.
    RetryAfter(u16, u64),
    /// Holds the request this long before answering 200.
    Hang(Duration),
}

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct Inner {
    scripts: HashMap<String, VecDeque<Reply>>,
    /// (path, text the body contains, answers left, status): checked before the scripts.
    failures: Vec<(String, String, usize, u16)>,
    received: Vec<Received>,
}

pub struct Receiver {
    pub base_url: String,
    inner: Arc<Mutex<Inner>>,
    handle: ServerHandle,
}

async fn answer(
    req: HttpRequest,
    body: web::Bytes,
    inner: web::Data<Arc<Mutex<Inner>>>,
) -> HttpResponse {
    let path = req.path().to_owned();
    let reply = {
        let mut inner = inner.lock().unwrap();
        inner.received.push(Received {
            path: path.clone(),
            headers: req
                .headers()
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        value.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            at: Instant::now(),
        });
        let text = String::from_utf8_lossy(&body).into_owned();
        let failure = inner.failures.iter_mut().find(|(on, needle, left, _)| {
            *on == path && *left > 0 && text.contains(needle.as_str())
        });
        if let Some((_, _, left, status)) = failure {
            *left -= 1;
            Reply::Status(*status)
        } else {
            inner
                .scripts
                .get_mut(&path)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Reply::Status(200))
        }
    };
    match reply {
        Reply::Status(code) => {
            HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap())
                .body(format!("answer {code}"))
        }
        Reply::RetryAfter(code, seconds) => {
            HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap())
                .insert_header(("Retry-After", seconds.to_string()))
                .finish()
        }
        Reply::Hang(duration) => {
            tokio::time::sleep(duration).await;
            HttpResponse::Ok().finish()
        }
    }
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let data = web::Data::new(inner.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(answer))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base_url,
            inner,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The next answers on `path`, in order; after them, 200.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .insert(path.to_owned(), replies.into());
    }

    /// The next `times` requests on `path` whose body contains `needle` are answered
    /// `status`, whatever the script says.
    pub fn fail_matching(&self, path: &str, needle: &str, times: usize, status: u16) {
        self.inner.lock().unwrap().failures.push((
            path.to_owned(),
            needle.to_owned(),
            times,
            status,
        ));
    }

    /// Every request received on `path`, in arrival order.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.inner
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
