//! How upstream answers and cached content leave as responses: upstream failures as OCI errors
//! (502/504, the upstream's 401/403/404/429 mapped), content headers, `If-None-Match`.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use wharf_core::Digest;

use crate::error::RegistryError;
use crate::flight::FetchFailure;
use crate::upstream::UpstreamError;

/// An upstream that could not be asked: 502, or 504 on a timeout.
pub fn upstream_error(e: &UpstreamError) -> RegistryError {
    let (status, url) = match e {
        UpstreamError::Timeout { url, .. } => (StatusCode::GATEWAY_TIMEOUT, url),
        UpstreamError::Unreachable { url, .. } | UpstreamError::Protocol { url, .. } => (StatusCode::BAD_GATEWAY, url),
        UpstreamError::Token { url, status: 401 | 403, .. } => {
            return RegistryError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                format!("the upstream's token endpoint refused the credentials ({url})"),
            )
            .with_detail(json!({ "upstream_url": url }));
        }
        UpstreamError::Token { url, .. } => (StatusCode::BAD_GATEWAY, url),
        UpstreamError::Provider(p) => {
            return RegistryError::new(StatusCode::BAD_GATEWAY, "UNKNOWN", e.to_string())
                .with_detail(json!({ "credential_provider": p.provider.to_string() }));
        }
    };
    RegistryError::new(status, "UNKNOWN", e.to_string()).with_detail(json!({ "upstream_url": url }))
}

/// An upstream that answered with an error status.
pub fn upstream_status(status: StatusCode, detail: Value, what: &str, retry_after: Option<String>) -> RegistryError {
    let code = match what {
        "manifest" => "MANIFEST_UNKNOWN",
        "blob" => "BLOB_UNKNOWN",
        _ => "NAME_UNKNOWN",
    };
    let url = detail.get("upstream_url").and_then(Value::as_str).unwrap_or("").to_owned();
    let (status_out, code, message) = match status.as_u16() {
        404 => (StatusCode::NOT_FOUND, code, format!("upstream has no such {what} ({url} answered 404)")),
        401 => (
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            format!("upstream refused Wharf's credentials for this repository ({url} answered 401)"),
        ),
        403 => (StatusCode::FORBIDDEN, "DENIED", format!("upstream denied access ({url} answered 403)")),
        429 => (
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            format!("upstream rate limit reached ({url} answered 429); retry later"),
        ),
        // What the upstream does not support there (HEAD of tags/list on distribution): the client
        // may ask otherwise.
        405 | 501 => (
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("upstream does not support this request ({url} answered {status})"),
        ),
        // Any other refusal of the request itself is the client's to act on: passed on as it is,
        // the upstream's message in `detail`, with the upstream's code when the spec lists it (a
        // 4xx body's code must be one of those), else what fits.
        s @ 400..=499 => {
            let fallback = if s == 410 { code } else { "UNSUPPORTED" };
            (status, spec_code(&detail).unwrap_or(fallback), format!("upstream answered {s} for {url}"))
        }
        s => (StatusCode::BAD_GATEWAY, "UNKNOWN", format!("upstream answered {s} for {url}")),
    };
    let mut e = RegistryError::new(status_out, code, message).with_detail(detail);
    e.retry_after = retry_after;
    e
}

/// The error codes of the distribution spec ("Error Codes"): a 4xx body's `code` is one of them.
pub const SPEC_CODES: [&str; 14] = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// The upstream's first error code, when it is one of the spec's.
fn spec_code(detail: &Value) -> Option<&'static str> {
    let code = detail.get("upstream_errors")?.get(0)?.get("code")?.as_str()?;
    SPEC_CODES.iter().copied().find(|c| *c == code)
}

/// A failed blob fetch, as a client's error.
pub fn fetch_error(f: &FetchFailure) -> RegistryError {
    match f {
        FetchFailure::Upstream(e) | FetchFailure::Body { source: e, .. } => upstream_error(e),
        FetchFailure::Status { status, retry_after, detail } => {
            upstream_status(*status, detail.clone(), "blob", retry_after.clone())
        }
        FetchFailure::Length { .. } | FetchFailure::Mismatch { .. } => {
            RegistryError::new(StatusCode::BAD_GATEWAY, "UNKNOWN", format!("{f}; nothing was cached"))
        }
        FetchFailure::Io(_) | FetchFailure::NoSpace => RegistryError::internal(f.to_string()),
    }
}

/// Whether an `If-None-Match` header matches the ETag of `digest` (`"<digest>"`).
pub fn not_modified(headers: &HeaderMap, digest: &Digest) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| {
        let t = t.trim();
        t == "*"
            || t.trim_start_matches("W/").strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(digest.as_str())
    })
}

const DOCKER_CONTENT_DIGEST: header::HeaderName = header::HeaderName::from_static("docker-content-digest");
const API_VERSION: header::HeaderName = header::HeaderName::from_static("docker-distribution-api-version");

/// The response for content addressed by `digest`.
pub fn content_headers(h: &mut HeaderMap, digest: &Digest, content_type: &str, cache_control: &str) {
    let put = |h: &mut HeaderMap, k: header::HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    };
    put(h, header::CONTENT_TYPE, content_type);
    put(h, DOCKER_CONTENT_DIGEST, digest.as_str());
    let mut etag = String::with_capacity(digest.as_str().len() + 2);
    etag.push('"');
    etag.push_str(digest.as_str());
    etag.push('"');
    put(h, header::ETAG, &etag);
    put(h, header::CACHE_CONTROL, cache_control);
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
}

/// A 304 for a matching `If-None-Match`.
pub fn not_modified_response(digest: &Digest, content_type: &str, cache_control: &str) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    content_headers(r.headers_mut(), digest, content_type, cache_control);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match() {
        let mut h = HeaderMap::new();
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        assert!(!not_modified(&h, &a));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&format!("\"{a}\", W/\"{b}\"")).unwrap());
        assert!(not_modified(&h, &a));
        assert!(not_modified(&h, &b));
        assert!(!not_modified(&h, &c));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(b.as_str()).unwrap());
        assert!(!not_modified(&h, &b), "an ETag is quoted");
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&h, &c));
    }
}
