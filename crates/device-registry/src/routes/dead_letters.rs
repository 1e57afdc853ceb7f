//! The dead letters: messages a consumer gave up on (`fieldline_common::consume`), kept in
//! their own stream with the reason. The platform admin lists, inspects, replays and purges
//! them; they cross projects, so no project key may.
//!
//! A replay publishes the message again to the subject it came from, marked for the one
//! consumer that gave up on it (every other consumer of that stream acknowledges it
//! untouched) and with its original sequence (so derived ids, such as fan-out's event ids,
//! come out the same). The dead letter is deleted only once JetStream has the replay.

use actix_web::{HttpResponse, web};
use async_nats::{
    HeaderMap,
    jetstream::{
        message::StreamMessage,
        stream::{LastRawMessageErrorKind, Stream as JsStream},
    },
};
use base64::{Engine, engine::general_purpose::STANDARD};
use fieldline_common::{
    ApiError,
    auth::ApiKey,
    consume::headers,
    envelope::{self, Page},
    extract::Query,
    time::format_rfc3339,
};
use fieldline_proto::{
    Stream,
    v1::{DeviceCommand, DeviceEvent, Heartbeat, TelemetryBatch},
};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::State;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/admin/dead-letters")
            .route(web::get().to(list))
            .route(web::delete().to(purge)),
    )
    .service(
        web::resource("/api/v1/admin/dead-letters/{sequence}")
            .route(web::get().to(inspect))
            .route(web::delete().to(remove)),
    )
    .service(
        web::resource("/api/v1/admin/dead-letters/{sequence}/replay").route(web::post().to(replay)),
    );
}

/// One dead letter, as listed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream: the id the other routes take.
    sequence: u64,
    consumer: String,
    /// Where it was published, and its place in its own stream.
    subject: String,
    stream: String,
    original_sequence: Option<u64>,
    reason: String,
    deliveries: Option<i64>,
    dead_at: String,
    size: usize,
}

/// One dead letter, inspected: also its headers, its payload, and what the payload says.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    summary: DeadLetter,
    /// Name and value pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    headers: Vec<(String, String)>,
    payload_base64: String,
    /// The payload decoded as the message type its subject carries, when it decodes.
    decoded: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    consumer: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeQuery {
    consumer: Option<String>,
    all: Option<bool>,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|value| value.as_str().to_owned())
}

fn summary(message: &StreamMessage) -> DeadLetter {
    let headers = &message.headers;
    DeadLetter {
        sequence: message.sequence,
        consumer: header(headers, headers::CONSUMER).unwrap_or_default(),
        subject: header(headers, headers::SUBJECT).unwrap_or_default(),
        stream: header(headers, headers::STREAM).unwrap_or_default(),
        original_sequence: header(headers, headers::SEQUENCE).and_then(|s| s.parse().ok()),
        reason: header(headers, headers::REASON).unwrap_or_default(),
        deliveries: header(headers, headers::DELIVERIES).and_then(|s| s.parse().ok()),
        dead_at: header(headers, headers::AT).unwrap_or_else(|| {
            let at = chrono::DateTime::from_timestamp(
                message.time.unix_timestamp(),
                message.time.nanosecond(),
            )
            .unwrap_or_default();
            format_rfc3339(&at)
        }),
        size: message.payload.len(),
    }
}

/// What the payload says, by the kind of subject it was published to.
fn decode(subject: &str, payload: &[u8]) -> Option<String> {
    let kind = subject.split('.').nth(1)?;
    match kind {
        "telemetry" => TelemetryBatch::decode(payload)
            .ok()
            .map(|m| format!("{m:?}")),
        "heartbeat" => Heartbeat::decode(payload).ok().map(|m| format!("{m:?}")),
        "events" => DeviceEvent::decode(payload).ok().map(|m| format!("{m:?}")),
        "commands" => DeviceCommand::decode(payload)
            .ok()
            .map(|m| format!("{m:?}")),
        _ => None,
    }
}

fn unavailable(error: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %error, "dead-letter stream unavailable");
    ApiError::unavailable("the bus is unavailable; try again")
}

fn not_found(sequence: u64) -> ApiError {
    ApiError::not_found(
        "dead_letter_not_found",
        format!("dead letter {sequence} not found"),
    )
}

fn parse_sequence(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|sequence| *sequence > 0)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_path",
                "sequence: must be a dead letter's sequence (a positive integer)",
            )
        })
}

/// A consumer name as the filter of a subject: one token of `[a-z0-9-]`.
fn consumer_filter(state: &State, consumer: Option<&str>) -> Result<String, ApiError> {
    let subjects = &state.context.subjects;
    match consumer {
        None => Ok(subjects.dead_letters_all()),
        Some(name)
            if !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
        {
            Ok(subjects.dead_letter(name))
        }
        Some(_) => Err(ApiError::bad_request(
            "invalid_query",
            "consumer: a consumer's name, such as query-writer",
        )),
    }
}

async fn dead_stream(state: &State) -> Result<JsStream, ApiError> {
    state
        .context
        .jetstream
        .get_stream(state.context.subjects.stream_name(Stream::DeadLetters))
        .await
        .map_err(unavailable)
}

/// The first dead letter at or after `from` on `filter`, if any.
async fn next(
    stream: &JsStream,
    filter: &str,
    from: u64,
) -> Result<Option<StreamMessage>, ApiError> {
    match stream
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(filter.to_owned())
        .send()
        .await
    {
        Ok(message) => Ok(Some(message)),
        Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(error) => Err(unavailable(error)),
    }
}

/// The dead letter a path names, with its stream and sequence (404 when it is gone).
async fn named(state: &State, path: &str) -> Result<(JsStream, u64, StreamMessage), ApiError> {
    let sequence = parse_sequence(path)?;
    let stream = dead_stream(state).await?;
    let filter = state.context.subjects.dead_letters_all();
    match next(&stream, &filter, sequence).await? {
        Some(message) if message.sequence == sequence => Ok((stream, sequence, message)),
        _ => Err(not_found(sequence)),
    }
}

async fn list(
    state: web::Data<State>,
    key: ApiKey,
    Query(query): Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    key.require_platform_admin()?;
    let limit = envelope::parse_limit(query.limit.as_deref(), 100, 1000)?;
    let filter = consumer_filter(&state, query.consumer.as_deref())?;
    let mut from = match &query.cursor {
        Some(cursor) => envelope::decode_cursor::<u64>(cursor)? + 1,
        None => 1,
    };
    let stream = dead_stream(&state).await?;
    let mut letters = Vec::new();
    let mut next_cursor = None;
    while let Some(message) = next(&stream, &filter, from).await? {
        if letters.len() == limit {
            next_cursor = letters
                .last()
                .map(|last: &DeadLetter| envelope::encode_cursor(&last.sequence));
            break;
        }
        from = message.sequence + 1;
        letters.push(summary(&message));
    }
    Ok(envelope::list(&letters, Page { limit, next_cursor }))
}

async fn inspect(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    key.require_platform_admin()?;
    let (_, _, message) = named(&state, &path).await?;
    let letter = summary(&message);
    let decoded = decode(&letter.subject, &message.payload);
    let headers = message
        .headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |value| (name.to_owned(), value.as_str().to_owned()))
        })
        .collect();
    Ok(envelope::ok(&DeadLetterDetail {
        summary: letter,
        headers,
        payload_base64: STANDARD.encode(&message.payload),
        decoded,
    }))
}

async fn replay(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require_platform_admin()?;
    let (stream, sequence, message) = named(&state, &path).await?;
    let letter = summary(&message);
    let bus_root = format!("{}.", state.context.config.bus_prefix);
    if letter.consumer.is_empty() || !letter.subject.starts_with(&bus_root) {
        return Err(ApiError::unprocessable(
            "not_replayable",
            format!("dead letter {sequence} does not say where it came from"),
        ));
    }
    // The original's headers, less the dead letter's own; marked for its consumer.
    let mut replayed = headers::own(&message.headers);
    replayed.insert(headers::REPLAY_FOR, letter.consumer.as_str());
    if let Some(original) = letter.original_sequence {
        replayed.insert(headers::REPLAY_SEQUENCE, original.to_string().as_str());
    }
    // Two replays of one dead letter within the duplicate window are one message.
    replayed.insert("Nats-Msg-Id", format!("replay-{sequence}").as_str());
    state
        .context
        .jetstream
        .publish_with_headers(letter.subject.clone(), replayed, message.payload.clone())
        .await
        .map_err(unavailable)?
        .await
        .map_err(unavailable)?;
    stream.delete_message(sequence).await.map_err(unavailable)?;
    tracing::info!(sequence, consumer = %letter.consumer, subject = %letter.subject, by = %principal.id, "dead letter replayed");
    Ok(envelope::ok(&Replayed {
        replayed: sequence,
        consumer: letter.consumer,
        subject: letter.subject,
    }))
}

async fn remove(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require_platform_admin()?;
    let (stream, sequence, _) = named(&state, &path).await?;
    stream.delete_message(sequence).await.map_err(unavailable)?;
    tracing::info!(sequence, by = %principal.id, "dead letter deleted");
    Ok(envelope::no_content())
}

async fn purge(
    state: web::Data<State>,
    key: ApiKey,
    Query(query): Query<PurgeQuery>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require_platform_admin()?;
    // A bare DELETE of the collection must say so: `?consumer=` or `?all=true`.
    if query.consumer.is_none() && query.all != Some(true) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "consumer: name the consumer whose dead letters go, or pass all=true",
        ));
    }
    let filter = consumer_filter(&state, query.consumer.as_deref())?;
    let stream = dead_stream(&state).await?;
    let purged = stream
        .purge()
        .filter(filter)
        .await
        .map_err(unavailable)?
        .purged;
    tracing::info!(purged, consumer = ?query.consumer, by = %principal.id, "dead letters purged");
    Ok(envelope::ok(&Purged { purged }))
}

/// A dead letter published again, for its consumer only.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Replayed {
    /// The dead letter's sequence.
    pub replayed: u64,
    pub consumer: String,
    pub subject: String,
}

/// How many dead letters a purge removed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Purged {
    pub purged: u64,
}
