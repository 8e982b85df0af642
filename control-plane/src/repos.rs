//! Repos in the configuration store: validation, compare-and-swap writes, and their stored form.
//! The one implementation behind both the gRPC `RepoService` and the REST gateway.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wharf_core::{
    Access, AuthMode, CredentialProvider, Credentials, Repo, RepoError, RepoKey, RepoKind, Secret, UpstreamTls,
};

use crate::error::ApiError;
use crate::store::{ConfigStore, KeyValue};

/// Where repos live in the store.
pub const PREFIX: &str = "repos/";

/// What a client asks for: a repo before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoSpec {
    pub key: String,
    pub kind: Option<String>,
    pub upstream: Option<String>,
    pub tag_ttl: Option<Duration>,
    pub username: Option<String>,
    /// Write-only. On update, `None` keeps the stored password.
    pub password: Option<String>,
    /// The repo's cache TTL override (`None`: the node's).
    pub cache_ttl: Option<Duration>,
    /// `static` (default) or `passthrough`.
    pub auth: Option<String>,
    /// `public` (default) or `token`.
    pub access: Option<String>,
    pub ca_bundle: Option<String>,
    pub insecure_skip_tls_verify: bool,
    /// The registry hosts the repo mirrors (empty: the kind's and the upstream's).
    pub mirror_of: Vec<String>,
    /// Where the credentials come from instead of a password (`gcp`); `None` or empty: none.
    pub credential_provider: Option<String>,
    /// The file on the nodes the provider reads; `None` or empty: none.
    pub credential_file: Option<String>,
}

/// A stored repo with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRecord {
    pub repo: Repo,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// The store revision of the last change.
    pub revision: i64,
}

/// The stored form (JSON). The password is stored as given: the store's own access control
/// (etcd auth and TLS, or the embedded store's file permissions) is what protects it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    kind: RepoKind,
    upstream: String,
    tag_ttl_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    created_at_ms: u64,
    updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "is_default")]
    auth: AuthMode,
    #[serde(default, skip_serializing_if = "is_default")]
    access: Access,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_bundle: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    insecure_skip_tls_verify: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mirror_of: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential_provider: Option<CredentialProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential_file: Option<String>,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Now, at the resolution the store keeps (ms), so a write answers what a later read returns.
pub(crate) fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis(SystemTime::now()))
}

/// Decodes a stored repo; `None` for keys that are not repos or do not parse (logged).
pub fn decode(kv: &KeyValue) -> Option<RepoRecord> {
    let key = kv.key.strip_prefix(PREFIX)?;
    let parsed = (|| -> Result<RepoRecord, String> {
        let s: Stored = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let key: RepoKey = key.parse().map_err(|e: RepoError| e.to_string())?;
        let credentials = match (s.username, s.password) {
            (Some(username), Some(p)) => Some(Credentials { username, password: Secret::new(p) }),
            _ => None,
        };
        let repo = Repo::new(key, s.kind, Some(&s.upstream), Duration::from_secs(s.tag_ttl_secs), credentials)
            .and_then(|r| r.with_cache_ttl(s.cache_ttl_secs.map(Duration::from_secs)))
            .and_then(|r| r.with_access(s.auth, s.access))
            .and_then(|r| {
                r.with_upstream_tls(UpstreamTls {
                    ca_bundle: s.ca_bundle,
                    insecure_skip_verify: s.insecure_skip_tls_verify,
                })
            })
            .and_then(|r| r.with_mirror_of(s.mirror_of))
            .and_then(|r| r.with_credential_provider(s.credential_provider, s.credential_file))
            .map_err(|e| e.to_string())?;
        Ok(RepoRecord {
            repo,
            created_at: UNIX_EPOCH + Duration::from_millis(s.created_at_ms),
            updated_at: UNIX_EPOCH + Duration::from_millis(s.updated_at_ms),
            revision: kv.mod_revision,
        })
    })();
    match parsed {
        Ok(r) => Some(r),
        Err(error) => {
            tracing::error!(key = %kv.key, %error, "stored repo does not decode; skipped");
            None
        }
    }
}

fn encode(repo: &Repo, created_at: SystemTime, updated_at: SystemTime) -> Vec<u8> {
    let s = Stored {
        kind: repo.kind,
        upstream: repo.upstream.clone(),
        tag_ttl_secs: repo.tag_ttl.as_secs(),
        username: repo.credentials.as_ref().map(|c| c.username.clone()),
        password: repo.credentials.as_ref().map(|c| c.password.expose().to_owned()),
        created_at_ms: millis(created_at),
        updated_at_ms: millis(updated_at),
        cache_ttl_secs: repo.cache_ttl.map(|d| d.as_secs()),
        auth: repo.auth,
        access: repo.access,
        ca_bundle: repo.tls.ca_bundle.clone(),
        insecure_skip_tls_verify: repo.tls.insecure_skip_verify,
        mirror_of: repo.mirror_of.clone(),
        credential_provider: repo.credential_provider,
        credential_file: repo.credential_file.clone(),
    };
    serde_json::to_vec(&s).unwrap_or_default()
}

/// Checks a spec and builds the repo, naming the field at fault. `stored` supplies the password
/// when the spec keeps it.
pub fn validate(spec: &RepoSpec, stored: Option<&Credentials>) -> Result<Repo, ApiError> {
    let key: RepoKey = spec.key.parse().map_err(|e: RepoError| ApiError::invalid("key", e.to_string()))?;
    let kind: RepoKind = match spec.kind.as_deref() {
        None | Some("") => RepoKind::Generic,
        Some(k) => k.parse().map_err(|e: RepoError| ApiError::invalid("kind", e.to_string()))?,
    };
    let tag_ttl = spec.tag_ttl.unwrap_or(Repo::DEFAULT_TAG_TTL);
    let username = spec.username.clone().filter(|u| !u.is_empty());
    // The password is write-only: a replace without one keeps the stored one, as long as it still
    // names a username (no username: no credentials).
    let kept = || stored.filter(|_| username.is_some()).map(|c| c.password.expose().to_owned());
    let password = spec.password.clone().filter(|p| !p.is_empty()).or_else(kept);
    let credentials = match (username, password) {
        (Some(username), Some(p)) => Some(Credentials { username, password: Secret::new(p) }),
        (None, None) => None,
        (Some(_), None) => return Err(ApiError::invalid("password", "a username needs a password")),
        (None, Some(_)) => return Err(ApiError::invalid("username", "a password needs a username")),
    };
    let upstream = spec.upstream.as_deref().filter(|u| !u.is_empty());
    let word = |field: &'static str, e: RepoError| ApiError::invalid(field, e.to_string());
    let auth: AuthMode = match spec.auth.as_deref() {
        None | Some("") => AuthMode::default(),
        Some(a) => a.parse().map_err(|e| word("auth", e))?,
    };
    let access: Access = match spec.access.as_deref() {
        None | Some("") => Access::default(),
        Some(a) => a.parse().map_err(|e| word("access", e))?,
    };
    let provider: Option<CredentialProvider> = match spec.credential_provider.as_deref() {
        None | Some("") => None,
        Some(p) => Some(p.parse().map_err(|e| word("credential_provider", e))?),
    };
    let tls = UpstreamTls {
        ca_bundle: spec.ca_bundle.clone().filter(|c| !c.is_empty()),
        insecure_skip_verify: spec.insecure_skip_tls_verify,
    };
    Repo::new(key, kind, upstream, tag_ttl, credentials)
        .and_then(|r| r.with_cache_ttl(spec.cache_ttl))
        .and_then(|r| r.with_access(auth, access))
        .and_then(|r| r.with_upstream_tls(tls))
        .and_then(|r| r.with_mirror_of(spec.mirror_of.clone()))
        .and_then(|r| r.with_credential_provider(provider, spec.credential_file.clone()))
        .map_err(|e| {
            let field = match &e {
                RepoError::Key(_) => "key",
                RepoError::Kind(_) => "kind",
                RepoError::Upstream { .. } | RepoError::NoUpstream { .. } => "upstream",
                RepoError::TagTtl { .. } => "tag_ttl",
                RepoError::CacheTtl { .. } => "cache_ttl",
                RepoError::AuthMode(_) => "auth",
                RepoError::Access(_) => "access",
                RepoError::Policy { field, .. } => field,
                RepoError::CaBundle { .. } => "ca_bundle",
                RepoError::MirrorOf { .. } => "mirror_of",
                RepoError::CredentialProvider(_) => "credential_provider",
            };
            ApiError::invalid(field, e.to_string())
        })
}

/// Repo operations over a configuration store.
#[derive(Clone)]
pub struct Repos {
    store: Arc<dyn ConfigStore>,
}

fn store_key(key: &str) -> String {
    format!("{PREFIX}{key}")
}

impl Repos {
    pub fn new(store: Arc<dyn ConfigStore>) -> Self {
        Self { store }
    }

    pub async fn create(&self, spec: RepoSpec) -> Result<RepoRecord, ApiError> {
        let repo = validate(&spec, None)?;
        let now = now();
        let key = repo.key.to_string();
        let revision = self
            .store
            .create(&store_key(&key), encode(&repo, now, now))
            .await
            .map_err(|e| ApiError::from_store(e, &key, None))?;
        tracing::info!(repo_key = %key, kind = %repo.kind, upstream = %repo.upstream, revision, "repo created");
        Ok(RepoRecord { repo, created_at: now, updated_at: now, revision })
    }

    pub async fn get(&self, key: &str) -> Result<RepoRecord, ApiError> {
        key.parse::<RepoKey>().map_err(|e| ApiError::invalid("key", e.to_string()))?;
        let kv = self.store.get(&store_key(key)).await.map_err(|e| ApiError::from_store(e, key, None))?;
        let kv = kv.ok_or_else(|| ApiError::NotFound { key: key.to_owned() })?;
        decode(&kv).ok_or_else(|| ApiError::Internal(format!("stored repo {key:?} does not decode")))
    }

    /// Every repo, sorted by key, and the store revision they were read at.
    pub async fn list(&self) -> Result<(Vec<RepoRecord>, i64), ApiError> {
        let (kvs, revision) = self.store.list(PREFIX).await.map_err(|e| ApiError::from_store(e, "", None))?;
        let mut repos: Vec<RepoRecord> = kvs.iter().filter_map(decode).collect();
        repos.sort_by(|a, b| a.repo.key.cmp(&b.repo.key));
        Ok((repos, revision))
    }

    /// Replaces a repo. `expected`: the revision the caller read (`None`: unconditionally). A
    /// `None` password keeps the stored one unless `clear_password`.
    pub async fn update(
        &self,
        spec: RepoSpec,
        expected: Option<i64>,
        clear_password: bool,
    ) -> Result<RepoRecord, ApiError> {
        let current = self.get(&spec.key).await?;
        if let Some(e) = expected
            && e != current.revision
        {
            return Err(ApiError::Stale { key: spec.key.clone(), expected: e, current: current.revision });
        }
        let keep = if clear_password { None } else { current.repo.credentials.as_ref() };
        let repo = validate(&spec, keep)?;
        let now = now();
        let key = repo.key.to_string();
        let revision = self
            .store
            .update(
                &store_key(&key),
                encode(&repo, current.created_at, now),
                Some(expected.unwrap_or(current.revision)),
            )
            .await
            .map_err(|e| ApiError::from_store(e, &key, Some(expected.unwrap_or(current.revision))))?;
        tracing::info!(repo_key = %key, revision, "repo updated");
        Ok(RepoRecord { repo, created_at: current.created_at, updated_at: now, revision })
    }

    pub async fn delete(&self, key: &str, expected: Option<i64>) -> Result<i64, ApiError> {
        key.parse::<RepoKey>().map_err(|e| ApiError::invalid("key", e.to_string()))?;
        let revision =
            self.store.delete(&store_key(key), expected).await.map_err(|e| ApiError::from_store(e, key, expected))?;
        tracing::info!(repo_key = %key, revision, "repo deleted");
        Ok(revision)
    }
}

/// The spec that reproduces a record (password left out: write-only).
pub fn spec_of(r: &RepoRecord) -> RepoSpec {
    RepoSpec {
        key: r.repo.key.to_string(),
        kind: Some(r.repo.kind.to_string()),
        upstream: Some(r.repo.upstream.clone()),
        tag_ttl: Some(r.repo.tag_ttl),
        username: r.repo.credentials.as_ref().map(|c| c.username.clone()),
        password: None,
        cache_ttl: r.repo.cache_ttl,
        auth: Some(r.repo.auth.to_string()),
        access: Some(r.repo.access.to_string()),
        ca_bundle: r.repo.tls.ca_bundle.clone(),
        insecure_skip_tls_verify: r.repo.tls.insecure_skip_verify,
        mirror_of: r.repo.mirror_of.clone(),
        credential_provider: r.repo.credential_provider.map(|p| p.to_string()),
        credential_file: r.repo.credential_file.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str) -> RepoSpec {
        RepoSpec { key: key.into(), kind: Some("ghcr".into()), ..Default::default() }
    }

    #[test]
    fn validation_names_the_field() {
        let field = |s: RepoSpec| match validate(&s, None) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(spec("Bad Key")), "key");
        assert_eq!(field(RepoSpec { kind: Some("nope".into()), ..spec("a") }), "kind");
        assert_eq!(field(RepoSpec { kind: None, ..spec("a") }), "upstream");
        assert_eq!(field(RepoSpec { upstream: Some("ftp://x".into()), ..spec("a") }), "upstream");
        assert_eq!(field(RepoSpec { tag_ttl: Some(Duration::from_secs(40 * 86400)), ..spec("a") }), "tag_ttl");
        assert_eq!(field(RepoSpec { username: Some("u".into()), ..spec("a") }), "password");
        assert_eq!(field(RepoSpec { password: Some("p".into()), ..spec("a") }), "username");
        assert_eq!(field(RepoSpec { cache_ttl: Some(Duration::ZERO), ..spec("a") }), "cache_ttl");
        assert_eq!(field(RepoSpec { auth: Some("oauth".into()), ..spec("a") }), "auth");
        assert_eq!(field(RepoSpec { access: Some("private".into()), ..spec("a") }), "access");
        let passthrough = || RepoSpec { auth: Some("passthrough".into()), ..spec("a") };
        assert_eq!(field(RepoSpec { access: Some("token".into()), ..passthrough() }), "access");
        assert_eq!(field(RepoSpec { username: Some("u".into()), password: Some("p".into()), ..passthrough() }), "auth");
        assert_eq!(field(RepoSpec { ca_bundle: Some("x".into()), ..spec("a") }), "ca_bundle");
    }

    #[test]
    fn stored_form_round_trips_and_keeps_the_password() {
        let with_ttl = RepoSpec {
            username: Some("u".into()),
            password: Some("p".into()),
            cache_ttl: Some(Duration::from_secs(7 * 86400)),
            access: Some("token".into()),
            insecure_skip_tls_verify: true,
            ..spec("a")
        };
        let r = validate(&with_ttl, None).unwrap();
        let kv = KeyValue {
            key: store_key("a"),
            value: encode(&r, UNIX_EPOCH, UNIX_EPOCH),
            create_revision: 3,
            mod_revision: 5,
            lease: None,
        };
        let back = decode(&kv).unwrap();
        assert_eq!(back.repo, r);
        assert_eq!(back.revision, 5);
        // An update without a password keeps the stored one.
        let kept = validate(&RepoSpec { username: Some("u".into()), ..spec("a") }, r.credentials.as_ref()).unwrap();
        assert_eq!(kept.credentials, r.credentials);
    }
}
