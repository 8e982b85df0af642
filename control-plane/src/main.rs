//! `wharf-control`: Wharf's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wharf_control::error::ApiError;
use wharf_control::repos::RepoSpec;
use wharf_control::server::{ApiState, run_tls};
use wharf_control::store::{ConfigStore, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, TracedStore};
use wharf_control::tokens::Ensured;
use wharf_core::Secret;
use wharf_core::token::Role;
use wharf_proxy::telemetry::{ShutdownSignals, TelemetryArgs};
use wharf_proxy::tls::TlsArgs;

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
    /// etcd user (etcd with authentication on); its password comes from --etcd-password-file.
    #[arg(long, env = "WHARF_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// A file holding the etcd user's password.
    #[arg(long, env = "WHARF_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// https:// etcd endpoints: the CA (PEM) that signed etcd's certificates (default: the system's roots).
    #[arg(long, env = "WHARF_ETCD_CA", value_name = "PEM")]
    etcd_ca: Option<PathBuf>,
    /// etcd with --client-cert-auth: the control plane's client certificate (PEM) ...
    #[arg(long, env = "WHARF_ETCD_CERT", requires = "etcd_key", value_name = "PEM")]
    etcd_cert: Option<PathBuf>,
    /// ... and its key (PEM).
    #[arg(long, env = "WHARF_ETCD_KEY", requires = "etcd_cert", value_name = "PEM")]
    etcd_key: Option<PathBuf>,
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
    /// A file holding the first admin token: read if it exists, else created (mode 0600) with a new
    /// token. The token is added to the store if missing. Further tokens: `regctl token create`.
    #[arg(long, env = "WHARF_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Serve the management API and the node configuration stream without any token. Anyone who
    /// can reach the port can change the configuration and read upstream credentials.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Development mode: also run one data-plane node in this process, create the dockerhub, ghcr
    /// and quay repos when the store is empty, and an admin token in <data-dir>/admin.token
    /// (printed at start-up).
    #[arg(long)]
    dev: bool,
    /// --dev: the node's registry address.
    #[arg(long, default_value = "0.0.0.0:5000")]
    dev_node_listen: SocketAddr,
    /// --dev: the node's cache directory.
    #[arg(long, default_value = "./wharf-cache")]
    dev_cache_dir: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
    /// mTLS: require every client (nodes, regctl, REST) to present a certificate signed by this CA
    /// (PEM). Needs --tls-cert.
    #[arg(long, env = "WHARF_CLIENT_CA", requires = "tls_cert", value_name = "PEM")]
    client_ca: Option<PathBuf>,
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
    let mut signals = ShutdownSignals::new().context("listening for SIGTERM and SIGINT")?;
    if args.dev && args.tls.tls_cert.is_some() {
        anyhow::bail!(
            "--dev runs its node against this control plane over plain http: it cannot be combined with --tls-cert (run wharf-proxy with --control-plane-ca instead)"
        );
    }
    let tls = args.tls.server_tls(args.client_ca.as_deref()).context("--tls-cert / --tls-key / --client-ca")?;
    let tls_on = tls.is_some();
    let store: Arc<dyn ConfigStore> = if args.etcd.is_empty() {
        let opts = EmbeddedOptions { prefix: args.prefix.clone(), timeout: args.store_timeout, ..Default::default() };
        let store = EmbeddedStore::open_with(&args.data_dir, opts)
            .await
            .with_context(|| format!("opening the embedded store in {}", args.data_dir.display()))?;
        tracing::info!(data_dir = %args.data_dir.display(), "using the embedded store");
        Arc::new(store)
    } else {
        let user = match (&args.etcd_user, &args.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the etcd password from {}", file.display()))?;
                Some((user.clone(), password.trim_end_matches(['\r', '\n']).to_owned()))
            }
            _ => None,
        };
        let tls_files = wharf_proxy::tls::ClientTlsFiles {
            ca: args.etcd_ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
        };
        let tls = if args.etcd.iter().any(|e| e.starts_with("https://")) {
            Some(tls_files.tonic_config().context("--etcd-ca / --etcd-cert / --etcd-key")?)
        } else {
            anyhow::ensure!(
                args.etcd_ca.is_none() && args.etcd_cert.is_none(),
                "--etcd-ca and --etcd-cert need https:// etcd endpoints"
            );
            None
        };
        let opts = EtcdOptions {
            prefix: args.prefix.clone(),
            timeout: args.store_timeout,
            user,
            tls,
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
    let mut state = ApiState::new(store, args.advertise.clone().unwrap_or_else(|| local.to_string()), cancel.clone())
        .with_metrics()
        .context("installing the metrics recorder")?;
    if args.insecure_no_auth {
        state = state.insecure_no_auth();
    }
    let bootstrap = args.bootstrap_token_file.clone().or_else(|| args.dev.then(|| args.data_dir.join("admin.token")));
    if let Some(path) = &bootstrap {
        let token = token_file(path)?;
        let id = wharf_core::Presented::parse(&token)
            .with_context(|| format!("{} does not hold a Wharf token (wharf_<id>_<secret>)", path.display()))?
            .id;
        // Before listening when the store answers, so the token works from the first call; else
        // in the background until it does.
        match state.tokens.ensure(&token, Role::Admin, "bootstrap").await {
            Ok(Ensured::Revoked) => tracing::warn!(
                path = %path.display(),
                token_id = %id,
                "the bootstrap token was revoked and stays so (to have a new one made, remove the file and restart)"
            ),
            Ok(found) => {
                tracing::info!(path = %path.display(), ?found, "bootstrap admin token in place");
                if !state.hub.wait_for(args.store_timeout, |p| p.tokens.contains_key(&id)).await {
                    tracing::warn!("the bootstrap token is stored but not loaded yet");
                }
            }
            Err(ApiError::Unavailable(e)) => {
                tracing::warn!(error = %e, "could not store the bootstrap token yet; retrying in the background");
                let tokens = state.tokens.clone();
                tokio::spawn(async move {
                    let mut backoff = Duration::from_millis(200);
                    loop {
                        tokio::time::sleep(backoff).await;
                        match tokens.ensure(&token, Role::Admin, "bootstrap").await {
                            Ok(found) => return tracing::info!(?found, "bootstrap admin token checked"),
                            Err(ApiError::Unavailable(_)) => backoff = (backoff * 2).min(Duration::from_secs(5)),
                            Err(e) => return tracing::error!(error = %e, "bootstrap token refused"),
                        }
                    }
                });
            }
            Err(e) => return Err(e).with_context(|| format!("bootstrap token in {}", path.display())),
        }
    }
    if args.dev {
        seed_dev_repos(&state).await?;
        if let Some(path) = &bootstrap {
            eprintln!(
                "\n  dev mode: admin token in {} (export WHARF_TOKEN=$(cat {}))\n",
                path.display(),
                path.display()
            );
        }
    }
    tracing::info!(addr = %local, tls = tls_on, client_ca = args.client_ca.is_some(), "listening");
    let metrics = state.metrics.clone();
    let state_tokens = state.tokens.clone();
    let stop = cancel.clone();
    let server = tokio::spawn(run_tls(listener, state, tls, async move { stop.cancelled().await }));
    let node = if args.dev {
        // The in-process node follows this control plane like any other: with a node token.
        let node_token = token_file(&args.data_dir.join("node.token"))?;
        let found =
            state_tokens.ensure(&node_token, Role::Node, "dev node").await.context("storing the dev node's token")?;
        anyhow::ensure!(
            found != Ensured::Revoked,
            "the dev node's token was revoked: remove {} and start again",
            args.data_dir.join("node.token").display()
        );
        Some(start_dev_node(&args, local, metrics, Secret::new(node_token), cancel.clone()).await?)
    } else {
        None
    };

    let mut server = server;
    tokio::select! {
        signal = signals.recv() => {
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
        s = signals.recv() => tracing::warn!(signal = s, "second signal; exiting at once"),
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}

/// The token in `path`; a new one is written there (mode 0600) when the file does not exist.
fn token_file(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let token = wharf_control::tokens::new_token_text();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating the token file {}", path.display()))?;
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "wrote a new token file");
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading the token file {}", path.display())),
    }
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
    token: Secret,
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
            token: Some(token),
        },
        upstream: Default::default(),
        shutdown_grace: args.shutdown_grace,
        metrics,
        eviction: Default::default(),
        limits: Default::default(),
        max_upstream_fetches: wharf_proxy::flight::Flights::DEFAULT_MAX_FETCHES,
        tls: None,
        control_plane_tls: Default::default(),
    };
    tracing::info!(node = %node_addr, cache_dir = %args.dev_cache_dir.display(), "dev mode: starting a node in-process");
    Ok(tokio::spawn(run_node(listener, opts, cancel)))
}
