//! The registry API (pull side of the OCI distribution spec), under `/v2/<repoKey>/<name>/`.
//!
//! Paths are parsed from the raw request path: percent-encoded bytes are refused outright (no
//! name, reference or digest contains one legitimately), every part is checked against the spec's
//! grammar before it touches the disk or the upstream, and every answer is either the content or
//! an OCI error JSON.

mod blobs;
mod gate;
mod log;
mod manifests;
mod passthrough;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tracing::Instrument as _;
use wharf_core::{Access, AuthMode, Digest, NameError, Reference, Repo, RepoKey, normalize_name, validate_name};

use crate::authz::{self, ClientCredentials};
use crate::error::RegistryError;
use crate::flight::FetchFailure;
use crate::server::AppState;
use crate::upstream::UpstreamError;

pub use log::RequestLog;
pub use manifests::referenced;

/// What a `/v2/<repoKey>/<name>/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(Reference),
    Blob(Digest),
    Tags,
    Referrers(Digest),
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Target::Manifest(_) => "manifest",
            Target::Blob(_) => "blob",
            Target::Tags => "tags",
            Target::Referrers(_) => "referrers",
        }
    }
}

/// A parsed registry path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryPath {
    pub repo_key: RepoKey,
    /// The name as the client wrote it.
    pub name: String,
    pub target: Target,
}

/// Parses the part of a path after `/v2/`.
pub fn parse_path(rest: &str) -> Result<RegistryPath, RegistryError> {
    if rest.contains('%') {
        return Err(RegistryError::name_invalid(
            "percent-encoded characters are not allowed in repository names, references or digests",
        ));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n < 4 {
        return Err(not_found_path());
    }
    let (what, last) = (segs[n - 2], segs[n - 1]);
    let target = match what {
        "manifests" => Target::Manifest(Reference::parse(last).map_err(reference_error)?),
        "blobs" => Target::Blob(parse_digest(last)?),
        "referrers" => Target::Referrers(parse_digest(last)?),
        "tags" if last == "list" => Target::Tags,
        _ => return Err(not_found_path()),
    };
    let repo_key: RepoKey =
        segs[0].parse().map_err(|e: wharf_core::RepoError| RegistryError::name_invalid(e.to_string()))?;
    let name = segs[1..n - 2].join("/");
    validate_name(&name).map_err(|e| RegistryError::name_invalid(e.to_string()))?;
    Ok(RegistryPath { repo_key, name, target })
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: wharf_core::DigestError| RegistryError::digest_invalid(format!("{e} (got {:?})", truncate(s, 80))))
}

fn reference_error(e: NameError) -> RegistryError {
    match e {
        NameError::Digest { .. } => RegistryError::digest_invalid(e.to_string()),
        NameError::Tag(_) => RegistryError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()),
        _ => RegistryError::name_invalid(e.to_string()),
    }
}

fn not_found_path() -> RegistryError {
    RegistryError::not_found(
        "NOT_FOUND",
        "unknown registry path: expected /v2/<repoKey>/<name>/(manifests/<reference>|blobs/<digest>|tags/list|referrers/<digest>)",
    )
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The request being served, resolved against the configuration.
pub struct Ctx {
    pub state: AppState,
    pub repo: Arc<Repo>,
    /// The upstream's name (Docker Hub's `library/` applied).
    pub name: String,
    /// The name as the client wrote it.
    pub client_name: String,
    pub headers: HeaderMap,
    pub query: Option<String>,
    pub head: bool,
    /// Passthrough repos: the client's credentials, presented upstream (`None`: anonymous).
    pub client: Option<Arc<ClientCredentials>>,
}

impl Ctx {
    /// Whether cached content needs the upstream's decision for this client first.
    pub fn passthrough(&self) -> bool {
        self.repo.auth == AuthMode::Passthrough
    }
}

/// Every request under `/v2`.
/// Every request under `/v2`, in a `wharf.request` server span that continues an incoming
/// `traceparent` and ends with the response body.
pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let sampled = wharf_runtime::telemetry::head_sampled(req.headers());
    wharf_runtime::telemetry::unsampled(sampled, handle_request(state, req, started)).await
}

async fn handle_request(state: AppState, req: Request, started: Instant) -> Response {
    let span = log::request_span(req.method(), req.uri().path());
    wharf_runtime::telemetry::extract(&span, req.headers());
    let mut log = RequestLog::new(req.method(), req.uri().path());
    let result = route(state, req, &mut log).instrument(span.clone()).await;
    let resp = result.unwrap_or_else(|e| {
        log.error = Some(e.message.clone());
        e.into_response()
    });
    log.span = span;
    log.wrap(resp, started)
}

async fn route(state: AppState, req: Request, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(RegistryError::unsupported(format!(
                "{} is not supported: Wharf is a read-only pull-through cache; push to the upstream registry instead",
                req.method()
            )));
        }
    };
    let path = req.uri().path();
    if path == "/v2" || path == "/v2/" {
        log.kind = "version";
        authz::ping(&state.config.snapshot(), req.headers(), std::time::SystemTime::now())?;
        return Ok(version());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found_path());
    };
    let parsed = parse_path(rest)?;
    log.repo_key = parsed.repo_key.to_string();
    log.name = parsed.name.clone();
    log.kind = parsed.target.kind();
    let snapshot = state.config.snapshot();
    let Some(repo) = snapshot.repos.get(&parsed.repo_key).cloned() else {
        return Err(RegistryError::not_found(
            "NAME_UNKNOWN",
            format!(
                "no repo {:?} is configured on this node; add a [[repo]] with key = {:?} to the node's config file (or create it through the control plane)",
                parsed.repo_key.as_str(),
                parsed.repo_key.as_str()
            ),
        ));
    };
    let name = normalize_name(&parsed.name, repo.kind.implicit_library());
    // Public repos with static credentials (the common case) pass on this one branch.
    let client = match (repo.access, repo.auth) {
        (Access::Public, AuthMode::Static) => None,
        (Access::Token, _) => {
            let id = authz::check_puller(&snapshot, &repo.key, &name, req.headers(), std::time::SystemTime::now())
                .inspect_err(|_| log.authz = "refused")?;
            log.authz = "token";
            log.token_id = id;
            None
        }
        (Access::Public, AuthMode::Passthrough) => {
            ClientCredentials::from_headers(req.headers()).inspect_err(|_| log.authz = "refused")?.map(Arc::new)
        }
    };
    drop(snapshot);
    let ctx = Ctx {
        name,
        client_name: parsed.name,
        repo,
        headers: req.headers().clone(),
        query: req.uri().query().map(str::to_owned),
        head,
        state,
        client,
    };
    let result = target(&ctx, parsed.target, log).await;
    if ctx.passthrough() {
        return result.map_err(|e| gate::client_error(&ctx, e, log));
    }
    result
}

async fn target(ctx: &Ctx, target: Target, log: &mut RequestLog) -> Result<Response, RegistryError> {
    match target {
        Target::Manifest(reference) => {
            log.reference = reference.to_string();
            manifests::get(ctx, reference, log).await
        }
        Target::Blob(digest) => {
            log.reference = digest.to_string();
            blobs::get(ctx, digest, log).await
        }
        Target::Tags => passthrough::get(ctx, "tags/list".into(), log).await,
        Target::Referrers(digest) => {
            log.reference = digest.to_string();
            passthrough::get(ctx, format!("referrers/{digest}"), log).await
        }
    }
}

fn version() -> Response {
    let mut r = (StatusCode::OK, "{}").into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    r
}

/// Any other path: an OCI-style 404.
pub async fn fallback(req: Request) -> Response {
    let mut log = RequestLog::new(req.method(), req.uri().path());
    let e = not_found_path();
    log.error = Some(e.message.clone());
    log.wrap(e.into_response(), Instant::now())
}

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
        s => (StatusCode::BAD_GATEWAY, "UNKNOWN", format!("upstream answered {s} for {url}")),
    };
    let mut e = RegistryError::new(status_out, code, message).with_detail(detail);
    e.retry_after = retry_after;
    e
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

/// Whether an `If-None-Match` header matches `etag`.
pub fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == etag
    })
}

/// The response for content addressed by `digest`.
pub fn content_headers(h: &mut HeaderMap, digest: &Digest, content_type: &str, cache_control: &str) {
    let put = |h: &mut HeaderMap, k: header::HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    };
    put(h, header::CONTENT_TYPE, content_type);
    put(h, header::HeaderName::from_static("docker-content-digest"), &digest.to_string());
    put(h, header::ETAG, &format!("\"{digest}\""));
    put(h, header::CACHE_CONTROL, cache_control);
    h.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
}

/// A 304 for a matching `If-None-Match`.
pub fn not_modified_response(digest: &Digest, content_type: &str, cache_control: &str) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    content_headers(r.headers_mut(), digest, content_type, cache_control);
    r
}

#[cfg(test)]
mod tests;
