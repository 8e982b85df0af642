//! A whole node: cache, upstream client, configuration (a file, or followed from control planes),
//! and the registry server. Used by `wharf-proxy` and by `wharf dev`'s in-process node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use wharf_core::{RepoKey, Secret};
use wharf_runtime::tls::{ClientTlsFiles, ServerTls};
use wharf_runtime::{ServerLimits, serve};

use crate::config::{self, Config, ConfigError, Snapshot};
use crate::evict::{self, LruWatermarks, SizeSpec};
use crate::flight::Flights;
use crate::managed::{self, ManagedOptions};
use crate::node_token::{self, NodeTokens};
use crate::peers::{PeerOptions, PeerSetupError, Peers};
use crate::scrub;
use crate::server::router;
use crate::state::{AppState, MirrorRouting};
use crate::store::{Limits, Store, StoreError};
use crate::upstream::{Upstream, UpstreamError, UpstreamOptions};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cache dir: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("token key: {0}")]
    TokenKey(std::io::Error),
    #[error(transparent)]
    Peers(#[from] PeerSetupError),
}

/// Where the node's repos come from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A standalone TOML file.
    File(PathBuf),
    /// Control planes (`config.snapshot` in the cache dir keeps the last one).
    ControlPlanes {
        endpoints: Vec<String>,
        node_id: String,
        address: String,
        token: Option<Secret>,
        /// Where the other nodes reach this one for peer fetch (empty: it takes no part).
        peer_url: String,
    },
}

#[derive(Debug)]
pub struct NodeOptions {
    pub cache_dir: PathBuf,
    /// A mirror-only port (`--mirror-listen`): no path there is read as `<repoKey>/<name>`.
    pub mirror_listener: Option<TcpListener>,
    /// `--default-mirror`: where requests that name no repo go.
    pub default_mirror: Option<RepoKey>,
    pub source: ConfigSource,
    pub upstream: UpstreamOptions,
    /// How long in-flight responses may take after `cancel`.
    pub shutdown_grace: Duration,
    /// The process's metrics recorder, served at `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub eviction: EvictionOptions,
    pub limits: ServerLimits,
    /// Upstream blob fetches at once.
    pub max_upstream_fetches: usize,
    /// HTTPS on the registry port (`--tls-cert`, `--tls-key`), the certificate reloaded on change.
    pub tls: Option<ServerTls>,
    /// How to reach `https://` control planes (`--control-plane-ca`, `--control-plane-cert`/`-key`).
    pub control_plane_tls: ClientTlsFiles,
    /// The node's token service (`/v2/token`).
    pub tokens: TokenOptions,
    /// A blob verified by this process is hashed again on its next read after this long
    /// (`--blob-reverify-after`); one never verified since start is hashed on its first.
    pub blob_reverify_after: Duration,
    /// The scrubber: bytes per second (`--scrub-rate`; 0: off) and the time between passes.
    pub scrub_rate: u64,
    pub scrub_interval: Duration,
    /// Peer fetch (managed nodes): timeouts, how long a failed peer is skipped, its CA.
    pub peers: PeerOptions,
}

/// How the node's registry tokens are issued.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// How long a token lives (`--token-ttl`).
    pub ttl: Duration,
    /// `--token-realm`: the token endpoint's URL as clients reach it (behind a load balancer or a
    /// TLS terminator); default: `<scheme>://<Host>/v2/token` of each request.
    pub realm: Option<String>,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self { ttl: NodeTokens::DEFAULT_TTL, realm: None }
    }
}

/// How the cache is kept in bounds.
#[derive(Debug, Clone)]
pub struct EvictionOptions {
    pub max_size: Option<SizeSpec>,
    /// Fractions of the max size: eviction starts above `high`, stops under `low`.
    pub high: f64,
    pub low: f64,
    /// Entries not accessed for this long go.
    pub ttl: Option<Duration>,
    /// How often eviction runs besides when the cache grows past `high`.
    pub interval: Duration,
}

impl Default for EvictionOptions {
    fn default() -> Self {
        Self { max_size: None, high: 0.9, low: 0.8, ttl: None, interval: Duration::from_secs(60) }
    }
}

/// This process's generation: its start in microseconds since the epoch (never 0).
fn generation() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (since.as_micros() as u64).max(1)
}

/// Runs a node on `listener` until `cancel`, then lets in-flight responses finish within the grace.
pub async fn run_node(
    listener: TcpListener,
    mut opts: NodeOptions,
    cancel: CancellationToken,
) -> Result<(), NodeError> {
    let config = Arc::new(Config::default());
    if let ConfigSource::File(path) = &opts.source {
        let snapshot: Snapshot = config::load_file(path)?;
        config.replace(snapshot);
    }
    for repo in config.snapshot().repos.values() {
        tracing::info!(repo_key = %repo.key, kind = %repo.kind, upstream = %repo.upstream,
            tag_ttl = %config::fmt_duration(repo.tag_ttl), credentials = repo.credentials.is_some(), "repo configured");
    }
    let cache_dir = opts.cache_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(cache_dir))
        .await
        .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
    let ev = &opts.eviction;
    let disk = rustix::fs::statvfs(&opts.cache_dir).map_or(0, |st| st.f_blocks.saturating_mul(st.f_frsize));
    let max_size = ev.max_size.map(|m| m.resolve(disk));
    let store =
        Arc::new(store.with_limits(Limits { max_size, high: ev.high, reverify_after: Some(opts.blob_reverify_after) }));
    if let Some(max) = max_size {
        metrics::gauge!("wharf_cache_max_bytes").set(max as f64);
    }
    // Always on: repos may carry their own cache TTL even when the node has no cap and no TTL.
    tracing::info!(?max_size, high = ev.high, low = ev.low, ttl = ?ev.ttl, "eviction policy");
    let policy = Arc::new(LruWatermarks { max_size, high: ev.high, low: ev.low, ttl: ev.ttl });
    let wake = store.eviction_wake();
    tokio::spawn(evict::run(store.clone(), config.clone(), policy, ev.interval, wake, cancel.clone()));
    if opts.scrub_rate > 0 {
        tracing::info!(rate_bytes_per_sec = opts.scrub_rate, interval = ?opts.scrub_interval, "scrubber on");
        tokio::spawn(scrub::run(store.clone(), opts.scrub_rate, opts.scrub_interval, cancel.clone()));
    }
    let upstream = Arc::new(Upstream::new(opts.upstream.clone())?);
    let peers = Arc::new(match &opts.source {
        ConfigSource::ControlPlanes { node_id, peer_url, .. } if !peer_url.is_empty() => {
            Peers::new(node_id.clone(), opts.peers.clone())?
        }
        _ => Peers::off(),
    });
    if let ConfigSource::ControlPlanes { endpoints, node_id, address, token, peer_url } = &opts.source {
        let managed = ManagedOptions {
            endpoints: endpoints.clone(),
            node_id: node_id.clone(),
            address: address.clone(),
            snapshot_path: opts.cache_dir.join("config.snapshot"),
            report_interval: Duration::from_secs(10),
            tls: opts.control_plane_tls.clone(),
            token: token.clone(),
            peer_url: peer_url.clone(),
            generation: generation(),
            peers: peers.clone(),
        };
        if !peer_url.is_empty() {
            tracing::info!(%peer_url, "peer fetch: other nodes reach this one at this URL");
        }
        // Before serving: a restarted node answers its first request with its last configuration.
        let held = match managed::load_stored(&managed.snapshot_path, &config) {
            Ok(rev) => rev,
            Err(e) => {
                tracing::error!(error = %e, "stored configuration snapshot unusable; waiting for a control plane");
                0
            }
        };
        tokio::spawn(managed::run(managed, config.clone(), store.clone(), held, cancel.clone()));
    }
    let service = match &opts.source {
        ConfigSource::ControlPlanes { node_id, .. } => node_id.clone(),
        ConfigSource::File(_) => "wharf".to_owned(),
    };
    let key = node_token::load_or_create_key(&opts.cache_dir).map_err(NodeError::TokenKey)?;
    let mut tokens = NodeTokens::new(service, key);
    tokens.ttl = opts.tokens.ttl;
    tokens.realm = opts.tokens.realm.clone();
    tokens.https = opts.tls.is_some();
    let mut state = AppState::new(config, store.clone(), upstream);
    state.tokens = Arc::new(tokens);
    state.peers = peers;
    state.flights = Arc::new(Flights::new(opts.max_upstream_fetches));
    state.metrics = opts.metrics.clone();
    state.mirror = MirrorRouting { default: opts.default_mirror.clone(), only: false };
    let acceptor = opts.tls.as_ref().map(|tls| {
        tls.watch(cancel.clone());
        tls.acceptor()
    });
    tracing::info!(addr = %listener.local_addr()?, cache_dir = %opts.cache_dir.display(), tls = acceptor.is_some(), "listening");
    let mut servers = Vec::new();
    if let Some(mirror) = opts.mirror_listener.take() {
        tracing::info!(addr = %mirror.local_addr()?, tls = acceptor.is_some(), "listening as a mirror only");
        let mut mirror_state = state.clone();
        mirror_state.mirror.only = true;
        let stop = cancel.clone();
        let (limits, acceptor) = (opts.limits.clone(), acceptor.clone());
        servers.push(tokio::spawn(serve(mirror, router(mirror_state), limits, acceptor, async move {
            stop.cancelled().await
        })));
    }
    let stop = cancel.clone();
    servers.push(tokio::spawn(serve(listener, router(state), opts.limits.clone(), acceptor, async move {
        stop.cancelled().await
    })));
    let server = async {
        for s in servers {
            s.await.map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
        }
        Ok::<_, NodeError>(())
    };
    cancel.cancelled().await;
    match tokio::time::timeout(opts.shutdown_grace, server).await {
        Ok(r) => {
            r?;
            tracing::info!("in-flight responses finished");
        }
        Err(_) => tracing::warn!("shutdown grace period over; dropping the remaining responses"),
    }
    match store.abandon_staging() {
        Ok(0) => {}
        Ok(n) => tracing::info!(abandoned = n, "fetches with no client left abandoned; their partial files removed"),
        Err(e) => tracing::warn!(error = %e, "could not empty staging at shutdown; it is emptied at the next start"),
    }
    Ok(())
}
