//! A repo: one repoKey mapped to one upstream registry.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[a-z0-9]+(?:[._-][a-z0-9]+)*`, at most 64 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RepoKey(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RepoError {
    #[error("repoKey {0:?} is invalid: it must match [a-z0-9]+([._-][a-z0-9]+)* and be at most 64 characters")]
    Key(String),
    #[error("unknown repo kind {0:?}: expected one of dockerhub, ghcr, quay, ecr, gcr, acr, generic")]
    Kind(String),
    #[error("repo {key}: upstream {upstream:?} is invalid: {why}")]
    Upstream { key: String, upstream: String, why: String },
    #[error("repo {key}: kind {kind} has no default upstream; set `upstream`")]
    NoUpstream { key: String, kind: RepoKind },
    #[error("repo {key}: tag TTL {ttl:?} is out of range (0s to 30d)")]
    TagTtl { key: String, ttl: Duration },
    #[error("repo {key}: cache TTL {ttl:?} is out of range (1s to 3650d)")]
    CacheTtl { key: String, ttl: Duration },
    #[error("unknown auth mode {0:?}: expected static or passthrough")]
    AuthMode(String),
    #[error("unknown access {0:?}: expected public or token")]
    Access(String),
    #[error("unknown credential provider {0:?}: expected aws, azure, gcp or oauth2")]
    CredentialProvider(String),
    #[error("repo {key}: {why}")]
    Policy { key: String, field: &'static str, why: &'static str },
    #[error("repo {key}: the CA bundle is not usable: {why}")]
    CaBundle { key: String, why: &'static str },
    #[error("repo {key}: mirror_of {host:?} is not a registry host: {why}")]
    MirrorOf { key: String, host: String, why: &'static str },
}

impl RepoKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepoKey {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let alnum = |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if s.len() <= 64 && s.split(['.', '_', '-']).all(alnum) {
            Ok(Self(s.to_owned()))
        } else {
            Err(RepoError::Key(s.chars().take(80).collect()))
        }
    }
}

impl<'de> Deserialize<'de> for RepoKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Which registry dialect the upstream speaks: decides defaults and naming rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RepoKind {
    Dockerhub,
    Ghcr,
    Quay,
    Ecr,
    Gcr,
    Acr,
    #[default]
    Generic,
}

impl RepoKind {
    /// The upstream used when a repo does not name one.
    pub fn default_upstream(self) -> Option<&'static str> {
        match self {
            RepoKind::Dockerhub => Some("https://registry-1.docker.io"),
            RepoKind::Ghcr => Some("https://ghcr.io"),
            RepoKind::Quay => Some("https://quay.io"),
            RepoKind::Gcr => Some("https://gcr.io"),
            RepoKind::Ecr | RepoKind::Acr | RepoKind::Generic => None,
        }
    }

    /// The registry hosts a repo of this kind mirrors unless it says otherwise: what containerd
    /// sends as `?ns=` and image references start with.
    pub fn mirror_hosts(self) -> &'static [&'static str] {
        match self {
            RepoKind::Dockerhub => &["docker.io", "index.docker.io", "registry-1.docker.io"],
            RepoKind::Ghcr => &["ghcr.io"],
            RepoKind::Quay => &["quay.io"],
            RepoKind::Gcr => &["gcr.io", "us.gcr.io", "eu.gcr.io", "asia.gcr.io"],
            RepoKind::Ecr | RepoKind::Acr | RepoKind::Generic => &[],
        }
    }

    /// Docker Hub puts single-segment names under `library/`.
    pub fn implicit_library(self) -> bool {
        self == RepoKind::Dockerhub
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Dockerhub => "dockerhub",
            RepoKind::Ghcr => "ghcr",
            RepoKind::Quay => "quay",
            RepoKind::Ecr => "ecr",
            RepoKind::Gcr => "gcr",
            RepoKind::Acr => "acr",
            RepoKind::Generic => "generic",
        })
    }
}

impl FromStr for RepoKind {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "dockerhub" => RepoKind::Dockerhub,
            "ghcr" => RepoKind::Ghcr,
            "quay" => RepoKind::Quay,
            "ecr" => RepoKind::Ecr,
            "gcr" => RepoKind::Gcr,
            "acr" => RepoKind::Acr,
            "generic" => RepoKind::Generic,
            other => return Err(RepoError::Kind(other.chars().take(40).collect())),
        })
    }
}

/// Whose credentials Wharf presents to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The repo's static credentials, or none (anonymous).
    #[default]
    Static,
    /// Each client's own credentials; cached content reaches a client only once the upstream
    /// accepted its credentials for that repository.
    Passthrough,
}

/// Who may pull through a repo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Anyone who reaches the node.
    #[default]
    Public,
    /// Holders of a `puller` token whose repo patterns match.
    Token,
}

macro_rules! word_enum {
    ($ty:ty, $err:ident, $($variant:ident => $word:literal),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$variant => $word),+ })
            }
        }
        impl FromStr for $ty {
            type Err = RepoError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok(Self::$variant),)+
                    other => Err(RepoError::$err(other.chars().take(40).collect())),
                }
            }
        }
    };
}
word_enum!(AuthMode, AuthMode, Static => "static", Passthrough => "passthrough");
word_enum!(Access, Access, Public => "public", Token => "token");
word_enum!(CredentialProvider, CredentialProvider, Aws => "aws", Azure => "azure", Gcp => "gcp", Oauth2 => "oauth2");

/// Where a repo's upstream credentials come from instead of a static password: the node's own
/// cloud identity, exchanged for short-lived tokens that the node refreshes before they expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialProvider {
    /// The AWS credential chain (environment, shared file, web identity, container endpoint,
    /// IMDSv2), exchanged for an ECR authorization token, presented as Basic `AWS:<password>`.
    Aws,
    /// An Entra token of the node's identity (service principal, workload identity, managed
    /// identity) exchanged for an ACR refresh token.
    Azure,
    /// Google Application Default Credentials (a service-account key file, or the metadata
    /// server on GCE/GKE): an access token presented as `oauth2accesstoken` (GCR, Artifact
    /// Registry). `credential_file` names a credentials file instead of
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    Gcp,
    /// A generic OAuth2 server: the client-credentials grant, or an RFC 7523 JWT-bearer assertion
    /// read from a file, as the settings file on the node that `credential_file` names says; the
    /// access token presented as a password.
    Oauth2,
}

/// How the node's TLS client trusts this repo's upstream (beyond the system roots).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// Extra CA certificates (PEM) trusted for this upstream.
    pub ca_bundle: Option<String>,
    /// Tests only: accept any certificate (logged as a warning by the node).
    pub insecure_skip_verify: bool,
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Static credentials Wharf uses towards one upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// One repoKey and the upstream it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    pub key: RepoKey,
    pub kind: RepoKind,
    /// Scheme, host and optional port, no trailing slash (`https://ghcr.io`).
    pub upstream: String,
    /// How long a tag's digest is trusted before it is revalidated upstream.
    pub tag_ttl: Duration,
    pub credentials: Option<Credentials>,
    /// Cached content of this repo not accessed for this long is evicted (overrides the node's
    /// `--cache-ttl`; content shared by several repos stays as long as the longest asks).
    pub cache_ttl: Option<Duration>,
    pub auth: AuthMode,
    pub access: Access,
    pub tls: UpstreamTls,
    /// The registry hosts (`docker.io`, `registry.corp.example:5000`) whose images this repo serves
    /// to clients that use the node as a mirror; empty: the kind's hosts and the upstream's own.
    pub mirror_of: Vec<String>,
    /// Credentials from the node's cloud identity instead of `credentials`.
    pub credential_provider: Option<CredentialProvider>,
    /// A file on each node the provider reads (`gcp`: a Google credentials file; `oauth2`: its
    /// settings): an absolute path, never the secret itself.
    pub credential_file: Option<String>,
}

/// Whether `s` is a registry host as image references and containerd's `?ns=` name it:
/// lowercase DNS labels (or an IPv4 address), an optional `:port`. The reason when it is not.
pub fn registry_host_error(s: &str) -> Option<&'static str> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if s.is_empty() || s.len() > 253 {
        return Some("it must be 1 to 253 characters");
    }
    if let Some(p) = port
        && !(p.parse::<u16>().is_ok_and(|p| p > 0) && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("its port must be a number from 1 to 65535");
    }
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.split('.').all(label) {
        return Some("it must be lowercase DNS labels (a-z, 0-9, '-') separated by dots, with an optional :port");
    }
    None
}

impl Repo {
    pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
    pub const MAX_TAG_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
    pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);

    /// Sets the repo's cache TTL override (`None`: the node's).
    pub fn with_cache_ttl(mut self, ttl: Option<Duration>) -> Result<Self, RepoError> {
        if let Some(t) = ttl
            && (t < Duration::from_secs(1) || t > Self::MAX_CACHE_TTL)
        {
            return Err(RepoError::CacheTtl { key: self.key.to_string(), ttl: t });
        }
        self.cache_ttl = ttl;
        Ok(self)
    }

    /// Sets whose credentials go upstream and who may pull. Passthrough forwards each client's own
    /// credentials, so it takes no static ones and no Wharf token (both travel in `Authorization`).
    pub fn with_access(mut self, auth: AuthMode, access: Access) -> Result<Self, RepoError> {
        let policy = |field, why| Err(RepoError::Policy { key: self.key.to_string(), field, why });
        if auth == AuthMode::Passthrough && self.credentials.is_some() {
            return policy(
                "auth",
                "passthrough forwards each client's credentials: remove the static username/password",
            );
        }
        if auth == AuthMode::Passthrough && access == Access::Token {
            return policy("access", "a passthrough repo is authorized by the upstream: its access must be public");
        }
        self.auth = auth;
        self.access = access;
        Ok(self)
    }

    /// Sets how the upstream's certificate is checked.
    pub fn with_upstream_tls(mut self, tls: UpstreamTls) -> Result<Self, RepoError> {
        if let Some(pem) = &tls.ca_bundle {
            let why = if pem.len() > 1024 * 1024 {
                Some("larger than 1 MiB")
            } else if !pem.contains("-----BEGIN CERTIFICATE-----") {
                Some("no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(RepoError::CaBundle { key: self.key.to_string(), why });
            }
        }
        self.tls = tls;
        Ok(self)
    }

    /// Sets where the credentials come from, and the file on the node the provider reads: a
    /// provider supplies them, so it takes no static ones, and presents the node's identity, so
    /// not a passthrough repo's clients' (call after [`Repo::with_access`]).
    pub fn with_credential_provider(
        mut self,
        provider: Option<CredentialProvider>,
        file: Option<String>,
    ) -> Result<Self, RepoError> {
        let key = self.key.to_string();
        let policy = |field, why| Err(RepoError::Policy { key: key.clone(), field, why });
        let file = file.filter(|f| !f.is_empty());
        if provider.is_some() && self.credentials.is_some() {
            return policy(
                "credential_provider",
                "a credential provider supplies the credentials: remove the static username/password",
            );
        }
        if provider.is_some() && self.auth == AuthMode::Passthrough {
            return policy(
                "credential_provider",
                "a passthrough repo presents each client's own credentials, not a provider's",
            );
        }
        match (provider, &file) {
            (None, Some(_)) => {
                return policy(
                    "credential_file",
                    "a credential file is read by a credential provider: set credential_provider",
                );
            }
            (Some(CredentialProvider::Oauth2), None) => {
                return policy(
                    "credential_file",
                    "the oauth2 provider reads its token endpoint and client from a settings file on the node: set credential_file",
                );
            }
            (Some(CredentialProvider::Aws | CredentialProvider::Azure), Some(_)) => {
                return policy(
                    "credential_file",
                    "aws and azure find the node's identity in its environment; credential_file is for gcp and oauth2",
                );
            }
            _ => {}
        }
        if let Some(f) = &file
            && (!f.starts_with('/') || f.len() > 4096 || f.chars().any(char::is_control))
        {
            return policy(
                "credential_file",
                "a credential file is an absolute path on the node (at most 4096 characters)",
            );
        }
        self.credential_provider = provider;
        self.credential_file = file;
        Ok(self)
    }

    /// Sets the registry hosts this repo mirrors (empty: the kind's and the upstream's).
    pub fn with_mirror_of(mut self, hosts: Vec<String>) -> Result<Self, RepoError> {
        if hosts.len() > 32 {
            return Err(RepoError::MirrorOf {
                key: self.key.to_string(),
                host: format!("{} hosts", hosts.len()),
                why: "at most 32 hosts",
            });
        }
        for h in &hosts {
            if let Some(why) = registry_host_error(h) {
                return Err(RepoError::MirrorOf { key: self.key.to_string(), host: h.chars().take(80).collect(), why });
            }
        }
        self.mirror_of = hosts;
        Ok(self)
    }

    /// Whether this repo mirrors the registry `host`: `Some(true)` when its `mirror_of` names it,
    /// `Some(false)` when only its defaults do (the kind's hosts, the upstream's host), `None` when
    /// it does not.
    pub fn mirrors(&self, host: &str) -> Option<bool> {
        if !self.mirror_of.is_empty() {
            return self.mirror_of.iter().any(|h| h == host).then_some(true);
        }
        let upstream_host = self.upstream.split_once("://").map_or(self.upstream.as_str(), |(_, h)| h);
        (self.kind.mirror_hosts().contains(&host) || upstream_host == host).then_some(false)
    }

    /// Builds a repo, filling the kind's default upstream and checking every field.
    pub fn new(
        key: RepoKey,
        kind: RepoKind,
        upstream: Option<&str>,
        tag_ttl: Duration,
        credentials: Option<Credentials>,
    ) -> Result<Self, RepoError> {
        let upstream = match upstream.or(kind.default_upstream()) {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                return Err(RepoError::NoUpstream { key: key.to_string(), kind });
            }
        };
        let bad = |why: &str| RepoError::Upstream { key: key.to_string(), upstream: upstream.clone(), why: why.into() };
        let rest = upstream
            .strip_prefix("https://")
            .or_else(|| upstream.strip_prefix("http://"))
            .ok_or_else(|| bad("must start with http:// or https://"))?;
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad("must be scheme://host[:port] with no path, query or user info"));
        }
        if tag_ttl > Self::MAX_TAG_TTL {
            return Err(RepoError::TagTtl { key: key.to_string(), ttl: tag_ttl });
        }
        Ok(Self {
            key,
            kind,
            upstream,
            tag_ttl,
            credentials,
            cache_ttl: None,
            auth: AuthMode::default(),
            access: Access::default(),
            tls: UpstreamTls::default(),
            mirror_of: Vec::new(),
            credential_provider: None,
            credential_file: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_keys() {
        for ok in ["a", "dockerhub", "my-corp.registry_2", &"a".repeat(64)] {
            assert!(ok.parse::<RepoKey>().is_ok(), "{ok}");
        }
        for bad in ["", "A", "a..b", "-a", "a-", "a/b", "a b", &"a".repeat(65), ".."] {
            assert!(bad.parse::<RepoKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_defaults_and_checks() {
        let key: RepoKey = "hub".parse().unwrap();
        let r = Repo::new(key.clone(), RepoKind::Dockerhub, None, Repo::DEFAULT_TAG_TTL, None).unwrap();
        assert_eq!(r.upstream, "https://registry-1.docker.io");
        assert!(matches!(
            Repo::new(key.clone(), RepoKind::Generic, None, Repo::DEFAULT_TAG_TTL, None),
            Err(RepoError::NoUpstream { .. })
        ));
        for bad in ["ftp://x", "http://", "https://x/path", "https://u:p@x"] {
            assert!(
                Repo::new(key.clone(), RepoKind::Generic, Some(bad), Repo::DEFAULT_TAG_TTL, None).is_err(),
                "{bad}"
            );
        }
        assert!(Repo::new(key, RepoKind::Generic, Some("http://x"), Duration::from_secs(31 * 86400), None).is_err());
    }

    #[test]
    fn credential_provider_policies() {
        use CredentialProvider::*;
        let key: RepoKey = "gar".parse().unwrap();
        let r = Repo::new(key, RepoKind::Generic, Some("https://x"), Repo::DEFAULT_TAG_TTL, None).unwrap();
        let field = |p: Option<CredentialProvider>, f: Option<&str>| match r
            .clone()
            .with_credential_provider(p, f.map(Into::into))
        {
            Ok(_) => None,
            Err(RepoError::Policy { field, .. }) => Some(field),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(field(Some(Gcp), None), None);
        assert_eq!(field(Some(Gcp), Some("/etc/wharf/gcp.json")), None);
        assert_eq!(field(Some(Oauth2), Some("/etc/wharf/oauth2.json")), None);
        assert_eq!(field(Some(Oauth2), None), Some("credential_file"));
        assert_eq!(field(Some(Oauth2), Some("")), Some("credential_file"), "empty is none");
        assert_eq!(field(None, Some("/etc/x")), Some("credential_file"));
        assert_eq!(field(Some(Aws), Some("/etc/x")), Some("credential_file"));
        assert_eq!(field(Some(Azure), Some("/etc/x")), Some("credential_file"));
        assert_eq!(field(Some(Gcp), Some("relative.json")), Some("credential_file"));
        assert_eq!(field(Some(Gcp), Some("/a\nb")), Some("credential_file"));
        assert_eq!("oauth2".parse::<CredentialProvider>().unwrap(), Oauth2);
        assert!("vault".parse::<CredentialProvider>().is_err());
    }

    #[test]
    fn access_policies() {
        let key: RepoKey = "hub".parse().unwrap();
        let creds = Credentials { username: "u".into(), password: Secret::new("p") };
        let r = Repo::new(key.clone(), RepoKind::Dockerhub, None, Repo::DEFAULT_TAG_TTL, None).unwrap();
        assert!(r.clone().with_access(AuthMode::Passthrough, Access::Public).is_ok());
        assert!(r.clone().with_access(AuthMode::Static, Access::Token).is_ok());
        assert!(r.clone().with_access(AuthMode::Passthrough, Access::Token).is_err());
        let with_creds = Repo::new(key, RepoKind::Dockerhub, None, Repo::DEFAULT_TAG_TTL, Some(creds)).unwrap();
        assert!(with_creds.with_access(AuthMode::Passthrough, Access::Public).is_err());
        assert_eq!("passthrough".parse::<AuthMode>().unwrap(), AuthMode::Passthrough);
        assert_eq!(Access::Token.to_string(), "token");
        assert!("private".parse::<Access>().is_err());
        let tls = |pem: &str| UpstreamTls { ca_bundle: Some(pem.into()), insecure_skip_verify: false };
        assert!(r.clone().with_upstream_tls(tls("not pem")).is_err());
        assert!(r.with_upstream_tls(tls("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")).is_ok());
    }

    #[test]
    fn mirrors_by_kind_upstream_or_list() {
        let key: RepoKey = "hub".parse().unwrap();
        let hub = Repo::new(key.clone(), RepoKind::Dockerhub, None, Repo::DEFAULT_TAG_TTL, None).unwrap();
        assert_eq!(hub.mirrors("docker.io"), Some(false));
        assert_eq!(hub.mirrors("registry-1.docker.io"), Some(false));
        assert_eq!(hub.mirrors("ghcr.io"), None);
        let corp = Repo::new(key.clone(), RepoKind::Generic, Some("http://reg.corp:5000"), Repo::DEFAULT_TAG_TTL, None)
            .unwrap();
        assert_eq!(corp.mirrors("reg.corp:5000"), Some(false));
        assert_eq!(corp.mirrors("reg.corp"), None);
        let listed = hub.clone().with_mirror_of(vec!["mirror.example".into()]).unwrap();
        assert_eq!(listed.mirrors("mirror.example"), Some(true));
        assert_eq!(listed.mirrors("docker.io"), None, "a list replaces the defaults");
        for bad in ["", "Docker.io", "a/b", "../x", "x:0", "x:99999", "x:", "-a.b", "a..b", "a b", "x:5x"] {
            assert!(hub.clone().with_mirror_of(vec![bad.into()]).is_err(), "{bad:?}");
        }
        for ok in ["docker.io", "localhost:5000", "127.0.0.1:5000", "a-b.c"] {
            assert!(registry_host_error(ok).is_none(), "{ok}");
        }
        assert!(hub.with_mirror_of(vec!["a.b".into(); 33]).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Credentials { username: "bot".into(), password: Secret::new("hunter2") };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
