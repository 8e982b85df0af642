//! `wharf-control`: Wharf's control plane.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use wharf_control::app::{self, ControlArgs};
use wharf_runtime::ShutdownSignals;

/// Wharf's control plane: repos in etcd (or the embedded store), gRPC and REST (/api/repos) on one
/// port, configuration streamed to every data-plane node.
///
/// Examples:
///   wharf-control --etcd http://e1:2379,http://e2:2379 --listen 0.0.0.0:7000
///   wharf-control --data-dir /var/lib/wharf --listen 0.0.0.0:7000
///   wharf dev                                             # embedded store + one node on :5000
#[derive(Parser)]
#[command(version = wharf_core::VERSION, about, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    control: ControlArgs,
    /// Moved: the all-in-one development mode is `wharf dev` (`make run`).
    #[arg(long, hide = true)]
    dev: bool,
    #[arg(long, hide = true)]
    dev_node_listen: Option<String>,
    #[arg(long, hide = true)]
    dev_cache_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.dev || args.dev_node_listen.is_some() || args.dev_cache_dir.is_some() {
        anyhow::bail!(
            "wharf-control no longer runs a node in-process: the development mode is `wharf dev` (same flags: --listen, --data-dir, --dev-node-listen, --dev-cache-dir), which `make run` starts"
        );
    }
    let args = args.control;
    let telemetry = wharf_runtime::telemetry::init(&args.telemetry.options("wharf-control"))?;
    let mut signals = ShutdownSignals::new().context("listening for SIGTERM and SIGINT")?;
    let control = app::start(&args, None).await?;
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
        r = &mut server => r?.context("server")?,
        _ = tokio::time::sleep(args.shutdown_grace) => tracing::warn!("shutdown grace period over"),
        s = signals.recv() => tracing::warn!(signal = s, "second signal; exiting at once"),
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}
