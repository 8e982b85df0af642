//! What a client presented in `Authorization`: parsed once, never printed, fingerprinted by SHA-256
//! so that upstream tokens and authorization decisions are kept per client without keeping the
//! credentials themselves.

use std::fmt;

use base64::Engine as _;
use http::{HeaderMap, header};
use wharf_core::{Digest, DigestHasher, Presented, Secret};

use crate::error::RegistryError;

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
        let bad = |why: &str| RegistryError::unauthorized(format!("the Authorization header is not usable: {why}"));
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
    pub fn wharf_token(&self) -> Option<Presented> {
        match self {
            ClientCredentials::Basic { password, .. } => Presented::parse(password.expose()),
            ClientCredentials::Bearer(t) => Presented::parse(t.expose()),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, StatusCode};

    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        h
    }

    fn basic(user: &str, password: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
    }

    #[test]
    fn client_credentials_parse_and_never_print() {
        assert_eq!(ClientCredentials::from_headers(&HeaderMap::new()).unwrap(), None);
        let b = ClientCredentials::from_headers(&headers(&basic("alice", "pw:with:colons"))).unwrap().unwrap();
        match &b {
            ClientCredentials::Basic { username, password } => {
                assert_eq!((username.as_str(), password.expose()), ("alice", "pw:with:colons"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{b:?}").contains("pw"));
        let t = ClientCredentials::from_headers(&headers("bearer abc.def")).unwrap().unwrap();
        assert_eq!(t, ClientCredentials::Bearer(Secret::new("abc.def")));
        assert!(!format!("{t:?}").contains("abc"));
        for bad in ["Basic !!!", "Basic bm9jb2xvbg==", "Negotiate xyz", "Bearer"] {
            let e = ClientCredentials::from_headers(&headers(bad)).unwrap_err();
            assert_eq!(
                (e.status, e.code, e.challenge),
                (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", Some(crate::error::Challenge::Credentials)),
                "{bad}"
            );
        }
    }

    #[test]
    fn fingerprints_separate_clients() {
        let c = |u: &str, p: &str| ClientCredentials::Basic { username: u.into(), password: Secret::new(p) };
        assert_eq!(c("a", "b").fingerprint(), c("a", "b").fingerprint());
        assert_ne!(c("a", "b").fingerprint(), c("a", "c").fingerprint());
        // The user/password boundary counts: "ab" + "c" is not "a" + "bc".
        assert_ne!(c("ab", "c").fingerprint(), c("a", "bc").fingerprint());
        assert_ne!(c("a", "b").fingerprint(), ClientCredentials::Bearer(Secret::new("b")).fingerprint());
    }
}
