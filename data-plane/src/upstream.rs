//! The upstream registry client: token and Basic auth from the registry's challenge, tokens cached
//! per (realm, service, scope, user) until they expire, redirects followed without sending
//! `Authorization` to another host, timeouts on connect, first byte and between body chunks, and
//! retries with backoff for connection errors, 5xx and 429 (honouring `Retry-After`).
//!
//! Retries happen only here, before a response is handed out: once a body streams, nothing is
//! retried, so a client never receives bytes twice.

mod auth;
mod error;
mod options;
pub mod provider;
pub mod trace;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tracing::Instrument as _;
use wharf_core::{Repo, UpstreamTls};

pub use self::error::{UpstreamError, error_chain, redact};
pub use self::options::UpstreamOptions;

use self::auth::{Challenge, Presenting, TokenCache};
use self::trace::RoundTrip;
use crate::credentials::ClientCredentials;

/// One request to an upstream registry, below `/v2/<name>/`.
pub struct UpstreamRequest<'a> {
    pub repo: &'a Repo,
    /// The upstream's name for the repository (Docker Hub's `library/` already applied).
    pub name: &'a str,
    pub method: Method,
    /// `manifests/<ref>`, `blobs/<digest>`, `tags/list`, `referrers/<digest>`.
    pub path: String,
    pub query: Option<String>,
    /// Headers to forward (`Accept`, `Range`, ...).
    pub headers: HeaderMap,
    /// Whether 5xx, 429 and connection errors are retried (revalidation prefers a quick answer).
    pub retry: bool,
    /// Whether redirects are followed; when not, a redirect comes back as the response (an
    /// authorization check: the registry's redirect is its yes, and signed URLs may refuse HEAD).
    pub follow_redirects: bool,
    /// Passthrough repos: the client's credentials (`None`: anonymous). Ignored for static repos,
    /// which present their own.
    pub client: Option<&'a ClientCredentials>,
}

/// An upstream response whose body has not been read yet.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The URL that answered, query stripped (signed URLs carry credentials there).
    pub url: String,
    inner: reqwest::Response,
    idle_timeout: Duration,
    /// The round-tripper's record: finished when the body ends or the response is dropped.
    trace: RoundTrip,
}

impl UpstreamResponse {
    pub fn content_length(&self) -> Option<u64> {
        self.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
    }

    pub fn header_str(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The body as a stream of chunks, failing when the upstream goes silent for too long.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let idle = self.idle_timeout;
        let url = self.url;
        futures_util::stream::unfold(Some((self.inner.bytes_stream(), self.trace)), move |state| {
            let url = url.clone();
            async move {
                let (mut s, mut rt) = state?;
                let failed = |rt: &mut RoundTrip, e: UpstreamError| {
                    rt.failed(&e.to_string());
                    rt.finish();
                    Some((Err(e), None))
                };
                match tokio::time::timeout(idle, s.next()).await {
                    Ok(Some(Ok(b))) => {
                        rt.add_bytes(b.len() as u64);
                        Some((Ok(b), Some((s, rt))))
                    }
                    Ok(Some(Err(e))) => failed(
                        &mut rt,
                        UpstreamError::Unreachable { url, message: format!("body: {}", error_chain(&e)) },
                    ),
                    Ok(None) => {
                        rt.finish();
                        None
                    }
                    Err(_) => failed(&mut rt, UpstreamError::Timeout { url, phase: "idle between body chunks" }),
                }
            }
        })
    }

    /// Reads the whole body, refusing more than `limit` bytes (for manifests and error bodies).
    pub async fn bytes_limited(self, limit: usize) -> Result<Bytes, UpstreamError> {
        let url = self.url.clone();
        let mut out = bytes::BytesMut::new();
        let mut s = std::pin::pin!(self.into_stream());
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(UpstreamError::Protocol { url, message: format!("body larger than {limit} bytes") });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    /// What to tell a client about an upstream error answer: status, URL and the upstream's own
    /// error message (its OCI error JSON when it sent one).
    pub async fn error_detail(self) -> Value {
        let status = self.status.as_u16();
        let url = self.url.clone();
        let body = self.bytes_limited(64 * 1024).await.unwrap_or_default();
        let upstream = match serde_json::from_slice::<Value>(&body) {
            Ok(v) => v.get("errors").cloned().unwrap_or(v),
            Err(_) => Value::String(String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()),
        };
        json!({ "upstream_status": status, "upstream_url": url, "upstream_errors": upstream })
    }
}

/// The upstream client shared by every request of a node.
pub struct Upstream {
    /// The client of every repo without TLS settings of its own: one connection pool for all.
    http: reqwest::Client,
    opts: UpstreamOptions,
    tokens: TokenCache,
    /// Clients of repos with their own TLS settings (a CA bundle, or no verification), by repo
    /// key, with the settings each was built for: rebuilt only when those change.
    custom: std::sync::Mutex<std::collections::HashMap<String, (UpstreamTls, reqwest::Client)>>,
    /// Repos' credential providers and the tokens they gave.
    providers: provider::Providers,
    /// When each repo's refused credentials were last said in the log (once a minute at most).
    refused_said: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

const MAX_REDIRECTS: usize = 5;

impl Upstream {
    pub fn new(opts: UpstreamOptions) -> Result<Self, UpstreamError> {
        let http = build_client(&opts, &UpstreamTls::default())
            .map_err(|e| UpstreamError::Protocol { url: String::new(), message: format!("HTTP client: {e}") })?;
        Ok(Self {
            http,
            opts,
            tokens: TokenCache::default(),
            custom: Default::default(),
            providers: Default::default(),
            refused_said: Default::default(),
        })
    }

    /// The HTTP client for `repo`'s upstream (and its token endpoint): the shared one, or one
    /// trusting the repo's CA bundle, or (tests only) one that verifies nothing.
    pub fn client(&self, repo: &Repo) -> Result<reqwest::Client, UpstreamError> {
        if repo.tls == UpstreamTls::default() {
            return Ok(self.http.clone());
        }
        let mut custom = self.custom.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tls, client)) = custom.get(repo.key.as_str())
            && *tls == repo.tls
        {
            return Ok(client.clone());
        }
        let client = build_client(&self.opts, &repo.tls).map_err(|e| UpstreamError::Protocol {
            url: redact(&repo.upstream),
            message: format!("repo {}: TLS settings: {}", repo.key, error_chain(&e)),
        })?;
        if repo.tls.insecure_skip_verify {
            tracing::warn!(repo_key = %repo.key, upstream = %repo.upstream,
                "insecure_skip_tls_verify: this repo's upstream certificate is NOT verified (any certificate is accepted); for tests only");
        } else {
            tracing::info!(repo_key = %repo.key, upstream = %repo.upstream, "upstream TLS: the repo's CA bundle is trusted besides the system roots");
        }
        custom.insert(repo.key.to_string(), (repo.tls.clone(), client.clone()));
        Ok(client)
    }

    pub fn options(&self) -> &UpstreamOptions {
        &self.opts
    }

    /// The URL a request goes to first (for logs and errors: it carries no credentials).
    pub fn url_for(req: &UpstreamRequest<'_>) -> String {
        let mut url = format!("{}/v2/{}/{}", req.repo.upstream, req.name, req.path);
        if let Some(q) = &req.query {
            url.push('?');
            url.push_str(q);
        }
        url
    }

    /// Sends a request: authenticates as the upstream demands, follows redirects, retries.
    pub async fn send(&self, req: &UpstreamRequest<'_>) -> Result<UpstreamResponse, UpstreamError> {
        let url = Self::url_for(req);
        let scope = format!("repository:{}:pull", req.name);
        let retries = if req.retry { self.opts.retries } else { 0 };
        let mut attempt = 0;
        let mut reauthenticated = false;
        let provided = match req.repo.credential_provider {
            Some(p) => {
                let file = req.repo.credential_file.as_deref();
                Some(self.providers.credentials(&self.http, &self.opts, p, file, &req.repo.upstream).await?)
            }
            None => None,
        };
        let mut who = Presenting::of(req.repo, req.client, provided.as_ref());
        // The answer to the repo's own credentials, when they were refused and the request is
        // tried again anonymously (stale credentials on a public image: GHCR answers 403).
        let mut refused: Option<Result<UpstreamResponse, UpstreamError>> = None;
        let http = self.client(req.repo)?;
        loop {
            let authorization = match self.tokens.authorization(&http, &self.opts, req.repo, &who, &scope).await {
                Ok(a) => a,
                Err(e @ UpstreamError::Token { status: 401 | 403, .. }) if who.is_own() => {
                    refused = Some(Err(e));
                    who = Presenting::Anonymous;
                    continue;
                }
                Err(e) => return self.settle(req, refused, Err(e)),
            };
            let result = self.send_following(&http, req, &url, authorization.as_ref()).await;
            if let Ok(r) = &result
                && who.is_own()
                && authorization.is_some()
                && (r.status == StatusCode::FORBIDDEN || (r.status == StatusCode::UNAUTHORIZED && reauthenticated))
            {
                refused = Some(result);
                who = Presenting::Anonymous;
                reauthenticated = false;
                continue;
            }
            let wait = match &result {
                Ok(r) if r.status == StatusCode::UNAUTHORIZED && !reauthenticated => {
                    reauthenticated = true;
                    // Some registries (gcr.io) answer 401 without a challenge: the ping has it.
                    let challenge = match r.header_str(header::WWW_AUTHENTICATE).and_then(Challenge::parse) {
                        Some(c) => Some(c),
                        None => self.ping(&http, req.repo).await,
                    };
                    tracing::debug!(upstream = %req.repo.upstream, ?challenge, "upstream asked for authentication");
                    if self.tokens.learn(req.repo, &who, &scope, challenge, authorization.as_ref()) {
                        continue;
                    }
                    None
                }
                Ok(r) if r.status == StatusCode::TOO_MANY_REQUESTS => {
                    let after = r
                        .header_str(header::RETRY_AFTER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map_or(self.opts.retry_backoff, Duration::from_secs);
                    (after <= self.opts.max_retry_after).then_some(after)
                }
                Ok(r) if r.status.is_server_error() => Some(self.backoff(attempt)),
                Err(e) if e.retryable() => Some(self.backoff(attempt)),
                _ => None,
            };
            match wait {
                Some(wait) if attempt < retries => {
                    attempt += 1;
                    let status = result.as_ref().ok().map(|r| r.status.as_u16());
                    let error = result.as_ref().err().map(|e| e.to_string());
                    tracing::info!(%url, attempt, ?status, ?error, wait_ms = wait.as_millis() as u64, "retrying upstream request");
                    tokio::time::sleep(wait).await;
                }
                _ => return self.settle(req, refused, result),
            }
        }
    }

    /// What a request ends with: when the repo's own credentials were `refused` and the request
    /// went on anonymously, the anonymous answer if it is a success (said in the log and counted:
    /// the credentials want renewing), else the answer the credentials got.
    fn settle(
        &self,
        req: &UpstreamRequest<'_>,
        refused: Option<Result<UpstreamResponse, UpstreamError>>,
        anonymous: Result<UpstreamResponse, UpstreamError>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let Some(refused) = refused else { return anonymous };
        match anonymous {
            Ok(r) if r.status.is_success() || r.status.is_redirection() => {
                let status = match &refused {
                    Ok(r) => r.status.to_string(),
                    Err(e) => e.to_string(),
                };
                metrics::counter!("wharf_upstream_credentials_refused_total", "repo_key" => req.repo.key.to_string())
                    .increment(1);
                let now = std::time::Instant::now();
                let mut said = self.refused_said.lock().unwrap_or_else(|e| e.into_inner());
                let due =
                    said.get(req.repo.key.as_str()).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
                if due {
                    said.insert(req.repo.key.to_string(), now);
                    tracing::warn!(repo_key = %req.repo.key, name = %req.name, refused = %status,
                        "the upstream refused the repo's credentials; public content is served anonymously (renew the repo's password; said once a minute, counted in wharf_upstream_credentials_refused_total)");
                }
                Ok(r)
            }
            _ => refused,
        }
    }

    /// Whether the upstream takes `client`'s Basic credentials at all, no repository named (a
    /// `docker login` to a node that passes them on): its ping's challenge says how to ask, `GET
    /// /v2/` with them (Basic) or its token endpoint without a scope (Bearer). `None` when it
    /// cannot tell: no challenge, no answer, or a Bearer token presented.
    pub async fn check_login(&self, repo: &Repo, client: &ClientCredentials) -> Result<Option<bool>, UpstreamError> {
        let ClientCredentials::Basic { username, password } = client else {
            return Ok(None);
        };
        let http = self.client(repo)?;
        match self.ping(&http, repo).await {
            None => Ok(None),
            Some(Challenge::Bearer { realm, service }) => {
                let creds = Some((username.as_str(), password.expose()));
                match auth::fetch_token(&http, &self.opts, repo, creds, &realm, service.as_deref(), None).await {
                    Ok(_) => Ok(Some(true)),
                    Err(UpstreamError::Token { status: 401 | 403, .. }) => Ok(Some(false)),
                    Err(e) => Err(e),
                }
            }
            Some(Challenge::Basic) => {
                let status = self.get_root(&http, repo, Some(auth::basic(username, password.expose()))).await;
                Ok(match status.map(|r| r.status().as_u16()) {
                    Some(200) => Some(true),
                    Some(401 | 403) => Some(false),
                    _ => None,
                })
            }
        }
    }

    /// `GET /v2/` unauthenticated: the challenge the upstream answers with, if any.
    async fn ping(&self, http: &reqwest::Client, repo: &Repo) -> Option<Challenge> {
        let resp = self.get_root(http, repo, None).await?;
        resp.headers().get(header::WWW_AUTHENTICATE)?.to_str().ok().and_then(Challenge::parse)
    }

    /// `GET /v2/`, with `authorization` if given, traced like every upstream request; `None` when
    /// no answer came within the first-byte timeout.
    async fn get_root(
        &self,
        http: &reqwest::Client,
        repo: &Repo,
        authorization: Option<HeaderValue>,
    ) -> Option<reqwest::Response> {
        let url = format!("{}/v2/", repo.upstream);
        let mut rt = RoundTrip::start(repo.key.as_str(), &Method::GET, &url);
        let mut headers = HeaderMap::new();
        if let Some(a) = authorization {
            headers.insert(header::AUTHORIZATION, a);
        }
        wharf_runtime::telemetry::inject(rt.span(), &mut headers);
        rt.sent(&headers);
        let sent = http.get(&url).headers(headers).send();
        let resp = match tokio::time::timeout(self.opts.first_byte_timeout, sent).instrument(rt.span().clone()).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                rt.failed(&error_chain(&e));
                return None;
            }
            Err(_) => {
                rt.failed("timeout waiting for the response");
                return None;
            }
        };
        rt.answered(resp.status(), resp.headers());
        Some(resp)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.retry_backoff.saturating_mul(1 << attempt.min(6));
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }

    async fn send_following(
        &self,
        http: &reqwest::Client,
        req: &UpstreamRequest<'_>,
        first_url: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let origin = reqwest::Url::parse(first_url)
            .map_err(|e| UpstreamError::Protocol { url: redact(first_url), message: e.to_string() })?;
        let mut url = origin.clone();
        let mut rt = RoundTrip::start(req.repo.key.as_str(), &req.method, first_url);
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = req.headers.clone();
            // Authorization goes to the registry only: a CDN or object store behind a redirect
            // either rejects it (S3, Azure Blob) or must not see it.
            if same_origin(&url, &origin)
                && let Some(a) = authorization
            {
                headers.insert(header::AUTHORIZATION, a.clone());
            }
            wharf_runtime::telemetry::inject(rt.span(), &mut headers);
            rt.sent(&headers);
            let r = http.request(req.method.clone(), url.clone()).headers(headers);
            let shown = redact(url.as_str());
            let started = std::time::Instant::now();
            let sent = tokio::time::timeout(self.opts.first_byte_timeout, r.send()).instrument(rt.span().clone()).await;
            let outcome = match &sent {
                Ok(Ok(resp)) => resp.status().as_str().to_owned(),
                Ok(Err(_)) => "error".to_owned(),
                Err(_) => "timeout".to_owned(),
            };
            crate::metrics::upstream(
                req.repo.key.as_str(),
                req.method.as_str(),
                &outcome,
                started.elapsed().as_secs_f64(),
            );
            let resp = match sent {
                Err(_) => Err(UpstreamError::Timeout { url: shown.clone(), phase: "waiting for the response" }),
                Ok(Err(e)) if e.is_timeout() => Err(UpstreamError::Timeout { url: shown.clone(), phase: "connect" }),
                Ok(Err(e)) => Err(send_error(shown.clone(), error_chain(&e))),
                Ok(Ok(resp)) => Ok(resp),
            };
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    rt.failed(&e.to_string());
                    return Err(e);
                }
            };
            if let Some(v) = resp.headers().get("ratelimit-remaining").and_then(|v| v.to_str().ok()) {
                crate::metrics::ratelimit_remaining(req.repo.key.as_str(), v);
            }
            let status = resp.status();
            if status.is_redirection()
                && req.follow_redirects
                && let Some(loc) = resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok())
            {
                let next = match url.join(loc) {
                    Ok(next) => next,
                    Err(e) => {
                        let e = UpstreamError::Protocol { url: shown, message: format!("bad redirect Location: {e}") };
                        rt.failed(&e.to_string());
                        return Err(e);
                    }
                };
                rt.redirected(status, url.as_str(), next.as_str());
                url = next;
                continue;
            }
            rt.answered(status, resp.headers());
            return Ok(UpstreamResponse {
                status,
                headers: resp.headers().clone(),
                url: shown,
                inner: resp,
                idle_timeout: self.opts.idle_timeout,
                trace: rt,
            });
        }
        rt.failed("too many redirects");
        Err(UpstreamError::Protocol { url: redact(first_url), message: format!("more than {MAX_REDIRECTS} redirects") })
    }
}

/// A client for upstreams with `tls`: the system roots (the Mozilla roots built in when the system
/// has none) plus the repo's CA bundle, or no verification at all.
fn build_client(opts: &UpstreamOptions, tls: &UpstreamTls) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")));
    if tls.insecure_skip_verify {
        return builder.tls_danger_accept_invalid_certs(true).build();
    }
    let extra = match &tls.ca_bundle {
        Some(pem) => reqwest::Certificate::from_pem_bundle(pem.as_bytes())?,
        None => Vec::new(),
    };
    with_roots(builder, extra).build()
}

/// `builder` trusting the system roots (the Mozilla roots built in when the system has none) and
/// `extra`.
pub fn with_roots(builder: reqwest::ClientBuilder, extra: Vec<reqwest::Certificate>) -> reqwest::ClientBuilder {
    if wharf_runtime::tls::system_roots_available() {
        // reqwest's platform verifier: the system's roots, re-read for each client built.
        if extra.is_empty() { builder } else { builder.tls_certs_merge(extra) }
    } else {
        let builtin =
            wharf_runtime::tls::builtin_roots().iter().filter_map(|der| reqwest::Certificate::from_der(der).ok());
        builder.tls_certs_only(builtin.chain(extra))
    }
}

/// What to do about a certificate the node does not trust, appended to the connection error.
/// A request that got no response. A certificate problem will not go away by itself: it is not
/// retried (and says what to do); anything else is the upstream being unreachable.
fn send_error(url: String, message: String) -> UpstreamError {
    if message.contains("certificate") {
        let message = format!(
            "{message} (a TLS certificate problem: for an upstream with a private CA, give the repo its CA bundle: ca_bundle_file in the config file, ca_bundle through the API)"
        );
        UpstreamError::Protocol { url, message }
    } else {
        UpstreamError::Unreachable { url, message }
    }
}

fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}
