//! Wharf's data plane: the OCI distribution pull API over a verified, single-flight disk cache.
//!
//! The modules read in one direction, top to bottom; a module imports only modules below it
//! (checked by `tests/tests/layers.rs`):
//!
//! 1. The node: [`node`] (cache, upstream client, configuration source and server put together),
//!    [`managed`] (the configuration followed from control planes).
//! 2. The HTTP edge: [`server`] (the router, `/metrics`, `run(listener, state, shutdown)`),
//!    [`registry`] (`/v2/` paths parsed, the repo resolved and authorized, the cache asked).
//! 3. The cache logic: [`cache`] (manifests, blobs, listings).
//! 4. Authorization: [`authz`] (puller tokens, the `/v2/` ping; [`authz::passthrough`]: the
//!    upstream's yes before cached content of a passthrough repo leaves).
//! 5. What a request carries and how it is answered: [`state`] (`AppState`, `Ctx`),
//!    [`request_log`] (the log line and span each request ends with), [`respond`] (upstream
//!    failures as OCI errors, content headers).
//! 6. Fetching: [`flight`] (one upstream fetch per digest, streamed to every waiting client),
//!    [`decisions`] (the upstream's recent acceptances of clients' credentials).
//! 7. Store and upstream: [`store`] (the content-addressed disk cache and its in-memory index),
//!    [`evict`] (what leaves it), [`scrub`] (re-hashing what is cached), [`upstream`] (the registry
//!    client: auth, redirects, timeouts, retries), [`peers`] (the other nodes: who owns a digest,
//!    asking them).
//! 8. Foundations: [`config`] (the repos served, swapped atomically), [`credentials`] (a client's
//!    `Authorization`), [`node_token`] (the node's sealed registry tokens), [`private_file`] (files
//!    of mode 0600 written whole), [`error`] (OCI error JSON), [`oci`] (manifest types and references), [`metrics`], [`range`], [`bufpool`].
//!
//! The accept loop, TLS, telemetry and signals come from `wharf-runtime`, shared with the control
//! plane; this crate does not depend on the control plane's.

pub mod authz;
pub mod bufpool;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod decisions;
pub mod error;
pub mod evict;
pub mod flight;
pub mod managed;
pub mod mapped;
pub mod metrics;
pub mod node;
pub mod node_token;
pub mod oci;
pub mod peers;
pub mod private_file;
pub mod range;
pub mod registry;
pub mod request_log;
pub mod respond;
pub mod scrub;
pub mod server;
pub mod state;
pub mod store;
pub mod upstream;

pub use server::run;
pub use state::AppState;
