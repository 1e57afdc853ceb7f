//! Live streams (Server-Sent Events) read straight from JetStream: a device's readings
//! (`FL_TELEMETRY`) and a project's device events (`FL_EVENTS`).
//!
//! Each event's id is its JetStream stream sequence. A client that reconnects with
//! `Last-Event-ID: N` gets an ordered consumer that starts at `N + 1` on the same filter, so
//! what it missed and what comes next arrive from one log in one order: no seam between a
//! history read and a live subscription, hence no loss and no duplicate. When the stream no
//! longer holds `N + 1` (aged out), the first event is `reset`: reload history, then go on.
//!
//! Bounded: streams per key, per project and per process (counted here, released when the
//! response body is dropped), a heartbeat comment while idle, and a maximum lifetime after
//! which the stream ends and the client resumes with its last id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use actix_web::{HttpRequest, HttpResponse, http::header, web::Bytes};
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use fieldline_common::{ApiError, Context, auth::Principal, error::ErrorKind};
use fieldline_proto::Stream;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// How soon a client refused for too many streams should try again.
const RETRY_AFTER_S: u64 = 5;
/// The reconnect delay an `EventSource` uses after the stream ends.
const CLIENT_RETRY_MS: u64 = 2000;

/// Open streams, by key and by project, on this process.
#[derive(Default)]
pub struct Streams {
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_key: HashMap<String, usize>,
    per_project: HashMap<String, usize>,
}

/// One open stream's place in the counts, given back when dropped (with the response body,
/// whether the stream ended or the client went away).
pub struct Slot {
    streams: Arc<Streams>,
    key: String,
    project: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.streams.lock();
        let open = &mut *guard;
        open.total = open.total.saturating_sub(1);
        for (map, name) in [
            (&mut open.per_key, &self.key),
            (&mut open.per_project, &self.project),
        ] {
            if let Some(count) = map.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    map.remove(name);
                }
            }
        }
        metrics::gauge!("fieldline_query_streams_open").decrement(1.0);
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for one more stream of `principal`, or 429 (key or project at its cap) / 503
    /// (this process at its cap).
    pub fn acquire(
        self: &Arc<Self>,
        context: &Context,
        principal: &Principal,
    ) -> Result<Slot, ApiError> {
        let config = &context.config;
        let mut open = self.lock();
        let refusal = if open.total >= config.stream_max {
            Some((
                ErrorKind::Unavailable,
                format!("this server holds {} streams already", config.stream_max),
            ))
        } else if open.per_key.get(&principal.id).copied().unwrap_or(0) >= config.stream_max_per_key
        {
            Some((
                ErrorKind::RateLimited,
                format!(
                    "this key holds {} streams already; close one first",
                    config.stream_max_per_key
                ),
            ))
        } else if open
            .per_project
            .get(&principal.project)
            .copied()
            .unwrap_or(0)
            >= config.stream_max_per_project
        {
            Some((
                ErrorKind::RateLimited,
                format!(
                    "this project holds {} streams already; close one first",
                    config.stream_max_per_project
                ),
            ))
        } else {
            None
        };
        if let Some((kind, message)) = refusal {
            metrics::counter!("fieldline_query_streams_refused_total").increment(1);
            return Err(
                ApiError::new(kind, "too_many_streams", message).with_retry_after(RETRY_AFTER_S)
            );
        }
        open.total += 1;
        *open.per_key.entry(principal.id.clone()).or_default() += 1;
        *open
            .per_project
            .entry(principal.project.clone())
            .or_default() += 1;
        metrics::gauge!("fieldline_query_streams_open").increment(1.0);
        Ok(Slot {
            streams: Arc::clone(self),
            key: principal.id.clone(),
            project: principal.project.clone(),
        })
    }
}

/// The sequence to resume after, from `Last-Event-ID` (or `?last_event_id=`, for clients
/// that cannot set headers).
pub fn last_event_id(request: &HttpRequest, query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let header = request
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok());
    let Some(raw) = header
        .or(query)
        .map(str::trim)
        .filter(|raw| !raw.is_empty())
    else {
        return Ok(None);
    };
    raw.parse::<u64>().map(Some).map_err(|_| {
        ApiError::bad_request(
            "invalid_last_event_id",
            "Last-Event-ID: the id of an event this stream sent (a whole number)",
        )
    })
}

/// What to stream: a JetStream stream, a subject filter in it, and how each message reads.
pub struct Source {
    pub stream: Stream,
    /// One subject filter (NATS 2.9 takes no list).
    pub filter_subject: String,
    /// The SSE `event:` name and `data:` JSON of a message, or `None` to skip it.
    pub render: Render,
}

/// The SSE response: an ordered consumer from `after + 1` (or from now), heartbeats, and an
/// end after the maximum lifetime.
pub async fn respond(
    context: &Context,
    slot: Slot,
    source: Source,
    after: Option<u64>,
) -> Result<HttpResponse, ApiError> {
    let unavailable = |error: &dyn std::fmt::Display| {
        tracing::warn!(error = %error, "live stream: jetstream unavailable");
        ApiError::unavailable("the bus is unavailable; try again")
    };
    let mut stream = context
        .jetstream
        .get_stream(context.subjects.stream_name(source.stream))
        .await
        .map_err(|error| unavailable(&error))?;
    let first_sequence = stream
        .info()
        .await
        .map_err(|error| unavailable(&error))?
        .state
        .first_sequence;
    let (deliver_policy, reset) = match after {
        None => (DeliverPolicy::New, false),
        Some(after) => (
            DeliverPolicy::ByStartSequence {
                start_sequence: after.saturating_add(1).max(1),
            },
            // What came after `after` has partly aged out of the stream.
            after.saturating_add(1) < first_sequence,
        ),
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: source.filter_subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|error| unavailable(&error))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|error| unavailable(&error))?;

    let mut opening = format!("retry: {CLIENT_RETRY_MS}\n\n");
    if reset {
        opening.push_str("event: reset\ndata: {\"reason\":\"events after Last-Event-ID have aged out; reload history\"}\n\n");
    }
    let state = Body {
        messages: Box::pin(messages),
        render: source.render,
        heartbeat: tokio::time::interval_at(
            tokio::time::Instant::now() + context.config.stream_heartbeat,
            context.config.stream_heartbeat,
        ),
        deadline: Box::pin(tokio::time::sleep(context.config.stream_max_lifetime)),
        shutdown: context.shutdown.clone(),
        opening: Some(opening),
        done: false,
        _slot: slot,
    };
    let body = futures::stream::unfold(state, |mut state| async move {
        let frame = state.next_frame().await?;
        Some((Ok::<_, std::convert::Infallible>(frame), state))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache, no-transform"))
        // nginx would otherwise buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// Renders a message as an SSE `event:` name and `data:` JSON, or `None` to skip it.
pub type Render = Box<dyn Fn(&async_nats::jetstream::Message) -> Option<(String, String)> + Send>;

type Messages = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    async_nats::jetstream::Message,
                    async_nats::jetstream::consumer::pull::OrderedError,
                >,
            > + Send,
    >,
>;

struct Body {
    messages: Messages,
    render: Render,
    heartbeat: tokio::time::Interval,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    shutdown: CancellationToken,
    opening: Option<String>,
    done: bool,
    _slot: Slot,
}

impl Body {
    /// The next bytes to send, or `None` when the stream ends.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(opening) = self.opening.take() {
            return Some(Bytes::from(opening));
        }
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                message = self.messages.next() => match message {
                    Some(Ok(message)) => {
                        let Ok(info) = message.info() else { continue };
                        let sequence = info.stream_sequence;
                        let Some((event, data)) = (self.render)(&message) else { continue };
                        self.heartbeat.reset();
                        return Some(Bytes::from(format!(
                            "id: {sequence}\nevent: {event}\ndata: {data}\n\n"
                        )));
                    }
                    Some(Err(error)) => {
                        // The ordered consumer recreates itself on gaps; what is left is the
                        // bus going away. End: the client resumes from its last id.
                        tracing::warn!(error = %error, "live stream: consumer failed");
                        self.done = true;
                        return Some(Bytes::from_static(b"event: end\ndata: {\"reason\":\"bus\"}\n\n"));
                    }
                    None => return None,
                },
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
                () = &mut self.deadline => {
                    self.done = true;
                    return Some(Bytes::from_static(b"event: end\ndata: {\"reason\":\"lifetime\"}\n\n"));
                }
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return Some(Bytes::from_static(b"event: end\ndata: {\"reason\":\"shutdown\"}\n\n"));
                }
            }
        }
    }
}
