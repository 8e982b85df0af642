//! `wharf-proxy`: a Wharf data-plane node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wharf_proxy::evict::SizeSpec;
use wharf_proxy::node::{ConfigSource, EvictionOptions, NodeOptions, TokenOptions, run_node};
use wharf_proxy::peers::PeerOptions;
use wharf_proxy::upstream::UpstreamOptions;
use wharf_runtime::ServerLimits;
use wharf_runtime::ShutdownSignals;
use wharf_runtime::telemetry::TelemetryArgs;
use wharf_runtime::tls::{ClientTlsFiles, TlsArgs};

/// A Wharf data-plane node: a pull-through cache serving the OCI distribution pull API.
///
/// Clients pull `<node>/<repoKey>/<image>:<tag>`, for example
/// `docker pull localhost:5000/dockerhub/library/alpine:3.20`.
/// Its repos come from a TOML file (`--config`) or from control planes (`--control-plane`).
#[derive(Parser)]
#[command(version = wharf_core::VERSION, about)]
struct Args {
    /// Address to serve the registry API on.
    #[arg(long, default_value = "0.0.0.0:5000", env = "WHARF_LISTEN")]
    listen: SocketAddr,
    /// Also serve a mirror-only port: there no path is read as <repoKey>/<name>, every request goes
    /// to the repo chosen by ?ns=, the Host header or the default mirror (for dockerd's
    /// registry-mirrors and containerd's hosts.toml, with no name taken for a repoKey).
    #[arg(long, env = "WHARF_MIRROR_LISTEN")]
    mirror_listen: Option<SocketAddr>,
    /// The repo requests without a repoKey, ?ns= or repo host name go to (dockerd's
    /// registry-mirrors). Default: the config file's default_mirror, else the repo mirroring docker.io.
    #[arg(long, env = "WHARF_DEFAULT_MIRROR")]
    default_mirror: Option<wharf_core::RepoKey>,
    /// How long a token from the node's token endpoint (/v2/token) lives.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, env = "WHARF_TOKEN_TTL")]
    token_ttl: Duration,
    /// The token endpoint's URL as clients reach it, for the realm of challenges (behind a load
    /// balancer or TLS terminator: https://wharf.example.com/v2/token). Default: built from each
    /// request's Host and this port's scheme.
    #[arg(long, env = "WHARF_TOKEN_REALM")]
    token_realm: Option<String>,
    /// A cached blob is hashed while it is served the first time after start, and again when its
    /// last check is older than this (0s: on every read): a file changed on disk is never served
    /// whole.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "WHARF_BLOB_REVERIFY_AFTER")]
    blob_reverify_after: Duration,
    /// The scrubber re-hashes every cached blob and manifest, reading at most this many MB/s
    /// (10^6 bytes), and removes what does not match; 0: off.
    #[arg(long, default_value_t = 5.0, env = "WHARF_SCRUB_RATE")]
    scrub_rate: f64,
    /// Time between the scrubber's passes (the first one this long after start).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "WHARF_SCRUB_INTERVAL")]
    scrub_interval: Duration,
    /// Cache directory (blobs, manifests, tags, staging, config.snapshot, token.key).
    #[arg(long, default_value = "./wharf-cache", env = "WHARF_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Standalone configuration: a TOML file of [[repo]] tables.
    #[arg(long, env = "WHARF_CONFIG", conflicts_with = "control_plane", required_unless_present = "control_plane")]
    config: Option<PathBuf>,
    /// Managed mode: control-plane endpoints, comma-separated (http://cp1:7000,http://cp2:7000).
    #[arg(long, env = "WHARF_CONTROL_PLANE", value_delimiter = ',')]
    control_plane: Vec<String>,
    /// This node's id in the node list (default: the host name and listen port).
    #[arg(long, env = "WHARF_NODE_ID")]
    node_id: Option<String>,
    /// Managed mode: a file holding this node's token (role `node`, from `regctl token create
    /// --role node`). The control plane gives its configuration (with upstream credentials) only
    /// to nodes that present one.
    #[arg(long, env = "WHARF_CONTROL_PLANE_TOKEN_FILE")]
    control_plane_token_file: Option<PathBuf>,
    /// Where clients reach this node, as shown in the node list (default: the listen address).
    #[arg(long, env = "WHARF_ADVERTISE")]
    advertise: Option<String>,
    /// Peer fetch (managed mode): the URL of this node's registry port as the other nodes reach
    /// it; each blob is then fetched from upstream by its owner among the nodes only (default:
    /// from --advertise, else the listen address with the host name for 0.0.0.0). "off": this
    /// node neither asks nor serves peers.
    #[arg(long, env = "WHARF_PEER_URL")]
    peer_url: Option<String>,
    /// Peer fetch: longest wait for a peer to connect and answer; past it, the node fetches from
    /// upstream itself and skips that peer for --peer-suspect-for.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, env = "WHARF_PEER_TIMEOUT")]
    peer_timeout: Duration,
    /// Peer fetch: how long a peer that failed (unreachable, refused, cut off, wrong bytes) is skipped.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "WHARF_PEER_SUSPECT_FOR")]
    peer_suspect_for: Duration,
    /// Peer fetch with https:// peers: the CA (PEM) that signed their registry certificates,
    /// besides the system's roots.
    #[arg(long, env = "WHARF_PEER_CA", value_name = "PEM")]
    peer_ca: Option<PathBuf>,
    /// Managed mode, https:// endpoints: the CA (PEM) that signed the control planes' certificates
    /// (default: the system's roots).
    #[arg(long, env = "WHARF_CONTROL_PLANE_CA", value_name = "PEM")]
    control_plane_ca: Option<PathBuf>,
    /// Managed mode, mTLS: this node's client certificate (PEM) for the control planes ...
    #[arg(long, env = "WHARF_CONTROL_PLANE_CERT", requires = "control_plane_key", value_name = "PEM")]
    control_plane_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, env = "WHARF_CONTROL_PLANE_KEY", requires = "control_plane_cert", value_name = "PEM")]
    control_plane_key: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Connections served at once; past it, new ones are closed at once.
    #[arg(long, default_value_t = ServerLimits::default().max_connections)]
    max_connections: usize,
    /// Longest time a client may take to send a request's headers (slowloris).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Largest request head in bytes; past it, 431.
    #[arg(long, default_value_t = ServerLimits::default().max_header_bytes)]
    max_header_bytes: usize,
    /// Upstream blob fetches running at once; more wait their turn.
    #[arg(long, default_value_t = wharf_proxy::flight::Flights::DEFAULT_MAX_FETCHES)]
    max_upstream_fetches: usize,
    /// Turn metrics off (no recorder: `/metrics` answers 404). For overhead measurements.
    #[arg(long)]
    no_metrics: bool,
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
    /// Passthrough repos: how long the upstream's acceptance of a client's credentials for a
    /// repository is trusted before cached content is served to that client again (0s: ask every time).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    passthrough_auth_ttl: Duration,
    /// Cache size cap: bytes (500MB, 10GiB) or a share of the disk (80%). Default: the disk.
    #[arg(long, env = "WHARF_CACHE_MAX_SIZE")]
    cache_max_size: Option<SizeSpec>,
    /// Eviction starts above this fraction of --cache-max-size ...
    #[arg(long, default_value_t = 0.9)]
    cache_high_watermark: f64,
    /// ... and stops under this one (least recently used first).
    #[arg(long, default_value_t = 0.8)]
    cache_low_watermark: f64,
    /// Entries not accessed for this long are evicted (e.g. 30d).
    #[arg(long, value_parser = humantime::parse_duration)]
    cache_ttl: Option<Duration>,
    /// How often eviction runs, besides when the cache grows past the high watermark.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    eviction_interval: Duration,
    /// How long in-flight responses may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = wharf_runtime::telemetry::init(&args.telemetry.options("wharf-proxy"))?;
    let (high, low) = (args.cache_high_watermark, args.cache_low_watermark);
    if !(0.0 < low && low < high && high <= 1.0) {
        anyhow::bail!(
            "watermarks must satisfy 0 < --cache-low-watermark < --cache-high-watermark <= 1 (got {low} and {high})"
        );
    }
    let tls = args.tls.server_tls(None).context("--tls-cert / --tls-key")?;
    let control_plane_tls = ClientTlsFiles {
        ca: args.control_plane_ca.clone(),
        cert: args.control_plane_cert.clone(),
        key: args.control_plane_key.clone(),
    };
    if args.control_plane.iter().any(|e| e.starts_with("https://")) {
        // Checked now, so a wrong path fails the start-up rather than every connection attempt.
        control_plane_tls.tonic_config().context("--control-plane-ca / --control-plane-cert / --control-plane-key")?;
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let mirror_listener = match args.mirror_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    let local = listener.local_addr()?;
    // A node serving HTTPS says so, for `regctl cache warm` and the node list.
    let address = args.advertise.clone().unwrap_or_else(|| match &tls {
        Some(_) => format!("https://{local}"),
        None => local.to_string(),
    });
    let peer_url = match args.peer_url.as_deref() {
        Some("off") => String::new(),
        Some(url) => {
            anyhow::ensure!(reqwest_like_url(url), "--peer-url {url:?} is not an http(s)://host:port URL (or \"off\")");
            url.to_owned()
        }
        None => default_peer_url(&address, local, tls.is_some()),
    };
    let source = match args.config {
        Some(path) => ConfigSource::File(path),
        None => ConfigSource::ControlPlanes {
            endpoints: args.control_plane,
            node_id: args.node_id.unwrap_or_else(|| default_node_id(local)),
            address,
            peer_url,
            token: match &args.control_plane_token_file {
                Some(path) => Some(read_token(path)?),
                None => {
                    tracing::warn!(
                        "no --control-plane-token-file: control planes refuse this node unless run with --insecure-no-auth"
                    );
                    None
                }
            },
        },
    };
    if let Some(realm) = &args.token_realm {
        anyhow::ensure!(
            (realm.starts_with("https://") || realm.starts_with("http://")) && !realm.contains(['"', '\\', ' ']),
            "--token-realm {realm:?} is not an http(s) URL"
        );
    }
    let opts = NodeOptions {
        cache_dir: args.cache_dir,
        mirror_listener,
        default_mirror: args.default_mirror,
        tokens: TokenOptions { ttl: args.token_ttl, realm: args.token_realm },
        blob_reverify_after: args.blob_reverify_after,
        scrub_rate: (args.scrub_rate.max(0.0) * 1e6) as u64,
        scrub_interval: args.scrub_interval,
        peers: PeerOptions {
            timeout: args.peer_timeout,
            idle_timeout: args.idle_timeout,
            suspect_for: args.peer_suspect_for,
            ca: args.peer_ca,
        },
        source,
        upstream: UpstreamOptions {
            connect_timeout: args.connect_timeout,
            first_byte_timeout: args.first_byte_timeout,
            idle_timeout: args.idle_timeout,
            retries: args.retries,
            retry_backoff: args.retry_backoff,
            passthrough_auth_ttl: args.passthrough_auth_ttl,
            ..UpstreamOptions::default()
        },
        shutdown_grace: args.shutdown_grace,
        metrics: if args.no_metrics {
            None
        } else {
            Some(wharf_runtime::metrics::install().context("installing the metrics recorder")?)
        },
        limits: ServerLimits {
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout,
            max_header_bytes: args.max_header_bytes,
        },
        max_upstream_fetches: args.max_upstream_fetches,
        tls,
        control_plane_tls,
        eviction: EvictionOptions {
            max_size: args.cache_max_size,
            high,
            low,
            ttl: args.cache_ttl,
            interval: args.eviction_interval,
        },
    };
    let mut signals = ShutdownSignals::new().context("listening for SIGTERM and SIGINT")?;
    let cancel = CancellationToken::new();
    let mut node = tokio::spawn(run_node(listener, opts, cancel.clone()));
    tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down: no new connections, finishing in-flight responses");
        }
        // A node that cannot start (an unusable cache dir, a bad config file) exits at once with why.
        r = &mut node => return r?.context("node"),
    }
    cancel.cancel();
    tokio::select! {
        r = node => r?.context("node")?,
        s = signals.recv() => tracing::warn!(signal = s, "second signal; exiting at once"),
    }
    // The last spans: bounded by the exporter's timeout, off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}

fn reqwest_like_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && rest.trim_end_matches('/').parse::<http::uri::Authority>().is_ok()
}

/// The peer URL from the advertised address (`host:port` or a URL), else the listen address;
/// an unspecified listen address (0.0.0.0) becomes the host name, which peers resolve.
fn default_peer_url(address: &str, local: SocketAddr, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    if address.contains("://") {
        return address.trim_end_matches('/').to_owned();
    }
    match address.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            format!("{scheme}://{}:{}", host_name().unwrap_or_else(|| "localhost".into()), local.port())
        }
        _ => format!("{scheme}://{address}"),
    }
}

fn default_node_id(local: SocketAddr) -> String {
    format!("{}-{}", host_name().unwrap_or_else(|| "node".into()), local.port())
}

/// The machine's host name (`/etc/hostname`), reduced to `[A-Za-z0-9._-]`.
fn host_name() -> Option<String> {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || ".-_".contains(*c)).collect();
    (!host.is_empty()).then_some(host)
}

/// A token file's content, trimmed; an empty or unreadable file is an error.
fn read_token(path: &std::path::Path) -> anyhow::Result<wharf_core::Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
    Ok(wharf_core::Secret::new(token))
}
