//! What requests share ([`AppState`]) and one request resolved against the configuration ([`Ctx`]):
//! below the handlers that use them.

use std::sync::Arc;

use http::HeaderMap;
use metrics_exporter_prometheus::PrometheusHandle;
use wharf_core::{AuthMode, Digest, Repo, RepoKey};

use crate::config::Config;
use crate::credentials::ClientCredentials;
use crate::decisions::Decisions;
use crate::flight::{Flights, PeerAsk};
use crate::node_token::NodeTokens;
use crate::peers::Peers;
use crate::store::Store;
use crate::upstream::Upstream;

/// Everything a request needs, shared by all of them.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub upstream: Arc<Upstream>,
    pub flights: Arc<Flights>,
    /// Passthrough repos: the upstream's recent acceptances of clients' credentials.
    pub decisions: Arc<Decisions>,
    /// Renders `/metrics`; `None` when no recorder is installed (then `/metrics` is 404).
    pub metrics: Option<PrometheusHandle>,
    /// How requests that name no repo of this node are routed.
    pub mirror: MirrorRouting,
    /// The node's token service (`/v2/token`) and the keys its tokens are opened with.
    pub tokens: Arc<NodeTokens>,
    /// Peer fetch: this node's side of it (off for standalone nodes).
    pub peers: Arc<Peers>,
}

/// The node as a registry mirror: how a request whose path does not start with one of its
/// repoKeys finds its repo (containerd's `?ns=`, the `Host` header, else the default mirror).
#[derive(Clone, Debug, Default)]
pub struct MirrorRouting {
    /// `--default-mirror`: the repo for requests that name no repo, no `?ns=` and no repo's host
    /// (else the config file's `default_mirror`, else the repo that mirrors docker.io).
    pub default: Option<RepoKey>,
    /// A mirror-only port (`--mirror-listen`): no path is read as `<repoKey>/<name>`, so a Docker
    /// Hub user named like a repoKey is never mistaken for one.
    pub only: bool,
}

impl AppState {
    pub fn new(config: Arc<Config>, store: Arc<Store>, upstream: Arc<Upstream>) -> Self {
        let decisions =
            Arc::new(Decisions::new(upstream.options().passthrough_auth_ttl, Decisions::DEFAULT_MAX_ENTRIES));
        Self {
            config,
            store,
            upstream,
            flights: Arc::default(),
            decisions,
            metrics: None,
            mirror: MirrorRouting::default(),
            tokens: Arc::new(NodeTokens::ephemeral("wharf")),
            peers: Arc::new(Peers::off()),
        }
    }
}

/// The request being served, resolved against the configuration.
pub struct Ctx {
    pub state: AppState,
    pub repo: Arc<Repo>,
    /// The upstream's name (Docker Hub's `library/` applied).
    pub name: String,
    /// The name as the client wrote it.
    pub client_name: String,
    /// What precedes the name in the client's paths: `<repoKey>/`, or nothing through a mirror.
    pub path_prefix: String,
    pub headers: HeaderMap,
    pub query: Option<String>,
    pub head: bool,
    /// The request came over a plaintext connection: verified blobs may be served from memory
    /// maps ([`crate::mapped`]), whose bytes only the kernel reads there.
    pub plaintext: bool,
    /// Passthrough repos: the client's credentials, presented upstream (`None`: anonymous).
    pub client: Option<Arc<ClientCredentials>>,
    /// Another node asks, on the peer endpoint: served from this node's cache or upstream, never
    /// from a third node.
    pub from_peer: bool,
}

impl Ctx {
    /// Whether cached content needs the upstream's decision for this client first.
    pub fn passthrough(&self) -> bool {
        self.repo.auth == AuthMode::Passthrough
    }

    /// The owner of `digest` among the cluster's nodes, when this miss asks it first: not for a
    /// peer's request (the owner never forwards), nor for a passthrough repo (its fetches go
    /// upstream with the client's own credentials, which never leave this node), nor outside a
    /// cluster.
    pub fn peer_ask(&self, digest: &Digest) -> Option<PeerAsk> {
        if self.from_peer || self.passthrough() {
            return None;
        }
        let snapshot = self.state.config.snapshot();
        if snapshot.keys.is_empty() {
            return None;
        }
        let member = self.state.peers.choose(&snapshot.members, digest)?;
        let token = self.state.peers.token(&self.state.tokens, &snapshot.keys, &member.id);
        Some(PeerAsk { peers: self.state.peers.clone(), member, token })
    }
}
