//! Errors as they leave the registry API: OCI error JSON with a status code.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// The challenge a node answers 401 with: docker, containerd and podman then send `Authorization:
/// Basic` (their login for this node) on every later request.
pub const CHALLENGE: &str = "Basic realm=\"wharf\"";

/// One OCI error (`{"errors":[{"code","message","detail"}]}`) and the status it is sent with.
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<Value>,
    /// Passed on from an upstream 429.
    pub retry_after: Option<String>,
    /// Sent with `WWW-Authenticate: Basic realm="wharf"`, so that clients send their credentials.
    pub challenge: bool,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), detail: None, retry_after: None, challenge: false }
    }

    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Asks the client for credentials (`WWW-Authenticate: Basic realm="wharf"`).
    pub fn with_challenge(mut self) -> Self {
        self.challenge = true;
        self
    }

    /// A 401 that asks the client for credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message).with_challenge()
    }

    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }

    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    pub fn body(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        json!({ "errors": [e] })
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for RegistryError {}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        if let Some(v) = self.retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(header::RETRY_AFTER, v);
        }
        if self.challenge {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
        }
        resp
    }
}
