//! Assertions shared by the suites.

use std::time::Duration;

use anyhow::{bail, ensure};

use crate::http::Outcome;
use crate::image::Blob;
use crate::proxy::Proxy;

/// A failed fetch must look failed: an error status with an OCI error body, or a body that breaks
/// off. Never a complete 2xx response (that would be a complete-looking wrong body).
pub fn expect_clean_failure(out: &Outcome, blob: &Blob) -> anyhow::Result<()> {
    if out.complete_success() {
        bail!(
            "the client got a complete-looking {} response ({} bytes, digest {}, expected blob {} of {} bytes) instead of an error",
            out.status.unwrap_or_default(),
            out.body.len(),
            crate::sha256_digest(&out.body),
            blob.digest,
            blob.size()
        );
    }
    if let Some(status) = out.status
        && status >= 400
    {
        let resp = crate::http::Resp { status, headers: out.headers.clone(), body: out.body.clone() };
        resp.oci_errors().map_err(|e| anyhow::anyhow!("error status {status} without an OCI error body: {e}"))?;
    }
    Ok(())
}

/// Nothing of `digest` is cached: no file in `blobs/`, and `staging/` ends up empty (waited for up
/// to 10 s, as clean-up may follow the response).
pub async fn expect_not_cached(proxy: &Proxy, digest: &str) -> anyhow::Result<()> {
    let staging = crate::wait_until_async(Duration::from_secs(10), "staging/ to be empty", || {
        proxy.staging_files().is_empty().then_some(())
    })
    .await;
    ensure!(staging.is_ok(), "staging/ still holds {:?}", proxy.staging_files());
    if let Some(p) = proxy.cached_blob(digest) {
        bail!("{digest} was cached at {} after a failed fetch", p.display());
    }
    Ok(())
}

/// Waits (up to 10 s) until `digest` is in the blob cache, and checks the file's bytes.
pub async fn expect_cached(proxy: &Proxy, blob: &Blob) -> anyhow::Result<()> {
    let path = crate::wait_until_async(Duration::from_secs(10), &format!("{} in the blob cache", blob.digest), || {
        proxy.cached_blob(&blob.digest)
    })
    .await?;
    let data = std::fs::read(&path)?;
    ensure!(crate::sha256_digest(&data) == blob.digest, "cached file {} does not match its digest", path.display());
    Ok(())
}

/// Whether a `WWW-Authenticate` is the node's Bearer challenge: its own token endpoint as realm.
pub fn is_node_challenge(header: Option<&str>) -> bool {
    header.is_some_and(|c| c.starts_with("Bearer realm=\"http") && c.contains("/v2/token") && c.contains("service=\""))
}
