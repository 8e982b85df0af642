//! Single-flight blob fetches: one upstream GET per digest per node at a time (and per cluster
//! with peer fetch: a node that does not own the digest asks its owner first, [`crate::peers`]).
//!
//! The fetch runs in its own task, so a client that disconnects does not stop it. It writes into a
//! staging file while hashing, and publishes how many bytes are on disk through a `watch` channel.
//! Every client of that digest (the first included) reads the staging file on its own through
//! positional reads, up to what has been written: a slow client holds nothing but its own read
//! position, so it never slows the fetch or the other clients, and no blob is held in memory.
//! On a digest match the file is fsynced and renamed into `blobs/`; otherwise it is removed and
//! every client's body ends in an error, never in a complete-looking wrong body.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::watch;
use tracing::Instrument as _;
use wharf_core::{Digest, DigestHasher, Repo, RepoKey};

use crate::bufpool;
use crate::config::Member;
use crate::credentials::ClientCredentials;
use crate::peers::{PeerBody, PeerFailure, Peers};
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

/// Where a fetch is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for the upstream's response head.
    Connecting,
    /// `written` bytes are in the staging file; `total` from the upstream's `Content-Length`.
    Streaming {
        written: u64,
        total: Option<u64>,
    },
    /// Verified and in `blobs/`.
    Done {
        size: u64,
    },
    Failed(FetchFailure),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchFailure {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("upstream answered {status}")]
    Status { status: StatusCode, retry_after: Option<String>, detail: Value },
    #[error("upstream sent {got} bytes, expected {expected}")]
    Length { got: u64, expected: u64 },
    #[error("upstream sent bytes whose digest is {actual}, not the requested {expected}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("upstream body failed after {after} bytes: {source}")]
    Body { after: u64, source: UpstreamError },
    #[error("cache write failed: {0}")]
    Io(String),
    /// The blob does not fit (size cap reached with nothing evictable, or the disk is full):
    /// clients are served from upstream without caching.
    #[error("no room in the cache for this blob")]
    NoSpace,
}

impl FetchFailure {
    /// A store error, as clients may see it (no path on the node's disk: the log has the whole error).
    fn store(e: crate::store::StoreError) -> Self {
        if e.is_no_space() {
            return FetchFailure::NoSpace;
        }
        tracing::error!(error = %e, "blob fetch: cache write failed");
        FetchFailure::Io(e.client_message())
    }
}

/// A fetch in progress, shared by all its clients.
pub struct Flight {
    /// The repo and name whose client started the fetch (and to which it links the blob).
    pub repo_key: RepoKey,
    pub name: String,
    staging: PathBuf,
    dest: PathBuf,
    progress: watch::Receiver<Progress>,
    /// The fetch's `blob.fetch` span: coalesced clients link to it.
    pub span: tracing::Span,
    /// The bytes come from a peer (set before the first byte is written).
    from_peer: Arc<AtomicBool>,
}

impl Flight {
    /// Waits until the upstream answered (or the fetch failed), and returns where it is.
    pub async fn head(&self) -> Progress {
        let mut rx = self.progress.clone();
        let result = rx.wait_for(|p| !matches!(p, Progress::Connecting)).await.map(|p| p.clone());
        result.unwrap_or_else(|_| Progress::Failed(FetchFailure::Io("fetch task ended".into())))
    }

    /// Whether the bytes came from a peer (known once [`Flight::head`] returned).
    pub fn from_peer(&self) -> bool {
        self.from_peer.load(Ordering::Relaxed)
    }

    /// Whether the fetch ran out of room in the cache (its readers may go on from upstream).
    pub fn out_of_room(&self) -> bool {
        matches!(&*self.progress.borrow(), Progress::Failed(FetchFailure::NoSpace))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        match &*self.progress.borrow() {
            Progress::Streaming { written, .. } => *written,
            Progress::Done { size } => *size,
            _ => 0,
        }
    }

    /// The body from `start` to `end` (exclusive; `None`: to the end), as the fetch writes it.
    /// Each client reads through a file descriptor of its own.
    pub async fn body(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, FetchFailure> {
        let file = match std::fs::File::open(&self.staging).or_else(|_| std::fs::File::open(&self.dest)) {
            Ok(f) => f,
            // Neither: the fetch failed and removed its file, or finished a moment ago.
            Err(_) => {
                let mut rx = self.progress.clone();
                let verdict = rx.wait_for(|p| matches!(p, Progress::Done { .. } | Progress::Failed(_))).await;
                match verdict.as_deref() {
                    Ok(Progress::Failed(f)) => return Err(f.clone()),
                    _ => std::fs::File::open(&self.dest).map_err(|e| FetchFailure::Io(e.to_string()))?,
                }
            }
        };
        Ok(read_file(file, start, end, Some(self.progress.clone())))
    }
}

/// Joining a fetch may find the blob already cached (the fetch just finished).
pub enum Joined {
    Cached,
    Flight { flight: Arc<Flight>, coalesced: bool },
}

/// Everything a fetch needs.
pub struct FetchContext {
    pub store: Arc<Store>,
    pub upstream: Arc<Upstream>,
    pub repo: Arc<Repo>,
    pub name: String,
    pub digest: Digest,
    /// The span of the client whose request starts the fetch: the fetch's span is its child.
    pub parent: tracing::Span,
    /// Passthrough repos: the credentials of the client who starts the fetch (memory only).
    pub client: Option<Arc<ClientCredentials>>,
    /// Peer fetch: the blob's owner among the nodes, asked before upstream.
    pub peer: Option<PeerAsk>,
}

/// The peer a fetch asks first, and the token it shows.
pub struct PeerAsk {
    pub peers: Arc<Peers>,
    pub member: Member,
    pub token: String,
}

/// The fetches in progress on this node, by digest.
pub struct Flights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Upstream blob fetches running at once; more wait their turn (their clients too).
    slots: tokio::sync::Semaphore,
}

impl Default for Flights {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_FETCHES)
    }
}

/// Upstream chunks already received are written in one go, up to this many.
const WRITE_BATCH: usize = 64;

impl Flights {
    pub const DEFAULT_MAX_FETCHES: usize = 64;

    pub fn new(max_fetches: usize) -> Self {
        Self { map: Mutex::default(), slots: tokio::sync::Semaphore::new(max_fetches.max(1)) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn in_flight(&self) -> usize {
        self.map().len()
    }

    /// Joins the fetch of `ctx.digest`, or starts it.
    pub fn join_or_start(self: &Arc<Self>, ctx: FetchContext) -> Result<Joined, FetchFailure> {
        let mut map = self.map();
        if let Some(f) = map.get(&ctx.digest) {
            metrics::counter!("wharf_coalesced_waiters_total", "repo_key" => ctx.repo.key.to_string()).increment(1);
            return Ok(Joined::Flight { flight: f.clone(), coalesced: true });
        }
        // A fetch commits to the index before it leaves this map: checked under the map's lock,
        // the index cannot miss a blob that was fetched a moment ago.
        if ctx.store.blob_size(&ctx.digest).is_some() {
            return Ok(Joined::Cached);
        }
        let (path, file) = ctx.store.staging_file(&ctx.digest).map_err(FetchFailure::store)?;
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(Progress::Connecting);
        let from_peer = Arc::new(AtomicBool::new(false));
        let dest = ctx.store.blob_path(&ctx.digest);
        // One fetch serves many clients; its span is a child of the first one's request (so a
        // cold pull's trace shows the fetch it waited for); later clients link to it.
        let span = tracing::info_span!(
            parent: &ctx.parent,
            "blob.fetch",
            repo_key = %ctx.repo.key,
            name = %ctx.name,
            digest = %ctx.digest,
            bytes = tracing::field::Empty,
            source = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let flight = Arc::new(Flight {
            repo_key: ctx.repo.key.clone(),
            name: ctx.name.clone(),
            staging: path.clone(),
            dest,
            progress: rx,
            span: span.clone(),
            from_peer: from_peer.clone(),
        });
        map.insert(ctx.digest.clone(), flight.clone());
        metrics::gauge!("wharf_inflight_fetches").set(map.len() as f64);
        drop(map);
        // Sampled or not like the request that started it (its spans would be roots otherwise).
        tokio::spawn(wharf_runtime::telemetry::same_sampling(
            self.clone().run(ctx, path, file, tx, from_peer).instrument(span),
        ));
        Ok(Joined::Flight { flight, coalesced: false })
    }

    async fn run(
        self: Arc<Self>,
        ctx: FetchContext,
        path: PathBuf,
        file: Arc<std::fs::File>,
        tx: watch::Sender<Progress>,
        from_peer: Arc<AtomicBool>,
    ) {
        let _slot = self.slots.acquire().await;
        let started = Instant::now();
        let result = match fetch_into(&ctx, &file, &tx, &from_peer).await {
            Ok(size) => {
                let (store, f, p, d) = (ctx.store.clone(), file.clone(), path.clone(), ctx.digest.clone());
                // Linked first: once in the index, the blob is served to this repo without asking upstream.
                if let Err(e) = ctx.store.link(&ctx.repo.key, &ctx.name, [&ctx.digest]) {
                    tracing::warn!(error = %e, "could not record the blob's repository link");
                }
                let committed = tokio::task::spawn_blocking(move || store.commit_blob(&p, &f, &d, size))
                    .await
                    .map_err(|e| FetchFailure::Io(e.to_string()))
                    .and_then(|r| r.map_err(FetchFailure::store));
                committed.map(|()| size)
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        {
            let mut map = self.map();
            map.remove(&ctx.digest);
            metrics::gauge!("wharf_inflight_fetches").set(map.len() as f64);
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(size) => {
                let span = tracing::Span::current();
                span.record("bytes", size);
                span.record("outcome", "verified");
                tracing::info!(repo_key = %ctx.repo.key, name = %ctx.name, digest = %ctx.digest, bytes = size, duration_ms, "blob fetched and verified");
                tx.send_replace(Progress::Done { size });
            }
            Err(error) => {
                let span = tracing::Span::current();
                span.record("outcome", "failed");
                span.record("error", tracing::field::display(&error));
                tracing::warn!(repo_key = %ctx.repo.key, name = %ctx.name, digest = %ctx.digest, %error, duration_ms, "blob fetch failed; nothing cached");
                tx.send_replace(Progress::Failed(error));
            }
        }
    }
}

/// Where a fetch's bytes come from.
enum Source<'a> {
    Peer(&'a PeerAsk),
    Upstream,
}

async fn fetch_into(
    ctx: &FetchContext,
    file: &Arc<std::fs::File>,
    tx: &watch::Sender<Progress>,
    from_peer: &AtomicBool,
) -> Result<u64, FetchFailure> {
    let (mut from, total, body) = match ask_peer(ctx).await {
        Some((ask, p)) => (Source::Peer(ask), p.total, p.body),
        None => {
            let (total, body) = from_upstream(ctx, None).await?;
            (Source::Upstream, total, body)
        }
    };
    tracing::Span::current().record("source", if matches!(from, Source::Peer(_)) { "peer" } else { "upstream" });
    from_peer.store(matches!(from, Source::Peer(_)), Ordering::Relaxed);
    // Held until the bytes are written: concurrent fetches cannot all count the same free space.
    let Some(_room) = ctx.store.reserve(total.unwrap_or(0)) else {
        return Err(FetchFailure::NoSpace);
    };
    tx.send_replace(Progress::Streaming { written: 0, total });
    let upstream_bytes =
        metrics::counter!("wharf_upstream_fetched_bytes_total", "repo_key" => ctx.repo.key.to_string());
    let peer_bytes = metrics::counter!("wharf_peer_fetched_bytes_total", "repo_key" => ctx.repo.key.to_string());
    let mut hasher = DigestHasher::new();
    let mut written = 0u64;
    let mut chunks = body.ready_chunks(WRITE_BATCH);
    let result = loop {
        let Some(batch) = chunks.next().await else { break Ok(()) };
        let mut bufs = Vec::with_capacity(batch.len());
        let mut failed = None;
        for c in batch {
            match c {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let n: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if let Some(expected) = total
            && written + n > expected
        {
            break Err(FetchFailure::Length { got: written + n, expected });
        }
        let f = file.clone();
        let offset = written;
        hasher = tokio::task::spawn_blocking(move || -> std::io::Result<DigestHasher> {
            let mut at = offset;
            for b in &bufs {
                f.write_all_at(b, at)?;
                hasher.update(b);
                at += b.len() as u64;
            }
            Ok(hasher)
        })
        .await
        .map_err(|e| FetchFailure::Io(e.to_string()))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => FetchFailure::NoSpace,
            _ => FetchFailure::Io(e.to_string()),
        })?;
        written += n;
        match from {
            Source::Peer(ask) => {
                peer_bytes.increment(n);
                ask.peers.received(&ask.member, n);
            }
            Source::Upstream => upstream_bytes.increment(n),
        }
        tx.send_replace(Progress::Streaming { written, total });
        let Some(source) = failed else { continue };
        // A peer that broke off (killed, cut off): the rest from upstream, where it stopped, so
        // the clients already streaming get their whole body.
        if let Source::Peer(ask) = from {
            ask.peers.failed(&ask.member, PeerFailure::Body, &source);
            if let Some(t) = total
                && let Ok((Some(rest), body)) = from_upstream(ctx, Some(written)).await
                && rest == t - written
            {
                tracing::info!(peer = %ask.member.id, after = written, "going on from upstream");
                tracing::Span::current().record("source", "peer+upstream");
                from = Source::Upstream;
                chunks = body.ready_chunks(WRITE_BATCH);
                continue;
            }
        }
        break Err(FetchFailure::Body { after: written, source });
    };
    let checked = result.and_then(|()| match total {
        Some(expected) if written != expected => Err(FetchFailure::Length { got: written, expected }),
        _ => {
            let actual = hasher.finish();
            if actual == ctx.digest {
                Ok(written)
            } else {
                Err(FetchFailure::Mismatch { expected: ctx.digest.clone(), actual })
            }
        }
    });
    if let (Source::Peer(ask), Err(e @ (FetchFailure::Length { .. } | FetchFailure::Mismatch { .. }))) =
        (&from, &checked)
    {
        ask.peers.failed(&ask.member, PeerFailure::WrongBytes, e);
    }
    checked
}

/// The owner's body, when the fetch asks a peer and the peer answers; else `None` (a peer to
/// blame is marked suspect): the fetch goes to upstream.
async fn ask_peer(ctx: &FetchContext) -> Option<(&PeerAsk, PeerBody)> {
    let ask = ctx.peer.as_ref()?;
    let what = format!("blobs/{}", ctx.digest);
    match ask.peers.get(&ask.member, &ask.token, ctx.repo.key.as_str(), &ctx.name, &what, None).await {
        Ok(body) => Some((ask, body)),
        Err(skipped) => {
            match skipped.failure {
                Some(f) => ask.peers.failed(&ask.member, f, &skipped.error),
                None => {
                    tracing::debug!(peer = %ask.member.id, error = %skipped.error, "peer has not the blob; asking upstream")
                }
            }
            None
        }
    }
}

/// The blob from upstream, from byte `from` on when given (a `Range` request, which must get a
/// 206); the length of what comes, when the upstream says.
async fn from_upstream(
    ctx: &FetchContext,
    from: Option<u64>,
) -> Result<(Option<u64>, BoxStream<'static, Result<Bytes, UpstreamError>>), FetchFailure> {
    let mut headers = http::HeaderMap::new();
    if let Some(start) = from
        && let Ok(v) = http::HeaderValue::from_str(&format!("bytes={start}-"))
    {
        headers.insert(http::header::RANGE, v);
    }
    let req = UpstreamRequest {
        repo: &ctx.repo,
        name: &ctx.name,
        method: Method::GET,
        path: format!("blobs/{}", ctx.digest),
        query: None,
        headers,
        retry: true,
        follow_redirects: true,
        client: ctx.client.as_deref(),
    };
    let resp = ctx.upstream.send(&req).await.map_err(FetchFailure::Upstream)?;
    let expected = if from.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    if resp.status != expected {
        let status = resp.status;
        let retry_after = resp.header_str(http::header::RETRY_AFTER).map(str::to_owned);
        return Err(FetchFailure::Status { status, retry_after, detail: resp.error_detail().await });
    }
    Ok((resp.content_length(), resp.into_stream().boxed()))
}

/// Streams `file[start..end]`. With `progress`, the file is still being written: reads stop at what
/// is written, wait for more, and fail when the fetch fails.
///
/// Chunks are read into buffers from [`bufpool`], which are reused once hyper has written them out;
/// from the page cache directly when the bytes are there, else in a blocking task.
pub fn read_file(
    file: std::fs::File,
    start: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let reader = Reader { file: Arc::new(file), pos: start, end, progress };
    futures_util::stream::try_unfold(reader, |mut r| async move {
        loop {
            let available = match &mut r.progress {
                None => r.end.unwrap_or(r.pos),
                Some(rx) => match &*rx.borrow_and_update() {
                    Progress::Connecting => 0,
                    // The blob's last byte is held back until it is verified: a client never
                    // holds a complete-looking body of bytes that failed their digest.
                    Progress::Streaming { written, total } => match total {
                        Some(t) => (*written).min(t.saturating_sub(1)),
                        None => *written,
                    },
                    Progress::Done { size } => {
                        r.end = Some(r.end.map_or(*size, |e| e.min(*size)));
                        *size
                    }
                    Progress::Failed(e) => return Err(std::io::Error::other(e.to_string())),
                },
            };
            let limit = r.end.map_or(available, |e| e.min(available));
            if r.pos < limit {
                let len = (limit - r.pos).min(bufpool::CHUNK as u64) as usize;
                let (file, pos) = (r.file.clone(), r.pos);
                let mut buf = bufpool::take();
                // From the page cache without leaving this thread when the bytes are there; a
                // blocking task for the rest (cold disk).
                let got = read_cached(&file, &mut buf[..len], pos);
                let chunk = if got == len {
                    bufpool::freeze(buf, len)
                } else {
                    tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                        file.read_exact_at(&mut buf[got..len], pos + got as u64)?;
                        Ok(bufpool::freeze(buf, len))
                    })
                    .await
                    .map_err(std::io::Error::other)??
                };
                r.pos += chunk.len() as u64;
                return Ok(Some((chunk, r)));
            }
            if r.end.is_some_and(|e| r.pos >= e) {
                return Ok(None);
            }
            match &mut r.progress {
                None => return Ok(None),
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        return Err(std::io::Error::other("fetch ended unexpectedly"));
                    }
                }
            }
        }
    })
}

struct Reader {
    file: Arc<std::fs::File>,
    pos: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
}

/// Reads what the page cache holds of `buf.len()` bytes at `pos` without blocking (`RWF_NOWAIT`).
/// Returns how many bytes it read: 0 when none were cached or the filesystem cannot say.
#[cfg(target_os = "linux")]
fn read_cached(file: &std::fs::File, buf: &mut [u8], pos: u64) -> usize {
    let mut slices = [std::io::IoSliceMut::new(buf)];
    rustix::io::preadv2(file, &mut slices, pos, rustix::io::ReadWriteFlags::NOWAIT).unwrap_or(0)
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &std::fs::File, _buf: &mut [u8], _pos: u64) -> usize {
    0
}
