//! The control plane's server: gRPC and the REST gateway on one port, `run(listener, state, shutdown)`.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use tokio::net::TcpListener;
use tracing::Instrument as _;
use wharf_proto::v1 as pb;
use wharf_runtime::ServerLimits;
use wharf_runtime::tls::ServerTls;

use crate::auth;
use crate::distribute::ConfigApi;
use crate::error::ApiError;
use crate::grpc::{NodeApi, RepoApi, TokenApi};
use crate::rest::{self, Problem};
use crate::state::ApiState;

pub fn router(state: ApiState) -> Router {
    let grpc = tonic::service::Routes::new(pb::repo_service_server::RepoServiceServer::new(RepoApi(state.clone())))
        .add_service(pb::node_service_server::NodeServiceServer::new(NodeApi(state.clone())))
        .add_service(pb::config_service_server::ConfigServiceServer::new(ConfigApi(state.clone())))
        .add_service(pb::token_service_server::TokenServiceServer::new(TokenApi(state.clone())))
        .into_axum_router();
    // The gRPC router's own fallback answers in gRPC; REST clients get problem JSON instead.
    rest::router()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state.clone())
        .merge(grpc.fallback(not_found))
        .layer(axum::middleware::from_fn_with_state(state, require_token))
        .layer(axum::middleware::from_fn(count_requests))
        .layer(axum::middleware::from_fn(trace_requests))
}

/// A `control.api` server span around every call, REST and gRPC, continuing an incoming
/// `traceparent`; store calls made for it are its children. For a server stream (Watch) the span
/// covers the call up to the response head, not the stream.
async fn trace_requests(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let sampled = wharf_runtime::telemetry::head_sampled(req.headers());
    wharf_runtime::telemetry::unsampled(sampled, traced(req, next)).await
}

async fn traced(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let grpc = is_grpc(&req);
    let path: String = req.uri().path().chars().take(256).collect();
    let span = tracing::info_span!(
        "control.api",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        api = if grpc { "grpc" } else { "rest" },
        http.request.method = %req.method(),
        url.path = %path,
        rpc.method = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    wharf_runtime::telemetry::extract(&span, req.headers());
    if grpc {
        span.record("rpc.method", path.trim_start_matches('/'));
    }
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    let grpc_status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
    if let Some(code) = grpc_status {
        span.record("rpc.grpc.status_code", code);
    }
    if status >= 500 || grpc_status.is_some_and(|c| c != 0) {
        span.record("otel.status_code", "ERROR");
    }
    resp
}

fn is_grpc(req: &axum::extract::Request) -> bool {
    req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Refuses a call whose token does not allow it: 401 / UNAUTHENTICATED without a valid token, 403 /
/// PERMISSION_DENIED with too little.
async fn require_token(
    State(s): State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let need = auth::need(req.method(), req.uri().path());
    if s.insecure_no_auth || need == auth::Need::Nothing {
        return next.run(req).await;
    }
    let checked = match s.hub.current() {
        Some(published) => auth::authorize(&published.tokens, req.headers(), need, std::time::SystemTime::now()),
        None => Err(ApiError::Unavailable("the control plane is still loading its configuration".into())),
    };
    match checked {
        Ok(caller) => {
            if let Some((token_id, role)) = caller {
                tracing::debug!(%token_id, %role, path = %req.uri().path(), "call authorized");
            }
            next.run(req).await
        }
        Err(e) if is_grpc(&req) => tonic::Status::from(e).into_http(),
        Err(e) => {
            let unauthenticated = matches!(e, ApiError::Unauthenticated(_));
            let mut resp = Problem::from(e).into_response();
            if unauthenticated {
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"wharf-control\""),
                );
            }
            resp
        }
    }
}

/// `wharf_control_api_requests_total{api, method, code}` for every API call, REST and gRPC (health
/// checks and scrapes are not API calls).
async fn count_requests(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    let grpc = is_grpc(&req);
    let method =
        if grpc { req.uri().path().rsplit('/').next().unwrap_or("").to_owned() } else { req.method().to_string() };
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let code = if grpc {
        resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned()
    } else {
        resp.status().as_u16().to_string()
    };
    let api = if grpc { "grpc" } else { "rest" };
    metrics::counter!("wharf_control_api_requests_total", "api" => api, "method" => method.clone(), "code" => code)
        .increment(1);
    metrics::histogram!("wharf_control_api_request_duration_seconds", "api" => api, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

async fn render_metrics(State(s): State<ApiState>) -> Response {
    metrics::gauge!("wharf_control_connected_nodes").set(s.connected.count() as f64);
    match &s.metrics {
        Some(h) => ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

async fn readyz(State(s): State<ApiState>) -> Response {
    match s.store.current_revision().await {
        Ok(rev) => format!("ready: store at revision {rev}\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "Not found", "no such endpoint: see /api/openapi.json")
}

/// Serves until `shutdown` resolves; cancels `state.cancel` then, so streams end and the server
/// can finish.
pub async fn run(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_tls(listener, state, None, shutdown).await
}

/// [`run`], over TLS when `tls` is given (its certificate reloaded when its files change, client
/// certificates required when it has a client CA).
pub async fn run_tls(
    listener: TcpListener,
    state: ApiState,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cancel = state.cancel.clone();
    let acceptor = tls.map(|tls| {
        tls.watch(cancel.clone());
        tls.acceptor()
    });
    // The node's accept loop, which sets TCP_NODELAY: config updates are small frames on
    // long-lived streams, which Nagle would hold back until the node's delayed ACK (40 ms).
    let shutdown = async move {
        shutdown.await;
        cancel.cancel();
    };
    wharf_runtime::serve(listener, router(state), ServerLimits::default(), acceptor, shutdown).await
}
