//! The registry API (pull side of the OCI distribution spec), under `/v2/<repoKey>/<name>/`: every
//! request parsed ([`path`]), its repo resolved, authorized ([`crate::authz`]) and handed to the
//! cache logic ([`crate::cache`]); every answer is either the content or an OCI error JSON, and
//! every request gets one log line ([`crate::request_log`]).

mod path;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use tracing::Instrument as _;
use wharf_core::{Access, AuthMode, normalize_name};

use crate::authz::{self, passthrough as gate};
use crate::cache;
use crate::credentials::ClientCredentials;
use crate::error::RegistryError;
use crate::request_log::{self, RequestLog};
use crate::state::{AppState, Ctx};

pub use path::{RegistryPath, parse_path};

/// Every request under `/v2`, in a `wharf.request` server span that continues an incoming
/// `traceparent` and ends with the response body.
pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let sampled = wharf_runtime::telemetry::head_sampled(req.headers());
    wharf_runtime::telemetry::unsampled(sampled, handle_request(state, req, started)).await
}

async fn handle_request(state: AppState, req: Request, started: Instant) -> Response {
    let span = request_log::request_span(req.method(), req.uri().path());
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
        return Err(path::not_found_path());
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
    let result = cache::serve(&ctx, parsed.target, log).await;
    if ctx.passthrough() {
        return result.map_err(|e| gate::client_error(&ctx, e, log));
    }
    result
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
    let e = path::not_found_path();
    log.error = Some(e.message.clone());
    log.wrap(e.into_response(), Instant::now())
}
