//! Success envelopes: `{"status":"ok","data":…}`, lists with `"page"`.

use actix_web::{
    HttpResponse,
    http::{StatusCode, header},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};

use crate::error::ApiError;

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    status: &'static str,
    data: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<&'a Page>,
}

/// Paging of a list: keyset cursors, never offsets.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page {
    pub limit: usize,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

fn respond<T: Serialize>(status: StatusCode, data: &T, page: Option<&Page>) -> HttpResponse {
    let envelope = Envelope {
        status: "ok",
        data,
        page,
    };
    // `HttpResponseBuilder::json` would copy its content type from a `Mime` on every response.
    match serde_json::to_vec(&envelope) {
        Ok(body) => HttpResponse::build(status)
            .insert_header((
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            ))
            .body(body),
        Err(error) => actix_web::ResponseError::error_response(&ApiError::internal(error)),
    }
}

pub fn ok<T: Serialize>(data: &T) -> HttpResponse {
    respond(StatusCode::OK, data, None)
}

pub fn created<T: Serialize>(data: &T) -> HttpResponse {
    respond(StatusCode::CREATED, data, None)
}

pub fn accepted<T: Serialize>(data: &T) -> HttpResponse {
    respond(StatusCode::ACCEPTED, data, None)
}

pub fn list<T: Serialize>(data: &T, page: Page) -> HttpResponse {
    respond(StatusCode::OK, data, Some(&page))
}

pub fn no_content() -> HttpResponse {
    HttpResponse::NoContent().finish()
}

/// Encodes a keyset position as an opaque cursor.
pub fn encode_cursor<T: Serialize>(position: &T) -> String {
    let json = serde_json::to_vec(position).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a cursor made by [`encode_cursor`]; anything else is a 400 naming `cursor`.
pub fn decode_cursor<T: DeserializeOwned>(cursor: &str) -> Result<T, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor: not a cursor this API issued")
        })
}

/// `limit` of a listing: 1 to `max`, `default` when absent; a 400 naming `limit` otherwise.
pub fn parse_limit(value: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_query", format!("limit: must be 1 to {max}"))
            }),
    }
}

/// Answers a keyset-paged list. `rows` were fetched with `limit + 1`, each with its keyset
/// position: an extra row means there is a next page, whose cursor is the position of the
/// last row kept.
pub fn keyset_page<T: Serialize, P: Serialize>(
    mut rows: Vec<(T, P)>,
    limit: usize,
) -> HttpResponse {
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(_, position)| encode_cursor(position))
    } else {
        None
    };
    let data: Vec<T> = rows.into_iter().map(|(row, _)| row).collect();
    list(&data, Page { limit, next_cursor })
}
