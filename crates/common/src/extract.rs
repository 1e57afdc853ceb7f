//! Request extractors that answer in the envelope: JSON bodies with the failing field named,
//! size limits as 413, content types as 415, query strings as 400.

use std::{future::Future, pin::Pin};

use actix_web::{
    FromRequest, HttpRequest,
    dev::{Decompress, Payload},
    http::header,
    web,
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorKind};

/// Largest JSON body the [`Json`] extractor reads; set per app with `app_data(BodyLimit(..))`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl Default for BodyLimit {
    fn default() -> Self {
        BodyLimit(256 * 1024)
    }
}

/// Reads the whole body (decompressing `Content-Encoding: gzip`), refusing more than `limit`
/// bytes with 413 whether or not a Content-Length was sent.
pub async fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::payload_too_large(format!("body exceeds {limit} bytes"));
    if let Some(length) = req.headers().get(header::CONTENT_LENGTH) {
        let declared = length
            .to_str()
            .ok()
            .and_then(|value| value.parse::<usize>().ok());
        let is_compressed = req.headers().contains_key(header::CONTENT_ENCODING);
        if !is_compressed && declared.is_some_and(|declared| declared > limit) {
            return Err(too_large());
        }
    }
    let mut stream = Decompress::from_headers(payload.take(), req.headers());
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::bad_request("invalid_body", format!("body could not be read: {error}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Is the request's content type JSON (`application/json` or `application/*+json`)?
pub fn is_json_content_type(req: &HttpRequest) -> bool {
    let Some(value) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub fn unsupported_media_type(expected: &str) -> ApiError {
    ApiError::new(
        ErrorKind::UnsupportedMediaType,
        "unsupported_media_type",
        format!("Content-Type must be {expected}"),
    )
}

/// Parses JSON into `T`, naming the path of the first bad field in the 400.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Tell malformed JSON from a well-formed body with a bad field: serde reports some type
    // errors (an enum given a number) as syntax errors.
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError::bad_request(
            "malformed_json",
            format!("body is not valid JSON: {error}"),
        ));
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(field_error)
}

/// Like [`parse_json`], for a document already parsed (a merge patch applied to a resource).
pub fn parse_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(field_error)
}

fn field_error<E: std::fmt::Display>(error: serde_path_to_error::Error<E>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if path == "." {
        ApiError::bad_request("invalid_body", format!("body: {inner}"))
    } else {
        ApiError::bad_request("invalid_field", format!("{path}: {inner}"))
    }
}

/// A JSON body, deserialized with the failing field named.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json_content_type(&req) {
                return Err(unsupported_media_type("application/json"));
            }
            let limit = req.app_data::<BodyLimit>().copied().unwrap_or_default().0;
            let body = read_body(&req, &mut payload, limit).await?;
            parse_json(&body).map(Json)
        })
    }
}

/// A JSON body that may be absent: an empty body is `None`, anything else must be valid.
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned + 'static> FromRequest for OptionalJson<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let limit = req.app_data::<BodyLimit>().copied().unwrap_or_default().0;
            let body = read_body(&req, &mut payload, limit).await?;
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(OptionalJson(None));
            }
            if !is_json_content_type(&req) {
                return Err(unsupported_media_type("application/json"));
            }
            parse_json(&body).map(|value| OptionalJson(Some(value)))
        })
    }
}

/// Query-string parameters, with a 400 naming the bad parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = serde_urlencoded_query(req.query_string()).map(Query);
        std::future::ready(result)
    }
}

fn serde_urlencoded_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    web::Query::<T>::from_query(query)
        .map(|query| query.into_inner())
        .map_err(|error| {
            let message = match error {
                actix_web::error::QueryPayloadError::Deserialize(inner) => inner.to_string(),
                other => other.to_string(),
            };
            ApiError::bad_request("invalid_query", format!("query: {message}"))
        })
}

/// Path parameters, with a 400 instead of actix's plain-text 404.
pub fn path_error_handler(error: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request("invalid_path", format!("path: {error}")).into()
}

/// A JSON merge patch body (RFC 7396): a JSON object; anything else is a 400.
pub struct MergePatch(pub serde_json::Value);

impl MergePatch {
    /// `target` with the patch applied: members set to `null` go, objects merge, the rest
    /// replaces.
    pub fn apply(&self, mut target: serde_json::Value) -> serde_json::Value {
        json_patch::merge(&mut target, &self.0);
        target
    }
}

impl FromRequest for MergePatch {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let Json(patch) = body.await?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "body: a JSON merge patch is an object",
                ));
            }
            Ok(MergePatch(patch))
        })
    }
}
