//! Tag lists and referrers: passed through uncached, with `n`/`last` kept and `Link` rewritten to
//! point back at this node.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::error::RegistryError;
use crate::request_log::RequestLog;
use crate::respond::{upstream_error, upstream_status};
use crate::state::Ctx;
use crate::upstream::{Upstream, UpstreamRequest};

pub async fn get(ctx: &Ctx, path: String, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let referrers = path.starts_with("referrers/");
    let mut headers = HeaderMap::new();
    for v in ctx.headers.get_all(header::ACCEPT) {
        headers.append(header::ACCEPT, v.clone());
    }
    let req = UpstreamRequest {
        repo: &ctx.repo,
        name: &ctx.name,
        method: if ctx.head { Method::HEAD } else { Method::GET },
        path,
        query: ctx.query.clone(),
        headers,
        retry: true,
        follow_redirects: true,
        client: ctx.client.as_deref(),
    };
    log.upstream_url = Upstream::url_for(&req);
    log.cache = "bypass";
    let resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    if resp.status != StatusCode::OK {
        let status = resp.status;
        let retry_after = resp.header_str(header::RETRY_AFTER).map(str::to_owned);
        return Err(upstream_status(status, resp.error_detail().await, "repository", retry_after));
    }
    if !referrers && ctx.query.as_deref().is_some_and(|q| q.split('&').any(|kv| kv == "n=0")) {
        // The spec: n=0 is an empty list and no Link, whatever the upstream makes of it (its 200
        // says the repository exists and may be listed).
        let body = serde_json::json!({ "name": format!("{}{}", ctx.path_prefix, ctx.client_name), "tags": [] });
        let mut r = Response::new(if ctx.head { Body::empty() } else { Body::from(body.to_string()) });
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        return Ok(r);
    }
    let mut out = HeaderMap::new();
    for k in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = resp.headers.get(&k) {
            out.insert(k, v.clone());
        }
    }
    if let Some(link) = resp.header_str(header::LINK).and_then(|l| rewrite_link(l, ctx))
        && let Ok(v) = HeaderValue::from_str(&link)
    {
        out.insert(header::LINK, v);
    }
    if let Some(v) = resp.headers.get("oci-filters-applied") {
        out.insert("oci-filters-applied", v.clone());
    }
    out.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    if referrers {
        // The spec's exact type for a referrers list, whatever parameters the upstream added.
        out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.oci.image.index.v1+json"));
    }
    let mut r = Response::new(if ctx.head { Body::empty() } else { Body::from_stream(resp.into_stream()) });
    *r.headers_mut() = out;
    Ok(r)
}

/// `</v2/library/alpine/tags/list?n=2&last=b>; rel="next"` (or absolute, on the upstream's host)
/// becomes `</v2/<repoKey>/<client name>/tags/list?n=2&last=b>; rel="next"` (without the repoKey
/// through a mirror).
fn rewrite_link(link: &str, ctx: &Ctx) -> Option<String> {
    let open = link.find('<')?;
    let close = link[open..].find('>')? + open;
    let target = &link[open + 1..close];
    let path = target.strip_prefix(&ctx.repo.upstream).unwrap_or(target);
    let rest = path.strip_prefix(&format!("/v2/{}/", ctx.name))?;
    Some(format!("{}</v2/{}{}/{}>{}", &link[..open], ctx.path_prefix, ctx.client_name, rest, &link[close + 1..]))
}
