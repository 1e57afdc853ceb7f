//! The one error-to-status table of the platform and the JSON error envelope.

use std::borrow::Cow;

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde_json::json;

/// What went wrong, as a client sees it. Each kind maps to exactly one status here; services
/// turn their own error enums into an [`ApiError`] of one of these kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unprocessable,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answered in the envelope
/// `{"status":"error","error":{"code":404,"reason":"device_not_found","message":"…"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Stable machine-readable reason, snake_case.
    pub reason: Cow<'static, str>,
    /// Human-readable; never contains internals for a 500.
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// An internal error's cause, for logs and dead letters; never answered to a client.
    pub cause: Option<std::sync::Arc<str>>,
}

impl ApiError {
    pub fn new(
        kind: ErrorKind,
        reason: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            reason: reason.into(),
            message: message.into(),
            retry_after: None,
            cause: None,
        }
    }

    pub fn bad_request(reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, reason, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, "forbidden", message)
    }

    pub fn not_found(reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, reason, message)
    }

    pub fn conflict(reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, reason, message)
    }

    pub fn unprocessable(reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unprocessable, reason, message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PayloadTooLarge, "payload_too_large", message)
    }

    /// NATS or Postgres (or the service behind an RPC) cannot be reached right now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, "service_unavailable", message).with_retry_after(1)
    }

    /// The same error, telling the client to try again after `seconds` (`Retry-After`).
    pub fn with_retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }

    /// An unexpected failure: the cause is logged with its chain, the client sees an opaque
    /// message.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        let cause = cause.into();
        let cause = format!("{cause:#}");
        tracing::error!(error = %cause, "internal error");
        Self {
            cause: Some(cause.into()),
            ..Self::new(ErrorKind::Internal, "internal_error", "internal error")
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.reason,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status());
        if let Some(seconds) = self.retry_after {
            response.insert_header(("Retry-After", seconds.to_string()));
        }
        response.json(json!({
            "status": "error",
            "error": {
                "code": self.status().as_u16(),
                "reason": self.reason,
                "message": self.message,
            }
        }))
    }
}

/// A Postgres pool or query error: unreachable database is 503, anything else is internal.
impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(error = %error, "postgres pool unavailable");
        ApiError::unavailable("database unavailable")
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> Self {
        if error.is_closed() || error.as_db_error().is_none() && error.code().is_none() {
            tracing::warn!(error = %error, "postgres unavailable");
            return ApiError::unavailable("database unavailable");
        }
        // A transaction that lost a race (serialization failure, deadlock) or a server going
        // away or not yet up: nothing wrong with the request, it may simply be tried again.
        if let Some(db) = error.as_db_error() {
            let code = db.code().code();
            if matches!(
                code,
                "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08")
            {
                tracing::warn!(code, error = %db.message(), "postgres busy or going away");
                return ApiError::unavailable("database busy or unavailable; try again");
            }
        }
        // Class 22 is "data exception": a value Postgres cannot take (NUL in text, a number
        // out of range). The parsers refuse what they know of; this catches the rest as the
        // client's error, not ours.
        if let Some(db) = error.as_db_error()
            && db.code().code().starts_with("22")
        {
            return ApiError::bad_request(
                "invalid_value",
                format!("a value cannot be stored: {}", db.message()),
            );
        }
        ApiError::internal(error)
    }
}
