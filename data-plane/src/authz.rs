//! The pull-side authorization gate.
//!
//! - `access = "token"` repos: a pull needs a `puller` token from the node's current snapshot whose
//!   repo patterns match `<repoKey>/<name>` (the upstream's name: Docker Hub's `library/` applied),
//!   sent as `Authorization: Bearer <token>` or as the Basic password (`docker login <node>`). No
//!   token: 401 with a Basic challenge; unknown, expired or revoked: 401; patterns not matching: 403.
//! - `auth = "passthrough"` repos: the client's own credentials go upstream. Cached content reaches
//!   a client only after the upstream accepted that client's credentials for that repository; the
//!   upstream's positive answers are remembered per (SHA-256 of the credentials or anonymous, repo,
//!   name) for a short time ([`Decisions`]).
//!
//! Public repos with static credentials skip all of this on one branch (see `registry::route`).
//! Credentials live in memory for the request only: never on disk, in a log line or a span.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, StatusCode, header};
use wharf_core::{Access, AuthMode, Digest, DigestHasher, Presented, RepoKey, Secret};

use crate::config::Snapshot;
use crate::error::RegistryError;

/// The challenge a node answers 401 with: docker, containerd and podman then send `Authorization:
/// Basic` (their login for this node) on every later request.
pub const CHALLENGE: &str = "Basic realm=\"wharf\"";

/// Credentials a client presented in `Authorization` (never printed).
#[derive(Clone, PartialEq, Eq)]
pub enum ClientCredentials {
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientCredentials::Basic { .. } => f.write_str("Basic(<redacted>)"),
            ClientCredentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl ClientCredentials {
    /// The `Authorization` header's credentials: `None` without one, an error (401) when it is not
    /// Basic or Bearer or cannot be decoded.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, RegistryError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let bad = |why: &str| unauthorized(format!("the Authorization header is not usable: {why}"));
        let value = value.to_str().map_err(|_| bad("it is not visible ASCII"))?.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD.decode(rest).map_err(|_| bad("Basic is not base64"))?;
            let raw = String::from_utf8(raw).map_err(|_| bad("Basic credentials are not UTF-8"))?;
            let (username, password) = raw.split_once(':').ok_or_else(|| bad("Basic credentials have no ':'"))?;
            if username.is_empty() && password.is_empty() {
                // What containers/image (skopeo, podman) sends to a Basic challenge when it has no
                // login for this host: anonymous.
                return Ok(None);
            }
            Ok(Some(ClientCredentials::Basic { username: username.to_owned(), password: Secret::new(password) }))
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Ok(Some(ClientCredentials::Bearer(Secret::new(rest))))
        } else {
            Err(bad("expected Basic or Bearer"))
        }
    }

    /// SHA-256 of the credentials (domain-separated by scheme): the identity under which upstream
    /// tokens and authorization decisions are cached, so one client's never serve another.
    pub fn fingerprint(&self) -> Digest {
        let mut h = DigestHasher::new();
        match self {
            ClientCredentials::Basic { username, password } => {
                h.update(b"wharf-client-basic\0");
                h.update(&(username.len() as u64).to_be_bytes());
                h.update(username.as_bytes());
                h.update(password.expose().as_bytes());
            }
            ClientCredentials::Bearer(token) => {
                h.update(b"wharf-client-bearer\0");
                h.update(token.expose().as_bytes());
            }
        }
        h.finish()
    }

    /// The Wharf token in these credentials: a Bearer token, or the Basic password.
    fn wharf_token(&self) -> Option<Presented> {
        match self {
            ClientCredentials::Basic { password, .. } => Presented::parse(password.expose()),
            ClientCredentials::Bearer(t) => Presented::parse(t.expose()),
        }
    }
}

/// A 401 that asks the client for credentials.
pub fn unauthorized(message: impl Into<String>) -> RegistryError {
    RegistryError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message).with_challenge()
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
        unauthorized(format!(
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
        _ => Err(unauthorized(format!("puller token {} is unknown, expired or revoked on this node", presented.id))),
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
                Err(unauthorized("this node serves repos that need credentials: log in to it (docker login <node>)"))
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
        _ => Err(unauthorized(format!("token {} is unknown, expired or revoked on this node", presented.id))),
    }
}

/// Who a passthrough decision is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    /// [`ClientCredentials::fingerprint`]; `None`: anonymous.
    pub client: Option<Digest>,
    pub repo: RepoKey,
    /// The repo's upstream when the decision was made: pointing the repo elsewhere voids it.
    pub upstream: String,
    /// The upstream's name of the repository.
    pub name: String,
}

/// The upstream's recent "yes" to a client for a repository: cached content of a passthrough repo
/// is served to a client only with one. Bounded; entries live `ttl`.
pub struct Decisions {
    ttl: Duration,
    max_entries: usize,
    map: Mutex<HashMap<DecisionKey, Instant>>,
}

impl Decisions {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self { ttl, max_entries: max_entries.max(1), map: Mutex::default() }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<DecisionKey, Instant>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the upstream accepted this client for this repository less than `ttl` ago.
    pub fn allowed(&self, key: &DecisionKey) -> bool {
        self.map().get(key).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Records that the upstream just accepted this client for this repository.
    pub fn allow(&self, key: DecisionKey) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map();
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, at| at.elapsed() < ttl);
            if map.len() >= self.max_entries {
                // Still full of live entries: drop the oldest. Forgetting only costs a HEAD.
                if let Some(oldest) = map.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(key, Instant::now());
    }

    /// Entries held (expired ones included until pruned).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Decisions {
    fn default() -> Self {
        Self::new(Self::DEFAULT_TTL, Self::DEFAULT_MAX_ENTRIES)
    }
}

#[cfg(test)]
mod tests;
