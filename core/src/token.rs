//! Wharf's own tokens. A token reads `wharf_<id>_<secret>`: the id is public (listed, revoked by),
//! the secret is shown once; the store and the nodes keep only SHA-256 of the secret.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every management call.
    Admin,
    /// Management reads.
    Reader,
    /// Pulls from nodes, for repos matching its patterns.
    Puller,
    /// A data-plane node's config stream.
    Node,
}

impl Role {
    pub fn may_read(self) -> bool {
        matches!(self, Role::Admin | Role::Reader)
    }
    pub fn may_write(self) -> bool {
        self == Role::Admin
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
            Role::Puller => "puller",
            Role::Node => "node",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown role {0:?}: expected admin, reader, puller or node")]
    Role(String),
    #[error("repo pattern {0:?} is invalid: use [a-z0-9._/-] and * (any run of characters), at most 255")]
    Pattern(String),
}

impl FromStr for Role {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "admin" => Role::Admin,
            "reader" => Role::Reader,
            "puller" => Role::Puller,
            "node" => Role::Node,
            other => return Err(TokenError::Role(other.chars().take(40).collect())),
        })
    }
}

/// A pattern over `<repoKey>/<name>`: `*` matches any run of characters (slashes included); a
/// pattern also matches everything below it (`ghcr/acme` matches `ghcr/acme/app`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPattern(String);

impl RepoPattern {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a pull of `name` through repo `key` falls under this pattern.
    pub fn matches(&self, key: &str, name: &str) -> bool {
        let path = format!("{key}/{name}");
        glob(self.0.as_bytes(), path.as_bytes())
            || path.strip_prefix(self.0.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// `*`-only glob, iterative with one backtrack point (linear in practice, no recursion).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

impl FromStr for RepoPattern {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-*".contains(&b);
        if !s.is_empty() && s.len() <= 255 && s.bytes().all(ok) {
            Ok(Self(s.to_owned()))
        } else {
            Err(TokenError::Pattern(s.chars().take(80).collect()))
        }
    }
}

impl TryFrom<String> for RepoPattern {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RepoPattern> for String {
    fn from(p: RepoPattern) -> String {
        p.0
    }
}

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const PREFIX: &str = "wharf_";

/// A token as presented by a client: its id and the hash of its secret (the secret itself is not
/// kept). `None` when the string is not shaped like a Wharf token.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented {
    pub id: String,
    pub secret_sha256: [u8; 32],
}

/// Whether `id` is shaped like a token id: 16 lowercase hexadecimal digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Presented {
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.trim().strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        if !valid_id(id) || secret.len() < 32 || secret.len() > 128 {
            return None;
        }
        Some(Self { id: id.to_owned(), secret_sha256: hash_secret(secret) })
    }
}

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Presented({})", self.id)
    }
}

/// SHA-256 of a token's secret part: what the store and nodes keep.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The text of a token from its parts.
pub fn format_token(id: &str, secret: &str) -> String {
    format!("{PREFIX}{id}_{secret}")
}

/// What a token grants, as stored (hash only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub secret_sha256: [u8; 32],
    pub role: Role,
    /// Puller tokens: the repos it may pull (empty: all).
    pub repos: Vec<RepoPattern>,
    pub expires_at: Option<SystemTime>,
}

impl Grant {
    /// Whether `p` is this token, still valid at `now`. The hash comparison takes the same time
    /// wherever the bytes differ.
    pub fn accepts(&self, p: &Presented, now: SystemTime) -> bool {
        let same = self.secret_sha256.iter().zip(&p.secret_sha256).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        same && self.id == p.id && self.expires_at.is_none_or(|e| now < e)
    }

    /// Whether this token may pull `name` through repo `key`.
    pub fn may_pull(&self, key: &str, name: &str) -> bool {
        self.role == Role::Puller && (self.repos.is_empty() || self.repos.iter().any(|p| p.matches(key, name)))
    }
}

/// A key the nodes of a cluster seal their registry tokens with (`/v2/token`). The control plane
/// makes them and streams them in the snapshot, so every node accepts every other node's tokens;
/// a standalone node makes its own. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// Public: named in each token it sealed (16 hexadecimal digits).
    pub id: String,
    pub secret: [u8; 32],
    pub created_at: SystemTime,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pat(s: &str) -> RepoPattern {
        s.parse().unwrap()
    }

    #[test]
    fn patterns() {
        assert!(pat("dockerhub").matches("dockerhub", "library/alpine"));
        assert!(!pat("dockerhub").matches("dockerhubx", "library/alpine"));
        assert!(pat("ghcr/acme/*").matches("ghcr", "acme/app"));
        assert!(!pat("ghcr/acme/*").matches("ghcr", "other/app"));
        assert!(pat("ghcr/acme").matches("ghcr", "acme/app"));
        assert!(!pat("ghcr/acme").matches("ghcr", "acme-evil/app"));
        assert!(pat("*/team-*/app").matches("quay", "team-a/app"));
        assert!(pat("*").matches("x", "y"));
        for bad in ["", "UPPER", "a b", "a?b", &"a".repeat(256)] {
            assert!(bad.parse::<RepoPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn presented_tokens() {
        let secret = "s".repeat(43);
        let t = format_token("0123456789abcdef", &secret);
        let p = Presented::parse(&t).unwrap();
        assert_eq!(p.id, "0123456789abcdef");
        assert!(!format!("{p:?}").contains(&secret));
        for bad in ["", "wharf_", "wharf_0123_xx", "ghp_abc", &format_token("0123456789ABCDEF", &secret)] {
            assert!(Presented::parse(bad).is_none(), "{bad}");
        }
        let now = SystemTime::now();
        let g = Grant {
            id: p.id.clone(),
            secret_sha256: hash_secret(&secret),
            role: Role::Puller,
            repos: vec![pat("ghcr/acme")],
            expires_at: Some(now + Duration::from_secs(60)),
        };
        assert!(g.accepts(&p, now));
        assert!(!g.accepts(&p, now + Duration::from_secs(61)));
        assert!(!g.accepts(&Presented::parse(&format_token("0123456789abcdef", &"t".repeat(43))).unwrap(), now));
        assert!(g.may_pull("ghcr", "acme/app"));
        assert!(!g.may_pull("ghcr", "other/app"));
        assert!(!Grant { role: Role::Reader, ..g }.may_pull("ghcr", "acme/app"));
    }
}
