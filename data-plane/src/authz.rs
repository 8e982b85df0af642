//! Who may pull, decided at the edge before any cache lookup:
//!
//! - Node tokens (`Authorization: Bearer wharf.…`, from the node's `/v2/token`): a pull needs one
//!   that opens, has not expired, whose puller token (if it was issued for one) is still live, and
//!   that names this `(repoKey, name)`: else 401 with `error="invalid_token"` or
//!   `"insufficient_scope"` ([`check_node_token`]). The token endpoint decides what goes in one.
//! - `access = "token"` repos, directly: a pull needs a `puller` token from the node's current
//!   snapshot whose repo patterns match `<repoKey>/<name>` (the upstream's name: Docker Hub's
//!   `library/` applied), sent as `Authorization: Bearer <token>` or as the Basic password. No
//!   token: 401 with the challenge; unknown, expired or revoked: 401; patterns not matching: 403
//!   ([`check_puller`]).
//! - `GET /v2/`: whether to challenge the client ([`ping`]). Every challenge is `Bearer` with the
//!   node's token endpoint as realm (rendered by the registry edge).
//! - `auth = "passthrough"` repos: the client's own credentials go upstream. Cached content reaches
//!   a client only after the upstream accepted that client's credentials for that repository
//!   ([`passthrough`], asked by the cache logic before content leaves it).
//!
//! Public repos with static credentials skip all of this on one branch (see `registry::route`).
//! Credentials live in memory for the request only: never on disk, in a log line or a span.

pub mod passthrough;

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, StatusCode, header};
use wharf_core::{Access, AuthMode, RepoKey};

use crate::config::Snapshot;
use crate::credentials::ClientCredentials;
use crate::error::{Challenge, RegistryError};
use crate::node_token::{self, Claims, NodeTokens};

/// The node token in `Authorization: Bearer wharf.…`, when that is what the client sent.
pub fn node_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(node_token::PREFIX)).then_some(token)
}

/// Checks a node token for a pull of `name` (the upstream's name) through repo `key`.
pub fn check_node_token(
    tokens: &NodeTokens,
    snapshot: &Snapshot,
    key: &RepoKey,
    name: &str,
    token: &str,
    now: SystemTime,
) -> Result<Arc<Claims>, RegistryError> {
    let claims = open_node_token(tokens, snapshot, token, now)?;
    if claims.allows(key.as_str(), name) {
        Ok(claims)
    } else {
        Err(RegistryError::unauthorized(format!(
            "this token does not grant pulls of {key}/{name}: ask the token endpoint for this repository's scope"
        ))
        .with_challenge_of(Challenge::InsufficientScope))
    }
}

/// A request on the peer endpoint: it needs another node's peer token for this node, sealed with a
/// key of the cluster's set (only nodes the control plane authenticated hold it). Anything else,
/// a client's registry token included, is refused.
pub fn check_peer(
    tokens: &NodeTokens,
    snapshot: &Snapshot,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Arc<Claims>, RegistryError> {
    let refused = |m: String| RegistryError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m);
    if snapshot.keys.is_empty() {
        return Err(refused("this node is in no cluster: it serves no peers".into()));
    }
    let token = node_token(headers).ok_or_else(|| refused("the peer endpoint needs a node's peer token".into()))?;
    let claims = tokens.open(&snapshot.keys, token, now).map_err(|e| refused(e.to_string()))?;
    match &claims.peer {
        Some(to) if *to == tokens.service => Ok(claims),
        Some(to) => Err(refused(format!("this peer token is for node {to:?}, not this one"))),
        None => Err(refused("a client's token does not open the peer endpoint".into())),
    }
}

/// Opens a node token: sealed by a key this node holds, not expired, and issued for no puller
/// token that has since been revoked or has expired (revocation reaches tokens at once).
pub fn open_node_token(
    tokens: &NodeTokens,
    snapshot: &Snapshot,
    token: &str,
    now: SystemTime,
) -> Result<Arc<Claims>, RegistryError> {
    let invalid = |m: String| RegistryError::unauthorized(m).with_challenge_of(Challenge::InvalidToken);
    let claims = tokens.open(&snapshot.keys, token, now).map_err(|e| invalid(e.to_string()))?;
    if claims.peer.is_some() {
        return Err(invalid("a node's peer token opens no pull of a client".into()));
    }
    if let Some(id) = &claims.puller
        && snapshot.pullers.get(id).is_none_or(|g| g.expires_at.is_some_and(|e| now >= e))
    {
        return Err(invalid(format!(
            "the token was issued for puller token {id}, which is unknown, expired or revoked on this node"
        )));
    }
    Ok(claims)
}

/// Checks a pull of `name` through the `access = "token"` repo `key` against the puller tokens of
/// `snapshot`. Returns the token's id (public: fit for the request log).
pub fn check_puller(
    snapshot: &Snapshot,
    key: &RepoKey,
    name: &str,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<String, RegistryError> {
    let none = || {
        RegistryError::unauthorized(format!(
            "repo {key} needs a puller token: log in to this node with it as the password (docker login <node>) or send it as Authorization: Bearer"
        ))
    };
    let Some(presented) = ClientCredentials::from_headers(headers)?.and_then(|c| c.wharf_token()) else {
        return Err(none());
    };
    match snapshot.pullers.get(&presented.id) {
        Some(grant) if grant.accepts(&presented, now) => {
            if grant.may_pull(key.as_str(), name) {
                Ok(presented.id)
            } else {
                Err(RegistryError::new(
                    StatusCode::FORBIDDEN,
                    "DENIED",
                    format!("puller token {} does not cover {key}/{name}", presented.id),
                ))
            }
        }
        _ => Err(RegistryError::unauthorized(format!(
            "puller token {} is unknown, expired or revoked on this node",
            presented.id
        ))),
    }
}

/// `GET /v2/`. docker, skopeo and podman learn from this ping alone whether to get a token: a node
/// serving any `access = "token"` or passthrough repo challenges a client that sent nothing, and
/// the client then asks the token endpoint (anonymously for public repos, with its login for this
/// node otherwise). A node of public repos only stays open. A Wharf token sent along must be
/// valid, so `docker login` with a bad one fails.
pub fn ping(
    tokens: &NodeTokens,
    snapshot: &Snapshot,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(), RegistryError> {
    if let Some(token) = node_token(headers) {
        return open_node_token(tokens, snapshot, token, now).map(drop);
    }
    let creds = match ClientCredentials::from_headers(headers) {
        Ok(Some(creds)) => creds,
        Ok(None) if headers.contains_key(header::AUTHORIZATION) => return Ok(()),
        Ok(None) => {
            let guarded = snapshot.repos.values().any(|r| r.access == Access::Token || r.auth == AuthMode::Passthrough);
            return if guarded {
                Err(RegistryError::unauthorized(
                    "this node serves repos that need credentials: get a token from its token endpoint (anonymous for public repos), or log in to it (docker login <node>)",
                ))
            } else {
                Ok(())
            };
        }
        Err(_) => return Ok(()),
    };
    let Some(presented) = creds.wharf_token() else {
        return Ok(());
    };
    match snapshot.pullers.get(&presented.id) {
        Some(g) if g.accepts(&presented, now) => Ok(()),
        _ => Err(RegistryError::unauthorized(format!(
            "token {} is unknown, expired or revoked on this node",
            presented.id
        ))),
    }
}

#[cfg(test)]
mod tests;
