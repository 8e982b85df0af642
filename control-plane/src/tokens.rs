//! API tokens in the configuration store: issued here, shown once, kept as a hash under
//! `tokens/<id>`. The hub follows them like repos, so every check is an in-memory lookup and a
//! revocation reaches this replica's checks and every node's snapshot within the propagation time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wharf_core::token::{Grant, Presented, RepoPattern, Role, format_token, hash_secret, valid_id};

use crate::error::ApiError;
use crate::repos::{millis, now};
use crate::store::{ConfigStore, KeyValue};

/// Where tokens live in the store.
pub const PREFIX: &str = "tokens/";

/// Tombstones of revoked tokens (the time of revocation, in ms).
const REVOKED: &str = "revoked/";

/// Longest lifetime a token may be given.
pub const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a client asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSpec {
    pub role: String,
    pub repos: Vec<String>,
    pub expires_in: Option<Duration>,
    pub description: String,
}

/// A stored token (its hash, never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub grant: Grant,
    pub created_at: SystemTime,
    pub description: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    role: Role,
    secret_sha256: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    repos: Vec<RepoPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    created_at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    description: String,
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Decodes a stored token; `None` (logged) for keys that do not parse.
pub fn decode(kv: &KeyValue) -> Option<TokenRecord> {
    let id = kv.key.strip_prefix(PREFIX)?;
    let parsed = (|| -> Result<TokenRecord, String> {
        let s: Stored = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&s.secret_sha256, &mut secret_sha256).map_err(|e| e.to_string())?;
        Ok(TokenRecord {
            grant: Grant {
                id: id.to_owned(),
                secret_sha256,
                role: s.role,
                repos: s.repos,
                expires_at: s.expires_at_ms.map(from_millis),
            },
            created_at: from_millis(s.created_at_ms),
            description: s.description,
        })
    })();
    parsed.map_err(|error| tracing::error!(key = %kv.key, %error, "stored token does not decode; skipped")).ok()
}

fn encode(r: &TokenRecord) -> Vec<u8> {
    let s = Stored {
        role: r.grant.role,
        secret_sha256: hex::encode(r.grant.secret_sha256),
        repos: r.grant.repos.clone(),
        expires_at_ms: r.grant.expires_at.map(millis),
        created_at_ms: millis(r.created_at),
        description: r.description.clone(),
    };
    serde_json::to_vec(&s).unwrap_or_default()
}

/// A fresh token: a 16-hex-digit id and a 256-bit secret.
fn generate() -> (String, String) {
    (hex::encode(rand::random::<[u8; 8]>()), hex::encode(rand::random::<[u8; 32]>()))
}

/// Checks a spec, naming the field at fault.
fn validate(spec: &TokenSpec) -> Result<(Role, Vec<RepoPattern>), ApiError> {
    let role: Role = spec.role.parse().map_err(|e: wharf_core::TokenError| ApiError::invalid("role", e.to_string()))?;
    if role != Role::Puller && !spec.repos.is_empty() {
        return Err(ApiError::invalid("repos", "repo patterns apply to puller tokens only"));
    }
    let repos = spec
        .repos
        .iter()
        .map(|p| p.parse().map_err(|e: wharf_core::TokenError| ApiError::invalid("repos", e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(e) = spec.expires_in
        && (e < Duration::from_secs(60) || e > MAX_EXPIRY)
    {
        return Err(ApiError::invalid("expires_in", format!("{e:?} is out of range (1m to 3650d)")));
    }
    if spec.description.chars().count() > 256 || spec.description.chars().any(char::is_control) {
        return Err(ApiError::invalid("description", "at most 256 characters, no control characters"));
    }
    Ok((role, repos))
}

/// Token operations over a configuration store.
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn ConfigStore>,
}

fn store_key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

impl Tokens {
    pub fn new(store: Arc<dyn ConfigStore>) -> Self {
        Self { store }
    }

    /// Issues a token; the answer's second part is the token itself, which nothing keeps.
    pub async fn create(&self, spec: TokenSpec) -> Result<(TokenRecord, String), ApiError> {
        let (role, repos) = validate(&spec)?;
        let (id, secret) = generate();
        let now = now();
        let record = TokenRecord {
            grant: Grant {
                id: id.clone(),
                secret_sha256: hash_secret(&secret),
                role,
                repos,
                expires_at: spec.expires_in.map(|e| now + e),
            },
            created_at: now,
            description: spec.description,
        };
        self.store.create(&store_key(&id), encode(&record)).await.map_err(|e| ApiError::from_store(e, &id, None))?;
        tracing::info!(token_id = %id, %role, "token created");
        Ok((record, format_token(&id, &secret)))
    }

    /// Every token, sorted by creation time.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, ApiError> {
        let (kvs, _) = self.store.list(PREFIX).await.map_err(|e| ApiError::from_store(e, "", None))?;
        let mut tokens: Vec<TokenRecord> = kvs.iter().filter_map(decode).collect();
        tokens.sort_by(|a, b| (a.created_at, &a.grant.id).cmp(&(b.created_at, &b.grant.id)));
        Ok(tokens)
    }

    /// Deletes the token and leaves a tombstone (`revoked/<id>`), so that a token file read at
    /// start-up (bootstrap, dev) does not bring it back.
    pub async fn revoke(&self, id: &str) -> Result<(), ApiError> {
        if !valid_id(id) {
            return Err(ApiError::invalid("id", "a token id is 16 lowercase hexadecimal digits (see `token list`)"));
        }
        if self.store.get(&store_key(id)).await.map_err(|e| ApiError::from_store(e, id, None))?.is_none() {
            return Err(ApiError::TokenNotFound { id: id.to_owned() });
        }
        // The tombstone first: a failure after it leaves the token revoked-to-be, never resurrectable.
        let tombstone = millis(SystemTime::now()).to_string().into_bytes();
        match self.store.create(&format!("{REVOKED}{id}"), tombstone).await {
            Ok(_) | Err(crate::store::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(ApiError::from_store(e, id, None)),
        }
        self.store.delete(&store_key(id), None).await.map_err(|e| match e {
            crate::store::StoreError::NotFound { .. } => ApiError::TokenNotFound { id: id.to_owned() },
            e => ApiError::from_store(e, id, None),
        })?;
        tracing::info!(token_id = %id, "token revoked");
        Ok(())
    }

    /// Makes sure `token` (the full `wharf_<id>_<secret>` text) exists with `role`, unless it was
    /// revoked. Used for the bootstrap admin token and `--dev`.
    pub async fn ensure(&self, token: &str, role: Role, description: &str) -> Result<Ensured, ApiError> {
        let p = Presented::parse(token)
            .ok_or_else(|| ApiError::invalid("token", "not a Wharf token (wharf_<16 hex digits>_<secret>)"))?;
        let get =
            |key: String| async move { self.store.get(&key).await.map_err(|e| ApiError::from_store(e, &key, None)) };
        if let Some(kv) = get(store_key(&p.id)).await? {
            return match decode(&kv) {
                Some(r) if r.grant.secret_sha256 == p.secret_sha256 && r.grant.role == role => Ok(Ensured::Present),
                _ => Err(ApiError::invalid("token", format!("token id {} exists with another secret or role", p.id))),
            };
        }
        if get(format!("{REVOKED}{}", p.id)).await?.is_some() {
            return Ok(Ensured::Revoked);
        }
        let record = TokenRecord {
            grant: Grant { id: p.id.clone(), secret_sha256: p.secret_sha256, role, repos: vec![], expires_at: None },
            created_at: now(),
            description: description.to_owned(),
        };
        match self.store.create(&store_key(&p.id), encode(&record)).await {
            Ok(_) => Ok(Ensured::Created),
            // Another replica created it at the same moment.
            Err(crate::store::StoreError::AlreadyExists { .. }) => Ok(Ensured::Present),
            Err(e) => Err(ApiError::from_store(e, &p.id, None)),
        }
    }
}

/// What [`Tokens::ensure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Present,
    Created,
    /// Revoked earlier: it stays so.
    Revoked,
}

/// A new token's text, for files written at start-up (bootstrap, dev).
pub fn new_token_text() -> String {
    let (id, secret) = generate();
    format_token(&id, &secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(spec: TokenSpec) -> String {
        match validate(&spec) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let spec = |role: &str| TokenSpec { role: role.into(), ..Default::default() };
        assert_eq!(field(spec("root")), "role");
        assert_eq!(field(TokenSpec { repos: vec!["ghcr".into()], ..spec("admin") }), "repos");
        assert_eq!(field(TokenSpec { repos: vec!["GHCR".into()], ..spec("puller") }), "repos");
        assert_eq!(field(TokenSpec { expires_in: Some(Duration::from_secs(1)), ..spec("reader") }), "expires_in");
        assert_eq!(field(TokenSpec { description: "a\nb".into(), ..spec("reader") }), "description");
        assert!(validate(&TokenSpec { repos: vec!["ghcr/acme/*".into()], ..spec("puller") }).is_ok());
    }

    #[test]
    fn stored_form_keeps_no_secret() {
        let text = new_token_text();
        let p = Presented::parse(&text).unwrap();
        let r = TokenRecord {
            grant: Grant {
                id: p.id.clone(),
                secret_sha256: p.secret_sha256,
                role: Role::Puller,
                repos: vec!["ghcr".parse().unwrap()],
                expires_at: Some(from_millis(5_000)),
            },
            created_at: from_millis(1_000),
            description: "ci".into(),
        };
        let value = encode(&r);
        let secret = text.rsplit('_').next().unwrap();
        assert!(!String::from_utf8_lossy(&value).contains(secret));
        let kv = KeyValue { key: store_key(&p.id), value, create_revision: 1, mod_revision: 1, lease: None };
        assert_eq!(decode(&kv).unwrap(), r);
    }
}
