//! Wharf's data plane: the OCI distribution pull API over a verified, single-flight disk cache.
//!
//! - [`authz`]: who may pull: puller tokens, and the upstream's decisions for passthrough repos.
//! - [`config`]: the repos this node serves (standalone TOML), swapped atomically.
//! - [`store`]: the content-addressed disk cache (blobs, manifests, tags, links), its in-memory index.
//! - [`flight`]: one upstream fetch per digest, streamed to every waiting client as it arrives.
//! - [`upstream`]: the registry client (token and Basic auth, redirects, timeouts, retries).
//! - [`registry`]: the `/v2/` HTTP API, errors as OCI error JSON, one log line per request.
//! - [`server`]: `run(listener, state, shutdown)`.

pub mod authz;
pub mod bufpool;
pub mod config;
pub mod error;
pub mod evict;
pub mod flight;
pub mod managed;
pub mod metrics;
pub mod node;
pub mod range;
pub mod registry;
pub mod server;
pub mod store;
pub mod upstream;

pub use server::{AppState, run};
