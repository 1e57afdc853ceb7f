//! The HTTP client of the admin commands: the platform's URL and an API key, each request's
//! answer unwrapped from its envelope, and an error answer turned into its envelope's message.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// A failed command: what the user reads on stderr.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Failure(message)
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

/// One page of a listing: its items and the cursor of the next.
pub struct Page {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(url: &str, key: Option<String>, timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("fieldline-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the API key; a command that needs one fails before sending without it.
    pub fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        let key = self
            .key
            .as_deref()
            .ok_or_else(|| Failure("no API key: pass --api-key or set FIELDLINE_API_KEY".into()))?;
        Ok(self.http.request(method, self.url(path)).bearer_auth(key))
    }

    /// Sends and answers the response when it succeeded, or the envelope's message.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request.send().await.map_err(|error| {
            Failure(format!(
                "could not reach {}: {}",
                self.base,
                Failure::from(error)
            ))
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(failure_of(response).await)
    }

    /// The `data` of a JSON answer (`null` for a 204).
    pub async fn data(&self, request: RequestBuilder) -> Result<Value> {
        let response = self.send(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let body = json_of(response).await?;
        Ok(body.get("data").cloned().unwrap_or(body))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.data(self.request(Method::GET, path)?).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.data(self.request(Method::POST, path)?.json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.data(self.request(Method::DELETE, path)?).await
    }

    /// One page of a listing at `path` with `query`.
    pub async fn page(&self, path: &str, query: &[(&str, String)]) -> Result<Page> {
        let response = self
            .send(self.request(Method::GET, path)?.query(query))
            .await?;
        let body = json_of(response).await?;
        let items = match body.get("data") {
            Some(Value::Array(items)) => items.clone(),
            Some(other) => vec![other.clone()],
            None => Vec::new(),
        };
        let next_cursor = body["page"]["next_cursor"].as_str().map(str::to_owned);
        Ok(Page { items, next_cursor })
    }

    /// Every item of a listing, page after page, or the first page only unless `all`.
    pub async fn list(
        &self,
        path: &str,
        query: &[(&str, String)],
        all: bool,
    ) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut query = query.to_vec();
        loop {
            let page = self.page(path, &query).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(cursor) if all => {
                    query.retain(|(name, _)| *name != "cursor");
                    query.push(("cursor", cursor));
                }
                _ => return Ok(items),
            }
        }
    }
}

/// A success's JSON body, or what came instead.
pub async fn json_of(response: Response) -> Result<Value> {
    let status = response.status();
    let text = response.text().await?;
    serde_json::from_str(&text).map_err(|error| {
        let snippet: String = text.chars().take(200).collect();
        Failure(format!(
            "HTTP {status} answered what is not JSON ({error}): {snippet:?}"
        ))
    })
}

/// An error answer as the user reads it: the envelope's message, status and reason, or the
/// status and the start of the body when it is not an envelope (a proxy's page).
pub async fn failure_of(response: Response) -> Failure {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(body) if body["error"]["message"].is_string() => Failure(format!(
            "{} ({} {})",
            body["error"]["message"].as_str().unwrap_or_default(),
            status.as_u16(),
            body["error"]["reason"].as_str().unwrap_or_default(),
        )),
        _ => {
            let snippet: String = text.chars().take(200).collect();
            Failure(format!("HTTP {status}: {}", snippet.trim()))
        }
    }
}

/// A path segment, percent-encoded (ids are URL-safe, but a user may type anything).
pub fn segment(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
