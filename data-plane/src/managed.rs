//! Managed mode: the node follows a control plane's `Watch` stream.
//!
//! Each snapshot is validated as a whole and applied atomically (a request sees the old or the new
//! configuration, never a mix); a snapshot that fails validation is refused, reported, and the last
//! good one stays. The last good snapshot is kept in `<cache-dir>/config.snapshot` (mode 0600: it
//! holds upstream credentials), so the node serves it when no control plane answers, also right
//! after its own restart. The node tries every endpoint in turn with jittered backoff and resumes
//! from the revision it holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wharf_core::{Credentials, Grant, Repo, RepoKey, RepoKind, RepoPattern, Role, Secret, SigningKey, UpstreamTls};
use wharf_proto::v1 as pb;
use wharf_proto::v1::config_service_client::ConfigServiceClient;
use wharf_runtime::tls::ClientTlsFiles;

use crate::config::{Config, Member, Snapshot};
use crate::peers::Peers;
use crate::store::Store;
use crate::upstream::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("snapshot at revision {revision} refused: repo {key:?}: {message}")]
    Invalid { revision: i64, key: String, message: String },
    #[error("stored snapshot {path}: {message}")]
    Stored { path: PathBuf, message: String },
}

/// Who this node is and where its control planes are.
#[derive(Debug, Clone)]
pub struct ManagedOptions {
    pub endpoints: Vec<String>,
    pub node_id: String,
    /// Where clients reach this node (shown in the node list).
    pub address: String,
    pub snapshot_path: PathBuf,
    pub report_interval: Duration,
    /// For `https://` endpoints: the CA to trust (else the system roots) and a client certificate.
    pub tls: ClientTlsFiles,
    /// The node token (role `node`) sent to the control plane as `authorization: Bearer`.
    pub token: Option<Secret>,
    /// Where the other nodes reach this one for peer fetch (empty: it takes no part).
    pub peer_url: String,
    /// This process's generation (its start time): peers forget what they held against the last.
    pub generation: u64,
    /// Peer fetch: what the node's reports say of its peers.
    pub peers: Arc<Peers>,
}

impl ManagedOptions {
    /// `msg` as a request carrying the node token.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            match format!("Bearer {}", t.expose()).parse() {
                Ok(v) => {
                    req.metadata_mut().insert("authorization", v);
                }
                Err(_) => tracing::error!("the node token has characters a header cannot carry; sent without it"),
            }
        }
        req
    }
}

/// The stored form of a snapshot (also what `config.snapshot` holds).
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    revision: i64,
    repos: Vec<StoredRepo>,
    #[serde(default)]
    pullers: Vec<StoredPuller>,
    /// The cluster's token keys (hex secrets: the file is 0600).
    #[serde(default)]
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: String,
    secret: String,
    created_at_ms: u64,
}

fn key_from(k: &StoredKey) -> Result<SigningKey, String> {
    let mut secret = [0u8; 32];
    hex::decode_to_slice(&k.secret, &mut secret).map_err(|_| "the secret is not 64 hexadecimal digits".to_owned())?;
    Ok(SigningKey { id: k.id.clone(), secret, created_at: UNIX_EPOCH + Duration::from_millis(k.created_at_ms) })
}

/// A puller token: its id and the SHA-256 of its secret (hex), never the secret.
#[derive(Serialize, Deserialize)]
struct StoredPuller {
    id: String,
    secret_sha256: String,
    #[serde(default)]
    repos: Vec<String>,
    #[serde(default)]
    expires_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredRepo {
    key: String,
    kind: String,
    upstream: String,
    tag_ttl_secs: u64,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    cache_ttl_secs: Option<u64>,
    #[serde(default)]
    auth: String,
    #[serde(default)]
    access: String,
    #[serde(default)]
    ca_bundle: String,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    #[serde(default)]
    mirror_of: Vec<String>,
    #[serde(default)]
    credential_provider: String,
    #[serde(default)]
    credential_file: String,
}

fn word<T: std::str::FromStr<Err = wharf_core::RepoError> + Default>(s: &str) -> Result<T, String> {
    if s.is_empty() { Ok(T::default()) } else { s.parse().map_err(|e: wharf_core::RepoError| e.to_string()) }
}

fn word_opt<T: std::str::FromStr<Err = wharf_core::RepoError>>(s: &str) -> Result<Option<T>, wharf_core::RepoError> {
    if s.is_empty() { Ok(None) } else { s.parse().map(Some) }
}

fn puller_from(p: &StoredPuller) -> Result<Grant, String> {
    let mut secret_sha256 = [0u8; 32];
    hex::decode_to_slice(&p.secret_sha256, &mut secret_sha256).map_err(|e| format!("secret hash: {e}"))?;
    let repos =
        p.repos.iter().map(|r| r.parse::<RepoPattern>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    Ok(Grant {
        id: p.id.clone(),
        secret_sha256,
        role: Role::Puller,
        repos,
        expires_at: p.expires_at_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    })
}

fn repo_from(r: &StoredRepo) -> Result<Repo, String> {
    let key: RepoKey = r.key.parse().map_err(|e: wharf_core::RepoError| e.to_string())?;
    let kind: RepoKind = r.kind.parse().map_err(|e: wharf_core::RepoError| e.to_string())?;
    let credentials = (!r.username.is_empty())
        .then(|| Credentials { username: r.username.clone(), password: Secret::new(r.password.clone()) });
    let upstream = Some(r.upstream.as_str()).filter(|u| !u.is_empty());
    Repo::new(key, kind, upstream, Duration::from_secs(r.tag_ttl_secs), credentials)
        .and_then(|repo| repo.with_cache_ttl(r.cache_ttl_secs.map(Duration::from_secs)))
        .map_err(|e| e.to_string())?
        .with_access(word(&r.auth)?, word(&r.access)?)
        .and_then(|repo| {
            repo.with_upstream_tls(UpstreamTls {
                ca_bundle: Some(r.ca_bundle.clone()).filter(|c| !c.is_empty()),
                insecure_skip_verify: r.insecure_skip_tls_verify,
            })
        })
        .and_then(|repo| repo.with_mirror_of(r.mirror_of.clone()))
        .and_then(|repo| {
            repo.with_credential_provider(word_opt(&r.credential_provider)?, Some(r.credential_file.clone()))
        })
        .map_err(|e| e.to_string())
}

fn validate(s: &StoredSnapshot) -> Result<Snapshot, ManagedError> {
    let mut repos = Vec::with_capacity(s.repos.len());
    for r in &s.repos {
        let repo = repo_from(r).map_err(|message| ManagedError::Invalid {
            revision: s.revision,
            key: r.key.clone(),
            message,
        })?;
        if repos.iter().any(|x: &Repo| x.key == repo.key) {
            return Err(ManagedError::Invalid {
                revision: s.revision,
                key: r.key.clone(),
                message: "defined twice".into(),
            });
        }
        repos.push(repo);
    }
    let mut pullers = Vec::with_capacity(s.pullers.len());
    for p in &s.pullers {
        let grant = puller_from(p).map_err(|message| ManagedError::Invalid {
            revision: s.revision,
            key: format!("token {}", p.id),
            message,
        })?;
        pullers.push(grant);
    }
    let mut snapshot = Snapshot::new(repos).with_pullers(pullers);
    for k in &s.keys {
        let key = key_from(k).map_err(|message| ManagedError::Invalid {
            revision: s.revision,
            key: format!("token key {}", k.id),
            message,
        })?;
        snapshot.keys.push(key);
    }
    Ok(snapshot)
}

fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

fn from_update(u: pb::ConfigUpdate) -> StoredSnapshot {
    let snapshot = u.snapshot.unwrap_or_default();
    let pullers = snapshot
        .pullers
        .into_iter()
        .map(|p| StoredPuller {
            id: p.id,
            secret_sha256: hex::encode(p.secret_sha256),
            repos: p.repos,
            expires_at_ms: p.expires_at.as_ref().map(timestamp_ms),
        })
        .collect();
    let repos = snapshot
        .repos
        .into_iter()
        .map(|r| StoredRepo {
            key: r.key,
            kind: r.kind,
            upstream: r.upstream,
            tag_ttl_secs: r.tag_ttl.map_or(0, |d| d.seconds.max(0) as u64),
            username: r.username,
            password: r.password,
            cache_ttl_secs: r.cache_ttl.map(|d| d.seconds.max(0) as u64),
            auth: r.auth,
            access: r.access,
            ca_bundle: r.ca_bundle,
            insecure_skip_tls_verify: r.insecure_skip_tls_verify,
            mirror_of: r.mirror_of,
            credential_provider: r.credential_provider,
            credential_file: r.credential_file,
        })
        .collect();
    let keys = snapshot
        .token_keys
        .into_iter()
        .map(|k| StoredKey {
            id: k.id,
            secret: hex::encode(k.secret),
            created_at_ms: k.created_at.as_ref().map_or(0, timestamp_ms),
        })
        .collect();
    StoredSnapshot { revision: u.revision, repos, pullers, keys }
}

/// Loads the stored snapshot, if any, into `config`; returns its revision (0: none).
pub fn load_stored(path: &Path, config: &Config) -> Result<i64, ManagedError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ManagedError::Stored { path: path.into(), message: e.to_string() }),
    };
    let stored: StoredSnapshot = serde_json::from_slice(&bytes)
        .map_err(|e| ManagedError::Stored { path: path.into(), message: e.to_string() })?;
    let snapshot = validate(&stored)?;
    tracing::info!(
        revision = stored.revision,
        repos = snapshot.repos.len(),
        "serving the stored configuration snapshot"
    );
    config.replace(snapshot);
    Ok(stored.revision)
}

fn store_snapshot(path: &Path, s: &StoredSnapshot) -> std::io::Result<()> {
    crate::private_file::write(path, &serde_json::to_vec(s).map_err(std::io::Error::other)?)
}

/// Takes up the control plane's cache verification requests (`regctl cache verify`) addressed to
/// this node: each once per process, one pass at a time, its figures kept for the reports. A
/// request is not configuration: it is never stored, so a restarted node does not run it again
/// (after a restart every blob is hashed on its first read anyway).
struct Verifier {
    store: Arc<Store>,
    /// The last request taken up, and what its pass found so far.
    status: Arc<std::sync::Mutex<Option<pb::VerifyStatus>>>,
    /// One pass at a time: a request that comes during a pass waits for it.
    running: Arc<tokio::sync::Mutex<()>>,
    /// Rung when a pass starts and ends: the control plane hears at once, not at the next report.
    report_now: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
}

impl Verifier {
    fn new(store: Arc<Store>, cancel: CancellationToken) -> Self {
        Self { store, status: Arc::default(), running: Arc::default(), report_now: Arc::default(), cancel }
    }

    fn status(&self) -> Option<pb::VerifyStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a pass for `request` if it names this node and was not taken up yet.
    fn offer(&self, node_id: &str, request: Option<&pb::VerifyRequest>) {
        let Some(request) = request.filter(|r| r.node_ids.iter().any(|id| id == node_id)) else { return };
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if status.as_ref().is_some_and(|s| s.id == request.id) {
                return;
            }
            *status = Some(pb::VerifyStatus { id: request.id.clone(), ..Default::default() });
        }
        let (id, rate) = (request.id.clone(), request.rate_bytes_per_sec);
        let (store, status, running, report_now, cancel) = (
            self.store.clone(),
            self.status.clone(),
            self.running.clone(),
            self.report_now.clone(),
            self.cancel.clone(),
        );
        tracing::info!(%id, rate_bytes_per_sec = rate, "cache verification requested");
        tokio::spawn(async move {
            let _one = running.lock().await;
            // Only if it is still the latest request: a newer one replaced it while it waited.
            let update = |f: &dyn Fn(&mut pb::VerifyStatus)| {
                let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                match s.as_mut().filter(|s| s.id == id) {
                    Some(s) => {
                        f(s);
                        true
                    }
                    None => false,
                }
            };
            if !update(&|s| s.started_at = Some(now_timestamp())) {
                return;
            }
            report_now.notify_one();
            let started = std::time::Instant::now();
            let pass = tokio::select! {
                _ = cancel.cancelled() => return,
                p = crate::scrub::pass(&store, rate, |p| { update(&|s| progress(s, p)); }) => p,
            };
            update(&|s| {
                progress(s, &pass);
                s.done = true;
                s.finished_at = Some(now_timestamp());
            });
            report_now.notify_one();
            tracing::info!(
                %id,
                checked = pass.checked,
                bytes = pass.bytes,
                removed = pass.removed,
                duration_ms = started.elapsed().as_millis() as u64,
                "cache verification done"
            );
        });
    }
}

fn progress(s: &mut pb::VerifyStatus, p: &crate::scrub::Pass) {
    s.checked = p.checked;
    s.bytes = p.bytes;
    s.removed = p.removed;
    s.removed_entries.clone_from(&p.removed_entries);
}

fn now_timestamp() -> prost_types::Timestamp {
    timestamp_of(std::time::SystemTime::now())
}

fn timestamp_of(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The snapshot's peer-fetch members; one whose id or URL is unusable is left out (and said).
fn members_from(members: &[pb::Member]) -> Vec<Member> {
    let mut out: Vec<Member> = members
        .iter()
        .filter(|m| {
            let ok = !m.node_id.is_empty()
                && reqwest::Url::parse(&m.peer_url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !ok {
                tracing::warn!(node_id = %m.node_id, peer_url = %m.peer_url, "peer left out: no id or no http(s) URL");
            }
            ok
        })
        .map(|m| Member { id: m.node_id.clone(), url: m.peer_url.clone(), generation: m.generation })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

/// Follows the control planes until `cancel`, from `held`, the revision of the configuration
/// already in force (the stored snapshot, loaded before the node serves: [`load_stored`]).
pub async fn run(opts: ManagedOptions, config: Arc<Config>, store: Arc<Store>, held: i64, cancel: CancellationToken) {
    let node = Following {
        verifier: Verifier::new(store.clone(), cancel.child_token()),
        config,
        store,
        applied: AtomicI64::new(held),
        last_error: std::sync::Mutex::new(String::new()),
    };
    let mut backoff = Duration::from_millis(200);
    let mut i = 0usize;
    loop {
        if opts.endpoints.is_empty() {
            return;
        }
        let endpoint = opts.endpoints[i % opts.endpoints.len()].clone();
        i += 1;
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = follow(&opts, &endpoint, &node, &mut backoff) => r,
        };
        if let Err(error) = result {
            tracing::warn!(%endpoint, %error, "control plane stream ended; trying the next endpoint");
        }
        // Jittered backoff, reset by a stream that delivered something.
        let wait = backoff + backoff.mul_f64(rand::random::<f64>() * 0.5);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What the node keeps while it follows: the configuration in force and what its reports say.
struct Following {
    config: Arc<Config>,
    store: Arc<Store>,
    verifier: Verifier,
    /// The revision of the configuration in force.
    applied: AtomicI64,
    /// Why the last snapshot was refused ("" when it was applied).
    last_error: std::sync::Mutex<String>,
}

async fn follow(opts: &ManagedOptions, endpoint: &str, node: &Following, backoff: &mut Duration) -> Result<(), String> {
    let applied = &node.applied;
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| format!("invalid endpoint: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if endpoint.starts_with("https://") {
        // The files are read at every attempt: replaced certificates need no restart.
        let tls = opts.tls.tonic_config().map_err(|e| format!("TLS: {e}"))?;
        channel = channel.tls_config(tls).map_err(|e| format!("TLS: {}", error_chain(&e)))?;
    }
    let channel = channel.connect().await.map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let mut client = ConfigServiceClient::new(channel);
    let req = pb::WatchRequest {
        node_id: opts.node_id.clone(),
        address: opts.address.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        revision: applied.load(Ordering::Relaxed),
        peer_url: opts.peer_url.clone(),
        generation: opts.generation,
    };
    let mut stream = client
        .watch(opts.request(req))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!(
                "watch refused: {} (give this node a token of role node with --control-plane-token-file)",
                s.message()
            ),
            // Under TLS 1.3 a control plane refuses a client certificate after the handshake:
            // the node sees only a connection that died before its first answer.
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
                if endpoint.starts_with("https://") && opts.tls.cert.is_none() =>
            {
                format!(
                    "watch: {} (if the control plane requires client certificates, give this node one with --control-plane-cert and --control-plane-key)",
                    error_chain(&s)
                )
            }
            _ => format!("watch: {}", error_chain(&s)),
        })?
        .into_inner();
    tracing::info!(%endpoint, revision = applied.load(Ordering::Relaxed), "following control plane");
    *backoff = Duration::from_millis(200);
    let mut report = tokio::time::interval(opts.report_interval);
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(update)) => {
                    node.verifier.offer(&opts.node_id, update.snapshot.as_ref().and_then(|s| s.verify.as_ref()));
                    apply(opts, update, node);
                    send_report(&mut client, opts, node).await;
                }
                Ok(None) => return Err("stream closed".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            _ = report.tick() => send_report(&mut client, opts, node).await,
            _ = node.verifier.report_now.notified() => send_report(&mut client, opts, node).await,
        }
    }
}

fn apply(opts: &ManagedOptions, update: pb::ConfigUpdate, node: &Following) {
    let Following { config, applied, last_error, .. } = node;
    let members = update.snapshot.as_ref().map(|s| members_from(&s.members)).unwrap_or_default();
    let stored = from_update(update);
    match validate(&stored) {
        Ok(mut snapshot) => {
            let repos = snapshot.repos.len();
            metrics::gauge!("wharf_peer_members").set(members.len() as f64);
            snapshot.members = members;
            config.replace(snapshot);
            applied.store(stored.revision, Ordering::Relaxed);
            metrics::gauge!("wharf_config_revision").set(stored.revision as f64);
            last_error.lock().unwrap_or_else(|e| e.into_inner()).clear();
            if let Err(e) = store_snapshot(&opts.snapshot_path, &stored) {
                tracing::error!(error = %e, path = %opts.snapshot_path.display(), "could not store the configuration snapshot");
            }
            tracing::info!(revision = stored.revision, repos, "configuration applied");
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration refused; keeping the last good one");
            *last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
        }
    }
}

async fn send_report(
    client: &mut ConfigServiceClient<tonic::transport::Channel>,
    opts: &ManagedOptions,
    node: &Following,
) {
    let Following { store, verifier, applied, last_error, .. } = node;
    let (entries, bytes) = store.usage();
    let report = pb::NodeReport {
        node_id: opts.node_id.clone(),
        applied_revision: applied.load(Ordering::Relaxed),
        cache_bytes: bytes,
        cache_entries: entries as u64,
        cache_hits: crate::metrics::hits_and_misses().0,
        cache_misses: crate::metrics::hits_and_misses().1,
        last_error: last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        cache_degraded: store.is_degraded(),
        verify: verifier.status(),
        peers: opts
            .peers
            .views()
            .into_iter()
            .map(|p| pb::PeerStatus {
                id: p.id,
                state: if p.suspect_until.is_some() { "suspect" } else { "ok" }.into(),
                suspect_until: p.suspect_until.map(timestamp_of),
                errors: p.errors,
                bytes: p.bytes,
            })
            .collect(),
    };
    if let Err(s) = client.report(opts.request(report)).await {
        tracing::debug!(error = %s.message(), "report refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(key: &str, kind: &str) -> StoredRepo {
        StoredRepo {
            key: key.into(),
            kind: kind.into(),
            upstream: String::new(),
            tag_ttl_secs: 60,
            username: String::new(),
            password: String::new(),
            cache_ttl_secs: None,
            auth: String::new(),
            access: String::new(),
            ca_bundle: String::new(),
            insecure_skip_tls_verify: false,
            mirror_of: Vec::new(),
            credential_provider: String::new(),
            credential_file: String::new(),
        }
    }

    #[test]
    fn invalid_snapshots_are_refused_whole() {
        let good = StoredSnapshot {
            revision: 3,
            repos: vec![repo("a", "ghcr"), repo("b", "quay")],
            pullers: vec![],
            keys: vec![],
        };
        assert_eq!(validate(&good).unwrap().repos.len(), 2);
        let bad = StoredSnapshot {
            revision: 4,
            repos: vec![repo("a", "ghcr"), repo("b", "nope")],
            pullers: vec![],
            keys: vec![],
        };
        assert!(matches!(validate(&bad), Err(ManagedError::Invalid { ref key, .. }) if key == "b"));
        let dup = StoredSnapshot {
            revision: 5,
            repos: vec![repo("a", "ghcr"), repo("a", "quay")],
            pullers: vec![],
            keys: vec![],
        };
        assert!(validate(&dup).is_err());
    }

    #[test]
    fn stored_snapshot_round_trips_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.snapshot");
        let mut r = repo("a", "ghcr");
        r.username = "u".into();
        r.password = "p".into();
        store_snapshot(&path, &StoredSnapshot { revision: 7, repos: vec![r], pullers: vec![], keys: vec![] }).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let config = Config::default();
        assert_eq!(load_stored(&path, &config).unwrap(), 7);
        assert_eq!(config.snapshot().repos.len(), 1);
    }
}
