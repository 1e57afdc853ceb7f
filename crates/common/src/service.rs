//! What a running service is made of, and the one HTTP listener every service of a process
//! shares (with `/health/live`, `/health/ready` and `/metrics`).

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant},
};

use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::{
    App, HttpMessage, HttpRequest, HttpResponse,
    body::{EitherBody, MessageBody},
    dev::{ServerHandle, ServiceRequest, ServiceResponse},
    middleware, web,
};
use anyhow::Context as _;
use async_nats::jetstream;
use deadpool_postgres::Pool;
use fieldline_proto::Subjects;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::AuthClient,
    bus,
    config::Config,
    db,
    edge::EdgeIo,
    error::{ApiError, ErrorKind},
    extract::{self, BodyLimit},
    openapi::AllowedMethods,
    ratelimit::{Decision, RateLimits},
    telemetry,
};

/// Everything a service needs from its process: config, connections, shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub subjects: Subjects,
    pub nats: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub auth: AuthClient,
    /// This process's rate limits, shared by its services.
    pub limits: RateLimits,
    /// Cancelled on SIGTERM / Ctrl-C; every loop watches it.
    pub shutdown: CancellationToken,
    /// Background loops; the process waits for them on shutdown.
    pub tasks: TaskTracker,
    db: Arc<OnceCell<Pool>>,
}

impl Context {
    /// Connects to NATS, makes sure the streams exist and starts listening for cache
    /// invalidations. Postgres is connected on first use ([`Context::db`]), since the ingest
    /// services never touch it.
    pub async fn connect(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let subjects = config.subjects();
        let auth_slot: Arc<std::sync::OnceLock<AuthClient>> = Arc::default();
        let on_reconnect = {
            let auth_slot = auth_slot.clone();
            move || {
                if let Some(auth) = auth_slot.get() {
                    auth.invalidate_all();
                }
            }
        };
        let nats = bus::connect(&config, "fieldline", on_reconnect).await?;
        let jetstream = jetstream::new(nats.clone());
        bus::ensure_streams(
            &jetstream,
            &subjects,
            config.stream_limits(),
            &config.stream_replication(),
        )
        .await?;
        let auth = AuthClient::new(
            nats.clone(),
            subjects.clone(),
            config.auth_cache_ttl,
            config.rpc_timeout,
        );
        let _ = auth_slot.set(auth.clone());
        let tasks = TaskTracker::new();
        let limits = RateLimits::new(&config);
        limits.spawn_sweeper(&tasks, shutdown.clone());
        let listener = auth.listen_for_invalidations(shutdown.clone()).await?;
        tasks.spawn(async move {
            let _ = listener.await;
        });
        Ok(Self {
            config: Arc::new(config),
            subjects,
            nats,
            jetstream,
            auth,
            limits,
            shutdown,
            tasks,
            db: Arc::default(),
        })
    }

    /// The process's Postgres pool, connected on first call.
    pub async fn db(&self) -> anyhow::Result<Pool> {
        self.db
            .get_or_try_init(|| async {
                let pool = db::connect(&self.config).await?;
                self.watch_pool(pool.clone());
                Ok::<_, anyhow::Error>(pool)
            })
            .await
            .cloned()
    }

    /// The pool's use every 5 s: connections in use, idle, and requests waiting for one.
    fn watch_pool(&self, pool: Pool) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let status = pool.status();
                let idle = status.available as f64;
                metrics::gauge!("fieldline_db_pool_connections", "state" => "in_use")
                    .set(status.size as f64 - idle);
                metrics::gauge!("fieldline_db_pool_connections", "state" => "idle").set(idle);
                metrics::gauge!("fieldline_db_pool_max_connections").set(status.max_size as f64);
                metrics::gauge!("fieldline_db_pool_waiting").set(status.waiting as f64);
            }
        });
    }

    fn db_if_connected(&self) -> Option<Pool> {
        self.db.get().cloned()
    }
}

/// Adds a service's routes to the shared App.
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// A readiness check beyond NATS and Postgres (ingest-mqtt: is the broker connected).
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A started service: its routes (if it has any) and its own readiness check.
pub struct Service {
    pub name: &'static str,
    pub routes: Option<Routes>,
    pub ready: Option<ReadyCheck>,
}

/// The HTTP listener of a process, running.
pub struct HttpListener {
    pub addr: SocketAddr,
    handle: ServerHandle,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl HttpListener {
    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout).
    pub async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.join.await;
    }
}

#[derive(Clone)]
struct Readiness {
    context: Context,
    checks: Vec<(&'static str, ReadyCheck)>,
}

/// Binds `config.http_addr` (port 0 allowed: read the real one from `addr`) and serves the
/// routes of `services` plus health and metrics.
pub fn serve_http(context: &Context, services: &[Service]) -> anyhow::Result<HttpListener> {
    let listener = TcpListener::bind(&context.config.http_addr)
        .with_context(|| format!("binding {} (FIELDLINE_HTTP_ADDR)", context.config.http_addr))?;
    let addr = listener.local_addr()?;
    let routes: Vec<Routes> = services.iter().filter_map(|s| s.routes.clone()).collect();
    let readiness = Readiness {
        context: context.clone(),
        checks: services
            .iter()
            .filter_map(|s| s.ready.clone().map(|check| (s.name, check)))
            .collect(),
    };
    let auth = web::Data::new(context.auth.clone());
    let limits = web::Data::new(context.limits.clone());
    let metrics = web::Data::new(telemetry::metrics_handle());
    let readiness = web::Data::new(readiness);
    let body_limit = BodyLimit(context.config.ingest_max_body_bytes);
    let workers = context.config.http_worker_count();
    let app = move || {
        let mut app = App::new()
            .app_data(auth.clone())
            .app_data(limits.clone())
            .app_data(metrics.clone())
            .app_data(readiness.clone())
            .app_data(body_limit)
            .app_data(web::PathConfig::default().error_handler(extract::path_error_handler))
            .wrap(middleware::ErrorHandlers::new().handler(
                actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
                method_not_allowed,
            ))
            .wrap_fn(refuse_nul_in_uri)
            .wrap_fn(record_http_metrics)
            .wrap_fn(rate_limit_headers)
            .service(web::resource("/health/live").route(web::get().to(live)))
            .service(web::resource("/health/ready").route(web::get().to(ready)))
            .service(web::resource("/metrics").route(web::get().to(render_metrics)));
        for configure in &routes {
            let configure = configure.clone();
            app = app.configure(move |cfg| configure(cfg));
        }
        app.default_service(web::to(not_found))
    };
    // What `HttpServer::listen` builds, with the socket wrapped in `EdgeIo` so that heads the
    // codec refuses are answered in the envelope (HttpServer takes no IO wrapper).
    let builder = actix_web::dev::Server::build()
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(context.config.shutdown_timeout.as_secs().max(1));
    let graceful_shutdown = builder.graceful_shutdown_signal();
    let server = builder
        .listen("fieldline-http", listener, move || {
            let graceful_shutdown = graceful_shutdown.clone();
            let app = app().into_factory().map_err(|error| error.error_response());
            let http = actix_http::HttpService::build()
                // Idle keep-alive connections close at once on a graceful stop, as HttpServer
                // has them do.
                .graceful_shutdown_signal(move || {
                    let signal = graceful_shutdown.clone();
                    async move { signal.notified().await }
                })
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                // The app's config gives a host for URL generation and requests without a
                // Host header; neither is used here.
                .h1(actix_service::map_config(app, |_| {
                    actix_web::dev::AppConfig::default()
                }));
            actix_service::fn_service(|stream: tokio::net::TcpStream| async move {
                let peer = stream.peer_addr().ok();
                Ok::<_, actix_http::error::DispatchError>((EdgeIo::new(stream), peer))
            })
            .and_then(http)
        })?
        .run();
    let handle = server.handle();
    let join = tokio::spawn(server);
    tracing::info!(%addr, "http listening");
    Ok(HttpListener { addr, handle, join })
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok", "data": {"live": true}}))
}

async fn ready(readiness: web::Data<Readiness>) -> HttpResponse {
    let mut failures = Vec::new();
    if !bus::is_connected(&readiness.context.nats) {
        failures.push("nats: not connected".to_owned());
    }
    if let Some(pool) = readiness.context.db_if_connected() {
        let check = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failures.push(format!("postgres: {error}")),
            Err(_) => failures.push("postgres: timed out".to_owned()),
        }
    }
    for (name, check) in &readiness.checks {
        if let Err(error) = check().await {
            failures.push(format!("{name}: {error}"));
        }
    }
    if failures.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({"status": "ok", "data": {"ready": true}}))
    } else {
        let error = ApiError::new(ErrorKind::Unavailable, "not_ready", failures.join("; "));
        actix_web::ResponseError::error_response(&error)
    }
}

async fn render_metrics(
    handle: web::Data<metrics_exporter_prometheus::PrometheusHandle>,
) -> HttpResponse {
    telemetry::process_collector().collect();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle.render())
}

/// actix answers a known path with an unknown method with an empty 405; give it the envelope,
/// and the `Allow` header RFC 9110 asks for, from the OpenAPI document's methods of the path
/// (the platform's methods: behind the gateway another service may serve the others).
fn method_not_allowed<B: MessageBody + 'static>(
    response: ServiceResponse<B>,
) -> actix_web::Result<middleware::ErrorHandlerResponse<B>> {
    let (request, _) = response.into_parts();
    let error = ApiError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.path()),
    );
    let mut response = actix_web::ResponseError::error_response(&error);
    let allowed = request
        .app_data::<web::Data<AllowedMethods>>()
        .zip(request.match_pattern())
        .and_then(|(allowed, pattern)| allowed.of(&pattern));
    if let Some(methods) = allowed
        && let Ok(value) = actix_web::http::header::HeaderValue::from_str(methods)
    {
        response
            .headers_mut()
            .insert(actix_web::http::header::ALLOW, value);
    }
    Ok(middleware::ErrorHandlerResponse::Response(
        ServiceResponse::new(request, response).map_into_right_body(),
    ))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(
        "route_not_found",
        format!("no route for {} {}", req.method(), req.path()),
    ))
}

/// A NUL (`%00`) in the path or the query string is refused before routing, for every path
/// and query parameter at once: no id, name or parameter of the API holds one, and Postgres
/// text cannot (it reached the registry and made it fall silent).
fn refuse_nul_in_uri<S, B>(
    req: ServiceRequest,
    service: &S,
) -> futures::future::LocalBoxFuture<
    'static,
    Result<ServiceResponse<EitherBody<B>>, actix_web::Error>,
>
where
    S: actix_web::dev::Service<
            ServiceRequest,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        >,
    S::Future: 'static,
    B: MessageBody + 'static,
{
    let field = if has_escaped_nul(req.path()) {
        Some("path")
    } else if has_escaped_nul(req.query_string()) {
        Some("query")
    } else {
        None
    };
    if let Some(field) = field {
        let response = req
            .error_response(extract::nul_error(field))
            .map_into_right_body();
        return Box::pin(std::future::ready(Ok(response)));
    }
    let response = service.call(req);
    Box::pin(async move { Ok(response.await?.map_into_left_body()) })
}

/// Holds `%00`. Asked twice of every request: a search for `%` first, as `str::contains`
/// builds a substring searcher each call.
fn has_escaped_nul(text: &str) -> bool {
    let bytes = text.as_bytes();
    memchr::memchr_iter(b'%', bytes).any(|at| bytes.get(at + 1..at + 3) == Some(b"00"))
}

fn record_http_metrics<S, B>(
    req: ServiceRequest,
    service: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>> + use<S, B>
where
    S: actix_web::dev::Service<
            ServiceRequest,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        >,
    B: MessageBody,
{
    use tracing::Instrument as _;
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    // The request's span, child of the caller's `traceparent` if it sent one; every span of
    // its handling (auth, publish) is a child of it.
    let span = tracing::info_span!(
        "http request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    crate::trace::name(&span, || format!("{method} {route}"));
    crate::trace::set_parent(&span, crate::trace::extract_http(req.headers()));
    crate::trace::record_ids(&span);
    let response = span.in_scope(|| service.call(req));
    let request_span = span.clone();
    async move {
        let response = response.await?;
        let code = response.status().as_u16();
        request_span.record("http.response.status_code", code);
        if code >= 500 {
            request_span.record("otel.status_code", "ERROR");
        }
        let (requests, duration) = http_metrics(method, &route, code);
        requests.increment(1);
        duration.record(started.elapsed().as_secs_f64());
        Ok(response)
    }
    .instrument(span)
}

/// A request's method as a metric label: the methods of HTTP, and `_OTHER` (as OpenTelemetry
/// names it) for any extension method a client makes up (one label each would let a client
/// grow the registry without end).
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// The request counter and duration histogram of a (method, route, status), found in the
/// recorder once per worker thread and kept: building their labelled keys and finding them in
/// the registry cost more than the rest of a small request's bookkeeping. Bounded: routes are
/// the app's patterns (or `unmatched`), methods [`method_label`]'s, statuses three digits.
fn http_metrics(
    method: &'static str,
    route: &str,
    status: u16,
) -> (metrics::Counter, metrics::Histogram) {
    type Handles = Vec<(&'static str, u16, metrics::Counter, metrics::Histogram)>;
    thread_local! {
        static HANDLES: std::cell::RefCell<std::collections::HashMap<String, Handles>> =
            std::cell::RefCell::default();
    }
    HANDLES.with_borrow_mut(|routes| {
        if let Some((_, _, requests, duration)) = routes
            .get(route)
            .and_then(|handles| handles.iter().find(|h| h.0 == method && h.1 == status))
        {
            return (requests.clone(), duration.clone());
        }
        let labels = [
            ("method", method.to_owned()),
            ("route", route.to_owned()),
            ("status", status.to_string()),
        ];
        let requests = metrics::counter!("fieldline_http_requests_total", &labels);
        let duration = metrics::histogram!("fieldline_http_request_duration_seconds", &labels);
        routes.entry(route.to_owned()).or_default().push((
            method,
            status,
            requests.clone(),
            duration.clone(),
        ));
        (requests, duration)
    })
}

/// Adds the `RateLimit-*` headers (and `Retry-After` on a 429) of the limit the request was
/// counted against, if any (see `auth::authenticate`).
fn rate_limit_headers<S, B>(
    req: ServiceRequest,
    service: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>> + use<S, B>
where
    S: actix_web::dev::Service<
            ServiceRequest,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        >,
    B: MessageBody,
{
    let response = service.call(req);
    async move {
        let mut response = response.await?;
        let decision = response.request().extensions().get::<Decision>().copied();
        if let Some(decision) = decision {
            decision.write_headers(response.headers_mut());
        }
        Ok(response)
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::has_escaped_nul;

    /// The same answers as `contains("%00")`, wherever the escape falls.
    #[test]
    fn an_escaped_nul_is_found_anywhere_and_nothing_else_is() {
        for (text, expected) in [
            ("", false),
            ("%00", true),
            ("/a/b%00", true),
            ("%%00", true),
            ("a=%0", false),
            ("a=%", false),
            ("%2500", false),
            ("%0a%00x", true),
            ("/api/v1/ingest", false),
        ] {
            assert_eq!(has_escaped_nul(text), expected, "{text:?}");
            assert_eq!(text.contains("%00"), expected, "{text:?}");
        }
    }
}
