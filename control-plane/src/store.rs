//! The control plane's configuration store: a byte-valued key-value store with etcd's semantics.
//!
//! Two implementations pass one test suite (`tests/tests/store.rs`):
//! - [`EtcdStore`]: etcd v3 through `etcd-client`, for replicated deployments;
//! - [`EmbeddedStore`]: a durable single-machine store in a local directory (an fsynced append-only
//!   log, see [`EmbeddedStore`] for why), for `wharf-control --dev` and small installations.
//!
//! [`TracedStore`] wraps either with a span per call.
//!
//! What both guarantee:
//! - Keys are strings relative to a prefix (default `/wharf/`); every key seen through the trait is
//!   relative (`repos/ghcr`, not `/wharf/repos/ghcr`).
//! - Every change has a store revision; revisions only grow. A list is taken at one revision.
//! - `create`/`update`/`delete` are compare-and-swap: on a failed comparison nothing is written.
//! - [`ConfigStore::watch`] delivers every change with revision >= `from_revision`, in revision order.
//!   When `from_revision` is older than the history the store still holds, the stream yields
//!   [`StoreError::Compacted`] and ends: the caller lists again (at revision R) and watches from R + 1.
//!   A watch never skips a change silently. Any other error also ends the stream; resume from the last
//!   revision seen + 1.
//! - Keys put with a lease vanish (a Delete event to watchers) when the lease expires or is revoked.
//! - Every call is bounded by a timeout (default 5 s): an unreachable store yields
//!   [`StoreError::Unavailable`], never a hang.

mod embedded;
mod etcd;
mod log;
mod traced;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use etcd::{EtcdOptions, EtcdStore};
pub use traced::TracedStore;

/// The prefix every key lives under unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/wharf/";

/// How long any single store call may take unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A store revision: a counter that grows with every change to the store.
pub type Revision = i64;

/// The id of a lease granted by [`ConfigStore::grant_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease. `ttl` is what the store granted, which may be more than was asked for (etcd has a
/// minimum that depends on its election timeout; both stores round up to whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// One key and its value, with the revisions that created and last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Relative to the store's prefix.
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (unchanged by updates). 0 in a Delete event's `kv`.
    pub create_revision: Revision,
    /// The revision of the key's last change.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The revision of the change (equal to `kv.mod_revision`).
    pub revision: Revision,
    pub kind: EventKind,
    /// For a Put: the new key-value. For a Delete: the key, an empty value, `create_revision` 0 and
    /// `mod_revision` = the deletion's revision.
    pub kv: KeyValue,
    /// The key-value before this change, when the store still has it (always for the embedded store;
    /// for etcd unless compacted away). `None` for a Put that created the key.
    pub prev_kv: Option<KeyValue>,
}

/// A stream of watch events. It ends after an error item (see [`ConfigStore::watch`]).
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// What can go wrong in a store call. Messages carry the operation and key, never credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key (or, for `update`/`delete`, the key to change) does not exist.
    #[error("key {key:?} not found")]
    NotFound { key: String },
    /// `create` of a key that exists.
    #[error("key {key:?} already exists")]
    AlreadyExists { key: String },
    /// `update`/`delete` with an expected mod revision that is not the key's current one.
    #[error("key {key:?} changed: expected mod revision {expected}, current is {current}")]
    RevisionMismatch { key: String, expected: Revision, current: Revision },
    /// A watch (or read) asked for history the store no longer holds: list again.
    #[error("revision {requested} is compacted (oldest available is {compact_revision}): list again")]
    Compacted { requested: Revision, compact_revision: Revision },
    /// The lease does not exist (never granted, expired, revoked, or lost with a restart).
    #[error("lease {lease} not found (expired, revoked or never granted)")]
    LeaseNotFound { lease: LeaseId },
    /// An argument the store cannot accept (empty key, zero TTL, future compaction revision, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store cannot be reached or did not answer in time; retrying later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Data on disk or from the server that does not make sense.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// Anything else (an I/O error writing the local log, an unexpected server answer, ...).
    #[error("store internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying the same call later may succeed (the store was unreachable or slow).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The configuration store. Object safe: the API layer holds an `Arc<dyn ConfigStore>`.
///
/// Keys are relative to the store's prefix and must not be empty. Revisions are etcd's: every write
/// returns the store revision it created, which is the key's new `mod_revision`.
#[async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    /// The key's current value, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix` (relative; `""` lists everything), sorted by key, and the store
    /// revision at which the list was taken. Watch from `revision + 1` to follow changes after it.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Creates `key`; fails with [`StoreError::AlreadyExists`] when it exists. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError>;

    /// Replaces the value of an existing key (detaching it from any lease). With
    /// `expected_mod_revision`, only when that is the key's current mod revision, else
    /// [`StoreError::RevisionMismatch`]; a missing key is [`StoreError::NotFound`]. Nothing is written
    /// on failure. Returns the new revision.
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Revision, StoreError>;

    /// Deletes an existing key, with the same conditions and failures as [`ConfigStore::update`].
    /// Returns the revision of the deletion.
    async fn delete(&self, key: &str, expected_mod_revision: Option<Revision>) -> Result<Revision, StoreError>;

    /// Streams every change to keys starting with `prefix` with revision >= `from_revision`, in order
    /// (`from_revision` <= 0: changes after now). Errors reaching the store to start the watch are
    /// returned at once; everything else, [`StoreError::Compacted`] included, arrives as the stream's
    /// last item.
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError>;

    /// Grants a lease of (at least) `ttl`, rounded up to whole seconds.
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError>;

    /// Renews the lease once; returns the TTL it now has. Call it every TTL/3 or so.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Puts `key` (created or replaced) attached to `lease`: it vanishes when the lease ends.
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError>;

    /// Ends the lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// The store's current revision (also a cheap reachability probe for `/readyz`).
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Drops history before `revision`: watches from an older revision get [`StoreError::Compacted`].
    /// Compacting to an already compacted revision is not an error; a future revision is.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}

/// Checks a relative key used for a single-key operation.
fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("empty key".into()));
    }
    if key.contains('\0') {
        return Err(StoreError::InvalidArgument(format!("key {key:?} contains a NUL byte")));
    }
    Ok(())
}

/// Checks an expected mod revision (0 or less would match a missing key in etcd).
fn check_expected(key: &str, expected: Option<Revision>) -> Result<(), StoreError> {
    match expected {
        Some(r) if r <= 0 => {
            Err(StoreError::InvalidArgument(format!("expected mod revision {r} for key {key:?} must be positive")))
        }
        _ => Ok(()),
    }
}

/// A lease TTL in whole seconds, at least 1.
fn ttl_secs(ttl: Duration) -> Result<i64, StoreError> {
    if ttl.is_zero() {
        return Err(StoreError::InvalidArgument("lease TTL must be positive".into()));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs).map_err(|_| StoreError::InvalidArgument(format!("lease TTL {ttl:?} is too long")))
}
