//! The repos a node serves. Standalone nodes read them from a TOML file; the configuration is held
//! behind one pointer so that a request sees one whole snapshot, old or new, never a mix.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use wharf_core::{
    Access, AuthMode, Credentials, Grant, Repo, RepoError, RepoKey, RepoKind, Secret, SigningKey, UpstreamTls,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {source}")]
    Repo { path: PathBuf, source: RepoError },
    #[error("config file {path}: repo {key}: {message}")]
    Field { path: PathBuf, key: String, message: String },
    #[error("config file {path}: repoKey {key} is defined twice")]
    Duplicate { path: PathBuf, key: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// The repo that requests without a repoKey, `?ns=` or a repo's host name go to.
    #[serde(default)]
    default_mirror: Option<String>,
    #[serde(default, rename = "repo")]
    repos: Vec<RepoToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoToml {
    key: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    tag_ttl: Option<String>,
    #[serde(default)]
    cache_ttl: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    /// `static` (default) or `passthrough`.
    #[serde(default)]
    auth: Option<String>,
    /// Only `public` here: puller tokens are issued by a control plane.
    #[serde(default)]
    access: Option<String>,
    /// A PEM file of CA certificates trusted for this upstream.
    #[serde(default)]
    ca_bundle_file: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    /// Registry hosts this repo mirrors (default: the kind's and the upstream's).
    #[serde(default)]
    mirror_of: Vec<String>,
    /// `gcp`: credentials from the node's cloud identity instead of a password.
    #[serde(default)]
    credential_provider: Option<String>,
    /// The file the provider reads (`gcp`: a Google credentials file; `oauth2`: its settings).
    #[serde(default)]
    credential_file: Option<String>,
}

/// An immutable set of repos, by key, and the puller tokens that open `access = "token"` repos.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub repos: HashMap<RepoKey, Arc<Repo>>,
    /// Puller tokens by id (hashes only).
    pub pullers: HashMap<String, Grant>,
    /// A standalone file's `default_mirror` (a node's `--default-mirror` wins over it).
    pub default_mirror: Option<RepoKey>,
    /// The cluster's token keys (managed mode); empty: the node seals with its own.
    pub keys: Vec<SigningKey>,
    /// The live nodes that take part in peer fetch (managed mode; empty: off). Not stored.
    pub members: Vec<Member>,
}

/// A node of the cluster, as peer fetch knows it ([`crate::peers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Its registry port as the other nodes reach it: `http://10.0.0.5:5000`.
    pub url: String,
    /// Changes at each start of its process.
    pub generation: u64,
}

impl Snapshot {
    pub fn new(repos: impl IntoIterator<Item = Repo>) -> Self {
        Self {
            repos: repos.into_iter().map(|r| (r.key.clone(), Arc::new(r))).collect(),
            pullers: HashMap::new(),
            default_mirror: None,
            keys: Vec::new(),
            members: Vec::new(),
        }
    }

    /// The repo that mirrors the registry `host`: one whose `mirror_of` names it, else one whose
    /// defaults do (its kind's hosts, its upstream's host); among several, the first repoKey.
    pub fn mirror_for(&self, host: &str) -> Option<&Arc<Repo>> {
        self.repos
            .values()
            .filter_map(|r| r.mirrors(host).map(|explicit| (!explicit, &r.key, r)))
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, r)| r)
    }

    /// Where requests that name no repo go: `flag` (the node's `--default-mirror`), else the
    /// file's `default_mirror`, else the repo that mirrors Docker Hub (what dockerd's
    /// `registry-mirrors` sends). `Err` names a configured default that is not a repo here.
    pub fn default_mirror<'a>(&'a self, flag: Option<&'a RepoKey>) -> Result<Option<&'a Arc<Repo>>, &'a RepoKey> {
        match flag.or(self.default_mirror.as_ref()) {
            Some(key) => self.repos.get(key).map(Some).ok_or(key),
            None => Ok(self.mirror_for("docker.io")),
        }
    }

    pub fn with_pullers(mut self, pullers: impl IntoIterator<Item = Grant>) -> Self {
        self.pullers = pullers.into_iter().map(|g| (g.id.clone(), g)).collect();
        self
    }
}

/// The node's current configuration: readers take an `Arc` of the whole snapshot.
#[derive(Debug, Default)]
pub struct Config {
    current: RwLock<Arc<Snapshot>>,
    /// A configuration was put in force (a file, a stored snapshot or a control plane's): `/readyz`.
    configured: std::sync::atomic::AtomicBool,
}

impl Config {
    pub fn new(snapshot: Snapshot) -> Self {
        Self { current: RwLock::new(Arc::new(snapshot)), configured: true.into() }
    }

    /// Whether a configuration is in force (else the node waits for its first control plane).
    pub fn is_configured(&self) -> bool {
        self.configured.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.configured.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads a standalone TOML config file.
pub fn load_file(path: &Path) -> Result<Snapshot, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(&text, path)
}

fn parse(text: &str, path: &Path) -> Result<Snapshot, ConfigError> {
    let file: FileConfig =
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    let mut repos = Vec::with_capacity(file.repos.len());
    for r in file.repos {
        let repo = repo_from_toml(r, path)?;
        if repos.iter().any(|x: &Repo| x.key == repo.key) {
            return Err(ConfigError::Duplicate { path: path.into(), key: repo.key.to_string() });
        }
        repos.push(repo);
    }
    let mut snapshot = Snapshot::new(repos);
    if let Some(key) = file.default_mirror {
        let key: RepoKey = key.parse().map_err(|source| ConfigError::Repo { path: path.into(), source })?;
        if !snapshot.repos.contains_key(&key) {
            return Err(ConfigError::Field {
                path: path.into(),
                key: key.to_string(),
                message: "default_mirror names no [[repo]] of this file".into(),
            });
        }
        snapshot.default_mirror = Some(key);
    }
    Ok(snapshot)
}

fn repo_from_toml(r: RepoToml, path: &Path) -> Result<Repo, ConfigError> {
    let repo_err = |source| ConfigError::Repo { path: path.into(), source };
    let key: RepoKey = r.key.parse().map_err(repo_err)?;
    let field = |message: String| ConfigError::Field { path: path.into(), key: key.to_string(), message };
    let kind: RepoKind = match &r.kind {
        Some(k) => k.parse().map_err(repo_err)?,
        None => RepoKind::Generic,
    };
    let tag_ttl = match &r.tag_ttl {
        Some(t) => humantime::parse_duration(t).map_err(|e| field(format!("tag_ttl {t:?}: {e}")))?,
        None => Repo::DEFAULT_TAG_TTL,
    };
    let password = match (&r.password_env, &r.password_file) {
        (Some(_), Some(_)) => {
            return Err(field("set password_env or password_file, not both".into()));
        }
        (Some(var), None) => Some(
            std::env::var(var).map_err(|_| field(format!("password_env: environment variable {var} is not set")))?,
        ),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| field(format!("password_file {}: {e}", file.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    let credentials = match (r.username, password) {
        (Some(username), Some(p)) => Some(Credentials { username, password: Secret::new(p) }),
        (None, None) => None,
        _ => {
            return Err(field("username and a password (password_env or password_file) go together".into()));
        }
    };
    let cache_ttl = match &r.cache_ttl {
        Some(t) => Some(humantime::parse_duration(t).map_err(|e| field(format!("cache_ttl {t:?}: {e}")))?),
        None => None,
    };
    let auth: AuthMode = match &r.auth {
        Some(a) => a.parse().map_err(repo_err)?,
        None => AuthMode::default(),
    };
    let access: Access = match &r.access {
        Some(a) => a.parse().map_err(repo_err)?,
        None => Access::default(),
    };
    if access == Access::Token {
        return Err(field("access = \"token\" needs a control plane: puller tokens are issued there".into()));
    }
    let ca_bundle = match &r.ca_bundle_file {
        Some(file) => {
            Some(std::fs::read_to_string(file).map_err(|e| field(format!("ca_bundle_file {}: {e}", file.display())))?)
        }
        None => None,
    };
    let tls = UpstreamTls { ca_bundle, insecure_skip_verify: r.insecure_skip_tls_verify };
    let provider = match &r.credential_provider {
        Some(p) => Some(p.parse().map_err(repo_err)?),
        None => None,
    };
    Repo::new(key, kind, r.upstream.as_deref(), tag_ttl, credentials)
        .and_then(|repo| repo.with_cache_ttl(cache_ttl))
        .and_then(|repo| repo.with_access(auth, access))
        .and_then(|repo| repo.with_upstream_tls(tls))
        .and_then(|repo| repo.with_mirror_of(r.mirror_of))
        .and_then(|repo| repo.with_credential_provider(provider, r.credential_file))
        .map_err(repo_err)
}

/// Formats a duration for humans and logs (`5m`, `30s`).
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Snapshot, ConfigError> {
        parse(text, Path::new("wharf.toml"))
    }

    #[test]
    fn mirrors_and_the_default_mirror() {
        let two = "[[repo]]\nkey = \"hub\"\nkind = \"dockerhub\"\n\n[[repo]]\nkey = \"corp\"\nupstream = \"https://r.corp\"\nmirror_of = [\"docker.io\"]\n";
        let s = p(two).unwrap();
        // An explicit mirror_of wins over a kind's default; the upstream's own host is mirrored too.
        assert_eq!(s.mirror_for("docker.io").unwrap().key.as_str(), "corp");
        assert_eq!(s.mirror_for("index.docker.io").unwrap().key.as_str(), "hub");
        assert!(s.mirror_for("r.corp").is_none(), "an explicit list replaces the upstream's host");
        assert_eq!(s.default_mirror(None).unwrap().unwrap().key.as_str(), "corp");
        let hub: RepoKey = "hub".parse().unwrap();
        assert_eq!(s.default_mirror(Some(&hub)).unwrap().unwrap().key.as_str(), "hub");
        let nope: RepoKey = "nope".parse().unwrap();
        assert!(s.default_mirror(Some(&nope)).is_err());
        let s = p(&format!("default_mirror = \"hub\"\n{two}")).unwrap();
        assert_eq!(s.default_mirror(None).unwrap().unwrap().key.as_str(), "hub");
        assert!(p(&format!("default_mirror = \"nope\"\n{two}")).is_err(), "a default naming no repo");
        assert!(p("[[repo]]\nkey = \"a\"\nupstream = \"https://x\"\nmirror_of = [\"../x\"]\n").is_err());
    }

    #[test]
    fn parses_repos() {
        let s = p(r#"
            [[repo]]
            key = "lab"
            upstream = "http://127.0.0.1:5011"
            kind = "generic"
            tag_ttl = "5m"
            [[repo]]
            key = "dockerhub"
            kind = "dockerhub"
        "#)
        .unwrap();
        let lab = &s.repos[&"lab".parse::<RepoKey>().unwrap()];
        assert_eq!(lab.tag_ttl, Duration::from_secs(300));
        let hub = &s.repos[&"dockerhub".parse::<RepoKey>().unwrap()];
        assert_eq!(hub.upstream, "https://registry-1.docker.io");
    }

    #[test]
    fn rejects_bad_config() {
        for (text, needle) in [
            ("[[repo]]\nkey = \"Bad\"\nkind = \"ghcr\"", "repoKey"),
            ("[[repo]]\nkey = \"a\"\nkind = \"nope\"", "unknown repo kind"),
            ("[[repo]]\nkey = \"a\"\nkind = \"ghcr\"\ntag_ttl = \"soon\"", "tag_ttl"),
            ("[[repo]]\nkey = \"a\"\nkind = \"ghcr\"\nbogus = 1", "unknown field"),
            ("[[repo]]\nkey = \"a\"\nkind = \"ghcr\"\n[[repo]]\nkey = \"a\"\nkind = \"quay\"", "twice"),
            ("[[repo]]\nkey = \"a\"\nupstream = \"ftp://x\"", "http"),
            ("[[repo]]\nkey = \"a\"\nkind = \"ghcr\"\nusername = \"u\"", "go together"),
            (
                "[[repo]]\nkey = \"a\"\nkind = \"ghcr\"\nusername = \"u\"\npassword_env = \"WHARF_TEST_UNSET_VAR\"",
                "not set",
            ),
        ] {
            let err = p(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }
}
