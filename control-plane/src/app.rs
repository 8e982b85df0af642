//! A whole control plane: its flags, the store they name, the bootstrap token, the server.
//! `wharf-control` runs it; `wharf dev` runs it beside an in-process node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wharf_core::token::Role;
use wharf_runtime::telemetry::TelemetryArgs;
use wharf_runtime::tls::TlsArgs;

use crate::error::ApiError;
use crate::keys;
use crate::server::run_tls;
use crate::state::ApiState;
use crate::store::{ConfigStore, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, TracedStore};
use crate::tokens::{Ensured, new_token_text};

/// The control plane's flags (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Address for gRPC and the REST gateway.
    #[arg(long, default_value = "0.0.0.0:7000", env = "WHARF_CONTROL_LISTEN")]
    pub listen: SocketAddr,
    /// etcd client URLs, comma-separated. Without it, the embedded store in --data-dir.
    #[arg(long, env = "WHARF_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd user (etcd with authentication on); its password comes from --etcd-password-file.
    #[arg(long, env = "WHARF_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password.
    #[arg(long, env = "WHARF_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// https:// etcd endpoints: the CA (PEM) that signed etcd's certificates (default: the system's roots).
    #[arg(long, env = "WHARF_ETCD_CA", value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd with --client-cert-auth: the control plane's client certificate (PEM) ...
    #[arg(long, env = "WHARF_ETCD_CERT", requires = "etcd_key", value_name = "PEM")]
    pub etcd_cert: Option<PathBuf>,
    /// ... and its key (PEM).
    #[arg(long, env = "WHARF_ETCD_KEY", requires = "etcd_cert", value_name = "PEM")]
    pub etcd_key: Option<PathBuf>,
    /// Directory of the embedded store (single machine).
    #[arg(long, default_value = "./wharf-data", env = "WHARF_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Key prefix in the store.
    #[arg(long, default_value = "/wharf/")]
    pub prefix: String,
    /// Bound on every store call: past it, API calls answer 503 / UNAVAILABLE.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,
    /// How this replica appears in the node list (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// How often the nodes' token keys rotate (a new key each period; the one before stays for
    /// another period).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "WHARF_TOKEN_KEY_ROTATION")]
    pub token_key_rotation: Duration,
    /// A file holding the first admin token: read if it exists, else created (mode 0600) with a new
    /// token. The token is added to the store if missing. Further tokens: `regctl token create`.
    #[arg(long, env = "WHARF_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Likewise a node token (role node) for the nodes' --control-plane-token-file: a deployment
    /// can make both tokens up front (Kubernetes Secrets, files beside the units).
    #[arg(long, env = "WHARF_BOOTSTRAP_NODE_TOKEN_FILE")]
    pub bootstrap_node_token_file: Option<PathBuf>,
    /// Serve the management API and the node configuration stream without any token. Anyone who
    /// can reach the port can change the configuration and read upstream credentials.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Turn peer fetch off: nodes no longer ask each blob's owner among them and each fetches from
    /// upstream itself. Set it alike on every replica of a cluster.
    #[arg(long, env = "WHARF_NO_PEER_FETCH")]
    pub no_peer_fetch: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// mTLS: require every client (nodes, regctl, REST) to present a certificate signed by this CA
    /// (PEM). Needs --tls-cert.
    #[arg(long, env = "WHARF_CLIENT_CA", requires = "tls_cert", value_name = "PEM")]
    pub client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// What it was doing (the message), and what went wrong (the source).
    #[error("{doing}")]
    Failed {
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A setting or file it cannot start with.
    #[error("{0}")]
    Refused(String),
}

/// `doing` as the context of a failure.
fn doing<E: Into<Box<dyn std::error::Error + Send + Sync>>>(doing: impl Into<String>) -> impl FnOnce(E) -> StartError {
    let doing = doing.into();
    move |e| StartError::Failed { doing, source: e.into() }
}

/// A control plane that is serving.
pub struct Control {
    pub state: ApiState,
    /// The address it listens on.
    pub local: SocketAddr,
    /// The bootstrap admin token's file, when there is one.
    pub bootstrap: Option<PathBuf>,
    /// Cancelled to stop: node streams end, the server stops accepting.
    pub cancel: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens the store the flags name, puts the bootstrap token in place (`bootstrap` when the flags
/// name no file) and starts serving. Call inside the runtime, with logging set up.
pub async fn start(args: &ControlArgs, bootstrap: Option<PathBuf>) -> Result<Control, StartError> {
    if args.token_key_rotation < Duration::from_secs(600) {
        return Err(StartError::Refused(format!(
            "--token-key-rotation {} is shorter than 10 minutes: tokens issued under a key must outlive it",
            humantime::format_duration(args.token_key_rotation)
        )));
    }
    let tls = args.tls.server_tls(args.client_ca.as_deref()).map_err(doing("--tls-cert / --tls-key / --client-ca"))?;
    let tls_on = tls.is_some();
    let store = open_store(args).await?;
    let listener = TcpListener::bind(args.listen).await.map_err(doing(format!("binding {}", args.listen)))?;
    let local = listener.local_addr().map_err(doing("reading the listen address"))?;
    let cancel = CancellationToken::new();
    let mut state = ApiState::new(store, args.advertise.clone().unwrap_or_else(|| local.to_string()), cancel.clone())
        .with_metrics()
        .map_err(doing("installing the metrics recorder"))?;
    if args.insecure_no_auth {
        state = state.insecure_no_auth();
    }
    state.peer_fetch = !args.no_peer_fetch;
    let bootstrap = args.bootstrap_token_file.clone().or(bootstrap);
    if let Some(path) = &bootstrap {
        ensure_bootstrap(&state, path, Role::Admin, args.store_timeout).await?;
    }
    if let Some(path) = &args.bootstrap_node_token_file {
        ensure_bootstrap(&state, path, Role::Node, args.store_timeout).await?;
    }
    tokio::spawn(keys::run(state.store.clone(), args.token_key_rotation, cancel.clone()));
    tracing::info!(addr = %local, tls = tls_on, client_ca = args.client_ca.is_some(), "listening");
    let stop = cancel.clone();
    let server = tokio::spawn(run_tls(listener, state.clone(), tls, async move { stop.cancelled().await }));
    Ok(Control { state, local, bootstrap, cancel, server })
}

/// The store the flags name (etcd, else the embedded store in `--data-dir`), a span per call.
async fn open_store(args: &ControlArgs) -> Result<Arc<dyn ConfigStore>, StartError> {
    let store: Arc<dyn ConfigStore> = if args.etcd.is_empty() {
        let opts = EmbeddedOptions { prefix: args.prefix.clone(), timeout: args.store_timeout, ..Default::default() };
        let store = EmbeddedStore::open_with(&args.data_dir, opts)
            .await
            .map_err(doing(format!("opening the embedded store in {}", args.data_dir.display())))?;
        tracing::info!(data_dir = %args.data_dir.display(), "using the embedded store");
        Arc::new(store)
    } else {
        let user = match (&args.etcd_user, &args.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .map_err(doing(format!("reading the etcd password from {}", file.display())))?;
                Some((user.clone(), password.trim_end_matches(['\r', '\n']).to_owned()))
            }
            _ => None,
        };
        let tls_files = wharf_runtime::tls::ClientTlsFiles {
            ca: args.etcd_ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
        };
        let tls = if args.etcd.iter().any(|e| e.starts_with("https://")) {
            Some(tls_files.tonic_config().map_err(doing("--etcd-ca / --etcd-cert / --etcd-key"))?)
        } else {
            if args.etcd_ca.is_some() || args.etcd_cert.is_some() {
                return Err(StartError::Refused("--etcd-ca and --etcd-cert need https:// etcd endpoints".into()));
            }
            None
        };
        let opts = EtcdOptions {
            prefix: args.prefix.clone(),
            timeout: args.store_timeout,
            user,
            tls,
            ..EtcdOptions::new(args.etcd.clone())
        };
        let store = EtcdStore::connect(opts).await.map_err(doing("connecting to etcd"))?;
        tracing::info!(endpoints = ?args.etcd, "using etcd");
        Arc::new(store)
    };
    // A span per store call (nothing recorded but the operation, key and outcome).
    Ok(Arc::new(TracedStore::new(store)))
}

/// Stores the admin token of `path` (written there first when missing): before listening when the
/// store answers, so the token works from the first call; else in the background until it does.
async fn ensure_bootstrap(
    state: &ApiState,
    path: &Path,
    role: Role,
    store_timeout: Duration,
) -> Result<(), StartError> {
    let description = format!("bootstrap {role}");
    let token = token_file(path)?;
    let id = wharf_core::Presented::parse(&token)
        .ok_or_else(|| {
            StartError::Refused(format!("{} does not hold a Wharf token (wharf_<id>_<secret>)", path.display()))
        })?
        .id;
    match state.tokens.ensure(&token, role, &description).await {
        Ok(Ensured::Revoked) => tracing::warn!(
            path = %path.display(),
            token_id = %id,
            "the bootstrap token was revoked and stays so (to have a new one made, remove the file and restart)"
        ),
        Ok(found) => {
            tracing::info!(path = %path.display(), %role, ?found, "bootstrap token in place");
            if !state.hub.wait_for(store_timeout, |p| p.tokens.contains_key(&id)).await {
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
                    match tokens.ensure(&token, role, &description).await {
                        Ok(found) => return tracing::info!(%role, ?found, "bootstrap token checked"),
                        Err(ApiError::Unavailable(_)) => backoff = (backoff * 2).min(Duration::from_secs(5)),
                        Err(e) => return tracing::error!(error = %e, "bootstrap token refused"),
                    }
                }
            });
        }
        Err(e) => return Err(doing(format!("bootstrap token in {}", path.display()))(e)),
    }
    Ok(())
}

/// The token in `path`; a new one is written there (mode 0600) when the file does not exist.
pub fn token_file(path: &Path) -> Result<String, StartError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(StartError::Refused(format!("the token file {} is empty", path.display())));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(doing(format!("creating {}", dir.display())))?;
            }
            let token = new_token_text();
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                f.write_all(format!("{token}\n").as_bytes())?;
                f.sync_all()
            };
            write().map_err(doing(format!("creating the token file {}", path.display())))?;
            tracing::info!(path = %path.display(), "wrote a new token file");
            Ok(token)
        }
        Err(e) => Err(doing(format!("reading the token file {}", path.display()))(e)),
    }
}
