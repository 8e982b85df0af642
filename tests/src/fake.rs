//! An in-process fake registry (axum on 127.0.0.1:0) for what a real one can't do on demand: token and
//! Basic auth, blob redirects to a second host, faults switched on and off while it runs, and a record
//! of every request it received.
//!
//! Faults are rules matched against each request's path (a substring, e.g. a digest or
//! `/manifests/v1`), optionally only for some methods, optionally only a number of times.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::image::{Blob, TestImage};

/// How the fake upstream authenticates `/v2/...` requests.
#[derive(Clone, Debug, Default)]
pub enum AuthMode {
    /// No authentication.
    #[default]
    None,
    /// HTTP Basic on every request: `WWW-Authenticate: Basic realm="fake"`.
    Basic { username: String, password: String },
    /// Token auth: `WWW-Authenticate: Bearer realm="http://<addr>/token",service="fake",scope=...`.
    /// With `credentials`, the token endpoint demands them (Basic, or the OAuth2 password grant);
    /// without, it gives tokens to anyone. `expires_in` is put in the token answer and enforced.
    Bearer { credentials: Option<(String, String)>, expires_in: Option<u64> },
}

/// Where blob GETs go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedirectMode {
    /// Served directly.
    #[default]
    None,
    /// 307 to the second host (`127.0.0.2:<port>`), which rejects requests carrying `Authorization`
    /// with 400 (like S3).
    OtherHost,
    /// 307 with a relative `Location` on the same host.
    Relative,
}

/// A misbehaviour of the upstream, for the requests a [`FaultRule`] matches.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer `status` with an OCI error body (and `Retry-After` when given).
    Status { status: u16, retry_after: Option<String> },
    /// Declare the full `Content-Length`, send half the body, then drop the connection.
    ResetMidBody,
    /// Send bytes of the right length whose content differs (the digest header still claims the
    /// requested digest).
    WrongBytes,
    /// Declare the full `Content-Length`, send all but the last 16 bytes, then drop the connection.
    ShortBody,
    /// Honest framing but 16 bytes too few: `Content-Length` = size - 16.
    Truncated,
    /// Honest framing but 16 bytes too many: the blob followed by 16 junk bytes.
    Extended,
    /// Accept the request and never answer (no header).
    HangBeforeHeaders,
    /// Send the headers and half the body, then nothing (the connection stays open).
    HangMidBody,
    /// Send the body in `chunk`-byte pieces with `delay` before each.
    Slow { chunk: usize, delay: Duration },
    /// Send the first `after` bytes, then wait until [`FakeUpstream::release`] is called.
    Pause { after: usize },
}

/// A fault applied to requests whose path contains `pattern`.
#[derive(Clone, Debug)]
pub struct FaultRule {
    pub pattern: String,
    /// Only these methods; all when `None`.
    pub methods: Option<Vec<Method>>,
    pub fault: Fault,
    /// Only this many times; always when `None`.
    pub times: Option<usize>,
}

/// Which listener received a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Main,
    Redirect,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub listener: Listener,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The request body (only read for POST).
    pub body: Bytes,
    pub at: Instant,
    /// Body bytes sent in the answer so far.
    pub sent: Arc<AtomicU64>,
    /// Whether the answer's body was sent completely.
    pub completed: Arc<AtomicBool>,
}

impl RecordedRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `(user, password)` of a Basic `Authorization` header.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        parse_basic(self.header("authorization")?)
    }

    /// The values of query parameter `key`.
    pub fn query_values(&self, key: &str) -> Vec<String> {
        form_values(self.query.as_deref().unwrap_or(""), key)
    }

    /// The values of form field `key` in a urlencoded body.
    pub fn form_values(&self, key: &str) -> Vec<String> {
        form_values(&String::from_utf8_lossy(&self.body), key)
    }

    /// The answer's body was sent completely.
    pub fn is_completed(&self) -> bool {
        self.completed.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<String, Bytes>,
    manifests: HashMap<(String, String), (String, Bytes)>,
    auth: AuthMode,
    redirect: RedirectMode,
    /// HEADs of blobs are redirected too, and the redirect target refuses them (403), as S3 does
    /// with a URL signed for GET.
    redirect_heads: bool,
    faults: Vec<FaultRule>,
    requests: Vec<RecordedRequest>,
    tokens: HashMap<String, IssuedToken>,
    token_seq: u64,
    /// Added to every answer (see [`FakeUpstream::set_response_header`]).
    response_headers: Vec<(String, String)>,
    /// Users besides the one of [`AuthMode`] (see [`FakeUpstream::add_user`]): user -> password.
    users: HashMap<String, String>,
    /// Private repositories: name -> the users who may pull it (see [`FakeUpstream::make_private`]).
    private: HashMap<String, Vec<String>>,
    /// The repositories a blob was put in by [`FakeUpstream::put_image`]: a blob of a private
    /// repository is unknown (404) in every other repository, as distribution's links make it.
    blob_repos: HashMap<String, Vec<String>>,
    /// The token endpoint's status for a refused login (401; GHCR answers stale credentials 403).
    refusal_status: Option<u16>,
    /// The token endpoint has no POST route (404, as GCR's).
    no_token_post: bool,
    /// ACR's `/oauth2/exchange`: the Entra access tokens it takes.
    exchangeable: Vec<String>,
    /// Refresh tokens issued by the exchange.
    exchanged: u64,
}

/// The username ACR gives its refresh tokens (the OAuth2 refresh-token grant, by POST).
pub const ACR_REFRESH_TOKEN_USER: &str = "00000000-0000-0000-0000-000000000000";

impl Inner {
    /// Whether `user:password` is a known login (the [`AuthMode`]'s or an added user).
    fn valid_login(&self, user: &str, password: &str) -> bool {
        let configured = match &self.auth {
            AuthMode::Basic { username, password: p } => Some((username.as_str(), p.as_str())),
            AuthMode::Bearer { credentials: Some((u, p)), .. } => Some((u.as_str(), p.as_str())),
            _ => None,
        };
        configured == Some((user, password)) || self.users.get(user).is_some_and(|p| p == password)
    }

    /// Whether `user` (`None`: anonymous) may pull repository `name`.
    fn may_pull(&self, user: Option<&str>, name: &str) -> bool {
        match self.private.get(name) {
            None => true,
            Some(allowed) => user.is_some_and(|u| allowed.iter().any(|a| a == u)),
        }
    }

    /// Whether blob `digest` exists in repository `name` (a private repository's blobs exist only there).
    fn blob_in(&self, digest: &str, name: &str) -> bool {
        match self.blob_repos.get(digest) {
            Some(repos) if !repos.iter().any(|r| r == name) => !repos.iter().any(|r| self.private.contains_key(r)),
            _ => true,
        }
    }
}

#[derive(Clone, Debug)]
struct IssuedToken {
    scopes: Vec<String>,
    expires: Option<Instant>,
}

struct Shared {
    inner: Mutex<Inner>,
    gate: watch::Sender<bool>,
    /// Set by [`FakeUpstream::stop`]: the listeners close, open connections end.
    stopped: watch::Sender<bool>,
    addr: SocketAddr,
    redirect_addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    listener: Listener,
}

/// A running fake registry: a main listener on `127.0.0.1:<port>` and a redirect target on
/// `127.0.0.2:<port>` (another host). Stops when dropped.
pub struct FakeUpstream {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FakeUpstream {
    /// Starts a fake registry without authentication.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(AuthMode::None).await
    }

    /// Starts a fake registry with `auth`.
    pub async fn start_with(auth: AuthMode) -> anyhow::Result<Self> {
        let main = TcpListener::bind("127.0.0.1:0").await?;
        let redirect = match TcpListener::bind("127.0.0.2:0").await {
            Ok(l) => l,
            // Loopback aliases are not everywhere: fall back to another port on 127.0.0.1.
            Err(_) => TcpListener::bind("127.0.0.1:0").await?,
        };
        let (gate, _) = watch::channel(false);
        let (stopped, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { auth, ..Inner::default() }),
            gate,
            stopped,
            addr: main.local_addr()?,
            redirect_addr: redirect.local_addr()?,
        });
        let mut tasks = Vec::new();
        for (listener, which) in [(main, Listener::Main), (redirect, Listener::Redirect)] {
            let router = Router::new().fallback(handle).with_state(Ctx { shared: shared.clone(), listener: which });
            let mut stopped = shared.stopped.subscribe();
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let _ = axum::serve(listener, router).with_graceful_shutdown(stop).await;
            }));
        }
        Ok(Self { shared, tasks })
    }

    /// The main listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The redirect target's address (another host).
    pub fn redirect_addr(&self) -> SocketAddr {
        self.shared.redirect_addr
    }

    /// Stops serving, as an upstream that went away: both listeners close and idle keep-alive
    /// connections end, so the next request gets "connection refused". Waits (up to 10 s) until then.
    pub async fn stop(&mut self) {
        self.shared.stopped.send_replace(true);
        for t in &mut self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), &mut *t).await.is_err() {
                t.abort();
            }
        }
    }

    /// Adds a user who may log in (to the token endpoint, or as Basic credentials), besides the
    /// one of the [`AuthMode`].
    pub fn add_user(&self, user: &str, password: &str) {
        self.shared.lock().users.insert(user.to_string(), password.to_string());
    }

    /// Makes repository `name` private to `users`: tokens for anyone else leave out its scope
    /// (so its requests answer 401), Basic logins of anyone else get 403, and its blobs are
    /// unknown in every other repository.
    pub fn make_private(&self, name: &str, users: &[&str]) {
        self.shared.lock().private.insert(name.to_string(), users.iter().map(|u| u.to_string()).collect());
    }

    /// Changes the authentication mode.
    pub fn set_auth(&self, auth: AuthMode) {
        self.shared.lock().auth = auth;
    }

    /// Redirects blob HEADs too (with [`RedirectMode::OtherHost`] or `Relative`), to a target that
    /// refuses them with 403.
    pub fn set_redirect_heads(&self, on: bool) {
        self.shared.lock().redirect_heads = on;
    }

    /// Changes where blob GETs go.
    pub fn set_redirect(&self, mode: RedirectMode) {
        self.shared.lock().redirect = mode;
    }

    /// Adds a blob; returns its digest.
    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = crate::sha256_digest(&data);
        self.shared.lock().blobs.insert(digest.clone(), data);
        digest
    }

    /// Adds a manifest under `name:tag` (when `tag` is given) and `name@digest`; returns the digest.
    pub fn put_manifest(&self, name: &str, tag: Option<&str>, media_type: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = crate::sha256_digest(&data);
        let mut inner = self.shared.lock();
        let entry = (media_type.to_string(), data);
        if let Some(tag) = tag {
            inner.manifests.insert((name.to_string(), tag.to_string()), entry.clone());
        }
        inner.manifests.insert((name.to_string(), digest.clone()), entry);
        digest
    }

    /// Adds `image`'s manifest (under `name:<image.tag>`) and its blobs.
    pub fn put_image(&self, name: &str, image: &TestImage) {
        for b in image.blobs() {
            let digest = self.add_blob(b.data.clone());
            self.shared.lock().blob_repos.entry(digest).or_default().push(name.to_string());
        }
        self.put_manifest(name, Some(&image.tag), crate::image::OCI_MANIFEST, image.manifest.data.clone());
    }

    /// Adds a blob of `size` random bytes; returns it.
    pub fn add_random_blob(&self, size: usize) -> Blob {
        let b = Blob::random(size);
        self.add_blob(b.data.clone());
        b
    }

    /// Applies `fault` to every request whose path contains `pattern`.
    pub fn set_fault(&self, pattern: &str, fault: Fault) {
        self.add_fault(FaultRule { pattern: pattern.to_string(), methods: None, fault, times: None });
    }

    /// Adds a fault rule (rules are tried in order; the first match applies).
    pub fn add_fault(&self, rule: FaultRule) {
        self.shared.lock().faults.push(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Lets every body paused by [`Fault::Pause`] go on (and later ones not pause).
    pub fn release(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Makes [`Fault::Pause`] pause again.
    pub fn close_gate(&self) {
        self.shared.gate.send_replace(false);
    }

    /// Adds `name: value` to every answer from now on, faults included (as Docker Hub sends
    /// `ratelimit-remaining: 100;w=21600` with every answer).
    pub fn set_response_header(&self, name: &str, value: &str) {
        self.shared.lock().response_headers.push((name.to_string(), value.to_string()));
    }

    /// The token endpoint answers a refused login with `status` (GHCR: 403 to stale credentials).
    pub fn set_refusal_status(&self, status: u16) {
        self.shared.lock().refusal_status = Some(status);
    }

    /// The token endpoint takes no POST (404, as GCR's): clients must ask by GET.
    pub fn refuse_token_post(&self) {
        self.shared.lock().no_token_post = true;
    }

    /// ACR: `/oauth2/exchange` takes `access_token` (POST, `grant_type=access_token`) and gives
    /// a refresh token, which the token endpoint then takes by the refresh-token grant.
    pub fn accept_for_exchange(&self, access_token: &str) {
        self.shared.lock().exchangeable.push(access_token.to_string());
    }

    /// Refresh tokens `/oauth2/exchange` gave.
    pub fn exchanged(&self) -> u64 {
        self.shared.lock().exchanged
    }

    /// Makes every issued token invalid (as if expired or revoked).
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// How many tokens the token endpoint has issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.lock().token_seq
    }

    /// Every request received so far, on both listeners.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Requests with `method` whose path contains `path_contains`, on the main listener.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.listener == Listener::Main && r.method.as_str() == method && r.path.contains(path_contains))
            .collect()
    }

    /// How many `method` requests on the main listener had a path containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests_matching(method, path_contains).len()
    }

    /// Requests to the token endpoint.
    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.listener == Listener::Main && r.path == "/token").collect()
    }

    /// Requests the redirect target (the other host) received.
    pub fn redirect_requests(&self) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.listener == Listener::Redirect).collect()
    }

    /// A one-line summary of every request, for assertion messages.
    pub fn describe_requests(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "{:?} {} {}{} auth={:?}",
                    r.listener,
                    r.method,
                    r.path,
                    r.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default(),
                    r.header("authorization").map(|a| a.split(' ').next().unwrap_or("").to_string())
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let b64 = value.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn form_values(encoded: &str, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(encoded.as_bytes()).filter(|(k, _)| k == key).map(|(_, v)| v.into_owned()).collect()
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::HeaderName::from_static("docker-distribution-api-version"), "registry/2.0"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// What a request asks for.
enum Target {
    Ping,
    Token,
    Manifest {
        name: String,
        reference: String,
    },
    Blob {
        name: String,
        digest: String,
    },
    Tags {
        name: String,
    },
    Referrers {
        name: String,
    },
    Redirected {
        digest: String,
    },
    /// ACR's `/oauth2/exchange`: an Entra access token for a refresh token.
    Exchange,
    Unknown,
}

fn parse_target(path: &str) -> Target {
    if path == "/v2/" || path == "/v2" {
        return Target::Ping;
    }
    if path == "/token" {
        return Target::Token;
    }
    if path == "/oauth2/exchange" {
        return Target::Exchange;
    }
    if let Some(d) = path.strip_prefix("/redirected/") {
        return Target::Redirected { digest: d.to_string() };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Target::Unknown;
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Target::Tags { name: name.to_string() };
    }
    if let Some((name, _digest)) = rest.rsplit_once("/referrers/") {
        return Target::Referrers { name: name.to_string() };
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Target::Manifest { name: name.to_string(), reference: reference.to_string() };
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Target::Blob { name: name.to_string(), digest: digest.to_string() };
    }
    Target::Unknown
}

async fn handle(State(ctx): State<Ctx>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = if parts.method == Method::POST {
        axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default()
    } else {
        Bytes::new()
    };
    let record = RecordedRequest {
        listener: ctx.listener,
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body,
        at: Instant::now(),
        sent: Arc::new(AtomicU64::new(0)),
        completed: Arc::new(AtomicBool::new(false)),
    };
    ctx.shared.lock().requests.push(record.clone());
    let mut resp = route(&ctx, &record).await;
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    let extra = ctx.shared.lock().response_headers.clone();
    for (k, v) in extra {
        if let Ok(k) = header::HeaderName::from_bytes(k.as_bytes()) {
            resp.headers_mut().insert(k, hv(&v));
        }
    }
    resp
}

async fn route(ctx: &Ctx, req: &RecordedRequest) -> Response {
    let shared = &ctx.shared;
    let target = parse_target(&req.path);
    if ctx.listener == Listener::Redirect {
        let Target::Redirected { digest } = target else {
            return StatusCode::NOT_FOUND.into_response();
        };
        if req.method == Method::HEAD && shared.lock().redirect_heads {
            // A URL signed for GET.
            return (StatusCode::FORBIDDEN, "SignatureDoesNotMatch").into_response();
        }
        if req.headers.contains_key(header::AUTHORIZATION) {
            // What S3 answers when a signed URL also gets an Authorization header.
            return (StatusCode::BAD_REQUEST, "InvalidArgument: Only one auth mechanism allowed").into_response();
        }
        return serve_blob(shared, req, &digest).await;
    }
    match target {
        Target::Token => token_endpoint(shared, req),
        Target::Exchange => exchange(shared, req),
        Target::Ping => match check_auth(shared, req, None) {
            Ok(()) => ([(header::CONTENT_TYPE, "application/json")], "{}".to_string()).into_response(),
            Err(r) => *r,
        },
        Target::Redirected { digest } => {
            if req.method == Method::HEAD && shared.lock().redirect_heads {
                return (StatusCode::FORBIDDEN, "SignatureDoesNotMatch").into_response();
            }
            serve_blob(shared, req, &digest).await
        }
        Target::Unknown => oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", "unknown path"),
        // An empty referrers index, typed with a parameter (as some registries send it).
        Target::Referrers { name } => {
            if let Err(r) = check_auth(shared, req, Some(&name)) {
                return *r;
            }
            let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
            ([(header::CONTENT_TYPE, "application/vnd.oci.image.index.v1+json; charset=utf-8")], body).into_response()
        }
        Target::Tags { name } => {
            if let Err(r) = check_auth(shared, req, Some(&name)) {
                return *r;
            }
            if req.method != Method::GET && req.method != Method::HEAD {
                return oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only");
            }
            let mut tags: Vec<String> = shared
                .lock()
                .manifests
                .keys()
                .filter(|(n, r)| n == &name && !r.starts_with("sha256:"))
                .map(|(_, r)| r.clone())
                .collect();
            tags.sort();
            // Pagination as the distribution spec has it: `last` then `n`, and a `Link` to the next page.
            if let Some(last) = req.query_values("last").first() {
                tags.retain(|t| t > last);
            }
            let mut link = None;
            if let Some(n) = req.query_values("n").first().and_then(|n| n.parse::<usize>().ok())
                && tags.len() > n
            {
                tags.truncate(n);
                if let Some(last) = tags.last() {
                    link = Some(format!("</v2/{name}/tags/list?last={last}&n={n}>; rel=\"next\""));
                }
            }
            let body = serde_json::json!({"name": name, "tags": tags}).to_string();
            let mut r = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            if let Some(l) = link {
                r.headers_mut().insert(header::LINK, hv(&l));
            }
            r
        }
        Target::Manifest { name, reference } => {
            if let Err(r) = check_auth(shared, req, Some(&name)) {
                return *r;
            }
            if req.method != Method::GET && req.method != Method::HEAD {
                return oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only");
            }
            let found = shared.lock().manifests.get(&(name, reference)).cloned();
            let Some((media_type, data)) = found else {
                return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown");
            };
            let digest = crate::sha256_digest(&data);
            let fault = take_fault(shared, req);
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, hv(&media_type));
            headers.insert("docker-content-digest", hv(&digest));
            headers.insert(header::ETAG, hv(&format!("\"{digest}\"")));
            respond(shared, req, StatusCode::OK, headers, data, fault, None).await
        }
        Target::Blob { name, digest } => {
            if let Err(r) = check_auth(shared, req, Some(&name)) {
                return *r;
            }
            if req.method != Method::GET && req.method != Method::HEAD {
                return oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only");
            }
            let (redirect, heads) = {
                let inner = shared.lock();
                (inner.redirect, inner.redirect_heads)
            };
            if (req.method == Method::GET || (heads && req.method == Method::HEAD)) && redirect != RedirectMode::None {
                let known = {
                    let inner = shared.lock();
                    inner.blobs.contains_key(&digest) && inner.blob_in(&digest, &name)
                };
                if !known {
                    return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
                }
                let location = match redirect {
                    RedirectMode::OtherHost => {
                        format!("http://{}/redirected/{digest}?X-Amz-Signature=fake", shared.redirect_addr)
                    }
                    _ => format!("/redirected/{digest}?X-Amz-Signature=fake"),
                };
                return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response();
            }
            serve_blob(shared, req, &digest).await
        }
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

async fn serve_blob(shared: &Arc<Shared>, req: &RecordedRequest, digest: &str) -> Response {
    if let Target::Blob { name, .. } = parse_target(&req.path)
        && !shared.lock().blob_in(digest, &name)
    {
        return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown to repository");
    }
    let data = shared.lock().blobs.get(digest).cloned();
    let Some(data) = data else {
        return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
    };
    let fault = take_fault(shared, req);
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, hv("application/octet-stream"));
    headers.insert("docker-content-digest", hv(digest));
    headers.insert(header::ETAG, hv(&format!("\"{digest}\"")));
    headers.insert(header::ACCEPT_RANGES, hv("bytes"));
    // Ranges are honoured without a fault, and on a slow body (an uplink, not a broken one).
    let ranged = fault.is_none() || matches!(fault, Some(Fault::Slow { .. }));
    let range = if ranged { req.header("range").and_then(|r| parse_range(r, data.len() as u64)) } else { None };
    respond(shared, req, StatusCode::OK, headers, data, fault, range).await
}

async fn respond(
    shared: &Arc<Shared>,
    req: &RecordedRequest,
    status: StatusCode,
    headers: HeaderMap,
    data: Bytes,
    fault: Option<Fault>,
    range: Option<(u64, u64)>,
) -> Response {
    if let Some(Fault::HangBeforeHeaders) = fault {
        std::future::pending::<()>().await;
    }
    build_response(shared, req, status, headers, data, fault, range)
}

/// One step of a scripted body.
enum Step {
    Send(Bytes),
    Sleep(Duration),
    WaitGate,
    Fail,
    Hang,
}

fn build_response(
    shared: &Arc<Shared>,
    req: &RecordedRequest,
    status: StatusCode,
    mut headers: HeaderMap,
    data: Bytes,
    fault: Option<Fault>,
    range: Option<(u64, u64)>,
) -> Response {
    if let Some(Fault::Status { status, retry_after }) = &fault {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = if status == StatusCode::TOO_MANY_REQUESTS { "TOOMANYREQUESTS" } else { "UNKNOWN" };
        let mut r = oci_error(status, code, "injected fault");
        if let Some(ra) = retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, hv(ra));
        }
        req.completed.store(true, Ordering::SeqCst);
        return r;
    }
    let mut status = status;
    let mut data = data;
    if let Some((start, end)) = range {
        let total = data.len();
        data = data.slice(start as usize..=end as usize);
        status = StatusCode::PARTIAL_CONTENT;
        headers.insert(header::CONTENT_RANGE, hv(&format!("bytes {start}-{end}/{total}")));
    }
    let len = data.len();
    let half = len / 2;
    let (declared, steps): (usize, Vec<Step>) = match fault {
        None | Some(Fault::Status { .. }) | Some(Fault::HangBeforeHeaders) => (len, vec![Step::Send(data)]),
        Some(Fault::ResetMidBody) => (len, vec![Step::Send(data.slice(..half)), Step::Fail]),
        Some(Fault::WrongBytes) => {
            let mut v = data.to_vec();
            for b in v.iter_mut().skip(len / 3).take(64) {
                *b ^= 0x5a;
            }
            if v.is_empty() {
                v.push(0);
            }
            (v.len(), vec![Step::Send(Bytes::from(v))])
        }
        Some(Fault::ShortBody) => {
            let cut = len.saturating_sub(16);
            (len, vec![Step::Send(data.slice(..cut)), Step::Fail])
        }
        Some(Fault::Truncated) => {
            let cut = len.saturating_sub(16);
            (cut, vec![Step::Send(data.slice(..cut))])
        }
        Some(Fault::Extended) => {
            let mut v = data.to_vec();
            v.extend_from_slice(&crate::random_bytes(16));
            (v.len(), vec![Step::Send(Bytes::from(v))])
        }
        Some(Fault::HangMidBody) => (len, vec![Step::Send(data.slice(..half)), Step::Hang]),
        Some(Fault::Slow { chunk, delay }) => {
            let chunk = chunk.max(1);
            let mut steps = Vec::new();
            let mut off = 0;
            while off < len {
                let end = (off + chunk).min(len);
                steps.push(Step::Sleep(delay));
                steps.push(Step::Send(data.slice(off..end)));
                off = end;
            }
            (len, steps)
        }
        Some(Fault::Pause { after }) => {
            let after = after.min(len);
            let mut steps = vec![Step::Send(data.slice(..after)), Step::WaitGate];
            // The rest in 64 KiB pieces, so that a follower can see progress.
            let mut off = after;
            while off < len {
                let end = (off + 65536).min(len);
                steps.push(Step::Send(data.slice(off..end)));
                off = end;
            }
            (len, steps)
        }
    };
    headers.insert(header::CONTENT_LENGTH, hv(&declared.to_string()));
    if req.method == Method::HEAD {
        req.completed.store(true, Ordering::SeqCst);
        let mut r = Response::new(Body::empty());
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        return r;
    }
    let sent = req.sent.clone();
    let completed = req.completed.clone();
    let gate = shared.gate.subscribe();
    let steps: std::collections::VecDeque<Step> = steps.into();
    let stream = futures_util::stream::unfold(
        (steps, gate, sent, completed),
        |(mut steps, mut gate, sent, completed)| async move {
            loop {
                let Some(step) = steps.pop_front() else {
                    completed.store(true, Ordering::SeqCst);
                    return None;
                };
                match step {
                    Step::Send(b) => {
                        sent.fetch_add(b.len() as u64, Ordering::SeqCst);
                        if steps.is_empty() {
                            completed.store(true, Ordering::SeqCst);
                        }
                        return Some((Ok(b), (steps, gate, sent, completed)));
                    }
                    Step::Sleep(d) => tokio::time::sleep(d).await,
                    Step::WaitGate => {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    Step::Fail => {
                        return Some((
                            Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected reset")),
                            (steps, gate, sent, completed),
                        ));
                    }
                    Step::Hang => std::future::pending::<()>().await,
                }
            }
        },
    );
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

fn take_fault(shared: &Arc<Shared>, req: &RecordedRequest) -> Option<Fault> {
    let mut inner = shared.lock();
    let idx = inner
        .faults
        .iter()
        .position(|f| req.path.contains(&f.pattern) && f.methods.as_ref().is_none_or(|m| m.contains(&req.method)))?;
    let fault = inner.faults[idx].fault.clone();
    if let Some(times) = inner.faults[idx].times.as_mut() {
        *times -= 1;
        if *times == 0 {
            inner.faults.remove(idx);
        }
    }
    Some(fault)
}

/// `bytes=a-b` / `bytes=a-` / `bytes=-n` → inclusive (start, end), for a satisfiable single range.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    if len == 0 {
        return None;
    }
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        return (n > 0).then(|| (len.saturating_sub(n), len - 1));
    }
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() { len - 1 } else { b.parse::<u64>().ok()?.min(len - 1) };
    (start <= end).then_some((start, end))
}

fn challenge(shared: &Shared, auth: &AuthMode, name: Option<&str>) -> Response {
    let value = match auth {
        AuthMode::Basic { .. } => "Basic realm=\"fake\"".to_string(),
        _ => {
            let mut v = format!("Bearer realm=\"http://{}/token\",service=\"fake\"", shared.addr);
            if let Some(n) = name {
                v.push_str(&format!(",scope=\"repository:{n}:pull\""));
            }
            v
        }
    };
    let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, hv(&value));
    r
}

fn check_auth(shared: &Arc<Shared>, req: &RecordedRequest, name: Option<&str>) -> Result<(), Box<Response>> {
    let inner = shared.lock();
    let auth = inner.auth.clone();
    match &auth {
        AuthMode::None => Ok(()),
        AuthMode::Basic { .. } => match req.basic_auth() {
            Some((u, p)) if inner.valid_login(&u, &p) => {
                if name.is_none_or(|n| inner.may_pull(Some(&u), n)) {
                    Ok(())
                } else {
                    Err(Box::new(oci_error(
                        StatusCode::FORBIDDEN,
                        "DENIED",
                        "requested access to the resource is denied",
                    )))
                }
            }
            _ => Err(Box::new(challenge(shared, &auth, name))),
        },
        AuthMode::Bearer { .. } => {
            let token = req.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
            let ok = token.and_then(|t| inner.tokens.get(t)).is_some_and(|t| {
                t.expires.is_none_or(|e| Instant::now() < e)
                    && name.is_none_or(|n| {
                        t.scopes.iter().any(|s| {
                            let mut parts = s.rsplitn(2, ':');
                            let actions = parts.next().unwrap_or("");
                            let rest = parts.next().unwrap_or("");
                            rest == format!("repository:{n}") && actions.split(',').any(|a| a == "pull" || a == "*")
                        })
                    })
            });
            if ok { Ok(()) } else { Err(Box::new(challenge(shared, &auth, name))) }
        }
    }
}

fn exchange(shared: &Arc<Shared>, req: &RecordedRequest) -> Response {
    if req.method != Method::POST || req.form_values("grant_type").first().map(String::as_str) != Some("access_token") {
        return (StatusCode::BAD_REQUEST, "grant_type=access_token by POST").into_response();
    }
    let mut inner = shared.lock();
    let taken = req.form_values("access_token").first().is_some_and(|t| inner.exchangeable.contains(t));
    if !taken || req.form_values("service").is_empty() {
        return (StatusCode::UNAUTHORIZED, r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid access token"}]}"#)
            .into_response();
    }
    inner.exchanged += 1;
    let refresh = format!("acr-refresh-{}-{}", inner.exchanged, crate::random_name(""));
    inner.users.insert(ACR_REFRESH_TOKEN_USER.to_string(), refresh.clone());
    ([(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "refresh_token": refresh }).to_string())
        .into_response()
}

fn token_endpoint(shared: &Arc<Shared>, req: &RecordedRequest) -> Response {
    let auth = shared.lock().auth.clone();
    let AuthMode::Bearer { credentials, expires_in } = auth else {
        return oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", "no token service");
    };
    let (scopes, user_pass) = if req.method == Method::POST {
        if shared.lock().no_token_post {
            return StatusCode::NOT_FOUND.into_response();
        }
        let grant = req.form_values("grant_type");
        let first = |k: &str| req.form_values(k).first().cloned();
        let up = match grant.first().map(String::as_str) {
            Some("password") => first("username").zip(first("password")),
            // ACR: a refresh token stands for the user that owns it.
            Some("refresh_token") => first("refresh_token").map(|t| (ACR_REFRESH_TOKEN_USER.to_owned(), t)),
            _ => return (StatusCode::BAD_REQUEST, "unsupported grant_type").into_response(),
        };
        let scopes: Vec<String> = req
            .form_values("scope")
            .iter()
            .flat_map(|s| s.split(' ').map(str::to_string).collect::<Vec<_>>())
            .collect();
        (scopes, up)
    } else if req.method == Method::GET {
        (req.query_values("scope"), req.basic_auth())
    } else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let refused = {
        let inner = shared.lock();
        match &user_pass {
            // Added users: any login must be one of them (or the configured one).
            Some((u, p)) if credentials.is_some() || !inner.users.is_empty() => !inner.valid_login(u, p),
            Some(_) => false,
            None => credentials.is_some(),
        }
    };
    if refused {
        let status = shared.lock().refusal_status.and_then(|s| StatusCode::from_u16(s).ok());
        return (
            status.unwrap_or(StatusCode::UNAUTHORIZED),
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"details":"incorrect username or password"}"#,
        )
            .into_response();
    }
    let mut inner = shared.lock();
    // As Docker Hub's: a token is issued, without the scopes of private repositories the user may not pull.
    let user = user_pass.as_ref().map(|(u, _)| u.clone());
    let scopes: Vec<String> = scopes
        .into_iter()
        .filter(|s| {
            let name = s.strip_prefix("repository:").and_then(|r| r.rsplit_once(':')).map(|(n, _)| n);
            name.is_none_or(|n| inner.may_pull(user.as_deref(), n))
        })
        .collect();
    inner.token_seq += 1;
    let token = format!("tok-{}-{}", inner.token_seq, crate::random_name(""));
    inner.tokens.insert(
        token.clone(),
        IssuedToken { scopes, expires: expires_in.map(|s| Instant::now() + Duration::from_secs(s)) },
    );
    let mut body = serde_json::json!({"token": token, "access_token": token});
    if let Some(e) = expires_in {
        body["expires_in"] = e.into();
    }
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=10-", 100), Some((10, 99)));
        assert_eq!(parse_range("bytes=-5", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("nonsense", 100), None);
    }
}
