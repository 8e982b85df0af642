//! Content digests (`sha256:<64 hex>`): the only algorithm Wharf caches.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A content digest. Only `sha256` is accepted: every registry Wharf pulls from uses it, and a
/// digest Wharf cannot verify must never be served from the cache.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// `sha256:` and the hex: written out as it is (headers, paths, logs) without formatting.
    text: String,
}

const PREFIX: &str = "sha256:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest must look like sha256:<64 lowercase hex>")]
    Malformed,
    #[error("unsupported digest algorithm {0:?}: only sha256 is supported")]
    UnsupportedAlgorithm(String),
}

impl Digest {
    /// The 64 lowercase hex characters.
    pub fn hex(&self) -> &str {
        &self.text[PREFIX.len()..]
    }

    /// `sha256:<hex>`, as [`fmt::Display`] writes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn from_hex(hex: &str) -> Self {
        let mut text = String::with_capacity(PREFIX.len() + hex.len());
        text.push_str(PREFIX);
        text.push_str(hex);
        Self { text }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = DigestHasher::new();
        h.update(bytes);
        h.finish()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        // Grammar from the OCI image spec: algorithm-component ([a-z0-9]+) joined by [+._-].
        let alg_ok = !alg.is_empty()
            && alg.len() <= 32
            && alg
                .split(['+', '.', '_', '-'])
                .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        if !alg_ok {
            return Err(DigestError::Malformed);
        }
        if alg != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(alg.to_owned()));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError::Malformed);
        }
        Ok(Self::from_hex(hex))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Incremental sha256, for hashing a body while it streams.
#[derive(Default, Clone)]
pub struct DigestHasher(Sha256);

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> Digest {
        Digest::from_hex(&hex::encode(self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(s, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(s.parse::<Digest>(), Ok(d.clone()));
        assert_eq!((d.as_str(), d.hex()), (s.as_str(), &s["sha256:".len()..]));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:../../../../etc/passwd00000000000000000000000000000000000000000",
            "SHA256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ":2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(DigestError::Malformed), "{bad}");
        }
        assert_eq!("sha512:abcd".parse::<Digest>(), Err(DigestError::UnsupportedAlgorithm("sha512".into())));
    }
}
