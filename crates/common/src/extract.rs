//! Request extractors that answer in the envelope: JSON bodies with the failing field named,
//! size limits as 413, content types as 415, query strings as 400.

use std::{future::Future, pin::Pin};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
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

/// A body's content coding (RFC 9110 §8.4.1): what [`read_body`] can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    /// HTTP's `deflate` is the zlib format (RFC 1950).
    Deflate,
}

/// The request's `Content-Encoding`; any coding other than identity, gzip (`x-gzip`) or
/// deflate, or more than one, is a 415 (a body in an unknown coding read as identity would
/// be parsed as garbage, or worse, as something it is not).
fn content_coding(req: &HttpRequest) -> Result<Coding, ApiError> {
    let unsupported = |value: &str| {
        ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "unsupported_content_encoding",
            format!("Content-Encoding {value:?} is not supported: use gzip, deflate or identity"),
        )
    };
    let mut coding = Coding::Identity;
    for value in req.headers().get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().map_err(|_| unsupported("(not text)"))?;
        for token in value.split(',').map(str::trim) {
            let next = if token.is_empty() || token.eq_ignore_ascii_case("identity") {
                continue;
            } else if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
                Coding::Gzip
            } else if token.eq_ignore_ascii_case("deflate") {
                Coding::Deflate
            } else {
                return Err(unsupported(token));
            };
            if coding != Coding::Identity {
                return Err(unsupported(value));
            }
            coding = next;
        }
    }
    Ok(coding)
}

/// Where inflated bytes go: refuses to grow past `limit`, so a decoder that writes into it
/// stops at the limit instead of inflating a whole input chunk (a 64 KiB chunk of a gzip bomb
/// is 64 MiB).
struct Capped {
    body: BytesMut,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.body.len() + bytes.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("body exceeds the limit"));
        }
        self.body.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Inflates as the body streams in, holding at most the limit plus the decoder's own 32 KiB
/// window and buffer.
enum Inflater {
    Identity(Capped),
    Gzip(Box<flate2::write::MultiGzDecoder<Capped>>),
    Deflate(Box<flate2::write::ZlibDecoder<Capped>>),
}

impl Inflater {
    fn new(coding: Coding, limit: usize) -> Self {
        let sink = Capped {
            body: BytesMut::new(),
            limit,
            overflowed: false,
        };
        match coding {
            Coding::Identity => Inflater::Identity(sink),
            Coding::Gzip => Inflater::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink))),
            Coding::Deflate => Inflater::Deflate(Box::new(flate2::write::ZlibDecoder::new(sink))),
        }
    }

    fn sink(&self) -> &Capped {
        match self {
            Inflater::Identity(sink) => sink,
            Inflater::Gzip(decoder) => decoder.get_ref(),
            Inflater::Deflate(decoder) => decoder.get_ref(),
        }
    }

    fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        match self {
            Inflater::Identity(sink) => sink.write_all(chunk),
            Inflater::Gzip(decoder) => decoder.write_all(chunk),
            Inflater::Deflate(decoder) => decoder.write_all(chunk),
        }
    }

    /// Checks the stream's end (a truncated stream or a bad checksum is an error).
    fn finish(self) -> std::io::Result<Capped> {
        match self {
            Inflater::Identity(sink) => Ok(sink),
            Inflater::Gzip(decoder) => decoder.finish(),
            Inflater::Deflate(decoder) => decoder.finish(),
        }
    }
}

/// Reads the whole body, inflating `Content-Encoding: gzip` or `deflate` as it streams in,
/// and refuses more than `limit` bytes (received, or once inflated) with 413 whether or not a
/// Content-Length was sent. An unknown coding is a 415.
pub async fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::payload_too_large(format!("body exceeds {limit} bytes"));
    let coding = content_coding(req)?;
    if let Some(length) = req.headers().get(header::CONTENT_LENGTH) {
        let declared = length
            .to_str()
            .ok()
            .and_then(|value| value.parse::<usize>().ok());
        // A compressed body is bounded here too: it is never larger than what it inflates to
        // but for a few bytes of framing.
        if declared.is_some_and(|declared| declared > limit) {
            return Err(too_large());
        }
    }
    let corrupt = |error: std::io::Error| {
        ApiError::bad_request(
            "invalid_body",
            format!("body could not be decompressed: {error}"),
        )
    };
    let mut stream = payload.take();
    let mut inflater = Inflater::new(coding, limit);
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::bad_request("invalid_body", format!("body could not be read: {error}"))
        })?;
        received += chunk.len();
        if received > limit {
            return Err(too_large());
        }
        if let Err(error) = inflater.write(&chunk) {
            return Err(if inflater.sink().overflowed {
                too_large()
            } else {
                corrupt(error)
            });
        }
    }
    let overflowed = inflater.sink().overflowed;
    match inflater.finish() {
        Ok(sink) => Ok(sink.body.freeze()),
        Err(_) if overflowed => Err(too_large()),
        Err(error) => Err(corrupt(error)),
    }
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
    // Compared without case, and without building a lowercase copy: every ingest asks.
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .as_bytes();
    let has_prefix = |prefix: &[u8]| {
        essence.len() >= prefix.len() && essence[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    let has_suffix = |suffix: &[u8]| {
        essence.len() >= suffix.len()
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    essence.eq_ignore_ascii_case(b"application/json")
        || (has_prefix(b"application/") && has_suffix(b"+json"))
}

pub fn unsupported_media_type(expected: &str) -> ApiError {
    ApiError::new(
        ErrorKind::UnsupportedMediaType,
        "unsupported_media_type",
        format!("Content-Type must be {expected}"),
    )
}

/// Parses JSON into `T`, naming the path of the first bad field in the 400. A NUL anywhere
/// in a string or key (however deep, in config, metadata or params) is a 400 too.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Tell malformed JSON from a well-formed body with a bad field: serde reports some type
    // errors (an enum given a number) as syntax errors.
    check_json(body)?;
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(field_error)
}

/// The first pass over a JSON body: well-formed, and no NUL in any string or key.
fn check_json(body: &[u8]) -> Result<(), ApiError> {
    let malformed = |error: serde_json::Error| {
        ApiError::bad_request("malformed_json", format!("body is not valid JSON: {error}"))
    };
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, NulFree>(&mut *deserializer) {
        Ok(NulFree) => deserializer.end().map_err(malformed),
        Err(error) if error.inner().classify() == serde_json::error::Category::Data => {
            let path = error.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            Err(nul_error(&field))
        }
        Err(error) => Err(malformed(error.into_inner())),
    }
}

/// A NUL character in `field`: Postgres text cannot store one, and no id, name or value of
/// the API needs one.
pub fn nul_error(field: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_character",
        format!("{field}: NUL characters are not allowed"),
    )
}

/// Any JSON value whose strings and keys hold no NUL.
struct NulFree;

impl<'de> serde::Deserialize<'de> for NulFree {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NulFreeVisitor)
    }
}

struct NulFreeKey;

impl<'de> serde::Deserialize<'de> for NulFreeKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(NulFreeVisitor)
            .map(|NulFree| NulFreeKey)
    }
}

struct NulFreeVisitor;

impl<'de> serde::de::Visitor<'de> for NulFreeVisitor {
    type Value = NulFree;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<NulFree, E> {
        if text.contains('\0') {
            return Err(E::custom("NUL characters are not allowed"));
        }
        Ok(NulFree)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<NulFree, A::Error> {
        while seq.next_element::<NulFree>()?.is_some() {}
        Ok(NulFree)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NulFree, A::Error> {
        while map.next_key::<NulFreeKey>()?.is_some() {
            map.next_value::<NulFree>()?;
        }
        Ok(NulFree)
    }
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

/// A JSON body that must be an object: serde would also make a struct of an array of its
/// fields (`[null, null]`), which no client means.
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonObject<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let Json(value) = body.await?;
            if !value.is_object() {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "body: must be a JSON object",
                ));
            }
            parse_json_value(value).map(JsonObject)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_told_apart_whatever_their_case() {
        let is_json = |value: &str| {
            let request = actix_web::test::TestRequest::default()
                .insert_header((header::CONTENT_TYPE, value))
                .to_http_request();
            is_json_content_type(&request)
        };
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/senml+json",
            "APPLICATION/VND.FIELDLINE+JSON",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "",
            "text/json",
            "application/jsonp",
            "application/x+jsonx",
            "+json",
            "application/",
            "text/csv",
        ] {
            assert!(!is_json(other), "{other}");
        }
        assert!(!is_json_content_type(
            &actix_web::test::TestRequest::default().to_http_request()
        ));
    }

    #[test]
    fn nul_anywhere_in_a_json_body_is_refused_with_its_path() {
        for (body, field) in [
            (r#"{"name": "a\u0000b"}"#, "name"),
            (
                r#"{"config": {"wifi": {"ssid": "x\u0000"}}}"#,
                "config.wifi.ssid",
            ),
            (r#"{"tags": ["ok", "\u0000"]}"#, "tags[1]"),
            (r#""\u0000""#, "body"),
        ] {
            let error = parse_json::<serde_json::Value>(body.as_bytes()).unwrap_err();
            assert_eq!(error.reason, "invalid_character", "{body}");
            assert!(
                error.message.starts_with(&format!("{field}:")),
                "{body}: {error}"
            );
        }
        let error = parse_json::<serde_json::Value>(br#"{"a\u0000": 1}"#).unwrap_err();
        assert_eq!(error.reason, "invalid_character");
        // An escaped backslash followed by "u0000" is text, not NUL.
        let value: serde_json::Value = parse_json(br#"{"a": "\\u0000"}"#).unwrap();
        assert_eq!(value["a"], "\\u0000");
        for malformed in [&b"{"[..], b"{} x", b"[1,]"] {
            let error = parse_json::<serde_json::Value>(malformed).unwrap_err();
            assert_eq!(error.reason, "malformed_json");
        }
    }
}
