//! Wharf's domain types: what a repo is, how content is addressed and named.
//!
//! Plain Rust, free of proto, etcd and HTTP types: the data plane, the control plane and `regctl`
//! all speak these, and convert at their own edges.

mod digest;
mod reference;
pub mod rendezvous;
mod repo;
pub mod token;

/// What `--version` prints after the binary's name: the crate version and the git commit built from
/// (`unknown` for debug builds and builds without git or `$WHARF_GIT_COMMIT`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("WHARF_GIT_COMMIT"), ")");

pub use digest::{Digest, DigestError, DigestHasher};
pub use reference::{NameError, Reference, normalize_name, validate_name};
pub use repo::{
    Access, AuthMode, CredentialProvider, Credentials, Repo, RepoError, RepoKey, RepoKind, Secret, UpstreamTls,
    registry_host_error,
};
pub use token::{Grant, Presented, RepoPattern, Role, SigningKey, TokenError};
