//! Traces with OpenTelemetry: one trace from a device's request (or MQTT message) through the
//! bus, the writer and fan-out to each webhook attempt.
//!
//! Configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on; `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `http/json`), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_BSP_*` are read by the SDK. Without an endpoint (or
//! with `OTEL_SDK_DISABLED=true`) no OpenTelemetry layer is installed at all.
//!
//! Context crosses processes as W3C `traceparent` (and `tracestate`): in HTTP request
//! headers, in NATS message headers (OpenTelemetry's messaging conventions), stored with each
//! webhook event so that its attempts, made later by whichever dispatcher claims them, join
//! the trace, and on the outgoing webhook POST so that a receiver can continue it.

use std::{collections::HashMap, sync::OnceLock};

use opentelemetry::{
    Context as OtelContext,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether traces are exported by this process (set once at start).
static ENABLED: OnceLock<bool> = OnceLock::new();

pub fn enabled() -> bool {
    ENABLED.get().copied().unwrap_or(false)
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// Flushes the spans still buffered when the process stops.
pub struct TracerGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl TracerGuard {
    pub fn shutdown(self) {
        if let Some(provider) = self.0 {
            let _ = provider.shutdown();
        }
    }
}

/// Is an OTLP endpoint configured (and the SDK not disabled)?
pub fn configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider for `service` (its `service.name` unless `OTEL_SERVICE_NAME` says
/// otherwise), exporting over OTLP/HTTP in batches.
pub fn provider(
    service: &str,
) -> anyhow::Result<(opentelemetry_sdk::trace::SdkTracerProvider, TracerGuard)> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
    {
        Err(_) | Ok("http/protobuf") => Protocol::HttpBinary,
        Ok("http/json") => Protocol::HttpJson,
        Ok(other) => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: use http/protobuf (the default) or http/json"
        ),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let _ = ENABLED.set(true);
    Ok((provider.clone(), TracerGuard(Some(provider))))
}

/// A guard for a process without traces.
pub fn no_tracer() -> TracerGuard {
    let _ = ENABLED.set(false);
    TracerGuard(None)
}

struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct NatsHeadersRead<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeadersRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Puts the context of `span` in a NATS message's headers (nothing when traces are off).
pub fn inject_nats(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    if enabled() {
        propagator().inject_context(&span.context(), &mut NatsHeaders(headers));
    }
}

/// The context a NATS message carries (empty when it carries none).
pub fn extract_nats(headers: Option<&async_nats::HeaderMap>) -> OtelContext {
    match headers {
        Some(headers) if enabled() => propagator().extract(&NatsHeadersRead(headers)),
        _ => OtelContext::new(),
    }
}

/// `traceparent` (and `tracestate`) of `span`, to send or store.
pub fn headers_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    if enabled() {
        propagator().inject_context(&span.context(), &mut headers);
    }
    headers
}

/// The `traceparent` of `span`, if it is sampled and traces are on.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    headers_of(span).remove("traceparent")
}

/// A context from a stored or received `traceparent`.
pub fn from_traceparent(traceparent: Option<&str>) -> OtelContext {
    match traceparent {
        Some(value) if enabled() => {
            let mut carrier = HashMap::new();
            carrier.insert("traceparent".to_owned(), value.to_owned());
            propagator().extract(&carrier)
        }
        _ => OtelContext::new(),
    }
}

/// The context of HTTP request headers.
pub fn extract_http(headers: &actix_web::http::header::HeaderMap) -> OtelContext {
    if !enabled() {
        return OtelContext::new();
    }
    let mut carrier = HashMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            carrier.insert(name.to_owned(), value.to_owned());
        }
    }
    propagator().extract(&carrier)
}

/// Makes `parent` the span's parent, when it has a valid span context.
pub fn set_parent(span: &tracing::Span, parent: OtelContext) {
    if enabled() && parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Links the span to another context (a message of a batch it handles).
pub fn add_link(span: &tracing::Span, other: &OtelContext) {
    let context = other.span().span_context().clone();
    if enabled() && context.is_valid() {
        span.add_link(context);
    }
}

/// Names the span for OpenTelemetry (`otel.name`, declared `Empty`), built only when traces
/// are exported: with them off, a request pays for no formatting.
pub fn name(span: &tracing::Span, name: impl FnOnce() -> String) {
    if enabled() {
        span.record("otel.name", name());
    }
}

/// Records the span's own trace and span ids in its `trace_id` and `span_id` fields, so that
/// log lines inside it carry them.
pub fn record_ids(span: &tracing::Span) {
    if !enabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
        span.record("span_id", span_context.span_id().to_string());
    }
}
