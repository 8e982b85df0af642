//! Blobs: hits stream the verified file; misses join the one fetch of their digest; `Range`,
//! `If-None-Match` and HEAD as CDNs and lazy-pulling clients expect.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use wharf_core::{Digest, DigestHasher};

use crate::authz::passthrough as gate;
use crate::error::RegistryError;
use crate::flight::{FetchContext, FetchFailure, Flight, Joined, Progress, read_file};
use crate::mapped;
use crate::range::{self, Resolved};
use crate::request_log::RequestLog;
use crate::respond::{
    content_headers, fetch_error, not_modified, not_modified_response, upstream_error, upstream_status,
};
use crate::state::Ctx;
use crate::store::{EntryKind, Store};
use crate::upstream::{Upstream, UpstreamRequest};

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const OCTETS: &str = "application/octet-stream";
/// A range starting this far past what a fetch has written is fetched upstream on its own, so a
/// client reading a footer first does not wait for the whole blob.
const FAR_AHEAD: u64 = 8 * 1024 * 1024;

pub async fn get(ctx: &Ctx, digest: Digest, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let store = &ctx.state.store;
    // Its parent, the request's span, says which repo and digest: an attribute costs a sampled
    // hit about 2k instructions, recorded, copied, converted and dropped.
    let lookup = tracing::info_span!("cache.lookup", cache = tracing::field::Empty);
    let cached = lookup.in_scope(|| store.blob_for_read(&digest));
    if let Some((size, trusted)) = cached {
        lookup.record("cache", "hit");
        drop(lookup);
        authorize_cached(ctx, &digest, log).await?;
        log.cache = "hit";
        if let Some(r) = serve_file(ctx, &digest, size, trusted).await? {
            return Ok(r);
        }
        // A range of a file that failed its digest: removed, and fetched again as a miss.
    } else {
        lookup.record("cache", "miss");
        drop(lookup);
    }
    // Boxed: the miss path's futures (the upstream client's, the flight's) are kilobytes that a
    // hit's future would otherwise carry and move at every await.
    Box::pin(miss(ctx, digest, log)).await
}

/// Not in the cache (or a range of a file that failed its digest): the upstream's answer for a
/// HEAD, else the one fetch of this digest, joined or started.
async fn miss(ctx: &Ctx, digest: Digest, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let store = &ctx.state.store;
    if ctx.head {
        return head_upstream(ctx, &digest, log).await;
    }
    log.upstream_url = format!("{}/v2/{}/blobs/{}", ctx.repo.upstream, ctx.name, digest);
    // A passthrough waiter whose fetch failed on someone else's credentials starts its own, once.
    let mut joins_left = if ctx.passthrough() { 2 } else { 1 };
    let (flight, total) = loop {
        joins_left -= 1;
        let fetch = FetchContext {
            store: store.clone(),
            upstream: ctx.state.upstream.clone(),
            repo: ctx.repo.clone(),
            name: ctx.name.clone(),
            digest: digest.clone(),
            parent: tracing::Span::current(),
            client: ctx.client.clone(),
            peer: ctx.peer_ask(&digest),
        };
        let joined = match ctx.state.flights.join_or_start(fetch) {
            Ok(j) => j,
            // Not even a staging file fits: a plain proxy for this blob.
            Err(FetchFailure::NoSpace) => return uncached(ctx, &digest, log).await,
            Err(e) => return Err(fetch_error(&e)),
        };
        let (flight, coalesced) = match joined {
            Joined::Cached => {
                let (size, trusted) = store
                    .blob_for_read(&digest)
                    .ok_or_else(|| RegistryError::internal("blob vanished from the cache"))?;
                authorize_cached(ctx, &digest, log).await?;
                log.cache = "hit";
                return serve_file(ctx, &digest, size, trusted).await?.ok_or_else(|| {
                    RegistryError::internal("the cached blob failed its digest and was removed; retry")
                });
            }
            Joined::Flight { flight, coalesced } => (flight, coalesced),
        };
        log.cache = if coalesced { "coalesced" } else { "miss" };
        if coalesced {
            wharf_runtime::telemetry::link(&tracing::Span::current(), &flight.span);
            authorize_waiter(ctx, &flight, &digest, log).await?;
        }
        let total = match flight.head().await {
            Progress::Failed(FetchFailure::NoSpace) => return uncached(ctx, &digest, log).await,
            Progress::Failed(FetchFailure::Status { status, .. })
                if coalesced && joins_left > 0 && matches!(status.as_u16(), 401 | 403 | 404) =>
            {
                continue;
            }
            Progress::Failed(f) => return Err(fetch_error(&f)),
            Progress::Streaming { total, .. } => total,
            Progress::Done { size } => Some(size),
            Progress::Connecting => None,
        };
        if !coalesced {
            // The fetch this client started got its 200 with the client's credentials.
            gate::note_authorized(ctx, log);
            if flight.from_peer() {
                log.cache = "peer";
            }
        }
        break (flight, total);
    };
    if not_modified(&ctx.headers, &digest) {
        return Ok(not_modified_response(&digest, OCTETS, IMMUTABLE));
    }
    let range = total.and_then(|t| Some((range_header(&ctx.headers)?.resolve(t), t)));
    let mut r = match range {
        Some((Resolved::Unsatisfiable, total)) => return Ok(unsatisfiable(&digest, total)),
        Some((Resolved::Partial { start, end }, total)) => {
            if start > flight.written() + FAR_AHEAD
                && let Some(r) = ranged_upstream(ctx, &digest, start, end, total, log).await?
            {
                return Ok(r);
            }
            let Some(body) = fetch_body(&flight, start, Some(end)).await? else {
                return uncached(ctx, &digest, log).await;
            };
            let body = on_upstream_if_no_room(ctx, &digest, flight.clone(), body, start, Some(end));
            partial(Body::from_stream(stream_span(ctx, &digest, log.cache, body)), start, end, total)
        }
        None => {
            let Some(body) = fetch_body(&flight, 0, None).await? else {
                return uncached(ctx, &digest, log).await;
            };
            let body = on_upstream_if_no_room(ctx, &digest, flight.clone(), body, 0, None);
            let mut r = Response::new(Body::from_stream(stream_span(ctx, &digest, log.cache, body)));
            if let Some(t) = total {
                r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(t));
            }
            r
        }
    };
    blob_headers(r.headers_mut(), &digest);
    Ok(r)
}

/// A fetch's body for this client; `None` when the fetch ran out of room before the client began
/// reading (its staging file is gone): the caller serves the blob uncached, as when
/// [`Flight::head`] already said so.
async fn fetch_body(
    flight: &Flight,
    start: u64,
    end: Option<u64>,
) -> Result<Option<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>, RegistryError> {
    match flight.body(start, end).await {
        Ok(body) => Ok(Some(body)),
        Err(FetchFailure::NoSpace) => Ok(None),
        Err(e) => Err(fetch_error(&e)),
    }
}

/// A fetch's body for one client that, when the cache runs out of room in the middle of the fetch
/// (the disk filled by something else), goes on from upstream where the client is (`Range`), so
/// the response is not cut; the client checks the digest, as for any registry.
fn on_upstream_if_no_room(
    ctx: &Ctx,
    digest: &Digest,
    flight: Arc<Flight>,
    cached: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    enum Source<S> {
        Cache(S),
        Upstream(futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>),
        Done,
    }
    /// What going on from upstream takes, moved along with the stream's state (never cloned per chunk).
    struct Rest {
        upstream: Arc<Upstream>,
        store: Arc<crate::store::Store>,
        repo: Arc<wharf_core::Repo>,
        name: String,
        client: Option<Arc<crate::credentials::ClientCredentials>>,
        digest: Digest,
        flight: Arc<Flight>,
        end: Option<u64>,
    }
    /// The rest of the blob from `pos`, asked upstream with a `Range`.
    async fn from_upstream(
        rest: &Rest,
        pos: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>, std::io::Error> {
        let digest = &rest.digest;
        rest.store.degraded("blob", &format_args!("no room left in the middle of blob {digest}"));
        let range = match rest.end {
            Some(end) => format!("bytes={pos}-{}", end - 1),
            None => format!("bytes={pos}-"),
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(&range).map_err(std::io::Error::other)?);
        let req = upstream_blob_request(&rest.repo, &rest.name, rest.client.as_deref(), digest, Method::GET, headers);
        match rest.upstream.send(&req).await {
            Ok(r) if r.status == StatusCode::PARTIAL_CONTENT => {
                Ok(r.into_stream().map(|c| c.map_err(std::io::Error::other)).boxed())
            }
            Ok(r) => Err(std::io::Error::other(format!("upstream answered {} to {range}", r.status))),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
    let rest = Rest {
        upstream: ctx.state.upstream.clone(),
        store: ctx.state.store.clone(),
        repo: ctx.repo.clone(),
        name: ctx.name.clone(),
        client: ctx.client.clone(),
        digest: digest.clone(),
        flight,
        end,
    };
    let state = (Source::Cache(Box::pin(cached)), start, rest);
    futures_util::stream::unfold(state, |(mut source, pos, rest)| async move {
        loop {
            match source {
                Source::Done => return None,
                Source::Cache(mut s) => match s.next().await {
                    Some(Ok(b)) => {
                        let pos = pos + b.len() as u64;
                        return Some((Ok(b), (Source::Cache(s), pos, rest)));
                    }
                    None => return None,
                    Some(Err(e)) if !rest.flight.out_of_room() => return Some((Err(e), (Source::Done, pos, rest))),
                    Some(Err(_)) => match from_upstream(&rest, pos).await {
                        Ok(s) => source = Source::Upstream(s),
                        Err(e) => return Some((Err(e), (Source::Done, pos, rest))),
                    },
                },
                Source::Upstream(mut s) => {
                    return match s.next().await {
                        Some(Ok(b)) => {
                            let pos = pos + b.len() as u64;
                            Some((Ok(b), (Source::Upstream(s), pos, rest)))
                        }
                        Some(Err(e)) => Some((Err(e), (Source::Done, pos, rest))),
                        None => None,
                    };
                }
            }
        }
    })
}

/// A repo may serve a cached blob only when that repo and name were seen to hold it: a digest
/// learnt elsewhere must not open another repository's content. Otherwise ask the upstream (with
/// the client's credentials, for a passthrough repo). A passthrough repo's client needs the
/// upstream's acceptance besides (a recent one, or a HEAD now).
async fn authorize_cached(ctx: &Ctx, digest: &Digest, log: &mut RequestLog) -> Result<(), RegistryError> {
    let store = &ctx.state.store;
    if store.is_linked(&ctx.repo.key, &ctx.name, digest) {
        return gate::authorize_hit(ctx, || format!("blobs/{digest}"), log).await;
    }
    Box::pin(confirm_upstream(ctx, digest, log)).await
}

/// HEAD of the blob in this repo and name, as this client: 200 (or the registry's redirect to the
/// content, not followed) links it here.
async fn confirm_upstream(ctx: &Ctx, digest: &Digest, log: &mut RequestLog) -> Result<(), RegistryError> {
    let mut req = blob_request(ctx, digest, Method::HEAD, HeaderMap::new());
    req.follow_redirects = false;
    log.upstream_url = Upstream::url_for(&req);
    let resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    if !gate::accepted(&resp) {
        let status = resp.status;
        return Err(upstream_status(status, resp.error_detail().await, "blob", None));
    }
    gate::note_authorized(ctx, log);
    ctx.state.store.link(&ctx.repo.key, &ctx.name, [digest]).map_err(|e| {
        tracing::error!(repo_key = %ctx.repo.key, %digest, error = %e, "recording the blob's link");
        RegistryError::internal(e.client_message())
    })
}

/// A client joining a fetch someone else started: a fetch for another repo or name is confirmed
/// upstream for this one first (as a cache hit would be); a passthrough client needs the upstream's
/// acceptance of its own credentials, whoever started the fetch.
async fn authorize_waiter(
    ctx: &Ctx,
    flight: &Flight,
    digest: &Digest,
    log: &mut RequestLog,
) -> Result<(), RegistryError> {
    if flight.repo_key != ctx.repo.key || flight.name != ctx.name {
        return confirm_upstream(ctx, digest, log).await;
    }
    gate::authorize_hit(ctx, || format!("blobs/{digest}"), log).await
}

fn blob_request<'a>(ctx: &'a Ctx, digest: &Digest, method: Method, headers: HeaderMap) -> UpstreamRequest<'a> {
    upstream_blob_request(&ctx.repo, &ctx.name, ctx.client.as_deref(), digest, method, headers)
}

/// `blobs/<digest>` of `repo` and `name`, presenting `client`'s credentials (passthrough repos).
fn upstream_blob_request<'a>(
    repo: &'a wharf_core::Repo,
    name: &'a str,
    client: Option<&'a crate::credentials::ClientCredentials>,
    digest: &Digest,
    method: Method,
    headers: HeaderMap,
) -> UpstreamRequest<'a> {
    UpstreamRequest {
        repo,
        name,
        method,
        path: format!("blobs/{digest}"),
        query: None,
        headers,
        retry: true,
        follow_redirects: true,
        client,
    }
}

fn range_header(headers: &HeaderMap) -> Option<range::RangeSpec> {
    range::parse(headers.get(header::RANGE)?.to_str().ok()?)
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest) {
    content_headers(h, digest, OCTETS, IMMUTABLE);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

fn partial(body: Body, start: u64, end: u64, total: u64) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1)) {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

fn unsatisfiable(digest: &Digest, total: u64) -> Response {
    let e = RegistryError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "RANGE_INVALID",
        format!("requested range is outside the blob's {total} bytes"),
    );
    let mut r = axum::response::IntoResponse::into_response(e);
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let _ = digest;
    r
}

/// A cache hit: the file, whole or a range. A file this process has not verified lately
/// (`trusted` false: the first read since start, or `--blob-reverify-after`) is hashed: whole, while
/// it streams, the last chunk held back until the digest matched; a range, before any byte goes
/// out. `None`: the range's file failed its digest and was removed (the caller fetches it).
async fn serve_file(ctx: &Ctx, digest: &Digest, size: u64, trusted: bool) -> Result<Option<Response>, RegistryError> {
    if not_modified(&ctx.headers, digest) {
        return Ok(Some(not_modified_response(digest, OCTETS, IMMUTABLE)));
    }
    let (start, end, ranged) = match range_header(&ctx.headers).map(|r| r.resolve(size)) {
        Some(Resolved::Unsatisfiable) => return Ok(Some(unsatisfiable(digest, size))),
        Some(Resolved::Partial { start, end }) => (start, end, true),
        None => (0, size, false),
    };
    let store = &ctx.state.store;
    // Opened now: an eviction after this point cannot take the bytes from under the client.
    let open = || {
        std::fs::File::open(store.blob_path(digest))
            .map_err(|e| RegistryError::internal(format!("cached blob unreadable: {e}")))
    };
    let body = if ctx.head {
        Body::empty()
    } else if trusted && ctx.plaintext {
        // Verified, and only the kernel reads the bytes: from the page cache without a copy.
        let source = match store.mapped_blob(digest, size) {
            Some(map) => mapped::Source::Shared(map),
            None => mapped::Source::Windows(open()?),
        };
        Body::from_stream(stream_span(ctx, digest, "hit", mapped::stream(source, start, end)))
    } else {
        let file = open()?;
        if trusted {
            Body::from_stream(stream_span(ctx, digest, "hit", read_file(file, start, Some(end), None)))
        } else if ranged {
            let check =
                file.try_clone().map_err(|e| RegistryError::internal(format!("cached blob unreadable: {e}")))?;
            let (want, len) = (digest.clone(), size);
            let got = tokio::task::spawn_blocking(move || hash_file(check, len))
                .await
                .map_err(|e| RegistryError::internal(format!("hashing a cached blob: {e}")))?;
            match got {
                Ok(got) if got == want => store.blob_verified(digest),
                other => {
                    let why = other.map_or_else(|e| e.to_string(), |got| got.to_string());
                    store.corrupt(EntryKind::Blob, digest, &why);
                    return Ok(None);
                }
            }
            Body::from_stream(stream_span(ctx, digest, "hit", read_file(file, start, Some(end), None)))
        } else {
            let whole = read_file(file, 0, Some(size), None);
            Body::from_stream(stream_span(ctx, digest, "hit", verifying(whole, store.clone(), digest.clone(), size)))
        }
    };
    let mut r = if ranged {
        partial(body, start, end, size)
    } else {
        let mut r = Response::new(body);
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        r
    };
    blob_headers(r.headers_mut(), digest);
    Ok(Some(r))
}

/// A whole blob file read as it is served, hashed on the way: the chunk that completes it goes out
/// only once the digest matched. On a mismatch (or a file shorter than its size) the body ends in
/// an error, so the client never holds a complete-looking body, and the file is removed.
fn verifying<S>(
    body: S,
    store: Arc<Store>,
    digest: Digest,
    size: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let mut hasher = Some(DigestHasher::new());
    let mut seen = 0u64;
    body.map(move |chunk| {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::UnexpectedEof && hasher.take().is_some() {
                    store.corrupt(EntryKind::Blob, &digest, "a file shorter than its size");
                }
                return Err(e);
            }
        };
        seen += chunk.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if seen >= size
            && let Some(h) = hasher.take()
        {
            let got = h.finish();
            if got != digest {
                store.corrupt(EntryKind::Blob, &digest, &got.to_string());
                return Err(std::io::Error::other(format!(
                    "the cached blob {digest} does not match its digest (it reads as {got}); removed"
                )));
            }
            store.blob_verified(&digest);
        }
        Ok(chunk)
    })
}

/// SHA-256 of the first `size` bytes of `file`, and a check that it has no more and no fewer.
fn hash_file(file: std::fs::File, size: u64) -> std::io::Result<Digest> {
    use std::io::Read as _;
    if file.metadata()?.len() != size {
        return Err(std::io::Error::other("the file's length is not the blob's size"));
    }
    let mut h = DigestHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = std::io::BufReader::new(file).take(size);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// `body` in a `blob.stream` span (a child of the request's), open until the client has it all.
fn stream_span<S, E>(
    ctx: &Ctx,
    digest: &Digest,
    cache: &'static str,
    body: S,
) -> impl Stream<Item = Result<Bytes, E>> + use<S, E>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let span = tracing::info_span!(
        "blob.stream",
        repo_key = %ctx.repo.key,
        %digest,
        cache,
        bytes = tracing::field::Empty,
    );
    wharf_runtime::telemetry::traced_body(body, span)
}

/// HEAD of a blob not cached: asked upstream, nothing fetched. The HEAD does not follow a
/// redirect: a registry that sends blobs to an object store signs the URL for GET, and HEAD there
/// is refused (S3: 403). A redirect is the registry's yes; the size then comes from a one-byte
/// ranged GET through it (`Content-Range: bytes 0-0/<size>`).
async fn head_upstream(ctx: &Ctx, digest: &Digest, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let mut req = blob_request(ctx, digest, Method::HEAD, HeaderMap::new());
    req.follow_redirects = false;
    log.upstream_url = Upstream::url_for(&req);
    log.cache = "miss";
    let mut resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    if resp.status.is_redirection() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        let get = blob_request(ctx, digest, Method::GET, headers);
        resp = ctx.state.upstream.send(&get).await.map_err(|e| upstream_error(&e))?;
    }
    let size = match resp.status {
        StatusCode::OK => resp.content_length(),
        StatusCode::PARTIAL_CONTENT => resp
            .header_str(header::CONTENT_RANGE)
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.trim().parse::<u64>().ok()),
        status => {
            let retry_after = resp.header_str(header::RETRY_AFTER).map(str::to_owned);
            return Err(upstream_status(status, resp.error_detail().await, "blob", retry_after));
        }
    };
    gate::note_authorized(ctx, log);
    let mut r = Response::new(Body::empty());
    if let Some(len) = size {
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    blob_headers(r.headers_mut(), digest);
    Ok(r)
}

/// A range far ahead of the fetch, asked of the upstream directly and passed through uncached.
/// `None` when the upstream ignores the range: the caller serves it from the fetch instead.
async fn ranged_upstream(
    ctx: &Ctx,
    digest: &Digest,
    start: u64,
    end: u64,
    total: u64,
    log: &mut RequestLog,
) -> Result<Option<Response>, RegistryError> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("bytes={start}-{}", end - 1)) {
        headers.insert(header::RANGE, v);
    }
    let req = blob_request(ctx, digest, Method::GET, headers);
    let resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    let expected = format!("bytes {start}-{}/{total}", end - 1);
    if resp.status != StatusCode::PARTIAL_CONTENT || resp.header_str(header::CONTENT_RANGE) != Some(expected.as_str()) {
        return Ok(None);
    }
    log.cache = "bypass";
    let mut r = partial(Body::from_stream(resp.into_stream()), start, end, total);
    blob_headers(r.headers_mut(), digest);
    Ok(Some(r))
}

/// The cache has no room for this blob: the client gets it straight from upstream (its `Range`
/// passed on), uncached. The client checks the digest, as it does for any registry.
async fn uncached(ctx: &Ctx, digest: &Digest, log: &mut RequestLog) -> Result<Response, RegistryError> {
    let mut headers = HeaderMap::new();
    if let Some(r) = ctx.headers.get(header::RANGE) {
        headers.insert(header::RANGE, r.clone());
    }
    let req = blob_request(ctx, digest, Method::GET, headers);
    let resp = ctx.state.upstream.send(&req).await.map_err(|e| upstream_error(&e))?;
    if !matches!(resp.status, StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
        let status = resp.status;
        return Err(upstream_status(status, resp.error_detail().await, "blob", None));
    }
    log.cache = "bypass";
    ctx.state.store.degraded("blob", &format_args!("no room in the cache for blob {digest} (repo {})", ctx.repo.key));
    let status = resp.status;
    let mut r = Response::new(Body::empty());
    for k in [header::CONTENT_LENGTH, header::CONTENT_RANGE] {
        if let Some(v) = resp.headers.get(&k) {
            r.headers_mut().insert(k, v.clone());
        }
    }
    let counter = metrics::counter!("wharf_uncached_bytes_total", "repo_key" => ctx.repo.key.to_string());
    *r.body_mut() = Body::from_stream(resp.into_stream().inspect(move |c| {
        if let Ok(b) = c {
            counter.increment(b.len() as u64);
        }
    }));
    *r.status_mut() = status;
    blob_headers(r.headers_mut(), digest);
    Ok(r)
}
