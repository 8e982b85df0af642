//! The node's HTTP server: `run(listener, state, shutdown)`, and [`serve`], the accept loop (plain or
//! TLS) of both binaries' ports.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::authz::Decisions;
use crate::config::Config;
use crate::flight::Flights;
use crate::registry;
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

/// The registry API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2", any(registry::handle))
        .route("/v2/", any(registry::handle))
        .route("/v2/{*rest}", any(registry::handle))
        .route("/metrics", get(render_metrics))
        .fallback(registry::fallback)
        .with_state(state)
}

/// Connection-level limits: what a client can hold of the node before a request is even read.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once; past it, new ones are closed at once (and counted).
    pub max_connections: usize,
    /// Longest time to receive a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list): past it, 431.
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self { max_connections: 10_000, header_read_timeout: Duration::from_secs(10), max_header_bytes: 64 * 1024 }
    }
}

/// Serves the registry API on `listener` until `shutdown` resolves, then stops accepting and
/// waits for in-flight responses (the caller bounds that wait with its grace period).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, state, ServerLimits::default(), shutdown).await
}

/// [`run`] with explicit connection limits. Request bodies are never read: every method that has
/// one is refused (405) by the read-only API.
pub async fn run_with(
    listener: TcpListener,
    state: AppState,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve(listener, router(state), limits, None, shutdown).await
}

/// Serves `router` on `listener` (both binaries' ports): HTTP/1.1 and HTTP/2 (h2c, or h2 by ALPN
/// over TLS), with a connection cap, a header read timeout that also bounds the TLS handshake,
/// and a head size limit, until `shutdown` resolves; then stops accepting and waits for the open
/// connections to finish their in-flight requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(router);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder.http2().max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("wharf_connections_rejected_total").increment(1);
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; closing a new connection");
            continue;
        };
        // Small responses (manifests, errors) go out at once rather than after the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        // Taken now, so that shutdown waits for a connection still in its TLS handshake too (and
        // closes it gracefully once it is served).
        let watcher = graceful.watcher();
        let Some(acceptor) = &tls else {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service.clone()).into_owned();
            tokio::spawn(async move {
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            });
            continue;
        };
        let (acceptor, builder, service) = (acceptor.clone(), builder.clone(), service.clone());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // The handshake happens here, not in the accept loop: a slow client delays nobody else.
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // A refused client certificate (mTLS) is worth an operator's attention; scanners,
                    // plain HTTP on the TLS port and dropped connections are not.
                    let refused = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(|r| {
                        matches!(r, rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_))
                    });
                    let reason = if refused { "client_certificate" } else { "error" };
                    metrics::counter!("wharf_tls_handshake_failures_total", "reason" => reason).increment(1);
                    if refused {
                        tracing::warn!(%peer, error = %e, "TLS client certificate refused");
                    } else {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    metrics::counter!("wharf_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                    tracing::debug!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (http::StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response();
    };
    let (entries, bytes) = state.store.usage();
    metrics::gauge!("wharf_cache_entries").set(entries as f64);
    metrics::gauge!("wharf_cache_size_bytes").set(bytes as f64);
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
