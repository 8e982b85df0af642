//! Errors as they leave the registry API: OCI error JSON with a status code.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// Why a 401 asks for credentials: the `error` of its Bearer challenge (RFC 6750, 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// None were sent (or the upstream refused the ones sent): no `error`.
    Credentials,
    /// A node token that is forged, expired or from a key this node does not hold.
    InvalidToken,
    /// A valid node token without the scope this request needs.
    InsufficientScope,
}

impl Challenge {
    pub fn error(self) -> Option<&'static str> {
        match self {
            Challenge::Credentials => None,
            Challenge::InvalidToken => Some("invalid_token"),
            Challenge::InsufficientScope => Some("insufficient_scope"),
        }
    }
}

/// One OCI error (`{"errors":[{"code","message","detail"}]}`) and the status it is sent with.
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<Value>,
    /// Passed on from an upstream 429.
    pub retry_after: Option<String>,
    /// A 401 that asks for credentials: the registry edge renders its `WWW-Authenticate` (the
    /// node's token endpoint as realm) into [`RegistryError::www_authenticate`].
    pub challenge: Option<Challenge>,
    pub www_authenticate: Option<Box<str>>,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            detail: None,
            retry_after: None,
            challenge: None,
            www_authenticate: None,
        }
    }

    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Asks the client for credentials.
    pub fn with_challenge(self) -> Self {
        self.with_challenge_of(Challenge::Credentials)
    }

    pub fn with_challenge_of(mut self, why: Challenge) -> Self {
        self.challenge = Some(why);
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
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110, 15.5.6: a 405 names the methods that are allowed.
            h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if let Some(v) = self.www_authenticate.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}
