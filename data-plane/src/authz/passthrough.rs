//! Passthrough repos: cached content reaches a client only after the upstream accepted that
//! client's credentials for the repository, now or less than `--passthrough-auth-ttl` ago.
//!
//! Every upstream answer 200 to a request made with the client's credentials (a manifest GET, a
//! tag revalidation, a blob fetch the client started, a HEAD) is such an acceptance and is noted;
//! a cache hit without a recent one asks with a HEAD first. An upstream that cannot be asked
//! refuses the hit (fail closed): 503, never the content.

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use wharf_core::Repo;

use crate::credentials::ClientCredentials;
use crate::decisions::DecisionKey;
use crate::error::RegistryError;
use crate::oci::DEFAULT_ACCEPT;
use crate::request_log::RequestLog;
use crate::respond::{upstream_error, upstream_status};
use crate::state::{AppState, Ctx};
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest, UpstreamResponse};

/// This client, this repo, this repository.
pub fn key(ctx: &Ctx) -> DecisionKey {
    decision_key(ctx.client.as_deref(), &ctx.repo, &ctx.name)
}

fn decision_key(client: Option<&ClientCredentials>, repo: &Repo, name: &str) -> DecisionKey {
    DecisionKey {
        client: client.map(|c| c.fingerprint()),
        repo: repo.key.clone(),
        upstream: repo.upstream.clone(),
        name: name.to_owned(),
    }
}

/// The token endpoint's question before it seals `client`'s credentials into a token for `name`:
/// does the upstream accept them there? Asked with `tags/list?n=1` (it needs pull access) unless
/// the upstream said yes recently. A refusal (401, 403, or its token endpoint's) is a 401; an
/// upstream that cannot answer is a 503 (fail closed); any other answer (a 404: no such
/// repository) is no refusal, and cached content is still asked for per digest.
pub async fn check_credentials(
    state: &AppState,
    repo: &Repo,
    name: &str,
    client: &ClientCredentials,
) -> Result<(), RegistryError> {
    let key = decision_key(Some(client), repo, name);
    if state.decisions.allowed(&key) {
        return Ok(());
    }
    let req = UpstreamRequest {
        repo,
        name,
        method: Method::GET,
        path: "tags/list".into(),
        query: Some("n=1".into()),
        headers: HeaderMap::new(),
        retry: true,
        follow_redirects: false,
        client: Some(client),
    };
    let refused = || {
        RegistryError::unauthorized(format!(
            "the upstream of repo {} refused these credentials for {name} (the repo passes them on as they are)",
            repo.key
        ))
    };
    let unavailable = |why: String| {
        RegistryError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!(
                "repo {} passes clients' credentials to its upstream, which could not be asked whether these may pull {name}: {why}",
                repo.key
            ),
        )
    };
    match state.upstream.send(&req).await {
        Ok(r) if r.status == StatusCode::OK => {
            state.decisions.allow(key);
            Ok(())
        }
        Ok(r) if matches!(r.status.as_u16(), 401 | 403) => Err(refused()),
        Ok(r) if r.status.is_server_error() || r.status == StatusCode::TOO_MANY_REQUESTS => {
            Err(unavailable(format!("it answered {}", r.status)))
        }
        Ok(_) => Ok(()),
        Err(UpstreamError::Token { status: 401 | 403, .. }) => Err(refused()),
        Err(e) => Err(unavailable(e.to_string())),
    }
}

/// The upstream just answered 200 to this client's credentials for this repository.
pub fn note_authorized(ctx: &Ctx, log: &mut RequestLog) {
    if ctx.passthrough() {
        ctx.state.decisions.allow(key(ctx));
        log.authz = "upstream";
    }
}

/// Before cached content of a passthrough repo goes to a client: a recent decision, or a HEAD of
/// `path()` (`manifests/<digest>`, `blobs/<digest>`) upstream with the client's credentials (a GET
/// when the upstream answers HEAD with 405 or 501). Other repos return at once (the path is not
/// even built).
pub async fn authorize_hit(
    ctx: &Ctx,
    path: impl FnOnce() -> String,
    log: &mut RequestLog,
) -> Result<(), RegistryError> {
    if !ctx.passthrough() {
        return Ok(());
    }
    let key = key(ctx);
    if ctx.state.decisions.allowed(&key) {
        log.authz = "cached";
        return Ok(());
    }
    // Boxed: the upstream client's futures are kilobytes, and every hit's future would carry
    // (and move) them inline.
    Box::pin(ask_upstream(ctx, path(), key, log)).await
}

/// Asks the upstream whether this client may pull `path`, and records a yes for later hits.
async fn ask_upstream(ctx: &Ctx, path: String, key: DecisionKey, log: &mut RequestLog) -> Result<(), RegistryError> {
    let what = if path.starts_with("manifests/") { "manifest" } else { "blob" };
    let mut headers = HeaderMap::new();
    if what == "manifest" {
        headers.insert(header::ACCEPT, HeaderValue::from_static(DEFAULT_ACCEPT));
    }
    let req = UpstreamRequest {
        repo: &ctx.repo,
        name: &ctx.name,
        method: Method::HEAD,
        path,
        query: None,
        headers,
        retry: true,
        follow_redirects: false,
        client: ctx.client.as_deref(),
    };
    if log.upstream_url.is_empty() {
        log.upstream_url = Upstream::url_for(&req);
    }
    let mut answer = ctx.state.upstream.send(&req).await;
    // An upstream that does not support HEAD there: the same question as a GET, its body unread.
    if let Ok(r) = &answer
        && matches!(r.status.as_u16(), 405 | 501)
    {
        let get = UpstreamRequest { method: Method::GET, ..req };
        answer = ctx.state.upstream.send(&get).await;
    }
    match answer {
        Ok(r) if accepted(&r) => {
            ctx.state.decisions.allow(key);
            log.authz = "upstream";
            Ok(())
        }
        Ok(r) => {
            log.authz = "refused";
            let status = r.status;
            let retry_after = r.header_str(header::RETRY_AFTER).map(str::to_owned);
            Err(upstream_status(status, r.error_detail().await, what, retry_after))
        }
        // The token endpoint refused these credentials: a 401 like any other.
        Err(e @ UpstreamError::Token { status: 401 | 403, .. }) => {
            log.authz = "refused";
            Err(upstream_error(&e))
        }
        Err(e) => {
            log.authz = "refused";
            Err(RegistryError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!(
                    "repo {} passes clients' credentials to its upstream, which could not be asked whether these may pull {}; cached content is not served without its answer: {e}",
                    ctx.repo.key, ctx.client_name
                ),
            ))
        }
    }
}

/// An upstream's yes to a HEAD sent without following redirects: 200, or a redirect to another
/// host, where the content is (a registry signs a CDN or object-store URL only for a client it
/// authorized; the signed URL itself may refuse HEAD, as S3's for GET do). A redirect on the same
/// host (http to https, a path fixed) may come before any authorization: it is no yes.
pub fn accepted(r: &UpstreamResponse) -> bool {
    if r.status == StatusCode::OK {
        return true;
    }
    let location = r.header_str(header::LOCATION).and_then(|l| reqwest::Url::parse(l).ok());
    let from = reqwest::Url::parse(&r.url).ok();
    r.status.is_redirection()
        && match (from, location) {
            (Some(from), Some(to)) => from.host_str() != to.host_str(),
            // Relative: the same host.
            _ => false,
        }
}

/// A passthrough repo's error as the client gets it: a 401 carries the Basic challenge (so that
/// docker, containerd and podman send the user's login for this node) and says whose credentials
/// were refused.
pub fn client_error(ctx: &Ctx, mut e: RegistryError, log: &mut RequestLog) -> RegistryError {
    if matches!(e.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        log.authz = "refused";
    }
    if e.status == StatusCode::UNAUTHORIZED {
        e.message = match &ctx.client {
            None => format!(
                "{} needs credentials: repo {} passes them to its upstream; log in to this node with your upstream credentials (docker login <node>)",
                ctx.client_name, ctx.repo.key
            ),
            Some(_) => format!(
                "the upstream refused the credentials sent for {} (repo {} passes them on as they are)",
                ctx.client_name, ctx.repo.key
            ),
        };
        e = e.with_challenge();
    }
    e
}

/// A passthrough repo serves a tag stale (its upstream failing) only to a client the upstream
/// accepted recently: otherwise 503.
pub fn stale_allowed(ctx: &Ctx, why: &str, log: &mut RequestLog) -> Result<(), RegistryError> {
    if !ctx.passthrough() {
        return Ok(());
    }
    if ctx.state.decisions.allowed(&key(ctx)) {
        log.authz = "cached";
        return Ok(());
    }
    log.authz = "refused";
    Err(RegistryError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        format!(
            "repo {} passes clients' credentials to its upstream, which failed ({why}); the cached {} is not served without the upstream's answer for these credentials",
            ctx.repo.key, ctx.client_name
        ),
    ))
}
