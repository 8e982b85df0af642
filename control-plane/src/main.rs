//! `wharf-control`: Wharf's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wharf_control::repos::RepoSpec;
use wharf_control::server::{ApiState, run};
use wharf_control::store::{ConfigStore, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, TracedStore};
use wharf_proxy::telemetry::{TelemetryArgs, shutdown_signal};

/// Wharf's control plane: repos in etcd (or the embedded store), gRPC and REST (/api/repos) on one
/// port, configuration streamed to every data-plane node.
///
/// Examples:
///   wharf-control --dev                                   # embedded store + one node on :5000
///   wharf-control --etcd http://e1:2379,http://e2:2379 --listen 0.0.0.0:7000
///   wharf-control --data-dir /var/lib/wharf --listen 0.0.0.0:7000
#[derive(Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Args {
    /// Address for gRPC and the REST gateway.
    #[arg(long, default_value = "0.0.0.0:7000", env = "WHARF_CONTROL_LISTEN")]
    listen: SocketAddr,
    /// etcd client URLs, comma-separated. Without it, the embedded store in --data-dir.
    #[arg(long, env = "WHARF_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Directory of the embedded store (single machine).
    #[arg(long, default_value = "./wharf-data", env = "WHARF_DATA_DIR")]
    data_dir: PathBuf,
    /// Key prefix in the store.
    #[arg(long, default_value = "/wharf/")]
    prefix: String,
    /// Bound on every store call: past it, API calls answer 503 / UNAVAILABLE.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    store_timeout: Duration,
    /// How this replica appears in the node list (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Development mode: also run one data-plane node in this process, and create the dockerhub,
    /// ghcr and quay repos when the store is empty.
    #[arg(long)]
    dev: bool,
    /// --dev: the node's registry address.
    #[arg(long, default_value = "0.0.0.0:5000")]
    dev_node_listen: SocketAddr,
    /// --dev: the node's cache directory.
    #[arg(long, default_value = "./wharf-cache")]
    dev_cache_dir: PathBuf,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = wharf_proxy::telemetry::init(&args.telemetry.options("wharf-control"))?;
    let store: Arc<dyn ConfigStore> = if args.etcd.is_empty() {
        let opts = EmbeddedOptions { prefix: args.prefix.clone(), timeout: args.store_timeout, ..Default::default() };
        let store = EmbeddedStore::open_with(&args.data_dir, opts)
            .await
            .with_context(|| format!("opening the embedded store in {}", args.data_dir.display()))?;
        tracing::info!(data_dir = %args.data_dir.display(), "using the embedded store");
        Arc::new(store)
    } else {
        let opts = EtcdOptions {
            prefix: args.prefix.clone(),
            timeout: args.store_timeout,
            ..EtcdOptions::new(args.etcd.clone())
        };
        let store = EtcdStore::connect(opts).await.context("connecting to etcd")?;
        tracing::info!(endpoints = ?args.etcd, "using etcd");
        Arc::new(store)
    };
    // A span per store call (nothing recorded but the operation, key and outcome).
    let store: Arc<dyn ConfigStore> = Arc::new(TracedStore::new(store));
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let state = ApiState::new(store, args.advertise.clone().unwrap_or_else(|| local.to_string()), cancel.clone())
        .with_metrics()
        .context("installing the metrics recorder")?;
    if args.dev {
        seed_dev_repos(&state).await?;
    }
    tracing::info!(addr = %local, "listening");
    let metrics = state.metrics.clone();
    let stop = cancel.clone();
    let server = tokio::spawn(run(listener, state, async move { stop.cancelled().await }));
    let node = if args.dev { Some(start_dev_node(&args, local, metrics, cancel.clone()).await?) } else { None };

    let mut server = server;
    tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal, "shutting down: ending node streams, finishing in-flight calls");
        }
        r = &mut server => {
            cancel.cancel();
            return r?.context("server");
        }
    }
    cancel.cancel();
    let grace = args.shutdown_grace;
    tokio::select! {
        r = async {
            if let Some(node) = node {
                node.await?.context("dev node")?;
            }
            server.await?.context("server")
        } => r?,
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period over"),
        s = shutdown_signal() => tracing::warn!(signal = s, "second signal; exiting at once"),
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}

async fn seed_dev_repos(state: &ApiState) -> anyhow::Result<()> {
    let (repos, _) = state.repos.list().await.context("listing repos")?;
    if !repos.is_empty() {
        return Ok(());
    }
    for kind in ["dockerhub", "ghcr", "quay"] {
        let spec = RepoSpec { key: kind.into(), kind: Some(kind.into()), ..Default::default() };
        state.repos.create(spec).await.with_context(|| format!("creating repo {kind}"))?;
    }
    tracing::info!("store was empty: created the dockerhub, ghcr and quay repos");
    Ok(())
}

async fn start_dev_node(
    args: &Args,
    control: SocketAddr,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), wharf_proxy::node::NodeError>>> {
    use wharf_proxy::node::{ConfigSource, NodeOptions, run_node};
    let listener =
        TcpListener::bind(args.dev_node_listen).await.with_context(|| format!("binding {}", args.dev_node_listen))?;
    let node_addr = listener.local_addr()?;
    let endpoint = format!("http://127.0.0.1:{}", control.port());
    let opts = NodeOptions {
        cache_dir: args.dev_cache_dir.clone(),
        source: ConfigSource::ControlPlanes {
            endpoints: vec![endpoint],
            node_id: format!("dev-{}", node_addr.port()),
            address: node_addr.to_string(),
        },
        upstream: Default::default(),
        shutdown_grace: args.shutdown_grace,
        metrics,
        eviction: Default::default(),
        limits: Default::default(),
        max_upstream_fetches: wharf_proxy::flight::Flights::DEFAULT_MAX_FETCHES,
    };
    tracing::info!(node = %node_addr, cache_dir = %args.dev_cache_dir.display(), "dev mode: starting a node in-process");
    Ok(tokio::spawn(run_node(listener, opts, cancel)))
}
