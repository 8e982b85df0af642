//! `wharf`: the all-in-one binary for one machine. `wharf dev` runs a control plane and one node
//! in one process: the only place where both planes meet.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wharf_control::app::{self, ControlArgs};
use wharf_control::repos::RepoSpec;
use wharf_control::state::ApiState;
use wharf_control::tokens::Ensured;
use wharf_core::Secret;
use wharf_core::token::Role;
use wharf_proxy::node::{ConfigSource, NodeOptions, run_node};
use wharf_runtime::ShutdownSignals;

/// Wharf on one machine. For production, run `wharf-control` and `wharf-proxy` (see the README).
#[derive(Parser)]
#[command(version = wharf_core::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Development mode: a control plane (the embedded store in --data-dir unless --etcd) and one
    /// data-plane node in this process; the dockerhub, ghcr and quay repos are created when the
    /// store is empty, and an admin token is written to <data-dir>/admin.token (printed at
    /// start-up).
    ///
    /// Examples:
    ///   wharf dev                                  # control plane on :7000, node on :5000
    ///   wharf dev --dev-node-listen 127.0.0.1:5001 --dev-cache-dir /tmp/wharf-cache
    #[command(verbatim_doc_comment)]
    Dev(DevArgs),
}

#[derive(clap::Args)]
struct DevArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The node's registry address.
    #[arg(long, default_value = "0.0.0.0:5000")]
    dev_node_listen: SocketAddr,
    /// The node's cache directory.
    #[arg(long, default_value = "./wharf-cache")]
    dev_cache_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Dev(args) = Cli::parse().command;
    dev(args).await
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let control_args = &args.control;
    let telemetry = wharf_runtime::telemetry::init(&control_args.telemetry.options("wharf-control"))?;
    let mut signals = ShutdownSignals::new().context("listening for SIGTERM and SIGINT")?;
    if control_args.tls.tls_cert.is_some() {
        anyhow::bail!(
            "wharf dev runs its node against its control plane over plain http: it cannot be combined with --tls-cert (run wharf-control and wharf-proxy with --control-plane-ca instead)"
        );
    }
    let control = app::start(control_args, Some(control_args.data_dir.join("admin.token"))).await?;
    seed_repos(&control.state).await?;
    if let Some(path) = &control.bootstrap {
        eprintln!("\n  dev mode: admin token in {} (export WHARF_TOKEN=$(cat {}))\n", path.display(), path.display());
    }
    // The in-process node follows the control plane like any other: with a node token.
    let token_path = control_args.data_dir.join("node.token");
    let node_token = app::token_file(&token_path)?;
    let found = control
        .state
        .tokens
        .ensure(&node_token, Role::Node, "dev node")
        .await
        .context("storing the dev node's token")?;
    anyhow::ensure!(
        found != Ensured::Revoked,
        "the dev node's token was revoked: remove {} and start again",
        token_path.display()
    );
    let node = start_node(&args, &control, Secret::new(node_token), control.cancel.clone()).await?;

    let mut server = control.server;
    tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down: ending node streams, finishing in-flight calls");
        }
        r = &mut server => {
            control.cancel.cancel();
            return r?.context("server");
        }
    }
    control.cancel.cancel();
    tokio::select! {
        r = async {
            node.await?.context("dev node")?;
            server.await?.context("server")
        } => r?,
        _ = tokio::time::sleep(control_args.shutdown_grace) => tracing::warn!("shutdown grace period over"),
        s = signals.recv() => tracing::warn!(signal = s, "second signal; exiting at once"),
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}

/// dockerhub, ghcr and quay, when the store holds no repo.
async fn seed_repos(state: &ApiState) -> anyhow::Result<()> {
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

async fn start_node(
    args: &DevArgs,
    control: &app::Control,
    token: Secret,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), wharf_proxy::node::NodeError>>> {
    let listener =
        TcpListener::bind(args.dev_node_listen).await.with_context(|| format!("binding {}", args.dev_node_listen))?;
    let node_addr = listener.local_addr()?;
    let opts = NodeOptions {
        cache_dir: args.dev_cache_dir.clone(),
        mirror_listener: None,
        default_mirror: None,
        tokens: Default::default(),
        blob_reverify_after: std::time::Duration::from_secs(24 * 3600),
        scrub_rate: 0,
        scrub_interval: std::time::Duration::from_secs(24 * 3600),
        source: ConfigSource::ControlPlanes {
            endpoints: vec![format!("http://127.0.0.1:{}", control.local.port())],
            node_id: format!("dev-{}", node_addr.port()),
            address: node_addr.to_string(),
            token: Some(token),
            // One node: nobody to fetch from.
            peer_url: String::new(),
        },
        upstream: Default::default(),
        shutdown_grace: args.control.shutdown_grace,
        // One recorder per process: the node's metrics are the control plane's too.
        metrics: control.state.metrics.clone(),
        eviction: Default::default(),
        limits: Default::default(),
        max_upstream_fetches: wharf_proxy::flight::Flights::DEFAULT_MAX_FETCHES,
        tls: None,
        control_plane_tls: Default::default(),
        peers: Default::default(),
    };
    tracing::info!(node = %node_addr, cache_dir = %args.dev_cache_dir.display(), "dev mode: starting a node in-process");
    Ok(tokio::spawn(run_node(listener, opts, cancel)))
}
