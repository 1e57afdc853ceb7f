//! NATS: a connection that reconnects by itself, and the JetStream streams.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{ConnectOptions, Event, jetstream};
use fieldline_proto::{Stream, StreamLimits, Subjects};

use crate::config::Config;

/// Connects to NATS. Fails at start when the server is unreachable; once connected the client
/// reconnects forever, and `on_reconnect` runs after each reconnection (caches that may have
/// missed an invalidation while disconnected are cleared there).
pub async fn connect(
    config: &Config,
    name: &str,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) -> anyhow::Result<async_nats::Client> {
    let on_reconnect = std::sync::Arc::new(on_reconnect);
    let options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(move |event| {
            let on_reconnect = on_reconnect.clone();
            async move {
                match event {
                    Event::Connected => {
                        tracing::info!("nats connected");
                        on_reconnect();
                    }
                    Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::info!(event = %other, "nats event"),
                }
            }
        });
    options.connect(&config.nats_url).await.with_context(|| {
        format!(
            "connecting to NATS at {} (FIELDLINE_NATS_URL)",
            config.nats_url
        )
    })
}

/// Creates the platform's streams if they do not exist yet (idempotent; every service calls
/// it at start, so start order does not matter).
pub async fn ensure_streams(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: StreamLimits,
) -> anyhow::Result<()> {
    for stream in Stream::ALL {
        let config = subjects.stream_config(stream, limits);
        let name = config.name.clone();
        jetstream
            .get_or_create_stream(config)
            .await
            .with_context(|| {
                format!("creating JetStream stream {name} (is JetStream enabled, -js?)")
            })?;
    }
    Ok(())
}

/// Is the client connected right now? Ingest answers 503 at once rather than queueing
/// publishes it cannot get acknowledged.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// A pull consumer's messages, fetched `batch` at a time. async-nats asks for 200 per pull
/// by default; a consumer that stores what it takes in one transaction per batch wants its
/// batches as large as it can take when it falls behind (the writer's averaged 65 messages).
pub async fn pull_messages(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    batch: usize,
) -> Result<
    async_nats::jetstream::consumer::pull::Stream,
    async_nats::jetstream::consumer::StreamError,
> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(std::time::Duration::from_secs(15))
        .messages()
        .await
}

/// Waits for one message, then takes whatever else is already delivered, up to `max`: batches
/// grow with load without delaying a lone message. `None` when the stream ends.
pub async fn next_batch<S, T, E>(messages: &mut S, max: usize) -> Option<Result<Vec<T>, E>>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
{
    use futures::{FutureExt, StreamExt};
    let first = match messages.next().await? {
        Ok(message) => message,
        Err(error) => return Some(Err(error)),
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match messages.next().now_or_never() {
            Some(Some(Ok(message))) => batch.push(message),
            Some(Some(Err(error))) => return Some(Err(error)),
            _ => break,
        }
    }
    Some(Ok(batch))
}

/// Request/reply with a protobuf on each side. No answer within `timeout` (the responder is
/// down, or chose not to answer because its database is) is a 503, never a guess.
pub async fn rpc<Req, Resp>(
    client: &async_nats::Client,
    subject: String,
    request: &Req,
    timeout: std::time::Duration,
) -> Result<Resp, crate::ApiError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let unavailable = || crate::ApiError::unavailable("device-registry did not answer in time");
    let reply = match tokio::time::timeout(
        timeout,
        client.request(subject.clone(), request.encode_to_vec().into()),
    )
    .await
    {
        Ok(Ok(reply)) => reply,
        Ok(Err(error)) => {
            tracing::warn!(error = %error, subject = %subject, "rpc failed");
            return Err(unavailable());
        }
        Err(_) => {
            tracing::warn!(subject = %subject, "rpc timed out");
            return Err(unavailable());
        }
    };
    Resp::decode(reply.payload.as_ref()).map_err(|error| {
        tracing::warn!(error = %error, subject = %subject, "rpc answered garbage");
        unavailable()
    })
}
