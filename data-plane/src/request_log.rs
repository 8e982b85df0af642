//! One structured log line per request, written when the response body ends (or is dropped), so it
//! carries the bytes really sent and the full duration.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::Method;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// What the log line of one request says.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    pub repo_key: String,
    pub name: String,
    /// How the repo was chosen: `key` (the path's first segment), or as a mirror: `ns` (containerd's
    /// `?ns=`), `host` (the `Host` header), `default` (the node's default mirror).
    pub route: &'static str,
    pub kind: &'static str,
    pub reference: String,
    /// Set when the upstream was contacted (no credentials, no query).
    pub upstream_url: String,
    /// hit, miss, coalesced, stale, revalidated, bypass.
    pub cache: &'static str,
    /// How the pull was authorized: empty (public static repo), `token` (a puller token),
    /// `upstream` (passthrough: the upstream answered with the client's credentials), `cached`
    /// (passthrough: a recent upstream decision), `refused`.
    pub authz: &'static str,
    /// The puller token's id (public; never the secret).
    pub token_id: String,
    pub error: Option<String>,
    /// The request's `wharf.request` span: its attributes are recorded, and it ends, with the line.
    pub span: tracing::Span,
}

/// The server span of one registry request; [`RequestLog`] fills in the rest when it ends.
pub fn request_span(method: &Method, path: &str) -> tracing::Span {
    let path = clip(path);
    tracing::info_span!(
        "wharf.request",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method.as_str(),
        url.path = path,
        repo_key = tracing::field::Empty,
        name = tracing::field::Empty,
        kind = tracing::field::Empty,
        reference = tracing::field::Empty,
        cache = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        bytes = tracing::field::Empty,
        complete = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// The first 512 characters of `path`: what lines and spans carry of it.
fn clip(path: &str) -> &str {
    const MAX: usize = 512;
    if path.len() <= MAX {
        return path;
    }
    path.char_indices().nth(MAX).map_or(path, |(end, _)| &path[..end])
}

impl RequestLog {
    pub fn new(method: &Method, path: &str) -> Self {
        Self {
            method: method.to_string(),
            path: clip(path).to_owned(),
            repo_key: String::new(),
            name: String::new(),
            route: "",
            kind: "",
            reference: String::new(),
            upstream_url: String::new(),
            cache: "",
            authz: "",
            token_id: String::new(),
            error: None,
            span: tracing::Span::none(),
        }
    }

    /// Wraps the response body so that the line is written when it ends.
    pub fn wrap(self, resp: Response, started: Instant) -> Response {
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let body = LoggedBody { inner: body, bytes: 0, declared, status, started, log: Some(self) };
        Response::from_parts(parts, Body::new(body))
    }

    fn emit(&self, status: u16, bytes: u64, started: Instant, complete: bool) {
        let seconds = started.elapsed().as_secs_f64();
        crate::metrics::request(&self.repo_key, self.kind, self.cache, status, bytes, seconds);
        let duration_ms = (seconds * 1e6).round() / 1e3;
        let span = &self.span;
        if !span.is_disabled() {
            // One call: each `record` is a dispatch through every layer and a registry lookup.
            tracing::record_all!(
                span,
                repo_key = self.repo_key.as_str(),
                name = self.name.as_str(),
                kind = self.kind,
                reference = self.reference.as_str(),
                cache = self.cache,
                http.response.status_code = status,
                bytes,
                complete,
                error = self.error.as_deref(),
                otel.status_code = (status >= 500).then_some("ERROR"),
            );
        }
        let trace_id = wharf_runtime::telemetry::trace_id(span);
        tracing::info!(
            method = %self.method,
            path = %self.path,
            repo_key = %self.repo_key,
            name = %self.name,
            route = self.route,
            kind = self.kind,
            reference = %self.reference,
            upstream_url = %self.upstream_url,
            cache = self.cache,
            authz = self.authz,
            token_id = %self.token_id,
            status,
            bytes,
            duration_ms,
            complete,
            error = self.error.as_deref().unwrap_or(""),
            trace_id,
            "request"
        );
    }
}

struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// hyper stops polling once `Content-Length` bytes went out: that is complete too.
    declared: Option<u64>,
    status: u16,
    started: Instant,
    log: Option<RequestLog>,
}

impl LoggedBody {
    fn finish(&mut self, complete: bool, error: Option<String>) {
        if let Some(mut log) = self.log.take() {
            if error.is_some() {
                log.error = error;
            }
            log.emit(self.status, self.bytes, self.started, complete);
        }
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = format!("response body aborted: {e}");
                self.finish(false, Some(msg));
            }
            Poll::Ready(None) => self.finish(true, None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Ends here without having reached its end: the client went away, or a HEAD.
        let complete = self.inner.is_end_stream() || self.declared == Some(self.bytes);
        self.finish(complete, None);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_clipped_to_512_characters() {
        assert_eq!(super::clip("/v2/a"), "/v2/a");
        let long = "é".repeat(600);
        assert_eq!(super::clip(&long).chars().count(), 512);
        assert_eq!(super::clip(&"a".repeat(512)).len(), 512);
        assert_eq!(super::clip(&"a".repeat(513)).len(), 512);
    }
}
