//! The node's HTTP server: the registry router, `/metrics`, `/healthz` (the process answers) and
//! `/readyz` (a configuration is in force), and `run(listener, state, shutdown)` over the shared
//! accept loop ([`wharf_runtime::serve`]).

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use wharf_runtime::{ServerLimits, serve};

use crate::registry;
use crate::state::AppState;

/// The registry API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2", any(registry::handle))
        .route("/v2/", any(registry::handle))
        .route("/v2/{*rest}", any(registry::handle))
        .route("/_wharf/peer/{*rest}", any(registry::handle))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(registry::fallback)
        .with_state(state)
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

/// Ready once a configuration is in force: a file's, the stored snapshot's or a control plane's. A
/// managed node that starts with neither a stored snapshot nor a control plane is not.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.config.is_configured() {
        "ok\n".into_response()
    } else {
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "waiting for a configuration: no control plane answered yet and no stored snapshot\n",
        )
            .into_response()
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (http::StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response();
    };
    let (entries, bytes) = state.store.usage();
    metrics::gauge!("wharf_cache_entries").set(entries as f64);
    metrics::gauge!("wharf_cache_size_bytes").set(bytes as f64);
    metrics::gauge!("wharf_cache_mapped_bytes").set(state.store.mapped_usage().1 as f64);
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
