//! [`EtcdStore`]: the config store in etcd (v3 API, through `etcd-client`).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions,
};

use super::{
    ConfigStore, EventKind, KeyValue, Lease, LeaseId, Revision, StoreError, WatchEvent, WatchStream, check_expected,
    check_key, ttl_secs,
};

/// How many keys one range request of a list fetches.
const LIST_PAGE: i64 = 500;

/// Options for [`EtcdStore::connect`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the cluster's members, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The prefix every key lives under; must not be empty.
    pub prefix: String,
    /// The bound on every call (and on connecting and starting a watch).
    pub timeout: Duration,
    /// etcd user name and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
    /// For `https://` endpoints: the CA to trust and, for etcd's `--client-cert-auth`, a client
    /// certificate.
    pub tls: Option<etcd_client::TlsOptions>,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default prefix and timeout.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: super::DEFAULT_PREFIX.to_string(),
            timeout: super::DEFAULT_TIMEOUT,
            user: None,
            tls: None,
        }
    }
}

/// The config store in an etcd cluster.
///
/// Create/update/delete are etcd transactions comparing the key's `create_revision`/`mod_revision`;
/// watches use `start_revision` and `prev_kv` (etcd's "revision compacted" cancels become
/// [`StoreError::Compacted`]); leases are etcd leases. The client balances over all endpoints and
/// requires a leader for every call, so a member cut off from the others answers `Unavailable` rather
/// than stale data. Every call is bounded by [`EtcdOptions::timeout`].
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    /// The endpoints, comma-separated, for error messages.
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).field("timeout", &self.timeout).finish()
    }
}

impl EtcdStore {
    /// Sets up a client for `opts.endpoints`. Connections are made lazily: this succeeds while etcd is
    /// down (calls then fail with `Unavailable`), unless a user is set (authenticating needs etcd).
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoints given".into()));
        }
        if opts.prefix.is_empty() {
            return Err(StoreError::InvalidArgument("the etcd key prefix must not be empty".into()));
        }
        let mut co = ConnectOptions::new()
            // A quarter of the call budget, so a member that drops packets leaves time to try another.
            .with_connect_timeout((opts.timeout / 4).max(Duration::from_millis(100)))
            // Detects a dead connection under a long-lived watch (etcd accepts pings every 5 s or more).
            .with_keep_alive(Duration::from_secs(10), opts.timeout)
            .with_require_leader(true);
        if let Some((user, password)) = &opts.user {
            co = co.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &opts.tls {
            co = co.with_tls(tls.clone());
        }
        let endpoints = opts.endpoints.iter().map(|e| redact(e)).collect::<Vec<_>>().join(",");
        let client = match tokio::time::timeout(opts.timeout, Client::connect(&opts.endpoints, Some(co))).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(map_err(&format!("connecting to etcd at {endpoints}"), &e)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "connecting to etcd at {endpoints}: no answer within {:?}",
                    opts.timeout
                )));
            }
        };
        tracing::info!(%endpoints, prefix = %opts.prefix, "etcd store configured");
        Ok(Self { client, prefix: opts.prefix, timeout: opts.timeout, endpoints })
    }

    /// The underlying client (for tests and administrative tasks).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs the attempt `make(client)` builds, within the timeout, mapping errors with `ctx`.
    ///
    /// An attempt that failed to connect (the request never left, e.g. it was routed to a member that
    /// is down) is retried, on whichever member the client picks next, until the timeout: with one
    /// etcd member of three down, calls still succeed. Nothing else is retried, as a write may have
    /// been applied.
    async fn call<T, F>(&self, ctx: impl FnOnce() -> String, make: impl FnMut(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_lease(None, false, ctx, make).await
    }

    /// [`EtcdStore::call`] for a read (or anything safe to repeat): each attempt also gets a third of
    /// the timeout, so a request stuck on a member that lost its leader (etcd holds it until its own
    /// request timeout) is tried again once the cluster has elected a new one.
    async fn read<T, F>(&self, ctx: impl FnOnce() -> String, make: impl FnMut(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_lease(None, true, ctx, make).await
    }

    /// [`EtcdStore::call`] for an operation on `lease`: etcd's "lease not found" becomes
    /// [`StoreError::LeaseNotFound`].
    async fn call_lease<T, F>(
        &self,
        lease: Option<LeaseId>,
        repeatable: bool,
        ctx: impl FnOnce() -> String,
        mut make: impl FnMut(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 1u32;
        // What a member said, when one answered at all: with quorum lost, the members still up
        // answer (no leader), while the down ones give connect errors; the answer says more.
        let mut answered: Option<String> = None;
        let attempt_timeout =
            if repeatable { (self.timeout / 3).max(Duration::from_millis(200)) } else { self.timeout };
        let err = loop {
            let attempt_deadline = deadline.min(tokio::time::Instant::now() + attempt_timeout);
            let e = match tokio::time::timeout_at(attempt_deadline, make(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    attempts += 1;
                    continue;
                }
                Err(_) => {
                    let ctx = ctx();
                    tracing::warn!(op = %ctx, timeout = ?self.timeout, attempts, "etcd call timed out");
                    break StoreError::Unavailable(format!("{ctx}: no answer within {:?}", self.timeout));
                }
            };
            if let Some(lease) = lease
                && is_lease_not_found(&e)
            {
                return Err(StoreError::LeaseNotFound { lease });
            }
            if let etcd_client::Error::GRpcStatus(s) = &e
                && s.message().starts_with("etcdserver:")
            {
                answered = Some(s.message().to_owned());
            }
            let retry = is_not_sent(&e) || (repeatable && map_err("", &e).is_unavailable());
            if !retry || tokio::time::Instant::now() + backoff >= deadline {
                break map_err(&ctx(), &e);
            }
            tracing::debug!(error = %e, attempts, "etcd call failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
            attempts += 1;
        };
        Err(match (err, answered) {
            (StoreError::Unavailable(msg), Some(said)) if no_quorum(&said) => StoreError::Unavailable(format!(
                "etcd has no leader (quorum lost: too few members reachable): a member answered {said:?}; last error: {msg} (etcd at {}, {attempts} attempts)",
                self.endpoints
            )),
            (StoreError::Unavailable(msg), _) => {
                StoreError::Unavailable(format!("{msg} (etcd at {}, {attempts} attempts)", self.endpoints))
            }
            (e, _) => e,
        })
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        to_kv(&self.prefix, kv)
    }

    /// The failure of a conditional write, from the `or_else` get of its key.
    /// A compare-and-swap transaction: safe to repeat (a repeat cannot apply twice, its comparison
    /// fails), so like a read each attempt gets a third of the timeout and a write caught by the
    /// death of etcd's leader is sent again once a new one is elected. Returns the attempts made,
    /// for the caller to tell "someone else changed it" from "our first attempt landed".
    async fn cas_write(&self, ctx: impl FnOnce() -> String, txn: &Txn) -> Result<(TxnResponse, u32), StoreError> {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let resp = self
            .call_lease(None, true, ctx, |c| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c_txn(c, txn)
            })
            .await?;
        Ok((resp, attempts.into_inner()))
    }

    fn cas_failure(&self, key: &str, expected: Option<Revision>, resp: &TxnResponse) -> StoreError {
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(etcd_client::KeyValue::mod_revision)),
            _ => None,
        });
        match (current.flatten(), expected) {
            (Some(current), Some(expected)) => StoreError::RevisionMismatch { key: key.to_string(), expected, current },
            (None, _) => StoreError::NotFound { key: key.to_string() },
            // The key exists and nothing was expected: the comparison cannot have failed.
            (Some(current), None) => {
                StoreError::Internal(format!("etcd refused a write to {key:?} (mod revision {current})"))
            }
        }
    }

    /// A conditional put or delete of an existing key.
    async fn write_existing(
        &self,
        op_name: &'static str,
        key: &str,
        op: TxnOp,
        written: Option<&[u8]>,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_expected(key, expected)?;
        let full = self.full(key);
        let cmp = match expected {
            Some(r) => Compare::mod_revision(full.clone(), CompareOp::Equal, r),
            None => Compare::create_revision(full.clone(), CompareOp::Greater, 0),
        };
        let txn = Txn::new().when([cmp]).and_then([op]).or_else([TxnOp::get(full, None)]);
        let (resp, attempts) = self.cas_write(|| format!("{op_name} {key:?}"), &txn).await?;
        if !resp.succeeded() {
            // A repeated attempt whose comparison fails may follow our own first attempt that
            // landed: the key holds what we wrote (update), or is gone (delete).
            if attempts > 1 {
                match (op_name, current_kv(&resp), written) {
                    ("update", Some((current, v)), Some(w)) if v == w => return Ok(current),
                    ("delete", None, None) => return Ok(resp.header().map_or(0, |h| h.revision())),
                    _ => {}
                }
            }
            return Err(self.cas_failure(key, expected, &resp));
        }
        let revision = header_revision(resp.header(), op_name, key)?;
        tracing::debug!(op = op_name, key, revision, "etcd write");
        Ok(revision)
    }

    /// One attempt at a paginated list, all pages at the revision of the first.
    async fn list_once(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut start = full.into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .read(
                    || format!("list {prefix:?}"),
                    |mut c| {
                        let (start, opts) = (start.clone(), opts.clone());
                        async move { c.get(start, Some(opts)).await }
                    },
                )
                .await?;
            if revision == 0 {
                revision = header_revision(resp.header(), "list", prefix)?;
            }
            for kv in resp.kvs() {
                out.push(self.kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }
}

/// The revision in a response header.
fn header_revision(h: Option<&etcd_client::ResponseHeader>, op: &str, key: &str) -> Result<Revision, StoreError> {
    h.map(etcd_client::ResponseHeader::revision)
        .ok_or_else(|| StoreError::Internal(format!("etcd answered {op} {key:?} without a header")))
}

/// `url` without any `user:password@` part, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}{}", &url[..scheme_end + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Maps a client error to a store error, with `ctx` (the operation and key) in the message.
fn map_err(ctx: &str, e: &etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() {
                _ if msg.contains("required revision has been compacted") => {
                    StoreError::Compacted { requested: 0, compact_revision: 0 }
                }
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted => StoreError::Unavailable(format!("{ctx}: {msg}")),
                // Transport failures surface as Unknown with the transport's message.
                Code::Unknown if msg.contains("transport") || msg.contains("connect") => {
                    StoreError::Unavailable(format!("{ctx}: {msg}"))
                }
                Code::InvalidArgument | Code::OutOfRange => StoreError::InvalidArgument(format!("{ctx}: {msg}")),
                code => StoreError::Internal(format!("{ctx}: etcd answered {code:?}: {msg}")),
            }
        }
        E::TransportError(t) => StoreError::Unavailable(format!("{ctx}: {t}")),
        E::IoError(io) => StoreError::Unavailable(format!("{ctx}: {io}")),
        E::InvalidArgs(a) => StoreError::InvalidArgument(format!("{ctx}: {a}")),
        E::InvalidUri(u) => StoreError::InvalidArgument(format!("{ctx}: invalid endpoint URL: {u}")),
        E::WatchError(w) | E::LeaseKeepAliveError(w) => StoreError::Unavailable(format!("{ctx}: {w}")),
        other => StoreError::Internal(format!("{ctx}: {other}")),
    }
}

/// One transaction attempt (a clone of `txn`, as a failed connect retries it).
/// The key's mod revision and value from a transaction's `or_else` get, when it exists.
fn current_kv(resp: &TxnResponse) -> Option<(Revision, Vec<u8>)> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.mod_revision(), kv.value().to_vec())),
        _ => None,
    })
}

/// An etcd key-value as the trait shows it: the key relative to `prefix`.
fn to_kv(prefix: &str, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| StoreError::Corrupt(format!("etcd key {:?} is not UTF-8", String::from_utf8_lossy(kv.key()))))?;
    Ok(KeyValue {
        key: key.strip_prefix(prefix).unwrap_or(key).to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn c_txn(mut c: Client, txn: &Txn) -> impl Future<Output = Result<TxnResponse, etcd_client::Error>> + use<> {
    let txn = txn.clone();
    async move { c.txn(txn).await }
}

/// Whether the request surely was not applied, so that repeating it (on another member) cannot apply
/// it twice: connecting failed (refused, unreachable, connect timeout), or the member refused it for
/// want of a leader before proposing it.
fn is_not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message().to_ascii_lowercase();
            s.code() == tonic::Code::Unavailable
                && (msg.contains("connect error")
                    || msg.contains("connection refused")
                    || msg.contains("error trying to connect")
                    || msg.contains("no leader"))
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Whether a member's answer means the cluster has no leader (quorum lost, or an election that
/// does not end).
fn no_quorum(said: &str) -> bool {
    ["no leader", "request timed out", "leader changed", "timed out, possibly due to"].iter().any(|m| said.contains(m))
}

/// Whether `e` is etcd's "requested lease not found".
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        // What the keep-alive stream says about an expired lease.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

#[async_trait]
impl ConfigStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let resp = self
            .read(
                || format!("get {key:?}"),
                |mut c| {
                    let full = full.clone();
                    async move { c.get(full, None).await }
                },
            )
            .await?;
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        // A compaction between two pages of a long list: start over at the new revision.
        let mut attempts = 0;
        loop {
            match self.list_once(prefix).await {
                Err(StoreError::Compacted { .. }) if attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(full.clone(), value.clone(), None)])
            .or_else([TxnOp::get(full, None)]);
        let (resp, attempts) = self.cas_write(|| format!("create {key:?}"), &txn).await?;
        if !resp.succeeded() {
            // A repeated attempt finds the key: it may be our own first attempt that landed.
            if attempts > 1
                && let Some((current, v)) = current_kv(&resp)
                && v == value
            {
                return Ok(current);
            }
            return Err(StoreError::AlreadyExists { key: key.to_string() });
        }
        let revision = header_revision(resp.header(), "create", key)?;
        tracing::debug!(op = "create", key, revision, "etcd write");
        Ok(revision)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let op = TxnOp::put(self.full(key), value.clone(), None);
        self.write_existing("update", key, op, Some(&value), expected_mod_revision).await
    }

    async fn delete(&self, key: &str, expected_mod_revision: Option<Revision>) -> Result<Revision, StoreError> {
        let op = TxnOp::delete(self.full(key), None);
        self.write_existing("delete", key, op, None, expected_mod_revision).await
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError> {
        let full = self.full(prefix);
        let mut opts = WatchOptions::new().with_prefix().with_prev_key();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let ctx = || format!("watch {prefix:?} from revision {from_revision}");
        // Wait for etcd to confirm the watch, so an unreachable or leaderless cluster fails here.
        let (stream, first) = self
            .read(ctx, |mut c| {
                let (full, opts) = (full.clone(), opts.clone());
                async move {
                    let mut stream = c.watch(full, Some(opts)).await?;
                    let first = stream.message().await?;
                    Ok((stream, first))
                }
            })
            .await?;
        let mut state = EtcdWatch {
            stream,
            store_prefix: self.prefix.clone(),
            watched: prefix.to_string(),
            next: from_revision,
            pending: VecDeque::new(),
            done: false,
            failed: None,
        };
        match first {
            Some(resp) => state.take(&resp),
            None => state.fail(StoreError::Unavailable(format!("{}: etcd closed the watch stream", ctx()))),
        }
        tracing::debug!(prefix, from_revision, "etcd watch started");
        Ok(Box::pin(futures_util::stream::unfold(state, EtcdWatch::next_item)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl_secs(ttl)?;
        let resp = self
            .call(|| format!("grant a lease of {secs} s"), |mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Internal(format!("grant a lease of {secs} s: {}", resp.error())));
        }
        let lease = Lease { id: LeaseId(resp.id()), ttl: Duration::from_secs(resp.ttl().unsigned_abs()) };
        tracing::debug!(lease = %lease.id, ttl = ?lease.ttl, "lease granted");
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let once = |mut c: Client| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease.0).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.call_lease(Some(lease), true, || format!("keep lease {lease} alive"), once).await? {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl().unsigned_abs())),
            Some(_) => Err(StoreError::LeaseNotFound { lease }),
            None => Err(StoreError::Unavailable(format!("keep lease {lease} alive: etcd closed the stream"))),
        }
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let put = |mut c: Client| {
            let (full, value) = (full.clone(), value.clone());
            async move { c.put(full, value, Some(PutOptions::new().with_lease(lease.0))).await }
        };
        let resp = self.call_lease(Some(lease), false, || format!("put {key:?} with lease {lease}"), put).await?;
        header_revision(resp.header(), "put_with_lease", key)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let revoke = |mut c: Client| async move { c.lease_revoke(lease.0).await };
        self.call_lease(Some(lease), false, || format!("revoke lease {lease}"), revoke).await?;
        tracing::debug!(%lease, "lease revoked");
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let read = |mut c: Client| {
            let prefix = self.prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_count_only())).await }
        };
        let resp = self.read(|| "read the current revision".to_string(), read).await?;
        header_revision(resp.header(), "current_revision", "")
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let compact =
            |mut c: Client| async move { c.compact(revision, Some(CompactionOptions::new().with_physical())).await };
        match self.call(|| format!("compact to revision {revision}"), compact).await {
            Ok(_) | Err(StoreError::Compacted { .. }) => {
                tracing::info!(revision, "etcd compacted");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// One etcd watch; the stream is an unfold over it.
struct EtcdWatch {
    /// Holds the request side too: dropping it cancels the watch.
    stream: etcd_client::WatchStream,
    store_prefix: String,
    watched: String,
    /// The next revision expected (for the `Compacted` error's `requested`).
    next: Revision,
    pending: VecDeque<WatchEvent>,
    done: bool,
    /// An error to yield after the pending events.
    failed: Option<StoreError>,
}

impl EtcdWatch {
    fn fail(&mut self, e: StoreError) {
        self.done = true;
        self.failed = Some(e);
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        to_kv(&self.store_prefix, kv)
    }

    /// Queues the events of one response, or the error it carries.
    fn take(&mut self, resp: &etcd_client::WatchResponse) {
        if resp.compact_revision() > 0 {
            tracing::info!(
                prefix = %self.watched,
                requested = self.next,
                compact_revision = resp.compact_revision(),
                "etcd watch hit a compacted revision"
            );
            let e = StoreError::Compacted { requested: self.next, compact_revision: resp.compact_revision() };
            return self.fail(e);
        }
        if resp.canceled() {
            let e = StoreError::Unavailable(format!(
                "etcd cancelled the watch on {:?}: {}",
                self.watched,
                resp.cancel_reason()
            ));
            return self.fail(e);
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let converted = self.kv(kv).and_then(|kv| Ok((kv, ev.prev_kv().map(|p| self.kv(p)).transpose()?)));
            let (mut kv, prev_kv) = match converted {
                Ok(v) => v,
                Err(e) => return self.fail(e),
            };
            let kind = match ev.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => {
                    kv.value.clear();
                    kv.create_revision = 0;
                    kv.lease = None;
                    EventKind::Delete
                }
            };
            self.next = kv.mod_revision + 1;
            self.pending.push_back(WatchEvent { revision: kv.mod_revision, kind, kv, prev_kv });
        }
    }

    async fn next_item(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if let Some(e) = self.failed.take() {
                return Some((Err(e), self));
            }
            if self.done {
                return None;
            }
            match self.stream.message().await {
                Ok(Some(resp)) => self.take(&resp),
                Ok(None) => {
                    let e = StoreError::Unavailable(format!("etcd closed the watch on {:?}", self.watched));
                    self.fail(e);
                }
                Err(e) => {
                    let e = map_err(&format!("watch {:?}", self.watched), &e);
                    self.fail(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"/wharf/"), b"/wharf0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn endpoints_lose_credentials_in_messages() {
        assert_eq!(redact("http://user:secret@10.0.0.1:2379"), "http://10.0.0.1:2379");
        assert_eq!(redact("http://10.0.0.1:2379"), "http://10.0.0.1:2379");
    }
}
