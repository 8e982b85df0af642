//! The node's token endpoint, `GET /v2/token`, in the Docker Registry token protocol that docker,
//! containerd, podman, skopeo and oras speak, and the Bearer challenge that sends them there.
//!
//! Each `scope=repository:<name>:pull` is resolved to a repo exactly as a request for `<name>`
//! would be (repoKey first, else `?ns=`, `Host`, the default mirror), and granted when:
//! - the repo is public (anyone, anonymous included);
//! - the repo is `access = "token"` and the client sent a puller token (as Basic password or
//!   Bearer) whose patterns cover it;
//! - the repo is passthrough: anonymously, or with credentials the upstream accepts there (asked
//!   first; they are sealed into the token, never stored).
//!
//! Anything else is left out of the token (the Docker token protocol grants a subset); the
//! request it was for then gets 401 `insufficient_scope`. Credentials that are refused outright (a
//! puller token unknown, expired or revoked; upstream credentials the upstream refuses) are a 401,
//! so `docker login` with a wrong password fails.

use std::time::SystemTime;

use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use wharf_core::{Access, AuthMode, Grant, Role, normalize_name, registry_host_error, validate_name};

use super::path;
use super::resolve::{ns_param, resolve};
use crate::authz::passthrough as gate;
use crate::config::Snapshot;
use crate::credentials::ClientCredentials;
use crate::error::{Challenge, RegistryError};
use crate::node_token::{self, Claims};
use crate::request_log::RequestLog;
use crate::state::AppState;

pub const PATH: &str = "/v2/token";

/// More scopes than any client asks for at once (containerd asks two): refused outright.
pub const MAX_SCOPES: usize = 16;

/// `GET /v2/token?service=…&scope=repository:<name>:pull[&scope=…][&ns=…]`.
pub async fn issue(state: &AppState, req: &Parts, log: &mut RequestLog) -> Result<Response, RegistryError> {
    log.kind = "token";
    let now = SystemTime::now();
    let query = req.uri.query().unwrap_or("");
    let scopes: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect::<Vec<_>>())
        .collect();
    if scopes.len() > MAX_SCOPES {
        return Err(RegistryError::new(
            StatusCode::BAD_REQUEST,
            "DENIED",
            format!("{} scopes asked at once; this node grants at most {MAX_SCOPES} per token", scopes.len()),
        ));
    }
    let snapshot = state.config.snapshot();
    let creds = ClientCredentials::from_headers(&req.headers).inspect_err(|_| log.authz = "refused")?;
    let puller = match creds.as_ref().and_then(ClientCredentials::wharf_token) {
        None => None,
        Some(p) => match snapshot.pullers.get(&p.id) {
            Some(g) if g.role == Role::Puller && g.accepts(&p, now) => Some(g),
            _ => {
                log.authz = "refused";
                return Err(RegistryError::unauthorized(format!(
                    "puller token {} is unknown, expired or revoked on this node",
                    p.id
                )));
            }
        },
    };
    // Upstream credentials: anything else a client sent, but never a Wharf token.
    let upstream_creds = creds.filter(|c| {
        c.wharf_token().is_none()
            && !matches!(c, ClientCredentials::Bearer(t) if t.expose().starts_with(node_token::PREFIX))
    });
    let mut access: Vec<(String, String)> = Vec::new();
    let mut sealed = false;
    for scope in &scopes {
        let Some(name) = pull_scope(scope) else { continue };
        let Ok(routed) = resolve(&snapshot, &state.mirror, name, req.uri.query(), &req.headers) else { continue };
        let repo = routed.repo;
        let name = normalize_name(&routed.name, repo.kind.implicit_library());
        let granted = match (repo.access, repo.auth) {
            (Access::Token, _) => puller.is_some_and(|g| g.may_pull(repo.key.as_str(), &name)),
            (Access::Public, AuthMode::Passthrough) => {
                if let Some(c) = &upstream_creds {
                    gate::check_credentials(state, &repo, &name, c).await.inspect_err(|_| log.authz = "refused")?;
                    sealed = true;
                }
                true
            }
            (Access::Public, AuthMode::Static) => true,
        };
        let pair = (repo.key.to_string(), name);
        if granted && !access.contains(&pair) {
            access.push(pair);
        }
    }
    if scopes.is_empty()
        && let Some(c) = &upstream_creds
    {
        check_login(state, &snapshot, c).await.inspect_err(|_| log.authz = "refused")?;
    }
    log.authz = match (&puller, sealed) {
        (Some(_), _) => "token",
        (None, true) => "upstream",
        (None, false) => "anonymous",
    };
    log.token_id = puller.map(|g| g.id.clone()).unwrap_or_default();
    let expires = expiry(state.tokens.ttl, puller, now);
    let claims = Claims {
        issuer: state.tokens.service.clone(),
        puller: puller.map(|g| g.id.clone()),
        issued_at: node_token::unix(now),
        expires_at: node_token::unix(expires),
        access,
        credentials: if sealed { upstream_creds } else { None },
        peer: None,
    };
    let token = state.tokens.seal(&snapshot.keys, &claims, now);
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": claims.expires_at.saturating_sub(claims.issued_at),
        "issued_at": humantime::format_rfc3339_seconds(now).to_string(),
    });
    let mut resp = (StatusCode::OK, body.to_string()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// A login (no scope) with credentials that are not a puller token: the upstreams of the node's
/// passthrough repos are asked whether they take them (one yes is enough; an upstream that cannot
/// tell does not refuse), so `docker login` with a wrong password fails here, not at the pull.
async fn check_login(state: &AppState, snapshot: &Snapshot, creds: &ClientCredentials) -> Result<(), RegistryError> {
    let mut asked: Vec<&str> = Vec::new();
    let mut refused = false;
    for repo in snapshot.repos.values().filter(|r| r.auth == AuthMode::Passthrough) {
        if asked.contains(&repo.upstream.as_str()) {
            continue;
        }
        asked.push(&repo.upstream);
        match state.upstream.check_login(repo, creds).await {
            Ok(Some(true)) => return Ok(()),
            Ok(Some(false)) => refused = true,
            Ok(None) | Err(_) => return Ok(()),
        }
    }
    if asked.is_empty() {
        return Err(RegistryError::unauthorized(
            "these credentials are not a puller token of this node, and no repo here passes credentials to its upstream",
        ));
    }
    if refused {
        return Err(RegistryError::unauthorized(format!(
            "the upstreams of this node's passthrough repos refused these credentials ({})",
            asked.join(", ")
        )));
    }
    Ok(())
}

/// The name of a `repository:<name>:<actions>` scope whose actions include `pull` (other
/// resource types and actions are not this read-only node's to grant).
fn pull_scope(scope: &str) -> Option<&str> {
    let (name, actions) = scope.strip_prefix("repository:")?.rsplit_once(':')?;
    (actions.split(',').any(|a| a == "pull" || a == "*") && validate_name(name).is_ok()).then_some(name)
}

/// A token lives the node's TTL, and never past the puller token it was issued for.
fn expiry(ttl: std::time::Duration, puller: Option<&Grant>, now: SystemTime) -> SystemTime {
    let end = now + ttl;
    puller.and_then(|g| g.expires_at).map_or(end, |e| e.min(end))
}

/// The `WWW-Authenticate` of a 401 to `req`: `Bearer realm="<scheme>://<host>/v2/token"`
/// (`--token-realm` wins; a request routed by `?ns=` keeps it in the realm, so that the token
/// request resolves its scopes the same way), `service`, the scope the request needed, and why
/// (`error="invalid_token"`, `"insufficient_scope"`). The token endpoint's own 401 is Basic.
pub fn challenge(state: &AppState, req: &Parts, why: Challenge) -> Box<str> {
    let tokens = &state.tokens;
    let path = req.uri.path();
    if path == PATH {
        return format!("Basic realm={}", quoted(&tokens.service)).into();
    }
    let mut realm = match &tokens.realm {
        Some(r) => r.clone(),
        None => {
            let host = req
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri.authority().map(|a| a.as_str()))
                .unwrap_or("localhost");
            format!("{}://{host}{PATH}", if tokens.https { "https" } else { "http" })
        }
    };
    if let Some(ns) = req.uri.query().and_then(ns_param).filter(|ns| registry_host_error(ns).is_none()) {
        realm.push_str(if realm.contains('?') { "&ns=" } else { "?ns=" });
        realm.push_str(&ns);
    }
    let mut value = format!("Bearer realm={},service={}", quoted(&realm), quoted(&tokens.service));
    if let Some(name) = path.strip_prefix("/v2/").and_then(|rest| path::parse_path(rest).ok()).map(|p| p.name) {
        value.push_str(&format!(",scope=\"repository:{name}:pull\""));
    }
    if let Some(e) = why.error() {
        value.push_str(&format!(",error=\"{e}\""));
    }
    value.into()
}

/// A quoted-string (RFC 9110, 5.6.4).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
