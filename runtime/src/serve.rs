//! The accept loop of both binaries' ports: [`serve`] a router on a listener the caller bound,
//! plain or TLS, within [`ServerLimits`], until a shutdown future resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

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

/// In the extensions of every request that came over TLS (plaintext ones carry nothing): a handler
/// that hands out bytes only the kernel should read (memory maps) does so on plaintext only.
#[derive(Clone, Copy, Debug)]
pub struct OverTls;

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
    // Plaintext requests carry no extension: inserting one costs an allocation per request.
    let service = TowerToHyperService::new(router.clone());
    let tls_service = TowerToHyperService::new(router.layer(axum::Extension(OverTls)));
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
        let (acceptor, builder, service) = (acceptor.clone(), builder.clone(), tls_service.clone());
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
