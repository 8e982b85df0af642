//! Who may call what: every gRPC and REST call but health, metrics and the OpenAPI document needs
//! a token (`Authorization: Bearer wharf_...`). `reader` may read, `admin` may also change, `node`
//! may follow the configuration stream (it carries upstream credentials), `puller` only pulls from
//! nodes. Tokens are checked against the hub's in-memory copy: no store call per request.

use std::collections::BTreeMap;
use std::time::SystemTime;

use http::{HeaderMap, Method};
use wharf_core::token::{Presented, Role};

use crate::error::ApiError;
use crate::tokens::TokenRecord;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health, readiness, metrics, the OpenAPI document.
    Nothing,
    Read,
    Write,
    /// The node configuration stream (Watch, Report).
    Node,
}

/// The permission a call needs, from its method and path (gRPC calls are POSTs to
/// `/<service>/<method>`).
pub fn need(method: &Method, path: &str) -> Need {
    const READS: [&str; 4] = [
        "/wharf.v1.RepoService/GetRepo",
        "/wharf.v1.RepoService/ListRepos",
        "/wharf.v1.NodeService/ListNodes",
        "/wharf.v1.TokenService/ListTokens",
    ];
    match path {
        "/healthz" | "/readyz" | "/metrics" | "/api/openapi.json" => Need::Nothing,
        p if p.starts_with("/wharf.v1.ConfigService/") => Need::Node,
        p if READS.contains(&p) => Need::Read,
        p if p.starts_with("/wharf.v1.") => Need::Write,
        _ if method == Method::GET || method == Method::HEAD => Need::Read,
        _ => Need::Write,
    }
}

/// The Bearer token in `headers`, if any (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Checks the caller's token for a call needing `need`; returns the token's id and role.
pub fn authorize(
    tokens: &BTreeMap<String, TokenRecord>,
    headers: &HeaderMap,
    need: Need,
    now: SystemTime,
) -> Result<Option<(String, Role)>, ApiError> {
    if need == Need::Nothing {
        return Ok(None);
    }
    let raw = bearer(headers).ok_or_else(|| {
        ApiError::Unauthenticated(
            "this call needs a token: send `Authorization: Bearer <token>` (regctl: --token-file or WHARF_TOKEN)"
                .into(),
        )
    })?;
    let presented = Presented::parse(raw).ok_or_else(|| {
        ApiError::Unauthenticated("the bearer token is not a Wharf token (wharf_<id>_<secret>)".into())
    })?;
    let record = tokens
        .get(&presented.id)
        .filter(|r| r.grant.accepts(&presented, now))
        .ok_or_else(|| ApiError::Unauthenticated(format!("token {} is unknown, revoked or expired", presented.id)))?;
    let role = record.grant.role;
    let allowed = match need {
        Need::Nothing => true,
        Need::Read => role.may_read(),
        Need::Write => role.may_write(),
        Need::Node => matches!(role, Role::Node | Role::Admin),
    };
    if !allowed {
        let what = match need {
            Need::Read => "read the configuration: it needs a reader or admin token",
            Need::Node => "follow the node configuration stream: it needs a node token",
            _ => "change the configuration: it needs an admin token",
        };
        return Err(ApiError::PermissionDenied(format!("token {} ({role}) may not {what}", presented.id)));
    }
    Ok(Some((presented.id, role)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wharf_core::token::{Grant, hash_secret};

    use super::*;

    fn tokens(list: &[(&str, Role, Option<SystemTime>)]) -> BTreeMap<String, TokenRecord> {
        list.iter()
            .map(|(id, role, expires_at)| {
                let grant = Grant {
                    id: (*id).into(),
                    secret_sha256: hash_secret(&"s".repeat(64)),
                    role: *role,
                    repos: vec![],
                    expires_at: *expires_at,
                };
                ((*id).into(), TokenRecord { grant, created_at: SystemTime::UNIX_EPOCH, description: String::new() })
            })
            .collect()
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn needs_by_call() {
        assert_eq!(need(&Method::GET, "/metrics"), Need::Nothing);
        assert_eq!(need(&Method::GET, "/api/repos"), Need::Read);
        assert_eq!(need(&Method::DELETE, "/api/tokens/x"), Need::Write);
        assert_eq!(need(&Method::POST, "/wharf.v1.RepoService/ListRepos"), Need::Read);
        assert_eq!(need(&Method::POST, "/wharf.v1.TokenService/CreateToken"), Need::Write);
        assert_eq!(need(&Method::POST, "/wharf.v1.ConfigService/Watch"), Need::Node);
    }

    #[test]
    fn roles_and_failures() {
        let now = SystemTime::now();
        let t = tokens(&[
            ("00000000000000aa", Role::Admin, None),
            ("00000000000000bb", Role::Reader, None),
            ("00000000000000cc", Role::Puller, None),
            ("00000000000000dd", Role::Node, None),
            ("00000000000000ee", Role::Admin, Some(now - Duration::from_secs(1))),
        ]);
        let h = |id: &str| headers(&format!("Bearer wharf_{id}_{}", "s".repeat(64)));
        let check = |id: &str, need: Need| authorize(&t, &h(id), need, now);
        assert!(check("00000000000000aa", Need::Write).is_ok());
        assert!(check("00000000000000aa", Need::Node).is_ok());
        assert!(check("00000000000000bb", Need::Read).is_ok());
        assert!(matches!(check("00000000000000bb", Need::Write), Err(ApiError::PermissionDenied(_))));
        assert!(matches!(check("00000000000000cc", Need::Read), Err(ApiError::PermissionDenied(_))));
        assert!(matches!(check("00000000000000dd", Need::Read), Err(ApiError::PermissionDenied(_))));
        assert!(check("00000000000000dd", Need::Node).is_ok());
        assert!(matches!(check("00000000000000ee", Need::Read), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(check("00000000000000ff", Need::Read), Err(ApiError::Unauthenticated(_))));
        let wrong = headers(&format!("bearer wharf_00000000000000aa_{}", "x".repeat(64)));
        assert!(matches!(authorize(&t, &wrong, Need::Read, now), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(authorize(&t, &HeaderMap::new(), Need::Read, now), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(authorize(&t, &headers("Basic YTpi"), Need::Read, now), Err(ApiError::Unauthenticated(_))));
        assert!(authorize(&t, &HeaderMap::new(), Need::Nothing, now).unwrap().is_none());
    }
}
