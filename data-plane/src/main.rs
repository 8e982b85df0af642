//! `wharf-proxy`: a Wharf data-plane node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use wharf_proxy::config::{self, Config, Snapshot};
use wharf_proxy::store::Store;
use wharf_proxy::upstream::{Upstream, UpstreamOptions};
use wharf_proxy::{AppState, run};

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// A Wharf data-plane node: a pull-through cache serving the OCI distribution pull API.
///
/// Clients pull `<node>/<repoKey>/<image>:<tag>`, for example
/// `docker pull localhost:5000/dockerhub/library/alpine:3.20`.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve the registry API on.
    #[arg(long, default_value = "0.0.0.0:5000", env = "WHARF_LISTEN")]
    listen: SocketAddr,
    /// Cache directory (blobs, manifests, tags, staging).
    #[arg(long, default_value = "./wharf-cache", env = "WHARF_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Standalone configuration: a TOML file of [[repo]] tables.
    #[arg(long, env = "WHARF_CONFIG")]
    config: PathBuf,
    #[arg(long, value_enum, default_value = "text", env = "WHARF_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter: a level (info, debug) or tracing directives (wharf_proxy=debug,info).
    #[arg(long, default_value = "info", env = "WHARF_LOG_LEVEL")]
    log_level: String,
    /// Upstream connect timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Longest wait for an upstream's response head.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    first_byte_timeout: Duration,
    /// Longest silence between two chunks of an upstream body.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Extra attempts on upstream connection errors, timeouts, 5xx and 429.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// First backoff between retries (doubles each time, with jitter).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    retry_backoff: Duration,
    /// How long in-flight responses may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format, &args.log_level)?;

    let snapshot: Snapshot = config::load_file(&args.config)?;
    for repo in snapshot.repos.values() {
        tracing::info!(repo_key = %repo.key, kind = %repo.kind, upstream = %repo.upstream,
            tag_ttl = %config::fmt_duration(repo.tag_ttl), credentials = repo.credentials.is_some(), "repo configured");
    }
    let cache_dir = args.cache_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(cache_dir))
        .await?
        .with_context(|| format!("opening cache dir {}", args.cache_dir.display()))?;
    let upstream = Upstream::new(UpstreamOptions {
        connect_timeout: args.connect_timeout,
        first_byte_timeout: args.first_byte_timeout,
        idle_timeout: args.idle_timeout,
        retries: args.retries,
        retry_backoff: args.retry_backoff,
        ..UpstreamOptions::default()
    })?;
    let state = AppState::new(Arc::new(Config::new(snapshot)), Arc::new(store), Arc::new(upstream));

    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, cache_dir = %args.cache_dir.display(), "listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, state, async {
        let _ = stop_rx.await;
    }));
    let signal = shutdown_signal().await;
    tracing::info!(signal, grace = %config::fmt_duration(args.shutdown_grace), "shutting down: no new connections, finishing in-flight responses");
    let _ = stop_tx.send(());
    tokio::select! {
        r = server => { r??; tracing::info!("in-flight responses finished"); }
        _ = tokio::time::sleep(args.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; dropping the remaining responses");
        }
        s = shutdown_signal() => { tracing::warn!(signal = s, "second signal; exiting at once"); }
    }
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        unreachable!()
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}
