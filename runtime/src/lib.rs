//! What Wharf's two servers share, and nothing of either plane: no registry, cache, store or API
//! code lives here.
//!
//! - [`serve`]: the accept loop (HTTP/1.1 and HTTP/2, plain or TLS) with its connection limits and
//!   graceful shutdown.
//! - [`tls`]: server certificates reloaded from files (and on SIGHUP), mTLS, client TLS files, the
//!   roots upstream connections trust.
//! - [`telemetry`]: logging (JSON or text), OpenTelemetry export over OTLP/gRPC, head sampling, W3C
//!   trace context in and out.
//! - [`metrics`]: the Prometheus recorder.
//! - [`signals`]: SIGTERM and SIGINT.

pub mod metrics;
pub mod serve;
pub mod signals;
pub mod telemetry;
pub mod tls;

pub use serve::{OverTls, ServerLimits, serve};
pub use signals::ShutdownSignals;
