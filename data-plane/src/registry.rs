//! The registry API (pull side of the OCI distribution spec), under `/v2/<repoKey>/<name>/`: every
//! request parsed ([`path`]), its repo resolved, authorized ([`crate::authz`]) and handed to the
//! cache logic ([`crate::cache`]); every answer is either the content or an OCI error JSON, and
//! every request gets one log line ([`crate::request_log`]).

mod path;
#[cfg(test)]
mod peer_tests;
mod resolve;
#[cfg(test)]
mod tests;
mod token;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, Method, StatusCode, header};
use tracing::Instrument as _;
use wharf_core::{Access, AuthMode, normalize_name};

use crate::authz::{self, passthrough as gate};
use crate::cache;
use crate::credentials::ClientCredentials;
use crate::error::RegistryError;
use crate::peers;
use crate::request_log::{self, RequestLog};
use crate::state::{AppState, Ctx};

pub use path::{RegistryPath, parse_path};
use resolve::resolve;

/// Every request under `/v2`, in a `wharf.request` server span that continues an incoming
/// `traceparent` and ends with the response body. Not an `async fn`, which would hold the state
/// and the request besides the future they move into.
pub fn handle(State(state): State<AppState>, req: Request) -> impl Future<Output = Response> + use<> {
    let started = Instant::now();
    let sampled = wharf_runtime::telemetry::head_sampled(req.headers());
    // The body is never read (every method with one is refused).
    let (req, _) = req.into_parts();
    wharf_runtime::telemetry::unsampled(sampled, handle_request(state, req, started))
}

async fn handle_request(state: AppState, req: Parts, started: Instant) -> Response {
    let span = request_log::request_span(&req.method, req.uri.path());
    wharf_runtime::telemetry::extract(&span, &req.headers);
    let mut log = RequestLog::new(&req.method, req.uri.path());
    let result = route(&state, &req, &mut log).instrument(span.clone()).await;
    let mut resp = result.unwrap_or_else(|mut e| {
        log.error = Some(e.message.clone());
        if let Some(why) = e.challenge {
            e.www_authenticate = Some(token::challenge(&state, &req, why));
        }
        e.into_response()
    });
    if log.route == "ns"
        && let Some(ns) = req.uri.query().and_then(resolve::ns_param).and_then(|ns| HeaderValue::from_str(&ns).ok())
    {
        // The distribution spec: a registry that honours `ns` names it in the answer.
        resp.headers_mut().insert("oci-namespace", ns);
    }
    log.span = span;
    log.wrap(resp, started)
}

async fn route(state: &AppState, req: &Parts, log: &mut RequestLog) -> Result<Response, RegistryError> {
    check_host(req)?;
    let head = match req.method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(RegistryError::unsupported(format!(
                "{} is not supported: Wharf is a read-only pull-through cache; push to the upstream registry instead",
                req.method
            )));
        }
    };
    let path = req.uri.path();
    if path == "/v2" || path == "/v2/" {
        log.kind = "version";
        authz::ping(&state.tokens, &state.config.snapshot(), &req.headers, SystemTime::now())?;
        return Ok(version());
    }
    // Boxed, as every path that may ask the upstream: a cache hit's future stays small.
    if path == token::PATH {
        return Box::pin(token::issue(state, req, log)).await;
    }
    if let Some(rest) = path.strip_prefix(peers::PATH) {
        return Box::pin(peer(state, req, rest, head, log)).await;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(path::not_found_path());
    };
    let parsed = parse_path(rest)?;
    log.kind = parsed.target.kind();
    let snapshot = state.config.snapshot();
    let routed = resolve(&snapshot, &state.mirror, &parsed.name, req.uri.query(), &req.headers)?;
    let (repo, client_name) = (routed.repo, routed.name);
    log.route = routed.route;
    log.repo_key = repo.key.to_string();
    log.name = client_name.clone();
    let name = normalize_name(&client_name, repo.kind.implicit_library());
    // Public repos with static credentials (the common case) pass on this one branch.
    let client = match (repo.access, repo.auth) {
        (Access::Public, AuthMode::Static) => None,
        _ if let Some(token) = authz::node_token(&req.headers) => {
            let claims = authz::check_node_token(&state.tokens, &snapshot, &repo.key, &name, token, SystemTime::now())
                .inspect_err(|_| log.authz = "refused")?;
            log.authz = "bearer";
            log.token_id = claims.puller.clone().unwrap_or_default();
            claims.credentials.clone().filter(|_| repo.auth == AuthMode::Passthrough).map(Arc::new)
        }
        (Access::Token, _) => {
            let id = authz::check_puller(&snapshot, &repo.key, &name, &req.headers, SystemTime::now())
                .inspect_err(|_| log.authz = "refused")?;
            log.authz = "token";
            log.token_id = id;
            None
        }
        (Access::Public, AuthMode::Passthrough) => {
            ClientCredentials::from_headers(&req.headers).inspect_err(|_| log.authz = "refused")?.map(Arc::new)
        }
    };
    drop(snapshot);
    let prefix = if routed.route == "key" { format!("{}/", repo.key) } else { String::new() };
    let ctx = request_ctx(state, req, repo, name, client_name, prefix, head, client);
    let result = cache::serve(&ctx, parsed.target, log).await;
    if ctx.passthrough() {
        return result.map_err(|e| gate::client_error(&ctx, e, log));
    }
    result.map_err(own_credentials_refused)
}

/// The request as the cache logic sees it.
#[allow(clippy::too_many_arguments)]
fn request_ctx(
    state: &AppState,
    req: &Parts,
    repo: Arc<wharf_core::Repo>,
    name: String,
    client_name: String,
    path_prefix: String,
    head: bool,
    client: Option<Arc<ClientCredentials>>,
) -> Ctx {
    Ctx {
        name,
        client_name,
        path_prefix,
        repo,
        headers: req.headers.clone(),
        query: req.uri.query().map(str::to_owned),
        head,
        plaintext: req.extensions.get::<wharf_runtime::OverTls>().is_none(),
        state: state.clone(),
        client,
        from_peer: false,
    }
}

/// Another node's request on the peer endpoint, `/_wharf/peer/<repoKey>/<name>/blobs/<digest>`
/// or `.../manifests/<digest>` (see [`crate::peers`]): it needs a peer token for this node; the
/// content is served from this node's cache or fetched by it, never asked of a third node. The asking node authorized
/// its client; passthrough repos' content never goes to a peer (their fetches need the client's
/// own credentials, which stay on the node the client asked).
async fn peer(
    state: &AppState,
    req: &Parts,
    rest: &str,
    head: bool,
    log: &mut RequestLog,
) -> Result<Response, RegistryError> {
    log.route = "peer";
    let snapshot = state.config.snapshot();
    let claims = authz::check_peer(&state.tokens, &snapshot, &req.headers, SystemTime::now())
        .inspect_err(|_| log.authz = "refused")?;
    log.authz = "peer";
    log.token_id = claims.issuer.clone();
    let parsed = parse_path(rest)?;
    log.kind = parsed.target.kind();
    if !matches!(parsed.target, cache::Target::Blob(_) | cache::Target::Manifest(wharf_core::Reference::Digest(_))) {
        return Err(RegistryError::not_found(
            "UNSUPPORTED",
            "the peer endpoint serves blobs and manifests by digest only",
        ));
    }
    let no_repo = || RegistryError::not_found("NAME_UNKNOWN", "no such repo on this node");
    let (key, client_name) = parsed.keyed().ok_or_else(no_repo)?;
    let repo = snapshot.repos.get(&key).cloned().ok_or_else(no_repo)?;
    if repo.auth == AuthMode::Passthrough {
        return Err(RegistryError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "a passthrough repo's content is never served to a peer",
        ));
    }
    drop(snapshot);
    let client_name = client_name.to_owned();
    log.repo_key = repo.key.to_string();
    log.name = client_name.clone();
    let name = normalize_name(&client_name, repo.kind.implicit_library());
    let mut ctx = request_ctx(state, req, repo, name, client_name, String::new(), head, None);
    ctx.from_peer = true;
    cache::serve(&ctx, parsed.target, log).await.map_err(own_credentials_refused)
}

/// The upstream refused what a repo presents of its own (its static credentials, or none): nothing
/// the client sends can change that, so it is no 401 (which asks the client for credentials) but a
/// 403, the reason kept.
fn own_credentials_refused(mut e: RegistryError) -> RegistryError {
    if e.status == StatusCode::UNAUTHORIZED && e.challenge.is_none() {
        e.status = StatusCode::FORBIDDEN;
        e.code = "DENIED";
        e.message = format!("{}; this repo presents its own credentials upstream, not the client's", e.message);
    }
    e
}

/// HTTP/1.1 requests carry exactly one `Host` (RFC 9112, 3.2): a missing or repeated one is a 400.
fn check_host(req: &Parts) -> Result<(), RegistryError> {
    if req.version != http::Version::HTTP_11 {
        return Ok(());
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        // It becomes the realm of challenges: a host[:port], nothing else.
        (Some(h), None)
            if h.to_str()
                .ok()
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .is_some_and(|a| !a.as_str().contains('@')) =>
        {
            Ok(())
        }
        (Some(_), None) => {
            Err(RegistryError::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", "the Host header is not a host[:port]"))
        }
        (None, _) => {
            Err(RegistryError::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", "an HTTP/1.1 request needs a Host header"))
        }
        (Some(_), Some(_)) => Err(RegistryError::new(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            "an HTTP/1.1 request carries one Host header, not several",
        )),
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
    let e = check_host(&req.into_parts().0).err().unwrap_or_else(path::not_found_path);
    log.error = Some(e.message.clone());
    log.wrap(e.into_response(), Instant::now())
}
