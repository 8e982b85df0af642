//! The node's own registry tokens, issued at `/v2/token` and presented as `Authorization: Bearer
//! wharf.<key id>.<sealed claims>`.
//!
//! A token is its claims (who, until when, which `(repoKey, name)` pairs it may pull, and for
//! passthrough repos the client's upstream credentials) sealed with AES-256-GCM under a key of the
//! cluster's set: sealing both signs (a forged or altered token does not open) and hides the
//! credentials it carries. Every node holding the set opens every other node's tokens, so a load
//! balancer may send the next request anywhere. A node without a set (standalone, or before its
//! first snapshot) seals with its own key, made once and kept 0600 in the cache dir.
//!
//! Nothing here decides who may pull what: that is [`crate::authz`] and the token endpoint.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use wharf_core::{Secret, SigningKey};

use crate::credentials::ClientCredentials;
use crate::private_file;

/// What every node token starts with (puller tokens start `wharf_`).
pub const PREFIX: &str = "wharf.";

/// Longer than any token this node issues (16 scopes of long names): refused before any work.
const MAX_LEN: usize = 16 * 1024;

/// A cluster key younger than this is not sealed with yet: the other nodes may not hold it.
const KEY_SETTLE: Duration = Duration::from_secs(60);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What a token says. Its `Debug` never shows the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    /// The node that issued it (its token service name).
    pub issuer: String,
    /// The puller token it was issued for (its public id), if any: a revoked puller token voids
    /// every token issued for it at once.
    pub puller: Option<String>,
    pub issued_at: u64,
    /// Unix seconds; the token is refused from then on.
    pub expires_at: u64,
    /// `(repoKey, upstream name)` pairs it may pull.
    pub access: Vec<(String, String)>,
    /// Passthrough repos: the client's upstream credentials, for no longer than the token lives.
    pub credentials: Option<ClientCredentials>,
    /// A node's token for another node's peer endpoint: the node it is for. Such a token opens
    /// no pull of a client ([`crate::authz`] refuses it there) and only it opens the peer endpoint.
    pub peer: Option<String>,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("issuer", &self.issuer)
            .field("puller", &self.puller)
            .field("expires_at", &self.expires_at)
            .field("access", &self.access)
            .field("credentials", &self.credentials.as_ref().map(|_| "<sealed>"))
            .field("peer", &self.peer)
            .finish()
    }
}

impl Claims {
    pub fn allows(&self, key: &str, name: &str) -> bool {
        self.access.iter().any(|(k, n)| k == key && n == name)
    }
}

/// The sealed form (short field names: the token travels on every request).
#[derive(Serialize, Deserialize)]
struct Wire {
    iss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    iat: u64,
    exp: u64,
    #[serde(default)]
    acc: Vec<(String, String)>,
    /// Basic: `[user, password]`; Bearer: `[token]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cred: Option<Vec<String>>,
    /// The node a peer token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
}

/// Why a presented token was refused (no part of the token is quoted but its key id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the token is not one this node issued (malformed)")]
    Malformed,
    #[error("the token was sealed with key {0}, which this node does not hold (another cluster's, or rotated out)")]
    UnknownKey(String),
    #[error("the token does not open with key {0}: forged or altered")]
    Forged(String),
    #[error("the token expired; ask /v2/token for a new one")]
    Expired,
}

/// The node's token service: its name, its own key, how long tokens live, and where clients get
/// them; and the tokens it opened lately, so that a client's next requests with the same token
/// cost a map lookup, not a decryption.
#[derive(Debug)]
pub struct NodeTokens {
    /// `service` in challenges and the issuer of tokens: the node id (managed) or `wharf`.
    pub service: String,
    local: SigningKey,
    pub ttl: Duration,
    /// `--token-realm`: the token endpoint's URL as clients reach it (behind a load balancer);
    /// `None`: built from each request's `Host` and the listener's scheme.
    pub realm: Option<String>,
    /// Whether the registry port speaks TLS (the realm's scheme).
    pub https: bool,
    /// Opened tokens by their text (bounded: emptied when full). An entry is only a cache of
    /// [`NodeTokens::open`]'s work: expiry is checked on every use, and a key that leaves the
    /// cluster's set voids its entries (the key id is checked again).
    opened: Mutex<HashMap<Box<str>, Arc<Claims>>>,
}

/// More tokens than a node's clients hold at once within a token's lifetime.
const OPENED_MAX: usize = 10_000;

impl NodeTokens {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

    pub fn new(service: impl Into<String>, local: SigningKey) -> Self {
        Self {
            service: service.into(),
            local,
            ttl: Self::DEFAULT_TTL,
            realm: None,
            https: false,
            opened: Mutex::default(),
        }
    }

    /// A service with a fresh random key (tests, and nodes whose cache dir is not theirs to write).
    pub fn ephemeral(service: impl Into<String>) -> Self {
        Self::new(service, generate_key(SystemTime::now()))
    }

    /// Seals `claims` with the key other nodes most likely hold: the newest cluster key older than
    /// a minute (else the oldest), or without a cluster set the node's own.
    pub fn seal(&self, cluster: &[SigningKey], claims: &Claims, now: SystemTime) -> String {
        let key = signing_key(cluster, now).unwrap_or(&self.local);
        let wire = Wire {
            iss: claims.issuer.clone(),
            sub: claims.puller.clone(),
            iat: claims.issued_at,
            exp: claims.expires_at,
            acc: claims.access.clone(),
            cred: claims.credentials.as_ref().map(|c| match c {
                ClientCredentials::Basic { username, password } => vec![username.clone(), password.expose().to_owned()],
                ClientCredentials::Bearer(t) => vec![t.expose().to_owned()],
            }),
            peer: claims.peer.clone(),
        };
        let mut buf = serde_json::to_vec(&wire).expect("claims serialize");
        let sealing = RandomizedNonceKey::new(&AES_256_GCM, &key.secret).expect("a 32-byte key");
        let nonce = sealing.seal_in_place_append_tag(aad(&key.id), &mut buf).expect("AES-GCM seals");
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        format!("{PREFIX}{}.{}", key.id, B64.encode(out))
    }

    /// Opens a presented token with the cluster's keys or the node's own; refuses it when it does
    /// not open or has expired at `now`.
    pub fn open(&self, cluster: &[SigningKey], token: &str, now: SystemTime) -> Result<Arc<Claims>, Rejected> {
        if token.len() > MAX_LEN {
            return Err(Rejected::Malformed);
        }
        let (kid, sealed) = token.strip_prefix(PREFIX).and_then(|t| t.split_once('.')).ok_or(Rejected::Malformed)?;
        let key = cluster
            .iter()
            .chain(std::iter::once(&self.local))
            .find(|k| k.id == kid)
            .ok_or_else(|| Rejected::UnknownKey(kid.chars().take(16).collect()))?;
        let cached = self.opened().get(token).cloned();
        let claims = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(open_with(key, sealed)?);
                let mut opened = self.opened();
                if opened.len() >= OPENED_MAX {
                    opened.clear();
                }
                opened.insert(token.into(), c.clone());
                c
            }
        };
        if unix(now) >= claims.expires_at {
            return Err(Rejected::Expired);
        }
        Ok(claims)
    }

    fn opened(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<Claims>>> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens `sealed` (base64url of nonce, ciphertext and tag) with `key`.
fn open_with(key: &SigningKey, sealed: &str) -> Result<Claims, Rejected> {
    let mut raw = B64.decode(sealed).map_err(|_| Rejected::Malformed)?;
    if raw.len() < NONCE_LEN {
        return Err(Rejected::Malformed);
    }
    let nonce = Nonce::try_assume_unique_for_key(&raw[..NONCE_LEN]).map_err(|_| Rejected::Malformed)?;
    let opening = RandomizedNonceKey::new(&AES_256_GCM, &key.secret).map_err(|_| Rejected::Malformed)?;
    let plain = opening
        .open_in_place(nonce, aad(&key.id), &mut raw[NONCE_LEN..])
        .map_err(|_| Rejected::Forged(key.id.clone()))?;
    let wire: Wire = serde_json::from_slice(plain).map_err(|_| Rejected::Malformed)?;
    let credentials = match wire.cred.as_deref() {
        None => None,
        Some([user, password]) => {
            Some(ClientCredentials::Basic { username: user.clone(), password: Secret::new(password.as_str()) })
        }
        Some([token]) => Some(ClientCredentials::Bearer(Secret::new(token.as_str()))),
        Some(_) => return Err(Rejected::Malformed),
    };
    Ok(Claims {
        issuer: wire.iss,
        puller: wire.sub,
        issued_at: wire.iat,
        expires_at: wire.exp,
        access: wire.acc,
        credentials,
        peer: wire.peer,
    })
}

/// Binds a sealed token to its key id and to this use.
fn aad(kid: &str) -> Aad<Vec<u8>> {
    let mut a = b"wharf-node-token-v1\0".to_vec();
    a.extend_from_slice(kid.as_bytes());
    Aad::from(a)
}

fn signing_key(cluster: &[SigningKey], now: SystemTime) -> Option<&SigningKey> {
    let settled = |k: &&SigningKey| now.duration_since(k.created_at).is_ok_and(|age| age >= KEY_SETTLE);
    cluster.iter().filter(settled).max_by_key(|k| k.created_at).or_else(|| cluster.iter().min_by_key(|k| k.created_at))
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A new random key.
pub fn generate_key(now: SystemTime) -> SigningKey {
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    aws_lc_rs::rand::fill(&mut secret).expect("the system's random source");
    aws_lc_rs::rand::fill(&mut id).expect("the system's random source");
    SigningKey { id: hex::encode(id), secret, created_at: now }
}

/// The node's own key in `<dir>/token.key` (`<id> <hex secret>`, mode 0600), made on first use.
pub fn load_or_create_key(dir: &Path) -> std::io::Result<SigningKey> {
    let path = dir.join("token.key");
    let bad = |why: &str| std::io::Error::other(format!("{}: {why}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "token key readable by others; setting it to 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            let (id, secret) = text.trim().split_once(' ').ok_or_else(|| bad("expected '<id> <hex secret>'"))?;
            let secret: [u8; 32] = hex::decode(secret)
                .ok()
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad("the secret is not 64 hexadecimal digits"))?;
            if !wharf_core::token::valid_id(id) {
                return Err(bad("the id is not 16 hexadecimal digits"));
            }
            let created_at = std::fs::metadata(&path)?.modified().unwrap_or(UNIX_EPOCH);
            Ok(SigningKey { id: id.to_owned(), secret, created_at })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key(SystemTime::now());
            private_file::write(&path, format!("{} {}\n", key.id, hex::encode(key.secret)).as_bytes())?;
            tracing::info!(path = %path.display(), key_id = %key.id, "token key created");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            issuer: "n1".into(),
            puller: Some("0123456789abcdef".into()),
            issued_at: 1,
            expires_at: exp,
            access: vec![("hub".into(), "library/alpine".into())],
            credentials: Some(ClientCredentials::Basic { username: "alice".into(), password: Secret::new("pw") }),
            peer: None,
        }
    }

    #[test]
    fn tokens_open_only_with_their_key_and_before_they_expire() {
        let now = SystemTime::now();
        let exp = unix(now) + 60;
        let a = NodeTokens::ephemeral("a");
        let b = NodeTokens::ephemeral("b");
        let t = a.seal(&[], &claims(exp), now);
        assert!(t.starts_with(PREFIX));
        assert!(!t.contains("alice") && !t.contains("pw\""), "credentials are sealed, not encoded: {t}");
        let opened = a.open(&[], &t, now).unwrap();
        assert_eq!(*opened, claims(exp));
        assert!(!format!("{opened:?}").contains("pw"));
        assert!(opened.allows("hub", "library/alpine") && !opened.allows("hub", "library/busybox"));

        // Another node's own key: unknown. The same cluster set: both open it.
        assert!(matches!(b.open(&[], &t, now), Err(Rejected::UnknownKey(_))));
        let old = now - Duration::from_secs(120);
        let cluster = [generate_key(old), generate_key(now)];
        let t2 = a.seal(&cluster, &claims(exp), now);
        assert!(t2.starts_with(&format!("{PREFIX}{}.", cluster[0].id)), "the settled key seals, not the newest");
        assert_eq!(*b.open(&cluster, &t2, now).unwrap(), claims(exp));

        assert_eq!(a.open(&[], &t, now + Duration::from_secs(60)), Err(Rejected::Expired));
        // One bit changed anywhere in the sealed part: it does not open.
        let (head, body) = t.rsplit_once('.').unwrap();
        let mut raw = B64.decode(body).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let forged = format!("{head}.{}", B64.encode(&raw));
        assert!(matches!(a.open(&[], &forged, now), Err(Rejected::Forged(_))));
        // The same sealed part under another key id: the AAD binds it.
        let moved = format!("{PREFIX}{}.{body}", cluster[1].id);
        assert!(matches!(a.open(&cluster, &moved, now), Err(Rejected::Forged(_))));
        for bad in ["", "wharf.", "wharf.x", "wharf_0123", "wharf.abc.!!!", "wharf.abc.AAAA", &"x".repeat(MAX_LEN + 1)]
        {
            assert!(a.open(&[], bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_file_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("token.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_key(dir.path()).unwrap();
        assert_eq!((k1.id.clone(), k1.secret), (k2.id.clone(), k2.secret));
        assert!(!format!("{k1:?}").contains(&hex::encode(k1.secret)));
        std::fs::write(dir.path().join("token.key"), "nonsense").unwrap();
        assert!(load_or_create_key(dir.path()).is_err());
    }
}
