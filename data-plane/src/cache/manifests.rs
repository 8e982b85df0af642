//! Manifests: cached by digest after their bytes matched it; tags trusted for the repo's tag TTL,
//! then revalidated with a HEAD; served stale with a `Warning` when the upstream fails.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::Value;
use wharf_core::{Digest, Reference};

use crate::authz::passthrough as gate;
use crate::error::RegistryError;
use crate::flight::PeerAsk;
use crate::oci::{DEFAULT_ACCEPT, MAX_MANIFEST, referenced};
use crate::peers::PeerFailure;
use crate::request_log::RequestLog;
use crate::respond::{content_headers, not_modified, not_modified_response, upstream_error, upstream_status};
use crate::state::Ctx;
use crate::store::{TagEntry, now_secs};
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// A manifest ready to serve.
struct Manifest {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// A manifest by digest or tag. What asks the upstream (`fetch`, `revalidate`) is boxed, so a hit's
/// future stays small: the upstream client's are kilobytes, moved at every await.
pub async fn get(ctx: &Ctx, reference: Reference, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let store = &ctx.state.store;
    match &reference {
        Reference::Digest(d) => {
            let lookup = lookup_span();
            let found = lookup.in_scope(|| match store.is_linked(&ctx.repo.key, &ctx.name, d) {
                true => cached(ctx, d),
                false => Ok(None),
            })?;
            lookup.record("cache", if found.is_some() { "hit" } else { "miss" });
            drop(lookup);
            if let Some(m) = found {
                log.cache = "hit";
                gate::authorize_hit(ctx, || format!("manifests/{d}"), log).await?;
                return Ok(respond(ctx, m, IMMUTABLE, None));
            }
            let m = Box::pin(fetch(ctx, &reference, log)).await?;
            Ok(respond(ctx, m, IMMUTABLE, None))
        }
        Reference::Tag(tag) => {
            let cache_control = format!("public, max-age={}", ctx.repo.tag_ttl.as_secs().min(60));
            let lookup = lookup_span();
            let (entry, hit) = lookup.in_scope(|| -> Result<_, RegistryError> {
                let entry = store.get_tag(&ctx.repo.key, &ctx.name, tag);
                let hit = match &entry {
                    Some(e) => match e.digest.parse::<Digest>() {
                        Ok(d) => cached(ctx, &d)?,
                        Err(_) => None,
                    },
                    None => None,
                };
                Ok((entry, hit))
            })?;
            let fresh = |e: &TagEntry| now_secs().saturating_sub(e.fetched_at) < ctx.repo.tag_ttl.as_secs();
            let outcome = match (&entry, &hit) {
                (Some(e), Some(_)) if fresh(e) => "hit",
                (Some(_), Some(_)) => "expired",
                _ => "miss",
            };
            lookup.record("cache", outcome);
            drop(lookup);
            if let (Some(entry), Some(m)) = (entry, hit) {
                let age = now_secs().saturating_sub(entry.fetched_at);
                if age < ctx.repo.tag_ttl.as_secs() {
                    log.cache = "hit";
                    gate::authorize_hit(ctx, || format!("manifests/{}", m.digest), log).await?;
                    return Ok(respond(ctx, m, &cache_control, None));
                }
                match Box::pin(revalidate(ctx, tag, &m.digest, log)).await {
                    Revalidated::Same => {
                        gate::note_authorized(ctx, log);
                        let e = TagEntry { fetched_at: now_secs(), ..entry };
                        // A tag file that cannot be written (a full disk) keeps the answer in memory.
                        if let Err(e) = store.put_tag(&ctx.repo.key, &ctx.name, tag, &e) {
                            store.degraded("tag", &e);
                        }
                        log.cache = "revalidated";
                        return Ok(respond(ctx, m, &cache_control, None));
                    }
                    Revalidated::Stale(why) => {
                        gate::stale_allowed(ctx, &why, log)?;
                        tracing::warn!(repo_key = %ctx.repo.key, name = %ctx.name, tag, reason = %why, "upstream failed revalidation; serving the cached tag stale");
                        log.cache = "stale";
                        return Ok(respond(ctx, m, &cache_control, Some(&why)));
                    }
                    Revalidated::Gone(e) => {
                        // A passthrough upstream may say 404 to a client it does not let see the
                        // repository: that client must not drop the tag for everyone.
                        if !ctx.passthrough() {
                            store.remove_tag(&ctx.repo.key, &ctx.name, tag);
                        }
                        return Err(e);
                    }
                    Revalidated::Error(e) => return Err(e),
                    Revalidated::Changed => {}
                }
            }
            let m = Box::pin(fetch(ctx, &reference, log)).await?;
            Ok(respond(ctx, m, &cache_control, None))
        }
    }
}

/// The `cache.lookup` span of a manifest request: only its `cache` (hit, expired or miss); its
/// parent, the request's span, says which repo, name and reference.
fn lookup_span() -> tracing::Span {
    tracing::info_span!("cache.lookup", cache = tracing::field::Empty)
}

/// A cached manifest the client accepts.
fn cached(ctx: &Ctx, d: &Digest) -> Result<Option<Manifest>, RegistryError> {
    match ctx.state.store.get_manifest(d) {
        Ok(Some((media_type, bytes))) if accepts(&ctx.headers, &media_type) => {
            Ok(Some(Manifest { digest: d.clone(), media_type, bytes }))
        }
        Ok(_) => Ok(None),
        Err(e) => {
            tracing::error!(error = %e, "cached manifest unreadable; fetching it again");
            Ok(None)
        }
    }
}

/// Whether the client's `Accept` admits `media_type` (no `Accept`: anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()) {
        for t in v.split(',') {
            any = true;
            let t = t.split(';').next().unwrap_or("").trim();
            if t == "*/*" || t.eq_ignore_ascii_case(media_type) {
                return true;
            }
            if let Some(prefix) = t.strip_suffix("/*")
                && media_type.split('/').next() == Some(prefix)
            {
                return true;
            }
        }
    }
    !any
}

/// The client's `Accept`, or every manifest type when it sent none.
fn forward_accept(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for v in headers.get_all(header::ACCEPT) {
        out.append(header::ACCEPT, v.clone());
    }
    if out.is_empty() {
        out.insert(header::ACCEPT, HeaderValue::from_static(DEFAULT_ACCEPT));
    }
    out
}

enum Revalidated {
    Same,
    Changed,
    Stale(String),
    Gone(RegistryError),
    Error(RegistryError),
}

async fn revalidate(ctx: &Ctx, tag: &str, cached: &Digest, log: &mut RequestLog) -> Revalidated {
    let req = UpstreamRequest {
        repo: &ctx.repo,
        name: &ctx.name,
        method: Method::HEAD,
        path: format!("manifests/{tag}"),
        query: None,
        headers: forward_accept(&ctx.headers),
        retry: false,
        follow_redirects: true,
        client: ctx.client.as_deref(),
    };
    log.upstream_url = Upstream::url_for(&req);
    match ctx.state.upstream.send(&req).await {
        // The token endpoint refused the credentials: an answer about this client, not an outage.
        Err(e @ UpstreamError::Token { status: 401 | 403, .. }) => Revalidated::Error(upstream_error(&e)),
        Err(e) => Revalidated::Stale(e.to_string()),
        Ok(r) if r.status == StatusCode::OK => {
            match r.header_str("docker-content-digest").and_then(|d| d.parse::<Digest>().ok()) {
                Some(d) if d == *cached => Revalidated::Same,
                _ => Revalidated::Changed,
            }
        }
        Ok(r) if r.status.is_server_error() || r.status == StatusCode::TOO_MANY_REQUESTS => {
            Revalidated::Stale(format!("upstream answered {}", r.status.as_u16()))
        }
        Ok(r) if r.status == StatusCode::NOT_FOUND => {
            let detail = serde_json::json!({ "upstream_status": 404, "upstream_url": r.url });
            Revalidated::Gone(upstream_status(StatusCode::NOT_FOUND, detail, "manifest", None))
        }
        Ok(r) => {
            let status = r.status;
            Revalidated::Error(upstream_status(status, r.error_detail().await, "manifest", None))
        }
    }
}

/// GETs a manifest upstream, checks its bytes, caches it and links what it references (`miss`), or
/// serves it uncached when it cannot be written (`bypass`). A manifest by digest is asked of its
/// owner among the cluster's nodes first (`peer`), and of upstream when the owner is skipped.
async fn fetch(ctx: &Ctx, reference: &Reference, log: &mut RequestLog) -> Result<Manifest, RegistryError> {
    if let Reference::Digest(d) = reference
        && let Some(ask) = ctx.peer_ask(d)
        && let Some((media_type, bytes)) = from_peer(ctx, &ask, d).await
    {
        let m = keep(ctx, reference, d.clone(), media_type, bytes, log).await?;
        if log.cache == "miss" {
            log.cache = "peer";
        }
        return Ok(m);
    }
    let req = UpstreamRequest {
        repo: &ctx.repo,
        name: &ctx.name,
        method: Method::GET,
        path: format!("manifests/{reference}"),
        query: None,
        headers: forward_accept(&ctx.headers),
        retry: true,
        follow_redirects: true,
        client: ctx.client.as_deref(),
    };
    log.upstream_url = Upstream::url_for(&req);
    let resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    if resp.status != StatusCode::OK {
        let status = resp.status;
        let retry_after = resp.header_str(header::RETRY_AFTER).map(str::to_owned);
        return Err(upstream_status(status, resp.error_detail().await, "manifest", retry_after));
    }
    gate::note_authorized(ctx, log);
    let url = resp.url.clone();
    let header_type = resp.header_str(header::CONTENT_TYPE).map(str::to_owned);
    let header_digest = resp.header_str("docker-content-digest").map(str::to_owned);
    let bytes = resp.bytes_limited(MAX_MANIFEST).await.map_err(|e| upstream_error(&e))?;
    let digest = Digest::of(&bytes);
    let wrong = |claimed: &str| {
        RegistryError::new(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            format!("upstream sent a manifest whose digest is {digest}, not {claimed}; nothing was cached"),
        )
        .with_detail(serde_json::json!({ "upstream_url": url }))
    };
    if let Reference::Digest(d) = reference
        && *d != digest
    {
        return Err(wrong(&d.to_string()));
    }
    if let Some(h) = header_digest.as_deref()
        && h != digest.to_string()
    {
        return Err(wrong(h));
    }
    keep(ctx, reference, digest, header_type, bytes, log).await
}

/// The manifest `d` from the peer `ask` names, its bytes checked against `d`; `None` when the
/// peer is skipped (marked suspect when at fault: wrong bytes too, which never reach a client).
async fn from_peer(ctx: &Ctx, ask: &PeerAsk, d: &Digest) -> Option<(Option<String>, Bytes)> {
    let accept = forward_accept(&ctx.headers).get(header::ACCEPT).cloned();
    let what = format!("manifests/{d}");
    let got = ask.peers.get(&ask.member, &ask.token, ctx.repo.key.as_str(), &ctx.name, &what, accept.as_ref()).await;
    let got = match got {
        Ok(g) => g,
        Err(skipped) => {
            if let Some(f) = skipped.failure {
                ask.peers.failed(&ask.member, f, &skipped.error);
            }
            return None;
        }
    };
    let mut buf = bytes::BytesMut::new();
    let mut body = got.body;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) if buf.len() + c.len() <= MAX_MANIFEST => buf.extend_from_slice(&c),
            Ok(_) => {
                ask.peers.failed(&ask.member, PeerFailure::WrongBytes, &"a manifest over the size limit");
                return None;
            }
            Err(e) => {
                ask.peers.failed(&ask.member, PeerFailure::Body, &e);
                return None;
            }
        }
    }
    let bytes = buf.freeze();
    let actual = Digest::of(&bytes);
    if actual != *d {
        ask.peers.failed(&ask.member, PeerFailure::WrongBytes, &format_args!("manifest digest {actual}, not {d}"));
        return None;
    }
    ask.peers.received(&ask.member, bytes.len() as u64);
    Some((got.content_type, bytes))
}

/// A manifest whose bytes were checked: cached (with the tag, for one asked by tag) and linked
/// with what it references (`miss`), or served uncached when it cannot be written (`bypass`).
async fn keep(
    ctx: &Ctx,
    reference: &Reference,
    digest: Digest,
    content_type: Option<String>,
    bytes: Bytes,
    log: &mut RequestLog,
) -> Result<Manifest, RegistryError> {
    let header_type = content_type.map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
    let json: Option<Value> = serde_json::from_slice(&bytes).ok();
    let media_type = header_type
        .filter(|t| !t.is_empty() && t != "application/json" && t != "text/plain")
        .or_else(|| json.as_ref().and_then(|j| j.get("mediaType")?.as_str().map(str::to_owned)))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
    let mut linked = vec![digest.clone()];
    if let Some(j) = &json {
        linked.extend(referenced(j));
    }
    let tag = match reference {
        Reference::Tag(tag) => Some(tag.clone()),
        Reference::Digest(_) => None,
    };
    let (store, repo, name) = (ctx.state.store.clone(), ctx.repo.key.clone(), ctx.name.clone());
    let (d, mt, b) = (digest.clone(), media_type.clone(), bytes.clone());
    // fsync and renames: off the async workers. A manifest that cannot be cached (a full disk) is
    // served all the same: its bytes were checked.
    let written = tokio::task::spawn_blocking(move || {
        store.put_manifest(&d, &mt, &b)?;
        store.link(&repo, &name, &linked)?;
        if let Some(tag) = tag {
            let entry = TagEntry { digest: d.to_string(), media_type: mt, fetched_at: now_secs() };
            store.put_tag(&repo, &name, &tag, &entry)?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await
    .map_err(|e| RegistryError::internal(format!("caching the manifest: {e}")))?;
    log.cache = match written {
        Ok(()) => "miss",
        Err(e) => {
            ctx.state.store.degraded("manifest", &e);
            "bypass"
        }
    };
    Ok(Manifest { digest, media_type, bytes })
}

fn respond(ctx: &Ctx, m: Manifest, cache_control: &str, stale: Option<&str>) -> Response {
    if not_modified(&ctx.headers, &m.digest) {
        return not_modified_response(&m.digest, &m.media_type, cache_control);
    }
    let len = m.bytes.len();
    let mut r = Response::new(if ctx.head { Body::empty() } else { Body::from(m.bytes) });
    let h = r.headers_mut();
    content_headers(h, &m.digest, &m.media_type, cache_control);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(why) = stale {
        let why: String = why.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).take(200).collect();
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"Response is stale: {why}\"")) {
            h.insert(header::WARNING, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json; q=0.5"));
        assert!(accepts(&h, "application/vnd.oci.image.manifest.v1+json"));
        assert!(!accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/*"));
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
    }
}
