//! [`EmbeddedStore`]: the config store in a local directory, for a single control plane.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::log::{LogWriter, Op, Record};
use super::{
    ConfigStore, EventKind, KeyValue, Lease, LeaseId, Revision, StoreError, WatchEvent, WatchStream, check_expected,
    check_key, ttl_secs,
};

/// Options for [`EmbeddedStore::open_with`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The prefix keys live under (as for etcd, so one data directory could hold several).
    pub prefix: String,
    /// How long one call may take (a stuck disk) before it fails with `Unavailable`.
    pub timeout: Duration,
    /// How many recent events are kept for watches; a watch from an older revision gets `Compacted`.
    pub history_limit: usize,
    /// The log is rewritten as a snapshot once it is larger than this and more than twice the live
    /// data.
    pub rewrite_min_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            prefix: super::DEFAULT_PREFIX.to_string(),
            timeout: super::DEFAULT_TIMEOUT,
            history_limit: 10_000,
            rewrite_min_bytes: 4 << 20,
        }
    }
}

/// A durable local store with etcd's semantics: one monotonically increasing revision, compare-and-swap,
/// watch from a revision, leases.
///
/// Storage is an append-only log of checksummed records, each fsynced before the write is acknowledged,
/// replayed into memory at open and rewritten as a snapshot (temp file + rename) when it has grown to
/// more than twice the live data (see `log.rs` for the format). Why not an embedded database such as
/// redb: the config is small (thousands of keys at most) and read far more often than written, so it
/// lives in memory anyway; the store needs revisions, a history of events and lease semantics that a
/// database would not give either; and a log is a few hundred lines whose crash behaviour the tests
/// pin down (torn last record dropped, mid-file corruption refused), without another dependency.
///
/// Watches are served from an in-memory history of recent events (`history_limit`); history does not
/// survive a restart, so after one, watches from before the open revision get `Compacted`. Leases live
/// in memory: keys attached to a lease are deleted (with a new revision and Delete events) when it
/// expires, is revoked, or at the next open after the process stopped.
///
/// The directory is locked (`flock` on `LOCK`) while the store is open: a second open fails. Dropping
/// the last handle releases it; watch streams then end with `Unavailable`.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    prefix: String,
    opts: EmbeddedOptions,
    /// Serialises writers; held across the append and its fsync.
    writer: Mutex<LogWriter>,
    /// The state readers see: only what is durable. Never held across I/O.
    mem: Mutex<Mem>,
    /// The current revision, for watchers to wait on.
    rev_tx: watch::Sender<Revision>,
    /// Wakes the lease reaper when a lease is granted (an earlier deadline) or the store closes.
    lease_wake: Arc<Notify>,
    /// Holds the directory lock.
    _lock: File,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    lease: i64,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Default)]
struct Mem {
    kvs: BTreeMap<String, Entry>,
    revision: Revision,
    /// The oldest revision a watch can start from.
    compact_revision: Revision,
    /// Recent events (full keys), in revision order.
    history: VecDeque<WatchEvent>,
    leases: HashMap<i64, LeaseState>,
    /// Approximate size of the live data in the log, to decide when to rewrite it.
    live_bytes: u64,
}

fn entry_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len() + 40) as u64
}

impl Mem {
    fn kv(&self, key: &str, e: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            lease: (e.lease != 0).then_some(LeaseId(e.lease)),
        }
    }

    /// Applies one revision's ops (already durable) and records their events.
    fn apply(&mut self, revision: Revision, ops: Vec<Op>, history_limit: usize) {
        for op in ops {
            let event = match op {
                Op::Put { key, value, lease } => {
                    let prev = self.kvs.get(&key).cloned();
                    let create_revision = prev.as_ref().map_or(revision, |p| p.create_revision);
                    if let Some(p) = &prev {
                        self.live_bytes = self.live_bytes.saturating_sub(entry_bytes(&key, &p.value));
                        if p.lease != 0
                            && p.lease != lease
                            && let Some(l) = self.leases.get_mut(&p.lease)
                        {
                            l.keys.remove(&key);
                        }
                    }
                    if lease != 0
                        && let Some(l) = self.leases.get_mut(&lease)
                    {
                        l.keys.insert(key.clone());
                    }
                    self.live_bytes += entry_bytes(&key, &value);
                    let entry = Entry { value, create_revision, mod_revision: revision, lease };
                    let ev = WatchEvent {
                        revision,
                        kind: EventKind::Put,
                        kv: self.kv(&key, &entry),
                        prev_kv: prev.as_ref().map(|p| self.kv(&key, p)),
                    };
                    self.kvs.insert(key, entry);
                    ev
                }
                Op::Delete { key } => {
                    let prev = self.kvs.remove(&key);
                    if let Some(p) = &prev {
                        self.live_bytes = self.live_bytes.saturating_sub(entry_bytes(&key, &p.value));
                        if p.lease != 0
                            && let Some(l) = self.leases.get_mut(&p.lease)
                        {
                            l.keys.remove(&key);
                        }
                    }
                    WatchEvent {
                        revision,
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: key.clone(),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: revision,
                            lease: None,
                        },
                        prev_kv: prev.as_ref().map(|p| self.kv(&key, p)),
                    }
                }
            };
            self.history.push_back(event);
        }
        self.revision = revision;
        self.trim_history(history_limit);
    }

    /// Drops the oldest revisions (whole revisions) until at most `limit` events remain.
    fn trim_history(&mut self, limit: usize) {
        while self.history.len() > limit {
            let Some(oldest) = self.history.front().map(|e| e.revision) else { break };
            while self.history.front().is_some_and(|e| e.revision == oldest) {
                self.history.pop_front();
            }
            self.compact_revision = self.compact_revision.max(oldest + 1);
        }
    }

    /// The records of a snapshot of the live keys.
    fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.kvs.len() + 1);
        out.push(Record::Base { revision: self.revision });
        for (k, e) in &self.kvs {
            out.push(Record::Entry {
                key: k.clone(),
                value: e.value.clone(),
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
                lease: e.lease,
            });
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the state half-changed (apply does not panic), so
    // a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rebuilds the key-values from replayed records.
fn rebuild(records: Vec<Record>) -> Result<Mem, StoreError> {
    let mut mem = Mem { revision: 1, ..Mem::default() };
    for (i, rec) in records.into_iter().enumerate() {
        match rec {
            Record::Base { revision } if i == 0 => mem.revision = revision,
            Record::Base { revision } => {
                return Err(StoreError::Corrupt(format!(
                    "snapshot base (revision {revision}) in the middle of the log"
                )));
            }
            Record::Entry { key, value, create_revision, mod_revision, lease } => {
                if mod_revision > mem.revision || create_revision > mod_revision {
                    return Err(StoreError::Corrupt(format!(
                        "snapshot entry {key:?} at revision {mod_revision} (created {create_revision}) is past the \
                         snapshot's revision {}",
                        mem.revision
                    )));
                }
                mem.live_bytes += entry_bytes(&key, &value);
                mem.kvs.insert(key, Entry { value, create_revision, mod_revision, lease });
            }
            Record::Batch { revision, ops } => {
                if revision <= mem.revision {
                    return Err(StoreError::Corrupt(format!(
                        "log record at revision {revision} after revision {}",
                        mem.revision
                    )));
                }
                // No history, no leases while replaying.
                mem.apply(revision, ops, 0);
            }
        }
    }
    mem.history.clear();
    Ok(mem)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with default options.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir, EmbeddedOptions::default()).await
    }

    /// Opens (creating if needed) the store in `dir`. Must be called inside a tokio runtime (a task
    /// expires leases).
    pub async fn open_with(dir: impl AsRef<Path>, opts: EmbeddedOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let timeout = opts.timeout;
        let task = tokio::task::spawn_blocking(move || Self::open_blocking(dir, opts));
        let store = match tokio::time::timeout(timeout, task).await {
            Ok(Ok(res)) => res?,
            Ok(Err(e)) => return Err(StoreError::Internal(format!("opening the embedded store: {e}"))),
            Err(_) => return Err(StoreError::Unavailable(format!("opening the embedded store took over {timeout:?}"))),
        };
        tokio::spawn(lease_reaper(Arc::downgrade(&store.inner), store.inner.lease_wake.clone()));
        Ok(store)
    }

    fn open_blocking(dir: PathBuf, opts: EmbeddedOptions) -> Result<Self, StoreError> {
        if !dir.exists() {
            // The store holds upstream passwords and token hashes: a directory of the service user's.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| StoreError::Internal(format!("creating store directory {}: {e}", dir.display())))?;
        }
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Internal(format!("opening {}: {e}", lock_path.display())))?;
        rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            StoreError::Unavailable(format!("store directory {} is in use by another process: {e}", dir.display()))
        })?;

        let (mut mem, writer) = match super::log::open_existing(&dir)? {
            Some((replayed, file)) => {
                let len = replayed.valid_len;
                (rebuild(replayed.records)?, LogWriter::new(&dir, file, len))
            }
            None => {
                let mem = Mem { revision: 1, ..Mem::default() };
                let writer = LogWriter::create(&dir, &mem.snapshot())?;
                (mem, writer)
            }
        };
        // History starts now: a watch from before this open cannot be served.
        mem.compact_revision = mem.revision + 1;
        let revision = mem.revision;
        let (rev_tx, _) = watch::channel(revision);
        let inner = Arc::new(Inner {
            prefix: opts.prefix.clone(),
            opts,
            writer: Mutex::new(writer),
            mem: Mutex::new(mem),
            rev_tx,
            lease_wake: Arc::new(Notify::new()),
            _lock: lock_file,
            dir,
        });
        // Leases do not survive a restart: delete the keys that were attached to one, as one revision.
        let orphans: Vec<Op> = lock(&inner.mem)
            .kvs
            .iter()
            .filter(|(_, e)| e.lease != 0)
            .map(|(k, _)| Op::Delete { key: k.clone() })
            .collect();
        if !orphans.is_empty() {
            let n = orphans.len();
            let mut w = lock(&inner.writer);
            let rev = inner.commit(&mut w, orphans)?;
            tracing::info!(keys = n, revision = rev, "deleted keys whose leases ended with the previous process");
        }
        tracing::info!(dir = %inner.dir.display(), revision = lock(&inner.mem).revision, "embedded store open");
        Ok(Self { inner })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The size of the log file now (for tests and metrics).
    pub fn log_len(&self) -> u64 {
        lock(&self.inner.writer).len()
    }

    /// Runs `f` on a blocking thread, bounded by the timeout.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        let timeout = self.inner.opts.timeout;
        let task = tokio::task::spawn_blocking(move || f(&inner));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => Err(StoreError::Internal(format!("embedded store {op}: {e}"))),
            Err(_) => {
                tracing::warn!(op, ?timeout, "embedded store call timed out");
                Err(StoreError::Unavailable(format!("embedded store {op} took over {timeout:?} (disk stuck?)")))
            }
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }
}

impl Inner {
    fn strip(&self, mut kv: KeyValue) -> KeyValue {
        kv.key = kv.key.strip_prefix(&self.prefix).map(str::to_string).unwrap_or(kv.key);
        kv
    }

    /// Makes `ops` durable as the next revision, then visible. The caller holds the writer lock and
    /// has checked the ops' preconditions under it.
    fn commit(&self, w: &mut LogWriter, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let revision = lock(&self.mem).revision + 1;
        w.append_batch(revision, &ops)?;
        let snapshot = {
            let mut mem = lock(&self.mem);
            mem.apply(revision, ops, self.opts.history_limit);
            let due = w.len() > self.opts.rewrite_min_bytes && w.len() > 2 * mem.live_bytes;
            due.then(|| mem.snapshot())
        };
        self.rev_tx.send_replace(revision);
        if let Some(records) = snapshot {
            let before = w.len();
            // The write is durable already; a failed rewrite only leaves the longer log in place.
            match w.rewrite(&records) {
                Ok(()) => tracing::info!(revision, before, after = w.len(), "rewrote the store log as a snapshot"),
                Err(e) => tracing::warn!(revision, error = %e, "could not rewrite the store log; keeping it"),
            }
        }
        Ok(revision)
    }

    fn create(&self, key: String, value: Vec<u8>) -> Result<Revision, StoreError> {
        let mut w = lock(&self.writer);
        w.check()?;
        if lock(&self.mem).kvs.contains_key(&key) {
            return Err(StoreError::AlreadyExists { key: self.rel(&key) });
        }
        self.commit(&mut w, vec![Op::Put { key, value, lease: 0 }])
    }

    /// Checks that `key` exists with the expected mod revision.
    fn check_current(&self, key: &str, expected: Option<Revision>) -> Result<(), StoreError> {
        let mem = lock(&self.mem);
        let Some(e) = mem.kvs.get(key) else {
            return Err(StoreError::NotFound { key: self.rel(key) });
        };
        match expected {
            Some(exp) if exp != e.mod_revision => {
                Err(StoreError::RevisionMismatch { key: self.rel(key), expected: exp, current: e.mod_revision })
            }
            _ => Ok(()),
        }
    }

    fn update(&self, key: String, value: Vec<u8>, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let mut w = lock(&self.writer);
        w.check()?;
        self.check_current(&key, expected)?;
        self.commit(&mut w, vec![Op::Put { key, value, lease: 0 }])
    }

    fn delete(&self, key: String, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let mut w = lock(&self.writer);
        w.check()?;
        self.check_current(&key, expected)?;
        self.commit(&mut w, vec![Op::Delete { key }])
    }

    fn put_with_lease(&self, key: String, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
        let mut w = lock(&self.writer);
        w.check()?;
        if !lock(&self.mem).leases.contains_key(&lease.0) {
            return Err(StoreError::LeaseNotFound { lease });
        }
        self.commit(&mut w, vec![Op::Put { key, value, lease: lease.0 }])
    }

    /// Ends `lease` (revoked or expired), deleting its keys as one revision.
    fn end_lease(&self, lease: LeaseId, expired_by: Option<Instant>) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        w.check()?;
        let keys = {
            let mut mem = lock(&self.mem);
            match mem.leases.get(&lease.0) {
                None => return Err(StoreError::LeaseNotFound { lease }),
                // Renewed since the reaper looked.
                Some(l) if expired_by.is_some_and(|now| l.deadline > now) => return Ok(()),
                Some(_) => {}
            }
            mem.leases.remove(&lease.0).map(|l| l.keys).unwrap_or_default()
        };
        let n = keys.len();
        let revision = if keys.is_empty() {
            None
        } else {
            Some(self.commit(&mut w, keys.into_iter().map(|key| Op::Delete { key }).collect())?)
        };
        tracing::info!(%lease, keys = n, revision, expired = expired_by.is_some(), "lease ended");
        Ok(())
    }

    fn rel(&self, key: &str) -> String {
        key.strip_prefix(&self.prefix).unwrap_or(key).to_string()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.lease_wake.notify_one();
    }
}

/// Expires leases when their deadlines pass. Holds only a weak reference, so the store can close.
async fn lease_reaper(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(i) = inner.upgrade() else { return };
            let mem = lock(&i.mem);
            mem.leases.values().map(|l| l.deadline).min()
        };
        match next {
            Some(deadline) => tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = wake.notified() => continue,
            },
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(i) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> =
            lock(&i.mem).leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| LeaseId(*id)).collect();
        if expired.is_empty() {
            continue;
        }
        let res = tokio::task::spawn_blocking(move || {
            for lease in expired {
                match i.end_lease(lease, Some(now)) {
                    Ok(()) | Err(StoreError::LeaseNotFound { .. }) => {}
                    Err(e) => tracing::error!(%lease, error = %e, "could not expire a lease"),
                }
            }
        })
        .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "lease reaper task failed");
        }
    }
}

#[async_trait]
impl ConfigStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let mem = lock(&self.inner.mem);
        Ok(mem.kvs.get(&full).map(|e| self.inner.strip(mem.kv(&full, e))))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let full = self.full(prefix);
        let mem = lock(&self.inner.mem);
        let kvs = mem
            .kvs
            .range::<str, _>((std::ops::Bound::Included(full.as_str()), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&full))
            .map(|(k, e)| self.inner.strip(mem.kv(k, e)))
            .collect();
        Ok((kvs, mem.revision))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        self.blocking("create", move |i| i.create(full, value)).await
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_expected(key, expected_mod_revision)?;
        let full = self.full(key);
        self.blocking("update", move |i| i.update(full, value, expected_mod_revision)).await
    }

    async fn delete(&self, key: &str, expected_mod_revision: Option<Revision>) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_expected(key, expected_mod_revision)?;
        let full = self.full(key);
        self.blocking("delete", move |i| i.delete(full, expected_mod_revision)).await
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError> {
        let next = if from_revision > 0 { from_revision } else { lock(&self.inner.mem).revision + 1 };
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            rx: self.inner.rev_tx.subscribe(),
            prefix: self.full(prefix),
            next,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures_util::stream::unfold(state, WatchState::next_item)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl = Duration::from_secs(ttl_secs(ttl)?.unsigned_abs());
        let id = {
            let mut mem = lock(&self.inner.mem);
            let id = loop {
                // Random ids, so a lease from before a restart never matches a new one.
                let id = rand::random::<i64>() & i64::MAX;
                if id != 0 && !mem.leases.contains_key(&id) {
                    break id;
                }
            };
            mem.leases.insert(id, LeaseState { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
            LeaseId(id)
        };
        self.inner.lease_wake.notify_one();
        tracing::debug!(lease = %id, ?ttl, "lease granted");
        Ok(Lease { id, ttl })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut mem = lock(&self.inner.mem);
        let l = mem.leases.get_mut(&lease.0).ok_or(StoreError::LeaseNotFound { lease })?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        self.blocking("put_with_lease", move |i| i.put_with_lease(full, value, lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking("revoke_lease", move |i| i.end_lease(lease, None)).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(lock(&self.inner.mem).revision)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut mem = lock(&self.inner.mem);
        if revision > mem.revision {
            return Err(StoreError::InvalidArgument(format!(
                "cannot compact to revision {revision}: the current revision is {}",
                mem.revision
            )));
        }
        if revision > mem.compact_revision {
            let keep = mem.history.partition_point(|e| e.revision < revision);
            mem.history.drain(..keep);
            mem.compact_revision = revision;
        }
        Ok(())
    }
}

/// One watcher's position; the stream is an unfold over it.
struct WatchState {
    inner: Weak<Inner>,
    rx: watch::Receiver<Revision>,
    /// The full key prefix watched.
    prefix: String,
    /// The next revision to deliver.
    next: Revision,
    pending: VecDeque<WatchEvent>,
    done: bool,
}

impl WatchState {
    async fn next_item(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            // Mark the current revision seen before reading, so a change after the read wakes us.
            self.rx.borrow_and_update();
            let Some(inner) = self.inner.upgrade() else {
                self.done = true;
                return Some((Err(StoreError::Unavailable("embedded store closed".into())), self));
            };
            {
                let mem = lock(&inner.mem);
                if self.next < mem.compact_revision {
                    self.done = true;
                    let err = StoreError::Compacted { requested: self.next, compact_revision: mem.compact_revision };
                    return Some((Err(err), self));
                }
                let start = mem.history.partition_point(|e| e.revision < self.next);
                for e in mem.history.range(start..) {
                    if e.kv.key.starts_with(&self.prefix) {
                        let mut ev = e.clone();
                        ev.kv = inner.strip(ev.kv);
                        ev.prev_kv = ev.prev_kv.map(|kv| inner.strip(kv));
                        self.pending.push_back(ev);
                    }
                }
                self.next = self.next.max(mem.revision + 1);
            }
            drop(inner);
            if self.pending.is_empty() && self.rx.changed().await.is_err() {
                self.done = true;
                return Some((Err(StoreError::Unavailable("embedded store closed".into())), self));
            }
        }
    }
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
