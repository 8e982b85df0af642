//! What requests share ([`AppState`]) and one request resolved against the configuration ([`Ctx`]):
//! below the handlers that use them.

use std::sync::Arc;

use http::HeaderMap;
use metrics_exporter_prometheus::PrometheusHandle;
use wharf_core::{AuthMode, Repo};

use crate::config::Config;
use crate::credentials::ClientCredentials;
use crate::decisions::Decisions;
use crate::flight::Flights;
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
}

impl AppState {
    pub fn new(config: Arc<Config>, store: Arc<Store>, upstream: Arc<Upstream>) -> Self {
        let decisions =
            Arc::new(Decisions::new(upstream.options().passthrough_auth_ttl, Decisions::DEFAULT_MAX_ENTRIES));
        Self { config, store, upstream, flights: Arc::default(), decisions, metrics: None }
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
    pub headers: HeaderMap,
    pub query: Option<String>,
    pub head: bool,
    /// Passthrough repos: the client's credentials, presented upstream (`None`: anonymous).
    pub client: Option<Arc<ClientCredentials>>,
}

impl Ctx {
    /// Whether cached content needs the upstream's decision for this client first.
    pub fn passthrough(&self) -> bool {
        self.repo.auth == AuthMode::Passthrough
    }
}
