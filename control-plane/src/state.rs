//! What every API call needs: the store and the services over it, shared by gRPC, REST and the
//! node streams.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::hub::ConfigHub;
use crate::nodes::{self, Connected, Nodes};
use crate::repos::Repos;
use crate::store::ConfigStore;
use crate::tokens::Tokens;

/// What every API call needs.
#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn ConfigStore>,
    pub repos: Repos,
    pub tokens: Tokens,
    pub nodes: Nodes,
    pub hub: Arc<ConfigHub>,
    pub connected: Arc<Connected>,
    /// This replica's address, as nodes see it in the node list.
    pub replica: String,
    /// Cancelled at shutdown: Watch streams end so nodes move to another replica at once.
    pub cancel: CancellationToken,
    /// Renders `/metrics` (absent when no recorder was installed, as in unit tests).
    pub metrics: Option<PrometheusHandle>,
    /// `--insecure-no-auth`: every call is allowed without a token.
    pub insecure_no_auth: bool,
    /// Nodes fetch a blob from its owner among them (off: `--no-peer-fetch`, no members streamed).
    pub peer_fetch: bool,
}

impl ApiState {
    pub fn new(store: Arc<dyn ConfigStore>, replica: String, cancel: CancellationToken) -> Self {
        let connected: Arc<Connected> = Arc::default();
        let nodes = Nodes::new(store.clone());
        tokio::spawn(nodes::keep_alive(store.clone(), connected.clone(), nodes.clone(), cancel.clone()));
        Self {
            repos: Repos::new(store.clone()),
            tokens: Tokens::new(store.clone()),
            nodes,
            hub: ConfigHub::start(store.clone(), cancel.clone()),
            connected,
            replica,
            cancel,
            store,
            metrics: None,
            insecure_no_auth: false,
            peer_fetch: true,
        }
    }

    /// Lets every call through without a token (`--insecure-no-auth`).
    pub fn insecure_no_auth(mut self) -> Self {
        tracing::warn!(
            "--insecure-no-auth: the management API and the node configuration stream (which carries upstream credentials) are open to anyone who can reach this port"
        );
        self.insecure_no_auth = true;
        self
    }

    /// Installs the process-wide Prometheus recorder and serves it at `/metrics`.
    pub fn with_metrics(mut self) -> Result<Self, metrics_exporter_prometheus::BuildError> {
        self.metrics = Some(wharf_runtime::metrics::install()?);
        Ok(self)
    }
}
