//! Who may pull, decided at the edge before any cache lookup:
//!
//! - `access = "token"` repos: a pull needs a `puller` token from the node's current snapshot whose
//!   repo patterns match `<repoKey>/<name>` (the upstream's name: Docker Hub's `library/` applied),
//!   sent as `Authorization: Bearer <token>` or as the Basic password (`docker login <node>`). No
//!   token: 401 with a Basic challenge; unknown, expired or revoked: 401; patterns not matching: 403
//!   ([`check_puller`]).
//! - `GET /v2/`: whether to challenge the client ([`ping`]).
//! - `auth = "passthrough"` repos: the client's own credentials go upstream. Cached content reaches
//!   a client only after the upstream accepted that client's credentials for that repository
//!   ([`passthrough`], asked by the cache logic before content leaves it).
//!
//! Public repos with static credentials skip all of this on one branch (see `registry::route`).
//! Credentials live in memory for the request only: never on disk, in a log line or a span.

pub mod passthrough;

use std::time::SystemTime;

use http::{HeaderMap, StatusCode, header};
use wharf_core::{Access, AuthMode, RepoKey};

use crate::config::Snapshot;
use crate::credentials::ClientCredentials;
use crate::error::RegistryError;

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

/// `GET /v2/`. docker, skopeo and podman learn from this ping alone whether to send credentials:
/// a node serving any `access = "token"` or passthrough repo challenges a client that sent none
/// (Basic), so that their logins reach it. (docker then needs a `docker login <node>` even for the
/// node's public repos; skopeo and podman answer the challenge anonymously, which passes.) A node
/// of public repos only stays open. A Wharf token sent along must be valid, so `docker login` with
/// a bad one fails.
pub fn ping(snapshot: &Snapshot, headers: &HeaderMap, now: SystemTime) -> Result<(), RegistryError> {
    let creds = match ClientCredentials::from_headers(headers) {
        Ok(Some(creds)) => creds,
        Ok(None) if headers.contains_key(header::AUTHORIZATION) => return Ok(()),
        Ok(None) => {
            let guarded = snapshot.repos.values().any(|r| r.access == Access::Token || r.auth == AuthMode::Passthrough);
            return if guarded {
                Err(RegistryError::unauthorized(
                    "this node serves repos that need credentials: log in to it (docker login <node>)",
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
