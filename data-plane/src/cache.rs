//! The cache logic: what a request for a manifest, a blob or a listing gets, from the cache or from
//! upstream. Manifests by digest and tags (TTL, revalidation, stale serving) in [`manifests`], blobs
//! (hits, the single flight, ranges) in [`blobs`], `tags/list` and referrers passed through uncached
//! in [`listing`]. Cached content of a passthrough repo is authorized first
//! ([`crate::authz::passthrough`]).

mod blobs;
mod listing;
mod manifests;

use axum::response::Response;
use wharf_core::{Digest, Reference};

use crate::error::RegistryError;
use crate::request_log::RequestLog;
use crate::state::Ctx;

/// What a `/v2/<repoKey>/<name>/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(Reference),
    Blob(Digest),
    Tags,
    Referrers(Digest),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Manifest(_) => "manifest",
            Target::Blob(_) => "blob",
            Target::Tags => "tags",
            Target::Referrers(_) => "referrers",
        }
    }
}

/// Serves `target` for the request `ctx`. Listings always ask the upstream: boxed, like every
/// upstream path below, so that the future of a cache hit stays small.
pub async fn serve(ctx: &Ctx, target: Target, log: &mut RequestLog) -> Result<Response, RegistryError> {
    match target {
        Target::Manifest(reference) => {
            log.reference = reference.to_string();
            manifests::get(ctx, reference, log).await
        }
        Target::Blob(digest) => {
            log.reference = digest.to_string();
            blobs::get(ctx, digest, log).await
        }
        Target::Tags => Box::pin(listing::get(ctx, "tags/list".into(), log)).await,
        Target::Referrers(digest) => {
            log.reference = digest.to_string();
            Box::pin(listing::get(ctx, format!("referrers/{digest}"), log)).await
        }
    }
}
