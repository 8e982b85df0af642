//! The tracing round-tripper: what every upstream request did, recorded as the attributes of its
//! `upstream.fetch` span and as one debug event when it ends (body read, or response dropped).
//!
//! Recorded: method, URL, request and response headers, status, redirect hops, time to first byte
//! (request sent to the final response head, redirects included), total time (to the end of the
//! body) and body bytes. Secrets never leave this module: `Authorization`, `Proxy-Authorization`,
//! `Cookie` and `Set-Cookie` values, URL user info, and the values of token-bearing query parameters
//! (signed URLs) are replaced by `<redacted>`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};

const REDACTED: &str = "<redacted>";

/// Headers whose values are credentials.
const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// Query parameters whose values are credentials (compared case-insensitively): S3/GCS/Azure
/// signed URLs, OAuth codes and tokens.
const SECRET_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "signature",
    "sig",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "code",
    "password",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "key",
];

/// `url` with user info and token-bearing query values redacted; other parameters kept, so a
/// signed URL's shape (expiry, algorithm) stays visible.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "<invalid url>".into();
    };
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username("");
        let _ = u.set_password(None);
    }
    u.set_fragment(None);
    let query = u.query().map(redact_query);
    u.set_query(None);
    // Appended as is: `set_query` would percent-encode the marker.
    match query {
        Some(q) => format!("{u}?{q}"),
        None => u.to_string(),
    }
}

/// A raw query string with the values of [`SECRET_PARAMS`] redacted (kept as written otherwise).
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_param(k) => format!("{k}={REDACTED}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_secret_param(raw_key: &str) -> bool {
    let key = percent_decode_lower(raw_key);
    SECRET_PARAMS.contains(&key.as_str())
}

fn percent_decode_lower(s: &str) -> String {
    url::form_urlencoded::parse(format!("{s}=").as_bytes()).next().map_or_else(String::new, |(k, _)| k.to_lowercase())
}

/// Headers as `name: value` pairs joined by `; `, secrets redacted, non-text values marked.
pub fn redact_headers(headers: &HeaderMap) -> String {
    let mut out = String::new();
    for (name, value) in headers {
        if !out.is_empty() {
            out.push_str("; ");
        }
        let shown = if SECRET_HEADERS.contains(&name.as_str()) {
            REDACTED.to_owned()
        } else {
            match value.to_str() {
                // A redirect kept as the answer (not followed) points at a signed URL.
                Ok(v) if name == http::header::LOCATION || name == http::header::CONTENT_LOCATION => redact_location(v),
                Ok(v) => v.to_owned(),
                Err(_) => "<binary>".to_owned(),
            }
        };
        let _ = write!(out, "{name}: {shown}");
    }
    out
}

/// A `Location` value, absolute or relative, with its token-bearing query values redacted.
fn redact_location(v: &str) -> String {
    if url::Url::parse(v).is_ok() {
        return redact_url(v);
    }
    match v.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_query(query)),
        None => v.to_owned(),
    }
}

/// The record of one upstream request, redirects included. Finished (span fields recorded, debug
/// event written) once, by [`RoundTrip::finish`] or on drop.
pub struct RoundTrip {
    span: tracing::Span,
    method: Method,
    url: String,
    request_headers: String,
    started: Instant,
    hops: Vec<String>,
    ttfb: Option<Duration>,
    status: Option<StatusCode>,
    response_headers: String,
    bytes: u64,
    error: Option<String>,
    finished: bool,
}

impl RoundTrip {
    /// Opens the `upstream.fetch` span (a child of the current span) for a request to `url`.
    pub fn start(repo_key: &str, method: &Method, url: &str) -> Self {
        let url = redact_url(url);
        let span = tracing::info_span!(
            "upstream.fetch",
            otel.kind = "client",
            repo_key,
            http.request.method = %method,
            url.full = %url,
            http.request.headers = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            http.response.headers = tracing::field::Empty,
            redirects = tracing::field::Empty,
            ttfb_ms = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
            bytes = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        Self {
            span,
            method: method.clone(),
            url,
            request_headers: String::new(),
            started: Instant::now(),
            hops: Vec::new(),
            ttfb: None,
            status: None,
            response_headers: String::new(),
            bytes: 0,
            error: None,
            finished: false,
        }
    }

    /// The span, to send its `traceparent` upstream and to run the request in.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The headers of the first hop as sent.
    pub fn sent(&mut self, headers: &HeaderMap) {
        if self.request_headers.is_empty() {
            self.request_headers = redact_headers(headers);
        }
    }

    /// A redirect answered by `from`, to `to`.
    pub fn redirected(&mut self, status: StatusCode, from: &str, to: &str) {
        self.hops.push(format!("{} {} -> {}", status.as_u16(), redact_url(from), redact_url(to)));
    }

    /// The final response head arrived.
    pub fn answered(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.ttfb = Some(self.started.elapsed());
        self.status = Some(status);
        self.response_headers = redact_headers(headers);
    }

    /// Body bytes received.
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The request failed (no response, or the body broke off).
    pub fn failed(&mut self, error: &str) {
        self.error = Some(error.to_owned());
    }

    /// Records everything on the span and writes the debug event. Later calls do nothing.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let total_ms = ms(self.started.elapsed());
        let ttfb_ms = self.ttfb.map(ms);
        let status = self.status.map(|s| s.as_u16());
        let redirects = self.hops.join(", ");
        let span = &self.span;
        span.record("http.request.headers", self.request_headers.as_str());
        if let Some(s) = status {
            span.record("http.response.status_code", s);
            span.record("http.response.headers", self.response_headers.as_str());
        }
        if !self.hops.is_empty() {
            span.record("redirects", redirects.as_str());
        }
        if let Some(t) = ttfb_ms {
            span.record("ttfb_ms", t);
        }
        span.record("duration_ms", total_ms);
        span.record("bytes", self.bytes);
        if let Some(e) = &self.error {
            span.record("error", e.as_str());
        }
        span.in_scope(|| {
            tracing::debug!(
                method = %self.method,
                url = %self.url,
                request_headers = %self.request_headers,
                status,
                response_headers = %self.response_headers,
                redirects = %redirects,
                ttfb_ms,
                duration_ms = total_ms,
                bytes = self.bytes,
                error = self.error.as_deref().unwrap_or(""),
                "upstream request"
            );
        });
    }
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        self.finish();
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn redirect_locations_in_headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::LOCATION,
            "https://s3.example/b/k?X-Amz-Expires=60&X-Amz-Signature=abc".parse().unwrap(),
        );
        let shown = redact_headers(&h);
        assert!(shown.contains("X-Amz-Expires=60") && !shown.contains("abc"), "{shown}");
        h.insert(http::header::LOCATION, "/artifacts-downloads/x?sig=s3cr3t&a=1".parse().unwrap());
        let shown = redact_headers(&h);
        assert!(shown.contains("a=1") && !shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn signed_url_values_are_redacted_and_the_rest_kept() {
        let u = "https://bucket.s3.amazonaws.com/blob?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026&X-Amz-Date=20261129T000000Z&X-Amz-Expires=600&X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok";
        let r = redact_url(u);
        assert!(!r.contains("deadbeef") && !r.contains("AKIA") && !r.contains("=tok"), "{r}");
        assert!(r.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256"), "{r}");
        assert!(r.contains("X-Amz-Expires=600"), "{r}");
        assert!(r.contains("X-Amz-Signature=<redacted>"), "{r}");
        assert!(r.starts_with("https://bucket.s3.amazonaws.com/blob?"), "{r}");
    }

    #[test]
    fn token_parameters_are_redacted_whatever_their_case_or_encoding() {
        let q = "sig=abc&Token=t1&access_token=t2&code=c3&%73ig=t4&n=10&last=b";
        let r = redact_query(q);
        for secret in ["abc", "t1", "t2", "c3", "t4"] {
            assert!(!r.split('&').any(|p| p.ends_with(&format!("={secret}"))), "{secret} in {r}");
        }
        assert!(r.contains("n=10") && r.contains("last=b"), "{r}");
        // Azure SAS and GCS signed URLs.
        let r = redact_url("https://a.blob.core.windows.net/c/b?sv=2021&sig=SAS%2Bsecret&se=2026");
        assert!(!r.contains("SAS") && r.contains("sv=2021"), "{r}");
        let r = redact_url("https://storage.googleapis.com/b/o?X-Goog-Signature=ff00&X-Goog-Credential=sa%40p");
        assert!(!r.contains("ff00") && !r.contains("sa%40p"), "{r}");
    }

    #[test]
    fn user_info_is_removed() {
        let r = redact_url("https://bot:hunter2@registry.example/v2/");
        assert_eq!(r, "https://registry.example/v2/");
    }

    #[test]
    fn queries_without_secrets_and_bad_urls() {
        assert_eq!(redact_url("http://h/v2/a/tags/list?n=2&last=x"), "http://h/v2/a/tags/list?n=2&last=x");
        assert_eq!(redact_url("not a url"), "<invalid url>");
        assert_eq!(redact_query("flag&code"), "flag&code");
    }

    #[test]
    fn credential_headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic Ym90Omh1bnRlcjI="));
        h.insert("proxy-authorization", HeaderValue::from_static("Bearer p"));
        h.insert("cookie", HeaderValue::from_static("session=s3cr3t"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        let r = redact_headers(&h);
        for secret in ["Ym90", "Bearer p", "s3cr3t", "a=1", "b=2"] {
            assert!(!r.contains(secret), "{secret} in {r}");
        }
        assert!(r.contains("authorization: <redacted>"), "{r}");
        assert!(r.contains("set-cookie: <redacted>; set-cookie: <redacted>"), "{r}");
        assert!(r.contains("accept: application/json"), "{r}");
    }

    #[test]
    fn a_round_trip_records_without_a_subscriber() {
        let mut rt = RoundTrip::start("hub", &Method::GET, "https://h/v2/x/blobs/sha256:00?token=t");
        assert!(!rt.url.contains("=t&") && rt.url.ends_with("token=<redacted>"), "{}", rt.url);
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer secret"));
        rt.sent(&h);
        rt.redirected(StatusCode::TEMPORARY_REDIRECT, "https://h/v2/x", "https://cdn/x?sig=s");
        rt.answered(StatusCode::OK, &HeaderMap::new());
        rt.add_bytes(10);
        rt.finish();
        assert!(!rt.request_headers.contains("secret"));
        assert_eq!(rt.hops, vec!["307 https://h/v2/x -> https://cdn/x?sig=<redacted>".to_string()]);
    }
}
