//! Peer fetch: the nodes of a cluster fetch each blob from upstream once among them.
//!
//! Each digest has an owner among the live members the control plane streams
//! ([`crate::config::Member`]), chosen by rendezvous (highest random weight) hashing: a node
//! joining or leaving moves only the digests it wins or held, about 1/N of them. A node that
//! misses a blob it does not own asks the owner on its peer endpoint (`/_wharf/peer/…`, see
//! `registry.rs`); the owner serves it from its cache or from its own single flight, so a herd
//! spread over the cluster is one upstream fetch. The asking node writes and verifies its own copy
//! like any fetch ([`crate::flight`]): a peer's bytes are never trusted unverified.
//!
//! An owner that cannot be reached, refuses, or sends no response head within
//! [`PeerOptions::timeout`] is skipped (the node fetches from upstream itself) and marked suspect
//! for [`PeerOptions::suspect_for`]: it is not asked again meanwhile. A peer restarted under a new
//! generation starts with a clean record.
//!
//! Requests carry a peer token: claims naming the owner, sealed with the cluster's token keys,
//! which only nodes the control plane authenticated hold ([`crate::node_token`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::StatusCode;
use wharf_core::{Digest, SigningKey};

use crate::config::Member;
use crate::node_token::{self, Claims, NodeTokens};
use crate::upstream::{UpstreamError, error_chain, with_roots};

/// How peers are asked.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// Longest wait for a peer to connect and send its response head; past it, the node fetches
    /// from upstream itself.
    pub timeout: Duration,
    /// Longest silence between two chunks of a peer's body.
    pub idle_timeout: Duration,
    /// How long a peer that failed is skipped.
    pub suspect_for: Duration,
    /// A PEM file of CA certificates that signed peers' registry certificates (https peers),
    /// besides the system's roots.
    pub ca: Option<PathBuf>,
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(30),
            suspect_for: Duration::from_secs(30),
            ca: None,
        }
    }
}

/// How long a peer token lives, and how long one is reused.
const TOKEN_TTL: Duration = Duration::from_secs(120);
const TOKEN_REUSE: Duration = Duration::from_secs(60);

/// The path prefix of the peer endpoint.
pub const PATH: &str = "/_wharf/peer/";

/// The member that owns `digest` ([`wharf_core::rendezvous`]).
pub fn owner<'a>(members: &'a [Member], digest: &Digest) -> Option<&'a Member> {
    wharf_core::rendezvous::owner(members, |m| m.id.as_str(), digest)
}

/// Why a peer fetch did not go through: the label of `wharf_peer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFailure {
    /// No connection, or it broke before the response head.
    Unreachable,
    /// No response head within the timeout.
    Timeout,
    /// The peer refused (401: its token keys differ; 5xx: the node is in trouble).
    Refused,
    /// Its body broke or went silent.
    Body,
    /// Its bytes did not match the digest or the length.
    WrongBytes,
}

impl PeerFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerFailure::Unreachable => "unreachable",
            PeerFailure::Timeout => "timeout",
            PeerFailure::Refused => "refused",
            PeerFailure::Body => "body",
            PeerFailure::WrongBytes => "wrong_bytes",
        }
    }
}

/// What a node knows of one peer.
#[derive(Debug, Default, Clone)]
struct Record {
    generation: u64,
    suspect_until: Option<(Instant, SystemTime)>,
    errors: u64,
    bytes: u64,
}

/// One peer as the node's report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub id: String,
    pub suspect_until: Option<SystemTime>,
    pub errors: u64,
    pub bytes: u64,
}

/// A peer's answer: its length when it said, its media type, and its body.
pub struct PeerBody {
    pub total: Option<u64>,
    pub content_type: Option<String>,
    pub body: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

/// Why a peer's answer is not a body: what to say, and whether the peer is to blame.
#[derive(Debug)]
pub struct Skipped {
    pub error: UpstreamError,
    /// `None`: the peer answered as it should (a 404: upstream has no such blob for it either).
    pub failure: Option<PeerFailure>,
}

/// This node's side of peer fetch: who it is, the client it asks peers with, what it holds
/// against each peer.
pub struct Peers {
    /// This node's id and the client it asks peers with; `None`: standalone, no peer fetch.
    me: Option<(String, reqwest::Client)>,
    opts: PeerOptions,
    records: Mutex<HashMap<String, Record>>,
    /// Peer tokens by the node they are for, with when they were made.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl Peers {
    /// Peer fetch for node `self_id`.
    pub fn new(self_id: String, opts: PeerOptions) -> Result<Self, PeerSetupError> {
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(opts.timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("wharf-peer/", env!("CARGO_PKG_VERSION")));
        let extra = match &opts.ca {
            None => Vec::new(),
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| PeerSetupError(format!("reading {}: {e}", path.display())))?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| PeerSetupError(format!("{}: {}", path.display(), error_chain(&e))))?
            }
        };
        let client = with_roots(builder, extra).build().map_err(|e| PeerSetupError(error_chain(&e)))?;
        Ok(Self { me: Some((self_id, client)), opts, records: Mutex::default(), tokens: Mutex::default() })
    }

    /// No peer fetch (standalone nodes, a node with `--peer-url off`).
    pub fn off() -> Self {
        Self { me: None, opts: PeerOptions::default(), records: Mutex::default(), tokens: Mutex::default() }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer to ask for `digest`: its owner among `members`, unless that is this node, or it
    /// is suspect (then the node fetches from upstream itself). `None` with no members or keys.
    pub fn choose(&self, members: &[Member], digest: &Digest) -> Option<Member> {
        let (me, _) = self.me.as_ref()?;
        let owner = owner(members, digest)?;
        if owner.id == *me {
            return None;
        }
        let now = Instant::now();
        let mut records = self.records();
        let r = records.entry(owner.id.clone()).or_default();
        if r.generation != owner.generation {
            // Restarted (or first seen): what was held against its last run is forgotten.
            *r = Record { generation: owner.generation, errors: r.errors, bytes: r.bytes, suspect_until: None };
        }
        match r.suspect_until {
            Some((until, _)) if until > now => None,
            _ => {
                r.suspect_until = None;
                Some(owner.clone())
            }
        }
    }

    /// A peer token for node `to`, sealed with the cluster's keys (made once a minute per peer).
    pub fn token(&self, tokens: &NodeTokens, keys: &[SigningKey], to: &str) -> String {
        let mut held = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, made)) = held.get(to)
            && made.elapsed() < TOKEN_REUSE
        {
            return t.clone();
        }
        let now = SystemTime::now();
        let claims = Claims {
            issuer: tokens.service.clone(),
            puller: None,
            issued_at: node_token::unix(now),
            expires_at: node_token::unix(now + TOKEN_TTL),
            access: Vec::new(),
            credentials: None,
            peer: Some(to.to_owned()),
        };
        let t = tokens.seal(keys, &claims, now);
        held.insert(to.to_owned(), (t.clone(), Instant::now()));
        t
    }

    /// Asks `peer` for `what` (`blobs/<digest>`, `manifests/<digest>`) of `repo_key`/`name`,
    /// sending `accept` (manifests): its body once the head came, within the timeout.
    pub async fn get(
        &self,
        peer: &Member,
        token: &str,
        repo_key: &str,
        name: &str,
        what: &str,
        accept: Option<&http::HeaderValue>,
    ) -> Result<PeerBody, Skipped> {
        let url = format!("{}{}{repo_key}/{name}/{what}", peer.url.trim_end_matches('/'), PATH);
        let skipped = |failure, message: String| Skipped {
            error: UpstreamError::Unreachable { url: format!("peer {} ({url})", peer.id), message },
            failure,
        };
        let Some((_, client)) = &self.me else {
            return Err(skipped(None, "peer fetch is off on this node".into()));
        };
        let mut req = client.get(&url).bearer_auth(token);
        if let Some(a) = accept {
            req = req.header(http::header::ACCEPT, a);
        }
        let sent = req.send();
        let resp = match tokio::time::timeout(self.opts.timeout, sent).await {
            Err(_) => {
                let waited = humantime::format_duration(self.opts.timeout);
                return Err(skipped(Some(PeerFailure::Timeout), format!("no answer within {waited}")));
            }
            Ok(Err(e)) => return Err(skipped(Some(PeerFailure::Unreachable), error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status != StatusCode::OK {
            // Its upstream's answers (4xx, 502, 504) are no fault of the peer's.
            let blame = matches!(status.as_u16(), 401 | 500 | 503).then_some(PeerFailure::Refused);
            return Err(skipped(blame, format!("answered {status}")));
        }
        let total = resp.content_length();
        let content_type =
            resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let idle = self.opts.idle_timeout;
        let id = peer.id.clone();
        let body = futures_util::stream::unfold(Some(resp.bytes_stream()), move |state| {
            let id = id.clone();
            async move {
                let mut s = state?;
                let failed = |message: String| {
                    Some((Err(UpstreamError::Unreachable { url: format!("peer {id}"), message }), None))
                };
                match tokio::time::timeout(idle, s.next()).await {
                    Ok(Some(Ok(b))) => Some((Ok(b), Some(s))),
                    Ok(Some(Err(e))) => failed(format!("body: {}", error_chain(&e))),
                    Ok(None) => None,
                    Err(_) => failed(format!("body silent for {}", humantime::format_duration(idle))),
                }
            }
        })
        .boxed();
        Ok(PeerBody { total, content_type, body })
    }

    /// `peer` failed: skipped for a while, counted.
    pub fn failed(&self, peer: &Member, failure: PeerFailure, error: &dyn std::fmt::Display) {
        let until = (Instant::now() + self.opts.suspect_for, SystemTime::now() + self.opts.suspect_for);
        {
            let mut records = self.records();
            let r = records.entry(peer.id.clone()).or_default();
            r.errors += 1;
            if r.generation == peer.generation || r.generation == 0 {
                r.generation = peer.generation;
                r.suspect_until = Some(until);
            }
        }
        metrics::counter!("wharf_peer_errors_total", "peer" => peer.id.clone(), "reason" => failure.as_str())
            .increment(1);
        tracing::warn!(peer = %peer.id, reason = failure.as_str(), %error, suspect_for = ?self.opts.suspect_for, "peer fetch failed; the peer is skipped for a while");
    }

    /// `n` bytes came from `peer`.
    pub fn received(&self, peer: &Member, n: u64) {
        if let Some(r) = self.records().get_mut(&peer.id) {
            r.bytes += n;
        }
    }

    /// Every peer this node has asked, for its report and `/metrics`.
    pub fn views(&self) -> Vec<PeerView> {
        let now = Instant::now();
        let mut v: Vec<PeerView> = self
            .records()
            .iter()
            .map(|(id, r)| PeerView {
                id: id.clone(),
                suspect_until: r.suspect_until.filter(|(until, _)| *until > now).map(|(_, wall)| wall),
                errors: r.errors,
                bytes: r.bytes,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.me.as_ref().map(|(id, _)| id);
        f.debug_struct("Peers").field("self_id", &id).field("opts", &self.opts).finish_non_exhaustive()
    }
}

/// The peer client could not be built (`--peer-ca`).
#[derive(Debug, thiserror::Error)]
#[error("peer fetch: {0}")]
pub struct PeerSetupError(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member { id: id.into(), url: format!("http://{id}:5000"), generation: 1 }
    }

    fn digests(n: usize) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(format!("blob {i}").as_bytes())).collect()
    }

    #[test]
    fn owners_spread_evenly_and_a_leaving_node_moves_only_its_own_digests() {
        let three: Vec<Member> = ["n1", "n2", "n3"].into_iter().map(member).collect();
        let all = digests(3000);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for d in &all {
            *counts.entry(owner(&three, d).unwrap().id.clone()).or_default() += 1;
        }
        for (id, n) in &counts {
            assert!((800..1200).contains(n), "{id} owns {n} of 3000 digests");
        }
        let two = &three[..2];
        for d in &all {
            let before = owner(&three, d).unwrap();
            let after = owner(two, d).unwrap();
            if before.id != "n3" {
                assert_eq!(before.id, after.id, "a digest n3 did not own moved");
            }
        }
        // Joining: a fourth node takes about a quarter, all from the others, none moved between them.
        let four: Vec<Member> = ["n1", "n2", "n3", "n4"].into_iter().map(member).collect();
        let moved = all.iter().filter(|d| owner(&three, d).unwrap().id != owner(&four, d).unwrap().id).count();
        assert!((600..900).contains(&moved), "{moved} of 3000 moved when n4 joined");
        assert!(all.iter().all(|d| {
            let (a, b) = (owner(&three, d).unwrap(), owner(&four, d).unwrap());
            a.id == b.id || b.id == "n4"
        }));
        // The order members come in does not matter.
        let mut shuffled = three.clone();
        shuffled.reverse();
        assert!(all.iter().all(|d| owner(&three, d).unwrap().id == owner(&shuffled, d).unwrap().id));
    }

    #[test]
    fn a_node_asks_no_one_for_its_own_digests_and_skips_a_suspect_until_it_restarts() {
        let members: Vec<Member> = ["n1", "n2"].into_iter().map(member).collect();
        let peers = Peers::new("n1".into(), PeerOptions::default()).unwrap();
        let all = digests(200);
        let theirs = all.iter().find(|d| owner(&members, d).unwrap().id == "n2").unwrap();
        let mine = all.iter().find(|d| owner(&members, d).unwrap().id == "n1").unwrap();
        assert_eq!(peers.choose(&members, mine), None);
        assert_eq!(peers.choose(&members, theirs).unwrap().id, "n2");
        peers.failed(&members[1], PeerFailure::Timeout, &"slow");
        assert_eq!(peers.choose(&members, theirs), None, "a suspect peer is skipped");
        let view = peers.views();
        assert_eq!(view.len(), 1);
        assert!(view[0].suspect_until.is_some());
        assert_eq!(view[0].errors, 1);
        let restarted = vec![members[0].clone(), Member { generation: 2, ..members[1].clone() }];
        assert_eq!(peers.choose(&restarted, theirs).unwrap().id, "n2", "a restarted peer is asked again");
        assert_eq!(Peers::off().choose(&members, theirs), None, "standalone: no peer fetch");
    }
}
